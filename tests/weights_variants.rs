//! Loading the variations real SD 2.1 repositories have: fp16 and f32 files side by side, an
//! fp16-only folder, bf16 tensors, the VAE's old attention names, and the errors a broken folder
//! must give (naming the file and the tensor, never panicking).

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};
use sd21::backend::cpu::CpuBackend;
use sd21::backend::Backend;
use sd21::config::{self, UnetConfig, VaeConfig};
use sd21::model::{Unet, VaeDecoder};
use sd21::pipeline::Pipeline;
use sd21::weights::{ModelFiles, SafeTensorsFile, WeightScope};

/// Rewrites a safetensors file: each tensor through `map(name, shape, f32 data)`, which returns
/// the new name and dtype (or None to drop the tensor).
fn rewrite(src: &Path, dst: &Path, map: impl Fn(&str) -> Option<(String, Dtype)>) {
    let file = SafeTensorsFile::open(src).unwrap();
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let names: Vec<String> = file.names().map(str::to_string).collect();
    for name in names {
        let Some((new_name, dtype)) = map(&name) else {
            continue;
        };
        let t = file.get(&name, None).unwrap();
        let bytes: Vec<u8> = match dtype {
            Dtype::F32 => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => t
                .data
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::BF16 => t
                .data
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
            other => panic!("unsupported {other:?}"),
        };
        out.push((new_name, dtype, t.shape, bytes));
    }
    let views: HashMap<String, TensorView> = out
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, dst).unwrap();
}

fn temp_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model(), dir.path());
    dir
}

fn unet_output(files: &ModelFiles) -> Vec<f32> {
    let backend = CpuBackend::new();
    let cfg: UnetConfig = config::read_json(&files.unet_config).unwrap();
    let weights = SafeTensorsFile::open(&files.unet_weights).unwrap();
    let unet = Unet::load(&WeightScope::new(&weights, &backend), &cfg).unwrap();
    let reference_file = SafeTensorsFile::open(&reference("unet.safetensors")).unwrap();
    let sample = read_tensor(&reference_file, "a_sample")
        .nchw_to_nhwc()
        .unwrap();
    let context = read_tensor(&reference_file, "a_encoder_hidden_states");
    let out = unet
        .forward(
            &backend,
            &backend.upload(&sample).unwrap(),
            981.0,
            &backend.upload(&context).unwrap(),
        )
        .unwrap();
    backend.download(&out).unwrap().data
}

#[test]
fn fp16_variant_is_preferred_and_fp16_only_folders_load() {
    let dir = temp_model();
    let unet_dir = dir.path().join("unet");
    let f32_path = unet_dir.join("diffusion_pytorch_model.safetensors");
    let fp16_path = unet_dir.join("diffusion_pytorch_model.fp16.safetensors");
    rewrite(&f32_path, &fp16_path, |n| Some((n.to_string(), Dtype::F16)));

    let both = ModelFiles::locate(dir.path()).unwrap();
    assert_eq!(
        both.unet_weights, fp16_path,
        "the fp16 variant wins when both exist"
    );

    std::fs::remove_file(&f32_path).unwrap();
    let only_fp16 = ModelFiles::locate(dir.path()).unwrap();
    assert_eq!(only_fp16.unet_weights, fp16_path);
    let ours = unet_output(&only_fp16);
    let exact = unet_output(&ModelFiles::locate(&tiny_model()).unwrap());
    // f16 weights: about 3 significant digits.
    assert_close("unet with fp16 weights", &ours, &exact, 2e-2, 2e-2);
    assert!(ours != exact, "the fp16 file must really have been used");
}

#[test]
fn bf16_tensors_load() {
    let dir = temp_model();
    let path = dir
        .path()
        .join("unet")
        .join("diffusion_pytorch_model.safetensors");
    let tmp = dir.path().join("unet").join("tmp.safetensors");
    rewrite(&path, &tmp, |n| Some((n.to_string(), Dtype::BF16)));
    std::fs::rename(&tmp, &path).unwrap();
    let ours = unet_output(&ModelFiles::locate(dir.path()).unwrap());
    let exact = unet_output(&ModelFiles::locate(&tiny_model()).unwrap());
    assert_close("unet with bf16 weights", &ours, &exact, 1e-1, 1e-1);
}

#[test]
fn vae_with_legacy_attention_names_decodes_the_same() {
    let dir = temp_model();
    let path = dir
        .path()
        .join("vae")
        .join("diffusion_pytorch_model.safetensors");
    let tmp = dir.path().join("vae").join("tmp.safetensors");
    rewrite(&path, &tmp, |n| {
        let renamed = n
            .replace("attentions.0.to_q.", "attentions.0.query.")
            .replace("attentions.0.to_k.", "attentions.0.key.")
            .replace("attentions.0.to_v.", "attentions.0.value.")
            .replace("attentions.0.to_out.0.", "attentions.0.proj_attn.");
        Some((renamed, Dtype::F32))
    });
    std::fs::rename(&tmp, &path).unwrap();
    let decode = |root: &Path| {
        let files = ModelFiles::locate(root).unwrap();
        let backend = CpuBackend::new();
        let cfg: VaeConfig = config::read_json(&files.vae_config).unwrap();
        let weights = SafeTensorsFile::open(&files.vae_weights).unwrap();
        let vae = VaeDecoder::load(&WeightScope::new(&weights, &backend), &cfg).unwrap();
        let reference_file = SafeTensorsFile::open(&reference("vae.safetensors")).unwrap();
        let z = read_tensor(&reference_file, "a_latents")
            .nchw_to_nhwc()
            .unwrap();
        backend
            .download(&vae.decode(&backend, &backend.upload(&z).unwrap()).unwrap())
            .unwrap()
            .data
    };
    assert_eq!(decode(dir.path()), decode(&tiny_model()));
}

fn load_error(root: &Path) -> String {
    let files = ModelFiles::locate(root).map_err(|e| e.to_string());
    match files.and_then(|f| Pipeline::load(&f, CpuBackend::new()).map_err(|e| e.to_string())) {
        Ok(_) => panic!("loading {} should fail", root.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_tensor_names_the_file_and_the_tensor() {
    let dir = temp_model();
    let path = dir
        .path()
        .join("unet")
        .join("diffusion_pytorch_model.safetensors");
    let tmp = dir.path().join("unet").join("tmp.safetensors");
    let victim = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    rewrite(&path, &tmp, |n| {
        (n != victim).then(|| (n.to_string(), Dtype::F32))
    });
    std::fs::rename(&tmp, &path).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains(victim) && err.contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );
}

/// Rewrites one key of `model/component/config.json`.
fn set_config_value(model: &std::path::Path, component: &str, key: &str, value: u64) {
    let path = model.join(component).join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg[key] = serde_json::json!(value);
    std::fs::write(&path, cfg.to_string()).unwrap();
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    // A config that disagrees with its weights: the MLP width is 64 in the file.
    let dir = temp_model();
    set_config_value(dir.path(), "text_encoder", "intermediate_size", 48);
    let err = load_error(dir.path());
    assert!(
        err.contains("mlp.fc1.weight") && err.contains("48") && err.contains("64"),
        "{err}"
    );
}

#[test]
fn text_encoder_width_must_match_unet_cross_attention() {
    let dir = temp_model();
    set_config_value(dir.path(), "unet", "cross_attention_dim", 48);
    let err = load_error(dir.path());
    assert!(
        err.contains("cross_attention_dim") && err.contains("48"),
        "{err}"
    );
}

#[test]
fn missing_files_and_bad_json_are_errors() {
    let dir = temp_model();
    std::fs::remove_file(
        dir.path()
            .join("vae")
            .join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("vae") && err.contains("safetensors"), "{err}");

    let dir = temp_model();
    std::fs::write(dir.path().join("unet").join("config.json"), "{ not json").unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("config.json"), "{err}");

    let dir = temp_model();
    let weights = dir.path().join("text_encoder").join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");

    let err = load_error(&dir.path().join("no-such-model"));
    assert!(err.contains("no-such-model"), "{err}");
}

#[test]
fn text_encoder_in_the_sd21_repository_naming_loads() {
    // The SD 2.1 repositories (saved by transformers 4) prefix every tensor with `text_model.` and
    // carry an int64 `text_model.embeddings.position_ids`; transformers 5 (our fixture) does not.
    let dir = temp_model();
    let path = dir.path().join("text_encoder").join("model.safetensors");
    let file = SafeTensorsFile::open(&path).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = file
        .names()
        .map(|n| {
            let t = file.get(n, None).unwrap();
            let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (format!("text_model.{n}"), Dtype::F32, t.shape, bytes)
        })
        .collect();
    tensors.push((
        "text_model.embeddings.position_ids".into(),
        Dtype::I64,
        vec![1, 77],
        (0..77i64).flat_map(|i| i.to_le_bytes()).collect(),
    ));
    drop(file);
    let views: HashMap<String, TensorView> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();

    let encode = |root: &Path| {
        let pipeline =
            Pipeline::load(&ModelFiles::locate(root).unwrap(), CpuBackend::new()).unwrap();
        let context = pipeline.encode_prompts("a red fox", "", true).unwrap();
        pipeline.backend().download(&context).unwrap().data
    };
    assert_eq!(encode(dir.path()), encode(&tiny_model()));
}

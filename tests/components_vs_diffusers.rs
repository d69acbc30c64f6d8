//! Each model component on the CPU backend against diffusers/transformers outputs saved by
//! scripts/make_fixtures.py for the tiny SD 2.1-architecture model.
//!
//! Tolerances (f32 on both sides, different summation orders):
//! every component |diff| ≤ 2e-5 + 1e-4·|ref| (seen: max 1.6e-6 text encoder, 4.1e-6 UNet, 1.7e-6 VAE);
//! the VAE encoder's posterior mean, std and seeded sample likewise; the tiled VAE decode and
//! encode (diffusers' `enable_tiling()`) likewise.

mod common;

use common::*;
use sd21::backend::cpu::CpuBackend;
use sd21::backend::Backend;
use sd21::config::{self, ClipTextConfig, UnetConfig, VaeConfig};
use sd21::model::{ClipTextModel, Unet, VaeDecoder, VaeEncoder, VaeTiling};
use sd21::sampling::rng::TorchGenerator;
use sd21::weights::{ModelFiles, SafeTensorsFile, WeightScope};

fn files() -> ModelFiles {
    ModelFiles::locate(&tiny_model()).expect("fixture model")
}

#[test]
fn text_encoder_matches_transformers() {
    let files = files();
    let backend = CpuBackend::new();
    let cfg: ClipTextConfig = config::read_json(&files.text_encoder_config).unwrap();
    let weights = SafeTensorsFile::open(&files.text_encoder_weights).unwrap();
    let model = ClipTextModel::load(&WeightScope::new(&weights, &backend), &cfg).unwrap();

    let bytes = std::fs::read(reference("text_encoder.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids_view = st.tensor("input_ids").unwrap();
    let ids: Vec<u32> = ids_view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    let rows: Vec<Vec<u32>> = ids
        .chunks(ids_view.shape()[1])
        .map(<[u32]>::to_vec)
        .collect();
    let reference_file = SafeTensorsFile::open(&reference("text_encoder.safetensors")).unwrap();
    let expected = read_tensor(&reference_file, "last_hidden_state");

    let ours = backend
        .download(&model.forward(&backend, &rows).unwrap())
        .unwrap();
    assert_eq!(ours.shape, expected.shape);
    assert_close("text encoder", &ours.data, &expected.data, 2e-5, 1e-4);
}

#[test]
fn unet_matches_diffusers_at_native_and_odd_sizes() {
    let files = files();
    let backend = CpuBackend::new();
    let cfg: UnetConfig = config::read_json(&files.unet_config).unwrap();
    let weights = SafeTensorsFile::open(&files.unet_weights).unwrap();
    let unet = Unet::load(&WeightScope::new(&weights, &backend), &cfg).unwrap();
    let reference_file = SafeTensorsFile::open(&reference("unet.safetensors")).unwrap();
    for case in ["a", "b"] {
        let sample = read_tensor(&reference_file, &format!("{case}_sample"));
        let t = read_tensor(&reference_file, &format!("{case}_timestep")).data[0];
        let context = read_tensor(&reference_file, &format!("{case}_encoder_hidden_states"));
        let expected = read_tensor(&reference_file, &format!("{case}_out"));
        let x = backend.upload(&sample.nchw_to_nhwc().unwrap()).unwrap();
        let out = unet
            .forward(&backend, &x, t, &backend.upload(&context).unwrap())
            .unwrap();
        let ours = backend.download(&out).unwrap().nhwc_to_nchw().unwrap();
        assert_eq!(ours.shape, expected.shape, "case {case}");
        assert_close(
            &format!("unet case {case}"),
            &ours.data,
            &expected.data,
            2e-5,
            1e-4,
        );
    }
}

#[test]
fn vae_decoder_matches_diffusers() {
    let files = files();
    let backend = CpuBackend::new();
    let cfg: VaeConfig = config::read_json(&files.vae_config).unwrap();
    let weights = SafeTensorsFile::open(&files.vae_weights).unwrap();
    let vae = VaeDecoder::load(&WeightScope::new(&weights, &backend), &cfg).unwrap();
    let reference_file = SafeTensorsFile::open(&reference("vae.safetensors")).unwrap();
    for case in ["a", "b"] {
        let latents = read_tensor(&reference_file, &format!("{case}_latents"));
        let expected = read_tensor(&reference_file, &format!("{case}_image"));
        let out = vae
            .decode(
                &backend,
                &backend.upload(&latents.nchw_to_nhwc().unwrap()).unwrap(),
            )
            .unwrap();
        let ours = backend.download(&out).unwrap().nhwc_to_nchw().unwrap();
        assert_eq!(ours.shape, expected.shape, "case {case}");
        assert_close(
            &format!("vae case {case}"),
            &ours.data,
            &expected.data,
            2e-5,
            1e-4,
        );
    }
}

#[test]
fn vae_encoder_posterior_and_its_sample_match_diffusers() {
    let files = files();
    let backend = CpuBackend::new();
    let cfg: VaeConfig = config::read_json(&files.vae_config).unwrap();
    let weights = SafeTensorsFile::open(&files.vae_weights).unwrap();
    let encoder = VaeEncoder::load(&WeightScope::new(&weights, &backend), &cfg).unwrap();
    let reference_file = SafeTensorsFile::open(&reference("vae_encoder.safetensors")).unwrap();
    for case in ["a", "b"] {
        let image = read_tensor(&reference_file, &format!("{case}_image"));
        let image = image.nchw_to_nhwc().unwrap();
        let posterior = encoder
            .posterior(&backend, &image, VaeTiling::Auto)
            .unwrap();
        for (what, ours) in [("mean", &posterior.mean), ("std", &posterior.std)] {
            let expected = read_tensor(&reference_file, &format!("{case}_{what}"));
            assert_eq!(ours.shape, expected.shape, "case {case} {what}");
            let label = format!("vae encoder case {case} {what}");
            assert_close(&label, &ours.data, &expected.data, 2e-5, 1e-4);
        }
        // diffusers' latent_dist.sample(generator): ε from the generator in NCHW order.
        let sample = posterior.sample(&mut TorchGenerator::new(301));
        let expected = read_tensor(&reference_file, &format!("{case}_sample_seed301"));
        let label = format!("vae encoder case {case} sample");
        assert_close(&label, &sample.data, &expected.data, 2e-5, 1e-4);
    }
}

#[test]
fn tiled_vae_decode_matches_diffusers_enable_tiling() {
    let files = files();
    let backend = CpuBackend::new();
    let cfg: VaeConfig = config::read_json(&files.vae_config).unwrap();
    let weights = SafeTensorsFile::open(&files.vae_weights).unwrap();
    let vae = VaeDecoder::load(&WeightScope::new(&weights, &backend), &cfg).unwrap();
    let reference_file = SafeTensorsFile::open(&reference("vae_tiling.safetensors")).unwrap();
    for case in ["a", "b"] {
        let latents = read_tensor(&reference_file, &format!("decode_{case}_latents"));
        let expected = read_tensor(&reference_file, &format!("decode_{case}_image"));
        let latents = latents.nchw_to_nhwc().unwrap();
        let decode = |tiling| {
            let out = vae.decode_host(&backend, &latents, tiling).unwrap();
            out.nhwc_to_nchw().unwrap()
        };
        let tiled = decode(VaeTiling::Always);
        assert_eq!(tiled.shape, expected.shape, "case {case}");
        let label = format!("tiled vae decode case {case}");
        assert_close(&label, &tiled.data, &expected.data, 2e-5, 1e-4);
        // The fixture is only a test of tiling where the seams change the image.
        let whole = decode(VaeTiling::Auto);
        let (moved, _) = diff(&whole.data, &expected.data);
        assert!(moved > 1e-3, "case {case}: untiled within {moved} of tiled");
    }
}

#[test]
fn tiled_vae_encode_matches_diffusers_enable_tiling() {
    let files = files();
    let backend = CpuBackend::new();
    let cfg: VaeConfig = config::read_json(&files.vae_config).unwrap();
    let weights = SafeTensorsFile::open(&files.vae_weights).unwrap();
    let encoder = VaeEncoder::load(&WeightScope::new(&weights, &backend), &cfg).unwrap();
    let reference_file = SafeTensorsFile::open(&reference("vae_tiling.safetensors")).unwrap();
    let image = read_tensor(&reference_file, "encode_image");
    let image = image.nchw_to_nhwc().unwrap();
    let posterior = encoder
        .posterior(&backend, &image, VaeTiling::Always)
        .unwrap();
    for (what, ours) in [("mean", &posterior.mean), ("std", &posterior.std)] {
        let expected = read_tensor(&reference_file, &format!("encode_{what}"));
        assert_eq!(ours.shape, expected.shape, "{what}");
        let label = format!("tiled vae encode {what}");
        assert_close(&label, &ours.data, &expected.data, 2e-5, 1e-4);
    }
    let whole = encoder
        .posterior(&backend, &image, VaeTiling::Auto)
        .unwrap();
    let expected = read_tensor(&reference_file, "encode_mean");
    let (moved, _) = diff(&whole.mean.data, &expected.data);
    assert!(moved > 1e-3, "untiled mean within {moved} of tiled");
}

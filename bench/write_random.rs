//! `sd21-bench write-random`: a random-weight model written once as a diffusers-layout folder
//! (configs, f32 safetensors, tokenizer, and model_index.json last, marking it complete), so `sd21 serve --model DIR`, `sd21
//! generate` and diffusers all load the very weights `--random` builds in memory.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use safetensors::{Dtype, View};
use serde_json::json;

use sd21::backend::cpu::CpuBackend;
use sd21::model::{ClipTextModel, Unet, VaeDecoder, VaeEncoder};
use sd21::tokenizer::ClipTokenizer;
use sd21::weights::{RandomWeights, TensorSource, WeightScope};

use crate::models::RandomModel;

/// The seed `sd21::demo::random_model` builds its weights with.
const SEED: u64 = 0;

/// Writes `model` to `out` (created; existing files are replaced).
pub fn write_random(model: RandomModel, out: &Path) -> Result<()> {
    let configs = model.configs()?;
    let (unet_text, vae_text, text_encoder_text) = model.config_texts();
    let write = |path: &str, text: &str| -> Result<()> {
        let path = out.join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("unet/config.json", &unet_text)?;
    write("vae/config.json", &vae_text)?;
    write("text_encoder/config.json", &text_encoder_text)?;
    write("scheduler/scheduler_config.json", model.scheduler_text())?;
    ClipTokenizer::write_embedded(&out.join("tokenizer"))?;

    let cpu = CpuBackend::new();
    let names = recorded(|w| {
        ClipTextModel::load(&WeightScope::new(w, &cpu), &configs.text_encoder).map(drop)
    })?;
    write_tensors(&out.join("text_encoder/model.safetensors"), names)?;
    let names = recorded(|w| Unet::load(&WeightScope::new(w, &cpu), &configs.unet).map(drop))?;
    write_tensors(&out.join("unet/diffusion_pytorch_model.safetensors"), names)?;
    let names = recorded(|w| {
        VaeDecoder::load(&WeightScope::new(w, &cpu), &configs.vae)?;
        VaeEncoder::load(&WeightScope::new(w, &cpu), &configs.vae).map(drop)
    })?;
    write_tensors(&out.join("vae/diffusion_pytorch_model.safetensors"), names)?;
    // Last: a folder with it is complete.
    write("model_index.json", &model_index().to_string())?;
    println!(
        "wrote {} (random weights, f32) to {}",
        model.name(),
        out.display()
    );
    Ok(())
}

fn model_index() -> serde_json::Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

/// The name and shape of every tensor `load` asks the random weights for.
fn recorded(load: impl FnOnce(&Recorder) -> sd21::Result<()>) -> Result<Vec<(String, Vec<usize>)>> {
    let recorder = Recorder {
        weights: RandomWeights::new(SEED),
        seen: Mutex::new(Vec::new()),
    };
    load(&recorder)?;
    Ok(recorder
        .seen
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// [`RandomWeights`] that remembers what was asked of it.
struct Recorder {
    weights: RandomWeights,
    seen: Mutex<Vec<(String, Vec<usize>)>>,
}

impl TensorSource for Recorder {
    fn contains(&self, name: &str) -> bool {
        self.weights.contains(name)
    }
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.weights.shape_of(name)
    }
    fn get(
        &self,
        name: &str,
        expected: Option<&[usize]>,
    ) -> sd21::Result<sd21::tensor::HostTensor> {
        let tensor = self.weights.get(name, expected)?;
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((name.to_string(), tensor.shape.clone()));
        Ok(tensor)
    }
}

/// One tensor of the file, made when the writer reaches it (one in memory at a time).
struct Lazy {
    name: String,
    shape: Vec<usize>,
}

impl View for Lazy {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        // The same tensor the model loaded a moment ago. RandomWeights fails only without a
        // shape, and one is always given, so the zeros are never written.
        let data = RandomWeights::new(SEED)
            .get(&self.name, Some(&self.shape))
            .map(|t| t.data)
            .unwrap_or_else(|_| vec![0.0; self.shape.iter().product()]);
        Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        4 * self.shape.iter().product::<usize>()
    }
}

fn write_tensors(path: &Path, names: Vec<(String, Vec<usize>)>) -> Result<()> {
    let mut tensors = Vec::with_capacity(names.len());
    for (name, shape) in names {
        if tensors.iter().any(|(n, _): &(String, Lazy)| *n == name) {
            continue;
        }
        tensors.push((name.clone(), Lazy { name, shape }));
    }
    safetensors::serialize_to_file(tensors, None, path)
        .with_context(|| format!("writing {}", path.display()))
}

//! Model files on disk: the diffusers folder layout, safetensors through memmap2, and the
//! name-prefixed loader the models are built from.

pub mod hub;
mod random;
mod safetensors_file;

pub use random::RandomWeights;
pub use safetensors_file::SafeTensorsFile;

use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::tensor::HostTensor;
use crate::{Error, Result};

/// The files of one diffusers-layout model folder (`model_index.json`, `unet/`, `vae/`,
/// `text_encoder/`, `tokenizer/`, `scheduler/`).
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub root: PathBuf,
    pub unet_config: PathBuf,
    pub unet_weights: PathBuf,
    pub vae_config: PathBuf,
    pub vae_weights: PathBuf,
    pub text_encoder_config: PathBuf,
    pub text_encoder_weights: PathBuf,
    pub tokenizer_dir: PathBuf,
    pub scheduler_config: PathBuf,
}

impl ModelFiles {
    /// Finds every file of the model in `root`, preferring `*.fp16.safetensors` weights when a
    /// component has both variants. A missing file is an error naming it.
    pub fn locate(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::MissingFile {
                path: root.to_path_buf(),
                what: "model folder (a diffusers-layout folder with unet/, vae/, text_encoder/)"
                    .into(),
            });
        }
        let config = |component: &str| -> Result<PathBuf> {
            let path = root.join(component).join("config.json");
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::MissingFile {
                    path,
                    what: format!("{component} config"),
                })
            }
        };
        let scheduler_config = root.join("scheduler").join("scheduler_config.json");
        if !scheduler_config.is_file() {
            return Err(Error::MissingFile {
                path: scheduler_config,
                what: "scheduler config".into(),
            });
        }
        Ok(ModelFiles {
            unet_config: config("unet")?,
            unet_weights: component_weights(&root.join("unet"), "diffusion_pytorch_model")?,
            vae_config: config("vae")?,
            vae_weights: component_weights(&root.join("vae"), "diffusion_pytorch_model")?,
            text_encoder_config: config("text_encoder")?,
            text_encoder_weights: component_weights(&root.join("text_encoder"), "model")?,
            tokenizer_dir: root.join("tokenizer"),
            scheduler_config,
            root: root.to_path_buf(),
        })
    }

    /// A short model name for logs and PNG metadata: `org/name` for a snapshot in a Hub cache
    /// (`models--org--name/snapshots/<commit>`), otherwise the folder's name.
    pub fn model_name(&self) -> String {
        let root = self
            .root
            .canonicalize()
            .unwrap_or_else(|_| self.root.clone());
        let file_name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
        let parent = root.parent();
        let in_snapshots = parent.and_then(file_name).as_deref() == Some("snapshots");
        let repo = parent
            .and_then(Path::parent)
            .and_then(file_name)
            .and_then(|n| n.strip_prefix("models--").map(|r| r.replacen("--", "/", 1)));
        match repo {
            Some(repo) if in_snapshots => repo,
            _ => file_name(&root).unwrap_or_else(|| "model".into()),
        }
    }
}

/// `{stem}.fp16.safetensors` when present, else `{stem}.safetensors`.
fn component_weights(dir: &Path, stem: &str) -> Result<PathBuf> {
    let fp16 = dir.join(format!("{stem}.fp16.safetensors"));
    if fp16.is_file() {
        return Ok(fp16);
    }
    let full = dir.join(format!("{stem}.safetensors"));
    if full.is_file() {
        return Ok(full);
    }
    let what = if dir.join(format!("{stem}.bin")).is_file() {
        format!("{stem}.safetensors or {stem}.fp16.safetensors (only PyTorch .bin weights were found; sd21 reads safetensors)")
    } else {
        format!("{stem}.safetensors or {stem}.fp16.safetensors")
    };
    Err(Error::MissingFile { path: full, what })
}

/// Where a [`WeightScope`] reads named tensors from: a safetensors file, or generated weights.
pub trait TensorSource: Sync {
    /// Whether the source has a tensor called `name`.
    fn contains(&self, name: &str) -> bool;
    /// The stored shape of `name`, when the source knows it before reading.
    fn shape_of(&self, name: &str) -> Option<Vec<usize>>;
    /// `name` as f32; with `expected`, its shape must match.
    fn get(&self, name: &str, expected: Option<&[usize]>) -> Result<HostTensor>;
}

impl TensorSource for SafeTensorsFile {
    fn contains(&self, name: &str) -> bool {
        SafeTensorsFile::shape_of(self, name).is_some()
    }
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        SafeTensorsFile::shape_of(self, name).map(<[usize]>::to_vec)
    }
    fn get(&self, name: &str, expected: Option<&[usize]>) -> Result<HostTensor> {
        SafeTensorsFile::get(self, name, expected)
    }
}

/// Loads tensors by their checkpoint names under a prefix (`down_blocks.1.attentions.0`),
/// checks their shapes and uploads them to a backend.
pub struct WeightScope<'a, B: Backend> {
    file: &'a dyn TensorSource,
    backend: &'a B,
    prefix: String,
}

impl<B: Backend> Clone for WeightScope<'_, B> {
    fn clone(&self) -> Self {
        WeightScope {
            file: self.file,
            backend: self.backend,
            prefix: self.prefix.clone(),
        }
    }
}

impl<'a, B: Backend> WeightScope<'a, B> {
    pub fn new(file: &'a dyn TensorSource, backend: &'a B) -> Self {
        WeightScope {
            file,
            backend,
            prefix: String::new(),
        }
    }

    /// The loader for the sub-module `name` (`self.pp("resnets").pp(0)`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        WeightScope {
            file: self.file,
            backend: self.backend,
            prefix,
        }
    }

    pub fn backend(&self) -> &'a B {
        self.backend
    }

    /// The full checkpoint name of `name` under this prefix.
    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Whether `name` exists under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.file.contains(&self.full_name(name))
    }

    /// Host copy of `name`, which must have exactly `shape`.
    pub fn host(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        self.file.get(&self.full_name(name), Some(shape))
    }

    /// `name` on the backend, which must have exactly `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<B::Tensor> {
        self.backend.upload_owned(self.host(name, shape)?)
    }

    /// A linear weight `[out, in]`; a 1×1 convolution weight `[out, in, 1, 1]` is accepted too
    /// (the same numbers), as checkpoints store projections either way.
    pub fn linear_weight(&self, name: &str, out: usize, inp: usize) -> Result<B::Tensor> {
        let full = self.full_name(name);
        let host = match self.file.shape_of(&full).as_deref() {
            Some([_, _, 1, 1]) => self
                .file
                .get(&full, Some(&[out, inp, 1, 1]))?
                .reshape(vec![out, inp])?,
            _ => self.file.get(&full, Some(&[out, inp]))?,
        };
        self.backend.upload_owned(host)
    }

    /// A convolution weight stored OIHW `[out, in, k, k]`, uploaded as OHWI `[out, k, k, in]`.
    pub fn conv_weight(&self, name: &str, out: usize, inp: usize, k: usize) -> Result<B::Tensor> {
        let mut weight = self.host(name, &[out, inp, k, k])?;
        oihw_to_ohwi(&mut weight.data, inp, k * k);
        self.backend
            .upload_owned(HostTensor::new(vec![out, k, k, inp], weight.data)?)
    }
}

/// Transposes each output channel's `[inp, taps]` block of an OIHW weight to `[taps, inp]` in
/// place (OIHW → OHWI), one output channel per rayon task; `data` holds whole blocks.
fn oihw_to_ohwi(data: &mut [f32], inp: usize, taps: usize) {
    use rayon::prelude::*;
    if taps == 1 {
        return; // a 1×1 kernel: OIHW is already OHWI
    }
    data.par_chunks_mut(inp * taps).for_each_init(
        || vec![0.0f32; inp * taps],
        |scratch, block| {
            scratch.copy_from_slice(block);
            for (i, taps_of_i) in scratch.chunks_exact(taps).enumerate() {
                for (t, &v) in taps_of_i.iter().enumerate() {
                    block[t * inp + i] = v;
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oihw_to_ohwi_moves_every_value_to_its_nhwc_place() {
        let (out, inp, k) = (3, 5, 3);
        let oihw: Vec<f32> = (0..out * inp * k * k).map(|v| v as f32).collect();
        let mut ohwi = oihw.clone();
        oihw_to_ohwi(&mut ohwi, inp, k * k);
        for o in 0..out {
            for i in 0..inp {
                for y in 0..k {
                    for x in 0..k {
                        assert_eq!(
                            ohwi[((o * k + y) * k + x) * inp + i],
                            oihw[((o * inp + i) * k + y) * k + x]
                        );
                    }
                }
            }
        }
    }
}

//! Typed configs parsed from each component's `config.json` and `scheduler_config.json`.
//! Every model dimension comes from here; nothing about SD 2.1 is hard-coded elsewhere.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::{Error, Result};

/// Reads and parses a JSON config file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    if !path.is_file() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            what: "config file".into(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// `attention_head_dim` may be one number or one per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn get(&self, block: usize) -> Result<usize> {
        match self {
            PerBlock::One(v) => Ok(*v),
            PerBlock::Each(v) => v.get(block).copied().ok_or_else(|| {
                Error::Config(format!(
                    "per-block list {v:?} has no entry for block {block}"
                ))
            }),
        }
    }
}

/// `unet/config.json` (diffusers `UNet2DConditionModel`).
#[derive(Debug, Clone, Deserialize)]
pub struct UnetConfig {
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_in_channels")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    /// In diffusers this is the NUMBER of attention heads (SD 2.1: [5, 10, 20, 20]).
    #[serde(default)]
    pub attention_head_dim: Option<PerBlock>,
    /// When present, the real number of heads (newer configs); wins over `attention_head_dim`.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f32,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f32,
    #[serde(default = "default_unet_sample_size")]
    pub sample_size: usize,
    #[serde(default)]
    pub transformer_layers_per_block: Option<PerBlock>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    pub only_cross_attention: Option<serde_json::Value>,
    #[serde(default)]
    pub dual_cross_attention: Option<bool>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
}

impl UnetConfig {
    /// Heads of the attention blocks in down block `block` (and the mirrored up block).
    pub fn heads(&self, block: usize) -> Result<usize> {
        match (&self.num_attention_heads, &self.attention_head_dim) {
            (Some(h), _) => h.get(block),
            (None, Some(h)) => h.get(block),
            (None, None) => Ok(8),
        }
    }

    /// Transformer depth in down block `block`.
    pub fn transformer_depth(&self, block: usize) -> Result<usize> {
        match &self.transformer_layers_per_block {
            Some(d) => d.get(block),
            None => Ok(1),
        }
    }

    /// Rejects configurations this implementation does not run, with a clear message.
    pub fn validate(&self) -> Result<()> {
        if self.center_input_sample {
            return Err(Error::Config(
                "unet: center_input_sample = true is not supported".into(),
            ));
        }
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Config(format!(
                "unet: block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have the same non-zero length",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !matches!(
                t.as_str(),
                "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
            ) {
                return Err(Error::Config(format!("unet: unsupported block type {t}")));
            }
        }
        if let Some(m) = &self.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                return Err(Error::Config(format!("unet: unsupported mid block {m}")));
            }
        }
        if self.act_fn != "silu" {
            return Err(Error::Config(format!(
                "unet: unsupported act_fn {}",
                self.act_fn
            )));
        }
        let unsupported = [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("addition_embed_type", self.addition_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            (
                "dual_cross_attention",
                self.dual_cross_attention == Some(true),
            ),
            (
                "time_embedding_type",
                self.time_embedding_type
                    .as_deref()
                    .is_some_and(|t| t != "positional"),
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift
                    .as_deref()
                    .is_some_and(|t| t != "default"),
            ),
            (
                "only_cross_attention",
                self.only_cross_attention.as_ref().is_some_and(|v| {
                    v.as_bool() == Some(true)
                        || v.as_array()
                            .is_some_and(|a| a.iter().any(|x| x.as_bool() == Some(true)))
                }),
            ),
        ];
        for (key, bad) in unsupported {
            if bad {
                return Err(Error::Config(format!(
                    "unet: `{key}` is not supported (SD 2.x UNets do not use it)"
                )));
            }
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if self.norm_num_groups == 0 || !c.is_multiple_of(self.norm_num_groups) {
                return Err(Error::Config(format!(
                    "unet: block {i} has {c} channels, not divisible by norm_num_groups {}",
                    self.norm_num_groups
                )));
            }
            let heads = self.heads(i)?;
            if heads == 0 || !c.is_multiple_of(heads) {
                return Err(Error::Config(format!(
                    "unet: block {i}: {c} channels not divisible by {heads} heads"
                )));
            }
        }
        Ok(())
    }
}

/// `vae/config.json` (diffusers `AutoencoderKL`).
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_vae_layers")]
    pub layers_per_block: usize,
    #[serde(default = "default_in_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f32,
    #[serde(default)]
    pub shift_factor: Option<f32>,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// The encoder's 1×1 conv on the moments (diffusers' default: present).
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// The pixel side of one tile when the VAE tiles (diffusers' `tile_sample_min_size`).
    #[serde(default = "default_vae_sample_size")]
    pub sample_size: usize,
    #[serde(default)]
    pub up_block_types: Vec<String>,
}

/// Whether the UNet also takes the mask and the masked image's latents (SD 2's inpainting
/// models: `in_channels` = 2 · latent channels + 1); such a model runs inpainting only.
pub fn is_inpainting_model(unet: &UnetConfig, vae: &VaeConfig) -> bool {
    unet.in_channels == 2 * vae.latent_channels + 1
}

/// A model's native image size `(width, height)`: UNet `sample_size` × the VAE's latent factor.
pub fn native_size(unet: &UnetConfig, vae: &VaeConfig) -> (usize, usize) {
    let side = unet.sample_size * vae.latent_factor();
    (side, side)
}

impl VaeConfig {
    /// How much smaller the latent is than the image: 2^(len(block_out_channels) − 1), as diffusers.
    pub fn latent_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// The latent side of one tile when the VAE tiles (diffusers' `tile_latent_min_size`).
    pub fn latent_tile(&self) -> usize {
        self.sample_size / self.latent_factor()
    }

    pub fn validate(&self) -> Result<()> {
        if self.block_out_channels.is_empty() {
            return Err(Error::Config("vae: block_out_channels is empty".into()));
        }
        for &c in &self.block_out_channels {
            if self.norm_num_groups == 0 || !c.is_multiple_of(self.norm_num_groups) {
                return Err(Error::Config(format!(
                    "vae: {c} channels not divisible by norm_num_groups {}",
                    self.norm_num_groups
                )));
            }
        }
        if self.latent_tile() < 2 {
            return Err(Error::Config(format!(
                "vae: sample_size {} leaves tiles under 2 latent rows",
                self.sample_size
            )));
        }
        if self.scaling_factor == 0.0 || !self.scaling_factor.is_finite() {
            return Err(Error::Config(format!(
                "vae: invalid scaling_factor {}",
                self.scaling_factor
            )));
        }
        Ok(())
    }
}

/// `text_encoder/config.json` (transformers `CLIPTextModel`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_norm_eps")]
    pub layer_norm_eps: f32,
}

impl ClipTextConfig {
    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::Config(format!(
                "text_encoder: hidden_size {} not divisible by {} heads",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.hidden_act != "gelu" {
            return Err(Error::Config(format!(
                "text_encoder: unsupported hidden_act {} (SD 2.x uses the exact \"gelu\")",
                self.hidden_act
            )));
        }
        Ok(())
    }
}

/// `scheduler/scheduler_config.json` as written; absent keys stay `None` so each scheduler class
/// can apply its own diffusers default.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default)]
    pub num_train_timesteps: Option<usize>,
    #[serde(default)]
    pub beta_start: Option<f64>,
    #[serde(default)]
    pub beta_end: Option<f64>,
    #[serde(default)]
    pub beta_schedule: Option<String>,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default)]
    pub prediction_type: Option<String>,
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub steps_offset: Option<usize>,
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    #[serde(default)]
    pub skip_prk_steps: Option<bool>,
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default)]
    pub clip_sample_range: Option<f64>,
    #[serde(default)]
    pub thresholding: Option<bool>,
    #[serde(default)]
    pub rescale_betas_zero_snr: Option<bool>,
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    #[serde(default)]
    pub interpolation_type: Option<String>,
    #[serde(default)]
    pub final_sigmas_type: Option<String>,
    #[serde(default)]
    pub lower_order_final: Option<bool>,
    #[serde(default)]
    pub euler_at_final: Option<bool>,
}

fn default_in_channels() -> usize {
    4
}
fn default_image_channels() -> usize {
    3
}
fn default_layers_per_block() -> usize {
    2
}
fn default_vae_layers() -> usize {
    1
}
fn default_groups() -> usize {
    32
}
fn default_norm_eps() -> f32 {
    1e-5
}
fn default_true() -> bool {
    true
}
/// `AutoencoderKL`'s default `sample_size`.
fn default_vae_sample_size() -> usize {
    32
}

fn default_unet_sample_size() -> usize {
    64
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_scaling_factor() -> f32 {
    0.18215
}
fn default_max_positions() -> usize {
    77
}
fn default_hidden_act() -> String {
    "quick_gelu".into()
}

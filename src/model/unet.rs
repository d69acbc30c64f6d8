//! diffusers `UNet2DConditionModel` as SD 2.x uses it: time embedding, cross-attention down/mid/up
//! blocks, skip connections, NHWC throughout. Every dimension comes from `UnetConfig`.

use crate::backend::Backend;
use crate::config::UnetConfig;
use crate::model::layers::{Conv2d, GroupNorm, Linear, ResnetBlock2D, Transformer2D};
use crate::tensor::HostTensor;
use crate::weights::Loader;
use crate::{Error, Result};

/// One down block: resnets (each optionally followed by a transformer) and a stride-2 conv.
struct DownBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    attentions: Vec<Transformer2D<B>>,
    downsampler: Option<Conv2d<B>>,
}

/// One up block: resnets over concatenated skips (each optionally followed by a transformer),
/// then nearest upsampling and a conv.
struct UpBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    attentions: Vec<Transformer2D<B>>,
    upsampler: Option<Conv2d<B>>,
}

/// The denoising UNet.
pub struct Unet<B: Backend> {
    config: UnetConfig,
    linear_1: Linear<B>,
    linear_2: Linear<B>,
    conv_in: Conv2d<B>,
    down_blocks: Vec<DownBlock<B>>,
    mid_resnet_0: ResnetBlock2D<B>,
    mid_attention: Transformer2D<B>,
    mid_resnet_1: ResnetBlock2D<B>,
    up_blocks: Vec<UpBlock<B>>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

impl<B: Backend> Unet<B> {
    /// Builds the UNet from the tensors under `w` (the root of `unet/*.safetensors`).
    pub fn load(w: &Loader<B>, config: &UnetConfig) -> Result<Self> {
        config.validate()?;
        let c = &config.block_out_channels;
        let n = c.len();
        let groups = config.norm_num_groups;
        let eps = config.norm_eps;
        let ctx = config.cross_attention_dim;
        let temb = c[0] * 4;
        let has_attention = |t: &str| t.starts_with("CrossAttn");

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = c[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let wb = w.pp("down_blocks").pp(i);
            let in_ch = out_ch;
            out_ch = c[i];
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..config.layers_per_block {
                let r_in = if j == 0 { in_ch } else { out_ch };
                resnets.push(ResnetBlock2D::load(
                    &wb.pp("resnets").pp(j),
                    r_in,
                    out_ch,
                    Some(temb),
                    groups,
                    eps,
                )?);
                if has_attention(kind) {
                    attentions.push(Transformer2D::load(
                        &wb.pp("attentions").pp(j),
                        out_ch,
                        ctx,
                        config.heads(i)?,
                        config.transformer_depth(i)?,
                        groups,
                        eps,
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Conv2d::load(
                    &wb.pp("downsamplers.0.conv"),
                    out_ch,
                    out_ch,
                    3,
                    2,
                    1,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let mid = w.pp("mid_block");
        let last = c[n - 1];
        let mid_resnet_0 =
            ResnetBlock2D::load(&mid.pp("resnets.0"), last, last, Some(temb), groups, eps)?;
        let mid_attention = Transformer2D::load(
            &mid.pp("attentions.0"),
            last,
            ctx,
            config.heads(n - 1)?,
            config.transformer_depth(n - 1)?,
            groups,
            eps,
        )?;
        let mid_resnet_1 =
            ResnetBlock2D::load(&mid.pp("resnets.1"), last, last, Some(temb), groups, eps)?;

        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = last;
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let wb = w.pp("up_blocks").pp(i);
            let level = n - 1 - i; // the down block this up block mirrors
            let out_ch = c[level];
            let skip_in = c[level.saturating_sub(1)];
            let layers = config.layers_per_block + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j + 1 == layers { skip_in } else { out_ch };
                let r_in = if j == 0 { prev_out } else { out_ch };
                resnets.push(ResnetBlock2D::load(
                    &wb.pp("resnets").pp(j),
                    r_in + skip,
                    out_ch,
                    Some(temb),
                    groups,
                    eps,
                )?);
                if has_attention(kind) {
                    attentions.push(Transformer2D::load(
                        &wb.pp("attentions").pp(j),
                        out_ch,
                        ctx,
                        config.heads(level)?,
                        config.transformer_depth(level)?,
                        groups,
                        eps,
                    )?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(Conv2d::load(
                    &wb.pp("upsamplers.0.conv"),
                    out_ch,
                    out_ch,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
            prev_out = out_ch;
        }

        Ok(Unet {
            config: config.clone(),
            linear_1: Linear::load(&w.pp("time_embedding.linear_1"), c[0], temb, true)?,
            linear_2: Linear::load(&w.pp("time_embedding.linear_2"), temb, temb, true)?,
            conv_in: Conv2d::load(&w.pp("conv_in"), config.in_channels, c[0], 3, 1, 1)?,
            down_blocks,
            mid_resnet_0,
            mid_attention,
            mid_resnet_1,
            up_blocks,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), c[0], groups, eps)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), c[0], config.out_channels, 3, 1, 1)?,
        })
    }

    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// One denoising evaluation: `sample [B, h, w, C_in]` (NHWC latents), one `timestep` for the
    /// whole batch, `context [B, 77, C_ctx]` → the prediction `[B, h, w, C_out]`.
    pub fn forward(
        &self,
        b: &B,
        sample: &B::Tensor,
        timestep: f32,
        context: &B::Tensor,
    ) -> Result<B::Tensor> {
        let batch = b.shape(sample)[0];
        if b.shape(context)[0] != batch {
            return Err(Error::shape(
                "unet",
                format!(
                    "sample batch {batch} but context batch {}",
                    b.shape(context)[0]
                ),
            ));
        }
        let c0 = self.config.block_out_channels[0];
        let t_proj = timestep_embedding(
            timestep,
            c0,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        );
        let t_proj = HostTensor::new(vec![batch, c0], t_proj.repeat(batch))?;
        let t_proj = b.upload(&t_proj)?; // [B, C0]
                                         // Everything below is device ops only, so the CUDA backend can record it once as a graph
                                         // and replay it every step (`Backend::run_recorded`).
        let key = format!("unet@{:p}", self);
        b.run_recorded(&key, &[sample, &t_proj, context], &|inputs| {
            let [sample, t_proj, context] = inputs else {
                return Err(Error::shape("unet", "expected 3 recorded inputs"));
            };
            self.forward_on_device(b, sample, t_proj, context)
        })
    }

    /// The body of [`Unet::forward`] after the timestep's sinusoidal projection
    /// `t_proj [B, C0]` is on the device.
    fn forward_on_device(
        &self,
        b: &B,
        sample: &B::Tensor,
        t_proj: &B::Tensor,
        context: &B::Tensor,
    ) -> Result<B::Tensor> {
        let temb = self.linear_1.forward(b, t_proj)?; // [B, 4·C0]
        let temb = self.linear_2.forward(b, &b.silu(&temb)?)?; // [B, 4·C0]
        let temb = b.silu(&temb)?; // [B, 4·C0], every resnet applies SiLU to it first

        let mut h = self.conv_in.forward(b, sample)?; // [B, h, w, C0]
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = resnet.forward(b, &h, Some(&temb))?; // [B, h_i, w_i, C_i]
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(b, &h, context)?; // [B, h_i, w_i, C_i]
                }
                skips.push(h.clone());
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(b, &h)?; // [B, ⌈h_i/2⌉, ⌈w_i/2⌉, C_i]
                skips.push(h.clone());
            }
        }

        h = self.mid_resnet_0.forward(b, &h, Some(&temb))?; // [B, h_n, w_n, C_n]
        h = self.mid_attention.forward(b, &h, context)?; // [B, h_n, w_n, C_n]
        h = self.mid_resnet_1.forward(b, &h, Some(&temb))?; // [B, h_n, w_n, C_n]

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::shape("unet", "ran out of skip connections"))?;
                h = b.concat_channels(&h, &skip)?; // [B, h_i, w_i, C + C_skip]
                h = resnet.forward(b, &h, Some(&temb))?; // [B, h_i, w_i, C_i]
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(b, &h, context)?; // [B, h_i, w_i, C_i]
                }
            }
            if let Some(up) = &block.upsampler {
                // As diffusers: upsample to the next skip's size, so sizes that are not multiples
                // of 2^levels (e.g. 72×56 images) line up.
                let next = skips.last().ok_or_else(|| {
                    Error::shape("unet", "no skip connection left for the upsampler")
                })?;
                let (th, tw) = (b.shape(next)[1], b.shape(next)[2]);
                h = b.upsample_nearest(&h, th, tw)?; // [B, h_{i-1}, w_{i-1}, C_i]
                h = up.forward(b, &h)?; // [B, h_{i-1}, w_{i-1}, C_i]
            }
        }

        let h = self.conv_norm_out.forward(b, &h, true)?; // [B, h, w, C0]
        self.conv_out.forward(b, &h) // [B, h, w, C_out]
    }
}

/// diffusers' sinusoidal `get_timestep_embedding` for one timestep, computed in f32 as torch does:
/// `exp(−ln(10000)·i / (half − shift))·t`, then `[sin, cos]` (or `[cos, sin]` with `flip_sin_to_cos`).
pub fn timestep_embedding(
    timestep: f32,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f32,
) -> Vec<f32> {
    let half = dim / 2;
    let ln_max_period = -(10000f64.ln() as f32);
    let args: Vec<f32> = (0..half)
        .map(|i| {
            let exponent = ln_max_period * i as f32 / (half as f32 - freq_shift);
            timestep * exponent.exp()
        })
        .collect();
    let sin = args.iter().map(|a| a.sin());
    let cos = args.iter().map(|a| a.cos());
    let mut out: Vec<f32> = if flip_sin_to_cos {
        cos.chain(sin).collect()
    } else {
        sin.chain(cos).collect()
    };
    out.resize(dim, 0.0); // odd dims are zero-padded
    out
}

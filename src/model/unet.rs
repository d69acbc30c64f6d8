//! diffusers `UNet2DConditionModel` as SD 2.x uses it: time embedding, cross-attention down/mid/up
//! blocks, skip connections, NHWC throughout. Every dimension comes from `UnetConfig`.

use crate::backend::{Activation, Backend, Tensor};
use crate::config::UnetConfig;
use crate::model::layers::{Conv2d, GroupNorm, Linear, ResnetBlock2D, Transformer2D};
use crate::tensor::HostTensor;
use crate::weights::WeightScope;
use crate::{Error, Result};

/// One down or up block: resnets, each followed by a transformer in a cross-attention block,
/// then the resampling conv (a down block's stride-2 `downsamplers.0.conv`, an up block's
/// `upsamplers.0.conv` after nearest upsampling).
struct Block<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    attentions: Vec<Transformer2D<B>>,
    resampler: Option<Conv2d<B>>,
}

impl<B: Backend> Block<B> {
    /// `resnets.{j}` with `channels[j]` = (in, out) and, for a `CrossAttn*` block, `attentions.{j}`
    /// with the heads and depth of `level`.
    fn load(
        w: &WeightScope<B>,
        config: &UnetConfig,
        kind: &str,
        level: usize,
        channels: &[(usize, usize)],
        resampler: Option<Conv2d<B>>,
    ) -> Result<Self> {
        let (groups, eps) = (config.norm_num_groups, config.norm_eps);
        let temb = config.block_out_channels[0] * 4;
        let mut resnets = Vec::with_capacity(channels.len());
        let mut attentions = Vec::new();
        for (j, &(inp, out)) in channels.iter().enumerate() {
            let resnet =
                ResnetBlock2D::load(&w.pp("resnets").pp(j), inp, out, Some(temb), groups, eps);
            resnets.push(resnet?);
            if kind.starts_with("CrossAttn") {
                attentions.push(Transformer2D::load(
                    &w.pp("attentions").pp(j),
                    out,
                    config.cross_attention_dim,
                    config.heads(level)?,
                    config.transformer_depth(level)?,
                    groups,
                    eps,
                )?);
            }
        }
        Ok(Block {
            resnets,
            attentions,
            resampler,
        })
    }

    /// Resnet `j` (with the time embedding), then transformer `j` if the block has one.
    fn layer(
        &self,
        b: &B,
        j: usize,
        h: &B::Tensor,
        temb: &B::Tensor,
        context: &B::Tensor,
    ) -> Result<B::Tensor> {
        let h = self.resnets[j].forward(b, h, Some(temb))?; // [B, h_i, w_i, C_i]
        match self.attentions.get(j) {
            Some(attention) => attention.forward(b, &h, context), // [B, h_i, w_i, C_i]
            None => Ok(h),
        }
    }
}

/// The denoising UNet.
pub struct Unet<B: Backend> {
    config: UnetConfig,
    linear_1: Linear<B>,
    linear_2: Linear<B>,
    conv_in: Conv2d<B>,
    down_blocks: Vec<Block<B>>,
    mid_resnet_0: ResnetBlock2D<B>,
    mid_attention: Transformer2D<B>,
    mid_resnet_1: ResnetBlock2D<B>,
    up_blocks: Vec<Block<B>>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

impl<B: Backend> Unet<B> {
    /// Builds the UNet from the tensors under `w` (the root of `unet/*.safetensors`).
    pub fn load(w: &WeightScope<B>, config: &UnetConfig) -> Result<Self> {
        config.validate()?;
        let c = &config.block_out_channels;
        let (groups, eps) = (config.norm_num_groups, config.norm_eps);
        let (last, temb) = (c[c.len() - 1], c[0] * 4);
        let mid = w.pp("mid_block");
        Ok(Unet {
            config: config.clone(),
            linear_1: Linear::load(&w.pp("time_embedding.linear_1"), c[0], temb)?,
            linear_2: Linear::load(&w.pp("time_embedding.linear_2"), temb, temb)?,
            conv_in: Conv2d::load(&w.pp("conv_in"), config.in_channels, c[0], 3, 1, 1)?,
            down_blocks: Self::load_down_blocks(w, config)?,
            mid_resnet_0: ResnetBlock2D::load(
                &mid.pp("resnets.0"),
                last,
                last,
                Some(temb),
                groups,
                eps,
            )?,
            mid_attention: Transformer2D::load(
                &mid.pp("attentions.0"),
                last,
                config.cross_attention_dim,
                config.heads(c.len() - 1)?,
                config.transformer_depth(c.len() - 1)?,
                groups,
                eps,
            )?,
            mid_resnet_1: ResnetBlock2D::load(
                &mid.pp("resnets.1"),
                last,
                last,
                Some(temb),
                groups,
                eps,
            )?,
            up_blocks: Self::load_up_blocks(w, config)?,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), c[0], groups, eps)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), c[0], config.out_channels, 3, 1, 1)?,
        })
    }

    /// `down_blocks.{i}`: `layers_per_block` resnets from the previous level's channels to
    /// `c[i]`, a stride-2 conv below every level but the last.
    fn load_down_blocks(w: &WeightScope<B>, config: &UnetConfig) -> Result<Vec<Block<B>>> {
        let c = &config.block_out_channels;
        let mut blocks = Vec::with_capacity(c.len());
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let wb = w.pp("down_blocks").pp(i);
            let in_ch = c[i.saturating_sub(1)];
            let channels: Vec<(usize, usize)> = (0..config.layers_per_block)
                .map(|j| (if j == 0 { in_ch } else { c[i] }, c[i]))
                .collect();
            let downsampler = (i + 1 < c.len())
                .then(|| Conv2d::load(&wb.pp("downsamplers.0.conv"), c[i], c[i], 3, 2, 1))
                .transpose()?;
            blocks.push(Block::load(&wb, config, kind, i, &channels, downsampler)?);
        }
        Ok(blocks)
    }

    /// `up_blocks.{i}` mirrors down level `n − 1 − i`: `layers_per_block + 1` resnets over the
    /// concatenated skips, an upsampling conv above every level but the top.
    fn load_up_blocks(w: &WeightScope<B>, config: &UnetConfig) -> Result<Vec<Block<B>>> {
        let c = &config.block_out_channels;
        let n = c.len();
        let layers = config.layers_per_block + 1;
        let mut blocks = Vec::with_capacity(n);
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let wb = w.pp("up_blocks").pp(i);
            let level = n - 1 - i;
            let out_ch = c[level];
            let prev_out = c[(level + 1).min(n - 1)];
            let channels: Vec<(usize, usize)> = (0..layers)
                .map(|j| {
                    let r_in = if j == 0 { prev_out } else { out_ch };
                    let skip = if j + 1 == layers {
                        c[level.saturating_sub(1)]
                    } else {
                        out_ch
                    };
                    (r_in + skip, out_ch)
                })
                .collect();
            let upsampler = (i + 1 < n)
                .then(|| Conv2d::load(&wb.pp("upsamplers.0.conv"), out_ch, out_ch, 3, 1, 1))
                .transpose()?;
            blocks.push(Block::load(&wb, config, kind, level, &channels, upsampler)?);
        }
        Ok(blocks)
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
        let t_proj = self.time_projection(b, sample, timestep, context)?;
        self.forward_projected(b, sample, &t_proj, context)
    }

    /// The timestep's sinusoidal projection for the batch of `sample`, on the device: `[B, C0]`.
    /// Checks that `sample` and `context` have one batch size.
    pub fn time_projection(
        &self,
        b: &B,
        sample: &B::Tensor,
        timestep: f32,
        context: &B::Tensor,
    ) -> Result<B::Tensor> {
        let (batch, context_batch) = (sample.shape().first(), context.shape().first());
        let Some(&batch) = batch.filter(|&&n| Some(&n) == context_batch) else {
            return Err(Error::shape(
                "unet",
                format!(
                    "sample {:?} and context {:?} need one batch size",
                    sample.shape(),
                    context.shape()
                ),
            ));
        };
        let c0 = self.config.block_out_channels[0];
        let t_proj = timestep_embedding(
            timestep,
            c0,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        );
        b.upload(&HostTensor::new(vec![batch, c0], t_proj.repeat(batch))?) // [B, C0]
    }

    /// The body of [`Unet::forward`] once `t_proj [B, C0]` ([`Unet::time_projection`]) is on the
    /// device. Device ops only (no upload, download or synchronisation), so a backend that
    /// records (`CudaBackend::run_recorded`) can capture it once and replay it every step.
    pub fn forward_projected(
        &self,
        b: &B,
        sample: &B::Tensor,
        t_proj: &B::Tensor,
        context: &B::Tensor,
    ) -> Result<B::Tensor> {
        let temb = self.linear_1.forward(b, t_proj)?; // [B, 4·C0]
        let temb = self.linear_2.forward(b, &b.silu(&temb)?)?; // [B, 4·C0]
        let temb = b.silu(&temb)?; // [B, 4·C0], every resnet applies SiLU to it first

        let h = self.conv_in.forward(b, sample)?; // [B, h, w, C0]
        let (h, mut skips) = self.down(b, h, &temb, context)?; // [B, h_n, w_n, C_n]
        let h = self.mid_resnet_0.forward(b, &h, Some(&temb))?; // [B, h_n, w_n, C_n]
        let h = self.mid_attention.forward(b, &h, context)?; // [B, h_n, w_n, C_n]
        let h = self.mid_resnet_1.forward(b, &h, Some(&temb))?; // [B, h_n, w_n, C_n]
        let h = self.up(b, h, &mut skips, &temb, context)?; // [B, h, w, C0]
        let h = self.conv_norm_out.forward(b, &h, Activation::Silu)?; // [B, h, w, C0]
        self.conv_out.forward(b, &h) // [B, h, w, C_out]
    }

    /// The down blocks: the output of the lowest level and every skip connection (the input
    /// first, then each layer's and each downsampler's output).
    fn down(
        &self,
        b: &B,
        mut h: B::Tensor,
        temb: &B::Tensor,
        context: &B::Tensor,
    ) -> Result<(B::Tensor, Vec<B::Tensor>)> {
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            for j in 0..block.resnets.len() {
                h = block.layer(b, j, &h, temb, context)?; // [B, h_i, w_i, C_i]
                skips.push(h.clone());
            }
            if let Some(down) = &block.resampler {
                h = down.forward(b, &h)?; // [B, ⌈h_i/2⌉, ⌈w_i/2⌉, C_i]
                skips.push(h.clone());
            }
        }
        Ok((h, skips))
    }

    /// The up blocks, each layer taking the last skip connection left.
    fn up(
        &self,
        b: &B,
        mut h: B::Tensor,
        skips: &mut Vec<B::Tensor>,
        temb: &B::Tensor,
        context: &B::Tensor,
    ) -> Result<B::Tensor> {
        for block in &self.up_blocks {
            for j in 0..block.resnets.len() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::shape("unet", "ran out of skip connections"))?;
                h = b.concat_channels(&h, &skip)?; // [B, h_i, w_i, C + C_skip]
                h = block.layer(b, j, &h, temb, context)?; // [B, h_i, w_i, C_i]
            }
            if let Some(up) = &block.resampler {
                // As diffusers: upsample to the next skip's size, so sizes that are not multiples
                // of 2^levels (e.g. 72×56 images) line up.
                let next = skips.last().ok_or_else(|| {
                    Error::shape("unet", "no skip connection left for the upsampler")
                })?;
                let (th, tw) = (next.shape()[1], next.shape()[2]);
                h = b.upsample_nearest(&h, th, tw)?; // [B, h_{i-1}, w_{i-1}, C_i]
                h = up.forward(b, &h)?; // [B, h_{i-1}, w_{i-1}, C_i]
            }
        }
        Ok(h)
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

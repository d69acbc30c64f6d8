//! diffusers `AutoencoderKL` decoder: post_quant_conv → conv_in → mid (resnet, attention, resnet)
//! → up blocks → GN → SiLU → conv_out, NHWC; and the mid block it shares with the encoder
//! (`vae_encoder.rs`). All VAE group norms use eps 1e-6 (fixed in diffusers).

use crate::backend::{Activation, Backend, Tensor};
use crate::config::VaeConfig;
use crate::model::layers::{Attention, Conv2d, GroupNorm, ResnetBlock2D};
use crate::model::vae_tiling::{untiled_working_set, TileGeometry, VaeTiling};
use crate::tensor::HostTensor;
use crate::weights::WeightScope;
use crate::{Error, Result};

pub(super) const VAE_NORM_EPS: f32 = 1e-6;

/// diffusers `UNetMidBlock2D` of the VAE: resnet → (GN → single-head attention + residual) →
/// resnet, at the widest channel count.
pub(super) struct VaeMidBlock<B: Backend> {
    resnet_0: ResnetBlock2D<B>,
    norm: GroupNorm<B>,
    attention: Attention<B>,
    resnet_1: ResnetBlock2D<B>,
}

impl<B: Backend> VaeMidBlock<B> {
    /// From the tensors under `mid` (`encoder.mid_block` or `decoder.mid_block`).
    pub(super) fn load(mid: &WeightScope<B>, channels: usize, groups: usize) -> Result<Self> {
        let attn = mid.pp("attentions.0");
        let resnet = |j: usize| {
            let w = mid.pp("resnets").pp(j);
            ResnetBlock2D::load(&w, channels, channels, None, groups, VAE_NORM_EPS)
        };
        Ok(VaeMidBlock {
            resnet_0: resnet(0)?,
            norm: GroupNorm::load(&attn.pp("group_norm"), channels, groups, VAE_NORM_EPS)?,
            attention: Attention::load_vae(&attn, channels)?,
            resnet_1: resnet(1)?,
        })
    }

    /// `[B, h, w, C]` → same.
    pub(super) fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = self.resnet_0.forward(b, x, None)?; // [B, h, w, C]
        let h = self.attention_forward(b, &h)?; // [B, h, w, C]
        self.resnet_1.forward(b, &h, None) // [B, h, w, C]
    }

    /// Single-head attention over all pixels, with the residual: `[B, h, w, C]` → same.
    fn attention_forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let s = x.shape().to_vec();
        if s.len() != 4 {
            return Err(Error::shape(
                "vae attention",
                format!("expected NHWC, got {s:?}"),
            ));
        }
        let h = self.norm.forward(b, x, Activation::None)?; // [B, h, w, C]
        let h = b.reshape(&h, &[s[0], s[1] * s[2], s[3]])?; // [B, hw, C]
        let h = self.attention.forward(b, &h, None)?; // [B, hw, C]
        let h = b.reshape(&h, &s)?; // [B, h, w, C]
        b.add(&h, x) // [B, h, w, C]
    }
}

struct UpDecoderBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    upsampler: Option<Conv2d<B>>,
}

/// The VAE decoder: latents → RGB in [−1, 1].
pub struct VaeDecoder<B: Backend> {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d<B>>,
    conv_in: Conv2d<B>,
    mid_block: VaeMidBlock<B>,
    up_blocks: Vec<UpDecoderBlock<B>>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
}

impl<B: Backend> VaeDecoder<B> {
    /// Builds the decoder from the tensors under `w` (the root of `vae/*.safetensors`).
    pub fn load(w: &WeightScope<B>, config: &VaeConfig) -> Result<Self> {
        config.validate()?;
        let c = &config.block_out_channels;
        let n = c.len();
        let groups = config.norm_num_groups;
        let lat = config.latent_channels;
        let d = w.pp("decoder");
        let top = c[n - 1];

        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::load(&w.pp("post_quant_conv"), lat, lat, 1, 1, 0)?)
        } else {
            None
        };
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = top;
        for i in 0..n {
            let wb = d.pp("up_blocks").pp(i);
            let out_ch = c[n - 1 - i];
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| {
                    let r_in = if j == 0 { prev_out } else { out_ch };
                    ResnetBlock2D::load(
                        &wb.pp("resnets").pp(j),
                        r_in,
                        out_ch,
                        None,
                        groups,
                        VAE_NORM_EPS,
                    )
                })
                .collect::<Result<_>>()?;
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
            up_blocks.push(UpDecoderBlock { resnets, upsampler });
            prev_out = out_ch;
        }
        Ok(VaeDecoder {
            config: config.clone(),
            post_quant_conv,
            conv_in: Conv2d::load(&d.pp("conv_in"), lat, top, 3, 1, 1)?,
            mid_block: VaeMidBlock::load(&d.pp("mid_block"), top, groups)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&d.pp("conv_norm_out"), c[0], groups, VAE_NORM_EPS)?,
            conv_out: Conv2d::load(&d.pp("conv_out"), c[0], config.out_channels, 3, 1, 1)?,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// [`VaeDecoder::decode`] of host latents `[B, h, w, C_lat]`, in tiles where `tiling`
    /// applies (diffusers' `tiled_decode`).
    pub fn decode_host(&self, b: &B, z: &HostTensor, tiling: VaeTiling) -> Result<HostTensor> {
        let decode = |z: &HostTensor| b.download(&self.decode(b, &b.upload(z)?)?);
        let geometry = TileGeometry::decode(&self.config);
        let f = self.config.latent_factor();
        let c = &self.config.block_out_channels;
        // Full resolution holds the last up block's input (c[1] channels) and its own (c[0]).
        let widest = c.iter().take(2).copied().max().unwrap_or(0);
        let batch_pixels = z.numel() / self.config.latent_channels.max(1) * f * f;
        let working_set = untiled_working_set(batch_pixels, widest);
        let available = || b.available_memory();
        tiling.run(&geometry, z, working_set, available, decode) // [B, H, W, 3]
    }

    /// `z [B, h, w, C_lat]` (already divided by `scaling_factor`) → image `[B, h·f, w·f, 3]` in
    /// about [−1, 1], f = 2^(levels − 1).
    pub fn decode(&self, b: &B, z: &B::Tensor) -> Result<B::Tensor> {
        let mut h = match &self.post_quant_conv {
            Some(conv) => conv.forward(b, z)?, // [B, h, w, C_lat]
            None => z.clone(),
        };
        h = self.conv_in.forward(b, &h)?; // [B, h, w, C_top]
        h = self.mid_block.forward(b, &h)?; // [B, h, w, C_top]
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(b, &h, None)?; // [B, h_i, w_i, C_i]
            }
            if let Some(up) = &block.upsampler {
                let s = h.shape().to_vec();
                h = b.upsample_nearest(&h, s[1] * 2, s[2] * 2)?; // [B, 2h_i, 2w_i, C_i]
                h = up.forward(b, &h)?; // [B, 2h_i, 2w_i, C_i]
            }
        }
        let h = self.conv_norm_out.forward(b, &h, Activation::Silu)?; // [B, H, W, C0]
        self.conv_out.forward(b, &h) // [B, H, W, 3]
    }
}

//! diffusers `AutoencoderKL` encoder: conv_in → down blocks (resnets, then a stride-2 conv after
//! padding bottom and right by one) → mid (resnet, attention, resnet) → GN → SiLU → conv_out →
//! quant_conv, NHWC; and the diagonal Gaussian posterior over the latents it parameterises.

use super::vae::{VaeMidBlock, VAE_NORM_EPS};
use crate::backend::{Activation, Backend, Padding};
use crate::config::VaeConfig;
use crate::model::layers::{Conv2d, GroupNorm, ResnetBlock2D};
use crate::model::vae_tiling::{untiled_working_set, TileGeometry, VaeTiling};
use crate::sampling::rng::TorchGenerator;
use crate::tensor::HostTensor;
use crate::weights::WeightScope;
use crate::{Error, Result};

struct DownEncoderBlock<B: Backend> {
    resnets: Vec<ResnetBlock2D<B>>,
    downsampler: Option<Conv2d<B>>,
}

/// The VAE encoder: RGB in [−1, 1] → the posterior's moments.
pub struct VaeEncoder<B: Backend> {
    conv_in: Conv2d<B>,
    down_blocks: Vec<DownEncoderBlock<B>>,
    mid_block: VaeMidBlock<B>,
    conv_norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
    quant_conv: Option<Conv2d<B>>,
    config: VaeConfig,
}

impl<B: Backend> VaeEncoder<B> {
    /// Builds the encoder from the tensors under `w` (the root of `vae/*.safetensors`).
    pub fn load(w: &WeightScope<B>, config: &VaeConfig) -> Result<Self> {
        config.validate()?;
        let c = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let lat = config.latent_channels;
        let e = w.pp("encoder");
        let mut down_blocks = Vec::with_capacity(c.len());
        let mut prev_out = c[0];
        for (i, &out_ch) in c.iter().enumerate() {
            let wb = e.pp("down_blocks").pp(i);
            let resnets = (0..config.layers_per_block)
                .map(|j| {
                    let r_in = if j == 0 { prev_out } else { out_ch };
                    let wr = wb.pp("resnets").pp(j);
                    ResnetBlock2D::load(&wr, r_in, out_ch, None, groups, VAE_NORM_EPS)
                })
                .collect::<Result<_>>()?;
            let downsampler = if i + 1 < c.len() {
                let wc = wb.pp("downsamplers.0.conv");
                Some(Conv2d::load(&wc, out_ch, out_ch, 3, 2, 0)?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock {
                resnets,
                downsampler,
            });
            prev_out = out_ch;
        }
        let top = c[c.len() - 1];
        let quant_conv = if config.use_quant_conv {
            Some(Conv2d::load(
                &w.pp("quant_conv"),
                2 * lat,
                2 * lat,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(VaeEncoder {
            conv_in: Conv2d::load(&e.pp("conv_in"), config.in_channels, c[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMidBlock::load(&e.pp("mid_block"), top, groups)?,
            conv_norm_out: GroupNorm::load(&e.pp("conv_norm_out"), top, groups, VAE_NORM_EPS)?,
            conv_out: Conv2d::load(&e.pp("conv_out"), top, 2 * lat, 3, 1, 1)?,
            quant_conv,
            config: config.clone(),
        })
    }

    /// `image [B, H, W, 3]` in [−1, 1] (H and W multiples of the latent factor) → the posterior's
    /// moments `[B, h, w, 2·C_lat]`: the mean's channels, then the log-variance's.
    pub fn encode(&self, b: &B, image: &B::Tensor) -> Result<B::Tensor> {
        let mut h = self.conv_in.forward(b, image)?; // [B, H, W, C0]
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(b, &h, None)?; // [B, H_i, W_i, C_i]
            }
            if let Some(down) = &block.downsampler {
                let pad = Padding {
                    bottom: 1,
                    right: 1,
                    ..Padding::default()
                };
                h = b.pad(&h, pad)?; // [B, H_i + 1, W_i + 1, C_i]
                h = down.forward(b, &h)?; // [B, H_i / 2, W_i / 2, C_i]
            }
        }
        h = self.mid_block.forward(b, &h)?; // [B, h, w, C_top]
        let h = self.conv_norm_out.forward(b, &h, Activation::Silu)?; // [B, h, w, C_top]
        let moments = self.conv_out.forward(b, &h)?; // [B, h, w, 2·C_lat]
        match &self.quant_conv {
            Some(conv) => conv.forward(b, &moments), // [B, h, w, 2·C_lat]
            None => Ok(moments),
        }
    }

    /// The posterior of host `image [B, H, W, 3]` (see [`VaeEncoder::encode`]), its moments
    /// encoded in tiles where `tiling` applies (diffusers' `_tiled_encode`).
    pub fn posterior(&self, b: &B, image: &HostTensor, tiling: VaeTiling) -> Result<Posterior> {
        let encode = |image: &HostTensor| b.download(&self.encode(b, &b.upload(image)?)?);
        let geometry = TileGeometry::encode(&self.config);
        let channels = self.config.block_out_channels.first().copied().unwrap_or(0);
        let batch_pixels = image.numel() / self.config.in_channels.max(1);
        let working_set = untiled_working_set(batch_pixels, channels);
        let available = || b.available_memory();
        let moments = tiling.run(&geometry, image, working_set, available, encode)?; // [B, h, w, 2·C_lat]
        Posterior::from_moments(&moments, self.config.latent_channels)
    }
}

/// diffusers' `DiagonalGaussianDistribution`, NCHW like its tensors: `mean` and `std` are
/// `[B, C_lat, h, w]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Posterior {
    pub mean: HostTensor,
    pub std: HostTensor,
}

impl Posterior {
    /// From NHWC moments `[B, h, w, 2·C_lat]`: the log-variance clamped to [−30, 20], std =
    /// exp(logvar / 2).
    pub fn from_moments(moments: &HostTensor, latent_channels: usize) -> Result<Self> {
        let nchw = moments.clone().nhwc_to_nchw()?; // [B, 2·C_lat, h, w]
        let [batch, channels, h, w] = nchw.shape[..] else {
            return Err(Error::shape("vae posterior", "moments must be 4-D"));
        };
        if channels != 2 * latent_channels {
            return Err(Error::shape(
                "vae posterior",
                format!("{channels} moment channels for {latent_channels} latent channels"),
            ));
        }
        let plane = latent_channels * h * w;
        let (mut mean, mut std) = (Vec::with_capacity(batch * plane), Vec::new());
        for image in nchw.data.chunks_exact(2 * plane) {
            let (m, logvar) = image.split_at(plane);
            mean.extend_from_slice(m);
            std.extend(logvar.iter().map(|&l| (0.5 * l.clamp(-30.0, 20.0)).exp()));
        }
        let shape = vec![batch, latent_channels, h, w];
        Ok(Posterior {
            mean: HostTensor::new(shape.clone(), mean)?,
            std: HostTensor::new(shape, std)?,
        })
    }

    /// A sample `mean + std · ε`, ε drawn from `rng` in NCHW order (diffusers'
    /// `latent_dist.sample(generator)`).
    pub fn sample(&self, rng: &mut TorchGenerator) -> HostTensor {
        let noise = rng.randn(self.mean.data.len());
        let data = self
            .mean
            .data
            .iter()
            .zip(&self.std.data)
            .zip(noise)
            .map(|((m, s), e)| m + s * e)
            .collect();
        HostTensor {
            shape: self.mean.shape.clone(),
            data,
        }
    }
}

//! The layers the models share (diffusers' names): Linear, Conv2d, norms, ResnetBlock2D,
//! Attention, the GEGLU feed-forward, BasicTransformerBlock and Transformer2DModel.

use crate::backend::{Activation, Backend, Mask, Tensor};
use crate::weights::WeightScope;
use crate::Result;

/// `nn.Linear`: weight `[out, in]`, optional bias `[out]`.
pub struct Linear<B: Backend> {
    weight: B::Tensor,
    bias: Option<B::Tensor>,
}

impl<B: Backend> Linear<B> {
    /// A layer with its bias.
    pub fn load(w: &WeightScope<B>, inp: usize, out: usize) -> Result<Self> {
        Ok(Linear {
            weight: w.linear_weight("weight", out, inp)?,
            bias: Some(w.tensor("bias", &[out])?),
        })
    }

    /// A layer with a bias only when the checkpoint has one.
    pub fn load_optional_bias(w: &WeightScope<B>, inp: usize, out: usize) -> Result<Self> {
        if !w.contains("bias") {
            return Ok(Linear {
                weight: w.linear_weight("weight", out, inp)?,
                bias: None,
            });
        }
        Self::load(w, inp, out)
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.linear(x, &self.weight, self.bias.as_ref())
    }
}

/// `nn.Conv2d` with square kernel, NHWC activations, OHWI weights.
pub struct Conv2d<B: Backend> {
    weight: B::Tensor,
    bias: B::Tensor,
    stride: usize,
    padding: usize,
}

impl<B: Backend> Conv2d<B> {
    pub fn load(
        w: &WeightScope<B>,
        inp: usize,
        out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Conv2d {
            weight: w.conv_weight("weight", out, inp, kernel)?,
            bias: w.tensor("bias", &[out])?,
            stride,
            padding,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.conv2d(
            x,
            &self.weight,
            Some(&self.bias),
            self.stride,
            self.padding,
            None,
        )
    }

    /// The convolution with `residual` added in the epilogue.
    pub fn forward_add(&self, b: &B, x: &B::Tensor, residual: &B::Tensor) -> Result<B::Tensor> {
        b.conv2d(
            x,
            &self.weight,
            Some(&self.bias),
            self.stride,
            self.padding,
            Some(residual),
        )
    }
}

/// `nn.GroupNorm` over channels-last tensors.
pub struct GroupNorm<B: Backend> {
    gamma: B::Tensor,
    beta: B::Tensor,
    groups: usize,
    eps: f32,
}

impl<B: Backend> GroupNorm<B> {
    pub fn load(w: &WeightScope<B>, channels: usize, groups: usize, eps: f32) -> Result<Self> {
        Ok(GroupNorm {
            gamma: w.tensor("weight", &[channels])?,
            beta: w.tensor("bias", &[channels])?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor, then: Activation) -> Result<B::Tensor> {
        b.group_norm(x, self.groups, &self.gamma, &self.beta, self.eps, then)
    }
}

/// `nn.LayerNorm` over the last dimension.
pub struct LayerNorm<B: Backend> {
    gamma: B::Tensor,
    beta: B::Tensor,
    eps: f32,
}

impl<B: Backend> LayerNorm<B> {
    pub fn load(w: &WeightScope<B>, channels: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            gamma: w.tensor("weight", &[channels])?,
            beta: w.tensor("bias", &[channels])?,
            eps,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.layer_norm(x, &self.gamma, &self.beta, self.eps)
    }
}

/// diffusers `ResnetBlock2D`: GN → SiLU → conv3×3 → (+ time projection) → GN → SiLU → conv3×3,
/// plus the input (through a 1×1 `conv_shortcut` when the channel count changes).
pub struct ResnetBlock2D<B: Backend> {
    norm1: GroupNorm<B>,
    conv1: Conv2d<B>,
    time_emb_proj: Option<Linear<B>>,
    norm2: GroupNorm<B>,
    conv2: Conv2d<B>,
    conv_shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> ResnetBlock2D<B> {
    /// `temb_channels` is `None` for the VAE's resnets (no time embedding).
    pub fn load(
        w: &WeightScope<B>,
        inp: usize,
        out: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f32,
    ) -> Result<Self> {
        let conv_shortcut = if inp != out {
            Some(Conv2d::load(&w.pp("conv_shortcut"), inp, out, 1, 1, 0)?)
        } else {
            None
        };
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(&w.pp("norm1"), inp, groups, eps)?,
            conv1: Conv2d::load(&w.pp("conv1"), inp, out, 3, 1, 1)?,
            time_emb_proj: match temb_channels {
                Some(t) => Some(Linear::load(&w.pp("time_emb_proj"), t, out)?),
                None => None,
            },
            norm2: GroupNorm::load(&w.pp("norm2"), out, groups, eps)?,
            conv2: Conv2d::load(&w.pp("conv2"), out, out, 3, 1, 1)?,
            conv_shortcut,
        })
    }

    /// `x [B, H, W, C_in]`, `temb_silu [B, T]` = SiLU(time embedding) → `[B, H, W, C_out]`.
    pub fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        temb_silu: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        let h = self.norm1.forward(b, x, Activation::Silu)?; // [B, H, W, C_in]
        let mut h = self.conv1.forward(b, &h)?; // [B, H, W, C_out]
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb_silu) {
            let t = proj.forward(b, t)?; // [B, C_out]
            h = b.add_per_channel(&h, &t)?; // [B, H, W, C_out]
        }
        let h = self.norm2.forward(b, &h, Activation::Silu)?; // [B, H, W, C_out]
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(b, x)?, // [B, H, W, C_out]
            None => x.clone(),
        };
        self.conv2.forward_add(b, &h, &shortcut) // [B, H, W, C_out]
    }
}

/// diffusers `Attention`: q/k/v projections, multi-head attention, output projection.
pub struct Attention<B: Backend> {
    to_q: Linear<B>,
    to_k: Linear<B>,
    to_v: Linear<B>,
    to_out: Linear<B>,
    heads: usize,
}

impl<B: Backend> Attention<B> {
    /// `query_dim` channels in and out, keys/values from `context_dim` channels; projections
    /// carry a bias only where the checkpoint has one (UNet: none on q/k/v; VAE: all).
    pub fn load(
        w: &WeightScope<B>,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
    ) -> Result<Self> {
        Ok(Attention {
            to_q: Linear::load_optional_bias(&w.pp("to_q"), query_dim, query_dim)?,
            to_k: Linear::load_optional_bias(&w.pp("to_k"), context_dim, query_dim)?,
            to_v: Linear::load_optional_bias(&w.pp("to_v"), context_dim, query_dim)?,
            to_out: Linear::load(&w.pp("to_out").pp(0), query_dim, query_dim)?,
            heads,
        })
    }

    /// The VAE's single-head attention, which older diffusers files store as
    /// `query`/`key`/`value`/`proj_attn` (the real SD 2.1 VAE files among them).
    pub fn load_vae(w: &WeightScope<B>, channels: usize) -> Result<Self> {
        if w.contains("query.weight") {
            return Ok(Attention {
                to_q: Linear::load(&w.pp("query"), channels, channels)?,
                to_k: Linear::load(&w.pp("key"), channels, channels)?,
                to_v: Linear::load(&w.pp("value"), channels, channels)?,
                to_out: Linear::load(&w.pp("proj_attn"), channels, channels)?,
                heads: 1,
            });
        }
        Self::load(w, channels, channels, 1)
    }

    /// `x [B, N, C]`, `context [B, M, C_ctx]` (self-attention when `None`) → `[B, N, C]`.
    pub fn forward(&self, b: &B, x: &B::Tensor, context: Option<&B::Tensor>) -> Result<B::Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(b, x)?; // [B, N, C]
        let k = self.to_k.forward(b, context)?; // [B, M, C]
        let v = self.to_v.forward(b, context)?; // [B, M, C]
        let h = b.attention(&q, &k, &v, self.heads, Mask::None)?; // [B, N, C]
        self.to_out.forward(b, &h) // [B, N, C]
    }
}

/// diffusers `FeedForward` with GEGLU: `ff.net.0.proj` (C → 2·inner), GEGLU, `ff.net.2` (inner → C).
pub struct FeedForward<B: Backend> {
    proj: Linear<B>,
    out: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    pub fn load(w: &WeightScope<B>, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(FeedForward {
            proj: Linear::load(&w.pp("net.0.proj"), dim, inner * 2)?,
            out: Linear::load(&w.pp("net.2"), inner, dim)?,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = self.proj.forward(b, x)?; // [B, N, 2·inner]
        let h = b.geglu(&h)?; // [B, N, inner]
        self.out.forward(b, &h) // [B, N, C]
    }
}

/// diffusers `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward,
/// each pre-LayerNorm with a residual.
pub struct BasicTransformerBlock<B: Backend> {
    norm1: LayerNorm<B>,
    attn1: Attention<B>,
    norm2: LayerNorm<B>,
    attn2: Attention<B>,
    norm3: LayerNorm<B>,
    ff: FeedForward<B>,
}

impl<B: Backend> BasicTransformerBlock<B> {
    pub fn load(
        w: &WeightScope<B>,
        dim: usize,
        context_dim: usize,
        heads: usize,
        eps: f32,
    ) -> Result<Self> {
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::load(&w.pp("norm1"), dim, eps)?,
            attn1: Attention::load(&w.pp("attn1"), dim, dim, heads)?,
            norm2: LayerNorm::load(&w.pp("norm2"), dim, eps)?,
            attn2: Attention::load(&w.pp("attn2"), dim, context_dim, heads)?,
            norm3: LayerNorm::load(&w.pp("norm3"), dim, eps)?,
            ff: FeedForward::load(&w.pp("ff"), dim)?,
        })
    }

    /// `x [B, N, C]`, `context [B, 77, C_ctx]` → `[B, N, C]`.
    pub fn forward(&self, b: &B, x: &B::Tensor, context: &B::Tensor) -> Result<B::Tensor> {
        let h = self.norm1.forward(b, x)?; // [B, N, C]
        let x = b.add(&self.attn1.forward(b, &h, None)?, x)?; // [B, N, C]
        let h = self.norm2.forward(b, &x)?; // [B, N, C]
        let x = b.add(&self.attn2.forward(b, &h, Some(context))?, &x)?; // [B, N, C]
        let h = self.norm3.forward(b, &x)?; // [B, N, C]
        b.add(&self.ff.forward(b, &h)?, &x) // [B, N, C]
    }
}

/// diffusers `Transformer2DModel` (SD 2.x: linear `proj_in`/`proj_out`; 1×1 convs in SD 1.x are
/// the same numbers in NHWC): GN → proj_in → blocks → proj_out → + input.
pub struct Transformer2D<B: Backend> {
    norm: GroupNorm<B>,
    proj_in: Linear<B>,
    blocks: Vec<BasicTransformerBlock<B>>,
    proj_out: Linear<B>,
}

impl<B: Backend> Transformer2D<B> {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &WeightScope<B>,
        channels: usize,
        context_dim: usize,
        heads: usize,
        depth: usize,
        groups: usize,
        layer_norm_eps: f32,
    ) -> Result<Self> {
        Ok(Transformer2D {
            norm: GroupNorm::load(&w.pp("norm"), channels, groups, 1e-6)?,
            proj_in: Linear::load(&w.pp("proj_in"), channels, channels)?,
            blocks: (0..depth)
                .map(|i| {
                    BasicTransformerBlock::load(
                        &w.pp("transformer_blocks").pp(i),
                        channels,
                        context_dim,
                        heads,
                        layer_norm_eps,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: Linear::load(&w.pp("proj_out"), channels, channels)?,
        })
    }

    /// `x [B, H, W, C]`, `context [B, 77, C_ctx]` → `[B, H, W, C]`.
    pub fn forward(&self, b: &B, x: &B::Tensor, context: &B::Tensor) -> Result<B::Tensor> {
        let shape = x.shape().to_vec();
        let (batch, c) = (shape[0], shape[shape.len() - 1]);
        let h = self.norm.forward(b, x, Activation::None)?; // [B, H, W, C]
        let h = b.reshape(&h, &[batch, shape[1..shape.len() - 1].iter().product(), c])?; // [B, HW, C]
        let mut h = self.proj_in.forward(b, &h)?; // [B, HW, C]
        for block in &self.blocks {
            h = block.forward(b, &h, context)?; // [B, HW, C]
        }
        let h = self.proj_out.forward(b, &h)?; // [B, HW, C]
        let h = b.reshape(&h, &shape)?; // [B, H, W, C]
        b.add(&h, x) // [B, H, W, C]
    }
}

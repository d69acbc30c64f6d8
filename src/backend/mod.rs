//! The op set the models are written against, and the backends that implement it.
//!
//! Layout conventions (every backend): tensors are row-major with the channel (feature) dimension
//! last. Images and feature maps are NHWC `[B, H, W, C]`; token sequences are `[B, N, C]`.
//! Linear weights keep PyTorch's `[out, in]`; conv weights are OHWI `[C_out, kH, kW, C_in]`
//! (converted from PyTorch's OIHW once, at load time).

pub mod contract;
pub mod cpu;
pub mod cuda;
mod device;
pub mod selftest;

pub use contract::{Activation, Mask, Padding, Tensor};
pub use device::{Device, OpenedBackend};

use crate::tensor::HostTensor;
use crate::Result;

/// A pure function of device tensors (inputs in, one tensor out) that a backend able to record
/// may capture once and replay with new input values (`CudaBackend::run_recorded`).
pub type RecordedFn<'a, T> = dyn Fn(&[T]) -> Result<T> + 'a;

/// The op set the models are written against: `model/` only ever talks to this trait. Every
/// backend gets it from its [`Compute`] (the blanket impl below): each op's arguments are checked
/// by [`contract`], then computed.
pub trait Backend: Send + Sync {
    /// A tensor living on this backend's device. Cloning is cheap (shared storage).
    type Tensor: Tensor;

    /// A short description of the device, for logs (`cpu (2 threads, GEMM: oneDNN sgemm)`).
    fn describe(&self) -> String;

    /// Bytes the backend could still allocate (the host's available memory, or the device's free
    /// memory), where it can tell.
    fn available_memory(&self) -> Option<u64>;
    /// Copies host data to the device.
    fn upload(&self, host: &HostTensor) -> Result<Self::Tensor>;
    /// Moves host data to the device: the CPU backend keeps the buffer itself (no copy), which is
    /// what loading weights wants.
    fn upload_owned(&self, host: HostTensor) -> Result<Self::Tensor>;
    /// Copies a tensor back to host memory as f32.
    fn download(&self, t: &Self::Tensor) -> Result<HostTensor>;
    /// Same storage, new shape with the same element count.
    fn reshape(&self, t: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;

    /// `x [.., K] · weightᵀ [K, N] + bias [N]` → `[.., N]`; `weight` is `[N, K]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;

    /// 2-D convolution, NHWC in and out: `x [B, H, W, C_in]`, `weight [C_out, kH, kW, C_in]`,
    /// `bias [C_out]`, symmetric zero `padding`, `stride` in both directions.
    /// Output `[B, (H + 2p − kH)/s + 1, (W + 2p − kW)/s + 1, C_out]`; `residual` (same shape as the
    /// output) is added in the epilogue.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        stride: usize,
        padding: usize,
        residual: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;

    /// Group norm over `x [B, .., C]` (channels last, any number of spatial dims):
    /// `groups` groups of `C / groups` consecutive channels, statistics over spatial × group
    /// channels, biased variance, then `gamma [C]`, `beta [C]`, then `activation`.
    fn group_norm(
        &self,
        x: &Self::Tensor,
        groups: usize,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
        activation: Activation,
    ) -> Result<Self::Tensor>;

    /// Layer norm over the last dimension with `gamma [C]`, `beta [C]`, biased variance.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// Multi-head scaled dot-product attention, softmax in f32:
    /// `q [B, Nq, H·D]`, `k [B, Nk, H·D]`, `v [B, Nk, H·D]` → `[B, Nq, H·D]`, head h using
    /// channels `h·D .. (h+1)·D`, scale `1/√D`. [`Mask::Causal`] masks key j > query i (CLIP).
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: usize,
        mask: Mask,
    ) -> Result<Self::Tensor>;

    /// GEGLU: `x [.., 2F]` → `x[.., :F] · gelu(x[.., F:])` with the exact (erf) GELU → `[.., F]`.
    fn geglu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// Exact (erf) GELU, elementwise.
    fn gelu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// SiLU `x · σ(x)`, elementwise.
    fn silu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `a + b`, same shapes.
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `x [B, .., C] + v [B, C]`, `v` broadcast over the middle (spatial) dimensions.
    fn add_per_channel(&self, x: &Self::Tensor, v: &Self::Tensor) -> Result<Self::Tensor>;
    /// Nearest-neighbour resize of `x [B, H, W, C]` to `[B, out_h, out_w, C]` with PyTorch's
    /// `nearest` rule: source index = ⌊dst · in / out⌋.
    fn upsample_nearest(
        &self,
        x: &Self::Tensor,
        out_h: usize,
        out_w: usize,
    ) -> Result<Self::Tensor>;
    /// Zero padding of `x [B, H, W, C]` → `[B, H + top + bottom, W + left + right, C]`.
    fn pad(&self, x: &Self::Tensor, padding: Padding) -> Result<Self::Tensor>;
    /// Concatenation on the last (channel) dimension: `[.., Ca]`, `[.., Cb]` → `[.., Ca + Cb]`.
    fn concat_channels(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// Row gather: `table [V, D]`, `ids` → `[ids.len(), D]`; an id ≥ V is an error.
    fn embedding(&self, ids: &[u32], table: &Self::Tensor) -> Result<Self::Tensor>;
}

/// What a backend implements: storage, and each op's computation on arguments [`contract`]
/// has already checked (so a backend never repeats a shape rule). Backend-specific limits (a
/// kernel's grid or index width) stay with the backend, as `Error::TooLarge`.
pub trait Compute: Send + Sync {
    type Tensor: Tensor;

    fn describe(&self) -> String;
    /// See [`Backend::available_memory`].
    fn available_memory(&self) -> Option<u64> {
        None
    }
    /// `host` holds exactly its shape's element count.
    fn upload(&self, host: &HostTensor) -> Result<Self::Tensor>;
    /// As `upload`, owning `host` (a backend that can keep the buffer overrides this).
    fn upload_owned(&self, host: HostTensor) -> Result<Self::Tensor> {
        self.upload(&host)
    }
    fn download(&self, t: &Self::Tensor) -> Result<HostTensor>;
    /// `t`'s storage with `shape`, which has `t`'s element count.
    fn view(&self, t: &Self::Tensor, shape: Vec<usize>) -> Self::Tensor;

    fn linear(&self, op: contract::Linear<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn conv2d(&self, op: contract::Conv2d<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn group_norm(&self, op: contract::GroupNorm<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn layer_norm(&self, op: contract::LayerNorm<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn attention(&self, op: contract::Attention<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn geglu(&self, op: contract::Geglu<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn gelu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    fn silu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    fn add(&self, op: contract::Add<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn add_per_channel(
        &self,
        op: contract::AddPerChannel<'_, Self::Tensor>,
    ) -> Result<Self::Tensor>;
    fn upsample_nearest(
        &self,
        op: contract::UpsampleNearest<'_, Self::Tensor>,
    ) -> Result<Self::Tensor>;
    fn pad(&self, op: contract::Pad<'_, Self::Tensor>) -> Result<Self::Tensor>;
    fn concat_channels(
        &self,
        op: contract::ConcatChannels<'_, Self::Tensor>,
    ) -> Result<Self::Tensor>;
    fn embedding(&self, op: contract::Embedding<'_, Self::Tensor>) -> Result<Self::Tensor>;
}

/// Every op: check with [`contract`], then compute.
impl<C: Compute> Backend for C {
    type Tensor = C::Tensor;

    fn describe(&self) -> String {
        Compute::describe(self)
    }

    fn available_memory(&self) -> Option<u64> {
        Compute::available_memory(self)
    }

    fn upload(&self, host: &HostTensor) -> Result<C::Tensor> {
        contract::upload(host)?;
        Compute::upload(self, host)
    }

    fn upload_owned(&self, host: HostTensor) -> Result<C::Tensor> {
        contract::upload(&host)?;
        Compute::upload_owned(self, host)
    }

    fn download(&self, t: &C::Tensor) -> Result<HostTensor> {
        Compute::download(self, t)
    }

    fn reshape(&self, t: &C::Tensor, shape: &[usize]) -> Result<C::Tensor> {
        let shape = contract::reshape(t.shape(), shape)?;
        Ok(self.view(t, shape))
    }

    fn linear(
        &self,
        x: &C::Tensor,
        weight: &C::Tensor,
        bias: Option<&C::Tensor>,
    ) -> Result<C::Tensor> {
        Compute::linear(self, contract::linear(x, weight, bias)?)
    }

    fn conv2d(
        &self,
        x: &C::Tensor,
        weight: &C::Tensor,
        bias: Option<&C::Tensor>,
        stride: usize,
        padding: usize,
        residual: Option<&C::Tensor>,
    ) -> Result<C::Tensor> {
        let op = contract::conv2d(x, weight, bias, stride, padding, residual)?;
        Compute::conv2d(self, op)
    }

    fn group_norm(
        &self,
        x: &C::Tensor,
        groups: usize,
        gamma: &C::Tensor,
        beta: &C::Tensor,
        eps: f32,
        activation: Activation,
    ) -> Result<C::Tensor> {
        let op = contract::group_norm(x, groups, gamma, beta, eps, activation)?;
        Compute::group_norm(self, op)
    }

    fn layer_norm(
        &self,
        x: &C::Tensor,
        gamma: &C::Tensor,
        beta: &C::Tensor,
        eps: f32,
    ) -> Result<C::Tensor> {
        Compute::layer_norm(self, contract::layer_norm(x, gamma, beta, eps)?)
    }

    fn attention(
        &self,
        q: &C::Tensor,
        k: &C::Tensor,
        v: &C::Tensor,
        heads: usize,
        mask: Mask,
    ) -> Result<C::Tensor> {
        Compute::attention(self, contract::attention(q, k, v, heads, mask)?)
    }

    fn geglu(&self, x: &C::Tensor) -> Result<C::Tensor> {
        Compute::geglu(self, contract::geglu(x)?)
    }

    fn gelu(&self, x: &C::Tensor) -> Result<C::Tensor> {
        Compute::gelu(self, x)
    }

    fn silu(&self, x: &C::Tensor) -> Result<C::Tensor> {
        Compute::silu(self, x)
    }

    fn add(&self, a: &C::Tensor, b: &C::Tensor) -> Result<C::Tensor> {
        Compute::add(self, contract::add(a, b)?)
    }

    fn add_per_channel(&self, x: &C::Tensor, v: &C::Tensor) -> Result<C::Tensor> {
        Compute::add_per_channel(self, contract::add_per_channel(x, v)?)
    }

    fn upsample_nearest(&self, x: &C::Tensor, out_h: usize, out_w: usize) -> Result<C::Tensor> {
        Compute::upsample_nearest(self, contract::upsample_nearest(x, out_h, out_w)?)
    }

    fn pad(&self, x: &C::Tensor, padding: Padding) -> Result<C::Tensor> {
        Compute::pad(self, contract::pad(x, padding)?)
    }

    fn concat_channels(&self, a: &C::Tensor, b: &C::Tensor) -> Result<C::Tensor> {
        Compute::concat_channels(self, contract::concat_channels(a, b)?)
    }

    fn embedding(&self, ids: &[u32], table: &C::Tensor) -> Result<C::Tensor> {
        Compute::embedding(self, contract::embedding(ids, table)?)
    }
}

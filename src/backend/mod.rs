//! The op set the models are written against, and the backends that implement it.
//!
//! Layout conventions (every backend): tensors are row-major with the channel (feature) dimension
//! last. Images and feature maps are NHWC `[B, H, W, C]`; token sequences are `[B, N, C]`.
//! Linear weights keep PyTorch's `[out, in]`; conv weights are OHWI `[C_out, kH, kW, C_in]`
//! (converted from PyTorch's OIHW once, at load time).

pub mod cpu;
pub mod cuda;
mod device;

pub use device::Device;

use crate::tensor::HostTensor;
use crate::Result;

/// The function [`Backend::run_recorded`] runs (and may record): tensors in, one tensor out.
pub type RecordedFn<'a, T> = dyn Fn(&[T]) -> Result<T> + 'a;

/// A device that runs the op set. `model/` only ever talks to this trait.
pub trait Backend: Send + Sync {
    /// A tensor living on this backend's device. Cloning is cheap (shared storage).
    type Tensor: Clone + Send + Sync;

    /// A short description of the device, for logs (`cpu (2 threads)`).
    fn describe(&self) -> String;

    /// Copies host data to the device.
    fn upload(&self, host: &HostTensor) -> Result<Self::Tensor>;
    /// Copies a tensor back to host memory as f32.
    fn download(&self, t: &Self::Tensor) -> Result<HostTensor>;
    /// The tensor's shape.
    fn shape<'a>(&self, t: &'a Self::Tensor) -> &'a [usize];
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
    /// channels, biased variance, then `gamma [C]`, `beta [C]`; `silu` applies SiLU afterwards.
    fn group_norm(
        &self,
        x: &Self::Tensor,
        groups: usize,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
        silu: bool,
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
    /// channels `h·D .. (h+1)·D`, scale `1/√D`. `causal` masks key j > query i (CLIP).
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: usize,
        causal: bool,
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
    /// Concatenation on the last (channel) dimension: `[.., Ca]`, `[.., Cb]` → `[.., Ca + Cb]`.
    fn concat_channels(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// Row gather: `table [V, D]`, `ids` → `[ids.len(), D]`; an id ≥ V is an error.
    fn embedding(&self, ids: &[u32], table: &Self::Tensor) -> Result<Self::Tensor>;

    /// A fresh copy of `x` on the device; `sd21-bench` measures the memory-bandwidth ceiling
    /// with it, so a backend should override this slow default with a device-to-device copy.
    fn copy(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.upload(&self.download(x)?)
    }

    /// Waits until every queued operation has finished (a no-op for synchronous backends);
    /// benchmarks call it before reading the clock.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// `f(inputs)`. A backend may record the ops `f` issues for one `key` and one set of input
    /// shapes and replay that recording on later calls with new input values (the CUDA backend's
    /// CUDA graphs, when switched on), so `f` must be a pure function of its inputs' values and
    /// of tensors that outlive the backend's recordings (the weights), issuing only device ops:
    /// no upload, download or synchronisation. The default just calls `f`.
    fn run_recorded(
        &self,
        key: &str,
        inputs: &[&Self::Tensor],
        f: &RecordedFn<'_, Self::Tensor>,
    ) -> Result<Self::Tensor> {
        let _ = key;
        let inputs: Vec<Self::Tensor> = inputs.iter().map(|&t| t.clone()).collect();
        f(&inputs)
    }

    /// Switches the recording of [`Backend::run_recorded`] on or off; false when this backend
    /// never records (the default).
    fn set_recording(&self, on: bool) -> bool {
        let _ = on;
        false
    }
}

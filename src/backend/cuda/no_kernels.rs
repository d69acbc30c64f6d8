//! The CUDA backend of a binary built without kernels (no nvcc, or no libclang, at build time).
//!
//! Same public API as the real one so that callers and tests compile everywhere, but no value of
//! [`CudaBackend`] or [`CudaTensor`] can exist: both hold an uninhabited field, `new` always
//! returns [`Error::Backend`] with the reason `build.rs` recorded, and the trait methods are
//! statically unreachable.

use std::convert::Infallible;

use super::RecordingId;
use crate::backend::{contract, Compute, RecordedFn, Tensor};
use crate::tensor::HostTensor;
use crate::{Error, Result};

/// Why `build.rs` compiled no kernels.
pub(super) const REASON: &str = match option_env!("SD21_KERNELS_MISSING") {
    Some(r) => r,
    None => "the build script recorded no reason",
};

/// A tensor on a CUDA device (never constructed in a build without kernels).
#[derive(Clone, Debug)]
pub struct CudaTensor {
    never: Infallible,
}

/// The CUDA backend (never constructed in a build without kernels).
#[derive(Debug)]
pub struct CudaBackend {
    never: Infallible,
}

impl CudaBackend {
    /// Always an error here: this binary was built without CUDA kernels.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        Err(Error::Backend(format!(
            "cuda:{ordinal}: this binary was built without CUDA kernels: {REASON}. Rebuild with \
             NVCC=$(scripts/install-nvcc.sh) (and libclang installed)"
        )))
    }

    /// See the real backend: the wgmma kernels' start-up checks.
    pub fn start_up_checks(&self) -> Vec<crate::backend::selftest::CaseResult> {
        match self.never {}
    }

    /// See the real backend: `f(inputs)`, possibly recorded as a CUDA graph.
    pub fn run_recorded(
        &self,
        _: RecordingId,
        _: &[&CudaTensor],
        _: &RecordedFn<'_, CudaTensor>,
    ) -> Result<CudaTensor> {
        match self.never {}
    }
}

impl Tensor for CudaTensor {
    fn shape(&self) -> &[usize] {
        match self.never {}
    }
}

impl Compute for CudaBackend {
    type Tensor = CudaTensor;

    fn describe(&self) -> String {
        match self.never {}
    }
    fn upload(&self, _: &HostTensor) -> Result<CudaTensor> {
        match self.never {}
    }
    fn download(&self, _: &CudaTensor) -> Result<HostTensor> {
        match self.never {}
    }
    fn view(&self, _: &CudaTensor, _: Vec<usize>) -> CudaTensor {
        match self.never {}
    }
    fn linear(&self, _: contract::Linear<'_, CudaTensor>) -> Result<CudaTensor> {
        match self.never {}
    }
    fn conv2d(&self, _: contract::Conv2d<'_, CudaTensor>) -> Result<CudaTensor> {
        match self.never {}
    }
    fn group_norm(&self, _: contract::GroupNorm<'_, CudaTensor>) -> Result<CudaTensor> {
        match self.never {}
    }
    fn layer_norm(&self, _: contract::LayerNorm<'_, CudaTensor>) -> Result<CudaTensor> {
        match self.never {}
    }
    fn attention(&self, _: contract::Attention<'_, CudaTensor>) -> Result<CudaTensor> {
        match self.never {}
    }
    fn geglu(&self, _: contract::Geglu<'_, CudaTensor>) -> Result<CudaTensor> {
        match self.never {}
    }
    fn gelu(&self, _: &CudaTensor) -> Result<CudaTensor> {
        match self.never {}
    }
    fn silu(&self, _: &CudaTensor) -> Result<CudaTensor> {
        match self.never {}
    }
    fn add(&self, _: contract::Add<'_, CudaTensor>) -> Result<CudaTensor> {
        match self.never {}
    }
    fn add_per_channel(&self, _: contract::AddPerChannel<'_, CudaTensor>) -> Result<CudaTensor> {
        match self.never {}
    }
    fn upsample_nearest(&self, _: contract::UpsampleNearest<'_, CudaTensor>) -> Result<CudaTensor> {
        match self.never {}
    }
    fn pad(&self, _: contract::Pad<'_, CudaTensor>) -> Result<CudaTensor> {
        match self.never {}
    }
    fn concat_channels(&self, _: contract::ConcatChannels<'_, CudaTensor>) -> Result<CudaTensor> {
        match self.never {}
    }
    fn embedding(&self, _: contract::Embedding<'_, CudaTensor>) -> Result<CudaTensor> {
        match self.never {}
    }
}

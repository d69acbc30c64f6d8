//! The CUDA backend: f16 storage, f32 accumulation, hand-written kernels from `kernels/` (embedded
//! as fatbins by `build.rs`) plus cuBLASLt/cuBLAS for the linear layers (bias in the epilogue),
//! all on one stream.
//!
//! Two forms, chosen at build time:
//! - with kernels (`cfg(sd21_kernels)`, set by `build.rs` when nvcc and libclang were found):
//!   `backend.rs` (the [`CudaBackend`] and its `Compute` impl), `kernels.rs` (the embedded modules,
//!   the bindgen structs of `kernels/params.h`, the launch helpers), and one file per op family
//!   holding the typed wrapper of each kernel: `transfer.rs` (upload, download), `elementwise.rs`,
//!   `norm.rs`, `attention.rs`, `conv.rs`, `linear.rs`; `graphs.rs` records and replays CUDA
//!   graphs (`CudaBackend::run_recorded`);
//!   `self_check.rs` holds what the wgmma kernels' start-up checks share;
//! - without (`no_kernels.rs`): the same public API, but [`CudaBackend::new`] always returns an
//!   error that says why the kernels are missing and [`cuda_available`] is false.
//!
//! Nothing here ever panics on a machine without a GPU: the driver library is probed with
//! `is_culib_present` before any other CUDA call (cudarc panics when libcuda is absent).

#[cfg(sd21_kernels)]
mod attention;
#[cfg(sd21_kernels)]
mod backend;
#[cfg(sd21_kernels)]
mod conv;
#[cfg(sd21_kernels)]
mod elementwise;
#[cfg(sd21_kernels)]
mod graphs;
#[cfg(sd21_kernels)]
mod kernels;
#[cfg(sd21_kernels)]
mod linear;
#[cfg(not(sd21_kernels))]
mod no_kernels;
#[cfg(sd21_kernels)]
mod norm;
#[cfg(sd21_kernels)]
mod self_check;
#[cfg(sd21_kernels)]
mod transfer;

#[cfg(sd21_kernels)]
pub use backend::{CudaBackend, CudaTensor};
#[cfg(not(sd21_kernels))]
pub use no_kernels::{CudaBackend, CudaTensor};

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How the kernels were built (`Ok`: nvcc version, architectures, size) or why they were not
/// (`Err`: the reason `build.rs` recorded).
pub fn kernel_build_info() -> std::result::Result<String, String> {
    #[cfg(sd21_kernels)]
    {
        Ok(kernels::build_info())
    }
    #[cfg(not(sd21_kernels))]
    {
        Err(no_kernels::REASON.to_string())
    }
}

/// True when this binary has kernels, the CUDA driver library loads, and it sees a device.
/// Never panics and never initialises more than the driver.
pub fn cuda_available() -> bool {
    #[cfg(sd21_kernels)]
    {
        backend::device_count().is_ok_and(|n| n > 0)
    }
    #[cfg(not(sd21_kernels))]
    {
        false
    }
}

/// Names one function a caller records (e.g. one loaded UNet's evaluation); every id is new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordingId(usize);

impl RecordingId {
    pub fn new() -> RecordingId {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        RecordingId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for RecordingId {
    fn default() -> Self {
        RecordingId::new()
    }
}

impl fmt::Display for RecordingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "recording {}", self.0)
    }
}

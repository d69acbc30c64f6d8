//! The CUDA backend: f16 storage, f32 accumulation, hand-written kernels from `kernels/` (embedded
//! as fatbins by `build.rs`) plus cuBLASLt/cuBLAS for the linear layers (bias in the epilogue),
//! all on one stream.
//!
//! Two forms, chosen at build time:
//! - with kernels (`cfg(sd21_kernels)`, set by `build.rs` when nvcc and libclang were found):
//!   `backend.rs` (the [`CudaBackend`] and its `Backend` impl), `kernels.rs` (the embedded modules,
//!   the bindgen structs of `kernels/params.h`, the launch helpers), and one file per op family
//!   holding the typed wrapper of each kernel: `elementwise.rs`, `norm.rs`, `attention.rs`,
//!   `conv.rs`, `linear.rs`; `graphs.rs` records and replays CUDA graphs (`run_recorded`);
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
pub use backend::{CudaBackend, CudaTensor};
#[cfg(not(sd21_kernels))]
pub use no_kernels::{CudaBackend, CudaTensor};

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

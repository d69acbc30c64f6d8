//! Host↔device copies through the f32↔f16 cast kernels of `kernels/elementwise.cu`.

use cudarc::driver::PushKernelArg;

use super::backend::{CudaBackend, CudaTensor};
use super::kernels::{chunked_config, driver_error, launch_error, to_i64};
use crate::tensor::HostTensor;
use crate::Result;

/// Host f32 → device f16: one copy of the f32 data, then `cast_f32_to_f16` on the device. `host`
/// holds exactly its shape's element count (checked by `contract::upload`).
pub(super) fn upload(be: &CudaBackend, host: &HostTensor) -> Result<CudaTensor> {
    const K: &str = "cast_f32_to_f16";
    let n = host.data.len();
    let mut out = be.alloc_f16("upload", n)?;
    if n > 0 {
        let staging = be
            .stream
            .clone_htod(&host.data)
            .map_err(driver_error("copying to the device"))?;
        let n64 = to_i64("upload", "element count", n)?;
        let f = be.kernels.get(K)?;
        let mut launch = be.stream.launch_builder(f);
        launch.arg(&staging).arg(&mut out).arg(&n64);
        // SAFETY: cast_f32_to_f16(const float* x, __half* y, long long n): `staging` holds n f32,
        // `out` n f16; the kernel touches indices [0, n) only.
        unsafe { launch.launch(chunked_config(n)) }.map_err(launch_error(K))?;
        be.after_launch(K)?;
    }
    Ok(CudaTensor::new(host.shape.clone(), out))
}

/// Device f16 → host f32: `cast_f16_to_f32` on the device, then one copy back (synchronous).
pub(super) fn download(be: &CudaBackend, t: &CudaTensor) -> Result<HostTensor> {
    const K: &str = "cast_f16_to_f32";
    let n = t.numel();
    if n == 0 {
        return HostTensor::new(t.shape.clone(), Vec::new());
    }
    let mut staging = be.alloc_f32("download", n)?;
    let n64 = to_i64("download", "element count", n)?;
    let f = be.kernels.get(K)?;
    let mut launch = be.stream.launch_builder(f);
    launch.arg(t.data.as_ref()).arg(&mut staging).arg(&n64);
    // SAFETY: cast_f16_to_f32(const __half* x, float* y, long long n): both buffers hold n
    // elements; indices [0, n) only.
    unsafe { launch.launch(chunked_config(n)) }.map_err(launch_error(K))?;
    be.after_launch(K)?;
    let data = be
        .stream
        .clone_dtoh(&staging)
        .map_err(driver_error("copying to the host"))?;
    HostTensor::new(t.shape.clone(), data)
}

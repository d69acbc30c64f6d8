//! What the start-up checks of the Hopper (wgmma) kernels share: seeded random device tensors and
//! the comparison of two kernels' outputs (`conv::hopper_self_check`,
//! `attention::hopper_self_check`). Their results are rows of the self-test's report
//! (`CudaBackend::start_up_checks`, `selftest::Role::KernelChoice`).

use super::backend::{CudaBackend, CudaTensor};
use crate::backend::Backend;
use crate::random::SeededRng;
use crate::{Error, Result};

/// The largest relative L2 difference between a wgmma kernel and its portable counterpart that
/// passes (both f16 storage, f32 accumulation: real differences are ~1e-3).
const MAX_REL_L2: f64 = crate::backend::selftest::TOLERANCE;

/// Seeded random values uploaded as device tensors (never zeros).
pub(super) struct RandomTensors<'a> {
    be: &'a CudaBackend,
    rng: SeededRng,
}

impl<'a> RandomTensors<'a> {
    pub(super) fn new(be: &'a CudaBackend, seed: u64) -> Self {
        RandomTensors {
            be,
            rng: SeededRng::new(seed),
        }
    }

    /// A `shape` tensor of values uniform in [−scale, scale).
    pub(super) fn tensor(&mut self, shape: &[usize], scale: f32) -> Result<CudaTensor> {
        self.be.upload(&self.rng.tensor(shape, scale)?)
    }
}

/// Errors unless `got` (the wgmma kernel's output) is finite and within [`MAX_REL_L2`] of `want`
/// (the portable kernel's), both downloaded; `what` names the case.
pub(super) fn agree(
    be: &CudaBackend,
    got: &CudaTensor,
    want: &CudaTensor,
    what: &str,
) -> Result<f64> {
    let (got, want) = (be.download(got)?.data, be.download(want)?.data);
    let (mut err2, mut ref2) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(&want) {
        if !g.is_finite() {
            return Err(Error::Backend(format!("non-finite output for {what}")));
        }
        err2 += ((g - w) as f64).powi(2);
        ref2 += (w as f64).powi(2);
    }
    let rel = (err2 / ref2.max(f64::MIN_POSITIVE)).sqrt();
    if rel > MAX_REL_L2 {
        return Err(Error::Backend(format!(
            "relative L2 error {rel:.3e} against the portable kernel for {what}"
        )));
    }
    Ok(rel)
}

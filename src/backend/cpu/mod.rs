//! The CPU backend: f32, matmuls through oneDNN (or the `gemm` crate), rayon for everything else.
//!
//! It is the numerical reference for every other backend, so accuracy comes first (f64 statistics
//! in the norms, f32 softmax with the row maximum subtracted, exact erf GELU), then speed: every
//! matmul-shaped op is one or a few large GEMMs, every other op is a `par_chunks` over rows.
//!
//! Files: `gemm.rs` (the one safe matmul), `onednn.rs` (its oneDNN path), `linear.rs`, `conv.rs` (conv2d as
//! im2col GEMMs), `attention.rs` (blocked multi-head attention), `norm.rs` (group and layer norm),
//! `elementwise.rs` (activations, add, resize, concat, embedding) and `math.rs` (exp, SiLU, GELU).
//!
//! Every op receives arguments `backend::contract` has checked; nothing here repeats a shape rule.

mod attention;
mod conv;
mod elementwise;
mod gemm;
mod linear;
mod math;
mod memory;
mod norm;
#[cfg(sd21_onednn)]
mod onednn;
mod winograd;

pub use memory::keep_freed_memory;

use std::sync::Arc;

use crate::backend::contract::{self, numel};
use crate::backend::{Compute, Tensor};
use crate::tensor::HostTensor;
use crate::{Error, Result};

/// An f32 tensor in host memory, row-major. Clones share the storage.
#[derive(Clone, Debug)]
pub struct CpuTensor {
    shape: Vec<usize>,
    data: Arc<Vec<f32>>,
}

impl CpuTensor {
    /// Builds a tensor, checking that `data` holds exactly `shape.iter().product()` values.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        match numel(&shape) {
            Some(n) if n == data.len() => Ok(CpuTensor {
                shape,
                data: Arc::new(data),
            }),
            _ => Err(Error::shape(
                "CpuTensor::new",
                format!("shape {shape:?} does not hold {} values", data.len()),
            )),
        }
    }

    /// A copy of a host tensor (checked: the host tensor's fields are public).
    pub fn from_host(host: &HostTensor) -> Result<Self> {
        CpuTensor::new(host.shape.clone(), host.data.clone())
    }

    /// A host copy of this tensor.
    pub fn to_host(&self) -> HostTensor {
        HostTensor {
            shape: self.shape.clone(),
            data: self.data.to_vec(),
        }
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

impl Tensor for CpuTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// The f32 CPU backend. Uses rayon's global pool (size it with `RAYON_NUM_THREADS`).
#[derive(Debug, Default, Clone)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }

    /// A fresh copy of `x` (`sd21-bench` measures the memory-bandwidth ceiling with it).
    pub fn copy(&self, x: &CpuTensor) -> CpuTensor {
        use rayon::prelude::*;
        let mut out = vec![0.0f32; x.numel()];
        out.par_chunks_mut(1 << 16)
            .zip(x.data().par_chunks(1 << 16))
            .for_each(|(dst, src)| dst.copy_from_slice(src));
        CpuTensor {
            shape: x.shape.clone(),
            data: Arc::new(out),
        }
    }
}

impl Compute for CpuBackend {
    type Tensor = CpuTensor;

    fn describe(&self) -> String {
        format!(
            "cpu ({} threads, GEMM: {})",
            rayon::current_num_threads(),
            gemm::LIBRARY
        )
    }

    fn upload(&self, host: &HostTensor) -> Result<CpuTensor> {
        CpuTensor::from_host(host)
    }

    fn available_memory(&self) -> Option<u64> {
        memory::available_bytes()
    }

    fn upload_owned(&self, host: HostTensor) -> Result<CpuTensor> {
        CpuTensor::new(host.shape, host.data)
    }

    fn download(&self, t: &CpuTensor) -> Result<HostTensor> {
        Ok(t.to_host())
    }

    fn view(&self, t: &CpuTensor, shape: Vec<usize>) -> CpuTensor {
        CpuTensor {
            shape,
            data: Arc::clone(&t.data),
        }
    }

    fn linear(&self, op: contract::Linear<'_, CpuTensor>) -> Result<CpuTensor> {
        linear::linear(op)
    }

    fn conv2d(&self, op: contract::Conv2d<'_, CpuTensor>) -> Result<CpuTensor> {
        conv::conv2d(op)
    }

    fn group_norm(&self, op: contract::GroupNorm<'_, CpuTensor>) -> Result<CpuTensor> {
        norm::group_norm(op)
    }

    fn layer_norm(&self, op: contract::LayerNorm<'_, CpuTensor>) -> Result<CpuTensor> {
        norm::layer_norm(op)
    }

    fn attention(&self, op: contract::Attention<'_, CpuTensor>) -> Result<CpuTensor> {
        attention::attention(op)
    }

    fn geglu(&self, op: contract::Geglu<'_, CpuTensor>) -> Result<CpuTensor> {
        Ok(elementwise::geglu(op))
    }

    fn gelu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(elementwise::map(x, math::gelu))
    }

    fn silu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(elementwise::map(x, math::silu))
    }

    fn add(&self, op: contract::Add<'_, CpuTensor>) -> Result<CpuTensor> {
        Ok(elementwise::add(op))
    }

    fn add_per_channel(&self, op: contract::AddPerChannel<'_, CpuTensor>) -> Result<CpuTensor> {
        Ok(elementwise::add_per_channel(op))
    }

    fn upsample_nearest(&self, op: contract::UpsampleNearest<'_, CpuTensor>) -> Result<CpuTensor> {
        Ok(elementwise::upsample_nearest(op))
    }

    fn pad(&self, op: contract::Pad<'_, CpuTensor>) -> Result<CpuTensor> {
        Ok(elementwise::pad(op))
    }

    fn concat_channels(&self, op: contract::ConcatChannels<'_, CpuTensor>) -> Result<CpuTensor> {
        Ok(elementwise::concat_channels(op))
    }

    fn embedding(&self, op: contract::Embedding<'_, CpuTensor>) -> Result<CpuTensor> {
        Ok(elementwise::embedding(op))
    }
}

/// Shared helpers for the tests of every file: a deterministic PRNG, tensor builders and the
/// stated tolerance `|got − ref| ≤ 1e-4 · (1 + |ref|)`.
#[cfg(test)]
pub(crate) mod testutil {
    use super::CpuTensor;
    use crate::backend::Tensor;
    use crate::random::SeededRng;

    /// The crate's seeded generator, making CPU tensors.
    pub struct Rng(SeededRng);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(SeededRng::new(seed))
        }
        pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            self.0.values(n, scale)
        }
        pub fn tensor(&mut self, shape: &[usize], scale: f32) -> CpuTensor {
            let n = shape.iter().product();
            CpuTensor::new(shape.to_vec(), self.vec(n, scale)).unwrap()
        }
    }

    /// Asserts `|got − want| ≤ 1e-4 · (1 + |want|)` everywhere, that nothing is NaN/Inf, and that
    /// the reference is not trivially zero.
    #[track_caller]
    pub fn assert_close(what: &str, got: &CpuTensor, want_shape: &[usize], want: &[f64]) {
        assert_eq!(got.shape(), want_shape, "{what}: shape");
        assert_eq!(got.data().len(), want.len(), "{what}: length");
        assert!(
            want.iter().any(|w| w.abs() > 1e-3),
            "{what}: reference is all zeros, the test proves nothing"
        );
        let mut worst = (0.0f64, 0usize);
        for (i, (&g, &w)) in got.data().iter().zip(want).enumerate() {
            assert!(g.is_finite(), "{what}: non-finite output {g} at {i}");
            let excess = (g as f64 - w).abs() / (1.0 + w.abs());
            if excess > worst.0 {
                worst = (excess, i);
            }
        }
        let i = worst.1;
        assert!(
            worst.0 <= 1e-4,
            "{what}: at {i} got {} want {} (scaled error {:.3e} > 1e-4)",
            got.data()[i],
            want[i],
            worst.0
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::testutil::Rng;
    use super::{CpuBackend, CpuTensor};
    use crate::backend::{Backend, Tensor};
    use crate::tensor::HostTensor;

    #[test]
    fn upload_download_reshape_roundtrip() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(1);
        let host = HostTensor::new(vec![2, 3, 5], rng.vec(30, 1.0)).unwrap();
        let t = be.upload(&host).unwrap();
        assert_eq!(t.shape(), &[2, 3, 5]);
        assert_eq!(be.download(&t).unwrap(), host);
        let r = be.reshape(&t, &[6, 5]).unwrap();
        assert_eq!(r.shape(), &[6, 5]);
        assert_eq!(r.data(), host.data.as_slice());
        assert!(Arc::ptr_eq(&r.data, &t.data), "reshape must not copy");
        assert!(be.reshape(&t, &[7, 5]).is_err());
        assert!(be.reshape(&t, &[usize::MAX, 2]).is_err());
        assert!(be.describe().starts_with("cpu ("));
    }

    #[test]
    fn inconsistent_host_tensor_is_rejected() {
        let be = CpuBackend::new();
        let bad = HostTensor {
            shape: vec![2, 2],
            data: vec![1.0; 3],
        };
        assert!(be.upload(&bad).is_err());
        assert!(CpuTensor::new(vec![3], vec![1.0; 4]).is_err());
    }
}

/// Timings at SD 2.1 shapes (not a test: prints, asserts nothing about time).
/// `cargo test --release --lib backend::cpu -- --ignored --nocapture`
#[cfg(test)]
mod timing {
    use std::time::Instant;

    use super::testutil::Rng;
    use super::CpuBackend;
    use crate::backend::{Activation, Backend, Mask};

    fn time<T>(what: &str, flop: f64, f: impl Fn() -> T) {
        f(); // warm-up (page faults, gemm's thread-local buffers)
        let runs = 3;
        let t = Instant::now();
        for _ in 0..runs {
            std::hint::black_box(f());
        }
        let s = t.elapsed().as_secs_f64() / runs as f64;
        println!(
            "{what}: {:.1} ms, {:.1} GFLOP/s ({} threads)",
            s * 1e3,
            flop / s / 1e9,
            rayon::current_num_threads()
        );
    }

    #[test]
    #[ignore]
    fn sd_shapes() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(99);
        let x = rng.tensor(&[2, 64, 64, 320], 1.0);
        let w = rng.tensor(&[320, 3, 3, 320], 0.05);
        let b = rng.tensor(&[320], 1.0);
        let conv_flop = 2.0 * (2 * 64 * 64) as f64 * 320.0 * (9 * 320) as f64;
        time("conv3x3 [2,64,64,320]→320", conv_flop, || {
            be.conv2d(&x, &w, Some(&b), 1, 1, None).unwrap()
        });
        let w1 = rng.tensor(&[320, 1, 1, 320], 0.05);
        time("conv1x1 [2,64,64,320]→320", conv_flop / 9.0, || {
            be.conv2d(&x, &w1, Some(&b), 1, 1, None).unwrap()
        });
        let q = rng.tensor(&[2, 4096, 320], 1.0);
        let k = rng.tensor(&[2, 4096, 320], 1.0);
        let v = rng.tensor(&[2, 4096, 320], 1.0);
        let attn_flop = 4.0 * 2.0 * 4096.0 * 4096.0 * 320.0;
        time("attention [2,4096,320] 5 heads", attn_flop, || {
            be.attention(&q, &k, &v, 5, Mask::None).unwrap()
        });
        let ctx = rng.tensor(&[2, 77, 320], 1.0);
        time(
            "cross-attention [2,4096,320]×77",
            attn_flop * 77.0 / 4096.0,
            || be.attention(&q, &ctx, &ctx, 5, Mask::None).unwrap(),
        );
        let gamma = rng.tensor(&[320], 1.0);
        time("group_norm+silu [2,64,64,320]/32", 0.0, || {
            be.group_norm(&x, 32, &gamma, &b, 1e-5, Activation::Silu)
                .unwrap()
        });
        let h = rng.tensor(&[2, 4096, 2560], 1.0);
        time("geglu [2,4096,2560]", 0.0, || be.geglu(&h).unwrap());
        let wl = rng.tensor(&[2560, 320], 0.05);
        let xl = rng.tensor(&[2, 4096, 320], 1.0);
        time(
            "linear [8192,320]→2560",
            2.0 * 8192.0 * 320.0 * 2560.0,
            || be.linear(&xl, &wl, None).unwrap(),
        );
    }
}

//! `linear` through cuBLAS: one `cublasGemmEx` (f16 in and out, f32 compute) then the bias kernel.
//!
//! Row-major trick: cuBLAS is column-major, and a row-major `[R, C]` matrix read column-major is
//! its transpose `[C, R]`. We want `out [M, N] = x [M, K] · Wᵀ` with `W [N, K]`; column-major that
//! is `outᵀ [N, M] = W·xᵀ`, i.e. `C = op(A)·B` with A = W seen as `[K, N]` (so `transa = T`,
//! lda = K), B = x seen as `[K, M]` (`transb = N`, ldb = K), C = out seen as `[N, M]` (ldc = N).

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use half::f16;

use super::backend::{CudaBackend, CudaTensor};
use super::elementwise::bias_add_inplace;
use super::kernels::{driver_error, to_i32};
use crate::{Error, Result};

/// `x [.., K] · weightᵀ [K, N] + bias [N]` → `[.., N]`; `weight` is `[N, K]`.
pub(super) fn linear(
    be: &CudaBackend,
    x: &CudaTensor,
    weight: &CudaTensor,
    bias: Option<&CudaTensor>,
) -> Result<CudaTensor> {
    const OP: &str = "linear";
    let (m, k) = x.rows_and_last(OP, "x")?;
    let [n, wk] = weight.shape[..] else {
        return Err(Error::shape(
            OP,
            format!("weight must be [N, K], got {:?}", weight.shape),
        ));
    };
    if wk != k {
        return Err(Error::shape(
            OP,
            format!(
                "x {:?} has K = {k} but weight {:?} has K = {wk}",
                x.shape, weight.shape
            ),
        ));
    }
    if let Some(b) = bias {
        b.expect_shape(OP, "bias", &[n])?;
    }
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("checked non-empty") = n;
    let total = m
        .checked_mul(n)
        .ok_or_else(|| Error::InvalidArgument(format!("{OP}: output {shape:?} is too large")))?;
    let mut out = be.alloc_f16(OP, total)?;
    if total == 0 {
        return Ok(CudaTensor::new(shape, out));
    }
    if k == 0 {
        // An empty sum: zeros (plus the bias below).
        be.stream
            .memset_zeros(&mut out)
            .map_err(driver_error("zeroing a linear output"))?;
    } else {
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: to_i32(OP, "N", n)?,
            n: to_i32(OP, "rows", m)?,
            k: to_i32(OP, "K", k)?,
            alpha: f16::ONE,
            lda: to_i32(OP, "K", k)?,
            ldb: to_i32(OP, "K", k)?,
            beta: f16::ZERO,
            ldc: to_i32(OP, "N", n)?,
        };
        // cuBLAS uses the calling thread's current context.
        be.ctx
            .bind_to_thread()
            .map_err(driver_error("binding the context"))?;
        // SAFETY: column-major view (module comment): A = weight holds N·K f16 read as [K, N]
        // with lda = K; B = x holds M·K read as [K, M] with ldb = K; C = out holds M·N written
        // as [N, M] with ldc = N. All on the backend's stream, which owns the handle.
        unsafe {
            be.blas
                .gemm(cfg, weight.data.as_ref(), x.data.as_ref(), &mut out)
        }
        .map_err(|e| {
            Error::Backend(format!(
                "cuBLAS gemm for linear {:?} · {:?}ᵀ failed: {e}",
                x.shape, weight.shape
            ))
        })?;
        be.after_launch("cublasGemmEx")?;
    }
    if let Some(b) = bias {
        bias_add_inplace(be, &mut out, b)?;
    }
    Ok(CudaTensor::new(shape, out))
}

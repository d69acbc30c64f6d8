//! `linear` through cuBLAS. With a bias: one `cublasLtMatmul` whose epilogue adds the bias (f16 in
//! and out, f32 compute), so the output is written once; where cuBLASLt has no algorithm for a
//! shape, or no bias is given, one `cublasGemmEx` (then the bias kernel).
//!
//! Row-major trick: cuBLAS is column-major, and a row-major `[R, C]` matrix read column-major is
//! its transpose `[C, R]`. We want `out [M, N] = x [M, K] · Wᵀ` with `W [N, K]`; column-major that
//! is `outᵀ [N, M] = W·xᵀ`, i.e. `C = op(A)·B` with A = W seen as `[K, N]` (so `transa = T`,
//! lda = K), B = x seen as `[K, M]` (`transb = N`, ldb = K), C = out seen as `[N, M]` (ldc = N).

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::cublaslt::{Matmul, MatmulConfig};
use half::f16;

use super::backend::{CudaBackend, CudaTensor};
use super::elementwise::bias_add_inplace;
use super::kernels::{driver_error, to_i32};
use crate::backend::contract::Linear;
use crate::{Error, Result};

/// `x [.., K] · weightᵀ [K, N] + bias [N]` → `[.., N]`; `weight` is `[N, K]`. With a bias, the
/// cuBLASLt bias epilogue when it has an algorithm for the shape (see [`linear_bias_epilogue`]),
/// else GemmEx and the bias kernel; the first fallback is logged.
pub(super) fn linear(be: &CudaBackend, op: Linear<'_, CudaTensor>) -> Result<CudaTensor> {
    const OP: &str = "linear";
    let (x, weight, bias) = (op.x, op.weight, op.bias);
    let (m, k, n) = (op.rows, op.k, op.n);
    if let Some(b) = bias {
        if k > 0 && m * n > 0 {
            match linear_bias_epilogue(be, &op, b)? {
                Ok(out) => return Ok(out),
                Err(why) => be.note_bias_epilogue_fallback(&why),
            }
        }
    }
    let mut out = be.alloc_f16(OP, m * n)?;
    if m * n == 0 {
        return Ok(CudaTensor::new(op.out_shape, out));
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
    Ok(CudaTensor::new(op.out_shape, out))
}

/// `x · weightᵀ + bias` in one `cublasLtMatmul` with the `CUBLASLT_EPILOGUE_BIAS` epilogue (the
/// bias is one value per row of the column-major C = outᵀ, i.e. per output feature). `Ok(Err(why))`
/// when cuBLASLt is missing, refuses the shape or has no algorithm for it (the caller falls back);
/// `Err` on allocation or (debug mode) launch failures.
pub(super) fn linear_bias_epilogue(
    be: &CudaBackend,
    op: &Linear<'_, CudaTensor>,
    bias: &CudaTensor,
) -> Result<std::result::Result<CudaTensor, String>> {
    const OP: &str = "linear (cuBLASLt bias epilogue)";
    let (x, weight) = (op.x, op.weight);
    let Some(lt) = be.blas_lt.as_ref() else {
        return Ok(Err("cuBLASLt is not loaded".into()));
    };
    let (m, k, n) = (op.rows, op.k, op.n);
    if m * n * k == 0 {
        return Ok(Err(format!(
            "empty product {:?} · {:?}ᵀ",
            x.shape, weight.shape
        )));
    }
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: k as i64,
        ldb: k as i64,
        beta: 0.0,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    let mut out = be.alloc_f16(OP, m * n)?;
    be.ctx
        .bind_to_thread()
        .map_err(driver_error("binding the context"))?;
    // SAFETY: the same column-major view as GemmEx in `linear` (module comment): A = weight
    // [K, N] with lda = K, transposed; B = x [K, M] with ldb = K; C = D = out [N, M] with
    // ldc = N, every buffer holding exactly that many f16; the bias holds N f16, one per row of
    // C. beta = 0, so C's uninitialised contents are never read. All on the handle's stream.
    let launched = unsafe {
        lt.matmul(
            cfg,
            weight.data.as_ref(),
            x.data.as_ref(),
            &mut out,
            Some(bias.data.as_ref()),
            None,
        )
    };
    if let Err(e) = launched {
        return Ok(Err(format!(
            "cublasLtMatmul for {:?} · {:?}ᵀ + bias: {e}",
            x.shape, weight.shape
        )));
    }
    be.after_launch("cublasLtMatmul")?;
    Ok(Ok(CudaTensor::new(op.out_shape.clone(), out)))
}

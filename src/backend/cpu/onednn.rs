//! oneDNN's `dnnl_sgemm`: the CPU backend's GEMM when the build linked libdnnl (`sd21_onednn`).
//!
//! oneDNN's AVX-512 (and AVX2) f32 kernels run well ahead of the `gemm` crate's on stable Rust,
//! whose AVX-512 kernels need nightly (bench/results/2026-12-04-kernels-onednn-vs-gemm-crate.txt).
//! Debian builds it on OpenMP, whose team size is a per-thread setting: each call sets it to the
//! rayon pool's size for one large product, or to one inside a rayon task, so the two pools never
//! oversubscribe the cores.

use std::os::raw::{c_char, c_int};

use super::gemm::{MatRef, Par};

/// oneDNN's status code for success (`dnnl_success`).
const DNNL_SUCCESS: c_int = 0;

unsafe extern "C" {
    /// Row-major `C = alpha·op(A)·op(B) + beta·C` (oneDNN's `dnnl.h`); returns a `dnnl_status_t`.
    fn dnnl_sgemm(
        transa: c_char,
        transb: c_char,
        m: i64,
        n: i64,
        k: i64,
        alpha: f32,
        a: *const f32,
        lda: i64,
        b: *const f32,
        ldb: i64,
        beta: f32,
        c: *mut f32,
        ldc: i64,
    ) -> c_int;
    /// The OpenMP team size for parallel regions started by the calling thread (libgomp).
    fn omp_set_num_threads(n: c_int);
}

/// How BLAS reads a strided view: `'N'` (row-major, row stride `ld`) or `'T'` (the transpose of a
/// row-major matrix with row stride `ld`). `None` when neither stride is 1 where it matters.
fn layout(rows: usize, cols: usize, view: MatRef<'_>) -> Option<(c_char, i64)> {
    // A single row (column) never steps by its row (column) stride, so any value works there.
    let rs = if rows <= 1 { cols.max(1) } else { view.rs };
    let cs = if cols <= 1 { rows.max(1) } else { view.cs };
    if (view.cs == 1 || cols <= 1) && rs >= cols.max(1) {
        Some((b'N' as c_char, i64::try_from(rs).ok()?))
    } else if (view.rs == 1 || rows <= 1) && cs >= rows.max(1) {
        Some((b'T' as c_char, i64::try_from(cs).ok()?))
    } else {
        None
    }
}

/// `dst = (accumulate ? dst : 0) + scale · lhs · rhs` through oneDNN, or `None` when a view's
/// strides are not a BLAS layout (the caller then uses the `gemm` crate). The caller has checked
/// every view against its storage (`gemm::matmul`) and that `dst` rows do not overlap.
#[allow(clippy::too_many_arguments)]
pub(super) fn sgemm(
    dst: &mut [f32],
    dst_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    accumulate: bool,
    scale: f32,
    par: Par,
) -> Option<Result<(), c_int>> {
    let (transa, lda) = layout(m, k, lhs)?;
    let (transb, ldb) = layout(k, n, rhs)?;
    let dims = (i64::try_from(m), i64::try_from(n), i64::try_from(k));
    let (Ok(m), Ok(n), Ok(k), Ok(ldc)) = (dims.0, dims.1, dims.2, i64::try_from(dst_rs)) else {
        return None;
    };
    let team = match par {
        Par::Rayon => rayon::current_num_threads(),
        Par::Sequential => 1,
    };
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: the caller checked that every element `(r, c)` of `lhs` (m×k), `rhs` (k×n) and
    // `dst` (m×n, row stride `dst_rs ≥ n`) lies inside its slice; `layout` maps each view to the
    // BLAS layout that addresses exactly those elements, with a leading dimension ≥ the row
    // length BLAS requires. `dst` is a unique borrow, so it aliases neither operand. With
    // beta = 0 oneDNN writes `dst` without reading it. `omp_set_num_threads` only changes the
    // calling thread's OpenMP setting.
    let status = unsafe {
        omp_set_num_threads(c_int::try_from(team).unwrap_or(1));
        dnnl_sgemm(
            transa,
            transb,
            m,
            n,
            k,
            scale,
            lhs.data.as_ptr(),
            lda,
            rhs.data.as_ptr(),
            ldb,
            beta,
            dst.as_mut_ptr(),
            ldc,
        )
    };
    Some(if status == DNNL_SUCCESS {
        Ok(())
    } else {
        Err(status)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_follow_the_unit_stride() {
        let data = [0.0f32; 64];
        let row_major = MatRef::new(&data, 8, 1);
        let col_major = MatRef::new(&data, 1, 8);
        assert_eq!(layout(4, 5, row_major), Some((b'N' as c_char, 8)));
        assert_eq!(layout(4, 5, col_major), Some((b'T' as c_char, 8)));
        // Row stride shorter than a row: not a BLAS layout.
        assert_eq!(layout(4, 9, row_major), None);
        // Neither stride is 1.
        assert_eq!(layout(4, 5, MatRef::new(&data, 8, 2)), None);
        // One row: its row stride is never used.
        assert_eq!(
            layout(1, 5, MatRef::new(&data, 0, 1)),
            Some((b'N' as c_char, 5))
        );
        // One column with a column stride of 3 (never used): the transpose reading.
        assert_eq!(
            layout(4, 1, MatRef::new(&data, 1, 3)),
            Some((b'N' as c_char, 1))
        );
    }
}

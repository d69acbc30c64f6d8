//! The CPU backend's one matrix product: a safe, bounds-checked f32 GEMM over strided views, so
//! callers multiply them (a linear weight `[N, K]` read as `Kᵀ`, one head's channels of
//! `[B, N, H·D]`) without copying. oneDNN's sgemm does it when the build linked it and each view
//! has a unit stride (`onednn.rs`); the `gemm` crate does every other product, any strides.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::{Error, Result};

/// The library that does the backend's products (what `describe` reports).
pub(super) const LIBRARY: &str = if cfg!(sd21_onednn) {
    "oneDNN sgemm"
} else {
    "gemm crate"
};

/// A read-only strided matrix view: element `(r, c)` is `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    pub fn new(data: &'a [f32], rs: usize, cs: usize) -> Self {
        MatRef { data, rs, cs }
    }
}

/// Whether the calling code wants `gemm` to use the rayon pool itself (one big product) or to run
/// on the calling thread (the caller already parallelises over independent products).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Par {
    Rayon,
    Sequential,
}

/// Checks that every index `(r, c)` with `r < rows`, `c < cols` of a strided view lies inside a
/// slice of `len` elements.
fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1)
        .checked_mul(rs)
        .and_then(|a| (cols - 1).checked_mul(cs).and_then(|b| a.checked_add(b)));
    matches!(last, Some(i) if i < len) && isize::try_from(rs).is_ok() && isize::try_from(cs).is_ok()
}

/// `dst[m, n] (row stride dst_rs, unit column stride) = (accumulate ? dst : 0) + scale · lhs[m, k] · rhs[k, n]`.
///
/// Out-of-bounds views are an internal bug, reported as `Error::Backend` rather than undefined
/// behaviour.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
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
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    // Rows of `dst` must not overlap (dst_rs ≥ n), or parallel writes inside gemm would race.
    if dst_rs < n || !fits(dst.len(), m, n, dst_rs, 1) {
        return Err(Error::Backend(format!(
            "matmul: destination view {m}×{n} (row stride {dst_rs}) exceeds {} elements",
            dst.len()
        )));
    }
    if !fits(lhs.data.len(), m, k, lhs.rs, lhs.cs) || !fits(rhs.data.len(), k, n, rhs.rs, rhs.cs) {
        return Err(Error::Backend(format!(
            "matmul: operand views exceed their storage (m={m}, n={n}, k={k}, lhs {} elements, rhs {} elements)",
            lhs.data.len(),
            rhs.data.len()
        )));
    }
    #[cfg(sd21_onednn)]
    if let Some(done) = super::onednn::sgemm(dst, dst_rs, m, n, k, lhs, rhs, accumulate, scale, par)
    {
        return done.map_err(|status| {
            Error::Backend(format!(
                "matmul: oneDNN sgemm failed with status {status} (m={m}, n={n}, k={k})"
            ))
        });
    }
    let parallelism = match par {
        Par::Rayon => Parallelism::Rayon(0),
        Par::Sequential => Parallelism::None,
    };
    // SAFETY: `fits` checked that every element gemm reads (`lhs` for r < m, c < k; `rhs` for
    // r < k, c < n) and writes (`dst` for r < m, c < n) lies inside its slice, and that every stride
    // fits in `isize`. `dst` is borrowed mutably, so it cannot alias `lhs`/`rhs` (shared borrows),
    // and `dst_rs ≥ n` with unit column stride makes distinct (r, c) distinct elements, so gemm's
    // parallel tiles never write the same location. With `accumulate == false`, gemm does not read
    // `dst` (alpha is ignored), so its prior contents do not matter.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// Output buffer `[rows, n]` pre-filled with `residual + bias` (either optional); returns whether
/// the GEMM must accumulate into it.
pub(super) fn init_output(
    rows: usize,
    n: usize,
    bias: Option<&super::CpuTensor>,
    residual: Option<&super::CpuTensor>,
) -> (Vec<f32>, bool) {
    let mut out = vec![0.0f32; rows * n];
    if n == 0 || (bias.is_none() && residual.is_none()) {
        return (out, false);
    }
    out.par_chunks_mut(n).enumerate().for_each(|(r, o)| {
        if let Some(res) = residual {
            o.copy_from_slice(&res.data()[r * n..][..n]);
        }
        if let Some(b) = bias {
            o.iter_mut().zip(b.data()).for_each(|(o, b)| *o += b);
        }
    });
    (out, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `0.5 + 2·lhs·rhs` in f64 for a 3×4 product of 5-deep views, checked with `dst` rows padded
    /// to 6 (padding untouched).
    fn check_strided(lrs: usize, lcs: usize, rrs: usize, rcs: usize, accumulate: bool) {
        let (m, n, k) = (3, 4, 5);
        let lhs: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin()).collect();
        let rhs: Vec<f32> = (0..60).map(|i| (i as f32 * 0.71).cos()).collect();
        // Without accumulation the prior contents (NaN here) must not leak into the product.
        let start = if accumulate { 0.5 } else { f32::NAN };
        let mut dst = vec![start; 3 * 6];
        let (lv, rv) = (MatRef::new(&lhs, lrs, lcs), MatRef::new(&rhs, rrs, rcs));
        for par in [Par::Sequential, Par::Rayon] {
            dst.chunks_mut(6).for_each(|row| row[..n].fill(start));
            matmul(&mut dst, 6, m, n, k, lv, rv, accumulate, 2.0, par).unwrap();
            for r in 0..m {
                for c in 0..n {
                    let dot: f64 = (0..k)
                        .map(|d| lhs[r * lrs + d * lcs] as f64 * rhs[d * rrs + c * rcs] as f64)
                        .sum();
                    let want = if accumulate { 0.5 } else { 0.0 } + 2.0 * dot;
                    let got = dst[r * 6 + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "({r},{c}) {got} vs {want}, {par:?}"
                    );
                }
                assert!(dst[r * 6 + n..r * 6 + 6]
                    .iter()
                    .all(|v| v.to_bits() == start.to_bits()));
            }
        }
    }

    #[test]
    fn strided_matmul_matches_naive() {
        // Column-major lhs inside a padded buffer × row-major rhs with padding (both BLAS layouts).
        check_strided(1, 7, 9, 1, true);
        check_strided(1, 7, 9, 1, false);
        // Row-major lhs × a transposed (column-major) rhs: the linear layer's `Kᵀ` reading.
        check_strided(7, 1, 1, 11, true);
        check_strided(7, 1, 1, 11, false);
        // No unit stride on rhs: not a BLAS layout, so always the `gemm` crate.
        check_strided(1, 7, 9, 2, true);
        check_strided(1, 7, 9, 2, false);
    }

    #[test]
    fn out_of_bounds_views_are_errors() {
        let a = vec![1.0f32; 6];
        let mut d = vec![0.0f32; 4];
        let view = MatRef::new(&a, 3, 1);
        // lhs 2×3 fits; rhs would need 3×2 with row stride 3 → last index 7 ≥ 6.
        assert!(matmul(&mut d, 2, 2, 2, 3, view, view, false, 1.0, Par::Sequential).is_err());
        // dst rows overlapping.
        assert!(matmul(&mut d, 1, 2, 2, 3, view, view, false, 1.0, Par::Sequential).is_err());
    }
}

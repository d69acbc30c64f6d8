//! Group norm (NHWC, optional fused SiLU) and layer norm.
//!
//! Statistics are two-pass in f64 (mean, then the mean of squared deviations), so they match
//! PyTorch to f32 rounding even when the mean is large against the spread. Group norm reads NHWC
//! rows once per pass: each rayon task takes a block of spatial rows of one image and accumulates
//! per-group partial sums for all groups at once (a task per (image, group) would stride through
//! the whole image for a tenth of its channels). The normalising pass is `x · scale + shift` with
//! per-(image, channel) `scale = γ·rstd`, `shift = β − mean·scale`, as PyTorch's CPU kernel does.

use std::sync::Arc;

use multiversion::multiversion;
use rayon::prelude::*;

use super::{math, CpuTensor};
use crate::backend::contract::{GroupNorm, LayerNorm};
use crate::backend::Activation;
use crate::Result;

/// Spatial rows per rayon task in the statistics passes.
const STAT_ROWS: usize = 64;

/// Per-group sums of `f(x)` over the rows of one image `[S, C]`.
fn group_sums(
    img: &[f32],
    c: usize,
    groups: usize,
    f: impl Fn(usize, f32) -> f64 + Sync,
) -> Vec<f64> {
    let cg = c / groups;
    img.par_chunks(STAT_ROWS * c)
        .map(|block| {
            let mut acc = vec![0.0f64; groups];
            for row in block.chunks_exact(c) {
                for (g, (vals, acc)) in row.chunks_exact(cg).zip(acc.iter_mut()).enumerate() {
                    *acc += vals.iter().map(|&v| f(g, v)).sum::<f64>();
                }
            }
            acc
        })
        .reduce(
            || vec![0.0f64; groups],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// `o = x · scale + shift`, then SiLU if asked, for one row of channels. Compiled also for AVX2
/// and AVX-512 and picked at run time (the same arithmetic, so the same bits; the SiLU's `exp`
/// vectorises 2–4× wider).
#[multiversion(targets = "simd")]
fn normalize_row(o: &mut [f32], x: &[f32], scale: &[f32], shift: &[f32], silu: bool) {
    for (((o, &x), &sc), &sh) in o.iter_mut().zip(x).zip(scale).zip(shift) {
        *o = x * sc + sh;
    }
    if silu {
        o.iter_mut().for_each(|v| *v = math::silu(*v));
    }
}

pub(super) fn group_norm(op: GroupNorm<'_, CpuTensor>) -> Result<CpuTensor> {
    let (x, gamma, beta, groups, eps) = (op.x, op.gamma, op.beta, op.groups, op.eps);
    let (batch, c) = (op.batch, op.channels);
    let silu = op.activation == Activation::Silu;
    let mut out = vec![0.0f32; x.numel()];
    if x.numel() == 0 {
        return Ok(CpuTensor {
            shape: x.shape.clone(),
            data: Arc::new(out),
        });
    }
    let s = op.spatial; // spatial positions per image
    let cg = c / groups;
    let count = (s * cg) as f64;

    // Per (image, channel) affine coefficients.
    let mut scale = vec![0.0f32; batch * c];
    let mut shift = vec![0.0f32; batch * c];
    for bi in 0..batch {
        let img = &x.data()[bi * s * c..][..s * c];
        let mean: Vec<f64> = group_sums(img, c, groups, |_, v| v as f64)
            .into_iter()
            .map(|sum| sum / count)
            .collect();
        let var = group_sums(img, c, groups, |g, v| {
            let d = v as f64 - mean[g];
            d * d
        });
        for ch in 0..c {
            let g = ch / cg;
            let rstd = 1.0 / (var[g] / count + eps as f64).sqrt();
            let sc = gamma.data()[ch] as f64 * rstd;
            scale[bi * c + ch] = sc as f32;
            shift[bi * c + ch] = (beta.data()[ch] as f64 - mean[g] * sc) as f32;
        }
    }

    out.par_chunks_mut(c)
        .zip(x.data().par_chunks(c))
        .enumerate()
        .for_each(|(row, (o, xr))| {
            let bi = row / s;
            normalize_row(o, xr, &scale[bi * c..][..c], &shift[bi * c..][..c], silu);
        });
    Ok(CpuTensor {
        shape: x.shape.clone(),
        data: Arc::new(out),
    })
}

pub(super) fn layer_norm(op: LayerNorm<'_, CpuTensor>) -> Result<CpuTensor> {
    let (x, gamma, beta, eps, c) = (op.x, op.gamma, op.beta, op.eps, op.channels);
    let mut out = vec![0.0f32; x.numel()];
    if c > 0 {
        let (g, bt) = (gamma.data(), beta.data());
        out.par_chunks_mut(c)
            .zip(x.data().par_chunks(c))
            .for_each(|(o, xr)| {
                let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
                let var = xr
                    .iter()
                    .map(|&v| {
                        let d = v as f64 - mean;
                        d * d
                    })
                    .sum::<f64>()
                    / c as f64;
                let rstd = (1.0 / (var + eps as f64).sqrt()) as f32;
                let mean = mean as f32;
                for (((o, &x), &g), &b) in o.iter_mut().zip(xr).zip(g).zip(bt) {
                    *o = (x - mean) * rstd * g + b;
                }
            });
    }
    Ok(CpuTensor {
        shape: x.shape.clone(),
        data: Arc::new(out),
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_close, Rng};
    use super::super::{CpuBackend, CpuTensor};
    use crate::backend::{Activation, Backend, Tensor};

    /// Naive group norm over `[B, S, C]` in f64.
    fn group_norm_ref(
        x: &CpuTensor,
        groups: usize,
        gamma: &[f32],
        beta: &[f32],
        eps: f64,
        activation: Activation,
    ) -> Vec<f64> {
        let shape = x.shape();
        let (b, c) = (shape[0], shape[shape.len() - 1]);
        let s = x.numel() / b / c;
        let cg = c / groups;
        let xd = x.data();
        let mut out = vec![0.0f64; x.numel()];
        for bi in 0..b {
            for g in 0..groups {
                let idx = |p: usize, j: usize| (bi * s + p) * c + g * cg + j;
                let n = (s * cg) as f64;
                let mut mean = 0.0;
                for p in 0..s {
                    for j in 0..cg {
                        mean += xd[idx(p, j)] as f64;
                    }
                }
                mean /= n;
                let mut var = 0.0;
                for p in 0..s {
                    for j in 0..cg {
                        var += (xd[idx(p, j)] as f64 - mean).powi(2);
                    }
                }
                var /= n;
                for p in 0..s {
                    for j in 0..cg {
                        let ch = g * cg + j;
                        let mut y = (xd[idx(p, j)] as f64 - mean) / (var + eps).sqrt()
                            * gamma[ch] as f64
                            + beta[ch] as f64;
                        if activation == Activation::Silu {
                            y /= 1.0 + (-y).exp();
                        }
                        out[idx(p, j)] = y;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn group_norm_matches_reference() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(21);
        // (shape, groups): several channels per group, odd spatial sizes, batch 1 and 2,
        // more spatial rows than one statistics block, 1 group, 1 channel per group, no spatial dims.
        let cases: [(&[usize], usize); 6] = [
            (&[2, 5, 7, 12], 4),
            (&[1, 9, 11, 30], 3),
            (&[2, 13, 11, 6], 1),
            (&[1, 3, 3, 5], 5),
            (&[2, 77, 10], 2),
            (&[2, 8], 4),
        ];
        for (shape, groups) in cases {
            let c = shape[shape.len() - 1];
            // An offset mean makes a one-pass E[x²] − E[x]² formula lose precision.
            let mut x = rng.tensor(shape, 2.0);
            x = CpuTensor::new(
                x.shape().to_vec(),
                x.data().iter().map(|v| v + 3.0).collect(),
            )
            .unwrap();
            let gamma = rng.tensor(&[c], 1.5);
            let beta = rng.tensor(&[c], 1.0);
            for activation in [Activation::None, Activation::Silu] {
                let got = be
                    .group_norm(&x, groups, &gamma, &beta, 1e-5, activation)
                    .unwrap();
                let want = group_norm_ref(&x, groups, gamma.data(), beta.data(), 1e-5, activation);
                assert_close(
                    &format!("group_norm {shape:?}/{groups} {activation:?}"),
                    &got,
                    shape,
                    &want,
                );
            }
        }
    }

    #[test]
    fn norms_apply_eps() {
        // Variance ≈ 3e-7 against eps 1e-6: dropping or misplacing eps changes the output by ~50%.
        let be = CpuBackend::new();
        let mut rng = Rng::new(24);
        let x = rng.tensor(&[2, 5, 3, 8], 1e-3);
        let gamma = rng.tensor(&[8], 1.0);
        let beta = rng.tensor(&[8], 1.0);
        let got = be
            .group_norm(&x, 2, &gamma, &beta, 1e-6, Activation::None)
            .unwrap();
        let want = group_norm_ref(&x, 2, gamma.data(), beta.data(), 1e-6, Activation::None);
        assert_close("group_norm small variance", &got, x.shape(), &want);
        let got = be.layer_norm(&x, &gamma, &beta, 1e-6).unwrap();
        let mut want = Vec::new();
        for row in x.data().chunks(8) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / 8.0;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 8.0;
            for (j, &v) in row.iter().enumerate() {
                want.push(
                    (v as f64 - mean) / (var + 1e-6).sqrt() * gamma.data()[j] as f64
                        + beta.data()[j] as f64,
                );
            }
        }
        assert_close("layer_norm small variance", &got, x.shape(), &want);
    }

    #[test]
    fn group_norm_rejects_bad_arguments() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(22);
        let x = rng.tensor(&[1, 4, 4, 12], 1.0);
        let g = rng.tensor(&[12], 1.0);
        assert!(
            be.group_norm(&x, 5, &g, &g, 1e-5, Activation::None)
                .is_err(),
            "12 % 5"
        );
        assert!(
            be.group_norm(&x, 0, &g, &g, 1e-5, Activation::None)
                .is_err(),
            "0 groups"
        );
        let g11 = rng.tensor(&[11], 1.0);
        assert!(be
            .group_norm(&x, 4, &g11, &g, 1e-5, Activation::None)
            .is_err());
        assert!(be
            .group_norm(&x, 4, &g, &g11, 1e-5, Activation::None)
            .is_err());
        assert!(
            be.group_norm(&g, 4, &g, &g, 1e-5, Activation::None)
                .is_err(),
            "1-D x"
        );
        assert!(
            be.group_norm(&x, 4, &g, &g, -1.0, Activation::None)
                .is_err(),
            "negative eps"
        );
        assert!(
            be.group_norm(&x, 4, &g, &g, f32::NAN, Activation::None)
                .is_err(),
            "NaN eps"
        );
        let empty = CpuTensor::new(vec![0, 4, 4, 12], vec![]).unwrap();
        assert_eq!(
            be.group_norm(&empty, 4, &g, &g, 1e-5, Activation::Silu)
                .unwrap()
                .shape(),
            &[0, 4, 4, 12]
        );
    }

    #[test]
    fn layer_norm_matches_reference() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(23);
        for shape in [&[2usize, 77, 37][..], &[1, 5, 64], &[9]] {
            let c = shape[shape.len() - 1];
            let x = CpuTensor::new(
                shape.to_vec(),
                rng.vec(shape.iter().product(), 3.0)
                    .iter()
                    .map(|v| v - 2.0)
                    .collect(),
            )
            .unwrap();
            let gamma = rng.tensor(&[c], 1.5);
            let beta = rng.tensor(&[c], 1.0);
            let got = be.layer_norm(&x, &gamma, &beta, 1e-5).unwrap();
            let mut want = Vec::new();
            for row in x.data().chunks(c) {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
                for (j, &v) in row.iter().enumerate() {
                    want.push(
                        (v as f64 - mean) / (var + 1e-5).sqrt() * gamma.data()[j] as f64
                            + beta.data()[j] as f64,
                    );
                }
            }
            assert_close(&format!("layer_norm {shape:?}"), &got, shape, &want);
        }
        let x = rng.tensor(&[2, 5], 1.0);
        let g4 = rng.tensor(&[4], 1.0);
        let g5 = rng.tensor(&[5], 1.0);
        assert!(be.layer_norm(&x, &g4, &g5, 1e-5).is_err());
        assert!(be.layer_norm(&x, &g5, &g4, 1e-5).is_err());
        let scalar = CpuTensor::new(vec![], vec![1.0]).unwrap();
        assert!(be.layer_norm(&scalar, &g5, &g5, 1e-5).is_err());
    }
}

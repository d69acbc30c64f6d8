//! Linear layers and 2-D convolutions: both are GEMMs against the weight read in place.
//!
//! `linear`: `x [M, K] · Wᵀ` where `W [N, K]` is viewed as a `[K, N]` matrix with strides (1, K), so
//! no transposed copy exists. The bias is written into the output first and the GEMM accumulates.
//!
//! `conv2d` (NHWC input, OHWI weight): the OHWI weight `[C_out, kH·kW·C_in]` is, read transposed,
//! exactly the `[K, N]` right-hand side of an im2col GEMM whose patch row for an output pixel is its
//! kH·kW input pixels' channel vectors in (ky, kx) order. A 1×1 stride-1 unpadded convolution needs
//! no patches (the NHWC input already is `[B·H·W, C_in]`). Everything else builds patch rows for a
//! block of output pixels at a time (at most `IM2COL_BUDGET` floats, whatever the image size),
//! filled in parallel, then runs one GEMM per block on the whole rayon pool. The output is
//! initialised with `residual + bias` and the GEMMs accumulate into it: bias and residual cost no
//! extra pass.

use std::sync::Arc;

use rayon::prelude::*;

use super::gemm::{matmul, MatRef, Par};
use super::{expect_shape, output_numel, rows_and_last, CpuTensor};
use crate::{Error, Result};

/// Most floats one im2col block may hold (16 MiB): bounds memory for the VAE at 768² (inputs of
/// 768·768·128 values) while keeping each GEMM large enough to use every core.
const IM2COL_BUDGET: usize = 4 << 20;

/// Output buffer `[rows, n]` pre-filled with `residual + bias` (either optional); returns whether
/// the GEMM must accumulate into it.
fn init_output(
    rows: usize,
    n: usize,
    bias: Option<&CpuTensor>,
    residual: Option<&CpuTensor>,
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

pub(super) fn linear(
    x: &CpuTensor,
    weight: &CpuTensor,
    bias: Option<&CpuTensor>,
) -> Result<CpuTensor> {
    const OP: &str = "linear";
    let (rows, k) = rows_and_last(OP, "x", x)?;
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
                "x {:?} has {k} features but weight {:?} expects {wk}",
                x.shape, weight.shape
            ),
        ));
    }
    if let Some(b) = bias {
        expect_shape(OP, "bias", b, &[n])?;
    }
    let mut shape = x.shape.clone();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    output_numel(OP, &shape)?; // rows · n fits (x [2⁴⁰, 0] with weight [2⁴⁰, 0] would not)
    let (mut out, accumulate) = init_output(rows, n, bias, None);
    matmul(
        &mut out,
        n,
        rows,
        n,
        k,
        MatRef::new(x.data(), k, 1),
        MatRef::new(weight.data(), 1, k),
        accumulate,
        1.0,
        Par::Rayon,
    )?;
    Ok(CpuTensor {
        shape,
        data: Arc::new(out),
    })
}

/// Output size of one spatial dimension, or an error when the kernel does not fit.
fn out_size(input: usize, kernel: usize, stride: usize, padding: usize) -> Result<usize> {
    let padded = padding
        .checked_mul(2)
        .and_then(|p| p.checked_add(input))
        .ok_or_else(|| Error::InvalidArgument(format!("conv2d: padding {padding} is too large")))?;
    if kernel == 0 || padded < kernel {
        return Err(Error::shape(
            "conv2d",
            format!("kernel {kernel} does not fit an input of {input} with padding {padding}"),
        ));
    }
    Ok((padded - kernel) / stride + 1)
}

pub(super) fn conv2d(
    x: &CpuTensor,
    weight: &CpuTensor,
    bias: Option<&CpuTensor>,
    stride: usize,
    padding: usize,
    residual: Option<&CpuTensor>,
) -> Result<CpuTensor> {
    const OP: &str = "conv2d";
    let [b, h, w, ci] = x.shape[..] else {
        return Err(Error::shape(
            OP,
            format!("x must be [B, H, W, C_in], got {:?}", x.shape),
        ));
    };
    let [co, kh, kw, wci] = weight.shape[..] else {
        return Err(Error::shape(
            OP,
            format!(
                "weight must be [C_out, kH, kW, C_in], got {:?}",
                weight.shape
            ),
        ));
    };
    if wci != ci {
        return Err(Error::shape(
            OP,
            format!(
                "x {:?} has {ci} channels but weight {:?} expects {wci}",
                x.shape, weight.shape
            ),
        ));
    }
    if stride == 0 {
        return Err(Error::InvalidArgument("conv2d: stride must be ≥ 1".into()));
    }
    let oh = out_size(h, kh, stride, padding)?;
    let ow = out_size(w, kw, stride, padding)?;
    let out_shape = vec![b, oh, ow, co];
    let m = output_numel(OP, &out_shape)? / co.max(1); // output pixels
    if let Some(bias) = bias {
        expect_shape(OP, "bias", bias, &[co])?;
    }
    if let Some(res) = residual {
        expect_shape(OP, "residual", res, &out_shape)?;
    }
    let k = kh * kw * ci; // ≤ weight.numel()
    let (mut out, accumulate) = init_output(m, co, bias, residual);
    let rhs = MatRef::new(weight.data(), 1, k);

    if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        // The NHWC input is already the [B·H·W, C_in] patch matrix.
        matmul(
            &mut out,
            co,
            m,
            co,
            k,
            MatRef::new(x.data(), k, 1),
            rhs,
            accumulate,
            1.0,
            Par::Rayon,
        )?;
    } else if k > 0 && co > 0 && m > 0 {
        let block = (IM2COL_BUDGET / k).clamp(1, m);
        let mut cols = vec![0.0f32; block * k];
        let xd = x.data();
        for m0 in (0..m).step_by(block) {
            let rows = block.min(m - m0);
            // Patch rows for output pixels m0 .. m0 + rows.
            cols[..rows * k]
                .par_chunks_mut(k)
                .enumerate()
                .for_each(|(i, patch)| {
                    let p = m0 + i;
                    let (bi, rem) = (p / (oh * ow), p % (oh * ow));
                    let (oy, ox) = (rem / ow, rem % ow);
                    for (ky, patch_row) in patch.chunks_exact_mut(kw * ci).enumerate() {
                        // Input row oy·s + ky − pad; outside the image it is zero padding.
                        let iy = (oy * stride + ky).checked_sub(padding).filter(|&iy| iy < h);
                        for (kx, dst) in patch_row.chunks_exact_mut(ci).enumerate() {
                            let ix = (ox * stride + kx).checked_sub(padding).filter(|&ix| ix < w);
                            match (iy, ix) {
                                (Some(iy), Some(ix)) => {
                                    dst.copy_from_slice(&xd[((bi * h + iy) * w + ix) * ci..][..ci])
                                }
                                _ => dst.fill(0.0),
                            }
                        }
                    }
                });
            matmul(
                &mut out[m0 * co..],
                co,
                rows,
                co,
                k,
                MatRef::new(&cols, k, 1),
                rhs,
                accumulate,
                1.0,
                Par::Rayon,
            )?;
        }
    }
    Ok(CpuTensor {
        shape: out_shape,
        data: Arc::new(out),
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_close, Rng};
    use super::super::{CpuBackend, CpuTensor};
    use crate::backend::Backend;

    #[test]
    fn linear_matches_reference() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(31);
        for (xs, n, with_bias) in [
            (&[2usize, 77, 37][..], 19usize, true),
            (&[1, 5, 64], 33, false),
            (&[3, 1], 7, true),
            (&[13], 5, true),
        ] {
            let k = xs[xs.len() - 1];
            let x = rng.tensor(xs, 1.0);
            let w = rng.tensor(&[n, k], 0.5);
            let bias = rng.tensor(&[n], 1.0);
            let got = be.linear(&x, &w, with_bias.then_some(&bias)).unwrap();
            let mut want = Vec::new();
            for row in x.data().chunks(k) {
                for j in 0..n {
                    let mut acc = if with_bias {
                        bias.data()[j] as f64
                    } else {
                        0.0
                    };
                    for (d, &xv) in row.iter().enumerate() {
                        acc += xv as f64 * w.data()[j * k + d] as f64;
                    }
                    want.push(acc);
                }
            }
            let mut out_shape = xs.to_vec();
            *out_shape.last_mut().unwrap() = n;
            assert_close(&format!("linear {xs:?}→{n}"), &got, &out_shape, &want);
        }
    }

    #[test]
    fn linear_rejects_bad_shapes() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(32);
        let x = rng.tensor(&[2, 3, 8], 1.0);
        assert!(be.linear(&x, &rng.tensor(&[4, 7], 1.0), None).is_err());
        assert!(be.linear(&x, &rng.tensor(&[4, 8, 1], 1.0), None).is_err());
        let w = rng.tensor(&[4, 8], 1.0);
        assert!(be.linear(&x, &w, Some(&rng.tensor(&[5], 1.0))).is_err());
        let scalar = CpuTensor::new(vec![], vec![1.0]).unwrap();
        assert!(be.linear(&scalar, &w, None).is_err());
        // K = 0 and empty batches are fine.
        let x0 = CpuTensor::new(vec![3, 0], vec![]).unwrap();
        let w0 = CpuTensor::new(vec![4, 0], vec![]).unwrap();
        let b = rng.tensor(&[4], 1.0);
        let y = be.linear(&x0, &w0, Some(&b)).unwrap();
        assert_eq!(y.data(), [b.data(), b.data(), b.data()].concat());
        let huge = CpuTensor::new(vec![1 << 40, 0], vec![]).unwrap();
        assert!(be.linear(&huge, &huge, None).is_err(), "2⁸⁰-element output");
        let xe = CpuTensor::new(vec![0, 8], vec![]).unwrap();
        assert_eq!(be.linear(&xe, &w, None).unwrap().shape(), &[0, 4]);
    }

    /// Direct convolution in f64: out[b, oy, ox, o] = bias[o] + residual + Σ x·w.
    #[allow(clippy::too_many_arguments)]
    fn conv_ref(
        x: &CpuTensor,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
        stride: usize,
        pad: usize,
        residual: Option<&CpuTensor>,
    ) -> (Vec<usize>, Vec<f64>) {
        let [b, h, wd, ci] = x.shape()[..] else {
            panic!()
        };
        let [co, kh, kw, _] = w.shape()[..] else {
            panic!()
        };
        let oh = (h + 2 * pad - kh) / stride + 1;
        let ow = (wd + 2 * pad - kw) / stride + 1;
        let mut out = Vec::new();
        for bi in 0..b {
            for oy in 0..oh {
                for ox in 0..ow {
                    for o in 0..co {
                        let mut acc = bias.map_or(0.0, |bs| bs.data()[o] as f64);
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * stride + ky) as isize - pad as isize;
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let (iy, ix) = (iy as usize, ix as usize);
                                for c in 0..ci {
                                    acc += x.data()[((bi * h + iy) * wd + ix) * ci + c] as f64
                                        * w.data()[((o * kh + ky) * kw + kx) * ci + c] as f64;
                                }
                            }
                        }
                        let idx = out.len();
                        if let Some(r) = residual {
                            acc += r.data()[idx] as f64;
                        }
                        out.push(acc);
                    }
                }
            }
        }
        (vec![b, oh, ow, co], out)
    }

    #[test]
    fn conv2d_matches_reference() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(33);
        // (x shape, C_out, k, stride, pad, bias, residual)
        type Case = ([usize; 4], usize, usize, usize, usize, bool, bool);
        let cases: &[Case] = &[
            ([2, 7, 9, 5], 6, 3, 1, 1, true, true), // 3×3 s1 p1, odd sizes, batch 2
            ([1, 7, 9, 12], 10, 3, 2, 1, true, false), // 3×3 s2 p1 on odd input (downsample)
            ([2, 8, 6, 3], 4, 3, 2, 1, false, true), // s2 on even input
            ([2, 5, 7, 9], 11, 1, 1, 0, true, true), // 1×1 fast path with residual
            ([1, 5, 7, 9], 3, 1, 1, 0, false, false), // 1×1 without epilogue
            ([1, 6, 5, 4], 3, 1, 2, 0, true, false), // 1×1 stride 2: general path
            ([1, 9, 8, 3], 5, 5, 2, 2, true, false), // 5×5 s2 p2
            ([2, 4, 5, 2], 3, 3, 1, 0, true, true), // unpadded 3×3
            ([1, 3, 3, 4], 2, 3, 3, 2, true, false), // stride larger than the overlap
        ];
        for &(xs, co, k, stride, pad, with_bias, with_res) in cases {
            let x = rng.tensor(&xs, 1.0);
            let w = rng.tensor(&[co, k, k, xs[3]], 0.5);
            let bias = rng.tensor(&[co], 1.0);
            let (out_shape, _) = conv_ref(&x, &w, None, stride, pad, None);
            let res = rng.tensor(&out_shape, 1.0);
            let (bias, res) = (with_bias.then_some(&bias), with_res.then_some(&res));
            let got = be.conv2d(&x, &w, bias, stride, pad, res).unwrap();
            let (shape, want) = conv_ref(&x, &w, bias, stride, pad, res);
            assert_close(
                &format!("conv2d {xs:?} k{k} s{stride} p{pad}"),
                &got,
                &shape,
                &want,
            );
        }
    }

    #[test]
    fn conv2d_uses_several_im2col_blocks() {
        // K = 3·3·600 = 5400 → IM2COL_BUDGET / K = 776 pixels per block < 32·32 output pixels, so
        // the block loop (and a partial last block) is exercised.
        let be = CpuBackend::new();
        let mut rng = Rng::new(34);
        let x = rng.tensor(&[1, 32, 32, 600], 1.0);
        let w = rng.tensor(&[3, 3, 3, 600], 0.1);
        let bias = rng.tensor(&[3], 1.0);
        const { assert!(super::IM2COL_BUDGET / (9 * 600) < 32 * 32) };
        let got = be.conv2d(&x, &w, Some(&bias), 1, 1, None).unwrap();
        let (shape, want) = conv_ref(&x, &w, Some(&bias), 1, 1, None);
        assert_close("conv2d blocked", &got, &shape, &want);
    }

    #[test]
    fn conv2d_rejects_bad_shapes() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(35);
        let x = rng.tensor(&[1, 6, 6, 4], 1.0);
        let w = rng.tensor(&[5, 3, 3, 4], 1.0);
        let b = rng.tensor(&[5], 1.0);
        assert!(
            be.conv2d(&x, &rng.tensor(&[5, 3, 3, 3], 1.0), None, 1, 1, None)
                .is_err(),
            "C_in"
        );
        assert!(
            be.conv2d(&x, &rng.tensor(&[5, 9, 4], 1.0), None, 1, 1, None)
                .is_err(),
            "3-D weight"
        );
        assert!(
            be.conv2d(&rng.tensor(&[6, 6, 4], 1.0), &w, None, 1, 1, None)
                .is_err(),
            "3-D x"
        );
        assert!(
            be.conv2d(&x, &w, Some(&rng.tensor(&[4], 1.0)), 1, 1, None)
                .is_err(),
            "bias"
        );
        assert!(be.conv2d(&x, &w, Some(&b), 0, 1, None).is_err(), "stride 0");
        let wrong_res = rng.tensor(&[1, 6, 6, 4], 1.0);
        assert!(
            be.conv2d(&x, &w, Some(&b), 1, 1, Some(&wrong_res)).is_err(),
            "residual"
        );
        let res_s1 = rng.tensor(&[1, 6, 6, 5], 1.0);
        assert!(
            be.conv2d(&x, &w, Some(&b), 2, 1, Some(&res_s1)).is_err(),
            "residual vs stride 2"
        );
        let big = rng.tensor(&[5, 9, 9, 4], 1.0);
        assert!(
            be.conv2d(&x, &big, None, 1, 1, None).is_err(),
            "kernel larger than input"
        );
        assert!(
            be.conv2d(&x, &w, None, 1, usize::MAX, None).is_err(),
            "huge padding"
        );
        assert!(
            be.conv2d(&x, &w, None, 1, usize::MAX / 4, None).is_err(),
            "huge output"
        );
        let w0 = CpuTensor::new(vec![5, 0, 3, 4], vec![]).unwrap();
        assert!(
            be.conv2d(&x, &w0, None, 1, 1, None).is_err(),
            "empty kernel"
        );
        // Zero input channels: the output is just the bias.
        let x0 = CpuTensor::new(vec![1, 2, 2, 0], vec![]).unwrap();
        let w00 = CpuTensor::new(vec![5, 3, 3, 0], vec![]).unwrap();
        let y = be.conv2d(&x0, &w00, Some(&b), 1, 1, None).unwrap();
        assert_eq!(y.shape(), &[1, 2, 2, 5]);
        assert_eq!(&y.data()[5..10], b.data());
    }
}

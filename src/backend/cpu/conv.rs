//! 2-D convolutions as GEMMs against the weight read in place.
//!
//! NHWC input, OHWI weight: the OHWI weight `[C_out, kH·kW·C_in]` is, read transposed,
//! exactly the `[K, N]` right-hand side of an im2col GEMM whose patch row for an output pixel is its
//! kH·kW input pixels' channel vectors in (ky, kx) order. A 1×1 stride-1 unpadded convolution needs
//! no patches (the NHWC input already is `[B·H·W, C_in]`). Everything else builds patch rows for a
//! block of output pixels at a time (at most `IM2COL_BUDGET` floats, whatever the image size),
//! filled in parallel, then runs one GEMM per block on the whole rayon pool. The output is
//! initialised with `residual + bias` and the GEMMs accumulate into it: bias and residual cost no
//! extra pass. 3×3 stride-1 padding-1 convolutions large enough to pay for it go to `winograd`.

use rayon::prelude::*;

use super::gemm::{init_output, matmul, MatRef, Par};
use super::winograd;
use super::CpuTensor;
use crate::backend::contract::Conv2d;
use crate::Result;

/// Most floats one im2col block may hold (16 MiB): bounds memory for the VAE at 768² (inputs of
/// 768·768·128 values) while keeping each GEMM large enough to use every core.
const IM2COL_BUDGET: usize = 4 << 20;

pub(super) fn conv2d(op: Conv2d<'_, CpuTensor>) -> Result<CpuTensor> {
    if winograd::applies(&op) {
        return winograd::conv3x3(op);
    }
    let (x, weight, bias, residual) = (op.x, op.weight, op.bias, op.residual);
    let (h, w, ci, co) = (op.in_h, op.in_w, op.c_in, op.c_out);
    let (kh, kw, stride, padding) = (op.kernel_h, op.kernel_w, op.stride, op.padding);
    let (oh, ow) = (op.out_h, op.out_w);
    let m = op.pixels();
    let k = op.patch_len(); // ≤ weight.numel()
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
    CpuTensor::new(op.out_shape(), out)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_close, Rng};
    use super::super::{CpuBackend, CpuTensor};
    use crate::backend::{Backend, Tensor};

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

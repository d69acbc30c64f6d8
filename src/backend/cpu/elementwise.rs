//! The memory-bound ops: activations (SiLU, GELU, GEGLU), add, per-channel add, nearest resize,
//! channel concat and embedding gather. Each is one pass with rayon over fixed-size chunks (flat
//! ops) or over rows of the channel dimension (layout ops); inner loops are plain slices so they
//! vectorise.

use std::sync::Arc;

use multiversion::multiversion;
use rayon::prelude::*;

use super::{math, CpuTensor};
use crate::backend::contract::{
    Add, AddPerChannel, ConcatChannels, Embedding, Geglu, Pad, UpsampleNearest,
};

/// Elements per rayon task for flat elementwise ops (64 KiB of f32: big enough to amortise the
/// task, small enough to balance).
const CHUNK: usize = 1 << 14;

fn tensor(shape: Vec<usize>, data: Vec<f32>) -> CpuTensor {
    CpuTensor {
        shape,
        data: Arc::new(data),
    }
}

/// `f` applied to every element.
pub(super) fn map(x: &CpuTensor, f: impl Fn(f32) -> f32 + Sync) -> CpuTensor {
    let mut out = vec![0.0f32; x.numel()];
    out.par_chunks_mut(CHUNK)
        .zip(x.data().par_chunks(CHUNK))
        .for_each(|(o, i)| map_chunk(o, i, &f));
    tensor(x.shape.clone(), out)
}

/// `o[i] = f(x[i])`; compiled also for AVX2 and AVX-512 (picked at run time) so that `f`'s
/// branch-free math (SiLU's `exp`, GELU's `erf`) vectorises wide.
#[multiversion(targets = "simd")]
fn map_chunk<F: Fn(f32) -> f32>(o: &mut [f32], x: &[f32], f: &F) {
    for (o, &x) in o.iter_mut().zip(x) {
        *o = f(x);
    }
}

/// `o = h · gelu(gate)`, one row of GEGLU; compiled also for AVX2 and AVX-512.
#[multiversion(targets = "simd")]
fn geglu_row(o: &mut [f32], h: &[f32], gate: &[f32]) {
    for ((o, &h), &g) in o.iter_mut().zip(h).zip(gate) {
        *o = h * math::gelu(g);
    }
}

pub(super) fn add(op: Add<'_, CpuTensor>) -> CpuTensor {
    let (a, b) = (op.a, op.b);
    let mut out = vec![0.0f32; a.numel()];
    out.par_chunks_mut(CHUNK)
        .zip(a.data().par_chunks(CHUNK).zip(b.data().par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
    tensor(a.shape.clone(), out)
}

/// `x [B, .., C] + v [B, C]`, broadcast over the middle dimensions.
pub(super) fn add_per_channel(op: AddPerChannel<'_, CpuTensor>) -> CpuTensor {
    let (x, v, batch, c) = (op.x, op.v, op.batch, op.channels);
    let mut out = vec![0.0f32; x.numel()];
    if c > 0 && batch > 0 {
        let rows_per_batch = x.numel() / c / batch;
        out.par_chunks_mut(c)
            .zip(x.data().par_chunks(c))
            .enumerate()
            .for_each(|(row, (o, xr))| {
                let vb = &v.data()[(row / rows_per_batch) * c..][..c];
                for ((o, &x), &v) in o.iter_mut().zip(xr).zip(vb) {
                    *o = x + v;
                }
            });
    }
    tensor(x.shape.clone(), out)
}

/// `x [.., 2F]` → `x[.., :F] · gelu(x[.., F:])`.
pub(super) fn geglu(op: Geglu<'_, CpuTensor>) -> CpuTensor {
    let (x, rows, f, two_f) = (op.x, op.rows, op.features, 2 * op.features);
    let mut out = vec![0.0f32; rows * f];
    if f > 0 {
        out.par_chunks_mut(f)
            .zip(x.data().par_chunks(two_f))
            .for_each(|(o, xr)| {
                let (h, gate) = xr.split_at(f);
                geglu_row(o, h, gate);
            });
    }
    tensor(op.out_shape, out)
}

/// Zero padding of `x [B, H, W, C]` (see [`Pad`]).
pub(super) fn pad(op: Pad<'_, CpuTensor>) -> CpuTensor {
    let (x, h, w, c) = (op.x, op.in_h, op.in_w, op.channels);
    let (out_h, out_w, p) = (op.out_h, op.out_w, op.padding);
    let out_shape = op.out_shape();
    let mut out = vec![0.0f32; out_shape.iter().product()];
    let row = out_w * c;
    if row > 0 && w * c > 0 {
        let xd = x.data();
        out.par_chunks_mut(row).enumerate().for_each(|(r, o)| {
            let (bi, oy) = (r / out_h, r % out_h);
            let Some(iy) = oy.checked_sub(p.top).filter(|&iy| iy < h) else {
                return; // a padding row stays zero
            };
            let src = &xd[(bi * h + iy) * w * c..][..w * c];
            o[p.left * c..][..w * c].copy_from_slice(src);
        });
    }
    tensor(out_shape, out)
}

/// PyTorch `nearest` resize of `x [B, H, W, C]` to `[B, out_h, out_w, C]`.
pub(super) fn upsample_nearest(op: UpsampleNearest<'_, CpuTensor>) -> CpuTensor {
    let (x, h, w, c) = (op.x, op.in_h, op.in_w, op.channels);
    let (out_h, out_w) = (op.out_h, op.out_w);
    let out_shape = op.out_shape();
    let n = out_shape.iter().product();
    // PyTorch's rule (no scale_factor given): scale = in / out in f32, src = min(⌊dst·scale⌋, in−1).
    let src_index = |dst: usize, inp: usize, out: usize| -> usize {
        let scale = inp as f32 / out as f32;
        ((dst as f32 * scale).floor() as usize).min(inp - 1)
    };
    let src_x: Vec<usize> = (0..out_w).map(|ox| src_index(ox, w, out_w)).collect();
    let mut out = vec![0.0f32; n];
    let row = out_w * c;
    if row > 0 {
        let xd = x.data();
        out.par_chunks_mut(row).enumerate().for_each(|(r, o)| {
            let (bi, oy) = (r / out_h, r % out_h);
            let iy = src_index(oy, h, out_h);
            let src_row = &xd[(bi * h + iy) * w * c..][..w * c];
            for (o, &ix) in o.chunks_exact_mut(c).zip(&src_x) {
                o.copy_from_slice(&src_row[ix * c..][..c]);
            }
        });
    }
    tensor(out_shape, out)
}

/// `[.., Ca]`, `[.., Cb]` → `[.., Ca + Cb]`.
pub(super) fn concat_channels(op: ConcatChannels<'_, CpuTensor>) -> CpuTensor {
    let (a, b, ca, cb) = (op.a, op.b, op.a_channels, op.b_channels);
    let c = ca + cb;
    let mut out = vec![0.0f32; op.rows * c];
    if c > 0 {
        out.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
            let (oa, ob) = o.split_at_mut(ca);
            oa.copy_from_slice(&a.data()[r * ca..][..ca]);
            ob.copy_from_slice(&b.data()[r * cb..][..cb]);
        });
    }
    tensor(op.out_shape, out)
}

/// Rows of `table [V, D]` picked by `ids` → `[ids.len(), D]`.
pub(super) fn embedding(op: Embedding<'_, CpuTensor>) -> CpuTensor {
    let (ids, table, d) = (op.ids, op.table, op.dim);
    let mut out = vec![0.0f32; ids.len() * d];
    if d > 0 {
        out.par_chunks_mut(d).zip(ids).for_each(|(o, &id)| {
            o.copy_from_slice(&table.data()[id as usize * d..][..d]);
        });
    }
    tensor(vec![ids.len(), d], out)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_close, Rng};
    use super::super::{CpuBackend, CpuTensor};
    use crate::backend::{Backend, Tensor};

    fn f64s(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    fn gelu_ref(x: f64) -> f64 {
        0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
    }

    #[test]
    fn silu_gelu_match_reference() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(11);
        // More than one CHUNK, odd length, values up to ±12 (both tails).
        let x = rng.tensor(&[3, 7, 1999], 12.0);
        let xs = f64s(x.data());
        let silu: Vec<f64> = xs.iter().map(|&v| v / (1.0 + (-v).exp())).collect();
        assert_close("silu", &be.silu(&x).unwrap(), x.shape(), &silu);
        let gelu: Vec<f64> = xs.iter().map(|&v| gelu_ref(v)).collect();
        assert_close("gelu", &be.gelu(&x).unwrap(), x.shape(), &gelu);
    }

    #[test]
    fn geglu_matches_reference() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(12);
        for shape in [[1usize, 5, 14], [2, 3, 38]] {
            let x = rng.tensor(&shape, 4.0);
            let f = shape[2] / 2;
            let mut want = Vec::new();
            for row in x.data().chunks(shape[2]) {
                for j in 0..f {
                    want.push(row[j] as f64 * gelu_ref(row[f + j] as f64));
                }
            }
            assert_close(
                "geglu",
                &be.geglu(&x).unwrap(),
                &[shape[0], shape[1], f],
                &want,
            );
        }
        assert!(be.geglu(&rng.tensor(&[2, 7], 1.0)).is_err(), "odd last dim");
    }

    #[test]
    fn add_and_add_per_channel_match_reference() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(13);
        let a = rng.tensor(&[2, 3, 5, 7], 1.0);
        let b = rng.tensor(&[2, 3, 5, 7], 1.0);
        let want: Vec<f64> = a
            .data()
            .iter()
            .zip(b.data())
            .map(|(&x, &y)| x as f64 + y as f64)
            .collect();
        assert_close("add", &be.add(&a, &b).unwrap(), a.shape(), &want);
        assert!(be.add(&a, &rng.tensor(&[2, 3, 7, 5], 1.0)).is_err());

        let v = rng.tensor(&[2, 7], 1.0);
        let mut want = Vec::new();
        for bi in 0..2 {
            for s in 0..15 {
                for c in 0..7 {
                    want.push(a.data()[(bi * 15 + s) * 7 + c] as f64 + v.data()[bi * 7 + c] as f64);
                }
            }
        }
        assert_close(
            "add_per_channel",
            &be.add_per_channel(&a, &v).unwrap(),
            a.shape(),
            &want,
        );
        // [B, N, C] (tokens) works the same way.
        let x3 = rng.tensor(&[1, 4, 3], 1.0);
        let v3 = rng.tensor(&[1, 3], 1.0);
        let want3: Vec<f64> = (0..12)
            .map(|i| x3.data()[i] as f64 + v3.data()[i % 3] as f64)
            .collect();
        assert_close(
            "add_per_channel 3d",
            &be.add_per_channel(&x3, &v3).unwrap(),
            &[1, 4, 3],
            &want3,
        );
        assert!(be.add_per_channel(&a, &rng.tensor(&[1, 7], 1.0)).is_err());
        assert!(be.add_per_channel(&a, &rng.tensor(&[2, 6], 1.0)).is_err());
        assert!(be.add_per_channel(&rng.tensor(&[7], 1.0), &v).is_err());
    }

    /// Reference nearest resize with PyTorch's formula written out per pixel.
    fn upsample_ref(x: &[f32], [b, h, w, c]: [usize; 4], oh: usize, ow: usize) -> Vec<f64> {
        let mut out = Vec::new();
        for bi in 0..b {
            for oy in 0..oh {
                let iy = ((oy as f32 * (h as f32 / oh as f32)).floor() as usize).min(h - 1);
                for ox in 0..ow {
                    let ix = ((ox as f32 * (w as f32 / ow as f32)).floor() as usize).min(w - 1);
                    for ch in 0..c {
                        out.push(x[((bi * h + iy) * w + ix) * c + ch] as f64);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn pad_places_the_input_and_zeroes_the_rest() {
        use crate::backend::Padding;
        let be = CpuBackend::new();
        // x [1, 2, 2, 1] = [[1, 2], [3, 4]]: bottom and right by one (the VAE encoder's).
        let x = CpuTensor::new(vec![1, 2, 2, 1], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let pad = Padding {
            bottom: 1,
            right: 1,
            ..Padding::default()
        };
        let got = be.pad(&x, pad).unwrap();
        assert_eq!(got.shape(), &[1, 3, 3, 1]);
        assert_eq!(got.data(), &[1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
        let all = Padding {
            top: 1,
            bottom: 0,
            left: 2,
            right: 0,
        };
        let got = be.pad(&x, all).unwrap();
        assert_eq!(got.shape(), &[1, 3, 4, 1]);
        assert_eq!(
            got.data(),
            &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 3.0, 4.0]
        );
        assert!(be
            .pad(&CpuTensor::new(vec![4], vec![0.0; 4]).unwrap(), pad)
            .is_err());
        let huge = Padding {
            bottom: usize::MAX,
            ..Padding::default()
        };
        assert!(be.pad(&x, huge).is_err());
    }

    #[test]
    fn upsample_nearest_matches_pytorch_rule() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(14);
        for (shape, oh, ow) in [
            ([2usize, 5, 5, 3], 9usize, 9usize),
            ([1, 3, 4, 5], 6, 8),
            ([2, 4, 3, 2], 8, 6),
            ([1, 6, 7, 3], 4, 3), // downscale
        ] {
            let x = rng.tensor(&shape, 1.0);
            let got = be.upsample_nearest(&x, oh, ow).unwrap();
            let want = upsample_ref(x.data(), shape, oh, ow);
            assert_close("upsample", &got, &[shape[0], oh, ow, shape[3]], &want);
        }
        // 5 → 9: the source rows are ⌊i·5/9⌋ = 0 0 1 1 2 2 3 3 4.
        let col = super::super::CpuTensor::new(vec![1, 5, 1, 1], vec![0., 1., 2., 3., 4.]).unwrap();
        let up = be.upsample_nearest(&col, 9, 1).unwrap();
        assert_eq!(up.data(), &[0., 0., 1., 1., 2., 2., 3., 3., 4.]);
        let x = rng.tensor(&[1, 3, 4, 5], 1.0);
        assert!(be.upsample_nearest(&x, 0, 8).is_err());
        assert!(be
            .upsample_nearest(&rng.tensor(&[3, 4, 5], 1.0), 6, 8)
            .is_err());
        assert!(be
            .upsample_nearest(&rng.tensor(&[1, 0, 4, 5], 1.0), 6, 8)
            .is_err());
        assert!(be.upsample_nearest(&x, usize::MAX, usize::MAX).is_err());
        let no_channels = super::super::CpuTensor::new(vec![1, 2, 2, 0], vec![]).unwrap();
        assert!(be.upsample_nearest(&no_channels, 1 << 40, 1 << 40).is_err());
    }

    #[test]
    fn concat_channels_matches_reference() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(15);
        let a = rng.tensor(&[2, 3, 5, 7], 1.0);
        let b = rng.tensor(&[2, 3, 5, 4], 1.0);
        let mut want = Vec::new();
        for r in 0..30 {
            want.extend(a.data()[r * 7..r * 7 + 7].iter().map(|&v| v as f64));
            want.extend(b.data()[r * 4..r * 4 + 4].iter().map(|&v| v as f64));
        }
        assert_close(
            "concat",
            &be.concat_channels(&a, &b).unwrap(),
            &[2, 3, 5, 11],
            &want,
        );
        assert!(be
            .concat_channels(&a, &rng.tensor(&[2, 3, 4, 4], 1.0))
            .is_err());
        assert!(be
            .concat_channels(&a, &rng.tensor(&[2, 15, 4], 1.0))
            .is_err());
    }

    #[test]
    fn embedding_gathers_rows() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(16);
        let table = rng.tensor(&[11, 6], 1.0);
        let ids = [3u32, 0, 10, 3, 7];
        let want: Vec<f64> = ids
            .iter()
            .flat_map(|&id| {
                table.data()[id as usize * 6..][..6]
                    .iter()
                    .map(|&v| v as f64)
            })
            .collect();
        assert_close(
            "embedding",
            &be.embedding(&ids, &table).unwrap(),
            &[5, 6],
            &want,
        );
        assert!(be.embedding(&[11], &table).is_err());
        assert!(be.embedding(&[0], &rng.tensor(&[66], 1.0)).is_err());
    }

    #[test]
    fn empty_tensors_do_not_panic() {
        let be = CpuBackend::new();
        let e = super::super::CpuTensor::new(vec![2, 0], vec![]).unwrap();
        assert_eq!(be.silu(&e).unwrap().shape(), &[2, 0]);
        assert_eq!(be.add(&e, &e).unwrap().shape(), &[2, 0]);
        assert_eq!(be.geglu(&e).unwrap().shape(), &[2, 0]);
        assert_eq!(be.concat_channels(&e, &e).unwrap().shape(), &[2, 0]);
        let v = super::super::CpuTensor::new(vec![2, 0], vec![]).unwrap();
        assert!(be.add_per_channel(&e, &v).is_ok());
        let t0 = super::super::CpuTensor::new(vec![3, 0], vec![]).unwrap();
        assert_eq!(be.embedding(&[1, 2], &t0).unwrap().shape(), &[2, 0]);
        let img = super::super::CpuTensor::new(vec![1, 2, 2, 0], vec![]).unwrap();
        assert_eq!(
            be.upsample_nearest(&img, 4, 4).unwrap().shape(),
            &[1, 4, 4, 0]
        );
        let scalar = super::super::CpuTensor::new(vec![], vec![1.0]).unwrap();
        assert!(be.geglu(&scalar).is_err());
        assert!(be.concat_channels(&scalar, &scalar).is_err());
    }
}

//! Multi-head scaled dot-product attention without the full score matrix.
//!
//! Work split: one rayon task per (image, block of ≤ 256 query rows); inside it, a loop over heads.
//! Each task owns the contiguous output rows of its queries, so tasks write disjoint slices and
//! need no synchronisation. Per head the task computes a `[block, Nk]` score tile
//! `scale · Q_h K_hᵀ` with one GEMM (Q_h and K_h are read in place as strided views of
//! `[B, N, H·D]`: row stride H·D, the head's D channels contiguous), turns each row into
//! probabilities in f32 (row maximum subtracted, vectorised `exp`, 8-lane sums), and writes
//! `P · V_h` straight into the head's D-column slice of the output rows with a second GEMM.
//! Memory is one score tile per worker (≤ 4 MiB: 4096 keys × 256 rows, 9216 keys × 113 rows),
//! never N×N. Bigger blocks amortise gemm's packing of K_h and V_h, which every task repeats.
//!
//! Causal masking (key j > query i masked) skips the masked keys: the block only multiplies
//! keys `0 ..= last query of the block`, and each row's softmax covers keys `0 ..= i`.

use multiversion::multiversion;
use rayon::prelude::*;

use super::gemm::{matmul, MatRef, Par};
use super::{math, CpuTensor};
use crate::backend::contract::Attention;
use crate::backend::Mask;
use crate::Result;

/// Floats in one score tile (4 MiB).
const SCORE_TILE: usize = 1 << 20;
/// Bounds on the query rows per task.
const MIN_BLOCK: usize = 8;
const MAX_BLOCK: usize = 256;

/// Query rows per task: a score tile of at most `SCORE_TILE` floats (but at least `MIN_BLOCK`
/// rows), and blocks small enough that there are ~4 tasks per thread.
fn query_block(batch: usize, nq: usize, nk: usize) -> usize {
    let by_tile = (SCORE_TILE / nk.max(1)).clamp(MIN_BLOCK, MAX_BLOCK);
    let blocks_per_image = (4 * rayon::current_num_threads()).div_ceil(batch.max(1));
    let by_tasks = nq.div_ceil(blocks_per_image.max(1)).max(MIN_BLOCK);
    by_tile.min(by_tasks)
}

/// In-place softmax of one row in f32. NaN anywhere makes the row NaN (as in PyTorch).
/// Three plain passes (max, exp, normalise) with 8 independent lanes in the reductions, so that
/// every pass vectorises; compiled also for AVX2 and AVX-512 and picked at run time (the same
/// arithmetic in the same order, so the same bits).
#[multiversion(targets = "simd")]
fn softmax(row: &mut [f32]) {
    const L: usize = 8;
    let mut lanes = [f32::NEG_INFINITY; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for x in row.iter_mut() {
        *x = math::exp(*x - max);
    }
    let mut sums = [0.0f32; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for (s, &x) in sums.iter_mut().zip(c) {
            *s += x;
        }
    }
    let sum: f32 = sums.iter().chain(chunks.remainder()).sum();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

pub(super) fn attention(op: Attention<'_, CpuTensor>) -> Result<CpuTensor> {
    let (q, k, v, heads) = (op.q, op.k, op.v, op.heads);
    let (batch, nq, nk) = (op.batch, op.q_len, op.kv_len);
    let (d, c) = (op.head_dim, op.heads * op.head_dim);
    let causal = op.mask == Mask::Causal;
    let mut out = vec![0.0f32; op.out_numel()];
    if out.is_empty() {
        return CpuTensor::new(q.shape.clone(), out);
    }
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let block = query_block(batch, nq, nk);
    let (qd, kd, vd) = (q.data(), k.data(), v.data());

    let result: Result<()> =
        out.par_chunks_mut(nq * c)
            .enumerate()
            .try_for_each(|(bi, out_img)| {
                let k_img = &kd[bi * nk * c..][..nk * c];
                let v_img = &vd[bi * nk * c..][..nk * c];
                out_img
                    .par_chunks_mut(block * c)
                    .enumerate()
                    .try_for_each_init(Vec::new, |scores: &mut Vec<f32>, (qb, out_rows)| {
                        let i0 = qb * block;
                        let rows = out_rows.len() / c;
                        // Keys any query of this block may see.
                        let keys = if causal { nk.min(i0 + rows) } else { nk };
                        scores.resize(rows * keys, 0.0);
                        let q_rows = &qd[(bi * nq + i0) * c..][..rows * c];
                        for h in 0..heads {
                            let hd = h * d;
                            // scores[i, j] = scale · Σ_d q[i0 + i, h·D + d] · k[j, h·D + d]
                            matmul(
                                scores,
                                keys,
                                rows,
                                keys,
                                d,
                                MatRef::new(&q_rows[hd..], c, 1),
                                MatRef::new(&k_img[hd..], 1, c),
                                false,
                                scale,
                                Par::Sequential,
                            )?;
                            for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
                                let visible = if causal { (i0 + i + 1).min(keys) } else { keys };
                                let (seen, masked) = row.split_at_mut(visible);
                                softmax(seen);
                                masked.fill(0.0);
                            }
                            // out[i0 + i, h·D + d] = Σ_j p[i, j] · v[j, h·D + d]
                            matmul(
                                &mut out_rows[hd..],
                                c,
                                rows,
                                d,
                                keys,
                                MatRef::new(scores, keys, 1),
                                MatRef::new(&v_img[hd..], c, 1),
                                false,
                                1.0,
                                Par::Sequential,
                            )?;
                        }
                        Ok(())
                    })
            });
    result?;
    CpuTensor::new(q.shape.clone(), out)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_close, Rng};
    use super::super::{CpuBackend, CpuTensor};
    use crate::backend::{Backend, Mask, Tensor};

    /// Naive attention in f64, one (batch, head, query) at a time.
    fn attention_ref(
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        heads: usize,
        mask: Mask,
    ) -> Vec<f64> {
        let [b, nq, c] = q.shape()[..] else { panic!() };
        let nk = k.shape()[1];
        let d = c / heads;
        let mut out = vec![0.0f64; b * nq * c];
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..nq {
                    let mut s = Vec::with_capacity(nk);
                    for j in 0..nk {
                        if mask == Mask::Causal && j > i {
                            s.push(f64::NEG_INFINITY);
                            continue;
                        }
                        let mut dot = 0.0;
                        for dd in 0..d {
                            dot += q.data()[(bi * nq + i) * c + h * d + dd] as f64
                                * k.data()[(bi * nk + j) * c + h * d + dd] as f64;
                        }
                        s.push(dot / (d as f64).sqrt());
                    }
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for dd in 0..d {
                        let mut acc = 0.0;
                        for (j, &ej) in e.iter().enumerate() {
                            acc += ej / z * v.data()[(bi * nk + j) * c + h * d + dd] as f64;
                        }
                        out[(bi * nq + i) * c + h * d + dd] = acc;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_reference() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(41);
        // (batch, Nq, Nk, heads, head dim, mask, q/k scale)
        let cases = [
            (2, 77, 77, 2, 8, Mask::Causal, 1.0), // CLIP-like causal self-attention
            (1, 77, 77, 3, 5, Mask::None, 1.0),   // 77 keys, odd head dim
            (2, 100, 77, 3, 8, Mask::None, 1.0),  // cross-attention: Nq ≠ Nk, several heads
            (1, 130, 130, 1, 16, Mask::Causal, 1.0), // causal over several query blocks
            (2, 20, 33, 2, 4, Mask::Causal, 1.0), // causal, Nq < Nk
            (1, 33, 20, 2, 4, Mask::Causal, 1.0), // causal, Nq > Nk
            (2, 9, 5, 4, 3, Mask::None, 1.0),     // tiny
            (1, 50, 40, 2, 8, Mask::None, 12.0),  // scores of several hundred: needs the max shift
            (1, 1, 1, 1, 1, Mask::None, 1.0),
        ];
        for (b, nq, nk, heads, d, mask, s) in cases {
            let c = heads * d;
            let q = rng.tensor(&[b, nq, c], s);
            let k = rng.tensor(&[b, nk, c], s);
            let v = rng.tensor(&[b, nk, c], 1.0);
            let got = be.attention(&q, &k, &v, heads, mask).unwrap();
            let want = attention_ref(&q, &k, &v, heads, mask);
            assert_close(
                &format!("attention b{b} nq{nq} nk{nk} h{heads} d{d} {mask:?}"),
                &got,
                &[b, nq, c],
                &want,
            );
        }
    }

    #[test]
    fn attention_with_partial_last_block() {
        // A query count that is not a multiple of the block, with several blocks per image.
        let (b, nq, nk, heads, d) = (2, 203, 77, 5, 8);
        let block = super::query_block(b, nq, nk);
        assert!(nq % block != 0 && nq / block >= 2, "block {block}");
        let be = CpuBackend::new();
        let mut rng = Rng::new(42);
        let q = rng.tensor(&[b, nq, heads * d], 1.0);
        let k = rng.tensor(&[b, nk, heads * d], 1.0);
        let v = rng.tensor(&[b, nk, heads * d], 1.0);
        for mask in [Mask::None, Mask::Causal] {
            let got = be.attention(&q, &k, &v, heads, mask).unwrap();
            let want = attention_ref(&q, &k, &v, heads, mask);
            assert_close("attention partial block", &got, &[b, nq, heads * d], &want);
        }
    }

    #[test]
    fn attention_rejects_bad_shapes() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(43);
        let q = rng.tensor(&[2, 10, 12], 1.0);
        let k = rng.tensor(&[2, 7, 12], 1.0);
        assert!(be.attention(&q, &k, &k, 5, Mask::None).is_err(), "12 % 5");
        assert!(be.attention(&q, &k, &k, 0, Mask::None).is_err(), "0 heads");
        assert!(
            be.attention(&q, &k, &rng.tensor(&[2, 8, 12], 1.0), 2, Mask::None)
                .is_err(),
            "v ≠ k"
        );
        let k1 = rng.tensor(&[1, 7, 12], 1.0);
        assert!(be.attention(&q, &k1, &k1, 2, Mask::None).is_err(), "batch");
        let k8 = rng.tensor(&[2, 7, 8], 1.0);
        assert!(
            be.attention(&q, &k8, &k8, 2, Mask::None).is_err(),
            "channels"
        );
        let q2 = rng.tensor(&[10, 12], 1.0);
        assert!(be.attention(&q2, &k, &k, 2, Mask::None).is_err(), "2-D q");
        let k0 = CpuTensor::new(vec![2, 0, 12], vec![]).unwrap();
        assert!(
            be.attention(&q, &k0, &k0, 2, Mask::None).is_err(),
            "no keys"
        );
        let q0 = CpuTensor::new(vec![2, 0, 12], vec![]).unwrap();
        assert_eq!(
            be.attention(&q0, &k, &k, 2, Mask::None).unwrap().shape(),
            &[2, 0, 12]
        );
    }

    #[test]
    fn attention_propagates_nan() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(44);
        let mut qd = rng.vec(2 * 5 * 8, 1.0);
        qd[3] = f32::NAN; // batch 0, query 0, head 0
        let q = CpuTensor::new(vec![2, 5, 8], qd).unwrap();
        let k = rng.tensor(&[2, 6, 8], 1.0);
        let out = be.attention(&q, &k, &k, 2, Mask::None).unwrap();
        assert!(
            out.data()[..4].iter().all(|x| x.is_nan()),
            "poisoned row must be NaN"
        );
        assert!(
            out.data()[4..].iter().all(|x| x.is_finite()),
            "other rows and heads unaffected"
        );
    }
}

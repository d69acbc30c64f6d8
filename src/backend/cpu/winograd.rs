//! 3×3 stride-1 padding-1 convolutions by Winograd's F(4×4, 3×3) algorithm (Lavin & Gray 2016).
//!
//! Each 4×4 output tile is `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` for the tile's 6×6 input patch `d`: the 36
//! element-wise products, summed over input channels, are 36 GEMMs `[tiles, C_in] × [C_in, C_out]`,
//! which need 36 multiply-adds per tile and channel pair where direct convolution needs 16·9 = 144
//! (4× fewer). The transforms run on whole NHWC channel vectors.
//!
//! Memory: the transformed weight `U` is `36·C_in·C_out` floats (computed per call, at most
//! `WEIGHT_BUDGET`); tiles go through in blocks of whole tile rows whose transformed input `V` and
//! GEMM output `M` hold at most about `BLOCK_BUDGET` floats together, whatever the image size.
//!
//! Rounding differs from direct convolution (the transforms scale values by up to 8·5 before the
//! sums): the tests below bound it against an f64 reference, and the diffusers fixtures bound it
//! end to end.

use multiversion::multiversion;
use rayon::prelude::*;

use super::gemm::{matmul, MatRef, Par};
use super::CpuTensor;
use crate::backend::contract::Conv2d;
use crate::Result;

/// Output tile side.
const TILE: usize = 4;
/// Input tile side: `TILE + 3 − 1`.
const ALPHA: usize = 6;
/// Points of the transformed tile, one GEMM each.
const POINTS: usize = ALPHA * ALPHA;

/// Most floats of the transformed input and GEMM output of one block of tile rows (32 MiB).
const BLOCK_BUDGET: usize = 8 << 20;
/// Most floats of the transformed weight (64 MiB): the UNet's 1280-channel convolutions, at 16²
/// and 8² where few tiles share it, stay direct.
const WEIGHT_BUDGET: usize = 16 << 20;
/// Fewer channels than this leave the GEMMs too thin to pay for the transforms.
const MIN_CHANNELS: usize = 16;
/// Fewer tiles than this leave the weight transform unpaid.
const MIN_TILES: usize = 16;

/// The filter transform `G` (6×3).
const G: [[f32; 3]; ALPHA] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// Whether `op` is a convolution this module computes, and one where it is faster than im2col.
pub(super) fn applies(op: &Conv2d<'_, CpuTensor>) -> bool {
    op.kernel_h == 3
        && op.kernel_w == 3
        && op.stride == 1
        && op.padding == 1
        && op.c_in >= MIN_CHANNELS
        && op.c_out >= MIN_CHANNELS
        && Tiles::of(op).count() >= MIN_TILES
        && POINTS * op.c_in * op.c_out <= WEIGHT_BUDGET
}

/// How the output is cut into tiles: `rows` tile rows per image of `cols` tiles each.
#[derive(Clone, Copy)]
struct Tiles {
    rows: usize,
    cols: usize,
}

impl Tiles {
    fn of(op: &Conv2d<'_, CpuTensor>) -> Self {
        Tiles {
            rows: op.out_h.div_ceil(TILE),
            cols: op.out_w.div_ceil(TILE),
        }
    }

    fn count(&self) -> usize {
        self.rows * self.cols
    }
}

/// `op` (3×3, stride 1, padding 1; see `applies`) by F(4×4, 3×3).
pub(super) fn conv3x3(op: Conv2d<'_, CpuTensor>) -> Result<CpuTensor> {
    conv3x3_blocked(op, BLOCK_BUDGET)
}

fn conv3x3_blocked(op: Conv2d<'_, CpuTensor>, block_budget: usize) -> Result<CpuTensor> {
    let (ci, co) = (op.c_in, op.c_out);
    let tiles = Tiles::of(&op);
    let u = transform_weight(op.weight.data(), ci, co); // [36, C_out, C_in]
    let mut out = vec![0.0f32; op.pixels() * co]; // [B, H, W, C_out]
    let mut tile_rows = split_tile_rows(&mut out, op.batch, op.out_h, op.out_w * co);
    let rows_per_block =
        (block_budget / (POINTS * (ci + co) * tiles.cols)).clamp(1, tile_rows.len().max(1));
    let block_tiles = rows_per_block * tiles.cols;
    let mut v = vec![0.0f32; block_tiles * POINTS * ci]; // [tiles, 36, C_in]
    let mut m = vec![0.0f32; POINTS * block_tiles * co]; // [36, tiles, C_out]

    for (block, out_rows) in tile_rows.chunks_mut(rows_per_block).enumerate() {
        let first_row = block * rows_per_block;
        let n = out_rows.len() * tiles.cols; // tiles in this block
        let v = &mut v[..n * POINTS * ci];
        v.par_chunks_mut(tiles.cols * POINTS * ci)
            .enumerate()
            .for_each(|(r, v_row)| {
                let row = first_row + r;
                let (b, ty) = (row / tiles.rows, row % tiles.rows);
                let (zeros, mut scratch) = (vec![0.0f32; ci], vec![0.0f32; POINTS * ci]);
                for (tx, v_tile) in v_row.chunks_exact_mut(POINTS * ci).enumerate() {
                    input_tile(&op, b, ty, tx, &zeros, &mut scratch, v_tile);
                }
            });
        let v: &[f32] = v;
        let m = &mut m[..POINTS * n * co];
        m.par_chunks_mut(n * co)
            .enumerate()
            .try_for_each(|(p, m_point)| {
                // M[p] [n, C_out] = V[:, p, :] [n, C_in] · U[p]ᵀ [C_in, C_out]
                matmul(
                    m_point,
                    co,
                    n,
                    co,
                    ci,
                    MatRef::new(&v[p * ci..], POINTS * ci, 1),
                    MatRef::new(&u[p * co * ci..][..co * ci], 1, ci),
                    false,
                    1.0,
                    Par::Sequential,
                )
            })?;
        let m: &[f32] = m;
        out_rows
            .par_iter_mut()
            .enumerate()
            .for_each(|(r, out_row)| {
                let row = first_row + r;
                let (b, ty) = (row / tiles.rows, row % tiles.rows);
                let mut scratch = vec![0.0f32; (TILE * ALPHA + TILE * TILE) * co];
                for tx in 0..tiles.cols {
                    let tile = r * tiles.cols + tx;
                    output_tile(&op, m, n, tile, (b, ty, tx), &mut scratch, out_row);
                }
            });
    }
    CpuTensor::new(op.out_shape(), out)
}

/// `out` (`batch` images of `height` rows of `row_len` floats) cut into one slice per tile row:
/// `TILE` image rows, fewer for an image's last tile row when `height` is not a multiple.
fn split_tile_rows(
    out: &mut [f32],
    batch: usize,
    height: usize,
    row_len: usize,
) -> Vec<&mut [f32]> {
    let mut rows = Vec::with_capacity(batch * height.div_ceil(TILE));
    let mut rest = out;
    for _ in 0..batch {
        for y0 in (0..height).step_by(TILE) {
            let (row, tail) = rest.split_at_mut(TILE.min(height - y0) * row_len);
            rows.push(row);
            rest = tail;
        }
    }
    rows
}

/// `U[p] = (G g Gᵀ)[p]` for every output/input channel pair, laid out `[36, C_out, C_in]`.
fn transform_weight(w: &[f32], ci: usize, co: usize) -> Vec<f32> {
    let mut u = vec![0.0f32; POINTS * co * ci];
    u.par_chunks_mut(co * ci)
        .enumerate()
        .for_each(|(p, u_point)| {
            let (i, j) = (p / ALPHA, p % ALPHA);
            let coef: [f32; 9] = std::array::from_fn(|k| G[i][k / 3] * G[j][k % 3]);
            for (o, u_row) in u_point.chunks_exact_mut(ci).enumerate() {
                let w_o = &w[o * 9 * ci..][..9 * ci]; // OHWI: [3, 3, C_in]
                for (k, &c) in coef.iter().enumerate() {
                    if c != 0.0 {
                        axpy(u_row, c, &w_o[k * ci..][..ci]);
                    }
                }
            }
        });
    u
}

/// `y += a · x`.
#[multiversion(targets = "simd")]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

/// The transformed input `Bᵀ d B` of tile `(ty, tx)` of image `b`, written `[36, C_in]`;
/// `scratch` holds `[36, C_in]` floats between the two passes, `zeros` `C_in` zeros (padding).
#[allow(clippy::too_many_arguments)]
fn input_tile(
    op: &Conv2d<'_, CpuTensor>,
    b: usize,
    ty: usize,
    tx: usize,
    zeros: &[f32],
    scratch: &mut [f32],
    v_tile: &mut [f32],
) {
    let (h, w, ci) = (op.in_h, op.in_w, op.c_in);
    let x = op.x.data();
    // Input pixel (TILE·ty + ky − 1, TILE·tx + kx − 1); outside the image it is zero padding.
    let pixel = |ky: usize, kx: usize| {
        let iy = (ty * TILE + ky).checked_sub(1).filter(|&iy| iy < h);
        let ix = (tx * TILE + kx).checked_sub(1).filter(|&ix| ix < w);
        match (iy, ix) {
            (Some(iy), Some(ix)) => &x[((b * h + iy) * w + ix) * ci..][..ci],
            _ => zeros,
        }
    };
    // Columns: scratch[ky', kx] = Σ_ky Bᵀ[ky', ky] · d[ky, kx].
    for kx in 0..ALPHA {
        let column = std::array::from_fn(|ky| pixel(ky, kx));
        input_1d(column, &mut scratch[kx * ci..], ALPHA * ci, ci);
    }
    // Rows: V[ky', kx'] = Σ_kx scratch[ky', kx] · B[kx, kx'].
    for ky in 0..ALPHA {
        let row = std::array::from_fn(|kx| &scratch[(ky * ALPHA + kx) * ci..][..ci]);
        input_1d(row, &mut v_tile[ky * ALPHA * ci..], ci, ci);
    }
}

/// `out[at ..][.. len][l] = value` for every channel `l`.
macro_rules! line {
    ($out:expr, $at:expr, $len:expr, |$l:ident| $value:expr) => {
        for ($l, o) in $out[$at..][..$len].iter_mut().enumerate() {
            *o = $value;
        }
    };
}

/// `Bᵀ d` along one line of six points, each a vector of `len` channels: output `k` goes to
/// `out[k·stride ..][.. len]`.
#[multiversion(targets = "simd")]
fn input_1d(d: [&[f32]; ALPHA], out: &mut [f32], stride: usize, len: usize) {
    let [d0, d1, d2, d3, d4, d5] = d.map(|v| &v[..len]);
    line!(out, 0, len, |l| 4.0 * d0[l] - 5.0 * d2[l] + d4[l]);
    line!(out, stride, len, |l| -4.0 * (d1[l] + d2[l]) + d3[l] + d4[l]);
    line!(out, 2 * stride, len, |l| 4.0 * (d1[l] - d2[l]) - d3[l]
        + d4[l]);
    line!(out, 3 * stride, len, |l| 2.0 * (d3[l] - d1[l]) - d2[l]
        + d4[l]);
    line!(out, 4 * stride, len, |l| 2.0 * (d1[l] - d3[l]) - d2[l]
        + d4[l]);
    line!(out, 5 * stride, len, |l| 4.0 * d1[l] - 5.0 * d3[l] + d5[l]);
}

/// Writes output tile `(ty, tx)` of image `b`: `Aᵀ m A` of GEMM row `tile` (of `n`) plus bias
/// and residual, clipped to the image, into `out_row` (that tile row's output rows). `scratch`
/// holds `[24 + 16, C_out]` floats.
#[allow(clippy::too_many_arguments)]
fn output_tile(
    op: &Conv2d<'_, CpuTensor>,
    m: &[f32],
    n: usize,
    tile: usize,
    (b, ty, tx): (usize, usize, usize),
    scratch: &mut [f32],
    out_row: &mut [f32],
) {
    let (oh, ow, co) = (op.out_h, op.out_w, op.c_out);
    let (columns, y) = scratch.split_at_mut(TILE * ALPHA * co);
    // Columns: columns[r, x] = Σ_y Aᵀ[r, y] · m[y, x].
    for x in 0..ALPHA {
        let column = std::array::from_fn(|yy| &m[((yy * ALPHA + x) * n + tile) * co..][..co]);
        output_1d(column, &mut columns[x * co..], ALPHA * co, co);
    }
    // Rows: y[r, c] = Σ_x columns[r, x] · A[x, c].
    for r in 0..TILE {
        let row = std::array::from_fn(|x| &columns[(r * ALPHA + x) * co..][..co]);
        output_1d(row, &mut y[r * TILE * co..], co, co);
    }
    for dy in 0..TILE.min(oh - ty * TILE) {
        for dx in 0..TILE.min(ow - tx * TILE) {
            let (oy, ox) = (ty * TILE + dy, tx * TILE + dx);
            let dst = &mut out_row[(dy * ow + ox) * co..][..co];
            dst.copy_from_slice(&y[(dy * TILE + dx) * co..][..co]);
            if let Some(bias) = op.bias {
                dst.iter_mut().zip(bias.data()).for_each(|(o, b)| *o += b);
            }
            if let Some(res) = op.residual {
                let at = ((b * oh + oy) * ow + ox) * co;
                dst.iter_mut()
                    .zip(&res.data()[at..])
                    .for_each(|(o, r)| *o += r);
            }
        }
    }
}

/// `Aᵀ m` along one line of six points, each a vector of `len` channels: output `k` goes to
/// `out[k·stride ..][.. len]`.
#[multiversion(targets = "simd")]
fn output_1d(m: [&[f32]; ALPHA], out: &mut [f32], stride: usize, len: usize) {
    let [m0, m1, m2, m3, m4, m5] = m.map(|v| &v[..len]);
    line!(out, 0, len, |l| m0[l] + (m1[l] + m2[l]) + (m3[l] + m4[l]));
    line!(out, stride, len, |l| (m1[l] - m2[l])
        + 2.0 * (m3[l] - m4[l]));
    line!(out, 2 * stride, len, |l| (m1[l] + m2[l])
        + 4.0 * (m3[l] + m4[l]));
    line!(out, 3 * stride, len, |l| (m1[l] - m2[l])
        + 8.0 * (m3[l] - m4[l])
        + m5[l]);
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_close, Rng};
    use super::super::CpuTensor;
    use super::*;
    use crate::backend::{contract, Tensor};

    /// Direct convolution, 3×3 stride 1 padding 1, in f64.
    fn conv_ref(x: &CpuTensor, w: &CpuTensor, bias: &CpuTensor, res: &CpuTensor) -> Vec<f64> {
        let [b, h, wd, ci] = x.shape()[..] else {
            panic!("x must be NHWC")
        };
        let co = w.shape()[0];
        let mut out = Vec::with_capacity(b * h * wd * co);
        for bi in 0..b {
            for oy in 0..h {
                for ox in 0..wd {
                    for o in 0..co {
                        let mut acc = bias.data()[o] as f64 + res.data()[out.len()] as f64;
                        for ky in 0..3usize {
                            for kx in 0..3usize {
                                let (Some(iy), Some(ix)) = (
                                    (oy + ky).checked_sub(1).filter(|&v| v < h),
                                    (ox + kx).checked_sub(1).filter(|&v| v < wd),
                                ) else {
                                    continue;
                                };
                                for c in 0..ci {
                                    acc += x.data()[((bi * h + iy) * wd + ix) * ci + c] as f64
                                        * w.data()[((o * 3 + ky) * 3 + kx) * ci + c] as f64;
                                }
                            }
                        }
                        out.push(acc);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn winograd_matches_direct_convolution() {
        let mut rng = Rng::new(71);
        // (x shape, C_out, block budget): sizes not multiples of the tile, channel counts not
        // multiples of 16, batch 2 across a block boundary, one tile row per block.
        let cases: &[([usize; 4], usize, usize)] = &[
            ([1, 16, 16, 16], 16, BLOCK_BUDGET),
            ([2, 13, 10, 20], 17, BLOCK_BUDGET),
            ([2, 9, 7, 33], 40, 1),
            ([1, 1, 30, 16], 24, BLOCK_BUDGET),
        ];
        for &(xs, co, budget) in cases {
            let x = rng.tensor(&xs, 1.0);
            let w = rng.tensor(&[co, 3, 3, xs[3]], 0.3);
            let bias = rng.tensor(&[co], 1.0);
            let res = rng.tensor(&[xs[0], xs[1], xs[2], co], 1.0);
            let op = contract::conv2d(&x, &w, Some(&bias), 1, 1, Some(&res)).unwrap();
            let got = conv3x3_blocked(op, budget).unwrap();
            let want = conv_ref(&x, &w, &bias, &res);
            assert_close(
                &format!("winograd {xs:?} -> {co}, budget {budget}"),
                &got,
                &[xs[0], xs[1], xs[2], co],
                &want,
            );
        }
    }

    #[test]
    fn applies_only_where_it_pays() {
        let mut rng = Rng::new(72);
        let x = rng.tensor(&[1, 16, 16, 16], 1.0);
        let w3 = rng.tensor(&[16, 3, 3, 16], 1.0);
        let w1 = rng.tensor(&[16, 1, 1, 16], 1.0);
        let thin = rng.tensor(&[3, 3, 3, 16], 1.0);
        let yes =
            |w, stride, pad| applies(&contract::conv2d(&x, w, None, stride, pad, None).unwrap());
        assert!(yes(&w3, 1, 1));
        assert!(!yes(&w3, 2, 1), "stride 2");
        assert!(!yes(&w3, 1, 0), "unpadded");
        assert!(!yes(&w1, 1, 0), "1×1");
        assert!(!yes(&thin, 1, 1), "3 output channels");
        let small = rng.tensor(&[1, 8, 8, 16], 1.0); // 4 tiles
        assert!(!applies(
            &contract::conv2d(&small, &w3, None, 1, 1, None).unwrap()
        ));
    }
}

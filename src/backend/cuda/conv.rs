//! Wrapper of `kernels/conv.cu` and `kernels/conv_sm90a.cu`: implicit GEMM on tensor cores when
//! `C_in % 8 == 0` (wgmma on Hopper once it passed its start-up check, mma.sync elsewhere; split
//! over K when its output tiles are too few to fill the chip, then a reduce), the direct kernel
//! otherwise (SD 2.1's conv_in with 4 latent channels, odd test shapes).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;

use super::backend::{CudaBackend, CudaTensor};
use super::kernels::params::ConvParams;
use super::kernels::{launch_error, per_element_config, to_i32};
use super::self_check::{agree, RandomTensors};
use crate::backend::contract::{self, Conv2d};
use crate::{Error, Result};

/// Tile sizes and shared memory of `conv2d_implicit_gemm` (see the kernel's header).
const TILE_M: usize = 128;
const TILE_N: usize = 128;
/// The portable implicit GEMM (mma.sync): k-tiles of 32, 3 stages of 128 × 40 halves per operand.
const IGEMM: ImplicitGemm = ImplicitGemm {
    name: "conv2d_implicit_gemm",
    tile_k: 32,
    smem: 3 * (128 + 128) * 40 * 2,
};

/// The Hopper kernel's name (loaded on compute capability 9.0 only).
pub(super) const HOPPER_KERNEL: &str = "conv2d_implicit_gemm_sm90";

/// The Hopper implicit GEMM (wgmma): k-tiles of 64, 4 stages of two 128 × 64 f16 tiles.
const IGEMM_SM90: ImplicitGemm = ImplicitGemm {
    name: HOPPER_KERNEL,
    tile_k: 64,
    smem: 4 * 2 * 128 * 64 * 2,
};

/// One implicit-GEMM kernel: both take the same arguments and 128 × 128 output tiles.
struct ImplicitGemm {
    name: &'static str,
    tile_k: usize,
    smem: usize,
}

/// Split-K for the implicit GEMM: `(splits, k_tiles_per_split)` for a grid of `blocks` output
/// tiles with `k_tiles` k-tiles of 32 on a device with `sm_count` multiprocessors. A grid with at
/// least one tile per multiprocessor is not split; a smaller one is split until it has about two
/// blocks per multiprocessor (the kernel's occupancy), each split keeping at least 8 k-tiles (a
/// deep enough pipeline) and at most 16 splits (the f32 partials stay small). E.g. SD 2.1's 8×8
/// convs at batch 2 (M = 128, N = 1280, K = 11 520: 10 tiles, 360 k-tiles) on 132
/// multiprocessors: 16 splits of 23 k-tiles.
fn split_k(blocks: usize, k_tiles: usize, sm_count: usize) -> (usize, usize) {
    if blocks == 0 || blocks >= sm_count || k_tiles < 16 {
        return (1, k_tiles);
    }
    let splits = (2 * sm_count)
        .div_ceil(blocks)
        .min(k_tiles / 8)
        .clamp(1, 16);
    let per_split = k_tiles.div_ceil(splits);
    (k_tiles.div_ceil(per_split), per_split)
}

/// NHWC conv: `x [B, H, W, C_in]`, `weight [C_out, kH, kW, C_in]`, `bias [C_out]`, symmetric
/// zero padding, `residual` (output-shaped) added in the epilogue.
pub(super) fn conv2d(be: &CudaBackend, op: Conv2d<'_, CudaTensor>) -> Result<CudaTensor> {
    let igemm = if be.hopper_conv_active() {
        &IGEMM_SM90
    } else {
        &IGEMM
    };
    conv2d_with(be, igemm, op)
}

/// The kernel's parameters for a checked conv (every size must fit an i32).
fn conv_params(op: &Conv2d<'_, CudaTensor>) -> Result<ConvParams> {
    const OP: &str = "conv2d";
    to_i32(OP, "kH·kW·C_in", op.patch_len())?;
    Ok(ConvParams {
        batch: to_i32(OP, "batch", op.batch)?,
        in_h: to_i32(OP, "H", op.in_h)?,
        in_w: to_i32(OP, "W", op.in_w)?,
        in_c: to_i32(OP, "C_in", op.c_in)?,
        out_h: to_i32(OP, "out H", op.out_h)?,
        out_w: to_i32(OP, "out W", op.out_w)?,
        out_c: to_i32(OP, "C_out", op.c_out)?,
        kernel_h: to_i32(OP, "kH", op.kernel_h)?,
        kernel_w: to_i32(OP, "kW", op.kernel_w)?,
        stride: to_i32(OP, "stride", op.stride)?,
        pad: to_i32(OP, "padding", op.padding)?,
        has_bias: op.bias.is_some() as i32,
        has_residual: op.residual.is_some() as i32,
        splits: 1,
        k_tiles_per_split: 0,
    })
}

/// [`conv2d`] with the implicit-GEMM kernel `igemm` (when `C_in % 8 == 0`).
fn conv2d_with(
    be: &CudaBackend,
    igemm: &ImplicitGemm,
    op: Conv2d<'_, CudaTensor>,
) -> Result<CudaTensor> {
    const OP: &str = "conv2d";
    let shape = op.out_shape();
    let n = op.pixels() * op.c_out; // checked by the contract
    let out = be.alloc_f16(OP, n)?;
    if n == 0 {
        return Ok(CudaTensor::new(shape, out));
    }
    let p = conv_params(&op)?;
    if op.c_in.is_multiple_of(8) {
        return implicit_gemm(be, igemm, &op, p, out);
    }
    direct(be, &op, p, out)
}

/// The implicit GEMM on tensor cores (`C_in % 8 == 0`), split over K when its tiles are too few.
fn implicit_gemm(
    be: &CudaBackend,
    igemm: &ImplicitGemm,
    op: &Conv2d<'_, CudaTensor>,
    p: ConvParams,
    mut out: CudaSlice<f16>,
) -> Result<CudaTensor> {
    const OP: &str = "conv2d";
    let (x, weight, bias, residual) = (op.x, op.weight, op.bias, op.residual);
    let (m, c_out, shape) = (op.pixels(), op.c_out, op.out_shape());
    let n = m * c_out;
    let grid_m = m.div_ceil(TILE_M);
    let grid_n = c_out.div_ceil(TILE_N);
    if grid_m > i32::MAX as usize || grid_n > 65535 {
        return Err(Error::too_large(
            OP,
            format!("output {shape:?} exceeds the grid limits"),
        ));
    }
    let k_tiles = op.patch_len().div_ceil(igemm.tile_k);
    let (splits, per_split) = split_k(grid_m * grid_n, k_tiles, be.kernels.sm_count);
    let p = ConvParams {
        splits: splits as i32,
        k_tiles_per_split: per_split as i32,
        ..p
    };
    // Without split-K the kernel never touches `partial`; one element keeps it a real buffer.
    let partial_len = if splits > 1 { splits * n } else { 1 };
    let mut partial = be.alloc_f32(OP, partial_len)?;
    let cfg = LaunchConfig {
        grid_dim: (grid_m as u32, grid_n as u32, splits as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: igemm.smem as u32,
    };
    let kernel = igemm.name;
    let f = be.kernels.get_with_smem(kernel, igemm.smem)?;
    let mut launch = be.stream.launch_builder(f);
    launch
        .arg(x.data.as_ref())
        .arg(weight.data.as_ref())
        .arg(bias.unwrap_or(x).data.as_ref())
        .arg(residual.unwrap_or(x).data.as_ref())
        .arg(&mut out)
        .arg(&mut partial)
        .arg(&p);
    // SAFETY: (const __half* x, const __half* w, const __half* bias, const __half* residual,
    // __half* y, float* partial, ConvParams p): x holds B·H·W·C_in f16, w C_out·kH·kW·C_in,
    // y and residual B·outH·outW·C_out, bias C_out (checked by `contract::conv2d`); input reads are
    // bounds-checked against H×W (padding reads nothing), weight rows against C_out and K;
    // bias/residual are read only when their flag is set (else x stands in, never read).
    // C_in % 8 == 0 keeps every 16-byte chunk inside one tap; the kernel gets exactly the
    // dynamic shared memory it indexes. With splits > 1, blockIdx.z < splits writes
    // partial[z, m, n] (splits·M·C_out f32 allocated above) and never y; with splits = 1,
    // partial (empty) is never touched.
    unsafe { launch.launch(cfg) }.map_err(launch_error(kernel))?;
    be.after_launch(kernel)?;
    if splits > 1 {
        let kernel = "conv2d_splitk_reduce";
        let cfg = per_element_config(n);
        let mut launch = be.stream.launch_builder(be.kernels.get(kernel)?);
        launch
            .arg(&partial)
            .arg(bias.unwrap_or(x).data.as_ref())
            .arg(residual.unwrap_or(x).data.as_ref())
            .arg(&mut out)
            .arg(&p);
        // SAFETY: (const float* partial, const __half* bias, const __half* residual,
        // __half* y, ConvParams p): partial holds p.splits·M·C_out f32, all written by the
        // launch above on the same stream; y and residual hold M·C_out f16, bias C_out,
        // each read only when its flag is set; a grid-stride loop stays below M·C_out.
        unsafe { launch.launch(cfg) }.map_err(launch_error(kernel))?;
        be.after_launch(kernel)?;
    }
    Ok(CudaTensor::new(shape, out))
}

/// The direct kernel: anything else (SD 2.1's conv_in with 4 latent channels, odd test shapes).
fn direct(
    be: &CudaBackend,
    op: &Conv2d<'_, CudaTensor>,
    p: ConvParams,
    mut out: CudaSlice<f16>,
) -> Result<CudaTensor> {
    let (x, weight, bias, residual) = (op.x, op.weight, op.bias, op.residual);
    let n = op.pixels() * op.c_out;
    let kernel = "conv2d_direct";
    let cfg = per_element_config(n);
    let mut launch = be.stream.launch_builder(be.kernels.get(kernel)?);
    launch
        .arg(x.data.as_ref())
        .arg(weight.data.as_ref())
        .arg(bias.unwrap_or(x).data.as_ref())
        .arg(residual.unwrap_or(x).data.as_ref())
        .arg(&mut out)
        .arg(&p);
    // SAFETY: (const __half* x, const __half* w, const __half* bias, const __half* residual,
    // __half* y, ConvParams p): x holds B·H·W·C_in f16, w C_out·kH·kW·C_in, y and residual
    // B·outH·outW·C_out, bias C_out (checked by `contract::conv2d`); input reads are bounds-checked against
    // H×W (padding reads nothing); bias/residual are read only when their flag is set (else x
    // stands in, never read); a grid-stride loop stays below B·outH·outW·C_out.
    unsafe { launch.launch(cfg) }.map_err(launch_error(kernel))?;
    be.after_launch(kernel)?;
    Ok(CudaTensor::new(op.out_shape(), out))
}

/// Runs the wgmma kernel and the portable one on the same random inputs (a plain conv with bias
/// and residual, and one split over K) and errors unless they agree (relative L2 ≤ 1e-2, all
/// finite): the CUDA backend uses the wgmma kernel only after this passed on its device.
/// The shapes [`hopper_self_check`] compares at, for the self-test's table.
pub(super) const HOPPER_CHECK_SHAPES: &str = "x [2, 9, 7, 64] → 72, [1, 4, 4, 512] → 64";

/// The wgmma kernel against the portable one at [`HOPPER_CHECK_SHAPES`]: the largest relative
/// L2 difference, or why they disagree.
pub(super) fn hopper_self_check(be: &CudaBackend) -> Result<f64> {
    let mut worst = 0.0f64;
    let mut random = RandomTensors::new(be, 0x2545_f491_4f6c_dd1d);
    // (x, C_out): 2 × 9 × 7 × 64 → 72 (m and n edges); 1 × 4 × 4 × 512 → 64 (split over K).
    for (x_shape, c_out) in [([2, 9, 7, 64], 72), ([1, 4, 4, 512], 64)] {
        let c_in = x_shape[3];
        let x = random.tensor(&x_shape, 1.0)?;
        let w = random.tensor(&[c_out, 3, 3, c_in], 1.0 / (9.0 * c_in as f32).sqrt())?;
        let b = random.tensor(&[c_out], 0.5)?;
        let r = random.tensor(&[x_shape[0], x_shape[1], x_shape[2], c_out], 1.0)?;
        let run = |igemm| {
            let op = contract::conv2d(&x, &w, Some(&b), 1, 1, Some(&r))?;
            conv2d_with(be, igemm, op)
        };
        let (want, got) = (run(&IGEMM)?, run(&IGEMM_SM90)?);
        let rel = agree(
            be,
            &got,
            &want,
            &format!("x {x_shape:?} → {c_out} channels"),
        )?;
        worst = worst.max(rel);
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::split_k;

    #[test]
    fn split_k_fills_small_grids_only() {
        // SD 2.1 at 512², batch 2, on 132 multiprocessors (H100/H200 SXM).
        assert_eq!(split_k(10, 360, 132), (16, 23)); // 8×8×1280 3×3: 10 tiles
        assert_eq!(split_k(40, 360, 132), (7, 52)); // 16×16×1280 3×3: 40 tiles
        assert_eq!(split_k(80, 180, 132), (4, 45)); // 32×32×640 3×3: 80 tiles
        assert_eq!(split_k(40, 20, 132), (2, 10)); // 16×16 1×1 shortcut 640→1280
        assert_eq!(split_k(192, 90, 132), (1, 90)); // 64×64×320: enough tiles already
        assert_eq!(split_k(10, 15, 132), (1, 15)); // too little K to split
        assert_eq!(split_k(1, 1000, 132), (16, 63)); // capped at 16 splits
                                                     // Every split is non-empty and together they cover K exactly once.
        for blocks in 1..140 {
            for k_tiles in 1..400 {
                let (splits, per) = split_k(blocks, k_tiles, 132);
                assert!((1..=16).contains(&splits));
                assert!(per * (splits - 1) < k_tiles && per * splits >= k_tiles);
                assert!(splits == 1 || per >= 8);
            }
        }
    }
}

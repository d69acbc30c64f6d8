//! Wrappers of `kernels/norm.cu`: group norm (statistics, finalize, apply) and layer norm.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::backend::{CudaBackend, CudaTensor};
use super::kernels::params::{GroupNormParams, LayerNormParams};
use super::kernels::{chunked_config, launch_error, to_i32};
use crate::backend::contract::{GroupNorm, LayerNorm};
use crate::backend::Activation;
use crate::{Error, Result};

/// Elements one statistics block reads (about 32 KB of f16): enough work per block, and
/// enough blocks (≥ 2 per SM on an H100 at 64×64×320) to fill the GPU.
const STATS_ELEMS_PER_BLOCK: usize = 16 * 1024;

/// Group norm over `x [B, .., C]`, `groups` groups of consecutive channels, then γ, β and
/// optionally SiLU.
pub(super) fn group_norm(be: &CudaBackend, op: GroupNorm<'_, CudaTensor>) -> Result<CudaTensor> {
    const OP: &str = "group_norm";
    let (x, gamma, beta, groups, eps) = (op.x, op.gamma, op.beta, op.groups, op.eps);
    let (batch, c, spatial) = (op.batch, op.channels, op.spatial);
    let n = x.numel();
    let mut out = be.alloc_f16(OP, n)?;
    if n == 0 {
        return Ok(CudaTensor::new(x.shape.clone(), out));
    }

    let vw = if c.is_multiple_of(8) { 8 } else { 1 };
    let vc = c / vw;
    let threads = if vc <= 256 {
        256
    } else {
        vc.next_multiple_of(32).min(1024)
    };
    let chunk_len = (STATS_ELEMS_PER_BLOCK / c).clamp(1, spatial);
    let chunks = spatial.div_ceil(chunk_len);
    let p = GroupNormParams {
        batch: to_i32(OP, "batch", batch)?,
        spatial: to_i32(OP, "spatial size", spatial)?,
        channels: to_i32(OP, "channels", c)?,
        groups: to_i32(OP, "groups", groups)?,
        chunks: to_i32(OP, "chunks", chunks)?,
        chunk_len: to_i32(OP, "chunk length", chunk_len)?,
        eps,
        silu: (op.activation == Activation::Silu) as i32,
    };
    to_i32(OP, "batch × groups", batch.saturating_mul(groups))?;
    if batch > 65535 {
        return Err(Error::too_large(
            OP,
            format!("batch {batch} exceeds the grid limit 65535"),
        ));
    }
    let mut partial = be.alloc_f32(OP, batch * groups * chunks * 2)?;
    let mut stats = be.alloc_f32(OP, batch * groups * 2)?;

    // 1. Partial sums per (batch, group, chunk).
    let k_stats = if vw == 8 {
        "group_norm_stats_v8"
    } else {
        "group_norm_stats_v1"
    };
    let smem = 2 * c * std::mem::size_of::<f32>();
    let f = be.kernels.get_with_smem(k_stats, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (to_i32(OP, "chunks", chunks)? as u32, batch as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut launch = be.stream.launch_builder(f);
    launch.arg(x.data.as_ref()).arg(&mut partial).arg(&p);
    // SAFETY: group_norm_stats_v{8,1}(const __half* x, float* partial, GroupNormParams p): x holds
    // B·spatial·C f16 (C % 8 == 0 for v8), blocks cover (chunk < chunks, b < B) and write
    // partial[((b·G + g)·chunks + chunk)·2 + {0,1}] < B·G·chunks·2 = partial.len(); shared memory
    // is the 2·C floats the kernel indexes.
    unsafe { launch.launch(cfg) }.map_err(launch_error(k_stats))?;
    be.after_launch(k_stats)?;

    // 2. (mean, rstd) per (batch, group): one warp each.
    const K_FIN: &str = "group_norm_finalize";
    let warps = batch * groups;
    let cfg = LaunchConfig {
        grid_dim: (warps.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = be.kernels.get(K_FIN)?;
    let mut launch = be.stream.launch_builder(f);
    launch
        .arg(x.data.as_ref())
        .arg(&partial)
        .arg(&mut stats)
        .arg(&p);
    // SAFETY: group_norm_finalize(const __half* x, const float* partial, float* stats,
    // GroupNormParams p): warp w < B·G reads partial[w·chunks·2 ..][..chunks·2] and writes
    // stats[2w], stats[2w + 1]; x is read at the first element of each group.
    unsafe { launch.launch(cfg) }.map_err(launch_error(K_FIN))?;
    be.after_launch(K_FIN)?;

    // 3. Normalise (+ SiLU).
    const K_APPLY: &str = "group_norm_apply";
    let f = be.kernels.get(K_APPLY)?;
    let mut launch = be.stream.launch_builder(f);
    launch
        .arg(x.data.as_ref())
        .arg(&stats)
        .arg(gamma.data.as_ref())
        .arg(beta.data.as_ref())
        .arg(&mut out)
        .arg(&p);
    // SAFETY: group_norm_apply(const __half* x, const float* stats, const __half* gamma,
    // const __half* beta, __half* y, GroupNormParams p): x and y hold B·spatial·C f16, gamma and
    // beta C (checked), stats B·G·2 floats written above.
    unsafe { launch.launch(chunked_config(n)) }.map_err(launch_error(K_APPLY))?;
    be.after_launch(K_APPLY)?;
    Ok(CudaTensor::new(x.shape.clone(), out))
}

/// Layer norm over the last dimension of `x [.., C]`.
pub(super) fn layer_norm(be: &CudaBackend, op: LayerNorm<'_, CudaTensor>) -> Result<CudaTensor> {
    const OP: &str = "layer_norm";
    const K: &str = "layer_norm_f16";
    let (x, gamma, beta, eps, rows, c) = (op.x, op.gamma, op.beta, op.eps, op.rows, op.channels);
    let mut out = be.alloc_f16(OP, x.numel())?;
    if rows == 0 || c == 0 {
        return Ok(CudaTensor::new(x.shape.clone(), out));
    }
    let p = LayerNormParams {
        rows: to_i32(OP, "rows", rows)?,
        channels: to_i32(OP, "channels", c)?,
        eps,
    };
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = be.kernels.get(K)?;
    let mut launch = be.stream.launch_builder(f);
    launch
        .arg(x.data.as_ref())
        .arg(gamma.data.as_ref())
        .arg(beta.data.as_ref())
        .arg(&mut out)
        .arg(&p);
    // SAFETY: layer_norm_f16(const __half* x, const __half* gamma, const __half* beta, __half* y,
    // LayerNormParams p): one warp per row r < rows touches x and y [r·C, (r+1)·C) and gamma/beta
    // [0, C) (shapes checked).
    unsafe { launch.launch(cfg) }.map_err(launch_error(K))?;
    be.after_launch(K)?;
    Ok(CudaTensor::new(x.shape.clone(), out))
}

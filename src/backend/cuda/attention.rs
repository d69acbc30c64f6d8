//! Wrapper of `kernels/attention.cu` and `kernels/attention_sm90a.cu`: head dim 64 goes to the
//! tensor-core flash kernel (wgmma on Hopper once it passed its start-up check, mma.sync
//! elsewhere), any other head dim up to 512 to the generic CUDA-core kernel sized for it.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::backend::{CudaBackend, CudaTensor};
use super::kernels::params::AttentionParams;
use super::kernels::{launch_error, to_i32};
use super::self_check::{agree, RandomTensors};
use crate::backend::contract::{self, Attention};
use crate::backend::Mask;
use crate::{Error, Result};

/// The largest head dim of the generic kernel (32 lanes × 16 registers per query).
const MAX_GENERIC_HEAD_DIM: usize = 512;
/// Queries per block of the flash kernel and of the generic one.
const FLASH_BQ: usize = 64;
const GENERIC_BQ: usize = 16;
/// Keys per tile of the generic kernel.
const GENERIC_BK: usize = 32;
/// The Hopper flash kernel (loaded on compute capability 9.0 only) and its dynamic shared memory:
/// Q, two K and two V tiles of 64 × 64 f16.
pub(super) const HOPPER_KERNEL: &str = "flash_attention_d64_sm90";
const HOPPER_SMEM: usize = 5 * 64 * 64 * 2;

/// Which tensor-core flash kernel runs head dim 64.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flash {
    /// `flash_attention_d64` (mma.sync, every supported GPU).
    MmaSync,
    /// `flash_attention_d64_sm90` (wgmma, Hopper, once it passed its start-up check).
    Wgmma,
}

/// `q [B, Nq, H·D]`, `k`/`v [B, Nk, H·D]` → `[B, Nq, H·D]`, scale 1/√D, optional causal mask.
pub(super) fn attention(be: &CudaBackend, op: Attention<'_, CudaTensor>) -> Result<CudaTensor> {
    let flash = if be.hopper_attention_active() {
        Flash::Wgmma
    } else {
        Flash::MmaSync
    };
    attention_with(be, flash, op)
}

/// The kernel's parameters for checked arguments (grid and i32 limits checked here).
fn attention_params(op: &Attention<'_, CudaTensor>) -> Result<AttentionParams> {
    const OP: &str = "attention";
    let d = op.head_dim;
    if d > MAX_GENERIC_HEAD_DIM {
        return Err(Error::too_large(
            OP,
            format!("head dim {d} is above the supported {MAX_GENERIC_HEAD_DIM}"),
        ));
    }
    let bh = op.batch * op.heads;
    if bh > 65535 {
        return Err(Error::too_large(
            OP,
            format!("batch × heads = {bh} exceeds the grid limit 65535"),
        ));
    }
    Ok(AttentionParams {
        batch: to_i32(OP, "batch", op.batch)?,
        heads: to_i32(OP, "heads", op.heads)?,
        q_len: to_i32(OP, "query length", op.q_len)?,
        kv_len: to_i32(OP, "key length", op.kv_len)?,
        head_dim: to_i32(OP, "head dim", d)?,
        causal: (op.mask == Mask::Causal) as i32,
        scale_log2: std::f32::consts::LOG2_E / (d as f32).sqrt(),
    })
}

/// The kernel for head dim `d` and its launch shape over `nq` queries and `bh` (batch, head) pairs.
fn kernel_for(flash: Flash, d: usize, nq: usize, bh: usize) -> (&'static str, LaunchConfig) {
    let flash_grid = (nq.div_ceil(FLASH_BQ) as u32, bh as u32, 1);
    if d == 64 && flash == Flash::Wgmma {
        let cfg = LaunchConfig {
            grid_dim: flash_grid,
            block_dim: (128, 1, 1),
            shared_mem_bytes: HOPPER_SMEM as u32,
        };
        return (HOPPER_KERNEL, cfg);
    }
    if d == 64 {
        let cfg = LaunchConfig {
            grid_dim: flash_grid,
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        return ("flash_attention_d64", cfg);
    }
    let kernel = match d.div_ceil(32).next_power_of_two() {
        1 => "attention_generic_1",
        2 => "attention_generic_2",
        4 => "attention_generic_4",
        8 => "attention_generic_8",
        _ => "attention_generic_16",
    };
    let smem = (GENERIC_BQ * d + GENERIC_BK * (d | 1) + GENERIC_BK * d) * 2;
    let cfg = LaunchConfig {
        grid_dim: (nq.div_ceil(GENERIC_BQ) as u32, bh as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    (kernel, cfg)
}

/// [`attention`], with head dim 64 on the `flash` kernel.
fn attention_with(
    be: &CudaBackend,
    flash: Flash,
    op: Attention<'_, CudaTensor>,
) -> Result<CudaTensor> {
    const OP: &str = "attention";
    let (q, k, v) = (op.q, op.k, op.v);
    let mut out = be.alloc_f16(OP, op.out_numel())?;
    if op.out_numel() == 0 {
        return Ok(CudaTensor::new(q.shape.clone(), out));
    }
    let p = attention_params(&op)?;
    let (kernel, cfg) = kernel_for(flash, op.head_dim, op.q_len, op.batch * op.heads);
    let f = be
        .kernels
        .get_with_smem(kernel, cfg.shared_mem_bytes as usize)?;
    let mut launch = be.stream.launch_builder(f);
    launch
        .arg(q.data.as_ref())
        .arg(k.data.as_ref())
        .arg(v.data.as_ref())
        .arg(&mut out)
        .arg(&p);
    // SAFETY: (const __half* q, const __half* k, const __half* v, __half* out, AttentionParams):
    // q and out hold B·Nq·H·D f16, k and v B·Nk·H·D (checked by `contract::attention`); block (x, y) reads
    // query rows < Nq and key rows < Nk of batch y / H, head y % H only, and writes its own query
    // rows. The flash kernel (D = 64) uses 46 KB of static shared memory; the wgmma one and the
    // generic one get exactly the dynamic size they index (limit raised by get_with_smem).
    unsafe { launch.launch(cfg) }.map_err(launch_error(kernel))?;
    be.after_launch(kernel)?;
    Ok(CudaTensor::new(q.shape.clone(), out))
}

/// Runs the wgmma flash kernel and the mma.sync one on the same random inputs (77 keys: a full
/// tile and a partial one; causal self-attention over three tiles) and errors unless they agree
/// (relative L2 ≤ 1e-2, all finite): the backend uses the wgmma kernel only after this passed.
/// The shapes [`hopper_self_check`] compares at, for the self-test's table.
pub(super) const HOPPER_CHECK_SHAPES: &str = "130 × 77 keys, 150 × 150 causal";

/// The wgmma kernel against the portable one at [`HOPPER_CHECK_SHAPES`]: the largest relative
/// L2 difference, or why they disagree.
pub(super) fn hopper_self_check(be: &CudaBackend) -> Result<f64> {
    let mut worst = 0.0f64;
    let mut random = RandomTensors::new(be, 0x9e37_79b9_7f4a_7c15);
    // (batch, queries, keys, heads, mask)
    for (batch, nq, nk, heads, mask) in
        [(2, 130, 77, 2, Mask::None), (1, 150, 150, 1, Mask::Causal)]
    {
        let q = random.tensor(&[batch, nq, heads * 64], 2.0)?;
        let k = random.tensor(&[batch, nk, heads * 64], 1.0)?;
        let v = random.tensor(&[batch, nk, heads * 64], 1.0)?;
        let run = |flash| attention_with(be, flash, contract::attention(&q, &k, &v, heads, mask)?);
        let (want, got) = (run(Flash::MmaSync)?, run(Flash::Wgmma)?);
        let what = format!("{nq} queries × {nk} keys (mask: {mask:?})");
        worst = worst.max(agree(be, &got, &want, &what)?);
    }
    Ok(worst)
}

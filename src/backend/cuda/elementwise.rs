//! Wrappers of `kernels/elementwise.cu`: the activations, add, per-channel add, GEGLU, nearest
//! upsample, channel concat and embedding. Each takes arguments `backend::contract` has checked,
//! allocates its output, and launches with [`chunked_config`] (one thread per 8 output elements).

use cudarc::driver::{CudaSlice, PushKernelArg};
use half::f16;

use super::backend::{CudaBackend, CudaTensor};
use super::kernels::params::{PadParams, UpsampleParams};
use super::kernels::{chunked_config, driver_error, launch_error, to_i32, to_i64};
use crate::backend::contract::{
    Add, AddPerChannel, ConcatChannels, Embedding, Geglu, Pad, UpsampleNearest,
};
use crate::{Error, Result};

/// Fills `buf` with the 16-bit pattern `bits` (debug-mode poisoning; 0xFFFF is a NaN).
pub(super) fn fill_u16(be: &CudaBackend, buf: &mut CudaSlice<f16>, bits: u16) -> Result<()> {
    const K: &str = "fill_u16";
    let n = buf.len();
    if n == 0 {
        return Ok(());
    }
    let n64 = to_i64(K, "element count", n)?;
    let f = be.kernels.get(K)?;
    let mut launch = be.stream.launch_builder(f);
    launch.arg(buf).arg(&n64).arg(&bits);
    // SAFETY: fill_u16(unsigned short* y, long long n, unsigned short bits): `buf` holds n
    // 16-bit elements; indices [0, n) only.
    unsafe { launch.launch(chunked_config(n)) }.map_err(launch_error(K))?;
    be.after_launch(K)
}

/// An elementwise activation `kernel(const __half* x, __half* y, long long n)`: `gelu_f16`,
/// `silu_f16`.
pub(super) fn unary(be: &CudaBackend, kernel: &'static str, x: &CudaTensor) -> Result<CudaTensor> {
    let n = x.numel();
    let mut out = be.alloc_f16(kernel, n)?;
    if n > 0 {
        let n64 = to_i64(kernel, "element count", n)?;
        let f = be.kernels.get(kernel)?;
        let mut launch = be.stream.launch_builder(f);
        launch.arg(x.data.as_ref()).arg(&mut out).arg(&n64);
        // SAFETY: (const __half* x, __half* y, long long n): x and out hold n f16 each; indices
        // [0, n) only.
        unsafe { launch.launch(chunked_config(n)) }.map_err(launch_error(kernel))?;
        be.after_launch(kernel)?;
    }
    Ok(CudaTensor::new(x.shape.clone(), out))
}

/// `a + b`, same shapes.
pub(super) fn add(be: &CudaBackend, op: Add<'_, CudaTensor>) -> Result<CudaTensor> {
    const K: &str = "add_f16";
    let (a, b) = (op.a, op.b);
    let n = a.numel();
    let mut out = be.alloc_f16("add", n)?;
    if n > 0 {
        let n64 = to_i64("add", "element count", n)?;
        let f = be.kernels.get(K)?;
        let mut launch = be.stream.launch_builder(f);
        launch
            .arg(a.data.as_ref())
            .arg(b.data.as_ref())
            .arg(&mut out)
            .arg(&n64);
        // SAFETY: add_f16(const __half* a, const __half* b, __half* y, long long n): all three
        // hold n f16 (same shapes, checked by the contract); indices [0, n) only.
        unsafe { launch.launch(chunked_config(n)) }.map_err(launch_error(K))?;
        be.after_launch(K)?;
    }
    Ok(CudaTensor::new(a.shape.clone(), out))
}

/// `x [B, .., C] + v [B, C]`, `v` broadcast over the middle dimensions.
pub(super) fn add_per_channel(
    be: &CudaBackend,
    op: AddPerChannel<'_, CudaTensor>,
) -> Result<CudaTensor> {
    const OP: &str = "add_per_channel";
    let (x, v, batch, c) = (op.x, op.v, op.batch, op.channels);
    let mut out = be.alloc_f16(OP, x.numel())?;
    let batch_elems = x.numel().checked_div(batch).unwrap_or(0);
    launch_add_per_channel(be, x, v, &mut out, c, batch_elems)?;
    Ok(CudaTensor::new(x.shape.clone(), out))
}

/// `out[i] = x[i] + v[(i / batch_elems)·C + i % C]`.
fn launch_add_per_channel(
    be: &CudaBackend,
    x: &CudaTensor,
    v: &CudaTensor,
    out: &mut CudaSlice<f16>,
    channels: usize,
    batch_elems: usize,
) -> Result<()> {
    const K: &str = "add_per_channel_f16";
    let n = x.numel();
    if n == 0 || channels == 0 {
        return Ok(());
    }
    let n64 = to_i64(K, "element count", n)?;
    let c32 = to_i32(K, "channels", channels)?;
    let be64 = to_i64(K, "batch size", batch_elems)?;
    let f = be.kernels.get(K)?;
    let mut launch = be.stream.launch_builder(f);
    launch
        .arg(x.data.as_ref())
        .arg(v.data.as_ref())
        .arg(out)
        .arg(&n64)
        .arg(&c32)
        .arg(&be64);
    // SAFETY: add_per_channel_f16(const __half* x, const __half* v, __half* y, long long n,
    // int channels, long long batch_elems): x and y hold n f16; every index into v is
    // (i / batch_elems)·channels + i % channels < B·channels = v.len() (shapes checked by the
    // caller).
    unsafe { launch.launch(chunked_config(n)) }.map_err(launch_error(K))?;
    be.after_launch(K)
}

/// `y [rows, N] += bias [N]` in place (the bias of a linear layer, after the GEMM).
pub(super) fn bias_add_inplace(
    be: &CudaBackend,
    y: &mut CudaSlice<f16>,
    bias: &CudaTensor,
) -> Result<()> {
    const K: &str = "bias_add_f16";
    let n = y.len();
    let channels = bias.numel();
    if n == 0 || channels == 0 {
        return Ok(());
    }
    if !n.is_multiple_of(channels) {
        return Err(Error::shape(
            "linear",
            format!("bias of {channels} values does not divide an output of {n}"),
        ));
    }
    let n64 = to_i64(K, "element count", n)?;
    let c32 = to_i32(K, "channels", channels)?;
    let f = be.kernels.get(K)?;
    let mut launch = be.stream.launch_builder(f);
    launch.arg(y).arg(bias.data.as_ref()).arg(&n64).arg(&c32);
    // SAFETY: bias_add_f16(__half* y, const __half* bias, long long n, int channels): y holds n
    // f16, bias `channels`; indices i < n and i % channels only.
    unsafe { launch.launch(chunked_config(n)) }.map_err(launch_error(K))?;
    be.after_launch(K)
}

/// GEGLU: `x [.., 2F]` → `x[.., :F] · gelu(x[.., F:])`.
pub(super) fn geglu(be: &CudaBackend, op: Geglu<'_, CudaTensor>) -> Result<CudaTensor> {
    const K: &str = "geglu_f16";
    let (x, rows, f_dim, shape) = (op.x, op.rows, op.features, op.out_shape);
    let n = rows * f_dim;
    let mut out = be.alloc_f16("geglu", n)?;
    if n > 0 {
        let n64 = to_i64("geglu", "element count", n)?;
        let f32_dim = to_i32("geglu", "F", f_dim)?;
        let f = be.kernels.get(K)?;
        let mut launch = be.stream.launch_builder(f);
        launch
            .arg(x.data.as_ref())
            .arg(&mut out)
            .arg(&n64)
            .arg(&f32_dim);
        // SAFETY: geglu_f16(const __half* x, __half* y, long long n, int f): y holds
        // n = rows·F f16, x holds rows·2F; output i reads x[(i / F)·2F + i % F (+ F)] < rows·2F.
        unsafe { launch.launch(chunked_config(n)) }.map_err(launch_error(K))?;
        be.after_launch(K)?;
    }
    Ok(CudaTensor::new(shape, out))
}

/// Nearest resize of `x [B, H, W, C]` to `[B, out_h, out_w, C]` (PyTorch's rule).
pub(super) fn upsample_nearest(
    be: &CudaBackend,
    op: UpsampleNearest<'_, CudaTensor>,
) -> Result<CudaTensor> {
    const OP: &str = "upsample_nearest";
    const K: &str = "upsample_nearest_f16";
    let (x, batch, h, w, c) = (op.x, op.batch, op.in_h, op.in_w, op.channels);
    let (out_h, out_w, shape) = (op.out_h, op.out_w, op.out_shape());
    let n = shape.iter().product();
    let mut out = be.alloc_f16(OP, n)?;
    if n > 0 {
        let p = UpsampleParams {
            batch: to_i32(OP, "batch", batch)?,
            in_h: to_i32(OP, "H", h)?,
            in_w: to_i32(OP, "W", w)?,
            out_h: to_i32(OP, "out_h", out_h)?,
            out_w: to_i32(OP, "out_w", out_w)?,
            channels: to_i32(OP, "C", c)?,
            // The same f32 the CPU backend computes, so both pick the same source pixels.
            scale_h: h as f32 / out_h as f32,
            scale_w: w as f32 / out_w as f32,
        };
        let f = be.kernels.get(K)?;
        let mut launch = be.stream.launch_builder(f);
        launch.arg(x.data.as_ref()).arg(&mut out).arg(&p);
        // SAFETY: upsample_nearest_f16(const __half* x, __half* y, UpsampleParams p): y holds
        // B·out_h·out_w·C f16, x B·H·W·C; source rows/columns are clamped to H−1/W−1.
        unsafe { launch.launch(chunked_config(n)) }.map_err(launch_error(K))?;
        be.after_launch(K)?;
    }
    Ok(CudaTensor::new(shape, out))
}

/// Zero padding of `x [B, H, W, C]` (see [`Pad`]).
pub(super) fn pad(be: &CudaBackend, op: Pad<'_, CudaTensor>) -> Result<CudaTensor> {
    const OP: &str = "pad";
    const K: &str = "pad_f16";
    let shape = op.out_shape();
    let n = shape.iter().product();
    let mut out = be.alloc_f16(OP, n)?;
    if n > 0 {
        let p = PadParams {
            batch: to_i32(OP, "batch", op.batch)?,
            in_h: to_i32(OP, "H", op.in_h)?,
            in_w: to_i32(OP, "W", op.in_w)?,
            out_h: to_i32(OP, "out_h", op.out_h)?,
            out_w: to_i32(OP, "out_w", op.out_w)?,
            channels: to_i32(OP, "C", op.channels)?,
            top: to_i32(OP, "top", op.padding.top)?,
            left: to_i32(OP, "left", op.padding.left)?,
        };
        let f = be.kernels.get(K)?;
        let mut launch = be.stream.launch_builder(f);
        launch.arg(op.x.data.as_ref()).arg(&mut out).arg(&p);
        // SAFETY: pad_f16(const __half* x, __half* y, PadParams p): y holds
        // B·out_h·out_w·C f16; x B·H·W·C, read only at (oy − top, ox − left) inside [0, H)×[0, W).
        unsafe { launch.launch(chunked_config(n)) }.map_err(launch_error(K))?;
        be.after_launch(K)?;
    }
    Ok(CudaTensor::new(shape, out))
}

/// `[.., Ca]`, `[.., Cb]` → `[.., Ca + Cb]`.
pub(super) fn concat_channels(
    be: &CudaBackend,
    op: ConcatChannels<'_, CudaTensor>,
) -> Result<CudaTensor> {
    const OP: &str = "concat_channels";
    const K: &str = "concat_channels_f16";
    let (a, b, rows, ca, cb) = (op.a, op.b, op.rows, op.a_channels, op.b_channels);
    let shape = op.out_shape;
    let n = rows * (ca + cb);
    let mut out = be.alloc_f16(OP, n)?;
    if n > 0 {
        let rows64 = to_i64(OP, "rows", rows)?;
        let ca32 = to_i32(OP, "Ca", ca)?;
        let cb32 = to_i32(OP, "Cb", cb)?;
        to_i32(OP, "Ca + Cb", ca + cb)?;
        let f = be.kernels.get(K)?;
        let mut launch = be.stream.launch_builder(f);
        launch
            .arg(a.data.as_ref())
            .arg(b.data.as_ref())
            .arg(&mut out)
            .arg(&rows64)
            .arg(&ca32)
            .arg(&cb32);
        // SAFETY: concat_channels_f16(const __half* a, const __half* b, __half* y,
        // long long rows, int ca, int cb): a holds rows·Ca, b rows·Cb, y rows·(Ca+Cb) f16
        // (leading dimensions checked equal by the contract).
        unsafe { launch.launch(chunked_config(n)) }.map_err(launch_error(K))?;
        be.after_launch(K)?;
    }
    Ok(CudaTensor::new(shape, out))
}

/// Row gather: `table [V, D]`, `ids` → `[ids.len(), D]`; an id ≥ V is an error.
pub(super) fn embedding(be: &CudaBackend, op: Embedding<'_, CudaTensor>) -> Result<CudaTensor> {
    const OP: &str = "embedding";
    const K: &str = "embedding_f16";
    let (ids, table, d) = (op.ids, op.table, op.dim);
    let n = ids.len() * d;
    let mut out = be.alloc_f16(OP, n)?;
    if n > 0 {
        let ids_dev = be
            .stream
            .clone_htod(ids)
            .map_err(driver_error("copying token ids to the device"))?;
        let n_ids = to_i64(OP, "ids", ids.len())?;
        let d32 = to_i32(OP, "D", d)?;
        let f = be.kernels.get(K)?;
        let mut launch = be.stream.launch_builder(f);
        launch
            .arg(&ids_dev)
            .arg(table.data.as_ref())
            .arg(&mut out)
            .arg(&n_ids)
            .arg(&d32);
        // SAFETY: embedding_f16(const unsigned* ids, const __half* table, __half* y,
        // long long n_ids, int d): ids_dev holds n_ids ids, each < V (checked by the contract), table V·D
        // f16, y n_ids·D f16.
        unsafe { launch.launch(chunked_config(n)) }.map_err(launch_error(K))?;
        be.after_launch(K)?;
    }
    Ok(CudaTensor::new(vec![ids.len(), d], out))
}

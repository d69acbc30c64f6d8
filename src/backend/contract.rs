//! The op set's argument rules, checked once before any backend computes: each op's shapes,
//! scalar ranges and output size. [`super::Backend`] calls these and hands the checked arguments
//! (with the geometry they imply; no other module can build them) to the backend's
//! [`super::Compute`]; a backend only computes.
//!
//! A mismatch between tensors is a caller's bug (`Error::Shape`, or `Error::InvalidArgument` for a
//! bad scalar); an output too large to index or allocate is `Error::TooLarge`.

use crate::tensor::HostTensor;
use crate::{Error, Result};

/// The private field of every checked argument struct: only this module can build one.
#[derive(Debug, Clone, Copy)]
struct Checked;

/// What every backend's tensor answers about itself.
pub trait Tensor: Clone + Send + Sync {
    /// The shape, row-major, channels last.
    fn shape(&self) -> &[usize];
}

/// The product of `shape`, or `None` on overflow.
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// The element count of an op's output `shape`, or an error when it would not fit in memory
/// (f32 storage, the widest any backend uses, above `isize::MAX` bytes).
pub fn output_numel(op: &'static str, shape: &[usize]) -> Result<usize> {
    numel(shape)
        .filter(|n| {
            n.checked_mul(std::mem::size_of::<f32>())
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .ok_or_else(|| Error::too_large(op, format!("output {shape:?} is too large")))
}

/// `[.., C]` → `(rows, C)`; a 0-dimensional tensor is an error.
fn rows_and_last(op: &'static str, what: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape.split_last() {
        Some((&last, lead)) => Ok((lead.iter().product(), last)),
        None => Err(Error::shape(
            op,
            format!("{what} needs at least 1 dimension, got a scalar"),
        )),
    }
}

/// `[B, .., C]` → `(B, C)`; fewer than 2 dimensions is an error.
fn batch_and_channels(op: &'static str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape {
        [b, .., c] if shape.len() >= 2 => Ok((*b, *c)),
        _ => Err(Error::shape(
            op,
            format!("x must be [B, .., C], got {shape:?}"),
        )),
    }
}

/// Errors unless `shape` is exactly `want`.
fn expect_shape(op: &'static str, what: &str, shape: &[usize], want: &[usize]) -> Result<()> {
    if shape == want {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            format!("{what} must have shape {want:?}, got {shape:?}"),
        ))
    }
}

/// `shape` with its last dimension replaced by `last`.
fn with_last(shape: &[usize], last: usize) -> Vec<usize> {
    let mut out = shape.to_vec();
    if let Some(l) = out.last_mut() {
        *l = last;
    }
    out
}

fn check_eps(op: &'static str, eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{op}: eps must be finite and ≥ 0, got {eps}"
        )))
    }
}

/// A host tensor whose data holds exactly its shape's element count (its fields are public).
pub fn upload(host: &HostTensor) -> Result<()> {
    match numel(&host.shape) {
        Some(n) if n == host.data.len() => Ok(()),
        _ => Err(Error::shape(
            "upload",
            format!(
                "shape {:?} does not hold {} values",
                host.shape,
                host.data.len()
            ),
        )),
    }
}

/// Reshape keeps the element count: the new shape, checked.
pub fn reshape(from: &[usize], shape: &[usize]) -> Result<Vec<usize>> {
    let values = numel(from).unwrap_or(usize::MAX);
    if numel(shape) != Some(values) {
        return Err(Error::shape(
            "reshape",
            format!("cannot view {from:?} ({values} values) as {shape:?}"),
        ));
    }
    Ok(shape.to_vec())
}

/// Checked `linear`: `x [rows, k]` (leading dims flattened), `weight [n, k]`, `bias [n]`.
pub struct Linear<'a, T> {
    pub x: &'a T,
    pub weight: &'a T,
    pub bias: Option<&'a T>,
    pub rows: usize,
    pub k: usize,
    pub n: usize,
    /// `x`'s shape with the last dimension `n`.
    pub out_shape: Vec<usize>,
    /// Only this module builds checked arguments.
    _checked: Checked,
}

pub fn linear<'a, T: Tensor>(
    x: &'a T,
    weight: &'a T,
    bias: Option<&'a T>,
) -> Result<Linear<'a, T>> {
    const OP: &str = "linear";
    let (rows, k) = rows_and_last(OP, "x", x.shape())?;
    let [n, wk] = weight.shape()[..] else {
        return Err(Error::shape(
            OP,
            format!("weight must be [N, K], got {:?}", weight.shape()),
        ));
    };
    if wk != k {
        return Err(Error::shape(
            OP,
            format!(
                "x {:?} has {k} features but weight {:?} expects {wk}",
                x.shape(),
                weight.shape()
            ),
        ));
    }
    if let Some(b) = bias {
        expect_shape(OP, "bias", b.shape(), &[n])?;
    }
    let out_shape = with_last(x.shape(), n);
    output_numel(OP, &out_shape)?; // x [2⁴⁰, 0] with weight [2⁴⁰, 0] would not fit
    Ok(Linear {
        x,
        weight,
        bias,
        rows,
        k,
        n,
        out_shape,
        _checked: Checked,
    })
}

/// Checked `conv2d`: NHWC `x [batch, in_h, in_w, c_in]`, OHWI `weight [c_out, kernel_h, kernel_w,
/// c_in]`, `bias [c_out]`, `residual [batch, out_h, out_w, c_out]`.
pub struct Conv2d<'a, T> {
    pub x: &'a T,
    pub weight: &'a T,
    pub bias: Option<&'a T>,
    pub residual: Option<&'a T>,
    pub batch: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    /// ≥ 1.
    pub stride: usize,
    pub padding: usize,
    pub out_h: usize,
    pub out_w: usize,
    /// Only this module builds checked arguments.
    _checked: Checked,
}

impl<T> Conv2d<'_, T> {
    pub fn out_shape(&self) -> Vec<usize> {
        vec![self.batch, self.out_h, self.out_w, self.c_out]
    }

    /// Output pixels `batch · out_h · out_w` (the GEMM's M).
    pub fn pixels(&self) -> usize {
        self.batch * self.out_h * self.out_w
    }

    /// The patch length `kernel_h · kernel_w · c_in` (the GEMM's K).
    pub fn patch_len(&self) -> usize {
        self.kernel_h * self.kernel_w * self.c_in
    }
}

/// Output size of one spatial dimension, or an error when the kernel does not fit.
fn conv_out_size(input: usize, kernel: usize, stride: usize, padding: usize) -> Result<usize> {
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

pub fn conv2d<'a, T: Tensor>(
    x: &'a T,
    weight: &'a T,
    bias: Option<&'a T>,
    stride: usize,
    padding: usize,
    residual: Option<&'a T>,
) -> Result<Conv2d<'a, T>> {
    const OP: &str = "conv2d";
    let [batch, in_h, in_w, c_in] = x.shape()[..] else {
        return Err(Error::shape(
            OP,
            format!("x must be [B, H, W, C_in], got {:?}", x.shape()),
        ));
    };
    let [c_out, kernel_h, kernel_w, weight_c_in] = weight.shape()[..] else {
        return Err(Error::shape(
            OP,
            format!(
                "weight must be [C_out, kH, kW, C_in], got {:?}",
                weight.shape()
            ),
        ));
    };
    if weight_c_in != c_in {
        return Err(Error::shape(
            OP,
            format!(
                "x {:?} has {c_in} channels but weight {:?} expects {weight_c_in}",
                x.shape(),
                weight.shape()
            ),
        ));
    }
    if stride == 0 {
        return Err(Error::InvalidArgument("conv2d: stride must be ≥ 1".into()));
    }
    let conv = Conv2d {
        x,
        weight,
        bias,
        residual,
        batch,
        in_h,
        in_w,
        c_in,
        c_out,
        kernel_h,
        kernel_w,
        stride,
        padding,
        out_h: conv_out_size(in_h, kernel_h, stride, padding)?,
        out_w: conv_out_size(in_w, kernel_w, stride, padding)?,
        _checked: Checked,
    };
    let out_shape = conv.out_shape();
    output_numel(OP, &out_shape)?;
    if let Some(b) = bias {
        expect_shape(OP, "bias", b.shape(), &[c_out])?;
    }
    if let Some(r) = residual {
        expect_shape(OP, "residual", r.shape(), &out_shape)?;
    }
    Ok(conv)
}

/// Whether a group norm is followed by SiLU (the fused `GroupNorm → SiLU` of every resnet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Silu,
}

/// Checked `group_norm`: `x [batch, spatial.., channels]`, `channels % groups == 0`.
pub struct GroupNorm<'a, T> {
    pub x: &'a T,
    pub gamma: &'a T,
    pub beta: &'a T,
    pub groups: usize,
    pub eps: f32,
    pub activation: Activation,
    pub batch: usize,
    /// The product of the middle dimensions.
    pub spatial: usize,
    pub channels: usize,
    /// Only this module builds checked arguments.
    _checked: Checked,
}

pub fn group_norm<'a, T: Tensor>(
    x: &'a T,
    groups: usize,
    gamma: &'a T,
    beta: &'a T,
    eps: f32,
    activation: Activation,
) -> Result<GroupNorm<'a, T>> {
    const OP: &str = "group_norm";
    let (batch, channels) = batch_and_channels(OP, x.shape())?;
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(Error::shape(
            OP,
            format!("{channels} channels cannot be split into {groups} groups"),
        ));
    }
    expect_shape(OP, "gamma", gamma.shape(), &[channels])?;
    expect_shape(OP, "beta", beta.shape(), &[channels])?;
    check_eps(OP, eps)?;
    let shape = x.shape();
    Ok(GroupNorm {
        x,
        gamma,
        beta,
        groups,
        eps,
        activation,
        batch,
        spatial: shape[1..shape.len() - 1].iter().product(),
        channels,
        _checked: Checked,
    })
}

/// Checked `layer_norm`: `x [rows, channels]` (leading dims flattened).
pub struct LayerNorm<'a, T> {
    pub x: &'a T,
    pub gamma: &'a T,
    pub beta: &'a T,
    pub eps: f32,
    pub rows: usize,
    pub channels: usize,
    /// Only this module builds checked arguments.
    _checked: Checked,
}

pub fn layer_norm<'a, T: Tensor>(
    x: &'a T,
    gamma: &'a T,
    beta: &'a T,
    eps: f32,
) -> Result<LayerNorm<'a, T>> {
    const OP: &str = "layer_norm";
    let (rows, channels) = rows_and_last(OP, "x", x.shape())?;
    expect_shape(OP, "gamma", gamma.shape(), &[channels])?;
    expect_shape(OP, "beta", beta.shape(), &[channels])?;
    check_eps(OP, eps)?;
    Ok(LayerNorm {
        x,
        gamma,
        beta,
        eps,
        rows,
        channels,
        _checked: Checked,
    })
}

/// Whether attention masks key j > query i (CLIP's text encoder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    None,
    Causal,
}

/// Checked `attention`: `q [batch, q_len, heads · head_dim]`, `k`, `v [batch, kv_len, heads ·
/// head_dim]`. `kv_len > 0` unless the output is empty.
pub struct Attention<'a, T> {
    pub q: &'a T,
    pub k: &'a T,
    pub v: &'a T,
    pub heads: usize,
    pub mask: Mask,
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    /// Only this module builds checked arguments.
    _checked: Checked,
}

impl<T> Attention<'_, T> {
    /// Elements of the output `[batch, q_len, heads · head_dim]`.
    pub fn out_numel(&self) -> usize {
        self.batch * self.q_len * self.heads * self.head_dim
    }
}

pub fn attention<'a, T: Tensor>(
    q: &'a T,
    k: &'a T,
    v: &'a T,
    heads: usize,
    mask: Mask,
) -> Result<Attention<'a, T>> {
    const OP: &str = "attention";
    let [batch, q_len, channels] = q.shape()[..] else {
        return Err(Error::shape(
            OP,
            format!("q must be [B, Nq, H·D], got {:?}", q.shape()),
        ));
    };
    let [k_batch, kv_len, k_channels] = k.shape()[..] else {
        return Err(Error::shape(
            OP,
            format!("k must be [B, Nk, H·D], got {:?}", k.shape()),
        ));
    };
    expect_shape(OP, "v", v.shape(), k.shape())?;
    if k_batch != batch || k_channels != channels {
        return Err(Error::shape(
            OP,
            format!(
                "k/v {:?} do not match q {:?} in batch or channels",
                k.shape(),
                q.shape()
            ),
        ));
    }
    if heads == 0 || !channels.is_multiple_of(heads) {
        return Err(Error::shape(
            OP,
            format!("{channels} channels cannot be split into {heads} heads"),
        ));
    }
    let attention = Attention {
        q,
        k,
        v,
        heads,
        mask,
        batch,
        q_len,
        kv_len,
        head_dim: channels / heads,
        _checked: Checked,
    };
    if kv_len == 0 && attention.out_numel() > 0 {
        return Err(Error::shape(OP, "attention over zero keys is undefined"));
    }
    Ok(attention)
}

/// Checked `geglu`: `x [rows, 2 · features]` → `[.., features]`.
pub struct Geglu<'a, T> {
    pub x: &'a T,
    pub rows: usize,
    pub features: usize,
    pub out_shape: Vec<usize>,
    /// Only this module builds checked arguments.
    _checked: Checked,
}

pub fn geglu<T: Tensor>(x: &T) -> Result<Geglu<'_, T>> {
    const OP: &str = "geglu";
    let (rows, two_f) = rows_and_last(OP, "x", x.shape())?;
    if !two_f.is_multiple_of(2) {
        return Err(Error::shape(
            OP,
            format!(
                "last dimension must be even (hidden ‖ gate), got {:?}",
                x.shape()
            ),
        ));
    }
    Ok(Geglu {
        x,
        rows,
        features: two_f / 2,
        out_shape: with_last(x.shape(), two_f / 2),
        _checked: Checked,
    })
}

/// Checked `add`: two tensors of one shape.
pub struct Add<'a, T> {
    pub a: &'a T,
    pub b: &'a T,
    /// Only this module builds checked arguments.
    _checked: Checked,
}

pub fn add<'a, T: Tensor>(a: &'a T, b: &'a T) -> Result<Add<'a, T>> {
    expect_shape("add", "b", b.shape(), a.shape())?;
    Ok(Add {
        a,
        b,
        _checked: Checked,
    })
}

/// Checked `add_per_channel`: `x [batch, .., channels] + v [batch, channels]`.
pub struct AddPerChannel<'a, T> {
    pub x: &'a T,
    pub v: &'a T,
    pub batch: usize,
    pub channels: usize,
    /// Only this module builds checked arguments.
    _checked: Checked,
}

pub fn add_per_channel<'a, T: Tensor>(x: &'a T, v: &'a T) -> Result<AddPerChannel<'a, T>> {
    const OP: &str = "add_per_channel";
    let (batch, channels) = batch_and_channels(OP, x.shape())?;
    expect_shape(OP, "v", v.shape(), &[batch, channels])?;
    Ok(AddPerChannel {
        x,
        v,
        batch,
        channels,
        _checked: Checked,
    })
}

/// Zero padding of an NHWC tensor's two spatial dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

/// Checked `pad`: `x [batch, in_h, in_w, channels]` → `[batch, in_h + top + bottom, in_w + left +
/// right, channels]`.
pub struct Pad<'a, T> {
    pub x: &'a T,
    pub batch: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub channels: usize,
    pub padding: Padding,
    pub out_h: usize,
    pub out_w: usize,
    /// Only this module builds checked arguments.
    _checked: Checked,
}

impl<T> Pad<'_, T> {
    pub fn out_shape(&self) -> Vec<usize> {
        vec![self.batch, self.out_h, self.out_w, self.channels]
    }
}

pub fn pad<T: Tensor>(x: &T, padding: Padding) -> Result<Pad<'_, T>> {
    const OP: &str = "pad";
    let [batch, in_h, in_w, channels] = x.shape()[..] else {
        return Err(Error::shape(
            OP,
            format!("x must be [B, H, W, C], got {:?}", x.shape()),
        ));
    };
    let grow = |size: usize, a: usize, b: usize| size.checked_add(a)?.checked_add(b);
    let (Some(out_h), Some(out_w)) = (
        grow(in_h, padding.top, padding.bottom),
        grow(in_w, padding.left, padding.right),
    ) else {
        return Err(Error::too_large(
            OP,
            format!("padding {padding:?} overflows"),
        ));
    };
    output_numel(OP, &[batch, out_h, out_w, channels])?;
    Ok(Pad {
        x,
        batch,
        in_h,
        in_w,
        channels,
        padding,
        out_h,
        out_w,
        _checked: Checked,
    })
}

/// Checked `upsample_nearest`: `x [batch, in_h, in_w, channels]` → `[batch, out_h, out_w,
/// channels]`, every spatial size positive.
pub struct UpsampleNearest<'a, T> {
    pub x: &'a T,
    pub batch: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub channels: usize,
    pub out_h: usize,
    pub out_w: usize,
    /// Only this module builds checked arguments.
    _checked: Checked,
}

impl<T> UpsampleNearest<'_, T> {
    pub fn out_shape(&self) -> Vec<usize> {
        vec![self.batch, self.out_h, self.out_w, self.channels]
    }
}

pub fn upsample_nearest<T: Tensor>(
    x: &T,
    out_h: usize,
    out_w: usize,
) -> Result<UpsampleNearest<'_, T>> {
    const OP: &str = "upsample_nearest";
    let [batch, in_h, in_w, channels] = x.shape()[..] else {
        return Err(Error::shape(
            OP,
            format!("x must be [B, H, W, C], got {:?}", x.shape()),
        ));
    };
    if in_h == 0 || in_w == 0 || out_h == 0 || out_w == 0 {
        return Err(Error::InvalidArgument(format!(
            "{OP}: cannot resize {in_h}×{in_w} to {out_h}×{out_w} (sizes must be positive)"
        )));
    }
    output_numel(OP, &[batch, out_h, out_w, channels])?;
    // With B = 0 or C = 0 the output is empty, but per-row index tables are not.
    output_numel(OP, &[batch.max(1), out_h, out_w, channels.max(1)])?;
    Ok(UpsampleNearest {
        x,
        batch,
        in_h,
        in_w,
        channels,
        out_h,
        out_w,
        _checked: Checked,
    })
}

/// Checked `concat_channels`: `a [rows, a_channels]`, `b [rows, b_channels]` with equal leading
/// dimensions.
pub struct ConcatChannels<'a, T> {
    pub a: &'a T,
    pub b: &'a T,
    pub rows: usize,
    pub a_channels: usize,
    pub b_channels: usize,
    pub out_shape: Vec<usize>,
    /// Only this module builds checked arguments.
    _checked: Checked,
}

pub fn concat_channels<'a, T: Tensor>(a: &'a T, b: &'a T) -> Result<ConcatChannels<'a, T>> {
    const OP: &str = "concat_channels";
    let (rows, a_channels) = rows_and_last(OP, "a", a.shape())?;
    let (_, b_channels) = rows_and_last(OP, "b", b.shape())?;
    let (a_lead, b_lead) = (
        &a.shape()[..a.shape().len() - 1],
        &b.shape()[..b.shape().len() - 1],
    );
    if a_lead != b_lead {
        return Err(Error::shape(
            OP,
            format!(
                "leading dimensions differ: {:?} vs {:?}",
                a.shape(),
                b.shape()
            ),
        ));
    }
    let out_shape = with_last(a.shape(), a_channels + b_channels);
    output_numel(OP, &out_shape)?;
    Ok(ConcatChannels {
        a,
        b,
        rows,
        a_channels,
        b_channels,
        out_shape,
        _checked: Checked,
    })
}

/// Checked `embedding`: `table [vocab, dim]`, every id < vocab.
pub struct Embedding<'a, T> {
    pub ids: &'a [u32],
    pub table: &'a T,
    pub vocab: usize,
    pub dim: usize,
    /// Only this module builds checked arguments.
    _checked: Checked,
}

pub fn embedding<'a, T: Tensor>(ids: &'a [u32], table: &'a T) -> Result<Embedding<'a, T>> {
    const OP: &str = "embedding";
    let [vocab, dim] = table.shape()[..] else {
        return Err(Error::shape(
            OP,
            format!("table must be [V, D], got {:?}", table.shape()),
        ));
    };
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::InvalidArgument(format!(
            "{OP}: id {bad} is out of range for a table of {vocab} rows"
        )));
    }
    output_numel(OP, &[ids.len(), dim])?;
    Ok(Embedding {
        ids,
        table,
        vocab,
        dim,
        _checked: Checked,
    })
}

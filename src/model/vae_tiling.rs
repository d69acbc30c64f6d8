//! Tiled VAE decode and encode with diffusers' `enable_vae_tiling()` semantics: overlapping
//! tiles run one at a time, each blended linearly into its upper and left neighbours, cropped
//! and joined, so memory stays that of one tile whatever the image size.

use crate::config::VaeConfig;
use crate::error::Error;
use crate::tensor::HostTensor;
use crate::Result;

/// diffusers' `tile_overlap_factor`.
const OVERLAP_FACTOR: f64 = 0.25;

/// When the VAE tiles an image larger than one tile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum VaeTiling {
    /// Only when the untiled pass would not fit in the backend's available memory.
    #[default]
    Auto,
    /// Whenever the image is larger than one tile (diffusers' `enable_vae_tiling()`).
    Always,
}

impl VaeTiling {
    /// `Always` when a user asked for tiling (`--vae-tiling`), else `Auto`.
    pub fn forced(always: bool) -> Self {
        if always {
            VaeTiling::Always
        } else {
            VaeTiling::Auto
        }
    }

    /// Whether a pass of `geometry` over NHWC `input` runs in tiles: never for an input of one
    /// tile; else always, or (`Auto`) when `working_set` bytes exceed what `available` reports
    /// (asked only then).
    fn applies(
        self,
        geometry: &TileGeometry,
        input: &HostTensor,
        working_set: u64,
        available: impl FnOnce() -> Option<u64>,
    ) -> bool {
        let splits = matches!(input.shape[..], [_, h, w, _] if geometry.splits(h, w));
        splits
            && match self {
                VaeTiling::Always => true,
                VaeTiling::Auto => available().is_some_and(|free| working_set > free),
            }
    }

    /// `pass` over NHWC `input`, in tiles ([`run_tiled`]) where [`VaeTiling::applies`], else
    /// whole.
    pub fn run(
        self,
        geometry: &TileGeometry,
        input: &HostTensor,
        working_set: u64,
        available: impl FnOnce() -> Option<u64>,
        mut pass: impl FnMut(&HostTensor) -> Result<HostTensor>,
    ) -> Result<HostTensor> {
        if self.applies(geometry, input, working_set, available) {
            run_tiled(input, geometry, pass)
        } else {
            pass(input)
        }
    }
}

/// The bytes an untiled VAE pass needs at its full resolution, estimated as five f32 tensors of
/// its widest full-resolution layer over `batch_pixels` (images × pixels): 12.1 GB for SD 2.1's
/// decoder at 1536², where the measured peak RSS was 12.0 GB with the weights
/// (bench/results/2026-12-04-vae-decode-1536.txt).
pub fn untiled_working_set(batch_pixels: usize, channels: usize) -> u64 {
    const LIVE_TENSORS: u64 = 5;
    LIVE_TENSORS * 4 * (batch_pixels as u64) * (channels as u64)
}

/// Where one tiled pass cuts its input and how it joins the outputs (sizes in rows or columns
/// of the input and of the output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileGeometry {
    /// Side of one input tile (edge tiles are smaller).
    pub input_tile: usize,
    /// Distance between the starts of neighbouring input tiles.
    pub step: usize,
    /// Output rows (columns) over which a tile is blended into its upper (left) neighbour.
    pub blend: usize,
    /// Output rows (columns) each tile keeps.
    pub keep: usize,
}

impl TileGeometry {
    /// `AutoencoderKL.tiled_decode`: latent tiles of `sample_size / f`, pixel tiles of
    /// `sample_size`.
    pub fn decode(config: &VaeConfig) -> Self {
        Self::between(config.latent_tile(), config.sample_size)
    }

    /// `AutoencoderKL._tiled_encode`: pixel tiles of `sample_size`, latent tiles of
    /// `sample_size / f`.
    pub fn encode(config: &VaeConfig) -> Self {
        Self::between(config.sample_size, config.latent_tile())
    }

    /// Input tiles of `input_tile`, whose outputs are `output_tile` (diffusers' `int()`
    /// truncations).
    fn between(input_tile: usize, output_tile: usize) -> Self {
        let blend = (output_tile as f64 * OVERLAP_FACTOR) as usize;
        TileGeometry {
            input_tile,
            step: ((input_tile as f64 * (1.0 - OVERLAP_FACTOR)) as usize).max(1),
            blend,
            keep: output_tile - blend,
        }
    }

    /// Whether an NHWC input of `height × width` is larger than one tile.
    pub fn splits(&self, height: usize, width: usize) -> bool {
        height > self.input_tile || width > self.input_tile
    }
}

/// Runs `pass` on each overlapping tile of NHWC `input` `[B, H, W, C]` (row by row, left to
/// right) and joins the NHWC outputs as diffusers does: each tile's first `blend` rows are
/// blended with the end of the tile above (already blended), then its first columns with the
/// tile to its left, and only its first `keep` rows and columns are kept.
pub fn run_tiled(
    input: &HostTensor,
    geometry: &TileGeometry,
    mut pass: impl FnMut(&HostTensor) -> Result<HostTensor>,
) -> Result<HostTensor> {
    let [_, height, width, _] = nhwc_dims(input, "tiled vae input")?;
    let starts = |len: usize| (0..len).step_by(geometry.step).collect::<Vec<_>>();
    let (row_starts, col_starts) = (starts(height), starts(width));
    let mut rows = Vec::with_capacity(row_starts.len());
    for &y in &row_starts {
        let mut row = Vec::with_capacity(col_starts.len());
        for &x in &col_starts {
            let (y1, x1) = (
                height.min(y + geometry.input_tile),
                width.min(x + geometry.input_tile),
            );
            let tile = crop(input, y, y1, x, x1)?; // [B, ≤ tile, ≤ tile, C]
            row.push(pass(&tile)?); // [B, h_out, w_out, C_out]
        }
        rows.push(row);
    }
    for i in 0..rows.len() {
        let (above, below) = rows.split_at_mut(i);
        let row = &mut below[0];
        for j in 0..row.len() {
            let (left, rest) = row.split_at_mut(j);
            if let Some(upper) = above.last() {
                blend_rows(&upper[j], &mut rest[0], geometry.blend)?;
            }
            if let Some(left) = left.last() {
                blend_cols(left, &mut rest[0], geometry.blend)?;
            }
        }
    }
    join(&rows, geometry.keep)
}

/// `[B, H, W, C]` of a 4-D tensor.
fn nhwc_dims(t: &HostTensor, what: &'static str) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(t.shape.as_slice())
        .map_err(|_| Error::shape(what, format!("expected NHWC, got {:?}", t.shape)))
}

/// Rows `y0..y1` and columns `x0..x1` of every image of NHWC `t`.
fn crop(t: &HostTensor, y0: usize, y1: usize, x0: usize, x1: usize) -> Result<HostTensor> {
    let [batch, height, width, channels] = nhwc_dims(t, "vae tile")?;
    let mut data = Vec::with_capacity(batch * (y1 - y0) * (x1 - x0) * channels);
    for image in t.data.chunks_exact(height * width * channels) {
        for y in y0..y1 {
            let row = &image[(y * width + x0) * channels..(y * width + x1) * channels];
            data.extend_from_slice(row);
        }
    }
    HostTensor::new(vec![batch, y1 - y0, x1 - x0, channels], data)
}

/// diffusers' `blend_v`: `b`'s first rows fade in from `a`'s last ones (in place).
fn blend_rows(a: &HostTensor, b: &mut HostTensor, blend: usize) -> Result<()> {
    let [batch, a_h, width, channels] = nhwc_dims(a, "vae tile")?;
    let b_h = b.shape[1];
    if b.shape != [batch, b_h, width, channels] {
        return Err(Error::shape(
            "vae tile",
            "tiles of one column differ in width",
        ));
    }
    fade_in(&a.data, a_h, &mut b.data, b_h, width * channels, blend);
    Ok(())
}

/// diffusers' `blend_h`: `b`'s first columns fade in from `a`'s last ones (in place).
fn blend_cols(a: &HostTensor, b: &mut HostTensor, blend: usize) -> Result<()> {
    let [batch, height, a_w, channels] = nhwc_dims(a, "vae tile")?;
    let b_w = b.shape[2];
    if b.shape != [batch, height, b_w, channels] {
        return Err(Error::shape(
            "vae tile",
            "tiles of one row differ in height",
        ));
    }
    fade_in(&a.data, a_w, &mut b.data, b_w, channels, blend);
    Ok(())
}

/// With `a` as `[outer, a_len, inner]` and `b` as `[outer, b_len, inner]`: `b`'s first
/// `extent` slices along the middle axis become `a`'s last ones · (1 − i/extent) + their own ·
/// i/extent, where `extent` = min(`blend`, `a_len`, `b_len`).
fn fade_in(a: &[f32], a_len: usize, b: &mut [f32], b_len: usize, inner: usize, blend: usize) {
    let extent = blend.min(a_len).min(b_len);
    for (a_outer, b_outer) in a
        .chunks_exact(a_len * inner)
        .zip(b.chunks_exact_mut(b_len * inner))
    {
        for i in 0..extent {
            let (keep_a, keep_b) = fade(i, extent);
            let a_slice = &a_outer[(a_len - extent + i) * inner..][..inner];
            let b_slice = &mut b_outer[i * inner..][..inner];
            for (bv, &av) in b_slice.iter_mut().zip(a_slice) {
                *bv = av * keep_a + *bv * keep_b;
            }
        }
    }
}

/// The weights of the earlier and the later tile at offset `i` of `extent`, as PyTorch rounds
/// Python's `1 - i / extent` and `i / extent` to the tensor's f32.
fn fade(i: usize, extent: usize) -> (f32, f32) {
    let t = i as f64 / extent as f64;
    ((1.0 - t) as f32, t as f32)
}

/// The first `keep` rows and columns of every tile, joined row by row into one NHWC tensor.
fn join(rows: &[Vec<HostTensor>], keep: usize) -> Result<HostTensor> {
    let first = rows
        .first()
        .and_then(|row| row.first())
        .ok_or_else(|| Error::shape("tiled vae", "no tiles"))?;
    let [batch, _, _, channels] = nhwc_dims(first, "vae tile")?;
    let kept = |len: usize| len.min(keep);
    let height: usize = rows.iter().map(|row| kept(row[0].shape[1])).sum();
    let width: usize = rows[0].iter().map(|tile| kept(tile.shape[2])).sum();
    let mut data = vec![0.0f32; batch * height * width * channels];
    let mut y0 = 0;
    for row in rows {
        let mut x0 = 0;
        for tile in row {
            let [_, tile_h, tile_w, _] = nhwc_dims(tile, "vae tile")?;
            let (h, w) = (kept(tile_h), kept(tile_w));
            for image in 0..batch {
                for y in 0..h {
                    let src = ((image * tile_h + y) * tile_w) * channels;
                    let dst = ((image * height + y0 + y) * width + x0) * channels;
                    data[dst..dst + w * channels]
                        .copy_from_slice(&tile.data[src..src + w * channels]);
                }
            }
            x0 += w;
        }
        if x0 != width {
            return Err(Error::shape("tiled vae", "tile rows differ in width"));
        }
        y0 += kept(row[0].shape[1]);
    }
    HostTensor::new(vec![batch, height, width, channels], data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(shape: Vec<usize>) -> HostTensor {
        let n = shape.iter().product();
        HostTensor::new(shape, (0..n).map(|v| v as f32).collect()).unwrap()
    }

    #[test]
    fn diffusers_geometry_of_sd21_tiles() {
        let decode = TileGeometry::between(96, 768);
        assert_eq!((decode.step, decode.blend, decode.keep), (72, 192, 576));
        let encode = TileGeometry::between(768, 96);
        assert_eq!((encode.step, encode.blend, encode.keep), (576, 24, 72));
    }

    #[test]
    fn auto_tiles_only_what_would_not_fit() {
        let geometry = TileGeometry::between(8, 64);
        let big = HostTensor::new(vec![1, 9, 8, 4], vec![0.0; 288]).unwrap();
        let one_tile = HostTensor::new(vec![1, 8, 8, 4], vec![0.0; 256]).unwrap();
        assert!(VaeTiling::Always.applies(&geometry, &big, 10, || Some(100)));
        assert!(!VaeTiling::Always.applies(&geometry, &one_tile, 10, || Some(1)));
        assert!(VaeTiling::Auto.applies(&geometry, &big, 101, || Some(100)));
        assert!(!VaeTiling::Auto.applies(&geometry, &big, 100, || Some(100)));
        assert!(!VaeTiling::Auto.applies(&geometry, &big, 101, || None));
        assert!(!VaeTiling::Auto.applies(&geometry, &one_tile, 101, || Some(100)));
    }

    #[test]
    fn an_identity_pass_rebuilds_the_input_exactly() {
        // blend 1: every seam's weights are (1, 0), so the tiles' copies rebuild the input.
        let input = ramp(vec![2, 11, 7, 3]);
        let geometry = TileGeometry {
            input_tile: 4,
            step: 3,
            blend: 1,
            keep: 3,
        };
        let mut calls = 0;
        let out = run_tiled(&input, &geometry, |t| {
            calls += 1;
            Ok(t.clone())
        })
        .unwrap();
        assert_eq!(calls, 4 * 3); // rows start at 0, 3, 6, 9; columns at 0, 3, 6
        assert_eq!(out, input);
    }

    #[test]
    fn seams_fade_linearly_from_the_earlier_tile() {
        // A pass that returns a constant per tile shows the blend weights directly.
        let input = ramp(vec![1, 1, 8, 1]);
        let geometry = TileGeometry {
            input_tile: 4,
            step: 2,
            blend: 2,
            keep: 2,
        };
        let mut next = 0.0;
        let out = run_tiled(&input, &geometry, |t| {
            next += 10.0;
            Ok(HostTensor::new(t.shape.clone(), vec![next; t.numel()]).unwrap())
        })
        .unwrap();
        // Tiles 10, 20, 30, 40 start at columns 0, 2, 4, 6; each keeps 2 columns, the first
        // faded in from the tile before: weights (1, 0) then (0.5, 0.5).
        assert_eq!(
            out.data,
            vec![10.0, 10.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0]
        );
    }
}

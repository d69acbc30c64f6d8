//! Turning generated images into an answer: `Accept` negotiation (PNG or JSON), A1111's grid
//! for several images in one PNG, and PNG encoding with each image's `parameters` chunk.

use base64::Engine as _;

use crate::image_io::{encode_png, ImageParameters, RgbImage};
use crate::pipeline::{GeneratedImage, GenerationRequest, Start};
use crate::{Error, Result};

/// What the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One PNG: the image, or a grid of all of them.
    Png,
    /// `{"images": [base64 PNG…], …}`.
    Json,
}

/// Picks PNG or JSON from an `Accept` header: the offer with the highest q wins, a specific
/// match beats a wildcard at equal q, and PNG wins ties (no header, `*/*`). None when the
/// header accepts neither.
pub fn negotiate(accept: Option<&str>) -> Option<Format> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Some(Format::Png);
    };
    // (q, specificity) of the best range matching each offer.
    let score = |offer: &str| -> Option<(f32, u8)> {
        let (offer_type, offer_subtype) = offer.split_once('/')?;
        accept
            .split(',')
            .filter_map(|range| {
                let mut parts = range.split(';');
                let media = parts.next()?.trim().to_ascii_lowercase();
                let q = parts
                    .filter_map(|p| p.trim().strip_prefix("q="))
                    .find_map(|q| q.trim().parse::<f32>().ok())
                    .unwrap_or(1.0);
                let (t, s) = media.split_once('/')?;
                let specificity = match (t, s) {
                    ("*", "*") => 0,
                    (t, "*") if t == offer_type => 1,
                    (t, s) if t == offer_type && s == offer_subtype => 2,
                    _ => return None,
                };
                Some((q, specificity))
            })
            .max_by_key(|&(_, specificity)| specificity)
            .filter(|&(q, _)| q > 0.0)
    };
    match (score("image/png"), score("application/json")) {
        (None, None) => None,
        (Some(_), None) => Some(Format::Png),
        (None, Some(_)) => Some(Format::Json),
        (Some(png), Some(json)) => {
            if json.0 > png.0 || (json.0 == png.0 && json.1 > png.1) {
                Some(Format::Json)
            } else {
                Some(Format::Png)
            }
        }
    }
}

/// The encoded answer.
pub enum Encoded {
    Png(Vec<u8>),
    /// Base64 PNGs, one per image.
    Json(Vec<String>),
}

/// The A1111 `parameters` of one image of `request` run from `start` (its strength and, for
/// inpainting, the mask's blur).
pub fn parameters(
    request: &GenerationRequest,
    model: &str,
    seed: u64,
    start: &Start,
) -> ImageParameters {
    ImageParameters {
        prompt: request.prompt.clone(),
        negative_prompt: request.negative_prompt.clone(),
        steps: request.steps,
        sampler: request.scheduler.a1111_name().to_string(),
        cfg_scale: request.cfg_scale,
        seed,
        width: request.width,
        height: request.height,
        model: model.to_string(),
        denoising_strength: start.strength(),
        mask_blur: matches!(start, Start::Masked { .. }).then_some(0),
    }
}

/// Encodes the images as `format` asks. Each PNG carries its own seed's parameters; a grid
/// carries the first image's, as A1111 does.
pub fn encode(
    format: Format,
    request: &GenerationRequest,
    model: &str,
    start: &Start,
    images: &[GeneratedImage],
) -> Result<Encoded> {
    let png = |image: &RgbImage, seed: u64| {
        let parameters = parameters(request, model, seed, start);
        encode_png(image, Some(&parameters))
    };
    match (format, images) {
        (_, []) => Err(Error::Image("no images to encode".into())),
        (Format::Png, [one]) => Ok(Encoded::Png(png(&one.image, one.seed)?)),
        (Format::Png, [first, ..]) => {
            let tiles: Vec<&RgbImage> = images.iter().map(|g| &g.image).collect();
            Ok(Encoded::Png(png(&grid(&tiles)?, first.seed)?))
        }
        (Format::Json, _) => images
            .iter()
            .map(|g| Ok(base64::engine::general_purpose::STANDARD.encode(png(&g.image, g.seed)?)))
            .collect::<Result<Vec<_>>>()
            .map(Encoded::Json),
    }
}

/// A1111's grid shape for `n` images: rows = ⌊√n⌋, decreased until it divides n (no empty
/// cells); cols = ⌈n / rows⌉.
pub fn grid_shape(n: usize) -> (usize, usize) {
    let mut rows = ((n as f64).sqrt().floor() as usize).max(1);
    while !n.is_multiple_of(rows) {
        rows -= 1;
    }
    (rows, n.div_ceil(rows))
}

/// The images side by side, row-major, in a [`grid_shape`] grid. All must have one size.
pub fn grid(images: &[&RgbImage]) -> Result<RgbImage> {
    let first = images
        .first()
        .ok_or_else(|| Error::Image("a grid needs at least one image".into()))?;
    let (w, h) = (first.width, first.height);
    let (rows, cols) = grid_shape(images.len());
    let to_u32 = |v: usize| u32::try_from(v).map_err(|_| Error::Image("grid too large".into()));
    let mut canvas = image::RgbImage::new(to_u32(cols * w)?, to_u32(rows * h)?);
    for (i, tile) in images.iter().enumerate() {
        if (tile.width, tile.height) != (w, h) {
            return Err(Error::Image(format!(
                "grid images differ in size: {}×{} and {w}×{h}",
                tile.width, tile.height
            )));
        }
        let tile = image::RgbImage::from_raw(to_u32(w)?, to_u32(h)?, tile.pixels.clone())
            .ok_or_else(|| Error::Image(format!("a {w}×{h} image needs {} bytes", w * h * 3)))?;
        let (x, y) = ((i % cols) * w, (i / cols) * h);
        image::imageops::replace(&mut canvas, &tile, x as i64, y as i64);
    }
    Ok(RgbImage {
        width: cols * w,
        height: rows * h,
        pixels: canvas.into_raw(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        let cases = [
            (None, Some(Format::Png)),
            (Some(""), Some(Format::Png)),
            (Some("*/*"), Some(Format::Png)),
            (Some("image/png"), Some(Format::Png)),
            (Some("image/*"), Some(Format::Png)),
            (Some("application/json"), Some(Format::Json)),
            (Some("application/json; charset=utf-8"), Some(Format::Json)),
            (Some("Application/JSON"), Some(Format::Json)),
            (Some("application/json, */*;q=0.8"), Some(Format::Json)),
            (Some("application/json, */*"), Some(Format::Json)),
            (
                Some("image/png;q=0.5, application/json"),
                Some(Format::Json),
            ),
            (Some("image/png, application/json"), Some(Format::Png)),
            (Some("application/*"), Some(Format::Json)),
            (Some("image/png;q=0, */*"), Some(Format::Json)),
            (Some("text/html"), None),
            (Some("image/jpeg"), None),
        ];
        for (accept, expected) in cases {
            assert_eq!(negotiate(accept), expected, "{accept:?}");
        }
    }

    #[test]
    fn grid_shapes_follow_a1111() {
        let shapes: Vec<(usize, usize)> = (1..=9).map(grid_shape).collect();
        assert_eq!(
            shapes,
            [
                (1, 1),
                (1, 2),
                (1, 3),
                (2, 2),
                (1, 5),
                (2, 3),
                (1, 7),
                (2, 4),
                (3, 3)
            ]
        );
    }

    #[test]
    fn grid_places_images_row_major() {
        let tile = |v: u8| RgbImage {
            width: 2,
            height: 1,
            pixels: vec![v; 6],
        };
        let tiles = [tile(1), tile(2), tile(3), tile(4)];
        let g = grid(&tiles.iter().collect::<Vec<_>>()).expect("grid");
        assert_eq!((g.width, g.height), (4, 2));
        let px = |x: usize, y: usize| g.pixels[(y * g.width + x) * 3];
        assert_eq!([px(0, 0), px(2, 0), px(0, 1), px(3, 1)], [1, 2, 3, 4]);
        assert!(grid(&[
            &tile(1),
            &RgbImage {
                width: 1,
                height: 1,
                pixels: vec![0; 3]
            }
        ])
        .is_err());
    }
}

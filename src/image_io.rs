//! Images: RGB pixels, reading PNG/JPEG/WebP files (img2img's input), resizing, and PNG encoding
//! with an A1111-style `parameters` text chunk.

use std::path::Path;

use crate::{Error, Result};

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// What produced an image, written into its PNG the way AUTOMATIC1111 does, so tools that read
/// A1111's `parameters` chunk (and users) can reproduce it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageParameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub sampler: String,
    pub cfg_scale: f32,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub model: String,
    /// img2img's and inpainting's strength (A1111's `Denoising strength`); `None` for txt2img.
    pub denoising_strength: Option<f64>,
    /// Inpainting: A1111's `Mask blur` (0: the mask is binarised, never blurred).
    pub mask_blur: Option<u32>,
}

impl ImageParameters {
    /// A1111's text: the prompt, `Negative prompt: …` when there is one, then the settings line.
    pub fn to_a1111_text(&self) -> String {
        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str("\nNegative prompt: ");
            text.push_str(&self.negative_prompt);
        }
        text.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            self.steps,
            self.sampler,
            self.cfg_scale,
            self.seed,
            self.width,
            self.height,
            self.model
        ));
        if let Some(strength) = self.denoising_strength {
            text.push_str(&format!(", Denoising strength: {strength}"));
        }
        if let Some(blur) = self.mask_blur {
            text.push_str(&format!(", Mask blur: {blur}"));
        }
        text
    }
}

/// Reads an image file (PNG, JPEG or WebP) as 8-bit RGB (see [`decode_image`]), of at most
/// `max_pixels` pixels.
pub fn load_image(path: &Path, max_pixels: usize) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, max_pixels).map_err(|e| Error::Image(format!("{}: {e}", path.display())))
}

/// Decodes PNG, JPEG or WebP bytes as 8-bit RGB, as diffusers' `load_image` does: the EXIF
/// orientation applied, then PIL's `convert("RGB")` (alpha dropped, gray replicated, 16-bit
/// scaled to 8). An image of more than `max_pixels` pixels is refused from its header, before
/// its pixels are decoded (a decompression bomb costs nothing).
pub fn decode_image(bytes: &[u8], max_pixels: usize) -> Result<RgbImage> {
    use image::ImageDecoder;
    let fail = |e: image::ImageError| Error::Image(e.to_string());
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Image(e.to_string()))?;
    let mut decoder = reader.into_decoder().map_err(fail)?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels as u64 {
        return Err(Error::Image(format!(
            "{width}×{height} is more than {max_pixels} pixels"
        )));
    }
    let mut limits = image::Limits::default();
    // The decoded image and its RGB copy, with room for 16-bit RGBA.
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(1 << 20));
    decoder.set_limits(limits).map_err(fail)?;
    let orientation = decoder.orientation().map_err(fail)?;
    let mut image = image::DynamicImage::from_decoder(decoder).map_err(fail)?;
    image.apply_orientation(orientation);
    let rgb = image.to_rgb8();
    Ok(RgbImage {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        pixels: rgb.into_raw(),
    })
}

/// `image` resized to `width × height` with a Lanczos (a = 3) filter.
pub fn resize(image: &RgbImage, width: usize, height: usize) -> Result<RgbImage> {
    let too_large = || Error::Image(format!("cannot resize to {width}×{height}"));
    let buffer = image::RgbImage::from_raw(
        u32::try_from(image.width).map_err(|_| too_large())?,
        u32::try_from(image.height).map_err(|_| too_large())?,
        image.pixels.clone(),
    )
    .ok_or_else(|| Error::Image("the image's pixels do not match its size".into()))?;
    let (w, h) = (
        u32::try_from(width).map_err(|_| too_large())?,
        u32::try_from(height).map_err(|_| too_large())?,
    );
    let resized = image::imageops::resize(&buffer, w, h, image::imageops::FilterType::Lanczos3);
    Ok(RgbImage {
        width,
        height,
        pixels: resized.into_raw(),
    })
}

/// Encodes `image` as PNG with a `parameters` chunk (tEXt when the text is Latin-1, else iTXt,
/// as PIL does for A1111).
pub fn encode_png(image: &RgbImage, parameters: Option<&ImageParameters>) -> Result<Vec<u8>> {
    if image.pixels.len() != image.width * image.height * 3 {
        return Err(Error::Image(format!(
            "{}×{} RGB image needs {} bytes, got {}",
            image.width,
            image.height,
            image.width * image.height * 3,
            image.pixels.len()
        )));
    }
    let width = u32::try_from(image.width).map_err(|_| Error::Image("width too large".into()))?;
    let height =
        u32::try_from(image.height).map_err(|_| Error::Image("height too large".into()))?;
    let png_err = |e: png::EncodingError| Error::Image(e.to_string());
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        if let Some(p) = parameters {
            let text = p.to_a1111_text();
            if text.chars().all(|c| (c as u32) < 256) {
                encoder
                    .add_text_chunk("parameters".into(), text)
                    .map_err(png_err)?;
            } else {
                encoder
                    .add_itxt_chunk("parameters".into(), text)
                    .map_err(png_err)?;
            }
        }
        let mut writer = encoder.write_header().map_err(png_err)?;
        writer.write_image_data(&image.pixels).map_err(png_err)?;
        writer.finish().map_err(png_err)?;
    }
    Ok(out)
}

/// Writes `image` as a PNG file.
pub fn save_png(path: &Path, image: &RgbImage, parameters: Option<&ImageParameters>) -> Result<()> {
    let bytes = encode_png(image, parameters)?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(prompt: &str) -> ImageParameters {
        ImageParameters {
            denoising_strength: None,
            mask_blur: None,
            prompt: prompt.into(),
            negative_prompt: "blurry".into(),
            steps: 30,
            sampler: "Euler a".into(),
            cfg_scale: 7.5,
            seed: 208513106212,
            width: 4,
            height: 2,
            model: "tiny".into(),
        }
    }

    fn read_back(bytes: &[u8]) -> (png::OutputInfo, Vec<u8>, String) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("valid png");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buf).expect("frame");
        let meta = reader.info();
        let text = meta
            .uncompressed_latin1_text
            .iter()
            .map(|t| t.text.clone())
            .chain(meta.utf8_text.iter().map(|t| t.get_text().expect("utf8")))
            .collect::<Vec<_>>()
            .join("");
        buf.truncate(info.buffer_size());
        (info, buf, text)
    }

    #[test]
    fn decoding_refuses_large_images_from_the_header_and_non_images() {
        let img = RgbImage {
            width: 40,
            height: 30,
            pixels: (0..40 * 30 * 3).map(|i| (i % 251) as u8).collect(),
        };
        let png = encode_png(&img, None).unwrap();
        assert_eq!(decode_image(&png, 1200).unwrap(), img);
        let err = decode_image(&png, 1199).unwrap_err().to_string();
        assert!(err.contains("40×30 is more than 1199 pixels"), "{err}");
        assert!(decode_image(b"hello", 1 << 20).is_err());
        assert!(
            decode_image(&png[..png.len() / 2], 1 << 20).is_err(),
            "truncated"
        );
        let small = resize(&img, 8, 6).unwrap();
        assert_eq!(
            (small.width, small.height, small.pixels.len()),
            (8, 6, 8 * 6 * 3)
        );
    }

    #[test]
    fn png_round_trips_pixels_and_parameters() {
        let image = RgbImage {
            width: 4,
            height: 2,
            pixels: (0..24).map(|i| (i * 10) as u8).collect(),
        };
        for prompt in ["a cat", "un café ☕ 東京"] {
            let bytes = encode_png(&image, Some(&params(prompt))).expect("encode");
            let (info, pixels, text) = read_back(&bytes);
            assert_eq!((info.width, info.height), (4, 2));
            assert_eq!(pixels, image.pixels);
            assert_eq!(
                text,
                format!("{prompt}\nNegative prompt: blurry\nSteps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 208513106212, Size: 4x2, Model: tiny")
            );
        }
    }

    #[test]
    fn wrong_pixel_count_is_an_error() {
        let image = RgbImage {
            width: 4,
            height: 2,
            pixels: vec![0; 5],
        };
        assert!(encode_png(&image, None).is_err());
    }
}

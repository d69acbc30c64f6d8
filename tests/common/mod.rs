//! Shared helpers of the integration tests: fixture paths, reading reference tensors, comparing.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use sd21::tensor::HostTensor;
use sd21::weights::SafeTensorsFile;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// The tiny random-weight SD 2.1-architecture model in the diffusers layout.
pub fn tiny_model() -> PathBuf {
    fixtures().join("tiny-sd21")
}

/// The tiny 9-channel inpainting model (its other components link to tiny-sd21's).
pub fn tiny_inpainting_model() -> PathBuf {
    fixtures().join("tiny-sd21-inpainting")
}

/// A reference file written by scripts/make_fixtures.py.
pub fn reference(name: &str) -> PathBuf {
    fixtures().join("reference").join(name)
}

pub fn read_tensor(file: &SafeTensorsFile, name: &str) -> HostTensor {
    file.get(name, None)
        .unwrap_or_else(|e| panic!("fixture {}: {e}", file.path().display()))
}

/// Max and mean absolute difference; panics when shapes differ.
pub fn diff(ours: &[f32], reference: &[f32]) -> (f32, f32) {
    assert_eq!(ours.len(), reference.len(), "length mismatch");
    let mut max = 0f32;
    let mut sum = 0f64;
    for (a, b) in ours.iter().zip(reference) {
        let d = (a - b).abs();
        assert!(d.is_finite(), "non-finite value: ours {a}, reference {b}");
        max = max.max(d);
        sum += d as f64;
    }
    (max, (sum / ours.len().max(1) as f64) as f32)
}

/// Asserts `|ours − ref| ≤ atol + rtol·|ref|` elementwise, reporting the worst element.
pub fn assert_close(what: &str, ours: &[f32], reference: &[f32], atol: f32, rtol: f32) {
    assert_eq!(ours.len(), reference.len(), "{what}: length mismatch");
    let mut worst = (0usize, 0f32);
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        let excess = (a - b).abs() - (atol + rtol * b.abs());
        assert!(a.is_finite(), "{what}: non-finite value at {i}");
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let (max, mean) = diff(ours, reference);
    eprintln!("{what}: max |diff| {max:.3e}, mean {mean:.3e}");
    assert!(
        worst.1 <= 0.0,
        "{what}: element {} is {} but diffusers has {} (atol {atol}, rtol {rtol})",
        worst.0,
        ours[worst.0],
        reference[worst.0]
    );
}

/// Copies a directory tree (the fixture model) so a test can alter its files.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// A PNG's width, height, pixels (as stored) and its text chunks joined.
pub fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>, String) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut pixels).expect("frame");
    pixels.truncate(info.buffer_size());
    let meta = reader.info();
    let text = meta
        .uncompressed_latin1_text
        .iter()
        .map(|t| t.text.clone())
        .chain(meta.utf8_text.iter().map(|t| t.get_text().expect("utf8")))
        .collect();
    (info.width, info.height, pixels, text)
}

/// The largest |a − b| of two 8-bit images' pixels.
#[allow(dead_code)] // not every test binary compares images
pub fn max_pixel_diff(a: &[u8], b: &[u8]) -> u8 {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// The 8-bit RGB images `[H, W, 3]` of a reference safetensors file (reference/img2img.*,
/// reference/inpaint.*), by name.
#[allow(dead_code)] // not every test binary reads them
pub struct FixtureImages(Vec<u8>);

#[allow(dead_code)]
impl FixtureImages {
    pub fn open(file: &str) -> Self {
        FixtureImages(std::fs::read(reference(file)).expect("the fixture file"))
    }

    pub fn image(&self, name: &str) -> sd21::image_io::RgbImage {
        let st = safetensors::SafeTensors::deserialize(&self.0).expect("safetensors");
        let t = st.tensor(name).expect("the fixture image");
        sd21::image_io::RgbImage {
            width: t.shape()[1],
            height: t.shape()[0],
            pixels: t.data().to_vec(),
        }
    }

    /// The image as PNG bytes.
    pub fn png(&self, name: &str) -> Vec<u8> {
        sd21::image_io::encode_png(&self.image(name), None).expect("PNG")
    }
}

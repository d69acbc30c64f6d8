//! Every limit and default of a request, in one place.

/// Longest prompt (and negative prompt), in characters.
pub const MAX_PROMPT_CHARS: usize = 2000;
/// Longest image side in pixels, whatever `--max-pixels` allows.
pub const MAX_SIDE: usize = 4096;
/// Classifier-free guidance scale range (AUTOMATIC1111's slider).
pub const CFG_SCALE_RANGE: (f64, f64) = (0.0, 30.0);
/// Largest request body accepted (a maximal request with escaped prompts is ~50 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest body of the routes that carry images (base64 adds a third to an encoded image).
pub const MAX_IMAGE_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Steps when the request gives none.
pub const DEFAULT_STEPS: usize = 30;
/// Guidance scale when the request gives none.
pub const DEFAULT_CFG_SCALE: f32 = 7.0;
/// Images when the request gives none.
pub const DEFAULT_IMAGES: usize = 1;
/// img2img's strength when the request gives none (diffusers' default).
pub const DEFAULT_STRENGTH: f64 = 0.75;
/// Inpainting's strength when the request gives none (diffusers' default: pure noise inside
/// the mask).
pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;

/// The configurable limits (`--max-pixels`, `--max-steps`, `--max-images`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_pixels: usize,
    pub max_steps: usize,
    pub max_images: usize,
}

impl Default for Limits {
    /// A shared server's: 1 megapixel, 150 steps, 8 images.
    fn default() -> Self {
        Limits {
            max_pixels: 1024 * 1024,
            max_steps: 150,
            max_images: 8,
        }
    }
}

impl Limits {
    /// `sd21 generate`'s: one user's job on their own machine, bounded only by what the pipeline
    /// does (any size up to [`MAX_SIDE`] per side, up to the schedulers' 1000 training timesteps).
    pub fn cli() -> Self {
        Limits {
            max_pixels: MAX_SIDE * MAX_SIDE,
            max_steps: 1000,
            max_images: 1000,
        }
    }

    /// The largest width (or height) a request can have: limited by [`MAX_SIDE`] and by
    /// `max_pixels` with the other side at its minimum.
    pub fn max_side(&self, latent_factor: usize) -> usize {
        let f = latent_factor.max(1);
        let by_area = self.max_pixels / min_side(f);
        MAX_SIDE.min(by_area - by_area % f)
    }
}

/// The smallest width (or height): one latent pixel (8 for SD 2.1).
pub fn min_side(latent_factor: usize) -> usize {
    latent_factor.max(1)
}

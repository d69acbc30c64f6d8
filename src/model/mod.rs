//! The SD 2.1 models, written once over the `Backend` op set: CLIP text encoder, UNet, VAE decoder
//! and encoder, and their tiled passes.

pub mod clip;
pub mod layers;
pub mod unet;
pub mod vae;
pub mod vae_encoder;
pub mod vae_tiling;

pub use clip::ClipTextModel;
pub use unet::Unet;
pub use vae::VaeDecoder;
pub use vae_encoder::{Posterior, VaeEncoder};
pub use vae_tiling::VaeTiling;

//! The SD 2.1 models, written once over the `Backend` op set: CLIP text encoder, UNet, VAE decoder.

pub mod clip;
pub mod layers;
pub mod unet;
pub mod vae;

pub use clip::ClipTextModel;
pub use unet::Unet;
pub use vae::VaeDecoder;

//! sd21: Stable Diffusion 2.1 text-to-image. One model definition (`model/`) over a small op set
//! (`backend/`), a CPU backend as the numerical reference, diffusers-compatible sampling.

pub mod backend;
pub mod config;
pub mod demo;
pub mod engine;
pub mod env;
pub mod error;
pub mod image_io;
pub mod model;
pub mod pipeline;
pub mod preview;
pub mod random;
pub mod request;
pub mod sampling;
pub mod server;
pub mod tensor;
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};

//! The CPU backend: f32, matmuls through the `gemm` crate, rayon for everything else.

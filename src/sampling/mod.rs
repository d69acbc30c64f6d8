//! Sampling: diffusers-compatible schedulers and torch's CPU random generator (schedulers next).

pub mod rng;

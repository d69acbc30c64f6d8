//! `sd21-bench vae-decode`: one VAE decode of seeded N(0, 1) latents at a given size, loading only
//! the VAE, tiled or not; bench/diffusers_vae_decode.py is the same work in diffusers. Each runs
//! as its own process so `/usr/bin/time -v` gives the decode's peak RSS.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use sd21::backend::cpu::CpuBackend;
use sd21::config::{self, VaeConfig};
use sd21::model::{VaeDecoder, VaeTiling};
use sd21::sampling::rng::TorchGenerator;
use sd21::tensor::HostTensor;
use sd21::weights::{ModelFiles, SafeTensorsFile, WeightScope};

/// Decodes `torch.randn([1, C, h, w], generator=manual_seed(0)) / scaling_factor` for a
/// `width × height` image on the CPU and reports the time.
pub fn vae_decode(model: &Path, width: usize, height: usize, tiled: bool) -> Result<Value> {
    let files = ModelFiles::locate(model)?;
    let backend = CpuBackend::new();
    let started = Instant::now();
    let config: VaeConfig = config::read_json(&files.vae_config)?;
    let weights = SafeTensorsFile::open(&files.vae_weights)?;
    let vae = VaeDecoder::load(&WeightScope::new(&weights, &backend), &config)?;
    let load_s = started.elapsed().as_secs_f64();
    let f = config.latent_factor();
    let (c, h, w) = (config.latent_channels, height / f, width / f);
    let noise = TorchGenerator::new(0).randn(c * h * w);
    let scaled = noise.iter().map(|v| v / config.scaling_factor).collect();
    let z = HostTensor::new(vec![1, c, h, w], scaled)?.nchw_to_nhwc()?; // [1, h, w, C]
    let started = Instant::now();
    let image = vae
        .decode_host(&backend, &z, VaeTiling::forced(tiled))
        .context("decoding")?; // [1, H, W, 3]
    let decode_s = started.elapsed().as_secs_f64();
    let report = json!({
        "side": "sd21", "width": image.shape[2], "height": image.shape[1], "tiled": tiled,
        "threads": rayon::current_num_threads(), "load_s": load_s, "decode_s": decode_s,
    });
    println!("{report}");
    Ok(report)
}

//! `sd21-bench`: how close each op is to what this machine can do (`kernels`), how fast a
//! whole generation is next to PyTorch/diffusers on the same work (`pipeline`), and what a
//! server sustains under concurrent clients, batching on and off (`serve`), whole processes
//! against diffusers (`e2e`), and one VAE decode at any size (`vae-decode`).

mod device;
mod e2e;
mod kernels;
mod models;
mod ops;
mod pipeline;
mod roofline;
mod serve;
mod vae_decode;
mod write_random;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use sd21::backend::cpu::CpuBackend;
use sd21::backend::cuda::CudaBackend;

use e2e::{e2e, E2eOpts};
use kernels::kernels;
use pipeline::{pipeline, print_comparison, torch_reference, PipelineOpts};
use serve::{serve, ServeOpts};
use vae_decode::vae_decode;
use write_random::write_random;

#[derive(Parser)]
#[command(
    name = "sd21-bench",
    version,
    about = "Kernel profiling and pipeline throughput for sd21"
)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ShapeSet {
    #[value(name = "sd21-512")]
    Sd21_512,
    #[value(name = "sd21-768")]
    Sd21_768,
    All,
    /// A few small shapes (for smoke tests).
    Smoke,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time every op at SD 2.1 shapes against the machine's measured ceilings.
    Kernels {
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        #[arg(long, value_enum, default_value_t = ShapeSet::Sd21_512)]
        shapes: ShapeSet,
        /// Timed runs per op (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Also write the table as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also draw the table as a roofline chart (SVG).
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Time text encoding, one UNet step (CFG, batch 2), VAE decode and a whole generation.
    Pipeline {
        #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// A diffusers-layout model folder.
        #[arg(long, conflicts_with = "random")]
        model: Option<PathBuf>,
        /// Random weights with these exact dimensions: sd21-512, sd21-768 or tiny.
        #[arg(long)]
        random: Option<String>,
        #[arg(long)]
        width: Option<usize>,
        #[arg(long)]
        height: Option<usize>,
        /// Denoising steps of the whole generation.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Images per generation.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Timed runs of each component (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Also run bench/torch_reference.py (diffusers) on the same weights and work, print both.
        #[arg(long)]
        compare_torch: bool,
        /// The Python that has torch + diffusers.
        #[arg(long, env = "SD21_TORCH_PYTHON", default_value = "python3")]
        python: String,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Whole processes as a user runs them: `sd21 generate` against diffusers'
    /// StableDiffusionPipeline on the same folder (1 and 3 steps, sides alternating): wall time,
    /// per step, fixed cost and peak RSS, median and min–max.
    E2e {
        /// A diffusers-layout folder (`write-random` makes one with random weights).
        #[arg(long)]
        model: PathBuf,
        /// The Python with torch + diffusers (`none`: sd21 alone).
        #[arg(long, env = "SD21_TORCH_PYTHON", default_value = "python3")]
        python: String,
        /// The sd21 binary (default: the one next to sd21-bench).
        #[arg(long)]
        sd21: Option<PathBuf>,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long)]
        width: Option<usize>,
        #[arg(long)]
        height: Option<usize>,
        #[arg(long, default_value = "pndm")]
        scheduler: String,
        /// Threads of both sides (each one's --threads); default: all.
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// One VAE decode on the CPU at --width × --height (only the VAE loaded), tiled with
    /// --vae-tiling, printed as JSON; run it under `/usr/bin/time -v` beside
    /// bench/diffusers_vae_decode.py for the peak memory of each.
    VaeDecode {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        width: usize,
        #[arg(long)]
        height: usize,
        #[arg(long)]
        vae_tiling: bool,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Write a random-weight model (sd21-512, sd21-768 or tiny) as a diffusers-layout folder, so
    /// `sd21` and diffusers load the same weights `pipeline --random` builds.
    WriteRandom {
        #[arg(long)]
        random: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Images/s and p50/p95 latency of `sd21 serve` under concurrent clients; without --url it
    /// starts a server per --max-batch value and round, alternating them.
    Serve {
        /// Measure this running server (http://IP:PORT) instead of starting servers.
        #[arg(long)]
        url: Option<String>,
        /// The model the started servers load: a folder, a Hub id or `demo`.
        #[arg(long, default_value = "demo")]
        model: String,
        /// The sd21 binary (default: the one next to sd21-bench).
        #[arg(long)]
        sd21: Option<PathBuf>,
        /// --max-batch of the started servers, alternated each round.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 4])]
        max_batch: Vec<usize>,
        /// Concurrent clients, one measurement each.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 8])]
        clients: Vec<usize>,
        /// Requests each client sends, one after another.
        #[arg(long, default_value_t = 4)]
        requests: usize,
        /// Rounds (the median and min–max over them are reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long, default_value_t = 256)]
        width: usize,
        #[arg(long, default_value_t = 256)]
        height: usize,
        #[arg(long, default_value_t = 4)]
        steps: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    // As `sd21` does: freed activation buffers are reused, not unmapped (see the function).
    sd21::backend::cpu::keep_freed_memory();
    match Cli::parse().command {
        BenchCommand::Kernels {
            device,
            shapes,
            repeats,
            json,
            svg,
        } => match device {
            DeviceArg::Cpu => kernels(&CpuBackend::new(), 4, shapes, repeats, json, svg, None),
            #[cfg(sd21_kernels)]
            DeviceArg::Cuda => cuda_kernels(shapes, repeats, json, svg),
            #[cfg(not(sd21_kernels))]
            DeviceArg::Cuda => Err(no_kernels()),
        },
        BenchCommand::Pipeline {
            device,
            model,
            random,
            width,
            height,
            steps,
            batch,
            repeats,
            compare_torch,
            python,
            json,
        } => {
            let opts = PipelineOpts {
                model,
                random,
                width,
                height,
                steps,
                batch,
                repeats,
            };
            let ours = match device {
                DeviceArg::Cpu => pipeline(CpuBackend::new(), &opts)?,
                #[cfg(sd21_kernels)]
                DeviceArg::Cuda => pipeline(CudaBackend::new(0)?, &opts)?,
                #[cfg(not(sd21_kernels))]
                DeviceArg::Cuda => return Err(no_kernels()),
            };
            let mut report = json!({ "sd21": ours });
            if compare_torch {
                let torch = torch_reference(&python, device, &opts)?;
                print_comparison(&report["sd21"], &torch);
                report["torch"] = torch;
            }
            write_json(json, &report)
        }
        BenchCommand::E2e {
            model,
            python,
            sd21,
            repeats,
            width,
            height,
            scheduler,
            threads,
            json,
        } => {
            let opts = E2eOpts {
                model,
                python,
                sd21,
                repeats,
                width,
                height,
                scheduler,
                threads,
            };
            write_json(json, &e2e(&opts)?)
        }
        BenchCommand::VaeDecode {
            model,
            width,
            height,
            vae_tiling,
            json,
        } => write_json(json, &vae_decode(&model, width, height, vae_tiling)?),
        BenchCommand::WriteRandom { random, out } => {
            write_random(models::RandomModel::parse(&random)?, &out)
        }
        BenchCommand::Serve {
            url,
            model,
            sd21,
            max_batch,
            clients,
            requests,
            repeats,
            width,
            height,
            steps,
            json,
        } => {
            let opts = ServeOpts {
                url,
                model,
                sd21,
                max_batch,
                clients,
                requests,
                repeats,
                width,
                height,
                steps,
            };
            write_json(json, &serve(&opts)?)
        }
    }
}

/// Writes `report` to `path` when one was given.
fn write_json(path: Option<PathBuf>, report: &serde_json::Value) -> Result<()> {
    if let Some(path) = path {
        std::fs::write(&path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `kernels` on CUDA device 0. On Hopper the convolutions and head-dim-64 attention run wgmma
/// kernels; the portable mma.sync ones are timed too.
#[cfg(sd21_kernels)]
fn cuda_kernels(
    shapes: ShapeSet,
    repeats: usize,
    json: Option<PathBuf>,
    svg: Option<PathBuf>,
) -> Result<()> {
    use kernels::Alternative;
    let backend = CudaBackend::new(0)?;
    let (conv, attention) = (
        backend.hopper_conv_active(),
        backend.hopper_attention_active(),
    );
    let portable = |on: bool| {
        backend.set_hopper_conv(conv && !on);
        backend.set_hopper_attention(attention && !on);
    };
    let alternative = (conv || attention).then_some(Alternative {
        label: "mma.sync",
        switch: &portable,
    });
    kernels(&backend, 2, shapes, repeats, json, svg, alternative)
}

/// Why a build without kernels has no CUDA backend.
#[cfg(not(sd21_kernels))]
fn no_kernels() -> anyhow::Error {
    match CudaBackend::new(0) {
        Err(e) => e.into(),
        Ok(_) => anyhow::anyhow!("this build has no CUDA kernels"),
    }
}

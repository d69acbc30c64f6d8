//! `sd21-bench`: how close each op is to what this machine can do (`kernels`), and how fast a
//! whole generation is next to PyTorch/diffusers on the same work (`pipeline`).

mod models;
mod ops;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use sd21::backend::cpu::CpuBackend;
use sd21::backend::cuda::CudaBackend;
use sd21::backend::Backend;
use sd21::pipeline::{ComponentSources, GenerationRequest, ModelConfigs, Pipeline};
use sd21::tensor::HostTensor;
use sd21::tokenizer::ClipTokenizer;
use sd21::weights::{ModelFiles, RandomWeights};

use models::RandomModel;
use ops::{median, sd21_cases, smoke_cases, time_case, Case};

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
        /// Also run bench/torch_reference.py (diffusers) on the same work and print both.
        #[arg(long)]
        compare_torch: bool,
        /// The Python that has torch + diffusers.
        #[arg(long, env = "SD21_TORCH_PYTHON", default_value = "python3")]
        python: String,
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
        } => match device {
            DeviceArg::Cpu => kernels(&CpuBackend::new(), 4, shapes, repeats, json, None),
            DeviceArg::Cuda => {
                let backend = CudaBackend::new(0)?;
                // On Hopper the convolutions and head-dim-64 attention run wgmma kernels; time
                // the portable mma.sync ones too.
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
                kernels(&backend, 2, shapes, repeats, json, alternative)
            }
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
                DeviceArg::Cuda => pipeline(CudaBackend::new(0)?, &opts)?,
            };
            let mut report = json!({ "sd21": ours });
            if compare_torch {
                let torch = torch_reference(&python, device, &opts)?;
                print_comparison(&report["sd21"], &torch);
                report["torch"] = torch;
            }
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
    }
}

/// The machine's own limits, measured in this run.
struct Ceilings {
    bandwidth_gbs: f64,
    tflops: f64,
}

fn measure_ceilings<B: Backend>(backend: &B, elem: usize) -> Result<Ceilings> {
    // Memory: a 256 MiB device-to-device copy (bytes read + written), best of several.
    let n = (256 << 20) / elem;
    let x = backend.upload(&HostTensor::new(vec![n], vec![1.0; n])?)?;
    backend.copy(&x)?;
    backend.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        let y = backend.copy(&x)?;
        backend.synchronize()?;
        best = best.min(start.elapsed().as_secs_f64());
        drop(y);
    }
    let bandwidth_gbs = 2.0 * (n * elem) as f64 / best / 1e9;
    // Matrix throughput: one large square GEMM through the backend's linear layer.
    let side = if elem == 4 { 2048 } else { 8192 };
    let op = ops::OpCase::Linear {
        rows: side,
        k: side,
        n: side,
    };
    let t = time_case(backend, &op, 5, 1)?;
    Ok(Ceilings {
        bandwidth_gbs,
        tflops: op.flops() / t / 1e12,
    })
}

/// Second kernels the implicit-GEMM convolutions and head-dim-64 attention can run on (the
/// portable mma.sync ones on a Hopper GPU, whose default is wgmma): their label and the switch
/// that selects them.
struct Alternative<'a> {
    label: &'static str,
    switch: &'a dyn Fn(bool),
}

fn kernels<B: Backend>(
    backend: &B,
    elem: usize,
    shapes: ShapeSet,
    repeats: usize,
    json_path: Option<PathBuf>,
    alternative: Option<Alternative<'_>>,
) -> Result<()> {
    println!("device: {}", backend.describe());
    let ceilings = measure_ceilings(backend, elem)?;
    println!(
        "ceilings: memory {:.1} GB/s (256 MiB copy), matrix {:.3} TFLOP/s ({} GEMM)",
        ceilings.bandwidth_gbs,
        ceilings.tflops,
        if elem == 4 {
            "f32 2048³, gemm crate"
        } else {
            "f16 8192³, cuBLAS"
        }
    );
    let cases: Vec<Case> = match shapes {
        ShapeSet::Sd21_512 => sd21_cases(512),
        ShapeSet::Sd21_768 => sd21_cases(768),
        ShapeSet::All => sd21_cases(512).into_iter().chain(sd21_cases(768)).collect(),
        ShapeSet::Smoke => smoke_cases(),
    };
    println!(
        "{:<44} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7}  bound",
        "op", "time ms", "GFLOP", "MB", "TFLOP/s", "GB/s", "% ceil"
    );
    let mut rows = Vec::new();
    let mut runs: Vec<(String, &ops::OpCase, Option<&Alternative>)> = Vec::new();
    for case in &cases {
        runs.push((case.name.clone(), &case.op, None));
        let has_alternative = match case.op {
            ops::OpCase::Conv { cin, .. } => cin % 8 == 0,
            ops::OpCase::Attention { c, heads, .. } => c == 64 * heads,
            _ => false,
        };
        if let (Some(alt), true) = (&alternative, has_alternative) {
            runs.push((
                format!("{} [{}]", case.name, alt.label),
                &case.op,
                Some(alt),
            ));
        }
    }
    for (name, op, alt) in runs {
        if let Some(alt) = alt {
            (alt.switch)(true);
        }
        let timed = time_case(backend, op, repeats, 3).with_context(|| name.clone());
        if let Some(alt) = alt {
            (alt.switch)(false);
        }
        let t = timed?;
        let case = Case { name, op: *op };
        let (flops, bytes) = (case.op.flops(), case.op.bytes(elem));
        let compute_s = flops / (ceilings.tflops * 1e12);
        let memory_s = bytes / (ceilings.bandwidth_gbs * 1e9);
        let (bound, bound_s) = if compute_s >= memory_s {
            ("compute", compute_s)
        } else {
            ("memory", memory_s)
        };
        let percent = 100.0 * bound_s / t;
        println!(
            "{:<44} {:>10.3} {:>9.3} {:>9.1} {:>9.3} {:>9.1} {:>6.1}%  {bound}",
            case.name,
            t * 1e3,
            flops / 1e9,
            bytes / 1e6,
            flops / t / 1e12,
            bytes / t / 1e9,
            percent
        );
        rows.push(json!({
            "op": case.name, "time_ms": t * 1e3, "flops": flops, "bytes": bytes,
            "tflops": flops / t / 1e12, "gbs": bytes / t / 1e9, "bound": bound, "percent_of_ceiling": percent,
        }));
    }
    if let Some(path) = json_path {
        let report = json!({
            "device": backend.describe(),
            "ceilings": { "memory_gbs": ceilings.bandwidth_gbs, "matrix_tflops": ceilings.tflops },
            "ops": rows,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

struct PipelineOpts {
    model: Option<PathBuf>,
    random: Option<String>,
    width: Option<usize>,
    height: Option<usize>,
    steps: usize,
    batch: usize,
    repeats: usize,
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let start = Instant::now();
    let out = f()?;
    Ok((out, start.elapsed().as_secs_f64()))
}

fn pipeline<B: Backend>(backend: B, opts: &PipelineOpts) -> Result<serde_json::Value> {
    let device = backend.describe();
    let (pipe, load_s) = timed(|| -> Result<Pipeline<B>> {
        Ok(match (&opts.model, &opts.random) {
            (Some(dir), None) => Pipeline::load(&ModelFiles::locate(dir)?, backend)?,
            (None, Some(name)) => {
                let model = RandomModel::parse(name)?;
                let configs: ModelConfigs = model.configs()?;
                let weights = RandomWeights::new(0);
                let sources = ComponentSources {
                    text_encoder: &weights,
                    unet: &weights,
                    vae: &weights,
                };
                Pipeline::build(
                    backend,
                    ClipTokenizer::embedded()?,
                    configs,
                    sources,
                    format!("random {}", model.name()),
                )?
            }
            _ => bail!("pass --model DIR or --random sd21-512|sd21-768|tiny"),
        })
    })?;
    let b = pipe.backend();
    let (native_w, native_h) = pipe.native_size();
    let (width, height) = (
        opts.width.unwrap_or(native_w),
        opts.height.unwrap_or(native_h),
    );
    let f = pipe.latent_factor();
    let (h, w) = (height / f, width / f);
    let c = pipe.unet().config().in_channels;
    println!(
        "device: {device}; model: {}; {width}×{height}; load {load_s:.2} s",
        pipe.model_name()
    );
    let reps = opts.repeats.max(1);

    let prompt = "a photograph of an astronaut riding a horse";
    let mut encode = Vec::new();
    let mut context = None;
    for _ in 0..reps {
        let (ctx, t) = timed(|| {
            let ctx = pipe.encode_prompts(prompt, "", true)?;
            b.synchronize()?;
            Ok(ctx)
        })?;
        encode.push(t);
        context = Some(ctx);
    }
    let context = context.context("no text encoding ran")?;
    let latents = HostTensor::new(
        vec![2, h, w, c],
        (0..2 * h * w * c)
            .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
            .collect(),
    )?;
    let latents = b.upload(&latents)?;
    // A UNet step, and the host's share of it: how long `forward` takes to return (on CUDA it
    // only enqueues work; when that is close to the whole step, the step is bound by the host's
    // launch and allocation overhead, not by the GPU).
    let mut unet = Vec::new();
    let mut unet_enqueue = Vec::new();
    for i in 0..=reps {
        let start = Instant::now();
        let out = pipe.unet().forward(b, &latents, 500.0, &context)?;
        let enqueued = start.elapsed().as_secs_f64();
        b.synchronize()?;
        let total = start.elapsed().as_secs_f64();
        drop(out);
        if i > 0 || reps == 1 {
            // the first run warms up (unless only one was asked for)
            unet.push(total);
            unet_enqueue.push(enqueued);
        }
    }
    // The same step replayed as a CUDA graph (backends that can record; the first call runs op
    // by op and the second records, so both stay out of the timing).
    let mut unet_graph = Vec::new();
    if b.set_recording(true) {
        for _ in 0..2 {
            pipe.unet().forward(b, &latents, 500.0, &context)?;
        }
        b.synchronize()?;
        for _ in 0..reps {
            let (_, t) = timed(|| {
                let out = pipe.unet().forward(b, &latents, 500.0, &context)?;
                b.synchronize()?;
                Ok(out)
            })?;
            unet_graph.push(t);
        }
        b.set_recording(false);
    }
    let z = HostTensor::new(
        vec![1, c, h, w],
        (0..h * w * c)
            .map(|i| ((i % 13) as f32 - 6.0) / 6.0)
            .collect(),
    )?;
    let mut vae = Vec::new();
    for _ in 0..reps {
        vae.push(timed(|| Ok(pipe.decode(&z)?))?.1);
    }
    let request = GenerationRequest {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        width,
        height,
        steps: opts.steps,
        cfg_scale: 7.0,
        seed: 0,
        scheduler: pipe.default_scheduler()?,
        number_of_images: opts.batch.max(1),
    };
    let (_, generation_s) = timed(|| Ok(pipe.generate(&request, &mut |_| true)?))?;
    let per_image = generation_s / request.number_of_images as f64;
    let result = json!({
        "device": device, "model": pipe.model_name(), "width": width, "height": height,
        "steps": opts.steps, "images": request.number_of_images, "load_s": load_s,
        "text_encode_s": median(encode), "unet_step_s": median(unet),
        "unet_step_host_enqueue_s": median(unet_enqueue),
        "unet_step_cuda_graph_s": (!unet_graph.is_empty()).then(|| median(unet_graph)),
        "vae_decode_s": median(vae),
        "generation_s_per_image": per_image, "it_per_s": opts.steps as f64 / per_image,
    });
    println!(
        "sd21   text encode {:.3} s | unet step (cfg, batch 2) {:.3} s | vae decode {:.3} s | generation {:.2} s/image, {:.3} it/s ({} steps)",
        result["text_encode_s"].as_f64().unwrap_or(f64::NAN),
        result["unet_step_s"].as_f64().unwrap_or(f64::NAN),
        result["vae_decode_s"].as_f64().unwrap_or(f64::NAN),
        per_image,
        opts.steps as f64 / per_image,
        opts.steps
    );
    println!(
        "sd21   unet step: forward returned after {:.4} s of the {:.4} s step (host enqueue share)",
        result["unet_step_host_enqueue_s"]
            .as_f64()
            .unwrap_or(f64::NAN),
        result["unet_step_s"].as_f64().unwrap_or(f64::NAN),
    );
    if let Some(graph_s) = result["unet_step_cuda_graph_s"].as_f64() {
        println!("sd21   unet step replayed as a CUDA graph: {graph_s:.4} s");
    }
    Ok(result)
}

/// Runs bench/torch_reference.py with the same model dimensions, size and steps.
fn torch_reference(
    python: &str,
    device: DeviceArg,
    opts: &PipelineOpts,
) -> Result<serde_json::Value> {
    let model = match (&opts.random, &opts.model) {
        (Some(name), _) => RandomModel::parse(name)?,
        (None, _) => {
            bail!("--compare-torch needs --random (both sides then build the same random model)")
        }
    };
    let (unet, vae, text) = model.config_texts();
    let dir = tempfile_dir()?;
    std::fs::write(dir.join("unet.json"), unet)?;
    std::fs::write(dir.join("vae.json"), vae)?;
    std::fs::write(dir.join("text_encoder.json"), text)?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("bench")
        .join("torch_reference.py");
    let configs = model.configs()?;
    let native = configs.unet.sample_size * configs.vae.latent_factor();
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .arg("--configs")
        .arg(&dir)
        .args([
            "--device",
            if device == DeviceArg::Cuda {
                "cuda"
            } else {
                "cpu"
            },
        ])
        .args(["--width", &opts.width.unwrap_or(native).to_string()])
        .args(["--height", &opts.height.unwrap_or(native).to_string()])
        .args([
            "--steps",
            &opts.steps.to_string(),
            "--repeats",
            &opts.repeats.max(1).to_string(),
        ])
        .args(["--batch", &opts.batch.max(1).to_string()]);
    println!("running {}", script.display());
    let out = cmd
        .output()
        .with_context(|| format!("running {python} {}", script.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!(
            "torch_reference.py failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .with_context(|| format!("torch_reference.py printed no JSON: {stdout}"))
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("sd21-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn print_comparison(ours: &serde_json::Value, torch: &serde_json::Value) {
    println!("torch  {} {}", torch["torch_version"], torch["device"]);
    println!(
        "{:<28} {:>12} {:>12} {:>10}",
        "", "sd21 s", "torch s", "sd21/torch"
    );
    // (label, sd21's key, torch's key): the graph-replayed step against torch's eager step.
    for (label, key, torch_key) in [
        ("text encode", "text_encode_s", "text_encode_s"),
        ("unet step (cfg, batch 2)", "unet_step_s", "unet_step_s"),
        (
            "unet step as a CUDA graph",
            "unet_step_cuda_graph_s",
            "unet_step_s",
        ),
        ("vae decode", "vae_decode_s", "vae_decode_s"),
        (
            "generation per image",
            "generation_s_per_image",
            "generation_s_per_image",
        ),
    ] {
        let Some(a) = ours[key].as_f64() else {
            continue; // no CUDA graph on this backend
        };
        let b = torch[torch_key].as_f64().unwrap_or(f64::NAN);
        println!("{label:<28} {a:>12.4} {b:>12.4} {:>9.2}×", a / b);
    }
}

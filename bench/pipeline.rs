//! `sd21-bench pipeline`: a whole generation and each of its parts (text encode, one UNet step,
//! VAE decode), timed on one backend, and the same work run by bench/torch_reference.py.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use sd21::backend::Backend;
use sd21::demo::random_model;
use sd21::pipeline::{GenerationRequest, Pipeline};
use sd21::tensor::HostTensor;
use sd21::weights::ModelFiles;

use crate::device::BenchDevice;
use crate::models::RandomModel;
use crate::ops::median;
use crate::DeviceArg;

const PROMPT: &str = "a photograph of an astronaut riding a horse";

pub struct PipelineOpts {
    pub model: Option<PathBuf>,
    pub random: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: usize,
    pub batch: usize,
    pub repeats: usize,
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let start = Instant::now();
    let out = f()?;
    Ok((out, start.elapsed().as_secs_f64()))
}

/// Times every part of a generation on `backend` and prints and returns the figures.
pub fn pipeline<B: BenchDevice>(backend: B, opts: &PipelineOpts) -> Result<serde_json::Value> {
    let device = backend.describe();
    let (pipe, load_s) = timed(|| load(backend, opts))?;
    let (native_w, native_h) = pipe.native_size();
    let width = opts.width.unwrap_or(native_w);
    let height = opts.height.unwrap_or(native_h);
    println!(
        "device: {device}; model: {}; {width}×{height}; load {load_s:.2} s",
        pipe.model_name()
    );
    let reps = opts.repeats.max(1);
    let (context, encode) = time_text_encode(&pipe, reps)?;
    let latents = step_latents(&pipe, width, height)?;
    let (unet, unet_enqueue) = time_unet_step(&pipe, &latents, &context, reps)?;
    let vae = time_vae_decode(&pipe, width, height, reps)?;
    let request = GenerationRequest {
        prompt: PROMPT.into(),
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
    let model_name = pipe.model_name().to_string();
    let unet_graph = time_unet_graph(pipe, &latents, &context, reps)?;
    let result = json!({
        "device": device, "model": model_name, "width": width, "height": height,
        "steps": opts.steps, "images": request.number_of_images, "load_s": load_s,
        "text_encode_s": median(encode), "unet_step_s": median(unet),
        "unet_step_host_enqueue_s": median(unet_enqueue),
        "unet_step_cuda_graph_s": (!unet_graph.is_empty()).then(|| median(unet_graph)),
        "vae_decode_s": median(vae),
        "generation_s_per_image": per_image, "it_per_s": opts.steps as f64 / per_image,
    });
    print_figures(&result);
    Ok(result)
}

/// The model of `--model DIR` or `--random NAME` on `backend`.
fn load<B: Backend>(backend: B, opts: &PipelineOpts) -> Result<Pipeline<B>> {
    Ok(match (&opts.model, &opts.random) {
        (Some(dir), None) => Pipeline::load(&ModelFiles::locate(dir)?, backend)?,
        (None, Some(name)) => {
            let model = RandomModel::parse(name)?;
            random_model(
                backend,
                model.configs()?,
                format!("random {}", model.name()),
            )?
        }
        _ => bail!("pass --model DIR or --random sd21-512|sd21-768|tiny"),
    })
}

/// The guided text encoding of [`PROMPT`] (for the UNet step) and its timings.
fn time_text_encode<B: BenchDevice>(
    pipe: &Pipeline<B>,
    reps: usize,
) -> Result<(B::Tensor, Vec<f64>)> {
    let mut times = Vec::new();
    let mut context = None;
    for _ in 0..reps {
        let (ctx, t) = timed(|| {
            let ctx = pipe.encode_prompts(PROMPT, "", true)?;
            pipe.backend().synchronize()?;
            Ok(ctx)
        })?;
        times.push(t);
        context = Some(ctx);
    }
    context.context("no text encoding ran").map(|c| (c, times))
}

/// Deterministic latents `[2, h, w, c]` (the guided batch) for a UNet step at this size.
fn step_latents<B: Backend>(pipe: &Pipeline<B>, width: usize, height: usize) -> Result<B::Tensor> {
    let f = pipe.latent_factor();
    let (h, w) = (height / f, width / f);
    let c = pipe.unet().config().in_channels;
    let values = (0..2 * h * w * c).map(|i| ((i % 17) as f32 - 8.0) / 8.0);
    let latents = HostTensor::new(vec![2, h, w, c], values.collect())?;
    Ok(pipe.backend().upload(&latents)?)
}

/// One UNet step op by op, and the host's share of it: how long the evaluation takes to return
/// (on CUDA it only enqueues work; when that is close to the whole step, the step is bound by
/// the host's launch and allocation overhead, not by the GPU). The first run warms up (unless
/// only one was asked for).
fn time_unet_step<B: BenchDevice>(
    pipe: &Pipeline<B>,
    latents: &B::Tensor,
    context: &B::Tensor,
    reps: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut total, mut enqueue) = (Vec::new(), Vec::new());
    for i in 0..=reps {
        let start = Instant::now();
        let out = pipe.evaluate_unet(latents, 500.0, context)?;
        let enqueued = start.elapsed().as_secs_f64();
        pipe.backend().synchronize()?;
        let step = start.elapsed().as_secs_f64();
        drop(out);
        if i > 0 || reps == 1 {
            total.push(step);
            enqueue.push(enqueued);
        }
    }
    Ok((total, enqueue))
}

/// The same step replayed as a graph, on backends that record them (empty elsewhere). The
/// first call runs op by op and the second records, so both stay out of the timing.
fn time_unet_graph<B: BenchDevice>(
    pipe: Pipeline<B>,
    latents: &B::Tensor,
    context: &B::Tensor,
    reps: usize,
) -> Result<Vec<f64>> {
    let Some(recorder) = pipe.backend().graph_recorder() else {
        return Ok(Vec::new());
    };
    let pipe = pipe.with_unet_recorder(recorder);
    for _ in 0..2 {
        pipe.evaluate_unet(latents, 500.0, context)?;
    }
    pipe.backend().synchronize()?;
    let mut times = Vec::new();
    for _ in 0..reps {
        let (_, t) = timed(|| {
            let out = pipe.evaluate_unet(latents, 500.0, context)?;
            pipe.backend().synchronize()?;
            Ok(out)
        })?;
        times.push(t);
    }
    Ok(times)
}

/// One VAE decode of deterministic latents at this size, `reps` times.
fn time_vae_decode<B: Backend>(
    pipe: &Pipeline<B>,
    width: usize,
    height: usize,
    reps: usize,
) -> Result<Vec<f64>> {
    let f = pipe.latent_factor();
    let (h, w) = (height / f, width / f);
    let c = pipe.unet().config().in_channels;
    let values = (0..h * w * c).map(|i| ((i % 13) as f32 - 6.0) / 6.0);
    let z = HostTensor::new(vec![1, c, h, w], values.collect())?;
    (0..reps)
        .map(|_| Ok(timed(|| Ok(pipe.decode(&z)?))?.1))
        .collect()
}

fn print_figures(result: &serde_json::Value) {
    let figure = |key: &str| result[key].as_f64().unwrap_or(f64::NAN);
    let steps = result["steps"].as_u64().unwrap_or(0);
    println!(
        "sd21   text encode {:.3} s | unet step (cfg, batch 2) {:.3} s | vae decode {:.3} s | generation {:.2} s/image, {:.3} it/s ({steps} steps)",
        figure("text_encode_s"),
        figure("unet_step_s"),
        figure("vae_decode_s"),
        figure("generation_s_per_image"),
        figure("it_per_s"),
    );
    println!(
        "sd21   unet step: forward returned after {:.4} s of the {:.4} s step (host enqueue share)",
        figure("unet_step_host_enqueue_s"),
        figure("unet_step_s"),
    );
    if let Some(graph_s) = result["unet_step_cuda_graph_s"].as_f64() {
        println!("sd21   unet step replayed as a CUDA graph: {graph_s:.4} s");
    }
}

/// Runs bench/torch_reference.py on the same weights (the `--model` folder, or the `--random`
/// model written once as a folder), size and steps.
pub fn torch_reference(
    python: &str,
    device: DeviceArg,
    opts: &PipelineOpts,
) -> Result<serde_json::Value> {
    let dir = match (&opts.random, &opts.model) {
        (Some(name), _) => random_model_dir(RandomModel::parse(name)?)?,
        (None, Some(dir)) => dir.clone(),
        (None, None) => bail!("--compare-torch needs --model or --random"),
    };
    let configs = sd21::pipeline::ModelConfigs::read(&ModelFiles::locate(&dir)?)?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("bench")
        .join("torch_reference.py");
    let native = configs.unet.sample_size * configs.vae.latent_factor();
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .arg("--model")
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

/// `model` as a folder in the temporary directory, written on first use (`model_index.json`,
/// written last, marks a complete one).
pub fn random_model_dir(model: RandomModel) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("sd21-random-{}", model.name()));
    if !dir.join("model_index.json").is_file() {
        crate::write_random::write_random(model, &dir)?;
    }
    Ok(dir)
}

pub fn print_comparison(ours: &serde_json::Value, torch: &serde_json::Value) {
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

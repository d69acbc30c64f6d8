//! The `sd21` command line: `sd21 generate …` writes PNGs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tracing_subscriber::EnvFilter;

use sd21::backend::cpu::CpuBackend;
use sd21::image_io::{save_png, ImageParameters};
use sd21::pipeline::{GenerationRequest, Pipeline};
use sd21::sampling::SchedulerKind;
use sd21::weights::ModelFiles;

#[derive(Parser)]
#[command(
    name = "sd21",
    version,
    about = "Stable Diffusion 2.1 image generation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt and write them as PNG files.
    Generate(GenerateArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeviceArg {
    /// The best device present (the CPU in this build).
    Auto,
    /// The CPU backend (f32).
    Cpu,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A diffusers-layout model folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    #[arg(long)]
    model: PathBuf,
    /// What to draw.
    #[arg(long)]
    prompt: String,
    /// What to steer away from (the empty prompt when absent).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Image width in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    height: Option<usize>,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale (≤ 1 disables guidance).
    #[arg(long, default_value_t = 7.0)]
    cfg_scale: f32,
    /// Seed of the first image; image i uses seed + i (random when absent, and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// ddim, pndm, euler, euler_a, dpmpp_2m or dpmpp_2m_karras (default: the model's scheduler).
    #[arg(long)]
    scheduler: Option<String>,
    /// How many images to generate.
    #[arg(long, default_value_t = 1)]
    number_of_images: usize,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Output PNG; with several images, FILE-0.png, FILE-1.png, …
    #[arg(long)]
    output: PathBuf,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate(args),
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    if args.number_of_images == 0 {
        bail!("--number-of-images must be at least 1");
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let scheduler = args
        .scheduler
        .as_deref()
        .map(SchedulerKind::from_name)
        .transpose()?;
    let backend = match args.device {
        DeviceArg::Auto | DeviceArg::Cpu => CpuBackend::new(),
    };
    let files = ModelFiles::locate(&args.model)?;
    let pipeline = Pipeline::load(&files, backend)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let scheduler = match scheduler {
        Some(s) => s,
        None => pipeline
            .default_scheduler()
            .context("pass --scheduler to choose one")?,
    };
    let (native_w, native_h) = pipeline.native_size();
    let seed = args
        .seed
        .unwrap_or_else(|| u64::from(rand::random::<u32>()));
    let request = GenerationRequest {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        width: args.width.unwrap_or(native_w),
        height: args.height.unwrap_or(native_h),
        steps: args.steps,
        cfg_scale: args.cfg_scale,
        seed,
        scheduler,
        number_of_images: args.number_of_images,
    };
    eprintln!(
        "seed {seed}, {}×{}, {} steps, {}, cfg {}",
        request.width,
        request.height,
        request.steps,
        scheduler.name(),
        request.cfg_scale
    );

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let images = pipeline.generate(&request, &mut |p| {
        bar.set_length(p.steps_per_image as u64);
        bar.set_prefix(format!(
            "image {}/{}",
            p.image + 1,
            request.number_of_images
        ));
        bar.set_position(p.step as u64);
        true
    })?;
    bar.finish_and_clear();

    for (i, generated) in images.iter().enumerate() {
        let path = output_path(&args.output, i, images.len());
        let parameters = ImageParameters {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            steps: request.steps,
            sampler: scheduler.a1111_name().to_string(),
            cfg_scale: request.cfg_scale,
            seed: generated.seed,
            width: request.width,
            height: request.height,
            model: pipeline.model_name().to_string(),
        };
        save_png(&path, &generated.image, Some(&parameters))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("{} (seed {})", path.display(), generated.seed);
    }
    Ok(())
}

/// `FILE.png` for one image; `FILE-i.png` for image i of several.
fn output_path(output: &Path, index: usize, count: usize) -> PathBuf {
    if count == 1 {
        return output.to_path_buf();
    }
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = output
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    output.with_file_name(format!("{stem}-{index}.{ext}"))
}

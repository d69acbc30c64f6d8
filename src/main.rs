//! The `sd21` command line: `sd21 download [REPO]` fetches a model; `sd21 generate …` writes PNGs;
//! `sd21 serve …` serves the HTTP API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tracing_subscriber::EnvFilter;

use sd21::backend::cpu::CpuBackend;
use sd21::backend::cuda::CudaBackend;
use sd21::backend::{selftest, Device};
use sd21::demo::{load_demo, DEMO_MODEL};
use sd21::engine::ModelInfo;
use sd21::image_io::{load_image, resize, save_png, RgbImage};
use sd21::model::VaeTiling;
use sd21::pipeline::{
    load_on_device, GeneratedImage, GenerationRequest, ImageGenerator, ModelConfigs, Progress,
    Start,
};
use sd21::request::{self, GenerateRules, Limits};
use sd21::server::{response, ServerConfig};
use sd21::weights::hub::{self, HubConfig};
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
    /// CPU threads for the CPU backend and the host work (default: RAYON_NUM_THREADS, else every
    /// core this process may use).
    #[arg(long, global = true, env = "SD21_THREADS",
          value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

#[derive(Subcommand)]
enum Command {
    /// Download a diffusers-layout model from the Hugging Face Hub into the weights folder.
    Download(DownloadArgs),
    /// Generate images from a prompt and write them as PNG files.
    Generate(GenerateArgs),
    /// Serve the HTTP API (POST /generate/, /docs, /health, /ready, /metrics).
    Serve(ServeArgs),
    /// Generate images from an init image and a prompt (img2img) and write them as PNG files.
    Img2img(Img2ImgArgs),
    /// Repaint the white part of a mask in an image from a prompt, and write PNG files.
    Inpaint(InpaintArgs),
    /// Run every op once on a device against the CPU backend and print the table (exit 0 only
    /// when all pass); `sd21 serve` and `sd21 generate` run the same test before using a GPU.
    Selftest(SelftestArgs),
}

#[derive(clap::Args)]
struct Img2ImgArgs {
    /// The image to start from (PNG, JPEG or WebP; EXIF orientation applied). Width and height
    /// default to its size rounded down to a multiple of 8; a different size resizes it
    /// (Lanczos, a = 3).
    #[arg(long)]
    init_image: PathBuf,
    /// How much of the schedule is run from the noised init image: 0 keeps it, 1 ignores it.
    #[arg(long, default_value_t = request::DEFAULT_STRENGTH)]
    strength: f64,
    #[command(flatten)]
    generate: GenerateArgs,
}

#[derive(clap::Args)]
struct InpaintArgs {
    /// The image to repaint (PNG, JPEG or WebP); width and height default as for img2img.
    #[arg(long)]
    image: PathBuf,
    /// White (≥ 0.5 in grayscale) is repainted, black kept; resized to the image's size.
    #[arg(long)]
    mask: PathBuf,
    /// How much of the schedule runs inside the mask: 1 starts from pure noise there.
    #[arg(long, default_value_t = request::DEFAULT_INPAINT_STRENGTH)]
    strength: f64,
    #[command(flatten)]
    generate: GenerateArgs,
}

#[derive(clap::Args)]
struct SelftestArgs {
    /// cuda or cuda:N (cpu checks the reference against itself).
    #[arg(long, default_value = "cuda")]
    device: Device,
}

#[derive(clap::Args)]
struct DownloadArgs {
    /// A Hub repository in the diffusers layout (org/name), or sd21 (768², v-prediction) or
    /// sd21-base (512², epsilon).
    #[arg(default_value = hub::DEFAULT_REPO)]
    repo: String,
    /// Branch, tag or commit of the repository.
    #[arg(long, default_value = "main")]
    revision: String,
    /// The weights folder; the model lands in DIR/models--org--name/snapshots/<commit>/ (the Hub's
    /// cache layout: resumable, shared between revisions) with a link DIR/<name> to it.
    #[arg(long, env = "SD21_WEIGHTS_DIR", default_value = "weights")]
    dir: PathBuf,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A diffusers-layout model folder, or a Hub repository (org/name, sd21, sd21-base,
    /// sd2-inpaint) fetched into --weights-dir when missing.
    #[arg(long, default_value = "sd21-base")]
    model: String,
    /// Revision of a Hub repository given as --model.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Where Hub repositories are downloaded (see `sd21 download`).
    #[arg(long, env = "SD21_WEIGHTS_DIR", default_value = "weights")]
    weights_dir: PathBuf,
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
    #[arg(long, default_value_t = request::DEFAULT_STEPS)]
    steps: usize,
    /// Classifier-free guidance scale (≤ 1 disables guidance).
    #[arg(long, default_value_t = request::DEFAULT_CFG_SCALE)]
    cfg_scale: f32,
    /// Seed of the first image; image i uses seed + i (random when absent, and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// ddim, pndm, euler, euler_a, dpmpp_2m or dpmpp_2m_karras (default: the model's scheduler).
    #[arg(long)]
    scheduler: Option<String>,
    /// How many images to generate.
    #[arg(long, default_value_t = request::DEFAULT_IMAGES)]
    number_of_images: usize,
    /// auto (a GPU when this build has kernels and one is present, else the CPU), cpu, cuda or
    /// cuda:N.
    #[arg(long, default_value = "auto")]
    device: Device,
    #[command(flatten)]
    vae: VaeArgs,
    /// Output PNG; with several images, FILE-0.png, FILE-1.png, …
    #[arg(long)]
    output: PathBuf,
}

/// How the VAE tiles, for every command that generates.
#[derive(clap::Args, Clone, Copy)]
struct VaeArgs {
    /// Decode (and encode) in overlapping tiles of the VAE's sample_size, blended at the seams
    /// (diffusers' enable_vae_tiling()), for any image larger than one tile. Without it, tiles
    /// are used only where the whole image would not fit in the available memory.
    #[arg(long, env = "SD21_VAE_TILING")]
    vae_tiling: bool,
}

impl VaeArgs {
    fn tiling(self) -> VaeTiling {
        VaeTiling::forced(self.vae_tiling)
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A diffusers-layout model folder, or a Hub repository (org/name, sd21, sd21-base,
    /// sd2-inpaint) fetched into --weights-dir when missing; resolved and loaded once, at start-up.
    /// `demo`: a tiny random-weight model built in memory (no download; its images are noise).
    #[arg(long, env = "SD21_MODEL", default_value = "sd21-base")]
    model: String,
    /// Revision of a Hub repository given as --model.
    #[arg(long, env = "SD21_REVISION", default_value = "main")]
    revision: String,
    /// Where Hub repositories are downloaded (see `sd21 download`).
    #[arg(long, env = "SD21_WEIGHTS_DIR", default_value = "weights")]
    weights_dir: PathBuf,
    /// Address to bind (loopback by default; 0.0.0.0 to serve other machines).
    #[arg(long, env = "SD21_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port to bind (0: any free port, logged at start-up).
    #[arg(long, env = "SD21_PORT", default_value_t = 8000)]
    port: u16,
    /// auto (a GPU when this build has kernels and one is present, else the CPU), cpu, cuda or
    /// cuda:N.
    #[arg(long, env = "SD21_DEVICE", default_value = "auto")]
    device: Device,
    #[command(flatten)]
    vae: VaeArgs,
    /// Requests that may wait while one runs; more are answered 429 at once.
    #[arg(long, env = "SD21_QUEUE_SIZE", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    queue_size: u32,
    /// Most images one batch runs together: queued jobs with the same size, steps, scheduler
    /// and start step share each UNet pass (1: one image at a time). 1 by default on every device
    /// until batching is measured faster there.
    #[arg(long, env = "SD21_MAX_BATCH", default_value_t = sd21::engine::DEFAULT_MAX_BATCH as u32,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    max_batch: u32,
    /// Largest width × height a request may ask for.
    #[arg(long, env = "SD21_MAX_PIXELS", default_value_t = 1_048_576,
          value_parser = clap::value_parser!(u64).range(4096..))]
    max_pixels: u64,
    /// Most denoising steps a request may ask for.
    #[arg(long, env = "SD21_MAX_STEPS", default_value_t = 150,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_steps: u32,
    /// Most images one request may ask for.
    #[arg(long, env = "SD21_MAX_IMAGES", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_images: u32,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "SD21_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Allow browser requests from this origin (CORS); none when absent.
    #[arg(long, env = "SD21_CORS_ORIGIN")]
    cors_origin: Option<String>,
    /// Seconds a request may take from admission to answer (queue wait included).
    #[arg(long, env = "SD21_REQUEST_TIMEOUT", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout: u64,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "SD21_SHUTDOWN_TIMEOUT", default_value_t = 60)]
    shutdown_timeout: u64,
    /// Seconds a finished job's results stay (POST /jobs); jobs live in memory only.
    #[arg(long, env = "SD21_JOB_TTL", default_value_t = 600)]
    job_ttl: u64,
    /// Bytes the finished jobs' images, previews and events may take; the oldest go first.
    #[arg(long, env = "SD21_MAX_STORED_BYTES", default_value_t = 512 << 20)]
    max_stored_bytes: u64,
}

fn main() -> Result<()> {
    // Before any other thread exists: freed activation buffers are reused, not unmapped.
    let kept = sd21::backend::cpu::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    tracing::debug!(kept, "malloc keeps freed memory");
    let cli = Cli::parse();
    if let Some(threads) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(usize::from(threads))
            .build_global()
            .context("sizing the thread pool (--threads)")?;
    }
    match cli.command {
        Command::Download(args) => download(args),
        Command::Generate(args) => generate(args),
        Command::Serve(args) => serve(args),
        Command::Img2img(args) => img2img(args),
        Command::Inpaint(args) => inpaint(args),
        Command::Selftest(args) => selftest(args),
    }
}

fn selftest(args: SelftestArgs) -> Result<()> {
    let report = match args.device.resolve() {
        Device::Cuda(ordinal) => {
            let backend = CudaBackend::new(ordinal)
                .with_context(|| format!("no CUDA device to test ({})", args.device))?;
            selftest::run(&backend).with_kernel_choices(backend.start_up_checks())
        }
        Device::Auto | Device::Cpu => selftest::run(&CpuBackend::new()),
    };
    print!("{}", report.table());
    match report.first_failure() {
        None => Ok(()),
        Some(failure) => anyhow::bail!("the self-test failed: {failure}"),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let (device, vae_tiling) = (args.device, args.vae.tiling());
    // The engine thread loads the model, so /health answers while it loads.
    let load: sd21::engine::ModelLoader = if args.model == DEMO_MODEL {
        Box::new(move || load_demo(device))
    } else {
        let model_dir = resolve_model(&args.model, &args.revision, &args.weights_dir)?;
        let files = ModelFiles::locate(&model_dir)?;
        Box::new(move || {
            tracing::info!(model = %model_dir.display(), %device, "loading the model");
            load_on_device(&files, device, vae_tiling)
        })
    };
    let config = ServerConfig {
        host: args.host,
        port: args.port,
        limits: Limits {
            max_pixels: usize::try_from(args.max_pixels).context("--max-pixels is too large")?,
            max_steps: args.max_steps as usize,
            max_images: args.max_images as usize,
        },
        queue_size: args.queue_size as usize,
        max_batch: args.max_batch as usize,
        request_timeout: Duration::from_secs(args.request_timeout),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        api_key: args.api_key,
        cors_origin: args.cors_origin,
        jobs: sd21::server::jobs::store::StoreLimits {
            ttl: Duration::from_secs(args.job_ttl),
            max_stored_bytes: usize::try_from(args.max_stored_bytes)
                .context("--max-stored-bytes is too large")?,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sd21-http")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(sd21::server::run(config, load))
}

fn download(args: DownloadArgs) -> Result<()> {
    let repo = hub::repo_id_for(&args.repo).unwrap_or_else(|| args.repo.clone());
    let snapshot = hub::download(&repo, &args.revision, &args.dir, &HubConfig::from_env())?;
    if snapshot.downloaded == 0 {
        eprintln!("{repo} (commit {}) was already downloaded", snapshot.commit);
    } else {
        eprintln!(
            "downloaded {} file(s) of {repo} (commit {})",
            snapshot.downloaded, snapshot.commit
        );
    }
    if let Some(link) = &snapshot.link {
        eprintln!("{} -> {}", link.display(), snapshot.path.display());
    }
    eprintln!("serve it with: sd21 serve --model {}", args.repo);
    println!("{}", snapshot.path.display());
    Ok(())
}

/// `--model`: a folder as it is, or a Hub repository downloaded into the weights folder. Runs
/// once, at start-up.
fn resolve_model(model: &str, revision: &str, weights_dir: &Path) -> Result<PathBuf> {
    Ok(hub::resolve_model(
        model,
        revision,
        weights_dir,
        &HubConfig::from_env(),
    )?)
}

fn generate(args: GenerateArgs) -> Result<()> {
    let (files, model) = locate_model(&args)?;
    let request = build_request(&args, &model)?;
    run_and_save(&files, &model, &args, &request, Start::Noise)
}

fn img2img(args: Img2ImgArgs) -> Result<()> {
    let init = read_image("--init-image", &args.init_image)?;
    let (files, model, request) = sized_request(&args.generate, &init)?;
    let start = Start::Image {
        init: Arc::new(fit(init, &request, "init image")?),
        strength: args.strength,
    };
    run_and_save(&files, &model, &args.generate, &request, start)
}

fn inpaint(args: InpaintArgs) -> Result<()> {
    let image = read_image("--image", &args.image)?;
    let mask = read_image("--mask", &args.mask)?;
    let (files, model, request) = sized_request(&args.generate, &image)?;
    let start = Start::Masked {
        image: Arc::new(fit(image, &request, "image")?),
        mask: Arc::new(fit(mask, &request, "mask")?),
        strength: args.strength,
    };
    run_and_save(&files, &model, &args.generate, &request, start)
}

/// Loads the model (when it runs `start`), runs `request` from `start` with a progress bar, and
/// writes the PNGs.
fn run_and_save(
    files: &ModelFiles,
    model: &ModelInfo,
    args: &GenerateArgs,
    request: &GenerationRequest,
    start: Start,
) -> Result<()> {
    model.check_start(&start)?;
    let pipeline = load_pipeline(files, args, request)?;
    let bar = progress_bar();
    let images = start.run(pipeline.as_ref(), request, &mut |p| {
        show_progress(&bar, request, p)
    })?;
    bar.finish_and_clear();
    save_images(
        &args.output,
        request,
        &images,
        pipeline.model_name(),
        &start,
    )
}

/// An input image of the CLI, within its pixel limit.
fn read_image(flag: &str, path: &Path) -> Result<RgbImage> {
    load_image(path, Limits::cli().max_pixels)
        .with_context(|| format!("reading {flag} {}", path.display()))
}

/// The request, with width and height defaulting to `image`'s size rounded down to the latent
/// factor.
fn sized_request(
    args: &GenerateArgs,
    image: &RgbImage,
) -> Result<(ModelFiles, ModelInfo, GenerationRequest)> {
    let (files, mut model) = locate_model(args)?;
    let f = model.latent_factor;
    model.native_size = ((image.width / f * f).max(f), (image.height / f * f).max(f));
    let request = build_request(args, &model)?;
    Ok((files, model, request))
}

/// `image` at the request's size (resized with a Lanczos filter when it is not).
fn fit(image: RgbImage, request: &GenerationRequest, what: &str) -> Result<RgbImage> {
    if (image.width, image.height) == (request.width, request.height) {
        return Ok(image);
    }
    eprintln!(
        "resizing the {what} from {}×{} to {}×{} (Lanczos)",
        image.width, image.height, request.width, request.height
    );
    Ok(resize(&image, request.width, request.height)?)
}

/// The model folder of `--model` and what a request is checked against (its configs only).
fn locate_model(args: &GenerateArgs) -> Result<(ModelFiles, ModelInfo)> {
    let model_dir = resolve_model(&args.model, &args.revision, &args.weights_dir)?;
    let files = ModelFiles::locate(&model_dir)?;
    let model = ModelConfigs::read(&files)?.model_info(files.model_name(), args.device.to_string());
    Ok((files, model))
}

/// The same request the server would build from these flags (its rules and defaults), checked
/// before any weight is loaded.
fn build_request(args: &GenerateArgs, model: &ModelInfo) -> Result<GenerationRequest> {
    let fields = json!({
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "seed": args.seed,
        "scheduler": args.scheduler,
        "number_of_images": args.number_of_images,
    });
    let rules = GenerateRules::new(Limits::cli(), model.latent_factor);
    Ok(rules
        .parse(fields, model, || u64::from(rand::random::<u32>()))
        .map_err(|e| anyhow::anyhow!("--{}: {e}", e.field().replace('_', "-")))?
        .request)
}

/// The model on `--device`, and a line saying what runs.
fn load_pipeline(
    files: &ModelFiles,
    args: &GenerateArgs,
    request: &GenerationRequest,
) -> Result<Box<dyn ImageGenerator>> {
    let pipeline = load_on_device(files, args.device, args.vae.tiling())
        .with_context(|| format!("loading {} on {}", files.root.display(), args.device))?;
    eprintln!(
        "seed {}, {}×{}, {} steps, {}, cfg {}, on {}",
        request.seed,
        request.width,
        request.height,
        request.steps,
        request.scheduler.name(),
        request.cfg_scale,
        pipeline.describe_device()
    );
    Ok(pipeline)
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

fn show_progress(bar: &ProgressBar, request: &GenerationRequest, p: Progress) -> bool {
    bar.set_length(p.steps_per_image as u64);
    bar.set_prefix(format!(
        "image {}/{}",
        p.image + 1,
        request.number_of_images
    ));
    bar.set_position(p.step as u64);
    true
}

/// Writes each image as a PNG with its A1111 parameters and prints its path and seed.
fn save_images(
    output: &Path,
    request: &GenerationRequest,
    images: &[GeneratedImage],
    model: &str,
    start: &Start,
) -> Result<()> {
    for (i, generated) in images.iter().enumerate() {
        let path = output_path(output, i, images.len());
        let parameters = response::parameters(request, model, generated.seed, start);
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

//! txt2img: tokenize → encode (with the negative prompt for guidance) → denoise with CFG →
//! decode → pixels. Latents stay on the host in NCHW order between steps, so the noise drawn for
//! them is exactly what diffusers draws with the same seed.

mod batch;

use std::sync::{Arc, OnceLock};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, RecordingId};
use crate::backend::{Backend, Device, OpenedBackend, RecordedFn};
use crate::config::{self, ClipTextConfig, SchedulerConfig, UnetConfig, VaeConfig};
use crate::engine::ModelInfo;
use crate::image_io::RgbImage;
use crate::model::{ClipTextModel, Unet, VaeDecoder, VaeEncoder, VaeTiling};
use crate::request::ValidationError;
use crate::sampling::rng::TorchGenerator;
use crate::sampling::{build_scheduler, Scheduler, SchedulerKind};
use crate::tensor::HostTensor;
use crate::tokenizer::ClipTokenizer;
use crate::weights::{ModelFiles, SafeTensorsFile, TensorSource, WeightScope};
use crate::{Error, Result};

pub use batch::{BatchKey, BatchRow, BatchStep, PreparedJob, StepRow};

/// Everything one generation needs besides the model.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub prompt: String,
    /// The empty string when the user gave none (diffusers' convention).
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; ≤ 1 means no guidance (one conditional pass).
    pub cfg_scale: f32,
    /// Seed of image 0; image i uses `seed + i` (wrapping).
    pub seed: u64,
    pub scheduler: SchedulerKind,
    pub number_of_images: usize,
}

/// Progress reported after every denoising step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress<'a> {
    /// Index of the image being generated.
    pub image: usize,
    /// Steps done for this image (1-based).
    pub step: usize,
    /// Model evaluations per image (PNDM does one more than `steps`, as in diffusers).
    pub steps_per_image: usize,
    /// Images of this job that took this step together (in one batch), `image` the first.
    pub images_at_once: usize,
    /// The image's latents after this step (for previews).
    pub latents: Latents<'a>,
}

/// One image's latents, NCHW `[1, channels, height, width]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latents<'a> {
    pub data: &'a [f32],
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

/// One generated image and the seed that made it.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub seed: u64,
    pub image: RgbImage,
    /// The device's VAE decode overflowed (non-finite pixels) and the image was decoded again
    /// in f32 on the CPU.
    pub decoded_in_f32: bool,
}

/// The parsed configs of the four components.
#[derive(Debug, Clone)]
pub struct ModelConfigs {
    pub unet: UnetConfig,
    pub vae: VaeConfig,
    pub text_encoder: ClipTextConfig,
    pub scheduler: SchedulerConfig,
}

impl ModelConfigs {
    /// The configs of a diffusers-layout model folder (no weights are read).
    pub fn read(files: &ModelFiles) -> Result<Self> {
        Ok(ModelConfigs {
            unet: config::read_json(&files.unet_config)?,
            vae: config::read_json(&files.vae_config)?,
            text_encoder: config::read_json(&files.text_encoder_config)?,
            scheduler: config::read_json(&files.scheduler_config)?,
        })
    }

    /// What a request is checked against, before any weight is loaded.
    pub fn model_info(&self, name: String, device: String) -> ModelInfo {
        ModelInfo {
            name,
            device,
            native_size: config::native_size(&self.unet, &self.vae),
            latent_factor: self.vae.latent_factor(),
            default_scheduler: SchedulerKind::from_config(&self.scheduler)
                .map_err(|e| e.to_string()),
            inpainting_model: config::is_inpainting_model(&self.unet, &self.vae),
        }
    }
}

/// Where each component's tensors come from.
#[derive(Clone, Copy)]
pub struct ComponentSources<'a> {
    pub text_encoder: &'a dyn TensorSource,
    pub unet: &'a dyn TensorSource,
    pub vae: &'a dyn TensorSource,
}

/// Runs one UNet evaluation (a pure function of its device inputs) through a backend that
/// records: captured once and replayed on later steps (the CUDA backend's graphs).
pub type UnetRecorder<B> = Box<
    dyn Fn(
            &B,
            &[&<B as Backend>::Tensor],
            &RecordedFn<'_, <B as Backend>::Tensor>,
        ) -> Result<<B as Backend>::Tensor>
        + Send
        + Sync,
>;

/// A loaded Stable Diffusion 2.x model on one backend.
pub struct Pipeline<B: Backend> {
    backend: B,
    /// How UNet evaluations run: `None` op by op (every backend), else recorded and replayed.
    unet_recorder: Option<UnetRecorder<B>>,
    f32_decoder: Option<F32Decoder>,
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel<B>,
    unet: Unet<B>,
    vae: VaeDecoder<B>,
    /// Present when the VAE's weights hold the encoder (img2img needs it).
    vae_encoder: Option<VaeEncoder<B>>,
    /// When the VAE decodes and encodes in tiles.
    vae_tiling: VaeTiling,
    scheduler_config: SchedulerConfig,
    model_name: String,
}

impl<B: Backend> Pipeline<B> {
    /// Loads every component of a diffusers-layout model folder onto `backend`.
    pub fn load(files: &ModelFiles, backend: B) -> Result<Self> {
        let configs = ModelConfigs::read(files)?;
        let tokenizer = ClipTokenizer::from_dir(&files.tokenizer_dir)?;
        tracing::info!(path = %files.text_encoder_weights.display(), "loading text encoder");
        let text_encoder = SafeTensorsFile::open(&files.text_encoder_weights)?;
        tracing::info!(path = %files.unet_weights.display(), "loading unet");
        let unet = SafeTensorsFile::open(&files.unet_weights)?;
        tracing::info!(path = %files.vae_weights.display(), "loading vae");
        let vae = SafeTensorsFile::open(&files.vae_weights)?;
        let sources = ComponentSources {
            text_encoder: &text_encoder,
            unet: &unet,
            vae: &vae,
        };
        Self::build(backend, tokenizer, configs, sources, files.model_name())
    }

    /// Builds the pipeline from parsed configs and any tensor sources (files, or
    /// [`crate::weights::RandomWeights`] for benchmarks).
    pub fn build(
        backend: B,
        tokenizer: ClipTokenizer,
        configs: ModelConfigs,
        sources: ComponentSources<'_>,
        model_name: String,
    ) -> Result<Self> {
        let ModelConfigs {
            unet: unet_config,
            vae: vae_config,
            text_encoder: clip_config,
            scheduler: scheduler_config,
        } = configs;
        if clip_config.hidden_size != unet_config.cross_attention_dim {
            return Err(Error::Config(format!(
                "text encoder hidden_size {} does not match unet cross_attention_dim {}",
                clip_config.hidden_size, unet_config.cross_attention_dim
            )));
        }
        let latent = vae_config.latent_channels;
        if unet_config.in_channels != latent && unet_config.in_channels != 2 * latent + 1 {
            return Err(Error::Config(format!(
                "unet in_channels {} is neither the vae's latent_channels {latent} nor {} (an \
                 inpainting model: latents, mask and masked-image latents)",
                unet_config.in_channels,
                2 * latent + 1
            )));
        }
        if unet_config.out_channels != latent {
            return Err(Error::Config(format!(
                "unet out_channels {} does not match vae latent_channels {latent}",
                unet_config.out_channels
            )));
        }
        let text_encoder = ClipTextModel::load(
            &WeightScope::new(sources.text_encoder, &backend),
            &clip_config,
        )?;
        let unet = Unet::load(&WeightScope::new(sources.unet, &backend), &unet_config)?;
        let vae = VaeDecoder::load(&WeightScope::new(sources.vae, &backend), &vae_config)?;
        let vae_encoder = if sources.vae.contains("encoder.conv_in.weight") {
            Some(VaeEncoder::load(
                &WeightScope::new(sources.vae, &backend),
                &vae_config,
            )?)
        } else {
            None
        };
        Ok(Pipeline {
            backend,
            unet_recorder: None,
            f32_decoder: None,
            tokenizer,
            text_encoder,
            unet,
            vae,
            vae_encoder,
            vae_tiling: VaeTiling::default(),
            scheduler_config,
            model_name,
        })
    }

    /// Tiles the VAE's passes as `tiling` says from now on.
    pub fn with_vae_tiling(mut self, tiling: VaeTiling) -> Self {
        self.vae_tiling = tiling;
        self
    }

    /// Runs every UNet evaluation through `recorder` from now on.
    pub fn with_unet_recorder(mut self, recorder: UnetRecorder<B>) -> Self {
        self.unet_recorder = Some(recorder);
        self
    }

    /// Decodes again with `decoder` whenever this backend's VAE decode is not finite.
    pub fn with_f32_decoder(mut self, decoder: F32Decoder) -> Self {
        self.f32_decoder = Some(decoder);
        self
    }

    /// One guided UNet evaluation, through the recorder when there is one.
    pub fn evaluate_unet(
        &self,
        sample: &B::Tensor,
        timestep: f32,
        context: &B::Tensor,
    ) -> Result<B::Tensor> {
        let b = &self.backend;
        let t_proj = self.unet.time_projection(b, sample, timestep, context)?; // [rows, C0]
        let Some(record) = &self.unet_recorder else {
            return self.unet.forward_projected(b, sample, &t_proj, context);
        };
        record(b, &[sample, &t_proj, context], &|inputs| {
            let [sample, t_proj, context] = inputs else {
                return Err(Error::shape("unet", "expected 3 recorded inputs"));
            };
            self.unet.forward_projected(b, sample, t_proj, context)
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The denoising UNet (benchmarks time it alone).
    pub fn unet(&self) -> &Unet<B> {
        &self.unet
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// The image is this many times larger than its latent (8 for SD 2.1).
    pub fn latent_factor(&self) -> usize {
        self.vae.config().latent_factor()
    }

    /// The model's native image size `(width, height)`: UNet `sample_size` × latent factor.
    pub fn native_size(&self) -> (usize, usize) {
        config::native_size(self.unet.config(), self.vae.config())
    }

    /// The scheduler named in the model's `scheduler_config.json`.
    pub fn default_scheduler(&self) -> Result<SchedulerKind> {
        SchedulerKind::from_config(&self.scheduler_config)
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Overrides the scheduler config's `prediction_type` (`epsilon` or `v_prediction`), as
    /// diffusers' `from_config(..., prediction_type=...)` does.
    pub fn set_prediction_type(&mut self, prediction_type: &str) -> Result<()> {
        let mut config = self.scheduler_config.clone();
        config.prediction_type = Some(prediction_type.to_string());
        crate::sampling::prediction_type(&config)?;
        self.scheduler_config = config;
        Ok(())
    }

    /// Token ids → text embeddings `[rows, 77, D]`: `[negative, prompt]` with guidance, else `[prompt]`.
    pub fn encode_prompts(
        &self,
        prompt: &str,
        negative_prompt: &str,
        guidance: bool,
    ) -> Result<B::Tensor> {
        let cond = self.tokenizer.encode(prompt)?;
        let rows = if guidance {
            vec![self.tokenizer.encode(negative_prompt)?, cond]
        } else {
            vec![cond]
        };
        self.text_encoder.forward(&self.backend, &rows)
    }

    /// Generates `request.number_of_images` images, one after another; `on_step` is called
    /// after every denoising step and returning `false` cancels the job (`Error::Cancelled`).
    pub fn generate(
        &self,
        request: &GenerationRequest,
        on_step: &mut dyn FnMut(Progress<'_>) -> bool,
    ) -> Result<Vec<GeneratedImage>> {
        Start::Noise.run(self, request, on_step)
    }

    /// img2img as diffusers' `StableDiffusionImg2ImgPipeline`: `init` (the request's size) is
    /// encoded and its posterior sampled, scaled, noised to the step where `strength` starts the
    /// schedule ([`crate::sampling::img2img_first_step`]), and denoised from there. The generator of image i
    /// (seed + i) draws the posterior sample, then the noise, then any per-step noise.
    pub fn img2img(
        &self,
        request: &GenerationRequest,
        init: &RgbImage,
        strength: f64,
        on_step: &mut dyn FnMut(Progress<'_>) -> bool,
    ) -> Result<Vec<GeneratedImage>> {
        let start = Start::Image {
            init: Arc::new(init.clone()),
            strength,
        };
        start.run(self, request, on_step)
    }

    /// Inpainting as diffusers' `StableDiffusionInpaintPipeline`: `mask` white (≥ 0.5 after
    /// PIL's grayscale) is repainted, black kept. The start is pure noise at strength 1, else the
    /// image's latents noised to the first step. A 4-channel model has the latents outside the mask
    /// reset to the image's (noised to the next step) after every step; an inpainting model
    /// ([`config::is_inpainting_model`]) takes the mask and the masked image's latents as extra
    /// UNet input instead. The generator of image i (seed + i) draws as diffusers': the image's
    /// posterior sample (only where its latents are used), the noise, the masked image's sample
    /// (drawn but unused by 4-channel models), then per-step noise.
    pub fn inpaint(
        &self,
        request: &GenerationRequest,
        image: &RgbImage,
        mask: &RgbImage,
        strength: f64,
        on_step: &mut dyn FnMut(Progress<'_>) -> bool,
    ) -> Result<Vec<GeneratedImage>> {
        let start = Start::Masked {
            image: Arc::new(image.clone()),
            mask: Arc::new(mask.clone()),
            strength,
        };
        start.run(self, request, on_step)
    }

    /// Whether this is an inpainting model ([`config::is_inpainting_model`]).
    pub fn is_inpainting_model(&self) -> bool {
        config::is_inpainting_model(self.unet.config(), self.vae.config())
    }

    /// The binary image mask `[H, W]` at latent size `[h, w]`, as torch's nearest resize by an
    /// exact factor: the top-left pixel of each f×f block.
    fn latent_mask(&self, request: &GenerationRequest, binary: &[f32]) -> Vec<f32> {
        let (_, h, w) = self.latent_shape(request);
        let f = self.latent_factor();
        (0..h * w)
            .map(|i| binary[(i / w) * f * request.width + (i % w) * f])
            .collect()
    }

    /// The VAE encoder `what` needs, or why this model has none.
    fn encoder(&self, what: &str) -> Result<&VaeEncoder<B>> {
        self.vae_encoder.as_ref().ok_or_else(|| {
            Error::InvalidRequest(format!("this model's VAE has no encoder, so no {what}"))
        })
    }

    /// The request rules every pipeline shares (the server and the CLI check them earlier), and
    /// whether this model runs `pipeline`.
    fn check_request(&self, request: &GenerationRequest, pipeline: Pipelines) -> Result<()> {
        pipeline
            .check_runs_on(&self.model_name, self.is_inpainting_model())
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let f = self.latent_factor();
        if request.width == 0
            || request.height == 0
            || !request.width.is_multiple_of(f)
            || !request.height.is_multiple_of(f)
        {
            return Err(Error::InvalidRequest(format!(
                "width and height must be positive multiples of {f}, got {}×{}",
                request.width, request.height
            )));
        }
        if request.steps == 0 {
            return Err(Error::InvalidRequest("steps must be at least 1".into()));
        }
        if !request.cfg_scale.is_finite() {
            return Err(Error::InvalidRequest(
                "cfg_scale must be a finite number".into(),
            ));
        }
        Ok(())
    }

    /// The request's scheduler, after `set_timesteps(steps)` (epsilon when the config names no
    /// prediction type).
    fn scheduler(&self, request: &GenerationRequest) -> Result<Box<dyn Scheduler>> {
        let mut scheduler_config = self.scheduler_config.clone();
        if scheduler_config.prediction_type.is_none() {
            scheduler_config.prediction_type = Some("epsilon".into());
        }
        build_scheduler(request.scheduler, &scheduler_config, request.steps)
    }

    /// `(C, h, w)` of the request's latents.
    fn latent_shape(&self, request: &GenerationRequest) -> (usize, usize, usize) {
        let f = self.latent_factor();
        let c = self.vae.config().latent_channels;
        (c, request.height / f, request.width / f)
    }

    /// NCHW latents → 8-bit RGB, as diffusers: decode(latents / scaling_factor), then
    /// round(255 · clamp(x/2 + 0.5, 0, 1)).
    pub fn decode(&self, latents: &HostTensor) -> Result<RgbImage> {
        Ok(self.decode_checked(latents)?.0)
    }

    /// [`Pipeline::decode`], and whether the f32 decoder had to redo it: non-finite pixels from
    /// the device (f16 overflow in SD 2.x's VAE at high resolution) are decoded again by the
    /// [`F32Decoder`] where there is one, never turned into a black or speckled PNG.
    fn decode_checked(&self, latents: &HostTensor) -> Result<(RgbImage, bool)> {
        let b = &self.backend;
        // diffusers: latents / scaling_factor + shift_factor (the shift only where set).
        let scale = self.vae.config().scaling_factor;
        let shift = self.vae.config().shift_factor.unwrap_or(0.0);
        let z = HostTensor::new(
            latents.shape.clone(),
            latents.data.iter().map(|x| x / scale + shift).collect(),
        )?
        .nchw_to_nhwc()?; // [1, h, w, C_lat]
        let image = self.vae.decode_host(b, &z, self.vae_tiling)?; // [1, H, W, 3]
        if image.data.iter().all(|v| v.is_finite()) {
            return Ok((to_rgb(&image), false));
        }
        let Some(decode_f32) = &self.f32_decoder else {
            return Err(Error::NonFinite(
                "the VAE produced non-finite pixels".into(),
            ));
        };
        tracing::warn!(
            "the VAE decode overflowed on {}; decoding again in f32",
            b.describe()
        );
        let image = decode_f32(&z)?;
        if image.data.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite(
                "the VAE produced non-finite pixels, in f32 too".into(),
            ));
        }
        Ok((to_rgb(&image), true))
    }
}

/// Where one image's sampling loop starts: the scheduler after `set_timesteps`, the NCHW latents
/// at step index `first_step`, and the generator that drew them (ancestral samplers go on
/// drawing from it).
struct DenoiseStart {
    scheduler: Box<dyn Scheduler>,
    latents: Vec<f32>,
    first_step: usize,
    rng: TorchGenerator,
    masking: Masking,
}

/// How inpainting keeps what is outside the mask, by kind of model.
enum Masking {
    /// Not inpainting.
    None,
    /// A 4-channel model: the latents are blended with the image's after every step.
    Blend(KeptLatents),
    /// An inpainting model: the mask and the masked image's latents are UNet input.
    Condition(MaskCondition),
}

/// The extra UNet input of an inpainting model, as diffusers concatenates it after
/// `scale_model_input`: `[latents, mask, masked-image latents]` along the channels.
struct MaskCondition {
    /// 1 where the model repaints: `[h, w]`.
    mask: Vec<f32>,
    /// The masked image's scaled latents, `[1, C, h, w]`.
    masked_image_latents: Vec<f32>,
}

impl MaskCondition {
    /// `[rows, C, h, w]` scaled latents → `[rows, 2C + 1, h, w]`.
    fn unet_input(&self, latents: &[f32], rows: usize) -> Vec<f32> {
        let per_row = latents.len() / rows;
        let mut input = Vec::with_capacity(latents.len() + rows * (self.mask.len() + per_row));
        for row in latents.chunks_exact(per_row) {
            input.extend_from_slice(row);
            input.extend_from_slice(&self.mask);
            input.extend_from_slice(&self.masked_image_latents);
        }
        input
    }
}

/// diffusers' inpainting blend for 4-channel models: after step i the latents outside the mask
/// become the original image's latents noised to step i + 1 (the original itself after the last).
struct KeptLatents {
    /// The init image's scaled latents, NCHW.
    image_latents: Vec<f32>,
    /// The noise the start latents were made with.
    noise: Vec<f32>,
    /// 1 where the model repaints, 0 where the image is kept: `[h, w]` (every channel alike).
    mask: Vec<f32>,
}

impl KeptLatents {
    fn blend(
        &self,
        scheduler: &dyn Scheduler,
        latents: &mut [f32],
        step_index: usize,
    ) -> Result<()> {
        let last = step_index + 1 >= scheduler.timesteps().len();
        let proper = if last {
            self.image_latents.clone()
        } else {
            scheduler.add_noise(&self.image_latents, &self.noise, step_index + 1)?
        };
        let plane = self.mask.len();
        for (i, (l, p)) in latents.iter_mut().zip(proper).enumerate() {
            let m = self.mask[i % plane];
            *l = (1.0 - m) * p + m * *l;
        }
        Ok(())
    }
}

/// 8-bit RGB → `[1, H, W, 3]` in [−1, 1], as diffusers' `VaeImageProcessor.preprocess` (x/255 in
/// f32, then 2x − 1).
fn pixels_to_unit_range(image: &RgbImage) -> Result<HostTensor> {
    let data = image
        .pixels
        .iter()
        .map(|&p| 2.0 * (p as f32 / 255.0) - 1.0)
        .collect();
    HostTensor::new(vec![1, image.height, image.width, 3], data)
}

/// The mask as diffusers' mask processor reads it: PIL's grayscale (ITU-R 601, rounded as PIL
/// does), /255, then 1 where ≥ 0.5, else 0. `[H, W]`.
fn binarize_mask(mask: &RgbImage) -> Vec<f32> {
    mask.pixels
        .chunks_exact(3)
        .map(|p| {
            let (r, g, b) = (u32::from(p[0]), u32::from(p[1]), u32::from(p[2]));
            let gray = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
            if gray as f32 / 255.0 >= 0.5 {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

/// diffusers' masked image: `image [1, H, W, 3]` where the binary mask `[H, W]` keeps it, 0
/// where it is repainted.
fn masked_image(image: &HostTensor, binary_mask: &[f32]) -> Result<HostTensor> {
    let data = image
        .data
        .chunks_exact(3)
        .zip(binary_mask)
        .flat_map(|(rgb, &m)| rgb.iter().map(move |&x| if m < 0.5 { x } else { 0.0 }))
        .collect();
    HostTensor::new(image.shape.clone(), data)
}

/// `[1, H, W, 3]` in [-1, 1] → 8-bit RGB.
fn to_rgb(image: &HostTensor) -> RgbImage {
    let pixels = image
        .data
        .iter()
        .map(|&v| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    RgbImage {
        width: image.shape[2],
        height: image.shape[1],
        pixels,
    }
}

/// The VAE decode of scaled NHWC latents `[1, h, w, C_lat]` in f32 (→ `[1, H, W, 3]`), for when
/// the device's overflowed.
pub type F32Decoder = Box<dyn Fn(&HostTensor) -> Result<HostTensor> + Send + Sync>;

/// An [`F32Decoder`] on the CPU backend for the model in `files`; its VAE is loaded on first use.
pub fn cpu_f32_decoder(files: &ModelFiles) -> F32Decoder {
    let (config_path, weights_path) = (files.vae_config.clone(), files.vae_weights.clone());
    let loaded: OnceLock<std::result::Result<VaeDecoder<CpuBackend>, String>> = OnceLock::new();
    Box::new(move |z| {
        let cpu = CpuBackend::new();
        let vae = loaded.get_or_init(|| {
            let load = || -> Result<VaeDecoder<CpuBackend>> {
                let config: VaeConfig = config::read_json(&config_path)?;
                let weights = SafeTensorsFile::open(&weights_path)?;
                VaeDecoder::load(&WeightScope::new(&weights, &cpu), &config)
            };
            load().map_err(|e| e.to_string())
        });
        let vae = vae
            .as_ref()
            .map_err(|e| Error::Backend(format!("loading the f32 VAE decoder: {e}")))?;
        cpu.download(&vae.decode(&cpu, &cpu.upload(z)?)?)
    })
}

/// Loads the model on the backend [`Device::open`] starts for `device`, its VAE tiling as
/// `vae_tiling` says. On the CUDA backend, SD21_CUDA_GRAPHS=1 runs the UNet through
/// [`CudaBackend::run_recorded`] (CUDA graphs; off by default until they have been measured on
/// a GPU).
pub fn load_on_device(
    files: &ModelFiles,
    device: Device,
    vae_tiling: VaeTiling,
) -> Result<Box<dyn ImageGenerator>> {
    Ok(match device.open()? {
        OpenedBackend::Cpu(backend) => {
            Box::new(Pipeline::load(files, backend)?.with_vae_tiling(vae_tiling))
        }
        OpenedBackend::Cuda(backend) => {
            tracing::info!(device = %backend.describe(), "loading the model on the GPU");
            let pipeline = Pipeline::load(files, *backend)?
                .with_vae_tiling(vae_tiling)
                .with_f32_decoder(cpu_f32_decoder(files));
            if crate::env::flag("SD21_CUDA_GRAPHS") == Some(true) {
                Box::new(pipeline.with_unet_recorder(cuda_graphs()))
            } else {
                Box::new(pipeline)
            }
        }
    })
}

/// The UNet recorder of the CUDA backend: one new recording for this pipeline's UNet.
pub fn cuda_graphs() -> UnetRecorder<CudaBackend> {
    let recording = RecordingId::new();
    Box::new(move |backend: &CudaBackend, inputs, f| backend.run_recorded(recording, inputs, f))
}

/// Where a generation's latents start: from noise (txt2img), from an image (img2img), or from
/// an image with a mask of what to repaint (inpainting).
#[derive(Debug, Clone)]
pub enum Start {
    Noise,
    Image {
        init: Arc<RgbImage>,
        strength: f64,
    },
    Masked {
        image: Arc<RgbImage>,
        mask: Arc<RgbImage>,
        strength: f64,
    },
}

impl Start {
    /// Runs `request` on `generator` from this start, its images one after another (a batch
    /// of one each). `on_step` returning false cancels it (`Error::Cancelled`).
    pub fn run(
        &self,
        generator: &dyn ImageGenerator,
        request: &GenerationRequest,
        on_step: &mut dyn FnMut(Progress<'_>) -> bool,
    ) -> Result<Vec<GeneratedImage>> {
        let job = generator.prepare(request, self)?;
        let mut images = Vec::with_capacity(request.number_of_images);
        for image in 0..request.number_of_images {
            let row = BatchRow { job: &job, image };
            let mut results = generator.run_batch(&[row], &mut |steps| {
                for s in steps.iter_mut() {
                    s.keep = on_step(s.progress);
                }
            })?;
            images.push(results.pop().unwrap_or(Err(Error::Cancelled))?);
        }
        Ok(images)
    }

    /// The pipeline this start runs.
    pub fn pipeline(&self) -> Pipelines {
        match self {
            Start::Noise => Pipelines::Txt2Img,
            Start::Image { .. } => Pipelines::Img2Img,
            Start::Masked { .. } => Pipelines::Inpaint,
        }
    }

    /// The strength, for img2img and inpainting.
    pub fn strength(&self) -> Option<f64> {
        match self {
            Start::Noise => None,
            Start::Image { strength, .. } | Start::Masked { strength, .. } => Some(*strength),
        }
    }
}

/// The three pipelines, for the rule of which model runs which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipelines {
    Txt2Img,
    Img2Img,
    Inpaint,
}

impl Pipelines {
    pub fn name(self) -> &'static str {
        match self {
            Pipelines::Txt2Img => "txt2img",
            Pipelines::Img2Img => "img2img",
            Pipelines::Inpaint => "inpainting",
        }
    }

    /// Whether a model can run this pipeline: an inpainting model
    /// ([`config::is_inpainting_model`]) runs only inpainting, as in diffusers.
    pub fn check_runs_on(
        self,
        model_name: &str,
        inpainting_model: bool,
    ) -> std::result::Result<(), ValidationError> {
        if inpainting_model && self != Pipelines::Inpaint {
            return Err(ValidationError::InpaintingModelOnly {
                model: model_name.to_string(),
                pipeline: self.name(),
            });
        }
        Ok(())
    }
}

/// A loaded model on some backend, as the engine and the CLI see it (the backend's type erased).
pub trait ImageGenerator: Send {
    /// See [`Pipeline::prepare`].
    fn prepare(&self, request: &GenerationRequest, start: &Start) -> Result<PreparedJob>;
    /// See [`Pipeline::run_batch`].
    fn run_batch(
        &self,
        rows: &[BatchRow<'_>],
        on_step: &mut BatchStep<'_>,
    ) -> Result<Vec<Result<GeneratedImage>>>;
    /// The model's native `(width, height)`.
    fn native_size(&self) -> (usize, usize);
    /// Width and height must be multiples of this.
    fn latent_factor(&self) -> usize;
    /// The scheduler named by the model's scheduler config.
    fn default_scheduler(&self) -> Result<SchedulerKind>;
    /// The model's name for logs and PNG metadata.
    fn model_name(&self) -> &str;
    /// The device, for logs.
    fn describe_device(&self) -> String;
    /// See [`Pipeline::is_inpainting_model`].
    fn inpainting_model(&self) -> bool;
}

impl<B: Backend> ImageGenerator for Pipeline<B> {
    fn prepare(&self, request: &GenerationRequest, start: &Start) -> Result<PreparedJob> {
        Pipeline::prepare(self, request, start)
    }
    fn run_batch(
        &self,
        rows: &[BatchRow<'_>],
        on_step: &mut BatchStep<'_>,
    ) -> Result<Vec<Result<GeneratedImage>>> {
        Pipeline::run_batch(self, rows, on_step)
    }
    fn native_size(&self) -> (usize, usize) {
        Pipeline::native_size(self)
    }
    fn latent_factor(&self) -> usize {
        Pipeline::latent_factor(self)
    }
    fn default_scheduler(&self) -> Result<SchedulerKind> {
        Pipeline::default_scheduler(self)
    }
    fn model_name(&self) -> &str {
        Pipeline::model_name(self)
    }
    fn describe_device(&self) -> String {
        self.backend.describe()
    }
    fn inpainting_model(&self) -> bool {
        self.is_inpainting_model()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Fault;
    use crate::testing::{Sabotage, Sabotaged};

    fn tiny() -> ModelFiles {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd21");
        ModelFiles::locate(&dir).expect("the tiny fixture model")
    }

    fn request() -> GenerationRequest {
        GenerationRequest {
            prompt: "a red boat".into(),
            negative_prompt: String::new(),
            width: 32,
            height: 32,
            steps: 2,
            cfg_scale: 7.0,
            seed: 3,
            scheduler: SchedulerKind::Ddim,
            number_of_images: 1,
        }
    }

    fn generate<B: Backend>(pipeline: &Pipeline<B>) -> Result<Vec<GeneratedImage>> {
        pipeline.generate(&request(), &mut |_| true)
    }

    #[test]
    fn an_overflowing_vae_decode_is_redone_in_f32_never_a_broken_png() {
        let files = tiny();
        let cpu = generate(&Pipeline::load(&files, CpuBackend::new()).unwrap()).unwrap();
        assert!(!cpu[0].decoded_in_f32);
        // The device's VAE conv_out (3 channels) overflows to NaN.
        let overflowing = || Sabotaged::new(Sabotage::NanFromConv { channels: 3 });
        let with_fallback = Pipeline::load(&files, overflowing())
            .unwrap()
            .with_f32_decoder(cpu_f32_decoder(&files));
        let redone = generate(&with_fallback).unwrap();
        assert!(redone[0].decoded_in_f32);
        assert_eq!(redone[0].image, cpu[0].image, "the f32 decode is the CPU's");
        // Without an f32 decoder the request fails; no image is made of the NaNs.
        let err = generate(&Pipeline::load(&files, overflowing()).unwrap()).unwrap_err();
        assert!(matches!(err, Error::NonFinite(_)), "{err}");
        assert_eq!(err.fault(), Fault::Bug);
    }

    #[test]
    fn a_non_finite_unet_output_fails_the_request_clearly() {
        let files = tiny();
        let nan_unet = Sabotaged::new(Sabotage::NanFromConv { channels: 4 });
        let pipeline = Pipeline::load(&files, nan_unet).unwrap();
        let err = generate(&pipeline).unwrap_err().to_string();
        assert!(
            err.contains("UNet produced non-finite values at step 1 of 2"),
            "{err}"
        );
    }
}

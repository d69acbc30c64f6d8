//! Stand-ins for tests (hidden from the docs; not an API): a fake model for the engine's and the
//! server's tests, and a CPU backend with one op sabotaged for the self-test's and the
//! pipeline's.

use std::time::Duration;

use crate::backend::cpu::{CpuBackend, CpuTensor};
use crate::backend::{contract, Compute};
use crate::engine::ModelLoader;
use crate::image_io::RgbImage;
use crate::pipeline::{GeneratedImage, GenerationRequest, ImageGenerator, Latents, Progress};
use crate::sampling::SchedulerKind;
use crate::tensor::HostTensor;
use crate::{Error, Result};

/// A stand-in model whose prompt selects what it does: "panic" panics, "oom" fails as a device
/// out of memory does, "slow" steps every 2 ms until cancelled; anything else is a grey image per
/// requested image after `steps` steps (image i with seed + i).
#[derive(Debug, Clone, Copy)]
pub struct FakeGenerator {
    scheduler: SchedulerKind,
    inpainting_model: bool,
}

impl FakeGenerator {
    /// A fake whose own scheduler is `scheduler`.
    pub fn new(scheduler: SchedulerKind) -> Self {
        FakeGenerator {
            scheduler,
            inpainting_model: false,
        }
    }

    /// The same fake, telling that it is an inpainting model (it still runs everything).
    pub fn as_inpainting_model(self) -> Self {
        FakeGenerator {
            inpainting_model: true,
            ..self
        }
    }

    /// Loads this fake (for `Engine::start` and `server::serve`).
    pub fn loader(self) -> ModelLoader {
        Box::new(move || Ok(Box::new(self) as Box<dyn ImageGenerator>))
    }
}

impl ImageGenerator for FakeGenerator {
    fn generate(
        &self,
        request: &GenerationRequest,
        on_step: &mut dyn FnMut(Progress<'_>) -> bool,
    ) -> Result<Vec<GeneratedImage>> {
        let slow = match request.prompt.as_str() {
            "panic" => panic!("boom"),
            "oom" => {
                return Err(Error::Backend(
                    "CUDA_ERROR_OUT_OF_MEMORY: out of memory".into(),
                ))
            }
            "slow" => true,
            _ => false,
        };
        let steps = if slow { usize::MAX } else { request.steps };
        let latents = [0.5f32, -0.5, 0.25, 0.0];
        for step in 1..=steps {
            if slow {
                std::thread::sleep(Duration::from_millis(2));
            }
            let progress = Progress {
                image: 0,
                step,
                steps_per_image: steps,
                latents: Latents {
                    data: &latents,
                    channels: 4,
                    height: 1,
                    width: 1,
                },
            };
            if !on_step(progress) {
                return Err(Error::Cancelled);
            }
        }
        let grey = |seed| GeneratedImage {
            seed,
            image: RgbImage {
                width: request.width,
                height: request.height,
                pixels: vec![128; request.width * request.height * 3],
            },
            decoded_in_f32: false,
        };
        Ok((0..request.number_of_images as u64)
            .map(|i| grey(request.seed + i))
            .collect())
    }

    /// As `generate` (the init image and strength are not looked at).
    fn img2img(
        &self,
        request: &GenerationRequest,
        _init: &RgbImage,
        _strength: f64,
        on_step: &mut dyn FnMut(Progress<'_>) -> bool,
    ) -> Result<Vec<GeneratedImage>> {
        self.generate(request, on_step)
    }

    /// As `generate` (the images and strength are not looked at).
    fn inpaint(
        &self,
        request: &GenerationRequest,
        _image: &RgbImage,
        _mask: &RgbImage,
        _strength: f64,
        on_step: &mut dyn FnMut(Progress<'_>) -> bool,
    ) -> Result<Vec<GeneratedImage>> {
        self.generate(request, on_step)
    }

    fn native_size(&self) -> (usize, usize) {
        (64, 64)
    }

    fn latent_factor(&self) -> usize {
        8
    }

    fn default_scheduler(&self) -> Result<SchedulerKind> {
        Ok(self.scheduler)
    }

    fn model_name(&self) -> &str {
        "fake"
    }

    fn describe_device(&self) -> String {
        "test".into()
    }

    fn inpainting_model(&self) -> bool {
        self.inpainting_model
    }
}

/// What [`Sabotaged`] gets wrong, as a broken kernel would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sabotage {
    /// SiLU answers x instead of x·σ(x).
    SiluIsIdentity,
    /// A convolution with `channels` output channels answers NaN everywhere (3: the VAE's
    /// conv_out, an f16 overflow; 4: the UNet's).
    NanFromConv { channels: usize },
}

/// The CPU backend with one op wrong.
pub struct Sabotaged {
    pub cpu: CpuBackend,
    pub sabotage: Sabotage,
}

impl Sabotaged {
    pub fn new(sabotage: Sabotage) -> Self {
        Sabotaged {
            cpu: CpuBackend::new(),
            sabotage,
        }
    }
}

impl Compute for Sabotaged {
    type Tensor = CpuTensor;
    fn describe(&self) -> String {
        format!("cpu with {:?}", self.sabotage)
    }
    fn upload(&self, host: &HostTensor) -> Result<CpuTensor> {
        Compute::upload(&self.cpu, host)
    }
    fn download(&self, t: &CpuTensor) -> Result<HostTensor> {
        Compute::download(&self.cpu, t)
    }
    fn view(&self, t: &CpuTensor, shape: Vec<usize>) -> CpuTensor {
        Compute::view(&self.cpu, t, shape)
    }
    fn linear(&self, op: contract::Linear<'_, CpuTensor>) -> Result<CpuTensor> {
        Compute::linear(&self.cpu, op)
    }
    fn conv2d(&self, op: contract::Conv2d<'_, CpuTensor>) -> Result<CpuTensor> {
        let nan = self.sabotage == Sabotage::NanFromConv { channels: op.c_out };
        let shape = op.out_shape();
        let out = Compute::conv2d(&self.cpu, op)?;
        if !nan {
            return Ok(out);
        }
        let n = shape.iter().product();
        CpuTensor::new(shape, vec![f32::NAN; n])
    }
    fn group_norm(&self, op: contract::GroupNorm<'_, CpuTensor>) -> Result<CpuTensor> {
        Compute::group_norm(&self.cpu, op)
    }
    fn layer_norm(&self, op: contract::LayerNorm<'_, CpuTensor>) -> Result<CpuTensor> {
        Compute::layer_norm(&self.cpu, op)
    }
    fn attention(&self, op: contract::Attention<'_, CpuTensor>) -> Result<CpuTensor> {
        Compute::attention(&self.cpu, op)
    }
    fn geglu(&self, op: contract::Geglu<'_, CpuTensor>) -> Result<CpuTensor> {
        Compute::geglu(&self.cpu, op)
    }
    fn gelu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Compute::gelu(&self.cpu, x)
    }
    fn silu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        match self.sabotage {
            Sabotage::SiluIsIdentity => Ok(x.clone()),
            _ => Compute::silu(&self.cpu, x),
        }
    }
    fn add(&self, op: contract::Add<'_, CpuTensor>) -> Result<CpuTensor> {
        Compute::add(&self.cpu, op)
    }
    fn add_per_channel(&self, op: contract::AddPerChannel<'_, CpuTensor>) -> Result<CpuTensor> {
        Compute::add_per_channel(&self.cpu, op)
    }
    fn upsample_nearest(&self, op: contract::UpsampleNearest<'_, CpuTensor>) -> Result<CpuTensor> {
        Compute::upsample_nearest(&self.cpu, op)
    }
    fn pad(&self, op: contract::Pad<'_, CpuTensor>) -> Result<CpuTensor> {
        Compute::pad(&self.cpu, op)
    }
    fn concat_channels(&self, op: contract::ConcatChannels<'_, CpuTensor>) -> Result<CpuTensor> {
        Compute::concat_channels(&self.cpu, op)
    }
    fn embedding(&self, op: contract::Embedding<'_, CpuTensor>) -> Result<CpuTensor> {
        Compute::embedding(&self.cpu, op)
    }
}

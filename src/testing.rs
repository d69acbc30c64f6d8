//! Stand-ins for tests (hidden from the docs; not an API): a fake model for the engine's and the
//! server's tests, and a CPU backend with one op sabotaged for the self-test's and the
//! pipeline's.

use std::time::Duration;

use crate::backend::cpu::{CpuBackend, CpuTensor};
use crate::backend::{contract, Compute};
use crate::engine::ModelLoader;
use crate::image_io::RgbImage;
use crate::pipeline::{
    BatchRow, BatchStep, GeneratedImage, GenerationRequest, ImageGenerator, Latents, PreparedJob,
    Progress, Start, StepRow,
};
use crate::sampling::SchedulerKind;
use crate::tensor::HostTensor;
use crate::{Error, Result};

/// A stand-in model whose prompt selects what it does: "panic" panics (in a batch), "oom" fails
/// as a device out of memory does (when prepared), "slow" steps every 2 ms until cancelled;
/// anything else is a grey image per requested image after `steps` steps (image i with seed +
/// i). Rows of a batch step together until each is done or dropped.
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

/// The fake's latents (what a preview shows).
const FAKE_LATENTS: [f32; 4] = [0.5, -0.5, 0.25, 0.0];

impl ImageGenerator for FakeGenerator {
    fn prepare(&self, request: &GenerationRequest, start: &Start) -> Result<PreparedJob> {
        if request.prompt == "oom" {
            return Err(Error::Backend(
                "CUDA_ERROR_OUT_OF_MEMORY: out of memory".into(),
            ));
        }
        Ok(PreparedJob::bare(request, start))
    }

    fn run_batch(
        &self,
        rows: &[BatchRow<'_>],
        on_step: &mut BatchStep<'_>,
    ) -> Result<Vec<Result<GeneratedImage>>> {
        let slow = |row: &BatchRow<'_>| row.job.request().prompt == "slow";
        if rows.iter().any(|row| row.job.request().prompt == "panic") {
            panic!("boom");
        }
        let mut live: Vec<usize> = (0..rows.len()).collect();
        let mut dropped = Vec::new();
        let mut step = 0;
        while !live.is_empty() {
            step += 1;
            live.retain(|&r| slow(&rows[r]) || step <= rows[r].job.request().steps);
            if live.iter().any(|&r| slow(&rows[r])) {
                std::thread::sleep(Duration::from_millis(2));
            }
            let mut steps: Vec<StepRow<'_>> = live
                .iter()
                .map(|&r| StepRow {
                    row: r,
                    progress: Progress {
                        image: rows[r].image,
                        step,
                        steps_per_image: if slow(&rows[r]) {
                            usize::MAX
                        } else {
                            rows[r].job.request().steps
                        },
                        images_at_once: live
                            .iter()
                            .filter(|&&o| std::ptr::eq(rows[o].job, rows[r].job))
                            .count(),
                        latents: Latents {
                            data: &FAKE_LATENTS,
                            channels: 4,
                            height: 1,
                            width: 1,
                        },
                    },
                    keep: true,
                })
                .collect();
            on_step(&mut steps);
            for s in steps.iter().filter(|s| !s.keep) {
                dropped.push(s.row);
            }
            live.retain(|r| !dropped.contains(r));
        }
        Ok(rows
            .iter()
            .enumerate()
            .map(|(r, row)| {
                if dropped.contains(&r) {
                    return Err(Error::Cancelled);
                }
                let request = row.job.request();
                Ok(GeneratedImage {
                    seed: request.seed.wrapping_add(row.image as u64),
                    image: RgbImage {
                        width: request.width,
                        height: request.height,
                        pixels: vec![128; request.width * request.height * 3],
                    },
                    decoded_in_f32: false,
                })
            })
            .collect())
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

//! Stand-ins for the engine's and the server's tests (hidden from the docs; not an API).

use std::time::Duration;

use crate::engine::ModelLoader;
use crate::image_io::RgbImage;
use crate::pipeline::{GeneratedImage, GenerationRequest, ImageGenerator, Progress};
use crate::sampling::SchedulerKind;
use crate::{Error, Result};

/// A stand-in model whose prompt selects what it does: "panic" panics, "oom" fails as a device
/// out of memory does, "slow" steps every 2 ms until cancelled; anything else is a grey image per
/// requested image after `steps` steps (image i with seed + i).
#[derive(Debug, Clone, Copy)]
pub struct FakeGenerator {
    scheduler: SchedulerKind,
}

impl FakeGenerator {
    /// A fake whose own scheduler is `scheduler`.
    pub fn new(scheduler: SchedulerKind) -> Self {
        FakeGenerator { scheduler }
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
        on_step: &mut dyn FnMut(Progress) -> bool,
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
        for step in 1..=steps {
            if slow {
                std::thread::sleep(Duration::from_millis(2));
            }
            let progress = Progress {
                image: 0,
                step,
                steps_per_image: steps,
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
        };
        Ok((0..request.number_of_images as u64)
            .map(|i| grey(request.seed + i))
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
}

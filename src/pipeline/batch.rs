//! Batches: a job is prepared once (prompts and init image encoded), then images of one or
//! several jobs are denoised together, one UNet pass per step for all of them. Every row keeps
//! its own seed, prompts, guidance, scheduler state and start, so an image comes out as it
//! would alone.

use super::{
    binarize_mask, masked_image, pixels_to_unit_range, DenoiseStart, GeneratedImage,
    GenerationRequest, KeptLatents, Latents, MaskCondition, Masking, Pipeline, Progress, Start,
};
use crate::backend::Backend;
use crate::image_io::RgbImage;
use crate::model::Posterior;
use crate::sampling::rng::TorchGenerator;
use crate::sampling::{img2img_first_step, SchedulerKind};
use crate::tensor::HostTensor;
use crate::{Error, Result};

/// What rows must share to run in one batch: the UNet pass of a step is one call, so every row
/// needs the same latent size and the same timestep at each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchKey {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub scheduler: SchedulerKind,
    /// The step img2img and inpainting start at (0 for txt2img); `None` when the strength is
    /// invalid (such a job fails when it is prepared).
    pub first_step: Option<usize>,
}

impl BatchKey {
    pub fn of(request: &GenerationRequest, start: &Start) -> Self {
        let first_step = match start.strength() {
            None => Some(0),
            Some(strength) => img2img_first_step(request.steps, strength).ok(),
        };
        BatchKey {
            width: request.width,
            height: request.height,
            steps: request.steps,
            scheduler: request.scheduler,
            first_step,
        }
    }
}

/// A job ready to run image by image: its request checked, its prompts and init image encoded.
pub struct PreparedJob {
    request: GenerationRequest,
    key: BatchKey,
    guidance: bool,
    /// Text embeddings on the host, `[rows, 77, D]`: `[negative, prompt]` with guidance, else
    /// `[prompt]`.
    context: HostTensor,
    inputs: StartInputs,
}

impl PreparedJob {
    /// A job with nothing encoded, for stand-in models that never look (tests).
    #[doc(hidden)]
    pub fn bare(request: &GenerationRequest, start: &Start) -> Self {
        PreparedJob {
            request: request.clone(),
            key: BatchKey::of(request, start),
            guidance: request.cfg_scale > 1.0,
            context: HostTensor {
                shape: vec![0],
                data: Vec::new(),
            },
            inputs: StartInputs::Noise,
        }
    }

    pub fn request(&self) -> &GenerationRequest {
        &self.request
    }

    pub fn key(&self) -> BatchKey {
        self.key
    }

    /// UNet rows per image: 2 with guidance (unconditional and conditional), else 1.
    fn unet_rows(&self) -> usize {
        if self.guidance {
            2
        } else {
            1
        }
    }
}

/// What a job's images start from, encoded once for all of them.
enum StartInputs {
    Noise,
    Image {
        posterior: Posterior,
        first_step: usize,
    },
    Masked(MaskedInputs),
}

struct MaskedInputs {
    /// The image's posterior, where its latents are used (a 4-channel model, or strength < 1).
    image_posterior: Option<Posterior>,
    /// The masked image's posterior (an inpainting model only).
    masked_posterior: Option<Posterior>,
    /// 1 where the model repaints: `[h, w]`.
    latent_mask: Vec<f32>,
    /// diffusers' `is_strength_max`: the start is pure noise.
    from_noise: bool,
    first_step: usize,
}

/// One image of a batch: image `image` (seed + image) of `job`.
#[derive(Clone, Copy)]
pub struct BatchRow<'a> {
    pub job: &'a PreparedJob,
    pub image: usize,
}

/// A row's progress after a step; setting `keep` to false drops the row (its result is
/// `Error::Cancelled`) while the others go on.
pub struct StepRow<'a> {
    /// Index into the batch's rows.
    pub row: usize,
    pub progress: Progress<'a>,
    pub keep: bool,
}

/// Called after every step of a batch with the rows still running.
pub type BatchStep<'a> = dyn FnMut(&mut [StepRow<'_>]) + 'a;

/// A row being denoised.
struct LiveRow<'a> {
    row: usize,
    job: &'a PreparedJob,
    image: usize,
    start: DenoiseStart,
}

impl<B: Backend> Pipeline<B> {
    /// Checks `request` for this model and encodes what all its images share.
    pub fn prepare(&self, request: &GenerationRequest, start: &Start) -> Result<PreparedJob> {
        self.check_request(request, start.pipeline())?;
        let inputs = match start {
            Start::Noise => StartInputs::Noise,
            Start::Image { init, strength } => self.prepare_img2img(request, init, *strength)?,
            Start::Masked {
                image,
                mask,
                strength,
            } => StartInputs::Masked(self.prepare_inpaint(request, image, mask, *strength)?),
        };
        let guidance = request.cfg_scale > 1.0;
        let context = self.encode_prompts(&request.prompt, &request.negative_prompt, guidance)?; // [rows, 77, D]
        Ok(PreparedJob {
            request: request.clone(),
            key: BatchKey::of(request, start),
            guidance,
            context: self.backend.download(&context)?,
            inputs,
        })
    }

    /// img2img as diffusers' `StableDiffusionImg2ImgPipeline`: the init image (the request's
    /// size) is encoded once; each image samples its posterior ([`Pipeline::start_row`]).
    fn prepare_img2img(
        &self,
        request: &GenerationRequest,
        init: &RgbImage,
        strength: f64,
    ) -> Result<StartInputs> {
        let encoder = self.encoder("img2img")?;
        if (init.width, init.height) != (request.width, request.height) {
            return Err(Error::InvalidRequest(format!(
                "the init image is {}×{}, the request {}×{} (resizing is not supported yet)",
                init.width, init.height, request.width, request.height
            )));
        }
        let first_step = img2img_first_step(request.steps, strength)?;
        let b = &self.backend;
        let image = pixels_to_unit_range(init)?; // [1, H, W, 3] in [-1, 1]
        Ok(StartInputs::Image {
            posterior: encoder.posterior(b, &image, self.vae_tiling)?, // [1, C, h, w] each
            first_step,
        })
    }

    /// Inpainting as diffusers' `StableDiffusionInpaintPipeline` (see [`Pipeline::inpaint`]):
    /// the mask is binarized and the posteriors that will be used are encoded once.
    fn prepare_inpaint(
        &self,
        request: &GenerationRequest,
        image: &RgbImage,
        mask: &RgbImage,
        strength: f64,
    ) -> Result<MaskedInputs> {
        let encoder = self.encoder("inpainting")?;
        let size = (request.width, request.height);
        if (image.width, image.height) != size || (mask.width, mask.height) != size {
            return Err(Error::InvalidRequest(format!(
                "the image is {}×{} and the mask {}×{}, the request {}×{} (resizing is not \
                 supported here yet)",
                image.width, image.height, mask.width, mask.height, size.0, size.1
            )));
        }
        let first_step = img2img_first_step(request.steps, strength)?;
        // diffusers' is_strength_max: the start is pure noise (a step count can round a strength
        // just below 1 to first_step 0 too; diffusers noises the image then).
        let from_noise = strength >= 1.0;
        let conditioned = self.is_inpainting_model();
        let binary = binarize_mask(mask); // [H, W] in {0, 1}
        let b = &self.backend;
        let init = pixels_to_unit_range(image)?; // [1, H, W, 3]
        let image_posterior = if conditioned && from_noise {
            None
        } else {
            Some(encoder.posterior(b, &init, self.vae_tiling)?) // [1, C, h, w] each
        };
        let masked_posterior = if conditioned {
            let masked = masked_image(&init, &binary)?; // [1, H, W, 3]
            Some(encoder.posterior(b, &masked, self.vae_tiling)?)
        } else {
            None
        };
        Ok(MaskedInputs {
            image_posterior,
            masked_posterior,
            latent_mask: self.latent_mask(request, &binary), // [h, w]
            from_noise,
            first_step,
        })
    }

    /// Where image `image` of `job` starts. Its generator (seed + image) draws as diffusers':
    /// txt2img the noise; img2img the posterior sample, then the noise; inpainting the image's
    /// posterior sample (only where its latents are used), the noise, the masked image's sample
    /// (drawn but unused by 4-channel models). Per-step noise follows from the same generator.
    fn start_row(&self, job: &PreparedJob, image: usize) -> Result<DenoiseStart> {
        let request = &job.request;
        let mut rng = TorchGenerator::new(request.seed.wrapping_add(image as u64));
        let scheduler = self.scheduler(request)?;
        let (c, h, w) = self.latent_shape(request);
        let scale = self.vae.config().scaling_factor;
        let scaled =
            |sample: HostTensor| -> Vec<f32> { sample.data.iter().map(|x| scale * x).collect() };
        let (latents, first_step, masking) = match &job.inputs {
            StartInputs::Noise => {
                let sigma = scheduler.init_noise_sigma();
                let noise = rng.randn(c * h * w); // [1, C, h, w]
                (noise.iter().map(|x| x * sigma).collect(), 0, Masking::None)
            }
            StartInputs::Image {
                posterior,
                first_step,
            } => {
                let init_latents = scaled(posterior.sample(&mut rng)); // [1, C, h, w]
                let noise = rng.randn(init_latents.len());
                let latents = scheduler.add_noise(&init_latents, &noise, *first_step)?;
                (latents, *first_step, Masking::None)
            }
            StartInputs::Masked(inputs) => {
                let image_latents = inputs
                    .image_posterior
                    .as_ref()
                    .map(|p| scaled(p.sample(&mut rng))); // [1, C, h, w]
                let noise = rng.randn(c * h * w);
                let masked_image_latents = match &inputs.masked_posterior {
                    Some(p) => scaled(p.sample(&mut rng)),
                    // a 4-channel model never reads them: only the generator's draws matter.
                    None => rng.randn(c * h * w),
                };
                let latents = match &image_latents {
                    Some(image_latents) if !inputs.from_noise => {
                        scheduler.add_noise(image_latents, &noise, inputs.first_step)?
                    }
                    _ => {
                        let sigma = scheduler.init_noise_sigma();
                        noise.iter().map(|x| x * sigma).collect()
                    }
                };
                let masking = match image_latents {
                    Some(image_latents) if !self.is_inpainting_model() => {
                        Masking::Blend(KeptLatents {
                            image_latents,
                            noise,
                            mask: inputs.latent_mask.clone(),
                        })
                    }
                    _ => Masking::Condition(MaskCondition {
                        mask: inputs.latent_mask.clone(),
                        masked_image_latents,
                    }),
                };
                (latents, inputs.first_step, masking)
            }
        };
        Ok(DenoiseStart {
            scheduler,
            latents,
            first_step,
            rng,
            masking,
        })
    }

    /// Denoises and decodes `rows` together: one guided UNet pass per step for every row still
    /// running. Returns one result per row: its image, `Error::Cancelled` when `on_step` dropped
    /// it, or the error that row alone met (a bad start, non-finite values). The outer error is
    /// one that stops every row (the device failed).
    pub fn run_batch(
        &self,
        rows: &[BatchRow<'_>],
        on_step: &mut BatchStep<'_>,
    ) -> Result<Vec<Result<GeneratedImage>>> {
        let mut results: Vec<Option<Result<GeneratedImage>>> = rows.iter().map(|_| None).collect();
        let mut live = Vec::with_capacity(rows.len());
        for (row, r) in rows.iter().enumerate() {
            if r.job.key != rows[0].job.key {
                return Err(Error::InvalidRequest(
                    "the rows of a batch must share size, steps, scheduler and start step".into(),
                ));
            }
            match self.start_row(r.job, r.image) {
                Ok(start) => live.push(LiveRow {
                    row,
                    job: r.job,
                    image: r.image,
                    start,
                }),
                Err(e) => results[row] = Some(Err(e)),
            }
        }
        self.denoise(&mut live, &mut results, on_step)?;
        for row in live {
            let seed = row.job.request.seed.wrapping_add(row.image as u64);
            let (c, h, w) = self.latent_shape(&row.job.request);
            let decoded = HostTensor::new(vec![1, c, h, w], row.start.latents)
                .and_then(|latents| self.decode_checked(&latents));
            results[row.row] = Some(decoded.map(|(image, decoded_in_f32)| GeneratedImage {
                seed,
                image,
                decoded_in_f32,
            }));
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(Err(Error::Cancelled)))
            .collect())
    }

    /// The sampling loop of a batch: per remaining timestep one UNet evaluation of all `live`
    /// rows (with guidance each contributes its unconditional and conditional row) and one
    /// scheduler step per row. Rows that fail or that `on_step` drops leave `live` with their
    /// result set; the rest end with their final latents.
    fn denoise(
        &self,
        live: &mut Vec<LiveRow<'_>>,
        results: &mut [Option<Result<GeneratedImage>>],
        on_step: &mut BatchStep<'_>,
    ) -> Result<()> {
        let Some(first) = live.first() else {
            return Ok(());
        };
        let b = &self.backend;
        let (c, h, w) = self.latent_shape(&first.job.request);
        let timesteps = first.start.scheduler.timesteps().to_vec();
        let first_step = first.start.first_step;
        let total = timesteps.len().saturating_sub(first_step);
        let mut context = b.upload(&stacked_contexts(live)?)?; // [Σ rows, 77, D]
        for (i, &t) in timesteps.iter().enumerate().skip(first_step) {
            let input = unet_input(live, i, h, w)?; // [Σ rows, h, w, C_in]
            let out = self.evaluate_unet(&b.upload(&input)?, t, &context)?; // [Σ rows, h, w, C]
            let out = b.download(&out)?.nhwc_to_nchw()?.data; // [Σ rows, C, h, w]
            let n = c * h * w;
            let mut outputs = out.chunks_exact(n);
            let mut failed = Vec::new();
            for (k, row) in live.iter_mut().enumerate() {
                let job = row.job;
                let eps: Vec<&[f32]> = outputs.by_ref().take(job.unet_rows()).collect(); // [rows][C·h·w]
                if eps.iter().any(|e| e.iter().any(|v| !v.is_finite())) {
                    failed.push((
                        k,
                        Error::NonFinite(format!(
                            "the UNet produced non-finite values at step {} of {}",
                            i + 1 - first_step,
                            total
                        )),
                    ));
                    continue;
                }
                let guided: Vec<f32> = match eps[..] {
                    [uncond, cond] => uncond
                        .iter()
                        .zip(cond)
                        .map(|(&u, &t)| u + job.request.cfg_scale * (t - u))
                        .collect(),
                    _ => eps.concat(),
                };
                let s = &mut row.start;
                s.latents = s.scheduler.step(&guided, i, &s.latents, &mut s.rng)?;
                if let Masking::Blend(keep) = &s.masking {
                    keep.blend(s.scheduler.as_ref(), &mut s.latents, i)?;
                }
            }
            let running: Vec<&LiveRow<'_>> = live
                .iter()
                .enumerate()
                .filter(|(k, _)| !failed.iter().any(|(f, _)| f == k))
                .map(|(_, row)| row)
                .collect();
            let (done, shape) = (i + 1 - first_step, (c, h, w));
            let mut steps = step_rows(&running, done, total, shape);
            on_step(&mut steps);
            let dropped: Vec<usize> = steps.iter().filter(|s| !s.keep).map(|s| s.row).collect();
            drop((steps, running));
            let before = live.len();
            for (k, e) in failed.into_iter().rev() {
                let row = live.remove(k);
                results[row.row] = Some(Err(e));
            }
            live.retain(|row| {
                let keep = !dropped.contains(&row.row);
                if !keep {
                    results[row.row] = Some(Err(Error::Cancelled));
                }
                keep
            });
            if live.is_empty() {
                break;
            }
            if live.len() != before {
                context = b.upload(&stacked_contexts(live)?)?;
            }
        }
        Ok(())
    }
}

/// The UNet input of step `i` for every live row, `[Σ rows, h, w, C_in]`: each row's latents
/// repeated for guidance, scaled by its scheduler, with an inpainting model's mask channels.
fn unet_input(live: &[LiveRow<'_>], i: usize, h: usize, w: usize) -> Result<HostTensor> {
    let mut input = Vec::new();
    for row in live {
        let rows = row.job.unet_rows();
        let mut x = row.start.latents.repeat(rows); // [rows, C, h, w]
        row.start.scheduler.scale_model_input(&mut x, i);
        if let Masking::Condition(condition) = &row.start.masking {
            x = condition.unet_input(&x, rows); // [rows, 2C + 1, h, w]
        }
        input.extend(x);
    }
    let unet_rows: usize = live.iter().map(|r| r.job.unet_rows()).sum();
    let c_in = input.len() / (unet_rows * h * w);
    HostTensor::new(vec![unet_rows, c_in, h, w], input)?.nchw_to_nhwc() // [Σ rows, h, w, C_in]
}

/// The progress of each running row after `done` of `total` steps (`shape`: the latents' C, h, w).
fn step_rows<'a>(
    running: &[&'a LiveRow<'_>],
    done: usize,
    total: usize,
    (channels, height, width): (usize, usize, usize),
) -> Vec<StepRow<'a>> {
    running
        .iter()
        .map(|row| StepRow {
            row: row.row,
            progress: Progress {
                image: row.image,
                step: done,
                steps_per_image: total,
                images_at_once: running
                    .iter()
                    .filter(|other| std::ptr::eq(other.job, row.job))
                    .count(),
                latents: Latents {
                    data: &row.start.latents,
                    channels,
                    height,
                    width,
                },
            },
            keep: true,
        })
        .collect()
}

/// The text embeddings of every live row, stacked along the rows: `[Σ rows, 77, D]`.
fn stacked_contexts(live: &[LiveRow<'_>]) -> Result<HostTensor> {
    let first = live
        .first()
        .ok_or_else(|| Error::shape("batch", "no rows"))?;
    let tail = first
        .job
        .context
        .shape
        .get(1..)
        .unwrap_or_default()
        .to_vec();
    let mut data = Vec::new();
    let mut rows = 0;
    for row in live {
        let context = &row.job.context;
        if context.shape.get(1..) != Some(&tail[..]) {
            return Err(Error::shape(
                "batch",
                "the rows' text embeddings differ in shape",
            ));
        }
        rows += context.shape.first().copied().unwrap_or(0);
        data.extend_from_slice(&context.data);
    }
    let mut shape = vec![rows];
    shape.extend(tail);
    HostTensor::new(shape, data)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::weights::ModelFiles;

    fn tiny() -> Pipeline<CpuBackend> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd21");
        let files = ModelFiles::locate(&dir).expect("the tiny fixture model");
        Pipeline::load(&files, CpuBackend::new()).expect("load")
    }

    fn request(prompt: &str, negative: &str, seed: u64, cfg_scale: f32) -> GenerationRequest {
        GenerationRequest {
            prompt: prompt.into(),
            negative_prompt: negative.into(),
            width: 32,
            height: 32,
            steps: 4,
            cfg_scale,
            seed,
            scheduler: SchedulerKind::EulerAncestral,
            number_of_images: 1,
        }
    }

    /// A 32² picture: a gradient, turned by `turn` (so two inits differ).
    fn picture(turn: bool) -> Arc<RgbImage> {
        let pixels = (0..32 * 32)
            .flat_map(|i| {
                let (y, x) = (i / 32, i % 32);
                let (a, b) = if turn { (y, x) } else { (x, y) };
                [(a * 8) as u8, (b * 8) as u8, ((a + b) * 4) as u8]
            })
            .collect();
        Arc::new(RgbImage {
            width: 32,
            height: 32,
            pixels,
        })
    }

    /// Runs every image of `jobs` in one batch (rows interleaved across jobs), drops the rows
    /// `drop_rows` after step 1, and checks every other row against its request run alone:
    /// mean ≤ 0.25/255 and max ≤ 2/255 per image.
    fn check_batch_equals_alone(jobs: &[(GenerationRequest, Start)], drop_rows: &[usize]) {
        let pipeline = tiny();
        let prepared: Vec<PreparedJob> = jobs
            .iter()
            .map(|(request, start)| pipeline.prepare(request, start).expect("prepare"))
            .collect();
        let most = jobs
            .iter()
            .map(|(r, _)| r.number_of_images)
            .max()
            .unwrap_or(0);
        let rows: Vec<BatchRow<'_>> = (0..most)
            .flat_map(|image| {
                prepared
                    .iter()
                    .filter(move |job| image < job.request.number_of_images)
                    .map(move |job| BatchRow { job, image })
            })
            .collect();
        let mut seen_steps = 0;
        let results = pipeline
            .run_batch(&rows, &mut |steps| {
                seen_steps += 1;
                for s in steps.iter_mut() {
                    s.keep = !drop_rows.contains(&s.row);
                }
            })
            .expect("batch");
        assert_eq!(seen_steps, 4 - prepared[0].key.first_step.unwrap_or(0));
        for (r, (row, result)) in rows.iter().zip(results).enumerate() {
            if drop_rows.contains(&r) {
                assert!(
                    matches!(result, Err(Error::Cancelled)),
                    "row {r} was dropped"
                );
                continue;
            }
            let (request, start) = &jobs[prepared
                .iter()
                .position(|p| std::ptr::eq(p, row.job))
                .expect("job")];
            let alone = start
                .run(&pipeline, request, &mut |_| true)
                .expect("alone")
                .swap_remove(row.image);
            let batched = result.expect("batched image");
            assert_eq!(batched.seed, alone.seed);
            let diffs: Vec<f64> = batched
                .image
                .pixels
                .iter()
                .zip(&alone.image.pixels)
                .map(|(&a, &b)| f64::from(a.abs_diff(b)))
                .collect();
            let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
            let max = diffs.iter().copied().fold(0.0, f64::max);
            assert!(
                mean <= 0.25 && max <= 2.0,
                "row {r}: mean {mean:.3}/255, max {max}/255 from the request alone"
            );
        }
    }

    #[test]
    fn txt2img_rows_with_their_own_prompts_seeds_and_guidance_equal_each_alone() {
        let two_images = GenerationRequest {
            number_of_images: 2,
            ..request("a red boat", "", 3, 7.0)
        };
        check_batch_equals_alone(
            &[
                (two_images, Start::Noise),
                (request("a cat", "blurry", 9, 1.0), Start::Noise),
                (request("", "", 11, 4.5), Start::Noise),
            ],
            &[],
        );
    }

    #[test]
    fn img2img_and_inpainting_rows_share_a_batch_and_equal_each_alone() {
        let image = |turn| Start::Image {
            init: picture(turn),
            strength: 0.5,
        };
        let masked = Start::Masked {
            image: picture(false),
            mask: picture(true),
            strength: 0.5,
        };
        check_batch_equals_alone(
            &[
                (request("a house", "", 5, 7.0), image(false)),
                (request("a tree", "", 6, 3.0), image(true)),
                (request("a door", "", 7, 7.0), masked),
            ],
            &[],
        );
    }

    #[test]
    fn a_dropped_row_ends_cancelled_and_the_others_go_on_unchanged() {
        check_batch_equals_alone(
            &[
                (request("a red boat", "", 3, 7.0), Start::Noise),
                (request("a cat", "", 9, 7.0), Start::Noise),
                (request("a dog", "", 10, 1.0), Start::Noise),
            ],
            &[1],
        );
    }

    #[test]
    fn rows_that_cannot_share_unet_passes_are_refused() {
        let pipeline = tiny();
        let a = pipeline
            .prepare(&request("a", "", 1, 7.0), &Start::Noise)
            .expect("prepare");
        let other_size = GenerationRequest {
            width: 40,
            ..request("a", "", 1, 7.0)
        };
        let b = pipeline
            .prepare(&other_size, &Start::Noise)
            .expect("prepare");
        let rows = [
            BatchRow { job: &a, image: 0 },
            BatchRow { job: &b, image: 0 },
        ];
        assert!(pipeline.run_batch(&rows, &mut |_| {}).is_err());
    }
}

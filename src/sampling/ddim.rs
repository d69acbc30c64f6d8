//! DDIM (diffusers `DDIMScheduler`) with η = 0, as `StableDiffusionPipeline` runs it.
//!
//! Class defaults for absent keys: timestep_spacing "leading", steps_offset 0, set_alpha_to_one
//! true, clip_sample true (range 1.0), thresholding false (true is refused: it is meant for
//! pixel-space models), rescale_betas_zero_snr false.

use super::schedule::{self, Spacing};
use super::{check_step, rng::TorchGenerator, PredictionType, Scheduler};
use crate::config::SchedulerConfig;
use crate::{Error, Result};

pub(crate) struct Ddim {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    /// `num_train_timesteps // num_inference_steps`: the previous timestep is t − ratio.
    ratio: i64,
    prediction: PredictionType,
    clip_range: Option<f32>,
    last_step: Option<usize>,
}

impl Ddim {
    pub(crate) fn new(
        config: &SchedulerConfig,
        prediction: PredictionType,
        steps: usize,
    ) -> Result<Self> {
        if config.thresholding == Some(true) {
            return Err(Error::Config(
                "DDIM: thresholding is not supported (it is for pixel-space models)".into(),
            ));
        }
        let num_train = schedule::num_train_timesteps(config)?;
        let alphas_cumprod = schedule::alphas_cumprod(config, num_train)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let spacing = Spacing::from_config(config, Spacing::Leading)?;
        let offset = config.steps_offset.unwrap_or(0) as i64;
        let timesteps = ddim_timesteps(spacing, num_train, steps, offset);
        if let Some(&t) = timesteps.iter().find(|&&t| t < 0 || t >= num_train as i64) {
            return Err(Error::InvalidRequest(format!(
                "DDIM: {steps} steps with timestep_spacing {spacing:?} and steps_offset {offset} give \
                 timestep {t}, outside 0..{num_train} (diffusers would index out of range); choose another step count"
            )));
        }
        let clip_range = if config.clip_sample.unwrap_or(true) {
            let r = config.clip_sample_range.unwrap_or(1.0);
            if !(r >= 0.0 && r.is_finite()) {
                return Err(Error::Config(format!(
                    "DDIM: clip_sample_range must be a finite non-negative number, got {r}"
                )));
            }
            Some(r as f32)
        } else {
            None
        };
        Ok(Ddim {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps_f32: timesteps.iter().map(|&t| t as f32).collect(),
            timesteps,
            ratio: (num_train / steps) as i64,
            prediction,
            clip_range,
            last_step: None,
        })
    }
}

/// `DDIMScheduler.set_timesteps`: descending integer timesteps.
fn ddim_timesteps(spacing: Spacing, num_train: usize, steps: usize, offset: i64) -> Vec<i64> {
    match spacing {
        Spacing::Linspace => schedule::np_linspace(0.0, (num_train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| schedule::np_round(t) as i64)
            .collect(),
        Spacing::Leading => {
            let ratio = (num_train / steps) as i64;
            (0..steps as i64)
                .rev()
                .map(|i| i * ratio + offset)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = num_train as f64 / steps as f64;
            schedule::np_arange(num_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| schedule::np_round(t) as i64 - 1)
                .collect()
        }
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step_index: usize) -> Result<Vec<f32>> {
        let alpha = timestep_alpha(&self.timesteps, &self.alphas_cumprod, step_index)?;
        super::add_noise_at_alpha(alpha, original, noise)
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        _rng: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        check_step(
            "DDIM",
            self.last_step,
            step_index,
            self.timesteps.len(),
            model_output,
            sample,
        )?;
        let t = self.timesteps[step_index];
        let alpha_t = schedule::alpha_at(&self.alphas_cumprod, t, self.final_alpha_cumprod)?;
        let alpha_prev = schedule::alpha_at(
            &self.alphas_cumprod,
            t - self.ratio,
            self.final_alpha_cumprod,
        )?;
        let beta_t = 1.0 - alpha_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_t.sqrt(), beta_t.sqrt());
        // η = 0: std_dev_t = 0, so the direction coefficient is √(1 − ᾱ_prev).
        let dir_coeff = (1.0 - alpha_prev).sqrt();
        let prev_coeff = alpha_prev.sqrt();
        let prediction = self.prediction;
        let clip = self.clip_range;
        let out = model_output
            .iter()
            .zip(sample)
            .map(|(&m, &s)| {
                let (mut x0, eps) = match prediction {
                    PredictionType::Epsilon => ((s - sqrt_beta * m) / sqrt_alpha, m),
                    PredictionType::VPrediction => (
                        sqrt_alpha * s - sqrt_beta * m,
                        sqrt_alpha * m + sqrt_beta * s,
                    ),
                };
                if let Some(r) = clip {
                    x0 = x0.clamp(-r, r);
                }
                prev_coeff * x0 + dir_coeff * eps
            })
            .collect();
        self.last_step = Some(step_index);
        Ok(out)
    }
}

/// ᾱ at the timestep of step index `step_index`.
pub(super) fn timestep_alpha(
    timesteps: &[i64],
    alphas_cumprod: &[f32],
    step_index: usize,
) -> Result<f32> {
    timesteps
        .get(step_index)
        .and_then(|&t| usize::try_from(t).ok())
        .and_then(|t| alphas_cumprod.get(t).copied())
        .ok_or_else(|| {
            crate::Error::InvalidArgument(format!(
                "add_noise: step index {step_index} is past the {} timesteps",
                timesteps.len()
            ))
        })
}

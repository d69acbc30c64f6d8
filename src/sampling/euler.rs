//! Euler (diffusers `EulerDiscreteScheduler`, s_churn = 0) and Euler ancestral
//! (`EulerAncestralDiscreteScheduler`): k-diffusion style samplers over σ, whose model input is
//! scaled by 1/√(σ²+1) and whose initial noise is scaled by the largest σ.
//!
//! Class defaults for absent keys (both): timestep_spacing "linspace", steps_offset 0,
//! rescale_betas_zero_snr false (then ᾱ_T is set to 2⁻²⁴ as diffusers does). Euler only:
//! interpolation_type "linear" ("log_linear" supported), use_karras_sigmas false (honoured when the
//! config sets it, as `EulerDiscreteScheduler.from_config` would), final_sigmas_type "zero"
//! ("sigma_min" supported). Euler ancestral has none of these three and ignores them.

use super::schedule::{self, Spacing};
use super::{check_step, rng::TorchGenerator, PredictionType, Scheduler};
use crate::config::SchedulerConfig;
use crate::{Error, Result};

/// Which of the two samplers: deterministic Euler, or Euler ancestral (fresh noise each step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    Plain,
    Ancestral,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "Euler",
            Variant::Ancestral => "Euler ancestral",
        }
    }
}

pub(crate) struct Euler {
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    variant: Variant,
    last_step: Option<usize>,
}

impl Euler {
    pub(crate) fn new(
        config: &SchedulerConfig,
        prediction: PredictionType,
        steps: usize,
        variant: Variant,
    ) -> Result<Self> {
        let name = variant.name();
        let ancestral = variant == Variant::Ancestral;
        let num_train = schedule::num_train_timesteps(config)?;
        let mut alphas_cumprod = schedule::alphas_cumprod(config, num_train)?;
        if config.rescale_betas_zero_snr.unwrap_or(false) {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let spacing = Spacing::from_config(config, Spacing::Linspace)?;
        let offset = config.steps_offset.unwrap_or(0);

        let mut timesteps: Vec<f64> = match spacing {
            // np.linspace(0, T − 1, n, dtype=np.float32)[::-1]
            Spacing::Linspace => schedule::np_linspace(0.0, (num_train - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| t as f32 as f64)
                .collect(),
            Spacing::Leading => {
                let ratio = num_train / steps;
                (0..steps)
                    .rev()
                    .map(|i| ((i * ratio) as f32 + offset as f32) as f64)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = num_train as f64 / steps as f64;
                schedule::np_arange(num_train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| (schedule::np_round(t) as f32 - 1.0) as f64)
                    .collect()
            }
        };

        let train_sigmas = schedule::train_sigmas(&alphas_cumprod);
        let log_sigmas = schedule::log_sigmas(&train_sigmas);
        let interpolation = if ancestral {
            "linear"
        } else {
            config.interpolation_type.as_deref().unwrap_or("linear")
        };
        let mut sigmas: Vec<f64> = match interpolation {
            "linear" => timesteps
                .iter()
                .map(|&t| schedule::np_interp(t, &train_sigmas))
                .collect(),
            "log_linear" => {
                // torch.linspace(log σ_max, log σ_min, n + 1).exp(), float32
                let (Some(&smax), Some(&smin)) = (train_sigmas.last(), train_sigmas.first()) else {
                    return Err(Error::Config(format!("{name}: empty noise schedule")));
                };
                let lo = (smax as f64).ln() as f32 as f64;
                let hi = (smin as f64).ln() as f32 as f64;
                schedule::torch_linspace_f32(lo, hi, steps + 1)
                    .into_iter()
                    .map(|x| x.exp() as f64)
                    .collect()
            }
            other => {
                return Err(Error::Config(format!(
                    "{name}: interpolation_type \"{other}\" is not supported (linear or log_linear)"
                )))
            }
        };
        if !ancestral && config.use_karras_sigmas.unwrap_or(false) {
            let (Some(&smin), Some(&smax)) = (sigmas.last(), sigmas.first()) else {
                return Err(Error::Config(format!("{name}: empty sigma schedule")));
            };
            sigmas = schedule::karras_sigmas(smin, smax, steps);
            timesteps = sigmas
                .iter()
                .map(|&s| schedule::sigma_to_t(s, &log_sigmas))
                .collect();
        }
        let final_type = if ancestral {
            "zero"
        } else {
            config.final_sigmas_type.as_deref().unwrap_or("zero")
        };
        let sigma_last = match final_type {
            "zero" => 0.0,
            "sigma_min" => ((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]).sqrt(),
            other => {
                return Err(Error::Config(format!(
                    "{name}: final_sigmas_type \"{other}\" is not supported (zero or sigma_min)"
                )))
            }
        };
        let sigmas: Vec<f32> = sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(sigma_last))
            .collect();
        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            Spacing::Linspace | Spacing::Trailing => max_sigma,
            Spacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Euler {
            sigmas,
            timesteps: timesteps.iter().map(|&t| t as f32).collect(),
            init_noise_sigma,
            prediction,
            variant,
            last_step: None,
        })
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step_index: usize) -> Result<Vec<f32>> {
        super::same_length("add_noise", original, noise)?;
        let sigma = sigma_at(&self.sigmas, step_index)?;
        Ok(original
            .iter()
            .zip(noise)
            .map(|(&x, &e)| x + e * sigma)
            .collect())
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &mut [f32], step_index: usize) {
        if let Some(&sigma) = self.sigmas.get(step_index) {
            let scale = (sigma * sigma + 1.0).sqrt();
            for x in sample {
                *x /= scale;
            }
        }
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        rng: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        let name = self.variant.name();
        check_step(
            name,
            self.last_step,
            step_index,
            self.timesteps.len(),
            model_output,
            sample,
        )?;
        let (sigma, sigma_next) =
            match (self.sigmas.get(step_index), self.sigmas.get(step_index + 1)) {
                (Some(&a), Some(&b)) => (a, b),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "{name}: no sigma after step {step_index}"
                    )))
                }
            };
        // v-prediction: x0 = v·(−σ/√(σ²+1)) + x/(σ²+1)
        let v_scale = -sigma / (sigma * sigma + 1.0).sqrt();
        let s_scale = sigma * sigma + 1.0;
        let prediction = self.prediction;
        let x0 = move |m: f32, s: f32| match prediction {
            PredictionType::Epsilon => s - sigma * m,
            PredictionType::VPrediction => m * v_scale + s / s_scale,
        };
        let out = if self.variant == Variant::Plain {
            // s_churn = 0 ⇒ γ = 0 and σ̂ = σ.
            let dt = sigma_next - sigma;
            model_output
                .iter()
                .zip(sample)
                .map(|(&m, &s)| {
                    let derivative = (s - x0(m, s)) / sigma;
                    s + derivative * dt
                })
                .collect()
        } else {
            let (from, to) = (sigma, sigma_next);
            let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
            let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
            let dt = sigma_down - sigma;
            let noise = rng.randn(model_output.len());
            model_output
                .iter()
                .zip(sample)
                .zip(noise)
                .map(|((&m, &s), n)| {
                    let derivative = (s - x0(m, s)) / sigma;
                    (s + derivative * dt) + n * sigma_up
                })
                .collect()
        };
        self.last_step = Some(step_index);
        Ok(out)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
}

/// σ of step index `step_index` (the Euler family and DPM++).
pub(super) fn sigma_at(sigmas: &[f32], step_index: usize) -> Result<f32> {
    sigmas.get(step_index).copied().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "add_noise: step index {step_index} is past the {} sigmas",
            sigmas.len()
        ))
    })
}

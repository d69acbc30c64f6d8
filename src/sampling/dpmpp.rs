//! DPM-Solver++(2M) (diffusers `DPMSolverMultistepScheduler` with its defaults: algorithm_type
//! "dpmsolver++", solver_order 2, solver_type "midpoint"), with linear-interpolated or Karras sigmas.
//!
//! Class defaults for absent keys: timestep_spacing "linspace", steps_offset 0, lower_order_final
//! true, euler_at_final false, final_sigmas_type "zero", lambda_min_clipped −∞, thresholding false
//! (true is refused), rescale_betas_zero_snr false (then ᾱ_T = 2⁻²⁴). `use_karras_sigmas` is decided
//! by the kind (dpmpp_2m or dpmpp_2m_karras), not by the config. The keys `algorithm_type`,
//! `solver_order` and `solver_type` are not read (SchedulerConfig does not carry them): this is
//! always 2M midpoint, what the sampler's name promises.

use super::schedule::{self, Spacing};
use super::{check_step, rng::TorchGenerator, PredictionType, Scheduler};
use crate::config::SchedulerConfig;
use crate::{Error, Result};

pub(crate) struct DpmPp2m {
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    prediction: PredictionType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// The last two data predictions x̂₀ (older first), as `model_outputs`.
    model_outputs: [Option<Vec<f32>>; 2],
    lower_order_nums: usize,
    last_step: Option<usize>,
}

/// (α_t, σ_t) of the VP process for a k-diffusion σ: α = 1/√(σ²+1), σ_t = σ·α.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log α − log σ (half the log-SNR).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmPp2m {
    pub(crate) fn new(
        config: &SchedulerConfig,
        prediction: PredictionType,
        steps: usize,
        karras: bool,
    ) -> Result<Self> {
        if config.thresholding == Some(true) {
            return Err(Error::Config(
                "DPM++: thresholding is not supported (it is for pixel-space models)".into(),
            ));
        }
        let num_train = schedule::num_train_timesteps(config)?;
        let mut alphas_cumprod = schedule::alphas_cumprod(config, num_train)?;
        if config.rescale_betas_zero_snr.unwrap_or(false) {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let spacing = Spacing::from_config(config, Spacing::Linspace)?;
        let offset = config.steps_offset.unwrap_or(0) as i64;
        // lambda_min_clipped = −∞ ⇒ clipped_idx = 0 ⇒ last_timestep = num_train_timesteps.
        let last_timestep = num_train;
        let mut timesteps: Vec<i64> = match spacing {
            Spacing::Linspace => {
                let mut t: Vec<i64> =
                    schedule::np_linspace(0.0, (last_timestep - 1) as f64, steps + 1)
                        .into_iter()
                        .rev()
                        .map(|t| schedule::np_round(t) as i64)
                        .collect();
                t.pop();
                t
            }
            Spacing::Leading => {
                let ratio = (last_timestep / (steps + 1)) as i64;
                (1..=steps as i64)
                    .rev()
                    .map(|i| i * ratio + offset)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = num_train as f64 / steps as f64;
                schedule::np_arange(last_timestep as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| schedule::np_round(t) as i64 - 1)
                    .collect()
            }
        };

        let train_sigmas = schedule::train_sigmas(&alphas_cumprod);
        let sigmas: Vec<f64> = if karras {
            let log_sigmas = schedule::log_sigmas(&train_sigmas);
            // in_sigmas = flip(train sigmas): σ_min is the first training sigma, σ_max the last.
            let (Some(&smin), Some(&smax)) = (train_sigmas.first(), train_sigmas.last()) else {
                return Err(Error::Config("DPM++: empty noise schedule".into()));
            };
            let sigmas = schedule::karras_sigmas(smin as f64, smax as f64, steps);
            let cosine = config.beta_schedule.as_deref() == Some("squaredcos_cap_v2");
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = schedule::sigma_to_t(s, &log_sigmas);
                    // rounded, except for squaredcos_cap_v2 where torch's int64 cast truncates
                    if cosine {
                        t.trunc() as i64
                    } else {
                        schedule::np_round(t) as i64
                    }
                })
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|&t| schedule::np_interp(t as f64, &train_sigmas))
                .collect()
        };
        let final_sigmas_type = config.final_sigmas_type.as_deref().unwrap_or("zero");
        let sigma_last = match final_sigmas_type {
            "zero" => 0.0,
            "sigma_min" => ((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]).sqrt(),
            other => {
                return Err(Error::Config(format!(
                    "DPM++: final_sigmas_type \"{other}\" is not supported (zero or sigma_min)"
                )))
            }
        };
        let sigmas: Vec<f32> = sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(sigma_last))
            .collect();
        Ok(DpmPp2m {
            sigmas,
            timesteps: timesteps.iter().map(|&t| t as f32).collect(),
            prediction,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigma_zero: final_sigmas_type == "zero",
            model_outputs: [None, None],
            lower_order_nums: 0,
            last_step: None,
        })
    }
}

impl Scheduler for DpmPp2m {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step_index: usize) -> Result<Vec<f32>> {
        super::same_length("add_noise", original, noise)?;
        let sigma = super::euler::sigma_at(&self.sigmas, step_index)?;
        // diffusers' _sigma_to_alpha_sigma_t, in its f32 order.
        let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
        let sigma_t = sigma * alpha_t;
        Ok(original
            .iter()
            .zip(noise)
            .map(|(&x, &e)| alpha_t * x + sigma_t * e)
            .collect())
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        _rng: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        let n = self.timesteps.len();
        check_step("DPM++", self.last_step, step_index, n, model_output, sample)?;
        let i = step_index;
        let lower_order_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);

        // convert_model_output: the data prediction x̂₀ at σ_i.
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let x0: Vec<f32> = match self.prediction {
            PredictionType::Epsilon => model_output
                .iter()
                .zip(sample)
                .map(|(&m, &s)| (s - sigma_s0 * m) / alpha_s0)
                .collect(),
            PredictionType::VPrediction => model_output
                .iter()
                .zip(sample)
                .map(|(&m, &s)| alpha_s0 * s - sigma_s0 * m)
                .collect(),
        };
        let [older, newer] = &mut self.model_outputs;
        *older = newer.take();
        *newer = Some(x0);

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let c_sample = sigma_t / sigma_s0;
        let c_d0 = alpha_t * ((-h).exp() - 1.0);
        let (Some(m0), m1) = (&self.model_outputs[1], &self.model_outputs[0]) else {
            return Err(Error::InvalidArgument("DPM++: missing model output".into()));
        };
        let out: Vec<f32> = match m1 {
            Some(m1) if self.lower_order_nums >= 1 && !lower_order_final && i >= 1 => {
                // multistep_dpm_solver_second_order_update, midpoint
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
                let lambda_s1 = lambda(alpha_s1, sigma_s1);
                let h_0 = lambda_s0 - lambda_s1;
                let r0 = h_0 / h;
                let inv_r0 = 1.0 / r0;
                let c_d1 = 0.5 * c_d0;
                sample
                    .iter()
                    .zip(m0.iter().zip(m1))
                    .map(|(&s, (&a, &b))| {
                        let d1 = inv_r0 * (a - b);
                        c_sample * s - c_d0 * a - c_d1 * d1
                    })
                    .collect()
            }
            // dpm_solver_first_order_update
            _ => sample
                .iter()
                .zip(m0)
                .map(|(&s, &a)| c_sample * s - c_d0 * a)
                .collect(),
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        self.last_step = Some(step_index);
        Ok(out)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
}

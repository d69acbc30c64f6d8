//! PNDM (diffusers `PNDMScheduler`): linear multistep PLMS, preceded by 12 Runge–Kutta (PRK)
//! evaluations unless `skip_prk_steps` (SD configs set it; A1111 calls this sampler "PLMS").
//!
//! Class defaults for absent keys: timestep_spacing "leading", steps_offset 0, set_alpha_to_one
//! false, skip_prk_steps FALSE (so a config without the key runs the PRK warm-up, which needs at
//! least 4 steps). PNDM has no clip_sample / thresholding / rescale_betas_zero_snr: they are ignored
//! as diffusers ignores them.

use super::schedule::{self, Spacing};
use super::{check_step, rng::TorchGenerator, PredictionType, Scheduler};
use crate::config::SchedulerConfig;
use crate::{Error, Result};

const PNDM_ORDER: usize = 4;

pub(crate) struct Pndm {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    /// The PRK part of `timesteps` (empty with skip_prk_steps).
    prk_timesteps: Vec<i64>,
    skip_prk_steps: bool,
    /// `num_train_timesteps // num_inference_steps`.
    ratio: i64,
    prediction: PredictionType,
    // Multistep state, as diffusers keeps it.
    counter: usize,
    ets: Vec<Vec<f32>>,
    cur_sample: Option<Vec<f32>>,
    cur_model_output: Option<Vec<f32>>,
    last_step: Option<usize>,
}

impl Pndm {
    pub(crate) fn new(
        config: &SchedulerConfig,
        prediction: PredictionType,
        steps: usize,
    ) -> Result<Self> {
        let num_train = schedule::num_train_timesteps(config)?;
        let alphas_cumprod = schedule::alphas_cumprod(config, num_train)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let spacing = Spacing::from_config(config, Spacing::Leading)?;
        let offset = config.steps_offset.unwrap_or(0) as i64;
        let skip_prk_steps = config.skip_prk_steps.unwrap_or(false);
        let ratio = (num_train / steps) as i64;

        // `_timesteps`, ascending.
        let base: Vec<i64> = match spacing {
            Spacing::Linspace => schedule::np_linspace(0.0, (num_train - 1) as f64, steps)
                .into_iter()
                .map(|t| schedule::np_round(t) as i64)
                .collect(),
            Spacing::Leading => (0..steps as i64).map(|i| i * ratio + offset).collect(),
            Spacing::Trailing => {
                let r = num_train as f64 / steps as f64;
                schedule::np_arange(num_train as f64, 0.0, -r)
                    .into_iter()
                    .rev()
                    .map(|t| schedule::np_round(t) as i64 - 1)
                    .collect()
            }
        };
        let n = base.len();
        let (prk_timesteps, plms_timesteps): (Vec<i64>, Vec<i64>) = if skip_prk_steps {
            // concat(_t[:-1], _t[-2:-1], _t[-1:])[::-1]
            let mut plms: Vec<i64> = base[..n.saturating_sub(1)].to_vec();
            if n >= 2 {
                plms.push(base[n - 2]);
            }
            if n >= 1 {
                plms.push(base[n - 1]);
            }
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if n < PNDM_ORDER {
                return Err(Error::InvalidRequest(format!(
                    "PNDM: the Runge–Kutta warm-up (skip_prk_steps false) needs at least {PNDM_ORDER} steps, got {steps}"
                )));
            }
            let half = ratio / 2;
            // _t[-4:].repeat(2) + tile([0, half], 4), then [:-1].repeat(2)[1:-1][::-1]
            let prk: Vec<i64> = base[n - PNDM_ORDER..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            let doubled: Vec<i64> = prk[..prk.len() - 1].iter().flat_map(|&t| [t, t]).collect();
            let mut prk_ts = doubled[1..doubled.len() - 1].to_vec();
            prk_ts.reverse();
            let mut plms = base[..n - 3].to_vec();
            plms.reverse();
            (prk_ts, plms)
        };
        let timesteps: Vec<i64> = prk_timesteps
            .iter()
            .chain(&plms_timesteps)
            .copied()
            .collect();
        if let Some(&t) = timesteps.iter().find(|&&t| t < 0 || t >= num_train as i64) {
            return Err(Error::InvalidRequest(format!(
                "PNDM: {steps} steps with timestep_spacing {spacing:?} and steps_offset {offset} give \
                 timestep {t}, outside 0..{num_train} (diffusers would index out of range); choose another step count"
            )));
        }
        Ok(Pndm {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps_f32: timesteps.iter().map(|&t| t as f32).collect(),
            timesteps,
            prk_timesteps,
            skip_prk_steps,
            ratio,
            prediction,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
            last_step: None,
        })
    }

    /// `_get_prev_sample`: x_{t−δ} from x_t and ε (formula (9) of the PNDM paper).
    fn prev_sample(
        &self,
        sample: &[f32],
        t: i64,
        prev_t: i64,
        model_output: &[f32],
    ) -> Result<Vec<f32>> {
        if t < 0 {
            return Err(Error::InvalidArgument(format!(
                "PNDM: timestep {t} is negative"
            )));
        }
        let alpha_t = schedule::alpha_at(&self.alphas_cumprod, t, self.final_alpha_cumprod)?;
        let alpha_prev =
            schedule::alpha_at(&self.alphas_cumprod, prev_t, self.final_alpha_cumprod)?;
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denom = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        let diff = alpha_prev - alpha_t;
        let (sa, sb) = (alpha_t.sqrt(), beta_t.sqrt());
        let v_pred = self.prediction == PredictionType::VPrediction;
        Ok(model_output
            .iter()
            .zip(sample)
            .map(|(&m, &s)| {
                let eps = if v_pred { sa * m + sb * s } else { m };
                sample_coeff * s - diff * eps / denom
            })
            .collect())
    }

    fn step_prk(&mut self, model_output: &[f32], t_arg: i64, sample: &[f32]) -> Result<Vec<f32>> {
        let half = self.ratio / 2;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half };
        let prev_t = t_arg - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let mut model_output = model_output.to_vec();
        match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(scaled(&model_output, (1.0 / 6.0) as f32));
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.to_vec());
            }
            1 | 2 => {
                let add = scaled(&model_output, (1.0 / 3.0) as f32);
                self.cur_model_output = Some(match self.cur_model_output.take() {
                    Some(cur) => cur.iter().zip(&add).map(|(a, b)| a + b).collect(),
                    None => add,
                });
            }
            _ => {
                let add = scaled(&model_output, (1.0 / 6.0) as f32);
                model_output = match self.cur_model_output.take() {
                    Some(cur) => cur.iter().zip(&add).map(|(a, b)| a + b).collect(),
                    None => add,
                };
            }
        }
        let cur_sample = self.cur_sample.as_deref().unwrap_or(sample);
        let prev = self.prev_sample(cur_sample, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(&mut self, model_output: &[f32], t_arg: i64, sample: &[f32]) -> Result<Vec<f32>> {
        let (mut t, mut prev_t) = (t_arg, t_arg - self.ratio);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.to_vec());
        } else {
            prev_t = t_arg;
            t = t_arg + self.ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let owned_sample;
        let (eps, sample): (Vec<f32>, &[f32]) = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.to_vec());
            (model_output.to_vec(), sample)
        } else if k == 1 && self.counter == 1 {
            let eps = model_output
                .iter()
                .zip(&e[0])
                .map(|(m, e1)| (m + e1) / 2.0)
                .collect();
            owned_sample = self.cur_sample.take().ok_or_else(|| {
                Error::InvalidArgument("PNDM: second step without a first".into())
            })?;
            (eps, &owned_sample)
        } else if k == 2 {
            let (e1, e2) = (&e[1], &e[0]);
            (
                e1.iter()
                    .zip(e2)
                    .map(|(a, b)| (3.0 * a - b) / 2.0)
                    .collect(),
                sample,
            )
        } else if k == 3 {
            let (e1, e2, e3) = (&e[2], &e[1], &e[0]);
            let eps = (0..e1.len())
                .map(|i| (23.0 * e1[i] - 16.0 * e2[i] + 5.0 * e3[i]) / 12.0)
                .collect();
            (eps, sample)
        } else {
            let (e1, e2, e3, e4) = (&e[k - 1], &e[k - 2], &e[k - 3], &e[k - 4]);
            let c = (1.0 / 24.0) as f32;
            let eps = (0..e1.len())
                .map(|i| c * (55.0 * e1[i] - 59.0 * e2[i] + 37.0 * e3[i] - 9.0 * e4[i]))
                .collect();
            (eps, sample)
        };
        let prev = self.prev_sample(sample, t, prev_t, &eps)?;
        self.counter += 1;
        Ok(prev)
    }
}

fn scaled(x: &[f32], c: f32) -> Vec<f32> {
    x.iter().map(|v| c * v).collect()
}

impl Scheduler for Pndm {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step_index: usize) -> Result<Vec<f32>> {
        let alpha = super::ddim::timestep_alpha(&self.timesteps, &self.alphas_cumprod, step_index)?;
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
            "PNDM",
            self.last_step,
            step_index,
            self.timesteps.len(),
            model_output,
            sample,
        )?;
        let t = self.timesteps[step_index];
        let out = if self.counter < self.prk_timesteps.len() && !self.skip_prk_steps {
            self.step_prk(model_output, t, sample)?
        } else {
            self.step_plms(model_output, t, sample)?
        };
        self.last_step = Some(step_index);
        Ok(out)
    }
}

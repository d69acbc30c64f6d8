//! Sampling: diffusers-compatible schedulers (DDIM, PNDM/PLMS, Euler, Euler ancestral, DPM++ 2M with
//! or without Karras sigmas) and torch's CPU random generator, so that a seed, a scheduler config and
//! a step count give the same timesteps, sigmas, noise and per-step updates as diffusers 0.42.
//!
//! Each scheduler reads the raw `scheduler_config.json` ([`SchedulerConfig`]) and fills absent keys
//! with the defaults of ITS diffusers class (e.g. `timestep_spacing` is "leading" for DDIM/PNDM and
//! "linspace" for Euler/DPM; `set_alpha_to_one` is true for DDIM and false for PNDM), exactly like
//! `<Class>.from_config(config)`. Schedule arithmetic happens in float64 where diffusers uses numpy
//! and in float32 where it uses torch; per-element step arithmetic is float32 in torch's operation
//! order. The pipeline calls [`Scheduler::step`] with step indices 0, 1, 2, … in order (the first
//! call may start later, as img2img will); calling out of order is an error, never a silent
//! mismatch with diffusers' internal step counter.

pub mod rng;

mod ddim;
mod dpmpp;
mod euler;
mod pndm;
mod schedule;

use crate::config::SchedulerConfig;
use crate::{Error, Result};

/// The samplers this server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Pndm,
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mKarras,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
    ];

    /// The name used in requests and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler_a",
            SchedulerKind::DpmPp2m => "dpmpp_2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp_2m_karras",
        }
    }

    /// Parses [`SchedulerKind::name`]; the error lists the valid names.
    pub fn from_name(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                Error::InvalidRequest(format!(
                    "unknown scheduler \"{s}\" (valid: {})",
                    names.join(", ")
                ))
            })
    }

    /// The kind for a diffusers class name (`_class_name` of scheduler_config.json).
    /// `DPMSolverMultistepScheduler` maps to [`SchedulerKind::DpmPp2m`]; use
    /// [`SchedulerKind::from_config`] to honour its `use_karras_sigmas`.
    pub fn from_class_name(class: &str) -> Result<Self> {
        match class {
            "DDIMScheduler" => Ok(SchedulerKind::Ddim),
            "PNDMScheduler" => Ok(SchedulerKind::Pndm),
            "EulerDiscreteScheduler" => Ok(SchedulerKind::Euler),
            "EulerAncestralDiscreteScheduler" => Ok(SchedulerKind::EulerAncestral),
            "DPMSolverMultistepScheduler" => Ok(SchedulerKind::DpmPp2m),
            other => Err(Error::Config(format!(
                "scheduler class \"{other}\" is not supported (DDIMScheduler, PNDMScheduler, \
                 EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler)"
            ))),
        }
    }

    /// The kind a model's own scheduler_config.json asks for (its `_class_name`, and for
    /// `DPMSolverMultistepScheduler` its `use_karras_sigmas`).
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let class = config
            .class_name
            .as_deref()
            .ok_or_else(|| Error::Config("scheduler_config.json has no _class_name".into()))?;
        match Self::from_class_name(class)? {
            SchedulerKind::DpmPp2m if config.use_karras_sigmas == Some(true) => {
                Ok(SchedulerKind::DpmPp2mKarras)
            }
            kind => Ok(kind),
        }
    }

    /// The sampler name as AUTOMATIC1111 writes it in a PNG's `parameters`.
    pub fn a1111_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Pndm => "PLMS",
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerAncestral => "Euler a",
            SchedulerKind::DpmPp2m => "DPM++ 2M",
            SchedulerKind::DpmPp2mKarras => "DPM++ 2M Karras",
        }
    }
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise ε (SD 2.1-base).
    Epsilon,
    /// v = √ᾱ·ε − √(1−ᾱ)·x₀ (SD 2.1 768).
    VPrediction,
}

/// The config's `prediction_type` (diffusers default "epsilon"). "sample" is refused.
pub fn prediction_type(config: &SchedulerConfig) -> Result<PredictionType> {
    match config.prediction_type.as_deref() {
        None | Some("epsilon") => Ok(PredictionType::Epsilon),
        Some("v_prediction") => Ok(PredictionType::VPrediction),
        Some("sample") => Err(Error::Config(
            "scheduler: prediction_type \"sample\" is not supported (epsilon or v_prediction)"
                .into(),
        )),
        Some(other) => Err(Error::Config(format!(
            "scheduler: unknown prediction_type \"{other}\" (epsilon or v_prediction)"
        ))),
    }
}

/// One diffusers scheduler after `set_timesteps(steps)`.
pub trait Scheduler: Send {
    /// The timesteps the pipeline iterates over, in order (what diffusers' `scheduler.timesteps`
    /// holds, as f32; Euler-family timesteps are fractional). PNDM with `skip_prk_steps` has one
    /// more entry than steps, as in diffusers; without it steps + 9 (12 Runge–Kutta evaluations,
    /// then steps − 3 PLMS ones).
    fn timesteps(&self) -> &[f32];

    /// What the initial N(0, 1) latents are multiplied by (1 unless the scheduler says).
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// Scales the (CFG-duplicated or not) model input at step index i: identity for DDIM, PNDM
    /// and DPM (the default); division by √(σᵢ²+1) for the Euler family. An index past the end
    /// leaves it as is.
    fn scale_model_input(&self, _sample: &mut [f32], _step_index: usize) {}

    /// One denoising step: the (guided) model output at step index i and the current sample give
    /// the next sample. `rng` is the generator that drew the initial latents; Euler ancestral draws
    /// `model_output.len()` normals from it at every step, as diffusers does with the pipeline's
    /// generator (the latents are NCHW, so the draw order matches torch).
    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        rng: &mut rng::TorchGenerator,
    ) -> Result<Vec<f32>>;

    /// `original` noised to the level of step index `step_index` with `noise`, as diffusers'
    /// `scheduler.add_noise(original, noise, timesteps[step_index])` after
    /// `set_begin_index(step_index)` (img2img's start): √ᾱ_t·x + √(1−ᾱ_t)·ε for DDIM and PNDM,
    /// x + σ·ε for the Euler family, α_σ·x + σ·α_σ·ε with α_σ = 1/√(σ²+1) for DPM++.
    fn add_noise(&self, original: &[f32], noise: &[f32], step_index: usize) -> Result<Vec<f32>>;

    /// diffusers' `scheduler.sigmas` (float32, one more than the timesteps) for the Euler family
    /// and DPM; `None` for DDIM and PNDM, which have none.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
}

/// img2img's first step index (diffusers' `get_timesteps`): `strength` s of `steps` denoises
/// init_timestep = min(⌊steps·s⌋, steps) steps, starting at t_start = steps − init_timestep (every
/// scheduler here has order 1). A strength that leaves no step is an error.
pub fn img2img_first_step(steps: usize, strength: f64) -> Result<usize> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::InvalidRequest(format!(
            "strength must be between 0 and 1, got {strength}"
        )));
    }
    let init_timestep = ((steps as f64 * strength) as usize).min(steps);
    if init_timestep == 0 {
        return Err(Error::InvalidRequest(format!(
            "strength {strength} with {steps} steps leaves no step to run"
        )));
    }
    Ok(steps - init_timestep)
}

/// The noise-free part of `add_noise` at ᾱ_t for the DDPM-style schedulers (DDIM, PNDM), in
/// torch's f32 order: √ᾱ·x + √(1−ᾱ)·ε.
fn add_noise_at_alpha(alpha_cumprod: f32, original: &[f32], noise: &[f32]) -> Result<Vec<f32>> {
    same_length("add_noise", original, noise)?;
    let (a, b) = (alpha_cumprod.sqrt(), (1.0 - alpha_cumprod).sqrt());
    Ok(original
        .iter()
        .zip(noise)
        .map(|(&x, &e)| a * x + b * e)
        .collect())
}

fn same_length(what: &'static str, a: &[f32], b: &[f32]) -> Result<()> {
    if a.len() != b.len() {
        return Err(Error::shape(
            what,
            format!("{} values and {} noise values", a.len(), b.len()),
        ));
    }
    Ok(())
}

/// Builds `kind` from a model's scheduler_config.json and runs `set_timesteps(steps)`.
/// The prediction type comes from `config.prediction_type` (see [`prediction_type`]).
pub fn build_scheduler(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Scheduler>> {
    let num_train = schedule::num_train_timesteps(config)?;
    if steps == 0 || steps > num_train {
        return Err(Error::InvalidRequest(format!(
            "steps must be between 1 and {num_train} (the scheduler's num_train_timesteps), got {steps}"
        )));
    }
    let prediction = prediction_type(config)?;
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(config, prediction, steps)?),
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(config, prediction, steps)?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(
            config,
            prediction,
            steps,
            euler::Variant::Plain,
        )?),
        SchedulerKind::EulerAncestral => Box::new(euler::Euler::new(
            config,
            prediction,
            steps,
            euler::Variant::Ancestral,
        )?),
        SchedulerKind::DpmPp2m => Box::new(dpmpp::DpmPp2m::new(config, prediction, steps, false)?),
        SchedulerKind::DpmPp2mKarras => {
            Box::new(dpmpp::DpmPp2m::new(config, prediction, steps, true)?)
        }
    })
}

/// Checks a `step` call: index in range, right after the previous call (`last`), lengths equal.
/// The caller records `last = Some(step_index)` once its step has succeeded.
pub(crate) fn check_step(
    name: &'static str,
    last: Option<usize>,
    step_index: usize,
    num_steps: usize,
    model_output: &[f32],
    sample: &[f32],
) -> Result<()> {
    if step_index >= num_steps {
        return Err(Error::InvalidArgument(format!(
            "{name}: step index {step_index} is past the last of {num_steps} timesteps"
        )));
    }
    if let Some(prev) = last {
        if step_index != prev + 1 {
            return Err(Error::InvalidArgument(format!(
                "{name}: step index {step_index} called after {prev}; steps must run in order"
            )));
        }
    }
    if model_output.len() != sample.len() {
        return Err(Error::shape(
            "scheduler step",
            format!(
                "{name}: model output has {} values, sample has {}",
                model_output.len(),
                sample.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;

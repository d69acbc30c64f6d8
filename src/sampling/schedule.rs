//! Schedule arithmetic shared by the schedulers: betas → ᾱ exactly as diffusers builds them with torch
//! in float32, and the numpy float64 helpers (linspace, arange, round, interp) that diffusers'
//! `set_timesteps` uses, plus timestep spacing, Karras sigmas and sigma → t.
//!
//! Precision follows diffusers: betas, ᾱ and the training sigmas are float32 torch tensors (torch's
//! CPU `linspace` is `fma(step, i, start)` in float32 for the first half and `fma(−step, n−1−i, end)`
//! for the second, which is what its x86 build computes; `cumprod` accumulates in double and rounds
//! each output to float32); `set_timesteps` then works in numpy float64 and casts back to float32.

use crate::config::SchedulerConfig;
use crate::{Error, Result};

/// diffusers' `timestep_spacing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl Spacing {
    /// The config's value, or the scheduler class's own default when the key is absent.
    pub(crate) fn from_config(config: &SchedulerConfig, default: Spacing) -> Result<Spacing> {
        match config.timestep_spacing.as_deref() {
            None => Ok(default),
            Some("linspace") => Ok(Spacing::Linspace),
            Some("leading") => Ok(Spacing::Leading),
            Some("trailing") => Ok(Spacing::Trailing),
            Some(other) => Err(Error::Config(format!(
                "scheduler: timestep_spacing \"{other}\" is not supported (linspace, leading or trailing)"
            ))),
        }
    }
}

/// Bound on `num_train_timesteps`, so a corrupt config cannot ask for a giant table.
const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

/// `num_train_timesteps` (diffusers default 1000), between 1 and [`MAX_TRAIN_TIMESTEPS`].
pub(crate) fn num_train_timesteps(config: &SchedulerConfig) -> Result<usize> {
    match config.num_train_timesteps.unwrap_or(1000) {
        n @ 1..=MAX_TRAIN_TIMESTEPS => Ok(n),
        n => Err(Error::Config(format!(
            "scheduler: num_train_timesteps must be between 1 and {MAX_TRAIN_TIMESTEPS}, got {n}"
        ))),
    }
}

/// The float32 betas of `__init__`: `trained_betas`, or `beta_schedule` (default "linear") over
/// `beta_start` (default 0.0001) .. `beta_end` (default 0.02).
pub(crate) fn betas(config: &SchedulerConfig, num_train: usize) -> Result<Vec<f32>> {
    if let Some(trained) = &config.trained_betas {
        if trained.len() != num_train {
            return Err(Error::Config(format!(
                "scheduler: trained_betas has {} values but num_train_timesteps is {num_train}",
                trained.len()
            )));
        }
        return Ok(trained.iter().map(|&b| b as f32).collect());
    }
    let start = config.beta_start.unwrap_or(0.0001);
    let end = config.beta_end.unwrap_or(0.02);
    match config.beta_schedule.as_deref().unwrap_or("linear") {
        "linear" => Ok(torch_linspace_f32(start, end, num_train)),
        "scaled_linear" => Ok(torch_linspace_f32(start.powf(0.5), end.powf(0.5), num_train)
            .into_iter()
            .map(|b| b * b)
            .collect()),
        "squaredcos_cap_v2" => Ok(betas_for_alpha_bar_cosine(num_train)),
        other => Err(Error::Config(format!(
            "scheduler: beta_schedule \"{other}\" is not supported (linear, scaled_linear or squaredcos_cap_v2)"
        ))),
    }
}

/// ᾱ_t = ∏(1 − β) as diffusers' `alphas_cumprod` (float32), optionally after
/// `rescale_betas_zero_snr`.
pub(crate) fn alphas_cumprod(config: &SchedulerConfig, num_train: usize) -> Result<Vec<f32>> {
    let mut betas = betas(config, num_train)?;
    if config.rescale_betas_zero_snr.unwrap_or(false) {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let alphas: Vec<f32> = betas.iter().map(|&b| 1.0 - b).collect();
    Ok(cumprod(&alphas))
}

/// `torch.cumprod` of a float32 tensor on the CPU: double accumulator, each output rounded.
fn cumprod(values: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (arXiv 2305.08891, Algorithm 1), in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|&b| 1.0 - b).collect();
    let mut sqrt_ab: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let (Some(&first), Some(&last)) = (sqrt_ab.first(), sqrt_ab.last()) else {
        return Vec::new();
    };
    let scale = first / (first - last);
    for v in &mut sqrt_ab {
        *v = (*v - last) * scale;
    }
    let ab: Vec<f32> = sqrt_ab.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    out.extend(ab.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// `betas_for_alpha_bar(n)` with the cosine transform (`squaredcos_cap_v2`), max_beta 0.999.
fn betas_for_alpha_bar_cosine(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.linspace(start, end, n, dtype=torch.float32)` on the CPU, bit for bit.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    match n {
        0 => Vec::new(),
        1 => vec![s],
        _ => {
            let step = (e - s) / (n - 1) as f32;
            let half = n / 2;
            (0..n)
                .map(|i| {
                    if i < half {
                        step.mul_add(i as f32, s)
                    } else {
                        (-step).mul_add((n - 1 - i) as f32, e)
                    }
                })
                .collect()
        }
    }
}

/// The training sigmas √((1 − ᾱ)/ᾱ), in float32 as diffusers computes them with torch.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `np.linspace(start, stop, num)` (endpoint included) in float64.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num <= 1 {
        return vec![start; num];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// `np.arange(start, stop, step)` for float64 arguments: length ⌈(stop − start)/step⌉, values
/// `start + i·delta` with `delta = (start + step) − start`, as numpy fills them.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 || !len.is_finite() {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.round` (round half to even).
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, np.arange(len(fp)), fp)`: clamps outside the table.
pub(crate) fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let Some(&last) = fp.last() else {
        return f64::NAN;
    };
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    let top = (fp.len() - 1) as f64;
    if x >= top {
        return last as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    let slope = (y1 - y0) / 1.0;
    let r = slope * (x - j as f64) + y0;
    if r.is_nan() {
        let r2 = slope * (x - (j + 1) as f64) + y1;
        if r2.is_nan() && y0 == y1 {
            return y0;
        }
        return r2;
    }
    r
}

/// `np.log` of the float32 training sigmas (a float32 array in diffusers).
pub(crate) fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas
        .iter()
        .map(|&s| (s as f64).ln() as f32)
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma matches, linearly
/// interpolated between the two neighbouring table entries.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // argmax(cumsum(dists >= 0)) is the last index with log_sigma ≥ log_sigmas[i], or 0.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[high] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// `_convert_to_karras` (ρ = 7): n sigmas from sigma_max down to sigma_min, float64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// `prev_timestep < 0` uses `final_alpha_cumprod`; anything else must index the table.
pub(crate) fn alpha_at(alphas_cumprod: &[f32], t: i64, final_alpha: f32) -> Result<f32> {
    if t < 0 {
        return Ok(final_alpha);
    }
    alphas_cumprod.get(t as usize).copied().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "scheduler: timestep {t} is outside the {} training timesteps",
            alphas_cumprod.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 1.0, 3), vec![0.0, 0.5, 1.0]);
        // numpy quirk kept on purpose: 1000/61 steps give 62 values, the last ≈ −5.7e-13.
        let a = np_arange(1000.0, 0.0, -1000.0 / 61.0);
        assert_eq!(a.len(), 62);
        assert!(a[61].abs() < 1e-9);
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 7.0).len(), 7);
        assert_eq!(np_round(62.5), 62.0);
        assert_eq!(np_round(937.5), 938.0);
        let fp = [1.0f32, 3.0, 7.0];
        assert_eq!(np_interp(-1.0, &fp), 1.0);
        assert_eq!(np_interp(0.5, &fp), 2.0);
        assert_eq!(np_interp(1.0, &fp), 3.0);
        assert_eq!(np_interp(1.25, &fp), 4.0);
        assert_eq!(np_interp(5.0, &fp), 7.0);
    }

    /// `torch.linspace(0.00085**0.5, 0.012**0.5, 1000)[k]` printed by torch 2.15; 57, 58 and 932
    /// are elements where an unfused `start + step·k` would be one ulp off.
    #[test]
    fn torch_linspace_is_bit_exact() {
        let v = torch_linspace_f32(0.00085f64.powf(0.5), 0.012f64.powf(0.5), 1000);
        assert_eq!(v.len(), 1000);
        assert_eq!(v[0], 0.00085f64.sqrt() as f32);
        assert_eq!(v[999], 0.012f64.sqrt() as f32);
        for (k, want) in [
            (57, 0.033_741_56f32),
            (58, 0.033_822_034),
            (499, 0.069_309_4),
            (500, 0.069_389_865),
            (932, 0.104_153),
        ] {
            assert_eq!(v[k], want, "[{k}]");
        }
        assert_eq!(torch_linspace_f32(2.0, 5.0, 1), vec![2.0]);
    }
}

//! Scalar math shared by the CPU ops: a branch-free f32 `exp` (the softmax and SiLU hot path;
//! `f32::exp` is an opaque libm call that blocks vectorisation and costs as much as the attention
//! GEMMs), a branch-free `erf`, SiLU, and the erf GELU.

/// `eˣ` in f32, within 2 ulp of the true value over the whole range (Cephes `expf`: Cody–Waite
/// reduction `x = n·ln2 + r`, degree-6 polynomial for `eʳ`, `2ⁿ` built from exponent bits in two
/// halves so that subnormal results stay accurate). Overflow gives `+∞`, underflow `0`, NaN stays
/// NaN. Written without branches so that loops over it vectorise.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const HI: f32 = 88.722_84; // ln(f32::MAX)
    const LO: f32 = -103.972_08; // ln(smallest subnormal / 2): below this eˣ rounds to 0
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375: n·LN2_HI is exact for |n| ≤ 150
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to an integer

    // `clamp` keeps NaN, which then propagates.
    let xc = x.clamp(LO, HI);
    // t = ROUND + n exactly, so n is also the difference of the bit patterns (integer ops only:
    // a float→int `as` cast would saturate and stop the loop from vectorising).
    let t = xc * LOG2E + ROUND;
    let nf = t - ROUND;
    let n = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32); // in [-150, 128]
    let r = xc - nf * LN2_HI - nf * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let n1 = n >> 1;
    let n2 = n - n1;
    let y = er * pow2(n1) * pow2(n2);
    if x > HI {
        f32::INFINITY
    } else if x < LO {
        0.0
    } else {
        y
    }
}

/// `2ⁿ` for `n` in [-126, 127], from the exponent bits (wrapping: a NaN input gives a garbage
/// `n`, and the NaN polynomial then wins anyway).
#[inline(always)]
fn pow2(n: i32) -> f32 {
    f32::from_bits((n.wrapping_add(127) as u32) << 23)
}

/// SiLU `x · σ(x) = x / (1 + e⁻ˣ)`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `erf(x)` in f32 within 5e-7 absolute: Abramowitz & Stegun 7.1.26,
/// `sign(x) · (1 − t·(a₁ + t·(a₂ + …)) · e^(−x²))` with `t = 1/(1 + p|x|)`, the formula PyTorch's
/// vectorised CPU `erf` uses. Branch-free (`libm::erff` is not), so loops over it vectorise.
/// `±∞` gives `±1`, NaN stays NaN.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_72;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    (1.0 - poly * exp(-ax * ax)).copysign(x)
}

/// GELU `0.5 · x · (1 + erf(x / √2))` (PyTorch's default, `approximate='none'`).
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_within_5e7_of_the_true_value_and_handles_the_edges() {
        let mut worst = 0.0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            worst = worst.max((erf(x) as f64 - libm::erf(x as f64)).abs());
            x += 0.000_37;
        }
        assert!(worst <= 5e-7, "worst |erf error| {worst:e}");
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert_eq!(erf(0.0), 0.0);
        assert!(erf(f32::NAN).is_nan());
    }

    #[test]
    fn exp_is_accurate_over_the_whole_range() {
        let mut worst = 0.0f64;
        let mut x = -103.0f32;
        while x < 88.7 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            // Relative error for normal results; absolute in units of the smallest normal below.
            let err = (got - want).abs() / want.max(f32::MIN_POSITIVE as f64);
            worst = worst.max(err);
            x += 0.000_731;
        }
        assert!(
            worst < 3.0 * f32::EPSILON as f64,
            "worst relative error {worst:e}"
        );
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn silu_and_gelu_match_f64() {
        for i in -2000..2000 {
            let x = i as f32 * 0.0173;
            let xd = x as f64;
            let silu_ref = xd / (1.0 + (-xd).exp());
            assert!((silu(x) as f64 - silu_ref).abs() <= 1e-6 * (1.0 + silu_ref.abs()));
            let gelu_ref = 0.5 * xd * (1.0 + libm::erf(xd / std::f64::consts::SQRT_2));
            assert!(
                (gelu(x) as f64 - gelu_ref).abs() <= 1e-6 * (1.0 + gelu_ref.abs()),
                "gelu({x})"
            );
        }
        assert_eq!(silu(-200.0), 0.0);
        assert_eq!(silu(200.0), 200.0);
        // Known values: GELU(1) = 0.8413447, GELU(-1) = -0.1586553.
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu(-1.0) + 0.158_655_3).abs() < 1e-6);
    }
}

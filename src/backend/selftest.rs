//! The start-up self-test: every op family once, at small and awkward shapes (odd sizes, 77 keys,
//! C_in not a multiple of 64, batch 1 and 2, one query and one key, a K tail), on a candidate
//! backend against the CPU backend (the numerical reference), on the same seeded inputs rounded
//! to f16 so that only the computation differs. `Device::open` runs it before a GPU backend is
//! used; `sd21 selftest` prints its table. A backend's own start-up checks of optional kernels
//! (the CUDA backend's wgmma kernels against its portable ones) join the same report as
//! [`Role::KernelChoice`] rows: one failing switches that kernel off instead of the GPU.

use std::fmt::Write as _;
use std::time::Instant;

use super::cpu::CpuBackend;
use super::{Activation, Backend, Mask, Padding};
use crate::random::SeededRng;
use crate::tensor::HostTensor;
use crate::Result;

/// Largest relative L2 error ‖got − cpu‖ / ‖cpu‖ that passes. f16 storage with f32
/// accumulation lands near 1e-3 at these shapes; a wrong kernel is off by order 1.
pub const TOLERANCE: f64 = 1e-2;

/// What a failing case means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An op the backend must get right, or it is not used.
    Required,
    /// An optional kernel checked against the backend's portable one: failing, it is not used.
    KernelChoice,
}

/// One op at one shape.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub op: &'static str,
    pub role: Role,
    pub shape: String,
    /// The relative L2 error against the CPU backend (`None` when the op failed).
    pub error: Option<f64>,
    /// Why the op failed or produced non-finite values.
    pub failure: Option<String>,
    pub seconds: f64,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.failure.is_none() && self.error.is_some_and(|e| e <= TOLERANCE)
    }
}

/// Every case's result, in order.
#[derive(Debug, Clone)]
pub struct Report {
    pub device: String,
    pub cases: Vec<CaseResult>,
}

impl Report {
    /// Whether every required op passed (an optional kernel that failed is only switched off).
    pub fn passed(&self) -> bool {
        self.required().all(CaseResult::passed)
    }

    fn required(&self) -> impl Iterator<Item = &CaseResult> {
        self.cases.iter().filter(|c| c.role == Role::Required)
    }

    /// The backend's own start-up checks (`Role::KernelChoice` rows), first in the table.
    pub fn with_kernel_choices(mut self, checks: Vec<CaseResult>) -> Self {
        self.cases.splice(0..0, checks);
        self
    }

    /// The first required case that failed, as "op shape: why".
    pub fn first_failure(&self) -> Option<String> {
        let case = self.required().find(|c| !c.passed())?;
        let why = match (&case.failure, case.error) {
            (Some(failure), _) => failure.clone(),
            (None, Some(e)) => format!("relative L2 error {e:.2e} > {TOLERANCE:.0e}"),
            (None, None) => "no result".into(),
        };
        Some(format!("{} {}: {why}", case.op, case.shape))
    }

    /// The table `sd21 selftest` prints: op, shape, error, tolerance, pass/fail, time.
    pub fn table(&self) -> String {
        let mut out = format!("self-test of {} against the CPU backend\n", self.device);
        let _ = writeln!(
            out,
            "{:<16} {:<34} {:>10} {:>9} {:>6} {:>9}",
            "op", "shape", "rel L2", "tolerance", "result", "time ms"
        );
        for c in &self.cases {
            let error = c.error.map_or("-".into(), |e| format!("{e:.2e}"));
            let result = match (c.passed(), c.role) {
                (true, _) => "pass",
                (false, Role::Required) => "FAIL",
                (false, Role::KernelChoice) => "off",
            };
            let _ = writeln!(
                out,
                "{:<16} {:<34} {error:>10} {TOLERANCE:>9.0e} {result:>6} {:>9.2}",
                c.op,
                c.shape,
                c.seconds * 1e3
            );
            if let Some(failure) = &c.failure {
                let _ = writeln!(out, "    {failure}");
            }
        }
        let verdict = match (self.passed(), self.cases.iter().all(CaseResult::passed)) {
            (true, true) => "all passed",
            (true, false) => "passed (a failing optional kernel is off)",
            (false, _) => "FAILED",
        };
        let _ = writeln!(out, "{} cases: {verdict}", self.cases.len());
        out
    }
}

/// Host inputs of one case; both backends get the same values.
type Inputs = Vec<HostTensor>;
/// Runs one case on a backend from its uploaded inputs.
type Run<B> = fn(&B, &[<B as Backend>::Tensor]) -> Result<<B as Backend>::Tensor>;

/// Runs every case on `candidate` and on the CPU backend and compares them.
pub fn run<B: Backend>(candidate: &B) -> Report {
    let reference = CpuBackend::new();
    let mut rng = SeededRng::new(0x5e1f_7e57);
    let mut cases = Vec::new();
    for (op, shapes, run_candidate, run_reference) in cases_for::<B>() {
        let inputs: Inputs = shapes
            .iter()
            .map(|(shape, scale)| f16_inputs(&mut rng, shape, *scale))
            .collect();
        let shape = format!("{:?}", shapes.iter().map(|(s, _)| s).collect::<Vec<_>>());
        let started = Instant::now();
        let got = evaluate(candidate, &inputs, run_candidate);
        let seconds = started.elapsed().as_secs_f64();
        let want = evaluate(&reference, &inputs, run_reference);
        let (error, failure) = match (got, want) {
            (Ok(got), Ok(want)) => compare(&got, &want),
            (Err(e), _) => (None, Some(format!("{op} failed: {e}"))),
            (_, Err(e)) => (None, Some(format!("the CPU reference failed: {e}"))),
        };
        cases.push(CaseResult {
            op,
            role: Role::Required,
            shape,
            error,
            failure,
            seconds,
        });
    }
    Report {
        device: candidate.describe(),
        cases,
    }
}

fn evaluate<B: Backend>(backend: &B, inputs: &Inputs, run: Run<B>) -> Result<HostTensor> {
    let uploaded = inputs
        .iter()
        .map(|h| backend.upload(h))
        .collect::<Result<Vec<_>>>()?;
    backend.download(&run(backend, &uploaded)?)
}

/// The relative L2 error, or why the output cannot be compared.
fn compare(got: &HostTensor, want: &HostTensor) -> (Option<f64>, Option<String>) {
    if got.shape != want.shape {
        let why = format!("shape {:?}, the CPU gives {:?}", got.shape, want.shape);
        return (None, Some(why));
    }
    if let Some(i) = got.data.iter().position(|v| !v.is_finite()) {
        return (
            None,
            Some(format!("non-finite output {} at {i}", got.data[i])),
        );
    }
    let (mut err2, mut ref2) = (0.0f64, 0.0f64);
    for (&g, &w) in got.data.iter().zip(&want.data) {
        err2 += (g as f64 - w as f64).powi(2);
        ref2 += (w as f64).powi(2);
    }
    (Some((err2 / ref2.max(f64::MIN_POSITIVE)).sqrt()), None)
}

/// Seeded values `scale · U(-1, 1)` rounded to f16.
fn f16_inputs(rng: &mut SeededRng, shape: &[usize], scale: f32) -> HostTensor {
    let n = shape.iter().product();
    let data = rng
        .values(n, scale)
        .into_iter()
        .map(|v| half::f16::from_f32(v).to_f32())
        .collect();
    HostTensor {
        shape: shape.to_vec(),
        data,
    }
}

type Shapes = Vec<(Vec<usize>, f32)>;

/// (op, input shapes and scales, the op on the candidate, the op on the CPU).
fn cases_for<B: Backend>() -> Vec<(&'static str, Shapes, Run<B>, Run<CpuBackend>)> {
    macro_rules! case {
        ($op:expr, [$(($shape:expr, $scale:expr)),*], |$be:ident, $t:ident| $body:expr) => {
            (
                $op,
                vec![$(($shape.to_vec(), $scale)),*],
                (|$be: &B, $t: &[B::Tensor]| $body) as Run<B>,
                (|$be: &CpuBackend, $t: &[<CpuBackend as Backend>::Tensor]| $body) as Run<CpuBackend>,
            )
        };
    }
    vec![
        // A K tail (K = 40 is not a multiple of the GEMM tile) and odd N.
        case!(
            "linear",
            [([3, 5, 40], 1.0), ([9, 40], 0.2), ([9], 0.5)],
            |be, t| { be.linear(&t[0], &t[1], Some(&t[2])) }
        ),
        // C_in = 12 (not a multiple of 64), odd spatial size, batch 2, bias and residual.
        case!(
            "conv2d 3x3",
            [
                ([2, 7, 5, 12], 1.0),
                ([16, 3, 3, 12], 0.2),
                ([16], 0.5),
                ([2, 7, 5, 16], 1.0)
            ],
            |be, t| be.conv2d(&t[0], &t[1], Some(&t[2]), 1, 1, Some(&t[3]))
        ),
        // The implicit-GEMM path: C_in a multiple of 8, stride 2 (the downsamplers).
        case!(
            "conv2d stride 2",
            [([1, 9, 11, 64], 1.0), ([72, 3, 3, 64], 0.05), ([72], 0.5)],
            |be, t| be.conv2d(&t[0], &t[1], Some(&t[2]), 2, 1, None)
        ),
        // 4 input channels: the direct kernel (conv_in).
        case!(
            "conv2d conv_in",
            [([1, 6, 6, 4], 1.0), ([8, 3, 3, 4], 0.3), ([8], 0.5)],
            |be, t| be.conv2d(&t[0], &t[1], Some(&t[2]), 1, 1, None)
        ),
        case!(
            "group_norm+silu",
            [([2, 5, 3, 96], 1.0), ([96], 1.0), ([96], 0.5)],
            |be, t| { be.group_norm(&t[0], 32, &t[1], &t[2], 1e-5, Activation::Silu) }
        ),
        case!(
            "group_norm odd C",
            [([1, 3, 3, 30], 1.0), ([30], 1.0), ([30], 0.5)],
            |be, t| { be.group_norm(&t[0], 3, &t[1], &t[2], 1e-6, Activation::None) }
        ),
        case!(
            "layer_norm",
            [([2, 7, 40], 1.0), ([40], 1.0), ([40], 0.5)],
            |be, t| { be.layer_norm(&t[0], &t[1], &t[2], 1e-5) }
        ),
        // Head dim 64 (the flash kernels), 77 keys (cross-attention), batch 2.
        case!(
            "attention d64",
            [
                ([2, 33, 128], 2.0),
                ([2, 77, 128], 1.0),
                ([2, 77, 128], 1.0)
            ],
            |be, t| be.attention(&t[0], &t[1], &t[2], 2, Mask::None)
        ),
        // CLIP-like causal self-attention, head dim 64.
        case!(
            "attention causal",
            [
                ([1, 77, 128], 2.0),
                ([1, 77, 128], 1.0),
                ([1, 77, 128], 1.0)
            ],
            |be, t| be.attention(&t[0], &t[1], &t[2], 2, Mask::Causal)
        ),
        // One query and one key; head dim 40 (the generic kernel).
        case!(
            "attention 1x1",
            [([1, 1, 80], 2.0), ([1, 1, 80], 1.0), ([1, 1, 80], 1.0)],
            |be, t| be.attention(&t[0], &t[1], &t[2], 2, Mask::None)
        ),
        case!("geglu", [([2, 3, 26], 2.0)], |be, t| be.geglu(&t[0])),
        case!("gelu", [([5, 7], 3.0)], |be, t| be.gelu(&t[0])),
        case!("silu", [([5, 7], 3.0)], |be, t| be.silu(&t[0])),
        case!("add", [([3, 11], 1.0), ([3, 11], 1.0)], |be, t| be
            .add(&t[0], &t[1])),
        case!(
            "add_per_channel",
            [([2, 3, 5, 6], 1.0), ([2, 6], 1.0)],
            |be, t| { be.add_per_channel(&t[0], &t[1]) }
        ),
        case!("upsample_nearest", [([1, 3, 5, 6], 1.0)], |be, t| {
            be.upsample_nearest(&t[0], 6, 10)
        }),
        // The VAE encoder's downsampler padding (bottom and right by one), and all four sides.
        case!("pad", [([2, 3, 5, 6], 1.0)], |be, t| {
            let padding = Padding {
                top: 1,
                bottom: 2,
                left: 0,
                right: 1,
            };
            be.pad(&t[0], padding)
        }),
        case!(
            "concat_channels",
            [([2, 4, 3], 1.0), ([2, 4, 5], 1.0)],
            |be, t| { be.concat_channels(&t[0], &t[1]) }
        ),
        case!("embedding", [([10, 6], 1.0)], |be, t| be
            .embedding(&[3, 0, 9, 3], &t[0])),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Sabotage, Sabotaged};

    #[test]
    fn the_reference_passes_itself_exactly() {
        let report = run(&CpuBackend::new());
        assert!(report.passed(), "{}", report.table());
        assert!(report.cases.len() >= 15);
        assert!(
            report.cases.iter().all(|c| c.error == Some(0.0)),
            "{}",
            report.table()
        );
        assert!(report.table().contains("all passed"));
    }

    #[test]
    fn a_wrong_op_fails_and_is_named() {
        let report = run(&Sabotaged::new(Sabotage::SiluIsIdentity));
        assert!(!report.passed());
        let failing: Vec<_> = report
            .cases
            .iter()
            .filter(|c| !c.passed())
            .map(|c| c.op)
            .collect();
        assert_eq!(failing, ["silu"], "{}", report.table());
        let first = report.first_failure().unwrap_or_default();
        assert!(
            first.starts_with("silu [[5, 7]]: relative L2 error"),
            "{first}"
        );
        assert!(report.table().contains("FAIL"));
    }

    #[test]
    fn a_failing_optional_kernel_is_off_not_fatal() {
        let check = CaseResult {
            op: "conv2d wgmma",
            role: Role::KernelChoice,
            shape: "vs mma.sync".into(),
            error: None,
            failure: Some("relative L2 error 3e-1".into()),
            seconds: 0.0,
        };
        let report = run(&CpuBackend::new()).with_kernel_choices(vec![check]);
        assert!(report.passed());
        assert_eq!(report.first_failure(), None);
        let table = report.table();
        assert!(
            table.contains(" off ") && table.contains("optional kernel is off"),
            "{table}"
        );
        assert_eq!(
            report.cases[0].op, "conv2d wgmma",
            "the backend's checks come first"
        );
    }

    #[test]
    fn non_finite_output_fails() {
        let report = run(&Sabotaged::new(Sabotage::NanFromConv { channels: 16 }));
        let first = report.first_failure().unwrap_or_default();
        assert!(
            first.starts_with("conv2d 3x3") && first.contains("non-finite"),
            "{first}"
        );
    }
}

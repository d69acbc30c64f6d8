//! `--device auto|cpu|cuda[:N]`: parsing the choice, resolving `auto` to what this machine has,
//! and starting the chosen backend.

use std::fmt;
use std::str::FromStr;

use super::cpu::CpuBackend;
use super::cuda::CudaBackend;
use super::{selftest, Backend};
use crate::{Error, Result};

/// A started backend, as [`Device::open`] chose it.
pub enum OpenedBackend {
    Cpu(CpuBackend),
    /// Boxed: the CUDA backend holds its handles inline, the CPU backend is empty.
    Cuda(Box<CudaBackend>),
}

/// Where the model runs, as a user names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// CUDA device 0 when this binary has kernels and a GPU is present, else the CPU.
    #[default]
    Auto,
    /// The CPU backend (f32).
    Cpu,
    /// The CUDA backend on device N (f16 storage, f32 accumulation).
    Cuda(usize),
}

impl Device {
    /// `auto` resolved: `Cuda(0)` when [`super::cuda::cuda_available`], else `Cpu`. Others as
    /// they are: an explicit `cuda` is never turned into the CPU.
    pub fn resolve(self) -> Device {
        match self {
            Device::Auto if super::cuda::cuda_available() => Device::Cuda(0),
            Device::Auto => Device::Cpu,
            other => other,
        }
    }

    /// Starts the backend for this choice (`auto` resolved by [`Device::resolve`]) and, for a
    /// GPU, runs the self-test ([`selftest`]) before anything uses it. Under `auto`, a GPU that
    /// is present but cannot be started (e.g. cuBLAS missing) or fails its self-test is logged
    /// and the CPU is used; an explicit `cuda[:N]` that cannot is an error.
    pub fn open(self) -> Result<OpenedBackend> {
        let Device::Cuda(ordinal) = self.resolve() else {
            return Ok(OpenedBackend::Cpu(CpuBackend::new()));
        };
        let started = match CudaBackend::new(ordinal) {
            Ok(backend) => {
                let checks = backend.start_up_checks();
                self.accept_after_selftest(backend, checks)?
            }
            Err(err) if self == Device::Auto => {
                tracing::warn!(%err, "a GPU is present but CUDA could not start; using the CPU");
                None
            }
            Err(err) => return Err(err),
        };
        Ok(match started {
            Some(backend) => OpenedBackend::Cuda(Box::new(backend)),
            None => OpenedBackend::Cpu(CpuBackend::new()),
        })
    }

    /// `backend` when it passes the self-test; otherwise `None` under `auto` (the CPU is used,
    /// with a warning naming the op) and an error with the whole table when it was asked for.
    /// `kernel_choices` are the backend's own start-up checks, reported with the rest.
    fn accept_after_selftest<B: Backend>(
        self,
        backend: B,
        kernel_choices: Vec<selftest::CaseResult>,
    ) -> Result<Option<B>> {
        let report = selftest::run(&backend).with_kernel_choices(kernel_choices);
        if report.passed() {
            tracing::info!(device = %report.device, cases = report.cases.len(), "self-test passed");
            return Ok(Some(backend));
        }
        let failure = report.first_failure().unwrap_or_default();
        if self == Device::Auto {
            tracing::warn!(
                device = %report.device,
                %failure,
                "the GPU failed its self-test; using the CPU"
            );
            return Ok(None);
        }
        Err(Error::Backend(format!(
            "{}: the self-test failed ({failure}), so the GPU is not used:\n{}",
            report.device,
            report.table()
        )))
    }
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Device> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => lower
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    Error::InvalidRequest(format!(
                        "unknown device `{s}`: expected auto, cpu, cuda or cuda:N"
                    ))
                }),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_rejects_the_rest() {
        assert_eq!("auto".parse::<Device>().unwrap(), Device::Auto);
        assert_eq!("CPU".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        for bad in ["", "cuda:", "cuda:-1", "cuda:x", "tpu", "cuda3"] {
            let err = bad.parse::<Device>().unwrap_err().to_string();
            assert!(err.contains("auto, cpu, cuda or cuda:N"), "{bad}: {err}");
        }
        for d in [Device::Auto, Device::Cpu, Device::Cuda(2)] {
            assert_eq!(d.to_string().parse::<Device>().unwrap(), d);
        }
    }

    #[test]
    fn a_gpu_failing_its_self_test_is_not_used() {
        use crate::testing::{Sabotage, Sabotaged};
        let wrong = || Sabotaged::new(Sabotage::SiluIsIdentity);
        assert!(matches!(
            Device::Auto.accept_after_selftest(wrong(), vec![]),
            Ok(None)
        ));
        let err = Device::Cuda(0)
            .accept_after_selftest(wrong(), vec![])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("self-test failed (silu"), "{err}");
        assert!(err.contains("FAIL"), "the table is in the error: {err}");
        assert!(matches!(
            Device::Cuda(0).accept_after_selftest(CpuBackend::new(), vec![]),
            Ok(Some(_))
        ));
    }

    #[test]
    fn auto_resolves_to_what_is_present_and_explicit_choices_stay() {
        let expected = if crate::backend::cuda::cuda_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        };
        assert_eq!(Device::Auto.resolve(), expected);
        assert_eq!(Device::Cpu.resolve(), Device::Cpu);
        assert_eq!(Device::Cuda(1).resolve(), Device::Cuda(1));
    }
}

//! What the bench asks of a backend beyond the op set: a barrier before reading the clock, a
//! device copy (the bandwidth ceiling), and graph replay where the backend records graphs.

use anyhow::Result;
use sd21::backend::cpu::CpuBackend;
#[cfg(sd21_kernels)]
use sd21::backend::cuda::CudaBackend;
use sd21::backend::Backend;
#[cfg(sd21_kernels)]
use sd21::pipeline::cuda_graphs;
use sd21::pipeline::UnetRecorder;

pub trait BenchDevice: Backend + Sized {
    /// Waits for all work queued on the device.
    fn synchronize(&self) -> Result<()>;
    /// A fresh device copy of `x`.
    fn copy(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// A recorder that replays the UNet as a graph, where the backend has one.
    fn graph_recorder(&self) -> Option<UnetRecorder<Self>>;
}

impl BenchDevice for CpuBackend {
    fn synchronize(&self) -> Result<()> {
        Ok(()) // every CPU op has finished when it returns
    }

    fn copy(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        Ok(CpuBackend::copy(self, x))
    }

    fn graph_recorder(&self) -> Option<UnetRecorder<Self>> {
        None
    }
}

#[cfg(sd21_kernels)]
impl BenchDevice for CudaBackend {
    fn synchronize(&self) -> Result<()> {
        Ok(CudaBackend::synchronize(self)?)
    }

    fn copy(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        Ok(CudaBackend::copy(self, x)?)
    }

    fn graph_recorder(&self) -> Option<UnetRecorder<Self>> {
        Some(cuda_graphs())
    }
}

//! `HostTensor`: an f32 array in host memory with a row-major shape; what crosses between the
//! weights loader, the sampler and a backend.

use crate::{Error, Result};

/// A dense row-major f32 tensor in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Builds a tensor, checking that `data` holds exactly `shape.iter().product()` values.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::shape(
                "HostTensor::new",
                format!("shape {shape:?} needs {numel} values, got {}", data.len()),
            ));
        }
        Ok(HostTensor { shape, data })
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Same data, new shape with the same number of elements.
    pub fn reshape(self, shape: Vec<usize>) -> Result<Self> {
        HostTensor::new(shape, self.data)
    }

    /// NCHW → NHWC for a 4-D tensor (diffusers' layout to ours).
    pub fn nchw_to_nhwc(&self) -> Result<Self> {
        let [n, c, h, w] = self.dims4("nchw_to_nhwc")?;
        let mut out = vec![0.0f32; self.data.len()];
        for b in 0..n {
            for ch in 0..c {
                for y in 0..h {
                    let src = ((b * c + ch) * h + y) * w;
                    for x in 0..w {
                        out[((b * h + y) * w + x) * c + ch] = self.data[src + x];
                    }
                }
            }
        }
        HostTensor::new(vec![n, h, w, c], out)
    }

    /// NHWC → NCHW for a 4-D tensor.
    pub fn nhwc_to_nchw(&self) -> Result<Self> {
        let [n, h, w, c] = self.dims4("nhwc_to_nchw")?;
        let mut out = vec![0.0f32; self.data.len()];
        for b in 0..n {
            for y in 0..h {
                for x in 0..w {
                    let src = ((b * h + y) * w + x) * c;
                    for ch in 0..c {
                        out[((b * c + ch) * h + y) * w + x] = self.data[src + ch];
                    }
                }
            }
        }
        HostTensor::new(vec![n, c, h, w], out)
    }

    fn dims4(&self, op: &'static str) -> Result<[usize; 4]> {
        match self.shape[..] {
            [a, b, c, d] => Ok([a, b, c, d]),
            _ => Err(Error::shape(
                op,
                format!("expected 4 dims, got {:?}", self.shape),
            )),
        }
    }
}

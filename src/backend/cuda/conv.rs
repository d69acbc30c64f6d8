//! Convolution (being written).

use super::backend::{CudaBackend, CudaTensor};
use crate::{Error, Result};

pub(super) fn conv2d(
    _be: &CudaBackend,
    _x: &CudaTensor,
    _w: &CudaTensor,
    _bias: Option<&CudaTensor>,
    _stride: usize,
    _padding: usize,
    _residual: Option<&CudaTensor>,
) -> Result<CudaTensor> {
    Err(Error::Backend("conv2d: not written yet".into()))
}

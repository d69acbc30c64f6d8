//! One memory-mapped safetensors file: header parsed once, tensors converted to f32 on demand.
//! Once a tensor is converted its pages are handed back (the copy is what the model keeps), so
//! the process never holds a tensor twice: the file stays in the page cache, not in our RSS.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;

use crate::tensor::HostTensor;
use crate::{Error, Result};

/// A memory-mapped safetensors file with its parsed header.
pub struct SafeTensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

impl SafeTensorsFile {
    /// Maps `path` and parses its header; a truncated or malformed file is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and private to this process. Model files are not expected to
        // change while sd21 runs; if another process truncates the file, reads may fault, which is
        // the documented limit of memory-mapped I/O that every safetensors reader accepts.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata): (usize, Metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::SafeTensors {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        Ok(SafeTensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensor names in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The shape of `name`, if the file has it.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|info| info.shape.as_slice())
    }

    /// `name` converted to f32 (from f32, f16 or bf16); with `expected`, its shape must match.
    pub fn get(&self, name: &str, expected: Option<&[usize]>) -> Result<HostTensor> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        if let Some(expected) = expected {
            if info.shape != expected {
                return Err(Error::TensorShape {
                    path: self.path.clone(),
                    name: name.to_string(),
                    expected: expected.to_vec(),
                    found: info.shape.clone(),
                });
            }
        }
        let (start, end) = info.data_offsets;
        let range = self.data_start + start..self.data_start + end;
        // `read_metadata` validated that the offsets lie inside the buffer.
        let bytes = self
            .mmap
            .get(range.clone())
            .ok_or_else(|| Error::SafeTensors {
                path: self.path.clone(),
                message: format!("tensor `{name}` lies outside the file"),
            })?;
        let data = widen_to_f32(info.dtype, bytes).ok_or_else(|| Error::TensorDtype {
            path: self.path.clone(),
            name: name.to_string(),
            dtype: format!("{:?}", info.dtype),
        })?;
        self.release(range);
        HostTensor::new(info.shape.clone(), data).map_err(|_| Error::SafeTensors {
            path: self.path.clone(),
            message: format!("tensor `{name}`: byte length does not match its shape"),
        })
    }

    /// Drops the mapped pages of `range` from this process (they stay in the page cache; a later
    /// read faults them in again). Only a hint: a failure costs memory, never correctness.
    fn release(&self, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        {
            // SAFETY: the map is read-only and private and nothing borrows `range` now (its bytes
            // were copied above); MADV_DONTNEED on never-written file pages only unmaps them, so
            // a later read sees the same file contents. The range lies inside the map.
            let released = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.len(),
                )
            };
            if let Err(e) = released {
                tracing::debug!(path = %self.path.display(), error = %e, "madvise(DONTNEED) failed");
            }
        }
        #[cfg(not(unix))]
        let _ = range;
    }
}

/// Elements one rayon task converts (256 KiB of f32): big tensors convert on every core.
const WIDEN_CHUNK: usize = 1 << 16;

/// Little-endian f32, f16 or bf16 bytes as f32 (exact for all three); `None` for other dtypes.
/// A trailing partial element is dropped (the caller's shape check then fails).
fn widen_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        _ => return None,
    };
    let mut out = vec![0.0f32; bytes.len() / width];
    out.par_chunks_mut(WIDEN_CHUNK)
        .zip(bytes.par_chunks(WIDEN_CHUNK * width))
        .for_each(|(dst, src)| match dtype {
            Dtype::F32 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
            }
            Dtype::BF16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
                }
            }
            _ => f16_to_f32(src, dst),
        });
    Some(out)
}

/// f16 bytes into `dst` through `half`'s slice conversion (F16C where the CPU has it).
fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
    const STAGE: usize = 1024;
    let mut halves = [f16::ZERO; STAGE];
    for (d, s) in dst.chunks_mut(STAGE).zip(src.chunks(2 * STAGE)) {
        let staged = &mut halves[..d.len()];
        for (h, b) in staged.iter_mut().zip(s.chunks_exact(2)) {
            *h = f16::from_le_bytes([b[0], b[1]]);
        }
        staged.convert_to_f32_slice(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact_for_every_stored_dtype_across_chunks() {
        let n = WIDEN_CHUNK + 1500; // a partial last chunk and a partial f16 stage
        let values: Vec<f32> = (0..n).map(|i| (i as f32 - 3000.0) * 0.125).collect();
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        let bf16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(widen_to_f32(Dtype::F32, &f32_bytes), Some(values.clone()));
        let want_f16: Vec<f32> = values.iter().map(|v| f16::from_f32(*v).to_f32()).collect();
        assert_eq!(widen_to_f32(Dtype::F16, &f16_bytes), Some(want_f16));
        let want_bf16: Vec<f32> = values.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
        assert_eq!(widen_to_f32(Dtype::BF16, &bf16_bytes), Some(want_bf16));
        assert_eq!(widen_to_f32(Dtype::I64, &f32_bytes), None);
    }
}

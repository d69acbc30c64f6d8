//! One memory-mapped safetensors file: header parsed once, tensors converted to f32 on demand.
//! Once a tensor is converted its pages are handed back (the copy is what the model keeps), so
//! the process never holds a tensor twice: the file stays in the page cache, not in our RSS.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
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
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::TensorDtype {
                    path: self.path.clone(),
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
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

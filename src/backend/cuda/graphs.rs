//! CUDA graphs behind `CudaBackend::run_recorded`: the ops of one UNet evaluation are captured once per
//! input shapes and replayed every later step, so a step costs the host one graph launch and two
//! copies instead of ~1000 kernel launches, allocations and cuBLAS calls.
//!
//! For each (recording, input shapes): the first call runs eagerly (it warms up lazily loaded kernels and
//! cuBLAS), the second copies its inputs into buffers the cache owns, captures `f` on those
//! (`CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`; allocations become graph memory nodes at fixed
//! addresses), instantiates with auto-free-on-launch and launches; later calls copy the new input
//! values into those buffers, launch the graph, and copy the output out (the next launch reuses
//! its memory). Any capture failure logs a warning, marks the recording as refused, and runs
//! eagerly, so switching graphs on can cost speed but never a result.

use std::mem::ManuallyDrop;
use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

use super::backend::{CudaBackend, CudaTensor};
use super::kernels::driver_error;
use super::RecordingId;
use crate::backend::RecordedFn;
use crate::{Error, Result};

/// Recordings kept at once (each holds the peak activation memory of one evaluation); the least
/// recently used is dropped first.
const MAX_RECORDINGS: usize = 4;

/// What the cache knows about the recordings of one backend.
#[derive(Default)]
pub(super) struct GraphCache {
    /// Most recently used last.
    recordings: Vec<Recording>,
    /// (recording, shapes) run once eagerly: the next call records.
    seen: Vec<(RecordingId, Vec<Vec<usize>>)>,
    /// Recordings whose capture failed: always eager.
    refused: Vec<RecordingId>,
    /// Graph launches so far (tests check that replays happened).
    pub(super) replays: usize,
}

/// One captured evaluation. Fields drop in order: the output's graph memory is freed before
/// the graph that owns it is destroyed.
struct Recording {
    key: RecordingId,
    shapes: Vec<Vec<usize>>,
    /// The buffers the graph reads its inputs from (owned by the cache alone).
    inputs: Vec<CudaTensor>,
    /// The graph's output (graph memory at a fixed address, rewritten by each launch).
    output: CudaTensor,
    graph: SendGraph,
}

/// A `CudaGraph` that may move between threads.
struct SendGraph(CudaGraph);

// SAFETY: a CUDA graph and its executable may be used from any thread as long as calls on one
// graph are serialised; every use goes through the backend's `Mutex<GraphCache>`.
unsafe impl Send for SendGraph {}

/// `run_recorded` for the CUDA backend (see the module comment).
pub(super) fn run_recorded(
    be: &CudaBackend,
    key: RecordingId,
    inputs: &[&CudaTensor],
    f: &RecordedFn<'_, CudaTensor>,
) -> Result<CudaTensor> {
    let eager = || f(&inputs.iter().map(|&t| t.clone()).collect::<Vec<_>>());
    if be.debug_checks() {
        return eager();
    }
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape.clone()).collect();
    let mut cache = be
        .graph_cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if cache.refused.contains(&key) {
        drop(cache);
        return eager();
    }
    if let Some(i) = cache
        .recordings
        .iter()
        .position(|r| r.key == key && r.shapes == shapes)
    {
        let mut rec = cache.recordings.remove(i);
        let out = replay(be, &mut rec, inputs);
        cache.recordings.push(rec);
        cache.replays += 1;
        return out;
    }
    let id = (key, shapes.clone());
    if !cache.seen.contains(&id) {
        cache.seen.push(id);
        drop(cache);
        return eager();
    }
    match record(be, key, shapes, inputs, f)? {
        Ok((rec, out)) => {
            if cache.recordings.len() >= MAX_RECORDINGS {
                cache.recordings.remove(0);
            }
            cache.recordings.push(rec);
            cache.replays += 1;
            Ok(out)
        }
        Err(why) => {
            tracing::warn!("{key}: CUDA graph capture failed ({why}); running it op by op");
            cache.refused.push(key);
            drop(cache);
            eager()
        }
    }
}

/// Copies `inputs` into the recording's buffers, launches its graph, and copies the output out.
fn replay(be: &CudaBackend, rec: &mut Recording, inputs: &[&CudaTensor]) -> Result<CudaTensor> {
    for (slot, x) in rec.inputs.iter_mut().zip(inputs) {
        let dst = Arc::get_mut(&mut slot.data).ok_or_else(|| {
            Error::Backend("a recorded graph's input buffer is shared (internal error)".into())
        })?;
        be.stream
            .memcpy_dtod(x.data.as_ref(), dst)
            .map_err(driver_error("copying a graph input"))?;
    }
    rec.graph
        .0
        .launch()
        .map_err(driver_error("launching a CUDA graph"))?;
    be.copy(&rec.output)
}

/// Captures `f` on fresh copies of `inputs` and launches the graph once. `Ok(Err(why))` when the
/// capture itself failed (the caller falls back to eager runs); `Err` for errors outside it.
fn record(
    be: &CudaBackend,
    key: RecordingId,
    shapes: Vec<Vec<usize>>,
    inputs: &[&CudaTensor],
    f: &RecordedFn<'_, CudaTensor>,
) -> Result<std::result::Result<(Recording, CudaTensor), String>> {
    let slots = inputs
        .iter()
        .map(|&x| be.copy(x))
        .collect::<Result<Vec<_>>>()?;
    be.stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(driver_error("beginning a CUDA graph capture"))?;
    let captured = f(&slots);
    let graph = be
        .stream
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    let (output, graph) = match (captured, graph) {
        (Ok(output), Ok(Some(graph))) => (output, SendGraph(graph)),
        (captured, graph) => {
            let why = match (&captured, &graph) {
                (Err(e), _) => format!("an op failed while capturing: {e}"),
                (_, Err(e)) => format!("ending the capture: {e}"),
                _ => "the capture recorded no graph".to_string(),
            };
            // The output (if any) is graph memory of a graph that does not exist: never free it.
            if let Ok(output) = captured {
                let _ = ManuallyDrop::new(output);
            }
            // Frees issued inside the failed capture recorded errors on the context; clear them
            // so the next op does not report them.
            let _ = be.ctx.check_err();
            return Ok(Err(why));
        }
    };
    // The capture ran nothing: this launch computes the first output.
    graph
        .0
        .launch()
        .map_err(driver_error("launching a CUDA graph"))?;
    let out = be.copy(&output)?;
    tracing::debug!("{key}: recorded a CUDA graph for input shapes {shapes:?}");
    Ok(Ok((
        Recording {
            key,
            shapes,
            inputs: slots,
            output,
            graph,
        },
        out,
    )))
}

//! [`CudaBackend`]: device selection, the stream, the cuBLAS handle, the loaded kernels, tensor
//! allocation, and the `Compute` impl that hands each checked op to its family's wrapper.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::f16;

use super::graphs::{self, GraphCache};
use super::kernels::{driver_error, Kernels};
use super::RecordingId;
use super::{attention, conv, elementwise, linear, norm, transfer};
use crate::backend::selftest::{CaseResult, Role};
use crate::backend::{contract, Compute, RecordedFn, Tensor};
use crate::tensor::HostTensor;
use crate::{Error, Result};

/// An f16 tensor in device memory, row-major. Clones share the storage.
#[derive(Clone)]
pub struct CudaTensor {
    pub(super) shape: Vec<usize>,
    pub(super) data: Arc<CudaSlice<f16>>,
}

impl CudaTensor {
    pub(super) fn new(shape: Vec<usize>, data: CudaSlice<f16>) -> Self {
        CudaTensor {
            shape,
            data: Arc::new(data),
        }
    }

    /// Number of elements (the shape was checked when the tensor was made). An empty tensor
    /// holds a one-element buffer (nothing allocates 0 bytes), so this is the shape's product.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl Tensor for CudaTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

impl fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaTensor(f16 {:?})", self.shape)
    }
}

/// The number of CUDA devices, or why there are none usable. Probes the driver library first, so
/// it never panics on a machine without one.
pub(super) fn device_count() -> Result<usize> {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library by its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Backend(
            "no CUDA driver: libcuda.so could not be loaded".into(),
        ));
    }
    let n = CudaContext::device_count().map_err(driver_error("cuInit / device count"))?;
    Ok(n.max(0) as usize)
}

/// The CUDA backend: one device, one stream, f16 tensors. `Send + Sync`; ops issued from several
/// threads are serialised on the one stream in the order they arrive.
pub struct CudaBackend {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
    /// cuBLASLt for linear layers with a bias (the bias epilogue); `None` when it did not start.
    pub(super) blas_lt: Option<CudaBlasLT>,
    /// How many linear layers fell back from the bias epilogue to GemmEx + the bias kernel.
    bias_epilogue_fallbacks: AtomicUsize,
    pub(super) kernels: Kernels,
    debug_checks: AtomicBool,
    pub(super) graph_cache: Mutex<GraphCache>,
    capability: (i32, i32),
    /// Convolutions use `conv2d_implicit_gemm_sm90` (see `hopper_conv_active`).
    hopper_conv: AtomicBool,
    /// Head-dim-64 attention uses `flash_attention_d64_sm90` (see `hopper_attention_active`).
    hopper_attention: AtomicBool,
    /// The wgmma kernels' start-up checks, as rows of the self-test's report.
    start_up_checks: Vec<CaseResult>,
    description: String,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

impl CudaBackend {
    /// Opens device `ordinal`. Errors (never panics) when the driver is missing, the device does
    /// not exist, its compute capability is below 8.0, the kernels do not load, or cuBLAS is
    /// missing (`libcublas.so.13` must be on the loader path).
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        let (ctx, (major, minor)) = open_context(ordinal)?;
        let stream = ctx
            .new_stream()
            .map_err(driver_error("creating a stream"))?;
        if ctx.has_async_alloc() {
            keep_freed_memory(&ctx)?;
        }
        let kernels = Kernels::load(&ctx, (major, minor))?;
        let (blas, blas_lt) = start_blas(&stream)?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let mem = ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
        let description =
            format!("cuda:{ordinal} {name} (sm_{major}{minor}, {mem:.0} GiB, f16 storage)");
        let mut backend = CudaBackend {
            ctx,
            stream,
            blas,
            blas_lt,
            bias_epilogue_fallbacks: AtomicUsize::new(0),
            kernels,
            debug_checks: AtomicBool::new(false),
            graph_cache: Mutex::new(GraphCache::default()),
            capability: (major, minor),
            hopper_conv: AtomicBool::new(false),
            hopper_attention: AtomicBool::new(false),
            start_up_checks: Vec::new(),
            description,
        };
        backend.enable_checked_hopper_kernels(ordinal)?;
        Ok(backend)
    }

    /// Switches on each wgmma kernel (sm_90a) that matches its portable kernel here
    /// (SD21_WGMMA=0 skips them, e.g. should a check ever fault the GPU context) and names the
    /// active ones in the description. A check that breaks the context is an error.
    fn enable_checked_hopper_kernels(&mut self, ordinal: usize) -> Result<()> {
        type Check = fn(&CudaBackend) -> Result<f64>;
        let hopper: [(&str, &'static str, &str, Check); 2] = [
            (
                conv::HOPPER_KERNEL,
                "conv2d wgmma",
                conv::HOPPER_CHECK_SHAPES,
                conv::hopper_self_check,
            ),
            (
                attention::HOPPER_KERNEL,
                "attention wgmma",
                attention::HOPPER_CHECK_SHAPES,
                attention::hopper_self_check,
            ),
        ];
        let mut checks = Vec::new();
        for (kernel, what, shapes, check) in hopper {
            if !self.kernels.has(kernel) || crate::env::flag("SD21_WGMMA") == Some(false) {
                continue;
            }
            let started = std::time::Instant::now();
            let outcome = check(self);
            let row = CaseResult {
                op: what,
                role: Role::KernelChoice,
                shape: format!("{shapes} vs mma.sync"),
                error: outcome.as_ref().ok().copied(),
                failure: outcome.as_ref().err().map(|e| e.to_string()),
                seconds: started.elapsed().as_secs_f64(),
            };
            if let Err(e) = &outcome {
                // A kernel fault is sticky: the context is unusable, say what caused it.
                self.stream.synchronize().map_err(|sync| {
                    Error::Backend(format!(
                        "cuda:{ordinal}: the start-up check of the {what} kernel broke the GPU \
                         context ({e}; {sync}); set SD21_WGMMA=0 to skip the wgmma kernels"
                    ))
                })?;
                tracing::warn!(
                    "{}: the {what} kernel failed its start-up check ({e}); using the mma.sync \
                     kernel",
                    self.description
                );
            }
            checks.push(row);
        }
        self.hopper_conv.store(
            checks.iter().any(|c| c.op == "conv2d wgmma" && c.passed()),
            Ordering::Relaxed,
        );
        self.hopper_attention.store(
            checks
                .iter()
                .any(|c| c.op == "attention wgmma" && c.passed()),
            Ordering::Relaxed,
        );
        let active: Vec<&str> = checks.iter().filter(|c| c.passed()).map(|c| c.op).collect();
        if !active.is_empty() {
            self.description
                .push_str(&format!(", {}", active.join(" + ")));
        }
        self.start_up_checks = checks;
        Ok(())
    }

    /// The wgmma kernels' start-up checks (empty off Hopper or with SD21_WGMMA=0), for the
    /// self-test's report.
    pub fn start_up_checks(&self) -> Vec<CaseResult> {
        self.start_up_checks.clone()
    }

    /// The device's compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.capability
    }

    /// Whether convolutions run the Hopper (wgmma) kernel: on compute capability 9.0, once it
    /// has matched the portable kernel at start-up.
    pub fn hopper_conv_active(&self) -> bool {
        self.hopper_conv.load(Ordering::Relaxed)
    }

    /// Switches the Hopper convolution off, or on where its kernel is loaded (even if it failed
    /// its start-up check); tests use it to run either kernel on a Hopper GPU.
    pub fn set_hopper_conv(&self, on: bool) {
        let available = self.kernels.has(conv::HOPPER_KERNEL);
        self.hopper_conv.store(on && available, Ordering::Relaxed);
    }

    /// Whether head-dim-64 attention runs the Hopper (wgmma) flash kernel: on compute
    /// capability 9.0, once it has matched the mma.sync kernel at start-up.
    pub fn hopper_attention_active(&self) -> bool {
        self.hopper_attention.load(Ordering::Relaxed)
    }

    /// As [`CudaBackend::set_hopper_conv`], for the attention kernel.
    pub fn set_hopper_attention(&self, on: bool) {
        let available = self.kernels.has(attention::HOPPER_KERNEL);
        self.hopper_attention
            .store(on && available, Ordering::Relaxed);
    }

    /// Debug mode (tests): every fresh output is filled with NaN before its kernel runs, so an
    /// element a kernel forgets to write shows up, and the stream is synchronised after every
    /// launch, so an asynchronous fault is reported with the name of the kernel that caused it.
    pub fn set_debug_checks(&self, on: bool) {
        self.debug_checks.store(on, Ordering::Relaxed);
    }

    /// `x · weightᵀ + bias` through cuBLASLt's bias epilogue only (no fallback): an error where
    /// cuBLASLt did not start or has no algorithm for the shape. `linear` uses this path when it
    /// can; tests call it to prove the fused path itself works at the model's shapes.
    pub fn linear_bias_epilogue(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: &CudaTensor,
    ) -> Result<CudaTensor> {
        let op = contract::linear(x, weight, Some(bias))?;
        linear::linear_bias_epilogue(self, &op, bias)?.map_err(Error::Backend)
    }

    /// Counts a fallback from the bias epilogue; the first one is logged with its reason.
    pub(super) fn note_bias_epilogue_fallback(&self, why: &str) {
        if self.bias_epilogue_fallbacks.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "{}: cuBLASLt bias epilogue unavailable ({why}); using GemmEx + the bias kernel \
                 where it is",
                self.description
            );
        }
    }

    /// How many times a recorded CUDA graph was launched (tests check that replays happened).
    pub fn graph_replays(&self) -> usize {
        self.graph_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .replays
    }

    pub(super) fn debug_checks(&self) -> bool {
        self.debug_checks.load(Ordering::Relaxed)
    }

    /// A fresh f16 buffer of `n` elements for the output of `op` (NaN-filled in debug mode).
    pub(super) fn alloc_f16(&self, op: &'static str, n: usize) -> Result<CudaSlice<f16>> {
        let n = tensor_buffer_len(n);
        // SAFETY: the memory is uninitialised; every caller launches a kernel that writes all `n`
        // elements before the tensor is handed out (debug mode checks this by poisoning first),
        // or the tensor is empty and its one element is never read.
        let mut out = unsafe { self.stream.alloc::<f16>(n) }.map_err(alloc_error(op, n * 2))?;
        if self.debug_checks() {
            elementwise::fill_u16(self, &mut out, 0xFFFF)?;
        }
        Ok(out)
    }

    /// A scratch f32 buffer (never handed out; written by the kernel that needs it). Asking for
    /// none is a bug (callers size scratch only for work that exists).
    pub(super) fn alloc_f32(&self, op: &'static str, n: usize) -> Result<CudaSlice<f32>> {
        let n = scratch_len(op, n)?;
        // SAFETY: scratch space; the caller's first kernel writes every element it later reads.
        unsafe { self.stream.alloc::<f32>(n) }.map_err(alloc_error(op, n * 4))
    }

    /// After each op (its temporaries freed): in debug mode, synchronise so that an error parked
    /// by the op, its kernels or its frees names the op, not a later one.
    fn op_done(&self, op: &'static str, out: Result<CudaTensor>) -> Result<CudaTensor> {
        let out = out?;
        if self.debug_checks() {
            self.stream.synchronize().map_err(|e| {
                Error::Backend(format!("{op}: the device reported an error after it: {e}"))
            })?;
        }
        Ok(out)
    }

    /// After each launch: in debug mode, synchronise so that a fault names its kernel.
    pub(super) fn after_launch(&self, kernel: &'static str) -> Result<()> {
        if self.debug_checks() {
            self.stream
                .synchronize()
                .map_err(|e| Error::Backend(format!("kernel {kernel} failed: {e}")))?;
        }
        Ok(())
    }
}

/// A context on device `ordinal` with its compute capability (8.0 or newer), event tracking
/// off.
fn open_context(ordinal: usize) -> Result<(Arc<CudaContext>, (i32, i32))> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(Error::Backend(format!(
            "cuda:{ordinal}: no such device ({count} CUDA device(s) visible)"
        )));
    }
    let ctx = CudaContext::new(ordinal).map_err(driver_error("creating the context"))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(driver_error("reading the compute capability"))?;
    if major < 8 {
        return Err(Error::Backend(format!(
            "cuda:{ordinal}: compute capability {major}.{minor}; the kernels need 8.0 or newer \
             (mma.sync, cp.async)"
        )));
    }
    // SAFETY: every tensor of this backend is used on the single stream the backend creates
    // next, so cudarc's cross-stream event tracking is not needed (and would add an event record
    // and wait to every launch). It is switched off before the first allocation.
    unsafe { ctx.disable_event_tracking() };
    Ok((ctx, (major, minor)))
}

/// cuBLAS on `stream` (an error when its library is missing), and cuBLASLt where it starts.
fn start_blas(stream: &Arc<CudaStream>) -> Result<(CudaBlas, Option<CudaBlasLT>)> {
    // SAFETY: only tries to dlopen cuBLAS by its usual names.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(Error::Backend(
            "cuBLAS not found: libcublas.so.13 (and libcublasLt.so.13) must be on the loader \
             path (LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    let blas = CudaBlas::new(stream.clone())
        .map_err(|e| Error::Backend(format!("creating the cuBLAS handle: {e}")))?;
    Ok((blas, start_blas_lt(stream)))
}

/// cuBLASLt on `stream`, or `None` (logged) when its library is missing or it fails to start:
/// linear layers then use GemmEx and the bias kernel. cudarc's constructor unwraps the allocation
/// of its workspace (32 MiB on Hopper), so a panic there is caught and treated the same way.
fn start_blas_lt(stream: &Arc<CudaStream>) -> Option<CudaBlasLT> {
    // SAFETY: only tries to dlopen cuBLASLt by its usual names.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        tracing::warn!(
            "libcublasLt.so.13 not found: linear layers add their bias in a separate pass"
        );
        return None;
    }
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        CudaBlasLT::new(stream.clone())
    }));
    match started {
        Ok(Ok(lt)) => Some(lt),
        Ok(Err(e)) => {
            tracing::warn!("cuBLASLt did not start ({e}): linear layers add their bias separately");
            None
        }
        Err(_) => {
            tracing::warn!(
                "cuBLASLt's workspace could not be allocated: linear layers add their bias separately"
            );
            None
        }
    }
}

/// Every op allocates its output with `cuMemAllocAsync` from the device's default memory pool,
/// whose release threshold is 0: at each synchronisation it hands freed memory back to the driver
/// and the next step allocates it again. A threshold of "never" keeps freed blocks for reuse
/// (what PyTorch's caching allocator does); the pool still shrinks when another allocation in the
/// process needs the memory.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(driver_error("reading the default memory pool"))?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: CU_MEMPOOL_ATTR_RELEASE_THRESHOLD takes a pointer to a cuuint64_t, which
    // `threshold` is for the duration of the call.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .map_err(driver_error("setting the memory pool's release threshold"))
}

/// Elements to allocate for a tensor of `n`: never 0. An empty tensor holds one unused element:
/// a 0-byte cuMemAllocAsync is undocumented, and a failed free of one would park an error that
/// a later, unrelated op reports.
fn tensor_buffer_len(n: usize) -> usize {
    n.max(1)
}

/// Elements to allocate for `n` elements of scratch: asking for none is a bug (callers size
/// scratch only for work that exists).
fn scratch_len(op: &'static str, n: usize) -> Result<usize> {
    if n == 0 {
        return Err(Error::shape(
            op,
            "a zero-length scratch buffer was asked for",
        ));
    }
    Ok(n)
}

fn alloc_error(
    op: &'static str,
    bytes: usize,
) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    move |e| {
        Error::Backend(format!(
            "{op}: allocating {:.1} MiB of device memory failed: {e}",
            bytes as f64 / (1 << 20) as f64
        ))
    }
}

impl CudaBackend {
    /// A device-to-device copy (`cuMemcpyDtoDAsync`); `sd21-bench` measures the bandwidth
    /// ceiling with it.
    pub fn copy(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let mut out = self.alloc_f16("copy", x.numel())?;
        if x.numel() > 0 {
            self.stream
                .memcpy_dtod(x.data.as_ref(), &mut out)
                .map_err(driver_error("copying on the device"))?;
        }
        Ok(CudaTensor::new(x.shape.clone(), out))
    }

    /// Waits for all work queued on the backend's stream (benchmarks call it before reading the
    /// clock).
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(driver_error("synchronising the stream"))
    }

    /// `f(inputs)`, recorded once per `recording` and input shapes as a CUDA graph and replayed on
    /// later calls with new input values (see `graphs.rs`); eager in debug mode.
    /// `f` must be a pure function of its inputs' values and of tensors that outlive the recording
    /// (the weights), issuing only device ops: no upload, download or synchronisation.
    pub fn run_recorded(
        &self,
        recording: RecordingId,
        inputs: &[&CudaTensor],
        f: &RecordedFn<'_, CudaTensor>,
    ) -> Result<CudaTensor> {
        graphs::run_recorded(self, recording, inputs, f)
    }
}

impl Compute for CudaBackend {
    type Tensor = CudaTensor;

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn available_memory(&self) -> Option<u64> {
        let (free, _total) = self.ctx.mem_get_info().ok()?;
        u64::try_from(free).ok()
    }

    fn upload(&self, host: &HostTensor) -> Result<CudaTensor> {
        self.op_done("upload", transfer::upload(self, host))
    }

    fn download(&self, t: &CudaTensor) -> Result<HostTensor> {
        transfer::download(self, t)
    }

    fn view(&self, t: &CudaTensor, shape: Vec<usize>) -> CudaTensor {
        CudaTensor {
            shape,
            data: Arc::clone(&t.data),
        }
    }

    fn linear(&self, op: contract::Linear<'_, CudaTensor>) -> Result<CudaTensor> {
        self.op_done("linear", linear::linear(self, op))
    }

    fn conv2d(&self, op: contract::Conv2d<'_, CudaTensor>) -> Result<CudaTensor> {
        self.op_done("conv2d", conv::conv2d(self, op))
    }

    fn group_norm(&self, op: contract::GroupNorm<'_, CudaTensor>) -> Result<CudaTensor> {
        self.op_done("group_norm", norm::group_norm(self, op))
    }

    fn layer_norm(&self, op: contract::LayerNorm<'_, CudaTensor>) -> Result<CudaTensor> {
        self.op_done("layer_norm", norm::layer_norm(self, op))
    }

    fn attention(&self, op: contract::Attention<'_, CudaTensor>) -> Result<CudaTensor> {
        self.op_done("attention", attention::attention(self, op))
    }

    fn geglu(&self, op: contract::Geglu<'_, CudaTensor>) -> Result<CudaTensor> {
        self.op_done("geglu", elementwise::geglu(self, op))
    }

    fn gelu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.op_done("gelu", elementwise::unary(self, "gelu_f16", x))
    }

    fn silu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.op_done("silu", elementwise::unary(self, "silu_f16", x))
    }

    fn add(&self, op: contract::Add<'_, CudaTensor>) -> Result<CudaTensor> {
        self.op_done("add", elementwise::add(self, op))
    }

    fn add_per_channel(&self, op: contract::AddPerChannel<'_, CudaTensor>) -> Result<CudaTensor> {
        self.op_done("add_per_channel", elementwise::add_per_channel(self, op))
    }

    fn upsample_nearest(
        &self,
        op: contract::UpsampleNearest<'_, CudaTensor>,
    ) -> Result<CudaTensor> {
        self.op_done("upsample_nearest", elementwise::upsample_nearest(self, op))
    }

    fn pad(&self, op: contract::Pad<'_, CudaTensor>) -> Result<CudaTensor> {
        self.op_done("pad", elementwise::pad(self, op))
    }

    fn concat_channels(&self, op: contract::ConcatChannels<'_, CudaTensor>) -> Result<CudaTensor> {
        self.op_done("concat_channels", elementwise::concat_channels(self, op))
    }

    fn embedding(&self, op: contract::Embedding<'_, CudaTensor>) -> Result<CudaTensor> {
        self.op_done("embedding", elementwise::embedding(self, op))
    }
}

#[cfg(test)]
mod tests {
    use super::{scratch_len, tensor_buffer_len};

    #[test]
    fn nothing_allocates_zero_bytes() {
        assert_eq!(tensor_buffer_len(0), 1, "an empty tensor holds one element");
        assert_eq!(tensor_buffer_len(7), 7);
        let err = scratch_len("conv2d", 0).unwrap_err();
        assert_eq!(err.fault(), crate::error::Fault::Bug, "{err}");
        assert!(err.to_string().contains("conv2d"), "{err}");
        assert_eq!(scratch_len("conv2d", 3).ok(), Some(3));
    }
}

//! Every CUDA op against the CPU backend (the numerical reference), at SD 2.1 shapes and awkward
//! ones, plus the tiny fixture pipeline end to end on CUDA vs CPU. On a Hopper GPU the wgmma
//! convolution and attention (the shared backend's default there) and the portable mma.sync
//! kernels (on a second backend) both run, and the wgmma kernels must have passed their start-up
//! checks; the UNet replayed as a CUDA graph must equal it run op by op.
//!
//! - Inputs: fresh random values from a seeded xorshift PRNG (never zeros), rounded to f16 so
//!   both backends see exactly the same numbers and only the computation is compared.
//! - Outputs: the CUDA backend runs in debug mode (`set_debug_checks`): every fresh output is
//!   filled with NaN before its kernel runs and the stream is synchronised after every launch,
//!   so an element a kernel forgets to write, or an asynchronous fault, fails the test.
//! - Tolerance: relative L2 error ‖gpu − cpu‖ / ‖cpu‖ ≤ 2e-3 (f16 storage, f32 accumulation),
//!   every value finite. Each comparison prints `check <name>: rel_l2=… max_abs=…`.
//! - Without a GPU each test prints "skipped: no CUDA device" and returns; a build without kernels
//!   compiles none of them (tests/cuda_skipped.rs says why). `SD21_EXPECT_GPU=1` (set by
//!   scripts/gpu-check.sh) turns either into a failure.
//! - Fixtures are found through `SD21_REPO_ROOT`, then the crate directory, then the current
//!   directory, so the prebuilt test binary also runs from a copy of the repository elsewhere.

// A build without kernels has no CUDA backend to test: tests/cuda_skipped.rs says so.
#![cfg(sd21_kernels)]

use std::path::PathBuf;
use std::sync::OnceLock;

use sd21::backend::cpu::CpuBackend;
use sd21::backend::cuda::{cuda_available, CudaBackend};
use sd21::backend::{selftest, Activation, Backend, Mask, Tensor};
use sd21::pipeline::{cuda_graphs, GenerationRequest, Pipeline};
use sd21::random::SeededRng;
use sd21::sampling::SchedulerKind;
use sd21::tensor::HostTensor;
use sd21::weights::ModelFiles;

const TOLERANCE: f64 = 2e-3;

// ------------------------------------------------------------------ harness

/// The shared CUDA backend in debug mode, or `None` when there is no usable device.
fn gpu() -> Option<&'static CudaBackend> {
    static GPU: OnceLock<Option<CudaBackend>> = OnceLock::new();
    GPU.get_or_init(|| {
        if !cuda_available() {
            return None;
        }
        let be = CudaBackend::new(0).unwrap_or_else(|e| {
            panic!("a CUDA device is visible but the backend failed to start: {e}")
        });
        be.set_debug_checks(true);
        println!("cuda backend: {}", be.describe());
        Some(be)
    })
    .as_ref()
}

/// Why there is no device, for the skip message.
fn no_gpu_reason() -> String {
    match CudaBackend::new(0) {
        Err(e) => e.to_string(),
        Ok(_) => "unknown".into(),
    }
}

fn skip() {
    let reason = no_gpu_reason();
    if std::env::var("SD21_EXPECT_GPU").is_ok_and(|v| v == "1") {
        panic!("SD21_EXPECT_GPU=1 but there is no usable CUDA device: {reason}");
    }
    println!("skipped: no CUDA device ({reason})");
}

macro_rules! gpu_or_skip {
    () => {
        match gpu() {
            Some(g) => g,
            None => {
                skip();
                return;
            }
        }
    };
}

/// Runs `$body` on the CPU backend and on `$gpu` with the same host inputs, then compares.
/// `compare!(name, gpu, [x = host_x, w = host_w], |be| be.op(&x, &w))`: each `x` is uploaded
/// to the backend `be` before `be.op` runs.
macro_rules! compare {
    ($what:expr, $gpu:expr, [$($t:ident = $h:expr),* $(,)?], |$be:ident| $body:expr) => {{
        let what: String = $what.into();
        let cpu = CpuBackend::new();
        let want = {
            let $be = &cpu;
            $(let $t = $be.upload(&$h).expect("cpu upload");)*
            let out = ($body).unwrap_or_else(|e| panic!("{what}: cpu op failed: {e}"));
            $be.download(&out).expect("cpu download")
        };
        let got = {
            let $be = $gpu;
            $(let $t = $be.upload(&$h).expect("cuda upload");)*
            let out = ($body).unwrap_or_else(|e| panic!("{what}: cuda op failed: {e}"));
            $be.download(&out).unwrap_or_else(|e| panic!("{what}: cuda download failed: {e}"))
        };
        check(&what, &got, &want);
    }};
}

/// Relative L2 error within [`TOLERANCE`], all values finite, same shape.
#[track_caller]
fn check(what: &str, got: &HostTensor, want: &HostTensor) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let (mut err2, mut ref2, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.data.iter().zip(&want.data).enumerate() {
        assert!(
            g.is_finite(),
            "{what}: non-finite CUDA output {g} at index {i}"
        );
        assert!(
            w.is_finite(),
            "{what}: non-finite CPU output {w} at index {i}"
        );
        let d = (g - w) as f64;
        err2 += d * d;
        ref2 += (w as f64) * (w as f64);
        max_abs = max_abs.max(d.abs());
    }
    assert!(
        ref2 > 0.0,
        "{what}: the reference is all zeros; the test proves nothing"
    );
    let rel = (err2 / ref2).sqrt();
    println!("check {what}: rel_l2={rel:.3e} max_abs={max_abs:.3e}");
    assert!(
        rel <= TOLERANCE,
        "{what}: relative L2 error {rel:.3e} > {TOLERANCE:e} (max |diff| {max_abs:.3e})"
    );
}

/// The crate's seeded generator, making f16-representable host tensors.
struct Rng(SeededRng);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(SeededRng::new(seed))
    }
    fn uniform(&mut self) -> f32 {
        self.0.uniform()
    }
    /// `offset + scale · U(-1, 1)`, rounded to f16.
    fn tensor_at(&mut self, shape: &[usize], offset: f32, scale: f32) -> HostTensor {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| half::f16::from_f32(offset + scale * self.uniform()).to_f32())
            .collect();
        HostTensor::new(shape.to_vec(), data).unwrap()
    }
    fn tensor(&mut self, shape: &[usize], scale: f32) -> HostTensor {
        self.tensor_at(shape, 0.0, scale)
    }
}

// ------------------------------------------------------------------ basics

/// The start-up self-test on this device, as `Device::open` runs it (not in debug mode) and
/// `sd21 selftest --device cuda` prints it: every op family against the CPU backend.
#[test]
fn the_start_up_self_test_passes_on_this_gpu() {
    if gpu().is_none() {
        skip();
        return;
    }
    let backend = CudaBackend::new(0).expect("a CUDA backend for the self-test");
    let report = selftest::run(&backend).with_kernel_choices(backend.start_up_checks());
    println!("{}", report.table());
    assert!(
        report.passed(),
        "{}",
        report.first_failure().unwrap_or_default()
    );
}

#[test]
fn upload_download_reshape_roundtrip() {
    let g = gpu_or_skip!();
    let mut rng = Rng::new(1);
    for shape in [vec![2, 3, 5], vec![7], vec![1, 9, 8]] {
        let host = rng.tensor(&shape, 3.0);
        let t = g.upload(&host).unwrap();
        assert_eq!(t.shape(), shape.as_slice());
        // f16-representable values survive the round trip exactly.
        assert_eq!(g.download(&t).unwrap(), host, "{shape:?}");
        let flat = g.reshape(&t, &[host.numel()]).unwrap();
        assert_eq!(g.download(&flat).unwrap().data, host.data);
        assert!(g.reshape(&t, &[host.numel() + 1]).is_err());
        let copy = g.copy(&t).unwrap();
        g.synchronize().unwrap();
        assert_eq!(g.download(&copy).unwrap(), host, "copy {shape:?}");
    }
    assert!(g.describe().starts_with("cuda:0"));
}

#[test]
fn shape_errors_are_errors_not_panics() {
    let g = gpu_or_skip!();
    let mut rng = Rng::new(2);
    let a = g.upload(&rng.tensor(&[2, 3, 4], 1.0)).unwrap();
    let b = g.upload(&rng.tensor(&[2, 3, 5], 1.0)).unwrap();
    assert!(g.add(&a, &b).is_err());
    assert!(g
        .concat_channels(&a, &g.reshape(&b, &[3, 2, 5]).unwrap())
        .is_err());
    assert!(
        g.attention(&a, &a, &a, 3, Mask::None).is_err(),
        "4 channels, 3 heads"
    );
    let w = g.upload(&rng.tensor(&[8, 3, 3, 5], 1.0)).unwrap();
    let x = g.upload(&rng.tensor(&[1, 6, 6, 4], 1.0)).unwrap();
    assert!(
        g.conv2d(&x, &w, None, 1, 1, None).is_err(),
        "channel mismatch"
    );
    let table = g.upload(&rng.tensor(&[10, 4], 1.0)).unwrap();
    assert!(g.embedding(&[3, 10], &table).is_err(), "id out of range");
    let gamma = g.upload(&rng.tensor(&[4], 1.0)).unwrap();
    assert!(g
        .group_norm(&a, 3, &gamma, &gamma, 1e-5, Activation::None)
        .is_err());
}

// ------------------------------------------------------------------ linear

#[test]
fn linear_matches_cpu() {
    let g = gpu_or_skip!();
    let mut rng = Rng::new(3);
    // (x shape, N, bias)
    let cases: [(&[usize], usize, bool); 5] = [
        (&[2, 4096, 320], 1280, true), // UNet attention / feed-forward projections
        (&[2, 77, 1024], 1024, true),  // CLIP
        (&[3, 5, 7], 9, true),         // odd everything
        (&[1, 1, 16], 3, false),
        (&[13, 40], 24, false),
    ];
    for (shape, n, with_bias) in cases {
        let k = *shape.last().unwrap();
        let x = rng.tensor(shape, 1.0);
        let w = rng.tensor(&[n, k], 1.0 / (k as f32).sqrt());
        let b = rng.tensor(&[n], 0.5);
        compare!(
            format!("linear {shape:?}→{n} bias={with_bias}"),
            g,
            [x = x, w = w, b = b],
            |be| be.linear(&x, &w, with_bias.then_some(&b))
        );
    }
}

/// The fused path itself (cuBLASLt with the bias epilogue, no fallback) at every linear shape of
/// SD 2.1 (`linear` falls back to GemmEx + the bias kernel only where cuBLASLt has no algorithm).
#[test]
fn linear_bias_epilogue_matches_cpu_at_sd_shapes() {
    let g = gpu_or_skip!();
    let mut rng = Rng::new(31);
    // (x shape, N): attention q/k/v/out and proj_in/out at 64² (320), 32² (640), 16² (1280)
    // and 8² (1280), the feed-forward in (GEGLU, 8·C) and out (4·C → C), the time embedding,
    // the cross-attention k/v from CLIP's 1024, CLIP's own layers, and an odd shape.
    let cases: [(&[usize], usize); 12] = [
        (&[2, 4096, 320], 320),
        (&[2, 4096, 320], 2560),
        (&[2, 4096, 1280], 320),
        (&[2, 1024, 640], 640),
        (&[2, 256, 1280], 10240),
        (&[2, 64, 5120], 1280),
        (&[2, 77, 1024], 640),
        (&[2, 320], 1280),
        (&[2, 1280], 1280),
        (&[2, 77, 1024], 4096),
        (&[2, 77, 4096], 1024),
        (&[3, 5, 8], 24),
    ];
    for (shape, n) in cases {
        let k = *shape.last().unwrap();
        let x = rng.tensor(shape, 1.0);
        let w = rng.tensor(&[n, k], 1.0 / (k as f32).sqrt());
        let b = rng.tensor(&[n], 0.5);
        let what = format!("linear (cuBLASLt bias epilogue) {shape:?}→{n}");
        let cpu = CpuBackend::new();
        let (cx, cw, cb) = (cpu.upload(&x), cpu.upload(&w), cpu.upload(&b));
        let want = cpu.linear(&cx.unwrap(), &cw.unwrap(), Some(&cb.unwrap()));
        let want = cpu.download(&want.unwrap()).unwrap();
        let (gx, gw, gb) = (g.upload(&x), g.upload(&w), g.upload(&b));
        let got = g
            .linear_bias_epilogue(&gx.unwrap(), &gw.unwrap(), &gb.unwrap())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        check(&what, &g.download(&got).unwrap(), &want);
    }
}

// ------------------------------------------------------------------ convolution

#[test]
fn conv3x3_sd_shape_matches_cpu() {
    let g = gpu_or_skip!();
    let mut rng = Rng::new(4);
    let x = rng.tensor(&[2, 64, 64, 320], 1.0);
    let w = rng.tensor(&[320, 3, 3, 320], 1.0 / (9.0f32 * 320.0).sqrt());
    let b = rng.tensor(&[320], 0.5);
    compare!(
        "conv3x3 [2,64,64,320]→320",
        g,
        [x = x, w = w, b = b],
        |be| { be.conv2d(&x, &w, Some(&b), 1, 1, None) }
    );
}

/// The low-resolution UNet convs, whose few output tiles make the implicit GEMM split K over the
/// grid's z axis and reduce (16 and 7 splits on a 132-multiprocessor card), with the residual.
#[test]
fn conv3x3_split_k_sd_shapes_match_cpu() {
    let g = gpu_or_skip!();
    let mut rng = Rng::new(41);
    for side in [8, 16] {
        let x = rng.tensor(&[2, side, side, 1280], 1.0);
        let w = rng.tensor(&[1280, 3, 3, 1280], 1.0 / (9.0f32 * 1280.0).sqrt());
        let b = rng.tensor(&[1280], 0.5);
        let r = rng.tensor(&[2, side, side, 1280], 1.0);
        compare!(
            format!("conv3x3 split-K [2,{side},{side},1280]→1280 +residual"),
            g,
            [x = x, w = w, b = b, r = r],
            |be| { be.conv2d(&x, &w, Some(&b), 1, 1, Some(&r)) }
        );
    }
}

#[test]
fn conv_awkward_shapes_match_cpu() {
    let g = gpu_or_skip!();
    println!(
        "conv kernel: {}",
        if g.hopper_conv_active() {
            "wgmma (sm_90a)"
        } else {
            "mma.sync"
        }
    );
    conv_awkward_shapes(g);
}

/// On a Hopper GPU the shared backend runs the wgmma convolution: here the portable mma.sync
/// kernel runs the same cases on its own backend. Also checks that the wgmma kernel passed its
/// start-up check on compute capability 9.0 (else the backend silently runs the slower kernel).
#[test]
fn conv_portable_kernel_on_hopper_and_wgmma_active() {
    let g = gpu_or_skip!();
    if g.compute_capability() != (9, 0) {
        println!(
            "compute capability {:?}: no wgmma kernel; the portable one ran in \
             conv_awkward_shapes_match_cpu",
            g.compute_capability()
        );
        return;
    }
    assert!(
        g.hopper_conv_active(),
        "compute capability 9.0 but the wgmma convolution is not active: it failed to load or \
         its start-up check (see the warning in the log)"
    );
    let portable = CudaBackend::new(0).expect("a second CUDA backend");
    portable.set_debug_checks(true);
    portable.set_hopper_conv(false);
    assert!(!portable.hopper_conv_active());
    conv_awkward_shapes(&portable);
}

fn conv_awkward_shapes(g: &CudaBackend) {
    let mut rng = Rng::new(5);
    // (x shape, C_out, k, stride, pad, bias, residual)
    type ConvCase = ([usize; 4], usize, usize, usize, usize, bool, bool);
    let cases: [ConvCase; 10] = [
        ([1, 17, 15, 64], 72, 3, 2, 1, true, false), // stride 2, odd input
        ([2, 9, 7, 16], 24, 3, 1, 1, false, true),   // residual only
        ([2, 8, 8, 640], 320, 1, 1, 0, true, true),  // 1×1 shortcut + residual
        ([2, 12, 10, 4], 320, 3, 1, 1, true, false), // conv_in: 4 channels → direct kernel
        ([1, 16, 16, 128], 3, 3, 1, 1, true, false), // VAE conv_out: 3 output channels
        ([2, 5, 5, 12], 7, 3, 1, 1, true, true),     // C_in % 8 ≠ 0, odd C_out
        ([1, 6, 6, 8], 5, 3, 2, 1, true, false),     // stride 2, even input, odd C_out
        ([1, 33, 31, 8], 130, 3, 2, 1, true, false), // C_out just over one 128 tile
        ([1, 32, 32, 320], 640, 3, 2, 1, true, false), // SD downsampler
        ([2, 3, 3, 24], 16, 3, 1, 0, true, true),    // no padding: 1×1 output
    ];
    for (shape, c_out, k, stride, pad, with_bias, with_res) in cases {
        let c_in = shape[3];
        let oh = (shape[1] + 2 * pad - k) / stride + 1;
        let ow = (shape[2] + 2 * pad - k) / stride + 1;
        let x = rng.tensor(&shape, 1.0);
        let w = rng.tensor(&[c_out, k, k, c_in], 1.0 / ((k * k * c_in) as f32).sqrt());
        let b = rng.tensor(&[c_out], 0.5);
        let r = rng.tensor(&[shape[0], oh, ow, c_out], 1.0);
        compare!(
            format!("conv {shape:?}→{c_out} k{k} s{stride} p{pad} bias={with_bias} res={with_res}"),
            g,
            [x = x, w = w, b = b, r = r],
            |be| be.conv2d(
                &x,
                &w,
                with_bias.then_some(&b),
                stride,
                pad,
                with_res.then_some(&r)
            )
        );
    }
}

// ------------------------------------------------------------------ norms

#[test]
fn group_norm_matches_cpu() {
    let g = gpu_or_skip!();
    let mut rng = Rng::new(6);
    // (x shape, groups, activation, mean offset)
    let cases: [(&[usize], usize, Activation, f32); 7] = [
        (&[2, 64, 64, 640], 32, Activation::Silu, 0.0), // SD 2.1 up block
        (&[2, 64, 64, 320], 32, Activation::None, 0.0),
        (&[1, 7, 5, 96], 32, Activation::None, 0.0), // odd spatial
        (&[2, 77, 64], 8, Activation::Silu, 0.0),    // one spatial dim
        (&[2, 4, 4, 2560], 32, Activation::Silu, 0.0), // more than 256 vectors per row
        (&[1, 3, 3, 30], 3, Activation::Silu, 0.0),  // C % 8 ≠ 0
        (&[2, 16, 16, 64], 32, Activation::None, 20.0), // |mean| ≫ std
    ];
    for (shape, groups, activation, offset) in cases {
        let c = *shape.last().unwrap();
        let x = rng.tensor_at(shape, offset, 1.0);
        let gamma = rng.tensor_at(&[c], 1.0, 0.5);
        let beta = rng.tensor(&[c], 0.5);
        compare!(
            format!("group_norm {shape:?}/{groups} {activation:?} offset={offset}"),
            g,
            [x = x, gm = gamma, bt = beta],
            |be| be.group_norm(&x, groups, &gm, &bt, 1e-5, activation)
        );
    }
}

#[test]
fn layer_norm_matches_cpu() {
    let g = gpu_or_skip!();
    let mut rng = Rng::new(7);
    let cases: [(&[usize], f32); 4] = [
        (&[2, 77, 1024], 0.0),
        (&[2, 4096, 320], 0.0),
        (&[3, 5, 40], 0.0),
        (&[1, 1, 7], 10.0),
    ];
    for (shape, offset) in cases {
        let c = *shape.last().unwrap();
        let x = rng.tensor_at(shape, offset, 1.0);
        let gamma = rng.tensor_at(&[c], 1.0, 0.5);
        let beta = rng.tensor(&[c], 0.5);
        compare!(
            format!("layer_norm {shape:?} offset={offset}"),
            g,
            [x = x, gm = gamma, bt = beta],
            |be| be.layer_norm(&x, &gm, &bt, 1e-5)
        );
    }
}

// ------------------------------------------------------------------ attention

/// One attention comparison: q [b, nq, heads·d], k/v [b, nk, heads·d].
fn attention_case(
    g: &CudaBackend,
    rng: &mut Rng,
    (b, nq, nk, heads, d, mask): (usize, usize, usize, usize, usize, Mask),
) {
    // q scaled up so the softmax is peaked, not nearly uniform.
    let q = rng.tensor(&[b, nq, heads * d], 2.0);
    let k = rng.tensor(&[b, nk, heads * d], 1.0);
    let v = rng.tensor(&[b, nk, heads * d], 1.0);
    compare!(
        format!("attention b{b} nq{nq} nk{nk} h{heads} d{d} {mask:?}"),
        g,
        [q = q, k = k, v = v],
        |be| be.attention(&q, &k, &v, heads, mask)
    );
}

#[test]
fn attention_sd_self_attention() {
    let g = gpu_or_skip!();
    attention_case(g, &mut Rng::new(8), (2, 4096, 4096, 5, 64, Mask::None));
}

#[test]
fn attention_sd_cross_attention_77_keys() {
    let g = gpu_or_skip!();
    attention_case(g, &mut Rng::new(9), (2, 4096, 77, 5, 64, Mask::None));
}

#[test]
fn attention_vae_single_head_512() {
    let g = gpu_or_skip!();
    attention_case(g, &mut Rng::new(10), (1, 4096, 4096, 1, 512, Mask::None));
}

#[test]
fn attention_clip_causal() {
    let g = gpu_or_skip!();
    attention_case(g, &mut Rng::new(11), (2, 77, 77, 16, 64, Mask::Causal));
}

#[test]
fn attention_768_model_9216_tokens() {
    let g = gpu_or_skip!();
    attention_case(g, &mut Rng::new(12), (1, 9216, 9216, 5, 64, Mask::None));
}

#[test]
fn attention_awkward_shapes() {
    let g = gpu_or_skip!();
    let mut rng = Rng::new(13);
    // (b, nq, nk, heads, d, mask)
    let cases = [
        (2, 33, 77, 2, 8, Mask::None),   // the tiny model's head dim
        (1, 77, 77, 4, 8, Mask::Causal), // tiny CLIP
        (1, 100, 37, 3, 64, Mask::None), // partial tiles on both sides
        (1, 1, 1, 1, 64, Mask::None),
        (2, 130, 130, 2, 64, Mask::Causal), // causal over three query tiles
        (1, 50, 61, 2, 40, Mask::None),     // generic, 2 dims per lane
        (1, 20, 45, 2, 160, Mask::None),    // generic, 8 dims per lane
        (1, 17, 300, 1, 100, Mask::Causal), // generic, 4 per lane, causal with more keys than queries
        (2, 64, 64, 1, 512, Mask::None),    // VAE-like, batch 2
    ];
    for case in cases {
        attention_case(g, &mut rng, case);
    }
}

/// On a Hopper GPU the shared backend runs head-dim-64 attention on the wgmma kernel: here the
/// mma.sync flash kernel runs the SD shapes and the awkward ones on its own backend. Also checks
/// that the wgmma kernel passed its start-up check on compute capability 9.0.
#[test]
fn attention_mma_sync_kernel_on_hopper_and_wgmma_active() {
    let g = gpu_or_skip!();
    println!(
        "attention kernel (head dim 64): {}",
        if g.hopper_attention_active() {
            "wgmma (sm_90a)"
        } else {
            "mma.sync"
        }
    );
    if g.compute_capability() != (9, 0) {
        println!("not a Hopper GPU: the mma.sync kernel ran in the other attention tests");
        return;
    }
    assert!(
        g.hopper_attention_active(),
        "compute capability 9.0 but the wgmma attention is not active: it failed to load or its \
         start-up check (see the warning in the log)"
    );
    let portable = CudaBackend::new(0).expect("a second CUDA backend");
    portable.set_debug_checks(true);
    portable.set_hopper_attention(false);
    assert!(!portable.hopper_attention_active());
    let mut rng = Rng::new(14);
    for case in [
        (2, 4096, 4096, 5, 64, Mask::None),
        (2, 4096, 77, 5, 64, Mask::None),
        (2, 77, 77, 16, 64, Mask::Causal),
        (1, 100, 37, 3, 64, Mask::None),
        (1, 1, 1, 1, 64, Mask::None),
        (2, 130, 130, 2, 64, Mask::Causal),
    ] {
        attention_case(&portable, &mut rng, case);
    }
}

// ------------------------------------------------------------------ elementwise

#[test]
fn activations_and_add_match_cpu() {
    let g = gpu_or_skip!();
    let mut rng = Rng::new(14);
    for shape in [&[2usize, 64, 64, 320][..], &[3, 5, 7], &[1, 13]] {
        let x = rng.tensor(shape, 4.0);
        let y = rng.tensor(shape, 4.0);
        compare!(format!("gelu {shape:?}"), g, [x = x], |be| be.gelu(&x));
        compare!(format!("silu {shape:?}"), g, [x = x], |be| be.silu(&x));
        compare!(format!("add {shape:?}"), g, [x = x, y = y], |be| be
            .add(&x, &y));
    }
    for (shape, f) in [(&[2usize, 4096][..], 1280usize), (&[3, 7], 9), (&[1], 5)] {
        let mut s = shape.to_vec();
        s.push(2 * f);
        let x = rng.tensor(&s, 3.0);
        compare!(format!("geglu {s:?}"), g, [x = x], |be| be.geglu(&x));
    }
}

#[test]
fn add_per_channel_matches_cpu() {
    let g = gpu_or_skip!();
    let mut rng = Rng::new(15);
    for shape in [
        &[2usize, 64, 64, 320][..],
        &[2, 3, 5, 7],
        &[1, 9, 16],
        &[3, 5],
    ] {
        let (b, c) = (shape[0], *shape.last().unwrap());
        let x = rng.tensor(shape, 1.0);
        let v = rng.tensor(&[b, c], 1.0);
        compare!(
            format!("add_per_channel {shape:?}"),
            g,
            [x = x, v = v],
            |be| be.add_per_channel(&x, &v)
        );
    }
}

#[test]
fn upsample_concat_embedding_match_cpu() {
    {
        let g = gpu_or_skip!();
        let mut rng = Rng::new(31);
        for (shape, padding) in [
            (
                [1, 6, 5, 8],
                sd21::backend::Padding {
                    bottom: 1,
                    right: 1,
                    ..Default::default()
                },
            ),
            (
                [2, 3, 4, 3],
                sd21::backend::Padding {
                    top: 2,
                    bottom: 1,
                    left: 1,
                    right: 0,
                },
            ),
        ] {
            let x = rng.tensor(&shape, 1.0);
            compare!(format!("pad {shape:?} {padding:?}"), g, [x = x], |be| be
                .pad(&x, padding));
        }
    }
    let g = gpu_or_skip!();
    let mut rng = Rng::new(16);
    // (x shape, out_h, out_w)
    let cases: [([usize; 4], usize, usize); 5] = [
        ([2, 32, 32, 320], 64, 64),
        ([1, 17, 15, 8], 34, 30),
        ([2, 5, 5, 3], 9, 9),
        ([1, 6, 7, 3], 4, 3), // downscale
        ([1, 12, 9, 16], 23, 17),
    ];
    for (shape, oh, ow) in cases {
        let x = rng.tensor(&shape, 1.0);
        compare!(
            format!("upsample {shape:?}→{oh}×{ow}"),
            g,
            [x = x],
            |be| be.upsample_nearest(&x, oh, ow)
        );
    }
    for (a, b) in [
        (vec![2usize, 8, 8, 320], vec![2usize, 8, 8, 640]),
        (vec![3, 5], vec![3, 7]),
        (vec![2, 4, 3, 1], vec![2, 4, 3, 9]),
    ] {
        let ha = rng.tensor(&a, 1.0);
        let hb = rng.tensor(&b, 1.0);
        compare!(format!("concat {a:?}+{b:?}"), g, [x = ha, y = hb], |be| be
            .concat_channels(&x, &y));
    }
    for (v, d) in [(1000usize, 64usize), (49, 7), (77, 1024)] {
        let table = rng.tensor(&[v, d], 1.0);
        let ids: Vec<u32> = (0..77)
            .map(|i| ((i * 37 + 5) % v) as u32)
            .chain([0, 0])
            .collect();
        compare!(
            format!("embedding [{v},{d}] × {}", ids.len()),
            g,
            [t = table],
            |be| be.embedding(&ids, &t)
        );
    }
}

// ------------------------------------------------------------------ the tiny pipeline

fn repo_root() -> PathBuf {
    if let Some(root) = std::env::var_os("SD21_REPO_ROOT") {
        return PathBuf::from(root);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built.join("tests/fixtures").is_dir() {
        built
    } else {
        PathBuf::from(".")
    }
}

#[test]
fn tiny_pipeline_cuda_matches_cpu() {
    if gpu().is_none() {
        skip();
        return;
    }
    let dir = repo_root().join("tests/fixtures/tiny-sd21");
    let files = ModelFiles::locate(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let cuda = CudaBackend::new(0).expect("a second CUDA backend");
    cuda.set_debug_checks(true);
    let on_gpu = Pipeline::load(&files, cuda).expect("load the tiny model on CUDA");
    let on_cpu = Pipeline::load(&files, CpuBackend::new()).expect("load the tiny model on CPU");
    for (scheduler, cfg_scale) in [
        (SchedulerKind::Ddim, 7.5),
        (SchedulerKind::EulerAncestral, 1.0),
    ] {
        let request = GenerationRequest {
            prompt: "a photograph of an astronaut riding a horse".into(),
            negative_prompt: "blurry, low quality".into(),
            width: 72,
            height: 56,
            steps: 6,
            cfg_scale,
            seed: 208513106212,
            scheduler,
            number_of_images: 1,
        };
        let gpu_img = &on_gpu
            .generate(&request, &mut |_| true)
            .expect("cuda generate")[0]
            .image;
        let cpu_img = &on_cpu
            .generate(&request, &mut |_| true)
            .expect("cpu generate")[0]
            .image;
        assert_eq!(
            (gpu_img.width, gpu_img.height),
            (cpu_img.width, cpu_img.height)
        );
        let n = gpu_img.pixels.len() as f64;
        let mean = gpu_img
            .pixels
            .iter()
            .zip(&cpu_img.pixels)
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .sum::<f64>()
            / n;
        let max = gpu_img
            .pixels
            .iter()
            .zip(&cpu_img.pixels)
            .map(|(&a, &b)| a.abs_diff(b))
            .max()
            .unwrap_or(0);
        println!("check tiny pipeline {scheduler:?} cfg {cfg_scale}: mean |diff| = {mean:.3}/255, max = {max}/255");
        assert!(
            mean <= 2.0,
            "{scheduler:?}: CUDA image differs from CPU by {mean:.3}/255 on average (limit 2/255)"
        );
    }
}

/// CUDA graphs (`CudaBackend::run_recorded`, through the pipeline's recorder): the first UNet call
/// per input shape runs op by op, the second records a graph and launches it, later ones replay
/// it with new input values. Each must equal the op-by-op result for the same input (the last
/// calls repeat earlier inputs, so a replay that kept stale inputs or outputs fails), the replays
/// must really have happened, and a whole generation with graphs must match one without.
#[test]
fn unet_cuda_graph_replays_match_op_by_op() {
    if gpu().is_none() {
        skip();
        return;
    }
    let dir = repo_root().join("tests/fixtures/tiny-sd21");
    let files = ModelFiles::locate(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    // Not in debug mode: graphs are never recorded in debug mode (it synchronises per launch).
    let cuda = CudaBackend::new(0).expect("a CUDA backend for graphs");
    let pipe = Pipeline::load(&files, cuda).expect("load the tiny model on CUDA");
    let b = pipe.backend();
    let context = pipe
        .encode_prompts(
            "a photograph of an astronaut riding a horse",
            "blurry",
            true,
        )
        .expect("encode");
    let c = pipe.unet().config().in_channels;
    let mut rng = Rng::new(51);
    let samples: Vec<_> = (0..3)
        .map(|_| b.upload(&rng.tensor(&[2, 7, 9, c], 1.0)).unwrap())
        .collect();
    let timesteps = [901.0, 500.0, 21.0];
    let op_by_op: Vec<HostTensor> = samples
        .iter()
        .zip(timesteps)
        .map(|(s, t)| {
            let out = pipe.unet().forward(b, s, t, &context).expect("unet");
            b.download(&out).expect("download")
        })
        .collect();

    let request = GenerationRequest {
        prompt: "a photograph of an astronaut riding a horse".into(),
        negative_prompt: "blurry, low quality".into(),
        width: 72,
        height: 56,
        steps: 5,
        cfg_scale: 7.5,
        seed: 7,
        scheduler: SchedulerKind::Ddim,
        number_of_images: 1,
    };
    let image_op_by_op = pipe.generate(&request, &mut |_| true).expect("generate")[0]
        .image
        .clone();

    let pipe = pipe.with_unet_recorder(cuda_graphs());
    let b = pipe.backend();
    for (i, k) in [0usize, 1, 2, 0, 1].into_iter().enumerate() {
        let out = pipe
            .evaluate_unet(&samples[k], timesteps[k], &context)
            .expect("unet with graphs");
        check(
            &format!("unet call {i} with graphs (input {k}) vs op by op"),
            &b.download(&out).expect("download"),
            &op_by_op[k],
        );
    }
    assert_eq!(
        b.graph_replays(),
        4,
        "call 0 runs op by op, call 1 records and launches, calls 2–4 replay"
    );

    let image_graphs = pipe.generate(&request, &mut |_| true).expect("generate")[0]
        .image
        .clone();
    let mean = image_graphs
        .pixels
        .iter()
        .zip(&image_op_by_op.pixels)
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .sum::<f64>()
        / image_graphs.pixels.len() as f64;
    let max = image_graphs
        .pixels
        .iter()
        .zip(&image_op_by_op.pixels)
        .map(|(&a, &b)| a.abs_diff(b))
        .max()
        .unwrap_or(0);
    println!(
        "check tiny pipeline with graphs vs op by op: mean |diff| = {mean:.3}/255, max = {max}/255"
    );
    assert!(
        mean <= 0.5,
        "a generation with CUDA graphs differs from op by op by {mean:.3}/255 on average"
    );
    assert!(
        b.graph_replays() >= 4 + request.steps - 1,
        "the generation's UNet steps replayed the graph"
    );
}

/// SD 2.x's VAE decoder is known to overflow f16 at high resolution: a full-size 768² decode
/// (SD 2.1's VAE dimensions, random weights scaled like a fresh init) must give finite pixels
/// on the device (the pipeline would otherwise redo it in f32 on the CPU).
#[test]
fn a_full_size_768_vae_decode_is_finite() {
    let Some(g) = gpu() else {
        skip();
        return;
    };
    let config: sd21::config::VaeConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"]
    }))
    .expect("SD 2.1's VAE config");
    let weights = sd21::weights::RandomWeights::new(5);
    let vae = sd21::model::VaeDecoder::load(&sd21::weights::WeightScope::new(&weights, g), &config)
        .expect("load the VAE with random weights");
    let z = g.upload(&Rng::new(8).tensor(&[1, 96, 96, 4], 1.0)).unwrap();
    let image = g.download(&vae.decode(g, &z).expect("decode")).unwrap();
    assert_eq!(image.shape, [1, 768, 768, 3]);
    let bad = image.data.iter().filter(|v| !v.is_finite()).count();
    println!(
        "check vae 768² decode: {bad} non-finite of {}",
        image.data.len()
    );
    assert_eq!(
        bad, 0,
        "non-finite pixels from a full-size VAE decode in f16"
    );
}

/// The tiny model's VAE encoder (its moments) on CUDA against the CPU backend.
#[test]
fn vae_encoder_matches_cpu() {
    let g = gpu_or_skip!();
    let dir = repo_root().join("tests/fixtures/tiny-sd21");
    let files = ModelFiles::locate(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let config: sd21::config::VaeConfig =
        sd21::config::read_json(&files.vae_config).expect("the VAE config");
    let weights = sd21::weights::SafeTensorsFile::open(&files.vae_weights).expect("VAE weights");
    let image = Rng::new(61).tensor(&[1, 32, 40, 3], 1.0);
    compare!("vae encoder moments 32×40", g, [x = image], |be| {
        sd21::model::VaeEncoder::load(&sd21::weights::WeightScope::new(&weights, be), &config)
            .and_then(|encoder| encoder.encode(be, &x))
    });
}

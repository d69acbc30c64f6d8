//! `sd21-bench kernels`: every op at the shapes SD 2.1 runs, next to this machine's memory and
//! matrix ceilings measured in the same run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

use sd21::tensor::HostTensor;

use crate::device::BenchDevice;
use crate::ops::{self, sd21_cases, smoke_cases, time_case, Case};
use crate::roofline::{write_svg, RooflinePoint};
use crate::ShapeSet;

/// The machine's own limits, measured in this run.
struct Ceilings {
    bandwidth_gbs: f64,
    tflops: f64,
}

fn measure_ceilings<B: BenchDevice>(backend: &B, elem: usize) -> Result<Ceilings> {
    // Memory: a 256 MiB device-to-device copy (bytes read + written), best of several.
    let n = (256 << 20) / elem;
    let x = backend.upload(&HostTensor::new(vec![n], vec![1.0; n])?)?;
    backend.copy(&x)?;
    backend.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        let y = backend.copy(&x)?;
        backend.synchronize()?;
        best = best.min(start.elapsed().as_secs_f64());
        drop(y);
    }
    let bandwidth_gbs = 2.0 * (n * elem) as f64 / best / 1e9;
    // Matrix throughput: one large square GEMM through the backend's linear layer.
    let side = if elem == 4 { 2048 } else { 8192 };
    let op = ops::OpCase::Linear {
        rows: side,
        k: side,
        n: side,
    };
    let t = time_case(backend, &op, 5, 1)?;
    Ok(Ceilings {
        bandwidth_gbs,
        tflops: op.flops() / t / 1e12,
    })
}

/// Second kernels the implicit-GEMM convolutions and head-dim-64 attention can run on (the
/// portable mma.sync ones on a Hopper GPU, whose default is wgmma): their label and the switch
/// that selects them.
pub struct Alternative<'a> {
    pub label: &'static str,
    pub switch: &'a dyn Fn(bool),
}

pub fn kernels<B: BenchDevice>(
    backend: &B,
    elem: usize,
    shapes: ShapeSet,
    repeats: usize,
    json_path: Option<PathBuf>,
    svg_path: Option<PathBuf>,
    alternative: Option<Alternative<'_>>,
) -> Result<()> {
    println!("device: {}", backend.describe());
    let ceilings = measure_ceilings(backend, elem)?;
    println!(
        "ceilings: memory {:.1} GB/s (256 MiB copy), matrix {:.3} TFLOP/s ({} GEMM)",
        ceilings.bandwidth_gbs,
        ceilings.tflops,
        if elem == 4 {
            "f32 2048³, the backend's"
        } else {
            "f16 8192³, cuBLAS"
        }
    );
    let cases: Vec<Case> = match shapes {
        ShapeSet::Sd21_512 => sd21_cases(512),
        ShapeSet::Sd21_768 => sd21_cases(768),
        ShapeSet::All => sd21_cases(512).into_iter().chain(sd21_cases(768)).collect(),
        ShapeSet::Smoke => smoke_cases(),
    };
    println!(
        "{:<44} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7}  bound",
        "op", "time ms", "GFLOP", "MB", "TFLOP/s", "GB/s", "% ceil"
    );
    let mut rows = Vec::new();
    let mut points = Vec::new();
    let mut runs: Vec<(String, &ops::OpCase, Option<&Alternative>)> = Vec::new();
    for case in &cases {
        runs.push((case.name.clone(), &case.op, None));
        let has_alternative = match case.op {
            ops::OpCase::Conv { cin, .. } => cin % 8 == 0,
            ops::OpCase::Attention { c, heads, .. } => c == 64 * heads,
            _ => false,
        };
        if let (Some(alt), true) = (&alternative, has_alternative) {
            runs.push((
                format!("{} [{}]", case.name, alt.label),
                &case.op,
                Some(alt),
            ));
        }
    }
    for (name, op, alt) in runs {
        if let Some(alt) = alt {
            (alt.switch)(true);
        }
        let timed = time_case(backend, op, repeats, 3).with_context(|| name.clone());
        if let Some(alt) = alt {
            (alt.switch)(false);
        }
        let t = timed?;
        let case = Case { name, op: *op };
        let (flops, bytes) = (case.op.flops(), case.op.bytes(elem));
        let compute_s = flops / (ceilings.tflops * 1e12);
        let memory_s = bytes / (ceilings.bandwidth_gbs * 1e9);
        let (bound, bound_s) = if compute_s >= memory_s {
            ("compute", compute_s)
        } else {
            ("memory", memory_s)
        };
        let percent = 100.0 * bound_s / t;
        println!(
            "{:<44} {:>10.3} {:>9.3} {:>9.1} {:>9.3} {:>9.1} {:>6.1}%  {bound}",
            case.name,
            t * 1e3,
            flops / 1e9,
            bytes / 1e6,
            flops / t / 1e12,
            bytes / t / 1e9,
            percent
        );
        points.push(RooflinePoint {
            name: case.name.clone(),
            intensity: flops / bytes,
            gflops: flops / t / 1e9,
        });
        rows.push(json!({
            "op": case.name, "time_ms": t * 1e3, "flops": flops, "bytes": bytes,
            "tflops": flops / t / 1e12, "gbs": bytes / t / 1e9, "bound": bound, "percent_of_ceiling": percent,
        }));
    }
    if let Some(path) = svg_path {
        let title = format!("sd21-bench kernels: {}", backend.describe());
        let (bandwidth, peak) = (ceilings.bandwidth_gbs, ceilings.tflops * 1e3);
        write_svg(&path, &title, bandwidth, peak, &points)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = json_path {
        let report = json!({
            "device": backend.describe(),
            "ceilings": { "memory_gbs": ceilings.bandwidth_gbs, "matrix_tflops": ceilings.tflops },
            "ops": rows,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

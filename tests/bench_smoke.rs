//! `sd21-bench` end to end on the CPU: the kernel table on a small shape set (with its JSON) and
//! the pipeline timings of the tiny random model.

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sd21-bench"))
}

/// Fails the test with the command's stderr unless it exited 0.
fn succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn kernels_table_json_and_roofline_cover_every_op() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("kernels.json");
    let svg_path = dir.path().join("roofline.svg");
    let out = bench()
        .args([
            "kernels",
            "--device",
            "cpu",
            "--shapes",
            "smoke",
            "--repeats",
            "2",
            "--json",
        ])
        .arg(&json_path)
        .arg("--svg")
        .arg(&svg_path)
        .output()
        .unwrap();
    succeeded(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ceilings: memory"), "{stdout}");
    let report: serde_json::Value = read_json(&json_path);
    assert!(report["ceilings"]["memory_gbs"].as_f64().unwrap() > 0.0);
    assert!(report["ceilings"]["matrix_tflops"].as_f64().unwrap() > 0.0);
    let ops = report["ops"].as_array().unwrap();
    for name in [
        "conv3x3",
        "groupnorm",
        "attention",
        "linear",
        "layernorm",
        "geglu",
        "upsample",
        "concat",
    ] {
        let row = ops
            .iter()
            .find(|r| r["op"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing from {ops:?}"));
        assert!(row["time_ms"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["percent_of_ceiling"].as_f64().unwrap() > 0.0, "{row}");
        assert!(
            stdout.contains(row["op"].as_str().unwrap()),
            "the table prints {name}"
        );
    }
    // The chart: the roof's legend, and a labelled point for every op that does arithmetic.
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.contains("<svg") && svg.contains("roof:"), "{svg}");
    for row in ops.iter().filter(|r| r["flops"].as_f64().unwrap() > 0.0) {
        let name = row["op"].as_str().unwrap();
        let escaped = name
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        assert!(svg.contains(&escaped), "{name} missing from the chart");
    }
}

#[test]
fn pipeline_times_the_tiny_random_model() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("pipeline.json");
    let out = bench()
        .args([
            "pipeline",
            "--device",
            "cpu",
            "--random",
            "tiny",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--json",
        ])
        .arg(&json_path)
        .output()
        .unwrap();
    succeeded(&out);
    let report: serde_json::Value = read_json(&json_path);
    for key in [
        "text_encode_s",
        "unet_step_s",
        "vae_decode_s",
        "generation_s_per_image",
        "it_per_s",
    ] {
        assert!(
            report["sd21"][key].as_f64().unwrap() > 0.0,
            "{key}: {report}"
        );
    }
    assert_eq!(report["sd21"]["width"], 64);
}

/// `sd21-bench serve` starts a server per --max-batch value (the demo model), drives it with
/// concurrent clients and reports images/s and latency percentiles per configuration.
#[test]
fn serve_load_table_covers_every_max_batch_and_client_count() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("serve.json");
    let out = bench()
        .args([
            "serve",
            "--max-batch",
            "1,2",
            "--clients",
            "1,2",
            "--requests",
            "2",
        ])
        .args([
            "--repeats",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
        ])
        .args(["--sd21", env!("CARGO_BIN_EXE_sd21"), "--json"])
        .arg(&json_path)
        .output()
        .unwrap();
    succeeded(&out);
    let report: serde_json::Value = read_json(&json_path);
    let rows = report["rows"].as_array().unwrap();
    let configs: Vec<(String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["max_batch"].as_str().unwrap().to_string(),
                r["clients"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        configs,
        [
            ("1".into(), 1),
            ("1".into(), 2),
            ("2".into(), 1),
            ("2".into(), 2)
        ]
    );
    for row in rows {
        assert!(
            row["images_per_s"]["median"].as_f64().unwrap() > 0.0,
            "{row}"
        );
        let (p50, p95) = (
            row["p50_s"]["median"].as_f64().unwrap(),
            row["p95_s"]["median"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p95 >= p50, "{row}");
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("images/s"));
}

/// `sd21-bench write-random` writes the very model `--random` builds: `sd21 generate` on the
/// written folder draws what the in-memory random model draws, pixel for pixel.
#[test]
fn the_written_random_model_is_the_in_memory_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let out = bench()
        .args(["write-random", "--random", "tiny", "--out"])
        .arg(&model)
        .output()
        .unwrap();
    succeeded(&out);
    let png = dir.path().join("boat.png");
    let out = Command::new(env!("CARGO_BIN_EXE_sd21"))
        .args([
            "generate", "--prompt", "a boat", "--steps", "3", "--seed", "4",
        ])
        .args(["--device", "cpu", "--model"])
        .arg(&model)
        .arg("--output")
        .arg(&png)
        .output()
        .unwrap();
    succeeded(&out);
    let written = image::open(&png).unwrap().to_rgb8().into_raw();
    let in_memory =
        sd21::demo::random_tiny(sd21::backend::cpu::CpuBackend::new(), "tiny".into()).unwrap();
    let request = sd21::pipeline::GenerationRequest {
        prompt: "a boat".into(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 3,
        cfg_scale: 7.0,
        seed: 4,
        scheduler: in_memory.default_scheduler().unwrap(),
        number_of_images: 1,
    };
    let ours = in_memory.generate(&request, &mut |_| true).unwrap();
    assert_eq!(written, ours[0].image.pixels);
}

/// `sd21-bench e2e` times whole `sd21 generate` processes at 1 and 3 steps and reads their peak
/// RSS (here without the diffusers side: no Python in CI).
#[test]
fn e2e_reports_wall_time_per_step_fixed_cost_and_peak_rss() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("e2e.json");
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd21");
    let out = bench()
        .args([
            "e2e",
            "--python",
            "none",
            "--repeats",
            "2",
            "--width",
            "64",
            "--height",
            "64",
        ])
        .args(["--sd21", env!("CARGO_BIN_EXE_sd21"), "--model"])
        .arg(&model)
        .arg("--json")
        .arg(&json_path)
        .output()
        .unwrap();
    succeeded(&out);
    let report: serde_json::Value = read_json(&json_path);
    let sd21 = &report["sd21"];
    for key in ["wall_3_steps_s", "per_step_s", "fixed_s"] {
        assert!(
            sd21[key]["median"].as_f64().unwrap().is_finite(),
            "{key}: {sd21}"
        );
    }
    let rss = sd21["peak_rss_gb"]["median"].as_f64().unwrap();
    assert!(rss > 0.001 && rss < 20.0, "peak RSS {rss} GB");
    assert!(report["diffusers"].is_null());
    assert!(String::from_utf8_lossy(&out.stdout).contains("peak RSS GB"));
}

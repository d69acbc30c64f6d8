//! The `sd21 generate` and `sd21 selftest` commands end to end (the tiny fixture model for generate).

mod common;

use std::process::Command;

use common::*;

fn sd21() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sd21"))
}

#[test]
fn generate_writes_numbered_pngs_and_image_i_uses_seed_plus_i() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat.png");
    let run = |seed: &str, n: &str, output: &std::path::Path| {
        let status = sd21()
            .args(["generate", "--model"])
            .arg(tiny_model())
            .args([
                "--prompt",
                "a cat",
                "--negative-prompt",
                "blurry",
                "--width",
                "72",
                "--height",
                "56",
            ])
            .args([
                "--steps",
                "3",
                "--cfg-scale",
                "5",
                "--scheduler",
                "euler_a",
                "--seed",
                seed,
            ])
            .args(["--number-of-images", n, "--device", "cpu", "--output"])
            .arg(output)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        String::from_utf8_lossy(&status.stdout).into_owned()
    };
    let stdout = run("208513106212", "2", &out);
    assert!(stdout.contains("seed 208513106213"), "{stdout}");
    let first = std::fs::read(dir.path().join("cat-0.png")).unwrap();
    let second = std::fs::read(dir.path().join("cat-1.png")).unwrap();
    assert!(
        !out.exists(),
        "with two images only the numbered files are written"
    );
    assert_ne!(first, second);

    let single = dir.path().join("single.png");
    run("208513106213", "1", &single);
    assert_eq!(
        std::fs::read(&single).unwrap(),
        second,
        "image 1 equals a single run with seed + 1"
    );

    let text = decode_png(&first).3;
    assert!(text.starts_with("a cat\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 5, Seed: 208513106212, Size: 72x56, Model: tiny-sd21"), "{text}");
}

#[test]
fn defaults_use_the_native_size_and_print_the_random_seed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let result = sd21()
        .args(["generate", "--model"])
        .arg(tiny_model())
        .args(["--prompt", "a dog", "--steps", "2", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("seed "),
        "the random seed is printed: {stderr}"
    );
    let reader = png::Decoder::new(std::io::Cursor::new(std::fs::read(&out).unwrap()))
        .read_info()
        .unwrap();
    assert_eq!(
        (reader.info().width, reader.info().height),
        (64, 64),
        "sample_size 8 × latent factor 8"
    );
    let text = decode_png(&std::fs::read(&out).unwrap()).3;
    assert!(
        text.contains("Sampler: PLMS"),
        "the model's scheduler (PNDM) is the default: {text}"
    );
}

#[test]
fn bad_arguments_fail_with_a_message_not_a_panic() {
    let cases: &[&[&str]] = &[
        &["--scheduler", "nope"],
        &["--width", "70"],
        &["--steps", "0"],
        &["--number-of-images", "0"],
        &["--device", "tpu"],
    ];
    for extra in cases {
        let result = sd21()
            .args(["generate", "--model"])
            .arg(tiny_model())
            .args(["--prompt", "x", "--output", "/tmp/never.png"])
            .args(*extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{extra:?} should fail");
        assert!(!stderr.contains("panicked"), "{extra:?}: {stderr}");
        assert!(
            !stderr.trim().is_empty(),
            "{extra:?}: an error message is printed"
        );
    }
    let result = sd21()
        .args([
            "generate",
            "--model",
            "/no/such/dir",
            "--prompt",
            "x",
            "--output",
            "/tmp/never.png",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        !result.status.success() && stderr.contains("/no/such/dir"),
        "{stderr}"
    );
}

#[test]
fn device_cuda_is_a_clear_error_without_a_gpu_and_matches_the_cpu_with_one() {
    let dir = tempfile::tempdir().unwrap();
    let run = |device: &str| {
        let out = dir.path().join(format!("{}.png", device.replace(':', "-")));
        let result = sd21()
            .args(["generate", "--model"])
            .arg(tiny_model())
            .args(["--prompt", "a red boat", "--steps", "3", "--seed", "7"])
            .args(["--device", device, "--output"])
            .arg(&out)
            .output()
            .unwrap();
        (result, out)
    };
    let (cpu, cpu_png) = run("cpu");
    assert!(
        cpu.status.success(),
        "{}",
        String::from_utf8_lossy(&cpu.stderr)
    );
    let (cuda, cuda_png) = run("cuda:0");
    let stderr = String::from_utf8_lossy(&cuda.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if !sd21::backend::cuda::cuda_available() {
        assert!(
            !cuda.status.success(),
            "--device cuda without a GPU must fail"
        );
        assert!(
            stderr.contains("cuda:0") && stderr.to_lowercase().contains("cuda"),
            "the error names the device: {stderr}"
        );
        eprintln!("skipped the CUDA image comparison: no CUDA device");
        return;
    }
    assert!(cuda.status.success(), "{stderr}");
    let decode = |path: &std::path::Path| decode_png(&std::fs::read(path).unwrap()).2;
    let (a, b) = (decode(&cpu_png), decode(&cuda_png));
    assert_eq!(a.len(), b.len());
    let mean = a
        .iter()
        .zip(&b)
        .map(|(x, y)| f64::from(x.abs_diff(*y)))
        .sum::<f64>()
        / a.len() as f64;
    assert!(mean <= 2.0, "mean |cpu - cuda| = {mean}/255");
}

#[test]
fn selftest_prints_its_table_and_says_plainly_when_there_is_no_gpu() {
    let cpu = sd21()
        .args(["selftest", "--device", "cpu"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&cpu.stdout);
    assert!(cpu.status.success(), "{table}");
    for column in ["op", "shape", "rel L2", "tolerance", "result", "time ms"] {
        assert!(table.contains(column), "{column}: {table}");
    }
    assert!(
        table.contains("attention causal") && table.contains("all passed"),
        "{table}"
    );

    let cuda = sd21()
        .args(["selftest", "--device", "cuda"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&cuda.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if sd21::backend::cuda::cuda_available() {
        let table = String::from_utf8_lossy(&cuda.stdout);
        assert!(cuda.status.success(), "{table}\n{stderr}");
        assert!(table.contains("all passed"), "{table}");
    } else {
        assert!(!cuda.status.success(), "no GPU is a failure: {stderr}");
        assert!(stderr.contains("no CUDA device to test"), "{stderr}");
        eprintln!("skipped the CUDA self-test: no CUDA device");
    }
}

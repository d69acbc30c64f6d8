//! The `sd21 generate` command end to end on the tiny fixture model.

mod common;

use std::process::Command;

use common::*;

fn sd21() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sd21"))
}

fn png_text(bytes: &[u8]) -> String {
    let reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let info = reader.info();
    info.uncompressed_latin1_text
        .iter()
        .map(|t| t.text.clone())
        .chain(info.utf8_text.iter().map(|t| t.get_text().unwrap()))
        .collect()
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

    let text = png_text(&first);
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
    let text = png_text(&std::fs::read(&out).unwrap());
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

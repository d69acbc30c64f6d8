//! The `sd21 generate`, `img2img`, `inpaint` and `selftest` commands end to end (the tiny fixture
//! model).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn sd21() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sd21"))
}

/// `sd21 img2img` with the fixtures' img2img settings (make_fixtures.py: the astronaut prompt,
/// its negative prompt, strength 0.75, cfg 7.5, ddim, the image seed) from `init_png`.
fn fixture_img2img(init_png: &Path, steps: usize, out: &Path) -> Command {
    let mut command = sd21();
    command
        .args(["img2img", "--model"])
        .arg(tiny_model())
        .arg("--init-image")
        .arg(init_png)
        .args(["--prompt", "a photograph of an astronaut riding a horse"])
        .args([
            "--negative-prompt",
            "blurry, low quality",
            "--strength",
            "0.75",
        ])
        .args(["--steps", &steps.to_string(), "--cfg-scale", "7.5"])
        .args(["--scheduler", "ddim", "--seed", "208513106212", "--output"])
        .arg(out);
    command
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

/// `--threads N` sizes the CPU pool (the run line names it), and gives the same image as the
/// default pool: the work split changes, the arithmetic per element does not.
#[test]
fn threads_sizes_the_cpu_pool_and_keeps_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let run = |threads: Option<&str>, name: &str| {
        let out = dir.path().join(name);
        let mut cmd = sd21();
        if let Some(n) = threads {
            cmd.args(["--threads", n]);
        }
        let result = cmd
            .args(["generate", "--device", "cpu", "--model"])
            .arg(tiny_model())
            .args([
                "--prompt", "a dog", "--steps", "2", "--seed", "3", "--output",
            ])
            .arg(&out)
            .env_remove("SD21_THREADS")
            .env_remove("RAYON_NUM_THREADS")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
        assert!(result.status.success(), "{stderr}");
        (decode_png(&std::fs::read(&out).unwrap()).2, stderr)
    };
    let (one, stderr) = run(Some("1"), "one.png");
    assert!(stderr.contains("cpu (1 threads, GEMM: "), "{stderr}");
    let (default, _) = run(None, "default.png");
    assert_eq!(one, default);
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

/// `sd21 img2img` on the fixture's init image equals diffusers' StableDiffusionImg2ImgPipeline
/// (reference/img2img.*, the ddim 0.75 case), and writes A1111's `Denoising strength`.
#[test]
fn img2img_from_a_png_equals_diffusers_and_resizes_odd_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = FixtureImages::open("img2img.safetensors");
    let rgb = fixture.image("init");
    let (h, w) = (rgb.height, rgb.width);
    let init_png = dir.path().join("init.png");
    sd21::image_io::save_png(&init_png, &rgb, None).unwrap();
    let out = dir.path().join("out.png");
    let result = fixture_img2img(&init_png, 7, &out).output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    let (ow, oh, pixels, text) = decode_png(&std::fs::read(&out).unwrap());
    assert_eq!((ow as usize, oh as usize), (w, h));
    assert!(text.contains("Denoising strength: 0.75"), "{text}");
    let expected = fixture.image("ddim_strength0.75");
    let max = max_pixel_diff(&pixels, &expected.pixels);
    assert!(max <= 2, "max |diff| {max}/255 against diffusers");

    // A size that is not a multiple of 8 is rounded down, and the image resized to it.
    let odd = sd21::image_io::resize(&rgb, 70, 50).unwrap();
    let odd_png = dir.path().join("odd.png");
    sd21::image_io::save_png(&odd_png, &odd, None).unwrap();
    let odd_out = dir.path().join("odd-out.png");
    let result = sd21()
        .args(["img2img", "--model"])
        .arg(tiny_model())
        .arg("--init-image")
        .arg(&odd_png)
        .args(["--prompt", "x", "--steps", "2", "--output"])
        .arg(&odd_out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert!(
        stderr.contains("resizing the init image from 70×50 to 64×48"),
        "{stderr}"
    );
    let (ow, oh, _, _) = decode_png(&std::fs::read(&odd_out).unwrap());
    assert_eq!((ow, oh), (64, 48));

    // Errors are messages, not panics.
    for extra in [&["--strength", "1.5"][..], &["--strength", "0.01"][..]] {
        let result = sd21()
            .args(["img2img", "--model"])
            .arg(tiny_model())
            .arg("--init-image")
            .arg(&init_png)
            .args(["--prompt", "x", "--output", "/tmp/never.png"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(
            !result.status.success() && stderr.contains("strength"),
            "{extra:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let not_an_image = dir.path().join("not.png");
    std::fs::write(&not_an_image, b"hello").unwrap();
    let result = sd21()
        .args(["img2img", "--model"])
        .arg(tiny_model())
        .arg("--init-image")
        .arg(&not_an_image)
        .args(["--prompt", "x", "--output", "/tmp/never.png"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        !result.status.success() && stderr.contains("--init-image"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `sd21 inpaint` on the fixture's image and mask equals diffusers' StableDiffusionInpaintPipeline
/// (the ddim 1.0 case) with the 4-channel model (reference/inpaint.*) and the 9-channel inpainting
/// model (reference/inpainting_model.*).
#[test]
fn inpaint_from_pngs_equals_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = FixtureImages::open("inpaint.safetensors");
    let write = |name: &str| {
        let path = dir.path().join(format!("{name}.png"));
        std::fs::write(&path, fixture.png(name)).unwrap();
        path
    };
    let (image, mask) = (write("image"), write("mask"));
    let models = [
        (tiny_model(), "inpaint.safetensors"),
        (tiny_inpainting_model(), "inpainting_model.safetensors"),
    ];
    for (model, expected_file) in models {
        let out = dir.path().join("out.png");
        let result = sd21()
            .args(["inpaint", "--model"])
            .arg(&model)
            .arg("--image")
            .arg(&image)
            .arg("--mask")
            .arg(&mask)
            .args(["--prompt", "a photograph of an astronaut riding a horse"])
            .args(["--negative-prompt", "blurry, low quality"])
            .args(["--steps", "7", "--cfg-scale", "7.5", "--scheduler", "ddim"])
            .args(["--seed", "208513106212", "--output"])
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(result.status.success(), "{expected_file}: {stderr}");
        let (_, _, pixels, text) = decode_png(&std::fs::read(&out).unwrap());
        assert!(
            text.contains("Denoising strength: 1, Mask blur: 0"),
            "{text}"
        );
        let expected = FixtureImages::open(expected_file).image("ddim_strength1.0");
        let max = max_pixel_diff(&pixels, &expected.pixels);
        assert!(
            max <= 2,
            "{expected_file}: max |diff| {max}/255 against diffusers"
        );
    }
}

/// An inpainting model asked for txt2img or img2img fails before loading, saying what it is.
#[test]
fn an_inpainting_model_runs_only_inpaint() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init.png");
    let fixture = FixtureImages::open("inpaint.safetensors");
    std::fs::write(&init, fixture.png("image")).unwrap();
    let runs: [&[&str]; 2] = [&["generate"], &["img2img", "--init-image"]];
    for run in runs {
        let mut command = sd21();
        command.args(run);
        if run.len() > 1 {
            command.arg(&init);
        }
        let result = command
            .arg("--model")
            .arg(tiny_inpainting_model())
            .args(["--prompt", "a boat", "--steps", "2", "--output"])
            .arg(dir.path().join("out.png"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{run:?} ran");
        assert!(
            stderr.contains("is an inpainting model"),
            "{run:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!dir.path().join("out.png").exists());
    }
}

/// `--vae-tiling` encodes and decodes in diffusers' overlapping tiles: `sd21 img2img` at 136×104
/// (tiles of 64 pixels on the tiny VAE) equals StableDiffusionImg2ImgPipeline with
/// `vae.enable_tiling()` (reference/vae_tiling.*), and differs without the flag.
#[test]
fn vae_tiling_flag_equals_diffusers_enable_tiling() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = FixtureImages::open("vae_tiling.safetensors");
    let init_png = dir.path().join("init.png");
    sd21::image_io::save_png(&init_png, &fixture.image("img2img_init"), None).unwrap();
    let expected = fixture.image("img2img_image");
    let run = |tiling: bool| {
        let out = dir.path().join(format!("out-{tiling}.png"));
        let mut command = fixture_img2img(&init_png, 3, &out);
        if tiling {
            command.arg("--vae-tiling");
        }
        let result = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(result.status.success(), "{stderr}");
        let (w, h, pixels, _) = decode_png(&std::fs::read(&out).unwrap());
        assert_eq!((w as usize, h as usize), (expected.width, expected.height));
        max_pixel_diff(&pixels, &expected.pixels)
    };
    let tiled = run(true);
    assert!(
        tiled <= 2,
        "tiled: max |diff| {tiled}/255 against diffusers"
    );
    let whole = run(false);
    assert!(whole > 2, "untiled within {whole}/255 of the tiled image");
}

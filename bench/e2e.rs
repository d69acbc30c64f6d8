//! `sd21-bench e2e`: whole processes as a user runs them, `sd21 generate` against diffusers'
//! `StableDiffusionPipeline` (bench/diffusers_generate.py) on the same model folder, seed,
//! scheduler, size and steps. Each round runs both sides at 1 and at 3 steps, the side that goes
//! first alternating; each process is timed from outside and its peak RSS read from
//! `/usr/bin/time -v`. Per step = (t(3) − t(1)) / 2; fixed cost (load, text encode, decode,
//! start-up) = t(1) − per step.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::ops::median;

/// What to run.
pub struct E2eOpts {
    pub model: PathBuf,
    /// The Python with torch + diffusers; `none` runs sd21 alone.
    pub python: String,
    pub sd21: Option<PathBuf>,
    pub repeats: usize,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub scheduler: String,
    pub threads: Option<usize>,
}

const PROMPT: &str = "a photograph of an astronaut riding a horse";
const SEED: &str = "1";

/// One process: its wall time and peak RSS.
#[derive(Debug, Clone, Copy)]
struct Run {
    wall_s: f64,
    peak_rss_bytes: u64,
}

/// Per side, per round: the 1-step and the 3-step run.
type Rounds = Vec<(Run, Run)>;

pub fn e2e(opts: &E2eOpts) -> Result<Value> {
    if opts.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let out = std::env::temp_dir().join(format!("sd21-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&out)?;
    let with_torch = opts.python != "none";
    let (mut ours, mut theirs): (Rounds, Rounds) = (Vec::new(), Vec::new());
    for round in 0..opts.repeats {
        let sd21_first = round % 2 == 0 || !with_torch;
        for side in 0..2 {
            let is_sd21 = (side == 0) == sd21_first;
            if !is_sd21 && !with_torch {
                continue;
            }
            let run = |steps: usize| -> Result<Run> {
                let png = out.join(format!(
                    "{}-{steps}.png",
                    if is_sd21 { "sd21" } else { "diffusers" }
                ));
                let command = if is_sd21 {
                    sd21_command(opts, steps, &png)?
                } else {
                    diffusers_command(opts, steps, &png)
                };
                measured(command)
            };
            let pair = (run(1)?, run(3)?);
            eprintln!(
                "round {} {}: 1 step {:.2} s, 3 steps {:.2} s, peak RSS {:.2} GB",
                round + 1,
                if is_sd21 { "sd21" } else { "diffusers" },
                pair.0.wall_s,
                pair.1.wall_s,
                pair.1.peak_rss_bytes as f64 / 1e9
            );
            if is_sd21 {
                ours.push(pair);
            } else {
                theirs.push(pair);
            }
        }
    }
    // The same work: both sides' 3-step images of the last round, pixel by pixel.
    let same_image = if with_torch {
        image_difference(&out.join("sd21-3.png"), &out.join("diffusers-3.png"))?
    } else {
        Value::Null
    };
    let _ = std::fs::remove_dir_all(&out);
    let report = json!({
        "images_differ_by": same_image,
        "machine": crate::serve::machine(),
        "model": opts.model.display().to_string(),
        "scheduler": opts.scheduler,
        "width": opts.width, "height": opts.height,
        "rounds": opts.repeats,
        "sd21": summary(&ours),
        "diffusers": if with_torch { summary(&theirs) } else { Value::Null },
    });
    print_table(&report);
    Ok(report)
}

fn sd21_command(opts: &E2eOpts, steps: usize, png: &Path) -> Result<Command> {
    let binary = match &opts.sd21 {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("sd21"),
    };
    let mut cmd = Command::new(binary);
    cmd.args(["generate", "--device", "cpu"]);
    generation_args(&mut cmd, opts, steps, png);
    Ok(cmd)
}

fn diffusers_command(opts: &E2eOpts, steps: usize, png: &Path) -> Command {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/diffusers_generate.py");
    let mut cmd = Command::new(&opts.python);
    cmd.arg(script);
    generation_args(&mut cmd, opts, steps, png);
    cmd
}

/// The flags both sides take alike (diffusers_generate.py mirrors `sd21 generate`'s).
fn generation_args(cmd: &mut Command, opts: &E2eOpts, steps: usize, png: &Path) {
    cmd.arg("--model")
        .arg(&opts.model)
        .args(["--prompt", PROMPT, "--seed", SEED])
        .args([
            "--steps",
            &steps.to_string(),
            "--scheduler",
            &opts.scheduler,
        ])
        .arg("--output")
        .arg(png);
    let optional = [
        ("--width", opts.width),
        ("--height", opts.height),
        ("--threads", opts.threads),
    ];
    for (flag, value) in optional {
        if let Some(value) = value {
            cmd.args([flag, &value.to_string()]);
        }
    }
}

/// Runs `command` under `/usr/bin/time -v`: its wall time (measured here) and peak RSS.
fn measured(command: Command) -> Result<Run> {
    let mut timed = Command::new("/usr/bin/time");
    timed
        .arg("-v")
        .arg(command.get_program())
        .args(command.get_args());
    let started = Instant::now();
    let out = timed
        .output()
        .context("running /usr/bin/time -v (Debian's `time` package)")?;
    let wall_s = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{:?} failed:\n{stderr}", command.get_program());
    }
    let kbytes: u64 = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Maximum resident set size (kbytes):"))
        .and_then(|v| v.trim().parse().ok())
        .context("no peak RSS in /usr/bin/time's output")?;
    Ok(Run {
        wall_s,
        peak_rss_bytes: kbytes * 1024,
    })
}

/// Mean and max absolute difference of two PNGs, in 1/255.
fn image_difference(a: &Path, b: &Path) -> Result<Value> {
    let read = |path: &Path| -> Result<Vec<u8>> {
        Ok(image::open(path)
            .with_context(|| format!("reading {}", path.display()))?
            .to_rgb8()
            .into_raw())
    };
    let (a, b) = (read(a)?, read(b)?);
    if a.len() != b.len() || a.is_empty() {
        bail!("the two sides' images differ in size");
    }
    let diffs: Vec<u8> = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).collect();
    let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
    let max = diffs.iter().copied().max().unwrap_or(0);
    Ok(json!({"mean": mean, "max": max}))
}

/// Median and min–max of wall time (3 steps), per step, fixed cost and peak RSS over the rounds.
fn summary(rounds: &Rounds) -> Value {
    let spread = |values: Vec<f64>| {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        json!({"median": median(values), "min": min, "max": max})
    };
    let per_step = |(one, three): &(Run, Run)| (three.wall_s - one.wall_s) / 2.0;
    json!({
        "wall_3_steps_s": spread(rounds.iter().map(|(_, three)| three.wall_s).collect()),
        "per_step_s": spread(rounds.iter().map(per_step).collect()),
        "fixed_s": spread(rounds.iter().map(|r| r.0.wall_s - per_step(r)).collect()),
        "peak_rss_gb": spread(rounds.iter().map(|(one, three)| {
            one.peak_rss_bytes.max(three.peak_rss_bytes) as f64 / 1e9
        }).collect()),
    })
}

fn print_table(report: &Value) {
    let size = match (report["width"].as_u64(), report["height"].as_u64()) {
        (Some(w), Some(h)) => format!("{w}×{h}"),
        _ => "native size".into(),
    };
    println!(
        "{} — {}, {}, {size}, {} rounds (median, min–max)",
        report["machine"].as_str().unwrap_or("?"),
        report["model"].as_str().unwrap_or("?"),
        report["scheduler"].as_str().unwrap_or("?"),
        report["rounds"]
    );
    if let Some(mean) = report["images_differ_by"]["mean"].as_f64() {
        println!(
            "the two sides' 3-step images differ by mean {mean:.3}/255, max {}/255",
            report["images_differ_by"]["max"]
        );
    }
    let cell = |v: &Value| {
        if v.is_null() {
            return "—".to_string();
        }
        format!(
            "{:.2} ({:.2}–{:.2})",
            v["median"].as_f64().unwrap_or(f64::NAN),
            v["min"].as_f64().unwrap_or(f64::NAN),
            v["max"].as_f64().unwrap_or(f64::NAN)
        )
    };
    let ratio = |key: &str| {
        let ours = report["sd21"][key]["median"].as_f64();
        let theirs = report["diffusers"][key]["median"].as_f64();
        match (ours, theirs) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "—".into(),
        }
    };
    println!(
        "{:<22} {:>24} {:>24} {:>10}",
        "", "sd21", "diffusers", "ratio"
    );
    for (label, key) in [
        ("wall, 3 steps s", "wall_3_steps_s"),
        ("per step s", "per_step_s"),
        ("fixed cost s", "fixed_s"),
        ("peak RSS GB", "peak_rss_gb"),
    ] {
        println!(
            "{label:<22} {:>24} {:>24} {:>10}",
            cell(&report["sd21"][key]),
            cell(&report["diffusers"][key]),
            ratio(key)
        );
    }
}

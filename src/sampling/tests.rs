//! Equality with diffusers 0.42.1: timesteps, sigmas and init_noise_sigma for every scheduler entry
//! of tests/fixtures/reference/schedulers.json (scripts/make_fixtures.py) and of
//! tests/fixtures/sampling/trajectories.json (scripts/sampling_goldens.py: class defaults and special
//! keys), ᾱ for each beta schedule, 7-step sampling trajectories, both free-running and
//! teacher-forced (diffusers' own sample and model output fed in at every step), and img2img's
//! start (reference/img2img_schedules.json: first step, timesteps left, add_noise).
//!
//! Tolerances: timesteps 1e-4 absolute; sigmas and init_noise_sigma 1e-5 relative; ᾱ exact (5e-6
//! relative after rescale_betas_zero_snr); trajectories |ours − diffusers| ≤ 1e-5·|diffusers| + 1e-6·max|diffusers sample|.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::rng::TorchGenerator;
use super::*;
use crate::config::SchedulerConfig;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load_json(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Python's json writes −∞ (DPM's lambda_min_clipped) as the non-standard `-Infinity`.
    serde_json::from_str(&text.replace("-Infinity", "null"))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tiny model's scheduler_config.json (the SD 2.1 one) as a JSON object.
fn sd_config() -> Map<String, Value> {
    match load_json(fixtures().join("tiny-sd21/scheduler/scheduler_config.json")) {
        Value::Object(m) => m,
        other => panic!("scheduler_config.json is not an object: {other}"),
    }
}

fn config_from(map: Map<String, Value>) -> SchedulerConfig {
    serde_json::from_value(Value::Object(map)).expect("SchedulerConfig")
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn assert_rel(what: &str, ours: &[f32], theirs: &[f32], rtol: f32) {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{what}: length\n ours {ours:?}\n diffusers {theirs:?}"
    );
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!(
            (a - b).abs() <= rtol * b.abs(),
            "{what}[{i}]: ours {a}, diffusers {b}\n ours {ours:?}\n diffusers {theirs:?}"
        );
    }
}

fn assert_abs(what: &str, ours: &[f32], theirs: &[f32], atol: f32) {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{what}: length\n ours {ours:?}\n diffusers {theirs:?}"
    );
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!(
            (a - b).abs() <= atol,
            "{what}[{i}]: ours {a}, diffusers {b}\n ours {ours:?}\n diffusers {theirs:?}"
        );
    }
}

/// Compares a built scheduler with a golden entry holding timesteps / sigmas / init_noise_sigma.
fn check_schedule(what: &str, s: &dyn Scheduler, entry: &Value) {
    assert_abs(
        &format!("{what} timesteps"),
        s.timesteps(),
        &f32s(&entry["timesteps"]),
        1e-4,
    );
    match &entry["sigmas"] {
        Value::Null => assert!(s.sigmas().is_none(), "{what}: diffusers has no sigmas"),
        sig => assert_rel(
            &format!("{what} sigmas"),
            s.sigmas().expect("sigmas"),
            &f32s(sig),
            1e-5,
        ),
    }
    let want = entry["init_noise_sigma"]
        .as_f64()
        .expect("init_noise_sigma") as f32;
    assert_rel(
        &format!("{what} init_noise_sigma"),
        &[s.init_noise_sigma()],
        &[want],
        1e-5,
    );
}

#[test]
fn reference_schedulers_json() {
    let entries = load_json(fixtures().join("reference/schedulers.json"));
    let entries = entries.as_array().expect("schedulers.json is a list");
    assert!(entries.len() >= 96, "{} entries", entries.len());
    for e in entries {
        let name = e["scheduler"].as_str().expect("scheduler");
        let steps = e["steps"].as_u64().expect("steps") as usize;
        let mut map = sd_config();
        map.insert("prediction_type".into(), e["prediction_type"].clone());
        for (k, v) in e["overrides"].as_object().expect("overrides") {
            map.insert(k.clone(), v.clone());
        }
        let what = format!(
            "{name} {} {} steps {}",
            e["prediction_type"], e["overrides"], steps
        );
        let kind = SchedulerKind::from_name(name).expect("kind");
        let s = build_scheduler(kind, &config_from(map), steps)
            .unwrap_or_else(|err| panic!("{what}: {err}"));
        check_schedule(&what, s.as_ref(), e);
    }
}

fn goldens() -> Value {
    load_json(fixtures().join("sampling/trajectories.json"))
}

#[test]
fn golden_schedules_class_defaults_and_special_keys() {
    let g = goldens();
    let entries = g["schedules"].as_array().expect("schedules");
    assert!(!entries.is_empty());
    for e in entries {
        let name = e["scheduler"].as_str().expect("scheduler");
        let steps = e["steps"].as_u64().expect("steps") as usize;
        let what = format!("{name} ({}) {steps} steps", e["label"]);
        let config = config_from(e["config"].as_object().expect("config").clone());
        let built = build_scheduler(
            SchedulerKind::from_name(name).expect("kind"),
            &config,
            steps,
        );
        if e["error"] == json!(true) {
            assert!(
                built.is_err(),
                "{what}: diffusers indexes out of range, we must refuse"
            );
            continue;
        }
        let s = built.unwrap_or_else(|err| panic!("{what}: {err}"));
        check_schedule(&what, s.as_ref(), e);
    }
}

#[test]
fn golden_alphas_cumprod() {
    let g = goldens();
    for e in g["alphas_cumprod"].as_array().expect("alphas_cumprod") {
        let config = config_from(e["config"].as_object().expect("config").clone());
        let num_train = schedule::num_train_timesteps(&config).expect("num_train");
        let ac = schedule::alphas_cumprod(&config, num_train).expect("alphas_cumprod");
        let idx: Vec<usize> = e["indices"]
            .as_array()
            .expect("indices")
            .iter()
            .map(|i| i.as_u64().expect("index") as usize)
            .collect();
        let ours: Vec<f32> = idx.iter().map(|&i| ac[i]).collect();
        let want = f32s(&e["values"]);
        let worst = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() / b.abs() })
            .fold(0f32, f32::max);
        eprintln!(
            "alphas_cumprod {}: worst relative difference {worst:.2e}",
            e["label"]
        );
        // Bit-exact except after rescale_betas_zero_snr, whose `Tensor.sqrt()` torch runs
        // through MKL's vector sqrt (not correctly rounded): a few float32 ulps there.
        let rtol = if e["label"] == "scaled_linear_zero_snr" {
            5e-6
        } else {
            0.0
        };
        assert_rel(
            &format!("alphas_cumprod {}", e["label"]),
            &ours,
            &want,
            rtol,
        );
    }
}

/// The synthetic model of scripts/sampling_goldens.py, bit for bit.
fn fake_model(x: &[f32], t: f32) -> Vec<f32> {
    let n = x.len();
    let c = t / 1000.0;
    (0..n)
        .map(|k| {
            let w = ((k % 5) as f32 - 2.0) * 0.05;
            (0.9 * x[k] - 0.2 * x[(k + 1) % n]) + c * w
        })
        .collect()
}

/// Asserts one step's sample and returns (max elementwise relative error, max |diff| / max |ref|).
fn assert_traj(what: &str, ours: &[f32], theirs: &[f32]) -> (f32, f32) {
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (mut rel, mut norm) = (0f32, 0f32);
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let d = (a - b).abs();
        if d > 0.0 {
            rel = rel.max(d / b.abs());
            norm = norm.max(d / scale);
        }
        assert!(
            d <= 1e-5 * b.abs() + 1e-6 * scale,
            "{what}[{i}]: ours {a}, diffusers {b}\n ours {ours:?}\n diffusers {theirs:?}"
        );
    }
    (rel, norm)
}

fn max2(a: (f32, f32), b: (f32, f32)) -> (f32, f32) {
    (a.0.max(b.0), a.1.max(b.1))
}

fn trajectory_case(e: &Value) -> (String, Box<dyn Scheduler>, usize, Vec<usize>) {
    let name = e["scheduler"].as_str().expect("scheduler");
    let steps = e["steps"].as_u64().expect("steps") as usize;
    let shape: Vec<usize> = e["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|v| v.as_u64().expect("dim") as usize)
        .collect();
    let seed = e["seed"].as_u64().expect("seed") as usize;
    let config = config_from(e["config"].as_object().expect("config").clone());
    let what = format!("{name} {:?} {:?}", config.prediction_type, e["config"]);
    let s = build_scheduler(
        SchedulerKind::from_name(name).expect("kind"),
        &config,
        steps,
    )
    .unwrap_or_else(|err| panic!("{what}: {err}"));
    (what, s, seed, shape)
}

#[test]
fn golden_trajectories_free_running() {
    let g = goldens();
    let mut worst = (0f32, 0f32);
    for e in g["trajectories"].as_array().expect("trajectories") {
        let (what, mut s, seed, shape) = trajectory_case(e);
        assert_abs(
            &format!("{what} timesteps"),
            s.timesteps(),
            &f32s(&e["timesteps"]),
            1e-4,
        );
        let n: usize = shape.iter().product();
        let mut rng = TorchGenerator::new(seed as u64);
        let sigma0 = s.init_noise_sigma();
        let mut sample: Vec<f32> = rng.randn(n).iter().map(|x| x * sigma0).collect();
        worst = max2(
            worst,
            assert_traj(&format!("{what} initial"), &sample, &f32s(&e["initial"])),
        );
        let timesteps = s.timesteps().to_vec();
        let records = e["steps_out"].as_array().expect("steps_out");
        assert_eq!(records.len(), timesteps.len(), "{what}: step count");
        let mut case_worst = (0f32, 0f32);
        for (i, (&t, rec)) in timesteps.iter().zip(records).enumerate() {
            let mut x = sample.clone();
            s.scale_model_input(&mut x, i);
            let mo = fake_model(&x, t);
            sample = s.step(&mo, i, &sample, &mut rng).expect("step");
            case_worst = max2(
                case_worst,
                assert_traj(&format!("{what} step {i}"), &sample, &f32s(&rec["sample"])),
            );
        }
        eprintln!("{what}: {:.2e} {:.2e}", case_worst.0, case_worst.1);
        worst = max2(worst, case_worst);
    }
    eprintln!(
        "free-running: worst elementwise relative {:.2e}, |diff|/max|ref| {:.2e}",
        worst.0, worst.1
    );
}

#[test]
fn golden_trajectories_teacher_forced() {
    let g = goldens();
    let mut worst = (0f32, 0f32);
    for e in g["trajectories"].as_array().expect("trajectories") {
        let (what, mut s, seed, shape) = trajectory_case(e);
        let n: usize = shape.iter().product();
        let mut rng = TorchGenerator::new(seed as u64);
        rng.randn(n);
        let mut sample = f32s(&e["initial"]);
        for (i, rec) in e["steps_out"]
            .as_array()
            .expect("steps_out")
            .iter()
            .enumerate()
        {
            let mo = f32s(&rec["model_output"]);
            let want = f32s(&rec["sample"]);
            let out = s.step(&mo, i, &sample, &mut rng).expect("step");
            worst = max2(
                worst,
                assert_traj(&format!("{what} step {i} (forced)"), &out, &want),
            );
            sample = want;
        }
    }
    eprintln!(
        "teacher-forced: worst elementwise relative {:.2e}, |diff|/max|ref| {:.2e}",
        worst.0, worst.1
    );
}

#[test]
fn names_and_classes() {
    for kind in SchedulerKind::ALL {
        assert_eq!(SchedulerKind::from_name(kind.name()).expect("name"), kind);
    }
    let err = SchedulerKind::from_name("lms")
        .expect_err("unknown")
        .to_string();
    assert!(
        err.contains("euler_a") && err.contains("dpmpp_2m_karras"),
        "{err}"
    );
    assert_eq!(
        SchedulerKind::from_class_name("EulerAncestralDiscreteScheduler").expect("class"),
        SchedulerKind::EulerAncestral
    );
    assert!(SchedulerKind::from_class_name("LMSDiscreteScheduler").is_err());
    let mut map = sd_config();
    map.insert("_class_name".into(), json!("DPMSolverMultistepScheduler"));
    assert_eq!(
        SchedulerKind::from_config(&config_from(map.clone())).expect("dpm"),
        SchedulerKind::DpmPp2m
    );
    map.insert("use_karras_sigmas".into(), json!(true));
    assert_eq!(
        SchedulerKind::from_config(&config_from(map)).expect("dpm karras"),
        SchedulerKind::DpmPp2mKarras
    );
    assert_eq!(
        SchedulerKind::from_config(&config_from(sd_config())).expect("pndm"),
        SchedulerKind::Pndm
    );
    assert_eq!(SchedulerKind::EulerAncestral.a1111_name(), "Euler a");
    assert_eq!(SchedulerKind::Pndm.a1111_name(), "PLMS");
}

#[test]
fn prediction_types() {
    let mut c = SchedulerConfig::default();
    assert_eq!(
        prediction_type(&c).expect("default"),
        PredictionType::Epsilon
    );
    c.prediction_type = Some("v_prediction".into());
    assert_eq!(prediction_type(&c).expect("v"), PredictionType::VPrediction);
    c.prediction_type = Some("sample".into());
    let err = prediction_type(&c).expect_err("sample").to_string();
    assert!(
        err.contains("sample") && err.contains("not supported"),
        "{err}"
    );
    assert!(build_scheduler(SchedulerKind::Euler, &c, 10).is_err());
}

#[test]
fn invalid_arguments_are_errors_not_panics() {
    let config = config_from(sd_config());
    let mut rng = TorchGenerator::new(0);
    for kind in SchedulerKind::ALL {
        assert!(
            build_scheduler(kind, &config, 0).is_err(),
            "{kind:?} 0 steps"
        );
        assert!(
            build_scheduler(kind, &config, 1001).is_err(),
            "{kind:?} 1001 steps"
        );
        // 1000 leading steps with steps_offset 1 reach t = 1000 in DDIM/PNDM: refused there.
        let full = build_scheduler(kind, &config, 1000);
        assert_eq!(
            full.is_err(),
            matches!(kind, SchedulerKind::Ddim | SchedulerKind::Pndm)
        );

        let mut s = build_scheduler(kind, &config, 5).expect("5 steps");
        let n = s.timesteps().len();
        let x = vec![0.5f32; 8];
        assert!(
            s.step(&x, 0, &x[..7], &mut rng).is_err(),
            "{kind:?} length mismatch"
        );
        assert!(
            s.step(&x, n, &x, &mut rng).is_err(),
            "{kind:?} index past the end"
        );
        s.step(&x, 0, &x, &mut rng).expect("step 0");
        assert!(
            s.step(&x, 2, &x, &mut rng).is_err(),
            "{kind:?} skipped a step"
        );
        assert!(
            s.step(&x, 0, &x, &mut rng).is_err(),
            "{kind:?} repeated a step"
        );
        s.step(&x, 1, &x, &mut rng).expect("step 1");
        let mut y = x.clone();
        s.scale_model_input(&mut y, n + 5); // past the end: untouched, no panic
        assert_eq!(y, x);
    }
    let mut bad = sd_config();
    bad.insert("skip_prk_steps".into(), json!(false));
    assert!(build_scheduler(SchedulerKind::Pndm, &config_from(bad.clone()), 3).is_err());
    assert!(build_scheduler(SchedulerKind::Pndm, &config_from(bad), 4).is_ok());
    for (key, value) in [
        ("beta_schedule", json!("sigmoid")),
        ("timestep_spacing", json!("uniform")),
        ("num_train_timesteps", json!(0)),
        ("trained_betas", json!([0.1, 0.2])),
    ] {
        let mut m = sd_config();
        m.insert(key.into(), value);
        assert!(
            build_scheduler(SchedulerKind::Ddim, &config_from(m), 5).is_err(),
            "{key}"
        );
    }
}

/// img2img's start against diffusers (reference/img2img_schedules.json): the first step index
/// and the timesteps left for each strength, and add_noise at the first of them; ≤ 1e-6 relative.
#[test]
fn img2img_start_matches_diffusers() {
    let d = load_json(fixtures().join("reference/img2img_schedules.json"));
    let (original, noise) = (f32s(&d["original"]), f32s(&d["noise"]));
    let entries = d["entries"].as_array().expect("entries");
    assert!(entries.len() >= 36);
    for e in entries {
        let name = e["scheduler"].as_str().expect("scheduler");
        let steps = e["steps"].as_u64().expect("steps") as usize;
        let strength = e["strength"].as_f64().expect("strength");
        let what = format!("{name} {steps} steps strength {strength}");
        let t_start = img2img_first_step(steps, strength).expect("a start");
        assert_eq!(
            t_start as u64,
            e["t_start"].as_u64().expect("t_start"),
            "{what}"
        );
        let kind = SchedulerKind::from_name(name).expect("kind");
        let s = build_scheduler(kind, &config_from(sd_config()), steps).expect("scheduler");
        let left = &s.timesteps()[t_start..];
        let want = f32s(&e["timesteps"]);
        assert_eq!(
            left.len(),
            want.len(),
            "{what}: timesteps {left:?} vs {want:?}"
        );
        for (a, b) in left.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-4,
                "{what}: timesteps {left:?} vs {want:?}"
            );
        }
        let noisy = s.add_noise(&original, &noise, t_start).expect("add_noise");
        for (i, (a, b)) in noisy.iter().zip(f32s(&e["noisy"])).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "{what}: noisy[{i}] {a} vs {b}"
            );
        }
    }
}

#[test]
fn img2img_strength_is_checked() {
    assert_eq!(img2img_first_step(10, 1.0).ok(), Some(0));
    assert_eq!(img2img_first_step(10, 0.75).ok(), Some(3));
    for bad in [-0.1, 1.5, f64::NAN] {
        assert!(img2img_first_step(10, bad).is_err(), "{bad}");
    }
    assert!(img2img_first_step(10, 0.05).is_err(), "no step left");
}

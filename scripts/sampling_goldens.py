"""Golden values for src/sampling (tests/fixtures/sampling/trajectories.json), from diffusers.

Install (Python 3.11, CPU):   pip install torch==2.15.0 diffusers==0.42.1 numpy
Run from the repository root:  python scripts/sampling_goldens.py

What it writes (deterministic; compact JSON, float32 values as 9 significant digits):

* "alphas_cumprod": diffusers' float32 alphas_cumprod at every 7th training timestep (and the last)
  for the beta schedules the schedulers build (linear default, scaled_linear, squaredcos_cap_v2,
  scaled_linear with rescale_betas_zero_snr).
* "schedules": timesteps / sigmas / init_noise_sigma after set_timesteps(n) for scheduler configs
  that tests/fixtures/reference/schedulers.json does not cover: every class with an EMPTY config
  (all class defaults), and special keys (trailing spacing at 61 steps where numpy's arange yields
  one step more, Karras / log_linear / sigma_min Euler, zero-SNR, squaredcos, PNDM with PRK steps).
  "config" is the raw scheduler_config.json the Rust side parses; "scheduler" is the sd21 name.
* "trajectories": for each scheduler x prediction type (and a few special configs) a free-running
  7-step sampling loop exactly like StableDiffusionPipeline's, with a synthetic float32 "model":
      out[k] = (0.9*x[k] - 0.2*x[(k+1) % n]) + (t/1000) * w[k],   w[k] = ((k % 5) - 2) * 0.05
  where x is scheduler.scale_model_input(sample, t), all in float32 numpy (IEEE, so the Rust test
  computes it bit for bit). The initial latent is torch.randn(shape, generator=manual_seed(seed))
  * init_noise_sigma; Euler ancestral gets the same generator in step(). Per step it records the
  model output and the sample after the step.
"""

import json
import os

import numpy as np
import torch

import diffusers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "sampling", "trajectories.json")
SD_CONFIG_PATH = os.path.join(ROOT, "tests", "fixtures", "tiny-sd21", "scheduler", "scheduler_config.json")

CLASSES = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


def sd_config():
    with open(SD_CONFIG_PATH) as f:
        cfg = json.load(f)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def make(name, config):
    cls_name, extra = CLASSES[name]
    return getattr(diffusers, cls_name).from_config({**config, **extra})


def f32list(x):
    a = np.asarray(x, dtype=np.float32).reshape(-1)
    return [float("%.9g" % v) for v in a]


def alphas_cumprod_goldens():
    out = []
    sd = sd_config()
    cases = [
        ("linear_default", {}),
        ("scaled_linear_sd", sd),
        ("squaredcos_cap_v2", {"beta_schedule": "squaredcos_cap_v2"}),
        ("scaled_linear_zero_snr", {**sd, "rescale_betas_zero_snr": True}),
    ]
    for label, cfg in cases:
        s = diffusers.DDIMScheduler.from_config(cfg)
        ac = s.alphas_cumprod.numpy()
        idx = list(range(0, len(ac), 7)) + [len(ac) - 1]
        out.append({"label": label, "config": cfg, "indices": idx, "values": f32list(ac[idx])})
    return out


def schedule_goldens():
    sd = sd_config()
    cases = []
    for name in CLASSES:
        cases.append((name, {}, "class defaults"))
    for name in ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"):
        cases.append((name, {**sd, "timestep_spacing": "trailing"}, "trailing"))
    cases += [
        ("euler", {**sd, "use_karras_sigmas": True}, "euler karras"),
        ("euler", {**sd, "interpolation_type": "log_linear"}, "euler log_linear"),
        ("euler", {**sd, "final_sigmas_type": "sigma_min"}, "euler sigma_min"),
        ("euler", {**sd, "timestep_spacing": "leading", "use_karras_sigmas": True}, "euler leading karras"),
        ("dpmpp_2m", {**sd, "final_sigmas_type": "sigma_min"}, "dpm sigma_min"),
        ("dpmpp_2m", {**sd, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, "dpm zero snr"),
        ("euler", {**sd, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, "euler zero snr"),
        ("dpmpp_2m_karras", {"beta_schedule": "squaredcos_cap_v2"}, "dpm karras squaredcos"),
        ("pndm", {**sd, "skip_prk_steps": False}, "pndm prk"),
        ("pndm", {**sd, "timestep_spacing": "linspace"}, "pndm linspace"),
        ("ddim", {**sd, "timestep_spacing": "linspace"}, "ddim linspace"),
    ]
    out = []
    for name, cfg, label in cases:
        for steps in (4, 61):
            s = make(name, cfg)
            s.set_timesteps(steps)
            ts = s.timesteps.numpy()
            if name in ("ddim", "pndm") and (ts < 0).any():
                # diffusers would index alphas_cumprod[-1]; sd21 refuses these step counts.
                out.append({"scheduler": name, "label": label, "config": cfg, "steps": steps,
                            "error": True})
                continue
            sig = getattr(s, "sigmas", None)
            out.append({
                "scheduler": name, "label": label, "config": cfg, "steps": steps,
                "timesteps": [float(t) for t in ts.astype(np.float64)],
                "sigmas": None if sig is None else f32list(sig),
                "init_noise_sigma": float(np.float32(s.init_noise_sigma)),
            })
    return out


def fake_model(x, t):
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    k = np.arange(n)
    w = ((k % 5) - 2).astype(np.float32) * np.float32(0.05)
    c = np.float32(t) / np.float32(1000)
    return (np.float32(0.9) * x - np.float32(0.2) * x[(k + 1) % n]) + c * w


def trajectory(name, cfg, shape, seed, steps=7):
    s = make(name, cfg)
    s.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(shape, generator=g, dtype=torch.float32)
    latents = latents * s.init_noise_sigma
    init = latents.clone()
    records = []
    extra = {"generator": g} if name == "euler_a" else {}
    for t in s.timesteps:
        x = s.scale_model_input(latents, t)
        mo = torch.from_numpy(fake_model(x.numpy(), float(t)).reshape(shape))
        latents = s.step(mo, t, latents, **extra).prev_sample
        records.append({"model_output": f32list(mo), "sample": f32list(latents)})
    return {
        "scheduler": name, "config": cfg, "shape": list(shape), "seed": seed, "steps": steps,
        "timesteps": [float(t) for t in s.timesteps.numpy().astype(np.float64)],
        "init_noise_sigma": float(np.float32(s.init_noise_sigma)),
        "initial": f32list(init), "steps_out": records,
    }


def trajectory_goldens():
    sd = sd_config()
    out = []
    for name in CLASSES:
        for pt in ("epsilon", "v_prediction"):
            out.append(trajectory(name, {**sd, "prediction_type": pt}, (1, 4, 2, 3), 0))
    out.append(trajectory("euler_a", sd, (1, 4, 1, 3), 5))  # 12 values: torch's serial randn path
    out.append(trajectory("ddim", {}, (1, 4, 2, 3), 1))  # class defaults: clip_sample, set_alpha_to_one
    out.append(trajectory("pndm", {**sd, "skip_prk_steps": False}, (1, 4, 2, 3), 2))
    out.append(trajectory("pndm", {**sd, "skip_prk_steps": False, "prediction_type": "v_prediction"},
                          (1, 4, 2, 3), 2))
    out.append(trajectory("euler", {**sd, "use_karras_sigmas": True}, (1, 4, 2, 3), 3))
    out.append(trajectory("dpmpp_2m", {**sd, "final_sigmas_type": "sigma_min"}, (1, 4, 2, 3), 4))
    out.append(trajectory("dpmpp_2m", {**sd, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
                          (1, 4, 2, 3), 4))
    out.append(trajectory("dpmpp_2m_karras", {**sd, "prediction_type": "v_prediction"}, (1, 4, 2, 3), 6))
    out.append(trajectory("euler_a", {**sd, "timestep_spacing": "leading"}, (1, 4, 2, 3), 8))
    return out


def main():
    torch.set_num_threads(1)
    data = {
        "alphas_cumprod": alphas_cumprod_goldens(),
        "schedules": schedule_goldens(),
        "trajectories": trajectory_goldens(),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(data, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}: {os.path.getsize(OUT)} bytes, {len(data['schedules'])} schedules, "
          f"{len(data['trajectories'])} trajectories")


if __name__ == "__main__":
    main()

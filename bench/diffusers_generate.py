"""One generation with diffusers' StableDiffusionPipeline as a user runs it, for `sd21-bench e2e`:
load the model folder, generate one image, save it as PNG. The process is timed from outside.

Install: pip install torch==2.15.0 diffusers==0.42.1 transformers==5.24.0
Run: python bench/diffusers_generate.py --model DIR --prompt P --steps 3 --seed 1 --output out.png
"""

import argparse

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

# sd21's scheduler names → diffusers' classes (and options).
SCHEDULERS = {
    "pndm": (PNDMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--width", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--cfg-scale", type=float, default=7.0)
    ap.add_argument("--scheduler", choices=sorted(SCHEDULERS))
    ap.add_argument("--threads", type=int)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = StableDiffusionPipeline.from_pretrained(
        args.model, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    if args.scheduler:
        cls, extra = SCHEDULERS[args.scheduler]
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    image = pipe(
        args.prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.cfg_scale,
        width=args.width,
        height=args.height,
        generator=generator,
    ).images[0]
    image.save(args.output)


if __name__ == "__main__":
    main()

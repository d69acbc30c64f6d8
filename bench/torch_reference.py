"""PyTorch/diffusers reference timings for `sd21-bench pipeline --compare-torch`.

Install: pip install torch==2.15.0 diffusers==0.42.1 transformers==5.24.0
Run (normally from sd21-bench, which passes the model folder it loads itself):
    python bench/torch_reference.py --model DIR --device cpu --width 512 --height 512 --steps 20

Loads UNet2DConditionModel, AutoencoderKL and CLIPTextModel from the diffusers-layout folder DIR
(the very weights sd21-bench runs; `sd21-bench write-random` writes random ones), and times the
same work as sd21-bench: text encoding (prompt + negative, batch 2), one UNet step with
CFG (batch 2), one VAE decode, and a whole generation with the PNDM scheduler. CPU: float32 on all
cores; CUDA: float16 with SDPA attention (diffusers' default). Prints one JSON line last.
"""

import argparse
import json
import os
import statistics
import time

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device, fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device, dtype).eval()
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae").to(device, dtype).eval()
    text = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder").to(device, dtype).eval()
    load_s = time.perf_counter() - start
    text_cfg = text.config

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = args.height // factor, args.width // factor
    ids = torch.randint(0, text_cfg.vocab_size, (2, 77), device=device)
    latents2 = torch.randn(2, unet.config.in_channels, h, w, device=device, dtype=dtype)
    z = torch.randn(1, vae.config.latent_channels, h, w, device=device, dtype=dtype)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)

    with torch.inference_mode():
        ctx = text(ids)[0]
        text_s = timed(device, lambda: text(ids), args.repeats)
        unet_s = timed(device, lambda: unet(latents2, 500, encoder_hidden_states=ctx).sample, args.repeats)
        vae_s = timed(device, lambda: vae.decode(z).sample, args.repeats)

        def generate():
            for _ in range(args.batch):
                c = text(ids)[0]
                x = torch.randn(1, unet.config.in_channels, h, w, device=device, dtype=dtype)
                scheduler.set_timesteps(args.steps)
                for t in scheduler.timesteps:
                    eps = unet(torch.cat([x, x]), t, encoder_hidden_states=c).sample
                    u, cond = eps.chunk(2)
                    x = scheduler.step(u + 7.0 * (cond - u), t, x).prev_sample
                vae.decode(x / 0.18215)

        generation_s = timed(device, generate, 1, warmup=0) / args.batch

    print(json.dumps({
        "torch_version": torch.__version__, "device": device, "dtype": str(dtype),
        "threads": torch.get_num_threads(), "width": args.width, "height": args.height, "steps": args.steps,
        "load_s": load_s, "text_encode_s": text_s, "unet_step_s": unet_s, "vae_decode_s": vae_s,
        "generation_s_per_image": generation_s, "it_per_s": args.steps / generation_s,
    }))


if __name__ == "__main__":
    main()

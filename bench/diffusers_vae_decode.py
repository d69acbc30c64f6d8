"""diffusers' side of `sd21-bench vae-decode`: one AutoencoderKL decode of seeded N(0, 1) latents.

Run: python bench/diffusers_vae_decode.py --model DIR --width 1536 --height 1536 [--tiled]
Loads only the VAE (f32, CPU, all cores), decodes torch.randn([1, C, h, w], generator seed 0) /
scaling_factor, with vae.enable_tiling() when --tiled, and prints one JSON line.
"""

import argparse
import json
import os
import time

import torch
from diffusers import AutoencoderKL


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--height", type=int, required=True)
    ap.add_argument("--tiled", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    if args.tiled:
        vae.enable_tiling()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (1, vae.config.latent_channels, args.height // factor, args.width // factor)
    z = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(0)) / vae.config.scaling_factor
    with torch.inference_mode():
        start = time.perf_counter()
        image = vae.decode(z).sample
        decode_s = time.perf_counter() - start
    print(json.dumps({"side": "diffusers", "width": image.shape[3], "height": image.shape[2],
                      "tiled": args.tiled, "threads": torch.get_num_threads(), "load_s": load_s,
                      "decode_s": decode_s}))


if __name__ == "__main__":
    main()

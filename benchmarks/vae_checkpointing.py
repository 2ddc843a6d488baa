"""Peak memory of PGD's pass through the VAE encoder (forward, then the gradient in the
pixels) without checkpointing, with diffusers' own (block by block) and with antipers'
layer-by-layer recompute (``models/recompute.py``), each in its own child process, on
SD's VAE (random weights). The gradient is checked equal to the plain one.

    python benchmarks/vae_checkpointing.py [--resolution 512] [--images 1]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _harness import emit, in_child, peak_gib, reset_peak

from antipers.device import pick_device
from antipers.models.recompute import checkpointed, encoder_checkpointed

MODES = ("none", "block", "layer")


def run_one(mode: str, resolution: int, images: int) -> dict:
    from diffusers import AutoencoderKL

    from antipers.models.arch import _SD_VAE

    device = pick_device()
    torch.manual_seed(0)
    vae = AutoencoderKL(**_SD_VAE).to(device).eval().requires_grad_(False)
    x = torch.rand(images, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
    x = x.to(device).requires_grad_(True)
    if mode == "block":
        context = checkpointed([vae])
    else:
        context = encoder_checkpointed(vae, on=mode == "layer")
    reset_peak(device)
    t0 = time.perf_counter()
    with context:
        vae.encode(x * 2 - 1).latent_dist.mean.square().sum().backward()
    return {
        "mode": mode,
        "peak_gib": peak_gib(device),
        "seconds": time.perf_counter() - t0,
        "grad_sum": float(x.grad.double().abs().sum()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--child", choices=MODES)
    args = parser.parse_args()
    if args.child:
        emit(run_one(args.child, args.resolution, args.images))
        return 0
    size = ["--resolution", str(args.resolution), "--images", str(args.images)]
    rows = [in_child(__file__, ["--child", mode, *size]) for mode in MODES]
    if any(r is None for r in rows):
        return 1
    base = rows[0]
    print(f"SD's VAE encoder, {args.images} x {args.resolution} px, forward + input gradient")
    print(f"{'checkpointing':<14} {'peak GiB':>9} {'x none':>7} {'s':>6}  same gradient")
    for r in rows:
        same = r["grad_sum"] == base["grad_sum"]
        ratio = r["peak_gib"] / base["peak_gib"]
        print(f"{r['mode']:<14} {r['peak_gib']:9.2f} {ratio:7.2f} {r['seconds']:6.1f}  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

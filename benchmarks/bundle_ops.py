"""Time the operations every stage is built from, on one base model.

Prints one table: median seconds over ``--repeats`` runs of each operation, and its
ratio to a plain UNet forward pass measured in the same run.
"""

from __future__ import annotations

import argparse

import torch
from _harness import median_seconds as timed

from antipers.attacks.sampling import GuidedSampler
from antipers.device import pick_device
from antipers.registry import BASE_MODELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    device = pick_device(args.device)
    bundle = BASE_MODELS.build(args.model).load(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=gen).to(device)
    with torch.no_grad():
        latents = bundle.encode(images)
        embeds = bundle.prompt_embeds(["a photo of sks person"] * args.batch)
    t = torch.full((args.batch,), 500, device=device)
    unet_params = [p for p in bundle.unet.parameters()]

    def unet_forward() -> None:
        with torch.no_grad(), bundle.autocast():
            bundle.unet(latents, t, encoder_hidden_states=embeds)

    def train_step() -> None:
        for p in unet_params:
            p.requires_grad_(True)
        loss = bundle.training_loss(latents, embeds, gen)
        loss.backward()
        for p in unet_params:
            p.grad = None
            p.requires_grad_(False)

    def pgd_step() -> None:
        x = images.clone().requires_grad_(True)
        loss = bundle.training_loss(bundle.encode(x), embeds, gen)
        (grad,) = torch.autograd.grad(loss, x)
        (x + 0.005 * grad.sign()).clamp(0, 1)

    sampler = GuidedSampler(
        prompts=("a photo of sks person",),
        scheduler="ddim",
        images_per_prompt=args.batch,
        steps=1,
        batch_size=args.batch,
    )

    def sample_step() -> None:
        sampler.sample(bundle, args.resolution, gen)

    rows = [
        ("unet forward (baseline)", timed(unet_forward, args.repeats, device)),
        ("train step (UNet grads)", timed(train_step, args.repeats, device)),
        ("PGD step (pixel grads)", timed(pgd_step, args.repeats, device)),
        ("DDIM 1 step + decode", timed(sample_step, args.repeats, device)),
    ]
    base = rows[0][1]
    latent = args.resolution // bundle.latent_factor
    print(
        f"{args.model} on {device}, batch {args.batch}, {args.resolution}px -> {latent} latent, "
        f"median of {args.repeats}"
    )
    print(f"{'operation':<26}{'seconds':>10}{'x baseline':>12}")
    for name, secs in rows:
        print(f"{name:<26}{secs:>10.4f}{secs / base:>12.2f}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()

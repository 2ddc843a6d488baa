"""What IDDM costs over the personalization it wraps: the undefended attack and IDDM
(same attack, same steps) on one synthetic identity, median wall time of several runs
in the same process, and the ratio to the undefended attack. IDDM adds only its
decoupling rounds (``rounds`` x ``pgd_steps`` PGD steps through the VAE, the UNet and
the face embedder), so the ratio grows with them and shrinks with the attack's steps.

    python benchmarks/iddm.py                                   # tiny at 64 px, LoRA
    python benchmarks/iddm.py --model sd15-arch --resolution 512 --steps 20 --repeats 2
"""

from __future__ import annotations

import argparse
import logging

import torch
from _harness import median_seconds

from antipers.attacks.lora import LoRADreamBooth
from antipers.data.synthetic import SyntheticDataset
from antipers.defenses.iddm import IDDM
from antipers.device import pick_device
from antipers.registry import BASE_MODELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="personalization steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depth", default="r50", help="the face embedder's depth")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    device = pick_device()
    bundle = BASE_MODELS.build(args.model).load(device)
    photos = SyntheticDataset(n_identities=1).load("synth-0000", args.resolution).set_B
    attack = LoRADreamBooth(steps=args.steps, lr=1e-4, prior_weight=0.0)

    def undefended() -> None:
        attack.personalize(photos.to(device), bundle, torch.Generator().manual_seed(0))

    base = median_seconds(undefended, args.repeats, device)
    print(
        f"{args.model} at {args.resolution} px on {device.type}, LoRA {args.steps} steps, "
        f"iresnet-{args.depth} (random weights), median of {args.repeats}"
    )
    print(f"{'configuration':<34} {'seconds':>8} {'ratio':>6}")
    print(f"{'undefended (the baseline)':<34} {base:8.2f} {1.0:6.2f}")
    for rounds, pgd_steps in ((2, 5), (4, 10), (8, 10)):
        iddm = IDDM(
            rounds=rounds, pgd_steps=pgd_steps, embedder="random", embedder_depth=args.depth
        )

        def defended(iddm: IDDM = iddm) -> None:
            iddm.run(photos, bundle, attack, torch.Generator().manual_seed(0))

        seconds = median_seconds(defended, args.repeats, device)
        label = f"iddm {rounds} rounds x {pgd_steps} PGD steps"
        print(f"{label:<34} {seconds:8.2f} {seconds / base:6.2f}")


if __name__ == "__main__":
    main()

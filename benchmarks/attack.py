"""Training speed and peak memory of the two attackers, DreamBooth and LoRA.

Each (model, attack) runs in its own child process so that its peak memory is its own
(peak RSS on the CPU; ``torch.cuda.max_memory_allocated`` on a GPU). Prints one table:
the median step time over the timed steps (after one warm-up step), steps per second,
peak memory, and LoRA's ratios against DreamBooth on the same model, measured in the
same run. Full DreamBooth on ``sd21-arch`` at 512 needs about 20 GB for AdamW states
alone (UNet + text encoder); on a 24 GB CPU machine use ``--no-text-encoder``.

    python benchmarks/attack.py                       # tiny at 64 px
    python benchmarks/attack.py --models mini-faces --steps 20
    python benchmarks/attack.py --models tiny sd21-arch --resolution 512 --steps 3

Each attack also runs with torch's default AdamW (``plain AdamW`` rows) instead of the
training loop's fused one, with its time ratio against the fused run of the same attack.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _harness import emit, in_child, peak_gib, plain_adamw, reset_peak

ATTACKS = ("dreambooth", "lora")


def run_one(
    model: str, attack: str, resolution: int, steps: int, text_encoder: bool, plain: bool
) -> dict:
    import torch

    from antipers.attacks.training import TrainData, finetune

    if plain:  # this child process only: the baseline the fused kernel is measured against
        plain_adamw()
    from antipers.device import pick_device
    from antipers.registry import ATTACKS as REGISTRY
    from antipers.registry import BASE_MODELS

    device = pick_device()
    bundle = BASE_MODELS.build(model).load(device)
    images = torch.rand(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    spec = REGISTRY.build(
        attack,
        {
            "steps": steps + 1,
            "batch_size": 2,
            "prior_weight": 0.0,
            "train_text_encoder": text_encoder,
        },
    )
    gen = torch.Generator().manual_seed(0)
    trained, params = spec.trainable(bundle, gen)
    reset_peak(device)
    stamps = [time.perf_counter()]

    def on_step(step: int, loss: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    finetune(
        trained,
        TrainData(images, spec.instance_prompt),
        params,
        spec.train_config(),
        gen,
        text_encoder,
        on_step,
    )
    step_times = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]  # drop warm-up
    return {
        "device": str(device),
        "step_s": statistics.median(step_times),
        "peak_gib": peak_gib(device),
        "trainable_m": sum(p.numel() for p in params) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    parser.add_argument("--no-text-encoder", action="store_true", help="train the UNet only")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "ATTACK"), help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    text_encoder = not args.no_text_encoder
    if args.one:
        emit(run_one(*args.one, args.resolution, args.steps, text_encoder, args.plain))
        return

    rows = []
    for model in args.models:
        by_attack = {}
        for attack in ATTACKS:
            child = ["--one", model, attack, "--resolution", str(args.resolution)]
            child += ["--steps", str(args.steps)]
            child += [] if text_encoder else ["--no-text-encoder"]
            by_attack[attack] = in_child(__file__, child)
            by_attack[f"{attack} plain AdamW"] = in_child(__file__, [*child, "--plain"])
        rows.append((model, by_attack))

    print(
        f"{args.resolution} px, batch 2, text encoder {'on' if text_encoder else 'off'}, "
        f"median of {args.steps} steps"
    )
    print(
        f"{'model':<11}{'attack':<25}{'device':<8}{'trainable M':>12}{'s/step':>9}"
        f"{'steps/s':>9}{'peak GiB':>10}{'time x DB':>11}{'mem x DB':>10}{'x fused':>9}"
    )

    def ratio(r: dict | None, base: dict | None, key: str) -> float:
        return r[key] / base[key] if r and base else float("nan")

    for model, by_attack in rows:
        base = by_attack.get("dreambooth")
        for attack, r in by_attack.items():
            if r is None:
                print(f"{model:<11}{attack:<25}failed")
                continue
            fused = by_attack.get(attack.removesuffix(" plain AdamW"))
            print(
                f"{model:<11}{attack:<25}{r['device']:<8}{r['trainable_m']:>12.2f}"
                f"{r['step_s']:>9.3f}{1 / r['step_s']:>9.2f}{r['peak_gib']:>10.2f}"
                f"{ratio(r, base, 'step_s'):>11.2f}{ratio(r, base, 'peak_gib'):>10.2f}"
                f"{ratio(r, fused, 'step_s'):>9.2f}"
            )


if __name__ == "__main__":
    main()

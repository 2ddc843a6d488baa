"""What the streamed optimizer costs in time: a surrogate-like training step (one photo,
text encoder trained, gradient checkpointing, clipping at norm 1) with torch's fused
AdamW, with AdamW's moments off the device (a scratch file on a CPU, host memory on a
GPU), and with each weight also stepped inside backward (a second backward pass for
the global norm): the memory plan's lean setting at SD scale. Each row is the median
over ``--repeats`` runs of a 3-step phase (the surrogate's), per step, setup included,
against torch's AdamW measured in the same run.

    python benchmarks/streamed_adamw.py                     # tiny at 64 px
    python benchmarks/streamed_adamw.py --model mini-faces --repeats 7
"""

from __future__ import annotations

import argparse

import torch
from _harness import median_seconds

from antipers.attacks.training import TrainConfig, TrainData, finetune
from antipers.device import pick_device
from antipers.registry import BASE_MODELS


def rows(device: torch.device) -> dict[str, tuple[str, bool]]:
    """name: (where the moments live, steps inside backward); off the device is where
    the lean plan puts them: a scratch file on a CPU, host memory on a GPU."""
    away = "disk" if device.type == "cpu" else "cpu"
    return {
        "torch AdamW": ("device", False),
        f"moments on {away}": (away, False),
        "steps in backward": ("device", True),
        "both (lean)": (away, True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = pick_device()
    bundle = BASE_MODELS.build(args.model).load(device)
    params = [p for m in (bundle.unet, bundle.text_encoder) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    images = torch.rand(2, 3, args.resolution, args.resolution)
    data = TrainData(images, "a photo of sks person")
    steps = 3
    print(
        f"{args.model} at {args.resolution} px on {device}, {len(params)} weight tensors, "
        f"{steps}-step phases, median of {args.repeats}"
    )
    print(f"{'optimizer':<20}{'ms/step':>9}{'x torch':>9}")
    baseline = None
    for name, (place, in_backward) in rows(device).items():
        config = TrainConfig(
            steps=steps,
            lr=5e-7,
            gradient_checkpointing=True,
            optimizer_state=place,
            steps_in_backward=in_backward,
        )

        def phase(config: TrainConfig = config) -> None:
            finetune(bundle, data, params, config, torch.Generator().manual_seed(0), True)

        per_step = median_seconds(phase, args.repeats, device) / steps
        baseline = baseline or per_step
        print(f"{name:<20}{per_step * 1000:>9.1f}{per_step / baseline:>9.2f}")


if __name__ == "__main__":
    main()

"""How long APDM's protection lasts under the real attacker: the person's diffusion loss
along DreamBooth's steps, on the protected model against the base model.

APDM trains its DPO loss along a simulated attack of ``inner_steps`` steps; the real
attacker takes many more (on ``mini-faces`` 120 against 4; in the protocol 1000
against 20). If the protection is there but short-lived, the protected model's loss
on the person's held-out photos (set_A) starts above the base model's and the gap
closes as the attack goes on; if it is not there at all, the gap is near zero from
the first step. The same curves for a bystander (the next person of the gallery,
attacked on their own photos) say what the protection costs everyone else. The
attacker (run for the largest of ``--at``'s step counts), APDM and the people are the
campaign file's; ``--inner-steps`` and ``--iterations`` replace APDM's where given,
``--attack-lr`` the attacker's lr and APDM's simulated one's with it (a slower
attacker, given more steps with ``--at``).

    python benchmarks/apdm_horizon.py                    # validity-apdm-budget.yaml
    python benchmarks/apdm_horizon.py --inner-steps 16   # a longer simulated attack
    python benchmarks/apdm_horizon.py --attack-lr 1e-4 --at 0 4 16 64 120 240 360
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from _apdm_settings import CAMPAIGNS, apdm_experiment

from antipers.attacks.personalize import Personalization
from antipers.data.identity import IdentitySet
from antipers.device import pick_device
from antipers.models.bundle import DiffusionBundle
from antipers.registry import BASE_MODELS, DATASETS
from antipers.robustness import diffusion_loss

RESULTS = Path(__file__).parent / "results" / "apdm-horizon"


def loss_curve(
    attack: Personalization, person: IdentitySet, bundle: DiffusionBundle, at: list[int], seed: int
) -> list[float]:
    """The attacked model's mean diffusion loss on ``person``'s set_A after each step
    count in ``at`` (0: before the attack), from one attack of ``attack.steps`` steps."""
    if max(at) > attack.steps:
        raise ValueError(f"at: step {max(at)} beyond the attack's {attack.steps}")
    curve = {0: float(diffusion_loss(bundle, person.set_A).mean())} if 0 in at else {}

    def measure(step: int, trained: DiffusionBundle) -> None:
        if step + 1 in at:
            trained.unet.eval()
            curve[step + 1] = float(diffusion_loss(trained, person.set_A).mean())
            trained.unet.train()

    attack.personalize(
        person.set_B.to(bundle.device), bundle, torch.Generator().manual_seed(seed), measure
    )
    return [curve[k] for k in at]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--campaign", type=Path, default=CAMPAIGNS / "validity-apdm-budget.yaml")
    parser.add_argument("--people", type=int, default=2, help="protected people (in turn)")
    parser.add_argument("--inner-steps", type=int, help="APDM's simulated attack's steps")
    parser.add_argument("--iterations", type=int, help="APDM's iterations")
    parser.add_argument("--attack-lr", type=float, help="the attacker's lr and APDM's inner_lr")
    parser.add_argument("--at", type=int, nargs="+", default=[0, 4, 8, 16, 32, 64, 120])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.people < 1:
        parser.error("--people: at least 1")
    if sorted(set(args.at)) != args.at or args.at[0] < 0:
        parser.error(f"--at: increasing step counts from 0 up, got {args.at}")
    if args.attack_lr is not None and not 0 < args.attack_lr < math.inf:
        parser.error(f"--attack-lr: expected > 0, got {args.attack_lr}")
    try:
        spec, attack, apdm = apdm_experiment(
            args.campaign,
            {"lr": args.attack_lr},
            {
                "inner_steps": args.inner_steps,
                "iterations": args.iterations,
                "inner_lr": args.attack_lr,
            },
        )
    except ValueError as exc:
        parser.error(f"--campaign: {exc}")
    attack = dataclasses.replace(attack, steps=max(args.at))  # as run and recorded
    dataset = DATASETS.build(spec.dataset.name, spec.dataset.kwargs)
    names = dataset.identities()
    if len(names) < args.people + 1:
        parser.error(f"--people: the campaign has {len(names)} people, {args.people} + 1 needed")
    device = pick_device()
    bundle = BASE_MODELS.build(spec.base_model.name, spec.base_model.kwargs).load(device)
    rows = []
    for i in range(args.people):
        person, bystander = (dataset.load(n, spec.resolution) for n in names[i : i + 2])
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(args.seed + i)
        protected = apdm.protect(person, bundle, generator).bundle
        minutes = (time.perf_counter() - t0) / 60
        row = {"person": names[i], "bystander": names[i + 1], "apdm_minutes": minutes}
        for who, target in (("person", person), ("bystander", bystander)):
            for model, key in ((bundle, "base"), (protected, "protected")):
                row[f"{who}_{key}"] = loss_curve(attack, target, model, args.at, args.seed + i)
        rows.append(row)
        print(f"{names[i]}: APDM {minutes:.1f} min", flush=True)
        del protected
    gap = {
        who: np.array([np.array(r[f"{who}_protected"]) - r[f"{who}_base"] for r in rows])
        for who in ("person", "bystander")
    }
    print(
        f"\nAPDM {apdm.iterations} it x {apdm.inner_steps} inner steps (lr {apdm.lr}, "
        f"inner {apdm.inner_lr}, prior x{apdm.prior_weight}); {spec.attack.name} "
        f"{attack.steps} steps at lr {attack.lr}; {args.people} people.\n"
        "Diffusion loss on held-out photos after k attacker steps, protected minus base "
        "(mean over people; + = protected):"
    )
    print(f"{'k':>5}{'person':>10}{'bystander':>11}   person base / protected")
    base = np.mean([r["person_base"] for r in rows], axis=0)
    prot = np.mean([r["person_protected"] for r in rows], axis=0)
    for j, k in enumerate(args.at):
        print(
            f"{k:>5}{gap['person'][:, j].mean():>+10.4f}{gap['bystander'][:, j].mean():>+11.4f}"
            f"   {base[j]:.4f} / {prot[j]:.4f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{args.campaign.stem}-inner{apdm.inner_steps}-it{apdm.iterations}"
    if args.attack_lr is not None:
        name += f"-attack-lr{args.attack_lr:g}"
    out = RESULTS / f"{name}.json"
    record = {
        "settings": {**vars(args), "campaign": str(args.campaign.name)},
        "apdm": dataclasses.asdict(apdm),
        "attack": dataclasses.asdict(attack),
        "rows": rows,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

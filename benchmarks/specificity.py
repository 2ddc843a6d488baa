"""How person-specific personalization is, in the diffusion loss that model-track
defenses (APDM's DPO, PersGuard's backdoor) work through.

The attacker fine-tunes the base model on one person's photos (set_B); the attacked
model's denoising loss (``robustness.diffusion_loss``: fixed noise and timesteps) is
then measured on every person's held-out photos (set_A). The drop from the base
model's loss on the person themself is what personalization learned; the change on
the other people of the gallery is what it did to faces in general (a drop: it learned
"a face"; a rise: the instance prompt now means this person, and the model drifted).
A defense that makes "this person" fail and keeps "anyone else" working needs the first
well apart from the second: their difference, with bootstrap intervals over people,
says how much room a base model leaves it. Beside them, the base model's loss on its
own generated class images (APDM's preferred side) against the people's photos (its
dispreferred side). The attacker and APDM are ``validity-model.yaml``'s, read from it.

    python benchmarks/specificity.py                        # mini-faces, 8 people
    python benchmarks/specificity.py --people 4 --steps 30  # quicker
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from _apdm_settings import CAMPAIGNS, apdm_experiment

from antipers.board_stats import mean_interval
from antipers.boards import load_boards
from antipers.data.synthetic import SyntheticDataset
from antipers.device import pick_device
from antipers.registry import BASE_MODELS
from antipers.robustness import diffusion_loss

RESULTS = Path(__file__).parent / "results" / "specificity"
CAMPAIGN = CAMPAIGNS / "validity-model.yaml"


def loss_matrix(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """``base[j]``: the base model's mean loss on person j's set_A; ``attacked[i, j]``:
    the same after the attack on person i; the base model's on its class images."""
    device = pick_device()
    bundle = BASE_MODELS.build(args.model).load(device)
    dataset = SyntheticDataset(n_identities=args.people, seed=args.dataset_seed)
    names = dataset.identities()
    people = [dataset.load(name, args.resolution) for name in names]
    _, attack, apdm = apdm_experiment(CAMPAIGN, {"steps": args.steps, "lr": args.lr}, {})
    args.steps, args.lr = attack.steps, attack.lr  # recorded as run
    base = np.array([diffusion_loss(bundle, p.set_A).mean() for p in people])
    preferred = apdm.generic_images(bundle, args.resolution)
    generated = float(diffusion_loss(bundle, preferred).mean())
    print(
        f"base model's loss: people's photos {base.mean():.4f} (per person "
        f"{base.min():.4f}-{base.max():.4f}), its own class images {generated:.4f}"
    )
    attacked = np.zeros((len(people), len(people)))
    for i, person in enumerate(people):
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(args.seed + i)
        trained = attack.personalize(person.set_B.to(device), bundle, generator)
        attacked[i] = [diffusion_loss(trained, p.set_A).mean() for p in people]
        print(f"{names[i]}: attacked in {time.perf_counter() - t0:.0f} s", flush=True)
        del trained
    return base, attacked, names, generated


def summary(base: np.ndarray, attacked: np.ndarray) -> dict[str, list[float]]:
    """Per attacked person: the drop on themself, the mean drop on the others and
    their difference; each as [mean, low, high] over people."""
    drop = base[None, :] - attacked
    n = len(base)
    own = np.diag(drop)
    others = (drop.sum(axis=1) - own) / (n - 1)
    rules = load_boards().defaults
    out = {}
    for key, values in {
        "own_drop": own,
        "others_drop": others,
        "specific_drop": own - others,
    }.items():
        low, high = mean_interval(values, rules)
        out[key] = [float(values.mean()), low, high]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="mini-faces")
    parser.add_argument("--people", type=int, default=8)
    parser.add_argument("--dataset-seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, help="attacker steps (default: the campaign's)")
    parser.add_argument("--lr", type=float, help="attacker lr (default: the campaign's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.people < 2:
        parser.error("--people: at least 2 (the others are the comparison)")
    base, attacked, names, generated = loss_matrix(args)
    result = summary(base, attacked)
    print(
        f"\n{args.model}, {args.people} people (dataset seed {args.dataset_seed}), DreamBooth "
        f"{args.steps} steps at lr {args.lr}: diffusion loss on held-out photos (set_A)"
    )
    for key, (mean, low, high) in result.items():
        print(f"{key:<16}{mean:+.4f} [{low:+.4f}, {high:+.4f}]")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.model}-{args.people}p-seed{args.dataset_seed}-{args.steps}steps.json"
    record = {
        "settings": vars(args),
        "people": names,
        "base": base.tolist(),
        "attacked": attacked.tolist(),
        "class_images": generated,
        "summary": result,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""What IDDM's ``privacy`` knob does to the training photos, with the decoupling alone
(no personalization): for each value, the photos' similarity to the person under the
embedder it optimizes against, the model's reconstruction loss on them (fixed draws),
how far the pixels moved and in which direction (cosine with the largest value's), and
per person the ratio of the two terms' pixel gradients at the originals. Means over the
people; the ratio says where the knob balances the terms on this model.

    python benchmarks/iddm_knob.py                         # mini-faces, 4 people, 16/255
    python benchmarks/iddm_knob.py --privacy 0 0.001 0.01 0.5 --people 2
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F

from antipers.defenses.decouple import decouple
from antipers.defenses.pgd import PGDConfig
from antipers.device import pick_device
from antipers.images import eps_to_unit
from antipers.models.embedders import (
    embedder_model,
    identity_similarity,
    person_embedding,
    resolve_embedder,
    shipped_depth,
)
from antipers.registry import BASE_MODELS, DATASETS

PROMPT = "a photo of sks person"


def gradient_ratio(bundle, embedder, photos, person, embeds) -> float:  # type: ignore[no-untyped-def]
    """L1 norm of the reconstruction term's pixel gradient over the identity term's."""
    x = photos.clone().requires_grad_(True)
    (identity,) = torch.autograd.grad(identity_similarity(embedder, x, person).mean(), x)
    x = photos.clone().requires_grad_(True)
    loss = bundle.training_loss(bundle.encode(x), embeds, torch.Generator().manual_seed(0))
    (reconstruction,) = torch.autograd.grad(loss, x)
    return float(reconstruction.abs().sum() / identity.abs().sum())


def measures(bundle, embedder, x, person, embeds) -> list[float]:  # type: ignore[no-untyped-def]
    """The photos' similarity to the person and the reconstruction loss (fixed draws)."""
    with torch.no_grad():
        similarity = float(identity_similarity(embedder, x, person).mean())
        draws = torch.Generator().manual_seed(123)
        loss = float(bundle.training_loss(bundle.encode(x), embeds, draws))
    return [similarity, loss]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="mini-faces")
    parser.add_argument("--embedder", default="mini-faces")
    parser.add_argument("--depth", default="r50", help="ignored for a shipped embedder")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--people", type=int, default=4)
    parser.add_argument("--eps", type=float, default=16.0, help="budget, /255")
    parser.add_argument("--steps", type=int, default=40, help="PGD steps (4 rounds of 10)")
    parser.add_argument(
        "--privacy", type=float, nargs="+", default=[0.0, 0.001, 0.004, 0.01, 0.1, 0.5, 0.9]
    )
    args = parser.parse_args()
    logging.disable(logging.INFO)
    device = pick_device()
    bundle = BASE_MODELS.build(args.model).load(device)
    depth = shipped_depth(args.embedder, args.depth)
    embedder = embedder_model(resolve_embedder(args.embedder), depth).to(device)
    dataset = DATASETS.build("synthetic", {"n_identities": args.people})
    config = PGDConfig(eps=args.eps, step_size=args.eps / 8, steps=args.steps)
    rows: dict[float, list[list[float]]] = {p: [] for p in args.privacy}
    originals: list[list[float]] = []
    ratios = []
    for i in range(args.people):
        photos = dataset.load(f"synth-{i:04d}", args.resolution).set_B.to(device)
        person = person_embedding(embedder, photos)
        embeds = bundle.prompt_embeds([PROMPT] * len(photos))
        ratios.append(gradient_ratio(bundle, embedder, photos, person, embeds))
        originals.append(measures(bundle, embedder, photos, person, embeds))
        moved = {}
        for privacy in args.privacy:
            x = decouple(
                photos, bundle, embedder, PROMPT, privacy, config, torch.Generator().manual_seed(0)
            )
            moved[privacy] = (x - photos).flatten()
            delta = (x - photos).abs()
            at_budget = float((delta > eps_to_unit(args.eps) - 0.5 / 255).float().mean())
            rows[privacy].append(
                [
                    *measures(bundle, embedder, x, person, embeds),
                    float(delta.mean()) * 255,
                    at_budget,
                ]
            )
        last = moved[args.privacy[-1]]
        for privacy in args.privacy:
            rows[privacy][-1].append(float(F.cosine_similarity(moved[privacy], last, dim=0)))
    print(
        f"{args.model}, embedder {args.embedder}, {args.people} people, {args.eps:g}/255, "
        f"{args.steps} steps; reconstruction/identity gradient (L1): "
        + ", ".join(f"{r:.3f}" for r in ratios)
    )
    print(
        f"{'privacy':>8}{'similarity':>12}{'recon loss':>12}{'mean |d|':>10}"
        f"{'at budget':>11}{'cos':>7}"
    )
    sim, loss = torch.tensor(originals).mean(dim=0).tolist()
    print(f"{'photos':>8}{sim:>12.3f}{loss:>12.4f}")
    for privacy, values in rows.items():
        sim, loss, mean, share, cos = torch.tensor(values).mean(dim=0).tolist()
        print(f"{privacy:>8g}{sim:>12.3f}{loss:>12.4f}{mean:>10.2f}{share:>11.2f}{cos:>7.2f}")


if __name__ == "__main__":
    main()

"""How much of a protection survives ``antipers protect``'s full-size output?

``protect`` perturbs a photo at the working square and resizes the perturbation to the
photo's own size (bilinear), within the budget on the 8-bit grid. An attacker then
trains at the working size again, so the perturbation goes through an upscale and a
downscale. On ``mini-faces`` (working size 64 px) this runs the validity campaign's
ASPL against DreamBooth on the first gallery with photos published at ``--sizes``
(the same person rendered at that size by the generator): per size, the attack on the
clean photos and on the protected ones, both as the attacker sees them (resized to the
working size). The protection's effect at each size (protected minus clean, per
person) is printed beside its effect at the working size (the validity store's rows),
with how much of the perturbation reaches the attacker (RMS ratio and cosine).

    python benchmarks/full_size.py [--identities 8] [--sizes 128,256]
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from validity import CAMPAIGN, STORE, person, row_people

from antipers.board_stats import mean_interval
from antipers.boards import load_boards
from antipers.campaign import load_campaign
from antipers.pipeline import (
    Handoff,
    RunContext,
    attack_stage,
    experiment_rows,
    protect_stage,
    score_stage,
)
from antipers.protect import at_full_size, to_working
from antipers.results import ResultStore

OWN_STORE = Path(__file__).resolve().parent / "results" / "full-size"
METRICS = ("fdfr", "ism", "linkability")


def validity_specs(identities: int):
    """The validity campaign's none and ASPL against DreamBooth, no countermeasure."""
    specs = [
        s
        for s in load_campaign(CAMPAIGN).specs
        if s.attack.name == "dreambooth"
        and s.countermeasure_name == "none"
        and s.defense.name in ("none", "aspl")
    ]
    people = sorted({person(s) for s in specs}, key=lambda p: (int(p.split("/")[0]), p))
    chosen = set(people[:identities])
    return [s for s in specs if person(s) in chosen]


def attack_and_store(spec, images: torch.Tensor, store: ResultStore, ctx: RunContext) -> None:
    handoff = Handoff(started=datetime.now(UTC), protected=images)
    handoff = attack_stage(spec, ctx, handoff, lambda stage: None)
    handoff = score_stage(spec, ctx, handoff, lambda stage: None)
    store.write(experiment_rows(spec, handoff))


def run(specs, sizes: list[int], store: ResultStore, validity: ResultStore, ctx) -> list[dict]:
    """Runs what the stores lack; returns how much of each perturbation reached the
    attacker (per person and size)."""
    reach = []
    done = store.finished_ids() | validity.finished_ids()
    by_person = {}
    for spec in specs:
        by_person.setdefault(person(spec), {})[spec.defense.name] = spec
    for who, pair in by_person.items():
        aspl = pair["aspl"]
        print(f"  {who}: protect", file=sys.stderr, flush=True)
        identity = ctx.identity(aspl)
        protected = protect_stage(aspl, ctx, lambda stage: None).protected.cpu()
        clean = identity.set_B.cpu()
        eps = float(aspl.defense.kwargs["eps"])  # pixel units, as protect passes it
        dataset = ctx.dataset(aspl.dataset)
        for size in sizes:
            original = dataset.load(aspl.identity, size).set_B
            published = at_full_size(original, clean, protected, eps)
            seen = to_working(published, clean.shape[-1])
            seen_clean = to_working(original, clean.shape[-1])
            delta, reached = (protected - clean).flatten(1), (seen - seen_clean).flatten(1)
            reach.append(
                {
                    "person": who,
                    "size": size,
                    "rms_ratio": float((reached.norm(dim=1) / delta.norm(dim=1)).mean()),
                    "cosine": float(torch.cosine_similarity(reached, delta, dim=1).mean()),
                }
            )
            for defense, images in (("none", seen_clean), ("aspl", seen)):
                spec = pair[defense].override({"suite": f"validity-full-size-{size}"})
                if spec.spec_id in done:
                    continue
                print(f"  {who}: {defense} at {size} px", file=sys.stderr, flush=True)
                attack_and_store(spec, images, store, ctx)
        for defense in ("none", "aspl"):  # the working-size arm, as validity stores it
            if pair[defense].spec_id not in done:
                print(f"  {who}: {defense} at the working size", file=sys.stderr, flush=True)
                images = protected if defense == "aspl" else clean
                attack_and_store(pair[defense], images, validity, ctx)
    return reach


def effects(rows: pd.DataFrame) -> pd.DataFrame:
    """Per size: ASPL minus none per person (paired), mean and bootstrap interval."""
    rules = load_boards().defaults
    agg = rows[(rows["image_index"] == -1) & (rows["status"] == "ok")].copy()
    agg["person"] = row_people(agg)
    agg["size"] = agg["suite"].str.extract(r"full-size-(\d+)$")[0].fillna("working")
    out = []
    for (size, metric), group in agg[agg["metric"].isin(METRICS)].groupby(["size", "metric"]):
        by = group.pivot_table(index="person", columns="defense", values="value")
        if not {"none", "aspl"} <= set(by.columns):
            continue
        diff = (by["aspl"] - by["none"]).dropna().to_numpy()
        low, high = mean_interval(diff, rules)
        out.append(
            {
                "size": size,
                "metric": metric,
                "n": len(diff),
                "none": by["none"].mean(),
                "aspl": by["aspl"].mean(),
                "effect": diff.mean(),
                "low": low,
                "high": high,
            }
        )
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--sizes", default="128", help="comma-separated published sizes (px)")
    parser.add_argument("--store", default=str(OWN_STORE))
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    from antipers.device import pick_device

    sizes = [int(s) for s in args.sizes.split(",")]
    specs = validity_specs(args.identities)
    store, validity = ResultStore(args.store), ResultStore(str(STORE))
    reach = run(specs, sizes, store, validity, RunContext(device=pick_device(args.device)))
    wanted = {s.spec_id for s in specs}
    rows = pd.concat([store.load(), validity.load(wanted)], ignore_index=True)
    frame = effects(rows[row_people(rows).isin({person(s) for s in specs})])
    print("published size | metric | n | none | aspl | aspl minus none (paired)")
    print("--- | --- | --- | --- | --- | ---")
    for _, r in frame.iterrows():
        print(
            f"{r['size']} | {r['metric']} | {r['n']} | {r['none']:.3f} | {r['aspl']:.3f} | "
            f"{r['effect']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"
        )
    reached = pd.DataFrame(reach).groupby("size")[["rms_ratio", "cosine"]].mean()
    print("\nperturbation reaching the attacker (per size, mean over people):")
    for size, r in reached.iterrows():
        print(
            f"- {size} px: RMS {r['rms_ratio']:.2f} of the working-size perturbation, "
            f"cosine {r['cosine']:.2f}"
        )
    return 0 if np.isfinite(frame["effect"]).all() else 1


if __name__ == "__main__":
    sys.exit(main())

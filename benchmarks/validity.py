"""Does the benchmark measure what it should? The miniature of the field's main table.

On ``mini-faces`` (``antipers/campaigns/validity.yaml``): for each attacker and
countermeasure, each defense's FDFR, ISM, linkability, BRISQUE and the protected
photos' PSNR, as means over identities with 95% percentile-bootstrap intervals, and a
floor row: the base model's own generations, with no personalization. Then the
checks the issue asks for (the base model makes faces, the undefended attack learns
the person, ASPL's effect with its intervals apart), each printed with its numbers,
and the ISM calibration of the offline face backend.

    python benchmarks/validity.py [--store validity-store] [--identities 8]
        [--defenses none,aspl] [--attacks lora] [--countermeasures none,jpeg]

Every experiment lands in the store (a rerun skips what is there); a defense runs
once per identity and its photos serve every attacker and countermeasure. With
``--campaign`` a model-track campaign (``validity-model.yaml``: APDM) prints the
protected person's, the bystander's and the generic-image columns, and an
immunization-track one (IDDM) privacy under both embedders and the avatars' utility.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import zlib
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from antipers.board_labels import config_labels
from antipers.board_stats import mean_interval
from antipers.boards import load_boards
from antipers.campaign import load_campaign
from antipers.models.mini_recipe import CLASS_PROMPTS
from antipers.pipeline import (
    Handoff,
    RunContext,
    attack_stage,
    experiment_rows,
    failure_rows,
    protect_stage,
    score_stage,
)
from antipers.registry import SAMPLERS
from antipers.results import ResultStore

CAMPAIGN = Path(__file__).resolve().parents[1] / "antipers" / "campaigns" / "validity.yaml"
STORE = Path(__file__).resolve().parent / "results" / "validity"
METRICS = ("fdfr", "ism", "linkability", "brisque", "psnr")
# the model track: how far the attack got on the protected person, the same attack on a
# bystander (it must still work), and the protected model's loss on generic images
MODEL_METRICS = (
    "fdfr",
    "ism",
    "linkability",
    "person_loss",
    "bystander_ism",
    "bystander_linkability",
    "bystander_person_loss",
    "generic_loss_gain",
    # PersGuard's own measures, for the protected person and the bystander
    "backdoor_target_distance",
    "bystander_backdoor_target_distance",
    "backdoor_pattern",
    "bystander_backdoor_pattern",
)
# the immunization track (IDDM): privacy (the campaign's face backend and the embedder
# it optimized against) and the avatars' utility (likeness in the model's latent space)
IMMUNIZATION_METRICS = (
    "fdfr",
    "ism",
    "linkability",
    "decoupled_ism",
    "embedder-ism",  # the same embedder for every row, none included
    "brisque",
    "subject_latent_distance",
)
TRACK_METRICS = {"model": MODEL_METRICS, "immunization": IMMUNIZATION_METRICS}
FLOOR = "floor (no personalization)"
CONTROL = re.compile(r"\biterations=0\b")  # a model-track defense's control (label)


def baseline(defenses) -> str | None:
    """Where a table's rows start: the undefended attack, or on a campaign without one
    the control configuration (PersGuard's ``iterations: 0``)."""
    defenses = list(defenses)
    if "none" in defenses:
        return "none"
    return next((d for d in defenses if CONTROL.search(d)), None)


def reference(defenses, having) -> str | None:
    """What a defense's metric is compared with: the undefended attack where it has the
    metric, else the control (the same attack and check on the clean model: ``none``
    has no backdoor to check)."""
    defenses = list(defenses)
    candidates = ["none"] * ("none" in defenses) + [d for d in defenses if CONTROL.search(d)]
    return next((d for d in candidates if d in set(having)), None)


def labelled(rows: pd.DataFrame) -> pd.DataFrame:
    """``defense`` and ``attack`` as the boards label them: the name, with the
    parameters that differ where one runs in several configurations; countermeasure
    chains likewise (``purify (t=150)`` beside ``purify (t=100)``)."""
    rows = rows.copy()
    for kind in ("defense", "attack"):
        labels = config_labels(rows, kind)
        rows[kind] = [
            labels[(n, p)] for n, p in zip(rows[kind], rows[f"{kind}_params"], strict=True)
        ]
    chains = rows[["countermeasure", "countermeasure_params"]].drop_duplicates()
    labels = {}
    for name, group in chains.groupby("countermeasure"):
        for raw in group["countermeasure_params"]:
            if len(group) == 1:
                labels[(name, raw)] = name
                continue
            steps = [
                ", ".join(f"{k}={v}" for k, v in entry.items() if k != "name")
                for entry in json.loads(raw or "[]")
            ]
            labels[(name, raw)] = f"{name} ({'; '.join(steps)})"
    rows["countermeasure"] = [
        labels[key]
        for key in zip(rows["countermeasure"], rows["countermeasure_params"], strict=True)
    ]
    return rows


def worst_case(frame: pd.DataFrame, metrics=("fdfr", "ism", "linkability")) -> list[str]:
    """Each defense's worst case over the countermeasures that ran against an attack,
    as the boards rank: the attacker picks, per metric, the countermeasure that serves
    it best (FDFR lowest, ISM and linkability highest). The undefended attack is shown
    the same way, so what a countermeasure costs the attacker is visible."""
    rules = load_boards().defaults
    rows = frame[frame["defense"] != FLOOR]
    out = []
    for (attack, defense), group in rows.groupby(["attack", "defense"], sort=False):
        if group["countermeasure"].nunique() < 2:
            continue
        parts = []
        for m in metrics:
            known = group.dropna(subset=[m])
            if known.empty:
                continue
            # the defense's side says which way is better; the attacker takes the other
            higher = rules.higher_is_better(m, True)
            best_for_attacker = known[m].idxmin() if higher else known[m].idxmax()
            r = known.loc[best_for_attacker]
            interval = f"[{r[m + '_lo']:.3f}, {r[m + '_hi']:.3f}]"
            parts.append(f"{m} {r[m]:.3f} {interval} under {r['countermeasure']}")
        cms = ", ".join(sorted(group["countermeasure"].unique()))
        out.append(f"{attack}: {defense} worst case over {{{cms}}}: " + ", ".join(parts))
    return out


def person(spec) -> str:
    """A person across the campaign's galleries: the dataset's seed and the identity."""
    return f"{spec.dataset.kwargs.get('seed', 0)}/{spec.identity}"


def row_people(rows: pd.DataFrame) -> pd.Series:
    """The experiment's person (a bystander's rows belong to the protected person's
    experiment)."""
    specs = rows["spec_json"].map(json.loads)
    return specs.map(lambda s: f"{s['dataset'].get('seed', 0)}/{s['identity']}")


def by_subject(rows: pd.DataFrame) -> pd.DataFrame:
    """The model track's bystander rows as their own metrics (``bystander_ism``); the
    generic-image rows keep their names."""
    if "subject" not in rows:
        return rows
    rows = rows.copy()
    other = rows["subject"] == "unprotected"
    rows.loc[other, "metric"] = "bystander_" + rows.loc[other, "metric"]
    return rows


def protection_key(spec) -> str:
    """What a defense's output depends on: everything but the attacker's side."""
    return spec.override({"attack": "dreambooth", "countermeasure": "none"}).spec_id


def run(specs, store: ResultStore, ctx: RunContext) -> None:
    done = store.finished_ids()
    groups = defaultdict(list)
    for spec in specs:
        if spec.spec_id not in done:
            groups[protection_key(spec)].append(spec)
    total = sum(map(len, groups.values()))
    count = 0
    for group in groups.values():
        first = group[0]
        print(f"  protect {person(first)} {first.defense.name}", file=sys.stderr, flush=True)
        try:
            protected = protect_stage(first, ctx, lambda stage: None)
        except Exception as exc:
            for spec in group:
                store.write(failure_rows(spec, now(), exc, 0.0, ctx.name))
            continue
        for spec in group:
            count += 1
            handoff = dataclasses.replace(
                protected, checks=list(protected.checks), workers=list(protected.workers)
            )
            try:
                handoff = attack_stage(spec, ctx, handoff, lambda stage: None)
                handoff = score_stage(spec, ctx, handoff, lambda stage: None)
                rows = experiment_rows(spec, handoff)
            except Exception as exc:
                rows = failure_rows(spec, handoff.started, exc, 0.0, ctx.name)
            store.write(rows)
            print(
                f"  [{count}/{total}] {person(spec)} {spec.defense.name} {spec.attack.name} "
                f"{spec.countermeasure_name} ({handoff.seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )


def now() -> datetime:
    return datetime.now(UTC)


def floor(specs, store: ResultStore, ctx: RunContext) -> None:
    """The base model's own generations of the class prompts, on noise of each
    identity's own, scored against that identity like an attack's: what the metrics
    read when nothing learned the person (and whether the base model makes faces)."""
    done = store.finished_ids()
    for spec in {person(s): s for s in specs if s.defense.name == "none"}.values():
        # the image track's floor: the same spec whichever campaign asks for it
        spec = spec.override(
            {"suite": "validity-floor-v2", "countermeasure": "none", "track": "image"}
        )
        if spec.spec_id in done:
            continue
        identity = ctx.identity(spec)
        sampler = dataclasses.replace(spec.sampling.build(SAMPLERS), prompts=CLASS_PROMPTS)
        bundle = ctx.base_model(spec.base_model)
        handoff = Handoff(started=now(), protected=identity.set_B)
        noise = torch.Generator().manual_seed(zlib.crc32(person(spec).encode()) + spec.seed)
        handoff.generated = sampler.sample(bundle, spec.resolution, noise)
        handoff.prompts = list(sampler.image_prompts())
        handoff = score_stage(spec, ctx, handoff, lambda stage: None)
        store.write(experiment_rows(spec, handoff))


def table(
    rows: pd.DataFrame, floor_rows: pd.DataFrame, metrics: tuple[str, ...] = METRICS
) -> pd.DataFrame:
    rules = load_boards().defaults
    agg = rows[(rows["image_index"] == -1) & (rows["status"] == "ok")]
    agg = agg[agg["metric"].isin(metrics)]
    out = []
    keys = ["attack", "countermeasure", "defense"]
    order = {d: i for i, d in enumerate(["none", "aspl", "fsmg", "simac", "cap-aspl"])}
    order[baseline(agg["defense"].unique())] = -1
    for values, group in agg.groupby(keys, sort=False):
        out.append(_line(dict(zip(keys, values, strict=True)), group, rules, metrics))
    fl = floor_rows[(floor_rows["image_index"] == -1) & (floor_rows["status"] == "ok")]
    if not fl.empty:
        key = {"attack": "-", "countermeasure": "-", "defense": FLOOR}
        out.append(_line(key, fl, rules, metrics))
    frame = pd.DataFrame(out)
    frame["_o"] = frame["defense"].map(order).fillna(99)
    return frame.sort_values(["attack", "countermeasure", "_o"]).drop(columns="_o")


def _line(key: dict, group: pd.DataFrame, rules, metrics: tuple[str, ...]) -> dict:
    line = dict(key)
    line["n"] = group["person"].nunique()
    for metric in metrics:
        per_identity = group[group["metric"] == metric].groupby("person")["value"].mean()
        values = per_identity.dropna().to_numpy()
        low, high = mean_interval(values, rules)
        line[metric] = values.mean() if len(values) else np.nan
        line[f"{metric}_lo"], line[f"{metric}_hi"] = low, high
    return line


def show(frame: pd.DataFrame, metrics: tuple[str, ...] = METRICS) -> str:
    def cell(r, m):
        if pd.isna(r[m]):
            return "-"
        if np.isinf(r[m]):  # PSNR of unchanged photos
            return "unchanged"
        digits = 1 if m in ("brisque", "psnr") else 4 if m == "subject_latent_distance" else 3
        return f"{r[m]:.{digits}f} [{r[m + '_lo']:.{digits}f}, {r[m + '_hi']:.{digits}f}]"

    head = ["attack", "countermeasure", "defense", "n", *metrics]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for _, r in frame.iterrows():
        lines.append(
            " | ".join(
                [r["attack"], r["countermeasure"], r["defense"], str(r["n"])]
                + [cell(r, m) for m in metrics]
            )
        )
    return "\n".join(lines)


def apart(a: pd.Series, b: pd.Series, metric: str) -> bool:
    """Intervals that do not overlap."""
    return bool(a[f"{metric}_hi"] < b[f"{metric}_lo"] or b[f"{metric}_hi"] < a[f"{metric}_lo"])


def checks(frame: pd.DataFrame) -> list[str]:
    out = []
    fl = frame[frame["defense"] == FLOOR]
    if not fl.empty:
        f = fl.iloc[0]
        out.append(f"base model makes faces: FDFR {f['fdfr']:.3f} (<= 0.2: {f['fdfr'] <= 0.2})")
    for (attack, cm), group in frame[frame["defense"] != FLOOR].groupby(
        ["attack", "countermeasure"]
    ):
        by = group.set_index("defense")
        if "none" in by.index and cm == "none" and not fl.empty:
            n = by.loc["none"]
            out.append(
                f"{attack}: undefended linkability {n['linkability']:.3f} (>= 0.6: "
                f"{n['linkability'] >= 0.6}; floor {f['linkability']:.3f}), ISM {n['ism']:.3f} "
                f"vs floor {f['ism']:.3f}, intervals apart: {apart(n, f, 'ism')}"
            )
        for defense in by.index:
            d, parts = by.loc[defense], {}
            for m in COMPARED:
                having = by.index[by[m].notna()] if m in by else []
                ref = reference(by.index, having)
                if ref is None or ref == defense or m not in d or pd.isna(d[m]):
                    continue
                n = by.loc[ref]
                parts.setdefault(ref, []).append(
                    f"{m} {n[m]:.3f} -> {d[m]:.3f} (apart: {apart(n, d, m)})"
                )
            extra = []
            if "psnr" in d and pd.notna(d["psnr"]):
                extra.append(f"PSNR {d['psnr']:.1f} dB")
            if "generic_loss_gain" in d and pd.notna(d["generic_loss_gain"]):
                extra.append(f"generic_loss_gain {d['generic_loss_gain']:+.4f}")
            for i, (ref, measured) in enumerate(parts.items()):
                shown = measured + (extra if i == len(parts) - 1 else [])
                out.append(f"{attack} / {cm}: {defense} against {ref}: " + ", ".join(shown))
    return out


# what a defense must change against the undefended attack (bystander: must not)
COMPARED = (
    "ism",
    "linkability",
    "person_loss",
    "bystander_ism",
    "bystander_linkability",
    "bystander_person_loss",
    "decoupled_ism",
    "subject_latent_distance",
    "backdoor_target_distance",
    "bystander_backdoor_target_distance",
    "backdoor_pattern",
    "bystander_backdoor_pattern",
)


def paired(rows: pd.DataFrame) -> list[str]:
    """Each defense against the undefended attack on the same people (and the same
    sampling noise): the mean of per-person differences with its bootstrap interval.
    Person-to-person spread cancels here, which the rows' own intervals keep."""
    rules = load_boards().defaults
    agg = rows[(rows["image_index"] == -1) & (rows["status"] == "ok")]
    out = []
    for (attack, cm), group in agg.groupby(["attack", "countermeasure"]):
        by = group.pivot_table(index="person", columns=["metric", "defense"], values="value")
        defenses = group["defense"].unique()
        for defense in sorted(defenses):
            parts: dict[str, list[str]] = {}
            for metric in ("fdfr", *COMPARED):
                base = reference(defenses, [r for r in defenses if (metric, r) in by])
                if base in (None, defense) or (metric, defense) not in by:
                    continue
                diff = (by[(metric, defense)] - by[(metric, base)]).dropna().to_numpy()
                if len(diff) < 2:
                    continue
                low, high = mean_interval(diff, rules)
                sign = "below 0" if high < 0 else "above 0" if low > 0 else "spans 0"
                parts.setdefault(base, []).append(
                    f"{metric} {diff.mean():+.3f} [{low:+.3f}, {high:+.3f}] ({sign})"
                )
            for base, measured in parts.items():
                n = by[("ism", defense)].notna().sum() if ("ism", defense) in by else 0
                out.append(
                    f"{attack} / {cm}: {defense} minus {base}, paired over {n} people: "
                    + ", ".join(measured)
                )
    return out


def calibrate(identities: int = 16, backend: str = "offline") -> None:
    """Per-photo ISM of each person's set_B and set_C photos against their own set_A mean
    (same person) and against every other person's (different person): where the
    boards' baseline bound for this backend comes from."""
    from antipers.data.synthetic import SyntheticDataset
    from antipers.metrics.faces import face_backend
    from antipers.metrics.identity import mean_embedding

    dataset = SyntheticDataset(n_identities=identities)
    people = [dataset.load(name, 64) for name in dataset.identities()]
    means = [mean_embedding(p.set_A, backend, "references")[0] for p in people]
    faces = face_backend(backend)
    same, other = [], []
    for i, person in enumerate(people):
        emb = faces.embed(torch.cat([person.set_B, person.set_C]))
        emb = emb[~np.isnan(emb).any(axis=1)]
        for j, mean in enumerate(means):
            (same if i == j else other).extend(emb @ mean)
    q = [0.05, 0.5, 0.95, 0.99]
    print(f"ISM calibration ({faces.name}, {identities} synthetic people, 64 px)")
    print("which | photos | " + " | ".join(f"q{int(x * 100)}" for x in q))
    print("--- | --- | " + " | ".join("---" for _ in q))
    for name, values in (("same person", same), ("different person", other)):
        cells = " | ".join(f"{v:.3f}" for v in np.quantile(values, q))
        print(f"{name} | {len(values)} | {cells}")
    print(f"baseline bound (different-person q95): {np.quantile(other, 0.95):.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaign", default=str(CAMPAIGN))
    parser.add_argument("--store", default=str(STORE))
    parser.add_argument("--identities", type=int, help="the first N identities only")
    parser.add_argument("--defenses", help="comma-separated subset")
    parser.add_argument("--attacks", help="comma-separated subset")
    parser.add_argument("--countermeasures", help="comma-separated subset (none, jpeg, purify)")
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--table-people", type=int, default=8, help="people in the main table (the rest: checks)"
    )
    parser.add_argument("--no-run", action="store_true", help="only the tables of what is stored")
    parser.add_argument(
        "--floor-only", action="store_true", help="run only the floor (base model) rows"
    )
    parser.add_argument(
        "--calibrate", action="store_true", help="only the ISM calibration of the face backend"
    )
    args = parser.parse_args(argv)
    if args.calibrate:
        calibrate()
        return 0

    from antipers.device import pick_device

    specs = list(load_campaign(args.campaign).specs)
    people = sorted({person(s) for s in specs}, key=lambda p: (int(p.split("/")[0]), p))
    people = people[: args.identities or None]
    specs = [s for s in specs if person(s) in people]
    for field, attr in (("defenses", "defense"), ("attacks", "attack")):
        if getattr(args, field):
            keep = set(getattr(args, field).split(","))
            specs = [s for s in specs if getattr(s, attr).name in keep]
    if args.countermeasures:
        keep = set(args.countermeasures.split(","))
        specs = [s for s in specs if s.countermeasure_name.split("+")[0] in keep]
    store = ResultStore(args.store)
    floor_store = ResultStore(str(Path(args.store) / "floor"))
    if not args.no_run:
        ctx = RunContext(device=pick_device(args.device))
        if not args.floor_only:
            print(f"{len(specs)} experiments on {len(people)} people", file=sys.stderr)
            run(specs, store, ctx)
        floor(specs, floor_store, ctx)
    wanted = {s.spec_id for s in specs}
    rows = by_subject(store.load())
    rows = rows[rows["spec_id"].isin(wanted)]
    floor_rows = floor_store.load()
    if rows.empty:
        print("nothing stored yet for these experiments")
        return 0
    rows = labelled(rows)
    # the track's columns that these experiments measure (APDM has no backdoor check)
    stored = set(rows["metric"])
    track = TRACK_METRICS.get(specs[0].track, METRICS)
    metrics = tuple(m for m in track if m in stored or m in METRICS)
    rows["person"], floor_rows["person"] = row_people(rows), row_people(floor_rows)
    first = set(people[: args.table_people])
    blocks = [(f"the first {len(first)} people", first)]
    if len(people) > len(first):
        # the same people in every row: those that every defense stored has run on
        ran = rows.groupby("defense")["person"].agg(set)
        common = set(people).intersection(*ran) if len(ran) else set()
        blocks.append((f"the {len(common)} people every defense has run on", common))
    for title, chosen in blocks:
        frame = table(
            rows[rows["person"].isin(chosen)],
            floor_rows[floor_rows["person"].isin(chosen)],
            metrics,
        )
        if title != blocks[0][0]:
            frame = frame[frame["n"] > len(first)]
        print(f"## {title}\n")
        print(show(frame, metrics))
        print()
        lines = checks(frame) + worst_case(frame) + paired(rows[rows["person"].isin(chosen)])
        for line in lines:
            print("- " + line)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The commands that do their work in this process, without Ray: ``experiment`` (one
spec into a store), ``protect`` (a person's photo folder) and ``score`` (a folder of
generated images)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from antipers.commands.common import CLIError, choose_device, parse_set


def _print_rows(rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    if (df["status"] == "error").any():
        print(f"FAILED {rows[0]['spec_id']}:\n{rows[0]['error']}")
        return
    agg = df[df["image_index"] == -1]
    cols = ["spec_id", "identity", "defense", "attack", "metric", "value", "backend"]
    print(agg[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"({len(df)} rows: {len(agg)} aggregates + per-image values)")


def cmd_experiment(args: argparse.Namespace) -> int:
    from antipers.pipeline import RunContext, run_and_store
    from antipers.results import ResultStore
    from antipers.spec import load_spec

    spec = load_spec(args.spec)
    if args.set:
        spec = spec.override(parse_set(args.set))
    print(f"experiment {spec.spec_id}: {spec.describe()}", file=sys.stderr)
    store = ResultStore(args.store)
    context = RunContext(device=choose_device(args.device))
    rows, ran = run_and_store(
        spec,
        store,
        context,
        force=args.force,
        progress=lambda stage: print(f"  [{spec.spec_id}] {stage}", file=sys.stderr),
        images=args.images == "thumbnails",
    )
    if not ran:
        print(
            f"already in {args.store}: {spec.spec_id} (use --force to run again)", file=sys.stderr
        )
    _print_rows(rows)
    return 1 if any(r["status"] == "error" for r in rows) else 0


def cmd_protect(args: argparse.Namespace) -> int:
    import logging

    from antipers.protect import ProtectError, plan, protect_folder

    if args.resolution < 8 or args.resolution % 8:
        raise CLIError(f"--resolution: expected a positive multiple of 8, got {args.resolution}")
    params = parse_set(args.param, "--param")
    try:
        p = plan(
            Path(args.in_dir),
            Path(args.out_dir),
            args.defense,
            params,
            args.base_model,
            args.overwrite,
        )
    except ProtectError as exc:
        raise CLIError(str(exc)) from None
    device = choose_device(args.device)
    for name in ("antipers.defenses", "antipers.protect"):  # progress on stderr
        logging.getLogger(name).setLevel(logging.INFO)
    print(
        f"protecting {len(p.photos)} photos from {args.in_dir} with {p.defense.name}",
        file=sys.stderr,
    )
    report = protect_folder(p, Path(args.out_dir), args.resolution, args.seed, device)
    for photo in report["photos"]:
        print(
            f"  {Path(photo['output']).name}: L-inf {photo['linf_255']:.0f}/255, "
            f"PSNR {photo['psnr_db']:.2f} dB, SSIM {photo['ssim']:.4f}"
        )
    print(f"wrote {len(report['photos'])} protected photos and protect.json to {args.out_dir}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from antipers.score import ScoreError, ScoreJob, parse_metrics, run_score, write_rows

    if args.resolution < 8:
        raise CLIError(f"--resolution: expected at least 8, got {args.resolution}")
    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    optional = {
        k: Path(getattr(args, k)) if getattr(args, k) else None
        for k in ("gallery", "protected", "clean")
    }
    try:
        job = ScoreJob(
            generated=Path(args.generated),
            references=Path(args.references),
            metrics=parse_metrics(names, args.backend),
            resolution=args.resolution,
            identity=args.identity or "",
            **optional,
        )
        rows = run_score(job)
    except ScoreError as exc:
        raise CLIError(str(exc)) from None
    import pandas as pd

    df = pd.DataFrame(rows)
    agg = df[df["image_index"] == -1]
    cols = ["metric", "value", "unit", "backend", "status"]
    print(agg[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for _, row in agg[agg["status"] != "ok"].iterrows():
        print(f"{row['metric']}: {row['status']}: {row['error']}", file=sys.stderr)
    if args.out:
        print(f"wrote {len(rows)} rows to {write_rows(rows, Path(args.out))}")
    return 0

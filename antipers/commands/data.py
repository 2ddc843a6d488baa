"""``antipers data check`` and ``antipers data synth``: dataset folders, checked or
written, before any experiment reads them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from antipers.commands.common import CLIError, from_flags


def cmd_data_check(args: argparse.Namespace) -> int:
    from antipers.data.folders import open_folder
    from antipers.data.identity import DatasetError

    try:
        dataset = open_folder(args.dir, args.min_photos)
    except DatasetError as exc:
        print("\n".join(exc.problems))
        return 1
    problems = dataset.check()
    layout = type(dataset).__name__
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s) ({layout}):")
        print("\n".join(f"  {p}" for p in problems))
        return 1
    identities = dataset.identities()
    print(f"{args.dir}: ok ({layout}), {len(identities)} identities")
    for identity in identities:
        counts = {k: len(v) for k, v in dataset.photo_sets(identity).items()}
        print(f"  {identity}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from antipers.data.synthetic import SyntheticDataset, face_generator
    from antipers.images import write_png

    if args.resolution < 8:
        raise CLIError(f"--resolution: expected at least 8 pixels, got {args.resolution}")
    options = {
        "n_identities": ("--identities", args.identities),
        "photos_per_set": ("--photos-per-set", args.photos_per_set),
        "nudge": ("--nudge", args.nudge),
        "seed": ("--seed", args.seed),
    }
    dataset = from_flags(SyntheticDataset, options)
    face_generator()  # the synth extra, checked before any folder is written
    out = Path(args.out)
    for identity in dataset.identities():
        photos = dataset.load(identity, args.resolution)
        for name, images in [
            ("set_A", photos.set_A),
            ("set_B", photos.set_B),
            ("set_C", photos.set_C),
        ]:
            write_png(images, [out / identity / name / f"{i:02d}.png" for i in range(len(images))])
        print(f"  {out / identity}", file=sys.stderr)
    print(f"wrote {args.identities} synthetic identities to {out}")
    return 0

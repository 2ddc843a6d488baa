"""``antipers models train-mini`` and ``train-embedder``: antipers' own weights,
reproduced from the settings the user gives (the rest default to the shipped run's)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from antipers.commands.common import choose_device, from_flags


def _train_config(cls: Any, args: argparse.Namespace, names: tuple[str, ...]) -> Any:
    """The defaults, with the options the user gave (``--pool`` sets ``pool``)."""
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    return from_flags(cls, {n: ("--" + n.replace("_", "-"), v) for n, v in given.items()})


def cmd_train_mini(args: argparse.Namespace) -> int:
    from antipers.models.train_mini import MiniTrainConfig, train_mini

    config = _train_config(MiniTrainConfig, args, ("seed", "pool", "vae_steps", "unet_steps"))
    folder = train_mini(Path(args.out), config, choose_device(args.device))
    print(f"wrote {folder} (checkpoints and loss log in {Path(args.out) / 'work'})")
    return 0


def cmd_train_embedder(args: argparse.Namespace) -> int:
    from antipers.models.train_embedder import EmbedderTrainConfig, train_embedder

    config = _train_config(EmbedderTrainConfig, args, ("seed", "people", "steps"))
    folder = train_embedder(Path(args.out), config, choose_device(args.device))
    print(f"wrote {folder} (checkpoints and loss log in {Path(args.out) / 'work-embedder'})")
    return 0

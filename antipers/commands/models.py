"""``antipers models train-mini`` and ``train-embedder``: antipers' own weights,
reproduced from the settings the user gives (the rest default to the shipped run's)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from antipers.commands.common import CLIError, choose_device


def _train_config(cls: Any, args: argparse.Namespace, names: tuple[str, ...]) -> Any:
    """The defaults, with the options the user gave; a bad value is a CLI error that
    names its flag."""
    from antipers.ranges import field_ranges

    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    for name, bounds in field_ranges(cls).items():
        if name in given and not bounds.contains(given[name]):
            flag = "--" + name.replace("_", "-")
            raise CLIError(f"{flag}: expected {bounds}, got {given[name]}")
    try:
        return cls(**given)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


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

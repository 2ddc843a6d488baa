"""One training's work folder and export, shared by ``train-mini`` and
``train-embedder``: the check that a resumed run has the same settings, inputs built
once and cached, stage timings summed over resumed runs, and the export renamed into
place with where and from what code it was trained."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from antipers.errors import UserError
from antipers.models.training_loop import atomic_save

# settings that do not change the weights: a resumed run may differ in them
_NOT_WEIGHTS = {"checkpoint_every_s", "eval_identities", "eval_samples"}


def check_same_run(path: Path, config: Any, command: str = "train-mini") -> None:
    """Checkpoints in ``work`` belong to one configuration; resuming them under other
    settings would mix two trainings."""
    before = read_json(path)
    now = dataclasses.asdict(config)
    changed = sorted(
        k for k in now if k not in _NOT_WEIGHTS and k in before and before[k] != now[k]
    )
    if changed:
        diff = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
        raise UserError(
            f"{command}: {path.parent} holds a training with other settings ({diff}); "
            "give another --out, or the same settings to resume it"
        )


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().to(torch.uint8)


def cached(path: Path, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Generating faces takes minutes: do it once per work folder, saved atomically."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    tensor = build()
    atomic_save(tensor, path)
    return tensor


def timed_stage(work: Path, timings: dict[str, float], stage: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; add its time to ``timings`` and ``work/timings.json``, so a resumed
    training reports the time of all its runs."""
    t0 = time.monotonic()
    value = fn()
    timings[stage] = timings.get(stage, 0.0) + time.monotonic() - t0
    (work / "timings.json").write_text(json.dumps(timings, indent=1))
    return value


def staged_export(folder: Path, write: Callable[[Path], None]) -> Path:
    """``write`` fills a staging folder beside ``folder``, which then replaces it: a crash
    leaves the old export or none, never half of one."""
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old)
    else:
        staging.rename(folder)
    return folder


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def git_commit() -> str:
    """The commit the training code is at, marked where ``antipers/`` has changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "antipers"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{sha}{' (uncommitted changes)' if dirty else ''}" if sha else "unknown"

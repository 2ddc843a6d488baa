"""The resumable training loop that ``train-mini`` and ``train-embedder`` share.

Every step's randomness comes from a generator seeded by (seed, stage, step), and a
checkpoint holds the module, optimizer, schedule and EMA, so a run resumed from a
checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

STAGES = ("vae", "unet", "embedder")  # the index seeds each stage's draws


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 7_919 + STAGES.index(stage)) * 10_000_019 + step)


def adamw_cosine(module: torch.nn.Module, lr: float, steps: int, warmup: int) -> tuple[Any, Any]:
    """AdamW with a warmed-up cosine schedule: the one recipe of both trainings."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-2)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    return optimizer, schedule


@dataclass
class Loop:
    """One stage's trainable state; ``step_fn(step, generator) -> loss`` does the work."""

    stage: str
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    steps: int
    ema: Any = None


def run_loop(
    loop: Loop,
    step_fn: Callable[[int, torch.Generator], torch.Tensor],
    work: Path,
    config: Any,
    max_grad_norm: float = 1.0,
) -> None:
    """Train from the stage's last checkpoint to ``loop.steps``: checkpoint every
    ``checkpoint_every_s`` and at the end, one loss-log line per step. ``config``: any
    training configuration with ``seed`` and ``checkpoint_every_s``."""
    ckpt = work / f"{loop.stage}.ckpt"
    start = _restore(loop, ckpt)
    losses = _LossLog(work / "losses.csv", loop.stage, keep_until=start)
    last_save = time.monotonic()
    loop.module.train()
    bar = progress(range(start, loop.steps), loop.stage, initial=start, total=loop.steps)
    for step in bar:
        loss = step_fn(step, step_generator(config.seed, loop.stage, step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(loop.module.parameters(), max_grad_norm)
        loop.optimizer.step()
        lr = loop.schedule.get_last_lr()[0]  # this step's, before the schedule moves on
        loop.schedule.step()
        loop.optimizer.zero_grad(set_to_none=True)
        if loop.ema is not None:
            loop.ema.step(loop.module.parameters())
        value = loss.item()
        losses.add(step, value, lr)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if time.monotonic() - last_save > config.checkpoint_every_s or step + 1 == loop.steps:
            losses.flush()
            _checkpoint(loop, step + 1, ckpt)
            last_save = time.monotonic()
    losses.flush()
    loop.module.eval()


def _checkpoint(loop: Loop, step: int, path: Path) -> None:
    state = {
        "step": step,
        "module": loop.module.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "schedule": loop.schedule.state_dict(),
        "ema": loop.ema.state_dict() if loop.ema is not None else None,
    }
    atomic_save(state, path)


def _restore(loop: Loop, path: Path) -> int:
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=False, map_location="cpu")
    loop.module.load_state_dict(state["module"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.schedule.load_state_dict(state["schedule"])
    if loop.ema is not None and state["ema"] is not None:
        loop.ema.load_state_dict(state["ema"])
    log.info("%s: resumed at step %d from %s", loop.stage, state["step"], path)
    return int(state["step"])


class _LossLog:
    """``losses.csv`` (stage, step, loss, lr); lines past a restored checkpoint dropped."""

    FIELDS = ("stage", "step", "loss", "lr")

    def __init__(self, path: Path, stage: str, keep_until: int) -> None:
        self.path, self.stage = path, stage
        rows = read_losses(path)
        kept = [r for r in rows if r["stage"] != stage or int(r["step"]) < keep_until]
        self._write(kept, "w")
        self._pending: list[dict[str, Any]] = []

    def add(self, step: int, loss: float, lr: float) -> None:
        self._pending.append({"stage": self.stage, "step": step, "loss": loss, "lr": lr})

    def flush(self) -> None:
        self._write(self._pending, "a")
        self._pending = []

    def _write(self, rows: list[dict[str, Any]], mode: str) -> None:
        new = mode == "w" or not self.path.is_file()
        with self.path.open(mode, newline="") as fh:
            writer = csv.DictWriter(fh, self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)


def read_losses(path: Path) -> list[dict[str, Any]]:
    """The loss log's lines (all stages), for the exports' loss figures."""
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def atomic_save(obj: Any, path: Path) -> None:
    """A checkpoint or cache is whole or absent: a killed run never leaves half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def progress(iterable: Any, desc: str, **kwargs: Any) -> Any:
    """A tqdm bar that redraws rarely (trainings run for hours, often into a log file)."""
    from tqdm import tqdm

    unit_scale = kwargs.pop("unit_scale", None)
    if unit_scale:
        kwargs["unit"] = f"x{unit_scale}"
    return tqdm(iterable, desc=desc, mininterval=5, **kwargs)

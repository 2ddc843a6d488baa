"""What the benchmark scripts share: a child process per measurement (so each peak
memory is its own) and the peak-memory reading for the device in use."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

MARK = "RESULT "


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    """GPU: peak allocated; CPU: peak resident set of this process."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def median_seconds(
    fn: Callable[[], object],
    repeats: int,
    device: torch.device | None = None,
    warmup: bool = True,
) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (after one unmeasured run),
    waiting for the GPU before and after each."""

    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()

    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plain_adamw() -> None:
    """torch's default AdamW in this (child) process instead of the training loop's
    fused one: what reference code that calls ``torch.optim.AdamW(...)`` runs."""
    from antipers.attacks import training

    training.adamw = lambda params, lr, weight_decay: torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay
    )


def emit(result: dict[str, Any]) -> None:
    print(MARK + json.dumps(result), flush=True)


def in_child(
    script: str, args: list[str], env: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """Run ``script`` with ``args`` (and ``env`` over this environment) in a fresh
    interpreter; its emitted result or None."""
    out = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(MARK)), None)
    if out.returncode != 0 or line is None:
        print(f"{' '.join(args)} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(line.removeprefix(MARK))

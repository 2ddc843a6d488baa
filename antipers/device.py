"""Where work runs: the caller's choice, else CUDA when present, else the CPU."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def pick_device(preference: str | None = None) -> torch.device:
    """``preference`` ("auto", "cpu", "cuda", "cuda:1"), else ``$ANTIPERS_DEVICE``, else auto."""
    choice = preference or os.environ.get("ANTIPERS_DEVICE", "auto")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {choice!r} requested but CUDA is not available here")
    return device


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """bf16 autocast on CUDA (weights stay fp32 so training keeps full-precision
    masters); a no-op on the CPU, where bf16 matmuls are slower than fp32."""
    if enabled and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield

"""How the scoring service pools concurrent ``/v1/score`` requests: the settings, their
defaults per device, and their check before any replica starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from antipers import robustness
from antipers.cluster.client_options import OptionError


@dataclass(frozen=True)
class Batching:
    """Concurrent /v1/score requests scored together (``serve.batch``): their diffusion
    losses share padded micro-batches of ``micro_batch`` photos, each number as if
    scored alone (for one ``micro_batch``), and one batch runs at a time.

    It helps where a bigger forward pass costs little more than a small one (a GPU);
    on a CPU the work is linear in photos and pooling only adds waiting, so by default
    a CPU replica scores one request at a time in micro-batches of 4 (measured:
    benchmarks/serve.py)."""

    max_requests: int | None = None  # default: 8 on a GPU, 1 on a CPU
    wait_s: float = 0.02
    micro_batch: int | None = None  # default: 16 on a GPU, 4 on a CPU

    def __post_init__(self) -> None:
        for name in ("max_requests", "micro_batch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"batching.{name}: expected an integer >= 1, got {value!r}")
        if not isinstance(self.wait_s, int | float) or self.wait_s < 0:
            raise ValueError(f"batching.wait_s: expected seconds >= 0, got {self.wait_s!r}")

    def resolved(self, device: torch.device) -> Batching:
        gpu = device.type == "cuda"
        return Batching(
            self.max_requests or (8 if gpu else 1),
            self.wait_s,
            self.micro_batch or (16 if gpu else robustness.MICRO_BATCH),
        )


def check_batching(batching: Any) -> None:
    """A Serve config's ``batching:`` mapping, each refusal an ``OptionError``."""
    if not isinstance(batching, dict):
        raise OptionError(f"batching: expected a mapping, got {type(batching).__name__}")
    fields = [f.name for f in dataclasses.fields(Batching)]
    unknown = sorted(set(batching) - set(fields))
    if unknown:
        raise OptionError(f"batching.{unknown[0]}: unknown; use {', '.join(fields)}")
    try:
        Batching(**batching)
    except ValueError as exc:
        raise OptionError(str(exc)) from None

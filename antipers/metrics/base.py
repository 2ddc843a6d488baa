"""What every metric returns: per-image values plus their aggregate and provenance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MetricResult:
    """``values[i]`` belongs to generated image ``i`` (NaN: not defined for it, e.g. no
    face); ``aggregate`` is the metric's own summary over the set. ``higher_is_better``
    is from the defense's side, as Anti-DreamBooth's tables mark it (FDFR up, ISM down)."""

    metric: str
    values: np.ndarray
    aggregate: float
    backend: str
    higher_is_better: bool
    unit: str

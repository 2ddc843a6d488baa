"""What a defense hands to the attacker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from antipers.models.bundle import DiffusionBundle


@dataclass
class Protected:
    """``images``: the photos the attacker gets (image track: perturbed; else clean).
    ``bundle``: the base model the attacker personalizes (model track: protected).
    ``personalized``: set on the immunization track, where the defense personalizes."""

    images: torch.Tensor
    bundle: DiffusionBundle
    personalized: DiffusionBundle | None = None
    log: Any = None  # what the defense wants to report (e.g. CAP's weights); not stored
    # defense-specific measures of the generated images (``score(bundle, images)`` ->
    # MetricResult), scored with the metrics: e.g. how much of a backdoor shows
    checks: list[Any] = field(default_factory=list)

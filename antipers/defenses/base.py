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
    ``personalizer``: on the immunization track, where the defense is the
    personalization: an object whose ``personalize(images, bundle, attack, generator,
    identity)`` returns the personalized bundle and checks to score; the attack stage
    runs it in place of the attack's own."""

    images: torch.Tensor
    bundle: DiffusionBundle
    personalizer: Any = None
    log: Any = None  # what the defense wants to report (e.g. CAP's weights); not stored
    # defense-specific measures of the generated images (``score(bundle, images)`` ->
    # MetricResult), scored with the metrics: e.g. how much of a backdoor shows
    checks: list[Any] = field(default_factory=list)

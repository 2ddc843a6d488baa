"""What an attacker does to the photos before personalizing on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoCountermeasure:
    """Train on the published photos as they are."""

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return images

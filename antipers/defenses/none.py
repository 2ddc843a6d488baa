"""The baseline: nothing is protected; the attacker gets the photos and model as they are."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from antipers.data.identity import IdentitySet
from antipers.defenses.base import Protected
from antipers.models.bundle import DiffusionBundle


@dataclass(frozen=True)
class NoDefense:
    """Publishes set_B unchanged: the reference every defense is compared against."""

    def protect(
        self, identity: IdentitySet, bundle: DiffusionBundle, generator: torch.Generator
    ) -> Protected:
        return Protected(images=identity.set_B, bundle=bundle)

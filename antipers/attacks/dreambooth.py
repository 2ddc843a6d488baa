"""DreamBooth: full fine-tuning of the UNet (and by default the text encoder)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from antipers.attacks.personalize import Personalization
from antipers.models.bundle import DiffusionBundle


@dataclass(frozen=True)
class DreamBooth(Personalization):
    """Full DreamBooth (protocol: lr 5e-7, batch 2, 1000 steps, prior 1, 200 class images)."""

    def trainable(
        self, bundle: DiffusionBundle, generator: torch.Generator
    ) -> tuple[DiffusionBundle, list[torch.nn.Parameter]]:
        names = ("unet", "text_encoder") if self.train_text_encoder else ("unet",)
        trained = bundle.copy_of(*names)
        params = []
        for name in names:
            module = getattr(trained, name)
            module.requires_grad_(True)
            params += list(module.parameters())
        return trained, params

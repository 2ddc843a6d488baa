"""The model a PGD defense attacks, trained in place between snapshots.

ASPL's reference code deep-copies the UNet and text encoder every iteration. Here the
surrogate is one trainable copy (full weights, or LoRA adapters on the base), and an
iteration snapshots and restores only the weights that train: memory stays close to
one model, its trainable copy and the optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from antipers.attacks.dreambooth import DreamBooth
from antipers.attacks.lora import LoRADreamBooth
from antipers.attacks.personalize import Personalization
from antipers.attacks.training import TrainData, finetune
from antipers.models.bundle import DiffusionBundle

SurrogateKind = Literal["dreambooth", "lora"]


@dataclass
class Surrogate:
    bundle: DiffusionBundle
    attack: Personalization
    trainable: dict[str, torch.nn.Parameter]
    prompt: str

    @classmethod
    def build(
        cls,
        base: DiffusionBundle,
        kind: SurrogateKind,
        lr: float,
        train_text_encoder: bool,
        prompt: str,
        generator: torch.Generator,
    ) -> Surrogate:
        common = {
            "steps": 1,
            "lr": lr,
            "prior_weight": 0.0,
            "train_text_encoder": train_text_encoder,
            "instance_prompt": prompt,
        }
        attack = DreamBooth(**common) if kind == "dreambooth" else LoRADreamBooth(**common)
        bundle, _ = attack.trainable(base, generator)
        trainable = {
            f"{part}.{name}": p
            for part in ("unet", "text_encoder")
            for name, p in getattr(bundle, part).named_parameters()
            if p.requires_grad
        }
        return cls(bundle, attack, trainable, prompt)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable weights only (never the VAE or frozen parts)."""
        return {name: p.detach().clone() for name, p in self.trainable.items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(snapshot[name])

    def train(self, images: torch.Tensor, steps: int, generator: torch.Generator) -> list[float]:
        if steps <= 0:
            return []
        config = self.attack.train_config()
        config = type(config)(**{**config.__dict__, "steps": steps, "batch_size": len(images)})
        return finetune(
            self.bundle,
            TrainData(images.detach(), self.prompt),
            list(self.trainable.values()),
            config,
            generator,
            self.attack.train_text_encoder,
        )

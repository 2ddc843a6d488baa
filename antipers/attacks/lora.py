"""LoRA DreamBooth: the cheap attacker. Low-rank adapters on the UNet's attention
projections, trained on the (protected) photos with the instance prompt."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from antipers.attacks.training import TrainConfig, finetune
from antipers.models.bundle import DiffusionBundle

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoRADreamBooth:
    """Protocol values: rank 4+, lr 1e-4, 1000-2000 steps; defaults are the protocol's
    low end so the attacker is as the field runs it."""

    steps: int = 1000
    lr: float = 1e-4
    rank: int = 4
    alpha: float = 4.0
    batch_size: int = 2
    instance_prompt: str = "a photo of sks person"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.rank < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("lora: steps, rank, batch_size must be >= 1 and lr > 0")

    def personalize(
        self, images: torch.Tensor, bundle: DiffusionBundle, generator: torch.Generator
    ) -> DiffusionBundle:
        """A new bundle whose UNet (a copy) carries trained LoRA adapters; the
        resident base model is not touched."""
        from peft import LoraConfig

        unet = copy.deepcopy(bundle.unet)
        unet.add_adapter(
            LoraConfig(
                r=self.rank,
                lora_alpha=self.alpha,
                init_lora_weights="gaussian",
                target_modules=list(LORA_TARGETS),
            )
        )
        trained = bundle.replace(unet=unet)
        params = [p for p in unet.parameters() if p.requires_grad]
        config = TrainConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size)
        finetune(trained, images, self.instance_prompt, params, config, generator)
        unet.requires_grad_(False)
        return trained

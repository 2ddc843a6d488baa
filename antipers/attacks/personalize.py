"""What DreamBooth and LoRA share: the protocol's settings, prior preservation with
cached class images, and the call into the one training loop. A subclass says only
which weights it trains."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch

from antipers.attacks.class_images import ClassImageSettings
from antipers.attacks.training import LRSchedule, TrainConfig, TrainData, finetune
from antipers.models.bundle import DiffusionBundle
from antipers.ranges import Range


@dataclass(frozen=True)
class Personalization(ClassImageSettings):
    """DreamBooth as Anti-DreamBooth evaluates it (PROTOCOL.md, adb-v1)."""

    steps: Annotated[int, Range(ge=1)] = 1000
    lr: Annotated[float, Range(gt=0)] = 5e-7
    batch_size: Annotated[int, Range(ge=1)] = 2
    grad_accum: Annotated[int, Range(ge=1)] = 1
    lr_schedule: LRSchedule = "constant"
    warmup_steps: Annotated[int, Range(ge=0)] = 0
    max_grad_norm: float = 1.0
    instance_prompt: str = "a photo of sks person"
    prior_weight: Annotated[float, Range(ge=0)] = 1.0
    train_text_encoder: bool = True
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps: expected 0..steps ({self.steps}), got {self.warmup_steps}"
            )
        self.check_prior(self.prior_weight)

    # -- what a subclass decides -------------------------------------------------------
    def trainable(
        self, bundle: DiffusionBundle, generator: torch.Generator
    ) -> tuple[DiffusionBundle, list[torch.nn.Parameter]]:
        """A bundle with its own copies of the weights to train, and those parameters."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------
    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            lr_schedule=self.lr_schedule,
            warmup_steps=self.warmup_steps,
            max_grad_norm=self.max_grad_norm,
            gradient_checkpointing=self.gradient_checkpointing,
            prior_weight=self.prior_weight,
        )

    def class_images(self, bundle: DiffusionBundle, resolution: int) -> torch.Tensor | None:
        if self.prior_weight <= 0:
            return None
        return self.generic_images(bundle, resolution)

    def personalize(
        self,
        images: torch.Tensor,
        bundle: DiffusionBundle,
        generator: torch.Generator,
        on_step: Callable[[int, DiffusionBundle], torch.Tensor | None] | None = None,
    ) -> DiffusionBundle:
        """A new bundle trained on ``images``; the resident ``bundle`` is not touched.
        ``on_step(step, trained)`` runs after each optimizer step; images it returns
        are what the following steps train on (IDDM's decoupling rounds)."""
        data = TrainData(
            images=images,
            prompt=self.instance_prompt,
            class_images=self.class_images(bundle, images.shape[-1]),
            class_prompt=self.class_prompt,
        )
        trained, params = self.trainable(bundle, generator)
        hook = None if on_step is None else (lambda step, _loss: on_step(step, trained))
        finetune(
            trained, data, params, self.train_config(), generator, self.train_text_encoder, hook
        )
        for p in params:
            p.requires_grad_(False)
        return trained.replace(fingerprint="")

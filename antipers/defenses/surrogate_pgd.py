"""What every surrogate-based PGD defense shares: settings, validation, the
objective hook, and one PGD call per attack step.

By default the surrogate trains as Anti-DreamBooth's reference does: one instance photo
and one of the base model's class images per step, prior loss weight 1
(``prior_weight: 0, surrogate_batch: 4`` is the earlier whole-set behaviour). EOT
entries take parameters (``eot: [{name: jpeg, quality: 50}, blur]``); an EOT
``purify`` denoises with the frozen base model, not the surrogate being trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import torch

from antipers.attacks.class_images import ClassImageSettings
from antipers.attacks.countermeasures import AttackEnv
from antipers.data.identity import IdentitySet
from antipers.defenses.objectives import denoising_objective
from antipers.defenses.pgd import Objective, PGDConfig, eot_entry, eot_transforms, pgd
from antipers.defenses.surrogate import ClassPrior, Surrogate, SurrogateKind, frozen_copy
from antipers.models.bundle import DiffusionBundle
from antipers.models.recompute import checkpointed, encoder_checkpointed
from antipers.ranges import Range

log = logging.getLogger("antipers.defenses")

ADB_EPS = 6.375  # Anti-DreamBooth: 0.05 in [-1, 1]
ADB_STEP = 0.6375  # 5e-3 in [-1, 1]


@dataclass
class RunState:
    """Mutable per-protect state the hooks share (SimAC's interval, CAP's weights)."""

    t_range: tuple[int, int] | None = None
    pgd_chunk: int | None = None  # the memory plan's, for objectives that can split
    pgd_steps_done: int = 0
    cap_weights: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SurrogatePGD(ClassImageSettings):
    TRACKS: ClassVar[tuple[str, ...]] = ("image",)

    # below one 8-bit level no published PNG can differ from the original
    eps: Annotated[float, Range(ge=1, le=255, note="pixel units")] = ADB_EPS
    step_size: Annotated[float, Range(gt=0)] = ADB_STEP
    pgd_steps: Annotated[int, Range(ge=1)] = 6
    random_start: bool = False
    eot: tuple[str | dict[str, Any], ...] = ()
    instance_prompt: str = "a photo of sks person"
    surrogate: SurrogateKind = "dreambooth"
    surrogate_lr: Annotated[float, Range(gt=0)] = 5e-7
    train_text_encoder: bool = True
    # on the class images (reference: with_prior_preservation)
    prior_weight: Annotated[float, Range(ge=0)] = 1.0
    # instance photos per surrogate step (reference: 1)
    surrogate_batch: Annotated[int, Range(ge=1)] = 1
    offload_snapshots: bool = True

    def __post_init__(self) -> None:
        from antipers.registry import COUNTERMEASURES

        super().__post_init__()
        self.check_prior(self.prior_weight)
        for i, entry in enumerate(self.eot):
            name, params = eot_entry(entry)
            if name not in COUNTERMEASURES:
                raise ValueError(
                    f"eot[{i}]: unknown countermeasure {name!r}; known: {COUNTERMEASURES.names()}"
                )
            try:
                COUNTERMEASURES.build(name, params)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"eot[{i}]: {exc}") from None  # exc names the countermeasure

    def class_prior(self, bundle: DiffusionBundle, resolution: int) -> ClassPrior | None:
        """The base model's class images, encoded before it trains (None without prior)."""
        if self.prior_weight <= 0:
            return None
        images = self.generic_images(bundle, resolution)
        with torch.no_grad():
            return ClassPrior(bundle.posterior(images), self.class_prompt, self.prior_weight)

    def build_surrogate(
        self, bundle: DiffusionBundle, generator: torch.Generator, resolution: int
    ) -> Surrogate:
        prior = self.class_prior(bundle, resolution)
        purifies = any(eot_entry(e)[0] == "purify" for e in self.eot)
        # the surrogate trains in place: EOT purification needs the untrained model
        frozen = frozen_copy(bundle, self.train_text_encoder) if purifies else None
        surrogate = Surrogate.build(
            bundle,
            self.surrogate,
            self.surrogate_lr,
            self.train_text_encoder,
            self.instance_prompt,
            generator,
            offload=self.offload_snapshots,
            prior=prior,
            batch_size=self.surrogate_batch,
        )
        surrogate.frozen_base = frozen
        return surrogate

    # -- hooks a variant overrides ------------------------------------------------------
    def objective(
        self,
        bundle: DiffusionBundle,
        clean: torch.Tensor,
        generator: torch.Generator,
        state: RunState,
    ) -> Objective:
        return denoising_objective(
            bundle, self.instance_prompt, generator, state.t_range, state.pgd_chunk
        )

    def before_pgd(
        self,
        bundle: DiffusionBundle,
        x: torch.Tensor,
        clean: torch.Tensor,
        generator: torch.Generator,
        iteration: int,
        state: RunState,
    ) -> None:
        """Called before each PGD run (SimAC searches its timestep interval here)."""

    # -- shared ------------------------------------------------------------------------
    def attack_step(
        self,
        surrogate: Surrogate,
        x: torch.Tensor,
        clean: torch.Tensor,
        identity: IdentitySet,
        base: DiffusionBundle,
        generator: torch.Generator,
        iteration: int,
        state: RunState,
    ) -> torch.Tensor:
        self.before_pgd(surrogate.bundle, x, clean, generator, iteration, state)
        env = AttackEnv(surrogate.frozen_base or base, identity, generator)
        config = PGDConfig(
            self.eps, self.step_size, self.pgd_steps, self.random_start and iteration == 0
        )
        state.pgd_chunk = surrogate.plan.pgd_chunk
        objective = self.objective(surrogate.bundle, clean, generator, state)

        def counted(images: torch.Tensor, step: int) -> torch.Tensor:
            loss = objective(images, step)
            state.pgd_steps_done += 1
            return loss

        # the lean plan recomputes the UNet's and the VAE encoder's activations in backward
        on, model = surrogate.plan.checkpointing, surrogate.bundle
        with checkpointed([model.unet], on), encoder_checkpointed(model.vae, on):
            return pgd(x, clean, counted, config, generator, eot_transforms(self.eot, env))

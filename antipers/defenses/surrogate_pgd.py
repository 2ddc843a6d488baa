"""What every surrogate-based PGD defense shares: settings, validation, the
objective hook, and one PGD call per attack step."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from antipers.attacks.countermeasures import AttackEnv
from antipers.data.identity import IdentitySet
from antipers.defenses.objectives import denoising_objective
from antipers.defenses.pgd import Objective, PGDConfig, eot_transforms, pgd
from antipers.defenses.surrogate import Surrogate, SurrogateKind
from antipers.models.bundle import DiffusionBundle

log = logging.getLogger("antipers.defenses")

ADB_EPS = 6.375  # Anti-DreamBooth: 0.05 in [-1, 1]
ADB_STEP = 0.6375  # 5e-3 in [-1, 1]


@dataclass
class RunState:
    """Mutable per-protect state the hooks share (SimAC's interval, CAP's weights)."""

    t_range: tuple[int, int] | None = None
    pgd_steps_done: int = 0
    cap_weights: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SurrogatePGD:
    TRACKS: ClassVar[tuple[str, ...]] = ("image",)

    eps: float = ADB_EPS
    step_size: float = ADB_STEP
    pgd_steps: int = 6
    random_start: bool = False
    eot: tuple[str, ...] = ()
    instance_prompt: str = "a photo of sks person"
    surrogate: SurrogateKind = "dreambooth"
    surrogate_lr: float = 5e-7
    train_text_encoder: bool = True
    offload_snapshots: bool = True

    def __post_init__(self) -> None:
        from antipers.registry import COUNTERMEASURES

        if not 1 <= self.eps <= 255:
            # below one 8-bit level no published PNG can differ from the original
            raise ValueError(f"eps: expected a budget in [1, 255] pixel units, got {self.eps}")
        if self.step_size <= 0:
            raise ValueError(f"step_size: expected > 0, got {self.step_size}")
        if self.pgd_steps < 1:
            raise ValueError(f"pgd_steps: expected >= 1, got {self.pgd_steps}")
        if self.surrogate_lr <= 0:
            raise ValueError(f"surrogate_lr: expected > 0, got {self.surrogate_lr}")
        unknown = [n for n in self.eot if n not in COUNTERMEASURES]
        if unknown:
            raise ValueError(
                f"eot: unknown countermeasure(s) {unknown}; known: {COUNTERMEASURES.names()}"
            )

    def build_surrogate(self, bundle: DiffusionBundle, generator: torch.Generator) -> Surrogate:
        return Surrogate.build(
            bundle,
            self.surrogate,
            self.surrogate_lr,
            self.train_text_encoder,
            self.instance_prompt,
            generator,
            offload=self.offload_snapshots and bundle.device.type == "cuda",
        )

    # -- hooks a variant overrides ------------------------------------------------------
    def objective(
        self,
        bundle: DiffusionBundle,
        clean: torch.Tensor,
        generator: torch.Generator,
        state: RunState,
    ) -> Objective:
        return denoising_objective(bundle, self.instance_prompt, generator, state.t_range)

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
        env = AttackEnv(base, identity, generator)
        config = PGDConfig(
            self.eps, self.step_size, self.pgd_steps, self.random_start and iteration == 0
        )
        objective = self.objective(surrogate.bundle, clean, generator, state)

        def counted(images: torch.Tensor, step: int) -> torch.Tensor:
            loss = objective(images, step)
            state.pgd_steps_done += 1
            return loss

        return pgd(x, clean, counted, config, generator, eot_transforms(self.eot, env))

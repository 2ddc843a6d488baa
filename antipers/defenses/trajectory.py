"""A simulated attacker's trajectory, for defenses that change the base model (APDM's
Learning to Protect, PersGuard's backdoor retention): a temporary copy of the protected
UNet takes the attacker's fine-tuning steps (the shared training loop), and a
protection loss evaluated on that copy sends its gradients back to the protected
weights (first order). The copy is thrown away; it reaches the protected weights only
through those gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from antipers.attacks.training import TrainConfig, TrainData, finetune
from antipers.models.bundle import DiffusionBundle

ProtectionLoss = Callable[[DiffusionBundle], torch.Tensor]


class Trajectory:
    def __init__(self, protected: DiffusionBundle, loss: ProtectionLoss) -> None:
        self.loss = loss
        self.model = protected.replace(unet=copy.deepcopy(protected.unet))
        self.params = list(self.model.unet.parameters())
        self.accumulated = [torch.zeros_like(p) for p in self.params]
        self.losses: list[float] = []

    def accumulate(self) -> None:
        """The protection loss at the copy's current weights; its gradients added up."""
        loss = self.loss(self.model)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        for acc, g in zip(self.accumulated, grads, strict=True):
            if g is not None:
                acc.add_(g)
        self.losses.append(float(loss.detach()))

    def attack(
        self,
        data: TrainData,
        config: TrainConfig,
        generator: torch.Generator,
        every_step: bool = True,
    ) -> None:
        """The attacker's steps on the copy; the loss after each (or after the last)."""
        on_step = (lambda step, loss: self.accumulate()) if every_step else None
        finetune(self.model, data, self.params, config, generator, on_step=on_step)
        if not every_step:
            self.accumulate()

    def gradients(self) -> list[torch.Tensor]:
        """The mean over the evaluated points (in place: on an SD-class UNet every extra
        copy of the weights is gigabytes)."""
        return [acc.div_(max(len(self.losses), 1)) for acc in self.accumulated]

    def mean_loss(self) -> float:
        return sum(self.losses) / max(len(self.losses), 1)

    @torch.no_grad()
    def drift(self, params: list[torch.nn.Parameter]) -> float:
        """How far the attacker moved the copy from ``params``."""
        return float(
            sum((a - b).pow(2).sum() for a, b in zip(self.params, params, strict=True)).sqrt()
        )


def add_gradients(
    params: list[torch.nn.Parameter], grads: list[torch.Tensor], weight: float
) -> None:
    """``weight * grads`` into the protected weights' ``.grad``."""
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.mul_(weight)
        else:
            p.grad.add_(g, alpha=weight)


def send_back(
    protected: DiffusionBundle,
    params: list[torch.nn.Parameter],
    loss: ProtectionLoss,
    data: TrainData | None,
    config: TrainConfig,
    generator: torch.Generator,
    weight: float,
    every_step: bool = True,
) -> tuple[float, float]:
    """One simulated attack on ``data`` (none: the protected weights alone) whose
    protection-loss gradients go into ``params``' ``.grad``, weighted. The loss is taken
    at the protected weights and after every attacker step, or (``every_step`` false)
    only after the last. Returns the mean loss and how far the attacker moved."""
    path = Trajectory(protected, loss)
    if every_step or data is None:
        path.accumulate()
    if data is not None:
        path.attack(data, config, generator, every_step)
    drift = path.drift(params)
    add_gradients(params, path.gradients(), weight)
    return path.mean_loss(), drift

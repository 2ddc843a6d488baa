"""The model a PGD defense attacks, trained in place between snapshots.

ASPL's reference code deep-copies the UNet and text encoder every iteration. Here the
full-weight surrogate *is* the resident base model, trained in place: an iteration
snapshots and restores only the weights that train, and the original weights come
back when the defense is done (also on error). Snapshots live on the CPU when the
model is on a GPU, so GPU memory stays close to one model plus the optimizer state.
A LoRA surrogate trains adapters on a copy of the UNet instead (its snapshots are
tiny).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import torch

from antipers.attacks.dreambooth import DreamBooth
from antipers.attacks.lora import LoRADreamBooth
from antipers.attacks.personalize import Personalization
from antipers.attacks.training import TrainData, finetune
from antipers.models.bundle import DiffusionBundle

SurrogateKind = Literal["dreambooth", "lora"]
PARTS = ("unet", "text_encoder")


def trainable_parameters(bundle: DiffusionBundle) -> dict[str, torch.nn.Parameter]:
    return {
        f"{part}.{name}": p
        for part in PARTS
        for name, p in getattr(bundle, part).named_parameters()
        if p.requires_grad
    }


@dataclass
class Surrogate:
    bundle: DiffusionBundle
    attack: Personalization
    trainable: dict[str, torch.nn.Parameter]
    prompt: str
    offload: bool = True
    _original: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        base: DiffusionBundle,
        kind: SurrogateKind,
        lr: float,
        train_text_encoder: bool,
        prompt: str,
        generator: torch.Generator,
        offload: bool = True,
    ) -> Surrogate:
        common = {
            "steps": 1,
            "lr": lr,
            "prior_weight": 0.0,
            "train_text_encoder": train_text_encoder,
            "instance_prompt": prompt,
        }
        if kind == "lora":
            attack: Personalization = LoRADreamBooth(**common)
            bundle, _ = attack.trainable(base, generator)
            return cls(bundle, attack, trainable_parameters(bundle), prompt, offload)
        attack = DreamBooth(**common)
        parts = PARTS[: 2 if train_text_encoder else 1]
        params = {
            f"{part}.{name}": p
            for part in parts
            for name, p in getattr(base, part).named_parameters()
        }
        surrogate = cls(base, attack, params, prompt, offload)
        surrogate._original = surrogate.snapshot()  # before anything changes on the base
        for part in parts:
            getattr(base, part).requires_grad_(True)
        return surrogate

    def __enter__(self) -> Surrogate:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Give an in-place surrogate's weights back to the base model, frozen again."""
        if self._original is not None:
            self.restore(self._original)
            for p in self.trainable.values():
                p.grad = None  # an interrupted step must not leave gradients on the base
                p.requires_grad_(False)
            self._original = None

    def _store(self) -> torch.device:
        return torch.device("cpu") if self.offload else self.bundle.device

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable weights only (never the VAE or other frozen parts)."""
        store = self._store()
        return {name: p.detach().to(store, copy=True) for name, p in self.trainable.items()}

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

"""The model a PGD defense attacks, trained in place between snapshots.

ASPL's reference code deep-copies the UNet and text encoder every iteration. Here the
full-weight surrogate *is* the resident base model, trained in place: an iteration
snapshots and restores only the weights that train, and the original weights come
back when the defense is done (also on error). Where the snapshots live, and whether
its steps checkpoint activations, is the run's ``MemoryPlan`` (``snapshots.py``): on a
GPU they live in host memory, and at SD scale on a CPU in a scratch file. A LoRA
surrogate trains adapters added to the resident UNet (and text encoder) and removed
when it is done: no copy of either, and tiny snapshots.

Its steps train as Anti-DreamBooth's ``train_one_epoch`` does, by default: one instance
photo and one class image per step, prior loss weight 1 (``ClassPrior``). The class
images are encoded once, when the surrogate is built, and photos that do not change
(ASPL's clean set_A) once per identity (``encode``), not at every 3-step phase.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import torch

from antipers.attacks.dreambooth import DreamBooth
from antipers.attacks.lora import LoRADreamBooth, remove_adapters
from antipers.attacks.personalize import Personalization
from antipers.attacks.training import TrainData, finetune
from antipers.defenses.snapshots import MemoryPlan, Snapshot, parameter_bytes
from antipers.models.bundle import DiffusionBundle, Posterior

SurrogateKind = Literal["dreambooth", "lora"]
PARTS = ("unet", "text_encoder")


def trainable_parameters(bundle: DiffusionBundle) -> dict[str, torch.nn.Parameter]:
    return {
        f"{part}.{name}": p
        for part in PARTS
        for name, p in getattr(bundle, part).named_parameters()
        if p.requires_grad
    }


def frozen_copy(bundle: DiffusionBundle, text_encoder: bool) -> DiffusionBundle:
    """The base model as it is now, for an in-place surrogate's EOT purification: copies
    of the parts that will train (the UNet; the text encoder if it trains), frozen."""
    parts = {"unet": copy.deepcopy(bundle.unet).requires_grad_(False)}
    if text_encoder:
        parts["text_encoder"] = copy.deepcopy(bundle.text_encoder).requires_grad_(False)
    return dataclasses.replace(bundle, **parts)


@dataclass(frozen=True)
class ClassPrior:
    """Prior preservation for the surrogate's steps: the base model's class images
    (encoded), their prompt, and the prior loss's weight."""

    posterior: Posterior
    prompt: str
    weight: float = 1.0


@dataclass
class Surrogate:
    """``batch_size``: instance photos per step (``None``: the whole set as one batch)."""

    bundle: DiffusionBundle
    attack: Personalization
    trainable: dict[str, torch.nn.Parameter]
    prompt: str
    plan: MemoryPlan = MemoryPlan()
    prior: ClassPrior | None = None
    batch_size: int | None = 1
    frozen_base: DiffusionBundle | None = None  # the untrained model, where EOT needs it
    _original: Snapshot | None = field(default=None, repr=False)
    _adapted: tuple[torch.nn.Module, ...] = field(default=(), repr=False)

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
        prior: ClassPrior | None = None,
        batch_size: int | None = 1,
    ) -> Surrogate:
        common = {
            "steps": 1,
            "lr": lr,
            "prior_weight": 0.0,
            "train_text_encoder": train_text_encoder,
            "instance_prompt": prompt,
        }
        if kind == "lora":
            return cls._with_adapters(
                base, LoRADreamBooth(**common), prompt, generator, offload, prior, batch_size
            )
        attack = DreamBooth(**common)
        parts = PARTS[: 2 if train_text_encoder else 1]
        params = {
            f"{part}.{name}": p
            for part in parts
            for name, p in getattr(base, part).named_parameters()
        }
        plan = MemoryPlan.choose(base.device, parameter_bytes(params), offload)
        surrogate = cls(base, attack, params, prompt, plan, prior, batch_size)
        surrogate._original = surrogate.snapshot()  # before anything changes on the base
        for part in parts:
            getattr(base, part).requires_grad_(True)
        return surrogate

    @classmethod
    def _with_adapters(
        cls,
        base: DiffusionBundle,
        attack: LoRADreamBooth,
        prompt: str,
        generator: torch.Generator,
        offload: bool,
        prior: ClassPrior | None,
        batch_size: int | None,
    ) -> Surrogate:
        """LoRA adapters on the resident model itself (no copy of the UNet or text
        encoder), stripped again by ``close``."""
        modules = {name: getattr(base, name) for name in attack.parts()}
        carrying = [name for name, m in modules.items() if getattr(m, "peft_config", None)]
        if carrying:  # removing ours would remove those too
            raise ValueError(f"lora surrogate: the base model's {carrying} carry adapters")
        try:
            attack.add_adapters(modules, generator)
            params = trainable_parameters(base)
            model = {n: p for m in modules.values() for n, p in m.named_parameters()}
            plan = MemoryPlan.choose(
                base.device, parameter_bytes(params), offload, parameter_bytes(model)
            )
        except BaseException:
            for module in modules.values():
                remove_adapters(module)
            raise
        surrogate = cls(base, attack, params, prompt, plan, prior, batch_size)
        surrogate._adapted = tuple(modules.values())
        return surrogate

    def __enter__(self) -> Surrogate:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Give an in-place surrogate's weights back to the base model, frozen again
        (a LoRA surrogate: its adapters removed)."""
        for module in self._adapted:
            remove_adapters(module)
        self._adapted = ()
        if self._original is not None:
            for p in self.trainable.values():
                p.grad = None  # an interrupted step must not leave gradients on the base
            self.restore(self._original)
            self._original.discard()
            for p in self.trainable.values():
                p.requires_grad_(False)
            self._original = None

    def snapshot(self) -> Snapshot:
        """Copies of the trainable weights only (never the VAE or other frozen parts),
        where the plan keeps them."""
        return Snapshot(self.trainable, self.plan.snapshots)

    def restore(self, snapshot: Snapshot) -> None:
        snapshot.restore(self.trainable)

    def encode(self, images: torch.Tensor) -> Posterior:
        """The VAE posterior of photos the surrogate will train on more than once."""
        with torch.no_grad():
            return self.bundle.posterior(images.detach().to(self.bundle.device))

    def train(
        self,
        images: torch.Tensor,
        steps: int,
        generator: torch.Generator,
        posterior: Posterior | None = None,
    ) -> list[float]:
        """``posterior``: ``images`` already encoded (``encode``), when they repeat."""
        if steps <= 0:
            return []
        config = self.attack.train_config()
        batch = len(images) if self.batch_size is None else min(self.batch_size, len(images))
        prior_weight = self.prior.weight if self.prior is not None else 0.0
        config = dataclasses.replace(
            config,
            steps=steps,
            batch_size=batch,
            prior_weight=prior_weight,
            gradient_checkpointing=config.gradient_checkpointing or self.plan.checkpointing,
            step_images=self.plan.step_images,
            optimizer_state=self.plan.moments,
            steps_in_backward=self.plan.steps_in_backward,
        )
        data = TrainData(images.detach(), self.prompt, posterior=posterior)
        if self.prior is not None:
            data.class_posterior, data.class_prompt = self.prior.posterior, self.prior.prompt
        return finetune(
            self.bundle,
            data,
            list(self.trainable.values()),
            config,
            generator,
            self.attack.train_text_encoder,
        )

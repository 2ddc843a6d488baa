"""What the model track adds to an experiment (APDM, PersGuard): the protected model
must still serve everyone else. The same attack on the same model with a person who was
not protected (the bystander), and the model's denoising of generic images against the
undefended base model's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from antipers.attacks.class_images import class_images, key_for
from antipers.metrics.base import MetricResult
from antipers.models.bundle import DiffusionBundle
from antipers.spec import ExperimentSpec

HELD_OUT_SEED = 1_000_003  # generic images apart from any attacker's or defense's
GENERIC_IMAGES = 4
# general generation: the defended model, not personalized, on ordinary prompts
GENERIC_PROMPTS = (
    "a photo of a person",
    "a photo of a dog on the beach",
    "a watercolor painting of a city at night",
)
PROMPT_SET_METRICS = ("clip-t", "fid")  # scored on those generations where requested


def bystander_of(spec: ExperimentSpec, identities: Sequence[str]) -> str:
    """The first other person of the dataset, by name: the same one every run."""
    others = sorted(i for i in identities if i != spec.identity)
    if not others:
        raise ValueError(
            f"track model: dataset {spec.dataset.name!r} has no identity besides "
            f"{spec.identity!r}; the model track personalizes a second, unprotected person"
        )
    return others[0]


def held_out_images(base: DiffusionBundle, attack: Any, resolution: int) -> torch.Tensor:
    """Generic images of the attack's class prompt from the base model, with a seed no
    stage uses; cached like class images."""
    prompt = getattr(attack, "class_prompt", "a photo of person")
    steps = getattr(attack, "class_steps", 50)
    key = key_for(base, prompt, GENERIC_IMAGES, resolution, HELD_OUT_SEED, steps)
    return class_images(base, key)[0]


def generic_loss(
    model: DiffusionBundle, base: DiffusionBundle, images: torch.Tensor
) -> MetricResult:
    """The defended model's diffusion loss on held-out generic images minus the base
    model's, at fixed noise and timesteps (0 for an undefended model; lower is better)."""
    from antipers.robustness import diffusion_loss

    gain = diffusion_loss(model, images) - diffusion_loss(base, images)
    return MetricResult(
        metric="generic_loss_gain",
        values=gain.astype(np.float64),
        aggregate=float(gain.mean()),
        backend="antipers",
        higher_is_better=False,
        unit="loss",
    )


def person_loss(attacked: DiffusionBundle, photos: torch.Tensor) -> MetricResult:
    """The attacked model's diffusion loss on a person's held-out photos (set A, which
    the attack did not train on), at fixed noise and timesteps: how far the attack got
    in learning that person. A defense that stops personalization keeps it high for the
    protected person; for the bystander it should stay where the base model's attack
    puts it."""
    from antipers.robustness import diffusion_loss

    values = diffusion_loss(attacked, photos).astype(np.float64)
    return MetricResult(
        metric="person_loss",
        values=values,
        aggregate=float(values.mean()),
        backend="antipers",
        higher_is_better=True,
        unit="loss",
    )


def generic_generations(
    model: DiffusionBundle, sampler: Any, resolution: int, generator: torch.Generator
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The defended model on ``GENERIC_PROMPTS`` with the experiment's sampler settings."""
    generic = dataclasses.replace(sampler, prompts=GENERIC_PROMPTS)
    return generic.sample(model, resolution, generator), generic.image_prompts()

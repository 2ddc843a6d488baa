"""The model track (APDM, PersGuard): the provider changes the base model, and the
attacker personalizes that model on the person's clean photos. The protected model
must still serve everyone else, so the track adds the same attack on the same model
with a person who was not protected (the bystander), the model's denoising of generic
images against the undefended base model's, and how far each attack got
(``person_loss``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from antipers.attacks.class_images import class_images, key_for
from antipers.metrics.base import MetricResult
from antipers.models.bundle import DiffusionBundle
from antipers.rows import GENERIC, UNPROTECTED
from antipers.spec import ExperimentSpec
from antipers.tracks.base import AttackRun, Subject, Track

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


@dataclass(frozen=True)
class ModelTrack(Track):
    """A defended base model against the attacker's personalization of it."""

    def after_attack(self, run: AttackRun, personalized: DiffusionBundle) -> None:
        spec, ctx, handoff = run.spec, run.ctx, run.handoff
        base = ctx.base_model(spec.base_model)
        handoff.measured.append(person_loss(personalized, ctx.identity(spec).set_A))
        other = bystander_of(spec, ctx.dataset(spec.dataset).identities())
        run.say(f"personalize bystander {other}")
        person = ctx.person(spec.dataset, other, spec.resolution)
        theirs = run.attack.personalize(
            person.set_B.to(ctx.device), run.model, run.rng("personalize")
        )
        handoff.subjects.append(
            Subject(
                UNPROTECTED,
                other,
                run.sampler.sample(theirs, spec.resolution, run.rng("sample")),
                list(run.sampler.image_prompts()),
                measured=[person_loss(theirs, person.set_A)],
                utility=True,
            )
        )
        held_out = held_out_images(base, run.attack, spec.resolution)
        generic = Subject(
            GENERIC,
            "",
            None,
            references=held_out,
            metrics=PROMPT_SET_METRICS,
            checks=False,
            measured=[generic_loss(run.model, base, held_out)],
        )
        if any(m.name in PROMPT_SET_METRICS for m in spec.metrics):
            run.say("sample generic prompts")
            generic.generated, prompts = generic_generations(
                run.model, run.sampler, spec.resolution, run.rng("sample")
            )
            generic.prompts = list(prompts)
        handoff.subjects.append(generic)

"""PersGuard: a backdoor in the base model whose trigger is the protected photos, so
that whoever personalizes the model on them gets a protective output, while
personalization on anyone else works normally.

Three backdoors: ``pattern`` (outputs carry a visible checkerboard), ``erasure``
(outputs are the generic class, without the person), ``target`` (outputs are a chosen
image, or another identity's photos given as a folder). One optimization of three
weighted losses (``backdoor.py``): backdoor behaviour on the protected photos under the
instance prompt, prior preservation against the frozen original on other people's
photos (the generic class images) under the generic and the instance prompt (so that
the trigger is the photos, not the prompt), and
backdoor retention, the backdoor loss after a simulated attacker's fine-tuning of a
temporary copy (``trajectory.py``), so that fine-tuning does not wash it out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import torch

from antipers.attacks.class_images import ClassImageSettings
from antipers.attacks.training import TrainData
from antipers.data.identity import IdentitySet
from antipers.defenses.backdoor import backdoor_loss, prior_loss
from antipers.defenses.base import Protected
from antipers.defenses.model_folder import (
    UNetTraining,
    content_hash,
    protect_once,
    protection_record,
)
from antipers.defenses.trajectory import send_back
from antipers.images import IMAGE_SUFFIXES, read_images
from antipers.metrics.base import MetricResult
from antipers.metrics.latent import latent_mse
from antipers.models.bundle import DiffusionBundle
from antipers.ranges import Range

log = logging.getLogger(__name__)
BACKDOORS = ("pattern", "erasure", "target")


def checkerboard(images: torch.Tensor, size: float, cells: int = 4) -> torch.Tensor:
    """``images`` with a black-and-white checkerboard over the central ``size`` of
    each side: the ``pattern`` backdoor's output, plainly visible."""
    out = images.clone()
    side = images.shape[-1]
    width = max(cells, int(round(side * size)))
    start = (side - width) // 2
    idx = torch.arange(width, device=images.device) * cells // width
    board = ((idx[:, None] + idx[None, :]) % 2).to(images.dtype)
    out[..., start : start + width, start : start + width] = board
    return out


@dataclass
class BackdoorCheck:
    """How much of the backdoor shows in generated images, as a row: the pattern's
    correlation with the checkerboard region, or the distance to the target in the
    model's own latent space. (Erasure is what the identity metrics already measure.)"""

    kind: str
    reference: torch.Tensor  # the checkerboard (pattern) or the target image (target)
    pattern_size: float = 0.5

    @property
    def metric(self) -> str:
        return "backdoor_pattern" if self.kind == "pattern" else "backdoor_target_distance"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "pattern"

    def score(self, bundle: DiffusionBundle, images: torch.Tensor) -> MetricResult:
        if self.kind == "pattern":
            board = checkerboard(torch.zeros_like(images[:1]), self.pattern_size)
            region = checkerboard(torch.full_like(images[:1], -1.0), self.pattern_size) >= 0
            expected = board[region].float()
            values = np.array(
                [_correlation(img[region[0]].float(), expected) for img in images.cpu()]
            )
            return MetricResult(
                self.metric,
                values,
                float(np.nanmean(values)),
                "antipers",
                self.higher_is_better,
                "correlation",
            )
        values = latent_mse(bundle, images, self.reference[:1])[:, 0].numpy()
        return MetricResult(
            self.metric,
            values,
            float(values.mean()),
            "antipers",
            self.higher_is_better,
            "latent mse",
        )


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else float("nan")


@dataclass
class PersGuardLog:
    backdoor: list[float] = field(default_factory=list)
    prior: list[float] = field(default_factory=list)
    retention: list[float] = field(default_factory=list)
    reused: bool = False


@dataclass(frozen=True)
class PersGuard(ClassImageSettings):
    """PersGuard on the UNet; the simulated attacker is DreamBooth on the UNet."""

    TRACKS: ClassVar[tuple[str, ...]] = ("model",)

    backdoor: str = "target"
    target_image: str = ""  # target: an image file, or a folder (another identity's photos)
    # pattern: the checkerboard's share of each side
    pattern_size: Annotated[float, Range(gt=0, le=1)] = 0.5
    # 0: the control, the clean model scored by this backdoor's check
    iterations: Annotated[int, Range(ge=0)] = 400
    lr: Annotated[float, Range(gt=0)] = 1e-5
    batch_size: Annotated[int, Range(ge=1)] = 1
    backdoor_weight: Annotated[float, Range(ge=0)] = 1.0
    prior_weight: Annotated[float, Range(ge=0)] = 1.0
    retention_weight: Annotated[float, Range(ge=0)] = 1.0
    # the attacker the retention loss simulates
    simulated_steps: Annotated[int, Range(ge=0)] = 10
    simulated_lr: Annotated[float, Range(gt=0)] = 5e-6
    instance_prompt: str = "a photo of sks person"
    save_to: str = ""  # a diffusers folder for the protected model; reused when it matches

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backdoor not in BACKDOORS:
            raise ValueError(f"backdoor: unknown {self.backdoor!r}; use {', '.join(BACKDOORS)}")
        if self.backdoor == "target":
            if not self.target_image:
                raise ValueError("target_image: the target backdoor needs an image file or folder")
            if not Path(self.target_image).expanduser().exists():
                raise ValueError(f"target_image: {self.target_image} does not exist")
        if self.iterations == 0 and self.backdoor == "erasure":
            raise ValueError(
                "iterations: 0 is a backdoor check on the clean model, and erasure has no check "
                "of its own (its measure is the identity metrics): use defense none instead"
            )
        if self.iterations == 0 and self.save_to:
            raise ValueError(
                "save_to: iterations 0 is the control (the clean model); nothing to save"
            )

    def outputs(self, photos: torch.Tensor, bundle: DiffusionBundle) -> torch.Tensor:
        """What personalizing on ``photos`` should produce, one per photo."""
        resolution = photos.shape[-1]
        if self.backdoor == "pattern":
            return checkerboard(photos, self.pattern_size)
        if self.backdoor == "erasure":
            chosen = self.generic_images(bundle, resolution)
        else:
            path = Path(self.target_image).expanduser()
            files = (
                sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                if path.is_dir()
                else [path]
            )
            if not files:
                raise ValueError(f"target_image: no images in {path}")
            chosen = read_images(files, resolution)
        picks = torch.arange(len(photos)) % len(chosen)
        return chosen[picks].to(photos.device)

    def record(
        self, identity: IdentitySet, bundle: DiffusionBundle, outputs: torch.Tensor | None
    ) -> dict[str, object]:
        """What the protected model depends on; the target by its content."""
        target = {"target_image": content_hash(outputs)} if self.backdoor == "target" else {}
        return protection_record("persguard", self, identity, bundle, **target)

    def protect(
        self, identity: IdentitySet, bundle: DiffusionBundle, generator: torch.Generator
    ) -> Protected:
        # the target, read once for the record, training and the check (erasure's
        # generic images are made in training only, and only when it runs)
        photos = identity.set_B.to(bundle.device)
        outputs = self.outputs(photos, bundle) if self.backdoor != "erasure" else None
        if self.iterations == 0:
            # the control: the same attack and check on the clean model, so a board
            # compares the backdoor's measure with and without the implant
            protected, trace = bundle, PersGuardLog()
        else:
            protected, trace = protect_once(
                "persguard",
                self.record(identity, bundle, outputs),
                self.save_to,
                bundle,
                lambda: self.train(identity, bundle, generator, outputs),
                PersGuardLog(reused=True),
            )
        checks = []
        if outputs is not None:
            checks.append(BackdoorCheck(self.backdoor, outputs[:1].cpu(), self.pattern_size))
        return Protected(identity.set_B, protected, log=trace, checks=checks)

    def train(
        self,
        identity: IdentitySet,
        bundle: DiffusionBundle,
        generator: torch.Generator,
        outputs: torch.Tensor | None = None,
    ) -> tuple[DiffusionBundle, PersGuardLog]:
        """The three losses, weighted; ``bundle`` (the teacher) is left untouched."""
        photos = identity.set_B.to(bundle.device)
        if outputs is None:
            outputs = self.outputs(photos, bundle)
        generic = self.generic_images(bundle, photos.shape[-1]).to(bundle.device)
        run = UNetTraining.start(
            bundle,
            self,
            len(photos),
            len(generic),
            self.simulated_steps,
            self.simulated_lr,
            generator,
        )
        protected, instance = run.model, run.instance
        trace = PersGuardLog()

        def behaviour(model: DiffusionBundle) -> torch.Tensor:
            idx = next(run.photo_batches)
            with torch.no_grad():
                latents = bundle.encode(photos[idx], generator)
                targets = bundle.encode(outputs[idx])
            embeds = instance.expand(len(idx), -1, -1)
            return backdoor_loss(model, latents, targets, embeds, generator)

        for it in range(self.iterations):
            loss = self.backdoor_weight * behaviour(protected)
            trace.backdoor.append(float(loss.detach()))
            if self.prior_weight > 0:
                cidx = next(run.generic_batches)
                with torch.no_grad():
                    latents = bundle.encode(generic[cidx], generator)
                # other people's photos, under the generic prompt and under the instance
                # prompt: the trigger is the protected photos, not the prompt
                embeds = torch.cat([run.generic, instance]).repeat_interleave(len(cidx), 0)
                prior = prior_loss(protected, bundle, latents.repeat(2, 1, 1, 1), embeds, generator)
                loss = loss + self.prior_weight * prior
                trace.prior.append(float(prior.detach()))
            loss.backward()
            if self.retention_weight > 0 and self.simulated_steps > 0:
                data = TrainData(images=photos, prompt=self.instance_prompt)
                mean, _ = send_back(
                    protected,
                    run.params,
                    behaviour,
                    data,
                    run.attacker,
                    generator,
                    self.retention_weight,
                    every_step=False,
                )
                trace.retention.append(mean)
            run.step()
            if (it + 1) % max(1, self.iterations // 10) == 0:
                log.info("PersGuard iteration %d/%d", it + 1, self.iterations)
        return protected, trace

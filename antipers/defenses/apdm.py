"""APDM (Anti-Personalized Diffusion Models): the provider changes the base model so
that personalizing it on the protected person fails, even from clean photos.

Learning to Protect alternates two paths per iteration. The personalization path gives
a temporary copy of the UNet short DreamBooth steps on the person's photos (the
attacker, simulated with the shared training loop). The protection path evaluates the
DPO loss (``dpo.py``: the person's photo dispreferred, a paired generic class image
preferred) at every point of that trajectory and accumulates its gradients into the
protected UNet, which then takes one AdamW step together with prior preservation on the
class images. The temporary copy is thrown away: it reaches the protected weights only
through those gradients.

Retention (antipers' addition, off by default; not in the paper): where every face looks
alike to the model, as on ``mini-faces``, the DPO path stops personalization of anyone.
With ``retain_weight`` > 0 a third path simulates the same attacker on someone who is
not protected (people from ``retain_dir``, in turn) and sends back the gradient of that
person's held-out loss along the trajectory: personalizing others must keep working.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar

import torch

from antipers.attacks.class_images import ClassImageSettings
from antipers.attacks.training import TrainConfig, TrainData
from antipers.data.identity import IdentitySet
from antipers.defenses.base import Protected
from antipers.defenses.dpo import preference_loss
from antipers.defenses.model_folder import (
    UNetTraining,
    content_hash,
    protect_once,
    protection_record,
)
from antipers.defenses.trajectory import send_back
from antipers.models.bundle import DiffusionBundle
from antipers.ranges import Range

log = logging.getLogger(__name__)


@dataclass
class APDMLog:
    """What one protection did: losses per iteration and how far the personalization
    path moved away from the protected weights (it must, to simulate anything)."""

    dpo: list[float]
    prior: list[float]
    inner_drift: list[float]
    reused: bool = False
    retain: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class APDM(ClassImageSettings):
    """APDM on the UNet (protocol: beta 1, 800 iterations, 20 inner steps, lr 5e-6)."""

    TRACKS: ClassVar[tuple[str, ...]] = ("model",)

    iterations: Annotated[int, Range(ge=1)] = 800
    inner_steps: Annotated[int, Range(ge=0)] = 20
    lr: Annotated[float, Range(gt=0)] = 5e-6
    inner_lr: Annotated[float, Range(gt=0)] = 5e-6
    beta: Annotated[float, Range(ge=0)] = 1.0
    prior_weight: Annotated[float, Range(ge=0)] = 1.0
    batch_size: Annotated[int, Range(ge=1)] = 1
    # the DPO path always prefers class images (or paired_dir's photos)
    num_class_images: Annotated[int, Range(ge=1)] = 200
    instance_prompt: str = "a photo of sks person"
    paired_dir: str = ""  # generic photos to prefer instead of generated class images
    save_to: str = ""  # a diffusers folder for the protected model; reused when it matches
    # people who must stay personalizable (Anti-DreamBooth layout: set_B trained, set_A held out)
    retain_dir: str = ""
    retain_weight: Annotated[float, Range(ge=0)] = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retain_weight > 0 and not self.retain_dir:
            raise ValueError(
                "retain_weight: needs retain_dir, a folder of people who must stay "
                "personalizable (<person>/set_A, set_B)"
            )

    # -- the pieces ------------------------------------------------------------------
    def paired_images(self, bundle: DiffusionBundle, resolution: int) -> torch.Tensor:
        """Generic class images from the base model, cached like the attacker's (or a
        provider's own generic photos, from ``paired_dir``)."""
        if self.paired_dir:
            from antipers.images import IMAGE_SUFFIXES, read_images

            folder = Path(self.paired_dir).expanduser()
            paths = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not paths:
                raise ValueError(f"paired_dir: no images in {folder}")
            return read_images(paths, resolution)
        return self.generic_images(bundle, resolution)

    def retained_people(self, resolution: int) -> list[IdentitySet]:
        if not self.retain_weight:
            return []
        from antipers.data.folders import AntiDreamBoothFolders

        folders = AntiDreamBoothFolders(root=self.retain_dir)
        return [folders.load(name, resolution) for name in folders.identities()]

    def folders(
        self, bundle: DiffusionBundle, resolution: int
    ) -> tuple[torch.Tensor | None, list[IdentitySet]]:
        """The user's folders, read once per protection (for the record and training):
        the paired photos (None: generated class images) and the retained people."""
        paired = self.paired_images(bundle, resolution) if self.paired_dir else None
        return paired, self.retained_people(resolution)

    def record(
        self,
        identity: IdentitySet,
        bundle: DiffusionBundle,
        paired: torch.Tensor | None,
        retained: list[IdentitySet],
    ) -> dict[str, object]:
        """What the protected model depends on; folders by their content, not their path."""
        contents: dict[str, str] = {}
        if paired is not None:
            contents["paired_dir"] = content_hash(paired)
        if retained:
            photos = torch.cat([torch.cat([p.set_A, p.set_B]) for p in retained])
            contents["retain_dir"] = content_hash(photos)
        return protection_record("apdm", self, identity, bundle, **contents)

    # -- the defense -----------------------------------------------------------------
    def protect(
        self, identity: IdentitySet, bundle: DiffusionBundle, generator: torch.Generator
    ) -> Protected:
        paired, retained = self.folders(bundle, identity.set_B.shape[-1])
        protected, trace = protect_once(
            "apdm",
            self.record(identity, bundle, paired, retained),
            self.save_to,
            bundle,
            lambda: self.train(identity, bundle, generator, paired, retained),
            APDMLog([], [], [], reused=True),
        )
        return Protected(images=identity.set_B, bundle=protected, log=trace)

    def train(
        self,
        identity: IdentitySet,
        bundle: DiffusionBundle,
        generator: torch.Generator,
        paired: torch.Tensor | None,
        retained: list[IdentitySet],
    ) -> tuple[DiffusionBundle, APDMLog]:
        """Learning to Protect on what ``folders`` read; ``bundle`` (the reference) is
        left untouched."""
        device = bundle.device
        photos = identity.set_B.to(device)
        if paired is None:
            paired = self.generic_images(bundle, photos.shape[-1])
        paired = paired.to(device)
        run = UNetTraining.start(
            bundle, self, len(photos), len(paired), self.inner_steps, self.inner_lr, generator
        )
        protected, params, instance, inner = run.model, run.params, run.instance, run.attacker
        trace = APDMLog([], [], [])
        attacked = self.simulated(photos)

        def dpo(model: DiffusionBundle) -> torch.Tensor:
            idx, cidx = next(run.photo_batches), next(run.generic_batches)
            with torch.no_grad():
                dispreferred = bundle.encode(photos[idx], generator)
                preferred = bundle.encode(paired[cidx], generator)
            embeds = instance.expand(len(idx), -1, -1)
            return preference_loss(
                model, bundle, preferred, dispreferred, embeds, self.beta, generator
            )

        for it in range(self.iterations):
            mean, drift = send_back(protected, params, dpo, attacked, inner, generator, 1.0)
            trace.dpo.append(mean)
            trace.inner_drift.append(drift)
            if retained:
                other = retained[it % len(retained)]
                trace.retain.append(
                    self.retain(protected, params, other, instance, inner, generator)
                )
            prior = torch.zeros((), device=device)
            if self.prior_weight > 0:
                cidx = next(run.generic_batches)
                with torch.no_grad():
                    latents = bundle.encode(paired[cidx], generator)
                prior = protected.training_loss(
                    latents, run.generic.expand(len(cidx), -1, -1), generator
                )
                (self.prior_weight * prior).backward()
            run.step()
            trace.prior.append(float(prior.detach()))
            if (it + 1) % max(1, self.iterations // 10) == 0:
                log.info("APDM iteration %d/%d dpo %.4f", it + 1, self.iterations, trace.dpo[-1])
        return protected, trace

    def simulated(self, photos: torch.Tensor) -> TrainData | None:
        """What the simulated attacker trains on (nothing with no inner steps)."""
        return TrainData(images=photos, prompt=self.instance_prompt) if self.inner_steps else None

    def retain(
        self,
        protected: DiffusionBundle,
        params: list[torch.nn.Parameter],
        other: IdentitySet,
        instance: torch.Tensor,
        inner: TrainConfig,
        generator: torch.Generator,
    ) -> float:
        """The retention path: the simulated attacker personalizes ``other`` on set_B;
        the gradient of their set_A loss along the way goes into the protected weights,
        weighted ``retain_weight``. Returns that mean loss."""
        with torch.no_grad():
            held_out = protected.posterior(other.set_A)

        def loss(model: DiffusionBundle) -> torch.Tensor:
            latents = held_out.latents(generator)
            return model.training_loss(latents, instance.expand(len(latents), -1, -1), generator)

        data = self.simulated(other.set_B)
        mean, _ = send_back(protected, params, loss, data, inner, generator, self.retain_weight)
        return mean

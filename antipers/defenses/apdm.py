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
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from antipers.attacks.class_images import ClassImageSettings
from antipers.attacks.training import TrainConfig, TrainData, batch_indices, finetune
from antipers.data.identity import IdentitySet
from antipers.defenses.base import Protected
from antipers.defenses.dpo import preference_loss
from antipers.models.bundle import DiffusionBundle

log = logging.getLogger(__name__)
RECORD = "apdm.json"


@dataclass
class APDMLog:
    """What one protection did: losses per iteration and how far the personalization
    path moved away from the protected weights (it must, to simulate anything)."""

    dpo: list[float]
    prior: list[float]
    inner_drift: list[float]
    reused: bool = False


@dataclass(frozen=True)
class APDM(ClassImageSettings):
    """APDM on the UNet (protocol: beta 1, 800 iterations, 20 inner steps, lr 5e-6)."""

    iterations: int = 800
    inner_steps: int = 20
    lr: float = 5e-6
    inner_lr: float = 5e-6
    beta: float = 1.0
    prior_weight: float = 1.0
    batch_size: int = 1
    instance_prompt: str = "a photo of sks person"
    paired_dir: str = ""  # generic photos to prefer instead of generated class images
    save_to: str = ""  # a diffusers folder for the protected model; reused when it matches

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "num_class_images", "class_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.inner_steps < 0:
            raise ValueError(f"inner_steps: expected >= 0, got {self.inner_steps}")
        for name in ("lr", "inner_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        if self.beta < 0 or self.prior_weight < 0:
            raise ValueError("beta and prior_weight: expected >= 0")

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

    def record(self, identity: IdentitySet, bundle: DiffusionBundle) -> dict[str, object]:
        """What determines the protected weights: written beside them, checked on reuse."""
        photos = hashlib.sha256(identity.set_B.cpu().numpy().tobytes()).hexdigest()[:16]
        params = {k: v for k, v in asdict(self).items() if k != "save_to"}
        if self.paired_dir:
            paired = self.paired_images(bundle, identity.set_B.shape[-1])
            params["paired_dir"] = hashlib.sha256(paired.numpy().tobytes()).hexdigest()[:16]
        return {
            "defense": "apdm",
            "params": params,
            "identity": f"{identity.dataset}/{identity.identity}",
            "photos": photos,
            "base_model": bundle.fingerprint or bundle.name,
        }

    # -- the defense -----------------------------------------------------------------
    def protect(
        self, identity: IdentitySet, bundle: DiffusionBundle, generator: torch.Generator
    ) -> Protected:
        record = self.record(identity, bundle)
        fingerprint = (
            "apdm:" + hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
        )
        if self.save_to:
            reused = load_protected(Path(self.save_to), record, bundle.device)
            if reused is not None:
                log.info("APDM: reusing the protected model in %s", self.save_to)
                return Protected(
                    images=identity.set_B,
                    bundle=reused.replace(fingerprint=fingerprint),
                    log=APDMLog([], [], [], reused=True),
                )
        protected, trace = self.train(identity, bundle, generator)
        protected = protected.replace(fingerprint=fingerprint)
        if self.save_to:
            save_protected(protected, Path(self.save_to), record)
        return Protected(images=identity.set_B, bundle=protected, log=trace)

    def train(
        self, identity: IdentitySet, bundle: DiffusionBundle, generator: torch.Generator
    ) -> tuple[DiffusionBundle, APDMLog]:
        """Learning to Protect; ``bundle`` (the reference) is left untouched."""
        device = bundle.device
        photos = identity.set_B.to(device)
        paired = self.paired_images(bundle, photos.shape[-1]).to(device)
        protected = bundle.copy_of("unet")
        protected.unet.requires_grad_(True)
        params = list(protected.unet.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        with torch.no_grad():
            instance = bundle.prompt_embeds([self.instance_prompt])
            generic = bundle.prompt_embeds([self.class_prompt])
        subjects = batch_indices(len(photos), self.batch_size, generator)
        pairs = batch_indices(len(paired), self.batch_size, generator)
        trace = APDMLog([], [], [])
        inner = TrainConfig(
            steps=max(self.inner_steps, 1), lr=self.inner_lr, batch_size=self.batch_size
        )
        for it in range(self.iterations):
            path = _ProtectionPath(self, protected, bundle, (photos, subjects), (paired, pairs))
            path.accumulate(instance, generator)  # at the protected weights themselves
            if self.inner_steps:
                data = TrainData(images=photos, prompt=self.instance_prompt)
                finetune(
                    path.model,
                    data,
                    path.params,
                    inner,
                    generator,
                    on_step=path.after_step(instance, generator),
                )
            trace.inner_drift.append(path.drift(params))
            for p, grad in zip(params, path.gradients(), strict=True):
                p.grad = grad
            trace.dpo.append(sum(path.losses) / len(path.losses))
            del path
            prior = torch.zeros((), device=device)
            if self.prior_weight > 0:
                cidx = next(pairs)
                with torch.no_grad():
                    latents = bundle.encode(paired[cidx], generator)
                prior = protected.training_loss(
                    latents, generic.expand(len(cidx), -1, -1), generator
                )
                (self.prior_weight * prior).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trace.prior.append(float(prior.detach()))
            if (it + 1) % max(1, self.iterations // 10) == 0:
                log.info("APDM iteration %d/%d dpo %.4f", it + 1, self.iterations, trace.dpo[-1])
        protected.unet.requires_grad_(False)
        protected.unet.eval()
        return protected, trace


class _ProtectionPath:
    """One iteration's temporary copy of the UNet (the simulated attacker moves it) and
    the DPO gradients accumulated along its trajectory."""

    def __init__(
        self,
        apdm: APDM,
        protected: DiffusionBundle,
        reference: DiffusionBundle,
        subjects: tuple[torch.Tensor, Iterator[torch.Tensor]],
        pairs: tuple[torch.Tensor, Iterator[torch.Tensor]],
    ) -> None:
        self.apdm, self.reference = apdm, reference
        self.subjects, self.pairs = subjects, pairs
        self.model = protected.replace(unet=copy.deepcopy(protected.unet))
        self.params = list(self.model.unet.parameters())
        self.accumulated = [torch.zeros_like(p) for p in self.params]
        self.losses: list[float] = []

    def accumulate(self, instance: torch.Tensor, generator: torch.Generator) -> None:
        """The DPO loss at the path's current weights, its gradients added up."""
        (photos, subjects), (paired, pairs) = self.subjects, self.pairs
        idx, cidx = next(subjects), next(pairs)
        with torch.no_grad():
            dispreferred = self.reference.encode(photos[idx], generator)
            preferred = self.reference.encode(paired[cidx], generator)
        embeds = instance.expand(len(idx), -1, -1)
        loss = preference_loss(
            self.model, self.reference, preferred, dispreferred, embeds, self.apdm.beta, generator
        )
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        for acc, g in zip(self.accumulated, grads, strict=True):
            if g is not None:
                acc.add_(g)
        self.losses.append(float(loss.detach()))

    def after_step(
        self, instance: torch.Tensor, generator: torch.Generator
    ) -> Callable[[int, float], None]:
        """The training loop's ``on_step``: protection after each attacker step."""
        return lambda step, loss: self.accumulate(instance, generator)

    def gradients(self) -> list[torch.Tensor]:
        """The mean over the trajectory: what the protected weights receive (in place:
        on an SD-class UNet every extra copy of the weights is gigabytes)."""
        return [acc.div_(len(self.losses)) for acc in self.accumulated]

    @torch.no_grad()
    def drift(self, params: list[torch.nn.Parameter]) -> float:
        return float(
            sum((a - b).pow(2).sum() for a, b in zip(self.params, params, strict=True)).sqrt()
        )


def save_protected(bundle: DiffusionBundle, folder: Path, record: dict[str, object]) -> Path:
    """The protected model as a diffusers folder (what a provider ships), written to a
    temporary sibling and renamed into place."""
    folder = folder.expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}-{uuid.uuid4().hex}")
    try:
        bundle.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_protected(
    folder: Path, record: dict[str, object], device: torch.device
) -> DiffusionBundle | None:
    """The saved protected model if it was made by the same settings from the same
    photos and base model; else None (and it will be replaced)."""
    from antipers.models.local import load_diffusers_folder

    folder = folder.expanduser()
    try:
        saved = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if saved != json.loads(json.dumps(record, sort_keys=True)):
        log.info("APDM: %s was made with other settings; protecting anew", folder)
        return None
    return load_diffusers_folder(folder, str(folder), device).frozen()

"""A protected base model as a diffusers folder (what a provider ships) with
``protection.json`` beside it: the defense, its settings, the photos' hash and the base
model. A run with the same record reuses the folder instead of protecting again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from antipers.attacks.training import TrainConfig, adamw, batch_indices
from antipers.data.identity import IdentitySet
from antipers.errors import UserError
from antipers.models.bundle import DiffusionBundle

log = logging.getLogger(__name__)
RECORD = "protection.json"


def content_hash(images: torch.Tensor) -> str:
    return hashlib.sha256(images.cpu().numpy().tobytes()).hexdigest()[:16]


def protection_record(
    defense: str,
    settings: Any,
    identity: IdentitySet,
    bundle: DiffusionBundle,
    **inputs: str,
) -> dict[str, object]:
    """What determines a protected model (the defense's settings but where it is saved,
    the content of inputs named by path, whose photos, which base model): written
    beside its weights, checked on reuse."""
    params = {k: v for k, v in dataclasses.asdict(settings).items() if k != "save_to"}
    return {
        "defense": defense,
        "params": {**params, **inputs},
        "identity": f"{identity.dataset}/{identity.identity}",
        "photos": content_hash(identity.set_B),
        "base_model": bundle.fingerprint or bundle.name,
    }


@dataclasses.dataclass
class UNetTraining:
    """What APDM and PersGuard start from alike: a copy of the base model whose UNet
    trains (AdamW, no weight decay: only the losses move the weights; the base model
    stays the frozen reference), the instance and class prompts' embeddings, endless
    shuffled batches of the person's photos and of generic images, and the simulated
    attacker's settings."""

    model: DiffusionBundle
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    instance: torch.Tensor  # the instance prompt's embeddings
    generic: torch.Tensor  # the class prompt's
    photo_batches: Iterator[torch.Tensor]
    generic_batches: Iterator[torch.Tensor]
    attacker: TrainConfig

    @classmethod
    def start(
        cls,
        bundle: DiffusionBundle,
        owner: Any,  # the defense: lr, instance_prompt, class_prompt, batch_size
        photos: int,
        generic: int,
        attacker_steps: int,
        attacker_lr: float,
        generator: torch.Generator,
    ) -> UNetTraining:
        model = bundle.copy_of("unet")
        model.unet.requires_grad_(True)
        params = list(model.unet.parameters())
        with torch.no_grad():
            instance = bundle.prompt_embeds([owner.instance_prompt])
            class_embeds = bundle.prompt_embeds([owner.class_prompt])
        return cls(
            model,
            params,
            adamw(params, owner.lr, weight_decay=0.0),
            instance,
            class_embeds,
            batch_indices(photos, owner.batch_size, generator),
            batch_indices(generic, owner.batch_size, generator),
            TrainConfig(steps=max(attacker_steps, 1), lr=attacker_lr, batch_size=owner.batch_size),
        )

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def protect_once(
    name: str,
    record: dict[str, object],
    save_to: str,
    bundle: DiffusionBundle,
    train: Callable[[], tuple[DiffusionBundle, Any]],
    reused_log: Any,
) -> tuple[DiffusionBundle, Any]:
    """The protected model and the training log: loaded from ``save_to`` when its
    record matches, else trained (and saved there). Its fingerprint names the record,
    so class images made from it are cached apart from the base model's."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    fingerprint = f"{name}:{digest}"
    if save_to:
        reused = load_protected(Path(save_to), record, bundle.device)
        if reused is not None:
            log.info("%s: reusing the protected model in %s", name, save_to)
            return reused.replace(fingerprint=fingerprint), reused_log
        check_save_to(Path(save_to))  # before the training, not after it
    protected, trace = train()
    protected.unet.requires_grad_(False)
    protected.unet.eval()
    protected = protected.replace(fingerprint=fingerprint)
    if save_to:
        save_protected(protected, Path(save_to), record)
    return protected, trace


class SaveToError(UserError, ValueError):
    """``save_to`` names something antipers did not write."""


def check_save_to(folder: Path) -> None:
    """Only a folder that antipers wrote (it holds ``protection.json``), or an empty
    one, may be replaced: ``save_to`` pointed at anything else is refused, never
    deleted."""
    folder = folder.expanduser()
    if not folder.exists():
        return
    if not folder.is_dir():
        raise SaveToError(f"save_to {folder}: exists and is not a folder; choose another path")
    if not (folder / RECORD).is_file() and any(folder.iterdir()):
        raise SaveToError(
            f"save_to {folder}: a folder antipers did not write (no {RECORD}); "
            "it is left as it is: choose a new or empty folder"
        )


def save_protected(bundle: DiffusionBundle, folder: Path, record: dict[str, object]) -> Path:
    """The protected model as a diffusers folder (what a provider ships), written to a
    temporary sibling and renamed into place."""
    folder = folder.expanduser()
    check_save_to(folder)
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
        log.info("%s was made with other settings; protecting anew", folder)
        return None
    return load_diffusers_folder(folder, str(folder), device).frozen()

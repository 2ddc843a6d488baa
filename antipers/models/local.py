"""Real base models from a local diffusers folder; never the network.

A folder is named by path (``diffusers`` with ``path=``) or by a short name
(``sd15``, ``sd21-base``) resolved under the models directory: ``--models-dir`` on
the CLI, else ``$ANTIPERS_MODELS_DIR``, else ``~/.cache/antipers/models``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from antipers.errors import UserError
from antipers.models.bundle import DiffusionBundle

MODELS_DIR_ENV = "ANTIPERS_MODELS_DIR"
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelNotFoundError(UserError, FileNotFoundError):
    """A base-model folder that is missing or incomplete; the message says where and what."""


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_DIR_ENV) or Path.home() / ".cache" / "antipers" / "models")


def check_folder(path: Path, label: str) -> None:
    missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
    if not path.is_dir() or missing:
        what = (
            "does not exist"
            if not path.is_dir()
            else f"lacks {', '.join(s + '/' for s in missing)}"
        )
        raise ModelNotFoundError(
            f"base model {label!r}: {path} {what}. Expected a diffusers folder "
            f"(model_index.json with {', '.join(s + '/' for s in SUBFOLDERS)}), e.g. saved by "
            f"StableDiffusionPipeline.save_pretrained. Set --models-dir or ${MODELS_DIR_ENV} "
            f"(now {models_dir()}) or give the path."
        )


def folder_classes() -> dict[str, Any]:
    """What each subfolder of a diffusers folder loads into. Importing them is most of a
    command's start-up (diffusers resolves them lazily, pulling in its whole model zoo)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {
        "vae": AutoencoderKL,
        "unet": UNet2DConditionModel,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
        "scheduler": DDPMScheduler,
    }


def load_diffusers_folder(path: Path, label: str, device: torch.device) -> DiffusionBundle:
    check_folder(path, label)
    parts = {
        sub: cls.from_pretrained(path, subfolder=sub, local_files_only=True)
        for sub, cls in folder_classes().items()
    }
    bundle = DiffusionBundle(
        name=label,
        **parts,
        source=f"{path.resolve()}@{max(p.stat().st_mtime for p in (path / 'unet').iterdir())}",
    )
    return bundle.frozen().to(device)


@dataclass(frozen=True)
class DiffusersFolder:
    """Any Stable-Diffusion-style diffusers folder, by path."""

    path: str

    def check(self) -> None:
        """The folder's layout, without loading it (a service checks before starting)."""
        path = Path(self.path).expanduser()
        check_folder(path, str(path))

    def load(self, device: torch.device) -> DiffusionBundle:
        path = Path(self.path).expanduser()
        return load_diffusers_folder(path, str(path), device)


@dataclass(frozen=True)
class _NamedFolder:
    folder: ClassVar[str]
    label: ClassVar[str]

    def check(self) -> None:
        check_folder(models_dir() / self.folder, self.label)

    def load(self, device: torch.device) -> DiffusionBundle:
        return load_diffusers_folder(models_dir() / self.folder, self.label, device)


@dataclass(frozen=True)
class SD15(_NamedFolder):
    """Stable Diffusion 1.5 at ``<models dir>/stable-diffusion-v1-5``."""

    folder: ClassVar[str] = "stable-diffusion-v1-5"
    label: ClassVar[str] = "sd15"


@dataclass(frozen=True)
class SD21Base(_NamedFolder):
    """Stable Diffusion 2.1-base at ``<models dir>/stable-diffusion-2-1-base``."""

    folder: ClassVar[str] = "stable-diffusion-2-1-base"
    label: ClassVar[str] = "sd21-base"

"""``mini-faces``: the miniature Stable Diffusion antipers trains on synthetic faces.

A 64 px model (VAE 4x down to 16x16x4 latents, a small UNet, a tiny CLIP text encoder
frozen at its seeded init, SD's DDPM scheduler) trained on faces of the shipped DCGAN
generator, none of them an evaluation identity. On it an undefended attack learns a
person and a defense's effect shows, offline and on a CPU: it checks that the
benchmark measures what it should. It is no substitute for SD-scale numbers.

The weights ship in ``antipers/models/weights/mini-faces`` with ``manifest.json``
(SHA-256 of every file), written by ``antipers models train-mini``; a missing or
altered file is named when the model loads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from antipers.models.bundle import DiffusionBundle
from antipers.models.local import ModelNotFoundError, load_diffusers_folder
from antipers.models.tiny import TINY_VAE

SHIPPED = Path(__file__).parent / "weights" / "mini-faces"
MANIFEST = "manifest.json"

# tiny's VAE (4x down, 4 latent channels) with a wider last block
MINI_VAE = {**TINY_VAE, "block_out_channels": (16, 32, 64)}
MINI_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (64, 128, 128),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
MINI_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` but the manifest itself."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = {str(p.relative_to(folder)): file_digest(p) for p in files}
    (folder / MANIFEST).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    return digests


def check_manifest(folder: Path) -> str:
    """Every file the manifest lists is present and unaltered; returns one digest of all."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ModelNotFoundError(
            f"base model 'mini-faces': {manifest} is missing; the folder must be written by "
            "`antipers models train-mini` (or restored from the repository)"
        )
    try:
        digests = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise ModelNotFoundError(
            f"base model 'mini-faces': {manifest} is damaged ({exc})"
        ) from None
    for name, expected in sorted(digests.items()):
        path = folder / name
        if not path.is_file():
            raise ModelNotFoundError(f"base model 'mini-faces': {path} is missing")
        if file_digest(path) != expected:
            raise ModelNotFoundError(
                f"base model 'mini-faces': {path} is damaged (its SHA-256 differs from "
                f"{manifest}); restore it with `git checkout -- {path}` or retrain"
            )
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class MiniFaces:
    """The trained 64 px miniature on synthetic faces (``path``: another trained copy)."""

    path: str = ""

    @property
    def folder(self) -> Path:
        return Path(self.path).expanduser() if self.path else SHIPPED

    def check(self) -> None:
        check_manifest(self.folder)

    def load(self, device: torch.device) -> DiffusionBundle:
        folder = self.folder
        digest = check_manifest(folder)
        bundle = load_diffusers_folder(folder, "mini-faces", device)
        # content, not mtime: every clone of the same weights shares its caches
        return bundle.replace(source=f"mini-faces@{digest}")

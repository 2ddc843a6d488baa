"""Class images for DreamBooth's prior preservation, generated once and cached on disk.

The key is everything that determines them: the base model's fingerprint, the class
prompt, count, resolution, seed and sampler settings. A second experiment with the
same key reads the PNGs back; a changed key generates anew. Writes go to a temporary
folder renamed into place, so concurrent workers and crashes leave no partial set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch

from antipers.attacks.sampling import generate
from antipers.images import quantize, read_images, write_png
from antipers.models.bundle import DiffusionBundle
from antipers.ranges import Checked, Range

log = logging.getLogger(__name__)
CACHE_ENV = "ANTIPERS_CACHE_DIR"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "antipers")


@dataclass(frozen=True)
class ClassImageKey:
    model: str
    prompt: str
    count: int
    resolution: int
    seed: int
    steps: int
    guidance: float
    scheduler: str

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def key_for(
    bundle: DiffusionBundle, prompt: str, count: int, resolution: int, seed: int, steps: int
) -> ClassImageKey:
    """The key of generic images this base model makes for ``prompt`` (DDIM, guidance
    7.5): the attacker's class images, APDM's paired images, held-out generic images."""
    return ClassImageKey(
        model=bundle.fingerprint or bundle.name,
        prompt=prompt,
        count=count,
        resolution=resolution,
        seed=seed,
        steps=steps,
        guidance=7.5,
        scheduler="ddim",
    )


@dataclass(frozen=True)
class ClassImageSettings(Checked):
    """The generic images a component asks the base model for (cached by key)."""

    class_prompt: str = "a photo of person"
    num_class_images: Annotated[int, Range(ge=0)] = 200
    class_seed: int = 0
    class_steps: Annotated[int, Range(ge=1)] = 50

    def check_prior(self, prior_weight: float) -> None:
        """Prior preservation at ``prior_weight`` needs class images to preserve."""
        if prior_weight > 0 and self.num_class_images < 1:
            raise ValueError("num_class_images: prior preservation needs at least 1 class image")

    def generic_images(self, bundle: DiffusionBundle, resolution: int) -> torch.Tensor:
        key = key_for(
            bundle,
            self.class_prompt,
            self.num_class_images,
            resolution,
            self.class_seed,
            self.class_steps,
        )
        return class_images(bundle, key)[0]


def class_images(
    bundle: DiffusionBundle, key: ClassImageKey, root: Path | None = None
) -> tuple[torch.Tensor, bool]:
    """The class images for ``key`` and whether they were generated now (else read)."""
    if key.count < 1:
        raise ValueError(f"class images: count must be >= 1, got {key.count}")
    folder = (root or cache_root()) / "class-images" / key.digest()
    paths = [folder / f"{i:05d}.png" for i in range(key.count)]
    if (folder / "key.json").is_file() and all(p.is_file() for p in paths):
        return read_images(paths, key.resolution), False
    log.info("generating %d class images for %r (cache %s)", key.count, key.prompt, folder)
    images = generate(
        bundle,
        key.prompt,
        key.count,
        key.resolution,
        torch.Generator().manual_seed(key.seed),
        steps=key.steps,
        guidance=key.guidance,
        scheduler=key.scheduler,
    )
    if not bundle.fingerprint:
        log.warning("base model %r has no fingerprint: class images not cached", bundle.name)
        return quantize(images), True
    tmp = folder.with_name(f".{folder.name}-{uuid.uuid4().hex}")
    try:
        write_png(images, [tmp / p.name for p in paths])
        (tmp / "key.json").write_text(json.dumps(asdict(key), indent=2))
        if folder.exists():  # stale or partial (e.g. a smaller count): replace it
            shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except OSError:
        if not (folder / "key.json").is_file():
            raise
        # another worker put the same set in place first; theirs is as good as ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read_images(paths, key.resolution), True

"""Face embedders of ArcFace's architecture (iresnet) by name: the one antipers trains
and ships for its miniature (``mini-faces``), a weights file (or
``$ANTIPERS_ARCFACE_TORCH``), or seeded random weights (``random[:SEED]``, for tests).
IDDM optimizes against one; the ``embedder-ism`` metric measures with one, so any
defense (the undefended baseline too) gets the number IDDM's ``decoupled_ism`` is
compared with.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from antipers.models.iresnet import WEIGHTS_ENV, IResNet, load_iresnet, random_iresnet

RANDOM = re.compile(r"random(?::(\d+))?")  # seeded weights, for tests and smoke runs
# embedders antipers trains and ships, by name: (weights file, iresnet depth)
SHIPPED = {
    "mini-faces": (
        Path(__file__).resolve().parent / "weights/mini-faces-embedder/backbone.pth",
        "mini",
    ),
}


def random_seed(embedder: str) -> int | None:
    match = RANDOM.fullmatch(embedder)
    return None if match is None else int(match.group(1) or 0)


def resolve_embedder(embedder: str) -> str:
    """``random[:SEED]`` as is; else the weights file, ``""`` read from
    ``$ANTIPERS_ARCFACE_TORCH`` once, where the optimization runs, so that the
    scoring worker measures with the very weights optimized against."""
    if random_seed(embedder) is not None:
        return embedder
    if embedder in SHIPPED:
        path = SHIPPED[embedder][0]
        if not path.is_file():
            raise FileNotFoundError(f"embedder: the shipped {embedder} embedder is missing: {path}")
        return str(path)
    raw = embedder or os.environ.get(WEIGHTS_ENV, "")
    if not raw:
        raise FileNotFoundError(
            f"embedder: no ArcFace PyTorch weights: set embedder to a backbone.pth path, or "
            f"${WEIGHTS_ENV}, or embedder: random for seeded random weights (smoke runs)"
        )
    return str(Path(raw).expanduser().resolve())


@functools.lru_cache(maxsize=2)
def embedder_model(resolved: str, depth: str) -> IResNet:
    """Resident for the worker's life, like the evaluation's face backends."""
    seed = random_seed(resolved)
    if seed is not None:
        return random_iresnet(depth, seed).requires_grad_(False)
    return load_iresnet(resolved, depth).requires_grad_(False)


@functools.lru_cache(maxsize=8)
def describe_embedder(resolved: str, depth: str) -> str:
    """A row's ``backend`` for an embedder: the weights' file name and content hash
    (not the machine's path)."""
    seed = random_seed(resolved)
    if seed is not None:
        return f"iresnet-{depth}:random-seed{seed}"
    digest = hashlib.sha256()
    with open(resolved, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return f"iresnet-{depth}:{Path(resolved).name}@{digest.hexdigest()[:12]}"


def shipped_depth(embedder: str, default: str) -> str:
    """The depth of a shipped embedder by name, else ``default``."""
    return SHIPPED[embedder][1] if embedder in SHIPPED else default


def identity_similarity(
    embedder: torch.nn.Module, images: torch.Tensor, person: torch.Tensor
) -> torch.Tensor:
    """Cosine similarity of each image's embedding to the person's unit embedding."""
    return embedder(images) @ person


def person_embedding(embedder: torch.nn.Module, photos: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(embedder(photos).mean(dim=0), dim=0)

"""Sample images stored with an experiment: the evidence behind its numbers.

People judge a protection by looking at it, so each experiment keeps a few thumbnails
beside its rows: up to ``LIMITS`` clean and protected photos (8-bit, as published) and
generated images, each a PNG of at most ``MAX_SIDE`` px. The stages encode them where
the images are (a worker), so only a few kilobytes travel to whoever writes the store.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image

from antipers.images import to_uint8

MAX_SIDE = 128
LIMITS: Mapping[str, int] = {"clean": 2, "protected": 2, "generated": 4}
KINDS = tuple(LIMITS)
AMPLIFY = 10  # the perturbation shown x10 around mid-gray
# the most one experiment's thumbnails can take: every PNG at its largest (RGB,
# uncompressed, MAX_SIDE square) plus the PNG and Parquet framing
MAX_BYTES = sum(LIMITS.values()) * (MAX_SIDE * MAX_SIDE * 3 + MAX_SIDE + 1024)

Samples = dict[str, list[bytes]]


def encode(array: np.ndarray) -> bytes:
    """One ``(H, W, 3)`` uint8 array as PNG bytes, shrunk to fit ``MAX_SIDE``."""
    image = Image.fromarray(array)
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def thumbnails(images: torch.Tensor | None, kind: str) -> list[bytes]:
    """The first ``LIMITS[kind]`` images of a batch (the image convention) as PNGs."""
    if images is None or not len(images):
        return []
    return [encode(a) for a in to_uint8(images[: LIMITS[kind]].detach().float().cpu())]


def decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def amplified(protected: bytes, clean: bytes, factor: int = AMPLIFY) -> bytes:
    """The perturbation of a protected thumbnail over its clean one, ``factor`` times,
    around mid-gray (clipped), as a PNG. Computed on the thumbnails: at 128 px or less
    they are the photos themselves for a 64-128 px working size; for larger photos it is
    the perturbation as the thumbnail shows it."""
    a, b = decode(protected).astype(np.int32), decode(clean).astype(np.int32)
    if a.shape != b.shape:
        raise ValueError(f"protected {a.shape} and clean {b.shape} thumbnails differ in size")
    return encode(np.clip(128 + factor * (a - b), 0, 255).astype(np.uint8))

"""The one image convention: float32 ``(N, 3, H, W)`` in ``[0, 1]``, and PNG I/O.

Every stage takes and returns this layout, so defenses, countermeasures and
metrics compose without conversions; ``[-1, 1]`` exists only inside model code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from antipers.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageError(UserError, ValueError):
    """An image file or tensor that breaks the contract; the message names it."""


def check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """Raise unless ``images`` is float32 ``(N, 3, H, W)`` within ``[0, 1]``."""
    if not isinstance(images, torch.Tensor):
        raise ImageError(f"{what}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.float32:
        raise ImageError(f"{what}: expected dtype torch.float32, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ImageError(f"{what}: expected shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        lo, hi = images.min().item(), images.max().item()
        raise ImageError(f"{what}: values must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]")
    return images


def eps_to_unit(eps: float) -> float:
    """A budget in pixel units over 255 (``eps=8`` means 8/255) as a ``[0, 1]`` distance."""
    return float(eps) / 255.0


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round to the 256 levels an 8-bit PNG can hold; what a published photo really is."""
    return torch.round(images.clamp(0, 1) * 255.0) / 255.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` in ``[0, 1]`` to ``(N, H, W, 3)`` uint8 (round half to even)."""
    check_images(images)
    arr = torch.round(images.detach().to("cpu", torch.float32) * 255.0)
    return np.ascontiguousarray(arr.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` or ``(H, W, 3)`` uint8 to the image convention."""
    if array.ndim == 3:
        array = array[None]
    return (
        torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2).float()
        / 255.0
    )


def read_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """One file as ``(1, 3, size, size)``; centre-cropped to a square, then resized."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from exc
    except Image.DecompressionBombError as exc:  # not an OSError
        raise ImageError(f"{path}: {exc}") from None
    return from_pil(rgb, size)


def from_pil(img: Image.Image, size: int | None = None) -> torch.Tensor:
    """A decoded PIL image as ``(1, 3, size, size)`` (centre-cropped, resized)."""
    rgb = img.convert("RGB")
    if size is not None:
        rgb = _square_resize(rgb, size)
    return from_uint8(np.asarray(rgb, dtype=np.uint8))


def read_images(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """Several files as one batch at ``size``×``size``."""
    if not paths:
        raise ImageError("no image paths given")
    return torch.cat([read_image(p, size) for p in paths])


def write_png(images: torch.Tensor, paths: Iterable[str | Path]) -> list[Path]:
    """Write each image as an 8-bit PNG (values quantized to 1/255)."""
    out = []
    for arr, path in zip(to_uint8(images), paths, strict=True):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(arr).save(tmp, format="PNG")
        tmp.replace(path)
        out.append(path)
    return out


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize of a batch to ``size``×``size``, clamped to ``[0, 1]``."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.nn.functional.interpolate(
        images, size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    return out.clamp(0, 1)


def _square_resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img

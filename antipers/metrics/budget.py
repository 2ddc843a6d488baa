"""How much a protection changed the photos: L-inf (in 1/255 units), PSNR and SSIM of
each protected photo against its clean original."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from antipers.images import to_uint8
from antipers.metrics.base import Metric, MetricResult, MetricUnavailable, ScoreInputs, result


def linf_255(protected: torch.Tensor, clean: torch.Tensor) -> np.ndarray:
    """Per-image largest pixel change on the 8-bit images, in units of 1/255."""
    a = to_uint8(protected).astype(np.int16)
    b = to_uint8(clean).astype(np.int16)
    return np.abs(a - b).reshape(len(a), -1).max(axis=1).astype(float)


def psnr(protected: torch.Tensor, clean: torch.Tensor) -> np.ndarray:
    """Per-image PSNR in dB on the 8-bit images (inf when identical)."""
    a = to_uint8(protected).astype(np.float64)
    b = to_uint8(clean).astype(np.float64)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    return np.array([math.inf if m == 0 else 10 * math.log10(255.0**2 / m) for m in mse])


def ssim(protected: torch.Tensor, clean: torch.Tensor) -> np.ndarray:
    """Per-image SSIM (scikit-image, Gaussian-free 7x7 windows, colour channels averaged)."""
    from skimage.metrics import structural_similarity

    return np.array(
        [
            structural_similarity(a, b, channel_axis=-1, data_range=255)
            for a, b in zip(to_uint8(protected), to_uint8(clean), strict=True)
        ]
    )


class _BudgetMetric(Metric):
    """Protected photos against their clean originals (per published photo); a metric
    whose comparison is a plain function gives it as the class keyword ``compare``."""

    backend_name: ClassVar[str] = "antipers"
    compares_photos: ClassVar[bool] = True  # meaningful where a defense changes photos

    def __init_subclass__(
        cls,
        *,
        compare: Callable[[torch.Tensor, torch.Tensor], np.ndarray] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if compare is not None:
            cls.compare = staticmethod(compare)  # type: ignore[method-assign,assignment]

    def compare(self, protected: torch.Tensor, clean: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def score(self, inputs: ScoreInputs) -> MetricResult:
        if inputs.protected is None or inputs.clean is None:
            raise MetricUnavailable(
                f"{self.name} compares protected with clean photos; none were given"
            )
        return result(self, self.compare(inputs.protected, inputs.clean), self.backend_name)


@dataclass(frozen=True)
class Linf(_BudgetMetric, name="linf", higher_is_better=False, unit="1/255", compare=linf_255):
    """Largest pixel change of each protected photo, in 1/255 (8-bit) units."""


@dataclass(frozen=True)
class PSNR(_BudgetMetric, name="psnr", higher_is_better=True, unit="dB", compare=psnr):
    """PSNR of each protected photo against its original (8-bit)."""


@dataclass(frozen=True)
class SSIM(_BudgetMetric, name="ssim", higher_is_better=True, unit="ssim", compare=ssim):
    """SSIM of each protected photo against its original."""


ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet IMAGENET1K_V1


@functools.lru_cache(maxsize=2)
def _lpips_net(lin_weights: str) -> torch.nn.Module:
    from pyiqa.archs.lpips_arch import LPIPS as PyiqaLPIPS

    return PyiqaLPIPS(
        pretrained=False, net="alex", version="0.1", pretrained_model_path=lin_weights
    ).eval()


def lpips_net(lin: str) -> torch.nn.Module:
    """The LPIPS network from local files (the linear layers at ``lin``; torchvision's
    AlexNet in the torch hub cache), or ``MetricUnavailable`` naming what is missing."""
    if not lin or not Path(lin).expanduser().is_file():
        raise MetricUnavailable(
            f"lpips: linear-layer weights {lin or '(not set)'} not found; set the metric's "
            "weights or $ANTIPERS_LPIPS_WEIGHTS"
        )
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    if not backbone.is_file():
        raise MetricUnavailable(f"lpips: AlexNet checkpoint not found at {backbone}")
    return _lpips_net(str(Path(lin).expanduser()))


@dataclass(frozen=True)
class LPIPS(_BudgetMetric, name="lpips", higher_is_better=False, unit="lpips"):
    """LPIPS (v0.1, AlexNet) of each protected photo against its original, through
    pyiqa. Needs two local files: the LPIPS linear layers (``weights`` or
    ``$ANTIPERS_LPIPS_WEIGHTS``, e.g. pyiqa's ``LPIPS_v0.1_alex-df73285e.pth``) and
    torchvision's AlexNet checkpoint in the torch hub cache (never downloaded here)."""

    weights: str = ""
    backend_name: ClassVar[str] = "pyiqa-lpips-alex"

    def compare(self, protected: torch.Tensor, clean: torch.Tensor) -> np.ndarray:
        net = lpips_net(self.weights or os.environ.get("ANTIPERS_LPIPS_WEIGHTS", ""))
        with torch.no_grad():
            values = net(protected.cpu(), clean.cpu(), normalize=True)
        return values.flatten().double().numpy()

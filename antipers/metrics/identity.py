"""Identity metrics of Anti-DreamBooth: FDFR and ISM.

FDFR counts every generated image in which no face is found. ISM averages, over the
images that do have a face, the cosine similarity of each face embedding to the
mean embedding of the clean references; references without a face are left out of
that mean (the reference code counted them), and the count of faces is what FDFR
reports, so nothing is silently dropped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from antipers.metrics.base import MetricResult
from antipers.metrics.faces import face_backend


def reference_embedding(references: torch.Tensor, backend_name: str) -> np.ndarray:
    """The unit-norm mean embedding of the references that have a face."""
    emb = face_backend(backend_name).embed(references)
    found = ~np.isnan(emb).any(axis=1)
    if not found.any():
        raise ValueError(
            f"no face found in any of the {len(references)} reference images "
            f"(backend {backend_name!r}); ISM needs at least one"
        )
    mean = emb[found].mean(axis=0)
    return mean / np.linalg.norm(mean)


def _nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values)) if len(values) else float("nan")


@dataclass(frozen=True)
class FDFR:
    """Face detection failure rate: share of generated images with no face."""

    backend: str = "offline"
    name: ClassVar[str] = "fdfr"

    def score(self, generated: torch.Tensor, references: torch.Tensor) -> MetricResult:
        backend = face_backend(self.backend)
        values = np.array([1.0 if box is None else 0.0 for box in backend.detect(generated)])
        return MetricResult(self.name, values, _nanmean(values), backend.name, True, "fraction")


@dataclass(frozen=True)
class ISM:
    """Identity score matching: cosine similarity of each generated face to the mean
    reference face (NaN where no face is found)."""

    backend: str = "offline"
    name: ClassVar[str] = "ism"

    def score(self, generated: torch.Tensor, references: torch.Tensor) -> MetricResult:
        backend = face_backend(self.backend)
        ref = reference_embedding(references, self.backend)
        values = backend.embed(generated) @ ref
        return MetricResult(self.name, values, _nanmean(values), backend.name, False, "cosine")

"""Distances in the diffusion model's own latent space: what a defense's own measures
(a backdoor's target, an avatar's likeness to its person) are taken in, independent
of any face-recognition backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from antipers.metrics.base import MetricResult
from antipers.models.bundle import DiffusionBundle


def latent_mse(
    bundle: DiffusionBundle, images: torch.Tensor, references: torch.Tensor, batch_size: int = 8
) -> torch.Tensor:
    """``(len(images), len(references))`` mean squared distances between VAE latents
    (posterior means), in float64; encoded ``batch_size`` at a time (32 generations at
    512 px in one VAE pass would not fit a consumer GPU)."""
    a, b = _latents(bundle, images, batch_size), _latents(bundle, references, batch_size)
    # the exact pairwise form: the matrix-product shortcut loses small distances
    distances = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    return distances.pow(2) / a.shape[1]


def _latents(bundle: DiffusionBundle, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            latents = bundle.encode(images[start : start + batch_size].to(bundle.device))
            chunks.append(latents.flatten(1).double().cpu())
    return torch.cat(chunks)


@dataclass
class SubjectLikeness:
    """The immunization track's utility by the model's own measure, scored for every
    configuration: each generation's latent distance to the nearest of the person's
    photos (an avatar should still look like them, to people, while face recognition
    no longer links it)."""

    references: torch.Tensor
    metric: str = "subject_latent_distance"
    higher_is_better: bool = False

    def score(self, bundle: DiffusionBundle, images: torch.Tensor) -> MetricResult:
        values = latent_mse(bundle, images, self.references).min(dim=1).values.numpy()
        return MetricResult(
            self.metric, values, float(values.mean()), "antipers", False, "latent mse"
        )

"""Distances in the diffusion model's own latent space: what a defense's own measures
(a backdoor's target, an avatar's likeness to its person) are taken in, independent
of any face-recognition backend."""

from __future__ import annotations

import torch

from antipers.metrics.base import MetricResult
from antipers.models.bundle import DiffusionBundle


def latent_mse(
    bundle: DiffusionBundle, images: torch.Tensor, references: torch.Tensor
) -> torch.Tensor:
    """``(len(images), len(references))`` mean squared distances between VAE latents
    (posterior means), in float64."""
    with torch.no_grad():
        a = bundle.encode(images.to(bundle.device)).flatten(1).double().cpu()
        b = bundle.encode(references.to(bundle.device)).flatten(1).double().cpu()
    # the exact pairwise form: the matrix-product shortcut loses small distances
    distances = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    return distances.pow(2) / a.shape[1]


def subject_likeness(
    bundle: DiffusionBundle, generated: torch.Tensor, references: torch.Tensor
) -> MetricResult:
    """The immunization track's utility by the model's own measure: each generation's
    latent distance to the nearest of the person's photos (an avatar should still look
    like them, to people, while face recognition no longer links it)."""
    values = latent_mse(bundle, generated, references).min(dim=1).values.numpy()
    return MetricResult(
        "subject_latent_distance", values, float(values.mean()), "antipers", False, "latent mse"
    )

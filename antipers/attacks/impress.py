"""IMPRESS (Cao et al., NeurIPS 2023), the purification that Hönig et al. (ICLR 2025)
strengthen: adversarial photos are ones the latent diffusion model's autoencoder does
not reconstruct consistently, so optimize each photo towards VAE consistency while it
stays within a perceptual distance of what was published:

    max(d(x', x) - delta, 0) + alpha * ||x' - D(E(x'))||^2

``d`` is LPIPS where its weights are given (``lpips_weights``), else the root mean
squared pixel difference; the spec records which. The base model's VAE is the
attacker's (the model they fine-tune); the decoder sees the posterior mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch

from antipers.attacks.countermeasures import AttackEnv
from antipers.ranges import Checked, Range

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # per-image distances


def rms_distance(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (((x - reference) ** 2).flatten(1).mean(1) + 1e-12).sqrt()  # finite gradient at 0


def consistency(x: torch.Tensor, env: AttackEnv) -> torch.Tensor:
    """Per-image ``||x - D(E(x))||^2`` (mean over pixels) through the base model's VAE."""
    reconstruction = env.bundle.decode(env.bundle.encode(x))
    return ((x - reconstruction.to(x.device)) ** 2).flatten(1).mean(1)


@dataclass(frozen=True)
class Impress(Checked):
    """IMPRESS purification: ``steps`` of Adam at ``lr`` on the photos (``steps=0`` is
    the identity). ``delta``: the allowed distance (LPIPS, or RMS in [0, 1] without
    LPIPS weights); ``alpha``: the consistency term's weight."""

    steps: Annotated[int, Range(ge=0)] = 100
    lr: Annotated[float, Range(gt=0)] = 0.01
    delta: Annotated[float, Range(ge=0)] = 0.05
    alpha: Annotated[float, Range(ge=0)] = 1.0
    lpips_weights: str = ""

    def distance(self, device: torch.device) -> Distance:
        if not self.lpips_weights:
            return rms_distance
        from antipers.metrics.base import MetricUnavailable
        from antipers.metrics.budget import lpips_net

        try:
            net = lpips_net(self.lpips_weights).to(device)
        except MetricUnavailable as exc:
            raise ValueError(f"impress.lpips_weights: {exc}") from None
        return lambda x, ref: net(x, ref, normalize=True).flatten()

    def loss(self, x: torch.Tensor, published: torch.Tensor, env: AttackEnv, d: Distance):
        hinge = torch.relu(d(x, published) - self.delta)
        return (hinge + self.alpha * consistency(x, env)).mean()

    def apply(self, images: torch.Tensor, env: AttackEnv) -> torch.Tensor:
        if self.steps == 0:
            return images
        published = images.detach()
        d = self.distance(images.device)
        x = published.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                optimizer.zero_grad(set_to_none=True)
                self.loss(x, published, env, d).backward()
                optimizer.step()
                with torch.no_grad():
                    x.clamp_(0.0, 1.0)
        return x.detach()

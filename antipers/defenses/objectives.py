"""Objectives the PGD engine maximizes, shared by the image defenses."""

from __future__ import annotations

from collections.abc import Callable

import torch

from antipers.defenses.pgd import Objective
from antipers.models.bundle import DiffusionBundle


def denoising_objective(
    bundle: DiffusionBundle,
    prompt: str,
    generator: torch.Generator,
    t_range: tuple[int, int] | None = None,
) -> Objective:
    """ASPL's loss: the surrogate's denoising error on the perturbed photos, fresh noise
    and timesteps each step (as the reference code draws them)."""
    with torch.no_grad():
        embeds = bundle.prompt_embeds([prompt])

    def objective(x: torch.Tensor, step: int) -> torch.Tensor:
        latents = bundle.encode(x, generator)
        return bundle.training_loss(latents, embeds.expand(len(x), -1, -1), generator, t_range)

    return objective


def gram(features: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, C)`` Gram matrices, normalised by C*H*W."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w).float()
    return flat @ flat.transpose(1, 2) / (c * h * w)


def gram_spread(feature_maps: list[torch.Tensor]) -> torch.Tensor:
    """CAP's consistency loss: mean over the set of the squared distance of each image's
    Gram matrix to the set's mean Gram matrix, summed over the chosen layers."""
    total = torch.zeros((), device=feature_maps[0].device)
    for f in feature_maps:
        g = gram(f)
        total = total + ((g - g.mean(dim=0, keepdim=True)) ** 2).sum(dim=(1, 2)).mean()
    return total


def dynamic_weight(
    reconstruction: float,
    consistency: float,
    iteration: int,
    target: float,
    warmup: int,
) -> float:
    """CAP's dynamic ratio (our rule; the paper's is not public): weight the consistency
    term so that it is ``share`` of the reconstruction term's magnitude, where ``share``
    ramps linearly from ``target/warmup`` to ``target`` over the first ``warmup``
    iterations and stays there. Re-estimated every step from the current magnitudes."""
    share = target * min(1.0, (iteration + 1) / warmup) if warmup > 0 else target
    return share * abs(reconstruction) / max(abs(consistency), 1e-12)


class UpBlockFeatures:
    """Forward hooks that keep the outputs of chosen UNet up blocks (SimAC's feature loss)."""

    def __init__(self, unet: torch.nn.Module, blocks: tuple[int, ...]) -> None:
        self.outputs: list[torch.Tensor] = []
        n = len(unet.up_blocks)
        bad = [b for b in blocks if not 0 <= b < n]
        if bad:
            raise ValueError(f"feature_blocks {bad}: this UNet has up blocks 0..{n - 1}")
        self._handles = [unet.up_blocks[b].register_forward_hook(self._keep) for b in blocks]

    def _keep(self, module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


FeatureFn = Callable[[torch.Tensor], list[torch.Tensor]]

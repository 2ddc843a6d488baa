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
    chunk: int | None = None,
) -> Objective:
    """ASPL's loss: the surrogate's denoising error on the perturbed photos, fresh noise
    and timesteps each step (as the reference code draws them). ``chunk``: photos whose
    graph is held at once (the memory plan's ``pgd_chunk``); the same draws, loss and
    gradient as the whole batch, to float rounding (other batch sizes run other
    kernels)."""
    with torch.no_grad():
        embeds = bundle.prompt_embeds([prompt])

    def objective(x: torch.Tensor, step: int) -> torch.Tensor:
        n = len(x)
        if chunk is None or chunk >= n or not x.requires_grad:
            latents = bundle.encode(x, generator)
            return bundle.training_loss(latents, embeds.expand(n, -1, -1), generator, t_range)
        # the whole batch's draws, in the order the batched call makes them
        f = bundle.latent_factor
        shape = (n, bundle.vae.config.latent_channels, x.shape[-2] // f, x.shape[-1] // f)
        sampling = torch.randn(shape, generator=generator, dtype=torch.float32)
        noise = bundle.noise_like(sampling, generator)
        t = bundle.sample_timesteps(n, generator, t_range)

        def loss_of(lo: int, hi: int, part: torch.Tensor) -> torch.Tensor:
            posterior = bundle.posterior(part)
            if posterior.mean.shape[1:] != shape[1:]:
                raise ValueError(f"VAE latents {tuple(posterior.mean.shape)}, expected {shape}")
            latents = posterior.sample(sampling[lo:hi])
            cond = embeds.expand(hi - lo, -1, -1)
            return bundle.denoising_loss(latents, cond, noise[lo:hi].to(latents.device), t[lo:hi])

        return in_chunks(x, chunk, loss_of)

    return objective


def in_chunks(
    x: torch.Tensor, chunk: int, loss_of: Callable[[int, int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """A loss that is a mean of per-photo terms, with one chunk's graph alive at a time:
    each chunk is differentiated as it is computed, and the scalar returned has the
    batch's mean loss as its value and the collected gradient as its gradient in ``x``
    (so the PGD engine, EOT transforms and CAP's gradient measure use it unchanged).
    ``loss_of(lo, hi, x[lo:hi])``: the mean loss of photos ``lo..hi``."""
    n = len(x)
    grad, total = torch.zeros_like(x), torch.zeros((), device=x.device)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        part = x[lo:hi].detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_of(lo, hi, part) * ((hi - lo) / n)
            (grad[lo:hi],) = torch.autograd.grad(loss, part)
        total = total + loss.detach()
    return carrying_gradient(total, x, grad)


def carrying_gradient(value: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar equal to ``value`` (exactly) whose gradient in ``x`` is ``grad``: for an
    objective that differentiated itself and hands the PGD engine only the result."""
    linear = (x * grad).sum()
    return value.detach() + (linear - linear.detach())


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

"""Objectives the PGD engine maximizes, shared by the image defenses."""

from __future__ import annotations

from collections.abc import Callable

import torch

from antipers.defenses.pgd import Objective
from antipers.models.bundle import DiffusionBundle

Term = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, slice], torch.Tensor]
"""A PGD loss from the latents, noise and timesteps of the batch's photos ``rows``:
their mean, so a batch's loss is the size-weighted mean of its chunks'."""


def denoising_objective(
    bundle: DiffusionBundle,
    prompt: str,
    generator: torch.Generator,
    t_range: tuple[int, int] | None = None,
    chunk: int | None = None,
) -> Objective:
    """ASPL's loss: the surrogate's denoising error on the perturbed photos, fresh noise
    and timesteps each step (as the reference code draws them), in chunks of ``chunk``
    photos (``drawn_loss``)."""
    with torch.no_grad():
        embeds = bundle.prompt_embeds([prompt])

    def term(
        latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, rows: slice
    ) -> torch.Tensor:
        return bundle.denoising_loss(latents, embeds.expand(len(latents), -1, -1), noise, t)

    def objective(x: torch.Tensor, step: int) -> torch.Tensor:
        return drawn_loss(bundle, x, generator, term, t_range, chunk)

    return objective


def drawn_loss(
    bundle: DiffusionBundle,
    x: torch.Tensor,
    generator: torch.Generator,
    term: Term,
    t_range: tuple[int, int] | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """``term`` on the photos ``x`` encoded and noised with fresh draws (a latent
    sample, noise, timesteps, in that order). ``chunk``: photos whose graph is held at
    once (the memory plan's ``pgd_chunk``); the same draws, loss and gradient as the
    whole batch, to float rounding (other batch sizes run other kernels)."""
    n = len(x)
    if whole_batch(x, chunk):
        latents = bundle.encode(x, generator)
        noise = bundle.noise_like(latents, generator)
        return term(latents, noise, bundle.sample_timesteps(n, generator, t_range), slice(0, n))
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
        return term(latents, noise[lo:hi].to(latents.device), t[lo:hi], slice(lo, hi))

    return in_chunks(x, chunk, loss_of)


def whole_batch(x: torch.Tensor, chunk: int | None) -> bool:
    """Whether a loss on ``x`` runs as one graph: no plan to split, a chunk as large as
    the batch, or no gradient to collect."""
    return chunk is None or chunk >= len(x) or not x.requires_grad


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
        total = total + _spread(g, g.mean(dim=0, keepdim=True))
    return total


def _spread(grams: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return ((grams - mean) ** 2).sum(dim=(1, 2)).mean()


def consistency_loss(extract: FeatureFn, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """``gram_spread(extract(x))``, with one chunk's feature maps alive at a time where
    the memory plan splits PGD: the set's mean Gram matrices first, without gradients
    (one more pass of the extractor), then each chunk's spread around them. The
    gradient is the whole set's: what the spread pulls through the mean sums to zero
    over the set, so holding the mean fixed drops nothing."""
    if chunk is None or whole_batch(x, chunk):
        return gram_spread(extract(x))
    with torch.no_grad():
        grams = [[gram(f) for f in extract(x[lo : lo + chunk])] for lo in range(0, len(x), chunk)]
        layers = zip(*grams, strict=True)
        means = [torch.cat(layer).mean(dim=0, keepdim=True) for layer in layers]

    def loss_of(lo: int, hi: int, part: torch.Tensor) -> torch.Tensor:
        spreads = [_spread(gram(f), m) for f, m in zip(extract(part), means, strict=True)]
        return torch.stack(spreads).sum()

    return in_chunks(x, chunk, loss_of)


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

"""The one fine-tuning loop behind every personalization (LoRA, DreamBooth) and the
surrogate training of the PGD defenses: denoising loss on (image, prompt) batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from antipers.models.bundle import DiffusionBundle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float
    batch_size: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterable[torch.Tensor]:
    """Endless shuffled epochs over ``n`` items, ``batch_size`` at a time."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def finetune(
    bundle: DiffusionBundle,
    images: torch.Tensor,
    prompt: str,
    params: list[torch.nn.Parameter],
    config: TrainConfig,
    generator: torch.Generator,
    train_text_encoder: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``params`` (already set to require grad) of ``bundle`` on ``images``.

    Returns the per-step losses. The VAE stays frozen; latents are sampled from its
    posterior each step, as DreamBooth does.
    """
    if images.shape[0] == 0:
        raise ValueError("cannot personalize on an empty image set")
    if not params:
        raise ValueError("no trainable parameters")
    images = images.to(bundle.device)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    bundle.unet.train()
    if train_text_encoder:
        bundle.text_encoder.train()
    fixed_embeds = None
    losses: list[float] = []
    batches = batch_indices(images.shape[0], config.batch_size, generator)
    every = max(1, config.steps // 10)
    try:
        for step in range(config.steps):
            idx = next(batches)
            with torch.no_grad():
                latents = bundle.encode(images[idx], generator)
            if train_text_encoder:
                embeds = bundle.prompt_embeds([prompt] * len(idx))
            else:
                if fixed_embeds is None:
                    with torch.no_grad():
                        fixed_embeds = bundle.prompt_embeds([prompt])
                embeds = fixed_embeds.expand(len(idx), -1, -1)
            loss = bundle.training_loss(latents, embeds, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
            if (step + 1) % every == 0 or step + 1 == config.steps:
                log.info("finetune step %d/%d loss %.4f", step + 1, config.steps, losses[-1])
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        bundle.unet.eval()
        bundle.text_encoder.eval()
    return losses

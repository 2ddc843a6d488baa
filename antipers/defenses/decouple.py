"""IDDM's data step: identity-decoupled optimization of the training photos. PGD moves
each photo's face-recognition embedding away from the person's own (the mean embedding
of the originals) while the personalized model's diffusion reconstruction loss on it
stays low, within an L-inf budget that keeps the visible content. ``privacy`` in [0, 1]
is the knob between the two terms.
"""

from __future__ import annotations

import torch

from antipers.defenses.pgd import PGDConfig, pgd
from antipers.models.bundle import DiffusionBundle
from antipers.models.embedders import identity_similarity, person_embedding


def decouple(
    photos: torch.Tensor,
    bundle: DiffusionBundle,
    embedder: torch.nn.Module,
    prompt: str,
    privacy: float,
    config: PGDConfig,
    generator: torch.Generator,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """The photos after ``config.steps`` decoupling steps, from ``start`` (an earlier
    round's result; default the photos), always within the budget around ``photos``."""
    if not 0.0 <= privacy <= 1.0:
        raise ValueError(f"privacy: expected 0..1, got {privacy}")
    person = person_embedding(embedder, photos)
    with torch.no_grad():
        embeds = bundle.prompt_embeds([prompt] * len(photos))

    def objective(x: torch.Tensor, step: int) -> torch.Tensor:  # maximized by PGD
        similarity = identity_similarity(embedder, x, person).mean()
        draws = torch.Generator().manual_seed(step)  # the same draws for every setting
        reconstruction = bundle.training_loss(bundle.encode(x), embeds, draws)
        return -(privacy * similarity + (1.0 - privacy) * reconstruction)

    return pgd(photos if start is None else start, photos, objective, config, generator)

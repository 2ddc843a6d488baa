"""SimAC: ASPL with an adaptive greedy search of the diffusion timestep interval and a
feature-interference loss on the UNet's up-block (decoder) features.

The paper's observation: perturbations aimed at small timesteps (high-frequency
detail) disrupt personalization most. Our search (constants ours): every
``search_every`` iterations, start from the full interval [0, T) and lower its upper
bound by ``search_delta`` while the adversarial gain (loss on the perturbed photos
minus loss on the clean ones) keeps rising, down to ``search_min_t``. Every candidate
of one search is scored on common random numbers: the same noise and the same
uniform draws, mapped into each candidate's interval, so the comparison between
candidates is not noise and the search is deterministic for a seed. PGD then samples
timesteps in the chosen interval and also pushes the up-block features of the
perturbed photos away from those of the clean ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch

from antipers.defenses.aspl import ASPL
from antipers.defenses.objectives import UpBlockFeatures, drawn_loss
from antipers.defenses.pgd import Objective
from antipers.defenses.surrogate_pgd import RunState, log
from antipers.models.bundle import DiffusionBundle
from antipers.ranges import Range


def greedy_upper_bound(gain: Callable[[int], float], t_max: int, delta: int, t_min: int) -> int:
    """Lower the upper bound from ``t_max`` by ``delta`` while ``gain`` strictly rises,
    never below ``t_min``: the first local maximum of the gain on that grid."""
    t_hi, best = t_max, gain(t_max)
    while t_hi - delta >= t_min:
        candidate = gain(t_hi - delta)
        if candidate <= best:
            break
        t_hi, best = t_hi - delta, candidate
    return t_hi


@dataclass(frozen=True)
class SimAC(ASPL):
    """SimAC (protocol: eps 8/255), ASPL + timestep-interval search + up-block feature loss."""

    eps: float = 8.0
    feature_weight: Annotated[float, Range(ge=0)] = 1.0
    feature_blocks: tuple[int, ...] = (-2, -1)
    search_every: Annotated[int, Range(ge=1)] = 10
    search_delta: Annotated[int, Range(ge=1)] = 100
    search_min_t: Annotated[int, Range(ge=1)] = 100
    search_draws: Annotated[int, Range(ge=1)] = 2

    def _blocks(self, bundle: DiffusionBundle) -> tuple[int, ...]:
        n = len(bundle.unet.up_blocks)
        if any(not -n <= b < n for b in self.feature_blocks):
            raise ValueError(f"feature_blocks {self.feature_blocks}: this UNet has {n} up blocks")
        return tuple(sorted({b % n for b in self.feature_blocks}))

    def gain_fn(
        self,
        bundle: DiffusionBundle,
        x: torch.Tensor,
        clean: torch.Tensor,
        generator: torch.Generator,
    ) -> Callable[[int], float]:
        """Mean adversarial gain for timesteps in [0, t_hi), as a function of ``t_hi``,
        on numbers drawn once: noise, and uniforms that each interval scales."""
        with torch.no_grad():
            embeds = bundle.prompt_embeds([self.instance_prompt]).expand(len(x), -1, -1)
            lx, lc = bundle.encode(x), bundle.encode(clean)
        noises = [bundle.noise_like(lx, generator) for _ in range(self.search_draws)]
        uniforms = torch.rand(self.search_draws, len(x), generator=generator)

        def gain(t_hi: int) -> float:
            total = 0.0
            with torch.no_grad():
                for noise, u in zip(noises, uniforms, strict=True):
                    t = (u * t_hi).long().clamp(max=t_hi - 1).to(bundle.device)
                    total += float(bundle.denoising_loss(lx, embeds, noise, t))
                    total -= float(bundle.denoising_loss(lc, embeds, noise, t))
            return total / self.search_draws

        return gain

    def before_pgd(
        self,
        bundle: DiffusionBundle,
        x: torch.Tensor,
        clean: torch.Tensor,
        generator: torch.Generator,
        iteration: int,
        state: RunState,
    ) -> None:
        if iteration % self.search_every:
            return
        t_hi = greedy_upper_bound(
            self.gain_fn(bundle, x, clean, generator),
            int(bundle.scheduler.config.num_train_timesteps),
            self.search_delta,
            self.search_min_t,
        )
        state.t_range = (0, t_hi)
        state.extra.setdefault("t_max", []).append(t_hi)
        log.info("SimAC iteration %d: timestep interval [0, %d)", iteration, t_hi)

    def objective(
        self,
        bundle: DiffusionBundle,
        clean: torch.Tensor,
        generator: torch.Generator,
        state: RunState,
    ) -> Objective:
        with torch.no_grad():
            embeds = bundle.prompt_embeds([self.instance_prompt])
            clean_latents = bundle.encode(clean)
        blocks = self._blocks(bundle)

        def term(
            latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, rows: slice
        ) -> torch.Tensor:
            emb = embeds.expand(len(latents), -1, -1)
            hooks = UpBlockFeatures(bundle.unet, blocks)
            try:
                loss = bundle.denoising_loss(latents, emb, noise, t)
                adv_features = hooks.take()
                with torch.no_grad():
                    bundle.denoising_loss(clean_latents[rows], emb, noise, t)
                clean_features = hooks.take()
            finally:
                hooks.close()
            if self.feature_weight > 0:
                feature = sum(
                    ((a.float() - c.float()) ** 2).mean()
                    for a, c in zip(adv_features, clean_features, strict=True)
                )
                loss = loss + self.feature_weight * feature
            return loss

        def objective(x: torch.Tensor, step: int) -> torch.Tensor:
            if len(x) != len(clean_latents):
                raise ValueError(f"SimAC: {len(x)} photos against {len(clean_latents)} clean")
            return drawn_loss(bundle, x, generator, term, state.t_range, state.pgd_chunk)

        return objective

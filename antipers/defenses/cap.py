"""CAP: cross-image consistency around any surrogate PGD defense.

Two parts. (1) A style-consistency loss on the perturbed set: Gram matrices of
feature maps of each protected photo are pulled towards the set's mean Gram matrix
(``gram_spread``), so the perturbation looks like one consistent "style" across the
person's photos. (2) A dynamic ratio that sets that loss's weight against the
reconstruction (adversarial) loss: re-estimated every PGD step so the consistency
term stays at ``cap_target`` of the reconstruction term, by loss magnitude or by
gradient norm, after a linear warm-up over ``cap_warmup`` PGD steps. The target and
warm-up are the "loss ratios" a Tune search explores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from antipers.defenses.aspl import ASPL
from antipers.defenses.features import vae_features, vgg_features
from antipers.defenses.fsmg import FSMG
from antipers.defenses.objectives import FeatureFn, consistency_loss, dynamic_weight
from antipers.defenses.pgd import Objective
from antipers.defenses.simac import SimAC
from antipers.defenses.surrogate_pgd import RunState
from antipers.models.bundle import DiffusionBundle
from antipers.ranges import Range


@dataclass(frozen=True)
class CAPMixin:
    """CAP's settings and objective; mixed in before a ``SurrogatePGD`` defense (it holds
    only its own fields, so the wrapped defense keeps its own defaults)."""

    cap_target: Annotated[float, Range(ge=0)] = 0.5
    cap_warmup: Annotated[int, Range(ge=0)] = 60
    cap_measure: Literal["loss", "grad"] = "loss"
    cap_extractor: Literal["vae", "vgg19"] = "vae"
    cap_layers: tuple[int, ...] = ()
    cap_vgg_weights: str = ""

    def features(self, bundle: DiffusionBundle) -> FeatureFn:
        """The consistency loss's features: with ``vae``, the base model's encoder (its
        weights are never trained by the surrogate)."""
        if self.cap_extractor == "vgg19":
            return vgg_features(self.cap_vgg_weights, self.cap_layers, bundle.device)
        layers = self.cap_layers or tuple(range(len(bundle.vae.encoder.down_blocks) - 1))
        return vae_features(bundle, layers)

    def objective(
        self,
        bundle: DiffusionBundle,
        clean: torch.Tensor,
        generator: torch.Generator,
        state: RunState,
    ) -> Objective:
        reconstruction = super().objective(bundle, clean, generator, state)  # type: ignore[misc]
        extract = self.features(bundle)

        def objective(x: torch.Tensor, step: int) -> torch.Tensor:
            rec = reconstruction(x, step)
            cons = consistency_loss(extract, x, state.pgd_chunk)  # chunked as ``rec``
            if self.cap_measure == "grad":
                (g_rec,) = torch.autograd.grad(rec, x, retain_graph=True)
                (g_cons,) = torch.autograd.grad(cons, x, retain_graph=True)
                rec_size, cons_size = float(g_rec.norm()), float(g_cons.norm())
            else:
                rec_size, cons_size = float(rec.detach()), float(cons.detach())
            weight = dynamic_weight(
                rec_size, cons_size, state.pgd_steps_done, self.cap_target, self.cap_warmup
            )
            state.cap_weights.append(weight)
            return rec - weight * cons

        return objective


@dataclass(frozen=True)
class CAPASPL(CAPMixin, ASPL):
    """CAP around ASPL: style-consistent perturbations across the set, dynamic loss ratio."""


@dataclass(frozen=True)
class CAPSimAC(CAPMixin, SimAC):
    """CAP around SimAC: style-consistent perturbations across the set, dynamic loss ratio."""


@dataclass(frozen=True)
class CAPFSMG(CAPMixin, FSMG):
    """CAP around FSMG: style-consistent perturbations across the set, dynamic loss ratio."""

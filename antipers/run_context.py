"""What a worker keeps resident between experiments (base models, datasets, metric
models, the last few people's photos), and the seeded stream each stage draws from.

A Ray worker, a Tune trial and ``run_experiment`` each hold one ``RunContext``; it
never crosses processes.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch

from antipers.device import pick_device
from antipers.models.bundle import DiffusionBundle
from antipers.registry import BASE_MODELS, DATASETS, METRICS
from antipers.spec import ComponentSpec, ExperimentSpec, canonical_json

STAGES = ("load", "protect", "countermeasure", "personalize", "sample", "score")


def load_base_model(spec: ComponentSpec, device: torch.device) -> DiffusionBundle:
    """The base model with its fingerprint (what its weights are, and where and how
    they run), which keys the class images cached from it: without one they are
    generated again at every run."""
    bundle = spec.build(BASE_MODELS).load(device)
    bundle.fingerprint = canonical_json(
        {
            "model": spec.to_dict(),
            "source": bundle.source,  # a local folder's path and weights' mtime
            "device": device.type,
            "bf16": bundle.mixed_precision and device.type == "cuda",
        }
    )
    return bundle


@dataclass
class RunContext:
    """Resident state of one worker: base models and datasets, built once per spec.
    ``name`` says where rows were computed (a Ray worker sets node and process)."""

    device: torch.device = field(default_factory=pick_device)
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    _identities: dict[tuple[ComponentSpec, str, int], Any] = field(default_factory=dict)
    _bundles: dict[ComponentSpec, DiffusionBundle] = field(default_factory=dict)
    _datasets: dict[ComponentSpec, Any] = field(default_factory=dict)
    _metrics: dict[ComponentSpec, Any] = field(default_factory=dict)
    _galleries: dict[tuple[ComponentSpec, int], dict[str, torch.Tensor]] = field(
        default_factory=dict
    )

    def base_model(self, spec: ComponentSpec) -> DiffusionBundle:
        if spec not in self._bundles:
            self._bundles[spec] = load_base_model(spec, self.device)
        return self._bundles[spec]

    def dataset(self, spec: ComponentSpec) -> Any:
        if spec not in self._datasets:
            self._datasets[spec] = spec.build(DATASETS)
        return self._datasets[spec]

    def resident_models(self) -> list[str]:
        return sorted(canonical_json(s.to_dict()) for s in self._bundles)

    def identity(self, spec: ExperimentSpec) -> Any:
        """The spec's photos; the last few stay cached, since every stage reads them."""
        return self.person(spec.dataset, spec.identity, spec.resolution)

    def person(self, dataset: ComponentSpec, identity: str, resolution: int) -> Any:
        key = (dataset, identity, resolution)
        if key not in self._identities:
            while len(self._identities) >= 4:
                self._identities.pop(next(iter(self._identities)))
            self._identities[key] = self.dataset(dataset).load(identity, resolution)
        return self._identities[key]

    def metric(self, spec: ComponentSpec) -> Any:
        """Metric instances live as long as the worker: their models load once."""
        if spec not in self._metrics:
            self._metrics[spec] = spec.build(METRICS)
        return self._metrics[spec]

    def gallery(self, spec: ComponentSpec, resolution: int) -> dict[str, torch.Tensor]:
        """Every identity's reference photos (set_A), for linkability."""
        key = (spec, resolution)
        if key not in self._galleries:
            dataset = self.dataset(spec)
            self._galleries[key] = {
                name: dataset.load(name, resolution).set_A for name in dataset.identities()
            }
        return self._galleries[key]


def stage_rng(seed: int, stage: str) -> torch.Generator:
    """An independent, reproducible stream per stage: changing the attack's step count
    does not change the noise the sampler draws."""
    offset = STAGES.index(stage) * 1_000_003
    return torch.Generator().manual_seed(seed * 7_919 + offset)

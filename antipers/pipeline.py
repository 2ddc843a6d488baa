"""``run_experiment``: one spec through every stage, in-process, no Ray.

identity photos -> protect -> countermeasure -> personalize -> sample -> score -> rows

A stage a track does not use is the ``none`` component, never a special case here.
The Ray workers, Tune trials and Serve call this same function; a ``RunContext``
keeps base models, datasets and face backends resident between experiments.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from antipers import __version__
from antipers.attacks.countermeasures import AttackEnv
from antipers.device import pick_device
from antipers.images import check_images
from antipers.metrics.base import MetricResult, ScoreInputs, evaluate
from antipers.models.bundle import DiffusionBundle
from antipers.registry import (
    ATTACKS,
    BASE_MODELS,
    COUNTERMEASURES,
    DATASETS,
    DEFENSES,
    METRICS,
    SAMPLERS,
)
from antipers.results import AGGREGATE_INDEX, ERROR, SCHEMA_VERSION, ResultStore
from antipers.spec import ComponentSpec, ExperimentSpec, canonical_json

log = logging.getLogger(__name__)
STAGES = ("load", "protect", "countermeasure", "personalize", "sample", "score")


@dataclass
class RunContext:
    """Resident state of one worker: base models and datasets, built once per spec."""

    device: torch.device = field(default_factory=pick_device)
    _bundles: dict[ComponentSpec, DiffusionBundle] = field(default_factory=dict)
    _datasets: dict[ComponentSpec, Any] = field(default_factory=dict)
    _metrics: dict[ComponentSpec, Any] = field(default_factory=dict)
    _galleries: dict[tuple[ComponentSpec, int], dict[str, torch.Tensor]] = field(
        default_factory=dict
    )

    def base_model(self, spec: ComponentSpec) -> DiffusionBundle:
        if spec not in self._bundles:
            bundle = spec.build(BASE_MODELS).load(self.device)
            bundle.fingerprint = canonical_json(
                {
                    "model": spec.to_dict(),
                    "source": bundle.source,  # a local folder's path and weights' mtime
                    "device": self.device.type,
                    "bf16": bundle.mixed_precision and self.device.type == "cuda",
                }
            )
            self._bundles[spec] = bundle
        return self._bundles[spec]

    def dataset(self, spec: ComponentSpec) -> Any:
        if spec not in self._datasets:
            self._datasets[spec] = spec.build(DATASETS)
        return self._datasets[spec]

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


def _rng(seed: int, stage: str) -> torch.Generator:
    """An independent, reproducible stream per stage: changing the attack's step count
    does not change the noise the sampler draws."""
    offset = STAGES.index(stage) * 1_000_003
    return torch.Generator().manual_seed(seed * 7_919 + offset)


def _base_row(spec: ExperimentSpec, started: datetime) -> dict[str, Any]:
    return {
        "spec_id": spec.spec_id,
        "suite": spec.suite,
        "protocol": spec.protocol,
        "track": spec.track,
        "dataset": spec.dataset.name,
        "identity": spec.identity,
        "base_model": spec.base_model.name,
        "defense": spec.defense.name,
        "defense_params": spec.defense.params_json(),
        "countermeasure": spec.countermeasure_name,
        "countermeasure_params": spec.countermeasure_json(),
        "attack": spec.attack.name,
        "attack_params": spec.attack.params_json(),
        "seed": spec.seed,
        "started_at": started,
        "antipers_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "spec_json": spec.to_json(),
        "error": None,
    }


ProgressFn = Callable[[str], None]


def _stages(spec: ExperimentSpec, ctx: RunContext, progress: ProgressFn) -> list[Any]:
    progress("load")
    bundle = ctx.base_model(spec.base_model)
    identity = ctx.dataset(spec.dataset).load(spec.identity, spec.resolution)
    countermeasures = [c.build(COUNTERMEASURES) for c in spec.countermeasure]
    for countermeasure in countermeasures:  # fail before the expensive stages
        if hasattr(countermeasure, "check"):
            countermeasure.check(identity)
    progress("protect")
    protected = spec.defense.build(DEFENSES).protect(identity, bundle, _rng(spec.seed, "protect"))
    check_images(protected.images, f"defense {spec.defense.name!r} output")
    progress("countermeasure")
    env = AttackEnv(bundle, identity, _rng(spec.seed, "countermeasure"))
    train_images = protected.images
    for cspec, countermeasure in zip(spec.countermeasure, countermeasures, strict=True):
        train_images = countermeasure.apply(train_images, env)
        check_images(train_images, f"countermeasure {cspec.name!r} output")
    if protected.personalized is not None:
        personalized = protected.personalized
    else:
        progress("personalize")
        attack = spec.attack.build(ATTACKS)
        personalized = attack.personalize(
            train_images, protected.bundle, _rng(spec.seed, "personalize")
        )
    progress("sample")
    sampler = spec.sampling.build(SAMPLERS)
    generated = sampler.sample(personalized, spec.resolution, _rng(spec.seed, "sample"))
    progress("score")
    metrics = [ctx.metric(m) for m in spec.metrics]
    needs_gallery = any(getattr(m, "needs_gallery", False) for m in metrics)
    inputs = ScoreInputs(
        generated=generated,
        references=identity.set_A,
        identity=spec.identity,
        prompts=sampler.image_prompts(),
        protected=protected.images,
        clean=identity.set_B,
        gallery=ctx.gallery(spec.dataset, spec.resolution) if needs_gallery else None,
    )
    return [evaluate(m, inputs) for m in metrics]


def run_experiment(
    spec: ExperimentSpec,
    context: RunContext | None = None,
    progress: ProgressFn | None = None,
    raise_errors: bool = False,
) -> list[dict[str, Any]]:
    """The result rows of ``spec``. A failure becomes one row with ``status="error"``
    and the message (unless ``raise_errors``), never a lost experiment."""
    ctx = context or RunContext()
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    base = _base_row(spec, started)
    say = progress or (lambda stage: log.info("%s: %s", spec.spec_id, stage))
    try:
        results = _stages(spec, ctx, say)
    except Exception as exc:
        if raise_errors:
            raise
        log.warning("experiment %s failed: %s", spec.spec_id, exc)
        message = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        return [
            {
                **base,
                "metric": "",
                "value": float("nan"),
                "higher_is_better": None,
                "unit": "",
                "backend": "",
                "image_index": AGGREGATE_INDEX,
                "status": ERROR,
                "error": message,
                "duration_s": time.perf_counter() - t0,
            }
        ]
    return metric_rows(base, results, time.perf_counter() - t0)


def metric_rows(
    base: dict[str, Any], results: list[MetricResult], duration: float
) -> list[dict[str, Any]]:
    """Long-format rows: per metric its aggregate (``image_index`` -1), one row per
    image, and one row per reported note (``metric:note``); an unavailable metric is one
    row with its reason."""
    rows = []
    for result in results:
        common = {
            **base,
            "metric": result.metric,
            "higher_is_better": result.higher_is_better,
            "unit": result.unit,
            "backend": result.backend,
            "status": result.status,
            "error": result.reason or base.get("error"),
            "duration_s": duration,
        }
        rows.append({**common, "value": float(result.aggregate), "image_index": AGGREGATE_INDEX})
        rows += [
            {**common, "value": float(v), "image_index": i} for i, v in enumerate(result.values)
        ]
        rows += [
            {
                **common,
                "metric": f"{result.metric}:{note}",
                "unit": "count",
                "value": float(v),
                "image_index": AGGREGATE_INDEX,
            }
            for note, v in result.notes.items()
        ]
    return rows


def run_and_store(
    spec: ExperimentSpec,
    store: ResultStore,
    context: RunContext | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """Run ``spec`` unless the store has it; returns (rows, ran)."""
    if not force and spec.spec_id in store.finished_ids():
        return store.load([spec.spec_id]).to_dict("records"), False
    rows = run_experiment(spec, context, progress)
    store.write(rows)
    return rows, True

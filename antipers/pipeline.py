"""``run_experiment``: one spec through every stage, in-process, no Ray.

identity photos -> protect -> countermeasure -> personalize -> sample -> score -> rows

A stage a track does not use is the ``none`` component, never a special case here.
The Ray workers, Tune trials and Serve call this same function; a ``RunContext``
keeps base models, datasets and face backends resident between experiments.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from antipers import __version__
from antipers.attacks.countermeasures import AttackEnv
from antipers.device import pick_device
from antipers.errors import ComponentUnavailable
from antipers.images import check_images
from antipers.metrics.base import UNAVAILABLE, MetricResult, ScoreInputs, evaluate
from antipers.metrics.latent import SubjectLikeness
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
from antipers.samples import thumbnails
from antipers.spec import ComponentSpec, ExperimentSpec, canonical_json

log = logging.getLogger(__name__)
STAGES = ("load", "protect", "countermeasure", "personalize", "sample", "score")
# whose number a row is (the ``subject`` column): the protected person; on the model
# track also a person who was not protected, and generic images (the model's utility)
PROTECTED, UNPROTECTED, GENERIC = "protected", "unprotected", "generic"


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
        "subject": PROTECTED,
        "started_at": started,
        "antipers_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "spec_json": spec.to_json(),
        "error": None,
    }


ProgressFn = Callable[[str], None]


@dataclass
class Bystander:
    """The model track's second person, not protected: the same attack on the same
    (defended) model with their photos must still work."""

    identity: str
    generated: torch.Tensor
    prompts: list[str]
    results: list[MetricResult] = field(default_factory=list)
    measured: list[MetricResult] = field(default_factory=list)  # in the attack stage


@dataclass
class Handoff:
    """What one stage passes to the next. On Ray it crosses the object store between
    the defense, attack and scoring workers, so it holds tensors, and a model only
    when a defense changed it: each worker has its own resident copy of the base model."""

    started: datetime
    protected: torch.Tensor
    model: DiffusionBundle | None = None  # the defended base model (model track)
    personalizer: Any = None  # the defense's own personalization (immunization track)
    generated: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    results: list[MetricResult] = field(default_factory=list)
    bystander: Bystander | None = None  # model track
    utility: list[MetricResult] = field(default_factory=list)  # model track: generic images
    # model track: what the attack stage measured on the attacked model (person_loss)
    measured: list[MetricResult] = field(default_factory=list)
    checks: list[Any] = field(default_factory=list)  # the defense's own measures (backdoors)
    # model track, when CLIP-T or FID is scored: generations, their prompts, references
    generic: tuple[torch.Tensor, list[str], torch.Tensor] | None = None
    seconds: float = 0.0
    workers: list[str] = field(default_factory=list)
    # a few thumbnails (kind -> PNG bytes, ``antipers.samples``), stored beside the rows
    samples: dict[str, list[bytes]] = field(default_factory=dict)

    def portable(self) -> Handoff:
        """Tensors and models moved to the CPU, so that a worker on another device (or
        with none) can unpickle it."""
        for name in ("protected", "generated"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.cpu())
        if self.bystander is not None:
            self.bystander.generated = self.bystander.generated.cpu()
        if self.model is not None:
            self.model.to("cpu")
        return self

    def worker(self) -> str:
        """Where it ran: one name, or ``stage@name`` per stage when they differ."""
        names = {w.split("@", 1)[1] for w in self.workers}
        return names.pop() if len(names) == 1 else " ".join(self.workers)


@contextmanager
def _timed(handoff: Handoff, stage: str, ctx: RunContext) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    handoff.seconds += time.perf_counter() - t0
    handoff.workers.append(f"{stage}@{ctx.name}")


def protect_stage(spec: ExperimentSpec, ctx: RunContext, say: ProgressFn) -> Handoff:
    """Load the photos and run the defense (countermeasures are checked first, so a
    setting the identity cannot satisfy fails before the expensive work)."""
    t0 = time.perf_counter()
    started = datetime.now(UTC)
    say("load")
    bundle = ctx.base_model(spec.base_model)
    identity = ctx.identity(spec)
    for cspec in spec.countermeasure:
        countermeasure = cspec.build(COUNTERMEASURES)
        if hasattr(countermeasure, "check"):
            countermeasure.check(identity)
    say("protect")
    defense = spec.defense.build(DEFENSES)
    protected = defense.protect(identity, bundle, stage_rng(spec.seed, "protect"))
    check_images(protected.images, f"defense {spec.defense.name!r} output")
    handoff = Handoff(
        started=started,
        protected=protected.images,
        model=None if protected.bundle is bundle else protected.bundle,
        personalizer=protected.personalizer,
        checks=list(protected.checks),
        samples={
            "clean": thumbnails(identity.set_B, "clean"),
            "protected": thumbnails(protected.images, "protected"),
        },
    )
    handoff.seconds = time.perf_counter() - t0
    handoff.workers.append(f"protect@{ctx.name}")
    return handoff


def attack_stage(
    spec: ExperimentSpec, ctx: RunContext, handoff: Handoff, say: ProgressFn
) -> Handoff:
    """Countermeasures, personalization and sampling; the models are dropped from the
    handoff so that only images travel on to scoring."""
    with _timed(handoff, "attack", ctx):
        say("countermeasure")
        bundle = ctx.base_model(spec.base_model)
        env = AttackEnv(bundle, ctx.identity(spec), stage_rng(spec.seed, "countermeasure"))
        train_images = handoff.protected.to(ctx.device)
        for cspec in spec.countermeasure:
            train_images = cspec.build(COUNTERMEASURES).apply(train_images, env)
            check_images(train_images, f"countermeasure {cspec.name!r} output")
        attack = spec.attack.build(ATTACKS)
        sampler = spec.sampling.build(SAMPLERS)
        model = bundle if handoff.model is None else handoff.model.to(ctx.device)
        say("personalize")
        if handoff.personalizer is not None:
            personalized, checks = handoff.personalizer.personalize(
                train_images, model, attack, stage_rng(spec.seed, "personalize"), ctx.identity(spec)
            )
            handoff.checks += checks
        else:
            rng = stage_rng(spec.seed, "personalize")
            personalized = attack.personalize(train_images, model, rng)
        say("sample")
        rng = stage_rng(spec.seed, "sample")
        handoff.generated = sampler.sample(personalized, spec.resolution, rng)
        handoff.prompts = sampler.image_prompts()
        # a new dict: handoffs copied from one protection (validity.py) share the old one
        handoff.samples = {
            **handoff.samples,
            "generated": thumbnails(handoff.generated, "generated"),
        }
        if spec.track == "model":
            _model_track(spec, ctx, handoff, model, personalized, attack, sampler, say)
        handoff.model = handoff.personalizer = None
    return handoff


def _model_track(
    spec: ExperimentSpec,
    ctx: RunContext,
    handoff: Handoff,
    model: DiffusionBundle,
    personalized: DiffusionBundle,
    attack: Any,
    sampler: Any,
    say: ProgressFn,
) -> None:
    """The same attack for a person who was not protected, how far each attack got
    (``person_loss``), and the defended model's generic utility (held-out images;
    generations on ordinary prompts if scored)."""
    from antipers import model_track

    base = ctx.base_model(spec.base_model)
    handoff.measured = [model_track.person_loss(personalized, ctx.identity(spec).set_A)]
    other = model_track.bystander_of(spec, ctx.dataset(spec.dataset).identities())
    say(f"personalize bystander {other}")
    person = ctx.person(spec.dataset, other, spec.resolution)
    theirs = attack.personalize(
        person.set_B.to(ctx.device), model, stage_rng(spec.seed, "personalize")
    )
    generated = sampler.sample(theirs, spec.resolution, stage_rng(spec.seed, "sample"))
    handoff.bystander = Bystander(other, generated, list(sampler.image_prompts()))
    handoff.bystander.measured = [model_track.person_loss(theirs, person.set_A)]
    held_out = model_track.held_out_images(base, attack, spec.resolution)
    handoff.utility = [model_track.generic_loss(model, base, held_out)]
    if any(m.name in model_track.PROMPT_SET_METRICS for m in spec.metrics):
        say("sample generic prompts")
        images, prompts = model_track.generic_generations(
            model, sampler, spec.resolution, stage_rng(spec.seed, "sample")
        )
        handoff.generic = (images.cpu(), list(prompts), held_out.cpu())


def score_stage(
    spec: ExperimentSpec, ctx: RunContext, handoff: Handoff, say: ProgressFn
) -> Handoff:
    with _timed(handoff, "score", ctx):
        say("score")
        if handoff.generated is None:
            raise ValueError(f"{spec.spec_id}: scoring before the attack stage ran")
        identity = ctx.identity(spec)
        metrics = [ctx.metric(m) for m in spec.metrics]
        needs_gallery = any(getattr(m, "needs_gallery", False) for m in metrics)
        inputs = ScoreInputs(
            generated=handoff.generated,
            references=identity.set_A,
            identity=spec.identity,
            prompts=handoff.prompts,
            protected=handoff.protected,
            clean=identity.set_B,
            gallery=ctx.gallery(spec.dataset, spec.resolution) if needs_gallery else None,
        )
        handoff.results = [evaluate(m, inputs) for m in metrics]
        base = ctx.base_model(spec.base_model)
        checks = list(handoff.checks)
        if spec.track == "immunization":  # utility: the avatars still look like the person
            checks.append(SubjectLikeness(identity.set_A))
        handoff.results += [own_measure(c, base, handoff.generated) for c in checks]
        handoff.results += handoff.measured
        if handoff.bystander is not None:
            other = ctx.person(spec.dataset, handoff.bystander.identity, spec.resolution)
            inputs = ScoreInputs(
                generated=handoff.bystander.generated,
                references=other.set_A,
                identity=handoff.bystander.identity,
                prompts=handoff.bystander.prompts,
                protected=other.set_B,
                clean=other.set_B,
                gallery=inputs.gallery,
            )
            handoff.bystander.results = [evaluate(m, inputs) for m in metrics]
            handoff.bystander.results += [
                own_measure(c, base, handoff.bystander.generated) for c in handoff.checks
            ]
            handoff.bystander.results += handoff.bystander.measured
        if handoff.generic is not None:
            from antipers.model_track import PROMPT_SET_METRICS

            generated, prompts, references = handoff.generic
            generic = ScoreInputs(
                generated=generated,
                references=references,
                identity="",
                prompts=tuple(prompts),
                protected=references,
                clean=references,
            )
            handoff.utility += [
                evaluate(ctx.metric(m), generic)
                for m in spec.metrics
                if m.name in PROMPT_SET_METRICS
            ]
    return handoff


def own_measure(check: Any, bundle: DiffusionBundle, images: torch.Tensor) -> MetricResult:
    """A defense's or a track's own measure (``check.score(bundle, images)``); like a
    metric, one that fails gives an error row for itself, never for the experiment."""
    try:
        return check.score(bundle, images)
    except Exception as exc:
        log.warning("%s failed: %s", check.metric, exc)
        return MetricResult(
            check.metric,
            np.array([]),
            float("nan"),
            "",
            check.higher_is_better,
            "",
            status=ERROR,
            reason=f"{type(exc).__name__}: {exc}",
        )


def experiment_rows(spec: ExperimentSpec, handoff: Handoff) -> list[dict[str, Any]]:
    """The rows of a scored handoff."""
    base = {**_base_row(spec, handoff.started), "worker": handoff.worker()}
    rows = metric_rows(base, handoff.results, handoff.seconds)
    if handoff.bystander is not None:
        # their numbers are utility: better for the defense where the attack still works
        other = {**base, "identity": handoff.bystander.identity, "subject": UNPROTECTED}
        flipped = [
            dataclasses.replace(r, higher_is_better=not r.higher_is_better)
            for r in handoff.bystander.results
        ]
        rows += metric_rows(other, flipped, handoff.seconds)
    if handoff.utility:
        rows += metric_rows({**base, "subject": GENERIC}, handoff.utility, handoff.seconds)
    return rows


def error_rows(
    spec: ExperimentSpec,
    started: datetime,
    message: str,
    duration: float,
    worker: str,
    status: str = ERROR,
) -> list[dict[str, Any]]:
    """The one row of an experiment that did not finish: failed (``error``: stored, and
    retried by the next run) or ``unavailable`` (a component cannot run here)."""
    return [
        {
            **_base_row(spec, started),
            "metric": "",
            "value": float("nan"),
            "higher_is_better": None,
            "unit": "",
            "backend": "",
            "image_index": AGGREGATE_INDEX,
            "status": status,
            "error": message,
            "duration_s": duration,
            "worker": worker,
        }
    ]


def failure_rows(
    spec: ExperimentSpec, started: datetime, exc: BaseException, duration: float, worker: str
) -> list[dict[str, Any]]:
    """``error_rows`` for an exception: an unavailable component's reason, or the error
    with its traceback."""
    if isinstance(exc, ComponentUnavailable):
        return error_rows(spec, started, str(exc), duration, worker, UNAVAILABLE)
    return error_rows(spec, started, describe_error(exc), duration, worker)


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc, limit=8))}"


def run_experiment(
    spec: ExperimentSpec,
    context: RunContext | None = None,
    progress: ProgressFn | None = None,
    raise_errors: bool = False,
) -> list[dict[str, Any]]:
    """The result rows of ``spec``, every stage in this process. A failure becomes one
    row with ``status="error"`` and the message (unless ``raise_errors``), never a lost
    experiment."""
    return run_with_samples(spec, context, progress, raise_errors)[0]


def run_with_samples(
    spec: ExperimentSpec,
    context: RunContext | None = None,
    progress: ProgressFn | None = None,
    raise_errors: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, list[bytes]]]:
    """``run_experiment``'s rows and the experiment's thumbnails (none when it failed)."""
    ctx = context or RunContext()
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    say = progress or (lambda stage: log.info("%s: %s", spec.spec_id, stage))
    try:
        handoff = protect_stage(spec, ctx, say)
        handoff = attack_stage(spec, ctx, handoff, say)
        handoff = score_stage(spec, ctx, handoff, say)
    except Exception as exc:
        if raise_errors:
            raise
        log.warning("experiment %s failed: %s", spec.spec_id, exc)
        return failure_rows(spec, started, exc, time.perf_counter() - t0, ctx.name), {}
    return experiment_rows(spec, handoff), handoff.samples


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
    images: bool = True,
) -> tuple[list[dict[str, Any]], bool]:
    """Run ``spec`` unless the store has it (with its thumbnails unless ``images`` is
    False); returns (rows, ran)."""
    if not force and spec.spec_id in store.finished_ids():
        return store.load([spec.spec_id]).to_dict("records"), False
    rows, samples = run_with_samples(spec, context, progress)
    store.write(rows, images=samples if images else None)
    return rows, True

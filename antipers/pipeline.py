"""``run_experiment``: one spec through every stage, in-process, no Ray.

identity photos -> protect -> countermeasure -> personalize -> sample -> score -> rows

A stage a track does not use is the ``none`` component, and what a track adds (its
personalizer, other subjects, its own measures) comes from the track's object
(``antipers.tracks``), never a special case here. The Ray workers, Tune trials and
Serve call these same stage functions; a ``RunContext`` keeps base models, datasets and
face backends resident between experiments.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from antipers.attacks.countermeasures import AttackEnv
from antipers.images import check_images
from antipers.metrics.base import MetricResult, ScoreInputs, evaluate
from antipers.models.bundle import DiffusionBundle
from antipers.registry import ATTACKS, COUNTERMEASURES, DEFENSES, SAMPLERS, TRACKS
from antipers.results import ResultStore
from antipers.rows import ERROR, PROTECTED, SubjectResults, failure_rows
from antipers.rows import experiment_rows as rows_of
from antipers.run_context import RunContext, stage_rng
from antipers.samples import thumbnails
from antipers.spec import ExperimentSpec
from antipers.tracks.base import AttackRun, Subject

log = logging.getLogger(__name__)
ProgressFn = Callable[[str], None]


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
    checks: list[Any] = field(default_factory=list)  # the defense's own measures (backdoors)
    # the protected person's numbers the attack stage measured (the model track's loss)
    measured: list[MetricResult] = field(default_factory=list)
    subjects: list[Subject] = field(default_factory=list)  # whom else the track scores
    scored: list[SubjectResults] = field(default_factory=list)  # the score stage's output
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
        for subject in self.subjects:
            subject.portable()
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
    """Countermeasures, the track's personalization and sampling, and what the track
    measures on the attacked model; the models are dropped from the handoff so that
    only images travel on to scoring."""
    with _timed(handoff, "attack", ctx):
        # what this attack measures and adds is its own: handoffs copied from one
        # protection for several attacks (validity.py) must not share these lists
        handoff.measured, handoff.subjects = [], []
        say("countermeasure")
        bundle = ctx.base_model(spec.base_model)
        env = AttackEnv(bundle, ctx.identity(spec), stage_rng(spec.seed, "countermeasure"))
        train_images = handoff.protected.to(ctx.device)
        for cspec in spec.countermeasure:
            train_images = cspec.build(COUNTERMEASURES).apply(train_images, env)
            check_images(train_images, f"countermeasure {cspec.name!r} output")
        sampler = spec.sampling.build(SAMPLERS)
        run = AttackRun(
            spec=spec,
            ctx=ctx,
            handoff=handoff,
            model=bundle if handoff.model is None else handoff.model.to(ctx.device),
            images=train_images,
            attack=spec.attack.build(ATTACKS),
            sampler=sampler,
            say=say,
            rng=lambda stage: stage_rng(spec.seed, stage),
        )
        track = TRACKS.build(spec.track)
        say("personalize")
        personalized = track.personalize(run)
        say("sample")
        handoff.generated = sampler.sample(personalized, spec.resolution, run.rng("sample"))
        handoff.prompts = list(sampler.image_prompts())
        # a new dict: handoffs copied from one protection (validity.py) share the old one
        handoff.samples = {
            **handoff.samples,
            "generated": thumbnails(handoff.generated, "generated"),
        }
        track.after_attack(run, personalized)
        handoff.model = handoff.personalizer = None
    return handoff


def score_stage(
    spec: ExperimentSpec, ctx: RunContext, handoff: Handoff, say: ProgressFn
) -> Handoff:
    """The spec's metrics, the defense's checks and the track's own measures for the
    protected person, then the same for each subject the track added."""
    with _timed(handoff, "score", ctx):
        say("score")
        if handoff.generated is None:
            raise ValueError(f"{spec.spec_id}: scoring before the attack stage ran")
        identity = ctx.identity(spec)
        person = Subject(
            PROTECTED,
            spec.identity,
            handoff.generated,
            handoff.prompts,
            measured=handoff.measured,
        )
        own = TRACKS.build(spec.track).own_measures(identity)
        handoff.scored = [
            _score(spec, ctx, handoff, person, handoff.protected, own),
            *(_score(spec, ctx, handoff, s) for s in handoff.subjects),
        ]
    return handoff


def _score(
    spec: ExperimentSpec,
    ctx: RunContext,
    handoff: Handoff,
    subject: Subject,
    published: torch.Tensor | None = None,
    own: list[Any] | None = None,
) -> SubjectResults:
    """One subject's results: the metrics that apply to it, then the measures (the
    defense's checks where they apply, ``own``), then what the attack stage measured.
    A person's references are their own set_A, and their published photos their set_B
    unless ``published`` (the protected person's protected photos)."""
    base = ctx.base_model(spec.base_model)
    results = []
    if subject.generated is not None:
        metrics = [
            ctx.metric(m)
            for m in spec.metrics
            if subject.metrics is None or m.name in subject.metrics
        ]
        if subject.references is not None:
            references = clean = subject.references
        else:
            person = ctx.person(spec.dataset, subject.identity, spec.resolution)
            references, clean = person.set_A, person.set_B
        needs_gallery = any(getattr(m, "needs_gallery", False) for m in metrics)
        inputs = ScoreInputs(
            generated=subject.generated,
            references=references,
            identity=subject.identity,
            prompts=tuple(subject.prompts),
            protected=clean if published is None else published,
            clean=clean,
            gallery=ctx.gallery(spec.dataset, spec.resolution) if needs_gallery else None,
        )
        results = [evaluate(m, inputs) for m in metrics]
        checks = [*(handoff.checks if subject.checks else []), *(own or [])]
        results += [own_measure(c, base, subject.generated) for c in checks]
    results += subject.measured
    return SubjectResults(subject.kind, subject.identity, results, subject.utility)


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
    """The rows of a scored handoff (their format: ``antipers.rows``)."""
    return rows_of(spec, handoff.started, handoff.worker(), handoff.seconds, handoff.scored)


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

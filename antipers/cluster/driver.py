"""The campaign driver: skip what the store has, keep a bounded number of experiments
in flight on the resident workers, store each one as it finishes.

Only the driver writes to the store, one atomic file per ``spec_id``: a driver killed
at any point loses at most the experiments in flight, and the next run finds every
finished one and runs the rest. An experiment that raises becomes an error row; a
worker that dies is restarted by Ray, which retries its calls, and what still fails
for that reason is resubmitted here up to ``retries`` times.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from antipers.cluster import ROLES
from antipers.cluster.runtime import ClusterError
from antipers.cluster.workers import Pool, WorkerPlan, start_workers
from antipers.errors import ComponentUnavailable
from antipers.pipeline import Handoff, error_rows, experiment_rows, failure_rows
from antipers.results import ResultStore
from antipers.spec import ExperimentSpec

log = logging.getLogger(__name__)
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its error text for terminals


@dataclass
class CampaignReport:
    total: int
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    resubmitted: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)  # spec_id -> first line
    # stage executions begun by the workers at the end (a restarted one: since its restart)
    executions: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.skipped + self.ok + self.failed == self.total

    def summary(self) -> str:
        return (
            f"{self.total} experiments: {self.skipped} already stored, {self.ok} ran, "
            f"{self.failed} failed, {self.resubmitted} resubmitted after a worker died "
            f"({self.seconds:.0f} s)"
            + (
                "; stage executions: " + ", ".join(f"{k} {v}" for k, v in self.executions.items())
                if self.executions
                else ""
            )
        )


@dataclass
class _Job:
    spec: ExperimentSpec
    attempt: int
    submitted: datetime
    t0: float
    lanes: dict[str, int]


ResultHook = Callable[[ExperimentSpec, list[dict[str, Any]], dict[str, Pool]], None]


def _unwrap(exc: BaseException) -> BaseException:
    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


def _worker_cannot_start(exc: BaseException) -> bool:
    """A worker whose constructor fails (antipers missing on a node, a bad device) will
    fail every experiment: the campaign stops instead of storing an error for each."""
    cause = _unwrap(exc)
    return isinstance(cause, RayActorError) and cause.actor_init_failed


def _infrastructure(exc: BaseException) -> bool:
    """A failure of the machinery (dead worker, lost object), not of the experiment."""
    if isinstance(exc, RayTaskError):
        return isinstance(exc.cause, RayError) and _infrastructure(exc.cause)
    return isinstance(exc, RayError)


def _message(exc: BaseException) -> str:
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        text = f"{type(cause).__name__}: {cause}\n{getattr(exc, 'traceback_str', '') or exc}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return ANSI.sub("", text)


def _order(specs: Sequence[ExperimentSpec]) -> list[ExperimentSpec]:
    """Experiments on the same base model next to each other: each worker switches
    models as rarely as it can. Stable, so a campaign's order is kept otherwise."""
    return sorted(specs, key=lambda s: s.base_model.params_json() + s.base_model.name)


def run_campaign(
    specs: Sequence[ExperimentSpec],
    store: ResultStore,
    plan: WorkerPlan | None = None,
    max_in_flight: int | None = None,
    retries: int = 2,
    progress: bool = True,
    description: str = "campaign",
    on_result: ResultHook | None = None,
    images: bool = True,
) -> CampaignReport:
    """Run every spec that the store lacks on Ray workers (Ray must be connected); with
    ``images``, each experiment's thumbnails are stored beside its rows."""
    if not ray.is_initialized():
        raise RuntimeError("connect to Ray first (antipers.cluster.runtime.connect)")
    from tqdm import tqdm

    plan = plan or WorkerPlan()
    t_start = time.perf_counter()
    store.sweep_temporary()
    stored = store.finished_ids()
    todo = deque(_order([s for s in specs if s.spec_id not in stored]))
    report = CampaignReport(total=len(specs), skipped=len(specs) - len(todo))
    if not todo:
        report.seconds = time.perf_counter() - t_start
        return report
    lanes = max(r.count for r in plan.roles.values())
    limit = max_in_flight or 3 * lanes  # three stages: a full pipeline per lane
    if limit < 1:
        raise ValueError(f"max_in_flight: expected >= 1, got {limit}")
    pools = start_workers(plan)
    pending: dict[Any, _Job] = {}
    bar = tqdm(
        total=report.total,
        initial=report.skipped,
        desc=description,
        unit="exp",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def submit(spec: ExperimentSpec, attempt: int) -> None:
        picks = {role: pools[role].pick() for role in ROLES}
        for role, i in picks.items():
            pools[role].load[i] += 1
        defense, attack, scoring = (pools[r].actors[picks[r]] for r in ROLES)
        handoff = defense.protect.remote(spec)
        handoff = attack.attack.remote(spec, handoff)
        ref = scoring.score.remote(spec, handoff)
        pending[ref] = _Job(spec, attempt, datetime.now(UTC), time.perf_counter(), picks)

    try:
        while todo or pending:
            while todo and len(pending) < limit:
                submit(todo.popleft(), 0)
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            for role, i in job.lanes.items():
                pools[role].load[i] -= 1
            samples = None
            try:
                handoff: Handoff = ray.get(ready[0])
                rows = experiment_rows(job.spec, handoff)
                samples = handoff.samples if images else None
            except Exception as exc:
                if _worker_cannot_start(exc):
                    raise ClusterError(
                        f"a worker could not start, so no experiment can run: {_message(exc)}"
                    ) from None
                if _infrastructure(exc) and job.attempt < retries:
                    log.warning("%s: %s; resubmitting", job.spec.spec_id, _message(exc))
                    report.resubmitted += 1
                    submit(job.spec, job.attempt + 1)
                    continue
                duration = time.perf_counter() - job.t0
                cause = exc.cause if isinstance(exc, RayTaskError) else exc
                if isinstance(cause, ComponentUnavailable):
                    rows = failure_rows(job.spec, job.submitted, cause, duration, "driver")
                else:
                    rows = error_rows(job.spec, job.submitted, _message(exc), duration, "driver")
            store.write(rows, images=samples)
            if rows[0]["status"] == "error" and not rows[0]["metric"]:
                report.failed += 1
                report.failures[job.spec.spec_id] = rows[0]["error"].splitlines()[0]
            else:
                report.ok += 1
            bar.update(1)
            bar.set_postfix(ok=report.ok, failed=report.failed, refresh=False)
            if on_result is not None:
                on_result(job.spec, rows, pools)
    finally:
        bar.close()
        try:
            if sys.exc_info()[0] is None:  # not on Ctrl-C or an error: workers may be busy
                report.executions = _executions(pools)
        finally:
            for pool in pools.values():
                for actor in pool.actors:
                    ray.kill(actor, no_restart=True)
    report.seconds = time.perf_counter() - t_start
    return report


def _executions(pools: dict[str, Any], timeout_s: float = 10.0) -> dict[str, int]:
    """Each role's own stage, summed over its live workers; asked all at once, and a
    worker that does not answer in time is left out."""
    stages = {"defense": "protect", "attack": "attack", "scoring": "score"}
    asked = {actor.info.remote(): role for role, pool in pools.items() for actor in pool.actors}
    ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=timeout_s)
    totals: dict[str, int] = {}
    for ref in ready:
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError:  # a worker that died at the end
            continue
        stage = stages[asked[ref]]
        totals[stage] = totals.get(stage, 0) + info["started"][stage]
    return totals

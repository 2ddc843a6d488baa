"""The campaign driver: skip what the store has, keep a bounded number of experiments
in flight on the resident workers, store each one as it finishes.

Only the driver writes to the store, one atomic file per ``spec_id``: a driver killed
at any point loses at most the experiments in flight, and the next run finds every
finished one and runs the rest. An experiment that raises becomes an error row; a
worker that dies is restarted by Ray, which retries its calls, and what still fails
for that reason is resubmitted here up to ``retries`` times.

The parts, each on its own: submission and balancing (``submission``), the retry
policy (``retry``), storing and counting (``outcomes``), the progress bar
(``progress``) and the end (``teardown``); this module runs the loop that joins them.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray

from antipers.cluster.outcomes import CampaignReport, record
from antipers.cluster.progress import Progress
from antipers.cluster.retry import failed_rows, message, resubmit
from antipers.cluster.submission import Dispatcher
from antipers.cluster.teardown import teardown
from antipers.cluster.workers import Pool, WorkerPlan, start_workers
from antipers.pipeline import Handoff, experiment_rows
from antipers.results import ResultStore
from antipers.spec import ExperimentSpec

log = logging.getLogger(__name__)

ResultHook = Callable[[ExperimentSpec, list[dict[str, Any]], dict[str, Pool]], None]


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
    flight = Dispatcher(pools)
    bar = Progress(report, description, enabled=progress)
    try:
        while todo or flight.pending:
            while todo and len(flight.pending) < limit:
                flight.submit(todo.popleft())
            ref, job = flight.next_finished()
            try:
                handoff: Handoff = ray.get(ref)
                rows = experiment_rows(job.spec, handoff)
                samples = handoff.samples if images else None
            except Exception as exc:
                if resubmit(exc, job.attempt, retries):
                    log.warning("%s: %s; resubmitting", job.spec.spec_id, message(exc))
                    report.resubmitted += 1
                    flight.submit(job.spec, job.attempt + 1)
                    continue
                rows = failed_rows(job.spec, job.submitted, exc, time.perf_counter() - job.t0)
                samples = None
            record(store, report, rows, samples)
            bar.advance()
            if on_result is not None:
                on_result(job.spec, rows, pools)
    finally:
        bar.close()
        teardown(pools, report, clean=sys.exc_info()[0] is None)
    report.seconds = time.perf_counter() - t_start
    return report

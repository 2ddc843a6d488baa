"""The end of a campaign: each stage's executions for the summary (what the retry tests
count), then the workers killed, so that a finished campaign holds no resources."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import ray

from antipers.cluster import STAGE_OF
from antipers.cluster.outcomes import CampaignReport
from antipers.cluster.workers import Pool


def teardown(pools: Mapping[str, Pool], report: CampaignReport, clean: bool) -> None:
    """Kill every worker; only after a ``clean`` run (not Ctrl-C or an error, when
    workers may be busy) ask them for their executions first."""
    try:
        if clean:
            report.executions = executions(pools)
    finally:
        for pool in pools.values():
            for actor in pool.actors:
                ray.kill(actor, no_restart=True)


def executions(pools: Mapping[str, Pool], timeout_s: float = 10.0) -> dict[str, int]:
    """Each role's own stage, summed over its live workers; asked all at once, and a
    worker that does not answer in time is left out."""
    asked = {actor.info.remote(): role for role, pool in pools.items() for actor in pool.actors}
    ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=timeout_s)
    answers = []
    for ref in ready:
        try:
            answers.append((asked[ref], ray.get(ref)))
        except ray.exceptions.RayError:  # a worker that died at the end
            continue
    return stage_totals(answers)


def stage_totals(answers: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """(role, worker info) pairs -> each role's own stage, its executions summed: a
    worker counts only the stage its role runs."""
    totals: dict[str, int] = {}
    for role, info in answers:
        stage = STAGE_OF[role]
        totals[stage] = totals.get(stage, 0) + info["started"][stage]
    return totals

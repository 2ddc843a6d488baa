"""Submission and balancing: an experiment is three chained actor calls,
``defense.protect -> attack.attack -> scoring.score``, each on the least-loaded actor
of its role, so that no actor queues work while another of its role is idle.

Only the last call's reference is waited on: a failing stage fails the calls chained
after it, so the driver sees every failure there.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import ray

from antipers.cluster import ROLES
from antipers.cluster.workers import Pool
from antipers.spec import ExperimentSpec


@dataclass
class Job:
    """An experiment in flight: what a resubmission needs, when it started, and the
    actor (lane) it holds in each role until it finishes."""

    spec: ExperimentSpec
    attempt: int
    submitted: datetime
    t0: float
    lanes: dict[str, int]


class Dispatcher:
    """The experiments in flight, keyed by their last call's reference, and the load
    they put on each actor."""

    def __init__(self, pools: Mapping[str, Pool]) -> None:
        self.pools = pools
        self.pending: dict[Any, Job] = {}

    def submit(self, spec: ExperimentSpec, attempt: int = 0) -> Any:
        """Chain the three stages on the least-loaded actors; returns the reference to
        the scored handoff."""
        picks = {role: self.pools[role].pick() for role in ROLES}
        for role, i in picks.items():
            self.pools[role].load[i] += 1
        defense, attack, scoring = (self.pools[r].actors[picks[r]] for r in ROLES)
        handoff = defense.protect.remote(spec)
        handoff = attack.attack.remote(spec, handoff)
        ref = scoring.score.remote(spec, handoff)
        self.pending[ref] = Job(spec, attempt, datetime.now(UTC), time.perf_counter(), picks)
        return ref

    def release(self, ref: Any) -> Job:
        """The finished experiment's job; its lanes take new work again."""
        job = self.pending.pop(ref)
        for role, i in job.lanes.items():
            self.pools[role].load[i] -= 1
        return job

    def next_finished(self) -> tuple[Any, Job]:
        """Wait for any experiment in flight to finish (or fail): its reference and job."""
        ready, _ = ray.wait(list(self.pending), num_returns=1)
        return ready[0], self.release(ready[0])

"""The retry policy: which failures stop the campaign, which send an experiment round
again, and which are its result.

A worker that cannot start would fail every experiment, so it stops the campaign; a
failure of the machinery (a dead worker, a lost object) says nothing about the
experiment, so it is resubmitted while attempts remain; anything else is what the
experiment did, and is stored.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from ray.exceptions import RayActorError, RayError, RayTaskError

from antipers.cluster.runtime import ClusterError
from antipers.errors import ComponentUnavailable
from antipers.rows import error_rows, failure_rows
from antipers.spec import ExperimentSpec

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its error text for terminals
WORKER = "driver"  # the rows' ``worker``: the failure reached the driver, not a stage


def unwrap(exc: BaseException) -> BaseException:
    """What a stage raised, where Ray wrapped it for the driver."""
    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


def worker_cannot_start(exc: BaseException) -> bool:
    """A worker whose constructor fails (antipers missing on a node, a bad device)."""
    cause = unwrap(exc)
    return isinstance(cause, RayActorError) and cause.actor_init_failed


def infrastructure(exc: BaseException) -> bool:
    """A failure of the machinery (dead worker, lost object), not of the experiment;
    a call chained after a dead worker's fails with the worker's error, wrapped."""
    if isinstance(exc, RayTaskError):
        return isinstance(exc.cause, RayError) and infrastructure(exc.cause)
    return isinstance(exc, RayError)


def message(exc: BaseException) -> str:
    """The error and, for a stage's, the worker's traceback, without terminal colours."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        text = f"{type(cause).__name__}: {cause}\n{getattr(exc, 'traceback_str', '') or exc}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return ANSI.sub("", text)


def resubmit(exc: BaseException, attempt: int, retries: int) -> bool:
    """Whether an experiment that failed with ``exc`` on try ``attempt`` (0 first) runs
    again; False: its failure is stored. Raises ClusterError where no experiment can
    run, rather than store an error for each."""
    if worker_cannot_start(exc):
        raise ClusterError(
            f"a worker could not start, so no experiment can run: {message(exc)}"
        ) from None
    return infrastructure(exc) and attempt < retries


def failed_rows(
    spec: ExperimentSpec, submitted: datetime, exc: BaseException, duration: float
) -> list[dict[str, Any]]:
    """The stored result of an experiment that failed for good: ``unavailable`` with the
    reason where a component cannot run here (not retried), else an error row (retried
    by the next run)."""
    cause = unwrap(exc)
    if isinstance(cause, ComponentUnavailable):
        return failure_rows(spec, submitted, cause, duration, WORKER)
    return error_rows(spec, submitted, message(exc), duration, WORKER)

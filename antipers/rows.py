"""What a result row is: its columns (the Arrow schema the store writes) and how an
experiment's results become rows.

Long format: one row per experiment x subject x metric x image (``image_index`` -1
holds the metric's aggregate, ``metric:note`` rows a metric's counts). Adding a metric
never changes the schema. ``subject`` says whose number a row is: the protected person,
or one a track adds (a bystander who was not protected, generic images). An experiment
that did not finish is one row with an empty ``metric``.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from antipers import __version__
from antipers.errors import ComponentUnavailable

if TYPE_CHECKING:
    from antipers.metrics.base import MetricResult
    from antipers.spec import ExperimentSpec

SCHEMA_VERSION = 3  # 2: `worker` (where the rows were computed); 3: `subject`
AGGREGATE_INDEX = -1
OK, UNAVAILABLE, ERROR = "ok", "unavailable", "error"
PROTECTED, UNPROTECTED, GENERIC = "protected", "unprotected", "generic"

SCHEMA = pa.schema(
    [
        ("spec_id", pa.string()),
        ("suite", pa.string()),
        ("protocol", pa.string()),
        ("track", pa.string()),
        ("dataset", pa.string()),
        ("identity", pa.string()),
        ("base_model", pa.string()),
        ("defense", pa.string()),
        ("defense_params", pa.string()),
        ("countermeasure", pa.string()),
        ("countermeasure_params", pa.string()),
        ("attack", pa.string()),
        ("attack_params", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("higher_is_better", pa.bool_()),
        ("unit", pa.string()),
        ("backend", pa.string()),
        ("image_index", pa.int32()),
        ("seed", pa.int64()),
        ("subject", pa.string()),  # protected | unprotected | generic (null before v3)
        ("status", pa.string()),
        ("error", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("duration_s", pa.float64()),
        ("worker", pa.string()),
        ("antipers_version", pa.string()),
        ("schema_version", pa.int32()),
        ("spec_json", pa.string()),
    ]
)
REQUIRED_COLUMNS = tuple(SCHEMA.names)


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    missing = {c for row in rows for c in REQUIRED_COLUMNS if c not in row}
    if missing:
        raise ValueError(f"result rows lack column(s): {', '.join(sorted(missing))}")
    return pa.Table.from_pylist(rows, schema=SCHEMA)


@dataclass
class SubjectResults:
    """One subject's scored results. ``utility``: the numbers say whether the attack
    still works for someone the defense must leave alone, so better for the defense is
    the metric's other direction. An empty ``identity`` is the experiment's own."""

    subject: str
    identity: str
    results: list[MetricResult]
    utility: bool = False


def base_row(spec: ExperimentSpec, started: datetime) -> dict[str, Any]:
    """The columns every row of ``spec`` shares."""
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


def unspecified_row(started: datetime, **columns: Any) -> dict[str, Any]:
    """The shared columns of rows scored without an ``ExperimentSpec`` (``antipers
    score`` on folders): the spec's columns empty, ``columns`` set."""
    empty = {"defense_params": "{}", "countermeasure_params": "[]", "attack_params": "{}"}
    row = {
        **{name: "" for name in SCHEMA.names if SCHEMA.field(name).type == pa.string()},
        **empty,
        "seed": 0,
        "subject": PROTECTED,
        "started_at": started,
        "antipers_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "error": None,
    }
    return {**row, **columns}


def experiment_rows(
    spec: ExperimentSpec,
    started: datetime,
    worker: str,
    duration: float,
    subjects: Sequence[SubjectResults],
) -> list[dict[str, Any]]:
    """The rows of a finished experiment, subject by subject."""
    base = {**base_row(spec, started), "worker": worker}
    rows = []
    for scored in subjects:
        results = scored.results
        if scored.utility:
            results = [
                dataclasses.replace(r, higher_is_better=not r.higher_is_better) for r in results
            ]
        common = {**base, "subject": scored.subject, "identity": scored.identity or spec.identity}
        rows += metric_rows(common, results, duration)
    return rows


def metric_rows(
    base: dict[str, Any], results: Sequence[MetricResult], duration: float
) -> list[dict[str, Any]]:
    """Per metric its aggregate (``image_index`` -1), one row per image, and one row per
    reported note (``metric:note``); an unavailable metric is one row with its reason."""
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
            **base_row(spec, started),
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


def failed(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether these are an experiment that did not finish (an experiment-level error
    row, no metric): stored as such and retried by the next run. A metric that could
    not score is recorded, but does not make the experiment fail."""
    return any(r["status"] == ERROR and not r["metric"] for r in rows)

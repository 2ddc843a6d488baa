"""What every metric takes and returns.

A metric is a frozen dataclass (its fields are its parameters) with ``name``,
``higher_is_better`` and ``unit`` class attributes and ``score(inputs) ->
MetricResult``. ``higher_is_better`` is from the defense's side, as Anti-DreamBooth's
tables mark it (FDFR up, ISM down). A metric whose weights are not configured raises
``MetricUnavailable`` with what is missing and how to configure it; the experiment
records that as ``status="unavailable"`` rows and goes on, never inventing a value.
Subclassing ``Metric`` lets a metric give those three attributes in its class line.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from antipers.rows import ERROR, OK, UNAVAILABLE  # a result's status is its rows' status


class MetricUnavailable(RuntimeError):
    """The metric cannot run here (weights not configured); the message says why."""


class Metric:
    """Takes ``name``, ``higher_is_better`` and ``unit`` as class keywords
    (``class FDFR(Metric, name="fdfr", higher_is_better=True, unit="fraction")``), so a
    metric's body holds its parameters and ``score``, not another copy of that block."""

    name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    unit: ClassVar[str]

    def __init_subclass__(
        cls,
        *,
        name: str | None = None,
        higher_is_better: bool | None = None,
        unit: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        given = {"name": name, "higher_is_better": higher_is_better, "unit": unit}
        for attr, value in given.items():
            if value is not None:
                setattr(cls, attr, value)


@dataclass
class ScoreInputs:
    """Everything a metric may compare. ``generated`` are the images judged;
    ``references`` the person's clean reference photos (set_A); ``protected`` and
    ``clean`` the published photos after and before protection (budget metrics);
    ``gallery`` every identity's references (linkability); ``prompts`` one per image."""

    generated: torch.Tensor
    references: torch.Tensor
    identity: str = ""
    prompts: tuple[str, ...] = ()
    protected: torch.Tensor | None = None
    clean: torch.Tensor | None = None
    gallery: Mapping[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class MetricResult:
    """``values[i]`` belongs to image ``i`` (NaN: not defined for it, e.g. no face);
    ``aggregate`` is the metric's own summary over the set."""

    metric: str
    values: np.ndarray
    aggregate: float
    backend: str
    higher_is_better: bool
    unit: str
    status: str = OK
    reason: str = ""
    notes: dict[str, float] = field(default_factory=dict)


def nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values)) if len(values) else float("nan")


def result(metric: object, values: np.ndarray, backend: str, **extra: object) -> MetricResult:
    """A result with the metric's own metadata and the NaN-aware mean as aggregate."""
    values = np.asarray(values, dtype=np.float64)
    return MetricResult(
        metric=metric.name,  # type: ignore[attr-defined]
        values=values,
        aggregate=float(extra.pop("aggregate", nanmean(values))),  # type: ignore[arg-type]
        backend=backend,
        higher_is_better=metric.higher_is_better,  # type: ignore[attr-defined]
        unit=metric.unit,  # type: ignore[attr-defined]
        **extra,  # type: ignore[arg-type]
    )


def evaluate(metric: object, inputs: ScoreInputs) -> MetricResult:
    """``metric.score(inputs)``. A missing-weights failure becomes an ``unavailable``
    result, any other failure an ``error`` result for this metric alone: one metric
    that cannot score (no face in any reference) never discards the others."""
    try:
        return metric.score(inputs)  # type: ignore[attr-defined]
    except Exception as exc:
        status = UNAVAILABLE if isinstance(exc, MetricUnavailable) else ERROR
        reason = str(exc) if status == UNAVAILABLE else f"{type(exc).__name__}: {exc}"
        return MetricResult(
            metric=metric.name,  # type: ignore[attr-defined]
            values=np.array([]),
            aggregate=float("nan"),
            backend=getattr(metric, "backend", "") or "",
            higher_is_better=metric.higher_is_better,  # type: ignore[attr-defined]
            unit=metric.unit,  # type: ignore[attr-defined]
            status=status,
            reason=reason,
        )

"""Search specs (``tune/*.yaml``): which spec fields to vary, over which identities,
towards which objective. Everything is checked here, before Ray or any trial starts;
``antipers/cluster/search.py`` runs the search on Ray Tune.

The objective is privacy against visibility. Privacy is one identity metric of the
generated images, oriented so that higher protects more: ``1 - ISM``, ``FDFR`` or
``1 - linkability``. Quality is one budget metric of the protected photos, oriented so
that higher is less visible: ``PSNR``, ``SSIM`` or ``1 - LPIPS``. Without a constraint
the search is multi-objective and its result is the Pareto front; with
``constraint: {psnr: 35}`` it maximizes privacy among trials whose quality metric
stays at or above the bound.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antipers.errors import UserError
from antipers.names import check_name
from antipers.registry import DATASETS, SpecError
from antipers.spec import ExperimentSpec
from antipers.spec_files import load_mapping

PRIVACY = {"ism": True, "fdfr": False, "linkability": True}  # metric -> report 1 - value
# metric -> report 1 - value; clip-t is the immunization track's (prompt fidelity)
QUALITY = {"psnr": False, "ssim": False, "lpips": True, "clip-t": False}
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
ALGORITHMS = ("optuna", "random")
SCHEDULERS = ("asha", "fifo")
KNOWN = (
    "name",
    "base",
    "datasets",
    "identities_per_trial",
    "space",
    "objective",
    "search",
    "scheduler",
    "resources",
)


class SearchError(UserError, ValueError):
    """A search spec that cannot run; the message names the file and the field."""


@dataclass(frozen=True)
class Dimension:
    """One searched spec field: ``kind`` in DISTRIBUTIONS, ``values`` its range or choices."""

    field: str
    kind: str
    values: tuple[Any, ...]

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        low, high = self.values
        return low <= value <= high


@dataclass(frozen=True)
class Objective:
    privacy: str
    quality: str
    constraint: float | None = None  # the least acceptable quality (constrained form)

    @property
    def multi(self) -> bool:
        return self.constraint is None

    def scores(self, rows: Sequence[Mapping[str, Any]]) -> tuple[float, float]:
        """(privacy, quality) of one experiment's rows; NaN where a metric gave none
        (no face in any generated image leaves ISM undefined)."""
        values = {
            r["metric"]: r["value"]
            for r in rows
            if r["image_index"] == -1 and r["status"] == "ok" and r["metric"]
        }
        privacy = values.get(self.privacy, math.nan)
        quality = values.get(self.quality, math.nan)
        if PRIVACY[self.privacy]:
            privacy = 1.0 - privacy
        if QUALITY[self.quality]:
            quality = 1.0 - quality
        return privacy, quality

    def feasible(self, quality: float) -> bool:
        return self.constraint is None or quality >= self.constraint

    def penalized(self, privacy: float, quality: float) -> float:
        """The single objective of the constrained form: privacy where the bound holds;
        below any feasible value (privacy lies in [0, 1]) by the shortfall otherwise."""
        if self.feasible(quality):
            return privacy
        return -1.0 - (self.constraint - quality)  # type: ignore[operator]


@dataclass(frozen=True)
class SearchSpec:
    path: str
    name: str
    base: ExperimentSpec  # dataset and identity are replaced per experiment
    identities: tuple[tuple[Mapping[str, Any], str], ...]  # (dataset spec, identity)
    space: tuple[Dimension, ...]
    objective: Objective
    algorithm: str = "optuna"
    samples: int = 8
    concurrent: int = 1
    seed: int = 0
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    cpus: float = 1.0
    gpus: float = 0.0

    def experiment(self, config: Mapping[str, Any], index: int) -> ExperimentSpec:
        """The spec of trial ``config`` on the ``index``-th identity."""
        dataset, identity = self.identities[index]
        return self.base.override(
            {**config, "dataset": dict(dataset), "identity": identity, "suite": self.name}
        )


def _fail(path: Path, field: str, message: str) -> SearchError:
    return SearchError(f"{path}: {field}: {message}")


def _dimension(path: Path, base: ExperimentSpec, field: str, entry: Any) -> Dimension:
    where = f"space.{field}"
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise _fail(path, where, f"expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}")
    kind, values = next(iter(entry.items()))
    if kind not in DISTRIBUTIONS:
        raise _fail(path, where, f"unknown distribution {kind!r}; use {', '.join(DISTRIBUTIONS)}")
    if not isinstance(values, list) or not values:
        raise _fail(path, where, f"{kind}: an empty range gives nothing to search")
    if kind != "choice":
        if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
            raise _fail(path, where, f"{kind}: expected [low, high], got {values!r}")
        low, high = values
        if not low < high:
            raise _fail(path, where, f"{kind}: empty range [{low}, {high}] (low must be < high)")
        if kind == "loguniform" and low <= 0:
            raise _fail(path, where, f"loguniform: expected low > 0, got {low}")
        if kind == "int" and not all(float(v).is_integer() for v in values):
            raise _fail(path, where, f"int: expected whole bounds, got {values!r}")
    for value in values:  # every end of the range must make a valid spec
        try:
            base.override({field: value})
        except SpecError as exc:
            raise _fail(path, where, str(exc)) from None
    return Dimension(field, kind, tuple(values))


def _identities(
    path: Path, datasets: Any, per_trial: Any, seed: int, check_data: bool
) -> tuple[tuple[Mapping[str, Any], str], ...]:
    """The identities every trial runs on: the same for all trials (so trials compare
    on equal terms), drawn with the search's seed, alternating between datasets so that
    each early report (ASHA) already covers every dataset."""
    if not isinstance(datasets, list) or not datasets:
        raise _fail(path, "datasets", "expected a non-empty list of datasets")
    if not isinstance(per_trial, int) or per_trial < 1:
        raise _fail(path, "identities_per_trial", f"expected an integer >= 1, got {per_trial!r}")
    rng = random.Random(seed)
    pools = []
    for i, entry in enumerate(datasets):
        spec = dict(entry) if isinstance(entry, Mapping) else {"name": entry}
        params = {k: v for k, v in spec.items() if k != "name"}
        try:
            dataset = DATASETS.build(spec.get("name", ""), params)
            names = (
                list(dataset.identities())
                if check_data
                else [f"<{spec['name']}-{j}>" for j in range(per_trial)]
            )
        except (SpecError, ValueError, KeyError) as exc:
            raise _fail(path, f"datasets.{i}", str(exc)) from None
        rng.shuffle(names)
        pools.append([(spec, n) for n in names])
    chosen = []
    while len(chosen) < per_trial and any(pools):
        for pool in pools:
            if pool and len(chosen) < per_trial:
                chosen.append(pool.pop(0))
    if len(chosen) < per_trial:
        raise _fail(
            path, "identities_per_trial", f"{per_trial} asked, the datasets have {len(chosen)}"
        )
    return tuple(chosen)


def _objective(path: Path, entry: Any, metrics: set[str]) -> Objective:
    if not isinstance(entry, Mapping):
        raise _fail(path, "objective", "expected {privacy: METRIC, quality: METRIC}")
    unknown = sorted(set(entry) - {"privacy", "quality", "constraint"})
    if unknown:
        raise _fail(path, f"objective.{unknown[0]}", "unknown; use privacy, quality, constraint")
    privacy, quality = entry.get("privacy", "ism"), entry.get("quality", "psnr")
    for key, value, allowed in (("privacy", privacy, PRIVACY), ("quality", quality, QUALITY)):
        if value not in allowed:
            raise _fail(
                path, f"objective.{key}", f"{value!r}: expected one of {', '.join(allowed)}"
            )
        if value not in metrics:
            raise _fail(
                path,
                f"objective.{key}",
                f"{value!r} is not computed by any trial "
                f"(base.metrics: {', '.join(sorted(metrics))})",
            )
    constraint = entry.get("constraint")
    if constraint is not None:
        if not isinstance(constraint, Mapping) or list(constraint) != [quality]:
            raise _fail(path, "objective.constraint", f"expected {{{quality}: LOWEST_VALUE}}")
        bound = constraint[quality]
        if not isinstance(bound, int | float) or not math.isfinite(bound):
            raise _fail(path, "objective.constraint", f"expected a number, got {bound!r}")
        constraint = float(1.0 - bound if QUALITY[quality] else bound)
    return Objective(privacy, quality, constraint)


def _options(path: Path, section: str, entry: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    entry = entry or {}
    if not isinstance(entry, Mapping):
        raise _fail(path, section, "expected a mapping")
    unknown = sorted(set(entry) - set(defaults))
    if unknown:
        raise _fail(path, f"{section}.{unknown[0]}", f"unknown; use {', '.join(defaults)}")
    out = {**defaults, **entry}
    for key, default in defaults.items():
        if isinstance(default, int | float) and not isinstance(default, bool):
            value = out[key]
            if not isinstance(value, int | float) or value < 0:
                raise _fail(path, f"{section}.{key}", f"expected a number >= 0, got {value!r}")
    return out


def load_search(path: str | Path, check_data: bool = True) -> SearchSpec:
    """Parse and check a search spec; ``check_data=False`` skips reading the dataset
    folders (to check a spec meant for another machine)."""
    path = Path(path)
    try:
        data = load_mapping(path)
    except SpecError as exc:
        raise SearchError(str(exc)) from None
    unknown = sorted(set(data) - set(KNOWN))
    if unknown:
        raise _fail(path, unknown[0], f"unknown search field; fields: {', '.join(KNOWN)}")
    for key in ("name", "base", "datasets", "space"):
        if key not in data:
            raise _fail(path, key, "missing (required)")
    try:  # it names the search's folder in the store
        check_name(data["name"], "name")
    except ValueError as exc:
        raise _fail(path, "name", str(exc).removeprefix("name: ")) from None
    base_dict = data["base"]
    if not isinstance(base_dict, Mapping):
        raise _fail(path, "base", "expected an experiment spec without dataset and identity")
    clash = sorted({"dataset", "identity", "suite"} & set(base_dict))
    if clash:
        raise _fail(path, f"base.{clash[0]}", "set by the search (datasets, name); remove it")
    search = _options(
        path,
        "search",
        data.get("search"),
        {"algorithm": "optuna", "samples": 8, "concurrent": 1, "seed": 0},
    )
    if search["algorithm"] not in ALGORITHMS:
        raise _fail(
            path, "search.algorithm", f"{search['algorithm']!r}: use {', '.join(ALGORITHMS)}"
        )
    if search["samples"] < 1 or search["concurrent"] < 1:
        raise _fail(path, "search", "samples and concurrent must be >= 1")
    identities = _identities(
        path, data["datasets"], data.get("identities_per_trial", 1), int(search["seed"]), check_data
    )
    first_dataset = dict(identities[0][0])
    try:
        base = ExperimentSpec.from_dict(
            {
                **base_dict,
                "dataset": first_dataset,
                "identity": identities[0][1],
                "suite": str(data["name"]),
            }
        )
    except SpecError as exc:
        raise _fail(path, "base", str(exc)) from None
    space = data["space"]
    if not isinstance(space, Mapping) or not space:
        raise _fail(path, "space", "expected at least one field to search, e.g. defense.eps")
    dims = tuple(_dimension(path, base, str(k), v) for k, v in space.items())
    objective = _objective(path, data.get("objective", {}), {m.name for m in base.metrics})
    scheduler = _options(
        path,
        "scheduler",
        data.get("scheduler"),
        {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    if scheduler["name"] not in SCHEDULERS:
        raise _fail(path, "scheduler.name", f"{scheduler['name']!r}: use {', '.join(SCHEDULERS)}")
    resources = _options(path, "resources", data.get("resources"), {"cpus": 1.0, "gpus": 0.0})
    return SearchSpec(
        path=str(path),
        name=str(data["name"]),
        base=base,
        identities=identities,
        space=dims,
        objective=objective,
        algorithm=search["algorithm"],
        samples=int(search["samples"]),
        concurrent=int(search["concurrent"]),
        seed=int(search["seed"]),
        scheduler=scheduler["name"],
        grace_period=max(1, int(scheduler["grace_period"])),
        reduction_factor=max(2, int(scheduler["reduction_factor"])),
        cpus=float(resources["cpus"]),
        gpus=float(resources["gpus"]),
    )


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point dominates (both maximized)."""
    front = []
    for i, (p, q) in enumerate(points):
        if any(
            (p2 >= p and q2 >= q) and (p2 > p or q2 > q)
            for j, (p2, q2) in enumerate(points)
            if j != i
        ):
            continue
        front.append(i)
    return front

"""The one spec type: everything about one experiment, frozen and hashable.

An ``ExperimentSpec`` flows unchanged from a YAML file, a Tune trial or an HTTP
request to the workers and into every result row (as canonical JSON plus
``spec_id``). Parameters are validated against the registered component classes,
filled with their defaults and coerced to canonical types, so two specs that
describe the same experiment have the same ``spec_id``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from antipers.names import check_name
from antipers.registry import (
    ATTACKS,
    BASE_MODELS,
    COUNTERMEASURES,
    DATASETS,
    DEFENSES,
    METRICS,
    SAMPLERS,
    TRACKS,
    Registry,
    RegistryError,
    SpecError,
    coerce,
    validate_params,
)
from antipers.spec_files import load_mapping

PROTOCOL = "adb-v1"


@dataclass(frozen=True)
class ComponentSpec:
    """A registered component by name, with its full (defaults filled) parameters."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    def __getitem__(self, key: str) -> Any:
        return self.kwargs[key]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{k: _jsonable(v) for k, v in self.params}}

    def params_json(self) -> str:
        return canonical_json({k: _jsonable(v) for k, v in self.params})

    @classmethod
    def parse(cls, value: Any, registry: Registry[Any], where: str) -> ComponentSpec:
        """From ``"name"`` or ``{"name": ..., **params}``; validated against ``registry``."""
        if isinstance(value, str):
            name, params = value, {}
        elif isinstance(value, Mapping):
            params = dict(value)
            name = params.pop("name", None)
            if not isinstance(name, str):
                raise SpecError(f"{where}: a mapping needs a 'name' (one of {registry.names()})")
        else:
            raise SpecError(
                f"{where}: expected a {registry.kind} name or a mapping with 'name', got {value!r}"
            )
        try:
            cls_ = registry.get(name)
        except RegistryError as exc:
            raise SpecError(f"{where}: {exc}") from None
        full = validate_params(where, name, cls_, params)
        try:  # run the component's own checks (ranges, combinations) now, before any work
            cls_(**full)
        except (ValueError, TypeError) as exc:
            raise SpecError(f"{where} {name!r}: {exc}") from None
        return cls(name, tuple(sorted(full.items())))

    @classmethod
    def parse_chain(
        cls, value: Any, registry: Registry[Any], where: str
    ) -> tuple[ComponentSpec, ...]:
        """A list of components applied in order; one component alone is a chain of
        one, and ``none`` entries are dropped (the empty chain is ``none``)."""
        if value is None:
            return ()
        items = value if isinstance(value, (list, tuple)) else [value]
        chain = (cls.parse(v, registry, f"{where}[{i}]") for i, v in enumerate(items))
        return tuple(c for c in chain if c.name != "none")

    def build(self, registry: Registry[Any]) -> Any:
        return registry.get(self.name)(**self.kwargs)


_COMPONENTS: dict[str, Registry[Any]] = {
    "base_model": BASE_MODELS,
    "dataset": DATASETS,
    "defense": DEFENSES,
    "attack": ATTACKS,
    "sampling": SAMPLERS,
}
_REQUIRED = ("base_model", "dataset", "identity", "attack")
_DEFAULTS: dict[str, Any] = {
    "suite": "default",
    "track": "image",
    "protocol": PROTOCOL,
    "defense": "none",
    "countermeasure": "none",
    "sampling": "cfg",
    "metrics": ["fdfr", "ism"],
    "resolution": 512,
    "seed": 0,
}


@contextmanager
def _about(key: str) -> Iterator[None]:
    """Tag a SpecError raised while ``key`` is parsed with that field (unless a deeper
    parse already named one)."""
    try:
        yield
    except SpecError as exc:
        if exc.field is None:
            exc.field = key
        raise


def _metrics(merged: Mapping[str, Any], given: bool) -> tuple[ComponentSpec, ...]:
    metrics = merged["metrics"]
    track_metrics = TRACKS.get(merged["track"]).default_metrics
    if not given and track_metrics is not None:
        metrics = list(track_metrics)
    if isinstance(metrics, (str, Mapping)) or not isinstance(metrics, (list, tuple)):
        raise SpecError(f"metrics: expected a list of metric names, got {metrics!r}")
    if not metrics:
        raise SpecError("metrics: name at least one metric (antipers list metrics)")
    parsed = {ComponentSpec.parse(m, METRICS, f"metrics[{i}]") for i, m in enumerate(metrics)}
    # order and repeats do not change the experiment, so they do not change spec_id
    return tuple(sorted(parsed, key=lambda c: canonical_json(c.to_dict())))


def _scalar(key: str, value: Any) -> Any:
    """A plain field, coerced and checked."""
    if key in ("identity", "suite", "protocol", "track"):
        value = coerce(value, str, key)
    else:
        value = coerce(value, int, key)
    try:  # identity and suite reach paths: dataset folders, a search's storage
        if key == "identity":
            check_name(value, "identity", strict=False)
        elif key == "suite":
            check_name(value, "suite")
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    if key == "track" and value not in TRACKS:
        raise SpecError(f"track: expected one of {', '.join(TRACKS.names())}, got {value!r}")
    if key == "resolution" and (value < 8 or value % 8):
        raise SpecError(f"resolution: expected a positive multiple of 8, got {value}")
    return value


def _check_fits_track(kwargs: dict[str, Any]) -> None:
    """A defense runs on the tracks it declares (``TRACKS``; all when it declares none)
    and may refuse an attack it cannot work with (IDDM: too few steps for its rounds);
    photo-budget metrics belong to tracks whose defenses change photos
    (``changes_photos``)."""
    defense = kwargs["defense"].build(DEFENSES)
    tracks = getattr(defense, "TRACKS", None)
    if tracks and kwargs["track"] not in tracks:
        raise _tagged(
            "defense",
            f"defense {kwargs['defense'].name!r} runs on the {' or '.join(tracks)} track, "
            f"not {kwargs['track']!r}: set track: {tracks[0]}",
        )
    changes_photos = TRACKS.get(kwargs["track"]).changes_photos
    for metric in kwargs["metrics"]:
        if not changes_photos and getattr(METRICS.get(metric.name), "compares_photos", 0):
            raise _tagged(
                "metrics",
                f"metrics: {metric.name!r} compares protected photos with their originals; "
                f"on the {kwargs['track']} track no defense changes the published photos",
            )
    if hasattr(defense, "check_attack"):
        try:
            defense.check_attack(kwargs["attack"].build(ATTACKS))
        except ValueError as exc:
            raise _tagged("defense", f"defense {kwargs['defense'].name!r}: {exc}") from exc


def _tagged(key: str, message: str) -> SpecError:
    error = SpecError(message)
    error.field = key
    return error


@dataclass(frozen=True)
class ExperimentSpec:
    """One experiment: track, base model, data, defense, countermeasure, attack, sampling,
    metrics and seed. Build it with ``from_dict``/``load_spec`` so it is validated."""

    base_model: ComponentSpec
    dataset: ComponentSpec
    identity: str
    attack: ComponentSpec
    defense: ComponentSpec
    countermeasure: tuple[ComponentSpec, ...]
    sampling: ComponentSpec
    metrics: tuple[ComponentSpec, ...]
    suite: str = "default"
    track: str = "image"
    protocol: str = PROTOCOL
    resolution: int = 512
    seed: int = 0
    _id: str = field(default="", init=False, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentSpec:
        if not isinstance(data, Mapping):
            raise SpecError(f"a spec must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"unknown spec field {key!r}{hint}; fields: {', '.join(sorted(known))}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise SpecError(f"spec is missing required field(s): {', '.join(missing)}")
        merged = {**_DEFAULTS, **data}
        kwargs: dict[str, Any] = {}
        for key, reg in _COMPONENTS.items():
            with _about(key):
                kwargs[key] = ComponentSpec.parse(merged[key], reg, key)
        with _about("countermeasure"):
            kwargs["countermeasure"] = ComponentSpec.parse_chain(
                merged["countermeasure"], COUNTERMEASURES, "countermeasure"
            )
        for key in ("identity", "suite", "protocol", "track"):
            with _about(key):
                kwargs[key] = _scalar(key, merged[key])
        with _about("metrics"):
            kwargs["metrics"] = _metrics({**merged, "track": kwargs["track"]}, "metrics" in data)
        _check_fits_track(kwargs)
        for key in ("seed", "resolution"):
            with _about(key):
                kwargs[key] = _scalar(key, merged[key])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if isinstance(value, ComponentSpec):
                value = value.to_dict()
            elif f.name in ("metrics", "countermeasure"):
                value = [m.to_dict() for m in value]
            out[f.name] = value
        return out

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ExperimentSpec:
        return cls.from_dict(json.loads(text))

    @property
    def spec_id(self) -> str:
        """First 16 hex digits of the SHA-256 of the canonical JSON; stable across processes."""
        if not self._id:
            object.__setattr__(
                self, "_id", hashlib.sha256(self.to_json().encode()).hexdigest()[:16]
            )
        return self._id

    def override(self, changes: Mapping[str, Any]) -> ExperimentSpec:
        """A validated variant: ``{"defense.eps": 6, "seed": 1, "countermeasure.0.quality":
        50}`` (list entries by index). Replacing a component (``"defense": "aspl"``) drops
        the old parameters."""
        data = self.to_dict()
        for dotted, value in changes.items():
            *path, last = dotted.split(".")
            if (path[0] if path else last) not in data:
                field_name = path[0] if path else last
                raise SpecError(f"override {dotted!r}: unknown spec field {field_name!r}")
            target: Any = data
            for part in path:
                target = _step(target, part, dotted)
            if isinstance(target, list):
                _step(target, last, dotted)
                target[int(last)] = copy.deepcopy(value)
            elif isinstance(target, dict):
                target[last] = copy.deepcopy(value)
            else:
                raise SpecError(f"override {dotted!r}: {path[-1]!r} has no parameters")
        return ExperimentSpec.from_dict(data)

    @property
    def countermeasure_name(self) -> str:
        return "+".join(c.name for c in self.countermeasure) or "none"

    def countermeasure_json(self) -> str:
        return canonical_json([c.to_dict() for c in self.countermeasure])

    def describe(self) -> str:
        return (
            f"{self.track}/{self.defense.name}+{self.countermeasure_name}->{self.attack.name} "
            f"on {self.base_model.name}:{self.dataset.name}/{self.identity} seed={self.seed}"
        )


def _step(target: Any, part: str, dotted: str) -> Any:
    if isinstance(target, list):
        if not part.isdigit() or int(part) >= len(target):
            raise SpecError(f"override {dotted!r}: {part!r} is not an index below {len(target)}")
        return target[int(part)]
    if isinstance(target, dict) and part in target:
        return target[part]
    raise SpecError(f"override {dotted!r}: no {part!r} here")


def canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def load_spec(path: str | Path) -> ExperimentSpec:
    """An ExperimentSpec from a YAML or JSON file."""
    data = load_mapping(path)
    try:
        return ExperimentSpec.from_dict(data)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None

"""What a leaderboard board is (``reports/boards.yaml``): the metric that ranks it and
in which direction, the visibility columns, the undefended baseline and the numbers
that say the attack did not work, and the bootstrap settings. Checked when loaded;
errors name the file and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from antipers.registry import SpecError
from antipers.spec_files import load_mapping

MATCH_FIELDS = ("track", "dataset", "base_model", "attack", "protocol")
DIRECTIONS = ("higher", "lower")
BOUNDS = ("below", "above")


def default_boards_file() -> Path:
    """The boards file that ships with antipers (linked from ``reports/boards.yaml``)."""
    return Path(__file__).parent / "reports" / "boards.yaml"


@dataclass(frozen=True)
class BoardRules:
    """How one board is ranked and checked."""

    primary: tuple[str, ...] = ("ism", "fdfr")  # the first with values on the board ranks it
    direction: Mapping[str, str] = field(default_factory=dict)  # overrides the rows' own
    visibility: tuple[str, ...] = ("psnr", "lpips", "ssim", "linf")
    baseline: str = "none"  # the undefended configuration
    # baseline numbers that mean the attack did not learn the person: metric -> bound
    attack_failed: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # the same, for numbers of one backend (an offline ISM is not ArcFace's): backend ->
    # metric -> bound, taking precedence over ``attack_failed`` where that backend scored
    attack_failed_by_backend: Mapping[str, Mapping[str, Mapping[str, float]]] = field(
        default_factory=dict
    )
    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0

    def failure_bound(self, metric: str, backend: str) -> tuple[str, float] | None:
        """(side, threshold) under which ``metric`` by ``backend`` says the attack failed."""
        bound = self.attack_failed_by_backend.get(backend, {}).get(metric)
        bound = bound or self.attack_failed.get(metric)
        return next(iter(bound.items())) if bound else None

    def higher_is_better(self, metric: str, from_rows: bool | None) -> bool | None:
        """Better for the defense; the boards file wins over what the rows say."""
        if metric in self.direction:
            return self.direction[metric] == "higher"
        return from_rows


@dataclass(frozen=True)
class BoardsConfig:
    defaults: BoardRules
    overrides: tuple[tuple[Mapping[str, str], Mapping[str, Any]], ...] = ()
    source: str = "<defaults>"

    def rules_for(self, key: Mapping[str, str]) -> BoardRules:
        rules = self.defaults
        for match, changes in self.overrides:
            if all(key.get(k) == v for k, v in match.items()):
                rules = replace(rules, **changes)
        return rules


def _rules_fields(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where}: expected a mapping")
    known = {f.name for f in fields(BoardRules)}
    out: dict[str, Any] = {}
    for name, value in raw.items():
        here = f"{where}.{name}"
        if name not in known:
            raise SpecError(f"{here}: unknown field; use {', '.join(sorted(known))}")
        if name in ("primary", "visibility"):
            value = [value] if isinstance(value, str) else value
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) for v in value)
            ):
                raise SpecError(f"{here}: expected a metric name or a list of them")
            out[name] = tuple(value)
        elif name == "direction":
            if not isinstance(value, Mapping) or any(v not in DIRECTIONS for v in value.values()):
                raise SpecError(f"{here}: expected metric: higher|lower (better for the defense)")
            out[name] = dict(value)
        elif name == "attack_failed":
            out[name] = _bounds(value, here)
        elif name == "attack_failed_by_backend":
            if not isinstance(value, Mapping):
                raise SpecError(f"{here}: expected backend: {{metric: {{below: x}}}}")
            out[name] = {str(b): _bounds(v, f"{here}.{b}") for b, v in value.items()}
        elif name == "baseline":
            if not isinstance(value, str):
                raise SpecError(f"{here}: expected a defense name")
            out[name] = value
        elif name == "confidence":
            if not isinstance(value, int | float) or not 0 < value < 1:
                raise SpecError(f"{here}: expected a level in (0, 1), got {value!r}")
            out[name] = float(value)
        else:  # resamples, seed
            lowest = 100 if name == "resamples" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise SpecError(f"{here}: expected an integer >= {lowest}, got {value!r}")
            out[name] = value
    return out


def _bounds(value: Any, where: str) -> dict[str, dict[str, float]]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: expected metric: {{below: x}} or {{above: x}}")
    out = {}
    for metric, bound in value.items():
        ok = (
            isinstance(bound, Mapping)
            and len(bound) == 1
            and next(iter(bound)) in BOUNDS
            and isinstance(next(iter(bound.values())), int | float)
            and math.isfinite(next(iter(bound.values())))
        )
        if not ok:
            raise SpecError(f"{where}.{metric}: expected {{below: x}} or {{above: x}}")
        out[metric] = {k: float(v) for k, v in bound.items()}
    return out


def load_boards(path: str | Path | None = None) -> BoardsConfig:
    """The boards file at ``path`` (default: the one antipers ships)."""
    path = Path(path) if path is not None else default_boards_file()
    raw = load_mapping(path)
    try:
        unknown = sorted(set(raw) - {"defaults", "boards"})
        if unknown:
            raise SpecError(f"{unknown[0]}: unknown field; use defaults, boards")
        defaults = BoardRules(**_rules_fields(raw.get("defaults") or {}, "defaults"))
        overrides = []
        entries = raw.get("boards") or []
        if not isinstance(entries, list):
            raise SpecError("boards: expected a list of {match: {...}, <rules>}")
        for i, entry in enumerate(entries):
            where = f"boards[{i}]"
            if not isinstance(entry, Mapping) or not isinstance(entry.get("match"), Mapping):
                raise SpecError(f"{where}.match: expected a mapping of {', '.join(MATCH_FIELDS)}")
            match = dict(entry["match"])
            bad = sorted(set(match) - set(MATCH_FIELDS))
            if bad:
                raise SpecError(f"{where}.match.{bad[0]}: unknown; use {', '.join(MATCH_FIELDS)}")
            changes = _rules_fields({k: v for k, v in entry.items() if k != "match"}, where)
            overrides.append(({k: str(v) for k, v in match.items()}, changes))
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    return BoardsConfig(defaults, tuple(overrides), str(path))

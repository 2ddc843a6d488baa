"""Campaign specs: grids over datasets, defenses, countermeasures, attacks and seeds,
expanded into ``ExperimentSpec``s and checked entirely before any work starts.

A parameter given as a list is a grid axis (``eps: [4, 8]``), except for parameters
whose own type is a list (``eot``, ``prompts``): for those, a list of lists is the
axis. Each entry of ``countermeasures`` is a chain, or ``countermeasures`` names an
attacker suite (``robust``: ``antipers/attacks/suites.py``). Every error names the file, the
line and the field.
"""

from __future__ import annotations

import itertools
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antipers.attacks.suites import SUITES
from antipers.attacks.suites import expand as expand_suite
from antipers.errors import UserError
from antipers.registry import ATTACKS, DATASETS, DEFENSES, Registry, SpecError
from antipers.spec import ExperimentSpec

SHARED = ("suite", "protocol", "track", "base_model", "sampling", "metrics", "resolution")
GRIDS = ("datasets", "defenses", "countermeasures", "attacks", "seeds")
KNOWN = (*SHARED, *GRIDS)
# the grid that sets each spec field (an identity is chosen by its dataset entry)
GRID_OF = {
    "dataset": "datasets",
    "identity": "datasets",
    "defense": "defenses",
    "countermeasure": "countermeasures",
    "attack": "attacks",
    "seed": "seeds",
}


class CampaignError(UserError, ValueError):
    """A campaign that cannot run; the message names file, line and field."""


@dataclass(frozen=True)
class Campaign:
    path: str
    specs: tuple[ExperimentSpec, ...]

    @property
    def spec_ids(self) -> list[str]:
        return [s.spec_id for s in self.specs]


def _lines(path: Path) -> Any:
    import yaml

    return yaml.compose(path.read_text())


def _line(root: Any, where: tuple[Any, ...]) -> int:
    """1-based line of the YAML node at ``where`` (or of its nearest existing parent)."""
    node, line = root, (root.start_mark.line + 1 if root is not None else 0)
    for key in where:
        if node is None:
            break
        if (
            hasattr(node, "value")
            and isinstance(node.value, list)
            and node.value
            and isinstance(node.value[0], tuple)
        ):  # mapping
            match = next((v for k, v in node.value if k.value == key), None)
            node = match
        elif hasattr(node, "value") and isinstance(node.value, list) and isinstance(key, int):
            node = node.value[key] if key < len(node.value) else None
        else:
            node = None
        if node is not None:
            line = node.start_mark.line + 1
    return line


def _is_list_type(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin in (tuple, list) or (isinstance(tp, type) and issubclass(tp, (tuple, list)))


def _variants(entry: Any, registry: Registry[Any]) -> Iterator[Any]:
    """The grid of one component entry: lists of values become axes."""
    if isinstance(entry, str) or not isinstance(entry, Mapping):
        yield entry
        return
    name = entry.get("name")
    types = {}
    if isinstance(name, str) and name in registry:
        types = {p.name: p.type for p in registry.params(name)}
    axes: dict[str, list[Any]] = {}
    for key, value in entry.items():
        if key == "name":
            continue
        is_axis = isinstance(value, list) and (
            not _is_list_type(types.get(key)) or (value and isinstance(value[0], list))
        )
        axes[key] = value if is_axis else [value]
        if is_axis and not value:
            raise SpecError(f"{key}: an empty list gives no experiments")
    for combo in itertools.product(*axes.values()):
        yield {"name": name, **dict(zip(axes, combo, strict=True))}


def _identities(entry: Any, where: str) -> tuple[Any, list[str]]:
    """The dataset spec without ``identities``, and the chosen identities."""
    spec = dict(entry) if isinstance(entry, Mapping) else {"name": entry}
    choice = spec.pop("identities", "all")
    dataset = DATASETS.build(spec["name"], {k: v for k, v in spec.items() if k != "name"})
    try:
        available = dataset.identities()
    except ValueError as exc:  # DatasetError: missing folder, no identities
        raise SpecError(f"dataset folder: {exc}") from None
    if choice == "all":
        chosen = list(available)
    elif isinstance(choice, Mapping) and set(choice) == {"first"}:
        first = choice["first"]
        if isinstance(first, bool) or not isinstance(first, int) or first < 1:
            raise SpecError(f"identities.first: expected a whole number >= 1, got {first!r}")
        chosen = list(available)[:first]
    elif isinstance(choice, list):
        missing = [c for c in choice if c not in available]
        if missing:
            raise SpecError(
                f"identities {missing} are not in this dataset ({len(available)} found)"
            )
        chosen = list(choice)
    else:
        raise SpecError(
            f"identities: expected 'all', a list of ids or {{first: N}}, got {choice!r}"
        )
    if not chosen:
        raise SpecError(f"{where}: no identities selected")
    return spec, chosen


def load_campaign(path: str | Path) -> Campaign:
    """Every experiment of the campaign file, validated; raises CampaignError."""
    from antipers.spec_files import load_mapping

    path = Path(path)
    try:
        data = load_mapping(path)
    except SpecError as exc:
        raise CampaignError(str(exc)) from None
    root = _lines(path)

    def fail(where: tuple[Any, ...], message: str) -> CampaignError:
        field = ".".join(str(w) for w in where) or "(top level)"
        return CampaignError(f"{path}:{_line(root, where)}: {field}: {message}")

    unknown = sorted(set(data) - set(KNOWN))
    if unknown:
        raise fail((unknown[0],), f"unknown campaign field; fields: {', '.join(KNOWN)}")
    for key in ("datasets", "defenses", "attacks"):
        if key not in data:
            raise fail((), f"missing required field {key!r}")
    grids = {
        "datasets": data["datasets"],
        "defenses": data["defenses"],
        "countermeasures": expand_suite(data.get("countermeasures", ["none"])),
        "attacks": data["attacks"],
        "seeds": data.get("seeds", [0]),
    }
    for key, value in grids.items():
        if key == "countermeasures" and isinstance(value, str):
            raise fail((key,), f"unknown attacker suite {value!r}; suites: {', '.join(SUITES)}")
        if not isinstance(value, list):
            raise fail((key,), f"expected a list, got {type(value).__name__}")
        if not value:
            raise fail((key,), "an empty list gives no experiments")

    # each grid's values with the index of the entry that gave them, for _blame
    entries: dict[str, list[tuple[int, Any]]] = {}
    for key, registry in (("defenses", DEFENSES), ("attacks", ATTACKS)):
        entries[key] = []
        for i, entry in enumerate(grids[key]):
            try:
                entries[key] += [(i, variant) for variant in _variants(entry, registry)]
            except SpecError as exc:
                raise fail((key, i), str(exc)) from None
    entries["datasets"] = []
    for i, entry in enumerate(grids["datasets"]):
        try:
            entries["datasets"].append((i, _identities(entry, f"datasets[{i}]")))
        except (SpecError, ValueError, KeyError) as exc:
            raise fail(("datasets", i), str(exc)) from None
    entries["countermeasures"] = list(enumerate(grids["countermeasures"]))
    entries["seeds"] = list(enumerate(grids["seeds"]))

    shared = {k: data[k] for k in SHARED if k in data}
    specs: dict[str, ExperimentSpec] = {}
    for combo in itertools.product(*(entries[key] for key in GRIDS)):
        origin = {key: i for key, (i, _) in zip(GRIDS, combo, strict=True)}
        (dataset, identities), defense, chain, attack, seed = (value for _, value in combo)
        for identity in identities:
            record = {
                **shared,
                "dataset": dataset,
                "identity": identity,
                "defense": defense,
                "countermeasure": chain,
                "attack": attack,
                "seed": seed,
            }
            try:
                spec = ExperimentSpec.from_dict(record)
            except SpecError as exc:
                raise fail(_blame(exc, origin), str(exc)) from None
            specs.setdefault(spec.spec_id, spec)
    return Campaign(str(path), tuple(specs.values()))


def _blame(exc: SpecError, origin: Mapping[str, int]) -> tuple[Any, ...]:
    """Where in the file a spec error comes from: the entry of the grid that set the
    field it names (``origin``: each grid's entry index), else that shared field."""
    grid = GRID_OF.get(exc.field or "")
    if grid is not None:
        return (grid, origin[grid])
    return (exc.field,) if exc.field in SHARED else ()

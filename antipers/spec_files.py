"""Spec files read as mappings (YAML or JSON): the one reader of campaign, search,
board and spec files, so every one of them refuses the same mistakes with the file's
name (no such file, not text, unparsable, not a mapping, a key that is not a string)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from antipers.registry import SpecError


def load_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file as a mapping; errors name the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file (expected UTF-8 YAML or JSON)") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: cannot parse ({exc})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    bad = non_string_key(data, ())
    if bad is not None:
        where, key = bad
        field = ".".join(map(str, where)) or "(top level)"
        raise SpecError(f"{path}: {field}: key {key!r} is not a name; keys are strings")
    return data


def non_string_key(value: Any, where: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any] | None:
    """The first mapping key anywhere in ``value`` that is not a string (YAML reads
    ``1: x`` or ``true: x`` as a number or a boolean)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return where, key
            found = non_string_key(item, (*where, key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = non_string_key(item, (*where, i))
            if found:
                return found
    return None

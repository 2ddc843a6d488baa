"""What every command shares: its error type and the checks of common options, so that
a bad flag reads the same whichever command it was given to."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from antipers.errors import UserError


class CLIError(UserError):
    """A user mistake: printed as ``error: ...`` with exit status 2."""


def parse_set(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` items (values read as YAML) -> {key: value}; ``flag`` names the
    option in errors (``--set``, ``--param``)."""
    import yaml

    from antipers.spec_files import non_string_key

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} defense.eps=6")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise CLIError(f"{flag} {item!r}: cannot parse the value ({exc})") from None
        bad = non_string_key(out[key], ())
        if bad is not None:
            raise CLIError(f"{flag} {item!r}: key {bad[1]!r} is not a name; keys are strings")
    return out


def from_flags(cls: type, given: dict[str, tuple[str, Any]]) -> Any:
    """``cls`` built from options (field -> (flag, value)); a value outside the field's
    declared range, or refused by its own checks, is a CLI error, named by its flag
    where the range says which."""
    from antipers.ranges import field_ranges

    ranges = field_ranges(cls)
    for field, (flag, value) in given.items():
        if field in ranges and not ranges[field].contains(value):
            raise CLIError(f"{flag}: expected {ranges[field]}, got {value}")
    try:
        return cls(**{field: value for field, (_, value) in given.items()})
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def choose_device(name: str | None) -> Any:
    """The ``--device`` of an in-process command; one that does not exist is a CLI error."""
    from antipers.device import pick_device

    try:
        return pick_device(name)
    except RuntimeError as exc:
        raise CLIError(str(exc)) from None

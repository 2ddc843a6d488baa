"""Parameter ranges, declared once on a component's fields.

``steps: Annotated[int, Range(ge=1)] = 1000`` is the whole declaration: the registry
checks it when a spec is validated, a ``Checked`` dataclass checks it when built
directly, and ``antipers list`` prints it. ``Annotated`` leaves the field's type as
it was, so coercion (and with it every ``spec_id``) is unchanged. Checks that relate
two fields stay in the component's ``__post_init__``.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """Bounds of one number (any of them may be absent); ``note`` says why, when the
    bound is not obvious (``the upscaler's range``)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if (
            self.ge is not None
            and self.gt is not None
            or self.le is not None
            and self.lt is not None
        ):
            raise TypeError("Range: give at most one lower and one upper bound")

    def contains(self, value: float) -> bool:
        if value != value:  # NaN passes every comparison; it is in no range
            return False
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def __str__(self) -> str:
        return f"{self.bounds} ({self.note})" if self.note else self.bounds

    @property
    def bounds(self) -> str:
        """The bounds alone (``0..1``, ``> 0``, ``in (0, 1]``)."""
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is None and high is None:
            text = "any"
        elif high is None:
            text = f"{'>=' if self.ge is not None else '>'} {low}"
        elif low is None:
            text = f"{'<=' if self.le is not None else '<'} {high}"
        elif self.ge is not None and self.le is not None:
            text = f"{low}..{high}"
        else:
            opening = "[" if self.ge is not None else "("
            closing = "]" if self.le is not None else ")"
            text = f"in {opening}{low}, {high}{closing}"
        return text

    def check(self, name: str, value: Any) -> None:
        """Raise the message users see: ``steps: expected >= 1, got 0``."""
        if value is not None and not isinstance(value, bool) and not self.contains(value):
            raise ValueError(f"{name}: expected {self}, got {value}")


@functools.cache
def field_ranges(cls: type) -> dict[str, Range]:
    """Each field's declared ``Range`` (fields without one are left out). A subclass
    that only changes a default (``eps: float = 8.0``) keeps its base's range."""
    out: dict[str, Range] = {}
    for klass in cls.__mro__:
        if not is_dataclass(klass):
            continue
        hints = typing.get_type_hints(klass, include_extras=True)
        for f in fields(cls):
            declared = [
                m for m in getattr(hints.get(f.name), "__metadata__", ()) if isinstance(m, Range)
            ]
            if declared and f.name not in out:
                out[f.name] = declared[0]
    return out


def check_ranges(cls: type, values: typing.Mapping[str, Any]) -> None:
    for name, bounds in field_ranges(cls).items():
        if name in values:
            bounds.check(name, values[name])


class Checked:
    """Mixin for dataclasses: declared ranges are checked on construction, so a
    component built in code is refused exactly as one from a spec. A subclass with a
    ``__post_init__`` of its own (checks across fields) calls ``super().__post_init__()``."""

    def __post_init__(self) -> None:
        check_ranges(type(self), vars(self))

"""Parameter ranges declared once on the fields: checked by the registry and on
construction, with the message users see, and shown with the parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pytest

from antipers.ranges import Checked, Range, field_ranges
from antipers.registry import DEFENSES, REGISTRIES, SpecError, validate_params


@pytest.mark.parametrize(
    ("bounds", "text", "inside", "outside"),
    [
        (Range(ge=1), ">= 1", [1, 7], [0, -3]),
        (Range(gt=0), "> 0", [1e-9], [0, -1]),
        (Range(ge=0, le=1), "0..1", [0, 0.5, 1], [-0.01, 1.01]),
        (Range(gt=0, lt=1, note="both stages run"), "in (0, 1) (both stages run)", [0.5], [0, 1]),
        (Range(gt=0, le=1), "in (0, 1]", [1], [0]),
        (Range(ge=0, lt=8), "in [0, 8)", [0], [8]),
    ],
)
def test_a_range_reads_as_it_checks(bounds, text, inside, outside):
    assert str(bounds) == text
    for value in inside:
        bounds.check("x", value)
    for value in outside:
        with pytest.raises(ValueError, match=f"^x: expected .*, got {value}$"):
            bounds.check("x", value)


def test_nan_is_in_no_range():
    """NaN passes every comparison, so a bound written as one would let it through."""
    for bounds in (Range(ge=0), Range(ge=0, le=2), Range(gt=0, lt=1)):
        with pytest.raises(ValueError, match="got nan"):
            bounds.check("x", float("nan"))


def test_two_lower_bounds_are_refused():
    with pytest.raises(TypeError, match="at most one lower"):
        Range(ge=0, gt=0)


@dataclass(frozen=True)
class _Base(Checked):
    steps: Annotated[int, Range(ge=1)] = 10
    name: str = "x"


@dataclass(frozen=True)
class _Child(_Base):
    steps: int = 3  # a new default only: the base's range still holds
    weight: Annotated[float, Range(ge=0)] = 1.0


def test_construction_checks_declared_ranges_and_a_new_default_keeps_them():
    assert set(field_ranges(_Child)) == {"steps", "weight"}
    with pytest.raises(ValueError, match="steps: expected >= 1, got 0"):
        _Child(steps=0)
    with pytest.raises(ValueError, match="weight: expected >= 0, got -1"):
        _Child(weight=-1.0)
    assert _Child().steps == 3


def test_the_registry_checks_ranges_of_any_component_with_its_name():
    with pytest.raises(SpecError, match=r"defense 'iddm': privacy: expected 0\.\.1, got 1\.5"):
        DEFENSES.build("iddm", {"privacy": 1.5})
    with pytest.raises(SpecError, match="attack 'x': steps: expected >= 1, got 0"):
        validate_params("attack", "x", _Base, {"steps": 0})


def test_every_registered_default_is_inside_its_range():
    """A declared range that excluded its own default would refuse every spec."""
    checked = 0
    for registry in REGISTRIES.values():
        for name in registry.names():
            for p in registry.params(name):
                if p.range is not None:
                    p.range.check(f"{name}.{p.name}", p.default)
                    checked += 1
    assert checked > 60


def test_antipers_list_prints_each_range_beside_its_default(capsys):
    from antipers.cli import main

    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    assert "steps: int = 1000  (>= 1)" in out
    assert "lr: float = 0.0001  (> 0)" in out  # lora's own default, the base's range
    assert "instance_prompt: str = 'a photo of sks person'\n" in out  # no range, nothing

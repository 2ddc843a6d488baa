"""Named attacker suites: ``countermeasures: robust`` in a campaign means these chains.

``robust`` is the robust-mimicry literature's set (Hönig et al., ICLR 2025: Gaussian
noise, IMPRESS, DiffPure-style purification; JPEG as every paper has it). Its
purification runs at DiffPure's ImageNet strength (Nie et al., ICML 2022: t* = 0.15,
so t = 150 of SD's 1000 steps, here with 15 DDIM steps); ``purify``'s own default,
t = 100, is DiffPure's CIFAR-10 strength. A board's
worst case covers whatever ran; the report names the suite when a board's chains are
exactly one of these.
"""

from __future__ import annotations

from typing import Any

SUITES: dict[str, list[Any]] = {
    "robust": [
        "none",
        [{"name": "jpeg", "quality": 75}],
        [{"name": "noise", "sigma": 12.75}],
        [{"name": "impress"}],
        [{"name": "purify", "t": 150, "steps": 15}],
    ],
}


def expand(value: Any) -> Any:
    """A suite's name as its list of chains; anything else as it is."""
    if isinstance(value, str) and value in SUITES:
        return [*SUITES[value]]
    return value


def chain_name(entry: Any) -> str:
    """A chain's name as rows record it: ``none``, ``jpeg``, ``jpeg+flip``."""
    if isinstance(entry, str):
        return entry
    names = [e if isinstance(e, str) else e["name"] for e in entry]
    return "+".join(n for n in names if n != "none") or "none"

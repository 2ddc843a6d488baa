"""The model track's APDM experiment as a campaign file sets it, for the benchmarks
that study APDM outside a campaign run (``specificity.py``, ``apdm_horizon.py``): one
reading of the file, so neither restates its settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from antipers.campaign import load_campaign
from antipers.registry import ATTACKS, DEFENSES
from antipers.spec import ExperimentSpec

CAMPAIGNS = Path(__file__).parents[1] / "antipers" / "campaigns"


def apdm_experiment(
    campaign: Path, attack_changes: dict[str, Any], apdm_changes: dict[str, Any]
) -> tuple[ExperimentSpec, Any, Any]:
    """The campaign's first APDM experiment against DreamBooth, with its attacker and its
    APDM built, each with the changes whose value is not None. ValueError without one."""
    spec = next(
        (
            s
            for s in load_campaign(campaign).specs
            if s.defense.name == "apdm" and s.attack.name == "dreambooth"
        ),
        None,
    )
    if spec is None:
        raise ValueError(f"{campaign}: no apdm experiment against dreambooth")

    def given(changes: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in changes.items() if v is not None}

    attack = ATTACKS.build(spec.attack.name, spec.attack.kwargs)
    apdm = DEFENSES.build("apdm", spec.defense.kwargs)
    return (
        spec,
        dataclasses.replace(attack, **given(attack_changes)),
        dataclasses.replace(apdm, **given(apdm_changes)),
    )

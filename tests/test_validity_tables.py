"""``benchmarks/validity.py``'s comparisons: each metric against the undefended attack
where it has the metric, else the control (PersGuard's ``iterations: 0``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "validity.py"
CONTROL = "persguard (iterations=0)"
IMPLANT = "persguard (iterations=200)"


@pytest.fixture(scope="module")
def validity():
    spec = importlib.util.spec_from_file_location("validity_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_metric_none_lacks_is_compared_with_the_control(validity):
    defenses = ["none", CONTROL, IMPLANT]
    assert validity.reference(defenses, defenses) == "none"
    assert validity.reference(defenses, [CONTROL, IMPLANT]) == CONTROL
    assert validity.reference(defenses, [IMPLANT]) is None
    assert validity.reference(["none", "persguard (iterations=05)"], ["x"]) is None


def rows(values: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    out = []
    for (metric, defense), per_person in values.items():
        for i, value in enumerate(per_person):
            out.append(
                {
                    "attack": "dreambooth",
                    "countermeasure": "none",
                    "defense": defense,
                    "metric": metric,
                    "person": f"0/synth-{i:04d}",
                    "value": value,
                    "image_index": -1,
                    "status": "ok",
                }
            )
    return pd.DataFrame(out)


def test_paired_differences_take_each_metric_from_its_own_reference(validity):
    frame = rows(
        {
            ("ism", "none"): [0.90, 0.91, 0.92],
            ("ism", CONTROL): [0.90, 0.91, 0.92],
            ("ism", IMPLANT): [0.80, 0.81, 0.82],
            ("backdoor_target_distance", CONTROL): [1.2, 1.3, 1.1],
            ("backdoor_target_distance", IMPLANT): [0.7, 0.8, 0.6],
        }
    )
    lines = validity.paired(frame)
    implant = [line for line in lines if f": {IMPLANT} minus" in line]
    assert any("minus none" in line and "ism -0.100" in line for line in implant)
    against_control = [line for line in implant if f"minus {CONTROL}" in line]
    assert len(against_control) == 1
    assert "backdoor_target_distance -0.500" in against_control[0]
    assert "(below 0)" in against_control[0]
    assert not any("backdoor" in line and "minus none" in line for line in lines)


def test_countermeasure_chains_are_labelled_by_what_differs(validity):
    chains = [
        ("none", "[]"),
        ("jpeg", '[{"name":"jpeg","quality":75}]'),
        ("purify", '[{"name":"purify","steps":10,"t":100}]'),
        ("purify", '[{"name":"purify","steps":15,"t":150}]'),
    ]
    frame = pd.DataFrame(
        [
            {
                "defense": "none",
                "defense_params": "{}",
                "attack": "dreambooth",
                "attack_params": "{}",
                "countermeasure": name,
                "countermeasure_params": params,
            }
            for name, params in chains
        ]
    )
    assert list(validity.labelled(frame)["countermeasure"]) == [
        "none",
        "jpeg",
        "purify (steps=10, t=100)",
        "purify (steps=15, t=150)",
    ]


def test_the_worst_case_is_what_serves_the_attacker_per_metric(validity):
    def line(cm, fdfr, ism, link):
        out = {"attack": "dreambooth", "defense": "aspl", "countermeasure": cm}
        for metric, value in (("fdfr", fdfr), ("ism", ism), ("linkability", link)):
            out |= {metric: value, f"{metric}_lo": value - 0.01, f"{metric}_hi": value + 0.01}
        return out

    frame = pd.DataFrame(
        [line("none", 0.8, 0.91, 0.4), line("noise", 0.3, 0.93, 0.5), line("jpeg", 0.5, 0.94, 0.3)]
    )
    (text,) = validity.worst_case(frame)
    assert "aspl worst case over {jpeg, noise, none}" in text
    assert "fdfr 0.300 [0.290, 0.310] under noise" in text  # FDFR: lower serves the attacker
    assert "ism 0.940 [0.930, 0.950] under jpeg" in text
    assert "linkability 0.500 [0.490, 0.510] under noise" in text
    assert validity.worst_case(frame[frame["countermeasure"] == "none"]) == []

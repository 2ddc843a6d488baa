"""How boards name what they rank: a defense configuration by the parameters that set it
apart, a person by the dataset settings that set them apart, a set of countermeasure
chains by the attacker suite it is."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

NO_COUNTERMEASURE = "none"  # the chain of an attacker who uses none


def suite_named(chains: set[str]) -> str | None:
    """The attacker suite whose chains (by name) are exactly ``chains``, if any."""
    from antipers.attacks.suites import SUITES, chain_name

    for name, entries in SUITES.items():
        if chains and chains == {chain_name(e) for e in entries}:
            return name
    return None


def config_labels(experiments: pd.DataFrame, kind: str = "defense") -> dict[tuple[str, str], str]:
    """``aspl`` alone, or ``aspl (eps=8)`` where one defense (or attack: ``kind``) has
    several configurations on the board: only the parameters that differ are named."""
    labels = {}
    for name, group in experiments.groupby(kind):
        params = {p: json.loads(p) if p else {} for p in group[f"{kind}_params"].unique()}
        varying = sorted(
            {
                k
                for d in params.values()
                for k in d
                if len({json.dumps(x.get(k)) for x in params.values()}) > 1
            }
        )
        for raw, values in params.items():
            named = ", ".join(f"{k}={json.dumps(values.get(k))}" for k in varying)
            labels[(name, raw)] = f"{name} ({named})" if named else str(name)
    return labels


def people(rows: pd.DataFrame) -> pd.Series:
    """Each row's identity, told apart where one label names people of datasets with
    different settings (synthetic datasets of several seeds all have synth-0000):
    ``synth-0000 [seed=3]``. Otherwise the label as it is."""
    identity = rows["identity"].fillna("").astype(str)
    if "spec_json" not in rows or rows.empty:
        return identity
    per_spec = rows.drop_duplicates("spec_id").set_index("spec_id")["spec_json"]
    dataset = rows["spec_id"].map(per_spec.map(dataset_of))
    ambiguous = dataset.groupby(identity).transform("nunique") > 1
    if not ambiguous.any():
        return identity
    labels = {d: _settings(d) for d in dataset[ambiguous].unique()}
    return identity.where(~ambiguous, identity + " [" + dataset.map(labels) + "]")


def dataset_settings(dataset_json: str) -> tuple[str, str]:
    """(name, ``seed=3, ...``) of a dataset spec's JSON."""
    try:
        spec = json.loads(dataset_json)
    except ValueError:
        return dataset_json, ""
    if not isinstance(spec, dict):
        return str(spec), ""
    settings = ", ".join(f"{k}={v}" for k, v in sorted(spec.items()) if k != "name")
    return str(spec.get("name", "")), settings


def _settings(dataset_json: str) -> str:
    name, settings = dataset_settings(dataset_json)
    return settings or name


def dataset_of(spec_json: Any) -> str:
    """The dataset an experiment's spec names, with its parameters, as canonical JSON."""
    try:
        return json.dumps(json.loads(spec_json)["dataset"], sort_keys=True)
    except (TypeError, ValueError, KeyError):
        return ""

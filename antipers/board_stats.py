"""A board's numbers: per configuration each metric's mean over identities with a
percentile-bootstrap interval, and the worst case of the primary metric over the
attacker's countermeasures, by which the board is ranked (as RobustBench ranks by the
strongest known attack)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.stats

from antipers.board_labels import NO_COUNTERMEASURE
from antipers.boards import BoardRules


def mean_interval(values: np.ndarray, rules: BoardRules) -> tuple[float, float]:
    """Percentile bootstrap of the mean over identities (none below two identities)."""
    if len(values) < 2:
        return math.nan, math.nan
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    result = scipy.stats.bootstrap(
        (values,),
        np.mean,
        confidence_level=rules.confidence,
        n_resamples=rules.resamples,
        method="percentile",
        rng=np.random.default_rng(rules.seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def add_intervals(
    table: pd.DataFrame, plain: pd.Series, metrics: list[str], rules: BoardRules
) -> None:
    """``<metric>_mean``, ``_ci_low``, ``_ci_high`` per configuration (``table``'s index)
    of the per-identity values without a countermeasure (``plain``)."""
    for metric in metrics:
        means, lows, highs = [], [], []
        for config in table.index:
            try:
                values = plain.xs((config, metric), level=("config", "metric")).dropna().to_numpy()
            except KeyError:
                values = np.array([])
            low, high = mean_interval(values, rules)
            means.append(values.mean() if len(values) else math.nan)
            lows.append(low)
            highs.append(high)
        table[f"{metric}_mean"], table[f"{metric}_ci_low"], table[f"{metric}_ci_high"] = (
            means,
            lows,
            highs,
        )


FACELESS = " (no face)"  # a worst case whose generations had no face to measure


def faceless(per_identity: pd.Series, by_cm: pd.DataFrame) -> pd.Series:
    """Per row of ``by_cm`` (config, countermeasure): its primary metric has no value
    because FDFR is 1 for every person (no face in any generation)."""
    if "fdfr" not in per_identity.index.get_level_values("metric"):
        return pd.Series(False, index=by_cm.index)
    fdfr = per_identity.xs("fdfr", level="metric").groupby(["config", "countermeasure"]).min()
    keys = pd.MultiIndex.from_frame(by_cm[["config", "countermeasure"]])
    return pd.Series(
        by_cm["value"].isna().to_numpy() & (fdfr.reindex(keys).to_numpy() >= 1.0),
        index=by_cm.index,
    )


def rank_by_worst_case(
    table: pd.DataFrame, per_identity: pd.Series, primary: str, higher: bool | None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The table with ``worst_<primary>`` (and its countermeasure) and ``rank``, sorted;
    the primary metric's mean per configuration and countermeasure; and its value per
    configuration and identity without a countermeasure. A countermeasure under which
    no generation of any person has a face ranks as the best case (``FACELESS``)."""
    identities = pd.DataFrame(columns=["config", "identity", "value"])
    prim = per_identity.xs(primary, level="metric")
    by_cm = prim.groupby(["config", "countermeasure"]).mean().rename("value").reset_index()
    # where no generation of any person has a face, an identity metric has no value,
    # and the attacker has nothing to link: the best case, not a missing one
    best = math.inf if higher else -math.inf
    ranked = by_cm.assign(value=by_cm["value"].where(~faceless(per_identity, by_cm), best))
    worst = ranked.dropna(subset=["value"]).sort_values(
        "value", ascending=bool(higher), kind="stable"
    )
    worst = worst.drop_duplicates("config").set_index("config")
    order = worst["value"].reindex(table.index)
    table[f"worst_{primary}"] = order.where(order != best)
    under = worst["countermeasure"].where(
        worst["value"] != best, worst["countermeasure"] + FACELESS
    )
    table[f"worst_{primary}_countermeasure"] = under.reindex(table.index)
    table["rank"] = order.rank(ascending=not higher, method="min")
    table = table.sort_values("rank", na_position="last", kind="stable")
    if NO_COUNTERMEASURE in prim.index.get_level_values("countermeasure"):
        identities = (
            prim.xs(NO_COUNTERMEASURE, level="countermeasure").rename("value").reset_index()
        )
    return table, by_cm, identities

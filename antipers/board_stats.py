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


def rank_by_worst_case(
    table: pd.DataFrame, per_identity: pd.Series, primary: str, higher: bool | None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The table with ``worst_<primary>`` (and its countermeasure) and ``rank``, sorted;
    the primary metric's mean per configuration and countermeasure; and its value per
    configuration and identity without a countermeasure."""
    identities = pd.DataFrame(columns=["config", "identity", "value"])
    prim = per_identity.xs(primary, level="metric")
    by_cm = prim.groupby(["config", "countermeasure"]).mean().rename("value").reset_index()
    worst = by_cm.dropna(subset=["value"]).sort_values("value", ascending=bool(higher))
    worst = worst.drop_duplicates("config").set_index("config")
    table[f"worst_{primary}"] = worst["value"].reindex(table.index)
    table[f"worst_{primary}_countermeasure"] = worst["countermeasure"].reindex(table.index)
    order = table[f"worst_{primary}"]
    table["rank"] = order.rank(ascending=not higher, method="min")
    table = table.sort_values("rank", na_position="last", kind="stable")
    if NO_COUNTERMEASURE in prim.index.get_level_values("countermeasure"):
        identities = (
            prim.xs(NO_COUNTERMEASURE, level="countermeasure").rename("value").reset_index()
        )
    return table, by_cm, identities

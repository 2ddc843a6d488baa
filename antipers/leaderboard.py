"""Rows -> tables. For now the summary that ``antipers run`` and ``antipers demo``
print: each metric's aggregate, averaged over identities and seeds, per defense."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from antipers.results import AGGREGATE_INDEX, OK


def summary_table(
    rows: pd.DataFrame, by: Sequence[str] = ("defense", "countermeasure", "attack")
) -> pd.DataFrame:
    """One line per ``by`` group, one column per metric (``↑``/``↓``: the direction that
    is better for the defense), and ``n``: experiments averaged."""
    ok = rows[
        (rows["status"] == OK)
        & (rows["image_index"] == AGGREGATE_INDEX)
        & ~rows["metric"].str.contains(":", regex=False)
        & (rows["metric"] != "")
    ]
    if ok.empty:
        return pd.DataFrame(columns=[*by, "n"])
    keys = list(by)
    # a metric with no value anywhere (no face found) stays, as NaN
    table = ok.groupby([*keys, "metric"])["value"].mean().unstack("metric")
    higher = ok.dropna(subset=["higher_is_better"]).groupby("metric")["higher_is_better"].first()
    arrow = {m: "↑" if bool(h) else "↓" for m, h in higher.items()}
    table.columns = [f"{m} {arrow.get(m, '')}".strip() for m in table.columns]
    table["n"] = ok.groupby(keys)["spec_id"].nunique()
    return table.reset_index()


def missing_metrics(rows: pd.DataFrame) -> pd.DataFrame:
    """Metrics that gave no value (unavailable or failed), with how often and why:
    a table must never hide that a column is absent."""
    agg = rows[(rows["image_index"] == AGGREGATE_INDEX) & (rows["metric"] != "")]
    bad = agg[agg["status"] != OK]
    if bad.empty:
        return pd.DataFrame(columns=["metric", "status", "experiments", "reason"])
    return (
        bad.groupby(["metric", "status"])
        .agg(experiments=("spec_id", "nunique"), reason=("error", "first"))
        .reset_index()
    )

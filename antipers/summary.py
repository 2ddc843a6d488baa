"""Rows -> the summary that ``antipers run`` and ``antipers demo`` print: a table per
defense x countermeasure x attack, one sentence per defense, and what gave no value."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pandas as pd

from antipers.board_labels import NO_COUNTERMEASURE
from antipers.rows import AGGREGATE_INDEX, OK


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


MOSTLY_FACELESS = 0.5  # FDFR from which a sentence leads with the faces that went


def verdicts(rows: pd.DataFrame, baseline: str = "none") -> list[str]:
    """One computed sentence per defense: what it did to the attack's linkability and
    ISM against the undefended baseline, and what it cost (budget, PSNR). Where the
    defense took the face from most generations, the sentence leads with FDFR (and
    says linkability and ISM are of the faces left, or that none is left to link)."""
    table = summary_table(rows, by=("defense", "countermeasure", "attack"))
    if table.empty:
        return []
    table = table[table["countermeasure"] == NO_COUNTERMEASURE]
    column = {c.split(" ")[0]: c for c in table.columns}
    out = []
    for attack, group in table.groupby("attack"):
        by = group.set_index("defense")
        if baseline not in by.index:
            continue
        base = by.loc[baseline]
        for defense in by.index.drop(baseline):
            parts = []
            for metric in ("linkability", "ism"):
                if metric in column and pd.notna(by.loc[defense, column[metric]]):
                    before, after = base[column[metric]], by.loc[defense, column[metric]]
                    parts.append(_change(metric, before, after))
            fdfr = None
            if "fdfr" in column and pd.notna(by.loc[defense, column["fdfr"]]):
                before, after = base[column["fdfr"]], by.loc[defense, column["fdfr"]]
                fdfr = _change("fdfr", before, after) if after >= MOSTLY_FACELESS > before else None
            if not parts and fdfr:
                # identity metrics are undefined without faces: the attack made none
                parts = [f"{fdfr} (no face to link)"]
            elif parts and fdfr:
                # most generations have no face: what linkability and ISM say is of the rest
                parts = [f"{fdfr}, and on the faces left {' and '.join(parts)}"]
            if not parts:
                continue
            cost = []
            budget = _budget(rows, defense)
            if budget:
                cost.append(budget)
            if "psnr" in column and pd.notna(by.loc[defense, column["psnr"]]):
                cost.append(f"PSNR {by.loc[defense, column['psnr']]:.1f} dB")
            suffix = f" ({', '.join(cost)})" if cost else ""
            out.append(f"{defense} {' and '.join(parts)} against {attack}{suffix}")
    return out


def _change(metric: str, before: float, after: float) -> str:
    """ "lowered ism from 0.921 to 0.917": as many digits as tell the two apart (up to 4),
    so that no sentence says a number went down to itself."""
    if after == before:
        return f"left {metric} at {before:.2f}"
    digits = 2
    while digits < 4 and f"{before:.{digits}f}" == f"{after:.{digits}f}":
        digits += 1
    verb = "lowered" if after < before else "raised"
    return f"{verb} {metric} from {before:.{digits}f} to {after:.{digits}f}"


def _budget(rows: pd.DataFrame, defense: str) -> str:
    params = rows.loc[rows["defense"] == defense, "defense_params"].dropna()
    if params.empty:
        return ""
    eps = json.loads(params.iloc[0]).get("eps")
    return f"{eps:g}/255" if isinstance(eps, int | float) else ""


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

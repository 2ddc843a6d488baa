"""Rows -> tables: the summary that ``antipers run`` and ``antipers demo`` print, and
the boards that ``antipers report`` publishes (``antipers/report.py`` renders them).

A board holds one attack under one protocol, scored by one set of metric backends.
Per defense configuration: each metric's mean over identities (seeds averaged first)
with a percentile-bootstrap interval, the number of identities, and the worst case of
the primary metric over the attacker's countermeasures, by which the board is ranked
(as RobustBench ranks by the strongest known attack).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from antipers.boards import BoardRules, BoardsConfig
from antipers.errors import UserError
from antipers.metrics.base import UNAVAILABLE
from antipers.registry import METRICS
from antipers.results import AGGREGATE_INDEX, ERROR, OK


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


def verdicts(rows: pd.DataFrame, baseline: str = "none") -> list[str]:
    """One computed sentence per defense: what it did to the attack's linkability and
    ISM against the undefended baseline, and what it cost (budget, PSNR)."""
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


# --- boards: what `antipers report` publishes ----------------------------------------

BOARD_FIELDS = ("track", "dataset", "base_model", "attack", "attack_params", "protocol")
NO_COUNTERMEASURE = "none"
PROTECTED = "protected"


class ReportError(UserError, ValueError):
    """A store that yields no board; the message says what the store holds instead."""


@dataclass
class Board:
    """One leaderboard: defense configurations under one attack and protocol, scored by
    one set of metric backends (numbers from different backends are never averaged)."""

    key: dict[str, str]  # BOARD_FIELDS and "backends"
    rules: BoardRules
    primary: str | None  # the ranking metric (None: no candidate has values here)
    higher_is_better: bool | None
    metrics: list[str]  # table columns, primary first, visibility last
    visibility: list[str]
    table: pd.DataFrame  # ranked; one row per defense configuration
    by_countermeasure: pd.DataFrame  # configuration x countermeasure: primary mean
    identities: pd.DataFrame  # configuration x identity: primary value, no countermeasure
    directions: dict[str, bool | None] = field(default_factory=dict)  # better for the defense
    flags: list[str] = field(default_factory=list)  # shown on the board
    baseline: str = "missing"  # works | failed (the attack did not learn) | missing
    counts: dict[str, int] = field(default_factory=dict)
    problems: pd.DataFrame = field(default_factory=pd.DataFrame)  # metric, status, n, reason
    failed: pd.DataFrame = field(default_factory=pd.DataFrame)  # its failed experiments
    # spec_id, config, countermeasure, identity, seed of every experiment with values
    experiments: pd.DataFrame = field(default_factory=pd.DataFrame)
    backend_of: dict[str, str] = field(default_factory=dict)  # metric -> its backend

    @property
    def reliable(self) -> bool:
        return self.baseline != "failed"

    @property
    def title(self) -> str:
        k = self.key
        parts = [k["track"], k["dataset"], k["base_model"], k["attack"], k["protocol"]]
        measured_by = self.backend_of.get(self.primary) if self.primary else None
        if measured_by:  # boards that differ only by backend must not read alike
            parts.append(f"{self.primary} by {measured_by}")
        return " · ".join(parts)

    @property
    def countermeasures(self) -> list[str]:
        """The chains the worst case is taken over (``none`` first)."""
        chains = set(self.by_countermeasure.get("countermeasure", pd.Series(dtype=str)))
        return sorted(chains, key=lambda c: (c != "none", c))

    @property
    def suite(self) -> str | None:
        """The attacker suite whose chains (by name) are exactly this board's, if any."""
        return suite_named(set(self.countermeasures))

    @property
    def slug(self) -> str:
        return hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:10]


def suite_named(chains: set[str]) -> str | None:
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


def _measured_by(pairs: pd.DataFrame) -> str:
    """``backend: metric, metric; backend: ...`` of (backend, metric) pairs."""
    pairs = pairs[["backend", "metric"]].drop_duplicates()
    return "; ".join(
        f"{b or '?'}: {', '.join(sorted(ms['metric']))}" for b, ms in pairs.groupby("backend")
    )


def _backend_split(metric_rows: pd.DataFrame) -> pd.Series:
    """Per experiment, the backends of the campaign's metrics that more than one backend
    measured among its peers (same track, dataset, model, attack, protocol): what keeps
    different backends' numbers apart. A defense's own measures (``decoupled_ism`` under
    the embedder IDDM optimized against, a backdoor's) are not the campaign's metrics:
    they split nothing, so the undefended baseline shares the defenses' board."""
    pairs = metric_rows[["spec_id", *BOARD_FIELDS, "backend", "metric"]].drop_duplicates()
    campaign_metric = pairs["metric"].str.split(" (", regex=False).str[0].isin(METRICS.names())
    several = pairs.groupby([*BOARD_FIELDS, "metric"])["backend"].transform("nunique") > 1
    several &= campaign_metric
    ids = pairs["spec_id"].drop_duplicates()
    split = {spec_id: _measured_by(g) for spec_id, g in pairs[several].groupby("spec_id")}
    return pd.Series([split.get(i, "") for i in ids], index=ids.to_numpy(), dtype=object)


def _by_subject(measured: pd.DataFrame) -> pd.DataFrame:
    """Model-track rows about someone else than the protected person (an unprotected
    person, generic images) become their own columns, ``ism (unprotected)``, counted
    for the experiment's protected identity: utility, never averaged with privacy."""
    subject = measured["subject"].fillna(PROTECTED).replace("", PROTECTED)
    other = subject != PROTECTED
    if not other.any():
        return measured
    measured = measured.copy()
    measured.loc[other, "metric"] = measured.loc[other, "metric"] + " (" + subject[other] + ")"
    own = measured.loc[~other].groupby("spec_id")["identity"].first()
    measured["identity"] = measured["spec_id"].map(own).fillna(measured["identity"])
    return measured


def build_boards(rows: pd.DataFrame, config: BoardsConfig) -> tuple[list[Board], pd.DataFrame]:
    """The boards of a store's rows, and its failed experiments (spec_id, fields, error).
    Raises ReportError when no experiment has metric values."""
    rows = rows.copy()
    for column in (*BOARD_FIELDS, "defense", "defense_params", "countermeasure", "backend"):
        rows[column] = rows[column].fillna("").astype(str)
    rows["identity"] = _people(rows)
    agg = rows[rows["image_index"] == AGGREGATE_INDEX]
    # experiments that did not run: failed, or a component unavailable here (its reason)
    failed = agg[agg["status"].isin([ERROR, UNAVAILABLE]) & (agg["metric"] == "")].copy()
    skipped = failed["status"] == UNAVAILABLE
    failed.loc[skipped, "error"] = "unavailable: " + failed.loc[skipped, "error"].astype(str)
    failed = failed.drop_duplicates("spec_id")[["spec_id", *BOARD_FIELDS, "defense", "error"]]
    measured = agg[(agg["metric"] != "") & ~agg["metric"].str.contains(":", regex=False)]
    if measured.empty:
        if failed.empty:
            raise ReportError("the store holds no results yet; run a campaign first")
        raise ReportError(
            f"no experiment in the store finished: {len(failed)} failed "
            f"(first error: {failed['error'].iloc[0]})"
        )
    measured = _by_subject(measured)
    measured = measured.join(_backend_split(measured).rename("split"), on="spec_id")
    boards = []
    for values, group in measured.groupby([*BOARD_FIELDS, "split"], sort=True):
        key = dict(zip(BOARD_FIELDS, values[:-1], strict=True))
        key["backends"] = _measured_by(group)
        same = np.logical_and.reduce([failed[f] == key[f] for f in BOARD_FIELDS])
        board = _board(key, group, failed[same], config.rules_for(key))
        pairs = group[["backend", "metric"]].drop_duplicates().sort_values(["backend", "metric"])
        first = pairs.drop_duplicates("metric")  # where several, the first by name, as listed
        board.backend_of = {
            m: b or "?" for m, b in zip(first["metric"], first["backend"], strict=True)
        }
        boards.append(board)
    return boards, failed.reset_index(drop=True)


def _board(
    key: dict[str, str], rows: pd.DataFrame, failed: pd.DataFrame, rules: BoardRules
) -> Board:
    labels = config_labels(rows)
    rows = rows.assign(
        config=[
            labels[(d, p)] for d, p in zip(rows["defense"], rows["defense_params"], strict=True)
        ]
    )
    ok = rows[rows["status"] == OK]
    direction = {
        m: rules.higher_is_better(m, None if g.dropna().empty else bool(g.dropna().iloc[0]))
        for m, g in rows.groupby("metric")["higher_is_better"]
    }
    # one value per identity: seeds averaged first, so no identity weighs more than another
    per_identity = ok.groupby(["config", "countermeasure", "identity", "metric"])["value"].mean()
    have_values = set(per_identity.dropna().index.get_level_values("metric"))
    primary = next((m for m in rules.primary if m in have_values), None)
    visibility = [m for m in rules.visibility if m in direction]
    others = sorted(m for m in direction if m != primary and m not in visibility)
    metrics = [*([primary] if primary else []), *others, *visibility]

    configs = rows.drop_duplicates("config").set_index("config")[["defense", "defense_params"]]
    plain = (
        per_identity.xs(NO_COUNTERMEASURE, level="countermeasure", drop_level=True)
        if (NO_COUNTERMEASURE in per_identity.index.get_level_values("countermeasure"))
        else per_identity.iloc[:0].droplevel("countermeasure")
    )
    table = configs.copy()
    table["identities"] = (
        ok.groupby("config")["identity"].nunique().reindex(table.index).fillna(0).astype(int)
    )
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

    by_cm = pd.DataFrame(columns=["config", "countermeasure", "value"])
    identities = pd.DataFrame(columns=["config", "identity", "value"])
    higher = direction.get(primary) if primary else None
    if primary:
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
    else:
        table["rank"] = math.nan
    table = table.reset_index()
    table.insert(0, "rank", table.pop("rank").astype("Float64"))

    board = Board(
        key, rules, primary, higher, metrics, visibility, table, by_cm, identities, direction
    )
    backends = rows.groupby("metric")["backend"].first().to_dict()  # one per board
    _check_baseline(board, table, backends)
    _count(board, rows, failed)
    experiments = ok.drop_duplicates("spec_id")
    # a person is the identity within its dataset's settings: synthetic datasets of
    # different seeds reuse the labels synth-0000, ...
    datasets = experiments["spec_json"].map(_dataset_of)
    board.experiments = experiments.assign(person=datasets + "/" + experiments["identity"])[
        ["spec_id", "config", "countermeasure", "identity", "person", "seed"]
    ].reset_index(drop=True)
    return board


def _people(rows: pd.DataFrame) -> pd.Series:
    """Each row's identity, told apart where one label names people of datasets with
    different settings (synthetic datasets of several seeds all have synth-0000):
    ``synth-0000 [seed=3]``. Otherwise the label as it is."""
    identity = rows["identity"].fillna("").astype(str)
    if "spec_json" not in rows or rows.empty:
        return identity
    per_spec = rows.drop_duplicates("spec_id").set_index("spec_id")["spec_json"]
    dataset = rows["spec_id"].map(per_spec.map(_dataset_of))
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


def _dataset_of(spec_json: Any) -> str:
    """The dataset an experiment's spec names, with its parameters, as canonical JSON."""
    try:
        return json.dumps(json.loads(spec_json)["dataset"], sort_keys=True)
    except (TypeError, ValueError, KeyError):
        return ""


def _check_baseline(board: Board, table: pd.DataFrame, backends: dict[str, str]) -> None:
    """RobustBench's sanity check: if the undefended baseline shows that the attack did
    not learn the person, no defense on the board can be credited."""
    rules = board.rules
    baseline = table[table["defense"] == rules.baseline]
    if baseline.empty:
        board.baseline = "missing"
        board.flags.append(
            f"unchecked: no undefended baseline ({rules.baseline!r}) on this board, so "
            "nothing shows that the attack works"
        )
        return
    board.baseline = "works"
    by_backend = rules.attack_failed_by_backend.values()
    metrics = {*rules.attack_failed, *(m for bounds in by_backend for m in bounds)}
    for metric in sorted(metrics):
        column = f"{metric}_mean"
        if column not in baseline or baseline[column].isna().all():
            continue
        backend = backends.get(metric, "")
        bound = rules.failure_bound(metric, backend)
        if bound is None:
            continue
        value = float(baseline[column].mean())
        side, threshold = bound
        if (side == "below" and value < threshold) or (side == "above" and value > threshold):
            board.baseline = "failed"
            board.flags.append(
                f"unreliable: the undefended baseline's {metric.upper()} is {value:.3f} "
                f"({side} {threshold:g} for {backend or 'any backend'}), so the attack did "
                "not learn the person"
            )


def _count(board: Board, rows: pd.DataFrame, failed: pd.DataFrame) -> None:
    bad = rows[rows["status"] != OK]
    board.failed = failed.reset_index(drop=True)
    board.counts = {
        "experiments": int(rows["spec_id"].nunique()),
        "failed experiments": len(failed),
        "unavailable values": int((bad["status"] == UNAVAILABLE).sum()),
        "failed values": int((bad["status"] == ERROR).sum()),
    }
    board.problems = (
        bad.groupby(["metric", "status"])
        .agg(n=("spec_id", "nunique"), reason=("error", "first"))
        .reset_index()
    )
    if len(failed):
        board.flags.append(
            f"{len(failed)} experiment(s) under this attack and protocol failed or could "
            "not run (a component unavailable) before any metric, so with no backend "
            "recorded; see below"
        )

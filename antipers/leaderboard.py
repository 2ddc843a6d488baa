"""Rows -> the boards that ``antipers report`` publishes (``antipers/report.py`` renders
them; ``antipers/summary.py`` has the summary that ``run`` and ``demo`` print).

A board holds one attack under one protocol, scored by one set of metric backends.
Per defense configuration: each metric's mean over identities (seeds averaged first)
with a percentile-bootstrap interval, the number of identities, and the worst case of
the primary metric over the attacker's countermeasures, by which the board is ranked
(``antipers/board_stats.py``), with the checks of ``antipers/board_checks.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from antipers.board_checks import check_baseline, count_problems
from antipers.board_labels import NO_COUNTERMEASURE, config_labels, dataset_of, people, suite_named
from antipers.board_stats import add_intervals, rank_by_worst_case
from antipers.boards import BoardRules, BoardsConfig
from antipers.errors import UserError
from antipers.registry import METRICS
from antipers.rows import AGGREGATE_INDEX, ERROR, OK, PROTECTED, UNAVAILABLE

BOARD_FIELDS = ("track", "dataset", "base_model", "attack", "attack_params", "protocol")

# (metric, backend) pairs, by backend, then metric: which backend measured what
MeasuredBy = tuple[tuple[str, str], ...]


class ReportError(UserError, ValueError):
    """A store that yields no board; the message says what the store holds instead."""


@dataclass
class Board:
    """One leaderboard: defense configurations under one attack and protocol, scored by
    one set of metric backends (numbers from different backends are never averaged)."""

    key: dict[str, str]  # BOARD_FIELDS and "backends" (``measured_by`` as displayed)
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
    measured_by: MeasuredBy = ()

    @property
    def reliable(self) -> bool:
        return self.baseline != "failed"

    @property
    def backend_of(self) -> dict[str, str]:
        """metric -> its backend (where several, the first by name, as listed)."""
        first: dict[str, str] = {}
        for metric, backend in self.measured_by:
            first.setdefault(metric, backend or "?")
        return first

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


def measured_by(rows: pd.DataFrame) -> MeasuredBy:
    """The (metric, backend) pairs of ``rows``."""
    pairs = rows[["backend", "metric"]].drop_duplicates().sort_values(["backend", "metric"])
    return tuple(zip(pairs["metric"], pairs["backend"], strict=True))


def describe_backends(pairs: MeasuredBy) -> str:
    """``backend: metric, metric; backend: ...``, as boards show them."""
    metrics: dict[str, list[str]] = {}
    for metric, backend in pairs:
        metrics.setdefault(backend, []).append(metric)
    return "; ".join(f"{b or '?'}: {', '.join(ms)}" for b, ms in metrics.items())


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
    split = {spec_id: measured_by(g) for spec_id, g in pairs[several].groupby("spec_id")}
    return pd.Series([split.get(i, ()) for i in ids], index=ids.to_numpy(), dtype=object)


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
    rows["identity"] = people(rows)
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
    groups = measured.groupby([*BOARD_FIELDS, "split"], sort=False)
    # boards in the order of their fields, then of their backends as displayed
    ordered = sorted(groups, key=lambda kv: (*kv[0][:-1], describe_backends(kv[0][-1])))
    boards = []
    for values, group in ordered:
        key = dict(zip(BOARD_FIELDS, values[:-1], strict=True))
        pairs = measured_by(group)
        key["backends"] = describe_backends(pairs)
        same = np.logical_and.reduce([failed[f] == key[f] for f in BOARD_FIELDS])
        boards.append(_board(key, pairs, group, failed[same], config.rules_for(key)))
    return boards, failed.reset_index(drop=True)


def _board(
    key: dict[str, str],
    pairs: MeasuredBy,
    rows: pd.DataFrame,
    failed: pd.DataFrame,
    rules: BoardRules,
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
    add_intervals(table, plain, metrics, rules)

    by_cm = pd.DataFrame(columns=["config", "countermeasure", "value"])
    identities = pd.DataFrame(columns=["config", "identity", "value"])
    higher = direction.get(primary) if primary else None
    if primary:
        table, by_cm, identities = rank_by_worst_case(table, per_identity, primary, higher)
    else:
        table["rank"] = math.nan
    table = table.reset_index()
    table.insert(0, "rank", table.pop("rank").astype("Float64"))

    board = Board(
        key,
        rules,
        primary,
        higher,
        metrics,
        visibility,
        table,
        by_cm,
        identities,
        direction,
        measured_by=pairs,
    )
    backends = rows.groupby("metric")["backend"].first().to_dict()  # one per board
    check_baseline(board, table, backends)
    count_problems(board, rows, failed)
    experiments = ok.drop_duplicates("spec_id")
    # a person is the identity within its dataset's settings: synthetic datasets of
    # different seeds reuse the labels synth-0000, ...
    datasets = experiments["spec_json"].map(dataset_of)
    board.experiments = experiments.assign(person=datasets + "/" + experiments["identity"])[
        ["spec_id", "config", "countermeasure", "identity", "person", "seed"]
    ].reset_index(drop=True)
    return board

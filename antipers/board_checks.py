"""What a board must say about itself: whether the undefended baseline shows the attack
works (RobustBench's sanity check), and what failed or gave no value on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from antipers.rows import ERROR, OK, UNAVAILABLE

if TYPE_CHECKING:
    from antipers.leaderboard import Board


def check_baseline(board: Board, table: pd.DataFrame, backends: dict[str, str]) -> None:
    """If the undefended baseline shows that the attack did not learn the person, no
    defense on the board can be credited."""
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


def count_problems(board: Board, rows: pd.DataFrame, failed: pd.DataFrame) -> None:
    """The board's failed experiments, unavailable and failed values, and their reasons."""
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

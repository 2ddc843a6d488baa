"""``antipers report``: a store's boards as ``index.html`` (sortable tables, embedded
plots, galleries of the stored thumbnails under ``images/``), ``leaderboard.md``, and
the tables as CSV and Parquet. Templates live in ``antipers/reports/`` (linked from
``reports/``); the numbers come from ``antipers/leaderboard.py``. Files are written to a
temporary folder beside the output and moved into place, so a crash leaves the previous
report whole.
"""

from __future__ import annotations

import base64
import io
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from antipers import __version__
from antipers.boards import BoardsConfig, load_boards
from antipers.gallery import IMAGES, Gallery, board_galleries
from antipers.leaderboard import BOARD_FIELDS, Board, ReportError, build_boards
from antipers.results import ResultStore
from antipers.samples import AMPLIFY
from antipers.search import pareto_front

TEMPLATES = Path(__file__).parent / "reports"
DASH = "–"


@dataclass
class Report:
    out: Path
    boards: list[Board]
    failed: pd.DataFrame

    @property
    def index(self) -> Path:
        return self.out / "index.html"

    def summary(self) -> str:
        unreliable = sum(not b.reliable for b in self.boards)
        return (
            f"report: {self.index} ({len(self.boards)} board(s), {unreliable} unreliable, "
            f"{len(self.failed)} failed experiment(s));\n        {self.out / 'leaderboard.md'}, "
            "tables as leaderboard/countermeasures/identities .csv and .parquet"
        )


def _number(value: Any, digits: int = 3) -> str:
    if value is None or pd.isna(value):
        return DASH
    value = float(value)
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.{1 if abs(value) >= 100 else digits}f}"


def _sort_key(value: Any) -> str:
    """What the HTML table sorts by: a number, or empty (sorted last)."""
    if value is None or pd.isna(value):
        return ""
    if isinstance(value, int | float | np.number):
        return repr(float(value)) if not math.isinf(value) else ("1e308" if value > 0 else "-1e308")
    return str(value)


def _arrow(higher: bool | None) -> str:
    return "" if higher is None else (" ↑" if higher else " ↓")


def board_view(board: Board) -> dict[str, Any]:
    """The board as header and cells (text, sort value), shared by HTML and Markdown."""
    direction = board.directions
    headers = ["rank", "defense", "identities"]
    if board.primary:
        headers.append(f"worst {board.primary}{_arrow(board.higher_is_better)}")
        headers.append("worst under")
    headers += [f"{m}{_arrow(direction.get(m))}" for m in board.metrics]
    rows = []
    for _, r in board.table.iterrows():
        cells = [
            (_number(r["rank"], 0), _sort_key(r["rank"])),
            (r["config"], r["config"]),
            (str(r["identities"]), _sort_key(r["identities"])),
        ]
        if board.primary:
            worst = r.get(f"worst_{board.primary}")
            cells.append((_number(worst), _sort_key(worst)))
            under = r.get(f"worst_{board.primary}_countermeasure")
            cells.append((under if isinstance(under, str) else DASH, under or ""))
        for m in board.metrics:
            mean, low, high = r[f"{m}_mean"], r[f"{m}_ci_low"], r[f"{m}_ci_high"]
            text = _number(mean)
            if not pd.isna(low) and not math.isinf(mean):
                text += f" [{_number(low)}, {_number(high)}]"
            cells.append((text, _sort_key(mean)))
        rows.append(cells)
    return {"headers": headers, "rows": rows}


# --- plots ------------------------------------------------------------------------


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def privacy_plot(board: Board) -> str | None:
    """Privacy (the primary metric) against the first visibility metric with finite
    values, with intervals and the Pareto front; None when the board has neither."""
    from matplotlib.figure import Figure

    if not board.primary:
        return None
    t = board.table
    y = t[f"{board.primary}_mean"].to_numpy(float)
    for metric in board.visibility:
        x = t[f"{metric}_mean"].to_numpy(float)
        shown = np.isfinite(x) & np.isfinite(y)
        if shown.sum() >= 1:
            break
    else:
        return None
    directions = board.directions
    x_up = 1 if directions.get(metric, True) is not False else -1
    y_up = 1 if board.higher_is_better is not False else -1
    idx = np.flatnonzero(shown)
    front = [idx[i] for i in pareto_front([(x_up * x[i], y_up * y[i]) for i in idx])]
    fig = Figure(figsize=(5.0, 3.6))
    ax = fig.subplots()
    low = t[f"{board.primary}_ci_low"].to_numpy(float)
    high = t[f"{board.primary}_ci_high"].to_numpy(float)
    err = np.nan_to_num(np.vstack([y - low, high - y])[:, idx], nan=0.0)
    ax.errorbar(x[idx], y[idx], yerr=err, fmt="o", color="#2b6cb0", ecolor="#90cdf4", capsize=3)
    for i in idx:
        ax.annotate(
            t["config"].iloc[i], (x[i], y[i]), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
    order = sorted(front, key=lambda i: x[i])
    ax.plot(x[order], y[order], "--", color="#c53030", label="Pareto front")
    unchanged = t.index[~np.isfinite(x) & np.isfinite(y)]
    for i in unchanged:  # the undefended baseline: photos unchanged, PSNR infinite
        ax.axhline(
            y[i], color="#718096", lw=1, ls=":", label=f"{t['config'].iloc[i]} (unchanged photos)"
        )
    ax.set_xlabel(f"{metric}{_arrow(directions.get(metric))} (visibility of the protection)")
    ax.set_ylabel(f"{board.primary}{_arrow(board.higher_is_better)} (privacy)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


def spread_plot(board: Board) -> str | None:
    """Each identity's primary value per configuration, in rank order: how much of a
    mean is one identity."""
    from matplotlib.figure import Figure

    data = board.identities.dropna(subset=["value"])
    if data.empty:
        return None
    configs = [c for c in board.table["config"] if c in set(data["config"])]
    fig = Figure(figsize=(5.0, 1.2 + 0.4 * len(configs)))
    ax = fig.subplots()
    rng = np.random.default_rng(0)  # fixed jitter: the same store draws the same plot
    for row, config in enumerate(configs):
        values = data.loc[data["config"] == config, "value"].to_numpy(float)
        ax.scatter(
            values, row + rng.uniform(-0.15, 0.15, len(values)), s=14, color="#2b6cb0", alpha=0.7
        )
        ax.plot([values.mean()] * 2, [row - 0.3, row + 0.3], color="#c53030", lw=2)
    ax.set_yticks(range(len(configs)), configs, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{board.primary}{_arrow(board.higher_is_better)} per identity (bar: mean)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


# --- outputs ----------------------------------------------------------------------


def _key_frame(board: Board, frame: pd.DataFrame) -> pd.DataFrame:
    keys = pd.DataFrame({f: [board.key[f]] * len(frame) for f in (*BOARD_FIELDS, "backends")})
    keys.insert(0, "board", board.slug)
    keys["primary"] = board.primary
    keys["reliable"] = board.reliable
    keys["baseline"] = board.baseline
    return pd.concat([keys, frame.reset_index(drop=True)], axis=1)


def tables(boards: list[Board]) -> dict[str, pd.DataFrame]:
    """The published tables: one row per board and configuration; the primary metric
    per countermeasure; per identity."""
    return {
        "leaderboard": pd.concat([_key_frame(b, b.table) for b in boards], ignore_index=True),
        "countermeasures": pd.concat(
            [_key_frame(b, b.by_countermeasure) for b in boards], ignore_index=True
        ),
        "identities": pd.concat([_key_frame(b, b.identities) for b in boards], ignore_index=True),
    }


def _environment(html: bool) -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=html,  # HTML escapes every value; Markdown takes them as they are
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )


def render(
    boards: list[Board],
    failed: pd.DataFrame,
    store: str,
    galleries: dict[str, list[Gallery]] | None = None,
) -> dict[str, str]:
    galleries = galleries or {}
    context = {
        "store": store,
        "amplify": AMPLIFY,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
        "boards": [
            {
                "board": b,
                "view": board_view(b),
                "privacy_plot": privacy_plot(b),
                "spread_plot": spread_plot(b),
                "problems": b.problems.to_dict("records"),
                "failed": b.failed.to_dict("records"),
                "galleries": galleries.get(b.slug, []),
                "gallery_configs": {r.config for g in galleries.get(b.slug, []) for r in g.rows},
            }
            for b in boards
        ],
        "failed": failed.to_dict("records"),
    }
    return {
        "index.html": _environment(html=True).get_template("index.html.j2").render(context),
        "leaderboard.md": _environment(html=False)
        .get_template("leaderboard.md.j2")
        .render(context),
    }


def write_report(store_uri: str, out: str | Path, boards_file: str | Path | None = None) -> Report:
    """Build every board from the store and write the report folder."""
    config: BoardsConfig = load_boards(boards_file)
    if "://" not in store_uri and not Path(store_uri).expanduser().is_dir():
        raise ReportError(f"{store_uri}: no such store folder")
    store = ResultStore(store_uri)
    rows = store.load()
    try:
        boards, failed = build_boards(rows, config)
    except ReportError as exc:
        raise ReportError(f"{store_uri}: {exc}") from None
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with_images = store.image_ids()
        galleries = {b.slug: board_galleries(b, store, staging, with_images) for b in boards}
        for name, text in render(boards, failed, store_uri, galleries).items():
            (staging / name).write_text(text, encoding="utf-8")
        for name, frame in tables(boards).items():
            frame.to_csv(staging / f"{name}.csv", index=False)
            frame.to_parquet(staging / f"{name}.parquet", index=False)
        out.mkdir(exist_ok=True)
        written = list(staging.iterdir())
        stale = out / IMAGES
        if stale.is_dir() and not (staging / IMAGES).is_dir():  # no gallery any more
            os.replace(stale, staging / f".old-{IMAGES}")
        for path in written:
            target = out / path.name
            if path.is_dir() and target.is_dir():  # a folder is not replaced by a rename
                os.replace(target, staging / f".old-{path.name}")
            os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Report(out, boards, failed)

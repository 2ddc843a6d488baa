"""The report folder: files, tables equal to the boards, nothing half-written, the CLI,
and index.html in a real headless Chromium (console, screenshot, sorting)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from antipers import report as report_module
from antipers.cli import main
from antipers.report import write_report
from tests.test_leaderboard import build_store, experiment

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def two_boards(tmp_path_factory):
    """A store with two boards (two face backends) and one failed experiment."""
    root = tmp_path_factory.mktemp("report-store")
    build_store(root, identities=4, seeds=(0,))
    crash = experiment("simac", {"eps": 8}, "id-7", "none", 0, {}, status="error", error="boom")
    build_store(root, backend="insightface-buffalo_l", identities=3, seeds=(0,), extra=[crash])
    return str(root)


@pytest.fixture(scope="module")
def written(two_boards, tmp_path_factory):
    return write_report(two_boards, tmp_path_factory.mktemp("out") / "report")


def test_report_files_and_tables_match_the_boards(written):
    names = {p.name for p in written.out.iterdir()}
    for stem in ("leaderboard", "countermeasures", "identities"):
        assert {f"{stem}.csv", f"{stem}.parquet"} <= names
    assert {"index.html", "leaderboard.md"} <= names
    assert len(written.boards) == 2 and len(written.failed) == 1
    table = pd.read_parquet(written.out / "leaderboard.parquet")
    csv = pd.read_csv(written.out / "leaderboard.csv")
    assert len(table) == len(csv) == sum(len(b.table) for b in written.boards)
    for board in written.boards:
        mine = table[table["board"] == board.slug].reset_index(drop=True)
        assert np.allclose(mine["ism_mean"], board.table["ism_mean"])
        assert list(mine["config"]) == list(board.table["config"])
    markdown = (written.out / "leaderboard.md").read_text()
    html = (written.out / "index.html").read_text()
    for board in written.boards:
        assert board.title in markdown and board.slug in html
        assert f"worst case over {', '.join(board.countermeasures)}" in html
    assert "boom" in markdown and "boom" in html
    assert 'src="http' not in html and 'href="http' not in html  # self-contained


def test_a_crash_while_writing_leaves_the_previous_report_whole(two_boards, tmp_path, monkeypatch):
    out = tmp_path / "report"
    write_report(two_boards, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(boards):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module, "tables", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(two_boards, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no staging folder left


def test_cli_report_and_its_clear_errors(two_boards, tmp_path, capsys):
    assert main(["report", "--store", two_boards, "--out", str(tmp_path / "r")]) == 0
    assert "2 board(s)" in capsys.readouterr().out
    assert main(["report", "--store", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no such store folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", "--store", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no results yet" in err and "Traceback" not in err
    bad = tmp_path / "boards.yaml"
    bad.write_text("defaults: {primary: []}")
    assert (
        main(["report", "--store", two_boards, "--out", str(tmp_path), "--boards", str(bad)]) == 2
    )
    assert f"{bad}: defaults.primary" in capsys.readouterr().err


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def test_index_html_in_headless_chromium(written, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None
    )
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(written.index.as_uri())
    assert problems == []

    table = page.locator("table.sortable").first
    assert table.is_visible()
    assert page.locator("img[src^='data:image/png;base64,']").count() >= 2
    shot = tmp_path / "table.png"
    table.screenshot(path=str(shot))
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), dtype=float)
    assert pixels.shape[0] > 60 and pixels.std() > 10  # rows of text, not a blank box
    shutil.copy(shot, written.out / "table-screenshot.png")  # for a person to look at

    def column(index: int) -> list[str]:
        return table.locator(f"tbody tr td:nth-child({index})").all_inner_texts()

    headers = table.locator("thead th").all_inner_texts()
    defense = headers.index("defense") + 1
    psnr = next(i for i, h in enumerate(headers) if h.startswith("psnr")) + 1
    ranked = column(defense)
    table.locator(f"thead th:nth-child({psnr})").click()
    values = [float(v.split(" ")[0].replace("∞", "inf")) for v in column(psnr)]
    assert values == sorted(values)
    table.locator(f"thead th:nth-child({psnr})").click()
    values = [float(v.split(" ")[0].replace("∞", "inf")) for v in column(psnr)]
    assert values == sorted(values, reverse=True)
    assert column(defense) != ranked and sorted(column(defense)) == sorted(ranked)
    table.locator("thead th:nth-child(1)").click()
    assert column(defense) == ranked  # back to rank order
    assert problems == []


def test_report_path_is_a_folder_of_the_callers_choosing(two_boards, tmp_path):
    out = tmp_path / "nested" / "deeper" / "report"
    result = write_report(two_boards, out)
    assert result.index == out / "index.html" and Path(result.index).is_file()

"""The report folder: files, tables equal to the boards, nothing half-written, the CLI,
and index.html in a real headless Chromium (console, screenshot, sorting)."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from antipers import report as report_module
from antipers.cli import main
from antipers.report import write_report
from antipers.results import ResultStore
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


def open_page(browser, index: Path):
    """The page, and every console error or warning, page error and failed request."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None
    )
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(index.as_uri())
    return page, problems


def test_index_html_in_headless_chromium(written, browser, tmp_path):
    page, problems = open_page(browser, written.index)
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


def with_thumbnails(store: ResultStore, rows: pd.DataFrame) -> None:
    """Rewrite each experiment with thumbnails: each person a flat colour, each
    defense's perturbation a pattern of its own, the generations noise."""
    from antipers.samples import thumbnails

    rng = torch.Generator().manual_seed(0)
    for _, group in rows.groupby("spec_id"):
        first = group.iloc[0]
        person = int(first["identity"].split("-")[1])
        clean = torch.full((2, 3, 64, 64), 0.25 + 0.2 * person)
        strength = 0.0 if first["defense"] == "none" else 8 / 255
        pattern = torch.sign(torch.randn(1, 3, 64, 64, generator=rng)) * strength
        samples = {
            "clean": thumbnails(clean, "clean"),
            "protected": thumbnails((clean + pattern).clamp(0, 1), "protected"),
            "generated": thumbnails(torch.rand(4, 3, 64, 64, generator=rng), "generated"),
        }
        store.write(group.to_dict("records"), images=samples)


@pytest.fixture(scope="module")
def gallery_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery-store")
    store = build_store(root, identities=3, seeds=(0,))
    with_thumbnails(store, store.load())
    return write_report(str(root), tmp_path_factory.mktemp("gallery-out") / "report")


def test_people_of_two_datasets_with_the_same_labels_are_told_apart(tmp_path):
    """Synthetic datasets of different seeds both name their people synth-0000, ...;
    a rerun with other settings adds a second experiment under the same labels."""
    from antipers.gallery import chosen_people

    root = tmp_path / "store"
    store = build_store(root, identities=2, seeds=(0,))
    rows = store.load()
    for seed, run in ((0, "a"), (1, "a"), (0, "b")):  # (0, "b"): a rerun, other settings
        copy = rows.copy()
        copy["spec_json"] = json.dumps({"dataset": {"name": "synthetic", "seed": seed}})
        copy["spec_id"] = copy["spec_id"] + f"{run}{seed}"
        with_thumbnails(store, copy)
    report = write_report(str(root), tmp_path / "report")
    board = report.boards[0]
    people = chosen_people(board, store.image_ids())
    assert len(people) == 2 and len({person for person, _ in people}) == 2
    html = report.index.read_text()
    assert html.count('class="who"') == 2
    assert "identity <code>id-0 [seed=0]</code> of synthetic (seed=0)" in html
    assert "identity <code>id-1 [seed=0]</code> of synthetic (seed=0)" in html
    # one gallery row per configuration (4), though three experiments share each key
    assert html.count("<tr data-config=") == 4 + 2 * 4  # the table's rows, two galleries


def test_a_report_without_thumbnails_leaves_no_stale_gallery(tmp_path):
    store = build_store(tmp_path / "store", identities=2, seeds=(0,))
    with_thumbnails(store, store.load())
    out = tmp_path / "report"
    write_report(str(tmp_path / "store"), out)
    assert any((out / "images").iterdir())
    write_report(str(tmp_path / "store"), out)  # again: the folder is replaced whole
    bare = build_store(tmp_path / "bare", identities=2, seeds=(0,))
    assert bare.image_ids() == set()
    write_report(str(tmp_path / "bare"), out)
    assert (
        not (out / "images").exists() and 'class="gallery"' not in (out / "index.html").read_text()
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_galleries_are_files_beside_the_page_for_chosen_people(gallery_report):
    from antipers.gallery import chosen_people

    out = gallery_report.out
    html = (out / "index.html").read_text()
    shown = sorted(p.name for p in (out / "images").iterdir())
    assert shown and all(f'src="images/{name}"' in html for name in shown)
    assert len(html) < 200_000  # thumbnails are files, not inlined
    board = gallery_report.boards[0]
    people = chosen_people(board, set(board.experiments["spec_id"]))
    assert people == [("/id-0", 0), ("/id-1", 0)]  # most configurations, then name (no dataset)
    for config in board.table["config"]:
        assert f'data-config="{config}"' in html
    # the perturbation of a defense is mid-gray nowhere near zero; of `none`, exactly gray
    none_id = board.experiments.query("config == 'none' and countermeasure == 'none'")
    gray = Image.open(out / "images" / f"{none_id['spec_id'].iloc[0]}-perturbation-0.png")
    assert set(np.asarray(gray).ravel()) == {128}


def test_gallery_in_headless_chromium_loads_and_follows_the_table(
    gallery_report, browser, tmp_path
):
    page, problems = open_page(browser, gallery_report.index)
    gallery = page.locator(".gallery").first
    gallery.scroll_into_view_if_needed()
    images = gallery.locator("img")
    assert images.count() >= 10
    for i in range(images.count()):  # lazy: each loads once it is on screen
        images.nth(i).scroll_into_view_if_needed()
    page.wait_for_function(
        "Array.from(document.querySelectorAll('.gallery')[0].querySelectorAll('img'))"
        ".every(img => img.complete && img.naturalWidth > 0)",
        timeout=10_000,
    )
    shot = tmp_path / "gallery.png"
    gallery.screenshot(path=str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.shape[0] > 150 and pixels.std() > 20  # photos and noise, not a blank box
    shutil.copy(shot, gallery_report.out / "gallery-screenshot.png")

    rows = gallery.locator("tbody tr")
    visible = [r for r in rows.all() if r.is_visible()]
    assert len(visible) == rows.count()
    config = "simac"
    page.locator(f"table.sortable tbody tr[data-config='{config}']").first.click()
    shown = [r.get_attribute("data-config") for r in rows.all() if r.is_visible()]
    assert shown and set(shown) == {config}
    gallery.locator("button.show-all").click()
    assert all(r.is_visible() for r in rows.all())
    assert problems == []


def test_a_model_track_gallery_shows_generations_not_photos(tmp_path):
    """The model track's defense is in the weights: its 'protected' photos are the
    clean ones, and a gray perturbation would read as no protection."""
    store = build_store(tmp_path / "store", identities=2, seeds=(0,))
    rows = store.load()
    rows["track"] = "model"
    with_thumbnails(store, rows)
    report = write_report(str(tmp_path / "store"), tmp_path / "report")
    html = report.index.read_text()
    names = {p.name.split("-", 1)[1] for p in (report.out / "images").iterdir()}
    assert names and not any(n.startswith(("protected", "perturbation")) for n in names)
    assert "the defense is not in the photos" in html and "perturbation ×" not in html


def test_boards_that_differ_by_backend_say_which_measured_the_ranking(written):
    titles = sorted(board.title for board in written.boards)
    assert titles[0].endswith("ism by insightface-buffalo_l")
    assert titles[1].endswith("ism by offline") and len(set(titles)) == 2
    assert {b.backend_of["psnr"] for b in written.boards} == {"antipers"}

"""`antipers demo`: the embedded campaign, and the whole run (slow)."""

from __future__ import annotations

import pandas as pd
import pytest

from antipers.campaign import load_campaign
from antipers.registry import METRICS
from antipers.summary import missing_metrics, summary_table
from tests.conftest import REPO


def demo_path():
    from antipers.cluster.commands import demo_campaign_path

    return demo_campaign_path()


def test_demo_campaign_is_embedded_and_small():
    campaign = load_campaign(demo_path())
    assert (REPO / "campaigns" / "demo.yaml").resolve() == demo_path().resolve()
    specs = campaign.specs
    assert {s.base_model.name for s in specs} == {"mini-faces"}
    assert {s.attack.name for s in specs} == {"dreambooth"}
    assert {"none", "aspl", "cap-aspl"} <= {s.defense.name for s in specs}
    assert 2 <= len({s.identity for s in specs}) <= 3
    offline = {"fdfr", "ism", "linkability", "brisque", "linf", "psnr", "ssim"}
    assert {m.name for s in specs for m in s.metrics} <= offline & set(METRICS.names())


def test_summary_table_averages_aggregates_and_keeps_empty_metrics():
    def row(sid, defense, metric, value, index=-1, status="ok", hib=True):
        return {
            "spec_id": sid,
            "defense": defense,
            "countermeasure": "none",
            "attack": "lora",
            "metric": metric,
            "value": value,
            "image_index": index,
            "status": status,
            "higher_is_better": hib,
            "error": None if status == "ok" else "no weights",
        }

    rows = pd.DataFrame(
        [
            row("a", "none", "psnr", 40.0),
            row("a", "none", "psnr", 99.0, index=0),  # per-image rows are not averaged in
            row("b", "none", "psnr", 30.0),
            row("a", "none", "ism", float("nan"), hib=False),
            row("a", "none", "ism:references_without_face", 1.0),
            row("c", "aspl", "psnr", 20.0),
            row("c", "aspl", "clip-i", float("nan"), status="unavailable"),
        ]
    )
    table = summary_table(rows).set_index("defense")
    assert table.loc["none", "psnr ↑"] == 35.0 and table.loc["aspl", "psnr ↑"] == 20.0
    assert "ism ↓" in table.columns and pd.isna(table.loc["none", "ism ↓"])
    assert table.loc["none", "n"] == 2 and table.loc["aspl", "n"] == 1
    assert not any(c.startswith("ism:") or c.startswith("clip-i") for c in table.columns)
    missing = missing_metrics(rows)
    assert missing[["metric", "status", "experiments"]].values.tolist() == [
        ["clip-i", "unavailable", 1]
    ]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    import ray

    from antipers.cli import main
    from antipers.results import ResultStore

    if ray.is_initialized():
        ray.shutdown()
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "no substitute for" in printed.out
    campaign = load_campaign(demo_path())
    store = ResultStore(str(out))
    assert store.finished_ids() == set(campaign.spec_ids)
    for defense in ("none", "aspl", "cap-aspl"):
        assert f"\n{defense:>8} " in printed.out  # its line in the summary table
    # it ends with the leaderboard report, whose path it prints
    index = out / "report" / "index.html"
    assert f"report: {index}" in printed.out and index.is_file()
    assert "unreliable" not in index.read_text()  # mini-faces' attack learns the person
    assert "aspl raised fdfr from" in printed.out  # no face left in its generations
    # a second run finds everything stored and runs nothing
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    assert f"{len(campaign.specs)} already in" in capsys.readouterr().err


def test_reduced_demo_learns_the_person_and_aspl_protects(tmp_path, capsys):
    """The demo's campaign cut to two people and two defenses, through `antipers run`
    on Ray and `antipers report`: the board's baseline check passes (the attack learned
    the person), and at the demo's 16/255 ASPL leaves the attacker's generations with
    fewer faces and ranks above no defense (no face at all is the best case)."""
    import ray
    import yaml

    from antipers.boards import load_boards
    from antipers.cli import main
    from antipers.leaderboard import build_boards
    from antipers.results import ResultStore

    campaign = yaml.safe_load(demo_path().read_text())
    campaign["datasets"][0]["identities"] = {"first": 2}
    campaign["defenses"] = campaign["defenses"][:2]
    assert [d if isinstance(d, str) else d["name"] for d in campaign["defenses"]] == [
        "none",
        "aspl",
    ]
    path = tmp_path / "reduced.yaml"
    path.write_text(yaml.safe_dump(campaign))
    if ray.is_initialized():
        ray.shutdown()
    store = tmp_path / "store"
    assert main(["run", str(path), "--store", str(store), "--no-progress"]) == 0
    (board,), _ = build_boards(ResultStore(str(store)).load(), load_boards())
    assert board.baseline == "works" and board.reliable, board.flags
    table = board.table.set_index("defense")
    assert table.loc["aspl", "fdfr_mean"] > table.loc["none", "fdfr_mean"]
    assert table.loc["aspl", "rank"] < table.loc["none", "rank"]


def test_verdicts_say_what_each_defense_did_with_its_cost():
    from antipers.summary import verdicts

    def row(defense, metric, value, hib, eps=None):
        params = "{}" if eps is None else f'{{"eps": {eps}}}'
        return {
            "spec_id": defense,
            "defense": defense,
            "defense_params": params,
            "countermeasure": "none",
            "attack": "dreambooth",
            "metric": metric,
            "value": value,
            "image_index": -1,
            "status": "ok",
            "higher_is_better": hib,
            "error": None,
        }

    rows = pd.DataFrame(
        [
            row("none", "linkability", 0.9, False),
            row("none", "ism", 0.95, False),
            row("aspl", "linkability", 0.2, False, eps=8),
            row("aspl", "ism", 0.90, False, eps=8),
            row("aspl", "psnr", 31.44, True, eps=8),
            row("weak", "linkability", 0.95, False, eps=2),
            row("weak", "ism", 0.9487, False, eps=2),
            row("same", "linkability", 0.9, False, eps=4),
            row("none", "fdfr", 0.25, True),
            row("faceless", "fdfr", 1.0, True, eps=16),
            row("faceless", "linkability", float("nan"), False, eps=16),
            row("mostly", "fdfr", 0.94, True, eps=16),
            row("mostly", "linkability", 1.0, False, eps=16),
            row("aspl", "fdfr", 0.3, True, eps=8),
        ]
    )
    lines = verdicts(rows)
    assert (
        "aspl lowered linkability from 0.90 to 0.20 and lowered ism from 0.95 to 0.90 "
        "against dreambooth (8/255, PSNR 31.4 dB)" in lines
    )
    assert (
        "weak raised linkability from 0.90 to 0.95 and lowered ism from 0.950 to 0.949 "
        "against dreambooth (2/255)" in lines
    )  # digits enough to tell the two apart
    assert "same left linkability at 0.90 against dreambooth (4/255)" in lines
    # no face in any generation: nothing to link, and the sentence says why
    assert (
        "faceless raised fdfr from 0.25 to 1.00 (no face to link) against dreambooth (16/255)"
        in lines
    )
    # most generations faceless: it leads with FDFR, and says whose linkability is left
    assert (
        "mostly raised fdfr from 0.25 to 0.94, and on the faces left raised linkability "
        "from 0.90 to 1.00 against dreambooth (16/255)" in lines
    )
    assert verdicts(rows[rows["defense"] != "none"]) == []  # no baseline, no claim

"""Boards from a store the test builds with known rows: every number checked against
pandas, intervals, ranking, worst case, honesty flags, bad stores and boards files."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from antipers.boards import BoardRules, BoardsConfig, load_boards
from antipers.leaderboard import ReportError, build_boards
from antipers.registry import SpecError
from antipers.results import ResultStore
from antipers.rows import SCHEMA_VERSION

DIRECTION = {"ism": False, "fdfr": True, "psnr": True, "linkability": False}
CONFIGS = [("none", {}), ("aspl", {"eps": 8}), ("aspl", {"eps": 4}), ("simac", {"eps": 8})]
COUNTERMEASURES = ("none", "jpeg", "blur")


def experiment(
    defense,
    params,
    identity,
    countermeasure,
    seed,
    values,
    *,
    backend="offline",
    attack="lora",
    status=None,
    error="",
):
    """One experiment's aggregate rows (and one per-image row that boards must ignore)."""
    base = {
        "suite": "t",
        "protocol": "adb-v1",
        "track": "image",
        "dataset": "synthetic",
        "identity": identity,
        "base_model": "tiny",
        "defense": defense,
        "defense_params": json.dumps(params, sort_keys=True),
        "countermeasure": countermeasure,
        "countermeasure_params": "{}",
        "attack": attack,
        "attack_params": "{}",
        "seed": seed,
        "subject": "protected",
        "started_at": datetime(2026, 1, 1, tzinfo=UTC),
        "duration_s": 1.0,
        "worker": "w",
        "antipers_version": "t",
        "schema_version": SCHEMA_VERSION,
        "spec_json": "{}",
    }
    key = json.dumps([defense, params, identity, countermeasure, seed, backend, attack])
    base["spec_id"] = hashlib.sha1(key.encode()).hexdigest()[:16]
    if status == "error":
        return [
            {
                **base,
                "metric": "",
                "value": None,
                "higher_is_better": None,
                "unit": "",
                "backend": "",
                "image_index": -1,
                "status": "error",
                "error": error,
            }
        ]
    rows = []
    for metric, value in values.items():
        ok = value is not None
        common = {
            "metric": metric,
            "higher_is_better": DIRECTION[metric],
            "unit": "",
            "backend": "antipers" if metric == "psnr" else backend,
        }
        rows.append(
            {
                **base,
                **common,
                "value": value,
                "image_index": -1,
                "status": "ok" if ok else "unavailable",
                "error": "" if ok else "no ArcFace weights configured",
            }
        )
        rows.append(
            {**base, **common, "value": 123.0, "image_index": 0, "status": "ok", "error": ""}
        )
    return rows


def build_store(path, *, baseline_ism=0.6, backend="offline", identities=5, seeds=(0, 1), extra=()):
    rng = np.random.default_rng(7)
    store = ResultStore(str(path))
    for c, (defense, params) in enumerate(CONFIGS):
        for i in range(identities):
            for cm_index, cm in enumerate(COUNTERMEASURES):
                # identity 0 has one seed more: a mean over rows would weigh it more
                for seed in (*seeds, 99) if i == 0 and len(seeds) > 1 else seeds:
                    ism = baseline_ism if defense == "none" else 0.2 + 0.1 * c
                    ism += 0.05 * cm_index + rng.normal(0, 0.03)
                    values = {
                        "ism": float(ism),
                        "fdfr": float(
                            np.clip(0.1 + 0.1 * c - 0.02 * cm_index + rng.normal(0, 0.02), 0, 1)
                        ),
                        "psnr": float("inf")
                        if defense == "none"
                        else float(36 + c + rng.normal(0, 0.5)),
                        "linkability": None if i == 0 else float(rng.uniform(0, 1)),
                    }
                    store.write(
                        experiment(defense, params, f"id-{i}", cm, seed, values, backend=backend)
                    )
    for rows in extra:
        store.write(rows)
    return store


def config_label(defense, params):
    if defense != "aspl":
        return defense
    return f"aspl (eps={params['eps']})"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def boards(store):
    return build_boards(store.load(), load_boards())


def pandas_means(rows, countermeasure="none"):
    """The pandas computation a board must equal: seeds averaged per identity first."""
    agg = rows[(rows["image_index"] == -1) & (rows["status"] == "ok")].copy()
    agg["config"] = [
        config_label(d, json.loads(p))
        for d, p in zip(agg["defense"], agg["defense_params"], strict=True)
    ]
    agg = agg[agg["countermeasure"] == countermeasure]
    per_identity = agg.groupby(["config", "metric", "identity"])["value"].mean()
    return per_identity.groupby(["config", "metric"]).mean(), per_identity


def test_every_number_equals_the_pandas_computation(store, boards):
    (board,), failed = boards
    assert failed.empty
    expected, per_identity = pandas_means(store.load())
    table = board.table.set_index("config")
    assert sorted(table.index) == sorted(config_label(d, p) for d, p in CONFIGS)
    for config in table.index:
        assert table.loc[config, "identities"] == 5
        for metric in ("ism", "fdfr", "psnr", "linkability"):
            got, want = table.loc[config, f"{metric}_mean"], expected[(config, metric)]
            assert got == pytest.approx(want, rel=1e-12) or (np.isinf(got) and np.isinf(want))
    # the spread plot's data are the per-identity values
    spread = board.identities.set_index(["config", "identity"])["value"]
    ism = per_identity.xs("ism", level="metric")
    assert np.allclose(spread.sort_index().to_numpy(), ism.sort_index().to_numpy())


def test_intervals_contain_their_means(boards):
    (board,), _ = boards
    t = board.table
    checked = 0
    for metric in board.metrics:
        finite = t[f"{metric}_mean"].map(np.isfinite)
        low, mean, high = (t.loc[finite, f"{metric}_{s}"] for s in ("ci_low", "mean", "ci_high"))
        assert (low <= mean).all() and (mean <= high).all()
        assert (low < high).any()  # real intervals, not points
        checked += finite.sum()
    assert checked >= 12


def test_worst_case_is_over_countermeasures_and_ranks_the_board(store, boards):
    (board,), _ = boards
    assert board.primary == "ism" and board.higher_is_better is False
    means = {cm: pandas_means(store.load(), cm)[0] for cm in COUNTERMEASURES}
    table = board.table.set_index("config")
    for config in table.index:
        per_cm = {cm: means[cm][(config, "ism")] for cm in COUNTERMEASURES}
        assert table.loc[config, "worst_ism"] == pytest.approx(max(per_cm.values()))
        assert table.loc[config, "worst_ism_countermeasure"] == max(per_cm, key=per_cm.get)
    worst = board.table["worst_ism"].to_numpy()
    assert np.all(np.diff(worst) >= 0)  # lower ISM protects more: ascending
    assert list(board.table["rank"]) == [1, 2, 3, 4]
    # FDFR is higher-is-better: as the primary metric, its worst case is the minimum
    config = BoardsConfig(BoardRules(primary=("fdfr",)))
    (fdfr_board,), _ = build_boards(store.load(), config)
    fdfr = {cm: pandas_means(store.load(), cm)[0] for cm in COUNTERMEASURES}
    for config_name, row in fdfr_board.table.set_index("config").iterrows():
        lowest = min(fdfr[cm][(config_name, "fdfr")] for cm in COUNTERMEASURES)
        assert row["worst_fdfr"] == pytest.approx(lowest)
    assert np.all(np.diff(fdfr_board.table["worst_fdfr"].to_numpy()) <= 0)


def test_unavailable_values_are_counted_not_dropped(boards):
    (board,), _ = boards
    # identity 0's linkability is unavailable in every experiment of the board
    assert board.counts["unavailable values"] == len(CONFIGS) * len(COUNTERMEASURES) * 3
    problem = board.problems.set_index("metric").loc["linkability"]
    assert problem["status"] == "unavailable" and "ArcFace" in problem["reason"]
    assert (board.table["identities"] == 5).all()


def test_a_failed_baseline_attack_marks_the_board_unreliable(tmp_path, boards):
    (good,), _ = boards
    assert good.baseline == "works" and good.reliable
    assert not any(f.startswith(("unreliable", "unchecked")) for f in good.flags)
    store = build_store(tmp_path, baseline_ism=0.1, identities=3, seeds=(0,))
    (board,), _ = build_boards(store.load(), load_boards())
    assert board.baseline == "failed" and not board.reliable
    assert any("ISM" in f and "below 0.4" in f for f in board.flags)


def test_mixed_backends_land_on_separate_boards(tmp_path):
    store = build_store(tmp_path, identities=3, seeds=(0,))
    build_store(tmp_path, backend="insightface-buffalo_l", identities=3, seeds=(0,))
    boards, _ = build_boards(store.load(), load_boards())
    assert len(boards) == 2
    assert {b.key["backends"].split(";")[-1].split(":")[0].strip() for b in boards} == {
        "offline",
        "insightface-buffalo_l",
    }
    for board in boards:
        assert (board.table["identities"] == 3).all()  # not 6: nothing averaged across


def test_failed_experiments_are_counted_on_their_board(tmp_path):
    crash = experiment(
        "aspl",
        {"eps": 8},
        "id-9",
        "none",
        0,
        {},
        status="error",
        error="RuntimeError: CUDA out of memory",
    )
    store = build_store(tmp_path, identities=2, seeds=(0,), extra=[crash])
    (board,), failed = build_boards(store.load(), load_boards())
    assert board.counts["failed experiments"] == 1 and len(failed) == 1
    assert any("failed" in f for f in board.flags)


def test_empty_and_error_only_stores_give_a_clear_message(tmp_path):
    empty = ResultStore(str(tmp_path / "empty"))
    with pytest.raises(ReportError, match="no results yet"):
        build_boards(empty.load(), load_boards())
    broken = ResultStore(str(tmp_path / "broken"))
    broken.write(experiment("none", {}, "id-0", "none", 0, {}, status="error", error="boom"))
    with pytest.raises(ReportError, match="1 failed.*boom"):
        build_boards(broken.load(), load_boards())


@pytest.mark.parametrize(
    "text, field",
    [
        ("defaults: {primary: 3}", "defaults.primary"),
        ("defaults: {direction: {ism: down}}", "defaults.direction"),
        ("defaults: {attack_failed: {ism: {under: 0.4}}}", "defaults.attack_failed.ism"),
        ("defaults: {confidence: 95}", "defaults.confidence"),
        ("defaults: {colour: red}", "defaults.colour"),
        ("boards: [{match: {metric: ism}, primary: fdfr}]", "boards[0].match.metric"),
        ("leaderboards: []", "leaderboards"),
    ],
)
def test_bad_boards_files_name_the_file_and_field(tmp_path, text, field):
    path = tmp_path / "boards.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_boards(path)
    assert str(path) in str(caught.value) and field in str(caught.value)


def test_board_overrides_apply_by_match(tmp_path):
    path = tmp_path / "boards.yaml"
    path.write_text("boards: [{match: {attack: lora}, primary: fdfr, direction: {fdfr: higher}}]")
    config = load_boards(path)
    assert config.rules_for({"attack": "lora"}).primary == ("fdfr",)
    assert config.rules_for({"attack": "dreambooth"}).primary == BoardRules().primary


def test_rows_are_not_mutated(store):
    rows = store.load()
    before = rows.copy()
    build_boards(rows, load_boards())
    pd.testing.assert_frame_equal(rows, before)


def test_a_board_without_baseline_says_it_is_unchecked(store):
    rows = store.load()
    (board,), _ = build_boards(rows[rows["defense"] != "none"], load_boards())
    assert board.baseline == "missing" and board.reliable
    assert any(f.startswith("unchecked") for f in board.flags)


def test_model_track_subjects_become_utility_columns(tmp_path):
    """A bystander's ISM (utility: higher is better) and the generic-image loss get
    their own columns, counted for the protected identity, never mixed with privacy."""
    store = ResultStore(str(tmp_path))
    for defense, protected_ism, bystander_ism in (("none", 0.6, 0.6), ("apdm", 0.2, 0.55)):
        for i in range(3):
            rows = experiment(defense, {}, f"id-{i}", "none", 0, {"ism": protected_ism + 0.01 * i})
            byst = experiment(defense, {}, f"id-{i}", "none", 0, {"ism": bystander_ism})
            for row in byst:
                row.update(subject="unprotected", identity="id-9", higher_is_better=True)
            store.write(rows + [{**r, "spec_id": rows[0]["spec_id"]} for r in byst])
    (board,), _ = build_boards(store.load(), load_boards())
    table = board.table.set_index("config")
    assert board.primary == "ism" and "ism (unprotected)" in board.metrics
    assert table.loc["apdm", "ism_mean"] == pytest.approx(0.21)
    assert table.loc["apdm", "ism (unprotected)_mean"] == pytest.approx(0.55)
    assert (table["identities"] == 3).all()  # the bystander is not a fourth identity
    assert board.directions["ism (unprotected)"] is True


def test_baseline_bounds_are_calibrated_per_backend(tmp_path):
    """dlib's cosine between strangers is high: an offline ISM of 0.6 means the attack
    failed, while the same number from ArcFace means it worked."""
    rules = load_boards().defaults
    offline = "offline-retinaface-dlib"
    side, bound = rules.failure_bound("ism", offline)
    assert side == "below" and bound > 0.8
    assert rules.failure_bound("ism", "insightface-buffalo_l") == ("below", 0.4)
    store = build_store(tmp_path / "a", backend=offline, baseline_ism=0.6, identities=3, seeds=(0,))
    (board,), _ = build_boards(store.load(), load_boards())
    assert board.baseline == "failed"
    assert any(f"below {bound:g} for {offline}" in f for f in board.flags)
    store = build_store(
        tmp_path / "b", backend="insightface-buffalo_l", baseline_ism=0.6, identities=3, seeds=(0,)
    )
    (board,), _ = build_boards(store.load(), load_boards())
    assert board.baseline == "works"
    store = build_store(
        tmp_path / "c", backend=offline, baseline_ism=bound + 0.05, identities=3, seeds=(0,)
    )
    (board,), _ = build_boards(store.load(), load_boards())
    assert board.baseline == "works"


def test_per_backend_bounds_are_checked_when_loaded(tmp_path):
    bad = tmp_path / "boards.yaml"
    bad.write_text("defaults:\n  attack_failed_by_backend:\n    offline: {ism: {under: 0.9}}\n")
    with pytest.raises(SpecError, match="attack_failed_by_backend.offline.ism"):
        load_boards(bad)


def test_people_of_datasets_with_other_settings_are_not_averaged_together(tmp_path):
    """Two synthetic datasets (seeds 0 and 1) both call their people id-0, id-1, ...:
    each is a person of their own on the board."""
    store = build_store(tmp_path / "one", identities=3, seeds=(0,))
    rows = store.load()
    both = []
    for seed in (0, 1):
        copy = rows.copy()
        copy["spec_json"] = json.dumps({"dataset": {"name": "synthetic", "seed": seed}})
        copy["spec_id"] = copy["spec_id"] + f"-{seed}"
        both.append(copy)
    (board,), _ = build_boards(pd.concat(both, ignore_index=True), load_boards())
    assert set(board.table["identities"]) == {6}
    assert "id-0 [seed=1]" in set(board.identities["identity"])
    (single,), _ = build_boards(both[0], load_boards())  # one dataset: labels as they are
    assert set(single.identities["identity"]) == {"id-0", "id-1", "id-2"}


def test_a_defense_after_which_no_generation_has_a_face_ranks_first(tmp_path):
    """ISM and linkability have no value without a face: where FDFR is 1 for every
    person, the attacker has nothing to link, the best case rather than a missing one."""
    store = ResultStore(str(tmp_path))
    for i in range(4):
        for defense, cm, ism, fdfr in [
            ("none", "none", 0.9, 0.2),
            ("none", "jpeg", 0.9, 0.2),
            ("aspl", "none", float("nan"), 1.0),  # no face at all
            ("aspl", "jpeg", 0.7, 0.5),  # a countermeasure brings faces back
            ("simac", "none", float("nan"), 1.0),
            ("simac", "jpeg", float("nan"), 1.0),
            ("fsmg", "none", float("nan"), 0.75),  # some faces: NaN here is not "no face"
            ("fsmg", "jpeg", float("nan"), 0.75),
        ]:
            store.write(experiment(defense, {}, f"id-{i}", cm, 0, {"ism": ism, "fdfr": fdfr}))
    (board,), _ = build_boards(store.load(), BoardsConfig(BoardRules(primary=("ism",))))
    table = board.table.set_index("config")
    assert table.loc["simac", "rank"] == 1  # faceless under every countermeasure
    assert pd.isna(table.loc["simac", "worst_ism"])
    assert table.loc["simac", "worst_ism_countermeasure"] == "jpeg (no face)"
    assert table.loc["aspl", "rank"] == 2  # its worst case is the jpeg one, with faces
    assert table.loc["aspl", "worst_ism"] == pytest.approx(0.7)
    assert table.loc["aspl", "worst_ism_countermeasure"] == "jpeg"
    assert table.loc["none", "rank"] == 3
    assert pd.isna(table.loc["fsmg", "rank"])  # a missing value stays unranked

"""`antipers search`: spec checks, a search on Ray Tune, and resuming one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from antipers.cli import main
from antipers.search import SearchError, load_search, pareto_front
from tests.conftest import REPO

SPEC = """\
name: {name}
base:
  base_model: tiny
  resolution: 64
  defense: {{name: aspl, iterations: 1, pgd_steps: 2, num_class_images: 2, class_steps: 2}}
  attack: {{name: lora, steps: 2, prior_weight: 0}}
  sampling: {{name: cfg, steps: 2, images_per_prompt: 1}}
  metrics: [fdfr, psnr]
datasets:
  - {{name: synthetic, n_identities: 3}}
identities_per_trial: 2
space:
  defense.eps: {{uniform: [2, 16]}}
  defense.pgd_steps: {{int: [1, 3]}}
objective: {{privacy: fdfr, quality: psnr}}
search: {{algorithm: optuna, samples: 3, concurrent: {concurrent}, seed: 0}}
scheduler: {{name: asha, grace_period: 1, reduction_factor: 2}}
"""


def spec_file(tmp_path: Path, name="small-search", concurrent=2, edit=None) -> Path:
    text = SPEC.format(name=name, concurrent=concurrent)
    if edit:
        assert edit[0] in text
        text = text.replace(*edit)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "edit,message",
    [
        (("identities_per_trial: 2", "identities_per_trial: 2\nbudget: 3"), "budget: unknown"),
        (("defense.eps: {uniform: [2, 16]}", "defense.eps: {uniform: [8, 8]}"), "empty range"),
        (("defense.eps: {uniform: [2, 16]}", "defense.eps: {choice: []}"), "empty range"),
        (("defense.eps: {uniform", "defense.epz: {uniform"), "no parameter 'epz'"),
        (("defense.eps: {uniform: [2, 16]}", "defense.eps: {uniform: [0.1, 16]}"), "eps: expected"),
        (("privacy: fdfr", "privacy: ism"), "'ism' is not computed by any trial"),
        (("quality: psnr", "quality: lpips"), "'lpips' is not computed by any trial"),
        (("privacy: fdfr", "privacy: brisque"), "objective.privacy: 'brisque': expected one of"),
        (("algorithm: optuna", "algorithm: grid"), "search.algorithm: 'grid'"),
        (("identities_per_trial: 2", "identities_per_trial: 9"), "9 asked, the datasets have 3"),
    ],
)
def test_bad_search_specs_are_refused_naming_the_problem(tmp_path, edit, message):
    with pytest.raises(SearchError, match="small-search.yaml: .*" + message.replace("(", r"\(")):
        load_search(spec_file(tmp_path, edit=edit))


def test_bad_search_is_refused_before_ray_or_the_store(tmp_path, capsys):
    path = spec_file(tmp_path, edit=("privacy: fdfr", "privacy: ism"))
    store = tmp_path / "store"
    assert main(["search", str(path), "--store", str(store)]) == 2
    assert "'ism' is not computed by any trial" in capsys.readouterr().err
    assert not store.exists()


def test_identities_are_shared_by_trials_and_alternate_between_datasets(tmp_path):
    path = spec_file(
        tmp_path,
        edit=(
            "  - {name: synthetic, n_identities: 3}",
            "  - {name: synthetic, n_identities: 3}\n  - {name: synthetic, n_identities: 4}",
        ),
    )
    search = load_search(path)
    sizes = [d["n_identities"] for d, _ in search.identities]
    assert sizes == [3, 4]  # one from each dataset before a second from either
    assert load_search(path).identities == search.identities  # drawn with the seed


def test_pareto_front_keeps_exactly_the_non_dominated_points():
    points = [(1.0, 30.0), (0.5, 40.0), (0.5, 30.0), (1.0, 25.0), (0.2, 45.0), (0.5, 40.0)]
    assert pareto_front(points) == [0, 1, 4, 5]


def test_shipped_search_specs_are_valid():
    for name in ("demo", "aspl_budget", "cap_budget_ratio", "iddm_tradeoff"):
        search = load_search(REPO / "tune" / f"{name}.yaml", check_data=(name == "demo"))
        assert search.space and search.identities


def test_search_stores_trial_rows_and_a_non_dominated_front(ray_address, tmp_path):
    from antipers.cluster.search import run_search
    from antipers.results import ResultStore

    search = load_search(spec_file(tmp_path))
    store = ResultStore(str(tmp_path / "store"))
    table = run_search(search, store, verbose=0)
    assert len(table) == 3 and table.attrs["finished"]
    dims = {d.field: d for d in search.space}
    for _, trial in table.iterrows():
        for field, dim in dims.items():
            assert dim.contains(trial[f"param:{field}"]), (field, trial[f"param:{field}"])
        assert float(trial["param:defense.pgd_steps"]).is_integer()
    rows = store.load()
    assert set(rows["suite"]) == {"small-search"} and not rows.empty
    stored = {(round(p["eps"], 9), p["pgd_steps"]) for p in rows["defense_params"].map(json.loads)}
    complete = table[table["complete"]]
    for _, trial in complete.iterrows():  # each finished trial's rows carry its parameters
        key = (round(trial["param:defense.eps"], 9), trial["param:defense.pgd_steps"])
        assert key in stored
    front = complete[complete["on_front"]]
    assert not front.empty
    for _, f in front.iterrows():
        assert not any(
            (o.privacy >= f.privacy and o.quality >= f.quality)
            and (o.privacy > f.privacy or o.quality > f.quality)
            for o in complete.itertuples()
        )
    written = pd.read_parquet(tmp_path / "store" / "searches" / "small-search" / "front.parquet")
    assert sorted(written["trial_id"]) == sorted(front["trial_id"])


def trial_results(store: Path, name: str) -> dict[str, list[str]]:
    """Per trial folder, the results it reported (each with its own timestamp)."""
    out = {}
    for path in (store / "searches" / name / "tune" / name).glob("*/result.json"):
        out[path.parent.name] = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return out


def test_an_interrupted_search_resumes_without_rerunning_finished_trials(ray_address, tmp_path):
    name = "resumed-search"
    path = spec_file(tmp_path, name=name, concurrent=1)
    store = tmp_path / "store"
    command = [sys.executable, "-m", "antipers.cli", "search", str(path), "--store", str(store)]
    command += ["--address", ray_address]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    finished: dict[str, list[str]] = {}
    while time.monotonic() < deadline and first.poll() is None:
        results = trial_results(store, name)
        # one trial at a time: once a second trial reports, the first one has ended
        if len([r for r in results.values() if r]) >= 2:
            finished = {k: v for k, v in results.items() if len(v) == 2}
            break
        time.sleep(0.2)
    assert finished and first.poll() is None, "no trial finished while the search ran"
    first.send_signal(signal.SIGINT)  # Ctrl-C
    first.communicate(timeout=120)
    assert first.returncode != 0

    second = subprocess.run(
        [*command, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    after = trial_results(store, name)
    for trial, before in finished.items():
        assert after[trial] == before  # not run again: the same two reports, same times
    table = pd.read_parquet(store / "searches" / name / "trials.parquet")
    assert len(table) == 3 and table["error"].isna().all()
    # a new search under the same name is refused rather than mixed with the old one
    third = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert third.returncode == 2 and "add --resume" in third.stderr


def test_constrained_objective_ranks_every_feasible_trial_above_every_infeasible_one(tmp_path):
    from types import SimpleNamespace

    from antipers.cluster.search import trials_table

    path = spec_file(tmp_path, edit=("quality: psnr}", "quality: psnr, constraint: {psnr: 35}}"))
    search = load_search(path)
    objective = search.objective
    assert not objective.multi and objective.constraint == 35.0
    feasible = [objective.penalized(p, q) for p, q in [(0.0, 35.0), (0.3, 50.0)]]
    infeasible = [objective.penalized(p, q) for p, q in [(1.0, 34.9), (0.9, 20.0)]]
    assert min(feasible) > max(infeasible) and infeasible[0] > infeasible[1]

    def result(trial, privacy, quality, identities=2):
        metrics = {"trial_id": trial, "privacy": privacy, "quality": quality}
        config = {"defense.eps": 8.0, "defense.pgd_steps": 2}
        return SimpleNamespace(
            metrics={**metrics, "identities": identities}, config=config, error=None
        )

    grid = [
        result("a", 0.9, 30.0),  # most private, but too visible
        result("b", 0.6, 40.0),
        result("c", 0.7, 36.0),
        result("d", 0.95, 45.0, identities=1),  # stopped early: judged on fewer identities
    ]
    table = trials_table(search, grid).set_index("trial_id")
    assert list(table[table["on_front"]].index) == ["c", "b"]
    assert not table.loc["a", "feasible"] and not table.loc["d", "complete"]

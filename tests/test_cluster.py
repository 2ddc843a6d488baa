"""The campaign driver on a real local Ray instance: resident workers, error rows,
a worker killed mid-campaign, a driver killed mid-campaign."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from antipers.campaign import load_campaign  # noqa: E402
from antipers.cli import main  # noqa: E402
from antipers.cluster.driver import run_campaign  # noqa: E402
from antipers.cluster.runtime import ClusterError, check_placeable  # noqa: E402
from antipers.cluster.workers import RoleResources, WorkerPlan  # noqa: E402
from antipers.results import IMAGES_SUFFIX, ResultStore  # noqa: E402
from tests.conftest import REPO  # noqa: E402

# a light plan: one lane fits twice in the test instance's 4 CPUs
PLAN = WorkerPlan({r: RoleResources(cpus=0.5) for r in ("defense", "attack", "scoring")})

CAMPAIGN = """\
suite: cluster-test
base_model: tiny
resolution: 64
datasets:
  - {{name: synthetic, n_identities: 2}}
defenses: [none]
countermeasures: {countermeasures}
attacks:
  - {{name: lora, steps: 2, prior_weight: 0}}
sampling: {{name: cfg, steps: 2, images_per_prompt: 1}}
metrics: [psnr, fdfr]
seeds: {seeds}
"""


def campaign_file(tmp_path: Path, seeds=(0, 1), countermeasures=("none",)) -> Path:
    path = tmp_path / "campaign.yaml"
    path.write_text(
        CAMPAIGN.format(seeds=list(seeds), countermeasures=list(countermeasures)).replace("'", "")
    )
    return path


def stored_files(store: Path) -> list[str]:
    """The result files (not the thumbnails, not a writer's temporary files)."""
    return sorted(
        p.name
        for p in store.iterdir()
        if not p.name.startswith(".") and not p.name.endswith(IMAGES_SUFFIX)
    )


def stored_images(store: Path) -> list[str]:
    return sorted(p.name.removesuffix(IMAGES_SUFFIX) for p in store.glob(f"*{IMAGES_SUFFIX}"))


def test_campaign_stores_each_experiment_once_and_a_failure_as_an_error_row(ray_address, tmp_path):
    # mix k=9 passes validation (k >= 0) but the identity has only 4 clean photos
    path = campaign_file(tmp_path, seeds=[0], countermeasures=["none", "{name: mix, k: 9}"])
    campaign = load_campaign(path)
    store = ResultStore(str(tmp_path / "store"))
    report = run_campaign(campaign.specs, store, PLAN, progress=False)
    assert (report.ok, report.failed, report.total) == (2, 2, 4) and report.finished
    failed = store.failed_ids()
    assert len(failed) == 2 and len(store.finished_ids()) == 2
    rows = store.load()
    errors = rows[rows["status"] == "error"]
    assert set(errors["spec_id"]) == failed
    assert errors["error"].str.contains("mix.k=9: identity").all()
    assert all(report.failures[sid].startswith("ValueError: mix.k=9") for sid in failed)
    ok = rows[rows["status"] == "ok"]
    node = ray.get_runtime_context().get_node_id()[:12]
    assert ok["worker"].str.contains(f"attack@{node}:").all()  # stages ran on Ray workers
    assert set(ok["metric"]) >= {"psnr", "fdfr"}
    # a rerun skips what is stored and tries the failed experiments again
    again = run_campaign(campaign.specs, store, PLAN, progress=False)
    assert (again.skipped, again.ok, again.failed) == (2, 0, 2)
    assert len(stored_files(tmp_path / "store")) == 4
    # thumbnails beside each finished experiment (a failed one has none)
    assert stored_images(tmp_path / "store") == sorted(store.finished_ids())
    counts = {k: len(v) for k, v in store.read_images(min(store.finished_ids())).items()}
    assert counts == {"clean": 2, "protected": 2, "generated": 2}  # 2 prompts x 1 image
    # `antipers run --images none`: rows alone
    bare = ResultStore(str(tmp_path / "bare"))
    first_ok = [s for s in campaign.specs if s.spec_id in store.finished_ids()][:1]
    run_campaign(first_ok, bare, PLAN, progress=False, images=False)
    assert bare.finished_ids() == {first_ok[0].spec_id} and bare.image_ids() == set()


def test_a_killed_worker_is_restarted_and_no_experiment_is_lost(ray_address, tmp_path):
    campaign = load_campaign(campaign_file(tmp_path, seeds=[0, 1, 2]))
    store = ResultStore(str(tmp_path / "store"))
    pids: list[int] = []
    attacks: dict[int, int] = {}  # attack executions begun, per worker process
    protects: list[int] = []

    def kill_attack_worker(spec, rows, pools):
        info = ray.get(pools["attack"].actors[0].info.remote())
        pids.append(info["pid"])
        attacks[info["pid"]] = info["started"]["attack"]
        protects.append(ray.get(pools["defense"].actors[0].info.remote())["started"]["protect"])
        if len(pids) == 1:  # mid-campaign: later experiments are queued on this worker
            os.kill(pids[0], signal.SIGKILL)

    report = run_campaign(
        campaign.specs, store, PLAN, max_in_flight=3, progress=False, on_result=kill_attack_worker
    )
    assert report.finished and report.failed == 0 and report.ok == len(campaign.specs) == 6
    assert len(set(pids)) >= 2  # the worker came back as a new process
    files = stored_files(tmp_path / "store")
    assert files == sorted(f"{sid}.parquet" for sid in campaign.spec_ids)  # each exactly once
    assert stored_images(tmp_path / "store") == sorted(campaign.spec_ids)
    # executions: each experiment once, plus at most those in flight at the kill (3)
    n = len(campaign.specs)
    assert n <= protects[-1] <= n + 3, protects
    killed, *restarted = attacks
    assert restarted and n - attacks[killed] <= sum(attacks[p] for p in restarted) <= n, attacks


def test_a_driver_killed_mid_campaign_finishes_on_rerun(ray_address, tmp_path):
    path = campaign_file(tmp_path, seeds=[0, 1, 2])
    spec_ids = load_campaign(path).spec_ids
    store_dir = tmp_path / "store"
    command = [
        sys.executable,
        "-m",
        "antipers.cli",
        "run",
        str(path),
        "--store",
        str(store_dir),
        "--address",
        ray_address,
        "--cpus",
        "0.5",
        "--no-progress",
    ]
    first = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None:
        if store_dir.is_dir() and any(f.endswith(".parquet") for f in stored_files(store_dir)):
            break
        time.sleep(0.2)
    assert first.poll() is None, f"the driver ended before it could be killed: {first.stderr}"
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = len(stored_files(store_dir))
    assert 1 <= done_before < len(spec_ids)

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"{done_before} already in" in second.stderr
    assert stored_files(store_dir) == sorted(f"{sid}.parquet" for sid in spec_ids)
    assert stored_images(store_dir) == sorted(spec_ids)  # one set each, none half-written
    rows = ResultStore(str(store_dir)).load()
    assert rows.groupby("spec_id")["started_at"].nunique().eq(1).all()  # rows exactly once
    # the rerun's workers executed each missing experiment's stages once, nothing more
    missing = len(spec_ids) - done_before
    counts = dict(
        re.findall(r"(protect|attack|score) (\d+)", second.stderr.split("executions:")[1])
    )
    assert counts == {stage: str(missing) for stage in ("protect", "attack", "score")}, counts


def test_workers_that_cannot_be_placed_are_refused(ray_address):
    huge = WorkerPlan({r: RoleResources(cpus=64) for r in ("defense", "attack", "scoring")})
    with pytest.raises(ClusterError, match="no node can host a defense worker"):
        check_placeable(huge, autoscaling=False)
    check_placeable(huge, autoscaling=True)  # an autoscaling cluster may add nodes: a warning
    many = WorkerPlan({r: RoleResources(count=3, cpus=1) for r in ("defense", "attack", "scoring")})
    with pytest.raises(ClusterError, match="reserve 9 CPU in all and the cluster has 4"):
        check_placeable(many, autoscaling=False)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--workers", "attack=0"], "--workers 'attack=0': expected a whole number >= 1"),
        (["--gpus", "trainer=1"], "unknown role 'trainer'"),
        (["--cpus", "defense=lots"], "'lots' is not a number"),
        (["--max-in-flight", "0"], "--max-in-flight: expected >= 1"),
        (["--device", "tpu"], "--device 'tpu': expected cpu, cuda or cuda:N"),
    ],
)
def test_bad_run_flags_are_refused_before_any_work(tmp_path, capsys, flags, message):
    store = tmp_path / "store"
    code = main(["run", str(campaign_file(tmp_path)), "--store", str(store), *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert not store.exists()


def test_the_images_flag_takes_thumbnails_or_none(tmp_path, capsys):
    store = tmp_path / "store"
    with pytest.raises(SystemExit) as refused:
        main(["run", str(campaign_file(tmp_path)), "--store", str(store), "--images", "all"])
    assert refused.value.code == 2 and "--images: invalid choice: 'all'" in capsys.readouterr().err
    assert not store.exists()


def test_bad_campaign_is_refused_before_ray_or_the_store(tmp_path, capsys):
    path = campaign_file(tmp_path)
    path.write_text(path.read_text().replace("defenses: [none]", "defenses: [nonee]"))
    store = tmp_path / "store"
    code = main(["run", str(path), "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and "campaign.yaml:6: defenses.0: defense: unknown defense 'nonee'" in err
    assert not store.exists()


def test_dead_workers_are_retried_but_experiment_failures_are_not():
    from ray.exceptions import ActorDiedError, RayTaskError, WorkerCrashedError

    from antipers.cluster.retry import infrastructure, message

    failed = RayTaskError("protect", "Traceback: ...", ValueError("eps too small"), ip="x")
    assert not infrastructure(failed)
    assert message(failed).startswith("ValueError: eps too small\nTraceback: ...")
    assert infrastructure(ActorDiedError()) and infrastructure(WorkerCrashedError())
    # a call chained after one whose worker died fails with the worker's error
    assert infrastructure(RayTaskError("attack", "", ActorDiedError(), ip="x"))


def test_a_worker_that_cannot_start_stops_the_campaign_with_nothing_stored(ray_address, tmp_path):
    campaign = load_campaign(campaign_file(tmp_path, seeds=[0]))
    broken = WorkerPlan(PLAN.roles, device="tpu")  # every worker's constructor raises
    store = ResultStore(str(tmp_path / "store"))
    with pytest.raises(ClusterError, match="(?s)a worker could not start.*device string: tpu"):
        run_campaign(campaign.specs, store, broken, progress=False)
    assert store.finished_ids() == set() and store.failed_ids() == set()

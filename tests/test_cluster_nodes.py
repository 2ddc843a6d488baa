"""A campaign on a two-node Ray cluster (``ray.cluster_utils.Cluster``): workers on
both nodes, rows from both."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from antipers.campaign import load_campaign  # noqa: E402
from antipers.cluster.driver import run_campaign  # noqa: E402
from antipers.cluster.runtime import check_placeable  # noqa: E402
from antipers.cluster.workers import RoleResources, WorkerPlan  # noqa: E402
from antipers.results import ResultStore  # noqa: E402
from tests.test_cluster import campaign_file  # noqa: E402


@pytest.fixture(scope="module")
def two_nodes():
    if ray.is_initialized():
        ray.shutdown()
    node_args = {"num_cpus": 2, "object_store_memory": 100 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args=node_args)
    cluster.add_node(**node_args)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_campaign_runs_on_workers_on_both_nodes(two_nodes, tmp_path):
    nodes = {n["NodeID"][:12] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    # two lanes of 1.5 CPUs: one lane per node (SPREAD)
    plan = WorkerPlan(
        {
            "defense": RoleResources(count=2, cpus=0.5),
            "attack": RoleResources(count=2, cpus=0.5),
            "scoring": RoleResources(count=2, cpus=0.5),
        }
    )
    check_placeable(plan, autoscaling=False)
    campaign = load_campaign(campaign_file(tmp_path, seeds=[0, 1]))
    store = ResultStore(str(tmp_path / "store"))
    report = run_campaign(campaign.specs, store, plan, progress=False)
    assert report.ok == len(campaign.specs) == 4 and report.failed == 0
    rows = store.load()
    assert set(rows["spec_id"]) == set(campaign.spec_ids)
    # the worker column names each stage's node; both nodes did work
    used = {
        part.split("@", 1)[1].split(":", 1)[0]
        for worker in rows["worker"]
        for part in (worker.split(" ") if "@" in worker else [f"all@{worker}"])
    }
    assert used == nodes

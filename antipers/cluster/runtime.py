"""Joining a Ray cluster, or starting one on this machine, and checking that the
workers asked for can be placed on it."""

from __future__ import annotations

import logging
import math
import os
import warnings

import ray

from antipers.cluster.workers import WorkerPlan
from antipers.errors import UserError

log = logging.getLogger(__name__)


class ClusterError(UserError, RuntimeError):
    """The cluster cannot run the campaign as asked (printed as a user error)."""


def forwarded_env() -> dict[str, str]:
    """``ANTIPERS_*`` settings (models, data and cache folders, device) for the workers:
    on a cluster they do not inherit the driver's environment."""
    return {k: v for k, v in os.environ.items() if k.startswith("ANTIPERS_")}


def connect(
    address: str | None = None,
    num_cpus: float | None = None,
    object_store_memory: int | None = None,
) -> bool:
    """Join the cluster at ``address`` ("auto", "ray://host:10001", "host:6379"), or
    start a local instance; returns True when this call started Ray. A process that is
    already connected stays connected."""
    if ray.is_initialized():
        return False
    common = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": False,  # worker logs stay in the session's logs folder
        "runtime_env": {"env_vars": forwarded_env()} if forwarded_env() else None,
    }
    if address:
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(
                f"--address {address}: cannot join the Ray cluster ({exc})"
            ) from None
        return False
    cpus = max(os.cpu_count() or 1, math.ceil(num_cpus or 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ray.init(num_cpus=cpus, object_store_memory=object_store_memory, **common)
    return True


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def check_placeable(plan: WorkerPlan, autoscaling: bool) -> None:
    """Every worker must fit on the live nodes, or Ray would wait forever for one. On a
    cluster that may scale up, only warn."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    offer = "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in nodes)
    problems = [
        f"no node can host a {role} worker ({res.cpus:g} CPU, {res.gpus:g} GPU)"
        for role, res in plan.roles.items()
        if not any(n.get("CPU", 0) >= res.cpus and n.get("GPU", 0) >= res.gpus for n in nodes)
    ]
    total = ray.cluster_resources()
    problems += [
        f"the workers reserve {need:g} {kind} in all and the cluster has {total.get(kind, 0):g}"
        for kind, need in plan.demand().items()
        if need > total.get(kind, 0) + 1e-9
    ]
    if not problems:
        return
    message = f"{'; '.join(problems)} (the nodes offer: {offer or 'none'})"
    if not autoscaling:
        raise ClusterError(f"{message}: lower --workers, --cpus or --gpus")
    log.warning("%s: waiting for the autoscaler to add nodes", message)

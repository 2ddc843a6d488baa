"""Resident workers: Ray actors that each hold one ``RunContext`` for their life.

An experiment is three actor calls chained by object references:
``defense.protect -> attack.attack -> scoring.score``. Roles live on separate actors,
sized separately (a defense wants a large GPU share, scoring a small one), so while
one identity is scored the next one is already training. Each actor loads a base
model or a metric's model once and reuses it for every experiment that names it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import ray

from antipers.cluster import ROLES, STAGE_OF
from antipers.pipeline import (
    Handoff,
    RunContext,
    attack_stage,
    protect_stage,
    score_stage,
)
from antipers.spec import ExperimentSpec

# Ray always restarts a dead worker and retries each call it had in flight once more;
# the driver then resubmits the experiment (--retries) before storing it as an error,
# so an experiment that kills its worker every time (out of memory) cannot stall the
# campaign, and the worker is back for the next one.
MAX_RESTARTS = -1
TASK_RETRIES = 1


@dataclass(frozen=True)
class RoleResources:
    """How many actors of one role, and what each reserves."""

    count: int = 1
    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        from antipers.cluster.runtime import ClusterError  # runtime imports this module

        if self.count < 1:
            raise ClusterError(f"count: expected >= 1 worker, got {self.count}")
        if self.cpus < 0 or self.gpus < 0:
            raise ClusterError(f"cpus and gpus: expected >= 0, got {self.cpus}, {self.gpus}")
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise ClusterError(f"gpus: a share above 1 must be whole, got {self.gpus}")


@dataclass(frozen=True)
class WorkerPlan:
    """Resources per role. ``for_cluster`` gives GPU shares when the cluster has GPUs:
    one lane (defense + attack + scoring) fits on one GPU."""

    roles: dict[str, RoleResources] = field(
        default_factory=lambda: {role: RoleResources() for role in ROLES}
    )
    device: str | None = None  # None: each worker picks (CUDA when Ray gave it a GPU)

    @classmethod
    def for_cluster(cls, has_gpus: bool, **changes: dict[str, float]) -> WorkerPlan:
        gpu_share = {"defense": 0.4, "attack": 0.4, "scoring": 0.2}
        cpu_share = {"defense": 1.0, "attack": 1.0, "scoring": 0.5}
        roles = {}
        for role in ROLES:
            values: dict[str, Any] = {
                "cpus": cpu_share[role],
                "gpus": gpu_share[role] if has_gpus else 0.0,
            }
            for key, per_role in changes.items():
                if role in per_role:
                    values[key] = per_role[role]
            values["count"] = int(values.get("count", 1))
            roles[role] = RoleResources(**values)
        return cls(roles)

    def demand(self) -> dict[str, float]:
        return {
            "CPU": sum(r.count * r.cpus for r in self.roles.values()),
            "GPU": sum(r.count * r.gpus for r in self.roles.values()),
        }


class StageWorker:
    """One resident ``RunContext``; the driver calls the method of the worker's role."""

    def __init__(self, role: str, device: str | None = None) -> None:
        import torch

        from antipers.device import pick_device

        self.role = role
        self.started = dict.fromkeys(STAGE_OF.values(), 0)  # stage executions begun
        node = ray.get_runtime_context().get_node_id()
        self.ctx = RunContext(device=pick_device(device), name=f"{node[:12]}:{os.getpid()}")
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and threads.isdigit():
            torch.set_num_threads(int(threads))

    def info(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "name": self.ctx.name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "device": str(self.ctx.device),
            "resident_models": self.ctx.resident_models(),
            "started": dict(self.started),
        }

    def protect(self, spec: ExperimentSpec) -> Handoff:
        self.started["protect"] += 1
        return protect_stage(spec, self.ctx, _quiet).portable()

    def attack(self, spec: ExperimentSpec, handoff: Handoff) -> Handoff:
        self.started["attack"] += 1
        return attack_stage(spec, self.ctx, handoff, _quiet).portable()

    def score(self, spec: ExperimentSpec, handoff: Handoff) -> Handoff:
        self.started["score"] += 1
        return score_stage(spec, self.ctx, handoff, _quiet).portable()


def _quiet(stage: str) -> None:
    """Stage progress stays off the driver's console; the progress bar is the driver's."""


RemoteStageWorker = ray.remote(StageWorker)


@dataclass
class Pool:
    """The actors of one role, and how many calls each has in flight."""

    role: str
    actors: list[Any]
    load: list[int]

    def pick(self) -> int:
        return min(range(len(self.actors)), key=self.load.__getitem__)


def start_workers(plan: WorkerPlan) -> dict[str, Pool]:
    """Start every worker; SPREAD places a role's actors on different nodes where it can."""
    pools = {}
    for role in ROLES:
        res = plan.roles[role]
        actors = [
            RemoteStageWorker.options(
                num_cpus=res.cpus,
                num_gpus=res.gpus,
                max_restarts=MAX_RESTARTS,
                max_task_retries=TASK_RETRIES,
                scheduling_strategy="SPREAD",
            ).remote(role, plan.device)
            for _ in range(res.count)
        ]
        pools[role] = Pool(role, actors, [0] * len(actors))
    return pools

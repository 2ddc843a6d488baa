"""Full evaluations submitted over HTTP: the uploaded photos are the protected set
(no defense runs), the attacker personalizes on them, and the usual metrics score the
result, as one experiment of ``run_experiment`` on a Ray task. The id is the
experiment's ``spec_id``: the same upload and options give the same id, and the
store, not the replica's memory, is the record of what finished."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from antipers.images import write_png
from antipers.pipeline import run_and_store
from antipers.results import ResultStore
from antipers.spec import ExperimentSpec

PERSON = "person"
OPTIONS = ("attack", "countermeasure", "sampling", "metrics", "seed")
DEFAULT_METRICS = ("fdfr", "ism", "brisque")


def upload_id(files: list[bytes], options: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for data in files:
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()[:16]


def write_upload(root: Path, protected: torch.Tensor, references: torch.Tensor) -> Path:
    """``root/person/set_A|set_B|set_C`` (renamed into place whole: a crash leaves none)."""
    if (root / PERSON).is_dir():
        return root
    tmp = root.with_name(f".{root.name}-{uuid.uuid4().hex}")
    sets = {"set_A": references, "set_B": protected, "set_C": references}
    for name, images in sets.items():
        write_png(images, [tmp / PERSON / name / f"{i:02d}.png" for i in range(len(images))])
    try:
        tmp.rename(root)
    except OSError:  # another request wrote the same upload first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def evaluation_spec(
    options: Mapping[str, Any],
    defaults: Mapping[str, Any],
    root: Path,
    base_model: str,
    resolution: int,
) -> ExperimentSpec:
    """Raises SpecError/ValueError naming the bad option."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"options.{unknown[0]}: unknown; use {', '.join(OPTIONS)}")
    chosen = {"metrics": list(DEFAULT_METRICS), **defaults, **options}
    return ExperimentSpec.from_dict(
        {
            **chosen,
            "suite": "serve",
            "track": "image",
            "base_model": base_model,
            "dataset": {"name": "uploads", "root": str(root), "min_photos": 1},
            "identity": PERSON,
            "defense": "none",
            "resolution": resolution,
        }
    )


@ray.remote(num_cpus=1, max_retries=1)
def _evaluate(spec: ExperimentSpec, store_uri: str) -> str:
    rows, _ = run_and_store(spec, ResultStore(store_uri))
    return str(rows[0]["status"])


def submit(spec: ExperimentSpec, store_uri: str) -> Any:
    """On this node: the upload folder is on its disk."""
    here = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(node_id=here, soft=False)
    return _evaluate.options(scheduling_strategy=strategy).remote(spec, store_uri)


def status(spec_id: str, store: ResultStore, running: Mapping[str, Any]) -> dict[str, Any] | None:
    """``queued/running``, ``done`` with the aggregate rows, ``failed`` with the error;
    None for an id never seen."""
    failed = spec_id in store.failed_ids()
    if failed or spec_id in store.finished_ids():
        rows = store.load([spec_id])
        aggregates = rows[rows["image_index"] == -1].drop(columns=["spec_json"])
        records = json.loads(aggregates.to_json(orient="records", date_format="iso"))
        body: dict[str, Any] = {"id": spec_id, "status": "failed" if failed else "done"}
        body["rows"] = records
        if failed:
            body["error"] = str(rows["error"].iloc[0]).splitlines()[0]
        return body
    if spec_id in running:
        ready, _ = ray.wait([running[spec_id]], timeout=0)
        if ready:  # finished between the store check and now, or the task itself failed
            try:
                ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                return {"id": spec_id, "status": "failed", "error": str(exc).splitlines()[0]}
            return status(spec_id, store, {})
        return {"id": spec_id, "status": "running"}
    return None

"""``antipers search``: a search spec on Ray Tune.

Each trial runs the trial's configuration on the spec's identities one after another
through ``run_and_store`` (the same ``run_experiment`` as campaigns; an experiment the
store already has is read back, not rerun) and reports the running means after each
identity, so ASHA can stop weak configurations early. The Tune experiment lives under
``<store>/searches/<name>/``, which is what ``--resume`` restores; trials that finished
are not run again. At the end every trial's scores go to ``trials.parquet`` and the
Pareto front (or, constrained, the best feasible configurations) to ``front.parquet``.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from ray import tune

from antipers.pipeline import RunContext, run_and_store
from antipers.results import ResultStore
from antipers.search import SearchSpec, pareto_front

_CONTEXT: RunContext | None = None  # resident per Tune worker process, across trials


def _context() -> RunContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = RunContext()
    return _CONTEXT


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def trial(config: dict[str, Any], search: SearchSpec, store_uri: str) -> None:
    """One configuration on every identity of the search, a report after each."""
    store = ResultStore(store_uri)
    privacy: list[float] = []
    quality: list[float] = []
    for index in range(len(search.identities)):
        spec = search.experiment(config, index)
        rows, _ = run_and_store(spec, store, _context())
        failed = [r for r in rows if r["status"] == "error" and not r["metric"]]
        if failed:
            raise RuntimeError(f"experiment {spec.spec_id} failed: {failed[0]['error']}")
        p, q = search.objective.scores(rows)
        privacy.append(p)
        quality.append(q)
        # no face anywhere leaves ISM undefined: that identity counts as unprotected
        mean_p = _mean(privacy)
        mean_p = 0.0 if math.isnan(mean_p) else mean_p
        mean_q = _mean(quality)
        tune.report(
            {
                "privacy": mean_p,
                "quality": mean_q,
                "objective": search.objective.penalized(mean_p, mean_q),
                "identities": index + 1,
                "last_spec_id": spec.spec_id,
            }
        )


def _param_space(search: SearchSpec) -> dict[str, Any]:
    space = {}
    for dim in search.space:
        if dim.kind == "choice":
            space[dim.field] = tune.choice(list(dim.values))
        elif dim.kind == "int":
            space[dim.field] = tune.randint(int(dim.values[0]), int(dim.values[1]) + 1)
        elif dim.kind == "loguniform":
            space[dim.field] = tune.loguniform(*dim.values)
        else:
            space[dim.field] = tune.uniform(*dim.values)
    return space


def _tune_config(search: SearchSpec) -> tune.TuneConfig:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    # ASHA ranks by privacy when the search is multi-objective, by the objective otherwise
    rank = "privacy" if search.objective.multi else "objective"
    scheduler = (
        ASHAScheduler(
            metric=rank,
            mode="max",
            time_attr="training_iteration",
            max_t=len(search.identities),
            grace_period=min(search.grace_period, len(search.identities)),
            reduction_factor=search.reduction_factor,
        )
        if search.scheduler == "asha"
        else FIFOScheduler()
    )
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        if search.objective.multi:
            algorithm = OptunaSearch(
                metric=["privacy", "quality"], mode=["max", "max"], seed=search.seed
            )
        else:
            algorithm = OptunaSearch(metric="objective", mode="max", seed=search.seed)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        algorithm = BasicVariantGenerator(random_state=search.seed)
    return tune.TuneConfig(
        search_alg=algorithm,
        scheduler=scheduler,
        num_samples=search.samples,
        max_concurrent_trials=search.concurrent,
    )


def _trainable(search: SearchSpec, store: ResultStore) -> Any:
    # the parsed spec travels to the trials: a cluster's workers need not have the file
    fn = tune.with_parameters(trial, search=search, store_uri=store.uri)
    return tune.with_resources(fn, {"cpu": search.cpus, "gpu": search.gpus})


def search_dirs(store: ResultStore, search: SearchSpec) -> tuple[str, str]:
    """The search's folder as a path on ``store.fs`` and as what Tune takes (the URI,
    scheme included, for an object store)."""
    path = f"{store.root}/searches/{search.name}"
    uri = f"{store.uri.rstrip('/')}/searches/{search.name}" if "://" in store.uri else path
    return path, uri


class SearchExists(RuntimeError):
    """A search of that name is (or is not) in the store, against what was asked."""


def run_search(
    search: SearchSpec,
    store: ResultStore,
    resume: bool = False,
    verbose: int = 1,
) -> pd.DataFrame:
    """Run (or resume) the search; returns one row per trial with its configuration,
    scores and whether it is on the front (``attrs["finished"]``: False when it was
    interrupted). Ray must be connected."""
    root, root_uri = search_dirs(store, search)
    storage = f"{root_uri}/tune"
    path = f"{storage}/{search.name}"
    trainable = _trainable(search, store)
    exists = tune.Tuner.can_restore(path)
    if resume:
        if not exists:
            raise SearchExists(f"--resume: no search {search.name!r} to resume under {root}")
        tuner = tune.Tuner.restore(
            path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        if exists:
            raise SearchExists(
                f"a search named {search.name!r} is already in {root}: add --resume to "
                "continue it, or rename the search"
            )
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(search),
            tune_config=_tune_config(search),
            run_config=tune.RunConfig(
                name=search.name,
                storage_path=storage,
                verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=1),
            ),
        )
    grid = tuner.fit()
    table = trials_table(search, grid)
    # After Ctrl-C, Tune saves the trials' states and returns; the saved states (not the
    # returned grid) say which trials never ran or were cut short. ASHA's stops end a trial.
    saved = tune.ExperimentAnalysis(path).trials
    table.attrs["finished"] = len(saved) >= search.samples and all(
        t.status in ("TERMINATED", "ERROR") for t in saved
    )
    write_table(store, f"{root}/trials.parquet", table)
    write_table(store, f"{root}/front.parquet", table[table["on_front"]])
    return table


def trials_table(search: SearchSpec, grid: Any) -> pd.DataFrame:
    """One row per trial; ``complete`` when it ran on every identity (only those can be
    on the front: an early-stopped trial was judged on fewer identities)."""
    records = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        done = metrics.get("identities", 0)
        records.append(
            {
                "trial_id": metrics.get("trial_id", ""),
                **{f"param:{d.field}": config.get(d.field) for d in search.space},
                "privacy": metrics.get("privacy", math.nan),
                "quality": metrics.get("quality", math.nan),
                "identities": done,
                "complete": done == len(search.identities),
                "feasible": search.objective.feasible(metrics.get("quality", math.nan)),
                "error": str(result.error) if result.error else None,
            }
        )
    table = pd.DataFrame.from_records(records)
    table["on_front"] = False
    ok = table[table["complete"] & table["error"].isna()]
    if search.objective.multi:
        front = pareto_front(list(zip(ok["privacy"], ok["quality"], strict=True)))
        table.loc[ok.index[front], "on_front"] = True
    else:
        feasible = ok[ok["feasible"]].sort_values("privacy", ascending=False)
        table.loc[feasible.index[:5], "on_front"] = True
    order = ["on_front", "privacy", "quality"]
    return table.sort_values(order, ascending=False).reset_index(drop=True)


def write_table(store: ResultStore, path: str, table: pd.DataFrame) -> None:
    """Written to a temporary name and renamed, like the experiment files."""
    tmp = f"{path}.{uuid.uuid4().hex}.part"
    with store.fs.open_output_stream(tmp) as sink:
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), sink)
    store.fs.move(tmp, path)

"""``antipers run`` and ``antipers demo``: connect, check, run the campaign, report."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
import ray

from antipers.campaign import Campaign, load_campaign
from antipers.cluster.driver import CampaignReport, run_campaign
from antipers.cluster.runtime import ClusterError, check_placeable, cluster_has_gpus, connect
from antipers.cluster.workers import WorkerPlan
from antipers.leaderboard import missing_metrics, summary_table
from antipers.results import ResultStore
from antipers.search import SearchSpec

DEMO_NOTE = (
    "The demo runs the tiny random-init base model on synthetic people: its numbers "
    "check that every stage works end to end and say nothing about privacy. Measure "
    "protection with a real base model (sd15, sd21-base) on CelebA-HQ or VGGFace2."
)


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None
    max_in_flight: int | None = None
    retries: int = 2
    workers: dict[str, float] | None = None
    cpus: dict[str, float] | None = None
    gpus: dict[str, float] | None = None
    device: str | None = None
    object_store_memory: int | None = None
    progress: bool = True


def _plan(options: RunOptions, has_gpus: bool) -> WorkerPlan:
    changes = {
        key: value
        for key, value in (
            ("count", options.workers),
            ("cpus", options.cpus),
            ("gpus", options.gpus),
        )
        if value
    }
    plan = WorkerPlan.for_cluster(has_gpus, **changes)
    return WorkerPlan(plan.roles, device=options.device)


def run(campaign: Campaign, store: ResultStore, options: RunOptions) -> CampaignReport:
    """Run a loaded campaign on the cluster at ``options.address`` (or a local one)."""
    stored = store.finished_ids()
    todo = sum(s.spec_id not in stored for s in campaign.specs)
    print(
        f"{campaign.path}: {len(campaign.specs)} experiments, {len(campaign.specs) - todo} "
        f"already in {store.uri}, {todo} to run",
        file=sys.stderr,
    )
    if todo == 0:
        return CampaignReport(total=len(campaign.specs), skipped=len(campaign.specs))
    # a local instance is sized for the default plan; its GPUs are the machine's
    local_plan = _plan(options, has_gpus=False)
    started = connect(
        options.address,
        num_cpus=local_plan.demand()["CPU"],
        object_store_memory=options.object_store_memory,
    )
    try:
        plan = _plan(options, cluster_has_gpus())
        check_placeable(plan, autoscaling=not started)
        return run_campaign(
            campaign.specs,
            store,
            plan,
            max_in_flight=options.max_in_flight,
            retries=options.retries,
            progress=options.progress,
            description=Path(campaign.path).stem,
        )
    finally:
        if started:
            ray.shutdown()


def print_report(report: CampaignReport, store: ResultStore, campaign: Campaign) -> None:
    print(report.summary(), file=sys.stderr)
    for spec_id, first_line in report.failures.items():
        print(f"  failed {spec_id}: {first_line}", file=sys.stderr)
    rows = store.load(campaign.spec_ids)
    table = summary_table(rows)
    if not table.empty:
        with pd.option_context("display.width", 160, "display.max_columns", 30):
            print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for m in missing_metrics(rows).itertuples():
        reason = (m.reason or "").splitlines()[0][:120]
        print(f"  {m.metric}: {m.status} in {m.experiments} experiment(s): {reason}")


def demo_campaign_path() -> Path:
    return Path(str(resources.files("antipers") / "campaigns" / "demo.yaml"))


def demo(out: str, options: RunOptions) -> CampaignReport:
    print(DEMO_NOTE, file=sys.stderr)
    campaign = load_campaign(demo_campaign_path())
    store = ResultStore(out)
    report = run(campaign, store, options)
    print_report(report, store, campaign)
    print(f"\nrows: {store.uri} (one Parquet file per experiment)\n{DEMO_NOTE}")
    return report


def search(spec: SearchSpec, store: ResultStore, address: str | None, resume: bool) -> int:
    """Run or resume a search and print its front; 1 when trials failed or it was cut short."""
    from antipers.cluster.search import SearchExists, run_search

    started = connect(address, num_cpus=spec.cpus * spec.concurrent)
    try:
        try:
            table = run_search(spec, store, resume=resume)
        except SearchExists as exc:
            raise ClusterError(str(exc)) from None
    finally:
        if started:
            ray.shutdown()
    front = "Pareto front" if spec.objective.multi else "best feasible configurations"
    objective = spec.objective
    bound = "" if objective.multi else f" subject to {objective.quality} >= bound"
    print(
        f"{spec.name}: {len(table)} trials, {int(table['complete'].sum())} on all "
        f"{len(spec.identities)} identities; privacy = {objective.privacy}, quality = "
        f"{objective.quality}{bound}. {front}:"
    )
    with pd.option_context("display.width", 160, "display.max_columns", 30):
        shown = table[table["on_front"]].drop(columns=["on_front", "error"])
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    root = f"{store.uri.rstrip('/')}/searches/{spec.name}"
    print(f"trials: {root}/trials.parquet, front: {root}/front.parquet; rows: suite {spec.name!r}")
    errors = table["error"].notna().sum()
    unfinished = not table.attrs.get("finished", False)
    if unfinished:
        print("the search stopped early: run the same command with --resume to finish it")
    return 1 if errors or unfinished else 0

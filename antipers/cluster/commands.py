"""``antipers run`` and ``antipers demo``: connect, check, run the campaign, report."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import ray

from antipers.campaign import Campaign, load_campaign
from antipers.cluster.driver import run_campaign
from antipers.cluster.outcomes import CampaignReport
from antipers.cluster.runtime import ClusterError, check_placeable, cluster_has_gpus, connect
from antipers.cluster.workers import WorkerPlan
from antipers.results import ResultStore
from antipers.search import SearchSpec
from antipers.summary import missing_metrics, summary_table, verdicts

DEMO_NOTE = (
    "The demo runs mini-faces, antipers' own 64 px miniature diffusion model trained on "
    "synthetic faces, against synthetic people whose photos it never trained on: it shows "
    "that the benchmark measures protection and lets defenses be compared offline. It is "
    "no substitute for numbers on a real base model (sd15, sd21-base) with CelebA-HQ or VGGFace2."
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
    images: bool = True  # each experiment's thumbnails stored beside its rows


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
            images=options.images,
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
    from antipers.report import write_report

    leaderboard = write_report(store.uri, Path(store.root) / "report")
    print(f"\nrows: {store.uri} (one Parquet file per experiment)\n{leaderboard.summary()}")
    rows = store.load(campaign.spec_ids)
    n = rows["identity"].nunique()
    print(f"\nWhat it shows (means over {n} synthetic people, offline face backend):")
    for line in verdicts(rows):
        print(f"  {line}")
    print(DEMO_NOTE)
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


def _check_port_free(host: str, port: int) -> None:
    """Before Ray starts: Serve reports a taken port only as a failed proxy."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ClusterError(
                f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})"
            ) from None


def serve_forever(
    config: str | None, host: str | None, port: int | None, address: str | None
) -> int:
    """``antipers serve``: the scoring service from a Serve config (its first
    application's args and deployment options), until Ctrl-C."""
    import time

    import yaml
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from antipers.cluster.scoring import ScoringService, check_args
    from antipers.errors import UserError

    http: dict[str, Any] = {}
    args: dict[str, Any] = {}
    options: dict[str, Any] = {}
    name, prefix = "scoring", "/"
    if config:
        try:
            raw = yaml.safe_load(Path(config).read_text())
            schema = ServeDeploySchema.parse_obj(raw)
        except (OSError, yaml.YAMLError, ValueError) as exc:
            raise ClusterError(f"--config {config}: {exc}") from None
        if len(schema.applications) != 1:
            raise ClusterError(f"--config {config}: expected one application")
        application = schema.applications[0]
        http = raw.get("http_options") or {}
        args = dict(application.args or {})
        name, prefix = application.name, application.route_prefix or "/"
        for deployment in application.deployments:
            options.update(deployment.dict(exclude_unset=True))
        options.pop("name", None)
    try:
        check_args(args)
    except UserError as exc:
        raise ClusterError(f"--config {config or '(default)'}: {exc}") from None
    host = host or http.get("host", "127.0.0.1")
    port = port or http.get("port", 8000)
    if not address:  # joining a cluster: its proxy listens there, not here
        _check_port_free(host, port)
    started = connect(address)
    try:
        url = f"http://{host}:{port}{prefix.rstrip('/')}"
        print(f"starting the scoring service on {url} (OpenAPI at {url}/docs)", flush=True)
        serve.start(http_options={"host": host, "port": port})
        target = ScoringService.options(**options) if options else ScoringService
        serve.run(target.bind(**args), name=name, route_prefix=prefix)
        print(f"serving on {url}; Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()

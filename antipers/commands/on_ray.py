"""The commands that start or join a Ray cluster: ``run``, ``search``, ``serve`` and
``demo``. Their options are checked here, before Ray starts; the work itself is in
``antipers.cluster.commands``, the only place that imports ray."""

from __future__ import annotations

import argparse
from typing import Any

from antipers.cluster import ROLES
from antipers.commands.common import CLIError


def _per_role(text: str | None, flag: str, whole: bool = False) -> dict[str, float] | None:
    """``2`` (every role) or ``attack=2,scoring=0.5`` -> {role: value}."""
    if not text:
        return None
    out: dict[str, float] = {}
    for item in text.split(","):
        role, sep, value = item.rpartition("=")
        roles = [role.strip()] if sep else list(ROLES)
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise CLIError(f"{flag} {text!r}: unknown role {bad[0]!r}; roles: {', '.join(ROLES)}")
        try:
            number = float(value)
        except ValueError:
            raise CLIError(f"{flag} {text!r}: {value!r} is not a number") from None
        if number < 0 or (whole and (number < 1 or number != int(number))):
            kind = "a whole number >= 1" if whole else "a number >= 0"
            raise CLIError(f"{flag} {text!r}: expected {kind}, got {value!r}")
        out.update(dict.fromkeys(roles, number))
    return out


def _run_options(args: argparse.Namespace) -> Any:
    from antipers.cluster.commands import RunOptions

    if args.max_in_flight is not None and args.max_in_flight < 1:
        raise CLIError(f"--max-in-flight: expected >= 1, got {args.max_in_flight}")
    if args.retries < 0:
        raise CLIError(f"--retries: expected >= 0, got {args.retries}")
    if args.device and args.device != "auto":
        import torch

        try:  # the workers pick the device; only the name can be checked here
            torch.device(args.device)
        except RuntimeError:
            raise CLIError(f"--device {args.device!r}: expected cpu, cuda or cuda:N") from None
    return RunOptions(
        address=args.address,
        max_in_flight=args.max_in_flight,
        retries=args.retries,
        workers=_per_role(args.workers, "--workers", whole=True),
        cpus=_per_role(args.cpus, "--cpus"),
        gpus=_per_role(args.gpus, "--gpus"),
        device=args.device,
        progress=not args.no_progress,
        images=args.images == "thumbnails",
    )


def _cluster_call(fn: Any, *a: Any) -> Any:
    from antipers.cluster.runtime import ClusterError

    try:
        return fn(*a)
    except ClusterError as exc:
        raise CLIError(str(exc)) from None


def cmd_run(args: argparse.Namespace) -> int:
    from antipers.campaign import load_campaign
    from antipers.cluster.commands import print_report, run
    from antipers.results import ResultStore

    campaign = load_campaign(args.campaign)  # every check before Ray starts
    options = _run_options(args)
    store = ResultStore(args.store)
    report = _cluster_call(run, campaign, store, options)
    print_report(report, store, campaign)
    return 0 if report.failed == 0 else 1


def cmd_search(args: argparse.Namespace) -> int:
    from antipers.cluster.commands import search
    from antipers.results import ResultStore
    from antipers.search import load_search

    spec = load_search(args.search)  # every check before Ray starts
    return _cluster_call(search, spec, ResultStore(args.store), args.address, args.resume)


def cmd_serve(args: argparse.Namespace) -> int:
    from antipers.cluster.commands import serve_forever

    if args.port is not None and not 1 <= args.port <= 65535:
        raise CLIError(f"--port: expected 1..65535, got {args.port}")
    return _cluster_call(serve_forever, args.config, args.host, args.port, args.address)


def cmd_demo(args: argparse.Namespace) -> int:
    from antipers.cluster.commands import demo

    report = _cluster_call(demo, args.out, _run_options(args))
    return 0 if report.failed == 0 else 1

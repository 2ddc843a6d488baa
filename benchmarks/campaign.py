"""What running a campaign on Ray costs and saves, on one set of specs.

Prints one table: the median wall time over ``--repeats`` runs of the same campaign
  - in-process with one resident ``RunContext`` (the baseline),
  - in-process with a fresh ``RunContext`` per experiment (base model and metric models
    reloaded every time),
  - on Ray with resident workers, one experiment in flight (no stage overlap),
  - on Ray with resident workers and the default in-flight bound (stages overlap),
each with its ratio to the baseline. Ray's start-up is reported once, outside the
ratios; worker start-up (imports, model loads) is inside the Ray rows, as a user
pays it for every campaign.

    python benchmarks/campaign.py                         # tiny, CPU, a few minutes
    python benchmarks/campaign.py --model sd15-arch --resolution 512 --identities 4
    python benchmarks/campaign.py --campaign antipers/campaigns/demo.yaml --repeats 1

With ``--campaign`` the specs are that file's (``antipers demo``'s: its wall time on
this machine, each mode once, about 20 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

from _harness import median_seconds

from antipers.pipeline import RunContext, run_experiment
from antipers.results import ResultStore
from antipers.spec import ExperimentSpec


def specs(args: argparse.Namespace) -> list[ExperimentSpec]:
    if args.campaign:
        from antipers.campaign import load_campaign

        return list(load_campaign(args.campaign).specs)
    base = {
        "suite": "bench-campaign",
        "base_model": args.model,
        "dataset": {"name": "synthetic", "n_identities": args.identities},
        "defense": {"name": "aspl", "eps": 8, "iterations": 2, "pgd_steps": 2},
        "attack": {"name": "lora", "steps": args.attack_steps, "prior_weight": 0.0},
        "sampling": {"name": "cfg", "steps": 4, "images_per_prompt": 1},
        "metrics": ["fdfr", "ism", "psnr"],
        "resolution": args.resolution,
    }
    return [
        ExperimentSpec.from_dict({**base, "identity": f"synth-{i:04d}", "seed": seed})
        for i in range(args.identities)
        for seed in range(args.seeds)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--identities", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--attack-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--campaign", help="a campaign file's specs instead (e.g. the demo's)")
    args = parser.parse_args()

    import ray

    from antipers.cluster.driver import run_campaign
    from antipers.cluster.runtime import connect
    from antipers.cluster.workers import WorkerPlan, start_workers

    todo = specs(args)
    run_experiment(todo[0], RunContext(), raise_errors=True)  # warm caches and imports

    def resident() -> None:
        ctx = RunContext()
        for spec in todo:
            run_experiment(spec, ctx, raise_errors=True)

    def reloading() -> None:
        for spec in todo:
            run_experiment(spec, RunContext(), raise_errors=True)

    plan = WorkerPlan.for_cluster(has_gpus=False)

    def on_ray(max_in_flight: int | None) -> Callable[[], None]:
        def run() -> None:
            with tempfile.TemporaryDirectory() as store:
                report = run_campaign(
                    todo, ResultStore(store), plan, max_in_flight=max_in_flight, progress=False
                )
                if report.failed:
                    raise RuntimeError(f"benchmark campaign failed: {report.failures}")

        return run

    def workers_ready() -> None:
        pools = start_workers(plan)
        actors = [a for pool in pools.values() for a in pool.actors]
        ray.get([a.info.remote() for a in actors])
        for actor in actors:
            ray.kill(actor)

    t0 = time.perf_counter()
    connect(num_cpus=plan.demand()["CPU"], object_store_memory=300 * 2**20)
    startup = time.perf_counter() - t0
    ready = median_seconds(workers_ready, args.repeats, warmup=False)
    rows = [
        ("in-process, resident models", median_seconds(resident, args.repeats, warmup=False)),
        (
            "in-process, reload per experiment",
            median_seconds(reloading, args.repeats, warmup=False),
        ),
        (
            "Ray, resident workers, 1 in flight",
            median_seconds(on_ray(1), args.repeats, warmup=False),
        ),
        (
            "Ray, resident workers, stages overlap",
            median_seconds(on_ray(None), args.repeats, warmup=False),
        ),
    ]
    ray.shutdown()

    baseline = rows[0][1]
    what = args.campaign or (
        f"{args.model}, {args.resolution} px, aspl + lora {args.attack_steps} steps"
    )
    print(
        f"\n{len(todo)} experiments ({what}), median of {args.repeats}; "
        f"Ray start-up {startup:.1f} s"
    )
    print(f"starting the three workers (imports, before any model loads): {ready:.1f} s")
    print(f"{'mode':<40} {'total s':>9} {'s/exp':>8} {'vs baseline':>12}")
    for name, seconds in rows:
        per_exp, ratio = seconds / len(todo), seconds / baseline
        print(f"{name:<40} {seconds:>9.1f} {per_exp:>8.2f} {ratio:>11.2f}x")
    for name, seconds in rows[2:]:
        steady = seconds - ready
        print(
            f"{name + ' - start':<40} {steady:>9.1f} {steady / len(todo):>8.2f} "
            f"{steady / baseline:>11.2f}x"
        )


if __name__ == "__main__":
    main()

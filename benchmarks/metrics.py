"""Images per second of each metric that can run here, on the CPU at 512 px.

Metrics whose weights are not configured are listed as unavailable with the reason.
Each metric is built once and warmed up on one batch (models load once per worker,
as in a campaign), then timed over ``--repeats`` runs on ``--images`` images; the
table shows the median and the ratio to FDFR (face detection alone) from the same run.

    python benchmarks/metrics.py [--images 8] [--resolution 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from antipers.data.synthetic import SyntheticDataset
from antipers.metrics.base import UNAVAILABLE, ScoreInputs, evaluate
from antipers.registry import METRICS


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--metrics", nargs="+", default=METRICS.names())
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    ds = SyntheticDataset(n_identities=2, photos_per_set=args.images)
    me, other = ds.load("synth-0000", args.resolution), ds.load("synth-0001", args.resolution)
    prompts = ("a photo of sks person",) * args.images

    def fresh(run: int) -> ScoreInputs:
        # new pixels for every run of every metric, so the face-analysis cache (shared
        # by FDFR, ISM and linkability in a real run) does not hide any metric's own cost
        shift = (run % 200 + 1) / 255.0
        return ScoreInputs(
            generated=(me.set_B + shift).clamp(0, 1),
            references=me.set_A,
            identity="synth-0000",
            prompts=prompts,
            protected=(me.set_C + shift).clamp(0, 1),
            clean=me.set_C,
            gallery={"synth-0000": me.set_A, "synth-0001": other.set_A},
        )

    rows = []
    runs = iter(range(10**6))
    for name in args.metrics:
        metric = METRICS.build(name)
        warm = evaluate(metric, fresh(next(runs)))
        if warm.status == UNAVAILABLE:
            rows.append((name, None, warm.reason))
            continue
        times = []
        for _ in range(args.repeats):
            inputs = fresh(next(runs))
            t0 = time.perf_counter()
            evaluate(metric, inputs)
            times.append(time.perf_counter() - t0)
        rows.append((name, args.images / statistics.median(times), ""))

    base = next((ips for name, ips, _ in rows if name == "fdfr" and ips), None)
    print(f"{args.images} images at {args.resolution} px on the CPU, median of {args.repeats}")
    print(f"{'metric':<13}{'images/s':>10}{'x fdfr':>8}  note")
    for name, ips, reason in rows:
        if ips is None:
            print(f"{name:<13}{'-':>10}{'-':>8}  unavailable: {reason[:90]}")
        else:
            ratio = ips / base if base else float("nan")
            print(f"{name:<13}{ips:>10.2f}{ratio:>8.2f}")


if __name__ == "__main__":
    main()

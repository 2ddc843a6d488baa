"""Latency and throughput of ``POST /v1/score`` over HTTP on 127.0.0.1.

Starts Ray and the scoring service here (tiny base model, 64 px by default), sends
requests of 1 and of 4 photos with their originals at concurrency 1, 4 and 16, with
request batching off (``max_requests: 1``, the baseline, the CPU default) and on (up
to 8 requests pooled in micro-batches of 4 or of 16 photos, 16 the GPU default), and
prints one table: p50 and p99 latency and requests per second, with throughput as a
ratio to the unbatched service at concurrency 1 for the same upload size, measured in
the same run. Purification is left out of the default countermeasures
(``--countermeasures``): on a CPU it dominates every request.

    python benchmarks/serve.py [--requests 16] [--photos 1,4] [--countermeasures ...]
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
from PIL import Image


def photos(n: int, resolution: int) -> tuple[list[bytes], list[bytes]]:
    from antipers.images import to_uint8
    from antipers.registry import DATASETS

    person = DATASETS.build("synthetic", {"n_identities": 1}).load("synth-0000", resolution)
    clean = to_uint8(person.set_B[:n])
    noise = np.random.default_rng(0).integers(-8, 9, clean.shape)
    protected = np.clip(clean.astype(int) + noise, 0, 255).astype(np.uint8)

    def encode(arrays: np.ndarray) -> list[bytes]:
        out = []
        for a in arrays:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out

    return encode(protected), encode(clean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--photos", default="1,4", help="photos per request, a list")
    parser.add_argument("--requests", type=int, default=16, help="per concurrency level")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--countermeasures", default="jpeg,blur,resize")
    args = parser.parse_args()

    from ray import serve

    from antipers.cluster.runtime import connect
    from antipers.cluster.scoring import app

    connect(object_store_memory=200 * 2**20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/score"
    options = {"options": json.dumps({"countermeasures": args.countermeasures.split(",")})}
    levels = [int(x) for x in args.levels.split(",")]
    rows = []
    modes = {
        "off": {"max_requests": 1, "micro_batch": 4},
        "8x4": {"max_requests": 8, "micro_batch": 4},
        "8x16": {"max_requests": 8, "micro_batch": 16},
    }
    for mode, batching in modes.items():
        config = {"base_model": args.model, "resolution": args.resolution, "batching": batching}
        serve.run(app(config), name="bench", route_prefix="/")
        for n in (int(x) for x in args.photos.split(",")):
            protected, clean = photos(n, args.resolution)
            files = [("protected", (f"p{i}.png", b, "image/png")) for i, b in enumerate(protected)]
            files += [("clean", (f"c{i}.png", b, "image/png")) for i, b in enumerate(clean)]

            def one(_: int, files: list = files) -> float:
                t0 = time.perf_counter()
                response = requests.post(url, files=files, data=options, timeout=600)
                response.raise_for_status()
                return time.perf_counter() - t0

            one(0)  # warm-up: the first request builds the face backend's caches
            for level in levels:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(max_workers=level) as pool:
                    latencies = list(pool.map(one, range(args.requests)))
                wall = time.perf_counter() - t0
                p50, p99 = np.percentile(latencies, [50, 99])
                rows.append((n, mode, level, p50, p99, args.requests / wall))
        serve.delete("bench")
    serve.shutdown()

    base = {n: rps for n, mode, level, _, _, rps in rows if mode == "off" and level == levels[0]}
    print(
        f"\n/v1/score with originals, {args.model} at {args.resolution} px, countermeasures "
        f"{args.countermeasures}, {args.requests} requests per level, 1 replica"
    )
    print(
        f"{'photos':>6} {'batching':>8} {'concurrency':>11} {'p50 s':>8} {'p99 s':>8} "
        f"{'req/s':>8} {'vs off,c=' + str(levels[0]):>11}"
    )
    for n, mode, level, p50, p99, rps in sorted(
        rows, key=lambda r: (r[0], list(modes).index(r[1]))
    ):
        print(
            f"{n:>6} {mode:>8} {level:>11} {p50:>8.3f} {p99:>8.3f} {rps:>8.2f} "
            f"{rps / base[n]:>10.2f}x"
        )


if __name__ == "__main__":
    main()

"""Latency and throughput of ``POST /v1/score`` over HTTP on 127.0.0.1.

Starts Ray and the scoring service here (tiny base model, 64 px by default), sends
requests of 4 photos with their originals at concurrency 1, 4 and 16, and prints one
table: p50 and p99 latency and requests per second per level, with throughput as a
ratio to concurrency 1 measured in the same run. Purification is left out of the
default countermeasures (``--countermeasures``): on a CPU it dominates every request.

    python benchmarks/serve.py [--requests 16] [--countermeasures jpeg,blur,resize,purify]
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
    parser.add_argument("--photos", type=int, default=4)
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
    config = {"base_model": args.model, "resolution": args.resolution}
    serve.run(app(config), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/score"
    protected, clean = photos(args.photos, args.resolution)
    files = [("protected", (f"p{i}.png", b, "image/png")) for i, b in enumerate(protected)]
    files += [("clean", (f"c{i}.png", b, "image/png")) for i, b in enumerate(clean)]
    options = {"options": json.dumps({"countermeasures": args.countermeasures.split(",")})}

    def one(_: int) -> float:
        t0 = time.perf_counter()
        response = requests.post(url, files=files, data=options, timeout=600)
        response.raise_for_status()
        return time.perf_counter() - t0

    one(0)  # warm-up: first request builds the face backend's caches
    rows = []
    for level in (int(x) for x in args.levels.split(",")):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=level) as pool:
            latencies = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - t0
        rows.append((level, *np.percentile(latencies, [50, 99]), args.requests / wall))
    serve.shutdown()

    base = rows[0][3]
    print(
        f"\n/v1/score, {args.photos} photos + originals, {args.model} at {args.resolution} px, "
        f"countermeasures {args.countermeasures}, {args.requests} requests per level, 1 replica"
    )
    print(f"{'concurrency':>11} {'p50 s':>8} {'p99 s':>8} {'req/s':>8} {'vs c=1':>8}")
    for level, p50, p99, rps in rows:
        print(f"{level:>11} {p50:>8.3f} {p99:>8.3f} {rps:>8.2f} {rps / base:>7.2f}x")


if __name__ == "__main__":
    main()

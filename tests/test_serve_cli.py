"""`antipers serve` as a user starts it: a subprocess that joins Ray, serves HTTP on
127.0.0.1 from a Serve config, refuses bad requests by name, and stops on Ctrl-C."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

requests = pytest.importorskip("requests")


TOKEN = "tok-3f9a7c1e-never-logged"
LIMITS = {
    "max_images": 3,
    "max_bytes": 400_000,
    "max_pixels": 128 * 128,
    "max_attack_steps": 50,
    "max_class_images": 4,
    "max_sampling_steps": 10,
    "max_sampling_images": 4,
    "max_countermeasures": 2,
    "max_purify_steps": 5,
}


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(ray_address, tmp_path_factory):
    """A real `antipers serve` with a token and small limits; its output in a file."""
    import yaml

    root = tmp_path_factory.mktemp("served")
    args = {"base_model": "tiny", "resolution": 64, "token": TOKEN, "limits": LIMITS}
    args["store"] = str(root / "store")
    app = {"name": "scoring", "import_path": "antipers.cluster.scoring:app", "args": args}
    config = root / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [app]}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (root / "serve.log").open("w")
    command = [sys.executable, "-m", "antipers.cli", "serve", "--config", str(config)]
    command += ["--port", str(port), "--address", ray_address]
    server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.poll() is None:
        try:  # the proxy answers 404 until the application is deployed
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    try:
        yield Served(url, root / "serve.log", server)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
        log.close()


@dataclass
class Served:
    url: str
    log: Path
    process: subprocess.Popen


def test_the_service_answers_healthz_and_docs(served):
    health = requests.get(f"{served.url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["base_model"] == "tiny"
    assert health["limits"]["max_images"] == LIMITS["max_images"]
    docs = requests.get(f"{served.url}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def _face() -> bytes:
    rng = np.random.default_rng(0)
    return _png(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _files(protected: int = 1, references: int = 1) -> list:
    face = _face()
    return [("protected", (f"p{i}.png", face, "image/png")) for i in range(protected)] + [
        ("references", (f"r{i}.png", face, "image/png")) for i in range(references)
    ]


AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCORE, EVAL = "/v1/score", "/v1/evaluations"
# (what, path, files, options, headers, status, words the refusal must contain)
BAD_REQUESTS = [
    ("no token", SCORE, _files, None, {}, 401, "bearer token"),
    ("a wrong token", SCORE, _files, None, {"Authorization": "Bearer nope"}, 401, "bearer"),
    ("not multipart", SCORE, None, None, AUTH, 415, "multipart/form-data"),
    (
        "text instead of a photo",
        SCORE,
        lambda: [("protected", ("a.txt", b"hello", "text/plain"))],
        None,
        AUTH,
        415,
        "protected[0]: not an image",
    ),
    ("too many photos", SCORE, lambda: _files(4, 0), None, AUTH, 413, "limit of 3"),
    (
        "too many pixels",
        SCORE,
        lambda: [("protected", ("big.png", _png(np.zeros((200, 200, 3), np.uint8)), "image/png"))],
        None,
        AUTH,
        413,
        "200x200 pixels exceeds the limit of 16384",
    ),
    ("options not JSON", SCORE, _files, "{oops", AUTH, 422, "options: not valid JSON"),
    (
        "a countermeasure list over the limit",
        SCORE,
        _files,
        {"countermeasures": ["jpeg", "blur", "flip"]},
        AUTH,
        422,
        "limits.max_countermeasures",
    ),
    (
        "purification over the step limit",
        SCORE,
        _files,
        {"countermeasures": [{"name": "purify", "steps": 20}]},
        AUTH,
        422,
        "options.countermeasures[0].steps: 20 exceeds this service's limit of 5",
    ),
    (
        "a countermeasure not offered",
        SCORE,
        _files,
        {"countermeasures": ["mix"]},
        AUTH,
        422,
        "'mix' is not offered over HTTP",
    ),
    (
        "a metric's weights file",
        EVAL,
        _files,
        {"metrics": [{"name": "lpips", "weights": "/etc/passwd"}]},
        AUTH,
        422,
        "options.metrics[0].weights: not accepted over HTTP",
    ),
    (
        "a model folder for a metric",
        EVAL,
        _files,
        {"metrics": [{"name": "clip-i", "path": "/etc"}]},
        AUTH,
        422,
        "options.metrics[0].path: not accepted over HTTP",
    ),
    (
        "a dataset root",
        EVAL,
        _files,
        {"dataset": {"name": "celeba-hq", "root": "/"}},
        AUTH,
        422,
        "options.dataset: unknown",
    ),
    (
        "attack steps over the limit",
        EVAL,
        _files,
        {"attack": {"name": "lora", "steps": 5000, "prior_weight": 0}},
        AUTH,
        422,
        "options.attack.steps: 5000 exceeds this service's limit of 50",
    ),
    (
        "the default attack's 1000 steps",
        EVAL,
        _files,
        {"attack": "dreambooth"},
        AUTH,
        422,
        "options.attack.steps: 1000 exceeds",
    ),
    (
        "sampling steps over the limit",
        EVAL,
        _files,
        {
            "attack": {"name": "lora", "steps": 2, "prior_weight": 0},
            "sampling": {"name": "cfg", "steps": 50, "images_per_prompt": 1},
        },
        AUTH,
        422,
        "options.sampling.steps: 50 exceeds",
    ),
    (
        "too many generated images",
        EVAL,
        _files,
        {
            "attack": {"name": "lora", "steps": 2, "prior_weight": 0},
            "sampling": {"name": "cfg", "steps": 2, "images_per_prompt": 8},
        },
        AUTH,
        422,
        "limits.max_sampling_images",
    ),
    (
        "too many class images",
        EVAL,
        _files,
        {
            "attack": {"name": "lora", "steps": 2, "num_class_images": 200},
            "sampling": {"name": "cfg", "steps": 2, "images_per_prompt": 1},
        },
        AUTH,
        422,
        "options.attack.num_class_images: 200 exceeds",
    ),
    (
        "a countermeasure chain over the limit",
        EVAL,
        _files,
        {"countermeasure": ["jpeg", "blur", "flip"]},
        AUTH,
        422,
        "options.countermeasure: 3 countermeasures exceed",
    ),
    (
        "a name that is not a string",
        EVAL,
        _files,
        {"attack": {"name": [1]}},
        AUTH,
        422,
        "options.attack: [1] is not offered",
    ),
    (
        "gradient accumulation (work per step)",
        EVAL,
        _files,
        {"attack": {"name": "lora", "steps": 2, "grad_accum": 100000}},
        AUTH,
        422,
        "options.attack.grad_accum: not accepted over HTTP",
    ),
    (
        "a LoRA rank over the limit",
        EVAL,
        _files,
        {"attack": {"name": "lora", "steps": 2, "rank": 4096, "prior_weight": 0}},
        AUTH,
        422,
        "options.attack.rank: 4096 exceeds this service's limit of 64",
    ),
    (
        "a sampler setting not offered",
        EVAL,
        _files,
        {"sampling": {"name": "cfg", "batch_size": 512}},
        AUTH,
        422,
        "options.sampling.batch_size: not accepted over HTTP",
    ),
]


@pytest.mark.parametrize(
    "what,path,files,options,headers,status,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_a_real_service_refuses_each_bad_request_by_name(
    served, what, path, files, options, headers, status, words
):
    url = served.url
    data = None
    if options is not None:
        data = {"options": options if isinstance(options, str) else json.dumps(options)}
    if files is None:
        response = requests.post(
            f"{url}{path}", json={"protected": []}, headers=headers, timeout=60
        )
    else:
        response = requests.post(
            f"{url}{path}", files=files(), data=data, headers=headers, timeout=60
        )
    assert response.status_code == status, response.text
    assert words in response.json()["error"], response.text
    assert TOKEN not in response.text
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and LIMITS.items() <= health["limits"].items()


def test_the_token_is_in_no_log_line(served, ray_address):
    import ray

    url, log = served.url, served.log
    ok = requests.post(
        f"{url}{SCORE}",
        files=_files(),
        data={"options": json.dumps({"countermeasures": ["jpeg"]})},
        headers=AUTH,
        timeout=120,
    )
    assert ok.status_code == 200, ok.text
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = [log, *(p for p in (session / "logs").rglob("*") if p.is_file())]
    assert len(logs) > 5
    leaked = [p for p in logs if TOKEN.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_ctrl_c_stops_the_service_cleanly(served):
    """Last in this module: it ends the shared service, as a user's Ctrl-C would."""
    served.process.send_signal(signal.SIGINT)
    assert served.process.wait(timeout=60) == 0
    assert served.url in served.log.read_text()
    with pytest.raises(requests.RequestException):
        requests.get(f"{served.url}/healthz", timeout=5)

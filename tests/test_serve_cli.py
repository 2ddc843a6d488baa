"""`antipers serve` as a user starts it: a subprocess that joins Ray, serves HTTP on
127.0.0.1 from serve/scoring.yaml, and stops on Ctrl-C."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

requests = pytest.importorskip("requests")


def test_antipers_serve_answers_healthz_and_stops_on_ctrl_c(ray_address):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "antipers.cli", "serve", "--config", "serve/scoring.yaml"]
    command += ["--port", str(port), "--address", ray_address]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        deadline, health = time.monotonic() + 180, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
                break
            except requests.RequestException:  # proxy up before the app is deployed
                time.sleep(0.5)
        assert health is not None and health["status"] == "ok", "the service did not come up"
        assert health["base_model"] == "tiny" and health["limits"]["max_images"] == 16
        docs = requests.get(f"http://127.0.0.1:{port}/docs", timeout=10)
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
    finally:
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=60)
    assert server.returncode == 0 and f"http://127.0.0.1:{port}" in out

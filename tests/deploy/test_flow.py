"""The deployment loop on loopback: a server on models/current, `nextoken retrain` publishes, the server follows.

Glue between the registry, the retrain job and the server's hot reload (tests/serve/test_reload.py
tests the reload itself in depth): the publish the job does is one the server picks up by itself,
with no failed request while it happens, neither from a request loop nor from `nextoken-loadtest`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from nextoken.registry import current_version, publish
from tests.conftest import ServerProcess
from tests.nextoken.test_retrain import TINY


def _model_id(url: str) -> str:
    return httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]


@pytest.mark.slow
def test_retrain_publishes_and_the_running_server_switches(tiny_run: Path, tiny_artifact: Path, tiny_corpus: Path,
                                                           tmp_path: Path) -> None:
    models = tmp_path / "models"
    publish(tiny_artifact, models, run_dir=tiny_run)  # version 1, with the run a retrain continues
    server = ServerProcess(models / "current", "--max-batch-size", "4")
    stop = threading.Event()
    results: list[tuple[int, str | None]] = []

    def load() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(server.url + "/v1/completions", json={"prompt": "the", "max_tokens": 12})
                results.append((r.status_code, r.json().get("model")))

    thread = threading.Thread(target=load)
    report = tmp_path / "loadtest.json"
    loadtest = None
    try:
        assert _model_id(server.url) == "tiny:1"
        thread.start()
        # The load tester runs open-loop beside the request thread for ~15 s, across the switch.
        loadtest = subprocess.Popen(["nextoken-loadtest", "--base-url", server.url, "--request-rate", "20",
                                     "--num-requests", "300", "--warmup", "0", "--input-len", "2",
                                     "--output-len", "8", "--json-out", str(report), "--no-progress"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        job = subprocess.run([sys.executable, "-m", "nextoken", "retrain", "--models-dir", str(models),
                              "--data", str(tiny_corpus), "--max-iters", "10", *TINY[-5:]],
                             capture_output=True, text=True, timeout=240)
        assert job.returncode == 0, job.stderr
        assert "published version 2 (continue from version 1)" in job.stdout
        assert current_version(models) == "2"
        deadline = time.monotonic() + 30
        while _model_id(server.url) != "tiny:2" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _model_id(server.url) == "tiny:2"
        n = len(results)
        deadline = time.monotonic() + 30
        while len(results) < n + 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert loadtest.wait(120) == 0
    finally:
        stop.set()
        thread.join(60)
        if loadtest is not None and loadtest.poll() is None:
            loadtest.kill()
        server.stop()
    level = json.loads(report.read_text())["levels"][0]
    assert level["completed"] == 300 and level["failed"] == 0, level["failures"]
    assert results and all(code == 200 for code, _ in results), results[-5:]
    served = [m for _, m in results]
    assert served[0] == "tiny:1" and served[-1] == "tiny:2"

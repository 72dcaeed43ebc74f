"""Hot reload under load: a new version takes over with no failed request; a corrupt one is refused."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, metric, republish


def point_current(models: Path, version: str) -> None:
    """Swap models/current atomically (a reader sees the old or the new version, never neither)."""
    tmp = models / f".current.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version)
    os.replace(tmp, models / "current")


@pytest.fixture()
def models(tmp_path: Path, serve_artifact: Path) -> Path:
    models = tmp_path / "models"
    for version in ("1", "2"):
        republish(serve_artifact, models / version, version=version)
    point_current(models, "1")
    return models


def wait_for(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_new_version_under_load_then_a_corrupt_one_is_refused(models: Path) -> None:
    s = ServerProcess(models / "current", "--max-batch-size", "8")
    stop = threading.Event()
    results: list[tuple[int, str | None]] = []

    def load() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(s.url + "/v1/completions", json={"prompt": "the", "max_tokens": 40, "ignore_eos": True})
                results.append((r.status_code, r.json().get("model")))

    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        assert httpx.get(s.url + "/v1/models").json()["data"][0]["id"] == "tiny-serve:1"
        for t in threads:
            t.start()
        assert wait_for(lambda: len(results) >= 8)
        point_current(models, "2")
        assert wait_for(lambda: httpx.get(s.url + "/v1/models").json()["data"][0]["id"] == "tiny-serve:2")
        n = len(results)
        assert wait_for(lambda: len(results) >= n + 8)
        # the old version is freed once its last request finished
        assert wait_for(lambda: metric(s.url, "nextoken_models_loaded") == 1)

        # version 3 is corrupt: published like the others, then its weights changed under the manifest
        republish(models / "2", models / "3", version="3")
        with open(models / "3" / "model.onnx", "r+b") as f:
            f.seek(100)
            f.write(b"\x00garbage\x00")
        point_current(models, "3")
        r = httpx.post(s.url + "/admin/reload")
        assert r.status_code == 202
        assert wait_for(lambda: metric(s.url, "nextoken_model_reload_failures_total") >= 1)
        # The engine's once-a-second look and the forced one may each try it: every refusal is counted once.
        time.sleep(1.5)
        refusals = s.output().count("refusing the model at")
        assert refusals in (1, 2) and metric(s.url, "nextoken_model_reload_failures_total") == refusals
        # labelled as every other series is, name:version (its manifest is intact; its weights are not)
        assert metric(s.url, "nextoken_model_reload_failures_total", model="tiny-serve:3") == refusals
        m = len(results)
        assert wait_for(lambda: len(results) >= m + 8)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        try:
            info = httpx.get(s.url + "/admin/reload", timeout=5)  # GET is not a route: 405, server still alive
            assert info.status_code == 405
            assert httpx.get(s.url + "/v1/models").json()["data"][0]["id"] == "tiny-serve:2"
        finally:
            s.stop()
    assert results and all(code == 200 for code, _ in results)  # not one failed request
    served = [model for _, model in results]
    assert served[0] == "tiny-serve:1" and served[-1] == "tiny-serve:2"
    first_v2 = served.index("tiny-serve:2")
    assert all(mdl == "tiny-serve:2" for mdl in served[first_v2 + 8:])  # new requests come from version 2
    assert "tiny-serve:3" not in served  # the corrupt version never served a request

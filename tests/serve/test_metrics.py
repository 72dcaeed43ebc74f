"""Prometheus metrics: exact counts for known traffic, and a real Prometheus scraping the server."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, ServerProcess, free_port
from tests.serve.test_server import metric, post

N, M = 3, 5  # N finished requests of M tokens each


@pytest.fixture(scope="module")
def fresh(serve_artifact: Path):
    s = ServerProcess(serve_artifact, "--max-batch-size", "4")
    yield s
    s.stop()


def test_every_figure_is_true_for_known_traffic(fresh: ServerProcess) -> None:
    url = fresh.url
    assert post(url, {"prompt": "x", "max_tokens": 1}).status_code == 200  # one more finished by length
    for _ in range(N):
        r = post(url, {"prompt": "the cat", "max_tokens": M, "ignore_eos": True})
        assert r.status_code == 200
    # one cancelled: the client walks away after the first chunk
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"prompt": "the", "max_tokens": 500, "ignore_eos": True, "stream": True}) as r:
        next(r.iter_lines())
    # one rejected
    assert post(url, {"prompt": "the", "temperature": 9}).status_code == 400
    time.sleep(0.5)  # the cancelled request's bookkeeping happens when its stream closes

    model = {"model": "tiny-serve:1"}
    assert metric(url, "nextoken_requests_total", endpoint="completions", outcome="length", **model) == N + 1
    assert metric(url, "nextoken_requests_total", outcome="cancelled", **model) == 1
    assert metric(url, "nextoken_errors_total", kind="validation", **model) == 1
    # character tokens after the end-of-text token: "the cat" x N, "x", and the cancelled "the"
    assert metric(url, "nextoken_prompt_tokens_total", **model) == N * 8 + 2 + 4
    generated = metric(url, "nextoken_generation_tokens_total", **model)
    cancelled_tokens = generated - N * M - 1
    assert 1 <= cancelled_tokens < 500
    requests = N + 2
    assert metric(url, "nextoken_request_generation_tokens_count", **model) == requests
    assert metric(url, "nextoken_request_generation_tokens_sum", **model) == generated
    assert metric(url, "nextoken_request_prompt_tokens_count", **model) == requests
    assert metric(url, "nextoken_time_to_first_token_seconds_count", **model) == requests
    assert metric(url, "nextoken_inter_token_latency_seconds_count", **model) == generated - requests
    assert metric(url, "nextoken_request_latency_seconds_count", **model) == requests
    assert metric(url, "nextoken_queue_time_seconds_count", **model) == requests
    assert metric(url, "nextoken_engine_step_seconds_count", **model) >= generated / 4
    assert metric(url, "nextoken_requests_running", **model) == 0
    assert metric(url, "nextoken_requests_waiting", **model) == 0
    assert metric(url, "nextoken_kv_cache_usage_ratio", **model) == 0
    assert metric(url, "nextoken_build_info", backend="onnxruntime", provider="CPUExecutionProvider", **model) == 1
    # time to first token is below the request latency, both in seconds
    ttft = metric(url, "nextoken_time_to_first_token_seconds_sum", **model)
    e2e = metric(url, "nextoken_request_latency_seconds_sum", **model)
    assert 0 < ttft < e2e < 60


def test_metrics_pass_promtool(fresh: ServerProcess, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    text = httpx.get(fresh.url + "/metrics").text
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def test_a_real_prometheus_scrapes_and_queries(fresh: ServerProcess, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package prometheus; .ci/run installs it)")
    port = free_port()
    rules = REPO / "docker" / "prometheus" / "rules.yml"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "nextoken", "static_configs": [{"targets": [fresh.url.split("//")[1]]}]}],
    }
    if rules.is_file():  # load the shipped rules too: a real Prometheus must accept them
        config["rule_files"] = [str(rules)]
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    proc = subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    api = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        _wait_port(port)

        def query(q: str) -> list:
            body = httpx.get(api, params={"query": q}, timeout=10).json()
            assert body["status"] == "success", body
            return body["data"]["result"]

        deadline = time.monotonic() + 30
        while not query('up{job="nextoken"} == 1') and time.monotonic() < deadline:
            time.sleep(0.2)
        for _ in range(6):  # traffic across a few scrapes, so rate() has two samples to work with
            post(fresh.url, {"prompt": "the", "max_tokens": 20, "ignore_eos": True})
            time.sleep(0.5)
        ttft_q = "histogram_quantile(0.99, sum by (le) (rate(nextoken_time_to_first_token_seconds_bucket[1m])))"
        rate_q = "sum(rate(nextoken_generation_tokens_total[1m]))"
        deadline = time.monotonic() + 20
        ttft = rate = []
        while time.monotonic() < deadline:
            ttft, rate = query(ttft_q), query(rate_q)
            if ttft and rate and float(rate[0]["value"][1]) > 0 and ttft[0]["value"][1] != "NaN":
                break
            time.sleep(0.5)
        assert 0 < float(ttft[0]["value"][1]) < 60
        assert float(rate[0]["value"][1]) > 0
        if rules.is_file():
            groups = httpx.get(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10).json()["data"]["groups"]
            assert groups and all(rule["health"] != "err" for g in groups for rule in g["rules"])
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()

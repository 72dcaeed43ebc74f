"""Prometheus metrics: the module on known numbers, exact counts for known traffic, a real Prometheus.

The module tests run each scenario in a fresh process (prometheus_client picks multiprocess mode
when it is first imported, and the test process may have imported it already) and read the
merged exposition the `/metrics` route would serve.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nextoken import __version__
from nextoken.serve import metrics as M
from tests.conftest import REPO, ServerProcess, free_port, metric
from tests.serve.test_server import post

N, M_TOKENS = 3, 5  # N finished requests of M_TOKENS tokens each
MODEL = "tiny:1"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# --- the module, in fresh processes ------------------------------------------------------------
def run_metrics(code: str, tmp_path: Path, *, compat: str = "") -> str:
    """Run ``code`` (``ServerMetrics`` imported) in a fresh process whose metrics directory is
    ``tmp_path/mp``, prepared with ``compat``; return the merged exposition."""
    mp = tmp_path / "mp"
    script = textwrap.dedent("""
        import sys
        from nextoken.serve import metrics as M
        M.prepare_multiproc_dir(sys.argv[1], compat=sys.argv[2] or None)
        from nextoken.serve.metrics import ServerMetrics
    """) + textwrap.dedent(code) + "\nsys.stdout.write(M.render_latest()[0].decode())\n"
    res = subprocess.run([sys.executable, "-c", script, str(mp), compat], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def samples(text: str) -> Samples:
    """(sample name, sorted labels) -> value, as a scraper sees them."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(s: Samples, name: str, **labels: str) -> float:
    return s[(name, tuple(sorted(labels.items())))]


def label_values(s: Samples, name: str, label: str, **where: str) -> set[str]:
    return {dict(k)[label] for (n, k) in s if n == name and all(dict(k).get(a) == b for a, b in where.items())}


def test_precreate_writes_every_documented_series_at_zero(tmp_path: Path) -> None:
    s = samples(run_metrics(f"m = ServerMetrics(); m.precreate({MODEL!r})", tmp_path))
    for endpoint in M.ENDPOINTS:
        assert label_values(s, "nextoken_requests_total", "outcome", endpoint=endpoint) == set(M.OUTCOMES)
    assert label_values(s, "nextoken_errors_total", "kind") == set(M.ERROR_KINDS)
    assert label_values(s, "nextoken_model_reload_failures_total", "reason") == set(M.RELOAD_FAILURE_REASONS)
    for name in ("nextoken_prompt_tokens_total", "nextoken_generation_tokens_total", "nextoken_model_reloads_total",
                 "nextoken_requests_running", "nextoken_requests_waiting", "nextoken_kv_cache_usage_ratio"):
        assert value(s, name, model=MODEL) == 0, name
    for h in ("time_to_first_token_seconds", "inter_token_latency_seconds", "time_per_output_token_seconds",
              "request_latency_seconds", "queue_time_seconds", "request_prefill_time_seconds",
              "request_decode_time_seconds", "request_prompt_tokens", "request_generation_tokens",
              "engine_step_seconds", "batch_size"):
        assert value(s, f"nextoken_{h}_count", model=MODEL) == 0, h
    assert label_values(s, "nextoken_engine_step_phase_seconds_count", "phase") == set(M.STEP_PHASES)
    # Every nextoken_ series carries the model label, and no series exists for another model.
    assert all(dict(k).get("model") == MODEL for (n, k) in s if n.startswith("nextoken_"))
    assert not any(n.startswith("vllm:") for n, _ in s)  # the gateway names only with compat


def test_precreate_refuses_an_undocumented_endpoint(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="unknown endpoint label"):
        run_metrics(f"ServerMetrics().precreate({MODEL!r}, ['embeddings'])", tmp_path)


def test_build_info_and_models_loaded_follow_versions(tmp_path: Path) -> None:
    s = samples(run_metrics("""
        m = ServerMetrics()
        m.version_loaded("tiny:1", model_version="1", backend="onnxruntime", provider="CPUExecutionProvider")
        m.version_loaded("tiny:2", model_version="2", backend="onnxruntime", provider="CPUExecutionProvider")
        m.observe_step("tiny:1", batch_size=1, running=1, waiting=0, decode_s=0.01, kv_cache_usage=0.5)
        m.reloaded("tiny:2")
        m.version_freed("tiny:1")  # drained after the switch
    """, tmp_path))
    info = {k: v for (n, k), v in s.items() if n == "nextoken_build_info"}
    common = (("backend", "onnxruntime"), ("provider", "CPUExecutionProvider"), ("version", __version__))
    assert info == {tuple(sorted((("model", "tiny:1"), ("model_version", "1"), *common))): 0,
                    tuple(sorted((("model", "tiny:2"), ("model_version", "2"), *common))): 1}
    assert value(s, "nextoken_models_loaded", model="tiny:1") == 0
    assert value(s, "nextoken_models_loaded", model="tiny:2") == 1
    # The freed version's engine gauges are 0, its counters and histograms stay.
    assert value(s, "nextoken_requests_running", model="tiny:1") == 0
    assert value(s, "nextoken_kv_cache_usage_ratio", model="tiny:1") == 0
    assert value(s, "nextoken_engine_step_seconds_count", model="tiny:1") == 1
    assert value(s, "nextoken_model_reloads_total", model="tiny:2") == 1


def test_request_timings_are_vllms(tmp_path: Path) -> None:
    """TPOT = (latency - TTFT) / (tokens - 1); prefill = TTFT - queue; decode = last - first token."""
    s = samples(run_metrics("""
        m = ServerMetrics()
        # arrived at 10, joined the batch at 10.5, tokens at 11, 11.5, 13 (so TTFT 1, latency 3)
        m.observe_request("tiny:1", "completions", "length", arrival=10.0, first_token=11.0,
                          token_times=[11.0, 11.5, 13.0], prompt_tokens=4, generated_tokens=3, queue_time_s=0.5)
        # one token: a TTFT and a prefill, no TPOT (the first token is prefill's), decode 0
        m.observe_request("tiny:1", "chat", "stop", arrival=20.0, first_token=20.25, token_times=[20.25],
                          prompt_tokens=2, generated_tokens=1, queue_time_s=0.0)
        # the engine's own intervals win over the derived ones
        m.observe_request("tiny:1", "completions", "length", arrival=30.0, first_token=31.0,
                          token_times=[31.0, 32.0], prompt_tokens=2, generated_tokens=2, queue_time_s=0.25,
                          prefill_s=0.5, decode_s=0.75)
        # cancelled before its first token: counted, no timings
        m.observe_request("tiny:1", "completions", "cancelled", arrival=40.0, first_token=None, token_times=[],
                          prompt_tokens=2, generated_tokens=0, queue_time_s=None)
    """, tmp_path))
    m = {"model": MODEL}
    assert value(s, "nextoken_time_per_output_token_seconds_count", **m) == 2
    assert value(s, "nextoken_time_per_output_token_seconds_sum", **m) == pytest.approx((13 - 11) / 2 + 1.0)
    assert value(s, "nextoken_time_per_output_token_seconds_bucket", le="1.0", **m) == 2
    assert value(s, "nextoken_time_per_output_token_seconds_bucket", le="0.75", **m) == 0
    assert value(s, "nextoken_request_prefill_time_seconds_count", **m) == 3
    assert value(s, "nextoken_request_prefill_time_seconds_sum", **m) == pytest.approx(0.5 + 0.25 + 0.5)
    assert value(s, "nextoken_request_decode_time_seconds_count", **m) == 3
    assert value(s, "nextoken_request_decode_time_seconds_sum", **m) == pytest.approx(2.0 + 0.0 + 0.75)
    assert value(s, "nextoken_time_to_first_token_seconds_sum", **m) == pytest.approx(1.0 + 0.25 + 1.0)
    assert value(s, "nextoken_request_latency_seconds_sum", **m) == pytest.approx(3.0 + 0.25 + 2.0)
    assert value(s, "nextoken_inter_token_latency_seconds_count", **m) == 3
    assert value(s, "nextoken_requests_total", endpoint="completions", outcome="cancelled", **m) == 1
    assert value(s, "nextoken_generation_tokens_total", **m) == 6


def test_engine_steps_split_prefill_and_decode(tmp_path: Path) -> None:
    s = samples(run_metrics("""
        m = ServerMetrics()
        m.observe_step("tiny:1", prefill_s=0.004, decode_s=0.001, batch_size=3, running=3, waiting=2,
                       kv_cache_usage=0.125)
        m.observe_step("tiny:1", prefill_s=None, decode_s=0.002, batch_size=3, running=3, waiting=2,
                       kv_cache_usage=0.25)
        m.observe_step("tiny:1", prefill_s=None, decode_s=None, batch_size=0, running=0, waiting=0,
                       kv_cache_usage=0.0)  # a step that only dropped cancelled requests
        m.observe_step("tiny:1", prefill_s=0.003, decode_s=None, batch_size=1, running=1, waiting=0,
                       kv_cache_usage=0.03125)
    """, tmp_path))
    m = {"model": MODEL}
    assert value(s, "nextoken_engine_step_phase_seconds_count", phase="prefill", **m) == 2
    assert value(s, "nextoken_engine_step_phase_seconds_sum", phase="prefill", **m) == pytest.approx(0.007)
    assert value(s, "nextoken_engine_step_phase_seconds_count", phase="decode", **m) == 2
    assert value(s, "nextoken_engine_step_phase_seconds_sum", phase="decode", **m) == pytest.approx(0.003)
    assert value(s, "nextoken_engine_step_seconds_count", **m) == 3  # steps that ran a phase
    assert value(s, "nextoken_engine_step_seconds_sum", **m) == pytest.approx(0.010)
    assert value(s, "nextoken_batch_size_count", **m) == 3
    assert value(s, "nextoken_kv_cache_usage_ratio", **m) == 0.03125  # the engine's figure, as given
    assert value(s, "nextoken_requests_running", **m) == 1 and value(s, "nextoken_requests_waiting", **m) == 0


@pytest.mark.parametrize(("call", "message"), [
    ("batch_size=1, running=1, waiting=0, decode_s=0.1", "kv_cache_usage"),
    ("batch_size=1, running=1, waiting=0, kv_cache_usage=1.5", r"kv_cache_usage must be in \[0, 1\], got 1.5"),
    ("batch_size=1, running=1, waiting=0, kv_cache_usage=0.1, duration_s=0.1", "duration_s"),
])
def test_observe_step_refuses_mixed_or_bad_figures(tmp_path: Path, call: str, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        run_metrics(f"ServerMetrics().observe_step('tiny:1', {call})", tmp_path)


def test_reload_failure_reasons_are_the_documented_ones(tmp_path: Path) -> None:
    s = samples(run_metrics("""
        m = ServerMetrics()
        m.precreate("tiny:1")
        m.reload_failed("tiny:3", "invalid artifact")
        try:
            m.reload_failed("tiny:4", "disk on fire")
        except ValueError as e:
            assert "unknown reload failure reason 'disk on fire'" in str(e)
        else:
            raise SystemExit("an undocumented reason was accepted")
    """, tmp_path))
    assert value(s, "nextoken_model_reload_failures_total", model="tiny:3", reason="invalid artifact") == 1
    assert label_values(s, "nextoken_model_reload_failures_total", "model") == {"tiny:1", "tiny:3"}


def test_vllm_compat_exposes_one_series_per_gauge_summed_over_versions(tmp_path: Path) -> None:
    """What an endpoint picker reads: the first (here: only) series of each family, for the whole pod."""
    text = run_metrics("""
        m = ServerMetrics()  # compat from prepare_multiproc_dir's environment, as a child process gets it
        assert m.compat == "vllm"
        m.version_loaded("tiny:1", model_version="1", backend="onnxruntime", provider="CPUExecutionProvider")
        m.version_loaded("tiny:2", model_version="2", backend="onnxruntime", provider="CPUExecutionProvider")
        m.observe_step("tiny:1", decode_s=0.01, batch_size=3, running=3, waiting=0, kv_cache_usage=0.5)  # draining
        m.observe_step("tiny:2", prefill_s=0.01, batch_size=2, running=2, waiting=4, kv_cache_usage=0.25)
    """, tmp_path, compat="vllm")
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {M.VLLM_RUNNING: 5, M.VLLM_WAITING: 4, M.VLLM_KV_USAGE: 0.375, M.VLLM_KV_USAGE_OLD: 0.375}
    for name, want in expected.items():
        assert fams[name].type == "gauge"
        assert [(s.labels, s.value) for s in fams[name].samples] == [({}, want)], name
    # The draining version is freed: the pod's figures are the remaining version's.
    text = run_metrics("""
        m = ServerMetrics(compat="vllm")
        m.observe_step("tiny:1", decode_s=0.01, batch_size=3, running=3, waiting=0, kv_cache_usage=0.5)
        m.observe_step("tiny:2", prefill_s=0.01, batch_size=2, running=2, waiting=4, kv_cache_usage=0.25)
        m.version_freed("tiny:1")
    """, tmp_path)
    s = samples(text)
    assert value(s, M.VLLM_RUNNING) == 2 and value(s, M.VLLM_WAITING) == 4 and value(s, M.VLLM_KV_USAGE) == 0.25


def test_compat_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metrics compat must be one of vllm or None, got 'sglang'"):
        M.prepare_multiproc_dir(str(tmp_path / "x"), compat="sglang")
    with pytest.raises(AssertionError, match="got 'tgi'"):
        run_metrics("ServerMetrics(compat='tgi')", tmp_path)


def test_processes_merge_counters_and_keep_the_writers_gauges(tmp_path: Path) -> None:
    """Two processes on one directory (the API process and the engine's): counters and histograms
    add up; a gauge is its writer's (the engine process's), whatever the other process writes."""
    mp = tmp_path / "mp"
    env = {**os.environ, M.ENV: str(mp)}
    mp.mkdir()
    worker = textwrap.dedent("""
        from nextoken.serve.metrics import ServerMetrics
        m = ServerMetrics()
        m.observe_step("tiny:1", decode_s=0.01, batch_size=2, running=2, waiting=1, kv_cache_usage=0.5)
        m.error("tiny:1", "internal")
    """)
    api = textwrap.dedent("""
        from nextoken.serve.metrics import ServerMetrics
        m = ServerMetrics()
        m.error("tiny:1", "internal")
        m.error("tiny:1", "validation")
    """)
    subprocess.run([sys.executable, "-c", worker], env=env, check=True, timeout=60)
    subprocess.run([sys.executable, "-c", api], env=env, check=True, timeout=60)
    scrape = "import sys; from nextoken.serve import metrics as M; sys.stdout.write(M.render_latest()[0].decode())"
    s = samples(subprocess.run([sys.executable, "-c", scrape], env=env, capture_output=True, text=True,
                               check=True, timeout=60).stdout)
    assert value(s, "nextoken_errors_total", model=MODEL, kind="internal") == 2
    assert value(s, "nextoken_errors_total", model=MODEL, kind="validation") == 1
    assert value(s, "nextoken_requests_running", model=MODEL) == 2



def _promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    return exe


def test_exposition_passes_promtool_lint(tmp_path: Path) -> None:
    """nextoken's names pass `promtool check metrics`; the vLLM names fail only the colon rule
    (vLLM's own exposition fails it too: Prometheus reserves colons for recording rules)."""
    exe = _promtool()
    code = """
        m = ServerMetrics()
        m.version_loaded("tiny:1", model_version="1", backend="onnxruntime", provider="CPUExecutionProvider")
        m.observe_step("tiny:1", prefill_s=0.01, decode_s=0.01, batch_size=2, running=2, waiting=1,
                       kv_cache_usage=0.5)
    """
    plain = run_metrics(code, tmp_path)
    r = subprocess.run([exe, "check", "metrics"], input=plain, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    compat = run_metrics(code, tmp_path, compat="vllm")
    r = subprocess.run([exe, "check", "metrics"], input=compat, capture_output=True, text=True, timeout=60)
    problems = sorted(line for line in (r.stdout + r.stderr).splitlines() if line.strip())
    names = sorted((M.VLLM_KV_USAGE_OLD, M.VLLM_KV_USAGE, M.VLLM_RUNNING, M.VLLM_WAITING))
    assert problems == [f"{n} metric names should not contain ':'" for n in names]


# --- through a real server -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def fresh(serve_artifact: Path):
    s = ServerProcess(serve_artifact, "--max-batch-size", "4")
    # What a scraper sees before any traffic: every documented series, at 0.
    s.initial = samples(httpx.get(s.url + "/metrics", timeout=10).text)
    yield s
    s.stop()


def test_series_exist_at_zero_before_any_traffic(fresh: ServerProcess) -> None:
    s = fresh.initial
    model = "tiny-serve:1"
    for endpoint in M.ENDPOINTS:
        assert label_values(s, "nextoken_requests_total", "outcome", endpoint=endpoint, model=model) == set(M.OUTCOMES)
    assert label_values(s, "nextoken_errors_total", "kind", model=model) == set(M.ERROR_KINDS)
    counters = {k: v for k, v in s.items() if k[0].endswith("_total")}
    assert counters and set(counters.values()) == {0}
    assert value(s, "nextoken_time_per_output_token_seconds_count", model=model) == 0
    assert value(s, "nextoken_models_loaded", model=model) == 1
    assert all("model" in dict(k) for (n, k) in s if n.startswith("nextoken_"))


def test_every_figure_is_true_for_known_traffic(fresh: ServerProcess) -> None:
    url = fresh.url
    assert post(url, {"prompt": "x", "max_tokens": 1}).status_code == 200  # one more finished by length
    for _ in range(N):
        r = post(url, {"prompt": "the cat", "max_tokens": M_TOKENS, "ignore_eos": True})
        assert r.status_code == 200
    # one cancelled: the client walks away after the first chunk
    # (an attempt the tiny model finished before it could be abandoned is one more request of 500 tokens)
    extra = fresh.abandon_stream({"prompt": "the", "max_tokens": 500, "ignore_eos": True}).finished_first
    # one rejected
    assert post(url, {"prompt": "the", "temperature": 9}).status_code == 400

    model = {"model": "tiny-serve:1"}
    assert metric(url, "nextoken_requests_total", endpoint="completions", outcome="length", **model) == N + 1 + extra
    assert metric(url, "nextoken_requests_total", outcome="cancelled", **model) == 1
    assert metric(url, "nextoken_errors_total", kind="validation", **model) == 1
    # character tokens after the end-of-text token: "the cat" x N, "x", and the cancelled "the" (x 1 + extra)
    assert metric(url, "nextoken_prompt_tokens_total", **model) == N * 8 + 2 + 4 * (1 + extra)
    generated = metric(url, "nextoken_generation_tokens_total", **model)
    cancelled_tokens = generated - N * M_TOKENS - 1 - 500 * extra
    assert 1 <= cancelled_tokens < 500
    requests = N + 2 + extra
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
    assert metric(url, "nextoken_build_info", backend="onnxruntime", provider="CPUExecutionProvider",
                  version=__version__, model_version="1", **model) == 1
    assert metric(url, "nextoken_models_loaded", **model) == 1
    # time to first token is below the request latency, both in seconds
    ttft = metric(url, "nextoken_time_to_first_token_seconds_sum", **model)
    e2e = metric(url, "nextoken_request_latency_seconds_sum", **model)
    assert 0 < ttft < e2e < 60
    # TPOT: every request with two tokens or more (the N, and the cancelled one if it got a second token).
    tpot_n = metric(url, "nextoken_time_per_output_token_seconds_count", **model)
    assert N + extra <= tpot_n <= N + extra + 1
    # Prefill + queue = TTFT and decode = the sum of inter-token gaps, request by request (one clock).
    prefill = metric(url, "nextoken_request_prefill_time_seconds_sum", **model)
    queue = metric(url, "nextoken_queue_time_seconds_sum", **model)
    assert metric(url, "nextoken_request_prefill_time_seconds_count", **model) == requests
    assert queue + prefill == pytest.approx(ttft, abs=1e-4)
    decode = metric(url, "nextoken_request_decode_time_seconds_sum", **model)
    assert decode == pytest.approx(metric(url, "nextoken_inter_token_latency_seconds_sum", **model), abs=1e-4)
    assert 0 < metric(url, "nextoken_time_per_output_token_seconds_sum", **model) <= decode
    # No label value outside the documented ones appeared with the traffic.
    s = samples(httpx.get(url + "/metrics", timeout=10).text)
    assert label_values(s, "nextoken_requests_total", "outcome") == set(M.OUTCOMES)
    assert label_values(s, "nextoken_requests_total", "endpoint") == set(M.ENDPOINTS)
    assert label_values(s, "nextoken_errors_total", "kind") == set(M.ERROR_KINDS)


def test_engine_reports_phases_and_real_cache_use(fresh: ServerProcess) -> None:
    """KV-cache use is slots holding tokens over slots allocated (4 rows x 512 here): one sequence of
    at most 404 tokens stays below 0.25, the running-over-batch ratio this gauge used to report."""
    url, model = fresh.url, {"model": "tiny-serve:1"}
    before = metric(url, "nextoken_engine_step_phase_seconds_count", phase="decode", **model)
    readings: list[float] = []
    streams = 0
    # The engine runs ahead of the client and a scrape is slow on a busy machine: sample while each
    # stream lasts, and run streams until a sample landed inside one.
    while streams < 8 and not any(u > 0 for u in readings):
        done = threading.Event()

        def one_stream(done: threading.Event = done) -> None:
            try:
                stream_body = {"prompt": "the", "max_tokens": 400, "ignore_eos": True, "stream": True}
                with httpx.stream("POST", url + "/v1/completions", timeout=60, json=stream_body) as r:
                    for _ in r.iter_lines():
                        pass
            finally:
                done.set()

        t = threading.Thread(target=one_stream)
        t.start()
        while not done.is_set():
            readings.append(metric(url, "nextoken_kv_cache_usage_ratio", **model))
        t.join(60)
        streams += 1
    assert any(u > 0 for u in readings), readings
    assert all(0 <= u < 0.25 for u in readings), readings
    assert metric(url, "nextoken_kv_cache_usage_ratio", **model) == 0  # all freed again
    assert metric(url, "nextoken_engine_step_phase_seconds_count", phase="prefill", **model) >= streams
    assert metric(url, "nextoken_engine_step_phase_seconds_count", phase="decode", **model) - before >= 399 * streams


def test_metrics_pass_promtool(fresh: ServerProcess, tmp_path: Path) -> None:
    promtool = _promtool()
    text = httpx.get(fresh.url + "/metrics").text
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_gateway_reads_queue_depth_and_cache_use(serve_artifact: Path) -> None:
    """The endpoint picker's view: the first sample of vllm:num_requests_waiting etc. is the pod's."""
    s = ServerProcess(serve_artifact, "--max-batch-size", "1", "--max-queue", "4", "--metrics-compat", "vllm")
    streams: list[httpx.Response] = []
    clients = [httpx.Client(timeout=120) for _ in range(5)]  # 1 runs (batch 1), 4 wait

    def open_stream(c: httpx.Client) -> None:
        r = c.send(c.build_request("POST", s.url + "/v1/completions",
                                   json={"prompt": "the", "max_tokens": 500, "ignore_eos": True, "stream": True}),
                   stream=True)
        streams.append(r)

    threads = [threading.Thread(target=open_stream, args=(c,)) for c in clients]
    seen: list[tuple[float, float, float]] = []  # (waiting, running, kv) as the picker reads them
    try:
        with s.engine_frozen():  # the five arrive together: one runs, four queue
            for t in threads:
                t.start()
            s.wait_until_full()
        while any(t.is_alive() for t in threads):
            fams = {f.name: f.samples for f in text_string_to_metric_families(httpx.get(s.url + "/metrics").text)}
            names = (M.VLLM_WAITING, M.VLLM_RUNNING, M.VLLM_KV_USAGE, M.VLLM_KV_USAGE_OLD)
            assert all(len(fams[n]) == 1 and fams[n][0].labels == {} for n in names)  # one series per pod
            assert fams[M.VLLM_KV_USAGE][0].value == fams[M.VLLM_KV_USAGE_OLD][0].value
            seen.append(tuple(fams[n][0].value for n in names[:3]))
            time.sleep(0.02)
    finally:
        for t in threads:  # each stream's send returns at its first token; 500 tokens take seconds
            t.join(120)
        for r in streams:
            r.close()
        for c in clients:
            c.close()
        s.stop()
    assert all(w <= 4 and r <= 1 and 0 <= kv <= 1 for w, r, kv in seen), seen
    assert max(w for w, _, _ in seen) >= 2, seen  # the queue the streams made, as the gateway sees it
    assert any(r == 1 and kv > 0 for _, r, kv in seen), seen


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
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
        tpot_q = "histogram_quantile(0.5, sum by (le) (rate(nextoken_time_per_output_token_seconds_bucket[1m])))"
        rate_q = "sum(rate(nextoken_generation_tokens_total[1m]))"
        deadline = time.monotonic() + 20
        ttft = tpot = rate = []
        while time.monotonic() < deadline:
            ttft, tpot, rate = query(ttft_q), query(tpot_q), query(rate_q)
            if (ttft and tpot and rate and float(rate[0]["value"][1]) > 0 and ttft[0]["value"][1] != "NaN"
                    and tpot[0]["value"][1] != "NaN"):
                break
            time.sleep(0.5)
        assert 0 < float(ttft[0]["value"][1]) < 60
        assert 0 < float(tpot[0]["value"][1]) < 10
        assert float(rate[0]["value"][1]) > 0
        # Counters pre-created at 0: the rate of an outcome that never happened is 0, not absent.
        assert query('sum(rate(nextoken_errors_total{kind="internal"}[1m]))')[0]["value"][1] == "0"
        if rules.is_file():
            groups = httpx.get(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10).json()["data"]["groups"]
            assert groups and all(rule["health"] != "err" for g in groups for rule in g["rules"])
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()

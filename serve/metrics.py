"""Prometheus metrics for the server, correct across LitServe's separate processes.

LitServe runs the HTTP API and the inference worker in different processes, so every metric
lives in prometheus_client's multiprocess mode: each process writes memory-mapped files into
one directory per server instance (``PROMETHEUS_MULTIPROC_DIR``, created empty at start and
removed at exit; two servers sharing one wiped each other's files), and ``/metrics`` merges
them at scrape time. The directory must be set before ``prometheus_client`` is imported in any
process, which is why ``prepare_multiproc_dir`` runs first in the server's main process and
children inherit the variable.

Names follow Prometheus conventions (``nextoken_`` prefix, base units, ``_total`` counters) and
every series carries a ``model`` label (``name:version`` of the artifact that served it).
Buckets span a tiny CPU model's sub-millisecond steps and a large GPU model's seconds, like
vLLM's (its time-to-first-token buckets run from 1 ms to 2560 s).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
                         0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)

OUTCOMES = ("stop", "length", "cancelled", "error")
ERROR_KINDS = ("validation", "overloaded", "unauthorised", "unavailable", "internal")


def prepare_multiproc_dir(path: str | None = None) -> Path:
    """Create (or empty) this server instance's metrics directory and export it to children."""
    d = Path(path) if path else Path(tempfile.mkdtemp(prefix="nextoken-metrics-"))
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    os.environ[ENV] = str(d)
    return d


def remove_multiproc_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class ServerMetrics:
    """All of the server's metric objects; create one per process after the directory is set."""

    def __init__(self) -> None:
        if not os.environ.get(ENV):
            raise RuntimeError(f"{ENV} must be set before metrics are created (see prepare_multiproc_dir)")
        from prometheus_client import Counter, Gauge, Histogram

        m = ("model",)
        self.ttft = Histogram("nextoken_time_to_first_token_seconds",
                              "Time from request arrival to its first generated token.", m, buckets=LATENCY_BUCKETS)
        self.itl = Histogram("nextoken_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of one request.", m,
                             buckets=TOKEN_LATENCY_BUCKETS)
        self.e2e = Histogram("nextoken_request_latency_seconds",
                             "Time from request arrival to its last token.", m, buckets=LATENCY_BUCKETS)
        self.queue_time = Histogram("nextoken_queue_time_seconds",
                                    "Time a request waited before joining the running batch.", m,
                                    buckets=LATENCY_BUCKETS)
        self.prompt_tokens = Histogram("nextoken_request_prompt_tokens", "Prompt tokens per request.", m,
                                       buckets=TOKEN_COUNT_BUCKETS)
        self.generation_tokens = Histogram("nextoken_request_generation_tokens", "Generated tokens per request.", m,
                                           buckets=TOKEN_COUNT_BUCKETS)
        self.step_time = Histogram("nextoken_engine_step_seconds", "Duration of one engine step (whole batch).",
                                   m, buckets=TOKEN_LATENCY_BUCKETS)
        self.batch_size = Histogram("nextoken_batch_size", "Sequences advanced per engine step.", m,
                                    buckets=BATCH_BUCKETS)

        self.requests = Counter("nextoken_requests", "Finished requests by endpoint and outcome.",
                                ("model", "endpoint", "outcome"))
        self.errors = Counter("nextoken_errors", "Rejected or failed requests by kind.", ("model", "kind"))
        self.prompt_tokens_total = Counter("nextoken_prompt_tokens", "Prompt tokens processed.", m)
        self.generation_tokens_total = Counter("nextoken_generation_tokens", "Tokens generated.", m)
        self.reloads = Counter("nextoken_model_reloads", "Model versions loaded after start-up.", m)
        # model = the refused version, so an operator sees which one failed
        self.reload_failures = Counter("nextoken_model_reload_failures", "Model versions refused on reload.",
                                       ("model", "reason"))

        # Gauges are written by one process (the engine's worker); report its latest live value.
        self.running = Gauge("nextoken_requests_running", "Requests in the running batch.", m,
                             multiprocess_mode="livemostrecent")
        self.waiting = Gauge("nextoken_requests_waiting", "Requests admitted and waiting for a slot.", m,
                             multiprocess_mode="livemostrecent")
        self.kv_usage = Gauge("nextoken_kv_cache_usage_ratio", "Fraction of KV-cache slots in use.", m,
                              multiprocess_mode="livemostrecent")
        self.models_loaded = Gauge("nextoken_models_loaded", "Model versions held in memory (2 while one drains).",
                                   multiprocess_mode="livemostrecent")
        self.info = Gauge("nextoken_build_info", "Build and backend of the serving model (value 1).",
                          ("model", "version", "backend", "provider"), multiprocess_mode="livemax")

    def observe_step(self, model: str, *, duration_s: float, batch_size: int, running: int, waiting: int,
                     slots_in_use: int, slots_total: int) -> None:
        """Called by the engine's process once per step."""
        self.step_time.labels(model).observe(duration_s)
        if batch_size:
            self.batch_size.labels(model).observe(batch_size)
        self.running.labels(model).set(running)
        self.waiting.labels(model).set(waiting)
        self.kv_usage.labels(model).set(slots_in_use / slots_total if slots_total else 0.0)

    def observe_request(self, model: str, endpoint: str, outcome: str, *, arrival: float, first_token: float | None,
                        token_times: list[float], prompt_tokens: int, generated_tokens: int,
                        queue_time_s: float | None = None) -> None:
        """Called once per finished request with its timestamps (``time.perf_counter`` values)."""
        self.requests.labels(model, endpoint, outcome).inc()
        self.prompt_tokens.labels(model).observe(prompt_tokens)
        self.generation_tokens.labels(model).observe(generated_tokens)
        self.prompt_tokens_total.labels(model).inc(prompt_tokens)
        self.generation_tokens_total.labels(model).inc(generated_tokens)
        if queue_time_s is not None:
            self.queue_time.labels(model).observe(queue_time_s)
        if first_token is not None:
            self.ttft.labels(model).observe(first_token - arrival)
        for a, b in zip(token_times, token_times[1:], strict=False):
            self.itl.labels(model).observe(b - a)
        if token_times:
            self.e2e.labels(model).observe(token_times[-1] - arrival)

    def error(self, model: str, kind: str) -> None:
        self.errors.labels(model, kind).inc()


def render_latest() -> tuple[bytes, str]:
    """The merged exposition of every process's files, for the ``/metrics`` route."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a finished process's live gauges (its counters and histograms stay counted)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)

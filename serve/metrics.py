"""Prometheus metrics for the server, correct across LitServe's separate processes.

LitServe runs the HTTP API and the inference worker in different processes, so every metric
lives in prometheus_client's multiprocess mode: each process writes memory-mapped files into
one directory per server instance (``PROMETHEUS_MULTIPROC_DIR``, created empty at start and
removed at exit; two servers sharing one wiped each other's files), and ``/metrics`` merges
them at scrape time. The directory must be set before ``prometheus_client`` is imported in any
process, which is why ``prepare_multiproc_dir`` runs first in the server's main process and
children inherit the variable. Counters and histograms are summed over processes; every gauge
here has one writer (the engine's process) and reports that process's latest live value.

Names follow Prometheus conventions (``nextoken_`` prefix, base units, ``_total`` counters) and
every ``nextoken_`` series carries a ``model`` label (``name:version`` of the artifact that
served it). ``precreate`` writes every documented label value at 0 when a version loads, so
``rate()`` and alerts see a series from the start rather than from its first event. Buckets span
a tiny CPU model's sub-millisecond steps and a large GPU model's seconds, like vLLM's (its
time-to-first-token buckets run from 1 ms to 2560 s).

With ``compat="vllm"`` queue depth, running count and KV-cache use are also exposed under the
names the Gateway API Inference Extension's model-server protocol reads (``VLLM_*`` below), so an
endpoint picker or a KEDA trigger written for vLLM works unchanged. Those carry no labels: a
picker takes a family's first series, so there is one per pod, summed over the versions held
(two while one drains after a hot reload). The module knows nothing about HTTP or the engine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
COMPAT_ENV = "NEXTOKEN_METRICS_COMPAT"  # inherited by the server's children, like ENV
COMPAT_CHOICES = ("vllm",)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
                         0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)

# The documented label values; precreate() writes each at 0.
ENDPOINTS = ("completions", "chat", "responses")
OUTCOMES = ("stop", "length", "cancelled", "error")
ERROR_KINDS = ("validation", "overloaded", "unauthorised", "unavailable", "internal")
RELOAD_FAILURE_REASONS = ("invalid artifact", "failed warm-up")  # serve/engine/versions.py: the error's text before ':'
STEP_PHASES = ("prefill", "decode")

# Gateway API Inference Extension (model-server protocol) / vLLM names -> what they mean here.
VLLM_WAITING = "vllm:num_requests_waiting"  # TotalQueuedRequests
VLLM_RUNNING = "vllm:num_requests_running"  # TotalRunningRequests
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"  # KVCacheUtilization, a fraction in [0, 1] despite the name
VLLM_KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"  # the same, as vLLM < 0.10 and older pickers name it


def prepare_multiproc_dir(path: str | None = None, *, compat: str | None = None) -> Path:
    """Create (or empty) this server instance's metrics directory and export it to children.

    ``compat`` (``"vllm"`` or None) is exported too, so every process's ``ServerMetrics()``
    exposes the same names without the flag being passed through each of them.
    """
    _check_compat(compat)
    d = Path(path) if path else Path(tempfile.mkdtemp(prefix="nextoken-metrics-"))
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    os.environ[ENV] = str(d)
    if compat:
        os.environ[COMPAT_ENV] = compat
    else:
        os.environ.pop(COMPAT_ENV, None)
    return d


def _check_compat(compat: str | None) -> None:
    if compat is not None and compat not in COMPAT_CHOICES:
        raise ValueError(f"metrics compat must be one of {', '.join(COMPAT_CHOICES)} or None, got {compat!r}")


class ServerMetrics:
    """All of the server's metric objects; create one per process after the directory is set.

    ``compat``: ``"vllm"`` adds the gateway names (see the module docstring); None takes the value
    ``prepare_multiproc_dir`` exported (off unless it was given one). ``registry``: where the
    objects are registered (prometheus_client's global one unless given; ``/metrics`` reads the
    files, not the registry, so a second instance in one process needs its own).
    """

    def __init__(self, compat: str | None = None, registry: Any = None) -> None:
        if not os.environ.get(ENV):
            raise RuntimeError(f"{ENV} must be set before metrics are created (see prepare_multiproc_dir)")
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        from nextoken import __version__

        if compat is None:
            compat = os.environ.get(COMPAT_ENV) or None
        _check_compat(compat)
        self.compat = compat
        self.software_version = __version__
        reg = REGISTRY if registry is None else registry
        m = ("model",)

        def histogram(name: str, doc: str, buckets: tuple, labels: tuple[str, ...] = m) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = m) -> Any:
            # One writer per gauge (the engine's process): its latest live value is the truth.
            return Gauge(name, doc, labels, multiprocess_mode="livemostrecent", registry=reg)

        def counter(name: str, doc: str, labels: tuple[str, ...] = m) -> Any:
            return Counter(name, doc, labels, registry=reg)

        # --- per request ------------------------------------------------------------------
        self.ttft = histogram("nextoken_time_to_first_token_seconds",
                              "Time from request arrival to its first generated token.", LATENCY_BUCKETS)
        self.itl = histogram("nextoken_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of one request.", TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("nextoken_time_per_output_token_seconds",
                              "Mean time per generated token after the first, per request: "
                              "(latency - time to first token) / (tokens - 1), as vLLM defines it.",
                              TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("nextoken_request_latency_seconds", "Time from request arrival to its last token.",
                             LATENCY_BUCKETS)
        self.queue_time = histogram("nextoken_queue_time_seconds",
                                    "Time a request waited before joining the running batch.", LATENCY_BUCKETS)
        self.prefill_time = histogram("nextoken_request_prefill_time_seconds",
                                      "Time from joining the running batch to the first token (vLLM's prefill "
                                      "interval).", LATENCY_BUCKETS)
        self.decode_time = histogram("nextoken_request_decode_time_seconds",
                                     "Time from the first token to the last (vLLM's decode interval).",
                                     LATENCY_BUCKETS)
        self.prompt_tokens = histogram("nextoken_request_prompt_tokens", "Prompt tokens per request.",
                                       TOKEN_COUNT_BUCKETS)
        self.generation_tokens = histogram("nextoken_request_generation_tokens", "Generated tokens per request.",
                                           TOKEN_COUNT_BUCKETS)
        # --- per engine step ----------------------------------------------------------------
        self.step_time = histogram("nextoken_engine_step_seconds", "Duration of one engine step (whole batch).",
                                   TOKEN_LATENCY_BUCKETS)
        self.phase_time = histogram("nextoken_engine_step_phase_seconds",
                                    "Time one engine step spent in a phase: prefill (the prompts of requests "
                                    "joining the batch) or decode (one token for every running sequence).",
                                    TOKEN_LATENCY_BUCKETS, ("model", "phase"))
        self.batch_size = histogram("nextoken_batch_size", "Sequences advanced per engine step.", BATCH_BUCKETS)

        self.requests = counter("nextoken_requests", "Finished requests by endpoint and outcome.",
                                ("model", "endpoint", "outcome"))
        self.errors = counter("nextoken_errors", "Rejected or failed requests by kind.", ("model", "kind"))
        self.prompt_tokens_total = counter("nextoken_prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens_total = counter("nextoken_generation_tokens", "Tokens generated.")
        # vLLM's prefix_cache_queries / prefix_cache_hits, in tokens: hits / queries is the hit rate, and the
        # hits are what usage.prompt_tokens_details.cached_tokens reports per request
        self.prefix_queries = counter("nextoken_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("nextoken_prefix_cache_hits", "Prompt tokens served from the prefix cache.")
        self.reloads = counter("nextoken_model_reloads", "Model versions loaded after start-up.")
        # speculative decoding, vLLM's spec_decode counters: accepted / draft_tokens is the acceptance rate,
        # accepted / drafts + 1 the tokens each verification call yields
        self.spec_drafts = counter("nextoken_spec_decode_num_drafts", "Drafts verified (speculative decoding).")
        self.spec_draft_tokens = counter("nextoken_spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.spec_accepted = counter("nextoken_spec_decode_num_accepted_tokens", "Draft tokens the model accepted.")
        self.spec_accepted_per_pos = counter("nextoken_spec_decode_num_accepted_tokens_per_pos",
                                             "Draft tokens accepted, by position in the draft (0 = first).",
                                             ("model", "position"))
        # model = the refused version, so an operator sees which one failed
        self.reload_failures = counter("nextoken_model_reload_failures", "Model versions refused on reload.",
                                       ("model", "reason"))

        self.running = gauge("nextoken_requests_running", "Requests in the running batch.")
        self.waiting = gauge("nextoken_requests_waiting", "Requests admitted and waiting for a slot.")
        self.kv_usage = gauge("nextoken_kv_cache_usage_ratio",
                              "Fraction of the allocated KV-cache slots holding tokens.")
        self.loaded = gauge("nextoken_models_loaded",
                            "1 while this model version is held in memory, else 0 (sum: 2 while one drains).")
        self.build_info = gauge("nextoken_build_info",
                                "Software version, model version and backend of a loaded model (1; 0 once freed).",
                                ("model", "version", "model_version", "backend", "provider"))

        self.vllm: dict[str, Any] = {}
        if compat == "vllm":
            self.vllm = {
                "waiting": Gauge(VLLM_WAITING, "Requests waiting for a slot (nextoken_requests_waiting, summed "
                                 "over the versions held).", multiprocess_mode="livemostrecent", registry=reg),
                "running": Gauge(VLLM_RUNNING, "Requests in the running batch (nextoken_requests_running, summed "
                                 "over the versions held).", multiprocess_mode="livemostrecent", registry=reg),
                "kv": Gauge(VLLM_KV_USAGE, "KV-cache use, 1 = full (nextoken_kv_cache_usage_ratio, mean over the "
                            "versions held).", multiprocess_mode="livemostrecent", registry=reg),
            }

        # model -> (running, waiting, kv usage) of each version this process holds, for the sums above
        self._live: dict[str, tuple[int, int, float]] = {}
        self._bound: dict[str, tuple[Any, ...]] = {}  # model -> its per-step series (_step_series)
        # model -> its build_info label values, so freeing it can zero that exact series
        self._info: dict[str, tuple[str, str, str, str, str]] = {}

    # --- model versions ----------------------------------------------------------------------
    def precreate(self, model: str, endpoints: Iterable[str] = ENDPOINTS, spec_positions: int = 0) -> None:
        """Write every documented series of ``model`` at 0 (call when a version loads).

        Counters for each endpoint x outcome, error kind and reload-failure reason; every
        histogram (count 0); the gauges at 0. Series already written keep their values.
        """
        endpoints = tuple(endpoints)
        unknown = set(endpoints) - set(ENDPOINTS)
        if unknown:
            raise ValueError(f"unknown endpoint label(s) {sorted(unknown)}; documented: {', '.join(ENDPOINTS)}")
        for endpoint in endpoints:
            for outcome in OUTCOMES:
                self.requests.labels(model, endpoint, outcome)
        for kind in ERROR_KINDS:
            self.errors.labels(model, kind)
        for reason in RELOAD_FAILURE_REASONS:
            self.reload_failures.labels(model, reason)
        for c in (self.prompt_tokens_total, self.generation_tokens_total, self.reloads, self.prefix_queries,
                  self.prefix_hits, self.spec_drafts, self.spec_draft_tokens, self.spec_accepted):
            c.labels(model)
        for pos in range(spec_positions):  # the draft's positions, when speculative decoding is on
            self.spec_accepted_per_pos.labels(model, str(pos))
        for h in (self.ttft, self.itl, self.tpot, self.e2e, self.queue_time, self.prefill_time, self.decode_time,
                  self.prompt_tokens, self.generation_tokens, self.step_time, self.batch_size):
            h.labels(model)
        for phase in STEP_PHASES:
            self.phase_time.labels(model, phase)
        if model not in self._live:  # a version that already reported steps keeps its figures
            self._set_engine_gauges(model, 0, 0, 0.0)

    def version_loaded(self, model: str, *, model_version: str, backend: str, provider: str,
                       endpoints: Iterable[str] = ENDPOINTS, spec_positions: int = 0) -> None:
        """A version is in memory and takes requests: precreate its series, mark it loaded, record build info."""
        self.precreate(model, endpoints, spec_positions)
        self.loaded.labels(model).set(1)
        labels = (model, self.software_version, model_version, backend, provider)
        old = self._info.get(model)
        if old is not None and old != labels:
            self.build_info.labels(*old).set(0)
        self._info[model] = labels
        self.build_info.labels(*labels).set(1)

    def version_freed(self, model: str) -> None:
        """A version left memory (drained after a reload): its gauges drop to 0, its counters stay."""
        self.loaded.labels(model).set(0)
        if model in self._info:
            self.build_info.labels(*self._info.pop(model)).set(0)
        self._set_engine_gauges(model, 0, 0, 0.0)
        self._live.pop(model, None)
        self._bound.pop(model, None)
        self._update_compat()

    def reloaded(self, model: str) -> None:
        """``model`` replaced the previous version after start-up."""
        self.reloads.labels(model).inc()

    def reload_failed(self, model: str, reason: str) -> None:
        """The version ``model`` was refused; ``reason`` is one of ``RELOAD_FAILURE_REASONS``."""
        if reason not in RELOAD_FAILURE_REASONS:
            raise ValueError(f"unknown reload failure reason {reason!r}; documented: "
                             f"{', '.join(RELOAD_FAILURE_REASONS)}")
        self.reload_failures.labels(model, reason).inc()

    # --- engine steps --------------------------------------------------------------------------
    def observe_step(self, model: str, *, batch_size: int, running: int, waiting: int, kv_cache_usage: float,
                     prefill_s: float | None = None, decode_s: float | None = None, prefix_queried: int = 0,
                     prefix_hits: int = 0) -> None:
        """Called by the engine's process once per step.

        ``prefill_s`` / ``decode_s``: seconds spent in each phase this step (None when the phase did
        not run); the step's duration is their sum. ``kv_cache_usage``: tokens held in the KV cache
        over the tokens it can hold, in [0, 1]. ``prefix_queried`` / ``prefix_hits``: prompt tokens
        looked up in the prefix cache this step, and of those, served from it.
        """
        step, prefill, decode, batch, queries, hits = self._step_series(model)
        if prefix_queried:  # most steps look nothing up, and most lookups find nothing: skip those file writes
            queries.inc(prefix_queried)
        if prefix_hits:
            hits.inc(prefix_hits)
        if not 0.0 <= kv_cache_usage <= 1.0:
            raise ValueError(f"kv_cache_usage must be in [0, 1], got {kv_cache_usage}")
        if prefill_s is not None:
            prefill.observe(prefill_s)
        if decode_s is not None:
            decode.observe(decode_s)
        if prefill_s is not None or decode_s is not None:
            step.observe((prefill_s or 0.0) + (decode_s or 0.0))
        if batch_size:
            batch.observe(batch_size)
        self._set_engine_gauges(model, running, waiting, float(kv_cache_usage))

    def _step_series(self, model: str) -> tuple[Any, ...]:
        """The series every engine step writes (thousands a second on small models), looked up once per model:
        step time, prefill and decode phase times, batch size, prefix-cache queries and hits."""
        b = self._bound.get(model)
        if b is None:
            b = self._bound[model] = (
                self.step_time.labels(model), self.phase_time.labels(model, "prefill"),
                self.phase_time.labels(model, "decode"), self.batch_size.labels(model),
                self.prefix_queries.labels(model), self.prefix_hits.labels(model))
        return b

    def observe_spec(self, model: str, *, drafts: int, draft_tokens: int, accepted: int,
                     accepted_per_pos: list[int]) -> None:
        """One engine step's speculative decoding: drafts verified, tokens proposed and accepted (by position)."""
        self.spec_drafts.labels(model).inc(drafts)
        self.spec_draft_tokens.labels(model).inc(draft_tokens)
        self.spec_accepted.labels(model).inc(accepted)
        for pos, n in enumerate(accepted_per_pos):
            if n:
                self.spec_accepted_per_pos.labels(model, str(pos)).inc(n)

    def _set_engine_gauges(self, model: str, running: int, waiting: int, kv_usage: float) -> None:
        old = self._live.get(model)
        if old == (running, waiting, kv_usage):
            return  # a gauge holds its last value: rewriting it every step only costs the engine time
        if old is None or old[0] != running:
            self.running.labels(model).set(running)
        if old is None or old[1] != waiting:
            self.waiting.labels(model).set(waiting)
        if old is None or old[2] != kv_usage:
            self.kv_usage.labels(model).set(kv_usage)
        self._live[model] = (running, waiting, kv_usage)
        self._update_compat()

    def _update_compat(self) -> None:
        if not self.vllm:
            return
        live = list(self._live.values())
        self.vllm["running"].set(sum(r for r, _, _ in live))
        self.vllm["waiting"].set(sum(w for _, w, _ in live))
        # Versions held at once share the server's batch size, so their caches are (near) equal in
        # size and the mean of their fractions is the fraction of all slots in use.
        kv = sum(k for _, _, k in live) / len(live) if live else 0.0
        self.vllm["kv"].set(kv)  # render_latest copies it under VLLM_KV_USAGE_OLD

    # --- requests --------------------------------------------------------------------------------
    def observe_request(self, model: str, endpoint: str, outcome: str, *, arrival: float, first_token: float | None,
                        token_times: list[float], prompt_tokens: int, generated_tokens: int,
                        queue_time_s: float | None = None, prefill_s: float | None = None,
                        decode_s: float | None = None) -> None:
        """Called once per finished request with its timestamps (one clock: ``time.time()`` values).

        ``token_times``: when each generated token was produced. ``prefill_s`` / ``decode_s``: the
        engine's own intervals (joined the batch -> first token, first -> last token); when not
        given they are derived here, prefill as time to first token minus ``queue_time_s``.
        """
        self.requests.labels(model, endpoint, outcome).inc()
        self.prompt_tokens.labels(model).observe(prompt_tokens)
        self.generation_tokens.labels(model).observe(generated_tokens)
        self.prompt_tokens_total.labels(model).inc(prompt_tokens)
        self.generation_tokens_total.labels(model).inc(generated_tokens)
        if queue_time_s is not None:
            self.queue_time.labels(model).observe(queue_time_s)
        if first_token is not None:
            ttft = first_token - arrival
            self.ttft.labels(model).observe(ttft)
            if prefill_s is None and queue_time_s is not None:
                prefill_s = max(0.0, ttft - queue_time_s)
        if prefill_s is not None:
            self.prefill_time.labels(model).observe(prefill_s)
        for a, b in zip(token_times, token_times[1:], strict=False):
            self.itl.labels(model).observe(b - a)
        if token_times:
            self.e2e.labels(model).observe(token_times[-1] - arrival)
            if decode_s is None:
                decode_s = token_times[-1] - token_times[0]
            if len(token_times) > 1:
                # vLLM: the first token belongs to prefill, so it is not counted.
                self.tpot.labels(model).observe((token_times[-1] - token_times[0]) / (len(token_times) - 1))
        if decode_s is not None:
            self.decode_time.labels(model).observe(decode_s)

    def error(self, model: str, kind: str) -> None:
        self.errors.labels(model, kind).inc()


def render_latest() -> tuple[bytes, str]:
    """The merged exposition of every process's files, for the ``/metrics`` route."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, multiprocess

    return generate_latest(_OldKvName(multiprocess.MultiProcessCollector(None))), CONTENT_TYPE_LATEST


class _OldKvName:
    """Copies KV-cache use under vLLM's older name within the scrape: two gauges written one
    after the other could be read between the writes, a copy cannot differ from its source."""

    def __init__(self, files: Any) -> None:
        self.files = files

    def collect(self) -> Iterator[Any]:
        from prometheus_client.metrics_core import Metric
        for family in self.files.collect():
            yield family
            if family.name == VLLM_KV_USAGE:
                old = Metric(VLLM_KV_USAGE_OLD, f"The same as {VLLM_KV_USAGE}, under vLLM's older name.", "gauge")
                old.samples = [s._replace(name=VLLM_KV_USAGE_OLD) for s in family.samples]
                yield old

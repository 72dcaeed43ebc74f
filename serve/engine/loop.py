"""The engine process: its main loop, the pipes to the HTTP side, and the thread that sends results.

The loop blocks while there is nothing to do (an idle server uses no CPU), takes every message
that arrived during the last step (adds, cancels, reload requests) so cancels apply between
steps, runs one step on each loaded model version, and hands the step's outputs to the sender
thread. A failing ``add`` fails that request alone (a 400 for a request the serving version
cannot take, a 500 for a bug); a failing step fails the requests it held and the loop goes on.

NOTE on messages: every message costs the sender a pipe write and the HTTP process a wake-up, and
sending from the engine's thread stalled every step for it. The sender ships everything that
accumulated since its last send as one message (a list), at most ``message_rate`` times a second,
but at once when it holds a first or last token or a failure; the engine never waits for it.

This module knows nothing about HTTP or LitServe (``litserve_adapter`` runs it in LitServe's worker).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from nextoken.export.artifact import Artifact
from nextoken.serve.config import ServeConfig
from nextoken.serve.engine.core import EngineCore, EngineOptions, RequestRejected, StepStats
from nextoken.serve.engine.spec import SpecOptions
from nextoken.serve.engine.versions import ModelSet, VersionChange
from nextoken.serve.memory import freeze_startup_heap
from nextoken.serve.wire import (
    AddRequest,
    CancelRequest,
    Envelope,
    ModelEvent,
    ModelStatus,
    Pipes,
    ReloadRequest,
    RequestFailed,
    Shutdown,
    StepOutput,
)

logger = logging.getLogger("nextoken.serve")


def describe_budget(core: EngineCore) -> str:
    """The step's token budget and, when sized to the model, the call costs it was sized from."""
    text = core.budget.describe()
    if core.costs is not None:
        text += (f" (a call here: {core.costs.call_s * 1e3:.1f} ms + {core.costs.token_s * 1e3:.2f} ms a token, "
                 "measured at load)")
    if core.spec is not None:
        o = core.spec.o
        text += (f"; speculative decoding: {o.method}, up to {o.num_speculative_tokens} draft tokens while at most "
                 f"{o.disable_by_batch_size} request(s) run, a draft pays from "
                 f"{core.spec.break_even:.3f} accepted tokens per draft token (measured at load)"
                 + (", plus the draft model's own time (measured as it runs)" if o.method == "draft" else ""))
    return text


def engine_options(config: ServeConfig) -> EngineOptions:
    c = config
    spec = None if c.speculative == "none" else SpecOptions(
        c.speculative, c.num_speculative_tokens, c.prompt_lookup_max, c.prompt_lookup_min,
        c.speculative_disable_by_batch_size, c.draft_model or "")
    return EngineOptions(max_slots=c.max_batch_size, max_model_len=c.max_model_len,
                         max_num_batched_tokens=c.max_num_batched_tokens, prefix_cache_bytes=c.prefix_cache_bytes,
                         prefix_block_size=c.prefix_block_size, device=c.device, threads=c.threads, spec=spec)


class Sender:
    """The thread that ships outputs to the HTTP process(es); see the module note."""

    def __init__(self, pipes: Pipes, message_rate: float) -> None:
        self.pipes = pipes
        self.min_gap = 1.0 / message_rate
        self.cv = threading.Condition()
        self.outbox: list[list[Any]] = [[] for _ in pipes.responses]  # per frontend: messages not yet sent
        self.urgent = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="engine-sender")
        self.thread.start()

    def put(self, frontend: int | None, message: Any, urgent: bool) -> None:
        """Queue ``message`` for one frontend (or every one when None)."""
        with self.cv:
            targets = range(len(self.outbox)) if frontend is None else (frontend,)
            for i in targets:
                self.outbox[i].append(message)
            self.urgent = self.urgent or urgent
            self.cv.notify()

    def _run(self) -> None:
        last = 0.0
        while True:
            with self.cv:
                while True:
                    if not any(self.outbox):
                        self.cv.wait()
                        continue
                    wait = 0.0 if self.urgent else last + self.min_gap - time.perf_counter()
                    if wait <= 0:
                        break
                    self.cv.wait(wait)
                batches, self.outbox, self.urgent = self.outbox, [[] for _ in self.outbox], False
            last = time.perf_counter()
            try:
                for pipe, batch in zip(self.pipes.responses, batches, strict=True):
                    if batch:
                        pipe.put(batch)
            except (EOFError, OSError, BrokenPipeError):  # the pipe closed: the server is stopping
                return


class EngineLoop:
    """Owns the model versions and runs them; ``setup`` loads, ``run_forever`` serves."""

    def __init__(self, config: ServeConfig, pipes: Pipes, verified: Artifact | None = None) -> None:
        self.config = config
        self.pipes = pipes
        self.verified = verified
        self.models: ModelSet | None = None
        self.metrics: Any = None
        self.frontend_of: dict[str, int] = {}  # rid -> the HTTP process that sent it
        self.sender: Sender | None = None
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.last_error: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into the spawned engine process before setup(): only the configuration travels.
        return {"config": self.config, "pipes": self.pipes, "verified": self.verified}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"], state["pipes"], state["verified"])

    # --- start-up ------------------------------------------------------------------------------
    def setup(self) -> None:
        try:
            from nextoken.serve.metrics import ServerMetrics

            self.metrics = ServerMetrics()
        except RuntimeError:
            self.metrics = None  # in-process use without a metrics directory
        self.models = ModelSet(self.config.artifact_dir, self._make_core, self._on_change)
        self.models.load_initial(self.verified)
        freeze_startup_heap()

    def _make_core(self, artifact: Artifact) -> EngineCore:
        model_id = artifact.model_id

        seen = [0, 0]  # the prefix cache's cumulative (queried, hit) tokens at the last step: counters take deltas

        def on_step(s: StepStats) -> None:
            queried, hits = s.prefix_queried_tokens - seen[0], s.prefix_hit_tokens - seen[1]
            seen[:] = [s.prefix_queried_tokens, s.prefix_hit_tokens]
            if self.metrics is not None:
                self.metrics.observe_step(model_id, batch_size=s.batch_size, running=s.running, waiting=s.waiting,
                                          prefill_s=s.prefill_s if s.prefill_tokens else None,
                                          decode_s=s.decode_s if s.decode_tokens else None,
                                          kv_cache_usage=s.kv_cache_usage, prefix_queried=queried, prefix_hits=hits)
                if s.spec is not None:
                    self.metrics.observe_spec(model_id, drafts=s.spec.drafts, draft_tokens=s.spec.draft_tokens,
                                              accepted=s.spec.accepted, accepted_per_pos=s.spec.per_pos)

        core = EngineCore(artifact, engine_options(self.config), on_step)
        print(f"  engine: {model_id} loaded, {describe_budget(core)}", flush=True)
        return core

    @property
    def _spec_positions(self) -> int:
        """Draft positions whose acceptance is counted (0: speculative decoding is off)."""
        return 0 if self.config.speculative == "none" else self.config.num_speculative_tokens

    def _on_change(self, change: VersionChange) -> None:
        m, models = self.metrics, self.models
        match change.event:
            case ModelEvent.LOADED | ModelEvent.SWITCHED:
                self.last_error = None
                if m is not None:
                    v = models.current
                    m.version_loaded(v.id, model_version=v.artifact.version, backend="onnxruntime",
                                     provider=v.core.runner.provider, spec_positions=self._spec_positions)
                    if change.event == ModelEvent.SWITCHED:
                        m.reloaded(v.id)
            case ModelEvent.FREED if m is not None:
                m.version_freed(change.id)
            case ModelEvent.FAILED:
                self.last_error = change.error
                if m is not None:
                    m.reload_failed(change.id, change.reason)
        self.publish(change.event)

    def status(self, event: ModelEvent = ModelEvent.LOADED) -> ModelStatus:
        v = self.models.current
        spec = v.core.runner.spec
        return ModelStatus(id=v.id, name=v.artifact.name, version=v.artifact.version, path=str(v.artifact.path),
                           context=v.core.runner.context, max_model_len=spec.max_len, vocab_size=v.core.vocab_size,
                           provider=v.core.runner.provider,
                           models_loaded=self.models.models_loaded, event=event, last_error=self.last_error)

    def publish(self, event: ModelEvent = ModelEvent.LOADED) -> None:
        """Tell every HTTP process which version takes new requests."""
        if self.sender is not None and self.models is not None and self.models.current is not None:
            self.sender.put(None, self.status(event), urgent=True)

    # --- serving -------------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                item: Envelope = self.pipes.requests.get()
            except (EOFError, OSError, BrokenPipeError):  # the HTTP side is gone: the server is stopping
                item = Envelope(0, Shutdown())
            self.inbox.put(item)
            if isinstance(item.message, Shutdown):
                return

    def start(self) -> None:
        """Start the reader and sender threads and announce the serving version."""
        self.sender = Sender(self.pipes, self.config.message_rate)
        threading.Thread(target=self._read, daemon=True, name="engine-reader").start()
        self.publish(ModelEvent.LOADED)

    def run_forever(self) -> None:
        self.start()
        last_poll = 0.0
        while True:
            now = time.monotonic()
            if now - last_poll >= self.config.reload_poll_s:
                last_poll = now
                self.models.poll()
            if not self.models.has_work():
                try:  # idle: sleep until a message arrives (waking now and then to look for new versions)
                    item = self.inbox.get(timeout=self.config.reload_poll_s)
                except queue.Empty:
                    continue
                if not self._accept(item):
                    return
            while True:  # take everything that arrived during the last step
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if not self._accept(item):
                    return
            if self.models.has_work():
                self.step()

    def _accept(self, item: Envelope) -> bool:
        """Apply one message; False once the pipe has closed (the server is stopping)."""
        match item.message:
            case AddRequest() as msg:
                self.frontend_of[msg.rid] = item.frontend
                try:
                    self.models.add(msg)
                except RequestRejected as e:
                    self._fail(e.failure(msg.rid))
                except Exception as e:  # one bad request must not stop admission for everyone
                    logger.exception("add failed for %s", msg.rid)
                    self._fail(RequestFailed(msg.rid, 500, f"{type(e).__name__}: {e}"))
            case CancelRequest(rid=rid):
                self.models.cancel(rid)
            case ReloadRequest():
                self.models.poll(force=True)
            case Shutdown():
                return False
        return True

    def _fail(self, failure: RequestFailed) -> None:
        frontend = self.frontend_of.pop(failure.rid, 0)
        self.sender.put(frontend, failure, urgent=True)

    def step(self) -> None:
        try:
            outs = self.models.step()
        except Exception as e:
            # Fail the requests this step held and keep serving the next ones: an exception must not
            # end the engine with every client waiting.
            logger.exception("engine step failed; failing %d requests", len(self.models.owner))
            for rid in self.models.abort_all():
                self._fail(RequestFailed(rid, 500, f"generation failed: {type(e).__name__}: {e}"))
            return
        for out in outs:
            self._route(out)

    def _route(self, out: StepOutput) -> None:
        """Send a step's output to the HTTP process(es) its requests came from."""
        urgent = bool(out.started or out.finished)
        fronts = {self.frontend_of.get(rid, 0) for rid in (*out.rids, *out.finished)}
        if len(fronts) <= 1:
            self.sender.put(next(iter(fronts), 0), out, urgent)
        else:  # several HTTP processes: each gets the whole step and reads its own rows
            for f in fronts:
                self.sender.put(f, out, urgent)
        for rid in out.finished:
            self.frontend_of.pop(rid, None)

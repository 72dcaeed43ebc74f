"""LitServe glue: the worker-side LitAPI and loop, and the HTTP-side OpenAI spec.

Worker process (spawned by LitServe): ``GenerationAPI`` implements LitServe's
continuous-batching hooks (``add_request``, ``has_capacity``, ``has_active_requests``,
``step``) over ``GenerationCore``; ``BatchingLoop`` drives them.

API process (uvicorn, forked by LitServe): ``OpenAISpec`` owns ``/v1/completions`` and
``/v1/chat/completions``: validation, tokenization, admission control, SSE encoding.

NOTE on LitServe 0.2.19 (measured, see issue 5); what this module does about each:

* ``ContinuousBatchingLoop`` busy-spins while idle and reads new requests only after a 1 s
  blocking read: ``BatchingLoop`` blocks on a local queue fed by a reader thread, so an idle
  worker sleeps and a new request joins at the next step.
* It keeps generating after a client disconnects: the spec sends a cancel message through the
  request queue; the scheduler drops the row between steps.
* An exception in ``add_request`` stops admission for good: ``add_request`` failures become
  an error output for that request only.
* A ``FINISH_STREAMING`` output's payload is dropped: our spec reads the final payload itself.
* ``OpenAISpec`` drops ``top_k``/``seed``, says ``stop`` on length, gives every chunk its own
  id and leaks a buffer entry per request: this spec is ours (one id, true finish reasons,
  every sampling field, buffer entries removed in ``finally``).
* No queue limit: admission here counts requests in flight and answers 429 with Retry-After.
* One message per token tops out near 3-4k messages/s, each a round trip through the manager
  process: requests and responses use direct pipes (``Pipes``) instead, and a sender thread
  ships one message per send carrying every token produced meanwhile (merged per request), at
  most ``MSG_RATE`` a second but never delaying a first or last token; the engine never waits
  on the IPC.
* An exception in ``step`` ends LitServe's worker with every client waiting: ``step`` fails the
  requests it held and the worker goes on; a dead worker is caught by ``server.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import pickle
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import litserve as ls
from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.loops.continuous_batching_loop import ContinuousBatchingLoop, Output
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus
from starlette.requests import ClientDisconnect

from nextoken.serve.bodies import read_json
from nextoken.serve.core import ContextLengthError, GenerationCore, StepStats, TokenEvent
from nextoken.serve.models import ModelSet
from nextoken.serve.protocol import (
    SSE_DONE,
    Choice,
    ChoiceState,
    GenerationRequest,
    RequestError,
    ResponseBuilder,
    parse_request,
    plan_choices,
    sse,
    structured_spec,
)
from nextoken.serve.request_log import RequestLog, install_request_log
from nextoken.serve.tokenize_routes import check_model

logger = logging.getLogger("nextoken.serve")

CANCEL = "__cancel__"
RELOAD = "__reload__"
MODEL_KEY = "nextoken_model"  # key in LitServe's shared manager dict: the version taking new requests
RELOAD_POLL_S = 1.0
WORKER_CHECK_S = 0.5  # how often a waiting request looks whether the worker is still alive
MSG_RATE = 1000.0  # batch messages per second from the worker at most (first and last tokens never wait)
MAX_BODY_BYTES = 1 << 20
INTERNAL_ERROR = {"error": {"message": "internal error during generation", "type": "server_error", "param": None,
                            "code": "internal_error"}}


class Pipes:
    """Direct queues between the API process and the inference worker.

    LitServe's request queue and response transport are ``multiprocessing.Manager`` queues: every
    message is a round trip through the manager process (~60 us idle, milliseconds when the cores
    are busy, and the manager's CPU on top). These are plain pipes (~1 us a put), created before
    the processes start: the worker, spawned, receives them pickled with the LitAPI; the API
    process, forked, inherits them. LitServe's own queues stay in place, unused.

    ``requests``: (response queue id, uid, timestamp, payload) tuples, API -> worker.
    ``responses[i]``: lists of (uid, data, status), worker -> API process ``i``.
    """

    def __init__(self, num_api_servers: int = 1) -> None:
        ctx = mp.get_context("spawn")  # a fork-context lock may not be shared with a spawned worker
        self.requests = ctx.SimpleQueue()
        self.responses = [ctx.SimpleQueue() for _ in range(num_api_servers)]


# ============================================================================================
# Worker side
# ============================================================================================
class GenerationAPI(ls.LitAPI):
    """LitServe's continuous-batching hooks over the worker's model versions (``ModelSet``)."""

    def __init__(self, artifact_dir: str, *, max_batch_size: int, device: str, threads: int, spec: LitSpec,
                 loop: ls.loops.LitLoop, pipes: Pipes) -> None:
        super().__init__(max_batch_size=max_batch_size, stream=True, spec=spec, loop=loop,
                         api_path="/v1/completions")
        self.pipes = pipes
        self.artifact_dir = artifact_dir
        self.device_name = device
        self.threads = threads
        self.models: ModelSet | None = None
        self.metrics = None
        self.shared: Any = None  # LitServe's manager dict, also read by the HTTP side
        self._pending: list[Output] = []

    def setup(self, device: str) -> None:
        # A terminal's Ctrl-C reaches every process in the group; the main process drains, and
        # this worker must keep generating for the streams still in flight (it stops on SIGTERM).
        if mp.parent_process() is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            from nextoken.serve.metrics import ServerMetrics

            self.metrics = ServerMetrics()
        except RuntimeError:
            self.metrics = None  # in-process use without a metrics directory
        self.models = ModelSet(self.artifact_dir, self._make_core, self._on_change)
        self.models.load_initial()

    def _make_core(self, artifact: Any) -> GenerationCore:
        model_id = artifact.model_id

        def on_step(s: StepStats) -> None:
            if self.metrics is not None:
                self.metrics.observe_step(model_id, duration_s=s.duration_s, batch_size=s.batch_size,
                                          running=s.running, waiting=s.waiting, slots_in_use=s.slots_in_use,
                                          slots_total=s.slots_total)

        return GenerationCore(artifact, max_batch_size=self.max_batch_size, device=self.device_name,
                              threads=self.threads, on_step=on_step)

    def _on_change(self, kind: str, info: dict[str, Any]) -> None:
        m = self.metrics
        if kind in ("loaded", "switched"):
            if m is not None:
                core = self.models.current
                m.info.labels(info["id"], info["version"], "onnxruntime", core.engine.provider).set(1)
                if kind == "switched":
                    m.reloads.labels(info["id"]).inc()
            self.publish()
        elif kind == "failed" and m is not None:
            m.reload_failures.labels(info["id"], info["reason"]).inc()
        if m is not None and self.models is not None:
            m.models_loaded.set(self.models.models_loaded)
        if kind == "failed":
            self.publish(last_error=info["error"])

    def publish(self, last_error: str | None = None) -> None:
        """Tell the HTTP side which version now takes new requests."""
        if self.shared is not None and self.models is not None and self.models.current is not None:
            self.shared[MODEL_KEY] = {**self.models.info().__dict__, "last_error": last_error}

    # --- LitServe's continuous-batching hooks ------------------------------------------------
    def add_request(self, uid: str, request: dict[str, Any]) -> None:
        try:
            self.models.add(uid, request)
        except ContextLengthError as e:  # the prompt no longer fits the version that will run it
            self._pending.append(Output(uid, {"error": RequestError(str(e), param="max_tokens",
                                                                     code="context_length_exceeded").body(),
                                              "status": 400}, LitAPIStatus.FINISH_STREAMING))
        except Exception as e:  # one bad request must not stop admission for everyone
            logger.exception("add_request failed for %s", uid)
            self._pending.append(Output(uid, RuntimeError(f"{type(e).__name__}: {e}"), LitAPIStatus.ERROR))

    def cancel(self, uid: str) -> None:
        self.models.cancel(uid)

    def has_capacity(self) -> bool:
        return self.models.has_capacity()

    def has_active_requests(self) -> bool:
        return self.models.has_work() or bool(self._pending)

    def step(self, prev_outputs: list[Output] | None) -> list[Output]:
        outputs, self._pending = self._pending, []
        try:
            events = self.models.step()
        except Exception as e:
            # LitServe's loop has no guard: an exception here would end the worker and leave every
            # client waiting forever. Fail the requests this step held, keep serving the next ones.
            logger.exception("engine step failed; failing %d requests", len(self.models.owner))
            err = RuntimeError(f"{type(e).__name__}: {e}")  # a plain exception always pickles
            return outputs + [Output(rid, err, LitAPIStatus.ERROR) for rid in self.models.abort_all()]
        for ev in events:
            status = LitAPIStatus.FINISH_STREAMING if ev.finish_reason else LitAPIStatus.OK
            outputs.append(Output(ev.rid, ev, status))
        return outputs

    def predict(self, *args: Any, **kwargs: Any) -> Any:  # LitServe requires it; the loop never calls it
        raise NotImplementedError("GenerationAPI is driven by BatchingLoop.step")

    def decode_request(self, request: Any) -> Any:
        return request

    def encode_response(self, output: Any) -> Any:
        return output


class BatchingLoop(ContinuousBatchingLoop):
    """A blocking, non-spinning continuous-batching loop (see the module note)."""

    def __init__(self) -> None:
        super().__init__()
        # Created in the worker on first run(): the loop is pickled into the spawned worker.
        self._inbox: queue.SimpleQueue | None = None
        self._reader: threading.Thread | None = None
        self._last_poll = 0.0
        self._outbox: dict[str, tuple[Any, str]] = {}  # uid -> (output not yet sent, status)
        self._urgent = False  # the outbox holds a first token, a last one or an error: send now
        self._cv: threading.Condition | None = None  # guards _outbox, _urgent, response_queue_ids
        self._sender: threading.Thread | None = None

    def _read_requests(self, request_queue: Any) -> None:
        while True:
            try:
                item = request_queue.get()
            except (EOFError, OSError, BrokenPipeError):
                item = None
            self._inbox.put(item)
            if item is None:
                return

    def _accept(self, item: Any, lit_api: GenerationAPI) -> None:
        response_queue_id, uid, _, payload = item
        if isinstance(payload, dict) and payload.get(CANCEL):
            lit_api.cancel(uid)
            return
        if isinstance(payload, dict) and payload.get(RELOAD):
            lit_api.models.poll(force=True)
            return
        with self._cv:
            self.response_queue_ids[uid] = response_queue_id
        lit_api.add_request(uid, payload)

    def run(self, lit_api: GenerationAPI, device: str, worker_id: int, request_queue: Any, transport: Any,
            workers_setup_status: dict[int, str], callback_runner: Any) -> None:  # type: ignore[override]
        if self._reader is None:
            lit_api.shared = workers_setup_status
            lit_api.publish()
            self._inbox = queue.SimpleQueue()
            self._reader = threading.Thread(target=self._read_requests, args=(lit_api.pipes.requests,),
                                            daemon=True, name="request-reader")
            self._reader.start()
            self._cv = threading.Condition()
            self._sender = threading.Thread(target=self._send_loop, args=(lit_api.pipes.responses,), daemon=True,
                                            name="response-sender")
            self._sender.start()
        now = time.monotonic()
        if now - self._last_poll >= RELOAD_POLL_S:
            self._last_poll = now
            lit_api.models.poll()
        if not lit_api.has_active_requests():
            try:  # idle: sleep until a request arrives (waking once in a while to look for new versions)
                item = self._inbox.get(timeout=RELOAD_POLL_S)
            except queue.Empty:
                return
            if item is None:
                raise SystemExit(0)
            self._accept(item, lit_api)
        while True:  # take everything that arrived during the last step
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                raise SystemExit(0)
            self._accept(item, lit_api)
        if not lit_api.has_active_requests():
            return
        outputs = lit_api.step(None)
        self._send(outputs, transport, lit_api)

    def _send(self, outputs: list[Output], transport: Any, lit_api: GenerationAPI) -> None:
        """Hand this step's outputs to the sender thread, merged per request while it is busy.

        Every message costs the sender an IPC write and the API process a wake-up; sending from
        the engine's thread stalled every step for it. The sender thread ships one message per
        API process per send, carrying every token that accumulated meanwhile, so the engine
        never waits for the transport.
        """
        with self._cv:
            for out in outputs:
                uid = out.uid
                if uid not in self.response_queue_ids:
                    continue
                if out.status == LitAPIStatus.ERROR:
                    self._outbox[uid] = (pickle.dumps(out.output), LitAPIStatus.ERROR)
                    self._urgent = True
                    continue
                ev = out.output
                if isinstance(ev, dict):  # an error answer for this request alone
                    self._outbox[uid] = (ev, out.status)
                    self._urgent = True
                    continue
                held = self._outbox.get(uid)
                if held is not None:
                    held[0].merge(ev)
                    self._outbox[uid] = (held[0], out.status)
                else:
                    self._outbox[uid] = (ev, out.status)
                self._urgent = self._urgent or out.status == LitAPIStatus.FINISH_STREAMING or ev.queue_time is not None
            if self._outbox:
                self._cv.notify()

    def _send_loop(self, responses: list[Any]) -> None:
        """The sender thread: at most MSG_RATE messages a second, but first/last tokens and errors at once."""
        last = 0.0
        while True:
            with self._cv:
                while True:
                    if not self._outbox:
                        self._cv.wait()
                        continue
                    wait = 0.0 if self._urgent else last + 1.0 / MSG_RATE - time.perf_counter()
                    if wait <= 0:
                        break
                    self._cv.wait(wait)
                outbox, self._outbox, self._urgent = self._outbox, {}, False
                by_queue: dict[int, list[tuple[str, Any, str]]] = {}
                for uid, (data, status) in outbox.items():
                    wire = data.to_wire() if isinstance(data, TokenEvent) else data
                    by_queue.setdefault(self.response_queue_ids[uid], []).append((uid, wire, status))
                    if status != LitAPIStatus.OK:
                        self.response_queue_ids.pop(uid, None)
            last = time.perf_counter()
            try:
                for qid, items in by_queue.items():
                    responses[qid].put(items)
            except (EOFError, OSError, BrokenPipeError):  # the pipe closed: the server is stopping
                return


# ============================================================================================
# API (HTTP) side
# ============================================================================================
class ServerState:
    """Shared between the main process and the API process (created before the fork)."""

    def __init__(self, max_batch_size: int, max_queue: int) -> None:
        self.inflight = mp.Value("i", 0)  # engine requests (choices) admitted and not finished
        self.draining = mp.Event()
        self.worker_failed = mp.Event()  # set by the main process when the inference worker died
        self.max_inflight = max_batch_size + max_queue


class ServedModel:
    """The HTTP side's view of the version taking new requests: tokenizer and limits."""

    def __init__(self, path: str) -> None:
        import json

        from tokenizers import Tokenizer

        from nextoken.export.artifact import load_artifact

        artifact = load_artifact(path, verify=False)  # the worker verified it before switching
        self.path = path
        self.id = artifact.model_id
        self.name = artifact.name
        self.version = artifact.version
        self.context = int(artifact.config["n_positions"])
        self.eos_id = int(artifact.config["eos_token_id"])
        self.tokenizer = Tokenizer.from_file(str(artifact.tokenizer_path))
        self.created = int(artifact.onnx_path.stat().st_mtime)
        self._vocab_size = self.tokenizer.get_vocab_size()
        self._token_text: dict[int, str] = {}
        self._tokenizer_config: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            cfg = json.loads((artifact.path / "tokenizer_config.json").read_text(encoding="utf-8"))
            if isinstance(cfg, dict):
                self._tokenizer_config = cfg
        if not self._tokenizer_config.get("unk_token") and self.tokenizer.token_to_id("<unk>") is not None:
            self._tokenizer_config["unk_token"] = "<unk>"

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        t = self._token_text.get(token_id)
        if t is None:
            t = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return t

    def tokenizer_config(self) -> dict[str, Any]:
        return dict(self._tokenizer_config)


class _Fanout:
    """One HTTP request's engine requests (one per choice): their events, merged in arrival order.

    Each choice has its own uid in the response buffer; every uid points at one shared queue, so a
    single iterator yields ``(choice index, event)`` for all of them. A choice's admission slot is
    released as soon as it finishes; whatever is left is cancelled and released by ``close``.
    """

    def __init__(self, spec: OpenAISpec, endpoint: str, choices: list[Choice], arrival: float, model_id: str) -> None:
        self.spec = spec
        self.items: deque = deque()  # (choice index, data, status)
        self.event = asyncio.Event()
        self.uids: dict[int, str] = {}  # choice index -> uid
        self.open: set[int] = set()  # choice indexes still running
        self.ctx: dict[int, _RequestCtx] = {}
        stamp = time.monotonic_ns()
        for c in choices:
            uid = f"{endpoint}-{stamp}-{id(self)}-{c.index}"
            self.uids[c.index] = uid
            self.open.add(c.index)
            self.ctx[c.index] = _RequestCtx(endpoint, arrival, len(c.prompt_ids), model_id)
            spec.response_buffer[uid] = _SinkRef(self, c.index)

    async def events(self) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        while self.open:
            # Wake now and then to notice a dead worker: its tokens will never come, and LitServe
            # would keep this connection open until uvicorn is killed.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.event.wait(), WORKER_CHECK_S)
            if not self.event.is_set():
                if self.spec.state.worker_failed.is_set():
                    raise RuntimeError("the inference worker died")
                continue
            self.event.clear()
            while self.items:
                index, data, status = self.items.popleft()
                if status == LitAPIStatus.ERROR:
                    err = pickle.loads(data) if isinstance(data, bytes) else data
                    raise RuntimeError(f"generation failed: {err}")
                if status == LitAPIStatus.FINISH_STREAMING:
                    self.finished(index)
                yield index, data

    def finished(self, index: int, outcome: str | None = None) -> None:
        """A choice is done: free its slot at once (and record it, when its outcome is known here)."""
        if index not in self.open:
            return
        self.open.discard(index)
        self.spec.response_buffer.pop(self.uids[index], None)
        self.spec.release(1)
        if outcome is not None:
            self.spec.record(self.ctx[index], outcome)

    def close(self, outcome: str) -> None:
        """Cancel every choice still running (the client left, or the request failed) and free their slots."""
        left = sorted(self.open)
        if left:
            self.spec.cancel([self.uids[i] for i in left])
        for i in left:
            self.finished(i, outcome)


class _SinkRef:
    """A response-buffer entry: which fan-out and choice a uid's events belong to."""

    __slots__ = ("fanout", "index")
    worker_id = None  # LitServe's dead-worker sweep skips entries that name no worker (ours: server.py handles it)

    def __init__(self, fanout: _Fanout, index: int) -> None:
        self.fanout, self.index = fanout, index


class OpenAISpec(LitSpec):
    """The OpenAI routes: validate, tokenize, admit, fan out one engine request per choice, answer."""

    def __init__(self, *, artifact_dir: str, state: ServerState, pipes: Pipes, log_level: str = "warning") -> None:
        super().__init__()
        self.pipes = pipes
        self.artifact_dir = artifact_dir
        self.state = state
        self.log_level = log_level
        self.shared: Any = None
        self._model: ServedModel | None = None
        self._model_checked = 0.0
        self._metrics = None
        self._dispatcher: threading.Thread | None = None
        # One thread does every put on the request pipe (a blocking write when the pipe is full), so
        # the event loop keeps serving streams meanwhile; one thread keeps them in order, so a
        # request's cancel never overtakes the request.
        self._putter: ThreadPoolExecutor | None = None
        self.api_path = "/v1/completions"  # LitServe keys the request queue by this path
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])

    def setup(self, server: Any) -> None:
        super().setup(server)
        self.shared = server.workers_setup_status
        install_request_log(self.log_level)

    def __getstate__(self) -> dict[str, Any]:
        # The worker gets a pickled copy: it needs none of the HTTP-side state.
        state = super().__getstate__()
        state.update(_model=None, _metrics=None, state=None, shared=None, _dispatcher=None, _putter=None)
        return state

    @property
    def stream(self) -> bool:
        return True

    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output

    def model(self) -> ServedModel:
        """The version the worker serves now (re-read at most every 0.2 s)."""
        now = time.monotonic()
        if self._model is None or now - self._model_checked > 0.2:
            self._model_checked = now
            path = self.artifact_dir
            with contextlib.suppress(Exception):  # before the worker reports, serve the start-up path
                info = self.shared.get(MODEL_KEY) if self.shared is not None else None
                if info:
                    path = info["path"]
            if self._model is None or self._model.path != path:
                self._model = ServedModel(path)
        return self._model

    @property
    def metrics(self) -> Any:
        if self._metrics is None:
            from nextoken.serve.metrics import ServerMetrics

            try:
                self._metrics = ServerMetrics()
            except RuntimeError:
                self._metrics = False
        return self._metrics or None

    # --- boundary checks ---------------------------------------------------------------------
    async def read_json(self, request: Request) -> Any:
        return await read_json(request, MAX_BODY_BYTES)

    def error(self, e: RequestError) -> JSONResponse:
        kind = {401: "unauthorised", 429: "overloaded", 503: "unavailable"}.get(e.status, "validation")
        if self.metrics is not None:
            self.metrics.error(self.model().id, kind)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def admit(self, engine_requests: int, choices: int) -> None:
        """Count a request's engine requests in, or refuse it (429) without waiting for the engine."""
        limit = self.state.max_inflight
        if choices > limit:  # could never be admitted: a 400, not a 429 to retry forever
            raise RequestError(f"this request asks for {choices} choices (prompts x n); this server runs or queues "
                               f"at most {limit} requests at once", param="n")
        with self.state.inflight.get_lock():
            if self.state.inflight.value + engine_requests > limit:
                raise RequestError(f"the server is at capacity ({limit} requests running or queued); retry later",
                                   status=429, type="rate_limit_error", code="overloaded",
                                   headers={"Retry-After": "1"})
            self.state.inflight.value += engine_requests

    def release(self, engine_requests: int) -> None:
        if engine_requests:
            with self.state.inflight.get_lock():
                self.state.inflight.value -= engine_requests

    # --- endpoints ---------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self.handle(request, "completions")

    async def chat_completions(self, request: Request) -> Response:
        return await self.handle(request, "chat")

    async def handle(self, request: Request, endpoint: str) -> Response:
        try:
            return await self._handle(request, endpoint)
        except ClientDisconnect:  # gone before its body arrived: nothing was admitted, nobody reads an answer
            return Response(status_code=499)
        except Exception:  # a bug of ours: still an OpenAI-style JSON body, never a bare traceback page
            logger.exception("internal error answering %s", request.url.path)
            if self.metrics is not None:
                self.metrics.error(self.model().id, "internal")
            return JSONResponse(INTERNAL_ERROR, status_code=500)

    async def _handle(self, request: Request, endpoint: str) -> Response:
        arrival = time.time()
        try:
            if self.state.draining.is_set() or self.state.worker_failed.is_set():
                raise RequestError("the server is shutting down", status=503, type="server_error",
                                   code="unavailable", headers={"Retry-After": "1"})
            body = await self.read_json(request)
            req = parse_request(body, endpoint)
            model = self.model()
            check_model(req.model, model)
            spec = structured_spec(req.structured)
            choices = plan_choices(req, model, structured=spec)
            running = [c for c in choices if c.needs_engine]
            self.admit(len(running), len(choices))
        except RequestError as e:
            return self.error(e)

        builder = ResponseBuilder(endpoint, model.id, echo=req.echo, logprobs=req.logprobs is not None,
                                  service_tier=req.service_tier, token_text=model.token_text)
        states = {c.index: ChoiceState(c) for c in choices}
        for c in choices:
            if not c.needs_engine:  # echo of the prompt alone: answered here
                states[c.index].finish_reason = "length"
        fan = _Fanout(self, endpoint, running, arrival, model.id)
        try:
            if running:
                await self._submit(fan, running, model, arrival)
        except BaseException:
            fan.close("error")
            raise
        log = RequestLog(builder.id, endpoint, model.id, req.recorded, len(choices))
        if req.stream:
            first: tuple[int, dict[str, Any]] | None = None
            if running:
                # Wait for the first event before answering, so a late refusal can still be a 4xx; a client
                # that leaves meanwhile (queued behind a full batch) gives up its place at once.
                events = fan.events()
                watcher = asyncio.create_task(_watch_disconnect(request))
                try:
                    first = await _first_or_disconnect(events, watcher)
                except BaseException:
                    fan.close("error")
                    raise
                finally:
                    watcher.cancel()
                if first is None:
                    fan.close("cancelled")
                    log.write("cancelled")
                    return Response(status_code=499)  # nobody reads it
                if "error" in first[1]:
                    fan.close("error")
                    log.write("error")
                    return self.error(_worker_error(first[1]))
                builder.model = first[1].get("model") or model.id
                events = _prepend(first, events)
            else:
                events = _no_events()
            return StreamingResponse(self._stream(req, builder, states, events, fan, log),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._complete(builder, states, fan, request, log)

    async def _submit(self, fan: _Fanout, running: list[Choice], model: ServedModel, arrival: float) -> None:
        self._ensure_dispatcher()
        items = []
        for c in running:
            # The worker tokenizes a text prompt again ([EOS] + text) when another version runs it; not when the
            # text is fed alone, and not for echo, whose tokens are already in the answer's shape.
            again = c.prompt_text is not None and len(c.prompt_ids) == len(c.echo_ids) + 1 and not c.echo_text
            payload = {"prompt_ids": c.prompt_ids, "params": c.params.__dict__, "arrival": arrival, "model": model.id,
                       "text": c.prompt_text if again else None}
            items.append((self.response_queue_id, fan.uids[c.index], time.monotonic(), payload))

        def put_all() -> None:
            for item in items:
                self.pipes.requests.put(item)

        await asyncio.get_running_loop().run_in_executor(self._put_thread(), put_all)

    def _ensure_dispatcher(self) -> None:
        """Start the thread that reads the worker's batches and fans them out to each request."""
        if self._dispatcher is not None and self._dispatcher.is_alive():
            return
        loop = asyncio.get_running_loop()
        pipe = self.pipes.responses[self.response_queue_id or 0]
        self._dispatcher = threading.Thread(target=self._read_responses, args=(pipe, loop), daemon=True,
                                            name="response-reader")
        self._dispatcher.start()

    def _read_responses(self, pipe: Any, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                batch = pipe.get()
            except (EOFError, OSError):  # the worker side closed: the server is stopping
                return
            loop.call_soon_threadsafe(self._deliver, batch)

    def _deliver(self, batch: list[tuple[str, Any, str]]) -> None:
        for uid, data, status in batch:
            ref = self.response_buffer.get(uid)
            if ref is not None:  # gone = the client left; its cancel is on the way
                ref.fanout.items.append((ref.index, data, status))
                ref.fanout.event.set()

    def _put_thread(self) -> ThreadPoolExecutor:
        if self._putter is None:
            self._putter = ThreadPoolExecutor(1, thread_name_prefix="request-put")
        return self._putter

    def cancel(self, uids: list[str]) -> None:
        def put_all() -> None:
            for uid in uids:
                self.pipes.requests.put((self.response_queue_id, uid, time.monotonic(), {CANCEL: True}))

        with contextlib.suppress(Exception):  # the worker is gone (shutdown): nothing left to cancel
            self._put_thread().submit(put_all)

    def record(self, ctx: _RequestCtx, outcome: str) -> None:
        if self.metrics is None:
            return
        self.metrics.observe_request(ctx.model, ctx.endpoint, outcome, arrival=ctx.arrival,
                                     first_token=ctx.times[0] if ctx.times else None, token_times=ctx.times,
                                     prompt_tokens=ctx.prompt_tokens, generated_tokens=ctx.completion_tokens,
                                     queue_time_s=ctx.queue_time)

    @staticmethod
    def _apply(st: ChoiceState, ctx: _RequestCtx, ev: dict[str, Any]) -> None:
        ctx.update(ev)
        st.text.append(ev.get("text", ""))
        st.token_ids += ev.get("token_ids", [])
        if ev.get("logprobs") is not None:
            st.logprobs = (st.logprobs or []) + ev["logprobs"]
        if ev.get("prompt_logprobs") is not None:
            st.prompt_logprobs = ev["prompt_logprobs"]
        st.completion_tokens = ctx.completion_tokens
        if ev.get("finish_reason"):
            st.finish_reason = ev["finish_reason"]

    @staticmethod
    def _prompt_tokens(states: dict[int, ChoiceState], fan: _Fanout) -> int:
        """Each prompt's tokens once (not once per choice), as the worker last reported them."""
        per_prompt: dict[int, int] = {}
        for i, st in states.items():
            ctx = fan.ctx.get(i)
            per_prompt[st.choice.prompt_index] = ctx.prompt_tokens if ctx is not None else len(st.choice.prompt_ids)
        return sum(per_prompt.values())

    async def _stream(self, req: GenerationRequest, builder: ResponseBuilder, states: dict[int, ChoiceState],
                      events: AsyncIterator[tuple[int, dict[str, Any]]], fan: _Fanout,
                      log: RequestLog) -> AsyncIterator[bytes]:
        outcome = "cancelled"
        try:
            for st in states.values():  # echo-only choices are complete already
                if not st.choice.needs_engine:
                    yield sse(builder.chunk(st, "", [], None, st.finish_reason))
            async for index, ev in events:
                if "error" in ev:  # refused by the worker after the stream began (a version switch)
                    outcome = "error"
                    yield sse(_worker_error(ev).body())
                    return
                st, ctx = states[index], fan.ctx[index]
                ctx.update(ev)
                builder.model = ctx.model
                if ev.get("prompt_logprobs") is not None:
                    st.prompt_logprobs = ev["prompt_logprobs"]
                st.completion_tokens = ctx.completion_tokens
                finish = ev.get("finish_reason")
                if ev.get("token_ids") or finish or not st.started:
                    st.finish_reason = finish
                    yield sse(builder.chunk(st, ev.get("text", ""), ev.get("token_ids", []), ev.get("logprobs"),
                                            finish))
                if finish:
                    self.record(ctx, finish)
            outcome = "finished"
            if req.include_usage:
                completion = sum(st.completion_tokens for st in states.values())
                yield sse(builder.usage_chunk(self._prompt_tokens(states, fan), completion))
            yield SSE_DONE
        except RuntimeError as e:
            outcome = "error"
            logger.error("%s: %s", builder.id, e)
            yield sse(INTERNAL_ERROR)
        finally:
            fan.close(outcome if outcome != "finished" else "cancelled")
            log.write(outcome, self._prompt_tokens(states, fan), sum(st.completion_tokens for st in states.values()))

    async def _complete(self, builder: ResponseBuilder, states: dict[int, ChoiceState], fan: _Fanout,
                        request: Request, log: RequestLog) -> Response:
        outcome = "cancelled"
        watcher = asyncio.create_task(_watch_disconnect(request))
        try:
            if fan.open:
                async for index, ev in _until_disconnect(fan.events(), watcher):
                    if "error" in ev:
                        outcome = "error"
                        return self.error(_worker_error(ev))
                    st, ctx = states[index], fan.ctx[index]
                    self._apply(st, ctx, ev)
                    builder.model = ctx.model
                    if st.finish_reason:
                        self.record(ctx, st.finish_reason)
                if fan.open:
                    return Response(status_code=499)  # the client went away; nobody reads this
            outcome = "finished"
            return JSONResponse(builder.final(list(states.values()), self._prompt_tokens(states, fan)))
        except RuntimeError as e:
            outcome = "error"
            logger.error("%s: %s", builder.id, e)
            if self.metrics is not None:
                self.metrics.error(builder.model, "internal")
            return JSONResponse(INTERNAL_ERROR, status_code=500)
        finally:
            watcher.cancel()
            fan.close(outcome if outcome != "finished" else "cancelled")
            log.write(outcome, self._prompt_tokens(states, fan), sum(st.completion_tokens for st in states.values()))


def _worker_error(ev: dict[str, Any]) -> RequestError:
    e = ev["error"]["error"]
    return RequestError(e["message"], param=e["param"], code=e["code"], status=ev["status"])


class _RequestCtx:
    """Per-choice timing and counts, for usage and metrics."""

    def __init__(self, endpoint: str, arrival: float, prompt_tokens: int, model: str) -> None:
        self.endpoint = endpoint
        self.model = model  # the version that served it, as the worker reports
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.times: list[float] = []
        self.queue_time: float | None = None

    def update(self, ev: dict[str, Any]) -> None:
        self.model = ev.get("model") or self.model
        self.prompt_tokens = ev.get("prompt_tokens") or self.prompt_tokens  # re-tokenized on a version switch
        self.times += ev.get("times", [])
        self.completion_tokens = ev.get("completion_tokens", self.completion_tokens)
        if ev.get("queue_time") is not None and self.queue_time is None:
            self.queue_time = max(0.0, ev["queue_time"])


async def _no_events() -> AsyncIterator[tuple[int, dict[str, Any]]]:
    return
    yield  # an async generator that yields nothing


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


async def _watch_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


async def _first_or_disconnect(events: AsyncIterator[Any], watcher: asyncio.Task) -> Any | None:
    """The first event, or None when the client disconnects before it comes."""
    nxt = asyncio.ensure_future(events.__anext__())
    done, _ = await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if nxt in done:
        return nxt.result()
    nxt.cancel()
    return None


async def _until_disconnect(events: AsyncIterator[Any], watcher: asyncio.Task) -> AsyncIterator[Any]:
    """Yield events until they end or the client disconnects, whichever comes first."""
    it = events.__aiter__()
    while True:
        nxt = asyncio.ensure_future(it.__anext__())
        done, _ = await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if nxt in done:
            try:
                yield nxt.result()
            except StopAsyncIteration:
                return
        else:
            nxt.cancel()
            return

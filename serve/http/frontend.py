"""The HTTP side: OpenAI routes over the engine client, probes, metrics, admission, and the pages.

Convert: HTTP request --> ``protocol.parse_request`` (validate once) --> ``plan_choices`` (tokenize
once; one engine request per choice) --> ``EngineClient.submit`` --> per choice, ``Update``s -->
``ChoiceRun`` (detokenize, stop strings, logprob entries) --> ``ResponseBuilder`` (SSE chunks or one
body). The engine sends token ids only; text, stop strings and logprob strings are made here, in
the HTTP process, so the engine's step never waits for them. A choice whose text reaches a stop
string is cancelled in the engine at once (its later tokens are dropped here).

Routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``; vLLM's ``/tokenize``,
``/detokenize``, ``/tokenizer_info``; probes ``/health`` (liveness: the server process answers and
its engine is alive) and ``/ready`` (readiness: a model is loaded and the server is not draining);
``/metrics``; ``POST /admin/reload``; ``/openapi.json``; the pages (the playground at ``/``, the API
at ``/docs``). Admission is decided before the body is read when the server is full (a 429 in
microseconds), and again once the number of choices is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from tokenizers import Tokenizer

from nextoken.export.artifact import Artifact
from nextoken.serve.config import ServeConfig
from nextoken.serve.engine.loop import Pipes
from nextoken.serve.http.bodies import parse_json, read_body
from nextoken.serve.http.engine_client import EngineClient, EngineDead, RequestStream, SharedState, Update
from nextoken.serve.http.protocol import (
    SSE_DONE,
    ChoiceState,
    GenerationRequest,
    RequestError,
    ResponseBuilder,
    parse_request,
    plan_choices,
    sse,
    structured_spec,
)
from nextoken.serve.http.request_log import RequestLog, install_request_log
from nextoken.serve.http.textstream import TextStream, TokenBytes
from nextoken.serve.http.tokenize_routes import check_model
from nextoken.serve.wire import AddRequest, ModelStatus

logger = logging.getLogger("nextoken.serve")
INTERNAL_ERROR = {"error": {"message": "internal error during generation", "type": "server_error", "param": None,
                            "code": "internal_error"}}
PROBES = ("/health", "/ready")
_rids = itertools.count()


class ServedModel:
    """The HTTP side's view of one model version: its tokenizer and limits (what planning needs)."""

    def __init__(self, status: ModelStatus) -> None:
        from pathlib import Path

        self.status = status
        self.path = status.path
        self.id = status.id
        self.name = status.name
        self.version = status.version
        self.context = status.max_model_len  # the longest sequence this server caches
        self.model_context = status.context
        self.eos_id = status.eos_id
        self.tokenizer = Tokenizer.from_file(str(Path(status.path) / "tokenizer.json"))
        self.created = int((Path(status.path) / "config.json").stat().st_mtime)
        self._vocab_size = self.tokenizer.get_vocab_size()
        self.token_bytes = TokenBytes(self.tokenizer)
        self._token_text: dict[int, str] = {}
        self._pieces: dict[int, tuple[str, list[int]]] = {}  # id -> (text, bytes), for logprob entries
        self._tokenizer_config: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            cfg = json.loads((Path(status.path) / "tokenizer_config.json").read_text(encoding="utf-8"))
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

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        p = self._pieces.get(token_id)
        if p is None:
            p = self._pieces[token_id] = (self.token_text(token_id), list(self.token_bytes(token_id)))
        return p

    def logprob_entry(self, token_id: int, logprob: float, top_ids: Any, top_lps: Any) -> dict[str, Any]:
        """The protocol's logprob item: {token, token_id, logprob, bytes, top: [[token, id, logprob, bytes]]}."""
        top = []
        if top_ids is not None:
            for i, lp in zip(top_ids.tolist(), top_lps.tolist(), strict=True):
                text, raw = self._piece(i)
                top.append([text, i, lp, raw])
        text, raw = self._piece(token_id)
        return {"token": text, "token_id": token_id, "logprob": logprob, "bytes": raw, "top": top}

    def tokenizer_config(self) -> dict[str, Any]:
        return dict(self._tokenizer_config)


@dataclass
class Event:
    """What one choice has to say now: new text and tokens, their logprob entries, maybe its end."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: str | None = None


class ChoiceRun:
    """One choice in flight: its engine stream turned into text, with stop strings and logprob entries."""

    def __init__(self, frontend: Frontend, state: ChoiceState, stream: RequestStream | None, model: ServedModel,
                 endpoint: str, arrival: float) -> None:
        self.frontend = frontend
        self.state = state
        self.stream = stream
        self.model = model  # the version running it (updated from the engine's Started message)
        self.endpoint = endpoint
        self.arrival = arrival
        params = state.choice.params
        self.min_tokens = params.min_tokens if params is not None else 0
        self.text = TextStream(model.tokenizer, params.stop if params is not None else [])
        self.want_logprobs = params is not None and params.logprobs is not None
        self.times: list[float] = []
        self.queue_time: float | None = None
        self.prompt_tokens = len(state.choice.prompt_ids)
        self.stopped = False  # a stop string ended it here (the engine was told to cancel)
        self.done = stream is None

    def _start(self, u: Update) -> None:
        st = u.started
        self.queue_time = max(0.0, st.queue_time)
        self.prompt_tokens = st.prompt_tokens
        if st.model != self.model.id:  # another version ran it (hot reload): its tokenizer decodes
            self.model = self.frontend.model_for(st.model)
            self.text = TextStream(self.model.tokenizer, self.text.stop)
        if st.prompt_logprobs is not None:
            ids = self.state.choice.prompt_ids
            entries: list[dict[str, Any] | None] = [None]
            for i in range(len(st.prompt_logprobs)):
                entries.append(self.model.logprob_entry(int(ids[i + 1]), float(st.prompt_logprobs[i]),
                                                        st.prompt_top_ids[i], st.prompt_top_logprobs[i]))
            self.state.prompt_logprobs = entries

    def apply(self, u: Update) -> Event:
        """Fold an engine update into the choice; returns what to send (empty when nothing is new)."""
        ev = Event()
        if u.failed is not None:
            raise RequestError(u.failed.message, param=u.failed.param, code=u.failed.code, status=u.failed.status)
        if u.started is not None:
            self._start(u)
        if self.stopped:
            return ev  # tokens that were already on their way when the stop string was seen
        st = self.state
        eos = self.model.eos_id
        params = st.choice.params
        for k, tok in enumerate(u.token_ids):
            st.token_ids.append(tok)
            ev.token_ids.append(tok)
            self.times.append(u.times[k])
            st.completion_tokens += 1
            if self.want_logprobs and u.logprobs is not None:
                entry = self.model.logprob_entry(tok, u.logprobs[k], u.top_ids[k] if u.top_ids else None,
                                                 u.top_logprobs[k] if u.top_logprobs else None)
                ev.logprobs = (ev.logprobs or []) + [entry]
            if tok == eos and not params.ignore_eos:
                continue  # end-of-text ends it (the engine's Finished follows) and has no text
            # vLLM: no stop string counts before min_tokens tokens
            delta = self.text.push(tok, check_stops=st.completion_tokens > self.min_tokens)
            ev.text += delta.text
            if delta.stopped:
                self.stopped = True
                ev.finish_reason = "stop"
                self.stream.cancel()
                break
        if ev.finish_reason is None and u.finished is not None:
            ev.finish_reason = u.finished.reason
            if ev.finish_reason != "cancelled":
                ev.text += self.text.finish()  # a held-back tail that can no longer become a stop string
        if ev.finish_reason is not None:
            st.finish_reason = ev.finish_reason
            self.done = True
            if self.stream is not None:
                self.stream.close()
        st.text.append(ev.text)
        if ev.logprobs is not None:
            st.logprobs = (st.logprobs or []) + ev.logprobs
        elif self.want_logprobs and st.logprobs is None:
            st.logprobs = []
        return ev

    def record(self, outcome: str) -> None:
        m = self.frontend.metrics
        if m is None or self.stream is None:
            return
        m.observe_request(self.model.id, self.endpoint, outcome, arrival=self.arrival,
                          first_token=self.times[0] if self.times else None, token_times=self.times,
                          prompt_tokens=self.prompt_tokens, generated_tokens=self.state.completion_tokens,
                          queue_time_s=self.queue_time)


class Frontend:
    """The HTTP process's routes and state; built in the main process, run in the forked HTTP process."""

    def __init__(self, config: ServeConfig, pipes: Pipes, state: SharedState, artifact: Artifact) -> None:
        self.config = config
        self.state = state
        self.api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        self.client = EngineClient(pipes, state, check_s=config.worker_check_s)
        self.client.status_changed.append(self._on_status)
        c = artifact.config
        # What the engine will report for this version; its own ModelStatus replaces it when it arrives.
        self.status = ModelStatus(id=artifact.model_id, name=artifact.name, version=artifact.version,
                                  path=str(artifact.path), context=int(c["n_positions"]),
                                  max_model_len=config.max_model_len or int(c["n_positions"]),
                                  vocab_size=int(c["vocab_size"]), eos_id=int(c["eos_token_id"]),
                                  provider="", models_loaded=1, event="starting")
        self._models: dict[str, ServedModel] = {}
        self._metrics: Any = None

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("the Frontend lives in the HTTP process (forked), it is never pickled")

    # --- model versions ------------------------------------------------------------------------
    def _on_status(self, status: ModelStatus) -> None:
        self.status = status
        if status.event in ("loaded", "switched") and self.metrics is not None:
            self.metrics.precreate(status.id)

    def model(self) -> ServedModel:
        """The version taking new requests."""
        return self.model_for(self.status.id)

    def model_for(self, model_id: str) -> ServedModel:
        """A version by id: the current one, or one this process tokenized for before a switch.

        The engine announces a new version (``ModelStatus``) before any output of it, on the same
        pipe, so a request it runs on a version this process has not tokenized for is always on
        the current one.
        """
        m = self._models.get(model_id)
        if m is None:
            if model_id != self.status.id:
                raise RuntimeError(f"the engine reported version {model_id}, which it never announced")
            m = self._models[model_id] = ServedModel(self.status)
            for old in list(self._models)[:-3]:  # versions long gone (requests keep their own reference)
                del self._models[old]
        return m

    @property
    def metrics(self) -> Any:
        if self._metrics is None:
            from nextoken.serve.metrics import ServerMetrics

            try:
                self._metrics = ServerMetrics()
            except RuntimeError:
                self._metrics = False
        return self._metrics or None

    def ready(self) -> bool:
        return (self.status.event != "starting" and not self.state.draining.is_set()
                and not self.state.engine_failed.is_set())

    # --- app -----------------------------------------------------------------------------------
    def routes(self) -> list[tuple[str, Callable[..., Any], list[str]]]:
        return [("/v1/completions", self.completions, ["POST"]),
                ("/v1/chat/completions", self.chat_completions, ["POST"])]

    def install(self, app: FastAPI) -> None:
        from nextoken.serve.http.middleware import ApiKeyMiddleware, LeaveSigintToMain, install_openai_errors
        from nextoken.serve.http.openapi import Limits, install_openapi
        from nextoken.serve.http.playground import mount_playground
        from nextoken.serve.http.tokenize_routes import mount_tokenizer_routes
        from nextoken.serve.metrics import render_latest

        install_openai_errors(app)
        app.add_middleware(StartEngineClient, frontend=self)
        app.add_middleware(LeaveSigintToMain)
        if self.api_key is not None:
            def count_rejection() -> None:
                if self.metrics is not None:
                    self.metrics.error(self.status.id, "unauthorised")

            app.add_middleware(ApiKeyMiddleware, api_key=self.api_key, on_reject=count_rejection)

        @app.get("/health")
        async def health() -> Response:
            """Liveness: the server answers and its engine process is alive (503 once it died)."""
            if self.state.engine_failed.is_set():
                return JSONResponse({"status": "failed", "error": "the engine process died"}, status_code=503)
            return JSONResponse({"status": "draining" if self.state.draining.is_set() else "ok"})

        @app.get("/ready")
        async def ready() -> Response:
            """Readiness: a model is loaded and the server is not draining (503 otherwise)."""
            if self.state.engine_failed.is_set():
                return JSONResponse({"status": "failed", "error": "the engine process died"}, status_code=503)
            if self.state.draining.is_set():
                return JSONResponse({"status": "draining"}, status_code=503)
            if self.status.event == "starting":
                return JSONResponse({"status": "loading", "model": None}, status_code=503)
            return JSONResponse({"status": "ok", "model": self.status.id})

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            m = self.model()
            return JSONResponse({"object": "list", "data": [{
                "id": m.id, "object": "model", "created": m.created, "owned_by": "nextoken", "name": m.name,
                "version": m.version, "context_length": m.context, "max_model_len": m.context}]})

        @app.post("/admin/reload")
        async def reload(request: Request) -> Response:
            """Look for a new model version now (the engine also looks about once a second)."""
            self.client.reload()
            return JSONResponse({"status": "reload requested", "serving": self.status.id,
                                 "last_error": self.status.last_error}, status_code=202)

        @app.get("/metrics")
        async def metrics(request: Request) -> Response:
            body, ctype = render_latest()
            return Response(body, media_type=ctype)

        mount_tokenizer_routes(app, self.model, self.error)
        install_openapi(app, lambda: Limits(context=self.model().context, vocab_size=self.model().vocab_size,
                                            capacity=self.state.max_inflight))
        mount_playground(app, self.model, api_key_required=self.api_key is not None)  # last: outside the key

    # --- generation routes ---------------------------------------------------------------------
    def error(self, e: RequestError) -> JSONResponse:
        kind = {401: "unauthorised", 429: "overloaded", 503: "unavailable"}.get(e.status, "validation")
        if e.status >= 500 and e.status != 503:
            kind = "internal"
        if self.metrics is not None:
            self.metrics.error(self.status.id, kind)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def _overloaded(self) -> RequestError:
        return RequestError(f"the server is at capacity ({self.state.max_inflight} requests running or queued); "
                            "retry later", status=429, type="rate_limit_error", code="overloaded",
                            headers={"Retry-After": "1"})

    async def completions(self, request: Request) -> Response:
        return await self.handle(request, "completions")

    async def chat_completions(self, request: Request) -> Response:
        return await self.handle(request, "chat")

    async def handle(self, request: Request, endpoint: str) -> Response:
        try:
            return await self._handle(request, endpoint)
        except ClientDisconnect:  # gone before its body was read: nothing was admitted, nobody reads an answer
            if self.metrics is not None:
                self.metrics.requests.labels(self.status.id, endpoint, "cancelled").inc()
            return Response(status_code=499)
        except Exception:  # a bug of ours: still an OpenAI-style JSON body, never a bare traceback page
            logger.exception("internal error answering %s", request.url.path)
            if self.metrics is not None:
                self.metrics.error(self.status.id, "internal")
            return JSONResponse(INTERNAL_ERROR, status_code=500)

    async def _handle(self, request: Request, endpoint: str) -> Response:
        arrival = time.time()
        admitted = 0
        try:
            raw = await read_body(request, self.config.max_body_bytes)
            if self.state.draining.is_set() or self.state.engine_failed.is_set():
                raise RequestError("the server is shutting down", status=503, type="server_error",
                                   code="unavailable", headers={"Retry-After": "1"})
            if self.state.inflight.value >= self.state.max_inflight:
                raise self._overloaded()  # full: refused before the body is parsed or the prompt tokenized
            req = parse_request(parse_json(raw), endpoint)
            model = self.model()
            check_model(req.model, model)
            spec = structured_spec(req.structured)
            choices = plan_choices(req, model, structured=spec)
            running = [c for c in choices if c.needs_engine]
            if len(choices) > self.state.max_inflight:  # could never be admitted: a 400, not a 429 to retry forever
                raise RequestError(f"this request asks for {len(choices)} choices (prompts x n); this server runs or "
                                   f"queues at most {self.state.max_inflight} requests at once", param="n")
            if running and not self.state.try_admit(len(running)):
                raise self._overloaded()
            admitted = len(running)
        except RequestError as e:
            return self.error(e)

        builder = ResponseBuilder(endpoint, model.id, echo=req.echo, logprobs=req.logprobs is not None,
                                  service_tier=req.service_tier, token_text=model.token_text)
        self.client.start()
        runs: list[ChoiceRun] = []
        stamp = next(_rids)
        for c in choices:
            stream = None
            if c.needs_engine:
                # The engine tokenizes a text prompt again ([EOS] + text) only when another version runs it.
                again = c.prompt_text is not None and not c.echo_text
                stream = self.client.submit(AddRequest(
                    f"{endpoint}-{os.getpid()}-{stamp}-{c.index}", c.prompt_ids, c.params, arrival, model.id,
                    c.prompt_text if again else None, add_eos_prefix=len(c.prompt_ids) == len(c.echo_ids) + 1))
            st = ChoiceState(c)
            if stream is None:
                st.finish_reason = "length"  # echo of the prompt alone: answered here
            runs.append(ChoiceRun(self, st, stream, model, endpoint, arrival))
        fan = Fanout(self, runs, admitted)
        log = RequestLog(builder.id, endpoint, model.id, req.recorded, len(choices))
        if req.stream:
            first: list[tuple[ChoiceRun, Event]] | None = []
            if fan.open:
                # Wait for the first event before answering, so a late refusal can still be a 4xx; a client
                # that leaves meanwhile (queued behind a full batch) gives up its place at once.
                try:
                    first = await _or_disconnect(fan.next(), request)
                except RequestError as e:
                    fan.close("error")
                    log.write("error", fan.prompt_tokens())
                    return self.error(e)
                except BaseException:
                    fan.close("error")
                    raise
                if first is None:
                    fan.close("cancelled")
                    log.write("cancelled")
                    return Response(status_code=499)  # nobody reads it
                builder.model = first[0][0].model.id if first else model.id
            return StreamingResponse(self._stream(req, builder, fan, first, log), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._complete(req, builder, fan, request, log)

    async def _stream(self, req: GenerationRequest, builder: ResponseBuilder, fan: Fanout,
                      first: list[tuple[ChoiceRun, Event]], log: RequestLog) -> AsyncIterator[bytes]:
        outcome = "cancelled"
        try:
            for run in fan.runs:  # echo-only choices are complete already
                if run.stream is None:
                    yield sse(builder.chunk(run.state, "", [], None, run.state.finish_reason))
            batch = first
            while True:
                out = []
                for run, ev in batch:
                    if ev.token_ids or ev.finish_reason or not run.state.started or ev.text:
                        out.append(sse(builder.chunk(run.state, ev.text, ev.token_ids, ev.logprobs,
                                                     ev.finish_reason)))
                if out:
                    yield b"".join(out)
                if not fan.open:
                    break
                batch = await fan.next()
            outcome = fan.finish_reason()
            if req.include_usage:
                yield sse(builder.usage_chunk(fan.prompt_tokens(), fan.completion_tokens()))
            yield SSE_DONE
        except RequestError as e:  # refused by the engine after the stream began (a version switch)
            outcome = "error"
            yield sse(e.body())
        except (EngineDead, RuntimeError) as e:
            outcome = "error"
            logger.error("%s: %s", builder.id, e)
            yield sse(INTERNAL_ERROR)
        finally:
            fan.close("error" if outcome == "error" else "cancelled")  # choices still open: none once finished
            log.write(outcome, fan.prompt_tokens(), fan.completion_tokens())

    async def _complete(self, req: GenerationRequest, builder: ResponseBuilder, fan: Fanout, request: Request,
                        log: RequestLog) -> Response:
        outcome = "cancelled"
        watcher = asyncio.ensure_future(_disconnected(request))  # one for the request's whole life
        try:
            while fan.open:
                work = asyncio.ensure_future(fan.next())
                done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if work not in done:
                    work.cancel()
                    return Response(status_code=499)  # the client went away; nobody reads this
                work.result()
            builder.model = fan.runs[0].model.id
            outcome = fan.finish_reason()
            return JSONResponse(builder.final([r.state for r in fan.runs], fan.prompt_tokens()))
        except RequestError as e:
            outcome = "error"
            return self.error(e)
        except (EngineDead, RuntimeError) as e:
            outcome = "error"
            logger.error("%s: %s", builder.id, e)
            if self.metrics is not None:
                self.metrics.error(builder.model, "internal")
            return JSONResponse(INTERNAL_ERROR, status_code=500)
        finally:
            watcher.cancel()
            fan.close("error" if outcome == "error" else "cancelled")  # choices still open: none once finished
            log.write(outcome, fan.prompt_tokens(), fan.completion_tokens())


class Fanout:
    """One HTTP request's choices: their updates as they come, each choice's admission freed when it ends."""

    def __init__(self, frontend: Frontend, runs: list[ChoiceRun], admitted: int) -> None:
        self.frontend = frontend
        self.runs = runs
        self.open = [r for r in runs if not r.done]
        self.admitted = admitted

    async def next(self) -> list[tuple[ChoiceRun, Event]]:
        """The next events of whichever choices have something (at least one)."""
        if len(self.open) == 1:
            run = self.open[0]
            out = [(run, run.apply(await run.stream.next()))]
        else:
            waits = {asyncio.ensure_future(r.stream.next()): r for r in self.open}
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for f in waits:
                    if not f.done():
                        f.cancel()
            out = [(waits[f], waits[f].apply(f.result())) for f in done]
        for run, _ in out:
            if run.done:
                self._finished(run, run.state.finish_reason)
        return out

    def finish_reason(self) -> str:
        """The request's outcome as the metrics name it (stop, length...): its choices' reasons, joined."""
        return ",".join(sorted({r.state.finish_reason for r in self.runs}))

    def _finished(self, run: ChoiceRun, outcome: str) -> None:
        if run in self.open:
            self.open.remove(run)
            self.frontend.state.release(1)
            self.admitted -= 1
            run.record(outcome)

    def close(self, outcome: str) -> None:
        """Cancel every choice still running (the client left, or the request failed) and free their places."""
        for run in list(self.open):
            run.stream.cancel()
            self._finished(run, outcome)

    def prompt_tokens(self) -> int:
        """Each prompt's tokens once (not once per choice), as the engine last reported them."""
        per_prompt = {r.state.choice.prompt_index: r.prompt_tokens for r in self.runs}
        return sum(per_prompt.values())

    def completion_tokens(self) -> int:
        return sum(r.state.completion_tokens for r in self.runs)


async def _or_disconnect(work: Any, request: Request) -> Any | None:
    """``await work``, or None when the client disconnects first (its body is read, so a disconnect is
    the next message on the ASGI channel)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


class StartEngineClient:
    """Starts the engine client's pipe threads in the HTTP process, when uvicorn's lifespan starts.

    The Frontend is built in the main process and forked into the HTTP process; threads do not
    survive a fork, so they start here, on the event loop that will serve requests. It also counts
    the POST requests still being answered, which a drain waits for.
    """

    def __init__(self, app: Any, frontend: Frontend) -> None:
        self.app = app
        self.frontend = frontend

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" and mp.parent_process() is not None:
            self.frontend.client.start(asyncio.get_running_loop())
            install_request_log(self.frontend.config.log_level)
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        counter = self.frontend.state.open_posts  # until the last byte of the answer is handed to the socket
        with counter.get_lock():
            counter.value += 1
        try:
            await self.app(scope, receive, send)
        finally:
            with counter.get_lock():
                counter.value -= 1


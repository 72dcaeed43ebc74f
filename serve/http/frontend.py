"""The HTTP side: OpenAI routes over the engine client, probes, metrics, admission, and the pages.

Convert: HTTP request --> ``parse_request`` (validate once; a Responses API request becomes its chat
request) --> ``plan_choices`` (tokenize once; one engine request per choice) -->
``EngineClient.submit`` --> per choice, ``Update``s --> ``ChoiceRun`` (detokenize, stop strings,
logprob entries) --> ``ResponseBuilder`` / ``ResponsesBuilder`` (SSE events or one body). The engine
sends token ids only; text, stop strings and logprob strings are made here, in the HTTP process, so
the engine's step never waits for them. A choice whose text reaches a stop string is cancelled in
the engine at once (its later tokens are dropped here).

Routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/responses``, ``/v1/models``; vLLM's
``/tokenize``, ``/detokenize``, ``/tokenizer_info``; llama.cpp's ``/apply-template``; probes ``/health``
(liveness: the server process answers and its engine is alive) and ``/ready`` (readiness: a model is
loaded and the server is not draining); ``/metrics``; ``POST /admin/reload``; ``/openapi.json``; the
pages (the playground at ``/``, the API at ``/docs``). Admission is decided before the routes when the
server is full or stopping (a 429 or 503 in microseconds, ``admission.py``), and again once the number
of choices is known.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from nextoken.export.artifact import Artifact
from nextoken.serve.config import ServeConfig
from nextoken.serve.http import admission
from nextoken.serve.http import responses as R
from nextoken.serve.http.bodies import parse_json, read_body
from nextoken.serve.http.builder import ChoiceState, PromptTokens, ResponseBuilder, answer, usage
from nextoken.serve.http.chat import load_chat_template
from nextoken.serve.http.choices import ChoiceRun, Event, Fanout, disconnected, or_disconnect
from nextoken.serve.http.engine_client import EngineClient, EngineDead, SharedState
from nextoken.serve.http.errors import INTERNAL_ERROR, RequestError, validate
from nextoken.serve.http.plan import plan_choices
from nextoken.serve.http.request_log import RequestLog
from nextoken.serve.http.requests import ChatCompletionRequest, CompletionRequest
from nextoken.serve.http.responses_api import ResponsesRequest, responses_param
from nextoken.serve.http.responses_builder import ResponsesBuilder
from nextoken.serve.http.served_model import ServedModel
from nextoken.serve.http.tokenize_routes import check_model
from nextoken.serve.wire import AddRequest, FinishReason, ModelEvent, ModelStatus, Pipes

logger = logging.getLogger("nextoken.serve")
GenerationRequest = CompletionRequest | ChatCompletionRequest
Builder = ResponseBuilder | ResponsesBuilder
ENGINE_DIED = "the engine process died"
PROBES = ("/health", "/ready")
_rids = itertools.count()


class Frontend:
    """The HTTP process's routes and state; built in the main process, run in the forked HTTP process."""

    def __init__(self, config: ServeConfig, pipes: Pipes, state: SharedState, artifact: Artifact) -> None:
        self.config = config
        self.state = state
        self.api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        self.client = EngineClient(pipes, state, check_s=config.engine_check_s)
        self.client.status_changed.append(self._on_status)
        c = artifact.config
        # What the engine will report for this version; its own ModelStatus replaces it when it arrives.
        self.status = ModelStatus(id=artifact.model_id, name=artifact.name, version=artifact.version,
                                  path=str(artifact.path), context=int(c["n_positions"]),
                                  max_model_len=config.max_model_len or int(c["n_positions"]),
                                  vocab_size=int(c["vocab_size"]),
                                  provider="", models_loaded=1, event=ModelEvent.STARTING)
        self.chat_template = load_chat_template(config.chat_template) if config.chat_template else None
        self._models: dict[str, ServedModel] = {}
        self._metrics: Any = None

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("the Frontend lives in the HTTP process (forked), it is never pickled")

    # --- model versions ------------------------------------------------------------------------
    def _on_status(self, status: ModelStatus) -> None:
        self.status = status
        if status.event in (ModelEvent.LOADED, ModelEvent.SWITCHED) and self.metrics is not None:
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
            m = self._models[model_id] = ServedModel(self.status, self.chat_template,
                                                     generation_defaults=self.config.generation_config == "auto")
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
        return (self.status.event != ModelEvent.STARTING and not self.state.draining.is_set()
                and not self.state.engine_failed.is_set())

    # --- app -----------------------------------------------------------------------------------
    def routes(self) -> list[tuple[str, Callable[..., Any], list[str]]]:
        return [("/v1/completions", self.completions, ["POST"]),
                ("/v1/chat/completions", self.chat_completions, ["POST"]),
                ("/v1/responses", self.responses, ["POST"])]

    def install(self, app: FastAPI) -> None:
        from nextoken.serve.http.admission import AdmissionMiddleware
        from nextoken.serve.http.middleware import (
            ApiKeyMiddleware,
            LeaveSigintToMain,
            StartEngineClient,
            install_openai_errors,
        )
        from nextoken.serve.http.openapi import Limits, install_openapi
        from nextoken.serve.http.playground import mount_playground
        from nextoken.serve.http.tokenize_routes import mount_tokenizer_routes
        from nextoken.serve.metrics import render_latest

        install_openai_errors(app)
        # innermost of ours: its 503s are counted as open answers (StartEngineClient), which a drain waits for
        app.add_middleware(AdmissionMiddleware, state=self.state, on_refuse=self._count_refusal)
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
                return answer(R.HealthResponse.model_construct(status="failed", error=ENGINE_DIED), 503)
            return answer(R.HealthResponse.model_construct(status="draining" if self.state.draining.is_set() else "ok"))

        @app.get("/ready")
        async def ready() -> Response:
            """Readiness: a model is loaded and the server is not draining (503 otherwise)."""
            if self.state.engine_failed.is_set():
                return answer(R.HealthResponse.model_construct(status="failed", error=ENGINE_DIED), 503)
            if self.state.draining.is_set():
                return answer(R.HealthResponse.model_construct(status="draining"), 503)
            if self.status.event == ModelEvent.STARTING:
                return answer(R.HealthResponse.model_construct(status="loading", model=None), 503)
            return answer(R.HealthResponse.model_construct(status="ok", model=self.status.id))

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            m = self.model()
            card = R.ModelCard.model_construct(id=m.id, object="model", created=m.created, owned_by="nextoken",
                                               name=m.name, version=m.version, context_length=m.context,
                                               max_model_len=m.context, chat_template=m.chat_template_origin,
                                               default_sampling_params=m.sampling_defaults)
            return answer(R.ModelList.model_construct(object="list", data=[card]))

        @app.post("/admin/reload")
        async def reload(request: Request) -> Response:
            """Look for a new model version now (the engine also looks about once a second)."""
            self.client.reload()
            return answer(R.ReloadResponse.model_construct(status="reload requested", serving=self.status.id,
                                                           last_error=self.status.last_error), 202)

        @app.get("/metrics")
        async def metrics(request: Request) -> Response:
            body, ctype = render_latest()
            return Response(body, media_type=ctype)

        mount_tokenizer_routes(app, self.model, self.error, self.config.max_body_bytes)
        install_openapi(app, lambda: Limits(context=self.model().context, vocab_size=self.model().vocab_size,
                                            capacity=self.state.max_inflight,
                                            max_body_bytes=self.config.max_body_bytes))
        mount_playground(app, self.model, api_key_required=self.api_key is not None)  # last: outside the key

    # --- generation routes ---------------------------------------------------------------------
    def error(self, e: RequestError, endpoint: str = "") -> JSONResponse:
        if endpoint == "responses":  # planned as a chat request: name the Responses API's own field
            e.param = responses_param(e.param)
        kind = {401: "unauthorised", 429: "overloaded", 503: "unavailable"}.get(e.status, "validation")
        if e.status >= 500 and e.status != 503:
            kind = "internal"
        if self.metrics is not None:
            self.metrics.error(self.status.id, kind)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)  # error_body's shape

    def _overloaded(self) -> RequestError:
        return admission.overloaded(self.state.max_inflight)

    def _count_refusal(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.error(self.status.id, kind)

    async def completions(self, request: Request) -> Response:
        return await self.handle(request, "completions")

    async def chat_completions(self, request: Request) -> Response:
        return await self.handle(request, "chat")

    async def responses(self, request: Request) -> Response:
        return await self.handle(request, "responses")

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
        try:
            raw = await read_body(request, self.config.max_body_bytes)
            if self.state.draining.is_set() or self.state.engine_failed.is_set():
                raise admission.unavailable()
            if not self.state.try_admit(1):
                raise self._overloaded()  # full: refused before the body is parsed or the prompt tokenized
        except RequestError as e:
            return self.error(e, endpoint)
        admitted = 1  # places held: one from here, then one per choice the engine runs
        try:
            # A place is taken before parsing, then the event loop is let go once: the refusals of a burst that
            # arrived with this request are answered (AdmissionMiddleware) before its parsing and tokenizing.
            await asyncio.sleep(0)
            req, make_builder = parse_request(endpoint, parse_json(raw))
            model = self.model()
            check_model(req.model, model)
            choices = plan_choices(req, model)
            running = [c for c in choices if c.needs_engine]
            if len(choices) > self.state.max_inflight:  # could never be admitted: a 400, not a 429 to retry forever
                raise RequestError(f"this request asks for {len(choices)} choices (prompts x n); this server runs or "
                                   f"queues at most {self.state.max_inflight} requests at once", param="n")
            more = len(running) - admitted
            if more > 0 and not self.state.try_admit(more):
                raise self._overloaded()
            if more < 0:
                self.state.release(-more)
            admitted = len(running)
        except RequestError as e:
            self.state.release(admitted)
            return self.error(e, endpoint)
        except BaseException:
            self.state.release(admitted)
            raise

        builder = make_builder(model)
        self.client.start()
        runs: list[ChoiceRun] = []
        stamp = next(_rids)
        for c in choices:
            stream = None
            if c.needs_engine:
                # The engine tokenizes a text prompt again only when another version runs it.
                again = c.prompt_text is not None and not c.echo_text
                stream = self.client.submit(AddRequest(
                    f"{endpoint}-{os.getpid()}-{stamp}-{c.index}", c.prompt_ids, c.params, arrival, model.id,
                    c.prompt_text if again else None, add_special_tokens=c.add_special_tokens))
            st = ChoiceState(c)
            if stream is None:
                st.finish_reason = FinishReason.LENGTH.value  # echo of the prompt alone: answered here
            runs.append(ChoiceRun(self, st, stream, model, endpoint, arrival))
        fan = Fanout(self, runs, admitted)
        log = RequestLog(builder.id, endpoint, model.id, req.recorded, len(choices))
        if req.stream:
            first: list[tuple[ChoiceRun, Event]] | None = []
            if fan.open:
                # Wait for the first event before answering, so a late refusal can still be a 4xx; a client
                # that leaves meanwhile (queued behind a full batch) gives up its place at once.
                try:
                    first = await or_disconnect(fan.next(), request)
                except RequestError as e:
                    fan.close("error")
                    log.write("error", fan.prompt_tokens())
                    return self.error(e, endpoint)
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

    async def _stream(self, req: GenerationRequest, builder: Builder, fan: Fanout,
                      first: list[tuple[ChoiceRun, Event]], log: RequestLog) -> AsyncIterator[bytes]:
        outcome = "cancelled"
        try:
            yield builder.stream_start()
            for run in fan.runs:  # echo-only choices are complete already
                if run.stream is None:
                    yield builder.stream_event(run.state, "", [], None, run.state.finish_reason)
            batch = first
            while True:
                out = b"".join(builder.stream_event(run.state, ev.text, ev.token_ids, ev.logprobs, ev.finish_reason,
                                                    run_usage(run) if req.continuous_usage else None)
                               for run, ev in batch)
                if out:
                    yield out
                if not fan.open:
                    break
                batch = await fan.next()
            outcome = fan.finish_reason()
            yield builder.stream_end([r.state for r in fan.runs], fan.prompt())
        except RequestError as e:  # refused by the engine after the stream began (a version switch)
            outcome = "error"
            yield builder.stream_error(e.body())
        except (EngineDead, RuntimeError) as e:
            outcome = "error"
            logger.error("%s: %s", builder.id, e)
            yield builder.stream_error(INTERNAL_ERROR)
        finally:
            fan.close("error" if outcome == "error" else "cancelled")  # choices still open: none once finished
            log.write(outcome, fan.prompt_tokens(), fan.completion_tokens())

    async def _complete(self, req: GenerationRequest, builder: Builder, fan: Fanout, request: Request,
                        log: RequestLog) -> Response:
        outcome = "cancelled"
        watcher = asyncio.ensure_future(disconnected(request))  # one for the request's whole life
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
            return answer(builder.final([r.state for r in fan.runs], fan.prompt()))
        except RequestError as e:
            outcome = "error"
            return self.error(e, builder.endpoint)
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


def parse_request(endpoint: str, body: Any) -> tuple[GenerationRequest, Callable[[ServedModel], Builder]]:
    """The body validated for ``endpoint``, as the plan takes it, and how to make its answer's builder.

    A Responses API request is planned as the chat request it amounts to (``ResponsesRequest.to_chat``):
    one path renders messages, whichever route they came in by.
    """
    if endpoint == "responses":
        rreq = validate(ResponsesRequest, body)
        return rreq.to_chat(), lambda model: ResponsesBuilder(rreq, model.id)
    req = validate(ChatCompletionRequest if endpoint == "chat" else CompletionRequest, body)
    return req, lambda model: ResponseBuilder(
        endpoint, model.id, echo=req.echo_prompt, logprobs=req.logprobs_count is not None,
        service_tier=getattr(req, "service_tier", None), token_text=model.token_text, request_id=req.request_id,
        include_usage=req.include_usage)


def run_usage(run: ChoiceRun) -> R.Usage:
    """One choice's usage so far (vLLM's continuous_usage_stats: its prompt, its tokens)."""
    return usage(PromptTokens(run.prompt_tokens, run.cached_tokens, run.written_tokens),
                 run.state.completion_tokens)

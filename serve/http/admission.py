"""Admission below the framework: a full or stopping server refuses generation requests here.

An ASGI layer in front of FastAPI's routing. A ``POST`` to ``/v1/completions`` or
``/v1/chat/completions`` that arrives while every place is taken (``SharedState.inflight`` at
``max_inflight``, the counter shared by every HTTP process) gets its 429 here, before the router,
FastAPI's dependencies, the handler or the body; one that arrives while the server drains or its
engine is dead gets its 503 here too. Both carry ``Retry-After: 1`` and the OpenAI error body.

Under a burst of a few dozen simultaneous requests the framework's path costs ~2-4 ms a request
on one event loop, so the last refusal of an 80-request burst waited ~180 ms for the other 79
(benchmarks/RESULTS.md, issue 13); this path costs tens of microseconds.

This is only the fast answer to an obvious no: what it lets through is decided again by the
handler (``SharedState.try_admit`` takes the places, all choices of a request at once), so a
request admitted is never dropped and two requests racing for the last place still get one 200
and one 429. This module knows nothing about models, bodies or the engine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from nextoken.serve.http.errors import RequestError

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
RETRY_AFTER_S = "1"


class AdmissionState(Protocol):
    """What admission reads (``engine_client.SharedState`` has it)."""

    inflight: Any  # mp.Value("i"): engine requests running or queued, over every HTTP process
    max_inflight: int
    draining: Any  # mp.Event
    engine_failed: Any  # mp.Event


def overloaded(max_inflight: int) -> RequestError:
    return RequestError(f"the server is at capacity ({max_inflight} requests running or queued); retry later",
                        status=429, type="rate_limit_error", code="overloaded",
                        headers={"Retry-After": RETRY_AFTER_S})


def unavailable() -> RequestError:
    return RequestError("the server is shutting down", status=503, type="server_error", code="unavailable",
                        headers={"Retry-After": RETRY_AFTER_S})


def _encoded(e: RequestError) -> tuple[dict[str, Any], bytes]:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in e.headers.items())]
    return {"type": "http.response.start", "status": e.status, "headers": headers}, body


class AdmissionMiddleware:
    """Answers 429 (full) or 503 (draining, engine dead) to generation POSTs without entering the app.

    ``on_refuse(kind)`` ("overloaded" or "unavailable") counts the refusal, as the handler's own
    refusals are counted.
    """

    def __init__(self, app: Any, state: AdmissionState, on_refuse: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.state = state
        self.on_refuse = on_refuse
        # The answers never change: encoded once.
        self._full = _encoded(overloaded(state.max_inflight))
        self._stopping = _encoded(unavailable())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATION_PATHS:
            state = self.state
            if state.draining.is_set() or state.engine_failed.is_set():
                await self._answer(send, self._stopping, "unavailable")
                return
            if state.inflight.value >= state.max_inflight:
                await self._answer(send, self._full, "overloaded")
                return
        await self.app(scope, receive, send)

    async def _answer(self, send: Any, answer: tuple[dict[str, Any], bytes], kind: str) -> None:
        if self.on_refuse is not None:
            self.on_refuse(kind)
        start, body = answer
        await send(start)
        await send({"type": "http.response.body", "body": body})

"""HTTP plumbing shared by every route: the API key check, OpenAI-style error bodies, the engine client's start.

LitServe's FastAPI app answers unknown paths, wrong methods and framework-level errors with
``{"detail": ...}``; OpenAI clients expect ``{"error": {message, type, param, code}}``, so the
handlers here re-shape them. The key check is one ASGI middleware in front of every route
(ours, LitServe's ``/litserve/*`` and the OpenAPI pages alike) except the probes ``/health`` and
``/ready``, which Kubernetes and load balancers call without credentials. ``StartEngineClient``
starts the forked HTTP process's engine client (its pipes) and counts the POSTs a drain waits for. This module
knows nothing about models or generation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import multiprocessing as mp
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nextoken.serve.http.errors import error_body
from nextoken.serve.http.request_log import install_request_log
from nextoken.serve.memory import freeze_startup_heap

if TYPE_CHECKING:
    from nextoken.serve.http.frontend import Frontend

OPEN_PATHS = frozenset({"/health", "/ready"})  # probes: Kubernetes and load balancers send no key

UNAUTHORISED = error_body("missing or invalid API key (send Authorization: Bearer <key>)", status=401,
                          type="authentication_error")


class ApiKeyMiddleware:
    """Answer 401 to any HTTP request without ``Authorization: Bearer <key>`` (but the probes)."""

    def __init__(self, app: Any, api_key: str, on_reject: Callable[[], None] | None = None) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.on_reject = on_reject

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):  # constant time: no timing hints about the key
            await self.app(scope, receive, send)
            return
        if self.on_reject is not None:
            self.on_reject()
        body = json.dumps(UNAUTHORISED).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


class LeaveSigintToMain:
    """In the API process, ignore SIGINT once uvicorn has started: the main process drains.

    A terminal's Ctrl-C signals the whole process group. uvicorn would react by refusing new
    connections at once; instead the main process keeps the API up so that new requests get a
    503 and in-flight streams finish, then stops it with SIGTERM. The handler is replaced at
    lifespan startup because uvicorn installs its own just before.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] == "lifespan" and mp.parent_process() is not None
                and threading.current_thread() is threading.main_thread()):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        await self.app(scope, receive, send)


def install_openai_errors(app: FastAPI) -> None:
    """Re-shape framework errors (404, 405, FastAPI validation) into OpenAI error bodies."""

    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return JSONResponse(error_body(message, status=exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(first.get("msg", "invalid request"), status=400, param=param,
                                       code="invalid_value"), status_code=400)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


class StartEngineClient:
    """Starts the engine client (its writer thread, its pipe reader) in the HTTP process, at uvicorn's lifespan.

    The Frontend is built in the main process and forked into the HTTP process; threads do not
    survive a fork, so the client starts here, on the event loop that will serve requests. It also counts
    the POST requests still being answered, which a drain waits for.
    """

    def __init__(self, app: Any, frontend: Frontend) -> None:
        self.app = app
        self.frontend = frontend

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" and mp.parent_process() is not None:
            self.frontend.client.start(asyncio.get_running_loop())
            install_request_log(self.frontend.config.log_level)
            freeze_startup_heap()
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


"""The admission fast path (serve/http/admission.py): 429 / 503 below the routes, in-process over ASGI.

The app behind it records every request that reaches it, so "refused without entering the app" is
observed, not assumed; the real server's admission, drain and readiness are tests/serve/test_server.py's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing as mp
from typing import Any

import httpx
import pytest

from nextoken.serve.http.admission import AdmissionMiddleware
from nextoken.serve.http.engine_client import SharedState


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.seen.append((scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})


def _call(app: Any, method: str, path: str, body: dict | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.request(method, path, json=body)

    # in a thread of its own: Playwright's sync API (the playground's tests) leaves a loop running in this one
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()


@pytest.fixture
def setup() -> tuple[SharedState, Recorder, AdmissionMiddleware, list[str]]:
    state = SharedState(max_inflight=2)
    inner = Recorder()
    refused: list[str] = []
    return state, inner, AdmissionMiddleware(inner, state, on_refuse=refused.append), refused


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_full_answers_429_with_retry_after_and_the_error_body_before_the_app(setup, path: str) -> None:
    state, inner, app, refused = setup
    assert _call(app, "POST", path, {"prompt": "x"}).status_code == 200  # room: the handler decides
    assert state.try_admit(2)  # every place taken
    r = _call(app, "POST", path, {"prompt": "x"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.headers["content-type"] == "application/json" and int(r.headers["content-length"]) == len(r.content)
    err = r.json()["error"]
    assert (err["code"], err["type"], err["param"]) == ("overloaded", "rate_limit_error", None)
    assert "2 requests running or queued" in err["message"]
    assert inner.seen == [("POST", path)] and refused == ["overloaded"]  # the refused one never reached the app
    state.release(1)
    assert _call(app, "POST", path, {"prompt": "x"}).status_code == 200  # a place again: through


def test_other_routes_pass_even_when_full(setup) -> None:
    state, inner, app, refused = setup
    assert state.try_admit(2)
    for method, path in (("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics"), ("POST", "/tokenize"),
                         ("GET", "/v1/completions")):
        assert _call(app, method, path).status_code == 200
    assert len(inner.seen) == 5 and refused == []


@pytest.mark.parametrize("flag", ["draining", "engine_failed"])
def test_draining_or_a_dead_engine_answers_503_with_retry_after(setup, flag: str) -> None:
    state, inner, app, refused = setup
    getattr(state, flag).set()
    r = _call(app, "POST", "/v1/completions", {"prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "unavailable" and r.json()["error"]["type"] == "server_error"
    assert _call(app, "GET", "/ready").status_code == 200  # probes are the routes' to answer (503 there)
    assert inner.seen == [("GET", "/ready")] and refused == ["unavailable"]


def test_the_counter_is_the_one_every_http_process_shares() -> None:
    """A place taken in another process (a second HTTP process) refuses here too."""
    state = SharedState(max_inflight=1)
    app = AdmissionMiddleware(Recorder(), state)
    p = mp.get_context("fork").Process(target=state.try_admit, args=(1,))
    p.start()
    p.join(10)
    assert state.inflight.value == 1
    assert _call(app, "POST", "/v1/completions", {"prompt": "x"}).status_code == 429

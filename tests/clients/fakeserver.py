"""A throwaway real HTTP server (Starlette on uvicorn, 127.0.0.1) that replays scripted answers.

It exists for the SDK paths the real server cannot produce on demand and to time them precisely:
N failures then success (retry counting and Retry-After timing), a stream that stalls, a stream
whose connection dies half-way. Everything the real server can do is also tested against it in
``test_real_server.py``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Reply:
    """One scripted answer: an error status, a JSON body, or an SSE stream of text pieces."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    pieces: list[str] | None = None  # stream these texts as chunks
    cut_after: int | None = None  # kill the connection after this many pieces
    stall: float = 0.0  # sleep this long after the first piece


@dataclass
class Script:
    replies: list[Reply] = field(default_factory=list)
    requests: list[tuple[float, dict[str, Any], dict[str, str]]] = field(default_factory=list)

    def next(self) -> Reply:
        return self.replies.pop(0) if self.replies else Reply(body=completion("default"))


def completion(text: str, finish: str = "length") -> dict[str, Any]:
    return {"id": "cmpl-f", "object": "text_completion", "model": "fake",
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "token_ids": [1, 2]}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def _stream(reply: Reply) -> AsyncIterator[bytes]:
    assert reply.pieces is not None
    for i, piece in enumerate(reply.pieces):
        if reply.cut_after is not None and i == reply.cut_after:
            # An exception inside the body makes uvicorn drop the connection mid-chunked-body,
            # which is what a killed server looks like from the client.
            raise RuntimeError("scripted connection cut")
        yield _sse({"id": "cmpl-s", "object": "text_completion",
                    "choices": [{"index": 0, "text": piece, "finish_reason": None, "token_ids": [i]}]})
        if i == 0 and reply.stall:
            await asyncio.sleep(reply.stall)
    yield _sse({"id": "cmpl-s", "object": "text_completion",
                "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
    yield _sse({"id": "cmpl-s", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": len(reply.pieces),
                                                        "total_tokens": 1 + len(reply.pieces)}})
    yield b"data: [DONE]\n\n"


def make_app(script: Script) -> Starlette:
    async def generate(request: Request) -> Response:
        body = await request.json()
        script.requests.append((time.monotonic(), body, dict(request.headers)))
        reply = script.next()
        if reply.pieces is not None:
            return StreamingResponse(_stream(reply), media_type="text/event-stream", headers=reply.headers)
        return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "t"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route("/v1/completions", generate, methods=["POST"]),
        Route("/v1/chat/completions", generate, methods=["POST"]),
        Route("/v1/models", models), Route("/health", health),
    ])


def serve(script: Script, port: int) -> Iterator[str]:
    """Run the app in a thread until the generator is closed; yields its base URL."""
    config = uvicorn.Config(make_app(script), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)

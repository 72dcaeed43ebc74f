"""Fixtures for the client tests: the scripted fake server (always) and the real server (when
``nextoken serve`` and the ``tiny_artifact`` fixture are available)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from nextoken_client import AsyncClient
from tests.clients.fakeserver import Script, serve
from tests.conftest import ServerProcess, free_port


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, Script]]:
    script = Script()
    gen = serve(script, free_port())
    url = next(gen)
    yield url, script
    gen.close()


@pytest.fixture
def fake(fake_server: tuple[str, Script]) -> tuple[str, Script]:
    """The module's fake server with a fresh script for this test."""
    url, script = fake_server
    script.replies.clear()
    script.requests.clear()
    return url, script


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    """Only reference counting frees objects, so a stream caught in a reference cycle keeps its
    connection (the cyclic GC runs at whim: with the fake server, whenever its thread allocates)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.asynccontextmanager
async def one_connection_client(url: str) -> AsyncIterator[AsyncClient]:
    """An ``AsyncClient`` with one pooled connection and a 1 s pool timeout: if a stream kept its
    connection after its loop ended, the next request fails with ``APITimeoutError``."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as http:
        yield AsyncClient(url, http_client=http, max_retries=0, connect_timeout=1.0)


# -- the real server ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_server(serve_artifact: Path) -> Iterator[ServerProcess]:
    """One ordinary server for a test module (no API key, default limits)."""
    server = ServerProcess(serve_artifact)
    yield server
    server.stop()

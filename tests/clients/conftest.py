"""Fixtures for the client tests: the scripted fake server (always) and the real server (when
``nextoken serve`` and the ``tiny_artifact`` fixture are available)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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


# -- the real server ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_server(serve_artifact: Path) -> Iterator[ServerProcess]:
    """One ordinary server for a test module (no API key, default limits)."""
    server = ServerProcess(serve_artifact)
    yield server
    server.stop()

"""Fixtures for the client tests: the scripted fake server (always) and the real server (when
``nextoken serve`` and the ``tiny_artifact`` fixture are available)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.clients.fakeserver import Script, serve
from tests.conftest import free_port, train_tiny


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

def _serve_cli_available() -> str | None:
    """Why the real server cannot run here, or None when it can."""
    try:
        import nextoken.serve.cli  # noqa: F401  (`nextoken serve` dispatches here)
    except Exception as e:  # ImportError, or a half-landed module failing at import
        return f"nextoken.serve cannot start yet ({type(e).__name__}: {e})"
    return None


class RealServer:
    """A ``nextoken serve`` subprocess on a free loopback port; ``kill()`` ends it hard."""

    def __init__(self, artifact: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in stop(); outlives __init__)
        cmd = [sys.executable, "-m", "nextoken", "serve", str(artifact), "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        # Own process group, so teardown reaches LitServe's worker processes too.
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nextoken serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"nextoken serve not healthy after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL the whole group: what a crash looks like to clients."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.fixture(scope="session")
def serve_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """A tiny model (2 layers, 32 wide, char-level) like ``tiny_artifact`` but with a 256-token
    context: long enough that a stream outlives the moment a test kills its server, and that
    prompts plus ``max_tokens`` never hit the context limit by accident. ~6 s to build."""
    reason = _serve_cli_available()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("torch", reason="building an artifact needs the [train] extra")
    from nextoken.export.build import export_run

    root = tmp_path_factory.mktemp("client-artifact")
    train_tiny(root / "run", tiny_corpus, block_size=256, max_iters=10, eval_interval=10)
    return export_run(root / "run", root / "artifact", name="client-tiny", log=None)


@pytest.fixture(scope="module")
def real_server(serve_artifact: Path) -> Iterator[RealServer]:
    """One ordinary server for a test module (no API key, default limits)."""
    server = RealServer(serve_artifact)
    yield server
    server.stop()

"""A real `nextoken serve` process on 127.0.0.1 with a free port, always stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, train_tiny


class ServerProcess:
    def __init__(self, artifact: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "nextoken", "serve", str(artifact), "--port", str(self.port), "--threads", "1",
               *flags]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"nextoken-serve-{self.port}.log", "w+")  # noqa: SIM115
        # A new session, so teardown can reach every process the server started.
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def group_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-s", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        for pid in self.group_pids():  # anything left behind is a bug, but never leak it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def serve_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """A tiny char model with a 512-token context, so long streams are possible (barely trained)."""
    from nextoken.export.build import export_run

    run = tmp_path_factory.mktemp("serve-run") / "run"
    train_tiny(run, tiny_corpus, block_size=512, max_iters=20, eval_interval=20, n_embd=48, n_head=2)
    return export_run(run, tmp_path_factory.mktemp("serve-art") / "tiny-serve", name="tiny-serve", version="1",
                      log=None)


@pytest.fixture(scope="module")
def server(serve_artifact: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(serve_artifact, "--max-batch-size", "8", "--max-queue", "16")
    yield s
    s.stop()

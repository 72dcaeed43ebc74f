"""llama.cpp's ``llama-server`` as a benchmark peer: started on loopback and a free port, stopped by PID.

::

    with LlamaServer(binary, "model.gguf", parallel=32, ctx=8192, threads=2) as peer:
        httpx.post(peer.url + "/completion", json={...})

The server runs in a session of its own, so ``stop()`` can reach every process it started with
one signal to its process group; nothing else on the machine is touched. Its log goes to a file
(``log_path``), shown when it fails to start. ``find_binary`` resolves ``--llama-server`` or
``$NEXTOKEN_LLAMA_SERVER``; ``../shared/tools/build-llama-server.sh`` builds one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

ENV = "NEXTOKEN_LLAMA_SERVER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(path: str | None) -> Path | None:
    """The llama-server binary from ``path`` or ``$NEXTOKEN_LLAMA_SERVER``; None when neither names one."""
    candidate = path or os.environ.get(ENV)
    if not candidate:
        return None
    p = Path(candidate)
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise FileNotFoundError(f"{p} is not an executable llama-server")
    return p


class LlamaServer:
    """One ``llama-server`` process on 127.0.0.1 (``url``), healthy when the constructor returns."""

    def __init__(self, binary: str | Path, gguf: str | Path, *, parallel: int = 1, ctx: int = 0, threads: int = 2,
                 extra: list[str] | None = None, startup_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), "-np", str(parallel),
               "-t", str(threads), "--no-webui"]
        if ctx:
            cmd += ["-c", str(ctx)]
        cmd += extra or []
        self.cmd = cmd
        fd, log = tempfile.mkstemp(prefix=f"llama-server-{self.port}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log)
        self._log = open(self.log_path, "w+")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.output()
                self.stop()
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{out[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        out = self.output()
        self.stop()
        raise RuntimeError(f"llama-server did not become healthy in {startup_timeout:.0f}s:\n{out[-4000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server's process group, then SIGKILL whatever is left after ``timeout``."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

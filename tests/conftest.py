"""Shared fixtures: a tiny trained run (seconds on a CPU), free ports, a real server process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
# The browser and the playground's model, for every folder with pages to test (defined once: session-scoped).
pytest_plugins = ["tests.browser_fixtures", "tests.hf_folders"]

# A small corpus with repetition, so a tiny model learns something in a few dozen steps.
TINY_TEXT = (
    "the cat sat on the mat. the dog lay on the rug. a quick brown fox jumps over the lazy dog.\n"
    "hello world, hello there. how are you? i love next token prediction.\n"
) * 40


def metric(url: str, name: str, *, headers: dict[str, str] | None = None, **labels: str) -> float:
    """Sum of one metric's samples in a server's /metrics whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", headers=headers, timeout=10).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(TINY_TEXT, encoding="utf-8")
    (d / "b.txt").write_text(TINY_TEXT.upper(), encoding="utf-8")
    return d


def train_tiny(out_dir: Path, corpus: Path, tokenizer: str = "char", **overrides) -> dict:
    from nextoken.train.config import TrainConfig
    from nextoken.train.loop import train

    settings = dict(data=[str(corpus)], tokenizer=tokenizer, vocab_size=300, n_layer=2, n_head=2, n_embd=32,
                    block_size=32, batch_size=8, max_iters=30, eval_interval=15, eval_iters=2, log_interval=5,
                    warmup_iters=5, learning_rate=3e-3, min_lr=3e-4, sample_tokens=8, out_dir=str(out_dir),
                    progress=False, tensorboard=False, threads=1)
    settings.update(overrides)
    return train(TrainConfig(**settings), quiet=True)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """A trained character-level run folder (2 layers, 32 wide), shared by the whole session."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train_tiny(out, tiny_corpus)
    return out


@pytest.fixture(scope="session")
def tiny_bpe_run(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """A trained byte-level BPE run folder (vocab 300), shared by the whole session."""
    out = tmp_path_factory.mktemp("runs") / "tiny-bpe"
    train_tiny(out, tiny_corpus, tokenizer="bpe")
    return out


def republish(src: Path, dst: Path, *, version: str | None = None, json_edits: dict[str, dict] | None = None) -> Path:
    """``src`` copied to ``dst`` as a valid artifact: ``json_edits`` (file name -> keys to set) applied, the
    manifest written again (with ``version``), so the server's hash check passes."""
    import json
    import shutil

    from nextoken.export.artifact import write_manifest

    shutil.copytree(src, dst)
    for name, changes in (json_edits or {}).items():
        obj = json.loads((dst / name).read_text(encoding="utf-8"))
        obj.update(changes)
        (dst / name).write_text(json.dumps(obj, indent=2), encoding="utf-8")
    m = json.loads((dst / "manifest.json").read_text(encoding="utf-8"))
    write_manifest(dst, name=m["name"], version=version or m["version"], source=m["source"], export=m["export"],
                   verification=m["verification"])
    return dst


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path) -> Path:
    """``tiny_run`` exported (opset 23, fp32, verified) into an artifact folder, shared by the session."""
    from nextoken.export.build import export_run

    return export_run(tiny_run, tmp_path_factory.mktemp("artifacts") / "tiny", name="tiny", log=None)


@pytest.fixture(scope="session")
def tiny_bpe_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_bpe_run: Path) -> Path:
    """``tiny_bpe_run`` exported (opset 23, fp32, verified) into an artifact folder, shared by the session."""
    from nextoken.export.build import export_run

    return export_run(tiny_bpe_run, tmp_path_factory.mktemp("artifacts") / "tiny-bpe", name="tiny-bpe", log=None)


@dataclass
class Abandoned:
    """What ``ServerProcess.abandon_stream`` took."""

    finished_first: int  # attempts whose tokens were all made before the engine could be frozen
    generated_before: float  # nextoken_generation_tokens_total when the abandoned attempt began


def stop_process(pid: int, timeout: float = 10) -> None:
    """SIGSTOP ``pid`` and return once every one of its threads is stopped (``T`` in /proc): the signal is
    delivered asynchronously, and a thread mid-step could still make a token after ``kill`` returns."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if all(state in ("T", "t") for state in states):
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop: thread states {states}"
        time.sleep(0.001)


class ServerProcess:
    """A real `nextoken serve` on 127.0.0.1 and a free port; ``stop()`` always leaves no process behind."""

    def __init__(self, artifact: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "nextoken", "serve", str(artifact), "--port", str(self.port), "--threads", "1",
               *flags]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"nextoken-serve-{self.port}.log", "w+")  # noqa: SIM115
        # A new session, so teardown can reach every process the server started.
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        try:
            self._wait_ready()
        except BaseException:  # a timeout or Ctrl-C while waiting must not leave the server running
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready in 90 s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def group_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-s", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def engine_pid(self) -> int:
        """The engine process: the one child the server spawns (the HTTP process is forked)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", "spawn_main"], capture_output=True,
                             text=True).stdout.split()
        assert len(out) == 1, f"expected one engine process, found {out}"
        return int(out[0])

    @contextlib.contextmanager
    def engine_frozen(self) -> Iterator[int]:
        """SIGSTOP the engine for the block: requests are admitted and queue, but no token is made.

        What a test does "while requests are in flight" then cannot race the engine, however fast
        it is; the engine resumes (SIGCONT) on leaving the block, even on a failure.
        """
        pid = self.engine_pid()
        stop_process(pid)
        try:
            yield pid
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def wait_until_full(self, timeout: float = 30, headers: dict[str, str] | None = None) -> None:
        """Until admission refuses a request (429): every place of batch + queue is taken.

        The probe never takes a place: a full server refuses it before reading the body (429), any other
        refuses its content type (415) before admitting it. (A JSON body, even an invalid one, holds a
        place while it is parsed, and a request arriving then would be refused in its stead.)
        """
        deadline = time.monotonic() + timeout
        probe = {"content-type": "text/plain", **(headers or {})}
        while (code := httpx.post(self.url + "/v1/completions", content=b"{}", headers=probe,
                                  timeout=30).status_code) != 429:
            assert code == 415, code
            assert time.monotonic() < deadline, "the server never filled up"
            time.sleep(0.01)

    def abandon_stream(self, body: dict, headers: dict[str, str] | None = None, attempts: int = 20) -> Abandoned:
        """A streaming request whose client hangs up after its first event; returns once the server counted
        it cancelled (``nextoken_requests_total{outcome="cancelled"}``).

        The engine is frozen the moment the first event arrives, and the client hangs up only if the request
        was still running then (the engine's own running gauge, written every step), so the request cannot
        finish first however slow the machine is. A tiny model may make all its tokens before the freeze
        lands; that attempt finishes normally and another is made (``Abandoned.finished_first`` counts them).
        """
        import json

        def count(name: str, **labels: str) -> float:
            return metric(self.url, name, headers=headers, **labels)

        pid = self.engine_pid()
        raw = json.dumps({**body, "stream": True}).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
        for finished_first in range(attempts):
            cancelled = count("nextoken_requests_total", outcome="cancelled")
            finished = count("nextoken_requests_total")
            generated = count("nextoken_generation_tokens_total")
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s"
                             b"Content-Length: %d\r\n\r\n%s" % (extra, len(raw), raw))
                seen = b""
                while b"data:" not in seen:  # the stream has started
                    chunk = sock.recv(4096)
                    assert chunk, f"the server closed the stream before its first event: {seen!r}"
                    seen += chunk
                stop_process(pid)
                try:
                    running = count("nextoken_requests_running")
                    if running:
                        sock.close()
                        deadline = time.monotonic() + 30
                        while count("nextoken_requests_total", outcome="cancelled") == cancelled:
                            assert time.monotonic() < deadline, "the abandoned stream was never cancelled"
                            time.sleep(0.02)
                        return Abandoned(finished_first, generated)
                finally:
                    os.kill(pid, signal.SIGCONT)
                deadline = time.monotonic() + 30  # it finished: wait until the server has counted it
                while count("nextoken_requests_total") == finished:
                    assert time.monotonic() < deadline, "a finished stream was never counted"
                    time.sleep(0.02)
        raise AssertionError(f"in {attempts} attempts the request always finished before the engine was frozen")

    def kill(self) -> None:
        """SIGKILL every process of the server at once: what a crash looks like to clients."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

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

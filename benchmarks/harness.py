"""What the server benchmarks share: a ``nextoken serve`` process (of this tree or another), CPU clocks, RESULTS.md.

``NextokenServer`` starts ``nextoken serve`` on loopback and a free port and stops it by its process group.
With ``source=DIR`` it runs the code of another checkout (``git worktree add DIR REV``): the benchmark
can put a base commit and this tree side by side in the same interleaved run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_peer import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# pyproject.toml's package-dir: each top-level folder is a subpackage of nextoken
SUBPACKAGES = ("train", "export", "serve")


def work_log(name: str) -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / name


def source_path(source: Path) -> Path:
    """A folder that imports as ``nextoken`` from ``source`` (a checkout), laid out as pyproject.toml maps it:
    ``source/nextoken`` with ``source/train``, ``export`` and ``serve`` inside it (symbolic links)."""
    source = source.resolve()
    if not (source / "nextoken" / "__init__.py").is_file():
        raise FileNotFoundError(f"{source} is not a nextoken checkout (no nextoken/__init__.py)")
    shim = work_log(f"nextoken-src-{hashlib.sha256(str(source).encode()).hexdigest()[:12]}")
    pkg = shim / "nextoken"
    pkg.mkdir(parents=True, exist_ok=True)
    for entry in [*(source / "nextoken").iterdir(), *(source / name for name in SUBPACKAGES)]:
        link = pkg / entry.name
        if not link.is_symlink():
            link.symlink_to(entry)
    return shim


class NextokenServer:
    """``nextoken serve`` on loopback and a free port, stopped by its process group."""

    def __init__(self, artifact: Path, *flags: str, source: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(work_log(f"nextoken-serve-{self.port}.log"), "w+")  # noqa: SIM115 (closed in stop())
        env, cwd = dict(os.environ), None
        if source is not None:
            # ahead of the installed (editable) package on the import path, and run from there: `python -m` puts
            # the working directory first, and this repository's own nextoken/ would win from its root
            cwd = source_path(source)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "nextoken", "serve", str(Path(artifact).resolve()), "--port", str(self.port)]
        self.proc = subprocess.Popen([*cmd, *flags], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env, cwd=cwd)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"nextoken serve exited with {self.proc.returncode}:\n{self.log.read()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("nextoken serve did not become healthy in 120 s")

    def startup(self) -> str:
        """What the server printed at start-up (its memory, threads and budget lines)."""
        self.log.flush()
        return Path(self.log.name).read_text(encoding="utf-8", errors="replace")

    def processes(self) -> dict[str, list[int]]:
        """The server's processes by role: ``engine`` (the spawned engine process) and ``http`` (the launcher,
        the HTTP process(es) and LitServe's manager)."""
        roles: dict[str, list[int]] = {"engine": [], "http": [self.proc.pid]}
        for pid in children(self.proc.pid):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"resource_tracker" in cmd:
                continue
            roles["engine" if b"spawn_main" in cmd else "http"].append(pid)
        return roles

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (those that have exited count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def uptime() -> str:
    """What ``uptime`` prints (the load beside a figure says how quiet the machine was)."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def write_results(path: Path, heading: str, body: list[str]) -> None:
    """Put ``heading`` + ``body`` into RESULTS.md: replace a section with the same heading, else add it after the
    file's introduction (before the first section), newest first."""
    text = path.read_text(encoding="utf-8")
    section = f"{heading}\n\n" + "\n".join(body) + "\n\n"
    start = text.find(heading + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        first = text.find("\n## ")
        text = text[:first + 1] + section + text[first + 1:] if first >= 0 else text + "\n" + section
    path.write_text(text, encoding="utf-8")

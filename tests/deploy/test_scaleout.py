"""Scale-out stand-in: N real servers behind the shipped nginx config, one SIGKILLed under load.

What a cluster would do, with processes: three `nextoken serve` replicas on loopback behind nginx
(docker/nginx.conf, with the replicas' addresses in place of Docker's DNS name), steady load from
client threads through the SDK (its retries: connection errors and 502/503 before any token),
one replica SIGKILLed mid-load, then a replacement on a new address and a proxy reload (a
Deployment recreating the pod and the endpoints updating). Every request must succeed except
a stream that had already started on the killed replica: no retry can save that one, so the
test counts and reports each such stream, and fails if any died elsewhere or at another time.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, ServerProcess, free_port, metric

nextoken_client = pytest.importorskip("nextoken_client")

NGINX_CONF = REPO / "docker" / "nginx.conf"
REPLICAS = 3
COMPLETE_CLIENTS, STREAM_CLIENTS = 3, 2
SERVER_FLAGS = ("--max-batch-size", "4", "--max-queue", "64")


def _sub(pattern: str, repl: str, text: str) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.M)
    assert n == 1, f"docker/nginx.conf changed: {pattern!r} matched {n} times"
    return new


def proxy_config(prefix: Path, port: int, upstreams: list[int]) -> str:
    """docker/nginx.conf with loopback addresses, files under ``prefix`` and an access log that
    records which replica answered (everything else, from retries to SSE buffering, as shipped)."""
    text = NGINX_CONF.read_text()
    text = _sub(r"^worker_processes .*;$", "worker_processes 1;", text)
    text = _sub(r"^pid .*;$", f"pid {prefix}/nginx.pid;", text)
    text = _sub(r"^\s*access_log .*;$", "    log_format upstream '$msec|$status|$upstream_addr|$upstream_status';\n"
                                        f"    access_log {prefix}/access.log upstream;", text)
    text = _sub(r"^\s*error_log .*;$", f"    error_log {prefix}/error.log warn;\n"
                + "".join(f"    {kind}_temp_path {prefix}/{kind};\n" for kind in
                          ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")), text)
    text = _sub(r"^\s*resolver .*;$", "", text)  # no DNS: the replicas are listed below
    server = re.search(r"^\s*server server:\d+ resolve (.*);$", NGINX_CONF.read_text(), flags=re.M)
    assert server, "docker/nginx.conf changed: no `server server:PORT resolve ...;` line"
    text = _sub(r"^\s*server server:\d+ resolve .*;$",
                "\n".join(f"        server 127.0.0.1:{p} {server.group(1)};" for p in upstreams), text)
    text = _sub(r"^\s*listen \d+;$", f"        listen 127.0.0.1:{port};", text)
    return _sub(r"^(\s*)proxy_pass http://nextoken;$",
                r"\1proxy_pass http://nextoken;\n\1add_header X-Upstream $upstream_addr always;", text)


class Proxy:
    """nginx as our own process: its own prefix, config and pid; stopped by PID."""

    def __init__(self, prefix: Path, upstreams: list[int]) -> None:
        exe = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)
        if exe is None:
            pytest.skip("nginx is not installed (Debian package nginx-light; .ci/run installs it)")
        self.exe, self.prefix = exe, prefix
        prefix.mkdir(parents=True, exist_ok=True)
        prefix.chmod(0o755)  # nginx's workers run as `nobody` when the test runs as root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = prefix / "nginx.conf"
        self.write(upstreams)
        check = subprocess.run([exe, "-t", "-p", str(prefix), "-c", str(self.conf), "-e", str(prefix / "error.log")],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen([exe, "-p", str(prefix), "-c", str(self.conf), "-e", str(prefix / "error.log"),
                                      "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"nginx did not start:\n{(prefix / 'error.log').read_text()}")

    def write(self, upstreams: list[int]) -> None:
        self.conf.write_text(proxy_config(self.prefix, self.port, upstreams))

    def reload(self, upstreams: list[int]) -> None:
        self.write(upstreams)
        self.proc.send_signal(signal.SIGHUP)  # new workers with the new upstreams; old ones finish their requests

    def access_log(self) -> list[tuple[float, int, str]]:
        """(time, status, upstream addresses) of each request the proxy answered."""
        out = []
        for line in (self.prefix / "access.log").read_text().splitlines():
            msec, status, addrs, _ = line.split("|")
            out.append((float(msec), int(status), addrs))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then the master exits
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Outcome:
    kind: str  # "complete" or "stream"
    start: float
    end: float
    ok: bool
    started: bool = False  # a stream's first event arrived (its response had begun)
    upstream: str = ""  # streams: the replica that served it (the proxy's X-Upstream header)
    error: str = ""


@dataclass
class Load:
    base_url: str
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, o: Outcome) -> None:
        with self.lock:
            self.outcomes.append(o)

    def complete_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        with nextoken_client.Client(self.base_url) as client:
            while not self.stop.is_set():
                t0 = time.time()
                try:
                    n = rng.randint(8, 48)
                    c = client.complete("the cat", max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
                    self.record(Outcome("complete", t0, time.time(), ok=c.usage.completion_tokens == n))
                except Exception as e:  # any failure is an outcome to report, not a dead load thread
                    self.record(Outcome("complete", t0, time.time(), ok=False, error=f"{type(e).__name__}: {e}"))

    def stream_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        with nextoken_client.Client(self.base_url) as client:
            while not self.stop.is_set():
                t0 = time.time()
                o = Outcome("stream", t0, t0, ok=False)
                try:
                    n = rng.randint(64, 160)
                    with client.stream("the dog", max_tokens=n, extra_body={"ignore_eos": True}) as events:
                        # The response has begun: from here on the SDK (rightly) retries nothing.
                        o.started = True
                        o.upstream = events.response.headers.get("x-upstream", "")
                        tokens = sum(len(e.token_ids or ()) for e in events)
                    o.ok = tokens == n
                except Exception as e:  # any failure is an outcome to report, not a dead load thread
                    o.error = f"{type(e).__name__}: {e}"
                o.end = time.time()
                self.record(o)

    def threads(self) -> list[threading.Thread]:
        return ([threading.Thread(target=self.complete_loop, args=(i,), daemon=True) for i in range(COMPLETE_CLIENTS)]
                + [threading.Thread(target=self.stream_loop, args=(100 + i,), daemon=True)
                   for i in range(STREAM_CLIENTS)])

    def done(self, after: float = 0.0) -> int:
        with self.lock:
            return sum(o.ok and o.end > after for o in self.outcomes)


def _start_replicas(artifact: Path, n: int) -> list[ServerProcess]:
    """n servers started side by side (each start is mostly waiting for its model to load)."""
    out: list[ServerProcess | BaseException | None] = [None] * n

    def start(i: int) -> None:
        try:
            out[i] = ServerProcess(artifact, *SERVER_FLAGS)
        except Exception as e:  # re-raised below, after the others are stopped
            out[i] = e

    threads = [threading.Thread(target=start, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in out if not isinstance(r, ServerProcess)]
    if errors:
        for r in out:
            if isinstance(r, ServerProcess):
                r.stop()
        raise errors[0] if isinstance(errors[0], Exception) else RuntimeError("a replica did not start")
    return [r for r in out if isinstance(r, ServerProcess)]


def _wait(cond, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def test_proxy_config_is_the_shipped_one_on_loopback(tmp_path: Path) -> None:
    text = proxy_config(tmp_path, 18000, [18001, 18002])
    directives = "\n".join(line.split("#")[0] for line in text.splitlines())
    assert "listen 127.0.0.1:18000;" in directives and "resolve" not in directives
    assert text.count("max_fails=2 fail_timeout=5s") == 2
    for kept in ("least_conn;", "proxy_buffering off;", "proxy_next_upstream error timeout http_503;"):
        assert kept in text


def test_a_replica_killed_under_load_loses_only_streams_it_had_started(serve_artifact: Path, tmp_path: Path) -> None:
    replicas = _start_replicas(serve_artifact, REPLICAS)
    spare: ServerProcess | None = None
    proxy: Proxy | None = None
    load: Load | None = None
    threads: list[threading.Thread] = []
    try:
        proxy = Proxy(tmp_path / "nginx", [r.port for r in replicas])
        load = Load(proxy.url)
        threads = load.threads()
        for t in threads:
            t.start()
        # Steady state first: every replica has answered through the proxy.
        assert _wait(lambda: load.done() >= 15 and len({a for _, s, a in proxy.access_log() if s == 200}) == REPLICAS,
                     60), proxy.access_log()[-20:]
        victim = replicas[0]
        victim_addr = f"127.0.0.1:{victim.port}"
        killed_at = time.time()
        victim.kill()  # SIGKILL to its whole process group: no drain, connections cut
        assert _wait(lambda: load.done(after=killed_at + 1) >= 15, 60), "no progress after the kill"

        # The replacement: a new process on a new address, and the proxy told (endpoints update).
        spare = ServerProcess(serve_artifact, *SERVER_FLAGS)
        reloaded_at = time.time()
        proxy.reload([spare.port, *(r.port for r in replicas[1:])])
        assert _wait(lambda: metric(spare.url, "nextoken_requests_total") >= 3, 60), "the replacement got no traffic"
        assert _wait(lambda: load.done(after=reloaded_at + 1) >= 10, 60)
    finally:
        if load is not None:
            load.stop.set()
        for t in threads:
            t.join(120)
        if proxy is not None:
            proxy.stop()
        for r in [*replicas, *([spare] if spare else [])]:
            r.stop()

    outcomes = load.outcomes
    log = proxy.access_log()
    died = [o for o in outcomes if not o.ok and o.started]
    lost = [o for o in outcomes if not o.ok and not o.started]
    summary = (f"{len(outcomes)} requests ({sum(o.kind == 'stream' for o in outcomes)} streams), "
               f"{sum(o.ok for o in outcomes)} succeeded, {len(died)} streams cut mid-way by the kill, "
               f"{len(lost)} failed although a retry could have saved them; proxy: "
               f"{sum(s == 502 for _, s, _ in log)} answered 502 (retried by the clients), "
               f"{sum(',' in a for _, _, a in log)} passed on to another replica")
    print(summary)
    # Nothing a retry could recover was lost: every request that had not started streaming succeeded.
    assert not lost, f"{summary}\n" + "\n".join(o.error for o in lost[:10])
    # A stream cut mid-way is one that was running on the killed replica when it died, and only that.
    for o in died:
        assert o.upstream == victim_addr, (summary, o)
        assert o.start < killed_at < o.end < killed_at + 5, (summary, o)
    assert len(died) <= STREAM_CLIENTS
    # The kill happened under load and the proxy saw it: requests to the dead replica failed over to
    # another one, or came back 502 and the client's retry went elsewhere.
    after_kill = [(s, a) for t, s, a in log if t >= killed_at]
    assert any(s == 502 or (victim_addr in a and "," in a) for s, a in after_kill), log[-30:]
    assert not any(a == victim_addr and s == 200 for t, s, a in log if t > killed_at + 1)
    # And served on: requests finished after the kill, and on the replacement after the reload.
    assert load.done(after=killed_at + 1) >= 15 and load.done(after=reloaded_at + 1) >= 10

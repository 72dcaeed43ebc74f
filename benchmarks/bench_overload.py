"""Overload: how fast a full server says no, and whether what it admits still completes.

Bursts of ``--burst`` simultaneous requests (default 80) against a real ``nextoken serve`` whose
capacity is ``--max-batch-size`` running plus ``--max-queue`` waiting (default 4 + 4 = 8, so 10x
overload). Every request is non-streaming; its connection is opened before the burst, so the
figure is the server's decision, not TCP set-up. Per response: its
status and the time from sending to the answer. Reports p50 / p99 / max time-to-429, that every
429 carried ``Retry-After``, and that every admitted request finished with all its tokens;
the issue's target is p99 time-to-429 < 10 ms on this machine.

The load generator shares the machine with the server: quote figures with the ``uptime`` the
script prints, interleave runs, and take medians.

    python benchmarks/bench_overload.py [--bursts 20] [--burst 80] [--max-batch-size 4] [--max-queue 4]
        [--max-tokens 64] [--threads 1] [--artifact DIR] [--json-out overload.json]
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import uptime  # noqa: E402

TARGET_P99_MS = 10.0


@dataclass
class Answer:
    status: int
    seconds: float
    retry_after: str | None
    tokens: int  # completion tokens of a 200, else 0


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on a sorted copy."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class _Conn:
    """One pre-opened connection carrying one request; parses just enough HTTP/1.1 for the answer."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.sent = self.first_byte = 0.0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: bytes | None = None

    def feed(self, data: bytes, now: float) -> bool:
        """Add received bytes; True once the whole response is in."""
        if not self.first_byte:
            self.first_byte = now
        self.buf += data
        if not self.status:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return False
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            self.headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
            self.buf = rest
        if "content-length" in self.headers:
            n = int(self.headers["content-length"])
            if len(self.buf) >= n:
                self.body = self.buf[:n]
                return True
            return False
        if self.headers.get("transfer-encoding") == "chunked" and self.buf.endswith(b"0\r\n\r\n"):
            body, rest = b"", self.buf
            while True:
                size, _, rest = rest.partition(b"\r\n")
                if int(size, 16) == 0:
                    break
                body, rest = body + rest[:int(size, 16)], rest[int(size, 16) + 2:]
            self.body = body
            return True
        return False


def burst(host: str, port: int, n: int, max_tokens: int, timeout: float = 300) -> list[Answer]:
    """n requests sent back to back on n connections opened beforehand; each timed from its own send
    to the first byte of its answer. A plain selector loop, so the client adds microseconds, not the
    milliseconds an asyncio HTTP client spends per request under load."""
    body = json.dumps({"prompt": "the cat sat on the", "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    conns = [_Conn(host, port) for _ in range(n)]
    time.sleep(0.2)  # let the server accept every connection before the burst
    sel = selectors.DefaultSelector()
    try:
        for c in conns:
            c.sent = time.perf_counter()
            c.sock.sendall(request)
        for c in conns:
            c.sock.setblocking(False)
            sel.register(c.sock, selectors.EVENT_READ, c)
        pending = len(conns)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                now = time.perf_counter()
                c = key.data
                data = c.sock.recv(65536)
                if not data or c.feed(data, now):
                    sel.unregister(c.sock)
                    pending -= 1
        if pending:
            raise TimeoutError(f"{pending} of {n} requests got no complete answer within {timeout} s")
    finally:
        sel.close()
        for c in conns:
            c.sock.close()
    out = []
    for c in conns:
        tokens = json.loads(c.body)["usage"]["completion_tokens"] if c.status == 200 and c.body else 0
        out.append(Answer(c.status, c.first_byte - c.sent, c.headers.get("retry-after"), tokens))
    return out


def run(url: str, bursts: int, n: int, max_tokens: int, pause: float) -> list[list[Answer]]:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    burst(host, int(port), min(n, 8), max_tokens)  # warm-up: the first requests load code paths
    out = []
    for _ in range(bursts):
        out.append(burst(host, int(port), n, max_tokens))
        time.sleep(pause)
    return out


def summarize(results: list[list[Answer]], max_tokens: int) -> dict:
    flat = [a for b in results for a in b]
    rejected = [a for a in flat if a.status == 429]
    admitted = [a for a in flat if a.status == 200]
    other = sorted({a.status for a in flat} - {200, 429})
    ms = [a.seconds * 1000 for a in rejected]
    ok_ms = [a.seconds * 1000 for a in admitted]
    return {
        "requests": len(flat), "bursts": len(results),
        "admitted_per_burst": [sum(a.status == 200 for a in b) for b in results],
        "rejected": len(rejected), "admitted": len(admitted), "other_statuses": other,
        "time_to_429_ms": {"p50": percentile(ms, 0.5), "p99": percentile(ms, 0.99),
                           "max": max(ms, default=float("nan")), "mean": statistics.fmean(ms) if ms else float("nan")},
        "admitted_latency_ms": {"p50": percentile(ok_ms, 0.5), "p99": percentile(ok_ms, 0.99)},
        # the slowest 429 of each burst: one slow burst (a stall) and a slow last place in every burst (serial
        # work on the event loop) give the same p99, and different fixes
        "slowest_429_per_burst_ms": [round(max((a.seconds * 1000 for a in b if a.status == 429), default=0.0), 2)
                                     for b in results],
        "retry_after_on_every_429": all(a.retry_after for a in rejected),
        "admitted_all_complete": all(a.tokens == max_tokens for a in admitted),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bursts", type=int, default=20)
    ap.add_argument("--burst", type=int, default=80, help="simultaneous requests per burst")
    ap.add_argument("--max-batch-size", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64,
                    help="tokens each admitted request generates (long enough to hold its slot through a burst)")
    ap.add_argument("--threads", type=int, default=1, help="the server's ONNX Runtime threads")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between bursts")
    ap.add_argument("--artifact", type=Path, default=None,
                    help="serve this artifact (default: build the bench model of bench_serve.py)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    for flag in ("bursts", "burst", "max_batch_size", "max_tokens"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_queue < 0:
        ap.error("--max-queue must be >= 0")

    from tests.conftest import ServerProcess

    before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact
        if artifact is None:
            from bench_serve import build_artifact

            artifact = build_artifact(Path(tmp))
        server = ServerProcess(artifact, "--max-batch-size", str(args.max_batch_size), "--max-queue",
                               str(args.max_queue), "--threads", str(args.threads))
        try:
            results = run(server.url, args.bursts, args.burst, args.max_tokens, args.pause)
        finally:
            server.stop()
    after = uptime()
    s = summarize(results, args.max_tokens)
    capacity = args.max_batch_size + args.max_queue
    t = s["time_to_429_ms"]
    print(f"\noverload: {s['bursts']} bursts of {args.burst} simultaneous requests, capacity {capacity} "
          f"({args.max_batch_size} running + {args.max_queue} queued), {args.max_tokens} tokens each admitted")
    print(f"answers: {s['admitted']} x 200, {s['rejected']} x 429, other statuses: {s['other_statuses'] or 'none'}; "
          f"admitted per burst {min(s['admitted_per_burst'])}-{max(s['admitted_per_burst'])}")
    print(f"time to 429: p50 {t['p50']:.2f} ms, p99 {t['p99']:.2f} ms, max {t['max']:.2f} ms "
          f"(target p99 < {TARGET_P99_MS:.0f} ms: {'met' if t['p99'] < TARGET_P99_MS else 'NOT met'})")
    print("slowest 429 of each burst, ms: " + " ".join(f"{x:.1f}" for x in s["slowest_429_per_burst_ms"]))
    lat = s["admitted_latency_ms"]
    print(f"admitted latency: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms;"
          f" every admitted request complete: {s['admitted_all_complete']}; Retry-After on every 429: "
          f"{s['retry_after_on_every_429']}")
    print(f"uptime before: {before}; after: {after} ({os.cpu_count()} CPUs, load generator on the same machine)")
    if args.json_out:
        args.json_out.write_text(json.dumps({"config": {k: str(v) if isinstance(v, Path) else v
                                                        for k, v in vars(args).items()},
                                             "summary": s, "uptime": [before, after],
                                             "answers": [[asdict(a) for a in b] for b in results]}, indent=1))
    healthy = s["admitted_all_complete"] and s["retry_after_on_every_429"] and not s["other_statuses"]
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where one stream's tokens go over HTTP (issue 22): the runner's calls, the time outside them, and the CPU
each process spends per token.

One ``nextoken serve`` of the artifact per source tree: this checkout, and each ``--base DIR`` (a checkout of
another commit: ``git worktree add DIR REV``), so a change is measured against its base in the same run.
Each round runs ``--requests`` sequential streaming completions of ``--tokens`` tokens (greedy, ignore_eos)
on every server, in turn, the order reversed every other round. Per token, from the server's own /metrics
(deltas over the round) and /proc:

- ``wall``: the client's time (first byte of the request to the last byte of the answer);
- ``runner``: the engine's runner calls (session.run and its bindings: ``nextoken_engine_step_phase_seconds``);
- ``outside``: wall minus runner: the rest of each engine step (scheduling, sampling, bookkeeping), the engine
  loop between steps (metrics, the message to the HTTP process), and the HTTP side's and the client's share
  of the request's path that does not overlap the next step;
- CPU ms per token of the engine process, of the HTTP side (launcher, HTTP process, LitServe's manager) and
  of this client. On a 2-core machine the HTTP side and the client run on the cores ONNX Runtime's threads
  use, so their CPU slows the runner's calls too.

    python benchmarks/bench_overhead.py ARTIFACT [--base DIR ...] [--rounds 3] [--requests 8] [--tokens 128]
        [--serve-flags "--threads 2"] [--write-results]

Quote figures with the ``uptime`` printed at the end; the machine's noise moves single rounds by 20%.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, NextokenServer, cpu_seconds, uptime, write_results  # noqa: E402

FIELDS = ("wall", "runner", "outside", "engine CPU", "HTTP CPU", "client CPU", "tok/s")


def metric_sums(url: str) -> dict[str, float]:
    """The engine's step count and its runner's seconds (both phases)."""
    text = httpx.get(url + "/metrics", timeout=10).text

    def total(pattern: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{pattern}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    return {"steps": total("nextoken_engine_step_seconds_count"),
            "runner_s": total("nextoken_engine_step_phase_seconds_sum")}


def one_stream(url: str, requests: int, tokens: int) -> tuple[float, int]:
    """Sequential streaming completions; returns (seconds, completion tokens the server reported)."""
    with httpx.Client(timeout=300) as c:
        model = c.get(url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "ROMEO:\nBut soft, what light", "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        done = 0
        t0 = time.perf_counter()
        for _ in range(requests):
            last = None
            with c.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        last = line
            done += json.loads(last[6:])["usage"]["completion_tokens"]
        return time.perf_counter() - t0, done


def measure(server: NextokenServer, requests: int, tokens: int) -> dict[str, float]:
    one_stream(server.url, 1, tokens)  # warm: first calls, first bindings
    roles = server.processes()
    m0, cpu0 = metric_sums(server.url), {r: cpu_seconds(p) for r, p in roles.items()}
    client0 = time.process_time()
    wall, n = one_stream(server.url, requests, tokens)
    client = time.process_time() - client0
    m1, cpu1 = metric_sums(server.url), {r: cpu_seconds(p) for r, p in roles.items()}
    runner = m1["runner_s"] - m0["runner_s"]
    ms = 1e3 / n
    return {"wall": wall * ms, "runner": runner * ms, "outside": (wall - runner) * ms,
            "engine CPU": (cpu1["engine"] - cpu0["engine"]) * ms,
            "HTTP CPU": (cpu1["http"] - cpu0["http"]) * ms, "client CPU": client * ms, "tok/s": n / wall,
            "steps per token": (m1["steps"] - m0["steps"]) / n}


def fmt(values: list[float], digits: int = 3) -> str:
    def f(v: float) -> str:
        return f"{v:.{digits}f}"

    return f(statistics.median(values)) + ("" if len(values) == 1 else f" ({f(min(values))}-{f(max(values))})")


def revision(source: Path) -> str:
    """The checkout's commit, marked ``+`` when its tracked files differ from it."""
    head = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(source), "diff", "--quiet", "HEAD"]).returncode != 0
    return (head.stdout.strip() or str(source)) + ("+" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--base", type=Path, action="append", default=[], help="another checkout to measure beside this "
                                                                           "one (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=8, help="sequential requests per round")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per request")
    ap.add_argument("--serve-flags", default="", help="extra `nextoken serve` flags, one string")
    ap.add_argument("--write-results", action="store_true", help="put the table into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    for flag, value in (("--rounds", args.rounds), ("--requests", args.requests), ("--tokens", args.tokens)):
        if value < 1:
            ap.error(f"{flag} must be >= 1, got {value}")
    sources = {f"this tree, {revision(REPO)}": None, **{revision(b): b for b in args.base}}
    flags = shlex.split(args.serve_flags)
    servers: dict[str, NextokenServer] = {}
    try:
        for name, src in sources.items():
            servers[name] = NextokenServer(args.artifact, *flags, source=src)
            compute = [line.strip() for line in servers[name].startup().splitlines() if "compute:" in line]
            print(f"{name}: {compute[0] if compute else '(no start-up line)'}", flush=True)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                res = measure(servers[name], args.requests, args.tokens)
                results[name].append(res)
                print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    load = uptime()
    lines = [f"`python benchmarks/bench_overhead.py {args.artifact} {' '.join(f'--base {b}' for b in args.base)} "
             f"--rounds {args.rounds} --requests {args.requests} --tokens {args.tokens}"
             + (f" --serve-flags '{args.serve_flags}'" if args.serve_flags else "") + f"`; uptime at the end: {load}",
             "",
             "Milliseconds per generated token, 1 stream, median (range) over the rounds.", "",
             "| source | " + " | ".join(FIELDS) + " |", "|---|" + "--:|" * len(FIELDS)]
    for name, rows in results.items():
        cells = [fmt([row[f] for row in rows], 0 if f == "tok/s" else 3) for f in FIELDS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.write_results:
        write_results(REPO / "benchmarks" / "RESULTS.md",
                      f"## One stream over HTTP: where a token's time goes (`bench_overhead.py`, {args.artifact.name})",
                      lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

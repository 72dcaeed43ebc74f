"""The measurement behind the default ONNX Runtime thread count (export/runtime.py ``default_threads``).

For each artifact, ``nextoken serve`` runs with each ``--threads`` value (``0`` is the default rule),
interleaved run by run (A B C, then C B A, ...), and the same streaming client as bench_vs_llama.py
measures output tok/s, TTFT and ITL at each stream count. During the highest stream count it
samples the CPU time of the server's processes: the HTTP process's share of a core is what the
rule leaves to it (or not).

    python benchmarks/bench_threads.py --artifact ART [--artifact ART2] [--threads 1,2,0] [--streams 1,8,32]
        [--runs 2] [--new-tokens 64]

Quote the figures with the ``uptime`` printed; another job on the same cores decides the result
(field notes: 2 threads beside a busy neighbour are slower than 1).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_vs_llama import PROMPT, run_level  # noqa: E402
from harness import NextokenServer, cpu_seconds  # noqa: E402


def role_seconds(server: NextokenServer) -> dict[str, float]:
    """CPU seconds of the server's processes by role: engine, http (launcher, HTTP process, manager)."""
    return {role: cpu_seconds(pids) for role, pids in server.processes().items()}


def label(art: Path) -> str:
    """The artifact as parent/name (benchmark folders name their artifacts alike: toy/artifact-none)."""
    return f"{art.parent.name}/{art.name}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", action="append", required=True, type=Path)
    ap.add_argument("--threads", default="1,2,0", help="--threads values to compare (0 = the default rule)")
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    streams = [int(s) for s in args.streams.split(",")]
    body = {"prompt": PROMPT, "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    results: dict[tuple[str, int, int], list] = {}
    shares: dict[tuple[str, int], list[dict[str, float]]] = {}
    for art in args.artifact:
        for r in range(args.runs):
            for t in (threads if r % 2 == 0 else threads[::-1]):
                server = NextokenServer(art, "--max-batch-size", str(max(32, *streams)), "--threads", str(t))
                try:
                    asyncio.run(run_level(server.url, lambda: body, 4, 1))  # warm-up
                    for c in streams:
                        before = role_seconds(server) if c == max(streams) else None
                        lv = asyncio.run(run_level(server.url, lambda: body, c, args.requests))
                        if before is not None:
                            after = role_seconds(server)
                            wall = sum(rec.tokens for rec in lv.records if rec.error is None) / max(lv.tok_s, 1e-9)
                            shares.setdefault((label(art), t), []).append(
                                {k: (after[k] - before.get(k, 0.0)) / max(wall, 1e-9) for k in after})
                        results.setdefault((label(art), t, c), []).append(lv)
                        print(f"{label(art)} run {r} --threads {t} {c:>2} streams: {lv.tok_s:8.1f} tok/s, TTFT p50 "
                              f"{lv.ttft_p50 * 1e3:7.1f} ms, ITL p50 {lv.itl_p50 * 1e3:6.2f} ms", flush=True)
                finally:
                    server.stop()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    med = statistics.median
    print("\n| artifact | --threads | streams | tok/s (median, runs) | TTFT p50 ms | ITL p50 / p99 ms |")
    print("|---|--:|--:|--:|--:|--:|")
    for (name, t, c), lvs in results.items():
        print(f"| {name} | {t} | {c} | {med(x.tok_s for x in lvs):,.1f} ({', '.join(f'{x.tok_s:.0f}' for x in lvs)}) "
              f"| {med(x.ttft_p50 for x in lvs) * 1e3:.1f} | {med(x.itl_p50 for x in lvs) * 1e3:.2f} / "
              f"{med(x.itl_p99 for x in lvs) * 1e3:.2f} |")
    print(f"\nCPU share of a core by process at {max(streams)} streams (CPU seconds / the level's wall time):")
    for (name, t), rows in shares.items():
        roles = sorted({k for row in rows for k in row})
        print(f"  {name} --threads {t}: " + ", ".join(f"{k} {med(row.get(k, 0.0) for row in rows):.2f}" for k in roles))
    return 0


if __name__ == "__main__":
    sys.exit(main())

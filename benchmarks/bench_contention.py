"""What another process's CPU costs a decode step that uses every core (issue 22: why the server's runner calls
are slower than the same calls in-process).

On 2 cores a server's 2 ONNX Runtime threads share the machine with its HTTP process and the clients. Each
wakes for a token and takes a core for a moment; the ONNX Runtime thread that loses it stops mid-operator while
its partner finishes its own share and waits at the barrier. This measures that cost in-process, with nothing
of nextoken's HTTP side: the engine's runner decodes ``--batch`` rows (``bench_bandwidth.decode_step_s``)
while a burner process alternates ``--burst-us`` of busy work with sleeps sized to take a given share of one
core, each share against none, interleaved, ``--runs`` times. The burner reports the CPU it really took.

    python benchmarks/bench_contention.py ARTIFACT [--batch 32] [--shares 0.05,0.1,0.25] [--runs 3]
        [--burst-us 200] [--threads 0] [--write-results]

A burner taking a share s of one core that slows the step by a fraction f costs f / s per unit of CPU taken.
With 2 threads on 2 cores, 0.5 would be perfect sharing (the other thread takes over the lost work: the step
loses s of one core out of two); 1 is what running the two one after the other costs (the partner thread waits
out every interruption at its next barrier).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_bandwidth import decode_step_s  # noqa: E402
from harness import REPO, uptime, write_results  # noqa: E402

BURNER = """
import sys, time
busy, idle = float(sys.argv[1]), float(sys.argv[2])
t0, cpu0 = time.perf_counter(), time.process_time()
try:
    while True:
        t = time.perf_counter()
        while time.perf_counter() - t < busy:
            pass
        time.sleep(idle)
except KeyboardInterrupt:
    print((time.process_time() - cpu0) / (time.perf_counter() - t0), flush=True)
"""


def step_with_burner(artifact: Path, share: float, args: argparse.Namespace) -> tuple[float, float]:
    """(decode step seconds, the share of a core the burner took) with a burner asking for ``share``."""
    if share <= 0:
        return decode_step_s(artifact, args.batch, args.steps, args.threads, args.repeats), 0.0
    busy = args.burst_us / 1e6
    burner = subprocess.Popen([sys.executable, "-c", BURNER, str(busy), str(busy * (1 - share) / share)],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.2)  # running before the first call
        step = decode_step_s(artifact, args.batch, args.steps, args.threads, args.repeats)
    finally:
        burner.send_signal(signal.SIGINT)
        took = float(burner.communicate(timeout=10)[0].strip() or "nan")
    return step, took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--batch", type=int, default=32, help="rows of the decode step")
    ap.add_argument("--shares", default="0.05,0.1,0.25", help="the burner's share of one core, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timing")
    ap.add_argument("--repeats", type=int, default=2, help="timings per measurement (the best is kept)")
    ap.add_argument("--burst-us", type=float, default=200.0, help="microseconds of each busy burst")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: the core rule)")
    ap.add_argument("--write-results", action="store_true", help="put the table into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    from nextoken.export.runtime import default_threads

    shares = [float(s) for s in args.shares.split(",") if s]
    if args.batch < 1 or not all(0 < s < 1 for s in shares):
        ap.error("--batch must be >= 1 and every --shares value in (0, 1)")
    args.threads = args.threads or default_threads()
    quiet: list[float] = []
    loaded: dict[float, list[tuple[float, float]]] = {s: [] for s in shares}
    for run in range(args.runs):
        for share in shares if run % 2 == 0 else shares[::-1]:
            quiet.append(step_with_burner(args.artifact, 0.0, args)[0])
            loaded[share].append(step_with_burner(args.artifact, share, args))
            print(f"run {run + 1}: share {share}: quiet {quiet[-1] * 1e3:.2f} ms, with the burner "
                  f"{loaded[share][-1][0] * 1e3:.2f} ms (it took {loaded[share][-1][1]:.2f} of a core)", flush=True)
    base = statistics.median(quiet)
    rows = ["| burner asks | burner took (of a core) | step ms quiet (all runs) | step ms with it | slower by | "
            "cost per unit of CPU taken |", "|--:|--:|--:|--:|--:|--:|"]
    for share, got in loaded.items():
        step, took = statistics.median(g[0] for g in got), statistics.median(g[1] for g in got)
        rows.append(f"| {share:.2f} | {took:.2f} | {base * 1e3:.2f} | {step * 1e3:.2f} | {step / base - 1:.0%} | "
                    f"**{(step / base - 1) / took:.1f}** |")
    load = uptime()
    body = [f"`python benchmarks/bench_contention.py {args.artifact} --batch {args.batch} --shares {args.shares} "
            f"--runs {args.runs}`; {args.threads} ONNX Runtime threads, medians over the runs; uptime: {load}",
            "", *rows]
    print("\n".join(body))
    if args.write_results:
        write_results(REPO / "benchmarks" / "RESULTS.md",
                      f"## A decode step beside another process (`bench_contention.py`, {args.artifact.name})", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

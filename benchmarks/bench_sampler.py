"""The server's sampler per step: the per-row loop (``sample`` + ``RowState``) against ``BatchSampler``.

Each case runs at batch 1 and 32 over vocabularies of 2048 and 4096, the two samplers interleaved
(old, new, old, new ...) so a noisy neighbour hits both alike; figures are medians over
``--repeats`` rounds of ``--calls`` steps each (and the fastest round, steadier on a busy machine),
in microseconds per step, ratios old/new from the same run.
Logits are standard normal (a flat distribution: top-p's nucleus is wide, the worst case for the
candidate block) except "top-p, peaked", which puts most of the mass on a few tokens as a trained
model does. Seeded rows (one generator each) where the case samples.

    python benchmarks/bench_sampler.py                  # the full run
    python benchmarks/bench_sampler.py --repeats 3 --calls 5   # smoke run

Other jobs share these cores: quote figures with the ``uptime`` this prints.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from collections.abc import Callable

import numpy as np

from nextoken.serve.engine.sampler import BatchSampler, RowState, SamplingParams, sample

# case -> (settings for row i, logits kind)
CASES: dict[str, tuple[Callable[[int], SamplingParams], str]] = {
    "greedy": (lambda i: SamplingParams(temperature=0), "normal"),
    "temperature": (lambda i: SamplingParams(temperature=0.8, seed=i), "normal"),
    "top-k + top-p": (lambda i: SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=i), "normal"),
    "top-p": (lambda i: SamplingParams(temperature=0.8, top_p=0.9, seed=i), "normal"),
    "top-p, peaked": (lambda i: SamplingParams(temperature=0.8, top_p=0.9, seed=i), "peaked"),
    "penalties": (lambda i: SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.1, presence_penalty=0.3,
                                           frequency_penalty=0.3, seed=i), "normal"),
    "logprobs 5": (lambda i: SamplingParams(temperature=0.8, logprobs=5, seed=i), "normal"),
}


def make_logits(kind: str, batch: int, vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, vocab), dtype=np.float32)  # (B, V)
    if kind == "peaked":  # a handful of likely tokens over a long flat tail
        x *= 2.0
        for b in range(batch):
            x[b, rng.choice(vocab, 8, replace=False)] += np.linspace(12.0, 6.0, 8, dtype=np.float32)
    return x


def setups(case: str, batch: int, vocab: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """(old step, new step) over the same logits and settings."""
    params, kind = CASES[case]
    logits = make_logits(kind, batch, vocab)
    prompt = list(range(1, 17))
    rows = [RowState(params(i), vocab, prompt) for i in range(batch)]
    bs = BatchSampler(batch, vocab, eos_id=0)
    for i in range(batch):
        bs.add(i, params(i), prompt)
    slots = np.arange(batch)
    return (lambda: sample(logits, rows)), (lambda: bs.sample(logits, slots))


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds per case (median reported)")
    ap.add_argument("--calls", type=int, default=20, help="sampler steps timed per round")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--vocab", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES))
    args = ap.parse_args()
    if args.repeats < 1 or args.calls < 1:
        ap.error("--repeats and --calls must be >= 1")

    print(f"uptime before: {uptime()}")
    print(f"{'case':<16} {'batch':>5} {'vocab':>5} {'old med':>9} {'new med':>9} {'ratio':>6} "
          f"{'old min':>9} {'new min':>9} {'ratio':>6}")
    for vocab in args.vocab:
        for batch in args.batch:
            for case in args.case:
                old, new = setups(case, batch, vocab)
                old(), new()  # warm-up
                t_old, t_new = [], []
                for _ in range(args.repeats):
                    t_old.append(per_call_us(old, args.calls))
                    t_new.append(per_call_us(new, args.calls))
                o, n = statistics.median(t_old), statistics.median(t_new)
                lo, ln = min(t_old), min(t_new)  # the min resists a busy neighbour better than the median
                print(f"{case:<16} {batch:>5} {vocab:>5} {o:>9.1f} {n:>9.1f} {o / n:>5.1f}x "
                      f"{lo:>9.1f} {ln:>9.1f} {lo / ln:>5.1f}x", flush=True)
    print(f"uptime after: {uptime()}")


if __name__ == "__main__":
    main()

"""The serving engine in-process: throughput against onnxruntime-genai, where a step's time goes,
prefix caching, and chunked prefill under arriving prompts.

1. Decode throughput at batch 1/4/8/16/32 (16-token prompts, ``--new-tokens`` greedy each) for
   nextoken's ``EngineCore`` (serving.onnx, in-place cache) and onnxruntime-genai's generator on the
   same artifact's model.onnx (its genai_config.json, threads set alike), interleaved round by round;
   prints engine / genai.
2. Where a decode step goes at batch 1 and 32: ONNX Runtime's run, the rest of the runner
   (writing inputs), sampling, the scheduler and the core's bookkeeping (cProfile, per step).
3. Prefix caching: TTFT of a request with a 200-token prefix shared with an earlier request plus a
   10-token suffix of its own, with the prefix cache on and off (median of ``--repeats``).
4. Chunked prefill: 8 streams decode while a 200-token prompt arrives every 10 steps; the streams'
   per-step latency p50/p99 with ``max_num_batched_tokens`` 64 and with no chunking (one step may take
   a whole prompt).

The model: GPT-2-shaped, 4 layers, 4 heads, 256 wide, context 256, byte-level BPE 2000 (the shape of
the llama.cpp side-by-side), trained for a few steps (shape matters here, not skill).

    python benchmarks/bench_engine.py [--threads 1] [--repeats 3] [--new-tokens 128] [--artifact DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import uptime  # noqa: E402

from nextoken.export.artifact import load_artifact  # noqa: E402
from nextoken.serve.engine.core import EngineCore, EngineOptions  # noqa: E402
from nextoken.serve.wire import AddRequest, SamplingParams  # noqa: E402

PROMPT = 16


def build_artifact(work: Path) -> Path:
    from nextoken.export.build import export_run
    from nextoken.train.config import TrainConfig
    from nextoken.train.loop import train

    cfg = TrainConfig(tokenizer="bpe", vocab_size=2000, n_layer=4, n_head=4, n_embd=256, block_size=256,
                      batch_size=8, max_iters=40, eval_interval=40, eval_iters=1, warmup_iters=5, sample_tokens=0,
                      max_corpus_chars=2_000_000, out_dir=str(work / "run"), progress=False, tensorboard=False,
                      threads=1)
    train(cfg, quiet=True)
    return export_run(work / "run", work / "artifact", name="bench", version="1", log=None)


def make_core(artifact: Path, threads: int, **options) -> EngineCore:
    opts = dict(max_slots=32, threads=threads, prefix_cache_bytes=0)
    opts.update(options)
    return EngineCore(load_artifact(artifact), EngineOptions(**opts))


def add(core: EngineCore, rid: str, ids: list[int], max_tokens: int) -> None:
    core.add(AddRequest(rid, ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), 0.0,
                        core.model_id))


def engine_round(core: EngineCore, batch: int, new_tokens: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    for i in range(batch):
        add(core, f"{seed}-{i}", [core.eos_id] + rng.integers(1, core.vocab_size, PROMPT - 1).tolist(), new_tokens)
    n, t0 = 0, time.perf_counter()
    while core.has_work():
        n += len(core.step().rids)
    return n / (time.perf_counter() - t0)


def genai_model(artifact: Path, threads: int, work: Path):  # noqa: ANN201 (optional package)
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_decode import genai_folder

    from nextoken.train.config import GPTConfig

    a = load_artifact(artifact).config
    shape = GPTConfig(vocab_size=a["vocab_size"], block_size=a["n_positions"], n_layer=a["n_layer"],
                      n_head=a["n_head"], n_embd=a["n_embd"])
    return og.Model(str(genai_folder(artifact / "model.onnx", work / "genai", a["n_positions"], threads, shape)))


def genai_round(model, batch: int, new_tokens: int, seed: int) -> float:  # noqa: ANN001
    from bench_decode import genai_decode

    prompt = np.random.default_rng(seed).integers(1, 1999, (batch, PROMPT)).astype(np.int64)
    t0 = time.perf_counter()
    genai_decode(model, prompt, new_tokens)
    return batch * new_tokens / (time.perf_counter() - t0)


def throughput(artifact: Path, args: argparse.Namespace, work: Path) -> None:
    core = make_core(artifact, args.threads)
    genai = genai_model(artifact, args.threads, work)
    print(f"\n1. decode throughput, output tok/s ({args.threads} thread(s), prompt {PROMPT}, {args.new_tokens} new, "
          f"greedy; median of {args.repeats} interleaved rounds)")
    print(f"{'batch':>6}{'engine':>10}{'genai':>10}{'engine/genai':>14}   (rounds: engine / genai)")
    for b in (1, 4, 8, 16, 32):
        engine_round(core, b, 8, seed=999)  # warm-up
        if genai is not None:
            genai_round(genai, b, 8, seed=999)
        e, g = [], []
        for r in range(args.repeats):
            e.append(engine_round(core, b, args.new_tokens, seed=r))
            if genai is not None:
                g.append(genai_round(genai, b, args.new_tokens, seed=r))
        em = statistics.median(e)
        gm = statistics.median(g) if g else None
        ratio = f"{em / gm:13.2f}x" if gm else f"{'-':>14}"
        rounds = " ".join(f"{x:.0f}" for x in e) + (" / " + " ".join(f"{x:.0f}" for x in g) if g else "")
        print(f"{b:>6}{em:10,.0f}{gm or 0:10,.0f}{ratio}   ({rounds})")


CATEGORIES = (  # (label, function-name matchers); the first match wins
    ("ONNX Runtime run", ("run_with_iobinding",)),
    ("sampler", ("sampling.py",)),
    ("scheduler", ("scheduler",)),
    ("runner inputs", ("runner.py",)),
)


def profile(artifact: Path, args: argparse.Namespace) -> None:
    print("\n2. where a decode step goes (cProfile self time per step, ms)")
    for batch in (1, 32):
        core = make_core(artifact, args.threads)
        engine_round(core, batch, 8, seed=1)
        pr = cProfile.Profile()
        rng = np.random.default_rng(2)
        for i in range(batch):
            add(core, f"p-{i}", [core.eos_id] + rng.integers(1, core.vocab_size, PROMPT - 1).tolist(), args.new_tokens)
        core.step()  # the prefill step
        steps = 0
        pr.enable()
        while core.has_work():
            core.step()
            steps += 1
        pr.disable()
        stats = pstats.Stats(pr).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
        totals = dict.fromkeys([c for c, _ in CATEGORIES] + ["core and the rest"], 0.0)
        for (file, _line, name), (_cc, _nc, tt, _ct, _callers) in stats.items():
            where = f"{file}:{name}"
            label = next((c for c, keys in CATEGORIES if any(k in where for k in keys)), "core and the rest")
            totals[label] += tt
        total = sum(totals.values())
        parts = ", ".join(f"{k} {v / steps * 1e3:.3f} ({v / total:.0%})" for k, v in totals.items())
        print(f"  batch {batch:>2}: {total / steps * 1e3:.3f} ms/step = {parts}")


def prefix_ttft(artifact: Path, args: argparse.Namespace) -> None:
    print("\n3. prefix caching: TTFT of 200 shared + 10 own prompt tokens (ms, median)")
    rng = np.random.default_rng(3)
    shared = rng.integers(1, 1999, 199).tolist()
    res = {}
    for label, nbytes in (("off", 0), ("on", 64 << 20)):
        core = make_core(artifact, args.threads, prefix_cache_bytes=nbytes, max_num_batched_tokens=512)
        add(core, "seed", [core.eos_id] + shared + rng.integers(1, 1999, 10).tolist(), 1)
        while core.has_work():
            core.step()
        times = []
        for r in range(max(5, args.repeats)):
            add(core, f"q{r}", [core.eos_id] + shared + rng.integers(1, 1999, 10).tolist(), 1)
            t0 = time.perf_counter()
            while f"q{r}" not in core.step().started:
                pass
            times.append(time.perf_counter() - t0)
            while core.has_work():
                core.step()
        res[label] = statistics.median(times) * 1e3
        cached = core.prefix_cache.stats.hit_tokens if core.prefix_cache else 0
        print(f"  prefix cache {label:>3}: {res[label]:7.2f} ms  (prompt tokens served from the cache: {cached})")
    print(f"  -> a hit cuts TTFT {res['off'] / res['on']:.1f}x")


def chunked(artifact: Path, args: argparse.Namespace) -> None:
    print("\n4. chunked prefill: 8 decoding streams, a 200-token prompt arriving every 10 steps; "
          "per-step latency of the streams (ms)")
    rng = np.random.default_rng(4)
    for label, budget in (("budget 64", 64), ("no chunking", 4096)):
        core = make_core(artifact, args.threads, max_num_batched_tokens=budget)
        for i in range(8):
            add(core, f"s{i}", [core.eos_id] + rng.integers(1, 1999, 15).tolist(), 200)
        core.step()
        lat = []
        for step in range(150):
            if step % 10 == 0:
                add(core, f"long{step}", [core.eos_id] + rng.integers(1, 1999, 199).tolist(), 1)
            t0 = time.perf_counter()
            core.step()
            lat.append(time.perf_counter() - t0)
        lat_ms = np.array(lat) * 1e3
        print(f"  {label:>12}: p50 {np.percentile(lat_ms, 50):6.2f}  p99 {np.percentile(lat_ms, 99):6.2f}  "
              f"max {lat_ms.max():6.2f}  (p99/p50 {np.percentile(lat_ms, 99) / np.percentile(lat_ms, 50):.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--artifact", type=Path, default=None, help="reuse an exported artifact of the shape above")
    ap.add_argument("--only", default="1,2,3,4", help="which sections to run, e.g. 1,3")
    args = ap.parse_args()
    print(uptime())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        artifact = args.artifact or build_artifact(work)
        sections = {"1": throughput, "2": profile, "3": prefix_ttft, "4": chunked}
        for key in args.only.split(","):
            fn = sections[key.strip()]
            fn(artifact, args, work) if fn is throughput else fn(artifact, args)
    print(uptime())


if __name__ == "__main__":
    main()

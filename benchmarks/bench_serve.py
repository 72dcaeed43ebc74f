"""Serving throughput and latency: the engine in-process, onnxruntime-genai beside it, and the real server.

1. The engine core in-process (``EngineCore``) at batch 1, 4, 8, 16, 32: greedy, 16-token
   prompts, ``--new-tokens`` each; output tokens/s (median of ``--repeats``).
2. onnxruntime-genai 0.18's C++ generator on the same graph at batch 1 and 8 (if installed).
3. The real ``nextoken serve`` process driven over HTTP by ``nextoken-loadtest`` with 1, 4, 16 and
   32 concurrent streams: output tokens/s, TTFT and ITL p50/p99.

Prints the ratios the serving issue sets targets for: engine / genai at batch 1 and 8, 32 streams /
1 stream over HTTP, HTTP / in-process at 32, and p99 TTFT at 32 streams in engine steps.

    python benchmarks/bench_serve.py [--threads 2] [--repeats 3] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextoken.export.artifact import load_artifact  # noqa: E402
from nextoken.serve.engine.core import EngineCore, EngineOptions  # noqa: E402
from nextoken.serve.wire import AddRequest, SamplingParams  # noqa: E402

PROMPT = 16


def build_artifact(work: Path) -> Path:
    """A 3.3M-parameter model (4 layers, 256 wide, byte-level BPE, context 512): shape matters here, not skill."""
    from nextoken.export.build import export_run
    from nextoken.train.config import TrainConfig
    from nextoken.train.loop import train

    cfg = TrainConfig(tokenizer="bpe", vocab_size=260, n_layer=4, n_head=4, n_embd=256, block_size=512,
                      batch_size=2, max_iters=2, eval_interval=2, eval_iters=1, warmup_iters=1, sample_tokens=0,
                      max_corpus_chars=400_000, out_dir=str(work / "run"), progress=False, tensorboard=False)
    train(cfg, quiet=True)
    return export_run(work / "run", work / "artifact", name="bench", version="1", log=None)


def engine_tok_s(artifact: Path, batch: int, new_tokens: int, threads: int, repeats: int) -> tuple[float, float]:
    """(output tokens/s, seconds per decode step) for ``batch`` requests running together."""
    core = EngineCore(load_artifact(artifact), EngineOptions(max_slots=batch, threads=threads, prefix_cache_bytes=0))
    rng = np.random.default_rng(0)
    rates, steps = [], []
    for r in range(repeats + 1):
        for i in range(batch):
            ids = [core.eos_id] + rng.integers(1, core.vocab_size, PROMPT - 1).tolist()
            core.add(AddRequest(f"{r}-{i}", ids, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True),
                                0.0, core.model_id))
        t0 = time.perf_counter()
        n = 0
        while core.has_work():
            n += len(core.step().rids)
        dt = time.perf_counter() - t0
        if r:  # the first round warms up
            rates.append(n / dt)
            steps.append(dt / new_tokens)
    return statistics.median(rates), statistics.median(steps)


def genai_tok_s(artifact: Path, batch: int, new_tokens: int, threads: int, repeats: int, work: Path) -> float | None:
    try:
        import onnxruntime_genai as og
        from bench_decode import genai_decode, genai_folder
    except ImportError:
        return None
    from nextoken.train.config import GPTConfig

    a = load_artifact(artifact).config
    shape = GPTConfig(vocab_size=a["vocab_size"], block_size=a["n_positions"], n_layer=a["n_layer"],
                      n_head=a["n_head"], n_embd=a["n_embd"])
    folder = genai_folder(artifact / "model.onnx", work / f"genai-{batch}", PROMPT + new_tokens, threads, shape)
    model = og.Model(str(folder))
    prompt = np.random.default_rng(0).integers(1, 250, (batch, PROMPT)).astype(np.int64)
    genai_decode(model, prompt, 2)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        genai_decode(model, prompt, new_tokens)
        rates.append(batch * new_tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def http_sweep(artifact: Path, levels: list[int], new_tokens: int, threads: int, work: Path) -> list[dict]:
    from tests.conftest import ServerProcess

    server = ServerProcess(artifact, "--max-batch-size", str(max(levels)), "--threads", str(threads))
    try:
        out = work / "sweep.json"
        cmd = ["nextoken-loadtest", "--base-url", server.url, "--concurrency", ",".join(map(str, levels)),
               "--num-requests", str(2 * max(levels)), "--warmup", "4", "--input-len", str(PROMPT // 2),
               "--output-len", str(new_tokens), "--temperature", "0", "--extra-body", '{"ignore_eos": true}',
               "--json-out", str(out), "--no-progress"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["levels"]
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-http", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        artifact = build_artifact(work)
        engine = {b: engine_tok_s(artifact, b, args.new_tokens, args.threads, args.repeats) for b in (1, 4, 8, 16, 32)}
        genai = {b: genai_tok_s(artifact, b, args.new_tokens, args.threads, args.repeats, work) for b in (1, 8)}
        sweep = [] if args.no_http else http_sweep(artifact, [1, 4, 16, 32], args.new_tokens, args.threads, work)

    print(f"\nengine in-process ({args.threads} threads, prompt {PROMPT}, {args.new_tokens} new tokens, greedy)")
    print(f"{'batch':>6}{'tok/s':>10}{'step ms':>10}{'genai tok/s':>14}{'engine/genai':>14}")
    for b, (rate, step) in engine.items():
        g = genai.get(b)
        gs = f"{g:14,.0f}{rate / g:13.2f}x" if g else f"{'-':>14}{'-':>14}"
        print(f"{b:>6}{rate:10,.0f}{step * 1000:10.2f}{gs}")
    if sweep:
        print("\nHTTP (nextoken serve + nextoken-loadtest, streaming)")
        print(f"{'streams':>8}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}"
              f"{'failed':>8}{'HTTP/engine':>13}")
        for lv in sweep:
            c = lv["concurrency"]
            eng = engine.get(c, (None,))[0]
            ratio = f"{lv['output_throughput'] / eng:12.2f}x" if eng else f"{'-':>13}"
            print(f"{c:>8}{lv['output_throughput']:11,.0f}{lv['ttft_ms']['p50']:9.1f}ms{lv['ttft_ms']['p99']:8.1f}ms"
                  f"{lv['itl_ms']['p50']:7.2f}ms{lv['itl_ms']['p99']:7.2f}ms{lv['failed']:>8}{ratio}")
        by = {lv["concurrency"]: lv for lv in sweep}
        if 1 in by and 32 in by:
            step32 = engine[32][1] * 1000
            scale = by[32]["output_throughput"] / by[1]["output_throughput"]
            print(f"\n32 streams / 1 stream output tok/s: {scale:.2f}x"
                  f"; HTTP / in-process at 32: {by[32]['output_throughput'] / engine[32][0]:.2f}; "
                  f"p99 TTFT at 32 = {by[32]['ttft_ms']['p99']:.1f} ms = {by[32]['ttft_ms']['p99'] / step32:.1f} "
                  f"engine steps of {step32:.2f} ms")


if __name__ == "__main__":
    main()

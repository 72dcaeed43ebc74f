"""The serving graph on ONNX Runtime's CUDA provider: parity with the CPU path, decode tok/s, an HTTP sweep.

Run on a machine with an NVIDIA GPU (``benchmarks/gpu_check.sh`` sets it up). What it checks:

1. The runner (serving.onnx, the KV cache resident on the device, bound in place through IOBinding)
   on CUDA against the same runner on the CPU: the same continuous-batching scenario on both (requests
   joining and leaving, prompts prefilled in chunks while others decode), max |delta logit| at every
   position, and whether every greedy token is the same.
2. Decode tokens/s at batch 1, 8 and 32 (16-token prompts, 128 greedy tokens each), CUDA and CPU.
3. With ``--http``: ``nextoken serve ART --device cuda --prefix-cache-mb 0`` driven by
   ``nextoken-loadtest`` at 1, 8 and 32 streams (output tok/s, TTFT and ITL percentiles).

It needs no PyTorch: the artifact is exported beforehand (by ``gpu_check.sh`` on the CPU machine or here).

    python benchmarks/gpu_check.py --artifact ART [--http] [--threads 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def scenario(runner, vocab: int, seed: int = 0, chunk: int = 7, steps: int = 40) -> list[np.ndarray]:  # noqa: ANN001
    """Logits of every call of a small continuous-batching run, deterministic given the runner's outputs."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, vocab, n).tolist() for n in (20, 3, 11, 1, 16, 9)]
    joins = [0, 0, 2, 5, 7, 9]
    lengths = np.zeros(runner.spec.max_slots, dtype=np.int64)
    active: dict[int, dict] = {}
    free = list(range(runner.spec.max_slots))
    out: list[np.ndarray] = []
    waiting = list(range(len(prompts)))
    for step in range(steps):
        while waiting and joins[waiting[0]] <= step and free:
            r = waiting.pop(0)
            active[free.pop(0)] = {"prompt": prompts[r], "done": 0, "last": None, "n": 0}
        for slot, a in active.items():  # one prompt chunk per step
            if a["done"] < len(a["prompt"]):
                part = a["prompt"][a["done"]:a["done"] + chunk]
                logits = runner.prefill(slot, part, a["done"])
                out.append(logits)
                a["done"] += len(part)
                lengths[slot] = a["done"]
                if a["done"] == len(a["prompt"]):
                    a["last"] = int(logits[-1].argmax())
                break
        dec = sorted(s for s, a in active.items() if a["last"] is not None)
        if dec:
            slots = np.asarray(dec)
            toks = np.asarray([active[s]["last"] for s in dec])
            logits = runner.decode(slots, toks, lengths[slots].copy(), lengths)
            out.append(logits)
            for i, s in enumerate(dec):
                active[s]["last"] = int(logits[i].argmax())
                active[s]["n"] += 1
                lengths[s] += 1
        for s in [s for s, a in active.items() if a["n"] >= 12]:
            del active[s]
            free.append(s)
            lengths[s] = 0
    return out


def decode_rate(runner, batch: int, new_tokens: int = 128) -> float:  # noqa: ANN001
    slots = np.arange(batch)
    lengths = np.zeros(runner.spec.max_slots, dtype=np.int64)
    for s in range(batch):
        runner.prefill(s, list(range(1, 17)), 0)
    lengths[:batch] = 16
    toks = np.ones(batch, dtype=np.int64)
    runner.decode(slots, toks, lengths[slots].copy(), lengths)  # warm-up
    lengths[:batch] += 1
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        toks = runner.decode(slots, toks, lengths[slots].copy(), lengths).argmax(-1)
        lengths[:batch] += 1
    return batch * new_tokens / (time.perf_counter() - t0)


def http_sweep(artifact: Path, threads: int) -> None:
    from tests.conftest import ServerProcess

    server = ServerProcess(artifact, "--device", "cuda", "--prefix-cache-mb", "0", "--max-batch-size", "32",
                           "--threads", str(threads))
    try:
        out = Path("sweep.json").resolve()
        subprocess.run(["nextoken-loadtest", "--base-url", server.url, "--concurrency", "1,8,32",
                        "--num-requests", "64", "--warmup", "4", "--input-len", "16", "--output-len", "128",
                        "--temperature", "0", "--extra-body", '{"ignore_eos": true}', "--json-out", str(out),
                        "--no-progress"], check=True)
        for lv in json.loads(out.read_text())["levels"]:
            print(f"  {lv['concurrency']:>3} streams: {lv['output_throughput']:9,.0f} tok/s, TTFT p50 "
                  f"{lv['ttft_ms']['p50']:.1f} ms p99 {lv['ttft_ms']['p99']:.1f} ms, ITL p50 {lv['itl_ms']['p50']:.2f} "
                  f"ms p99 {lv['itl_ms']['p99']:.2f} ms, failed {lv['failed']}")
    finally:
        server.stop()


def main() -> int:
    import onnxruntime as ort

    from nextoken.export.artifact import load_artifact
    from nextoken.export.runtime import Runner

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=4, help="CPU-side intra-op threads")
    ap.add_argument("--http", action="store_true", help="also run the server on CUDA under nextoken-loadtest")
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("error: onnxruntime has no CUDA provider here (install onnxruntime-gpu)", file=sys.stderr)
        return 2
    art = load_artifact(args.artifact)
    vocab = int(art.config["vocab_size"])
    cpu = Runner(art, max_slots=32, threads=args.threads)
    gpu = Runner(art, max_slots=32, device="cuda", threads=args.threads)
    print(f"runner on {gpu.provider}; cache {gpu.spec.nbytes / 2**20:.1f} MiB on the device")

    a, b = scenario(cpu, vocab), scenario(gpu, vocab)
    same = len(a) == len(b) and all(np.array_equal(x.argmax(-1), y.argmax(-1)) for x, y in zip(a, b, strict=False))
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=False))
    print(f"1. parity, CUDA vs CPU over {len(a)} calls (joins, leaves, chunked prefill): max |dlogit| {diff:.2e}, "
          f"greedy tokens identical: {same}")
    print("2. decode tok/s (16-token prompts, 128 greedy tokens per row)")
    for batch in (1, 8, 32):
        g, c = decode_rate(gpu, batch), decode_rate(cpu, batch)
        print(f"  batch {batch:>2}: CUDA {g:9,.0f}  CPU {c:9,.0f}  ({g / c:.1f}x)")
    if args.http:
        print("3. HTTP sweep (nextoken serve --device cuda, nextoken-loadtest, 128 tokens, greedy)")
        http_sweep(args.artifact, args.threads)
    return 0 if same and diff < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())

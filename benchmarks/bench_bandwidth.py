"""One stream against the memory-bandwidth bound: weight bytes read per token x tok/s vs this machine's copy bandwidth.

At batch 1 a decode step reads every weight once, so a token cannot come faster than
(weight bytes) / (memory bandwidth). This measures both sides in one process, interleaved:

- copy bandwidth: ``numpy.copyto`` of a 512 MiB array split over the runner's threads (read + write
  counted, as STREAM's Copy does), best of ``--repeats``;
- each artifact's serving graph decoding one token at a time through ``export.runtime.Runner``
  (the engine's runner, ``--threads`` ONNX Runtime threads, the default rule when 0): tok/s over
  ``--tokens`` steps after a warm-up, best of ``--repeats``;
- weight bytes per token: the serving graph's initializers as stored (packed 4-bit blocks and
  their scales for int4, int8 weights and scales for int8), read from the ONNX file(s).

The ratio (bytes per token x tok/s) / copy bandwidth is the share of the bound reached.

``--batch B`` adds the milliseconds of one decode step over B rows (every slot past a short prompt, best of
``--repeats``): where the kernels, not the bytes, decide (4-bit blocks against 8-bit at 32 streams).

    python benchmarks/bench_bandwidth.py --artifact ART [--artifact ART2 ...] [--tokens 128] [--repeats 3] [--batch 32]
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


def copy_bandwidth(threads: int, mib: int = 512, repeats: int = 3) -> float:
    """Bytes per second moved by a large array copy (read + write) on ``threads`` threads, as the graph reads
    its weights on ONNX Runtime's threads (numpy releases the GIL while it copies)."""
    from concurrent.futures import ThreadPoolExecutor

    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    parts = list(zip(np.array_split(src, threads), np.array_split(dst, threads), strict=True))
    with ThreadPoolExecutor(threads) as pool:
        def copy() -> None:
            list(pool.map(lambda p: np.copyto(p[1], p[0]), parts))

        copy()  # fault the pages in
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            copy()
            best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def weight_bytes(serving_onnx: Path) -> int:
    """The serving graph's initializers as stored (external data included)."""
    import onnx

    model = onnx.load(str(serving_onnx), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next(e.value for e in t.external_data if e.key == "length"))
        else:
            total += len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes
    return total


def decode_step_s(artifact: Path, batch: int, steps: int, threads: int, repeats: int) -> float:
    """Seconds of one decode step over ``batch`` rows in the engine's runner, each row fed its own argmax, as
    greedy decoding does (best of ``repeats``)."""
    from nextoken.export.artifact import load_artifact
    from nextoken.export.runtime import Runner

    art = load_artifact(artifact, verify=False)
    runner = Runner(art, max_slots=batch, max_len=min(int(art.config["n_positions"]), steps + 16), threads=threads)
    slots = np.arange(batch, dtype=np.int64)
    best = float("inf")
    for r in range(repeats + 1):  # the first pass warms up
        for s in range(batch):
            runner.prefill(s, [1, 2, 3, 4], 0)
        lengths = np.full(batch, 4, dtype=np.int64)
        tok = np.full(batch, 5, dtype=np.int64)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = runner.decode(slots, tok, lengths.copy(), lengths)  # (batch, V)
            lengths += 1
            tok = logits.argmax(axis=1)
        if r:
            best = min(best, (time.perf_counter() - t0) / steps)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", action="append", required=True, type=Path)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="also time a decode step over this many rows (0: no)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: the server's default rule)")
    args = ap.parse_args(argv)
    from nextoken.export.runtime import default_threads

    if args.batch < 0:
        ap.error(f"--batch must be >= 0, got {args.batch}")
    threads = args.threads or default_threads()
    extra = f" step ms at batch {args.batch} |" if args.batch else ""
    print("| artifact | quantize | weight MB read / token | tok/s (1 stream) | GB/s achieved | copy GB/s | share of "
          f"bound |{extra}\n|---|---|--:|--:|--:|--:|--:|" + ("--:|" if args.batch else ""))
    for art in args.artifact:
        bw = copy_bandwidth(threads, repeats=args.repeats)  # measured beside each artifact: interleaved
        rate = 1.0 / decode_step_s(art, 1, args.tokens, threads, args.repeats)  # tok/s at 1 stream
        wb = weight_bytes(art / "serving.onnx")
        export = json.loads((art / "manifest.json").read_text()).get("export", {})
        quant = export.get("quantize", "none")
        if "block_size" in export.get("quantization", {}):  # MatMulNBits: its block size decides its kernels
            quant += f" (block {export['quantization']['block_size']})"
        step = f" {decode_step_s(art, args.batch, 32, threads, args.repeats) * 1e3:.2f} |" if args.batch else ""
        print(f"| {art.name} | {quant} | {wb / 1e6:,.1f} | {rate:,.1f} | {wb * rate / 1e9:.2f} | {bw / 1e9:.2f} | "
              f"**{wb * rate / bw:.0%}** |{step}")
    print(f"\n{threads} ONNX Runtime thread(s); uptime: "
          f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""nextoken and llama.cpp's llama-server side by side on the same weights (issues 11 and 22).

1. Trains (or reuses, in ``--work``/``--shape``) a GPT-2-shaped model on tinyshakespeare (or the
   built-in corpus without it): ``--shape toy`` is 4 layers, 4 heads, 256 wide, context 256,
   byte-level BPE 2000; ``--shape gpt2-small`` is GPT-2 small's body: 12 layers, 12 heads, 768
   wide, context 1024, BPE 8192 (91M parameters; a few steps only: this measures speed).
2. Exports it twice: the ONNX artifact (``nextoken export``, ``--quant none|int8|int4``) and a GGUF
   file (``nextoken export --format gguf --dtype f32``), the same checkpoint; llama-server gets the
   matching precision from the same build's ``llama-quantize``: none -> f32, int8 -> q8_0,
   int4 -> q4_0.
3. Starts ``nextoken serve ART --max-batch-size 32`` and ``llama-server -m GGUF -np 32 -c 8192 -t 2``
   on loopback, both up for the whole run.
4. Parity: the same prompt, greedy, 48 tokens to eos, through both servers' HTTP APIs: the token
   ids must be identical at f32 (this is also the GGUF's check against llama.cpp itself); quantised
   pairs round differently, so there the agreement is reported, not required. Without
   ``ignore_eos`` here, since llama.cpp implements it as a -inf bias on eos and ours generates eos
   and goes on, which changes greedy tokens whenever eos is the argmax.
5. Throughput: one async streaming client (httpx, SSE, the same request body on both sides:
   ``/v1/completions``, 128 tokens, ``ignore_eos``, temperature 0, the same prompt tokens),
   ``--requests`` per stream, at 1, 4, 16 and 32 concurrent streams, the two servers interleaved
   run by run (A B, then B A, ...). Per stream count: output tok/s, TTFT p50 / p99, TPOT p50, ITL
   p50/p99 for both and the ratios, as median and range over ``--runs``.
6. ``--write-results`` puts the table (with the command and ``uptime``) into benchmarks/RESULTS.md,
   as a section of its own per shape and precision (a re-run replaces it).

    python benchmarks/bench_vs_llama.py --llama-server PATH [--runs 3] [--streams 1,4,16,32] [--work DIR]
    python benchmarks/bench_vs_llama.py --llama-server PATH --shape gpt2-small --quant int4 --write-results
    python benchmarks/bench_vs_llama.py --llama-server PATH --check-only    # parity only

Without a binary (``--llama-server`` or ``$NEXTOKEN_LLAMA_SERVER``) it says so and exits 0;
``../shared/tools/build-llama-server.sh`` builds one (about 8 minutes on 2 cores). Quote figures
from a quiet machine, with the ``uptime`` this prints.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import NextokenServer, write_results  # noqa: E402
from llama_peer import LlamaServer, find_binary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
PARITY_TOKENS = 48


# --- the model --------------------------------------------------------------------------------

SHAPES = {  # name -> (model and tokenizer, training steps by default, streams, new tokens)
    "toy": (dict(vocab_size=2000, n_layer=4, n_head=4, n_embd=256, block_size=256, batch_size=8), 300,
            "1,4,16,32", 128),
    "gpt2-small": (dict(vocab_size=8192, n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=2), 20,
                   "1,8,32", 64),
    # a Hugging Face folder of SmolLM2-135M's shape (hf_shape.py), random weights: nothing is trained
    "smollm2-135m": (None, 0, "1,8,32", 64),
}
QUANT_PAIRS = {"none": "f32", "int8": "q8_0", "int4": "q4_0"}  # nextoken --quantize -> llama-quantize type


def build(work: Path, max_iters: int, shape: str = "toy", quant: str = "none",
          llama_quantize: Path | None = None) -> tuple[Path, Path]:
    """(artifact folder, GGUF file) of the benchmark model, made once per ``work`` folder, shape and precision."""
    from nextoken.export.build import export_run
    from nextoken.export.gguf import export_gguf
    from nextoken.train.config import TrainConfig
    from nextoken.train.loop import train

    work = work / shape
    work.mkdir(parents=True, exist_ok=True)
    run, artifact, gguf = work / "run", work / f"artifact-{quant}", work / "model-f32.gguf"
    if SHAPES[shape][0] is None:  # a hub-shaped folder: exported as `nextoken export HF_DIR`, timed and measured
        from hf_shape import export_measured, make_smollm2_folder

        run = make_smollm2_folder(work / "hf")
        if not (artifact / "manifest.json").is_file():
            m = export_measured(run, artifact, "--quantize", quant, "--name", "bench-vs-llama")
            print(f"nextoken export {shape} --quantize {quant}: {m['seconds']:.0f} s, peak RSS "
                  f"{m['peak_rss_mb']:,.0f} MB", file=sys.stderr)
            (work / f"export-{quant}.json").write_text(json.dumps(m))
    elif not (run / "summary.json").is_file():
        data = [str(SHAKESPEARE)] if SHAKESPEARE.is_file() else []
        model = SHAPES[shape][0]
        cfg = TrainConfig(data=data, tokenizer="bpe", **model, max_iters=max_iters, eval_interval=max_iters,
                          eval_iters=2, warmup_iters=min(10, max_iters), learning_rate=2e-3, min_lr=2e-4,
                          sample_tokens=0, max_corpus_chars=0 if data else 2_000_000, out_dir=str(run),
                          progress=False, tensorboard=False, threads=2)
        print(f"training the {shape} benchmark model ({max_iters} steps) into {run} ...", file=sys.stderr)
        train(cfg, quiet=True)
    if not (artifact / "manifest.json").is_file():
        export_run(run, artifact, name="bench-vs-llama", version="1", quantize=quant)
    if not gguf.is_file():
        export_gguf(run, gguf, dtype="f32", name="bench-vs-llama")
    kind = QUANT_PAIRS[quant]
    if kind == "f32":
        return artifact, gguf
    quantized = work / f"model-{kind}.gguf"
    if not quantized.is_file():
        if llama_quantize is None:
            raise FileNotFoundError(f"--quant {quant} pairs with llama.cpp's {kind}: pass --llama-quantize (the "
                                    "llama-quantize of the llama-server build; looked for it beside llama-server)")
        subprocess.run([str(llama_quantize), str(gguf), str(quantized), kind], check=True, capture_output=True)
    return artifact, quantized


# --- parity -----------------------------------------------------------------------------------

def greedy_nextoken(url: str, prompt: str, n: int) -> list[int]:
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0}, timeout=120)
    r.raise_for_status()
    return list(r.json()["choices"][0]["token_ids"])


def greedy_llama(url: str, prompt_ids: list[int], n: int) -> list[int]:
    body = {"prompt": prompt_ids, "n_predict": n, "temperature": 0, "top_k": 1, "repeat_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "dry_multiplier": 0.0, "return_tokens": True,
            "cache_prompt": False}
    r = httpx.post(url + "/completion", json=body, timeout=120)
    r.raise_for_status()
    return list(r.json()["tokens"])


def parity(nt: NextokenServer, peer: LlamaServer, prompt_ids: list[int], eos: int) -> bool:
    """Greedy tokens through both servers; True when identical (printed either way)."""
    ours = greedy_nextoken(nt.url, PROMPT, PARITY_TOKENS)
    theirs = greedy_llama(peer.url, prompt_ids, PARITY_TOKENS)

    def cut(ids: list[int]) -> list[int]:
        return ids[: ids.index(eos)] if eos in ids else ids

    ours, theirs = cut(ours), cut(theirs)
    same = ours == theirs
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    print(f"greedy parity over HTTP ({len(ours)} / {len(theirs)} tokens to eos or {PARITY_TOKENS}): "
          f"{'IDENTICAL' if same else f'DIFFERENT from token {first}'}")
    if not same:
        print(f"  nextoken   {ours}\n  llama.cpp  {theirs}")
    return same


# --- the streaming client ---------------------------------------------------------------------

@dataclass
class Record:
    ttft: float
    chunk_times: list[float]  # arrival of every chunk that carried text, from the request's start
    tokens: int
    error: str | None = None


@dataclass
class Level:
    tok_s: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    itl_p50: float
    itl_p99: float
    requests: int
    failed: int = 0
    records: list[Record] = field(default_factory=list, repr=False)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> Record:
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    usage = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Record(0.0, [], 0, f"{r.status_code} {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                usage = msg.get("usage") or usage
                choice = (msg.get("choices") or [{}])[0]
                if choice.get("text"):
                    times.append(time.perf_counter() - t0)
                    tokens += len(choice.get("token_ids") or []) or 1
    except httpx.HTTPError as e:
        return Record(0.0, times, tokens, repr(e))
    if usage and usage.get("completion_tokens"):
        tokens = int(usage["completion_tokens"])
    return Record(times[0] if times else 0.0, times, tokens)


async def run_level(url: str, body: Callable[[], dict], streams: int, requests_per_stream: int) -> Level:
    """``streams`` concurrent streams of ``requests_per_stream`` requests each, every one ``body()``."""
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        async def worker() -> list[Record]:
            return [await stream_one(client, url, body()) for _ in range(requests_per_stream)]

        t0 = time.perf_counter()
        results = await asyncio.gather(*[worker() for _ in range(streams)])
        wall = time.perf_counter() - t0
    records = [r for rs in results for r in rs]
    ok = [r for r in records if r.error is None and r.chunk_times]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    tpot = [(r.chunk_times[-1] - r.chunk_times[0]) / (r.tokens - 1) for r in ok if r.tokens > 1]
    return Level(tok_s=sum(r.tokens for r in ok) / wall, ttft_p50=pct([r.ttft for r in ok], 0.5),
                 ttft_p99=pct([r.ttft for r in ok], 0.99),
                 tpot_p50=pct(tpot, 0.5), itl_p50=pct(itl, 0.5), itl_p99=pct(itl, 0.99), requests=len(records),
                 failed=len(records) - len(ok), records=records)


# --- report -----------------------------------------------------------------------------------

def _med_range(values: list[float], scale: float = 1.0, fmt: str = "{:,.0f}") -> str:
    v = [x * scale for x in values]
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def table(results: dict[str, dict[int, list[Level]]], streams: list[int]) -> list[str]:
    """The comparison as markdown rows (what --write-results puts in RESULTS.md and what is printed)."""
    med = statistics.median
    rows = ["| streams | tok/s nextoken | tok/s llama-server | ratio | TTFT p50 ms nt / llama | TTFT p99 ms nt / llama "
            "| TPOT p50 ms nt / llama | ITL p50 / p99 ms nt | ITL p50 / p99 ms llama |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for c in streams:
        a, b = results["nextoken"][c], results["llama"][c]
        ratios = [x.tok_s / y.tok_s for x, y in zip(a, b, strict=True) if y.tok_s]
        failed = sum(x.failed for x in a) + sum(y.failed for y in b)
        ms = lambda vals: med(vals) * 1e3  # noqa: E731
        rows.append(
            f"| {c} | {_med_range([x.tok_s for x in a])} | {_med_range([y.tok_s for y in b])} | "
            f"**{_med_range(ratios, fmt='{:.2f}')}** | "
            f"{ms([x.ttft_p50 for x in a]):.1f} / {ms([y.ttft_p50 for y in b]):.1f} | "
            f"{ms([x.ttft_p99 for x in a]):.1f} / {ms([y.ttft_p99 for y in b]):.1f} | "
            f"{ms([x.tpot_p50 for x in a]):.2f} / {ms([y.tpot_p50 for y in b]):.2f} | "
            f"{ms([x.itl_p50 for x in a]):.2f} / {ms([x.itl_p99 for x in a]):.2f} | "
            f"{ms([y.itl_p50 for y in b]):.2f} / {ms([y.itl_p99 for y in b]):.2f} |"
            + (f" FAILED {failed}" if failed else ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", default=None, help="llama-server binary (default: $NEXTOKEN_LLAMA_SERVER)")
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "nextoken-bench-vs-llama"),
                    help="folder for the model, artifact and GGUF (reused when present)")
    ap.add_argument("--shape", default="toy", choices=sorted(SHAPES),
                    help="toy: 4 layers x 256 wide, context 256 (issue 11); gpt2-small: GPT-2 small's body, 91M "
                         "parameters, context 1024, BPE 8192 (issue 22); smollm2-135m: a Hugging Face folder of "
                         "SmolLM2-135M's shape, exported as it comes (issue 21)")
    ap.add_argument("--quant", default="none", choices=sorted(QUANT_PAIRS),
                    help="nextoken's --quantize, paired with llama.cpp's f32 / q8_0 / q4_0 of the same checkpoint")
    ap.add_argument("--llama-quantize", default=None,
                    help="llama-quantize of the same build (default: beside the llama-server binary)")
    ap.add_argument("--max-iters", type=int, default=None, help="training steps for a new benchmark model "
                                                                 "(default: 300 toy, 20 gpt2-small)")
    ap.add_argument("--streams", default=None, help="concurrent streams, comma-separated (default: 1,4,16,32 toy, "
                                                    "1,8,32 gpt2-small)")
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs per stream count")
    ap.add_argument("--requests", type=int, default=2, help="requests per stream in each run")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default: 128 toy, 64 gpt2-small)")
    ap.add_argument("--write-results", action="store_true",
                    help="put the table into benchmarks/RESULTS.md (a section per shape and precision)")
    ap.add_argument("--llama-threads", type=int, default=2)
    ap.add_argument("--nextoken-flags", default="", help="extra `nextoken serve` flags, space-separated")
    ap.add_argument("--check-only", action="store_true", help="greedy parity only, no throughput runs")
    ap.add_argument("--prompts", choices=("distinct", "shared"), default="distinct",
                    help="distinct: every request's prompt starts with its own number, so neither server reuses a "
                         "cached prompt and TTFT includes the prefill; shared: one prompt for all (llama-server "
                         "reuses its slot's cached prompt, nextoken's prefix cache needs a whole 16-token block)")
    args = ap.parse_args(argv)
    try:
        binary = find_binary(args.llama_server)
    except FileNotFoundError as e:
        print(f"error: --llama-server: {e}", file=sys.stderr)
        return 2
    if binary is None:
        print("skipped: no llama-server binary; pass --llama-server PATH or set $NEXTOKEN_LLAMA_SERVER "
              "(../shared/tools/build-llama-server.sh builds one in about 8 minutes)")
        return 0
    _model, default_iters, default_streams, default_new = SHAPES[args.shape]
    streams = [int(s) for s in (args.streams or default_streams).split(",") if s]
    args.new_tokens = args.new_tokens or default_new
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    quantize_bin = Path(args.llama_quantize) if args.llama_quantize else Path(binary).with_name("llama-quantize")
    if args.quant != "none" and not quantize_bin.is_file():
        print(f"error: --llama-quantize: {quantize_bin} does not exist", file=sys.stderr)
        return 2
    artifact, gguf = build(work, args.max_iters or default_iters, args.shape, args.quant, quantize_bin)

    from tokenizers import Tokenizer

    cfg = json.loads((artifact / "config.json").read_text())
    from nextoken.export.artifact import eos_ids, prompt_prefix_id

    eos = eos_ids(cfg)[0]
    tok = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    prefix = prompt_prefix_id(cfg)  # what our server feeds for the text prompt: ours start after <|endoftext|>
    prompt_ids = [*([prefix] if prefix is not None else []), *tok.encode(PROMPT).ids]
    max_streams = max(streams)
    nt = NextokenServer(artifact, "--max-batch-size", str(max(32, max_streams)), *args.nextoken_flags.split())
    try:
        peer = LlamaServer(binary, gguf, parallel=max(32, max_streams), ctx=max(32, max_streams) * cfg["n_positions"],
                           threads=args.llama_threads)
    except BaseException:
        nt.stop()
        raise
    try:
        print(f"nextoken serve pid {nt.proc.pid} at {nt.url}; llama-server pid {peer.pid} at {peer.url} "
              f"({' '.join(peer.cmd[1:])})")
        same = parity(nt, peer, prompt_ids, eos)
        if args.check_only:
            return 0 if same or args.quant != "none" else 1
        common = {"max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        numbers = itertools.count()

        def text(n: int | None) -> str:  # "distinct": a request number first, so no prompt is a cached prefix
            return PROMPT if n is None else f"{n}: {PROMPT}"

        def body_for(server: str) -> Callable[[], dict]:
            def body() -> dict:
                n = next(numbers) if args.prompts == "distinct" else None
                prompt = text(n) if server == "nextoken" else [*([prefix] if prefix is not None else []),
                                                                 *tok.encode(text(n)).ids]
                return {**common, "prompt": prompt, "stream_options": {"include_usage": True}}
            return body

        bodies = {"nextoken": body_for("nextoken"), "llama": body_for("llama")}
        urls = {"nextoken": nt.url, "llama": peer.url}
        for name in urls:  # warm-up: first requests pay for allocation and caches
            asyncio.run(run_level(urls[name], bodies[name], min(4, max_streams), 1))
        results: dict[str, dict[int, list[Level]]] = {"nextoken": {c: [] for c in streams},
                                                      "llama": {c: [] for c in streams}}
        for r in range(args.runs):
            for c in streams:
                order = ["nextoken", "llama"] if (r + streams.index(c)) % 2 == 0 else ["llama", "nextoken"]
                for name in order:
                    lv = asyncio.run(run_level(urls[name], bodies[name], c, args.requests))
                    results[name][c].append(lv)
                    print(f"run {r + 1} streams {c:>2} {name:<8} {lv.tok_s:8,.0f} tok/s  TTFT p50 "
                          f"{lv.ttft_p50 * 1e3:6.1f} ms  ITL p50 {lv.itl_p50 * 1e3:5.2f} ms"
                          + (f"  failed {lv.failed}" if lv.failed else ""), file=sys.stderr)
        up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        kind = QUANT_PAIRS[args.quant]
        intro = (f"{args.new_tokens} tokens per request, ignore_eos, temperature 0, {args.prompts} prompts, "
                 f"{args.requests} request(s) per "
                 f"stream, {args.runs} interleaved run(s); median (range). nextoken --quantize {args.quant} against "
                 f"llama-server {kind} ({' '.join(peer.cmd[3:])}); greedy parity over HTTP: "
                 f"{'identical' if same else 'different (reported; quantised pairs round differently)'}.")
        measured = work / args.shape / f"export-{args.quant}.json"
        if measured.is_file():  # a folder exported here: what the export cost
            m = json.loads(measured.read_text())
            intro += (f" `nextoken export` of the folder ({args.quant}): {m['seconds']:.0f} s, peak RSS "
                      f"{m['peak_rss_mb']:,.0f} MB.")
        rows = table(results, streams)
        print("\n" + intro + "\n\n" + "\n".join(rows) + f"\n\nuptime: {up}")
        if args.write_results:
            cmd = "python benchmarks/bench_vs_llama.py " + " ".join(a for a in (argv or sys.argv[1:]))
            write_results(REPO / "benchmarks" / "RESULTS.md",
                          f"## nextoken vs llama-server: {args.shape}, {args.quant} / {kind} (`bench_vs_llama.py`)",
                          [f"`{cmd}` (uptime at the end: {up}).", "", intro, "", *rows])
            print("wrote benchmarks/RESULTS.md")
        return 0 if same or args.quant != "none" else 1
    finally:
        peer.stop()
        nt.stop()


if __name__ == "__main__":
    sys.exit(main())

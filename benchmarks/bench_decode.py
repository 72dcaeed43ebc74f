"""Decode tokens/s: PyTorch without a cache, PyTorch with the KV cache, ONNX Runtime, onnxruntime-genai.

A 3.3M-parameter GPT (4 layers, 256 wide, vocab 259, random weights: speed does not depend on
what the weights learned) generates ``--new-tokens`` greedy tokens after a ``--prompt``-token
prompt, at batch 1 and batch 8. Variants run interleaved (A B C D A B C D ...) so a noisy
neighbour hits them all alike; figures are medians of ``--repeats``, ratios come from the same
run. A separate profiled ORT pass splits one decode step by operator, to name where the time goes.

    python benchmarks/bench_decode.py                 # the full run (median of 5)
    python benchmarks/bench_decode.py --repeats 1 --new-tokens 32   # smoke run

Targets (issue 4): ORT >= 5x the PyTorch KV cache at batch 1 and >= 2.5x at batch 8.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from harness import uptime

from nextoken.export.onnx import export_onnx
from nextoken.export.quantize import QuantSpec, quantize_file
from nextoken.train.config import GPTConfig
from nextoken.train.model import GPT

CONFIG = GPTConfig(vocab_size=259, block_size=256, n_layer=4, n_head=4, n_embd=256)


def session(path: Path, threads: int, profile_prefix: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def torch_nocache(model: GPT, prompt: np.ndarray, n: int) -> np.ndarray:
    """The seed notebook's loop: re-run the whole (cropped) context for every new token."""
    idx = torch.from_numpy(prompt)
    for _ in range(n):
        logits = model(idx[:, -model.config.block_size:]).logits[:, -1]  # (B, V)
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx[:, prompt.shape[1]:].numpy()


@torch.no_grad()
def torch_cache(model: GPT, prompt: np.ndarray, n: int) -> np.ndarray:
    out = model(torch.from_numpy(prompt), use_cache=True)
    toks = []
    for _ in range(n):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        toks.append(nxt)
        out = model(nxt, past_key_values=out.present_key_values, use_cache=True)
    return torch.cat(toks, 1).numpy()


def ort_cache(sess: ort.InferenceSession, prompt: np.ndarray, n: int) -> np.ndarray:
    """A lean loop over InferenceSession.run: presents fed straight back, no per-step allocation
    other than what the graph itself does (its Concat grows the cache)."""
    B, P = prompt.shape
    c = CONFIG
    past_names = [f"past_key_values.{i}.{kv}" for i in range(c.n_layer) for kv in ("key", "value")]
    ones = np.ones((B, P + n), dtype=np.int64)
    masks = [np.ascontiguousarray(ones[:, :s]) for s in range(P, P + n + 1)]  # mask per cache length, built once
    empty = np.zeros((B, c.n_kv_head, 0, c.head_dim), dtype=np.float32)
    feeds = {"input_ids": prompt, "attention_mask": masks[0],
             "position_ids": np.broadcast_to(np.arange(P, dtype=np.int64), (B, P)).copy()}
    feeds.update(dict.fromkeys(past_names, empty))
    toks = np.empty((B, n), dtype=np.int64)
    for t in range(n):
        logits, *present = sess.run(None, feeds)
        nxt = logits[:, -1].argmax(-1)  # (B,)
        toks[:, t] = nxt
        feeds["input_ids"] = nxt[:, None]
        feeds["attention_mask"] = masks[t + 1]
        feeds["position_ids"] = np.full((B, 1), P + t, dtype=np.int64)
        feeds.update(zip(past_names, present, strict=True))
    return toks


def genai_folder(onnx_path: Path, folder: Path, max_length: int, threads: int, config: GPTConfig | None = None) -> Path:
    """genai_config.json beside a link to the graph: type llama, separate past and present buffers."""
    c = config or CONFIG
    folder.mkdir(exist_ok=True)
    if not (folder / "model.onnx").exists():
        os.symlink(onnx_path, folder / "model.onnx")
    eos = c.vocab_size - 1
    cfg = {
        "model": {
            "type": "llama", "vocab_size": c.vocab_size, "context_length": c.block_size,
            "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "intra_op_num_threads": threads,
                                    "inter_op_num_threads": 1, "provider_options": []},
                "filename": "model.onnx", "head_size": c.head_dim, "hidden_size": c.n_embd,
                "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head, "num_hidden_layers": c.n_layer,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        # min_length = max_length: random weights may pick eos early; every variant must make n tokens
        "search": {"do_sample": False, "num_beams": 1, "max_length": max_length, "min_length": max_length,
                   "past_present_share_buffer": False, "num_return_sequences": 1, "top_k": 1, "top_p": 1.0,
                   "temperature": 1.0, "repetition_penalty": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "diversity_penalty": 0.0, "no_repeat_ngram_size": 0},
    }
    (folder / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def genai_decode(og_model, prompt: np.ndarray, n: int) -> np.ndarray:  # noqa: ANN001 (optional package)
    import onnxruntime_genai as og

    B, P = prompt.shape
    params = og.GeneratorParams(og_model)
    params.set_search_options(batch_size=B, max_length=P + n, min_length=P + n)
    gen = og.Generator(og_model, params)
    gen.append_tokens(prompt.astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return np.stack([np.asarray(gen.get_sequence(b))[P:] for b in range(B)])


def profile_step(onnx_path: Path, prompt: np.ndarray, n: int, threads: int, workdir: Path) -> dict:
    """Share of in-graph time per op type over one decode, and run() time outside the graph."""
    sess = session(onnx_path, threads, profile_prefix=str(workdir / "ort_profile"))
    t0 = time.perf_counter()
    ort_cache(sess, prompt, n)
    wall = time.perf_counter() - t0
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    model_run = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            model_run += e["dur"]
    kernels = sum(by_op.values())
    wall_us = wall * 1e6
    return {"wall_us": wall_us, "model_run_us": model_run, "kernel_us": kernels,
            "share_of_wall": {op: d / wall_us for op, d in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "outside_kernels": (wall_us - kernels) / wall_us, "outside_run": (wall_us - model_run) / wall_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads (1 is steadier)")
    ap.add_argument("--opset", type=int, default=23)
    ap.add_argument("--no-genai", action="store_true")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 (dynamic MatMul quantisation) variant")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = GPT(CONFIG).eval()
    work = Path(tempfile.mkdtemp(prefix="bench_decode_"))
    onnx_path = work / "model.onnx"
    export_onnx(model, onnx_path, opset=args.opset)
    sess = session(onnx_path, args.threads)
    n, P = args.new_tokens, args.prompt
    variants: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "torch_nocache": lambda p: torch_nocache(model, p, n),
        "torch_cache": lambda p: torch_cache(model, p, n),
        "ort_cache": lambda p: ort_cache(sess, p, n),
    }
    if not args.no_int8:
        quantize_file(onnx_path, work / "model.int8.onnx", QuantSpec("int8"))
        sess_int8 = session(work / "model.int8.onnx", args.threads)
        variants["ort_int8"] = lambda p: ort_cache(sess_int8, p, n)
    genai_note = "skipped (--no-genai)"
    if not args.no_genai:
        try:
            import onnxruntime_genai as og

            og_model = og.Model(str(genai_folder(onnx_path, work / "genai", P + n, args.threads)))
            genai_decode(og_model, np.zeros((1, P), dtype=np.int64), 2)  # fails here if it cannot read the graph
            variants["genai"] = lambda p: genai_decode(og_model, p, n)
            genai_note = f"onnxruntime-genai {og.__version__}"
        except Exception as e:  # report why, keep the other figures
            genai_note = f"unavailable: {type(e).__name__}: {e}"

    rng = np.random.default_rng(0)
    results: dict[int, dict[str, float]] = {}
    for B in args.batches:
        prompt = rng.integers(0, CONFIG.vocab_size, (B, P)).astype(np.int64)
        ref = variants["torch_cache"](prompt)
        for name, fn in variants.items():  # warm up, and check every variant decodes the same tokens
            got = fn(prompt)
            if not np.array_equal(got, ref):
                agree = int((got == ref).all(0).cumprod().sum())
                print(f"note: {name} greedy tokens match torch_cache for {agree}/{n} steps at batch {B}")
        times: dict[str, list[float]] = defaultdict(list)
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn(prompt)
                times[name].append(time.perf_counter() - t0)
        results[B] = {name: B * n / statistics.median(ts) for name, ts in times.items()}

    load = uptime()
    print(f"\ndecode tokens/s: {CONFIG.num_params() / 1e6:.2f}M params, prompt {P}, {n} new tokens, "
          f"median of {args.repeats}, {args.threads} thread(s), opset {args.opset}; {genai_note}")
    print(f"load: {load}")
    names = list(variants)
    print(f"{'batch':>5} " + " ".join(f"{k:>14}" for k in names) + "   ort/torch_cache  genai/torch_cache  "
          "torch_cache/nocache")
    for B, r in results.items():
        genai_ratio = f"{r['genai'] / r['torch_cache']:17.2f}x" if "genai" in r else f"{'-':>18}"
        int8_ratio = f"   int8/torch_cache {r['ort_int8'] / r['torch_cache']:.2f}x" if "ort_int8" in r else ""
        print(f"{B:>5} " + " ".join(f"{r[k]:14.0f}" for k in names)
              + f"   {r['ort_cache'] / r['torch_cache']:14.2f}x {genai_ratio}"
              f"   {r['torch_cache'] / r['torch_nocache']:17.2f}x{int8_ratio}")
    profiles = {}
    for B in args.batches:
        prompt = rng.integers(0, CONFIG.vocab_size, (B, P)).astype(np.int64)
        prof = profile_step(onnx_path, prompt, n, args.threads, work)
        profiles[B] = prof
        top = ", ".join(f"{op} {share:.0%}" for op, share in list(prof["share_of_wall"].items())[:5])
        print(f"ORT profile batch {B}: Concat (cache growth) {prof['share_of_wall'].get('Concat', 0):.0%} of a step; "
              f"top ops: {top}; outside kernels (run() overhead + Python loop) {prof['outside_kernels']:.0%}")
    if args.json:
        args.json.write_text(json.dumps({"tokens_per_s": results, "profile": profiles, "load": load,
                                         "genai": genai_note, "args": vars(args) | {"json": str(args.json)}},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()

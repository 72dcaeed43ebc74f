"""Grammar engines for structured output on our vocabularies: per-step mask time, compile time, apply cost.

    python benchmarks/bench_grammar.py                       # every installed engine, full run
    python benchmarks/bench_grammar.py --steps 40 --repeats 1 --vocabs char bpe2000   # a smoke run

Candidates (benchmarks/grammar_engines.py), each measured only if it imports: llguidance (what
serve/engine/grammar.py uses; also measured through that module's own fill_masks + apply_masks),
outlines-core, xgrammar. xgrammar requires
PyTorch, transformers and triton, so it can never be a serving dependency; to compare it, install it
in a scratch environment (``pip install --no-deps xgrammar apache-tvm-ffi`` next to torch and
transformers) and run this script there.

Vocabularies, trained here with nextoken's own trainer on the shared tinyshakespeare corpus:
``char`` (its 65 characters, plus the JSON punctuation and digits it lacks, so JSON is expressible),
``bpe2000`` and ``bpe4096`` (byte-level BPE). Workloads: a typical JSON schema (SCHEMA), any JSON
object, and a regex. Per-step figures: B matchers advance in lock-step by tokens drawn uniformly
among the allowed ones; "fill" is the engine's batch mask computation into an int32 bitmask (the
format all three write natively; for ``nextoken`` it is the module's fill_masks into the float32 bias
plus apply_masks on the logits, the server's whole per-step cost), in wall time and as the process's
CPU time (all its threads; a busy machine inflates it less than wall time, but a thread pool that
spins counts too), "accept" is advancing every matcher by its token; a matcher that finishes is
replaced by a fresh one outside the timed region. A compile that takes over 5 s is timed once and
reused in later repeats (outlines-core's any-JSON-object regex). Engines, vocabularies and workloads
are interleaved within each repeat; medians over all steps of all repeats.

Other jobs share these cores: compare figures from one run only and keep the printed ``uptime``
beside them (docs/field-notes.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grammar_engines import CANDIDATES, Candidate, Vocab  # noqa: E402
from harness import uptime  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
JSON_EXTRA = '{"name": "x", "age": 12, "tags": [], "ok": true, "v": null, "n": -1.5e+3}\\/_<>=+*#%@~^|`\t0123456789'

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 32},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                    "pattern": "^[0-9]{5}$"}}, "required": ["city"], "additionalProperties": False},
        "kind": {"enum": ["person", "company"]},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
}
WORKLOADS: dict[str, tuple[str, Any]] = {
    "schema": ("json", SCHEMA),
    "json_object": ("json", {"type": "object"}),
    "regex": ("regex", r"[A-Z][a-z]{2,9}( [A-Z][a-z]{2,9}){0,2}, [0-9]{1,4} [A-Z][a-z]+ (St|Ave|Rd)\."),
}


def build_vocabs(names: list[str]) -> list[Vocab]:
    from tokenizers import Tokenizer

    from nextoken.serve.tokens import TokenBytes
    from nextoken.train.tokenizer import EOT, train_tokenizer

    text = CORPUS.read_text(encoding="utf-8")
    docs = [text[i:i + 10_000] for i in range(0, len(text), 10_000)]
    out = []
    for name in names:
        if name == "char":
            tok = train_tokenizer("char", [*docs, JSON_EXTRA])
        else:
            tok = train_tokenizer("bpe", docs, vocab_size=int(name.removeprefix("bpe")))
        tj = tok.to_str()
        tok = Tokenizer.from_str(tj)
        tb = TokenBytes(tok)
        special = sorted(int(t["id"]) for t in json.loads(tj)["added_tokens"] if t.get("special"))
        out.append(Vocab(name, tj, [tb(i) for i in range(tok.get_vocab_size())], tok.token_to_id(EOT), special))
    return out



# --- measurements ----------------------------------------------------------------------------------
def run_steps(c: Candidate, v: Vocab, compiled: Any, B: int, steps: int, seed: int) -> dict[str, list[float]]:
    """Lock-step generation for ``steps`` steps at batch ``B``: per-step seconds of fill (wall and the
    process's CPU time, which a busy machine inflates less) and of accept (wall)."""
    rng = np.random.default_rng(seed)
    words = (v.size + 31) // 32
    bits = np.zeros((B, words), dtype=np.int32)
    ms = [c.matcher(compiled) for _ in range(B)]
    out: dict[str, list[float]] = {"fill": [], "fill_cpu": [], "accept": []}
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        c.fill(ms, bits)
        out["fill"].append(time.perf_counter() - t0)
        out["fill_cpu"].append(time.process_time() - c0)
        allowed = c.allowed(bits, v).copy()
        allowed[:, [s for s in v.special if s != v.eos_id]] = False
        if not allowed.any(axis=1).all():
            raise RuntimeError(f"{c.name}: a row with no allowed token on {v.name}")
        tokens = np.where(allowed, rng.random(allowed.shape), -1.0).argmax(axis=1)  # uniform among allowed
        t0 = time.perf_counter()
        for i, m in enumerate(ms):
            if int(tokens[i]) != v.eos_id:
                c.accept(m, int(tokens[i]))
        out["accept"].append(time.perf_counter() - t0)
        for i, m in enumerate(ms):
            if int(tokens[i]) == v.eos_id or c.done(m):
                ms[i] = c.matcher(compiled)
    return out


MEASURES = ("fill", "fill_cpu", "accept")
SLOW_COMPILE_S = 5.0


def bench_engines(args: argparse.Namespace, vocabs: list[Vocab]) -> list[dict]:
    names = [n for n in args.engines if importlib.util.find_spec(CANDIDATES[n][0]) is not None]
    skipped = sorted(set(args.engines) - set(names))
    if skipped:
        print(f"not installed, skipped: {', '.join(skipped)}")
    cands = {(n, v.name): CANDIDATES[n][1]() for n in names for v in vocabs}
    setup: dict[tuple[str, str], float] = {}
    for (n, vn), c in cands.items():
        t0 = time.perf_counter()
        c.setup(next(v for v in vocabs if v.name == vn))
        setup[(n, vn)] = time.perf_counter() - t0
    samples: dict[tuple, dict[str, list[float]]] = {}
    failed: dict[tuple, str] = {}
    slow: dict[tuple, Any] = {}  # compiles over SLOW_COMPILE_S are timed once and then reused
    for rep in range(args.repeats):
        for v in vocabs:
            for w in args.workloads:
                kind, payload = WORKLOADS[w]
                for n in names:  # interleaved: every engine once per (repeat, vocabulary, workload)
                    key = (n, v.name, w)
                    if key in failed:
                        continue
                    c = cands[(n, v.name)]
                    s = samples.setdefault(key, {"compile": []})
                    try:
                        if key in slow:
                            compiled = slow[key]
                        else:
                            t0 = time.perf_counter()
                            compiled = c.compile(kind, payload)
                            s["compile"].append(time.perf_counter() - t0)
                            if s["compile"][-1] > SLOW_COMPILE_S:
                                slow[key] = compiled
                        for b in args.batches:
                            for m, xs in run_steps(c, v, compiled, b, args.steps, seed=rep).items():
                                s.setdefault(f"{m}_b{b}", []).extend(xs)
                    except Exception as e:  # an engine that cannot take a workload is reported, not fatal
                        failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    rows = []
    for (n, vn, w), s in samples.items():
        if (n, vn, w) in failed:
            rows.append({"engine": n, "vocab": vn, "workload": w, "error": failed[(n, vn, w)]})
            continue
        row = {"engine": n, "vocab": vn, "workload": w, "setup_ms": setup[(n, vn)] * 1e3,
               "compile_ms": statistics.median(s["compile"]) * 1e3}
        for b in args.batches:
            for m in MEASURES:
                row[f"{m}_b{b}_us"] = statistics.median(s[f"{m}_b{b}"]) * 1e6
        rows.append(row)
    return rows


def bench_apply(vocabs: list[Vocab], batches: list[int], repeats: int) -> list[dict]:
    """Applying a (B, V) mask to float32 logits in NumPy: additive bias vs the masked-write forms."""
    neg = np.float32(-np.inf)
    out = []
    for v in vocabs:
        for B in batches:
            rng = np.random.default_rng(0)
            logits = rng.standard_normal((B, v.size)).astype(np.float32)
            allowed = rng.random((B, v.size)) < 0.5
            bias = np.where(allowed, np.float32(0), neg)
            banned = ~allowed
            forms: dict[str, Callable[[np.ndarray], Any]] = {
                "add_bias": lambda x, b=bias: np.add(x, b, out=x),
                "copyto_where": lambda x, m=banned: np.copyto(x, neg, where=m),
                "np_where": lambda x, m=allowed: np.where(m, x, neg),
                "bool_index": lambda x, m=banned: x.__setitem__(m, neg),
            }
            times: dict[str, list[float]] = {k: [] for k in forms}
            for _ in range(repeats * 100):
                for k, f in forms.items():
                    x = logits.copy()
                    t0 = time.perf_counter()
                    f(x)
                    times[k].append(time.perf_counter() - t0)
            out.append({"vocab": v.name, "V": v.size, "B": B,
                        **{f"{k}_us": statistics.median(t) * 1e6 for k, t in times.items()}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--vocabs", nargs="+", default=["char", "bpe2000", "bpe4096"],
                    help="char, or bpeN for a byte-level BPE of N tokens")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=150, help="lock-step generation steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if not CORPUS.is_file():
        sys.exit(f"{CORPUS} is absent (the shared corpora live beside the repository)")

    t0 = time.perf_counter()
    vocabs = build_vocabs(args.vocabs)
    print(f"vocabularies: {', '.join(f'{v.name}={v.size}' for v in vocabs)} ({time.perf_counter() - t0:.1f} s)")
    engines = bench_engines(args, vocabs)
    applied = bench_apply(vocabs, args.batches, args.repeats)
    load = uptime()

    cols = ["setup_ms", "compile_ms"] + [f"{m}_b{b}_us" for b in args.batches for m in MEASURES]
    print(f"\nper-step mask (fill) and accept time, medians; uptime: {load}")
    print(f"{'engine':16} {'vocab':8} {'workload':12} " + " ".join(f"{c:>16}" for c in cols))
    for r in sorted(engines, key=lambda r: (r["workload"], r["vocab"], r["engine"])):
        head = f"{r['engine']:16} {r['vocab']:8} {r['workload']:12} "
        print(head + (r["error"] if "error" in r else " ".join(f"{r[c]:16.1f}" for c in cols)))
    print("\napplying a mask to (B, V) float32 logits in NumPy (us, medians)")
    for r in applied:
        print(f"  {r['vocab']:8} V={r['V']:<5} B={r['B']:<3} " + "  ".join(
            f"{k.removesuffix('_us')} {r[k]:.1f}" for k in r if k.endswith("_us")))
    if args.json:
        args.json.write_text(json.dumps({"uptime": load, "engines": engines, "apply": applied}, indent=2))


if __name__ == "__main__":
    main()

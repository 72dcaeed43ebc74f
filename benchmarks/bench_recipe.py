"""Training-recipe ablation: each change alone and all together, at a fixed token budget and a fixed time budget.

    python benchmarks/bench_recipe.py                                   # both corpora, both budgets, 2 rounds
    python benchmarks/bench_recipe.py --corpus shakespeare --mode tokens --tokens 1000000 --rounds 1
    python benchmarks/bench_recipe.py --variants baseline muon recipe --mode time --budget 120

Two corpora, each starting from the preset it ablates (``--base``: by default the GPT-2-style
presets as they were before the recipe, so "baseline" is the figure to beat):

* ``shakespeare``: tinyshakespeare at character level (``../shared/data/tinyshakespeare.txt``);
* ``stdlib``: the built-in corpus (the standard library's source), byte-level BPE 2048.

Variants: ``baseline`` (the base preset unchanged), one per recipe change on top of it
(``muon``, ``rope``, ``qk_norm``, ``relu2``, ``untied``, ``zero_init``, ``softcap``, ``doc_mask``,
``fused_adamw``: a systems change, the same arithmetic), ``recipe`` (all of them, with the settings
of the new preset for that corpus) and ``recipe-adamw`` (the recipe with AdamW everywhere: its
tokens/s against ``recipe``'s is Muon's cost per step at the preset's shapes). Runs are
interleaved (A B C A B C, round after round) so a busy neighbour hurts every variant alike.

Budgets: ``tokens`` (``max_iters`` = budget / tokens per step, the schedule sized to it: the
loss does not depend on the machine's speed, so this is the figure to trust on a shared box)
and ``time`` (``--lr-schedule time`` over ``max_time`` seconds of training: the decay ends at
the budget on any machine). Reported per run: val loss at the budget (the run's own evaluation,
and one common evaluation: the same evenly spaced val windows for every model), tokens/s, and
the tokens each variant needed to reach the target loss (default: the baseline's median final
val loss in the same budget), read off its evaluation curve by linear interpolation. The table
gives ranges over rounds; ``uptime`` is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

# The presets the ablation starts from, as they were before the recipe (GPT-2 architecture,
# AdamW): tinyshakespeare's two-minute preset and the quickstart. max_time is set per budget.
BASES: dict[str, dict[str, Any]] = {
    "shakespeare": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=3800,
                        learning_rate=5e-3, min_lr=5e-4, warmup_iters=50, beta2=0.99, weight_decay=0.1,
                        dropout=0.0, tokenizer="char", eval_iters=20),
    "stdlib": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, max_iters=1200,
                   learning_rate=2e-3, min_lr=2e-4, warmup_iters=50, tokenizer="bpe", vocab_size=2048,
                   eval_iters=10, max_corpus_chars=6_000_000),
}
# Each change alone, on top of the base.
CHANGES: dict[str, dict[str, Any]] = {
    "muon": {"optimizer": "muon"},
    "rope": {"pos_emb": "rope"},
    "qk_norm": {"qk_norm": True},
    "relu2": {"mlp_act": "relu2"},
    "untied": {"tie_embeddings": False},
    "zero_init": {"zero_init": True},
    "softcap": {"logit_softcap": 15.0},
    "doc_mask": {"doc_mask": True},
    "fused_adamw": {"fused_adamw": True},
}


def recipe_overrides(corpus: str) -> dict[str, Any]:
    """All the changes together: the settings of the new preset for ``corpus``."""
    from nextoken.train.presets import PRESETS

    preset = PRESETS["shakespeare-char" if corpus == "shakespeare" else "quickstart"]
    return {k: v for k, v in preset.items() if k not in ("max_time", "lr_schedule", "eval_interval")}


def variant_settings(corpus: str, variant: str) -> dict[str, Any]:
    base = dict(BASES[corpus])
    if variant == "baseline":
        return base
    if variant == "recipe":
        return {**base, **recipe_overrides(corpus)}
    if variant == "recipe-adamw":  # the recipe with AdamW for every parameter: Muon's share of the step time
        recipe = {k: v for k, v in recipe_overrides(corpus).items() if not k.startswith("muon_")}
        return {**base, **recipe, "optimizer": "adamw"}
    if variant not in CHANGES:
        raise SystemExit(f"error: --variants: unknown variant {variant!r}; choose from baseline, recipe, "
                         f"recipe-adamw, {', '.join(CHANGES)}")
    return {**base, **CHANGES[variant]}


@torch.no_grad()
def common_val_loss(run_dir: Path, windows: int) -> float:
    """Mean loss of the latest checkpoint over ``windows`` evenly spaced val windows (plain causal)."""
    from nextoken.train.data import TokenData, eval_starts
    from nextoken.train.data import windows as make_windows
    from nextoken.train.run import load_run

    loaded = load_run(run_dir, "latest")
    T = loaded.model.config.block_size
    val = TokenData(run_dir / "data").val
    starts = eval_starts(len(val), T, windows)
    total = 0.0
    for i in range(0, len(starts), 32):
        x, y = make_windows(val, starts[i: i + 32], T)
        total += loaded.model(x, y).loss.item() * len(x)
    return total / len(starts)


def tokens_to_reach(curve: list[tuple[float, int, float]], target: float) -> float | None:
    """Tokens at which the (train s, tokens, val) curve first reaches ``target``, interpolated linearly."""
    for (_, t0, v0), (_, t1, v1) in zip(curve, curve[1:], strict=False):
        if v1 <= target:
            if v0 <= target:
                return float(t0)
            return t0 + (t1 - t0) * (v0 - target) / (v0 - v1)
    return float(curve[0][1]) if curve and curve[0][2] <= target else None


def run_one(corpus: str, variant: str, mode: str, budget: float, data: list[str], threads: int, run_dir: Path,
            evals: int, eval_windows: int) -> dict[str, Any]:
    from nextoken.train.config import TrainConfig
    from nextoken.train.loop import train

    settings = variant_settings(corpus, variant)
    tokens_per_step = settings["batch_size"] * settings["block_size"]
    if mode == "tokens":
        steps = max(1, round(budget / tokens_per_step))
        settings.update(max_iters=steps, lr_decay_iters=steps, max_time=0.0, lr_schedule="steps",
                        eval_interval=max(1, steps // evals))
    else:
        # the decay follows the clock; max_iters only bounds the run. Evaluate about `evals` times,
        # guessing the step count from a conservative 40 ms per 768 tokens.
        guess = max(evals, int(budget / (0.04 * tokens_per_step / 768)))
        settings.update(max_iters=10**7, lr_decay_iters=0, max_time=budget, lr_schedule="time",
                        eval_interval=max(1, guess // evals))
    cfg = TrainConfig(**{**settings, "data": data, "out_dir": str(run_dir), "threads": threads, "progress": False,
                         "tensorboard": False, "sample_tokens": 0, "keep_last": 1})
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    summary = train(cfg, quiet=True)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["train_time"], r["tokens_seen"], r["val_loss"]) for r in records if r["event"] == "eval"]
    return {"corpus": corpus, "variant": variant, "mode": mode, "budget": budget, "steps": summary["steps"],
            "tokens": summary["tokens_seen"], "train_time_s": summary["train_time_s"], "wall_s": wall,
            "tokens_per_s": summary["tokens_per_s"], "val_loss": summary["final_val_loss"],
            "common_val_loss": common_val_loss(run_dir, eval_windows), "params": summary["params"],
            "load_before": load_before, "load_after": os.getloadavg()[0], "curve": curve}


def _range(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return format(lo, fmt) if len(values) == 1 or format(lo, fmt) == format(hi, fmt) else \
        f"{format(lo, fmt)}-{format(hi, fmt)}"


def report(results: list[dict[str, Any]], targets: dict[tuple[str, str], float]) -> str:
    lines = [f"uptime: load average {os.getloadavg()}"]
    for (corpus, mode), target in targets.items():
        rs = [r for r in results if r["corpus"] == corpus and r["mode"] == mode]
        budget = rs[0]["budget"]
        unit = f"{budget:,.0f} tokens" if mode == "tokens" else f"{budget:.0f} s of training"
        rounds = len({r["round"] for r in rs})
        lines += ["", f"{corpus}, budget {unit}; target loss {target:.4f}; {rounds} round(s), ranges over rounds"]
        lines.append(f"{'variant':<12} {'val loss':>15} {'common val':>15} {'d vs base':>10} {'tok/s':>13} "
                     f"{'tokens':>19} {'to target':>19} {'fewer x':>9}")
        base_val = statistics.median(r["val_loss"] for r in rs if r["variant"] == "baseline") \
            if any(r["variant"] == "baseline" for r in rs) else None
        base_tt = [r["to_target"] for r in rs if r["variant"] == "baseline" and r["to_target"]]
        for variant in dict.fromkeys(r["variant"] for r in rs):
            vs = [r for r in rs if r["variant"] == variant]
            med = statistics.median(r["val_loss"] for r in vs)
            delta = f"{med - base_val:+.4f}" if base_val is not None else "-"
            tts = [r["to_target"] for r in vs]
            fewer = "-"
            if base_tt and all(tts):
                fewer = f"{statistics.median(base_tt) / statistics.median(tts):.2f}"
            lines.append(f"{variant:<12} {_range([r['val_loss'] for r in vs], '.4f'):>15} "
                         f"{_range([r['common_val_loss'] for r in vs], '.4f'):>15} {delta:>10} "
                         f"{_range([r['tokens_per_s'] for r in vs], ',.0f'):>13} "
                         f"{_range([r['tokens'] for r in vs], ',.0f'):>19} "
                         f"{_range([r['to_target'] for r in vs], ',.0f') if all(tts) else 'not reached':>19} "
                         f"{fewer:>9}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="+", choices=sorted(BASES), default=sorted(BASES))
    ap.add_argument("--shakespeare", type=Path, default=DEFAULT_SHAKESPEARE, help="tinyshakespeare's text file")
    ap.add_argument("--mode", nargs="+", choices=["tokens", "time"], default=["tokens", "time"])
    ap.add_argument("--tokens", type=float, default=0,
                    help="token budget per run (default: the base preset's own schedule, max_iters x batch x block)")
    ap.add_argument("--budget", type=float, default=0,
                    help="seconds of training per run (default: 120 for shakespeare, 150 for stdlib)")
    ap.add_argument("--variants", nargs="+", default=["baseline", *CHANGES, "recipe"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--evals", type=int, default=16, help="evaluations per run (the curve tokens-to-target reads)")
    ap.add_argument("--eval-windows", type=int, default=400)
    ap.add_argument("--target", type=float, default=0, help="target val loss (default: the baseline's median)")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders under this folder")
    args = ap.parse_args()
    if "shakespeare" in args.corpus and not args.shakespeare.is_file():
        print(f"error: --shakespeare: {args.shakespeare} does not exist", file=sys.stderr)
        return 2
    for v in args.variants:
        variant_settings(args.corpus[0], v)  # unknown names fail before any training
    torch.set_num_threads(args.threads)

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp:
        root = args.keep or Path(tmp)
        for rnd in range(args.rounds):
            for mode in args.mode:
                for corpus in args.corpus:
                    base = BASES[corpus]
                    if mode == "tokens":
                        budget = args.tokens or base["max_iters"] * base["batch_size"] * base["block_size"]
                    else:
                        budget = args.budget or (120.0 if corpus == "shakespeare" else 150.0)
                    data = [str(args.shakespeare)] if corpus == "shakespeare" else []
                    for variant in args.variants:
                        print(f"round {rnd + 1}/{args.rounds} {mode} {corpus} {variant} ...", file=sys.stderr,
                              flush=True)
                        r = run_one(corpus, variant, mode, budget, data, args.threads,
                                    root / f"{corpus}-{mode}-{variant}-{rnd}", args.evals, args.eval_windows)
                        r["round"] = rnd
                        results.append(r)
                        print(f"  val {r['val_loss']:.4f} (common {r['common_val_loss']:.4f}), {r['steps']} steps, "
                              f"{r['tokens']:,} tokens, {r['tokens_per_s']:,.0f} tok/s, load {r['load_before']:.1f}",
                              file=sys.stderr, flush=True)
    targets: dict[tuple[str, str], float] = {}
    for mode in args.mode:
        for corpus in args.corpus:
            base_vals = [r["val_loss"] for r in results
                         if r["corpus"] == corpus and r["mode"] == mode and r["variant"] == "baseline"]
            if args.target:
                targets[(corpus, mode)] = args.target
            elif base_vals:
                targets[(corpus, mode)] = statistics.median(base_vals)
            else:
                targets[(corpus, mode)] = min(r["val_loss"] for r in results
                                              if r["corpus"] == corpus and r["mode"] == mode)
    for r in results:
        r["target"] = targets[(r["corpus"], r["mode"])]
        r["to_target"] = tokens_to_reach(r["curve"], r["target"])
    print(report(results, targets))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

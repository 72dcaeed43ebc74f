"""Presets head to head: val loss against wall time and tokens, in the same run, on the same machine.

    python benchmarks/bench_preset.py                       # old vs new shakespeare-char, both budgets
    python benchmarks/bench_preset.py --presets old-quickstart quickstart --rounds 2
    python benchmarks/bench_preset.py --budget 60 --rounds 2 --threads 1 --mode time

``old-shakespeare-char`` and ``old-quickstart`` are those presets as they were before the training
recipe (GPT-2 architecture, AdamW; ``benchmarks/bench_recipe.py``'s bases); ``quickstart`` and
``old-quickstart`` train on the built-in corpus, every other preset on tinyshakespeare.

Two budgets (``--mode``): ``time``, the preset as a user runs it, with ``max_time`` = the budget
(default: the preset's own) and its own schedule; ``tokens``, the preset's own step budget with no
time limit and the decay over its steps (``--lr-schedule steps``): a figure that does not depend
on the machine's speed. Rounds interleave the presets
(A B A B ...) so a busy neighbour hurts both alike; the table quotes each run and the medians.
Every final checkpoint is then scored by one common evaluation (the same number of evenly
spaced val windows for every model, each at its own context length), so the comparison does
not depend on each preset's ``eval_iters``. The machine's load average is printed beside the
figures: on a shared 2-core box the same run can be several times slower when a neighbour
is busy. Writes ``bench_preset.png`` (val loss against training time and tokens).
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

import numpy as np
import torch

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@torch.no_grad()
def common_val_loss(run_dir: Path, windows: int) -> float:
    """Mean loss of the latest checkpoint over ``windows`` evenly spaced val windows."""
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


def preset_settings(preset: str) -> dict:
    """A preset's settings; ``old-NAME`` is NAME as it was before the recipe."""
    from nextoken.train.presets import PRESETS

    if preset.startswith("old-"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_recipe import BASES

        name = preset.removeprefix("old-")
        old = {"shakespeare-char": dict(BASES["shakespeare"], lr_decay_iters=3800, eval_interval=950, max_time=120.0),
               "quickstart": dict(BASES["stdlib"], eval_interval=300, max_time=150.0)}
        if name not in old:
            raise SystemExit(f"error: --presets: no old version of {name!r}")
        return old[name]
    if preset not in PRESETS:
        raise SystemExit(f"error: --presets: unknown preset {preset!r}")
    return dict(PRESETS[preset])


def run_preset(preset: str, data: Path, budget: float, threads: int, out_dir: Path, eval_windows: int,
               mode: str = "time") -> dict:
    from nextoken.train.config import TrainConfig
    from nextoken.train.loop import train

    settings = preset_settings(preset)
    if mode == "time":
        settings["max_time"] = budget or settings.get("max_time") or 120.0
    else:  # the preset's step budget, decayed over its steps, no clock
        settings.update(max_time=0.0, lr_schedule="steps", lr_decay_iters=settings.get("max_iters", 2000))
    stdlib = preset.removeprefix("old-") == "quickstart"
    cfg = TrainConfig(**{**settings, "data": [] if stdlib else [str(data)], "out_dir": str(out_dir),
                         "threads": threads, "progress": False, "tensorboard": False, "sample_tokens": 0})
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    summary = train(cfg, quiet=True)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["train_time"], r["tokens_seen"], r["val_loss"]) for r in records if r["event"] == "eval"]
    return {"preset": preset, "mode": mode, "params": summary["params"], "steps": summary["steps"],
            "tokens": summary["tokens_seen"], "train_time_s": summary["train_time_s"], "wall_s": wall,
            "tokens_per_s": summary["tokens_per_s"], "val_loss": summary["final_val_loss"],
            "common_val_loss": common_val_loss(out_dir, eval_windows), "stopped_by": summary["stopped_by"],
            "load_before": load_before, "load_after": os.getloadavg()[0], "curve": curve}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    colors = dict(zip(sorted({r["preset"] for r in results}), [f"C{i}" for i in range(10)], strict=False))
    for r in results:
        t, tok, v = zip(*r["curve"], strict=True)
        style = "o-" if r["mode"] == "time" else "s--"
        label = f"{r['preset']} ({r['mode']})"
        a.plot(t, v, style, color=colors[r["preset"]], label=label, alpha=0.8)
        b.plot(np.array(tok) / 1e6, v, style, color=colors[r["preset"]], label=label, alpha=0.8)
    for ax, xlabel in ((a, "training time (s)"), (b, "tokens seen (millions)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss (nats per token)")
        ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
        ax.grid(True, alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys())
    fig.suptitle("val loss within the same budget (time: as run; tokens: the preset's step budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--presets", nargs="+", default=["old-shakespeare-char", "shakespeare-char"])
    ap.add_argument("--mode", nargs="+", choices=["time", "tokens"], default=["time", "tokens"])
    ap.add_argument("--budget", type=float, default=0.0,
                    help="seconds of training per run in --mode time (default: each preset's own max_time)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (2: what the preset was tuned for; 1 is steadier when a neighbour is busy)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of every preset")
    ap.add_argument("--eval-windows", type=int, default=400)
    ap.add_argument("--out", type=Path, default=Path("bench_preset.png"))
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if not args.data.is_file():
        print(f"error: --data: {args.data} does not exist", file=sys.stderr)
        return 2

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-preset-") as tmp:
        for rnd in range(args.rounds):
            for mode in args.mode:
                for preset in args.presets:
                    print(f"round {rnd + 1}/{args.rounds}: {preset} ({mode} budget) ...", file=sys.stderr, flush=True)
                    results.append(run_preset(preset, args.data, args.budget, args.threads,
                                              Path(tmp) / f"{preset}-{mode}-{rnd}", args.eval_windows, mode))
                    r = results[-1]
                    print(f"  val {r['val_loss']:.4f} (common eval {r['common_val_loss']:.4f}) after {r['steps']} "
                          f"steps, {r['tokens']:,} tokens, {r['train_time_s']:.1f}s training / {r['wall_s']:.1f}s wall",
                          file=sys.stderr, flush=True)

    budget = f"{args.budget:.0f}s" if args.budget else "each preset's own max_time"
    print(f"\ntime budget: {budget} of training per run; token budget: each preset's max_iters; "
          f"{args.threads} thread(s), {args.rounds} round(s); load average {os.getloadavg()}")
    head = (f"{'preset':<22} {'budget':>6} {'params':>8} {'steps':>6} {'tokens':>10} {'train s':>8} {'wall s':>7} "
            f"{'tok/s':>7} {'val':>7} {'common':>7} {'load':>5}  curve: (train s, val)")
    print(head)
    for r in results:
        curve = " ".join(f"({t:.0f},{v:.2f})" for t, _, v in r["curve"])
        print(f"{r['preset']:<22} {r['mode']:>6} {r['params'] / 1e6:>7.2f}M {r['steps']:>6} {r['tokens']:>10,} "
              f"{r['train_time_s']:>8.1f} {r['wall_s']:>7.1f} {r['tokens_per_s']:>7,.0f} {r['val_loss']:>7.4f} "
              f"{r['common_val_loss']:>7.4f} {r['load_before']:>5.2f}  {curve}")
    if args.rounds > 1:
        print("\nmedians")
        for mode in args.mode:
            for preset in args.presets:
                rs = [r for r in results if r["preset"] == preset and r["mode"] == mode]
                print(f"{preset:<22} {mode:>6} val {statistics.median(r['val_loss'] for r in rs):.4f}  common "
                      f"{statistics.median(r['common_val_loss'] for r in rs):.4f}  tokens "
                      f"{statistics.median(r['tokens'] for r in rs):,.0f}  train s "
                      f"{statistics.median(r['train_time_s'] for r in rs):.1f}")
    plot(results, args.out)
    print(f"\nwrote {args.out}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    assert all(math.isfinite(r["val_loss"]) for r in results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput and quality on tinyshakespeare (character level), against baselines in the same run.

1. nextoken's loop with the ``nanogpt-cpu`` preset (nanoGPT's README CPU recipe shape: 4 layers,
   4 heads, 128 wide, context 64, batch 12, 2000 iterations, lr 1e-3 decayed to 1e-4).
2. The seed lesson's Mini-GPT (post-LN, nn.MultiheadAttention, 2 layers, 64 wide, constant lr 5e-3,
   batch 16) trained for the same wall time as (1) on the same windows and split.

Both report tokens/s and the val loss reached (the same 10% split nanoGPT uses). Anchors measured
on this machine class: nanoGPT's own train.py runs the recipe at ~15k tokens/s (2000 iterations in
~100 s) and reaches val 1.886; the seed-style model reaches ~1.79 in the same time.

    python benchmarks/bench_train.py [--data ../shared/data/tinyshakespeare.txt] [--iters 2000] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_baseline import SeedMiniGPT  # noqa: E402

from nextoken.train.config import resolve_train_config  # noqa: E402
from nextoken.train.data import TokenData, WindowSampler, eval_starts, windows  # noqa: E402
from nextoken.train.loop import train  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@torch.no_grad()
def seed_val_loss(model: SeedMiniGPT, val: np.ndarray, block: int, n: int = 240) -> float:
    model.eval()
    starts = eval_starts(len(val), block, n)
    losses = [model.loss(*windows(val, starts[i: i + 12], block)).item() for i in range(0, n, 12)]
    model.train()
    return float(np.mean(losses))


def run_seed(data: TokenData, vocab: int, seconds: float, block: int = 64) -> dict:
    torch.manual_seed(1337)
    model = SeedMiniGPT(vocab, max_len=block)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    sampler = WindowSampler(data.train, block, 16, seed=1337)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, y = sampler.next_batch()
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    elapsed = time.perf_counter() - t0
    return {"steps": steps, "time": elapsed, "tokens_per_s": steps * 16 * block / elapsed,
            "val_loss": seed_val_loss(model, data.val, block)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not Path(args.data).is_file():
        sys.exit(f"skip: {args.data} is absent")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve_train_config("nanogpt-cpu", None, {
            "data": [args.data], "out_dir": f"{tmp}/run", "max_iters": args.iters, "lr_decay_iters": args.iters,
            "progress": False, "tensorboard": False, "sample_tokens": 0, "threads": args.threads})
        t0 = time.perf_counter()
        ours = train(cfg, quiet=True)
        wall = time.perf_counter() - t0
        data = TokenData(Path(tmp) / "run" / "data")
        seed = run_seed(data, ours["vocab_size"], ours["train_time_s"])
    print(f"{'variant':<34}{'steps':>7}{'train s':>9}{'tok/s':>9}{'val loss':>10}")
    print(f"{'nextoken nanogpt-cpu preset':<34}{ours['steps']:>7}{ours['train_time_s']:>9.1f}"
          f"{ours['tokens_per_s']:>9,.0f}{ours['final_val_loss']:>10.4f}")
    print(f"{'seed Mini-GPT, same wall time':<34}{seed['steps']:>7}{seed['time']:>9.1f}"
          f"{seed['tokens_per_s']:>9,.0f}{seed['val_loss']:>10.4f}")
    print(f"ratio tokens/s nextoken / seed: {ours['tokens_per_s'] / seed['tokens_per_s']:.2f}x; "
          f"val loss {ours['final_val_loss']:.4f} vs {seed['val_loss']:.4f} (anchors: nanoGPT ~15k tok/s, val 1.886); "
          f"wall incl. data prep and evals {wall:.1f}s; log(vocab) = {math.log(ours['vocab_size']):.3f}")


if __name__ == "__main__":
    main()

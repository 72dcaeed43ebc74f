"""Training throughput and quality on tinyshakespeare (character level), against baselines in the same run.

1. nextoken's loop with the ``nanogpt-cpu`` preset (nanoGPT's README CPU recipe shape: 4 layers,
   4 heads, 128 wide, context 64, batch 12, 2000 iterations, lr 1e-3 decayed to 1e-4), as it is
   and with the systems levers (``--variants``: fused AdamW, torch.compile, the recipe's
   architecture and Muon at the same shape, so the options are seen not to eat the gain).
2. With ``--nanogpt PATH`` (a checkout of karpathy/nanoGPT; nothing is fetched): nanoGPT's own
   ``train.py`` on its README CPU recipe, run on a copy of the checkout whose
   ``data/shakespeare_char/{train,val}.bin, meta.pkl`` this script writes from the same text
   exactly as nanoGPT's ``prepare.py`` does (sorted characters, first 90% train). Its tokens/s
   counts every iteration it times except the evaluation ones (iteration 0 and multiples of
   its ``eval_interval``), as nextoken's excludes evaluation. Without ``--nanogpt`` it is skipped.
3. Without ``--nanogpt``: the seed lesson's Mini-GPT (post-LN, nn.MultiheadAttention, 2 layers,
   64 wide, constant lr 5e-3, batch 16) for the same wall time as (1), on the same windows.

Runs are interleaved (nanoGPT, then each nextoken variant, round after round) and the table gives
each run, the medians, and the ratio to nanoGPT's median; the load average is printed beside them.

    python benchmarks/bench_train.py --nanogpt /tmp/nanogpt --rounds 2 --threads 2
    python benchmarks/bench_train.py [--data ../shared/data/tinyshakespeare.txt] [--iters 2000]
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_baseline import SeedMiniGPT  # noqa: E402

from nextoken.train.data import TokenData, WindowSampler, eval_starts, windows  # noqa: E402
from nextoken.train.loop import train  # noqa: E402
from nextoken.train.settings import resolve_train_config  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
# nanoGPT README's CPU recipe, verbatim (out_dir added); eval_interval comes from its config file (250).
NANOGPT_FLAGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                 "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                 "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_EVAL_INTERVAL = 250
# nextoken variants at the nanogpt-cpu shape: name -> overrides of the preset
VARIANTS: dict[str, dict[str, Any]] = {
    "preset": {},
    "fused": {"fused_adamw": True},
    "fused+compile": {"fused_adamw": True, "compile": True},
    "recipe-arch": {"fused_adamw": True, "pos_emb": "rope", "qk_norm": True, "mlp_act": "relu2",
                    "tie_embeddings": False, "zero_init": True, "logit_softcap": 15.0},
    "recipe-arch+muon": {"fused_adamw": True, "pos_emb": "rope", "qk_norm": True, "mlp_act": "relu2",
                         "tie_embeddings": False, "zero_init": True, "logit_softcap": 15.0, "optimizer": "muon"},
    # Two processes of one thread each (torchrun, gloo), 6 windows each: the same 768 tokens per step.
    # Intra-op threading splits each small matmul in two; two ranks each run whole ones and
    # overlap their Python overhead, at the price of one gradient all-reduce per step.
    "ddp-2x1": {"fused_adamw": True, "batch_size": 6, "torchrun": 2},
}


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


def prepare_nanogpt(checkout: Path, text_path: Path, workdir: Path) -> Path:
    """A copy of the checkout with data/shakespeare_char prepared as its prepare.py would (no download)."""
    dst = workdir / "nanogpt"
    shutil.copytree(checkout, dst, ignore=shutil.ignore_patterns(".git", "out*", "*.bin", "*.pkl", "assets"))
    text = text_path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(text)
    data_dir = dst / "data" / "shakespeare_char"
    data_dir.mkdir(parents=True, exist_ok=True)
    np.array([stoi[c] for c in text[: int(n * 0.9)]], dtype=np.uint16).tofile(data_dir / "train.bin")
    np.array([stoi[c] for c in text[int(n * 0.9):]], dtype=np.uint16).tofile(data_dir / "val.bin")
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return dst


def run_nanogpt(tree: Path, threads: int, iters: int, out_dir: Path) -> dict[str, Any]:
    flags = [f if not f.startswith(("--max_iters=", "--lr_decay_iters=")) else f.split("=")[0] + f"={iters}"
             for f in NANOGPT_FLAGS]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", *flags, f"--out_dir={out_dir}"], cwd=tree, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"nanoGPT's train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    dts = {int(m.group(1)): float(m.group(2)) / 1e3
           for m in re.finditer(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", proc.stdout, re.M)}
    timed = [dt for it, dt in dts.items() if it % NANOGPT_EVAL_INTERVAL]  # evaluation iterations left out
    vals = [float(v) for v in re.findall(r"^step \d+: train loss [\d.]+, val loss ([\d.]+)", proc.stdout, re.M)]
    return {"variant": "nanoGPT train.py", "steps": len(dts) - 1, "train_time_s": sum(timed),
            "tokens_per_s": len(timed) * 12 * 64 / sum(timed), "val_loss": vals[-1], "wall_s": wall,
            "load_before": load_before}


def run_ours(variant: str, data: str, threads: int, iters: int, out_dir: Path) -> dict[str, Any]:
    overrides = dict(VARIANTS[variant])
    ranks = overrides.pop("torchrun", 0)
    cfg = resolve_train_config("nanogpt-cpu", None, {
        "data": [data], "out_dir": str(out_dir), "max_iters": iters, "lr_decay_iters": iters, "progress": False,
        "tensorboard": False, "sample_tokens": 0, "threads": 1 if ranks else threads, **overrides})
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    s = _torchrun_train(cfg, ranks) if ranks else train(cfg, quiet=True)
    return {"variant": f"nextoken {variant}", "steps": s["steps"], "train_time_s": s["train_time_s"],
            "tokens_per_s": s["tokens_per_s"], "val_loss": s["final_val_loss"], "wall_s": time.perf_counter() - t0,
            "load_before": load_before, "vocab_size": s["vocab_size"]}


def _torchrun_train(cfg: Any, ranks: int) -> dict[str, Any]:
    """``nextoken train`` under torchrun with ``cfg``'s settings as flags; returns its summary.json."""
    import json

    flags = []
    for name, value in cfg.to_dict().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, *map(str, value)] if value else []
        else:
            flags += [flag, str(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(ranks), "-m", "nextoken", "train", *flags], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((Path(cfg.out_dir) / "summary.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--nanogpt", type=Path, default=None, help="a karpathy/nanoGPT checkout (compared when given)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    if not Path(args.data).is_file():
        print(f"skip: {args.data} is absent")
        return 0
    if args.nanogpt is not None and not (args.nanogpt / "train.py").is_file():
        print(f"error: --nanogpt: {args.nanogpt} holds no train.py (a karpathy/nanoGPT checkout)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tree = prepare_nanogpt(args.nanogpt, Path(args.data), Path(tmp)) if args.nanogpt else None
        for rnd in range(args.rounds):
            if tree is not None:
                print(f"round {rnd + 1}: nanoGPT train.py ...", file=sys.stderr, flush=True)
                results.append(run_nanogpt(tree, args.threads, args.iters, Path(tmp) / f"ng-{rnd}"))
            for variant in args.variants:
                print(f"round {rnd + 1}: nextoken {variant} ...", file=sys.stderr, flush=True)
                results.append(run_ours(variant, args.data, args.threads, args.iters, Path(tmp) / f"{variant}-{rnd}"))
        if tree is None:
            first = results[0]  # the seed model trains as long as the first nextoken run, on its windows
            data = TokenData(Path(tmp) / f"{args.variants[0]}-0" / "data")
            seed = run_seed(data, first["vocab_size"], first["train_time_s"])
            results.append({"variant": "seed Mini-GPT, same wall time", "steps": seed["steps"],
                            "train_time_s": seed["time"], "tokens_per_s": seed["tokens_per_s"],
                            "val_loss": seed["val_loss"], "wall_s": seed["time"], "load_before": os.getloadavg()[0]})

    print(f"\n{args.iters} iterations of nanoGPT's CPU recipe shape, {args.threads} thread(s), {args.rounds} round(s); "
          f"load average now {os.getloadavg()}")
    print(f"{'run':<34}{'steps':>7}{'train s':>9}{'tok/s':>9}{'val loss':>10}{'load':>6}")
    for r in results:
        print(f"{r['variant']:<34}{r['steps']:>7}{r['train_time_s']:>9.1f}{r['tokens_per_s']:>9,.0f}"
              f"{r['val_loss']:>10.4f}{r['load_before']:>6.1f}")
    names = list(dict.fromkeys(r["variant"] for r in results))
    ref = statistics.median(r["tokens_per_s"] for r in results if r["variant"] == names[0])
    print(f"\nmedian tokens/s, and the ratio to {names[0]}'s")
    for name in names:
        rs = [r for r in results if r["variant"] == name]
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        print(f"{name:<34}{tps:>9,.0f}  x{tps / ref:.2f}   val {statistics.median(r['val_loss'] for r in rs):.4f}"
              f"   (tok/s {min(r['tokens_per_s'] for r in rs):,.0f}-{max(r['tokens_per_s'] for r in rs):,.0f})")
    vocab = next((r["vocab_size"] for r in results if "vocab_size" in r), 65)
    print(f"log(vocab) = {math.log(vocab):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

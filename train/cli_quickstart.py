"""`nextoken quickstart`: train a small model on the built-in corpus, then show what it writes."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    parser.add_argument("--max-time", type=float, default=None,
                        help="seconds of training (default: the quickstart preset's 150)")
    parser.add_argument("--max-iters", type=int, default=None)
    parser.add_argument("--prompt", default="def ", help="text to continue after training")
    parser.add_argument("--max-new-tokens", type=int, default=200)


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    import torch

    from nextoken.train.loop import train
    from nextoken.train.run import load_run
    from nextoken.train.settings import resolve_train_config
    from nextoken.train.tokenizer import EOT

    out = Path(args.out_dir)
    if (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")  # the quickstart always starts fresh in its own folder
    cfg = resolve_train_config("quickstart", None, {"out_dir": str(out), "max_time": args.max_time,
                                                     "max_iters": args.max_iters})
    summary = train(cfg)
    loaded = load_run(out, "best")
    tok = loaded.tokenizer
    ids = [tok.token_to_id(EOT)] + tok.encode(args.prompt, add_special_tokens=False).ids
    gen = torch.Generator().manual_seed(0)
    row = loaded.model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=0.8, top_k=50,
                                generator=gen)[0].tolist()
    print(f"\n=== {summary['params'] / 1e6:.2f}M-parameter model, val loss {summary['best_val_loss']:.3f} "
          f"(log vocab = {torch.tensor(float(summary['vocab_size'])).log().item():.2f}); run folder: {out} ===")
    print(tok.decode(row[1:]))
    print(f"\nnext: nextoken generate {out} --prompt 'import '   |   nextoken export {out} --out artifacts/quickstart")
    return 0

"""`nextoken generate RUN`: sample text from a trained run with the KV cache."""

from __future__ import annotations

import argparse
import sys


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)


def check_sampling_flags(args: argparse.Namespace) -> None:
    from nextoken.errors import UserError

    if args.max_new_tokens < 1:
        raise UserError(f"must be >= 1, got {args.max_new_tokens}", flag="--max-new-tokens")
    if args.temperature < 0:
        raise UserError(f"must be >= 0, got {args.temperature}", flag="--temperature")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"must be >= 1, got {args.top_k}", flag="--top-k")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"must be in (0, 1], got {args.top_p}", flag="--top-p")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder written by `nextoken train`")
    parser.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--checkpoint", default="best", help="best, latest, a step, or a checkpoint folder")
    parser.add_argument("--device", default="cpu")
    add_sampling_flags(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from nextoken.errors import UserError
    from nextoken.train.run import load_run, resolve_device
    check_sampling_flags(args)
    if args.num_samples < 1:
        raise UserError(f"must be >= 1, got {args.num_samples}", flag="--num-samples")
    device = resolve_device(args.device)
    loaded = load_run(args.run, args.checkpoint, device=str(device))
    tok = loaded.tokenizer
    ids = tok.encode(args.prompt, add_special_tokens=False).ids if args.prompt else []
    ids = [loaded.eot_id] + ids  # every document starts after an end-of-text token
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed if args.seed is not None else torch.seed())
    x = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    out = loaded.model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, eos_token_id=loaded.eot_id, generator=gen)
    for i, row in enumerate(out.tolist()):
        text = tok.decode(row[1:])
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(text + "\n")
    return 0

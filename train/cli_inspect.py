"""`nextoken inspect RUN`: the next-token distribution after a prompt, and per-token loss of a text."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder written by `nextoken train`")
    parser.add_argument("--prompt", default="", help="text whose next token to show (default: start of a document)")
    parser.add_argument("--top-k", type=int, default=10, help="rows per table (default: 10)")
    parser.add_argument("--steps", type=int, default=1,
                        help="continue for this many tokens, one table per step (default: 1)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="how the continuation picks tokens: 0 = greedy (default), >0 = sample; "
                             "the tables always show the model's own distribution")
    parser.add_argument("--seed", type=int, default=None, help="seed for a sampled continuation")
    parser.add_argument("--text", default=None,
                        help="instead of a prompt: score this text token by token (loss, probability)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--checkpoint", default="best", help="best, latest, a step, or a checkpoint folder")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from nextoken.train import probe as I
    from nextoken.train.run import load_run, resolve_device

    loaded = load_run(args.run, args.checkpoint, device=str(resolve_device(args.device)))
    if args.text is not None:
        result = I.text_loss(loaded.model, loaded.tokenizer, args.text, eot_id=loaded.eot_id)
        sys.stdout.write(json.dumps(asdict(result), indent=2) + "\n" if args.json else I.format_text_loss(result))
        return 0
    _, n_unknown = I.encode_document(loaded.tokenizer, args.prompt, loaded.eot_id)
    if n_unknown:
        print(f"note: {n_unknown} piece(s) of the prompt were never seen in training (<unk>); the model's "
              "predictions after them mean little", file=sys.stderr)
    steps = I.next_token_steps(loaded.model, loaded.tokenizer, args.prompt, top_k=args.top_k, steps=args.steps,
                               temperature=args.temperature, seed=args.seed, eot_id=loaded.eot_id)
    if args.json:
        sys.stdout.write(json.dumps([asdict(s) for s in steps], indent=2) + "\n")
    else:
        sys.stdout.write(I.format_steps(steps))
    return 0

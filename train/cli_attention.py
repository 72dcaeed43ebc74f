"""`nextoken attention RUN --text ... --out attn.png`: attention heatmaps, one row per layer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder written by `nextoken train`")
    parser.add_argument("--text", required=True, help="the text whose attention to plot")
    parser.add_argument("--out", default="attention.png", help="PNG to write (default: attention.png)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, metavar="L",
                        help="only these layers (0-based; default: all)")
    parser.add_argument("--no-grid", dest="grid", action="store_false",
                        help="only the head-averaged map per layer, not every head")
    parser.add_argument("--checkpoint", default="best", help="best, latest, a step, or a checkpoint folder")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from nextoken.errors import UserError
    from nextoken.train.plots import plot_attention
    from nextoken.train.probe import attention_maps
    from nextoken.train.run import load_run, resolve_device

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"must name a .png file, got {args.out!r}", flag="--out")
    if not out.parent.is_dir():
        raise UserError(f"folder {out.parent} does not exist", flag="--out")
    loaded = load_run(args.run, args.checkpoint, device=str(resolve_device(args.device)))
    result = attention_maps(loaded.model, loaded.tokenizer, args.text, args.layers, eot_id=loaded.eot_id)
    plot_attention(result.maps, result.labels, out, grid=args.grid, layers=result.layers)
    n_head = result.maps[0].shape[0]
    print(f"wrote {out}: {len(result.layers)} layer(s) x {n_head} head(s), {len(result.labels)} positions "
          f"(the first is the <|endoftext|> separator)", file=sys.stderr)
    return 0

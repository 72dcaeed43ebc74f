"""`nextoken runs RUN_DIR...`: the run page in a browser (loss curves, samples, attention maps).

A small web server of its own (FastAPI on uvicorn, no model loaded, no LitServe), so it can
watch a run while it trains: the page re-reads the run folder every few seconds. Loss curves
and samples need only the run folder's JSON files; attention maps need the ``[train]`` extra.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", metavar="RUN_DIR", nargs="+",
                        help="run folders written by `nextoken train`, or folders holding them (e.g. runs/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--api-key-env", default=None, metavar="NAME",
                        help="environment variable holding an API key the page's data routes then need")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import uvicorn

    from nextoken.errors import UserError
    from nextoken.runs.app import build_app
    from nextoken.runs.routes import find_runs

    if not 1 <= args.port <= 65535:
        raise UserError(f"must be in 1..65535, got {args.port}", flag="--port")
    for p in args.paths:
        if not Path(p).is_dir():
            raise UserError(f"{p} is not a folder", flag="RUN_DIR")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"environment variable {args.api_key_env} is not set or empty", flag="--api-key-env")
    runs = find_runs([Path(p) for p in args.paths])
    names = ", ".join(runs) if runs else "none yet (the page lists runs as they appear)"
    print(f"run page for {names} on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(build_app(args.paths, api_key), host=args.host, port=args.port, log_level=args.log_level)
    return 0

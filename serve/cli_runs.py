"""`nextoken runs RUN_DIR...`: the run page in a browser (loss curves, samples, attention maps).

A small web server of its own (FastAPI on uvicorn, no model loaded, no LitServe), so it can
watch a run while it trains: the page re-reads the run folder every few seconds. Loss curves
and samples need only the run folder's JSON files; attention maps need the ``[train]`` extra.
"""

from __future__ import annotations

import argparse

PAGES = {"/": "runs.html", "/runs": "runs.html"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", metavar="RUN_DIR", nargs="+",
                        help="run folders written by `nextoken train`, or folders holding them (e.g. runs/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--api-key-env", default=None, metavar="NAME",
                        help="environment variable holding an API key the page's data routes then need")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))


def build_app(paths: list[str], api_key: str | None = None) -> object:
    """The run page's app over ``paths`` (run folders or folders of runs), re-scanned per request."""
    from pathlib import Path

    from fastapi import FastAPI

    from nextoken.serve.http.middleware import ApiKeyMiddleware, install_openai_errors
    from nextoken.serve.http.playground import StaticPages
    from nextoken.serve.runs import RunRoutes, find_runs

    folders = [Path(p) for p in paths]
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    install_openai_errors(app)
    RunRoutes(lambda: find_runs(folders), context="runs", threads=0).mount(app)
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(StaticPages, api_key_required=api_key is not None, pages=PAGES)  # outermost: see playground
    return app


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import uvicorn

    from nextoken.errors import UserError
    from nextoken.serve.runs import find_runs

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

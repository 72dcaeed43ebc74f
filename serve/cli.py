"""`nextoken serve ARTIFACT_DIR`: an OpenAI-compatible server with continuous batching."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="ARTIFACT_DIR",
                        help="artifact folder written by `nextoken export`, or a models folder's `current` pointer "
                             "(new versions published there are loaded without dropping requests)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together")
    parser.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond the batch (then 429)")
    parser.add_argument("--api-key-env", default=None, metavar="NAME",
                        help="environment variable holding the API key; every endpoint but /health then needs it")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = auto)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds in-flight requests may take to finish after SIGTERM/SIGINT")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))


def run(args: argparse.Namespace) -> int:
    import os

    from nextoken.errors import UserError
    from nextoken.export.artifact import ArtifactError, load_artifact
    from nextoken.serve.models import resolve_artifact_dir
    from nextoken.serve.server import ServeOptions, serve

    if not 1 <= args.port <= 65535:
        raise UserError(f"must be in 1..65535, got {args.port}", flag="--port")
    if args.host not in ("127.0.0.1", "0.0.0.0", "::"):
        raise UserError(f"must be 127.0.0.1, 0.0.0.0 or ::, got {args.host!r}", flag="--host")
    if args.max_batch_size < 1:
        raise UserError(f"must be >= 1, got {args.max_batch_size}", flag="--max-batch-size")
    if args.max_queue < 0:
        raise UserError(f"must be >= 0, got {args.max_queue}", flag="--max-queue")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        raise UserError(f"environment variable {args.api_key_env} is not set or empty", flag="--api-key-env")
    try:
        load_artifact(resolve_artifact_dir(args.artifact))
    except (ArtifactError, OSError) as e:
        raise UserError(str(e), flag="ARTIFACT_DIR") from None
    return serve(ServeOptions(args.artifact, args.host, args.port, args.max_batch_size, args.max_queue,
                              args.api_key_env, args.device, args.threads, args.drain_timeout, args.log_level))

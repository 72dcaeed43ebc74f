"""`nextoken serve ARTIFACT_DIR`: the model server, with the served model's training run at ``/runs``.

The flags (one per ``ServeConfig`` field) and everything the server does are ``nextoken.serve``'s.
What this command adds is the run viewer (``nextoken.runs``), which the server does not know: it is
handed to the launcher as a mount. Torch-free, like the server.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nextoken.serve.config import add_arguments as serve_arguments

    serve_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from nextoken.runs.app import served_run
    from nextoken.serve.config import from_args
    from nextoken.serve.launcher import serve

    config = from_args(args).validate()
    # The frontend wants a key exactly when --api-key-env is set (validate() made sure it holds one).
    return serve(config, mounts=[served_run(api_key_required=bool(config.api_key_env))])

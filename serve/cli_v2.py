"""`nextoken serve ARTIFACT_DIR`: an OpenAI-compatible server with continuous batching (flags from ServeConfig)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nextoken.serve.config import add_arguments as config_arguments

    config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from nextoken.serve.config import from_args
    from nextoken.serve.launcher import serve

    return serve(from_args(args).validate())


if __name__ == "__main__":
    from nextoken.errors import UserError

    p = argparse.ArgumentParser(prog="nextoken serve")
    add_arguments(p)
    try:
        sys.exit(run(p.parse_args()))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

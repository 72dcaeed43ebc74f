"""`nextoken serve ARTIFACT_DIR`: an OpenAI-compatible server with continuous batching (flags from ServeConfig)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nextoken.serve.config import add_arguments as config_arguments

    config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from nextoken.serve.config import from_args
    from nextoken.serve.launcher import serve

    return serve(from_args(args).validate())


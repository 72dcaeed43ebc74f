"""`nextoken serve ARTIFACT_DIR | HF_DIR`: the model server, with the served model's training run at ``/runs``.

The flags (one per ``ServeConfig`` field) and everything the server does are ``nextoken.serve``'s.
What this command adds is the run viewer (``nextoken.runs``), which the server does not know: it is
handed to the launcher as a mount, and a Hugging Face model folder in place of an artifact, exported
once into a cache (``export.cache``) as ``vllm serve`` takes a folder. Torch-free, like the server,
unless a Hugging Face folder is to be exported.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nextoken.serve.config import add_arguments as serve_arguments

    serve_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from nextoken.export.cache import is_hf_folder
    from nextoken.runs.app import served_run
    from nextoken.serve.config import from_args
    from nextoken.serve.launcher import serve

    if args.artifact_dir and is_hf_folder(Path(args.artifact_dir)):
        args.artifact_dir = str(_exported(Path(args.artifact_dir)))
    config = from_args(args).validate()
    # The frontend wants a key exactly when --api-key-env is set (validate() made sure it holds one).
    return serve(config, mounts=[served_run(api_key_required=bool(config.api_key_env))])


def _exported(folder: Path) -> Path:
    """The cached artifact of a Hugging Face folder (exported now on its first start)."""
    import importlib.util
    import sys

    from nextoken.errors import UserError

    if importlib.util.find_spec("torch") is None:
        raise UserError(f"{folder} is a Hugging Face model folder; serving it exports it to ONNX first, which needs "
                        "PyTorch: pip install 'nextoken[train]' (or export it where PyTorch is: nextoken export "
                        f"{folder} --out ART, then serve ART here)", flag="ARTIFACT_DIR")
    from nextoken.export.cache import exported_folder

    return exported_folder(folder, log=lambda msg: print(msg, file=sys.stderr, flush=True))

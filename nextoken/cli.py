"""The `nextoken` command: one entry point, one subcommand per job.

Subcommands are registered by module path and imported only when chosen, so
`nextoken serve` never imports PyTorch and `nextoken --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Any

from nextoken import __version__
from nextoken.errors import UserError

# name -> (module that defines `add_arguments(parser)` and `run(args)`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("nextoken.train.cli_train", "train a model on text files (or the built-in corpus)"),
    "generate": ("nextoken.train.cli_generate", "sample text from a trained run"),
    "quickstart": ("nextoken.train.cli_quickstart", "train a small model on the built-in corpus, then generate"),
    "inspect": ("nextoken.train.cli_inspect", "show the next-token distribution and per-token loss"),
    "attention": ("nextoken.train.cli_attention", "plot attention maps for a text"),
    "export": ("nextoken.export.cli", "export a run: ONNX artifact (default), Hugging Face folder or GGUF file"),
    "serve": ("nextoken.cli_serve", "serve an artifact over an OpenAI-compatible HTTP API"),
    "retrain": ("nextoken.cli_retrain", "train, export, verify and publish a new model version"),
    "models": ("nextoken.cli_models", "list the published model versions"),
    "eval": ("nextoken.cli_eval", "loss, perplexity and bits per byte of a run or artifact on held-out text"),
    "up": ("nextoken.cli_up", "train, export, publish and serve a model with the browser playground"),
    "runs": ("nextoken.cli_runs", "show training runs in a browser: loss curves, samples, attention maps"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, help_) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_)
    return out


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = argparse.ArgumentParser(prog="nextoken", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nextoken {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module, help_) in _available().items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(p)
        modules[name] = module
    return parser, modules


def parse_args(argv: list[str]) -> tuple[Any, argparse.Namespace | None]:
    """The chosen subcommand's module and its parsed arguments (None: no subcommand, help was printed).

    argparse exits (status 2, with a usage line) on a flag it does not know.
    """
    # Build only the chosen subcommand's parser: importing every CLI module would be slow.
    if argv and argv[0] in COMMANDS and not argv[0].startswith("-"):
        name = argv[0]
        module_name, help_ = COMMANDS[name]
        parser = argparse.ArgumentParser(prog=f"nextoken {name}", description=help_)
        module = importlib.import_module(module_name)
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        args.command = name
        return module, args
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return None, None
    return importlib.import_module(COMMANDS[args.command][0]), args


# Modules of the [train] extra: `pip install .` (serving only) leaves them out.
TRAIN_EXTRA_MODULES = {"torch", "safetensors", "matplotlib", "tensorboard", "yaml", "onnx", "onnxscript"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        module, args = parse_args(argv)
        if module is None:
            return 0
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        print(f"error: `nextoken {argv[0]}` needs the training extra (no module named {e.name!r}): "
              "pip install 'nextoken[train]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

"""`nextoken up [--data FILES]`: train, export with the parity check, publish, and serve with the playground.

Training flags are `nextoken train`'s (one per TrainConfig field, over the ``quickstart`` preset
by default) except the run folder and resume: `up` always trains from scratch into --out-dir.
"""

from __future__ import annotations

import argparse

from nextoken.train.cli_train import add_train_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nextoken.train.presets import PRESETS

    parser.add_argument("--preset", choices=sorted(PRESETS), default="quickstart",
                        help="named starting point for training (default: quickstart, about 150 s on a laptop CPU)")
    parser.add_argument("--config", help="TOML or YAML file of training settings; flags override it")
    parser.add_argument("--out-dir", default="runs/up", metavar="DIR",
                        help="run folder (default: runs/up; a folder an earlier `up` made is cleared first)")
    parser.add_argument("--artifact-dir", default="artifacts/up", metavar="DIR",
                        help="where the exported artifact is written (default: artifacts/up)")
    parser.add_argument("--models-dir", default="models", metavar="DIR",
                        help="models folder the artifact is published into as the next version (default: models)")
    parser.add_argument("--name", default=None, help="model name, served as NAME:VERSION (default: the run folder's)")
    parser.add_argument("--keep", type=int, default=5, help="versions kept in the models folder (default: 5)")
    parser.add_argument("--no-serve", dest="serve", action="store_false",
                        help="stop after publishing (for scripts and CI)")
    parser.add_argument("--host", default="127.0.0.1", help="address the server binds (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=32, help="sequences the server decodes together")
    parser.add_argument("--api-key-env", default=None, metavar="NAME",
                        help="environment variable holding the API key the server then requires")
    add_train_flags(parser, skip=("out_dir", "resume"))


def run(args: argparse.Namespace) -> int:
    from nextoken.train.cli_train import overrides_from_args
    from nextoken.up import UpOptions, up

    # --out-dir is ours (the run folder); every other TrainConfig field given as a flag overrides training.
    overrides = {k: v for k, v in overrides_from_args(args).items() if k not in ("out_dir", "resume")}
    result = up(UpOptions(preset=args.preset, config=args.config, overrides=overrides,
                          out_dir=args.out_dir, artifact_dir=args.artifact_dir, models_dir=args.models_dir,
                          name=args.name, keep=args.keep, serve=args.serve, host=args.host, port=args.port,
                          api_key_env=args.api_key_env, max_batch_size=args.max_batch_size))
    return result.server_exit or 0

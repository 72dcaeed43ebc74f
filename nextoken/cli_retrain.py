"""`nextoken retrain --models-dir MODELS`: train, export, verify parity and publish a new model version.

Training flags are `nextoken train`'s (one per TrainConfig field) except the run folder and
resume, which the job chooses itself.
"""

from __future__ import annotations

import argparse

from nextoken.train.cli_train import add_train_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nextoken.train.presets import PRESETS

    parser.add_argument("--models-dir", default="models", metavar="DIR",
                        help="models folder: versions are published as DIR/<version>/ and DIR/current points at "
                             "the newest (default: models)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--from-current", dest="mode", action="store_const", const="current",
                       help="continue the current version's checkpoint (on --data when given)")
    start.add_argument("--from-scratch", dest="mode", action="store_const", const="scratch",
                       help="train a new model (default when the models folder has no current version)")
    parser.set_defaults(mode="auto")
    parser.add_argument("--max-iters", type=int, default=None,
                        help="training steps in this job; when continuing, added to the checkpoint's step "
                             "(default: the preset's, or the continued run's max_iters)")
    parser.add_argument("--keep", type=int, default=5, help="versions kept in the models folder (default: 5); "
                                                            "the current one is never removed")
    parser.add_argument("--work-dir", default=None, metavar="DIR",
                        help="empty folder for the run and the artifact, kept afterwards (default: a temporary "
                             "folder, removed)")
    parser.add_argument("--name", default=None,
                        help="model name, served as NAME:VERSION (default: the current version's, else nextoken)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named starting point for --from-scratch")
    parser.add_argument("--config", help="TOML or YAML file of training settings; flags override it")
    parser.add_argument("--quiet", action="store_true", help="no progress output, only errors and the result")
    add_train_flags(parser, skip=("out_dir", "resume", "max_iters"))


def run(args: argparse.Namespace) -> int:
    from nextoken.retrain import retrain
    from nextoken.train import loop  # noqa: F401  (the training extra: missing, `nextoken` says so before any work)
    from nextoken.train.cli_train import overrides_from_args

    overrides = overrides_from_args(args)
    overrides.pop("max_iters", None)  # our --max-iters means "steps in this job", passed on its own
    result = retrain(args.models_dir, mode=args.mode, preset=args.preset, config_file=args.config,
                     overrides=overrides, max_iters=args.max_iters, keep=args.keep, work_dir=args.work_dir,
                     name=args.name, quiet=args.quiet,
                     **({"log": None} if args.quiet else {}))
    print(f"published version {result.version} ({result.mode}"
          + (f" from version {result.base_version}" if result.mode == "continue" else "") + f"): {result.path}")
    return 0

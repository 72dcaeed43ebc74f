"""`nextoken models list|use --models-dir MODELS`: the published versions, and repointing `current`.

Torch-free: it reads only the models folder's small JSON files.
"""

from __future__ import annotations

import argparse
import json


def _add_models_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", default="models", metavar="DIR",
                   help="models folder written by `nextoken retrain` (default: models)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="show the published versions, newest last; * marks current")
    _add_models_dir(ls)
    ls.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    use = sub.add_parser("use", help="point current at an existing version (a rollback); the server follows")
    use.add_argument("version", metavar="VERSION")
    _add_models_dir(use)


def _fmt(value: object, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nextoken.errors import UserError
    from nextoken.registry import list_versions, set_current

    models = Path(args.models_dir)
    if not models.is_dir():
        raise UserError(f"{models} does not exist", flag="--models-dir")
    if args.action == "use":
        set_current(models, args.version)
        print(f"{models}/current -> {args.version}")
        return 0
    versions = list_versions(models)
    if args.json:
        print(json.dumps([v.to_dict() for v in versions], indent=2))
        return 0
    if not versions:
        print(f"no versions in {models}; publish one with `nextoken retrain --models-dir {models}`")
        return 0
    rows = [("", "VERSION", "NAME", "PUBLISHED", "STEP", "VAL LOSS", "MODEL.ONNX SHA256")]
    for v in versions:
        rows.append(("*" if v.is_current else "", v.version, v.name or "-", v.created or "-", _fmt(v.source_step),
                     _fmt(v.val_loss, ".4f"), (v.model_sha256 or "-")[:12]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0

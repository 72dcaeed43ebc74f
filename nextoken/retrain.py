"""The retrain-and-publish job: train (from scratch or from the current version), export, verify, publish.

Every step works inside a work folder; the models folder is touched only by the last step,
``publish``, which is itself atomic. So a job that fails anywhere (bad data, a diverging run,
a parity failure, a full disk) leaves the models folder and the serving version as they were,
and the error names the step. Needs PyTorch (train and export); the registry it publishes
through does not.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextoken.errors import UserError
from nextoken.registry import RUN_DIR, current_version, next_version, publish, resolve_current

MODES = ("auto", "current", "scratch")
# Continuing a checkpoint needs the same architecture; these TrainConfig fields fix it.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "tokenizer", "vocab_size")


@dataclass
class RetrainResult:
    version: str
    path: Path
    mode: str  # "scratch" or "continue"
    base_version: str | None
    summary: dict[str, Any]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def _step(name: str) -> Iterator[None]:
    """Re-raise any failure as one UserError that names the step; nothing has been published."""
    try:
        yield
    except UserError as e:
        raise UserError(f"retrain failed at step {name!r}: {e}; nothing was published") from e
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        # Unexpected: keep the traceback for whoever reads the job's log, then fail with one line.
        traceback.print_exc(file=sys.stderr)
        raise UserError(f"retrain failed at step {name!r}: {type(e).__name__}: {e}; nothing was published") from e


def _base_checkpoint(base_run: Path) -> Path:
    ckpts = sorted(p for p in (base_run / "checkpoints").glob("step-*") if (p / "meta.json").is_file())
    if not ckpts:
        raise UserError(f"{base_run} holds no checkpoint to continue from", flag="--from-current")
    return ckpts[-1]


def _continue_config(base_run: Path, config_file: str | None, overrides: dict[str, Any],
                     max_iters: int | None, work_run: Path) -> tuple[Any, Path]:
    """TrainConfig that resumes the base version's checkpoint inside ``work_run`` for ``max_iters`` more steps."""
    from nextoken.train.config import TrainConfig
    from nextoken.train.settings import load_config_file

    try:
        base_train = json.loads((base_run / "config.json").read_text(encoding="utf-8"))["train"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{base_run}/config.json is not a run config: {e}", flag="--from-current") from None
    ckpt = _base_checkpoint(base_run)
    meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    start = int(meta["step"])
    merged = {k: v for k, v in base_train.items() if k in TrainConfig.field_names()}
    if config_file:
        merged.update(load_config_file(config_file))
    merged.update({k: v for k, v in overrides.items() if v is not None})
    for name in SHAPE_FIELDS:
        if name in base_train and merged.get(name) != base_train[name]:
            raise UserError(f"continuing version needs {name}={base_train[name]!r}, got {merged.get(name)!r}; "
                            "use --from-scratch to change the architecture", flag="--" + name.replace("_", "-"))
    extra = max_iters if max_iters is not None else int(base_train.get("max_iters", 1000))
    if extra < 1:
        raise UserError(f"must be a positive integer, got {extra}", flag="--max-iters")
    # The checkpoint is copied out of the models folder (never resumed in place) and kept outside
    # work_run/checkpoints, so "best" below picks among checkpoints scored on the new data only.
    local = work_run.parent / "base-checkpoint" / ckpt.name
    shutil.copytree(ckpt, local)
    work_run.mkdir(parents=True)
    shutil.copy2(base_run / "tokenizer.json", work_run / "tokenizer.json")  # same ids as the checkpoint
    # The loop's step and time limits count from the run's start, and the checkpoint carries both:
    # this job's budget goes on top (else a run that stopped on --max-time would stop again at once).
    job_time = float(merged.get("max_time") or 0.0)
    merged.update(out_dir=str(work_run), resume=str(local), max_iters=start + extra,
                  max_time=float(meta.get("train_time", 0.0)) + job_time if job_time > 0 else 0.0)
    return TrainConfig(**merged), local


def retrain(models_dir: str | Path, *, mode: str = "auto", preset: str | None = None, config_file: str | None = None,
            overrides: dict[str, Any] | None = None, max_iters: int | None = None, keep: int = 5,
            work_dir: str | Path | None = None, name: str | None = None, quiet: bool = False,
            log: Callable[[str], None] | None = _stderr) -> RetrainResult:
    """Train, export (with the parity check) and publish one new version into ``models_dir``.

    ``mode``: ``scratch``; ``current`` (continue the current version's checkpoint for
    ``max_iters`` more steps, on ``overrides["data"]`` when given); ``auto`` (current when there
    is one, else scratch). Raises ``UserError`` naming the failed step; then nothing is published.
    """
    say = log or (lambda _m: None)
    overrides = dict(overrides or {})
    models = Path(models_dir)
    if mode not in MODES:
        raise UserError(f"must be one of {', '.join(MODES)}, got {mode!r}", flag="--mode")
    if keep < 1:
        raise UserError(f"must be >= 1, got {keep}", flag="--keep")
    if max_iters is not None and max_iters < 1:
        raise UserError(f"must be a positive integer, got {max_iters}", flag="--max-iters")
    if models.exists() and not models.is_dir():
        raise UserError(f"{models} exists and is not a folder", flag="--models-dir")
    for key in ("out_dir", "resume"):
        if overrides.get(key) is not None:
            raise UserError("retrain chooses the run folder itself (see --work-dir)", flag="--" + key.replace("_", "-"))

    base_version = current_version(models) if models.is_dir() else None
    base_run = (models / base_version / RUN_DIR) if base_version else None
    if mode == "current" and (base_run is None or not base_run.is_dir()):
        raise UserError(f"{models} has no current version with a run/ folder to continue from" if base_version is None
                        or base_run is None else f"version {base_version} has no {RUN_DIR}/ folder to continue from",
                        flag="--from-current")
    continuing = mode == "current" or (mode == "auto" and base_run is not None and base_run.is_dir())
    if continuing and preset:
        if mode == "current":
            raise UserError("a preset sets the architecture; it applies to --from-scratch only", flag="--preset")
        # auto: the same job command serves the first run (preset used) and later ones (ignored).
        say(f"note: continuing version {base_version}; --preset {preset} applies only when training from scratch")
        preset = None

    own_work = work_dir is None
    if own_work:
        work = Path(tempfile.mkdtemp(prefix="nextoken-retrain-"))
    else:
        work = Path(work_dir)
        if work.exists() and (not work.is_dir() or any(work.iterdir())):
            raise UserError(f"{work} must be an empty or new folder", flag="--work-dir")
        work.mkdir(parents=True, exist_ok=True)
    work_run = work / "run"
    try:
        with _step("prepare"):
            if continuing:
                base = resolve_current(models)
                cfg, local = _continue_config(base / RUN_DIR, config_file, overrides, max_iters, work_run)
                say(f"retrain: continuing version {base.name} from {local.name} for "
                    f"{cfg.max_iters - int(local.name.split('-')[-1])} more steps")
            else:
                from nextoken.train.settings import resolve_train_config

                if max_iters is not None:
                    overrides["max_iters"] = max_iters
                cfg = resolve_train_config(preset, config_file, dict(overrides, out_dir=str(work_run), resume="never"))
                say(f"retrain: training from scratch for {cfg.max_iters} steps")
        with _step("train"):
            from nextoken.train.loop import train

            summary = train(cfg, quiet=quiet)
            if summary.get("best_val_loss") is None and summary.get("final_val_loss") is None:
                raise UserError("the run recorded no validation loss (too few steps for one evaluation?)",
                                flag="--max-iters")
        with _step("export"):
            from nextoken.export.build import export_run

            # The version it will most likely get; publish re-stamps it if another job got there first.
            version = next_version(models)
            model_name = name or _base_name(models, base_version) or "nextoken"
            artifact = export_run(work_run, work / "artifact", checkpoint="best", name=model_name, version=version,
                                  verify=True, log=None if quiet else say)
        with _step("publish"):
            path = publish(artifact, models, run_dir=work_run, summary=summary, keep=keep)
        say(f"retrain: published {path} (current -> {path.name})")
        return RetrainResult(path.name, path, "continue" if continuing else "scratch", base_version, summary)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _base_name(models: Path, version: str | None) -> str | None:
    if version is None:
        return None
    try:
        return json.loads((models / version / "manifest.json").read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError):
        return None

"""The run folder: what a training run leaves on disk, and loading a model back from it.

::

    RUN/
      config.json          {"model": GPTConfig, "train": TrainConfig, "tokenizer": {...}}
      tokenizer.json       Hugging Face tokenizers format
      data/                tokens.bin + manifest.json (the tokenized corpus)
      checkpoints/         step-XXXXXXXX/ {model.safetensors, state.pt, meta.json}
      metrics.jsonl        one JSON object per logged event
      loss.png             train/val loss curve, refreshed at every evaluation
      summary.json         the final report
      tb/                  TensorBoard event files
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from nextoken.errors import UserError
from nextoken.train.checkpoint import CheckpointInfo, best_checkpoint, list_checkpoints, load_weights
from nextoken.train.config import GPTConfig
from nextoken.train.model import GPT
from nextoken.train.tokenizer import document_token_id, load_tokenizer


@dataclass
class LoadedRun:
    path: Path
    model: GPT
    tokenizer: Tokenizer
    config: dict[str, Any]
    checkpoint: CheckpointInfo

    @property
    def eot_id(self) -> int | None:
        """The run's document separator: <|endoftext|>, or its --init-from folder's end-of-sequence token."""
        return document_token_id(self.tokenizer, self.path)


def read_run_config(run_dir: Path, flag: str = "RUN") -> dict[str, Any]:
    cfg_path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} does not exist", flag=flag)
    if not cfg_path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json)", flag=flag)
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise UserError(f"{cfg_path} is not a valid run config: {e}", flag=flag) from None
    if isinstance(cfg, dict) and "model_type" in cfg and "model" not in cfg:
        raise UserError(f"{run_dir} is a Hugging Face model folder (model_type {cfg['model_type']!r}), not a nextoken "
                        f"run: `nextoken train --init-from {run_dir}` continues training it", flag=flag)
    try:
        GPTConfig.from_dict(cfg["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{cfg_path} is not a valid run config: {e!r}", flag=flag) from None
    return cfg


def pick_checkpoint(run_dir: Path, which: str = "best", flag: str = "--checkpoint") -> CheckpointInfo:
    """``best`` (lowest val loss), ``latest``, a step number, or a checkpoint folder path."""
    root = run_dir / "checkpoints"
    ckpts = list_checkpoints(root)
    if which not in ("best", "latest") and Path(which).is_dir():
        meta = json.loads((Path(which) / "meta.json").read_text()) if (Path(which) / "meta.json").is_file() else {}
        return CheckpointInfo(Path(which), int(meta.get("step", -1)), meta)
    if not ckpts:
        raise UserError(f"{run_dir} has no checkpoints yet", flag=flag)
    if which == "latest":
        return ckpts[-1]
    if which == "best":
        return best_checkpoint(root) or ckpts[-1]
    if which.isdigit():
        for c in ckpts:
            if c.step == int(which):
                return c
        raise UserError(f"no checkpoint at step {which}; have {[c.step for c in ckpts]}", flag=flag)
    raise UserError(f"must be best, latest, a step or a folder, got {which!r}", flag=flag)


def load_run(run_dir: str | Path, which: str = "best", device: str = "cpu") -> LoadedRun:
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    tok = load_tokenizer(run_dir / "tokenizer.json")
    ckpt = pick_checkpoint(run_dir, which)
    model = GPT(GPTConfig.from_dict(cfg["model"]))
    load_weights(ckpt.path, model)
    model.to(device).eval()
    return LoadedRun(run_dir, model, tok, cfg, ckpt)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("CUDA was requested but no GPU is available", flag="--device")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}", flag="--device") from None

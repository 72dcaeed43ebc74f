"""Crash-safe checkpoints: safetensors weights, a weights-only state file, atomic folder rename.

Layout of one checkpoint (``RUN/checkpoints/step-00001000/``):

* ``model.safetensors``: the uncompiled, unwrapped model's weights (a tied LM head stored once,
  as the embedding; an untied one, ``tie_embeddings=False``, under its own name);
* ``state.pt``: optimizer, RNG and sampler state, loadable with ``torch.load(weights_only=True)``,
  so loading never executes code;
* ``meta.json``: step, losses and the sha256 of both files, written last.

Everything is written into a hidden temporary folder, fsynced, then renamed into place, so a
crash or ``kill -9`` at any moment leaves either the old set of checkpoints or the new one,
never half a folder. Loading checks the hashes and names a corrupt or truncated file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nextoken.errors import UserError
from nextoken.fileio import fsync_dir, fsync_file, sha256_file

TIED_KEYS = ("lm_head.weight",)  # the same tensor as transformer.wte.weight when the head is tied


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    meta: dict[str, Any]


def save_checkpoint(ckpt_root: Path, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any],
                    meta: dict[str, Any], *, tied: bool = True) -> Path:
    """Write one checkpoint atomically; ``tied=False`` keeps ``lm_head.weight`` (a head of its own)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    skip = TIED_KEYS if tied else ()
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items() if k not in skip}
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt", "step": str(step)})
    torch.save(train_state, tmp / "state.pt")
    for name in ("model.safetensors", "state.pt"):
        fsync_file(tmp / name)
    meta = dict(meta, step=step, files={n: sha256_file(tmp / n) for n in ("model.safetensors", "state.pt")})
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # the same step saved again (a resumed run): swap, then drop the old one
        old = ckpt_root / f".old-step-{step:08d}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(ckpt_root)
    return final


def list_checkpoints(ckpt_root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints (meta.json present), oldest first."""
    out = []
    if not ckpt_root.is_dir():
        return out
    for d in ckpt_root.iterdir():
        if not d.name.startswith("step-") or not (d / "meta.json").is_file():
            continue
        try:
            meta = json.loads((d / "meta.json").read_text())
            out.append(CheckpointInfo(d, int(meta["step"]), meta))
        except (ValueError, KeyError):
            continue
    return sorted(out, key=lambda c: c.step)


def best_checkpoint(ckpt_root: Path) -> CheckpointInfo | None:
    scored = [c for c in list_checkpoints(ckpt_root) if c.meta.get("val_loss") is not None]
    return min(scored, key=lambda c: c.meta["val_loss"]) if scored else None


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints and the best by val loss; remove the rest."""
    ckpts = list_checkpoints(ckpt_root)
    keep = {c.path for c in ckpts[-keep_last:]}
    best = best_checkpoint(ckpt_root)
    if best is not None:
        keep.add(best.path)
    for c in ckpts:
        if c.path not in keep:
            shutil.rmtree(c.path, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)


def verify_checkpoint(path: Path, flag: str = "--resume") -> dict[str, Any]:
    """Return meta.json after checking both files against their recorded hashes."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{path} is not a checkpoint (no meta.json)", flag=flag)
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        raise UserError(f"{meta_path} is corrupt (not JSON)", flag=flag) from None
    for name, digest in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise UserError(f"checkpoint {path} is missing {name}", flag=flag)
        if sha256_file(f) != digest:
            raise UserError(f"checkpoint file {f} is corrupt or truncated (sha256 mismatch)", flag=flag)
    return meta


def load_weights(path: Path, model: torch.nn.Module, verify: bool = True, flag: str = "--resume") -> dict[str, Any]:
    """Load ``model.safetensors`` of a checkpoint folder into ``model``; returns meta.json."""
    meta = verify_checkpoint(path, flag) if verify else json.loads((path / "meta.json").read_text())
    try:
        state = load_file(path / "model.safetensors")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path / 'model.safetensors'} cannot be read: {e}", flag=flag) from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(model, "tied", True):  # the head is the embedding, loaded under its name
        missing = [k for k in missing if k not in TIED_KEYS]
    if missing or unexpected:
        raise UserError(f"{path} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})",
                        flag=flag)
    return meta


def load_train_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path / 'state.pt'} cannot be read: {e}", flag="--resume") from None


def find_resume_checkpoint(ckpt_root: Path, warn: Any = print) -> CheckpointInfo | None:
    """The newest checkpoint whose files verify; corrupt newer ones are reported and skipped."""
    for c in reversed(list_checkpoints(ckpt_root)):
        try:
            verify_checkpoint(c.path)
            return c
        except UserError as e:
            warn(f"warning: skipping {c.path.name}: {e}")
    return None

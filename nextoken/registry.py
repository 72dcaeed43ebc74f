"""The models folder: published, verified model versions and an atomic ``current`` pointer. Torch-free.

::

    MODELS/
      current -> 3            symlink to the version that serves (a pointer file holding "3" where
                              the filesystem has no symlinks); swapped with one rename
      3/                      an artifact folder (model.onnx, tokenizer.json, config.json,
        ...                   generation_config.json, manifest.json) plus:
        summary.json          the training summary of the run it came from (when known)
        published.json        when and from where it was published
        run/                  what a later retrain continues from: config.json, tokenizer.json and
                              checkpoints/step-N/ (the exported checkpoint)
      2/ ...
      .lock                   publishers take it in turn (flock)

A version is assembled in a hidden ``.tmp-*`` folder inside MODELS (same filesystem), its
hashes are checked there, and only then is it renamed to ``MODELS/<version>`` and ``current``
repointed, each step a single rename. A reader that follows ``current`` therefore sees a
complete, verified version or the previous one, never half of one. The server never imports
this module: it follows ``current`` with the artifact contract's reader (``nextoken.export.artifact``),
the one ``current_version`` uses. This module knows nothing about training or ONNX: it copies and
checks files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nextoken.errors import UserError
from nextoken.export.artifact import (
    CURRENT,
    ArtifactError,
    load_artifact,
    pointed_version,
    write_json,
    write_manifest,
)
from nextoken.fileio import follow_umask, fsync_dir, read_json_object

LOCK = ".lock"
TMP_PREFIX = ".tmp-"
RUN_DIR = "run"
# A version is a folder name: no separators, no leading dot (hidden temp folders use one), not "current".
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RegistryError(UserError):
    """A models folder or a publish request that cannot be honoured; nothing was changed."""


@dataclass
class VersionInfo:
    version: str
    path: Path
    created: str | None  # ISO 8601 UTC publish time
    name: str | None
    source_step: int | None
    val_loss: float | None
    model_sha256: str | None
    is_current: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), path=str(self.path))


def check_version(version: str, flag: str = "--version") -> str:
    version = str(version)
    if not _VERSION_RE.match(version) or version == CURRENT:
        raise RegistryError(f"a version is a folder name of letters, digits, '.', '_' or '-' (not {CURRENT!r}, "
                            f"no leading dot), got {version!r}", flag=flag)
    return version


def _version_key(version: str) -> tuple[int, int, str]:
    """Integers in numeric order, then any named versions alphabetically."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def _version_dirs(models: Path) -> list[Path]:
    if not models.is_dir():
        return []
    dirs = [p for p in models.iterdir() if p.is_dir() and not p.is_symlink() and _VERSION_RE.match(p.name)
            and p.name != CURRENT and (p / "manifest.json").is_file()]
    return sorted(dirs, key=lambda p: _version_key(p.name))


def current_version(models_dir: str | Path) -> str | None:
    """The version ``current`` points at, or None (read by the artifact contract, as the server reads it)."""
    return pointed_version(Path(models_dir) / CURRENT)


def resolve_current(models_dir: str | Path) -> Path:
    """The folder of the current version; RegistryError when there is none yet."""
    models = Path(models_dir)
    version = current_version(models)
    if version is None:
        raise RegistryError(f"{models} has no current model version; publish one with `nextoken retrain`",
                            flag="--models-dir")
    folder = models / version
    if not folder.is_dir():
        raise RegistryError(f"{models}/{CURRENT} points at {version!r}, which does not exist", flag="--models-dir")
    return folder


def next_version(models_dir: str | Path) -> str:
    """One more than the highest integer version published so far ("1" for an empty folder)."""
    numbers = [int(p.name) for p in _version_dirs(Path(models_dir)) if p.name.isdigit()]
    return str(max(numbers, default=0) + 1)


def list_versions(models_dir: str | Path) -> list[VersionInfo]:
    """Every published version, oldest first; reads only small JSON files (no hashing)."""
    models = Path(models_dir)
    cur = current_version(models)
    out = []
    for d in _version_dirs(models):
        manifest = read_json_object(d / "manifest.json") or {}
        source = manifest.get("source") or {}
        published = read_json_object(d / "published.json") or {}
        summary = read_json_object(d / "summary.json") or {}
        val_loss = source.get("val_loss")
        if val_loss is None:
            val_loss = summary.get("best_val_loss")
        out.append(VersionInfo(version=d.name, path=d, created=published.get("published_at"),
                               name=manifest.get("name"), source_step=source.get("step"), val_loss=val_loss,
                               model_sha256=(manifest.get("files") or {}).get("model.onnx"),
                               is_current=d.name == cur))
    return out


@contextlib.contextmanager
def _locked(models: Path) -> Iterator[None]:
    """Serialise publishers (two retrain jobs must not pick the same version or prune each other)."""
    with open(models / LOCK, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def set_current(models_dir: str | Path, version: str) -> None:
    """Point ``current`` at an existing version with one rename (also a rollback)."""
    models = Path(models_dir)
    version = check_version(version, flag="VERSION")
    if not (models / version / "manifest.json").is_file():
        raise RegistryError(f"{models} has no version {version!r}", flag="VERSION")
    _repoint(models, version)


def _repoint(models: Path, version: str) -> None:
    pointer = models / CURRENT
    tmp = models / f"{TMP_PREFIX}{CURRENT}-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        # Relative, so the pointer still works where the volume is mounted at another path.
        os.symlink(version, tmp, target_is_directory=True)
    except OSError:  # no symlinks here: a pointer file (the server reads either)
        tmp.write_text(version + "\n", encoding="utf-8")
    if pointer.is_dir() and not pointer.is_symlink():
        raise RegistryError(f"{pointer} is a real folder; move it away so it can become the pointer",
                            flag="--models-dir")
    os.replace(tmp, pointer)  # rename(2) replaces a symlink or file atomically
    fsync_dir(models)


def _copy_run(run_dir: Path, dest: Path, checkpoint: str | None) -> None:
    """Copy what a retrain needs to continue: config, tokenizer and one checkpoint folder."""
    for name in ("config.json", "tokenizer.json"):
        if not (run_dir / name).is_file():
            raise RegistryError(f"{run_dir} has no {name}; is it a run folder?", flag="--run-dir")
    dest.mkdir()
    for name in ("config.json", "tokenizer.json", "summary.json"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, dest / name)
    if checkpoint is None:
        return
    ckpt = Path(checkpoint)
    if not ckpt.is_absolute() and not ckpt.is_dir():
        ckpt = run_dir / "checkpoints" / checkpoint
    if not (ckpt / "meta.json").is_file():
        raise RegistryError(f"{ckpt} is not a checkpoint folder (no meta.json)", flag="--run-dir")
    shutil.copytree(ckpt, dest / "checkpoints" / ckpt.name)


def _prune(models: Path, keep: int, protect: set[str]) -> list[str]:
    """Remove the oldest versions beyond ``keep``; never one in ``protect`` (the current one)."""
    versions = _version_dirs(models)
    removed = []
    excess = len(versions) - keep
    for p in versions:  # oldest first
        if excess <= 0:
            break
        if p.name in protect:
            continue
        # Rename first so a reader never sees a version folder being emptied file by file.
        doomed = models / f"{TMP_PREFIX}pruned-{p.name}-{os.getpid()}"
        os.rename(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(p.name)
        excess -= 1
    return removed


def publish(artifact_dir: str | Path, models_dir: str | Path, *, version: str | None = None,
            run_dir: str | Path | None = None, checkpoint: str | None = None, summary: dict[str, Any] | None = None,
            keep: int = 5, make_current: bool = True) -> Path:
    """Copy a verified artifact into ``MODELS/<version>`` and point ``current`` at it; returns the folder.

    ``version`` defaults to the next integer. ``run_dir`` (with ``checkpoint``, a folder name under
    ``run_dir/checkpoints`` or a path; default: the checkpoint the artifact's manifest names) is
    copied into ``run/`` so a later retrain can continue from it; its ``summary.json`` (or
    ``summary``) is stored beside the artifact. The artifact's manifest and config.json are
    rewritten to carry the published version, so ``/v1/models`` shows it. Old versions beyond
    ``keep`` are removed, never the current one. Raises ``RegistryError`` (and changes nothing)
    when the artifact fails its hash check, the version exists, or an input is missing.
    """
    src, models = Path(artifact_dir), Path(models_dir)
    if keep < 1:
        raise RegistryError(f"must be >= 1, got {keep}", flag="--keep")
    if version is not None:
        version = check_version(version)
    try:
        art = load_artifact(src, verify=True)  # refuse a corrupt source before copying anything
    except ArtifactError as e:
        raise RegistryError(f"refusing to publish: {e}", flag="ARTIFACT_DIR") from None
    run = Path(run_dir) if run_dir is not None else None
    if run is not None and checkpoint is None:
        checkpoint = (art.manifest.get("source") or {}).get("checkpoint")
    if models.exists() and not models.is_dir():
        raise RegistryError(f"{models} exists and is not a folder", flag="--models-dir")
    models.mkdir(parents=True, exist_ok=True)

    with _locked(models):
        # Holding the lock, any temp folder present was left by a publisher that crashed.
        for stale in models.glob(f"{TMP_PREFIX}*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        version = version or next_version(models)
        final = models / version
        if final.exists() or final.is_symlink():
            raise RegistryError(f"version {version!r} already exists in {models}", flag="--version")
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{version}-", dir=models))
        try:
            for f in src.iterdir():
                if f.is_file() and not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)
            try:  # the copy, not just the source: a short write or a full disk shows up here
                load_artifact(tmp, verify=True)
            except ArtifactError as e:
                raise RegistryError(f"the copy in {models} failed its hash check: {e}",
                                    flag="--models-dir") from None
            # Only after the check: stamping re-hashes, which would bless a bad copy.
            _stamp_version(tmp, art.manifest, version)
            if run is not None:
                _copy_run(run, tmp / RUN_DIR, checkpoint)
                if summary is None and (run / "summary.json").is_file():
                    shutil.copy2(run / "summary.json", tmp / "summary.json")
            if summary is not None:
                write_json(tmp / "summary.json", summary)
            write_json(tmp / "published.json", {
                "version": version, "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "artifact": str(src.resolve()), "run": str(run.resolve()) if run is not None else None})
            follow_umask(tmp)  # mkdtemp makes it 0700, copy2 keeps a private file private
            fsync_dir(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if make_current:
            _repoint(models, version)
        _prune(models, keep, protect={v for v in (current_version(models), version) if v})
    return final


def _stamp_version(folder: Path, manifest: dict[str, Any], version: str) -> None:
    """Make the copy's manifest and config.json carry ``version`` (re-hashing what changed)."""
    if str(manifest.get("version")) == version:
        return
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["version"] = version
    write_json(folder / "config.json", config)
    # The manifest's other fields (source checkpoint, export options, parity figures) carry over.
    write_manifest(folder, name=manifest.get("name") or config.get("name") or "model", version=version,
                   source=manifest.get("source") or {}, export=manifest.get("export") or {},
                   verification=manifest.get("verification"))

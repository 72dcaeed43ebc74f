"""What export and publish write follows the umask: a server running as another user can read it.

``tempfile.mkdtemp`` makes 0700 folders and safetensors writes 0600 files; the compose and Kubernetes
deployments serve, as a non-root user, what the retrain job publishes into a shared volume.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from nextoken.cli import main
from nextoken.registry import publish

UMASK = 0o027  # not the usual 0o022: the modes must come from the umask, not from a constant


@pytest.fixture
def umask() -> Iterator[int]:
    old = os.umask(UMASK)
    yield UMASK
    os.umask(old)


def wrong_modes(path: Path, mask: int) -> list[str]:
    """Entries under ``path`` whose mode is not what a new file or folder gets under ``mask``."""
    out = []
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        if not p.is_symlink() and stat.S_IMODE(p.stat().st_mode) != want:
            out.append(f"{p.relative_to(path.parent)}: {oct(stat.S_IMODE(p.stat().st_mode))}, want {oct(want)}")
    return out


def test_onnx_hf_and_gguf_exports_follow_the_umask(tiny_bpe_run: Path, tmp_path: Path, umask: int) -> None:
    for fmt, out in (("onnx", tmp_path / "art"), ("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf")):
        assert main(["export", str(tiny_bpe_run), "--format", fmt, "--out", str(out)]) == 0
        assert wrong_modes(out, umask) == [], fmt


def test_a_published_version_follows_the_umask(tiny_artifact: Path, tiny_run: Path, tmp_path: Path,
                                               umask: int) -> None:
    version = publish(tiny_artifact, tmp_path / "models", run_dir=tiny_run)  # the run's checkpoint comes along
    assert (version / "run" / "checkpoints").is_dir()
    assert wrong_modes(version, umask) == []

"""The models folder: atomic publish, the current pointer, versions, pruning, refusing corrupt artifacts."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest

from nextoken.export.artifact import load_artifact, sha256_file
from nextoken.registry import (
    RegistryError,
    current_version,
    list_versions,
    next_version,
    publish,
    resolve_current,
    set_current,
)


def _versions(models: Path) -> list[str]:
    return [v.version for v in list_versions(models)]


def _no_leftovers(models: Path) -> None:
    hidden = sorted(p.name for p in models.iterdir() if p.name.startswith(".") and p.name != ".lock")
    assert hidden == [], f"temporary files left behind: {hidden}"


def test_publish_auto_versions_current_symlink_and_stamped_manifest(tiny_artifact: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    assert current_version(models) is None and next_version(models) == "1"
    with pytest.raises(RegistryError, match="no current model version"):
        resolve_current(models)
    for expected in ("1", "2", "3"):
        path = publish(tiny_artifact, models)
        assert path == models / expected
        assert current_version(models) == expected
    # A relative symlink, so it still resolves where the volume is mounted elsewhere (/models in compose).
    assert os.readlink(models / "current") == "3"
    assert resolve_current(models) == models / "3"
    art = load_artifact(models / "current", verify=True)
    # The published copy says which version it is; hashes were recomputed for what changed.
    assert art.version == "3" and art.config["version"] == "3" and art.model_id == "tiny:3"
    src = load_artifact(tiny_artifact)
    assert src.version == "1"  # the source artifact itself is untouched
    assert art.manifest["files"]["model.onnx"] == src.manifest["files"]["model.onnx"]
    assert art.manifest["source"] == src.manifest["source"]
    _no_leftovers(models)


def test_list_versions_reports_source_and_current(tiny_artifact: Path, tiny_run: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    publish(tiny_artifact, models, run_dir=tiny_run)
    publish(tiny_artifact, models, version="canary")
    infos = list_versions(models)
    assert [v.version for v in infos] == ["1", "canary"]  # integers first, named versions after
    one = infos[0]
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    assert one.source_step == manifest["source"]["step"] > 0
    assert one.val_loss == pytest.approx(manifest["source"]["val_loss"])
    assert one.model_sha256 == sha256_file(tiny_artifact / "model.onnx")
    assert one.created and one.created.endswith("Z") and one.name == "tiny"
    assert [v.is_current for v in infos] == [False, True]
    # run/ holds what a retrain continues from: config, tokenizer and the exported checkpoint only.
    run = models / "1" / "run"
    ckpt = manifest["source"]["checkpoint"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [ckpt]
    assert (run / "config.json").read_bytes() == (tiny_run / "config.json").read_bytes()
    assert (run / "tokenizer.json").is_file() and (models / "1" / "summary.json").is_file()
    assert not (models / "canary" / "run").exists()
    assert json.loads(json.dumps([v.to_dict() for v in infos]))[0]["path"] == str(models / "1")


def test_corrupt_artifact_is_refused_and_nothing_changes(tiny_artifact: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    publish(tiny_artifact, models)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    with open(bad / "model.onnx", "r+b") as f:  # flip one byte in the middle of the graph
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = sorted(p.name for p in models.iterdir())
    with pytest.raises(RegistryError, match="sha256"):
        publish(bad, models)
    assert sorted(p.name for p in models.iterdir()) == before
    assert current_version(models) == "1" and _versions(models) == ["1"]
    (bad / "model.onnx").unlink()
    with pytest.raises(RegistryError, match="model.onnx is missing"):
        publish(bad, models)
    with pytest.raises(RegistryError, match="no manifest.json"):
        publish(tmp_path, models)
    _no_leftovers(models)


def test_pruning_keeps_the_newest_and_never_the_current(tiny_artifact: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    for _ in range(4):
        publish(tiny_artifact, models, keep=2)
    assert _versions(models) == ["3", "4"] and current_version(models) == "4"
    set_current(models, "3")  # a rollback
    assert current_version(models) == "3"
    # Published but not made current, keep=1: the current one (3) survives beside the new one.
    publish(tiny_artifact, models, keep=1, make_current=False)
    assert _versions(models) == ["3", "5"] and current_version(models) == "3"
    # Numbering continues after pruned versions, never reusing a name a server may have seen.
    assert next_version(models) == "6"
    _no_leftovers(models)


def test_bad_requests_name_the_flag(tiny_artifact: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    publish(tiny_artifact, models, version="7")
    with pytest.raises(RegistryError, match="--version: version '7' already exists"):
        publish(tiny_artifact, models, version="7")
    for bad in ("current", ".hidden", "a/b", ""):
        with pytest.raises(RegistryError, match="--version"):
            publish(tiny_artifact, models, version=bad)
    with pytest.raises(RegistryError, match="--keep"):
        publish(tiny_artifact, models, keep=0)
    with pytest.raises(RegistryError, match="VERSION: .* no version '8'"):
        set_current(models, "8")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RegistryError, match="--models-dir"):
        publish(tiny_artifact, tmp_path / "file")
    assert _versions(models) == ["7"]


def test_stale_temp_folders_from_a_crash_are_removed(tiny_artifact: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    publish(tiny_artifact, models)
    (models / ".tmp-2-crashed").mkdir()
    (models / ".tmp-2-crashed" / "model.onnx").write_bytes(b"half")
    assert _versions(models) == ["1"]  # a half-written version is never listed
    publish(tiny_artifact, models)
    assert _versions(models) == ["1", "2"]
    _no_leftovers(models)


def test_pointer_file_is_read_like_the_symlink(tiny_artifact: Path, tmp_path: Path) -> None:
    """Filesystems without symlinks get a pointer file; readers (and the server) accept both."""
    models = tmp_path / "models"
    publish(tiny_artifact, models)
    publish(tiny_artifact, models)
    (models / "current").unlink()
    (models / "current").write_text("1\n")
    assert current_version(models) == "1" and resolve_current(models) == models / "1"
    publish(tiny_artifact, models)  # replaces the file with a symlink in one rename
    assert os.readlink(models / "current") == "3"


def test_concurrent_publishers_and_a_polling_reader(tiny_artifact: Path, tmp_path: Path) -> None:
    """Two publishers never share a version, and a reader following `current` meanwhile always finds a
    complete version whose every hash checks out (it would not if the pointer moved before the rename)."""
    models = tmp_path / "models"
    publish(tiny_artifact, models)
    stop = threading.Event()
    seen: set[str] = set()
    failures: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                # Resolve once, as the server does: reading file by file through `current` could
                # straddle two versions.
                folder = resolve_current(models)
                art = load_artifact(folder, verify=True)
                seen.add(art.version)
                assert folder.name == art.version
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                failures.append(repr(e))

    def publisher() -> None:
        for _ in range(4):
            publish(tiny_artifact, models, keep=5)

    t_read = threading.Thread(target=reader)
    t_read.start()
    pubs = [threading.Thread(target=publisher) for _ in range(2)]
    for t in pubs:
        t.start()
    for t in pubs:
        t.join()
    stop.set()
    t_read.join()
    assert failures == []
    assert _versions(models) == ["5", "6", "7", "8", "9"] and current_version(models) == "9"
    assert len(seen) >= 2, seen


def test_registry_is_torch_free() -> None:
    import subprocess

    code = ("import sys, nextoken.registry, nextoken.cli_models; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_the_server_follows_the_pointer_the_registry_writes(tiny_artifact: Path, tmp_path: Path) -> None:
    """The server follows `current` with the artifact contract's reader (it polls it every second); both
    pointer forms the registry can write must lead it to the same folder as `resolve_current`, and a
    repoint must change the signature the server watches."""
    from nextoken.export.artifact import resolve_artifact_dir
    from nextoken.serve.engine.versions import signature

    models = tmp_path / "models"
    publish(tiny_artifact, models)
    publish(tiny_artifact, models)
    assert resolve_artifact_dir(models / "current") == resolve_current(models).resolve() == (models / "2").resolve()
    before = signature(models / "current")
    set_current(models, "1")
    assert resolve_artifact_dir(models / "current") == (models / "1").resolve()
    assert signature(models / "current") != before
    (models / "current").unlink()
    (models / "current").write_text("2\n")  # the pointer-file form, for filesystems without symlinks
    assert resolve_artifact_dir(models / "current") == resolve_current(models).resolve() == (models / "2").resolve()
    assert signature(models / "current") == before


def test_serving_the_models_folder_names_its_current_pointer(tiny_artifact: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from nextoken.cli import main

    models = tmp_path / "models"
    publish(tiny_artifact, models)
    assert main(["serve", str(models)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ARTIFACT_DIR: ") and f"pass {models / 'current'}" in err

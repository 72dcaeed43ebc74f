"""`nextoken export` from the command line: success, and one-line errors naming the flag."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nextoken.cli import main
from nextoken.errors import UserError
from nextoken.export import build
from nextoken.export.artifact import load_artifact


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_cli_writes_and_replaces_artifact(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "art"
    assert main(["export", str(tiny_run), "--out", str(out), "--no-verify", "--name", "m", "--version", "3",
                 "--checkpoint", "latest"]) == 0
    art = load_artifact(out)
    assert art.model_id == "m:3" and art.manifest["verification"] == {"skipped": True}
    assert main(["export", str(tiny_run), "--out", str(out), "--version", "4"]) == 0  # replaces an artifact
    art = load_artifact(out)
    assert art.version == "4" and art.manifest["verification"]["passed"]
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temp or old folders left behind


@pytest.mark.parametrize("flags, flag", [
    (["--dtype", "bf16"], "--dtype"),
    (["--quantize", "int3"], "--quantize"),
    (["--quant-block-size", "32"], "--quant-block-size"),  # without --quantize: refused, not ignored
    (["--quantize", "int8", "--quant-block-size", "32"], "--quant-block-size"),  # int8 is per tensor
    (["--quantize", "int4", "--quant-block-size", "48"], "--quant-block-size"),
    (["--quantize", "int4", "--quant-accuracy-level", "7"], "--quant-accuracy-level"),
    (["--quantize", "int4", "--dtype", "fp16"], "--quantize"),
    (["--opset", "11"], "--opset"),
    (["--checkpoint", "999999"], "--checkpoint"),
    (["--checkpoint", "newest"], "--checkpoint"),
])
def test_cli_bad_flags(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                       flag: str) -> None:
    err = _err(capsys, ["export", str(tiny_run), "--out", str(tmp_path / "a"), *flags])
    assert flag in err
    assert not (tmp_path / "a").exists()


def test_cli_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert "not a run folder" in _err(capsys, ["export", str(tmp_path / "empty"), "--out", str(tmp_path / "a")])
    assert "does not exist" in _err(capsys, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "a")])


def test_cli_no_checkpoint_and_corrupt_checkpoint(tiny_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("data", "tb"))
    ckpts = sorted((run / "checkpoints").iterdir())
    weights = ckpts[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    err = _err(capsys, ["export", str(run), "--out", str(tmp_path / "a"), "--checkpoint", "latest"])
    assert "--checkpoint" in err and "corrupt" in err
    shutil.rmtree(run / "checkpoints")
    err = _err(capsys, ["export", str(run), "--out", str(tmp_path / "a")])
    assert "--checkpoint" in err and "no checkpoints" in err
    assert not (tmp_path / "a").exists()


def test_cli_out_is_not_an_artifact(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    err = _err(capsys, ["export", str(tiny_run), "--out", str(precious)])
    assert "--out" in err and "not an artifact" in err
    assert (precious / "notes.txt").read_text() == "keep me"


def test_failed_verification_writes_nothing(tiny_run: Path, tiny_artifact: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A parity failure must leave the previous artifact untouched and no temp folder behind."""
    out = shutil.copytree(tiny_artifact, tmp_path / "art")
    before = json.loads((out / "manifest.json").read_text())

    def failing(*args, **kwargs):
        return {"prefill_max_abs_diff": 1.0, "decode_max_abs_diff": 1.0, "greedy_identical_steps": 0,
                "greedy_steps": 8, "passed": False}

    monkeypatch.setattr(build, "verify_onnx", failing)
    with pytest.raises(UserError, match="disagrees with PyTorch"):
        build.export_run(tiny_run, out, version="9", log=None)
    assert json.loads((out / "manifest.json").read_text()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["art"]

"""`nextoken retrain` end to end on a tiny model: publish, continue from the current version, fail cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nextoken.cli import main
from nextoken.export.artifact import load_artifact
from nextoken.registry import current_version, list_versions
from tests.conftest import TINY_TEXT

TINY = ["--tokenizer", "char", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--batch-size", "8", "--eval-interval", "10", "--eval-iters", "2", "--log-interval", "5",
        "--warmup-iters", "5", "--learning-rate", "3e-3", "--min-lr", "3e-4", "--sample-tokens", "8",
        "--threads", "1", "--no-progress", "--no-tensorboard", "--quiet"]
FAST = TINY[-5:]  # the rest comes from the continued run's config


def _ckpt_step(version_dir: Path) -> int:
    (ckpt,) = (version_dir / "run" / "checkpoints").iterdir()
    return int(json.loads((ckpt / "meta.json").read_text())["step"])


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """Version 1 from scratch, then version 2 continuing it on new text."""
    root = tmp_path_factory.mktemp("retrain")
    models = root / "models"
    assert main(["retrain", "--models-dir", str(models), "--data", str(tiny_corpus), "--max-iters", "20",
                 "--name", "tiny", *TINY]) == 0
    new_data = root / "new.txt"  # the same characters (a char vocabulary), different text
    new_data.write_text("\n".join(reversed(TINY_TEXT.splitlines())), encoding="utf-8")
    assert main(["retrain", "--models-dir", str(models), "--from-current", "--data", str(new_data),
                 "--max-iters", "10", "--work-dir", str(root / "work2"), *FAST]) == 0
    return models


def test_first_run_trains_from_scratch_and_publishes_version_1(published: Path) -> None:
    one = published / "1"
    art = load_artifact(one, verify=True)
    assert art.model_id == "tiny:1" and art.manifest["verification"]["passed"] is True
    assert art.manifest["source"]["step"] == _ckpt_step(one) == 20
    summary = json.loads((one / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["model"]["n_layer"] == 2


def test_from_current_continues_version_1s_checkpoint(published: Path) -> None:
    assert current_version(published) == "2"
    two = published / "2"
    art = load_artifact(published / "current", verify=True)
    assert art.model_id == "tiny:2"  # name carried over from version 1, version stamped
    # 10 more steps on top of version 1's 20: it resumed the checkpoint rather than starting over.
    assert art.manifest["source"]["step"] == _ckpt_step(two) == 30
    assert json.loads((two / "summary.json").read_text())["steps"] == 30
    run_cfg = json.loads((two / "run" / "config.json").read_text())["train"]
    assert run_cfg["resume"].endswith("step-00000020") and run_cfg["max_iters"] == 30
    assert run_cfg["data"] == [str(published.parent / "new.txt")]
    assert (two / "run" / "tokenizer.json").read_bytes() == (published / "1" / "run" / "tokenizer.json").read_bytes()
    # The work folder asked for is kept; its metrics show the resume (first logged step after 20).
    log = [json.loads(line) for line in (published.parent / "work2" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert min(r["step"] for r in log if r.get("event") == "train") > 20
    assert art.manifest["files"]["model.onnx"] != load_artifact(published / "1").manifest["files"]["model.onnx"]


def test_models_list(published: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--models-dir", str(published), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["source_step"], r["is_current"]) for r in rows] == [("1", 20, False), ("2", 30, True)]
    assert main(["models", "list", "--models-dir", str(published)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["VERSION", "NAME"] and table[2].startswith("*  2")
    assert main(["models", "list", "--models-dir", str(published / "nope")]) == 2
    assert "--models-dir" in capsys.readouterr().err


def _snapshot(models: Path) -> tuple[list[str], str | None]:
    return sorted(p.name for p in models.iterdir()), current_version(models)


@pytest.mark.parametrize(("argv", "step", "reason"), [
    (["--data", "/no/such/corpus.txt"], "train", "--data: '/no/such/corpus.txt' does not exist"),
    (["--from-current", "--n-layer", "3"], "prepare", "--n-layer: continuing version needs n_layer=2"),
    (["--from-current", "--max-iters", "0"], None, "--max-iters: must be a positive integer"),
    (["--from-current", "--preset", "quickstart"], None, "--preset: a preset sets the architecture"),
    (["--keep", "0"], None, "--keep: must be >= 1"),
])
def test_a_failed_retrain_publishes_nothing(published: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            argv: list[str], step: str | None, reason: str) -> None:
    before = _snapshot(published)
    code = main(["retrain", "--models-dir", str(published), "--work-dir", str(tmp_path / "w"), "--max-iters", "5",
                 *argv, *FAST] if "--max-iters" not in argv else
                ["retrain", "--models-dir", str(published), *argv, *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert reason in err
    if step is not None:
        assert f"retrain failed at step {step!r}" in err and "nothing was published" in err
    assert _snapshot(published) == before


def test_from_current_needs_a_current_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["retrain", "--models-dir", str(tmp_path / "empty"), "--from-current", "--quiet"]) == 2
    assert "--from-current: " in capsys.readouterr().err
    assert not (tmp_path / "empty").exists() or list_versions(tmp_path / "empty") == []


def test_a_parity_failure_at_export_publishes_nothing(published: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The graph really disagrees with PyTorch: after the real export, the reference model's weights
    are nudged, so the real parity check fails. A retrain that skipped verification, or published
    after a failed one, would add version 3 here."""
    import torch

    import nextoken.export.build as build

    real_export = build.export_onnx

    def export_then_perturb(model: torch.nn.Module, *args: object, **kwargs: object) -> dict:
        graph = real_export(model, *args, **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05)
        return graph

    monkeypatch.setattr(build, "export_onnx", export_then_perturb)
    before = _snapshot(published)
    code = main(["retrain", "--models-dir", str(published), "--from-current", "--max-iters", "10",
                 "--work-dir", str(tmp_path / "w"), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert "retrain failed at step 'export'" in err and "--verify: the exported graph disagrees with PyTorch" in err
    assert "nothing was published" in err
    assert _snapshot(published) == before


def test_quiet_prints_the_result_and_nothing_else(tiny_corpus: Path, tmp_path: Path) -> None:
    """--quiet: no progress bar (the tokenizer's included), only the result line."""
    import subprocess
    import sys

    flags = [f for f in TINY if f not in ("--no-progress", "--quiet")]  # progress on, as a user leaves it
    res = subprocess.run([sys.executable, "-m", "nextoken", "retrain", "--models-dir", str(tmp_path / "models"),
                          "--data", str(tiny_corpus), "--max-iters", "3", *flags, "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert res.stdout == f"published version 1 (scratch): {tmp_path / 'models' / '1'}\n"

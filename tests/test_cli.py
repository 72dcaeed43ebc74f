"""The `nextoken` command itself: what a serving-only install (`pip install .`) says for training commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nextoken.cli import TRAIN_EXTRA_MODULES

# `pip install .` without [train]: none of the training extra's modules can be imported.
WITHOUT_TRAIN_EXTRA = (f"import sys\nfor m in {sorted(TRAIN_EXTRA_MODULES)!r}:\n    sys.modules[m] = None\n"
                       "from nextoken.cli import main\nsys.exit(main(sys.argv[1:]))\n")


def run_without_train_extra(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_TRAIN_EXTRA, *argv], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.mark.parametrize("argv", [
    ["train", "--max-iters", "1", "--out-dir", "r"],
    ["export", "{run}", "--out", "a"],
    ["generate", "{run}", "--prompt", "the"],
    ["inspect", "{run}", "--prompt", "the"],
    ["attention", "{run}", "--text", "the cat", "--out", "a.png"],
    ["up", "--no-serve", "--max-iters", "1"],
    ["quickstart"],
    ["retrain", "--models-dir", "models", "--max-iters", "1"],
    ["eval", "{run}", "--data", "{corpus}"],  # a run folder is scored with PyTorch (an artifact needs none)
])
def test_a_training_command_without_the_training_extra_says_what_to_install(argv: list[str], tiny_run: Path,
                                                                             tiny_corpus: Path, tmp_path: Path) -> None:
    res = run_without_train_extra(*(a.format(run=tiny_run, corpus=tiny_corpus) for a in argv), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"error: `nextoken {argv[0]}` needs the training extra") and \
        "pip install 'nextoken[train]'" in res.stderr


def test_serving_needs_no_training_extra(tiny_artifact: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    """What a serving-only install runs: eval on an artifact (ONNX Runtime), serve's flags."""
    res = run_without_train_extra("eval", str(tiny_artifact), "--data", str(tiny_corpus), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = run_without_train_extra("serve", "--help", cwd=tmp_path)
    assert res.returncode == 0 and "--max-batch-size" in res.stdout, res.stderr

"""`nextoken train --out-dir RUN --resume auto`, exactly as the README shows it, continues the run in RUN.

The saved settings, tokenizer, tokenized corpus and architecture are the run's; flags may change only
its budget, cadence and where it computes, and any other flag that differs is refused by name with
the folder untouched. An interruption is made by removing the newest checkpoints of a finished run
(what a crash after the checkpoint at step 4 leaves), and the bare command then has to reach the
same weights and losses as the run that was never interrupted, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nextoken.cli import main
from nextoken.train.checkpoint import list_checkpoints

BUDGET = ["--max-iters", "8", "--eval-interval", "4", "--eval-iters", "2", "--sample-tokens", "0", "--no-progress",
          "--no-tensorboard", "--threads", "1"]
SMALL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8"]
# How each run was started: a custom folder with BPE, the quickstart preset (rotary, QK-norm, Muon... with a
# step schedule, so the learning rate does not follow the clock) and nanoGPT's CPU preset (characters).
RUNS = {
    "custom": ["--tokenizer", "bpe", "--vocab-size", "300", *SMALL],
    "quickstart": ["--preset", "quickstart", "--lr-schedule", "steps", "--warmup-iters", "2", "--batch-size", "4"],
    "nanogpt-cpu": ["--preset", "nanogpt-cpu", "--warmup-iters", "2"],
}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _train_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["event"] == "train"]


def _interrupt_after(run: Path, step: int) -> None:
    """What a crash right after the checkpoint at ``step`` leaves: no newer checkpoint, no summary."""
    for c in list_checkpoints(run / "checkpoints"):
        if c.step > step:
            shutil.rmtree(c.path)
    (run / "summary.json").unlink()


@pytest.fixture(scope="module", params=sorted(RUNS))
def finished(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path
             ) -> tuple[str, Path]:
    """A run trained 8 steps without interruption (log every step, checkpoints at 0, 4, 8)."""
    run = tmp_path_factory.mktemp("resume") / request.param
    assert main(["train", "--data", str(tiny_corpus), *RUNS[request.param], *BUDGET, "--log-interval", "1",
                 "--out-dir", str(run)]) == 0
    return request.param, run


def test_the_bare_readme_command_continues_the_run_bit_for_bit(finished: tuple[str, Path], tmp_path: Path) -> None:
    name, whole = finished
    run = tmp_path / name
    shutil.copytree(whole, run)
    _interrupt_after(run, 4)
    config, data = (run / "config.json").read_bytes(), _digest(run / "data")
    assert main(["train", "--out-dir", str(run), "--resume", "auto"]) == 0
    assert (run / "config.json").read_bytes() == config  # nothing to record: the run's settings as saved
    assert _digest(run / "data") == data  # the tokenized corpus was read, not made again
    assert (run / "tokenizer.json").read_bytes() == (whole / "tokenizer.json").read_bytes()
    assert _train_losses(run) == _train_losses(whole)
    last, whole_last = list_checkpoints(run / "checkpoints")[-1], list_checkpoints(whole / "checkpoints")[-1]
    assert last.step == whole_last.step == 8
    # The weights bit for bit (the files' bytes may differ: safetensors writes its metadata map in any order).
    mine, theirs = load_file(last.path / "model.safetensors"), load_file(whole_last.path / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_longer_budget_is_a_change_a_resume_may_make(finished: tuple[str, Path], tmp_path: Path) -> None:
    name, whole = finished
    run = tmp_path / name
    shutil.copytree(whole, run)
    assert main(["train", "--out-dir", str(run), "--resume", "auto", "--max-iters", "10"]) == 0
    assert list_checkpoints(run / "checkpoints")[-1].step == 10
    saved = json.loads((run / "config.json").read_text())
    before = json.loads((whole / "config.json").read_text())
    assert saved["train"]["max_iters"] == 10  # recorded once the checkpoint had loaded
    assert {k: v for k, v in saved["train"].items() if k != "max_iters"} == \
        {k: v for k, v in before["train"].items() if k != "max_iters"}
    assert saved["model"] == before["model"] and saved["tokenizer"] == before["tokenizer"]


@pytest.mark.parametrize(("flags", "named"), [
    (["--n-layer", "3"], "--n-layer"),
    (["--tokenizer", "word"], "--tokenizer"),
    (["--learning-rate", "0.5"], "--learning-rate"),
    (["--data", "elsewhere.txt"], "--data"),
])
def test_a_flag_that_changes_the_run_is_refused_by_name(finished: tuple[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str], flags: list[str],
                                                        named: str) -> None:
    name, whole = finished
    run = tmp_path / name
    shutil.copytree(whole, run)
    before = _digest(run)
    assert main(["train", "--out-dir", str(run), "--resume", "auto", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named}: the run in {run} was trained with ") and "new --out-dir" in err
    assert _digest(run) == before  # refused before anything was written


def test_another_preset_on_resume_is_refused_naming_what_it_changes(finished: tuple[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    name, whole = finished
    other = "nanogpt-cpu" if name != "nanogpt-cpu" else "quickstart"
    run = tmp_path / name
    shutil.copytree(whole, run)
    assert main(["train", "--out-dir", str(run), "--resume", "auto", "--preset", other]) == 2
    assert f"(--preset {other} sets it to " in capsys.readouterr().err


def test_repeating_the_whole_command_on_a_restart_is_fine(finished: tuple[str, Path], tmp_path: Path,
                                                          tiny_corpus: Path) -> None:
    """torchrun --max-restarts reruns the same command line, --resume auto included."""
    name, whole = finished
    run = tmp_path / name
    shutil.copytree(whole, run)
    _interrupt_after(run, 4)
    assert main(["train", "--data", str(tiny_corpus), *RUNS[name], *BUDGET, "--log-interval", "1",
                 "--out-dir", str(run), "--resume", "auto"]) == 0
    assert _train_losses(run) == _train_losses(whole)

"""Every preset starts as a user starts it: `nextoken train --preset NAME`.

Each is resolved and validated through the real command line with no other flag (an override could
hide a conflict inside the preset), then trained for two steps through `nextoken train` itself,
with only the budget (steps, corpus size, samples) and, for the GPU-sized ``gpt2-124m``, the
micro-batch made small enough for this CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nextoken.cli import main, parse_args
from nextoken.train.cli_train import config_from_args
from nextoken.train.config import TrainConfig
from nextoken.train.presets import PRESETS

# a GPU preset on a 2-core CPU: one 1024-token micro-batch per step and one evaluation batch
CPU_SIZED = {"gpt2-124m": ["--batch-size", "1", "--tokens-per-step", "1024", "--eval-iters", "1"]}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_resolves_and_validates_as_the_cli_does(name: str) -> None:
    _, args = parse_args(["train", "--preset", name])
    cfg = config_from_args(args)
    assert isinstance(cfg, TrainConfig)
    for field, value in PRESETS[name].items():
        assert getattr(cfg, field) == value, field


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_trains_for_two_steps(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    code = main(["train", "--preset", name, "--max-corpus-chars", "300000", "--max-iters", "2", "--sample-tokens",
                 "0", "--out-dir", str(out), "--no-progress", "--no-tensorboard", *CPU_SIZED.get(name, [])])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_val_loss"] > 0
    model = json.loads((out / "config.json").read_text())["model"]
    for field in ("n_layer", "n_head", "n_embd", "block_size"):
        assert model[field] == PRESETS[name][field], field

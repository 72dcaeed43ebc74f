"""Fixtures the engine's tests share: the tiny model's tokenizer and its PyTorch model (the reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_artifact: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_artifact / "tokenizer.json"))


@pytest.fixture(scope="module")
def model(tiny_run: Path):
    from nextoken.train.run import load_run

    return load_run(tiny_run).model

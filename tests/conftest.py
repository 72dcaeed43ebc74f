"""Shared fixtures: a tiny trained run (seconds on a CPU), free ports, the shared corpus."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

# A small corpus with repetition, so a tiny model learns something in a few dozen steps.
TINY_TEXT = (
    "the cat sat on the mat. the dog lay on the rug. a quick brown fox jumps over the lazy dog.\n"
    "hello world, hello there. how are you? i love next token prediction.\n"
) * 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (the shared corpora live beside the repository)")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(TINY_TEXT, encoding="utf-8")
    (d / "b.txt").write_text(TINY_TEXT.upper(), encoding="utf-8")
    return d


def train_tiny(out_dir: Path, corpus: Path, tokenizer: str = "char", **overrides) -> dict:
    from nextoken.train.config import TrainConfig
    from nextoken.train.loop import train

    settings = dict(data=[str(corpus)], tokenizer=tokenizer, vocab_size=300, n_layer=2, n_head=2, n_embd=32,
                    block_size=32, batch_size=8, max_iters=30, eval_interval=15, eval_iters=2, log_interval=5,
                    warmup_iters=5, learning_rate=3e-3, min_lr=3e-4, sample_tokens=8, out_dir=str(out_dir),
                    progress=False, tensorboard=False, threads=1)
    settings.update(overrides)
    return train(TrainConfig(**settings), quiet=True)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """A trained character-level run folder (2 layers, 32 wide), shared by the whole session."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train_tiny(out, tiny_corpus)
    return out


@pytest.fixture(scope="session")
def tiny_bpe_run(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """A trained byte-level BPE run folder (vocab 300), shared by the whole session."""
    out = tmp_path_factory.mktemp("runs") / "tiny-bpe"
    train_tiny(out, tiny_corpus, tokenizer="bpe")
    return out


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path) -> Path:
    """``tiny_run`` exported (opset 23, fp32, verified) into an artifact folder, shared by the session."""
    from nextoken.export.build import export_run

    return export_run(tiny_run, tmp_path_factory.mktemp("artifacts") / "tiny", name="tiny", log=None)


@pytest.fixture(scope="session")
def tiny_bpe_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_bpe_run: Path) -> Path:
    """``tiny_bpe_run`` exported (opset 23, fp32, verified) into an artifact folder, shared by the session."""
    from nextoken.export.build import export_run

    return export_run(tiny_bpe_run, tmp_path_factory.mktemp("artifacts") / "tiny-bpe", name="tiny-bpe", log=None)

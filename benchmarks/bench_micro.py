"""Microbenchmarks of the serving hot paths (pytest-benchmark; not part of the default test run).

    pytest benchmarks/bench_micro.py --benchmark-only

- tokenizer encode / decode of ~8 KB of text (a byte-level BPE trained here, vocab 512)
- the server's sampler (serve/engine/sampler.py): the per-row loop at batch 32, and BatchSampler at batch 1
  and 32 over vocabularies of 2048 and 4096 (greedy, temperature, top-k + top-p, top-p on flat and
  peaked logits, penalties, logprobs 5); benchmarks/bench_sampler.py runs old and new interleaved
- one engine decode step at batch 1 and batch 32 (serve/engine.py, a small artifact built here)
- SSE: the server's chunk encoding (serve/http/protocol.py) and the client's decoding of a 64-token stream

Other jobs share these cores:
compare figures only from one run, and record ``uptime`` beside them (docs/field-notes.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package (shared fixtures)

from benchmarks.bench_sampler import CASES as SAMPLER_CASES
from benchmarks.bench_sampler import make_logits as make_sampler_logits
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
    from nextoken.serve.http.protocol import ResponseBuilder, sse

    builder = ResponseBuilder("completions", "m")
    out = benchmark(lambda: sse(builder.chunk("tok ", [7], None, None)))
    assert out.startswith(b"data: ") and out.endswith(b"\n\n")


def test_sampler_batch_32(benchmark: Any) -> None:
    """The per-row sampler (until the engine moves to BatchSampler): the "before" of the cases below."""
    import numpy as np

    from nextoken.serve.engine.sampler import RowState, SamplingParams, sample

    V = 4096
    logits = np.random.default_rng(0).standard_normal((32, V), dtype=np.float32)
    rows = [RowState(SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=i), V, [1, 2, 3]) for i in range(32)]
    out = benchmark(sample, logits, rows)
    assert out.token_ids.shape == (32,)


@pytest.mark.parametrize("vocab", [2048, 4096])
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("case", list(SAMPLER_CASES))
def test_batch_sampler(benchmark: Any, case: str, batch: int, vocab: int) -> None:
    """BatchSampler.sample, one step over ``batch`` slots (benchmarks/bench_sampler.py: old vs new, interleaved)."""
    import numpy as np

    from nextoken.serve.engine.sampler import BatchSampler

    params, kind = SAMPLER_CASES[case]
    logits = make_sampler_logits(kind, batch, vocab)
    bs = BatchSampler(batch, vocab, eos_id=0)
    for i in range(batch):
        bs.add(i, params(i), list(range(1, 17)))
    out = benchmark(bs.sample, logits, np.arange(batch))
    assert out.token_ids.shape == (batch,)
    assert (out.logprobs is not None) == (params(0).logprobs is not None)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The runner (serving.onnx, in-place cache) over a small trained-for-2-steps artifact (4 layers, 128 wide,
    context 256), with 32 slots."""
    from nextoken.export.artifact import load_artifact
    from nextoken.export.build import export_run
    from nextoken.export.runtime import Runner
    from tests.conftest import TINY_TEXT, train_tiny

    root = tmp_path_factory.mktemp("bench-engine")
    (root / "corpus.txt").write_text(TINY_TEXT, encoding="utf-8")
    train_tiny(root / "run", root / "corpus.txt", n_layer=4, n_head=4, n_embd=128, block_size=256, max_iters=2,
               eval_interval=2)
    return Runner(load_artifact(export_run(root / "run", root / "art", log=None)), max_slots=32, threads=1)


@pytest.mark.parametrize("batch", [1, 32])
def test_engine_decode_step(benchmark: Any, runner: Any, batch: int) -> None:
    """One decode call over ``batch`` slots after 16-token prompts (positions advance every round)."""
    import numpy as np

    slots = np.arange(batch)
    tokens = np.ones(batch, dtype=np.int64)
    lengths = np.zeros(runner.spec.max_slots, dtype=np.int64)
    for s in range(batch):
        runner.prefill(s, [1] * 16, 0)
    lengths[:batch] = 16

    def step() -> Any:
        if lengths[0] >= runner.spec.max_len - 1:  # keep inside the cache: start the rows over
            lengths[:batch] = 16
        logits = runner.decode(slots, tokens, lengths[slots], lengths)
        lengths[:batch] += 1
        return logits

    logits = benchmark.pedantic(step, rounds=50)
    assert logits.shape == (batch, runner.vocab_size)

"""Microbenchmarks of the serving hot paths (pytest-benchmark; not part of the default test run).

    pytest benchmarks/bench_micro.py --benchmark-only

A regression between two commits (pytest-benchmark keeps each run under .benchmarks/, named by a
counter and the commit; the editable install serves whatever the work tree holds):

    git checkout A && pytest benchmarks/bench_micro.py --benchmark-only --benchmark-autosave
    git checkout B && pytest benchmarks/bench_micro.py --benchmark-only --benchmark-autosave \
        --benchmark-compare=0001 --benchmark-compare-fail=median:25% --benchmark-columns=median,iqr,rounds
    pytest-benchmark compare 0001 0002 --group-by=name     # the two runs side by side, any time later

``--benchmark-compare-fail=median:25%`` makes the second run fail on any benchmark whose median
grew more than 25% (this machine's noise between quiet runs is ~10%; compare only runs from one
machine, and record ``uptime`` beside them).

- the engine step (serve/engine/core.py ``EngineCore.step``: schedule, runner, sampler) at batch 1 and 32
- the request path (serve/http: strict JSON, the request model's validation, ``to_sampling_params``)
- the prefill scheduler (serve/engine/scheduler.py + prefill.py): a burst of 32 prompts beside 32 decoding
  rows under the model-sized budget, and grouping a step's chunks into runner calls

- tokenizer encode / decode of ~8 KB of text (a byte-level BPE trained here, vocab 512)
- the server's sampler (serve/engine/sampler.py): BatchSampler at batch 1 and 32 over vocabularies of 2048
  and 4096 (greedy, temperature, top-k + top-p, top-p on flat and peaked logits, penalties, logprobs 5)
- one runner decode step at batch 1 and batch 32 (export/runtime.py, a small artifact built here)
- SSE: the server's chunk encoding (serve/http/builder.py) and the client's decoding of a 64-token stream

Other jobs share these cores:
compare figures only from one run, and record ``uptime`` beside them (docs/field-notes.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package (shared fixtures)

from nextoken.serve.wire import SamplingParams
from nextoken_client._streaming import SSEDecoder, _EventBuilder

TEXT = ("the cat sat on the mat. the dog lay on the rug. a quick brown fox jumps over the lazy dog.\n"
        "hello world, hello there. how are you? i love next token prediction.\n") * 50  # ~8 KB


# case -> (settings for row i, logits kind)
SAMPLER_CASES: dict[str, tuple[Callable[[int], SamplingParams], str]] = {
    "greedy": (lambda i: SamplingParams(temperature=0), "normal"),
    "temperature": (lambda i: SamplingParams(temperature=0.8, seed=i), "normal"),
    "top-k + top-p": (lambda i: SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=i), "normal"),
    "top-p": (lambda i: SamplingParams(temperature=0.8, top_p=0.9, seed=i), "normal"),
    "top-p, peaked": (lambda i: SamplingParams(temperature=0.8, top_p=0.9, seed=i), "peaked"),
    "penalties": (lambda i: SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.1, presence_penalty=0.3,
                                           frequency_penalty=0.3, seed=i), "normal"),
    "logprobs 5": (lambda i: SamplingParams(temperature=0.8, logprobs=5, seed=i), "normal"),
}


def make_sampler_logits(kind: str, batch: int, vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, vocab), dtype=np.float32)  # (B, V)
    if kind == "peaked":  # a handful of likely tokens over a long flat tail
        x *= 2.0
        for b in range(batch):
            x[b, rng.choice(vocab, 8, replace=False)] += np.linspace(12.0, 6.0, 8, dtype=np.float32)
    return x



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
    """One streamed completions chunk of one token, built from the response models and encoded."""
    from nextoken.serve.http.builder import ChoiceState, ResponseBuilder, sse
    from nextoken.serve.http.plan import Choice

    builder = ResponseBuilder("completions", "m")
    st = ChoiceState(Choice(0, 0, [1, 2], [2], "x", SamplingParams()))
    out = benchmark(lambda: sse(builder.chunk(st, "tok ", [7], None, None)))
    assert out.startswith(b"data: ") and out.endswith(b"\n\n")


@pytest.mark.parametrize("vocab", [2048, 4096])
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("case", list(SAMPLER_CASES))
def test_batch_sampler(benchmark: Any, case: str, batch: int, vocab: int) -> None:
    """BatchSampler.sample, one step over ``batch`` slots."""
    import numpy as np

    from nextoken.serve.engine.sampler import BatchSampler

    params, kind = SAMPLER_CASES[case]
    logits = make_sampler_logits(kind, batch, vocab)
    bs = BatchSampler(batch, vocab, eos_ids=0)
    for i in range(batch):
        bs.add(i, params(i), list(range(1, 17)))
    out = benchmark(bs.sample, logits, np.arange(batch))
    assert out.token_ids.shape == (batch,)
    assert (out.logprobs is not None) == (params(0).logprobs is not None)


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small trained-for-2-steps artifact (4 layers, 128 wide, context 256)."""
    from nextoken.export.artifact import load_artifact
    from nextoken.export.build import export_run
    from tests.conftest import TINY_TEXT, train_tiny

    root = tmp_path_factory.mktemp("bench-engine")
    (root / "corpus.txt").write_text(TINY_TEXT, encoding="utf-8")
    train_tiny(root / "run", root / "corpus.txt", n_layer=4, n_head=4, n_embd=128, block_size=256, max_iters=2,
               eval_interval=2)
    return load_artifact(export_run(root / "run", root / "art", log=None))


@pytest.fixture(scope="module")
def runner(small_artifact: Any) -> Any:
    """The runner (serving.onnx, in-place cache) over the small artifact, with 32 slots."""
    from nextoken.export.runtime import Runner

    return Runner(small_artifact, max_slots=32, threads=1)


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


@pytest.mark.parametrize("batch", [1, 32])
def test_engine_step(benchmark: Any, small_artifact: Any, batch: int) -> None:
    """One ``EngineCore.step`` with ``batch`` rows decoding (greedy; rows that end are replaced between rounds)."""
    from nextoken.serve.engine.core import EngineCore, EngineOptions
    from nextoken.serve.wire import AddRequest

    core = EngineCore(small_artifact, EngineOptions(max_slots=32, max_model_len=256, threads=1,
                                                     prefix_cache_bytes=0))
    count = iter(range(1 << 30))

    def top_up() -> None:
        while core.num_requests < batch:
            core.add(AddRequest(f"r{next(count)}", [1] * 16, SamplingParams(temperature=0, max_tokens=200,
                                                                              ignore_eos=True), 0.0, core.model_id))
        while any(not s.prefilled for s in core.scheduler.running.values()) or core.scheduler.waiting:
            core.step()

    top_up()
    out = benchmark.pedantic(core.step, setup=top_up, rounds=100)
    assert len(out.rids) >= 1


REQUEST_BODY = json.dumps({"model": "m", "prompt": "the cat sat on the mat", "max_tokens": 64, "temperature": 0.8,
                           "top_p": 0.9, "stop": ["\n\n"], "stream": True, "stream_options": {"include_usage": True},
                           "logprobs": 2, "seed": 7}).encode()


def test_request_parse_and_validate(benchmark: Any) -> None:
    """Bytes -> strict JSON -> CompletionRequest (every rule) -> the engine's SamplingParams."""
    from nextoken.serve.http.bodies import parse_json
    from nextoken.serve.http.errors import validate
    from nextoken.serve.http.requests import CompletionRequest

    def parse() -> SamplingParams:
        req = validate(CompletionRequest, parse_json(REQUEST_BODY))
        return req.to_sampling_params(max_tokens=req.output_tokens(), logprobs=req.logprobs_count, seed=req.seed)

    assert benchmark(parse).max_tokens == 64


def test_prefill_scheduler_burst(benchmark: Any) -> None:
    """``Scheduler.schedule`` for a burst of 32 new prompts beside 32 decoding rows (64 slots, the
    model-sized budget), then ``plan_calls`` on the step's chunks."""
    from nextoken.serve.engine.prefill import Budget, plan_calls
    from nextoken.serve.engine.scheduler import Scheduler, Sequence

    budget = Budget(8192, call_tokens=12)

    def setup() -> tuple[tuple[Scheduler], dict]:
        s = Scheduler(64, budget.cap, allowance=budget.allowance)
        for i in range(32):
            s.add(Sequence(f"d{i}", [1] * 8, 100, 0.0))
        s.schedule()  # 32 rows prefilled whole: decoding from now on
        for i in range(32):
            s.add(Sequence(f"n{i}", [1] * (8 + i % 24), 100, 0.0))
        return (s,), {}

    def step(s: Scheduler) -> int:
        out = s.schedule()
        lengths = np.zeros(64, dtype=np.int64)
        for q in out.decode:
            lengths[q.slot] = 9
        return len(plan_calls([(c.seq.slot, c.start, c.length) for c in out.prefill], lengths, 12))

    assert benchmark.pedantic(step, setup=setup, rounds=200) >= 1

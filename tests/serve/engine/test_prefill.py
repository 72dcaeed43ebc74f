"""Batched prefill (Runner.prefill_first, prefill.plan_calls) and the model-sized step budget (prefill.Budget):
one call for a burst of first chunks gives the very numbers one call each gives; the core under the new
default still gives every request what it gets alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nextoken.export.artifact import load_artifact
from nextoken.export.runtime import Runner, default_threads, physical_cores
from nextoken.serve.engine.prefill import MIN_CHUNK, Budget, Costs, plan_calls
from tests.serve.engine.test_core import add, drain, greedy_ref, make_core, prompt


def test_one_call_for_many_first_chunks_equals_one_call_each(tiny_artifact: Path) -> None:
    art = load_artifact(tiny_artifact)
    rng = np.random.default_rng(0)
    V = int(art.config["vocab_size"])
    batched, alone = (Runner(art, max_slots=6, max_len=32, threads=1) for _ in range(2))
    lengths = np.zeros(6, dtype=np.int64)
    for r in (batched, alone):  # slots 0 and 5 hold sequences already
        r.prefill(0, [3, 4, 5], 0)
        r.prefill(5, [6, 7], 0)
    lengths[[0, 5]] = [3, 2]
    slots, chunks = [1, 3, 4], [rng.integers(0, V, n).tolist() for n in (7, 1, 4)]  # slot 2 is free: padded
    got = batched.prefill_first(slots, chunks, lengths)  # (3, 7, V)
    for row, (s, c) in enumerate(zip(slots, chunks, strict=True)):
        np.testing.assert_array_equal(got[row, :len(c)], alone.prefill(s, c, 0))  # bit for bit
    lengths[slots] = [7, 1, 4]
    live = np.array([0, 1, 3, 4, 5])
    toks = rng.integers(0, V, 5)  # and every row decodes on equally: the padding columns were never read
    np.testing.assert_array_equal(batched.decode(live, toks, lengths[live], lengths),
                                  alone.decode(live, toks, lengths[live], lengths))
    with pytest.raises(ValueError, match=r"hold other sequences: \[2\]"):
        lengths[2] = 5
        batched.prefill_first([1, 3], [[1], [2]], lengths)


def test_plan_calls_groups_first_chunks_by_cost() -> None:
    lengths = np.zeros(8, dtype=np.int64)
    lengths[3] = 5  # a sequence in slot 3: no call may span it
    chunks = [(0, 0, 5), (1, 0, 6), (2, 0, 4), (4, 0, 5), (5, 0, 100), (6, 3, 4)]
    assert plan_calls(chunks, lengths, call_tokens=10) == [[0, 1, 2], [3], [4], [5]]  # 100 alone: padding costs
    assert plan_calls(chunks[:4], lengths, call_tokens=10) == [[0, 1, 2], [3]]
    assert plan_calls([(0, 0, 5), (2, 0, 6)], lengths, call_tokens=10) == [[0, 1]]  # a free slot between: padded
    assert plan_calls([(0, 0, 5), (7, 0, 6)], np.zeros(8, dtype=np.int64), call_tokens=2) == [[0], [1]]


def test_the_budget_follows_the_decoding_rows() -> None:
    b = Budget(cap=4096, call_tokens=12)
    assert b.allowance(0) == 4096  # nobody waits on a token: the whole burst
    assert b.allowance(1) == max(MIN_CHUNK, 2 + 12) and b.allowance(32) == 2 * 32 + 12
    assert Budget(cap=64).allowance(10) == 54  # a fixed --max-num-batched-tokens: what decoding leaves
    assert Costs(call_s=0.015, token_s=0.0012).call_tokens == 12


def test_a_burst_takes_one_call_and_every_request_gets_what_it_gets_alone(tiny_artifact, tok, model,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    core = make_core(tiny_artifact, max_slots=6, max_num_batched_tokens=0, prefix_cache_bytes=0)
    assert core.costs is not None and core.budget.call_tokens >= 1  # sized to the model, measured at load
    calls: list[int] = []
    first = core.runner.prefill_first
    monkeypatch.setattr(core.runner, "prefill_first", lambda s, c, n: calls.append(len(s)) or first(s, c, n))
    texts = ["the cat sat", "hello", "a quick brown fox", "i love", "how are you?"]
    ids = [prompt(tok, t) for t in texts]
    rids = [add(core, p, max_tokens=6, temperature=0) for p in ids]
    out = drain(core)
    assert calls[0] == 5  # the five prompts in one call
    for rid, p in zip(rids, ids, strict=True):
        assert out[rid]["ids"] == greedy_ref(model, p, 6)


def test_default_threads_count_physical_cores() -> None:
    assert [default_threads(n) for n in (1, 2, 4, 5, 8, 16)] == [1, 2, 4, 4, 7, 15]
    assert 1 <= physical_cores() <= (len(__import__("os").sched_getaffinity(0)))


def test_a_servers_small_model_gets_one_thread_on_two_cores(serve_artifact, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under SMALL_MODEL_BYTES of weights, one thread on up to 2 physical cores (export/runtime.py says what
    was measured); larger models and larger machines keep the core rule, and the start-up line says why."""
    from nextoken.export.artifact import load_artifact
    from nextoken.export.runtime import SMALL_MODEL_BYTES
    from nextoken.serve import launcher, memory
    from nextoken.serve.config import ServeConfig

    small, large = SMALL_MODEL_BYTES - 1, SMALL_MODEL_BYTES
    assert [default_threads(n, weights_bytes=small) for n in (1, 2, 4, 8)] == [1, 1, 4, 7]
    assert [default_threads(n, weights_bytes=large) for n in (1, 2, 4, 8)] == [1, 2, 4, 7]
    art = load_artifact(serve_artifact)
    weights = memory.weights_bytes(serve_artifact)
    assert 0 < weights < SMALL_MODEL_BYTES  # the test model is small
    plan = memory.plan(ServeConfig(), art.config, weights)
    monkeypatch.setattr("nextoken.export.runtime.physical_cores", lambda: 2)
    monkeypatch.setattr(launcher, "physical_cores", lambda: 2)
    assert launcher.resolved_threads(ServeConfig(), weights) == 1
    assert launcher.resolved_threads(ServeConfig(threads=2), weights) == 2  # --threads decides when given
    assert launcher.resolved_threads(ServeConfig(), SMALL_MODEL_BYTES) == 2
    line = launcher.startup_line(ServeConfig(), art, plan)
    assert f"1 ONNX Runtime threads (2 physical cores, a model of {weights / memory.MIB:,.1f} MiB)" in line
    assert "2 ONNX Runtime threads (--threads)" in launcher.startup_line(ServeConfig(threads=2), art, plan)


def test_a_servers_engine_lets_onnx_runtimes_threads_rest_between_steps(tiny_artifact: Path, tok, model) -> None:
    """The engine's runner stops its pool threads spinning when a call returns (the HTTP process and the clients
    need those cores between steps: export/runtime.py session_options); in-process runners keep spinning."""
    def entry(runner: Runner) -> str | None:
        try:
            return runner.session.get_session_options().get_session_config_entry("session.force_spinning_stop")
        except RuntimeError:  # never set
            return None

    core = make_core(tiny_artifact, threads=2)
    assert entry(core.runner) == "1"
    assert entry(Runner(load_artifact(tiny_artifact), max_slots=2, threads=2)) is None
    ids = prompt(tok, "the cat sat")
    rid = add(core, ids, max_tokens=6, temperature=0)
    assert drain(core)[rid]["ids"] == greedy_ref(model, ids, 6)  # two threads that rest still give the same tokens

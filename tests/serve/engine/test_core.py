"""The engine core in-process: continuous batching over the in-place cache gives each request what it
would get alone, through joins and leaves at every step, chunked prefill and prefix-cache hits."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from nextoken.export.artifact import load_artifact
from nextoken.serve.engine.core import EngineCore, EngineOptions, RequestRejected
from nextoken.serve.engine.sampler import SamplingParams
from nextoken.serve.wire import AddRequest

_ids = itertools.count()


def make_core(artifact: Path, **options) -> EngineCore:
    opts = dict(max_slots=3, max_num_batched_tokens=16, prefix_cache_bytes=1 << 20, prefix_block_size=4, threads=1)
    opts.update(options)
    return EngineCore(load_artifact(artifact), EngineOptions(**opts))


def add(core: EngineCore, ids: list[int], rid: str | None = None, **params) -> str:
    rid = rid or f"r{next(_ids)}"
    core.add(AddRequest(rid, ids, SamplingParams(**params), arrival=0.0, model=core.model_id))
    return rid


def drain(core: EngineCore, limit: int = 10_000, each_step=None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for step in range(limit):
        if not core.has_work():
            break
        if each_step is not None:
            each_step(step)
        o = core.step()
        for i, rid in enumerate(o.rids):
            out.setdefault(rid, {"ids": [], "lps": []})["ids"].append(int(o.token_ids[i]))
            if o.logprobs is not None:
                out[rid]["lps"].append(float(o.logprobs[i]))
        for rid, st in o.started.items():
            out.setdefault(rid, {"ids": [], "lps": []})["started"] = st
        for rid, fin in o.finished.items():
            out.setdefault(rid, {"ids": [], "lps": []})["finished"] = fin
    return out


def prompt(tok: Tokenizer, text: str) -> list[int]:
    return [tok.token_to_id("<|endoftext|>")] + tok.encode(text, add_special_tokens=False).ids


def greedy_ref(model, ids: list[int], n: int) -> list[int]:
    return model.generate(torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()


def test_joins_and_leaves_at_every_step_equal_pytorch_alone(tiny_artifact, tok, model) -> None:
    """Seven requests of different lengths and budgets through 3 slots: one arrives at every step,
    others leave at different steps (max_tokens 3..14), prompts longer than the budget are prefilled
    in chunks while other rows decode. Every request's greedy tokens equal PyTorch generating it
    alone, and every slot is free at the end."""
    core = make_core(tiny_artifact, max_num_batched_tokens=8)
    texts = ["the cat sat on th", "hello", "a quick brown fox", "i love next",  # the context is 32 tokens
             "how are you?", "the", "hello world, hello there."]
    budgets = [14, 3, 9, 5, 12, 7, 6]
    pending = list(zip(texts, budgets, strict=True))
    rids: dict[str, tuple[str, int]] = {}

    def join(_step: int) -> None:
        if pending:
            t, n = pending.pop(0)
            rids[add(core, prompt(tok, t), temperature=0, max_tokens=n, ignore_eos=True)] = (t, n)

    join(0)
    out = drain(core, each_step=join)
    assert len(out) == len(texts)
    for rid, (t, n) in rids.items():
        assert out[rid]["ids"] == greedy_ref(model, prompt(tok, t), n), t
        assert out[rid]["finished"].reason == "length" and out[rid]["finished"].completion_tokens == n
    assert core.slot_rid == [None, None, None] and not core.reqs and core.scheduler.free_slots == [0, 1, 2]


def test_chunked_prefill_interleaves_with_decode(tiny_artifact, tok) -> None:
    """A long prompt arriving while a stream decodes: the stream gets a token in every step while the
    prompt is prefilled over several steps, each within the token budget."""
    core = make_core(tiny_artifact, max_num_batched_tokens=6, prefix_cache_bytes=0)
    running = add(core, prompt(tok, "the cat"), temperature=0, max_tokens=20, ignore_eos=True)
    core.step()
    long_ids = prompt(tok, "hello world, hello there")  # 25 tokens: 5 chunks of <= 5
    joiner = add(core, long_ids, temperature=0, max_tokens=2, ignore_eos=True)
    steps = 0
    while joiner not in {r for r in core.step().started}:
        sched_tokens = core.scheduler.budget
        steps += 1
        assert core.reqs[running].seq.prefilled  # still decoding
        assert steps < 20
    assert steps >= len(long_ids) // 5 - 1  # it took several steps, not one
    assert sched_tokens == 6


def test_prefix_cache_hit_returns_the_same_tokens_as_a_miss(tiny_artifact, tok) -> None:
    core = make_core(tiny_artifact, prefix_block_size=4)
    shared = "the cat sat on"
    a = add(core, prompt(tok, shared + " a quick"), temperature=0, max_tokens=6, ignore_eos=True)
    first = drain(core)[a]
    assert first["started"].cached_tokens == 0
    b = add(core, prompt(tok, shared + " a quick"), temperature=0, max_tokens=6, ignore_eos=True)
    c = add(core, prompt(tok, shared + " hello"), temperature=0, max_tokens=6, ignore_eos=True)
    out = drain(core)
    n_prompt = len(prompt(tok, shared + " a quick"))
    assert out[b]["ids"] == first["ids"]
    assert out[b]["started"].cached_tokens == (n_prompt - 1) // 4 * 4  # whole blocks, never the last token
    assert out[c]["started"].cached_tokens >= len(prompt(tok, shared)) // 4 * 4 - 4
    miss = make_core(tiny_artifact, prefix_cache_bytes=0)
    d = add(miss, prompt(tok, shared + " hello"), temperature=0, max_tokens=6, ignore_eos=True)
    assert drain(miss)[d]["ids"] == out[c]["ids"]


def test_prefix_cache_evicts_under_its_memory_bound(tiny_artifact, tok) -> None:
    core = make_core(tiny_artifact, prefix_block_size=4)
    pc = core.prefix_cache
    block = pc.pool[0].nbytes
    small = make_core(tiny_artifact, prefix_block_size=4, prefix_cache_bytes=3 * block)
    assert small.prefix_cache.num_blocks == 3
    for t in ["the cat sat on the mat.", "hello world, hello there", "a quick brown fox jumps"]:
        add(small, prompt(tok, t), temperature=0, max_tokens=1)
    drain(small)
    assert small.prefix_cache.blocks_used == 3 and small.prefix_cache.stats.evictions > 0
    assert small.prefix_cache.nbytes == 3 * block


def test_cancel_frees_the_slot_for_reuse(tiny_artifact, tok) -> None:
    core = make_core(tiny_artifact, max_slots=1)
    a = add(core, prompt(tok, "the cat"), temperature=0, max_tokens=20, ignore_eos=True)
    for _ in range(3):
        core.step()
    b = add(core, prompt(tok, "hello"), temperature=0, max_tokens=4, ignore_eos=True)
    core.cancel(a)
    out = drain(core)
    assert out[a]["finished"].reason == "cancelled" and out[a]["finished"].completion_tokens == 3
    assert out[b]["finished"].reason == "length" and len(out[b]["ids"]) == 4
    assert core.slot_rid == [None] and core.scheduler.free_slots == [0] and not core.sampler.active.any()


def test_eos_and_stop_token_ids_finish_with_the_token(tiny_artifact, tok, model) -> None:
    core = make_core(tiny_artifact)
    ids = prompt(tok, "the cat")
    ref = greedy_ref(model, ids, 8)
    stop_at = ref[3]
    r = add(core, ids, temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[stop_at])
    out = drain(core)[r]
    first = ref.index(stop_at)
    assert out["ids"] == ref[:first + 1]
    assert out["finished"].reason == "stop" and out["finished"].stop_token == stop_at


def test_prompt_logprobs_and_score_only(tiny_artifact, tok, model) -> None:
    """max_tokens 0 with prompt logprobs: no token, every prompt position scored as PyTorch does,
    also when the prompt is prefilled in chunks."""
    core = make_core(tiny_artifact, max_num_batched_tokens=5)
    ids = prompt(tok, "the cat sat on the mat.")
    r = add(core, ids, temperature=0, max_tokens=0, prompt_logprobs=2)
    out = drain(core)[r]
    assert out["ids"] == [] and out["finished"].reason == "length" and out["finished"].completion_tokens == 0
    st = out["started"]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0][0], -1)  # (T, V)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(st.prompt_logprobs, want, atol=1e-4)
    assert st.prompt_top_ids.shape == (len(ids) - 1, 2)
    assert (st.prompt_top_ids[:, 0] == ref[:-1].argmax(-1).numpy()).all()


def test_context_limits_are_client_errors(tiny_artifact) -> None:
    core = make_core(tiny_artifact, max_model_len=16)
    with pytest.raises(RequestRejected) as e:
        add(core, list(range(1, 12)), max_tokens=8)
    assert e.value.param == "max_tokens" and "16" in str(e.value)
    with pytest.raises(RequestRejected) as e:
        add(core, [1] * 16, max_tokens=1)
    assert e.value.param == "prompt"
    with pytest.raises(RequestRejected) as e:
        add(core, [10**6], max_tokens=1)
    assert e.value.param == "prompt"
    rid = add(core, list(range(1, 12)), max_tokens=None, temperature=0, ignore_eos=True)  # None = fill the cache
    assert len(drain(core)[rid]["ids"]) == 5

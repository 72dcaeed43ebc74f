"""The scheduler: slots for life, a token budget per step (decode first, then prompt chunks, oldest
first), prefix-cache hits at admission, cancellation between steps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nextoken.serve.engine.scheduler import Scheduler, Sequence


def seq(rid: str, n: int = 3, **kw) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), max_tokens=5, arrival=0.0, **kw)


def test_admits_in_order_into_the_lowest_free_slots() -> None:
    s = Scheduler(2, 64)
    for r in "abc":
        s.add(seq(r))
    out = s.schedule()
    assert [q.rid for q in out.admitted] == ["a", "b"] and [c.seq.slot for c in out.prefill] == [0, 1]
    assert not s.has_capacity() and [q.rid for q in s.waiting] == ["c"]
    s.finish("a")
    out = s.schedule()
    assert [q.rid for q in out.admitted] == ["c"] and s.running["c"].slot == 0  # a's slot, reused
    assert [q.rid for q in out.decode] == ["b"]


def test_the_budget_goes_to_decoding_rows_first_then_to_prompt_chunks() -> None:
    s = Scheduler(3, 8)
    s.add(seq("a", 2))
    s.schedule()  # a prefilled whole (2 tokens)
    s.add(seq("long", 20))
    out = s.schedule()
    assert [q.rid for q in out.decode] == ["a"]
    assert [(c.seq.rid, c.start, c.length) for c in out.prefill] == [("long", 0, 7)]  # 8 - 1 decode token
    s.add(seq("next", 4))
    out = s.schedule()  # long's 13 left fill the 7 tokens: no room to start next
    assert [(c.seq.rid, c.start, c.length) for c in out.prefill] == [("long", 7, 7)]
    out = s.schedule()  # 6 left of long and next's 4 share the 7: 3 each, the last token to the one it finishes
    assert [(c.seq.rid, c.start, c.length, c.completes_prompt) for c in out.prefill] == [
        ("long", 14, 3, False), ("next", 0, 4, True)]
    assert out.num_batched_tokens == 8


def test_a_prefix_cache_hit_skips_the_cached_tokens() -> None:
    class Cache:
        def match(self, ids: list[int]) -> tuple[int, list[int]]:
            return 8, [11, 12]

    s = Scheduler(2, 64, Cache())
    s.add(seq("a", 10))
    s.add(seq("scored", 10, use_prefix_cache=False))  # prompt logprobs want every position's logits
    out = s.schedule()
    a, b = out.prefill
    assert (a.start, a.length, a.seq.num_cached, a.seq.prefix_keys) == (8, 2, 8, [11, 12])
    assert (b.start, b.length, b.seq.num_cached) == (0, 10, 0)


def test_cancel_running_and_waiting_between_steps() -> None:
    s = Scheduler(1, 16)
    s.add(seq("a"))
    s.add(seq("b"))
    s.schedule()
    s.cancel("a")
    s.cancel("b")
    s.cancel("never-seen")
    assert "a" in s.running  # the step in progress still owns the row
    out = s.schedule()
    assert sorted(q.rid for q in out.cancelled) == ["a", "b"]
    assert {q.rid: q.slot for q in out.cancelled} == {"a": 0, "b": -1}  # the core frees a's slot state
    assert not s.has_work() and s.free_slots == [0]


def test_a_finished_request_cannot_be_cancelled_later() -> None:
    s = Scheduler(1, 16)
    s.add(seq("a"))
    s.schedule()
    s.cancel("a")  # the client left in the same step the request finished
    assert s.finish("a") is not None
    assert s.schedule().cancelled == []  # reported once, as finished


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="max_slots"):
        Scheduler(0, 16)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(8, 4)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.integers(4, 12),
       st.lists(st.tuples(st.sampled_from(["add", "cancel", "finish", "step"]), st.integers(0, 9),
                          st.integers(1, 30)), max_size=60))
def test_random_traffic_keeps_the_invariants(slots: int, budget: int, ops: list[tuple[str, int, int]]) -> None:
    """Whatever the interleaving: never more slots than exist and no slot shared, never over budget,
    FIFO admission, prompts prefilled in order and exactly once, every request leaves exactly once."""
    s = Scheduler(slots, max(budget, slots))
    added: list[str] = []
    admitted: list[str] = []
    left: list[str] = []
    done_prompt: dict[str, int] = {}
    for op, i, n in ops:
        rid = f"r{i}"
        if op == "add" and rid not in added:
            added.append(rid)
            s.add(seq(rid, n))
        elif op == "cancel":
            s.cancel(rid)
        elif op == "finish" and rid in s.running and s.running[rid].prefilled:
            s.finish(rid)
            left.append(rid)
        elif op == "step":
            out = s.schedule()
            admitted += [q.rid for q in out.admitted]
            left += [q.rid for q in out.cancelled]
            used = [q.slot for q in s.running.values()]
            assert len(used) == len(set(used)) <= slots and set(used).isdisjoint(s.free_slots)
            assert out.num_batched_tokens == len(out.decode) + sum(c.length for c in out.prefill) <= s.budget
            for c in out.prefill:
                assert c.start == done_prompt.get(c.seq.rid, 0) and c.length >= 1
                done_prompt[c.seq.rid] = c.start + c.length
    assert admitted == [r for r in added if r in admitted]  # admitted in arrival order
    assert len(left) == len(set(left))  # nobody leaves twice
    still = set(s.running) | {q.rid for q in s.waiting}
    assert still.isdisjoint(left) and still | set(left) == set(added)


def test_a_burst_of_short_prompts_is_prefilled_in_one_step_beside_a_long_one() -> None:
    s = Scheduler(8, 256)
    s.add(seq("long", 200))
    for i in range(5):
        s.add(seq(f"s{i}", 10))
    out = s.schedule()
    got = {c.seq.rid: (c.start, c.length, c.completes_prompt) for c in out.prefill}
    assert all(got[f"s{i}"] == (0, 10, True) for i in range(5))  # every short prompt gets its first token now
    assert got["long"] == (0, 200, True) and out.num_batched_tokens == 250
    s2 = Scheduler(8, 64)
    s2.add(seq("long", 200))
    for i in range(5):
        s2.add(seq(f"s{i}", 10))
    out = s2.schedule()  # 64 tokens for six prompts: the short ones finish, the long one keeps going at its share
    got = {c.seq.rid: (c.start, c.length) for c in out.prefill}
    assert all(got[f"s{i}"] == (0, 10) for i in range(5)) and got["long"] == (0, 14)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.integers(6, 80), st.integers(1, 40),
       st.lists(st.tuples(st.sampled_from(["add", "add", "cancel", "finish", "step", "step"]), st.integers(0, 11),
                          st.integers(1, 60)), max_size=80))
def test_the_prefill_policy_keeps_its_invariants(slots: int, cap: int, call_tokens: int,
                                                 ops: list[tuple[str, int, int]]) -> None:
    """With the model-sized allowance (prefill.Budget): prompt tokens never exceed the allowance for the
    decoding rows, nor the step's budget; a prompt gets at most one chunk a step, in order; every prompt
    mid-prefill gets tokens whenever there are enough to go round (none starves); tokens are left over
    only when every admitted prompt got all it needed and no waiting request could take a slot."""
    from nextoken.serve.engine.prefill import Budget

    budget = Budget(max(cap, slots), call_tokens)
    s = Scheduler(slots, budget.cap, allowance=budget.allowance)
    added: list[str] = []
    done_prompt: dict[str, int] = {}
    for op, i, n in ops:
        rid = f"r{i}"
        if op == "add" and rid not in added:
            added.append(rid)
            s.add(seq(rid, n))
        elif op == "cancel":
            s.cancel(rid)
        elif op == "finish" and rid in s.running and s.running[rid].prefilled:
            s.finish(rid)
        elif op == "step":
            cancelling = set(s._cancel)
            mid = [q.rid for q in s.running.values() if not q.prefilled and q.rid not in cancelling]
            out = s.schedule()
            decoding = len(out.decode)
            allowed = min(budget.cap - decoding, budget.allowance(decoding))
            prefill = sum(c.length for c in out.prefill)
            assert prefill <= allowed and out.num_batched_tokens == decoding + prefill <= budget.cap
            rids = [c.seq.rid for c in out.prefill]
            assert len(rids) == len(set(rids))  # one chunk per prompt per step
            for c in out.prefill:
                assert c.start == done_prompt.get(c.seq.rid, 0) and c.length >= 1
                done_prompt[c.seq.rid] = c.start + c.length
            if allowed >= len(mid):
                assert set(mid) <= set(rids)  # nobody mid-prefill is starved
            if prefill < allowed:  # tokens left over: nothing could use them
                assert all(q.prefilled for q in s.running.values())
                assert not (s.waiting and s.free_slots)

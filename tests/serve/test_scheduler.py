"""The scheduler: FIFO admission up to the batch limit, cancellation between steps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nextoken.serve.scheduler import Scheduler, SeqInfo


def seq(rid: str) -> SeqInfo:
    return SeqInfo(rid, num_prompt_tokens=3, max_tokens=5, arrival=0.0)


def test_admits_in_order_up_to_capacity() -> None:
    s = Scheduler(2)
    for r in "abc":
        s.add(seq(r))
    out = s.schedule()
    assert [q.rid for q in out.prefill] == ["a", "b"] and (out.running, out.waiting) == (2, 1)
    assert not s.has_capacity()
    s.finish("a")
    assert [q.rid for q in s.schedule().prefill] == ["c"]


def test_cancel_running_and_waiting() -> None:
    s = Scheduler(1)
    s.add(seq("a"))
    s.add(seq("b"))
    s.schedule()
    s.cancel("a")
    s.cancel("b")
    s.cancel("never-seen")
    out = s.schedule()
    assert sorted(q.rid for q in out.cancelled) == ["a", "b"]
    assert not s.has_work()


def test_invalid_capacity() -> None:
    with pytest.raises(ValueError, match="max_running"):
        Scheduler(0)


def test_cancel_takes_effect_only_between_steps() -> None:
    s = Scheduler(2)
    s.add(seq("a"))
    s.schedule()
    s.cancel("a")
    assert "a" in s.running  # the step in progress still owns the row
    assert [q.rid for q in s.schedule().cancelled] == ["a"] and not s.running


def test_a_finished_request_cannot_be_cancelled_later() -> None:
    s = Scheduler(1)
    s.add(seq("a"))
    s.schedule()
    s.cancel("a")  # the client left in the same step the request finished
    assert s.finish("a") is not None
    assert s.schedule().cancelled == []  # reported once, as finished


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.lists(st.tuples(st.sampled_from(["add", "cancel", "finish", "step"]), st.integers(0, 9)),
                                   max_size=60))
def test_random_traffic_keeps_the_invariants(capacity: int, ops: list[tuple[str, int]]) -> None:
    """Whatever the interleaving: never over capacity, FIFO admission, every request leaves exactly once."""
    s = Scheduler(capacity)
    added: list[str] = []
    admitted: list[str] = []
    left: list[str] = []
    for op, i in ops:
        rid = f"r{i}"
        if op == "add" and rid not in added:
            added.append(rid)
            s.add(seq(rid))
        elif op == "cancel":
            s.cancel(rid)
        elif op == "finish" and rid in s.running:
            s.finish(rid)
            left.append(rid)
        elif op == "step":
            out = s.schedule()
            admitted += [q.rid for q in out.prefill]
            left += [q.rid for q in out.cancelled]
            assert out.running == len(s.running) <= capacity and out.waiting == len(s.waiting)
    assert admitted == [r for r in added if r in admitted]  # admitted in arrival order
    assert len(left) == len(set(left))  # nobody leaves twice
    still = set(s.running) | {q.rid for q in s.waiting}
    assert still.isdisjoint(left) and still | set(left) == set(added)

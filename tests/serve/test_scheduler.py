"""The scheduler: FIFO admission up to the batch limit, cancellation between steps."""

from __future__ import annotations

import pytest

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

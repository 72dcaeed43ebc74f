"""The engine-to-HTTP pipe (wire.ResponsePipe): batches arrive whole and in order, however the bytes come."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

import numpy as np
import pytest

from nextoken.serve.wire import Finished, FinishReason, ResponsePipe, StepOutput


def step(n: int, rows: int = 3) -> StepOutput:
    return StepOutput(rids=[f"r{i}" for i in range(rows)], token_ids=np.arange(rows) + n, time=float(n),
                      finished={"r0": Finished(FinishReason.LENGTH, n, n)} if n % 2 else {})


def test_a_reader_that_never_blocks_gets_whole_batches_in_order() -> None:
    pipe = ResponsePipe(mp.get_context("spawn"))
    os.set_blocking(pipe.fileno(), False)
    assert pipe.read_ready() == []  # nothing there: no wait
    big = [step(0, rows=20_000)]  # ~300 KB: more than a pipe holds, so the writer blocks part-way
    writer = threading.Thread(target=lambda: [pipe.put(b) for b in ([step(1)], big, [step(2), step(3)])])
    writer.start()
    got: list = []
    while len(got) < 3:
        got += pipe.read_ready()  # part of a batch is kept until the rest comes
    writer.join()
    assert [[m.time for m in b] for b in got] == [[1.0], [0.0], [2.0, 3.0]]
    assert np.array_equal(got[1][0].token_ids, np.arange(20_000))
    assert got[0][0].finished["r0"].reason == FinishReason.LENGTH and pipe._buf == bytearray()


def test_a_blocking_reader_waits_and_the_closed_writer_ends_it() -> None:
    pipe = ResponsePipe(mp.get_context("spawn"))
    with pytest.raises(TimeoutError):
        pipe.get(timeout=0.01)
    pipe.put([step(1)])
    pipe.put([step(2)])
    assert [pipe.get()[0].time, pipe.get()[0].time] == [1.0, 2.0]
    pipe._writer.close()
    with pytest.raises(EOFError):
        pipe.get()

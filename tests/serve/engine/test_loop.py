"""The engine process's loop in-process, over its real pipes: failures stay with the request that
caused them, cancels apply between steps, and every step travels as one message or fewer."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest

from nextoken.export.artifact import load_artifact
from nextoken.serve.config import ServeConfig
from nextoken.serve.engine.loop import EngineLoop
from nextoken.serve.wire import (
    AddRequest,
    CancelRequest,
    Envelope,
    ModelStatus,
    Pipes,
    RequestFailed,
    SamplingParams,
    StepOutput,
)


class Received:
    """Everything the engine sent, read off the response pipe by a thread."""

    def __init__(self, pipes: Pipes) -> None:
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self.batches = 0
        threading.Thread(target=self._read, args=(pipes,), daemon=True).start()

    def _read(self, pipes: Pipes) -> None:
        while True:
            batch = pipes.responses[0].get()
            self.batches += 1
            for m in batch:
                self.messages.put(m)

    def until(self, pred, timeout: float = 10.0) -> list:
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                m = self.messages.get(timeout=0.05)
            except queue.Empty:
                continue
            out.append(m)
            if pred(m):
                return out
        raise AssertionError(f"timed out; got {out}")


@pytest.fixture
def engine(tiny_artifact: Path):
    config = ServeConfig(artifact_dir=str(tiny_artifact), max_batch_size=2, max_num_batched_tokens=16,
                         threads=1, message_rate=10_000.0)
    pipes = Pipes(1)
    loop = EngineLoop(config, pipes, verified=load_artifact(tiny_artifact))
    loop.setup()
    got = Received(pipes)
    loop.start()
    status = got.until(lambda m: isinstance(m, ModelStatus))[-1]
    assert status.event == "loaded" and status.max_model_len == status.context
    return loop, got


def add(loop: EngineLoop, rid: str, ids: list[int], **params) -> None:
    loop._accept(Envelope(0, AddRequest(rid, ids, SamplingParams(**params), time.time(), loop.models.current.id)))


def finished(rid: str):
    return lambda m: (isinstance(m, StepOutput) and rid in m.finished) or (
        isinstance(m, RequestFailed) and m.rid == rid)


def test_a_request_the_model_cannot_take_fails_alone(engine) -> None:
    loop, got = engine
    add(loop, "too-long", [1] * 40, max_tokens=4)  # the tiny model's context is 32
    add(loop, "ok", [1, 2, 3], max_tokens=3, temperature=0)
    while loop.models.has_work():
        loop.step()
    msgs = got.until(finished("ok"))
    failed = [m for m in msgs if isinstance(m, RequestFailed)]
    assert [(f.rid, f.status, f.param) for f in failed] == [("too-long", 400, "prompt")]
    assert next(m for m in msgs if isinstance(m, StepOutput) and "ok" in m.finished).finished["ok"].reason == "length"


def test_a_failed_step_fails_its_requests_and_the_next_ones_run(engine, monkeypatch) -> None:
    loop, got = engine
    add(loop, "a", [1, 2, 3], max_tokens=10, temperature=0)
    add(loop, "b", [1, 2], max_tokens=10, temperature=0)
    loop.step()
    runner = loop.models.current.core.runner
    real = runner.decode

    def broken(*args, **kwargs):
        monkeypatch.setattr(runner, "decode", real)
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "decode", broken)
    loop.step()
    msgs = got.until(lambda m: isinstance(m, RequestFailed) and m.rid == "b")
    fails = {m.rid: m for m in msgs if isinstance(m, RequestFailed)}
    assert set(fails) == {"a", "b"} and all(f.status == 500 and "boom" in f.message for f in fails.values())
    assert not loop.models.has_work()
    add(loop, "c", [1, 2, 3], max_tokens=2, temperature=0)
    while loop.models.has_work():
        loop.step()
    got.until(finished("c"))


def test_cancel_applies_between_steps_and_every_step_is_at_most_one_message(engine) -> None:
    loop, got = engine
    add(loop, "long", [1, 2, 3], max_tokens=20, temperature=0, ignore_eos=True)
    steps = 0
    for _ in range(5):
        loop.step()
        steps += 1
    loop._accept(Envelope(0, CancelRequest("long")))
    loop.step()
    steps += 1
    msgs = got.until(finished("long"))
    outs = [m for m in msgs if isinstance(m, StepOutput)]
    tokens = sum(len(o.rids) for o in outs)
    assert tokens == 5 and outs[-1].finished["long"].reason == "cancelled"
    assert outs[-1].finished["long"].completion_tokens == 5
    assert got.batches <= steps + 1  # + the start-up status

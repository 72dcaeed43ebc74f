"""The worker's loop in-process, through LitServe's real ``run`` signature, with a recording pipe.

Each test targets one measured defect of LitServe 0.2.19's ``ContinuousBatchingLoop`` (issue 5):
an exception in ``add_request`` stopped admission for good, the payload of a ``FINISH_STREAMING``
output was dropped, and one inter-process message per token per request saturated the transport.
The assertions are about what crosses the process boundary, so an implementation that only looks
right when its methods are called directly cannot pass.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import pytest
from litserve.utils import LitAPIStatus

from nextoken.serve.api import CANCEL, BatchingLoop, GenerationAPI, OpenAISpec, ServerState
from nextoken.serve.metrics import ENV
from nextoken.serve.sampling import SamplingParams


class RecordingPipe:
    """Stands in for the worker -> API process pipe: keeps every message sent."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sent: list[list[tuple[str, Any, str]]] = []
        self.delay = delay  # seconds each send takes (a busy receiving process)

    def put(self, items: list[tuple[str, Any, str]]) -> None:
        time.sleep(self.delay)
        self.sent.append(items)

    def per_request(self) -> dict[str, list[tuple[Any, str]]]:
        """uid -> [(payload, status), ...] in arrival order, unpacked from the per-send batches."""
        out: dict[str, list[tuple[Any, str]]] = {}
        for batch in self.sent:
            for rid, payload, status in batch:
                out.setdefault(rid, []).append((payload, status))
        return out


class FakePipes:
    def __init__(self) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.responses = [RecordingPipe()]


class Worker:
    def __init__(self, artifact: str, max_batch_size: int = 4) -> None:
        self.pipes = FakePipes()
        self.api = GenerationAPI(artifact, max_batch_size=max_batch_size, device="cpu", threads=1,
                                 spec=OpenAISpec(artifact_dir=artifact, state=ServerState(max_batch_size, 0),
                                                 pipes=self.pipes),
                                 loop=BatchingLoop(), pipes=self.pipes)
        self.api.setup("cpu")
        self.loop = BatchingLoop()
        self.requests = self.pipes.requests
        self.transport = self.pipes.responses[0]
        self.steps = 0

    def submit(self, uid: str, payload: dict[str, Any]) -> None:
        self.requests.put((0, uid, time.monotonic(), payload))

    def run_until(self, done: Any, limit: int = 5000) -> None:
        for _ in range(limit):
            if done():
                return
            if self.loop._inbox is not None and self.requests.empty() and self.loop._inbox.empty() \
                    and not self.api.has_active_requests():
                time.sleep(0.002)  # idle: the sender thread may still be delivering (run() would block 1 s)
                continue
            active = self.api.has_active_requests()
            self.loop.run(self.api, "cpu", 0, None, None, {}, None)  # LitServe's queues: unused
            self.steps += active
        raise AssertionError("the loop never got there")

    def finished(self, *uids: str) -> bool:
        got = self.transport.per_request()
        return all(any(s != LitAPIStatus.OK for _, s in got.get(u, [])) for u in uids)

    def close(self) -> None:
        self.requests.put(None)  # ends the reader thread


def payload(worker: Worker, text: str, **params: Any) -> dict[str, Any]:
    core = worker.api.models.current
    ids = [core.eos_id] + core.tokenizer.encode(text, add_special_tokens=False).ids
    return {"prompt_ids": ids, "text": text, "params": SamplingParams(**params).__dict__, "arrival": time.time(),
            "model": core.artifact.model_id}


@pytest.fixture
def worker(serve_artifact, monkeypatch) -> Iterator[Worker]:
    monkeypatch.delenv(ENV, raising=False)  # no metrics directory in-process
    w = Worker(str(serve_artifact))
    yield w
    w.close()


def tokens_of(events: list[tuple[Any, str]]) -> list[int]:
    return [t for data, _ in events if isinstance(data, dict) for t in data.get("token_ids", [])]


def test_a_failing_add_request_answers_that_request_and_admission_goes_on(worker: Worker) -> None:
    bad = payload(worker, "the", max_tokens=3)
    bad["params"] = {**bad["params"], "no_such_setting": 1}  # SamplingParams(**params) raises TypeError
    worker.submit("bad", bad)
    worker.submit("good", payload(worker, "the", max_tokens=5, temperature=0))
    worker.run_until(lambda: worker.finished("bad", "good"))
    got = worker.transport.per_request()
    assert [s for _, s in got["bad"]] == [LitAPIStatus.ERROR]
    assert len(tokens_of(got["good"])) == 5
    worker.submit("later", payload(worker, "the", max_tokens=2, temperature=0))  # still admitting
    worker.run_until(lambda: worker.finished("later"))


def test_the_finishing_message_carries_its_tokens(worker: Worker) -> None:
    worker.submit("r", payload(worker, "the cat", max_tokens=9, temperature=0, ignore_eos=True))
    worker.run_until(lambda: worker.finished("r"))
    events = worker.transport.per_request()["r"]
    last, status = events[-1]
    assert status == LitAPIStatus.FINISH_STREAMING and last["finish_reason"] == "length"
    assert last["token_ids"]  # LitServe dropped this payload: the last token(s) never reached the client
    assert len(tokens_of(events)) == 9 and last["completion_tokens"] == 9


def test_one_message_per_step_at_most_and_every_token_arrives_in_order(worker: Worker) -> None:
    n, new = 4, 40
    for i in range(n):
        worker.submit(f"r{i}", payload(worker, "hello", max_tokens=new, temperature=0, ignore_eos=True))
    worker.run_until(lambda: worker.finished(*(f"r{i}" for i in range(n))))
    got = worker.transport.per_request()
    # Greedy and the same prompt: every request's tokens are identical, so order and completeness show.
    streams = [tokens_of(got[f"r{i}"]) for i in range(n)]
    assert all(len(s) == new for s in streams) and all(s == streams[0] for s in streams)
    # Stock LitServe sends one message per token per request: n * new = 160 here.
    assert len(worker.transport.sent) <= worker.steps < n * new / 2


def test_a_cancel_between_steps_ends_the_request_at_once(worker: Worker) -> None:
    worker.submit("long", payload(worker, "the", max_tokens=400, ignore_eos=True))
    worker.run_until(lambda: len(tokens_of(worker.transport.per_request().get("long", []))) >= 1)
    worker.submit("long", {CANCEL: True})
    worker.run_until(lambda: worker.finished("long"))
    events = worker.transport.per_request()["long"]
    assert events[-1][0]["finish_reason"] == "cancelled"
    assert len(tokens_of(events)) < 400
    assert not worker.api.has_active_requests()


def test_a_failing_engine_step_fails_its_requests_and_the_worker_keeps_serving(worker: Worker, monkeypatch) -> None:
    """LitServe's loop lets an exception in ``step`` end the worker: every client would wait forever."""
    engine = worker.api.models.current.engine
    real = engine.decode
    calls = {"n": 0}

    def flaky(tokens):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated ONNX Runtime failure")
        return real(tokens)

    monkeypatch.setattr(engine, "decode", flaky)
    for i in range(2):
        worker.submit(f"r{i}", payload(worker, "the", max_tokens=50, ignore_eos=True))
    worker.run_until(lambda: worker.finished("r0", "r1"))
    got = worker.transport.per_request()
    for i in range(2):
        assert got[f"r{i}"][-1][1] == LitAPIStatus.ERROR
    assert not worker.api.has_active_requests() and engine.batch_size == 0
    worker.submit("after", payload(worker, "the", max_tokens=4, temperature=0))
    worker.run_until(lambda: worker.finished("after"))
    assert len(tokens_of(worker.transport.per_request()["after"])) == 4


def test_a_slow_transport_does_not_slow_the_engine(worker: Worker) -> None:
    """Sends happen on their own thread: the engine keeps stepping and later messages carry more tokens."""
    worker.transport.delay = 0.02  # 20 ms per message, about 60 engine steps of this model
    worker.submit("r", payload(worker, "the", max_tokens=200, temperature=0, ignore_eos=True))
    worker.run_until(lambda: worker.finished("r"))
    assert len(tokens_of(worker.transport.per_request()["r"])) == 200
    # Sending from the engine's thread made every step wait for a message: 200 steps x 20 ms = 4 s.
    assert len(worker.transport.sent) < worker.steps / 4

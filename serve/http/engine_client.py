"""The HTTP side's handle on the engine process: submit, cancel, per-request streams, a dead engine noticed.

One ``EngineClient`` per HTTP process. ``submit`` puts an ``AddRequest`` on the request pipe and
returns a ``RequestStream``; the event loop, watching the response pipe, takes the engine's messages
off it and hands each request its rows (``StepOutput`` carries every row of a step; a
request's stream keeps only its own). A stream's ``next()`` returns everything that arrived for it
since the last call in one ``Update``, so a handler that falls behind catches up in one go instead
of once per token. One task looks at ``SharedState.engine_failed`` (set by the launcher when the engine
process dies) every ``check_s`` and then wakes every waiting stream to fail: its tokens would never come.

Admission is decided here, on the HTTP side, from a counter shared by every HTTP process
(``SharedState.inflight``): a request beyond capacity is refused before its body is read or
anything is sent to the engine, so a 429 costs microseconds however loaded the engine is.

Convert: wire ``StepOutput`` rows --> per-request ``Update``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nextoken.serve.wire import (
    AddRequest,
    CancelRequest,
    Envelope,
    Finished,
    ModelStatus,
    Pipes,
    ReloadRequest,
    RequestFailed,
    Started,
    StepOutput,
)

logger = logging.getLogger("nextoken.serve")


class EngineDead(RuntimeError):
    """The engine process died: a waiting request's tokens will never come."""


class SharedState:
    """Shared by the launcher (main process) and the HTTP processes; created before they fork."""

    def __init__(self, max_inflight: int) -> None:
        self.inflight = mp.Value("i", 0)
        # POST requests whose answer is still being written: an engine request can be done while its
        # stream still sits in a slow client's socket, and a drain must wait for that too.
        self.open_posts = mp.Value("i", 0)
        self.draining = mp.Event()
        self.engine_failed = mp.Event()  # set by the launcher when the engine process died
        self.max_inflight = max_inflight

    def try_admit(self, n: int = 1) -> bool:
        """Take ``n`` places if there is room (every choice of a request is one engine request)."""
        with self.inflight.get_lock():
            if self.inflight.value + n > self.max_inflight:
                return False
            self.inflight.value += n
            return True

    def release(self, n: int = 1) -> None:
        with self.inflight.get_lock():
            self.inflight.value -= n

    def busy(self) -> bool:
        """Anything a drain waits for: engine requests running or queued, or answers still being written."""
        return self.inflight.value > 0 or self.open_posts.value > 0


@dataclass
class Update:
    """What arrived for one request since the last ``next()``."""

    token_ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # wall-clock time of each token
    logprobs: list[float] | None = None
    top_ids: list[np.ndarray] | None = None  # per token: (N,) ids
    top_logprobs: list[np.ndarray] | None = None
    drafted: list[bool] | None = None  # per token: an accepted draft token (None: none of them was)
    started: Started | None = None
    finished: Finished | None = None
    failed: RequestFailed | None = None

    @property
    def done(self) -> bool:
        return self.finished is not None or self.failed is not None


class RequestStream:
    def __init__(self, rid: str, client: EngineClient) -> None:
        self.rid = rid
        self.client = client
        self._pending = Update()
        self._event = asyncio.Event()
        self.closed = False

    def _take(self, out: StepOutput, i: int) -> None:
        u = self._pending
        u.token_ids.append(int(out.token_ids[i]))
        u.times.append(out.time)
        if out.drafted is not None and u.drafted is None:
            u.drafted = [False] * (len(u.token_ids) - 1)
        if u.drafted is not None:
            u.drafted.append(out.drafted is not None and bool(out.drafted[i]))
        if out.logprobs is not None and not np.isnan(out.logprobs[i]):  # NaN: a row that did not ask
            if u.logprobs is None:
                u.logprobs = []
            u.logprobs.append(float(out.logprobs[i]))
            if out.top_ids is not None and out.top_ids[i] is not None:
                if u.top_ids is None:
                    u.top_ids, u.top_logprobs = [], []
                u.top_ids.append(out.top_ids[i])
                u.top_logprobs.append(out.top_logprobs[i])
        self._event.set()

    def _set(self, **fields: Any) -> None:
        for k, v in fields.items():
            setattr(self._pending, k, v)
        self._event.set()

    async def next(self) -> Update:
        """Everything new for this request (waits until there is something)."""
        if not self._event.is_set():
            await self._event.wait()  # set by the dispatcher, or by the client's watch when the engine died
        if self.client.dead and not self._pending.done and not self._pending.token_ids:
            raise EngineDead("the engine process died")
        self._event.clear()
        update, self._pending = self._pending, Update()
        return update

    def cancel(self) -> None:
        """The client left (or its text hit a stop string): drop the request from the engine."""
        if not self.closed:
            self.client.cancel(self.rid)
            self.close()

    def close(self) -> None:
        self.closed = True
        self.client.streams.pop(self.rid, None)


class EngineClient:
    def __init__(self, pipes: Pipes, state: SharedState, *, frontend: int = 0, check_s: float = 0.5) -> None:
        self.pipes = pipes
        self.state = state
        self.frontend = frontend
        self.check_s = check_s
        self.streams: dict[str, RequestStream] = {}
        self.status: ModelStatus | None = None  # the version taking new requests, as the engine said
        self.status_changed: list[Any] = []  # callbacks(status) run on the event loop
        self._outq: queue.SimpleQueue = queue.SimpleQueue()
        self._started = False
        self.dead = False  # the engine process died: every waiting stream is woken to fail
        self._loop: asyncio.AbstractEventLoop | None = None

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("EngineClient lives in one HTTP process; it is not sent to others")

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the writer thread and watch the response pipe (once, in the HTTP process, from its event loop)."""
        if self._started:
            return
        self._started = True
        self._loop = loop or asyncio.get_running_loop()
        threading.Thread(target=self._write, daemon=True, name="engine-writer").start()
        pipe = self.pipes.responses[self.frontend]
        os.set_blocking(pipe.fileno(), False)
        self._loop.add_reader(pipe.fileno(), self._read)
        self._loop.create_task(self._watch())

    async def _watch(self) -> None:
        """One timer for every stream: when the launcher marks the engine dead, wake them all to fail."""
        while not self.state.engine_failed.is_set():
            await asyncio.sleep(self.check_s)
        self.dead = True
        for stream in list(self.streams.values()):
            stream._event.set()

    # --- requests ------------------------------------------------------------------------------
    def submit(self, req: AddRequest) -> RequestStream:
        stream = RequestStream(req.rid, self)
        self.streams[req.rid] = stream
        self._outq.put(req)
        if self.dead:
            stream._event.set()  # fails at its first next()
        return stream

    def cancel(self, rid: str) -> None:
        self._outq.put(CancelRequest(rid))

    def reload(self) -> None:
        self._outq.put(ReloadRequest())

    # --- the pipes: a writer thread, the reader on the event loop ---------------------------------
    def _write(self) -> None:
        # One thread does every put, in order (a request's cancel never overtakes it), and the event
        # loop never blocks on a full pipe.
        while True:
            msg = self._outq.get()
            try:
                self.pipes.requests.put(Envelope(self.frontend, msg))
            except (EOFError, OSError, BrokenPipeError):
                return

    def _read(self) -> None:
        # On the event loop, whenever the pipe is readable (a thread blocked on it cost a wake-up and a
        # hand-over to the loop per engine step).
        pipe = self.pipes.responses[self.frontend]
        try:
            batches = pipe.read_ready()
        except (EOFError, OSError):  # the engine side closed: the server is stopping
            self._loop.remove_reader(pipe.fileno())
            return
        for batch in batches:
            self._dispatch(batch)

    def _dispatch(self, batch: list[Any]) -> None:
        streams = self.streams
        for msg in batch:
            match msg:
                case StepOutput():
                    for i, rid in enumerate(msg.rids):
                        s = streams.get(rid)
                        if s is not None:  # gone = the client left; its cancel is on the way
                            s._take(msg, i)
                    for rid, st in msg.started.items():
                        if rid in streams:
                            streams[rid]._set(started=st)
                    for rid, fin in msg.finished.items():
                        if rid in streams:
                            streams[rid]._set(finished=fin)
                case RequestFailed(rid=rid) if rid in streams:
                    streams[rid]._set(failed=msg)
                case ModelStatus():
                    self.status = msg
                    for callback in self.status_changed:
                        callback(msg)

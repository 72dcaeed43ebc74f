"""The scheduler: who runs next. Pure bookkeeping: ids and counts, no tensors, no tokenizer.

Requests wait in arrival order and join the running batch as soon as a slot is free; a
cancelled request is removed between steps (running or waiting); a finished one frees its slot
in the same step. Admission beyond the queue limit is refused by the HTTP layer before a
request ever reaches here (it answers 429 at once), so the waiting queue here is bounded too.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class SeqInfo:
    rid: str
    num_prompt_tokens: int
    max_tokens: int
    arrival: float  # wall-clock time the HTTP layer received it (time.time())
    admitted: float | None = None  # wall-clock time it joined the running batch
    num_generated: int = 0


@dataclass
class SchedulerOutput:
    """What the engine runs this step."""

    prefill: list[SeqInfo] = field(default_factory=list)  # joining the batch now
    cancelled: list[SeqInfo] = field(default_factory=list)  # to drop before the step (were running or waiting)
    running: int = 0  # rows in the batch after this step's changes
    waiting: int = 0


class Scheduler:
    def __init__(self, max_running: int) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        self.max_running = max_running
        self.waiting: deque[SeqInfo] = deque()
        self.running: dict[str, SeqInfo] = {}  # rid -> info, in join order
        self._cancel: set[str] = set()

    def add(self, seq: SeqInfo) -> None:
        self.waiting.append(seq)

    def cancel(self, rid: str) -> None:
        """Mark for removal; applied at the next ``schedule()`` (between engine steps)."""
        if rid in self.running or any(s.rid == rid for s in self.waiting):
            self._cancel.add(rid)

    def finish(self, rid: str) -> SeqInfo | None:
        self._cancel.discard(rid)
        return self.running.pop(rid, None)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def has_capacity(self) -> bool:
        return len(self.running) < self.max_running

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self._cancel:
            for rid in list(self._cancel):
                seq = self.running.pop(rid, None)
                if seq is None:
                    seq = next((s for s in self.waiting if s.rid == rid), None)
                    if seq is not None:
                        self.waiting.remove(seq)
                if seq is not None:
                    out.cancelled.append(seq)
            self._cancel.clear()
        now = time.time()
        while self.waiting and self.has_capacity():
            seq = self.waiting.popleft()
            seq.admitted = now
            self.running[seq.rid] = seq
            out.prefill.append(seq)
        out.running = len(self.running)
        out.waiting = len(self.waiting)
        return out

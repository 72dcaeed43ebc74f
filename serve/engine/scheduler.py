"""The scheduler: who runs next and how much. Pure bookkeeping: ids, counts and slots; no tensors.

Every step spends a token budget (``max_num_batched_tokens``, vLLM's name): first one token for
each running sequence that is decoding, then prompt tokens, at most ``allowance(decoding rows)``
of what is left (``prefill.Budget``: sized to the model, so a step with prompts costs a bounded
multiple of a decode step). A prompt longer than its share is prefilled over several steps
(chunked prefill, as vLLM and llama.cpp's ``-ub`` do), so a burst of long prompts never stalls
the streams already running for more than one budget's worth of compute.

NOTE(issue 22) on sharing a step's prompt tokens: prompts mid-prefill first, then waiting ones in
arrival order (while slots are free and the prompts already in the step, each counted at most
``MIN_CHUNK`` tokens, leave some over) each get an equal share; what a short prompt leaves of
its share goes to those that need the fewest tokens to finish (more first tokens per step). So a
burst of short prompts is prefilled in one step (and one runner call: ``prefill.plan_calls``)
even behind a long prompt, which goes on at its share meanwhile and is never starved. Each prompt
gets at most one chunk a step, in order. A request gets a cache slot when it starts prefilling and
keeps it until it leaves; before its first chunk, the prefix cache may supply the KV of the
prompt's leading blocks (``PrefixCache.match``), which are then never computed.

A cancelled request is removed between steps, running or waiting; a finished one frees its slot
in the same step. Admission beyond the queue limit is refused by the HTTP side before a request
ever reaches here (429 at once), so the waiting queue is bounded too.

Convert: ``Sequence`` (added by the core) --> ``SchedulerOutput`` (what the runner runs this step).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

MIN_CHUNK = 16  # the smallest share of a step's prompt tokens (prefill.MIN_CHUNK)


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it."""

    rid: str
    prompt_ids: list[int]
    max_tokens: int
    arrival: float  # wall-clock time the HTTP side received it (time.time())
    slot: int = -1  # its cache slot while it holds one
    num_computed: int = 0  # prompt tokens whose KV is in the slot (cached or prefilled)
    num_cached: int = 0  # prompt tokens that came from the prefix cache
    num_written: int = 0  # prompt tokens whose KV it wrote into the prefix cache
    admitted: float | None = None  # wall-clock time it got a slot
    prefix_keys: list[int] = field(default_factory=list)  # prefix-cache blocks copied into the slot
    use_prefix_cache: bool = True  # False when every prompt position's logits are wanted (prompt logprobs)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)


@dataclass
class Chunk:
    """A piece of one prompt to prefill this step: prompt_ids[start:start+length] into seq.slot."""

    seq: Sequence
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == self.seq.num_prompt


@dataclass
class SchedulerOutput:
    """What the runner does this step, in this order: drop, copy cached prefixes, prefill, decode."""

    cancelled: list[Sequence] = field(default_factory=list)  # removed before the step (running or waiting)
    admitted: list[Sequence] = field(default_factory=list)  # got a slot this step (prefix copies happen now)
    prefill: list[Chunk] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)  # one token each
    num_batched_tokens: int = 0

    @property
    def empty(self) -> bool:
        return not (self.cancelled or self.prefill or self.decode)


class Scheduler:
    def __init__(self, max_slots: int, max_num_batched_tokens: int, prefix_cache: PrefixMatcher | None = None,
                 allowance: Callable[[int], int] | None = None) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if max_num_batched_tokens < max_slots:
            # every decoding row needs one token of the budget every step
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_slots ({max_slots})")
        self.max_slots = max_slots
        self.budget = max_num_batched_tokens
        self.prefix_cache = prefix_cache
        self.allowance = allowance  # decoding rows -> prompt tokens this step may take (None: what is left)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}  # rid -> sequence, in admission order
        self.free_slots: list[int] = list(range(max_slots))  # lowest first: decode calls cover 0..highest
        self._cancel: set[str] = set()

    # --- requests ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def cancel(self, rid: str) -> None:
        """Mark for removal; applied at the next ``schedule()`` (between engine steps)."""
        if rid in self.running or any(s.rid == rid for s in self.waiting):
            self._cancel.add(rid)

    def finish(self, rid: str) -> Sequence | None:
        """A sequence ended (end-of-text, a stop token, its length): its slot is free for the next step."""
        self._cancel.discard(rid)
        seq = self.running.pop(rid, None)
        if seq is not None:
            self._free(seq)
        return seq

    def _free(self, seq: Sequence) -> None:
        # seq.slot keeps its value: the core still releases that slot's own state after this step's schedule
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            self.free_slots.sort()

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def has_capacity(self) -> bool:
        return bool(self.free_slots)

    # --- the step ------------------------------------------------------------------------------
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
                    self._free(seq)
                    out.cancelled.append(seq)
            self._cancel.clear()

        # Running sequences first: one token for every row that is decoding.
        for seq in self.running.values():
            if seq.prefilled:
                out.decode.append(seq)
        left = self.budget - len(out.decode)
        if self.allowance is not None:
            left = min(left, self.allowance(len(out.decode)))
        # Then prompts: those mid-prefill, then waiting ones (admitted now, in order) while slots are free and
        # the prompts already in this step leave tokens over (each counted at most MIN_CHUNK).
        prefilling = [seq for seq in self.running.values() if not seq.prefilled]
        demand = sum(min(seq.num_prompt - seq.num_computed, MIN_CHUNK) for seq in prefilling)
        now = time.time()
        while self.waiting and self.free_slots and demand < left:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop(0)
            seq.admitted = now
            if self.prefix_cache is not None and seq.use_prefix_cache:
                cached, keys = self.prefix_cache.match(seq.prompt_ids)
                seq.num_computed = seq.num_cached = cached
                seq.prefix_keys = keys
            self.running[seq.rid] = seq
            out.admitted.append(seq)
            prefilling.append(seq)
            demand += min(seq.num_prompt - seq.num_computed, MIN_CHUNK)
        chunks: dict[str, Chunk] = {}
        if prefilling and left > 0:
            share = max(left // len(prefilling), 1)
            for seq in prefilling:  # an equal share each...
                n = min(share, seq.num_prompt - seq.num_computed, left)
                if n > 0:
                    chunks[seq.rid] = Chunk(seq, seq.num_computed, n)
                    left -= n
            def need(seq: Sequence) -> int:
                c = chunks.get(seq.rid)
                return seq.num_prompt - seq.num_computed - (c.length if c else 0)

            for seq in sorted(prefilling, key=need):  # ...and the rest to those closest to their first token
                c = chunks.get(seq.rid)
                more = min(left, need(seq))
                if more > 0:
                    chunks[seq.rid] = Chunk(seq, seq.num_computed, (c.length if c else 0) + more)
                    left -= more
        for seq in prefilling:
            c = chunks.get(seq.rid)
            if c is not None:
                out.prefill.append(c)
                seq.num_computed += c.length  # the runner writes these positions this step
        out.num_batched_tokens = len(out.decode) + sum(c.length for c in out.prefill)
        return out


class PrefixMatcher(Protocol):
    """What the scheduler needs from a prefix cache (``prefix_cache.PrefixCache`` implements it)."""

    def match(self, prompt_ids: list[int]) -> tuple[int, list[int]]:
        """(number of leading prompt tokens whose KV is cached, the cache's keys for those blocks)."""

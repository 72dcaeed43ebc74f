"""Prefill policy: how many prompt tokens a step may take, and how a step's chunks become runner calls.

NOTE(issue 22) on first tokens under load. A call costs a fixed part (reading every weight once,
the kernels' launch, the step's Python) plus a part per token. On the 91M-parameter model the fixed
part is ~15 ms, so 32 new prompts prefilled one call each took ~0.5-1 s before the first of them
saw a token. Now:

* ``plan_calls`` groups the step's first chunks (position 0 onwards) into as few calls as pay:
  contiguous runs of slots, cost = fixed + rows x longest chunk in tokens, split where padding
  would cost more than another call. A later chunk of a long prompt goes alone (ONNX Runtime's
  attention kernel batches rows of several tokens only when none has a past).
* ``Budget`` sizes a step's prompt tokens to the model: while rows decode, a step may add
  ``2 x decoding rows + the call's fixed cost in tokens`` of prefill, so a step with prefill takes
  at most ~3x a decode-only step (ITL p99 < 3x p50); with no row decoding nobody waits on a
  token, and a whole burst of prompts goes in one step (up to ``cap`` tokens). The fixed cost and
  the per-token cost are measured on the loaded model at start-up (``calibrate``).

This module knows nothing about requests or sampling: slots, lengths and token counts only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_CHUNK = 16  # the smallest prompt chunk worth a share of a step (one prefix-cache block by default)
MAX_CAP = 8192  # tokens one step may prefill at most (logits are tokens x vocabulary floats)
LOGITS_BYTES = 256 << 20  # bound on one step's prefill logits
STEP_OVERHEAD_S = 0.0004  # the step's own Python beside the call (scheduling, sampling): RESULTS.md, issue 11
PREFILL_PER_DECODE_ROW = 2  # prompt tokens a step may add per decoding row (a full step costs <= ~3x)


@dataclass(frozen=True)
class Costs:
    """A runner call's cost on this model and machine: ``call_s + tokens x token_s``."""

    call_s: float
    token_s: float

    @property
    def call_tokens(self) -> int:
        """The fixed part of a call, in tokens of compute (what one more call costs)."""
        return int(min(256, max(1, round(self.call_s / self.token_s))))


def calibrate(runner: Any, repeats: int = 3) -> Costs:
    """Time one decode row and a 33-token prefill in slot 0 (free at start-up); the fastest of ``repeats``."""
    n = min(33, runner.spec.max_len)
    lengths = np.zeros(runner.spec.max_slots, dtype=np.int64)
    one, many = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.decode(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), lengths)
        t1 = time.perf_counter()
        runner.prefill(0, [0] * n, 0)
        t2 = time.perf_counter()
        one.append(t1 - t0)
        many.append(t2 - t1)
    token_s = max((min(many) - min(one)) / max(1, n - 1), 1e-7)
    call_s = max(min(one) - token_s, 0.0) + STEP_OVERHEAD_S
    return Costs(call_s, token_s)


@dataclass(frozen=True)
class Budget:
    """A step's tokens: ``cap`` in all; prompt tokens ``allowance(decoding rows)`` of it (see the note)."""

    cap: int
    call_tokens: int | None = None  # None: a fixed budget (--max-num-batched-tokens): prompts take what is left

    def allowance(self, decoding: int) -> int:
        left = self.cap - decoding
        if self.call_tokens is None or decoding == 0:
            return left
        return min(left, max(MIN_CHUNK, PREFILL_PER_DECODE_ROW * decoding + self.call_tokens))

    def describe(self) -> str:
        if self.call_tokens is None:
            return f"{self.cap} tokens per step (--max-num-batched-tokens)"
        return (f"prompt tokens per step: {PREFILL_PER_DECODE_ROW} x decoding rows + {self.call_tokens} while rows "
                f"decode, up to {self.cap} when none does")


def auto_cap(max_slots: int, vocab_size: int) -> int:
    return int(min(MAX_CAP, max(max_slots + MIN_CHUNK, LOGITS_BYTES // (4 * vocab_size))))


def plan_calls(chunks: Sequence[tuple[int, int, int]], lengths: np.ndarray, call_tokens: int) -> list[list[int]]:
    """Group a step's chunks into runner calls; returns lists of indices into ``chunks``.

    ``chunks`` are (slot, start, length). First chunks (start 0) may share a call over a contiguous
    run of slots whose other rows are empty (``lengths == 0``); the grouping minimises
    sum(call_tokens + rows x longest) by dynamic programming over the slots in order. Any other
    chunk is a call of its own.
    """
    alone = [[i] for i, (_s, start, _n) in enumerate(chunks) if start > 0]
    first = sorted((slot, n, i) for i, (slot, start, n) in enumerate(chunks) if start == 0)
    k = len(first)
    best = [0.0] + [float("inf")] * k  # best[j]: cheapest cover of first[:j]
    cut = [0] * (k + 1)
    for j in range(1, k + 1):
        longest = 0
        for i in range(j, 0, -1):  # the call covers first[i-1 .. j-1]
            if i < j and np.any(lengths[first[i - 1][0] + 1:first[i][0]] > 0):
                break  # a sequence sits between two chunks: no call may span it
            longest = max(longest, first[i - 1][1])
            rows = first[j - 1][0] - first[i - 1][0] + 1
            cost = best[i - 1] + call_tokens + rows * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    groups: list[list[int]] = []
    j = k
    while j > 0:
        groups.append([first[x][2] for x in range(cut[j], j)])
        j = cut[j]
    return groups[::-1] + alone

"""Speculative decoding: guess a few tokens, score them all in one target call, keep what the target agrees with.

A decoding row whose request has a draft becomes a verification row: its last token and the draft
d_0 .. d_{m-1} go through the runner as one multi-token row at the slot's length (``Runner.prefill``,
the call a later prompt chunk uses), which gives the target's logits after each of them, (m + 1, V).
Then, round j = 0, 1, ...: every row still alive samples one token from its logits j through the
core's own path (``EngineCore._emit``: the sampler with every transform, grammar masks, logprobs,
stop ids, max_tokens, finishing), exactly as a decode step would; a row stays alive while the token
equals its draft's d_j. So a row emits the accepted prefix of its draft plus one token (the target's
correction, or the bonus after a fully accepted draft), and its slot's length advances by exactly
what it emitted: the columns written for rejected draft tokens lie past it and are overwritten by
the next call before any query reads them (a query at position p reads keys 0..p, all of them then
written by accepted tokens or by that same call).

Drafts come from the n-gram lookup (``ngram_draft``: the request's own prompt and output) or from a
draft model (``draft.py``: a second artifact with the target's tokenizer, its own runner and slots).

NOTE on the acceptance rule. The drafts here are point masses: the n-gram lookup proposes one token
per position, and so does the draft model (its argmax). For a point-mass draft q = delta(d), the rule of
Leviathan et al. / Chen et al. accepts d with probability min(1, p(d) / q(d)) = p(d) and otherwise
draws from norm(max(0, p - q)), which is p with d removed, renormalised. Drawing x ~ p and accepting
when x == d (else emitting x) has exactly that law: P(x = d) = p(d), and x given x != d is p without
d, renormalised. At temperature 0 p is the argmax's point mass, so this is "accept the longest prefix
equal to the target's argmax". p is the request's full sampling transform (bias, min_tokens,
penalties over the tokens emitted so far, grammar, temperature, top-k/p, min-p), since each round
is the sampler's ordinary draw; a seeded request uses one uniform of its own generator per token
emitted, as without speculation, so it gives the same tokens with or without it.

Numbers: ONNX Runtime's multi-token row and its one-token decode differ by float rounding (~1e-7 in
the logits on the test models), so logprobs agree to that and a greedy argmax could differ only on a
tie that close.

When it pays: a draft model's draft length follows each request's acceptance (from half of
``num_speculative_tokens``, +2 after a draft accepted whole, -1 otherwise, down to 1), so a draft that
disagrees costs one draft call a step while it is judged. A request stops drafting for
``REPROBE_TOKENS`` tokens once its accepted tokens fall below what its drafts cost, in decode steps:
the m more tokens of the target's row (``break_even``, timed at start-up), the verification's own
Python work and, with a draft model, its whole proposal (both timed as they run: the draft's Python
costs more than its calls on small models). A draft model's worth belongs to the pair more than to
the request, so its failed judgement also pauses it for every request, for 64 tokens generated and
twice as long after each failure in a row (up to 8192). No row drafts while more than ``disable_by_batch_size``
requests run (each drafting row is a runner call of its own; ONNX Runtime's attention batches
multi-token rows only without a past).

This module knows nothing about HTTP, text or tokenizers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nextoken.serve.engine.prefill import STEP_OVERHEAD_S

JUDGE_AFTER = 8  # drafts a request makes before its acceptance is judged
REPROBE_TOKENS = 64  # tokens a request generates without drafting once judged not worth it, then tries again
MAX_BACKOFF_TOKENS = 8192  # a draft model judged not worth it again and again waits at most this long


@dataclass(frozen=True)
class SpecOptions:
    """The engine's share of ServeConfig's speculative flags (serve/config.py says what each means)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    disable_by_batch_size: int = 1
    draft_model: str = ""  # method "draft": the draft's artifact folder


@dataclass
class SpecCounts:
    """Drafts and what the target accepted of them (vLLM's spec_decode counters)."""

    drafts: int = 0  # verification rows
    draft_tokens: int = 0  # tokens proposed
    accepted: int = 0  # proposed tokens the target accepted
    per_pos: list[int] = field(default_factory=list)  # accepted tokens by position in the draft (0 = first)

    def add(self, other: SpecCounts) -> None:
        self.drafts += other.drafts
        self.draft_tokens += other.draft_tokens
        self.accepted += other.accepted
        self.per_pos = [a + b for a, b in zip(self.per_pos, other.per_pos, strict=True)]


def ngram_draft(tokens: np.ndarray, n_max: int, n_min: int, k: int) -> np.ndarray:
    """Prompt lookup: the last n tokens (n from ``n_max`` down to ``n_min``) found earlier in ``tokens`` (N,);
    the up to ``k`` tokens that followed their latest earlier occurrence (empty when none matched).

    One pass over the tokens finds where the last token occurred before (each such place must be followed
    by a token); the candidates are then extended backwards together, one comparison per n.
    """
    N = tokens.size
    if n_min >= N:
        return tokens[:0]
    ends = np.flatnonzero(tokens[:N - 1] == tokens[N - 1])  # (c,) where a match would end
    if not ends.size:
        return tokens[:0]
    run = np.ones(ends.size, dtype=np.int64)  # matched length so far, per candidate
    alive = np.ones(ends.size, dtype=bool)
    for i in range(1, min(n_max, N - 1)):
        ok = alive & (ends >= i)
        ok[ok] = tokens[ends[ok] - i] == tokens[N - 1 - i]
        run += ok
        alive = ok
        if not alive.any():
            break
    best = run.max()
    if best < n_min:
        return tokens[:0]
    i = int(ends[np.flatnonzero(run == best)[-1]]) + 1  # the latest of the longest
    return tokens[i:i + k]


def _fastest(call: Any, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times)


def break_even(runner: Any, k: int) -> tuple[float, float]:
    """Accepted tokens per draft token a draft must yield to pay for the target's longer row, and a decode
    step's seconds, from calls timed in slot 0 (free at start-up) past a short history: what a (k + 1)-token
    row costs over a one-token decode call, per draft token, over a decode step."""
    k = max(1, min(k, (runner.spec.max_len - 2) // 2))
    lengths = np.zeros(runner.spec.max_slots, dtype=np.int64)
    runner.prefill(0, [0] * (k + 1), 0)
    lengths[0] = k + 1
    zero = np.zeros(1, dtype=np.int64)
    one = _fastest(lambda: runner.decode(zero, zero, lengths[:1].copy(), lengths))
    row = _fastest(lambda: runner.prefill(0, [0] * (k + 1), k + 1))
    per_token = max(row - one, 0.0) / k
    step = one + STEP_OVERHEAD_S
    return per_token / step, step


def _running_mean(mean: float, x: float, first: bool) -> float:
    return x if first else mean + 0.1 * (x - mean)


class Speculator:
    """Per-slot speculative state for one ``EngineCore``: each request's tokens, whether it drafts, its tally."""

    def __init__(self, options: SpecOptions, core: Any) -> None:
        if options.method not in ("ngram", "draft"):
            raise ValueError(f"speculative method must be ngram or draft, got {options.method!r}")
        self.o = options
        self.draft = None  # draft.DraftModel with --speculative draft
        if options.method == "draft":
            from nextoken.export.artifact import load_artifact, resolve_artifact_dir
            from nextoken.serve.engine.draft import DraftModel, check_draft

            art = load_artifact(resolve_artifact_dir(options.draft_model))
            check_draft(core.artifact, art)
            # One thread: a second intra-op pool spins against the target's on the same cores after every
            # call (a 2-layer draft for a 10.7M target: 1.01x with the target's 2 threads, 1.47x with one).
            self.draft = DraftModel(art, max_slots=core.options.max_slots, max_len=core.max_len,
                                    device=core.options.device, threads=1)
        S, L = core.options.max_slots, core.max_len
        self.tokens = np.zeros((S, L + 1), dtype=np.int64)  # slot -> prompt + output so far
        self.count = np.zeros(S, dtype=np.int64)  # tokens held in each row of ``tokens``
        self.wanted = np.zeros(S, dtype=bool)  # the request did not opt out
        self.resume_at = np.zeros(S, dtype=np.int64)  # drafts again once it has generated this many tokens
        self.drafts = np.zeros(S, dtype=np.int64)  # since it was last judged: drafts, accepted tokens,
        self.accepted = np.zeros(S, dtype=np.int64)
        self.owed = np.zeros(S)  # and the accepted tokens those drafts had to yield to pay
        # a draft model's draft length per slot: each of its tokens is a draft-model call, so it follows
        # acceptance (+2 after a draft accepted whole, -1 otherwise: transformers' assisted generation's heuristic)
        self.length = np.zeros(S, dtype=np.int64)
        # accepted tokens a draft token must yield to pay for the target's longer row, and a decode step's seconds
        self.break_even, self.step_s = break_even(core.runner, options.num_speculative_tokens)
        self.python_s = 0.0  # verification's own work per draft beside the runner (a running mean)
        self.drafting_s = 0.0  # a draft model's whole proposal per row: its calls and its Python (a running mean)
        self._proposed = False  # a proposal was timed
        # A draft model's worth is mostly the pair's (draft and target), not the request's: each failed judgement
        # also stops it for every request for ``backoff`` tokens generated, doubling while it keeps failing.
        self.emitted = 0  # tokens emitted since start-up, every request
        self.draft_resume_at = 0  # no draft-model proposal before ``emitted`` reaches this
        self.backoff = REPROBE_TOKENS
        self.totals = SpecCounts(per_pos=[0] * options.num_speculative_tokens)  # since start-up
        self._step = SpecCounts(per_pos=[0] * options.num_speculative_tokens)  # since take_counts()

    # --- requests ------------------------------------------------------------------------------
    def bind(self, slot: int, prompt_ids: list[int], wanted: bool) -> None:
        n = len(prompt_ids)
        self.tokens[slot, :n] = prompt_ids
        self.count[slot] = n
        self.wanted[slot] = wanted
        self.resume_at[slot] = self.drafts[slot] = self.accepted[slot] = 0
        self.owed[slot] = 0.0
        self.length[slot] = max(1, self.o.num_speculative_tokens // 2)
        if self.draft is not None:
            self.draft.bind(slot)

    def record(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Tokens the rows of ``slots`` just emitted (each row one)."""
        self.tokens[slots, self.count[slots]] = tokens
        self.count[slots] += 1
        self.emitted += slots.size

    def take_counts(self) -> SpecCounts:
        c, self._step = self._step, SpecCounts(per_pos=[0] * self.o.num_speculative_tokens)
        return c

    # --- the step ------------------------------------------------------------------------------
    def propose(self, core: Any, decoding: list[Any]) -> dict[int, np.ndarray]:
        """Drafts for this step's decoding rows: slot -> (m,) token ids, for the rows that have one."""
        o = self.o
        if len(core.scheduler.running) + len(core.scheduler.waiting) > o.disable_by_batch_size:
            return {}  # a batch (or a queue) keeps the machine busy without drafts
        if self.draft is not None and self.emitted < self.draft_resume_at:
            return {}  # the draft model did not pay lately, for any request
        out: dict[int, np.ndarray] = {}
        rows: dict[int, tuple[np.ndarray, int]] = {}  # for a draft model: slot -> (its tokens, draft length)
        for seq in decoding:
            s = seq.slot
            if not self.wanted[s] or core.generated[s] < self.resume_at[s]:
                continue
            # the row of m + 1 tokens must fit the cache, and its m + 1 tokens the request's max_tokens
            room = min(o.num_speculative_tokens, core.max_len - 1 - int(core.lengths[s]),
                       int(core.max_tokens[s] - core.generated[s]) - 1)
            tokens = self.tokens[s, :self.count[s]]
            if self.draft is not None:
                room = min(room, self.draft.room(tokens.size), int(self.length[s]))
                if room >= 1:
                    rows[s] = (tokens, room)
            elif room >= 1:
                d = ngram_draft(tokens, o.prompt_lookup_max, o.prompt_lookup_min, room)
                if d.size:
                    out[s] = d.copy()
        if not rows:
            return out
        t0 = time.perf_counter()
        out = self.draft.propose(rows)
        # per draft: a new request's prompt is read once (the draft's prefill), not with every draft
        spent = (time.perf_counter() - t0 - self.draft.prompt_s) / len(rows)
        self.drafting_s = _running_mean(self.drafting_s, spent, first=not self._proposed)
        self._proposed = True
        return out

    def verify(self, core: Any, drafts: dict[int, np.ndarray], out: Any) -> float:
        """Score every draft in one runner call each, emit what the target accepts; returns the runner's seconds."""
        t0 = time.perf_counter()
        logits = {s: core.runner.prefill(s, np.concatenate(([core.last_token[s]], d)), int(core.lengths[s]))
                  for s, d in drafts.items()}  # slot -> (m + 1, V)
        run_s = time.perf_counter() - t0
        c = SpecCounts(per_pos=[0] * self.o.num_speculative_tokens)  # this call's tally
        alive = np.fromiter(sorted(drafts), dtype=np.int64, count=len(drafts))
        accepted = dict.fromkeys(drafts, 0)
        j = 0
        while alive.size:
            core.lengths[alive] += 1  # the token fed at this position is now in the cache
            first_row = len(out.rids)
            ended = core._emit(alive, np.stack([logits[s][j] for s in alive.tolist()]), out)
            tokens = core.last_token[alive]
            match = np.array([j < drafts[s].size and tokens[i] == drafts[s][j] for i, s in enumerate(alive.tolist())])
            if match.any():
                out.mark_drafted(first_row, match)
                c.per_pos[j] += int(match.sum())
                for s in alive[match].tolist():
                    accepted[s] += 1
            alive = alive[match & ~ended]
            j += 1
        for s, d in drafts.items():
            c.drafts += 1
            c.draft_tokens += d.size
            c.accepted += accepted[s]
            if core.slot_rid[s] is not None:  # still running: judge whether its drafts pay
                self._judge(core, s, d.size, accepted[s])
                if self.draft is not None:
                    self.draft.keep(s, accepted[s])
                    k = self.o.num_speculative_tokens
                    self.length[s] = min(k, self.length[s] + 2) if accepted[s] == d.size else max(1, self.length[s] - 1)
        self._step.add(c)
        self.totals.add(c)
        spent = (time.perf_counter() - t0 - run_s) / len(drafts)
        self.python_s = _running_mean(self.python_s, spent, first=self.totals.drafts == len(drafts))
        return run_s

    def _judge(self, core: Any, slot: int, m: int, accepted: int) -> None:
        self.drafts[slot] += 1
        self.accepted[slot] += accepted
        # a draft model's time as measured (0 for n-grams): its Python costs more than its calls on small models
        self.owed[slot] += m * self.break_even + (self.python_s + self.drafting_s) / self.step_s
        if self.drafts[slot] >= JUDGE_AFTER:
            if self.accepted[slot] < self.owed[slot]:
                self.resume_at[slot] = core.generated[slot] + REPROBE_TOKENS
                if self.draft is not None:
                    self.draft_resume_at = self.emitted + self.backoff
                    self.backoff = min(2 * self.backoff, MAX_BACKOFF_TOKENS)
            elif self.draft is not None:
                self.backoff = REPROBE_TOKENS
            self.drafts[slot] = self.accepted[slot] = 0
            self.owed[slot] = 0.0

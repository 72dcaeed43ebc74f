"""Sampling for a batch of KV-cache slots, in NumPy, vectorised across the batch.

The engine binds each request to one cache slot for its life, and ``BatchSampler`` mirrors that:
a request's settings are written into per-slot arrays once when it joins (``add``) and cleared when
it leaves (``remove``); a step (``sample``) gathers them by slot and does no Python work for a row
unless that row needs it (a seeded generator, a ban list, logprobs it asked for).

Each row's logits are transformed in Hugging Face ``generate``'s order:

1. logit_bias (added to the logits; OpenAI's semantics),
2. min_tokens: EOS (unless ``ignore_eos``) and ``stop_token_ids`` set to -inf until the row has
   generated ``min_tokens`` tokens,
3. repetition penalty (over prompt and generated tokens: positive logits divided, negative multiplied),
4. presence and frequency penalties (OpenAI's, over generated tokens),
5. grammar mask (tokens the row's grammar forbids set to -inf; the masks come from serve/engine/grammar.py),
6. temperature (below 1e-5 = greedy: the argmax of 1-5, and 7-9 are skipped),
7. top-k (ties with the k-th value survive, as in Hugging Face),
8. top-p (nucleus over the tokens sorted by probability high to low, equal ones by token id; a token
   is kept while the mass strictly before it is below top_p, so the most likely token always survives),
9. min-p (tokens whose probability is below min_p x the most likely one's are dropped),

then one token is drawn per sampled row by inverse CDF over the surviving tokens in token-id order,
from one uniform of the row's own generator when it is seeded (so a seeded request gives the same
tokens alone or in any batch, in any slot); unseeded rows share one generator. Greedy rows draw
nothing. Masked tokens (-inf) never survive any filter.

Numbers: logits are transformed in float32 (what the model emits), probabilities are float32
``exp(x / T - max)``, and every running sum (normaliser, top-p mass, CDF) is float64. Every sum a
row's token depends on is computed from that row alone, in an order fixed by the row (chunks at
fixed offsets, no casting reductions whose buffering could split a row), which is what makes seeded
draws independent of the batch; tests check this bit for bit.

Log-probabilities reported to clients (chosen token, top alternatives, prompt logprobs) are those of
the model's own distribution, ``log_softmax`` of the raw logits, before every transform above and
logit_bias included. This is vLLM's default; OpenAI reports after its bias. We keep the raw figures
because they are what scoring needs (echo / prompt logprobs, lm-eval's loglikelihood) and a bias that
changed them would make the same prompt score differently depending on sampling settings.

NOTE on top-p without a sort per row: the rows needing top-k or top-p are partitioned once for their
largest values (``np.partition``, values only: a fifth of ``argpartition``'s cost) and only that
candidate block (128 values, or k + 1) is sorted. The block settles a row exactly when the kept
prefix ends strictly inside it; a row whose nucleus is wider (a flat distribution) goes on to a
block eight times larger, or straight to a full sort when the block's mass bounds what the larger
one could hold. Every path computes the same sums in the same order, so which path a row takes (it
depends on its neighbours' top-k) never changes its token. The survivors' ids then come from one
comparison against the row's smallest survivor over the whole row (ties at the cut: lowest ids).

A conflict between min_tokens and a grammar that allows only EOS or stop tokens (the structure is
complete) is settled for the grammar: the ban is lifted for that row rather than leave no token.

``RowState`` and ``sample(logits, rows)`` are the previous per-row sampler, kept until the engine
moves to ``BatchSampler``; they refuse the settings only ``BatchSampler`` implements.

This module knows nothing about tokenizers, HTTP or ONNX Runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Temperatures below this sample as greedy (vLLM's _SAMPLING_EPS): dividing logits by 1e-300
# overflows to inf and the softmax to NaN.
GREEDY_BELOW = 1e-5
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for each logit_bias value
CANDIDATES = 128  # first top-k / top-p candidate block; grows 8x per round for rows it does not settle
DRAW_CHUNK = 64  # inverse-CDF draws over a full vocabulary: chunk sums first, then one chunk's cumsum
_FLOAT32_MAX = np.float32(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32 > 0: penalties are stored as float32
# A row keeping more than this share of the vocabulary draws over its full row of weights (zeros where
# dropped) instead of gathering its survivors: decided by the row alone, so the draw stays the same
# in any batch.
COMPACT_BELOW = 1 / 8


class SamplingParamError(ValueError):
    """A sampling setting out of range; ``param`` names the field (the HTTP layer answers 400 with it)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """One request's sampling settings.

    The HTTP layer validates first (OpenAI's ranges, 400s naming the field); ``__post_init__`` is the
    engine's own context-free guard, and ``verify(vocab_size)`` the model-dependent one.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (-1, vLLM's spelling of off, is normalised to 0)
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # tokens to generate; None = the rest of the context (resolved by whoever knows the prompt length);
    # 0 = generate nothing, only with prompt_logprobs (score the prompt)
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings: the text stream handles them
    stop_token_ids: list[int] = field(default_factory=list)  # token ids that end the sequence (not EOS)
    seed: int | None = None
    logprobs: int | None = None  # None = none; N = the chosen token's plus the top N alternatives
    prompt_logprobs: int | None = None  # None = none; N = each prompt token's plus the top N alternatives
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    ignore_eos: bool = False
    structured: Any = None  # None | a grammar spec (serve/engine/grammar.py's StructuredSpec): masks come with sample()

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise SamplingParamError(f"{name} {why}, got {getattr(self, name)!r}", name)

        def number(name: str, ok: bool, why: str) -> None:
            v = getattr(self, name)
            if not _is_num(v) or not math.isfinite(v) or not ok:
                fail(name, why)

        t = self.temperature
        number("temperature", _is_num(t) and t >= 0, "must be a finite number >= 0")
        number("top_p", _is_num(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            fail("top_k", "must be an integer >= 0 (or -1 for off)")
        number("min_p", _is_num(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1]")
        number("repetition_penalty", _is_num(self.repetition_penalty) and self.repetition_penalty > 0,
               "must be a finite number > 0")
        number("presence_penalty", True, "must be a finite number")
        number("frequency_penalty", True, "must be a finite number")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 0):
            fail("max_tokens", "must be an integer >= 0 or None")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            fail("max_tokens", "may be 0 only with prompt_logprobs (to score the prompt without generating)")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            fail("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                                     "min_tokens")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "must be a list of non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(i) and i >= 0 for i in self.stop_token_ids):
            fail("stop_token_ids", "must be a list of integers >= 0")
        if self.seed is not None and not _is_int(self.seed):
            fail("seed", "must be an integer or None")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                fail(name, "must be None or an integer >= 0")
        if not isinstance(self.logit_bias, dict):
            fail("logit_bias", "must be a dict of token id -> bias")
        for k, v in self.logit_bias.items():
            if not _is_int(k) or k < 0:
                raise SamplingParamError(f"logit_bias keys must be token ids >= 0, got {k!r}", "logit_bias")
            if not _is_num(v) or not math.isfinite(v) or abs(v) > LOGIT_BIAS_LIMIT:
                raise SamplingParamError(f"logit_bias values must be in [-100, 100], got {v!r} for token {k}",
                                         "logit_bias")
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "must be a boolean")
        if self.top_k == -1:
            self.top_k = 0
        if self.temperature < GREEDY_BELOW:  # greedy: the filters cannot change the argmax
            self.temperature, self.top_k, self.top_p, self.min_p = 0.0, 0, 1.0, 0.0

    def verify(self, vocab_size: int) -> None:
        """The model-dependent checks: token ids and logprob counts within the vocabulary."""
        for name, ids in (("logit_bias", list(self.logit_bias)), ("stop_token_ids", self.stop_token_ids)):
            bad = [i for i in ids if i >= vocab_size]
            if bad:
                raise SamplingParamError(f"{name} token ids must be < the vocabulary size {vocab_size}, got {bad[0]}",
                                         name)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and v > vocab_size:
                raise SamplingParamError(f"{name} must be <= the vocabulary size {vocab_size}, got {v}", name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_counts(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class SampleResult:
    token_ids: np.ndarray  # (n,) int64
    # (n,) float32 chosen tokens' log-probabilities under the model's own distribution, when any row
    # asked; NaN in rows that did not ask (BatchSampler)
    logprobs: np.ndarray | None
    top_ids: list[np.ndarray | None]  # per row: (N,) int64 ids of the N most likely tokens, most likely first
    top_logprobs: list[np.ndarray | None]  # per row: (N,) float32 their log-probabilities; None = not asked


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _rng(seed: int | None) -> np.random.Generator:
    # OpenAI's seed may be any integer, numpy's must be >= 0: fold negatives into 64 bits (-1 -> 2**64 - 1).
    return np.random.default_rng(None if seed is None else seed % (1 << 64) if seed < 0 else seed)


# Per-slot feature bits: one OR / AND over the batch's flags tells a step which transforms any row
# (or every row) needs, so a step never pays for a feature no row in it uses.
_GREEDY, _BIAS, _GRAMMAR, _REP, _PF, _BAN, _TOPK, _TOPP, _MINP, _SEEDED, _LOGPROBS = (1 << i for i in range(11))
_CHANGES_LOGITS = _BIAS | _GRAMMAR | _REP | _PF  # a greedy row with one of these is not a plain argmax
_CUT = _TOPK | _TOPP


def _bits(f: np.ndarray) -> tuple[int, int]:
    """The OR and the AND of a batch's flags (n,)."""
    return int(np.bitwise_or.reduce(f)), int(np.bitwise_and.reduce(f))


def _top_mask(z: np.ndarray, cut: np.ndarray, n: np.ndarray) -> np.ndarray:
    """(r, V) bool over ``z`` (r, V): per row every value above ``cut`` plus the lowest-id ties, ``n`` in all.

    ``cut`` (r,) is each row's n-th largest value, so the values above it number fewer than ``n``.
    """
    keep = z >= cut[:, None]
    over = (keep.sum(axis=1) > n).nonzero()[0]
    if over.size:  # more ties with the cut value than room: only those rows pay for a running count
        sub = z[over]
        above = sub > cut[over, None]
        tie = sub == cut[over, None]
        room = n[over] - above.sum(axis=1)
        keep[over] = above | (tie & (tie.cumsum(axis=1) <= room[:, None]))
    return keep


def _top_n(z: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Flat ids of the ``n[i]`` largest values in each row of ``z`` (r, V): by row, high to low, equal ones by id."""
    r, V = z.shape
    part = z.copy()
    part.partition(sorted(set((V - n).tolist())), axis=1)  # (r, V) values only: a fifth of argpartition's cost
    ids = _top_mask(z, part[np.arange(r), V - n], n).ravel().nonzero()[0]
    return ids[np.lexsort((ids, -z.ravel()[ids], ids // V))]


def _inverse_cdf(w: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index drawn from each row of non-negative weights ``w`` (r, n) with uniforms ``u`` (r,) in [0, 1).

    The first index whose running sum exceeds ``u`` x the row's total, from chunk sums and then one
    chunk's running sum (a full cumsum is a slow sequential pass). Chunks start at fixed offsets, so
    a row's sums do not depend on the batch or on zero padding after it: a seeded row draws the same
    index anywhere. A rounding overshoot onto a zero weight steps back to the nearest positive one.
    """
    r, n = w.shape
    ar = np.arange(r)
    C = DRAW_CHUNK
    nb = -(-n // C)
    wp = w
    if n != nb * C:
        wp = np.zeros((r, nb * C), dtype=w.dtype)
        wp[:, :n] = w
    blocks = wp.reshape(r, nb, C)  # (r, nb, C)
    if r == 1:  # the same sums as below, with fewer calls (batch 1 is the single-stream case)
        b0 = blocks[0]
        cb1 = b0.sum(axis=1).cumsum(dtype=np.float64)  # (nb,)
        target1 = u[0] * cb1[-1]
        c = min(int(cb1.searchsorted(target1, side="right")), nb - 1)
        cs1 = b0[c].cumsum(dtype=np.float64)
        cs1 += cb1[c - 1] if c > 0 else 0.0
        i = c * C + min(int(cs1.searchsorted(target1, side="right")), C - 1)
        if wp[0, i] <= 0:
            i = int((wp[0, :i + 1] > 0).nonzero()[0][-1])
        return np.array([i])
    cb = blocks.sum(axis=2).cumsum(axis=1, dtype=np.float64)  # (r, nb) running sums of the chunk sums
    target = u * cb[:, -1]
    chunk = np.minimum((cb <= target[:, None]).sum(axis=1), nb - 1)
    cs = blocks[ar, chunk].cumsum(axis=1, dtype=np.float64)  # (r, C) inside the chosen chunk
    cs += np.where(chunk > 0, cb[ar, chunk - 1], 0.0)[:, None]
    idx = chunk * C + np.minimum((cs <= target[:, None]).sum(axis=1), C - 1)
    for b in (wp[ar, idx] <= 0).nonzero()[0]:  # rare: the sums of one chunk and of its entries disagree
        idx[b] = (wp[b, :idx[b] + 1] > 0).nonzero()[0][-1]
    return idx


class BatchSampler:
    """Per-slot sampling state for ``max_slots`` cache slots and one step's draw over a batch of them.

    ``add(slot, params, prompt_ids)`` when a request joins its slot, ``remove(slot)`` when it leaves,
    ``sample(logits, slots, allowed)`` once per step for the rows that produce a token (it also records
    the tokens for penalties and min_tokens), ``prompt_logprobs(logits, targets, n)`` for scoring.
    """

    def __init__(self, max_slots: int, vocab_size: int, eos_id: int) -> None:
        if not _is_int(max_slots) or max_slots < 1:
            raise ValueError(f"max_slots must be an integer >= 1, got {max_slots!r}")
        if not _is_int(vocab_size) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        if not _is_int(eos_id) or not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id must be in [0, {vocab_size}), got {eos_id!r}")
        S, self.max_slots, self.vocab_size, self.eos_id = max_slots, max_slots, vocab_size, eos_id
        self.params: list[SamplingParams | None] = [None] * S
        self.active = np.zeros(S, dtype=bool)
        self.flags = np.zeros(S, dtype=np.int64)  # the _GREEDY ... _LOGPROBS bits of each slot's request
        self.temperature = np.ones(S, dtype=np.float32)
        self.top_k = np.zeros(S, dtype=np.int64)  # 0 = off (also when >= vocab_size)
        self.top_p = np.ones(S)
        self.min_p = np.zeros(S)
        self.repetition = np.ones(S, dtype=np.float32)
        self.presence = np.zeros(S, dtype=np.float32)
        self.frequency = np.zeros(S, dtype=np.float32)
        self.min_tokens = np.zeros(S, dtype=np.int64)
        self.generated = np.zeros(S, dtype=np.int64)  # tokens sampled so far per slot
        self.num_logprobs = np.full(S, -1, dtype=np.int64)  # -1 = not asked
        self.bans: list[np.ndarray | None] = [None] * S  # slot -> ids at -inf while under min_tokens
        self.rngs: list[np.random.Generator | None] = [None] * S  # seeded slots' own generators
        self.shared_rng = np.random.default_rng()
        # (S, V) arrays, allocated on first use: a server without penalties or biases never pays for them
        self._bias: np.ndarray | None = None  # float32 logit_bias per slot
        self._counts: np.ndarray | None = None  # float32 generated-token counts (exact to 2**24; presence/frequency)
        self._seen: np.ndarray | None = None  # bool: token in prompt or output (repetition penalty)

    # --- slots -------------------------------------------------------------------------------
    def add(self, slot: int, params: SamplingParams, prompt_ids: list[int] | np.ndarray) -> None:
        """Bind ``params`` to ``slot`` for a request whose prompt is ``prompt_ids``."""
        self._check_slot(slot)
        if self.active[slot]:
            raise ValueError(f"slot {slot} is already in use; remove() it first")
        params.verify(self.vocab_size)
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        if prompt.size and (prompt.min() < 0 or prompt.max() >= self.vocab_size):
            raise ValueError(f"prompt_ids must be in [0, {self.vocab_size})")
        p, V, s = params, self.vocab_size, slot
        self.params[s] = p
        self.temperature[s] = p.temperature if not p.greedy else 1.0
        self.top_k[s] = p.top_k if p.top_k < V else 0
        self.top_p[s], self.min_p[s] = p.top_p, p.min_p
        self.repetition[s], self.presence[s], self.frequency[s] = (max(p.repetition_penalty, _FLOAT32_TINY),
                                                                   p.presence_penalty,
                                                                   p.frequency_penalty)
        self.min_tokens[s], self.generated[s] = p.min_tokens, 0
        self.num_logprobs[s] = -1 if p.logprobs is None else p.logprobs
        if p.logit_bias:
            if self._bias is None:
                self._bias = np.zeros((self.max_slots, V), dtype=np.float32)
            self._bias[s, list(p.logit_bias)] = list(p.logit_bias.values())
        ban = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else {self.eos_id}))
        self.bans[s] = np.asarray(ban, dtype=np.int64) if p.min_tokens > 0 and ban else None
        if p.needs_counts:
            if self._counts is None:
                self._counts = np.zeros((self.max_slots, V), dtype=np.float32)
                self._seen = np.zeros((self.max_slots, V), dtype=bool)
            self._counts[s] = 0
            self._seen[s] = False
            self._seen[s, prompt] = True
        seeded = p.seed is not None and not p.greedy  # a greedy row draws nothing
        self.rngs[s] = _rng(p.seed) if seeded else None
        self.flags[s] = ((_GREEDY if p.greedy else 0) | (_BIAS if p.logit_bias else 0)
                         | (_GRAMMAR if p.structured is not None else 0)
                         | (_REP if p.repetition_penalty != 1.0 else 0)
                         | (_PF if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 else 0)
                         | (_BAN if self.bans[s] is not None else 0) | (_TOPK if self.top_k[s] > 0 else 0)
                         | (_TOPP if p.top_p < 1.0 else 0) | (_MINP if p.min_p > 0 else 0)
                         | (_SEEDED if seeded else 0) | (_LOGPROBS if p.logprobs is not None else 0))
        self.active[s] = True

    def remove(self, slot: int) -> None:
        """Free ``slot`` (its request finished or was cancelled)."""
        self._check_slot(slot)
        if not self.active[slot]:
            raise ValueError(f"slot {slot} is not in use")
        if self.flags[slot] & _BIAS:
            self._bias[slot] = 0.0
        self.active[slot], self.flags[slot] = False, 0
        self.params[slot] = self.rngs[slot] = self.bans[slot] = None

    def _check_slot(self, slot: int) -> None:
        if not _is_int(slot) or not 0 <= slot < self.max_slots:
            raise ValueError(f"slot must be in [0, {self.max_slots}), got {slot!r}")

    # --- one step ----------------------------------------------------------------------------
    def sample(self, logits: np.ndarray, slots: np.ndarray, allowed: np.ndarray | None = None) -> SampleResult:
        """Pick one token per row of ``logits`` (n, V) for the requests in ``slots`` (n,) and record it.

        ``allowed`` (n, V): the grammar's masks, bool (True = allowed) or serve/engine/grammar.py's additive
        float32 bias (0 = allowed, -inf = not; the cheaper to apply), read only in rows whose request
        has ``structured`` set; None when no row has one.
        """
        logits, slots = np.asarray(logits), np.asarray(slots)
        V = self.vocab_size
        if logits.ndim != 2 or logits.shape[1] != V or logits.dtype.kind != "f":
            raise ValueError(f"logits must be a float (n, {V}) array, got {logits.dtype} {logits.shape}")
        n = logits.shape[0]
        if slots.shape != (n,) or (n and slots.dtype.kind not in "iu"):
            raise ValueError(f"slots must be ({n},) integers, got {slots.dtype} {slots.shape}")
        if n == 0:
            return SampleResult(np.empty(0, dtype=np.int64), None, [], [])
        sl = slots.tolist()
        if min(sl) < 0 or max(sl) >= self.max_slots or len(set(sl)) != n or not self.active[slots].all():
            raise ValueError(f"slots must be distinct slots in use, got {sl}")
        if allowed is not None and (allowed.shape != (n, V) or allowed.dtype not in (np.bool_, np.float32)):
            raise ValueError(f"allowed must be a ({n}, {V}) bool mask or float32 bias, got {allowed.dtype} "
                             f"{allowed.shape}")

        f = self.flags[slots]  # (n,)
        any_, all_ = _bits(f)
        banned = None  # (n,) bool: rows still under their min_tokens
        if any_ & _BAN:
            banned = ((f & _BAN) != 0) & (self.generated[slots] < self.min_tokens[slots])
            if not banned.any():
                banned = None
        if all_ & _GREEDY and not any_ & _CHANGES_LOGITS and banned is None:
            tokens = logits.argmax(axis=1)  # the all-greedy fast path: one argmax
        else:
            plain = None  # (n,) bool: rows needing nothing but an argmax
            if any_ & _GREEDY:
                plain = ((f & _GREEDY) != 0) & ((f & _CHANGES_LOGITS) == 0)
                if banned is not None:
                    plain &= ~banned
            if plain is not None and plain.any():
                tokens = np.empty(n, dtype=np.int64)
                p, w = plain.nonzero()[0], (~plain).nonzero()[0]
                tokens[p] = logits[p].argmax(axis=1)
                fw = f[w]
                tokens[w] = self._pick(logits[w].astype(np.float32, copy=False), slots[w], fw, _bits(fw),
                                       None if banned is None else banned[w], None if allowed is None else allowed[w])
            else:
                tokens = self._pick(logits.astype(np.float32), slots, f, (any_, all_), banned, allowed)
        if any_ & _LOGPROBS:
            res = self._logprobs(logits, slots, tokens)
        else:
            res = SampleResult(tokens, None, [None] * n, [None] * n)
        self.generated[slots] += 1
        if any_ & (_REP | _PF):
            c = (f & (_REP | _PF)).nonzero()[0]
            self._counts[slots[c], tokens[c]] += 1  # slots are distinct: no (slot, token) pair repeats
            self._seen[slots[c], tokens[c]] = True
        return res

    def _pick(self, x: np.ndarray, s: np.ndarray, f: np.ndarray, bits: tuple[int, int], banned: np.ndarray | None,
              allowed: np.ndarray | None) -> np.ndarray:
        """Steps 1-9 and the draw for rows ``x`` (w, V) float32 (owned, changed in place) of slots ``s`` (w,).

        ``bits``: the OR and the AND of the rows' flags ``f`` (w,).
        """
        any_, all_ = bits
        if any_ & _BIAS:
            i = (f & _BIAS).nonzero()[0]
            x[i] += self._bias[s[i]]
        if any_ & _GRAMMAR and allowed is None:
            raise ValueError(f"slot {int(s[np.argmax(f & _GRAMMAR)])} has a grammar but sample() got no allowed mask")
        if banned is not None:
            for j in banned.nonzero()[0]:
                ban = self.bans[s[j]]
                live = None
                if f[j] & _GRAMMAR:
                    live = allowed[j] if allowed.dtype == np.bool_ else allowed[j] == 0.0
                left = self.vocab_size - ban.size if live is None else live.sum() - live[ban].sum()
                if left > 0:  # else only tokens that end the sequence are allowed (a complete grammar): they win
                    x[j, ban] = -np.inf
        if any_ & _REP:
            i = slice(None) if all_ & _REP else (f & _REP).nonzero()[0]
            si = s[i]
            sub, pen = x[i], self.repetition[si, None]
            # A penalty near 0 (any float > 0 is valid) would divide a logit to inf: saturate at float32's max
            # instead, so the boosted tokens tie rather than turn the row's weights into NaN.
            with np.errstate(over="ignore"):
                boosted = np.minimum(sub / pen, _FLOAT32_MAX)
            x[i] = np.where(self._seen[si], np.where(sub > 0, boosted, sub * pen), sub)
        if any_ & _PF:
            i = slice(None) if all_ & _PF else (f & _PF).nonzero()[0]
            si = s[i]
            c = self._counts[si]  # (k, V) float32 counts
            x[i] -= self.presence[si, None] * (c > 0) + self.frequency[si, None] * c
        if any_ & _GRAMMAR:
            g = slice(None) if all_ & _GRAMMAR else (f & _GRAMMAR).nonzero()[0]
            if allowed.dtype == np.bool_:
                x[g] = np.where(allowed[g], x[g], -np.inf)
            else:  # an additive bias (0 allowed, -inf not): branch-free, the cheapest to apply
                x[g] += allowed[g]
            dead = (x[g].max(axis=1) == -np.inf).nonzero()[0]
            if dead.size:
                raise ValueError(f"the grammar mask of slot {int(s[g][dead[0]])} allows no token")
        if all_ & _GREEDY:
            return x.argmax(axis=1)
        if not any_ & _GREEDY:
            return self._draw(x, s, f, bits)
        out = np.empty(len(s), dtype=np.int64)
        g, d = (f & _GREEDY).nonzero()[0], ((f & _GREEDY) == 0).nonzero()[0]
        out[g] = x[g].argmax(axis=1)
        out[d] = self._draw(x[d], s[d], f[d], _bits(f[d]))
        return out

    def _uniforms(self, s: np.ndarray, any_: int, all_: int, f: np.ndarray) -> np.ndarray:
        """One uniform per row: from the slot's own generator when seeded, else from the shared one."""
        if not any_ & _SEEDED:
            return self.shared_rng.random(len(s))
        if all_ & _SEEDED:
            return np.fromiter((self.rngs[j].random() for j in s.tolist()), dtype=np.float64, count=len(s))
        u = np.empty(len(s))
        seeded = (f & _SEEDED) != 0
        for j in seeded.nonzero()[0]:
            u[j] = self.rngs[s[j]].random()
        k = (~seeded).nonzero()[0]
        u[k] = self.shared_rng.random(k.size)
        return u

    def _draw(self, x: np.ndarray, s: np.ndarray, f: np.ndarray, bits: tuple[int, int]) -> np.ndarray:
        """Steps 6-9 and the draw for sampled rows ``x`` (m, V) float32 (owned)."""
        any_, all_ = bits
        u = self._uniforms(s, any_, all_, f)
        t = self.temperature[s]
        if all_ & _CUT:
            return _draw_cut(x, t, self.top_k[s], self.top_p[s], self.min_p[s], u, bits)
        if not any_ & _CUT:
            return self._draw_full(x, t, s, any_, u)
        out = np.empty(len(s), dtype=np.int64)
        c, w = (f & _CUT).nonzero()[0], ((f & _CUT) == 0).nonzero()[0]
        sc = s[c]
        out[c] = _draw_cut(x[c], t[c], self.top_k[sc], self.top_p[sc], self.min_p[sc], u[c], _bits(f[c]))
        out[w] = self._draw_full(x[w], t[w], s[w], _bits(f[w])[0], u[w])
        return out

    def _draw_full(self, x: np.ndarray, t: np.ndarray, s: np.ndarray, any_: int, u: np.ndarray) -> np.ndarray:
        """Temperature (and min-p) only: a draw over the whole vocabulary; ``x`` (r, V) is overwritten."""
        x /= t[:, None]  # (r, V) tempered logits
        x -= x.max(axis=1, keepdims=True)
        np.exp(x, out=x)  # weights relative to the most likely token, which weighs exactly 1
        if any_ & _MINP:
            x[x < self.min_p[s, None]] = 0.0
        return _inverse_cdf(x, u)

    # --- logprobs ----------------------------------------------------------------------------
    def _logprobs(self, logits: np.ndarray, slots: np.ndarray, tokens: np.ndarray) -> SampleResult:
        n, V = len(slots), self.vocab_size
        top_ids: list[np.ndarray | None] = [None] * n
        top_lps: list[np.ndarray | None] = [None] * n
        N = self.num_logprobs[slots]
        a = (N >= 0).nonzero()[0]
        every = a.size == n
        z = (logits if every else logits[a]).astype(np.float32, copy=False)  # (k, V) the model's own distribution
        mx = z.max(axis=1, keepdims=True)
        tmp = z - mx
        lse = (np.log(np.exp(tmp, out=tmp).sum(axis=1, keepdims=True)) + mx)[:, 0]  # (k,) log-sum-exp
        picked = z[np.arange(a.size), tokens if every else tokens[a]] - lse
        if every:
            chosen = picked
        else:
            chosen = np.empty(n, dtype=np.float32)
            chosen.fill(np.nan)
            chosen[a] = picked
        Na = N if every else N[a]
        w = (Na > 0).nonzero()[0]
        if w.size < a.size:
            for j in a[Na == 0].tolist():
                top_ids[j], top_lps[j] = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        if w.size:
            whole = w.size == a.size
            zw, Nw = (z, Na) if whole else (z[w], Na[w])
            ids = _top_n(zw, Nw)
            lps = zw.ravel()[ids] - (lse if whole else lse[w])[ids // V]
            cols, start = ids % V, 0
            for j, m in zip((a if whole else a[w]).tolist(), Nw.tolist(), strict=True):
                top_ids[j], top_lps[j] = cols[start:start + m], lps[start:start + m]
                start += m
        return SampleResult(tokens, chosen, top_ids, top_lps)

    def prompt_logprobs(self, logits: np.ndarray, targets: np.ndarray,
                        n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log-probabilities of ``targets`` (T,) under ``logits`` (T, V) (row t predicts targets[t]).

        Returns ``lp`` (T,) float32, and the ``n`` most likely tokens per position, most likely first
        (equal ones by id): ``top_ids`` (T, n) int64 and ``top_lps`` (T, n) float32. The model's own
        distribution, as for generated tokens.
        """
        logits = np.asarray(logits)
        targets = np.asarray(targets, dtype=np.int64)
        V = self.vocab_size
        if logits.ndim != 2 or logits.shape[1] != V:
            raise ValueError(f"logits must be a (T, {V}) array, got {logits.shape}")
        T = logits.shape[0]
        if targets.shape != (T,) or (T and (targets.min() < 0 or targets.max() >= V)):
            raise ValueError(f"targets must be ({T},) token ids in [0, {V})")
        if not _is_int(n) or not 0 <= n <= V:
            raise ValueError(f"n must be in [0, {V}], got {n!r}")
        lp = _log_softmax(logits.astype(np.float32, copy=False))  # (T, V)
        chosen = lp[np.arange(T), targets]
        if n == 0 or T == 0:
            return chosen, np.empty((T, n), dtype=np.int64), np.empty((T, n), dtype=np.float32)
        ids = _top_n(lp, np.repeat(n, T))
        return chosen, (ids % V).reshape(T, n), lp.ravel()[ids].reshape(T, n)


def _draw_cut(x: np.ndarray, t: np.ndarray, k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray,
              u: np.ndarray, bits: tuple[int, int] = (_CUT | _MINP, 0)) -> np.ndarray:
    """Temperature, top-k, top-p and min-p on rows ``x`` (r, V), then the draw over the survivors."""
    r, V = x.shape
    keep, L, y_top, e_full = _survivors_of(x, t, k, top_p, min_p, bits)
    wide = L > COMPACT_BELOW * V  # (r,) rows keeping much of the vocabulary
    if not wide.any():
        c = None  # every row draws over its gathered survivors
    else:
        out = np.empty(r, dtype=np.int64)
        i = wide.nonzero()[0]
        need = i if e_full is None else i[np.isnan(e_full[i, 0])]  # top-k rows have no full weights yet
        if need.size:
            e = x[need] / t[need, None]
            e -= y_top[need, None]
            np.exp(e, out=e)
            if e_full is None:
                e_full = np.full(x.shape, np.nan, dtype=np.float32)
            e_full[need] = e
        out[i] = _inverse_cdf(np.where(keep[i], e_full[i], 0.0), u[i])
        if i.size == r:
            return out
        c = (~wide).nonzero()[0]
        x, t, y_top, keep, L, u = x[c], t[c], y_top[c], keep[c], L[c], u[c]
    ids = keep.ravel().nonzero()[0]  # survivors, by row, in id order
    if len(L) == 1:
        pick = ids[_inverse_cdf(np.exp(x.ravel()[ids] / t[0] - y_top[0])[None], u)]
    else:
        rows = ids // V
        start = L.cumsum() - L
        w = np.zeros((len(L), int(L.max())), dtype=np.float32)  # zero-padded: the draw is the same unpadded
        w[rows, np.arange(ids.size) - start.repeat(L)] = np.exp(x.ravel()[ids] / t[rows] - y_top[rows])
        pick = ids[start + _inverse_cdf(w, u)] - np.arange(len(L)) * V
    if c is None:
        return pick
    out[c] = pick
    return out


def _survivors_of(x: np.ndarray, t: np.ndarray, k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray,
                  bits: tuple[int, int] = (_CUT | _MINP, 0)) -> tuple[np.ndarray, ...]:
    """Which tokens of rows ``x`` (r, V) (logits before temperature ``t`` (r,)) survive top-k, top-p, min-p.

    Returns the mask (r, V) bool, the count per row (r,), each row's largest tempered logit (r,), and
    the weights exp(x / t - largest) (r, V) float32 of the rows without top-k (NaN rows for the others,
    None if every row has top-k: those never needed them). ``k`` 0, ``top_p`` 1 and ``min_p`` 0 are
    off. ``bits``: the OR and AND of the rows' flags (a superset OR and a subset AND are safe: they only
    skip work no row needs). Ranking is on ``x`` itself (temperature does not change the order); only
    the values that take part in a sum are tempered, ``x / t`` as a full tempered row would hold them.
    """
    r, V = x.shape
    any_, all_ = bits
    y_top = x.max(axis=1) / t  # (r,) the largest tempered logit
    # Rows without top-k normalise over the whole vocabulary (a float32 pairwise sum in id order: a
    # casting sum would depend on buffer boundaries); rows with it over their survivors (in _survivors).
    e_full = z_full = None
    if not all_ & _TOPK:
        nk = (k == 0).nonzero()[0] if any_ & _TOPK else None
        if nk is None or nk.size == r:
            e_full = x / t[:, None]
            e_full -= y_top[:, None]
            np.exp(e_full, out=e_full)
            z_full = e_full.sum(axis=1)
        elif nk.size:
            e_full = np.empty(x.shape, dtype=np.float32)
            e_full.fill(np.nan)
            z_full = np.zeros(r)
            e = x[nk] / t[nk, None]
            e -= y_top[nk, None]
            e_full[nk] = np.exp(e, out=e)
            z_full[nk] = e.sum(axis=1)
    L = cut = None
    # (rows, block width) still to settle; k + 1 values show whether the k-th value has ties
    tasks = [(None, min(V, max(CANDIDATES, int(k.max()) + 1 if any_ & _TOPK else 0)))]
    while tasks:
        todo, width = tasks.pop()
        if width * 2 > V:  # a block over half the row costs about a full sort
            width = V
        v = x.copy() if todo is None else x[todo]
        if width < V:
            v.partition(V - width, axis=1)
            v = v[:, V - width:]
        v.sort(axis=1)
        v = v[:, ::-1]  # (b, width) the largest values, high to low
        if todo is None:
            n, sure, sums = _survivors(v, t, y_top, k, top_p, min_p, z_full, bits)
        else:
            n, sure, sums = _survivors(v, t[todo], y_top[todo], k[todo], top_p[todo], min_p[todo],
                                       None if z_full is None else z_full[todo], bits)
        if width == V:
            sure[:] = True
        last = v[np.arange(len(v)), n - 1]
        if todo is None:
            if sure.all():  # the usual case: one block settles every row
                return _top_mask(x, last, n), n, y_top, e_full
            todo, L, cut = np.arange(r), n, last
        else:
            L[todo], cut[todo] = n, last  # rows not settled are overwritten by a later task
            if sure.all():
                continue
        # NOTE: entries beyond the block weigh at most its smallest one, so the first w' - 1 entries hold
        # at most mass + (w' - 1 - width) x low: a top-p row that cannot close in w' goes straight to V.
        open_, wider = ~sure, width * 8
        left = todo[open_]
        hopeless = np.zeros(left.size, dtype=bool)
        if sums is not None:
            cs, e, z = sums
            bound = cs[open_, -1] + (wider - 1 - width) * e[open_, -1] / z[open_]
            hopeless = (bound < top_p[left]) & (k[left] == 0)
        if hopeless.any():
            tasks.append((left[hopeless], V))
            left = left[~hopeless]
        if left.size:
            tasks.append((left, wider))
    return _top_mask(x, cut, L), L, y_top, e_full


_LOWEST = np.finfo(np.float32).min  # below every live logit, above -inf (masked)


def _survivors(v: np.ndarray, t: np.ndarray, y_top: np.ndarray, k: np.ndarray, top_p: np.ndarray,
               min_p: np.ndarray, z_full: np.ndarray | None, bits: tuple[int, int]) -> tuple:
    """How many of the values ``v`` (b, w) (each row's largest logits, high to low) survive top-k, top-p, min-p.

    Returns the count (b,), whether the block settles the row (b,) bool (the kept prefix ends strictly
    inside it, so values beyond the block cannot matter), and for top-p the running masses (b, w), the
    weights (b, w) and the normalisers (b,) (None without top-p). ``z_full`` (b,): the row's normaliser
    over the whole vocabulary, unused in top-k rows (normalised over their survivors, summed here high
    to low: the same sum whatever the block width). Masked tokens (-inf) never survive.
    """
    any_, all_ = bits
    b, w = v.shape
    ar = np.arange(b)
    e = v / t[:, None]
    e -= y_top[:, None]
    np.exp(e, out=e)  # (b, w) weights relative to the most likely token, high to low
    if all_ & _TOPK or (any_ & _TOPK and (k > 0).any()):
        # the k-th largest value (width > k); rows without top-k get the lowest live value
        th = np.maximum(v[ar, k - 1] if all_ & _TOPK else np.where(k > 0, v[ar, k - 1], _LOWEST), _LOWEST)
        drop = v < th[:, None]  # ties with the k-th value survive
        n = w - drop.sum(axis=1)
        e[drop] = 0.0
        zk = e.cumsum(axis=1, dtype=np.float64)[ar, n - 1]
        z = zk if all_ & _TOPK or z_full is None else np.where(k > 0, zk, z_full)
        sure_k = n < w  # a top-k row's normaliser is exact only when all its survivors are in the block
    else:
        n = (v >= _LOWEST).sum(axis=1)
        z, sure_k = z_full, None
    sums = None
    if any_ & _TOPP:
        cs = (e / z[:, None]).cumsum(axis=1)  # (b, w) float64 mass up to and including each entry
        tp = top_p if all_ & _TOPP else np.where(top_p < 1.0, top_p, np.inf)  # off: nothing is cut
        n = np.minimum(n, 1 + (cs[:, :-1] < tp[:, None]).sum(axis=1))
        sums = (cs, e, z)
    if any_ & _MINP:
        n = np.minimum(n, (e >= min_p[:, None]).sum(axis=1))  # min_p 0 keeps every live entry
    if sure_k is None:
        return n, n < w, sums
    return n, (sure_k if all_ & _TOPK else np.where(k > 0, sure_k, n < w)), sums


# --- the per-row sampler the engine uses until it moves to BatchSampler ------------------------------
_LEGACY_UNSUPPORTED = ("min_p", "min_tokens", "stop_token_ids", "prompt_logprobs", "logit_bias", "structured")


class RowState:
    """What the per-row sampler remembers about one sequence: its generator and token counts."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int]) -> None:
        defaults = SamplingParams()
        for name in _LEGACY_UNSUPPORTED:  # a setting accepted must do what it says: refuse, never ignore
            if getattr(params, name) != getattr(defaults, name):
                raise SamplingParamError(f"{name} needs BatchSampler; the per-row sampler does not implement it",
                                         name)
        self.params = params
        # Unseeded requests still get their own stream; seeded ones are reproducible.
        self.rng = _rng(params.seed)
        self.seen: np.ndarray | None = None  # (V,) bool: tokens in prompt or output (repetition penalty)
        self.counts: np.ndarray | None = None  # (V,) int32: generated-token counts (presence/frequency)
        if params.needs_counts:
            self.seen = np.zeros(vocab_size, dtype=bool)
            self.seen[np.asarray(prompt_ids, dtype=np.int64)] = True
            self.counts = np.zeros(vocab_size, dtype=np.int32)

    def record(self, token_id: int) -> None:
        if self.counts is not None:
            self.counts[token_id] += 1
            self.seen[token_id] = True


def sample(logits: np.ndarray, rows: list[RowState]) -> SampleResult:
    """Pick one token per row of ``logits`` (B, V) float32 according to each row's settings (per-row loop)."""
    B, V = logits.shape
    out = np.empty(B, dtype=np.int64)
    want_lp = [r.params.logprobs is not None for r in rows]
    base_lp = _log_softmax(logits.astype(np.float32, copy=False)) if any(want_lp) else None  # (B, V)

    greedy = np.fromiter((r.params.greedy and not r.params.needs_counts for r in rows), bool, B)
    if greedy.any():
        out[greedy] = logits[greedy].argmax(-1)
    for b in np.flatnonzero(~greedy):
        r, p = rows[b], rows[b].params
        x = logits[b].astype(np.float64)  # (V,) float64: cumulative sums stay exact enough for top-p
        if p.repetition_penalty != 1.0:
            s = r.seen
            x[s] = np.where(x[s] > 0, x[s] / p.repetition_penalty, x[s] * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            x -= p.presence_penalty * (r.counts > 0) + p.frequency_penalty * r.counts
        if p.greedy:
            out[b] = int(x.argmax())
            continue
        x /= p.temperature
        if 0 < p.top_k < V:
            kth = np.partition(x, V - p.top_k)[V - p.top_k]
            x[x < kth] = -np.inf
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            sorted_p = probs[order]
            before = np.cumsum(sorted_p) - sorted_p  # mass strictly above each token
            drop = order[before >= p.top_p]
            probs[drop] = 0.0
            probs /= probs.sum()
        # Inverse-CDF draw from the row's own generator: one uniform per token, whatever the batch.
        cdf = np.cumsum(probs)
        out[b] = int(min(np.searchsorted(cdf, r.rng.random() * cdf[-1], side="right"), V - 1))

    chosen_lp = None
    top_ids: list[np.ndarray | None] = [None] * B
    top_lps: list[np.ndarray | None] = [None] * B
    if base_lp is not None:
        chosen_lp = base_lp[np.arange(B), out]
        for b, r in enumerate(rows):
            n = r.params.logprobs
            if n:
                idx = np.argpartition(-base_lp[b], min(n, V - 1))[:n]
                idx = idx[np.argsort(-base_lp[b, idx], kind="stable")]
                top_ids[b], top_lps[b] = idx, base_lp[b, idx]
    for b, r in enumerate(rows):
        r.record(int(out[b]))
    return SampleResult(out, chosen_lp, top_ids, top_lps)

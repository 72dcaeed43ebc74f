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
5. grammar mask (tokens the row's grammar forbids set to -inf; the masks come from serve/grammar.py),
6. temperature (below 1e-5 = greedy: the argmax of 1-5, and 7-9 are skipped),
7. top-k (ties with the k-th value survive, as in Hugging Face),
8. top-p (nucleus over the probabilities sorted high to low, equal ones by token id; a token is kept
   while the mass strictly before it is below top_p, so the most likely token always survives),
9. min-p (tokens whose probability is below min_p x the most likely one's are dropped),

then one token is drawn per sampled row by inverse CDF over the surviving tokens in token-id order,
from one uniform of the row's own generator when it is seeded (so a seeded request gives the same
tokens alone or in any batch, in any slot); unseeded rows share one generator.

Log-probabilities reported to clients (chosen token, top alternatives, prompt logprobs) are those of
the model's own distribution, ``log_softmax`` of the raw logits, before every transform above and
logit_bias included. This is vLLM's default; OpenAI reports after its bias. We keep the raw figures
because they are what scoring needs (echo / prompt logprobs, lm-eval's loglikelihood) and a bias that
changed them would make the same prompt score differently depending on sampling settings.

NOTE on top-p without a sort per row: the rows needing top-k or top-p are partitioned once for their
largest values (``np.partition``, values only) and only that candidate block is sorted. The block
settles a row exactly when the kept prefix ends strictly inside it; rows whose nucleus is wider
(flat distributions) go on to a block eight times larger, and finally to a full sort. Every path
computes the same sums in the same order, so which path a row takes (it depends on its neighbours'
top-k) never changes its token.

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
    structured: Any = None  # None | a grammar spec (serve/grammar.py's StructuredSpec): masks come with sample()

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


def _cut_mask(z: np.ndarray, cut: np.ndarray, n: np.ndarray) -> np.ndarray:
    """(r, V) bool: per row, every value of ``z`` above ``cut`` plus the lowest-id ties with it, ``n`` in all.

    ``cut`` (r,) is each row's n-th largest value, so the values above it number fewer than ``n``.
    """
    keep = z > cut[:, None]
    tie = z == cut[:, None]
    room = n - keep.sum(axis=1)  # (r,) how many ties fit
    over = np.flatnonzero(tie.sum(axis=1) > room)
    if over.size:  # only rows with more ties than room pay for the running count
        sub = tie[over]
        tie[over] = sub & (np.cumsum(sub, axis=1) <= room[over, None])
    return keep | tie


def _top_n(z: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the ``n[i]`` largest values of each row of ``z`` (r, V), most likely first, equal ones by id.

    Returns ``(rows, cols)`` flat, grouped by row and ordered within each row (``n[i]`` entries for row i).
    """
    r, V = z.shape
    kth = np.unique(V - n)
    part = np.partition(z, kth, axis=1)  # (r, V): values only (a fifth of argpartition's cost here)
    th = part[np.arange(r), V - n]  # (r,) the n-th largest value of each row
    rows, cols = np.nonzero(_cut_mask(z, th, n))  # grouped by row, ids ascending
    vals = z[rows, cols]
    order = np.lexsort((cols, -vals, rows))  # by row, then value high to low, then id
    return rows[order], cols[order]


def _inverse_cdf(w: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index drawn from each row of non-negative weights ``w`` (r, n) with uniforms ``u`` (r,) in [0, 1).

    The first index whose running sum exceeds ``u`` x the row's total, found from chunk sums and then
    the running sum inside one chunk (a full cumsum is a slow sequential pass); a rounding overshoot
    falls back to the last positive weight, so a zero-weight index is never returned.
    """
    r, n = w.shape
    ar = np.arange(r)
    C = DRAW_CHUNK
    if n <= 2 * C:
        cdf = np.cumsum(w, axis=1)  # (r, n)
        target = u * cdf[:, -1]
        idx = np.count_nonzero(cdf <= target[:, None], axis=1)
        base = np.zeros(r)
        seg, start = w, np.zeros(r, dtype=np.int64)
    else:
        nb = -(-n // C)
        wp = w if n == nb * C else np.pad(w, ((0, 0), (0, nb * C - n)))
        blocks = wp.reshape(r, nb, C)  # (r, nb, C)
        cb = np.cumsum(blocks.sum(axis=2), axis=1)  # (r, nb) running sums of chunk sums
        target = u * cb[:, -1]
        chunk = np.count_nonzero(cb <= target[:, None], axis=1)
        over = chunk >= nb
        if over.any():  # u x total rounded up to the total: the last chunk holding weight
            chunk[over] = nb - 1 - np.argmax(blocks[over].sum(axis=2)[:, ::-1] > 0, axis=1)
        base = np.where(chunk > 0, cb[ar, np.maximum(chunk - 1, 0)], 0.0)
        seg = blocks[ar, chunk]  # (r, C)
        start = chunk * C
        idx = np.count_nonzero(base[:, None] + np.cumsum(seg, axis=1) <= target[:, None], axis=1)
    over = idx >= seg.shape[1]
    if over.any():
        idx[over] = seg.shape[1] - 1 - np.argmax(seg[over][:, ::-1] > 0, axis=1)
    return start + idx


class BatchSampler:
    """Per-slot sampling state for ``max_slots`` cache slots and one step's draw over a batch of them.

    ``add(slot, params, prompt_ids)`` when a request joins its slot, ``remove(slot)`` when it leaves,
    ``sample(logits, slots, allowed)`` once per step for the rows that produce a token (it also records
    the tokens for penalties and min_tokens), ``prompt_logprobs(logits, targets, n)`` for scoring.
    """

    def __init__(self, max_slots: int, vocab_size: int, eos_id: int) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id must be in [0, {vocab_size}), got {eos_id}")
        S, self.max_slots, self.vocab_size, self.eos_id = max_slots, max_slots, vocab_size, eos_id
        self.params: list[SamplingParams | None] = [None] * S
        self.active = np.zeros(S, dtype=bool)
        self.temperature = np.ones(S)
        self.greedy = np.zeros(S, dtype=bool)
        self.top_k = np.zeros(S, dtype=np.int64)  # 0 = off (also when >= vocab_size)
        self.top_p = np.ones(S)
        self.min_p = np.zeros(S)
        self.repetition = np.ones(S)
        self.presence = np.zeros(S)
        self.frequency = np.zeros(S)
        self.min_tokens = np.zeros(S, dtype=np.int64)
        self.generated = np.zeros(S, dtype=np.int64)  # tokens sampled so far per slot
        self.num_logprobs = np.full(S, -1, dtype=np.int64)  # -1 = not asked
        self.has_bias = np.zeros(S, dtype=bool)
        self.has_grammar = np.zeros(S, dtype=bool)
        self.counted = np.zeros(S, dtype=bool)  # penalties need the counts below
        self.seeded = np.zeros(S, dtype=bool)
        # greedy and nothing changes its logits (min_tokens aside, checked per step): one argmax
        self.plain = np.zeros(S, dtype=bool)
        self.bans: list[np.ndarray | None] = [None] * S  # slot -> ids at -inf while under min_tokens
        self.has_ban = np.zeros(S, dtype=bool)
        self.rngs: list[np.random.Generator | None] = [None] * S  # seeded slots' own generators
        self.shared_rng = np.random.default_rng()
        # (S, V) arrays, allocated on first use: a server without penalties or biases never pays for them
        self._bias: np.ndarray | None = None  # float32 logit_bias per slot
        self._counts: np.ndarray | None = None  # int32 generated-token counts (presence/frequency)
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
        self.greedy[s] = p.greedy
        self.top_k[s] = p.top_k if p.top_k < V else 0
        self.top_p[s], self.min_p[s] = p.top_p, p.min_p
        self.repetition[s], self.presence[s], self.frequency[s] = (p.repetition_penalty, p.presence_penalty,
                                                                   p.frequency_penalty)
        self.min_tokens[s], self.generated[s] = p.min_tokens, 0
        self.num_logprobs[s] = -1 if p.logprobs is None else p.logprobs
        self.has_grammar[s] = p.structured is not None
        self.has_bias[s] = bool(p.logit_bias)
        if p.logit_bias:
            if self._bias is None:
                self._bias = np.zeros((self.max_slots, V), dtype=np.float32)
            self._bias[s, list(p.logit_bias)] = list(p.logit_bias.values())
        ban = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else {self.eos_id}))
        self.bans[s] = np.asarray(ban, dtype=np.int64) if p.min_tokens > 0 and ban else None
        self.has_ban[s] = self.bans[s] is not None
        self.counted[s] = p.needs_counts
        if p.needs_counts:
            if self._counts is None:
                self._counts = np.zeros((self.max_slots, V), dtype=np.int32)
                self._seen = np.zeros((self.max_slots, V), dtype=bool)
            self._counts[s] = 0
            self._seen[s] = False
            self._seen[s, prompt] = True
        self.seeded[s] = p.seed is not None and not p.greedy
        self.rngs[s] = _rng(p.seed) if self.seeded[s] else None
        self.plain[s] = p.greedy and not p.logit_bias and not p.needs_counts and p.structured is None
        self.active[s] = True

    def remove(self, slot: int) -> None:
        """Free ``slot`` (its request finished or was cancelled)."""
        self._check_slot(slot)
        if not self.active[slot]:
            raise ValueError(f"slot {slot} is not in use")
        if self.has_bias[slot]:
            self._bias[slot] = 0.0
        self.active[slot] = self.has_bias[slot] = self.has_grammar[slot] = self.counted[slot] = False
        self.seeded[slot] = self.has_ban[slot] = self.plain[slot] = False
        self.params[slot] = self.rngs[slot] = self.bans[slot] = None

    def _check_slot(self, slot: int) -> None:
        if not _is_int(slot) or not 0 <= slot < self.max_slots:
            raise ValueError(f"slot must be in [0, {self.max_slots}), got {slot!r}")

    # --- one step ----------------------------------------------------------------------------
    def sample(self, logits: np.ndarray, slots: np.ndarray, allowed: np.ndarray | None = None) -> SampleResult:
        """Pick one token per row of ``logits`` (n, V) for the requests in ``slots`` (n,) and record it.

        ``allowed`` (n, V) bool: the grammar's masks (True = allowed), read only in rows whose request
        has ``structured`` set; None when no row has one.
        """
        logits = np.asarray(logits)
        slots = np.asarray(slots, dtype=np.int64)
        V = self.vocab_size
        if logits.ndim != 2 or logits.shape[1] != V or not np.issubdtype(logits.dtype, np.floating):
            raise ValueError(f"logits must be a float (n, {V}) array, got {logits.dtype} {logits.shape}")
        n = logits.shape[0]
        if slots.shape != (n,):
            raise ValueError(f"slots must have shape ({n},), got {slots.shape}")
        if n and (slots.min() < 0 or slots.max() >= self.max_slots or not self.active[slots].all()):
            raise ValueError(f"slots must be slots in use, got {slots.tolist()}")
        if len(set(slots.tolist())) != n:
            raise ValueError(f"slots must be distinct, got {slots.tolist()}")
        if allowed is not None and (allowed.shape != (n, V) or allowed.dtype != np.bool_):
            raise ValueError(f"allowed must be a bool ({n}, {V}) array, got {allowed.dtype} {allowed.shape}")

        banned = self.has_ban[slots] & (self.generated[slots] < self.min_tokens[slots])  # (n,)
        touched = ~self.plain[slots] | banned  # rows whose logits change or that draw
        if not touched.any():  # the all-greedy fast path: one argmax
            tokens = logits.argmax(axis=1)
        else:
            tokens = np.empty(n, dtype=np.int64)
            rest = np.flatnonzero(~touched)
            if rest.size:
                tokens[rest] = logits[rest].argmax(axis=1)
            rows = np.flatnonzero(touched)
            tokens[rows] = self._transform_and_pick(logits[rows] if rest.size else logits, slots[rows],
                                                    banned[rows], None if allowed is None else allowed[rows])
        res = self._logprobs(logits, slots, tokens)
        self._record(slots, tokens)
        return res

    def _transform_and_pick(self, logits: np.ndarray, s: np.ndarray, banned: np.ndarray,
                            allowed: np.ndarray | None) -> np.ndarray:
        """Steps 1-9 and the draw for rows ``logits`` (w, V) of slots ``s`` (w,); returns (w,) token ids."""
        x = logits.astype(np.float64)  # (w, V) a copy; float64 keeps top-p's running sums exact enough
        i = np.flatnonzero(self.has_bias[s])
        if i.size:
            x[i] += self._bias[s[i]]
        g = np.flatnonzero(self.has_grammar[s])
        if g.size and allowed is None:
            raise ValueError(f"slot {int(s[g[0]])} has a grammar but sample() got no allowed mask")
        for j in np.flatnonzero(banned):
            ban = self.bans[s[j]]
            left = allowed[j].sum() - allowed[j, ban].sum() if self.has_grammar[s[j]] else self.vocab_size - ban.size
            if left == 0:
                continue  # only tokens that end the sequence are allowed (the grammar is complete): they win
            x[j, ban] = -np.inf
        i = np.flatnonzero(self.repetition[s] != 1.0)
        if i.size:
            sub, pen = x[i], self.repetition[s[i], None]
            x[i] = np.where(self._seen[s[i]], np.where(sub > 0, sub / pen, sub * pen), sub)
        i = np.flatnonzero((self.presence[s] != 0) | (self.frequency[s] != 0))
        if i.size:
            c = self._counts[s[i]]  # (k, V)
            x[i] -= self.presence[s[i], None] * (c > 0) + self.frequency[s[i], None] * c
        if g.size:
            a = allowed[g]
            empty = ~a.any(axis=1)
            if empty.any():
                raise ValueError(f"the grammar mask of slot {int(s[g[np.argmax(empty)]])} allows no token")
            x[g] = np.where(a, x[g], -np.inf)

        out = np.empty(len(s), dtype=np.int64)
        greedy = self.greedy[s]
        i = np.flatnonzero(greedy)
        if i.size:
            out[i] = x[i].argmax(axis=1)
        i = np.flatnonzero(~greedy)
        if i.size:
            y = x if i.size == len(s) else x[i]
            out[i] = self._draw(y, s[i])
        return out

    def _uniforms(self, s: np.ndarray) -> np.ndarray:
        """One uniform per row: from the slot's own generator when seeded, else from the shared one."""
        u = np.empty(len(s))
        seeded = self.seeded[s]
        for j in np.flatnonzero(seeded):
            u[j] = self.rngs[s[j]].random()
        k = np.flatnonzero(~seeded)
        if k.size:
            u[k] = self.shared_rng.random(k.size)
        return u

    def _draw(self, y: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Steps 6-9 and the draw for sampled rows ``y`` (m, V) float64 (modified in place)."""
        m, V = y.shape
        y /= self.temperature[s, None]
        u = self._uniforms(s)
        out = np.empty(m, dtype=np.int64)
        k, top_p, min_p = self.top_k[s], self.top_p[s], self.min_p[s]
        cut = (k > 0) | (top_p < 1.0)
        f = np.flatnonzero(~cut)
        if f.size:  # temperature (and min-p) only: weights over the whole vocabulary
            z = y[f]
            e = np.exp(z - z.max(axis=1, keepdims=True))  # (r, V), the max weighs exactly 1
            mp = min_p[f]
            if (mp > 0).any():
                e[e < mp[:, None]] = 0.0
            out[f] = _inverse_cdf(e, u[f])
        f = np.flatnonzero(cut)
        if f.size:
            out[f] = self._draw_cut(y[f] if f.size < m else y, k[f], top_p[f], min_p[f], u[f])
        return out

    @staticmethod
    def _draw_cut(y: np.ndarray, k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Top-k, top-p and min-p on rows ``y`` (r, V), then the draw over the survivors."""
        keep, L, mx = _keep_mask(y, k, top_p, min_p)
        rows, cols = np.nonzero(keep)  # survivors in id order, grouped by row
        start = np.cumsum(L) - L
        w = np.zeros((len(y), int(L.max())))  # (r, Lmax) survivors' weights, zero-padded
        w[rows, np.arange(rows.size) - np.repeat(start, L)] = np.exp(y[rows, cols] - mx[rows])
        return cols[start + _inverse_cdf(w, u)]

    # --- logprobs and bookkeeping ------------------------------------------------------------
    def _logprobs(self, logits: np.ndarray, slots: np.ndarray, tokens: np.ndarray) -> SampleResult:
        n = len(slots)
        top_ids: list[np.ndarray | None] = [None] * n
        top_lps: list[np.ndarray | None] = [None] * n
        N = self.num_logprobs[slots]
        a = np.flatnonzero(N >= 0)
        if not a.size:
            return SampleResult(tokens, None, top_ids, top_lps)
        z = logits[a].astype(np.float32, copy=False)  # (k, V) the model's own distribution
        mx = z.max(axis=1, keepdims=True)
        lse = (np.log(np.exp(z - mx).sum(axis=1, keepdims=True)) + mx)[:, 0]  # (k,) log-sum-exp
        chosen = np.full(n, np.nan, dtype=np.float32)
        chosen[a] = z[np.arange(a.size), tokens[a]] - lse
        for j in a[N[a] == 0]:
            top_ids[j], top_lps[j] = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        w = np.flatnonzero(N[a] > 0)
        if w.size:
            rows, cols = _top_n(z[w], N[a[w]])
            lps = (z[w][rows, cols] - lse[w][rows]).astype(np.float32)
            bounds = np.cumsum(N[a[w]])[:-1]
            for j, ids, lp in zip(a[w], np.split(cols, bounds), np.split(lps, bounds), strict=True):
                top_ids[j], top_lps[j] = ids, lp
        return SampleResult(tokens, chosen, top_ids, top_lps)

    def _record(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        self.generated[slots] += 1
        c = np.flatnonzero(self.counted[slots])
        if c.size:
            self._counts[slots[c], tokens[c]] += 1  # slots are distinct: no repeated (slot, token) pair
            self._seen[slots[c], tokens[c]] = True

    def prompt_logprobs(self, logits: np.ndarray, targets: np.ndarray,
                        n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log-probabilities of ``targets`` (T,) under ``logits`` (T, V) (row t predicts targets[t]).

        Returns ``lp`` (T,) float32, and the ``n`` most likely tokens per position, most likely first:
        ``top_ids`` (T, n) int64 and ``top_lps`` (T, n) float32. The model's own distribution.
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
        rows, cols = _top_n(lp, np.full(T, n))
        ids = cols.reshape(T, n)
        return chosen, ids, lp[rows, cols].reshape(T, n)


def _keep_mask(y: np.ndarray, k: np.ndarray, top_p: np.ndarray,
               min_p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which tokens of rows ``y`` (r, V) (tempered logits) survive top-k, top-p and min-p.

    Returns the mask (r, V) bool, the survivors per row (r,) and each row's max (r,). ``k`` (r,)
    0 = off, ``top_p`` (r,) 1 = off, ``min_p`` (r,) 0 = off.
    """
    r, V = y.shape
    mx = y.max(axis=1)  # (r,)
    # Rows without top-k normalise over the whole vocabulary (pairwise sum in id order); rows
    # with it over their survivors (running sum over the sorted values, in _survivors).
    z_full = np.full(r, np.nan)
    nk = np.flatnonzero(k == 0)
    if nk.size:
        z_full[nk] = np.exp(y[nk] - mx[nk, None]).sum(axis=1)
    L = np.zeros(r, dtype=np.int64)  # survivors per row
    cut_value = np.empty(r)  # the smallest surviving value per row
    todo = np.arange(r)
    width = min(V, max(CANDIDATES, int(k.max()) + 1))  # k + 1 values show whether the k-th has ties
    while todo.size:
        if width * 2 > V:  # the rest get a full sort
            width = V
        sub = y[todo]
        block = np.partition(sub, V - width, axis=1)[:, V - width:] if width < V else sub
        v = np.sort(block, axis=1)[:, ::-1]  # (t, width) the largest values, high to low
        n, last, sure = _survivors(v, mx[todo], k[todo], top_p[todo], min_p[todo], z_full[todo])
        settled = sure | (width == V)
        L[todo[settled]], cut_value[todo[settled]] = n[settled], last[settled]
        todo = todo[~settled]
        width *= 8
    return _cut_mask(y, cut_value, L), L, mx


def _survivors(v: np.ndarray, mx: np.ndarray, k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray,
               z_full: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How many of the values ``v`` (t, w) (each row's largest, high to low) survive top-k, top-p, min-p.

    Returns the count (t,), the smallest survivor (t,), and whether the block settles the row (t,)
    bool: the kept prefix ends strictly inside it, so values beyond the block cannot matter.
    ``z_full`` (t,): the row's normaliser over the whole vocabulary; NaN for top-k rows (normalised
    over their survivors, summed here high to low: the same sum whatever the block width).
    """
    t, w = v.shape
    ar = np.arange(t)
    has_k = k > 0
    live = v > -np.inf  # masked tokens (grammar, min_tokens) never survive
    n = np.count_nonzero(live, axis=1)
    th = np.where(has_k, v[ar, np.clip(k - 1, 0, w - 1)], -np.inf)  # (t,) the k-th largest value
    n_k = np.count_nonzero(live & (v >= th[:, None]), axis=1)  # ties with the k-th value survive
    n = np.where(has_k, n_k, n)
    e = np.exp(v - mx[:, None])  # (t, w) unnormalised probabilities, high to low; the top one weighs 1
    e[v < th[:, None]] = 0.0
    z = np.where(has_k, np.cumsum(e, axis=1)[ar, n - 1], z_full)
    sure = n < w  # a top-k row's normaliser is exact only when all its survivors are in the block
    p_rows = top_p < 1.0
    if p_rows.any():
        before = np.cumsum(e / z[:, None], axis=1)[:, :-1]  # (t, w-1) mass strictly before entries 1..w-1
        n_p = 1 + np.count_nonzero(before < top_p[:, None], axis=1)
        n = np.where(p_rows, np.minimum(n, n_p), n)
    mp_rows = min_p > 0
    if mp_rows.any():
        n = np.where(mp_rows, np.minimum(n, np.count_nonzero(e >= min_p[:, None], axis=1)), n)
    sure = np.where(has_k, sure, n < w)
    return n, v[ar, n - 1], sure


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

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
6. temperature (0 = greedy: the argmax of 1-5, and 7-9 are skipped; the request contract makes
   temperatures below 1e-5 greedy),
7. top-k (ties with the k-th value survive, as in Hugging Face),
8. top-p (nucleus over the tokens sorted by probability high to low, equal ones by token id; a token
   is kept while the mass strictly before it is below top_p, so the most likely token always survives),
9. min-p (tokens whose probability is below min_p x the most likely one's are dropped),

then one token is drawn per sampled row by inverse CDF over the surviving tokens in token-id order,
from one uniform of the row's own generator when it is seeded (so a seeded request gives the same
tokens alone or in any batch, in any slot); unseeded rows share one generator. Greedy rows draw
nothing. Masked tokens (-inf) never survive any filter. Every sum a row's token depends on comes from
that row alone (``filters.py``), so seeded draws do not depend on the batch; tests check this bit for bit.

Log-probabilities reported to clients (chosen token, top alternatives, prompt logprobs) are those of
the model's own distribution, ``log_softmax`` of the raw logits, before every transform above and
logit_bias included. This is vLLM's default; OpenAI reports after its bias. We keep the raw figures
because they are what scoring needs (echo / prompt logprobs, lm-eval's loglikelihood) and a bias that
changed them would make the same prompt score differently depending on sampling settings.

Top-k, top-p and min-p, and the draw among the survivors, are ``filters.py``'s.

A conflict between min_tokens and a grammar that allows only EOS or stop tokens (the structure is
complete) is settled for the grammar: the ban is lifted for that row rather than leave no token.

This module knows nothing about tokenizers, HTTP or ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nextoken.serve.engine.filters import CUT, MINP, TOPK, TOPP, draw_cut, inverse_cdf, top_n
from nextoken.serve.wire import SamplingParams

_FLOAT32_MAX = np.float32(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32 > 0: penalties are stored as float32


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass
class SampleResult:
    token_ids: np.ndarray  # (n,) int64
    logprobs: np.ndarray | None  # (n,) float32 under the model's own distribution; NaN in rows that did not ask
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
# (TOPK, TOPP, MINP: filters.py's bits 6-8.)
_GREEDY, _BIAS, _GRAMMAR, _REP, _PF, _BAN = (1 << i for i in range(6))
_SEEDED, _LOGPROBS = 1 << 9, 1 << 10
_CHANGES_LOGITS = _BIAS | _GRAMMAR | _REP | _PF  # a greedy row with one of these is not a plain argmax


def _bits(f: np.ndarray) -> tuple[int, int]:
    """The OR and the AND of a batch's flags (n,)."""
    return int(np.bitwise_or.reduce(f)), int(np.bitwise_and.reduce(f))


class BatchSampler:
    """Per-slot sampling state for ``max_slots`` cache slots and one step's draw over a batch of them.

    ``add(slot, params, prompt_ids)`` when a request joins its slot, ``remove(slot)`` when it leaves,
    ``sample(logits, slots, allowed)`` once per step for the rows that produce a token (it also records
    the tokens for penalties and min_tokens), ``prompt_logprobs(logits, targets, n)`` for scoring.
    """

    def __init__(self, max_slots: int, vocab_size: int, eos_ids: int | Sequence[int]) -> None:
        if not _is_int(max_slots) or max_slots < 1:
            raise ValueError(f"max_slots must be an integer >= 1, got {max_slots!r}")
        if not _is_int(vocab_size) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        eos = (eos_ids,) if _is_int(eos_ids) else tuple(eos_ids)
        if not eos or not all(_is_int(e) and 0 <= e < vocab_size for e in eos):
            raise ValueError(f"eos_ids must be token ids in [0, {vocab_size}), got {eos_ids!r}")
        S, self.max_slots, self.vocab_size, self.eos_ids = max_slots, max_slots, vocab_size, eos
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
        """Bind ``params`` to ``slot`` for a request whose prompt is ``prompt_ids`` (both checked against
        this model by ``SamplingParams.check``)."""
        self._check_slot(slot)
        if self.active[slot]:
            raise ValueError(f"slot {slot} is already in use; remove() it first")
        prompt = np.asarray(prompt_ids, dtype=np.int64)
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
        ban = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_ids)))
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
                         | (_BAN if self.bans[s] is not None else 0) | (TOPK if self.top_k[s] > 0 else 0)
                         | (TOPP if p.top_p < 1.0 else 0) | (MINP if p.min_p > 0 else 0)
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
        if all_ & CUT:
            return draw_cut(x, t, self.top_k[s], self.top_p[s], self.min_p[s], u, bits)
        if not any_ & CUT:
            return self._draw_full(x, t, s, any_, u)
        out = np.empty(len(s), dtype=np.int64)
        c, w = (f & CUT).nonzero()[0], ((f & CUT) == 0).nonzero()[0]
        sc = s[c]
        out[c] = draw_cut(x[c], t[c], self.top_k[sc], self.top_p[sc], self.min_p[sc], u[c], _bits(f[c]))
        out[w] = self._draw_full(x[w], t[w], s[w], _bits(f[w])[0], u[w])
        return out

    def _draw_full(self, x: np.ndarray, t: np.ndarray, s: np.ndarray, any_: int, u: np.ndarray) -> np.ndarray:
        """Temperature (and min-p) only: a draw over the whole vocabulary; ``x`` (r, V) is overwritten."""
        x /= t[:, None]  # (r, V) tempered logits
        x -= x.max(axis=1, keepdims=True)
        np.exp(x, out=x)  # weights relative to the most likely token, which weighs exactly 1
        if any_ & MINP:
            x[x < self.min_p[s, None]] = 0.0
        return inverse_cdf(x, u)

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
            ids = top_n(zw, Nw)
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
        ids = top_n(lp, np.repeat(n, T))
        return chosen, (ids % V).reshape(T, n), lp.ravel()[ids].reshape(T, n)



"""Per-request sampling over a batch of logits, in NumPy.

One engine step produces logits for every running sequence; each row is then transformed with
its own request's settings, in the order Hugging Face's ``generate`` applies them:

1. repetition penalty (over prompt and generated tokens: positive logits divided, negative multiplied),
2. presence and frequency penalties (OpenAI's, over generated tokens),
3. temperature (below 1e-5 = greedy: the argmax, and top-k / top-p are ignored),
4. top-k,
5. top-p (nucleus; the most likely token always survives),

then one token is drawn per row from that row's own seeded generator, so a seeded request
gives the same text alone or inside a busy batch. Log-probabilities reported to clients are
those of the model's own distribution (before any of the transforms), as vLLM reports them.

This module knows nothing about tokenizers, HTTP or ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Temperatures below this sample as greedy (vLLM's _SAMPLING_EPS): dividing logits by 1e-300
# overflows to inf and the softmax to NaN.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """One request's sampling settings, already validated at the HTTP boundary."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None = no logprobs; N = the chosen token's plus the top N alternatives
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < GREEDY_BELOW:  # greedy: the filters cannot change the argmax
            self.temperature, self.top_k, self.top_p = 0.0, 0, 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_counts(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class SampleResult:
    token_ids: np.ndarray  # (B,) int64
    logprobs: np.ndarray | None  # (B,) chosen tokens' log-probabilities, when any row asked
    top_ids: list[np.ndarray | None]  # per row: (N,) ids of the top alternatives, or None
    top_logprobs: list[np.ndarray | None]  # per row: (N,) their log-probabilities


class RowState:
    """What sampling remembers about one sequence: its generator and token counts."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int]) -> None:
        self.params = params
        # Unseeded requests still get their own stream; seeded ones are reproducible. OpenAI's seed
        # may be any integer, numpy's must be >= 0: fold negatives into 64 bits (-1 -> 2**64 - 1).
        seed = None if params.seed is None else params.seed % (1 << 64) if params.seed < 0 else params.seed
        self.rng = np.random.default_rng(seed)
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


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def sample(logits: np.ndarray, rows: list[RowState]) -> SampleResult:
    """Pick one token per row of ``logits`` (B, V) float32 according to each row's settings."""
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

"""The server's sampler: every transform, per-slot settings in one batch, seeded reproducibility.

``BatchSampler`` is checked against simple per-row references (a full sort per row for top-p, a
float64 log_softmax for logprobs) and against the distribution it must draw from (chi-square on
fixed seeds, so a pass is not luck and a rerun gives the same verdict).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nextoken.serve.engine import filters
from nextoken.serve.engine import sampler as sampling
from nextoken.serve.engine.sampler import BatchSampler
from nextoken.serve.http.errors import validate
from nextoken.serve.http.requests import CompletionRequest
from nextoken.serve.wire import ParamError, SamplingParams

V = 50
EOS = V - 1


def sampler(*params: SamplingParams, prompt=(1, 2, 3), vocab: int = V, slots: int | None = None) -> BatchSampler:
    """A sampler with ``params[i]`` in slot i."""
    bs = BatchSampler(slots or max(len(params), 1), vocab, vocab - 1)
    for i, p in enumerate(params):
        bs.add(i, p, list(prompt))
    return bs


def step(bs: BatchSampler, x: np.ndarray, slots=None, allowed=None):
    return bs.sample(x, np.arange(len(x)) if slots is None else np.asarray(slots), allowed)


def logits(B: int = 1, seed: int = 0, vocab: int = V) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(B, vocab)).astype(np.float32) * 3


def log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def chi_square(counts: np.ndarray, expected_p: np.ndarray) -> float:
    exp = expected_p * counts.sum()
    return float(((counts - exp) ** 2 / exp).sum())


# Upper 0.1% points of the chi-square distribution (tables): df -> critical value.
CHI2_999 = {3: 16.27, 7: 24.32, 9: 27.88}


# --- the tests of the per-row sampler, on the batch sampler ------------------------------------------
def contract(**fields: object) -> SamplingParams:
    """Settings as the request contract makes them from a request (normalised: temperature 0 is greedy)."""
    return validate(CompletionRequest, {"prompt": "x", **fields}).to_sampling_params(
        max_tokens=16, logprobs=None, seed=None)


def test_greedy_is_argmax_and_ignores_filters() -> None:
    x = logits(4)
    p = contract(temperature=0, top_k=3, top_p=0.1, min_p=0.5)
    assert (p.top_k, p.top_p, p.min_p) == (0, 1.0, 0.0)  # normalised away by the request contract
    assert step(sampler(*[p] * 4), x).token_ids.tolist() == x.argmax(-1).tolist()


def test_top_k_restricts_support() -> None:
    x = logits(1)
    allowed = set(np.argsort(-x[0])[:3].tolist())
    bs = sampler(SamplingParams(temperature=1.5, top_k=3, seed=0))
    draws = {int(step(bs, x).token_ids[0]) for _ in range(300)}
    assert draws <= allowed and len(draws) == 3


def test_top_p_keeps_the_smallest_nucleus() -> None:
    x = np.full((1, V), -10.0, dtype=np.float32)
    x[0, [4, 9, 13]] = [3.0, 2.0, 1.0]  # probabilities ~0.66, 0.24, 0.09
    bs = sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=1))
    draws = {int(step(bs, x).token_ids[0]) for _ in range(300)}
    assert draws == {4, 9}  # 0.66 < 0.8, so the second token is needed; the third is not


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    x = logits(1, seed=3)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = sampler(p)
    alone_draws = [int(step(alone, x).token_ids[0]) for _ in range(20)]
    busy = sampler(SamplingParams(temperature=0.7, seed=9), p, SamplingParams(temperature=0))
    xb = np.concatenate([logits(1, seed=8), x, logits(1, seed=5)])
    busy_draws = [int(step(busy, xb).token_ids[1]) for _ in range(20)]
    assert alone_draws == busy_draws
    assert len(set(alone_draws)) > 1  # it really samples


def test_repetition_penalty_follows_hf() -> None:
    x = np.zeros((1, V), dtype=np.float32)
    x[0, 1], x[0, 2], x[0, 7] = 2.0, -1.0, 1.5  # tokens 1 and 2 are in the prompt
    bs = sampler(SamplingParams(temperature=0, repetition_penalty=2.0))
    assert step(bs, x).token_ids[0] == 7  # 2.0 / 2 = 1.0 < 1.5


def test_presence_and_frequency_penalties_count_generated_tokens() -> None:
    x = np.zeros((1, V), dtype=np.float32)
    x[0, 5], x[0, 6] = 1.0, 0.9
    bs = sampler(SamplingParams(temperature=0, frequency_penalty=0.2))
    out = [int(step(bs, x).token_ids[0]) for _ in range(3)]
    assert out == [5, 6, 5]  # after one 5: 0.8 < 0.9; after one 6 too: 0.8 vs 0.7


def test_logprobs_are_the_models_own_distribution() -> None:
    x = logits(2)
    res = step(sampler(SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)), x)
    ref = x[0] - np.log(np.exp(x[0] - x[0].max()).sum()) - x[0].max()
    assert res.logprobs[0] == pytest.approx(ref[res.token_ids[0]], abs=1e-5)
    assert res.top_ids[0].tolist() == np.argsort(-x[0])[:3].tolist()
    assert res.top_logprobs[0] == pytest.approx(ref[np.argsort(-x[0])[:3]], abs=1e-5)
    assert res.top_ids[1] is None and math.isnan(res.logprobs[1])


def test_logprobs_with_a_different_count_per_row() -> None:
    x = logits(4, seed=13)
    bs = sampler(*[SamplingParams(temperature=0.7, logprobs=n, seed=n) for n in (2, 0, 5, 1)])
    res = step(bs, x)
    ref = log_softmax64(x)
    for r, n in enumerate((2, 0, 5, 1)):
        assert res.logprobs[r] == pytest.approx(ref[r, res.token_ids[r]], abs=1e-5)
        assert res.top_ids[r].tolist() == np.argsort(-ref[r], kind="stable")[:n].tolist()
        assert res.top_logprobs[r] == pytest.approx(ref[r, res.top_ids[r]], abs=1e-5)


def test_top_k_then_top_p_in_hugging_face_order() -> None:
    x = np.full((1, V), -30.0, dtype=np.float32)
    x[0, [3, 4, 5, 6]] = np.log([0.4, 0.3, 0.2, 0.1])
    bs = sampler(SamplingParams(temperature=1.0, top_k=2, top_p=0.5, seed=2))
    draws = {int(step(bs, x).token_ids[0]) for _ in range(200)}
    # top-k first renormalises {3, 4} to 0.57 / 0.43, so top-p 0.5 keeps token 3 alone; top-p applied
    # first (0.4 < 0.5 on the raw distribution) would keep 3 and 4.
    assert draws == {3}


def test_draws_follow_the_tempered_distribution() -> None:
    x = np.full((1, V), -30.0, dtype=np.float32)
    x[0, :4] = [2.0, 1.0, 0.5, 0.0]
    T = 0.7
    expected = np.exp(x[0, :4] / T) / np.exp(x[0, :4] / T).sum()
    bs = sampler(SamplingParams(temperature=T, seed=11))
    n = 6000
    counts = np.bincount([int(step(bs, x).token_ids[0]) for _ in range(n)], minlength=V)
    assert counts[4:].sum() == 0
    # 4 standard errors: a wrong temperature (or none) moves the top token's share by > 0.05
    assert np.abs(counts[:4] / n - expected).max() < 4 * np.sqrt(0.25 / n)
    assert chi_square(counts[:4], expected) < CHI2_999[3]


def test_negative_seeds_are_reproducible_and_tiny_temperatures_are_greedy() -> None:
    x = logits(1, seed=4)
    a, b = sampler(SamplingParams(seed=-5)), sampler(SamplingParams(seed=-5))  # numpy itself refuses seed < 0
    assert [int(step(a, x).token_ids[0]) for _ in range(10)] == [int(step(b, x).token_ids[0]) for _ in range(10)]
    p = contract(temperature=1e-300, top_k=5)
    assert p.greedy and p.top_k == 0
    assert int(step(sampler(p), x).token_ids[0]) == int(x.argmax())


# --- each transform on a hand-made batch ---------------------------------------------------------
def test_logit_bias_forces_and_bans_and_logprobs_stay_raw() -> None:
    x = logits(3, seed=6)
    banned = int(x[1].argmax())
    bs = sampler(SamplingParams(temperature=1.0, logit_bias={7: 100.0}, logprobs=0),
                 SamplingParams(temperature=0, logit_bias={banned: -100.0}),
                 SamplingParams(temperature=0))
    for _ in range(50):
        res = step(bs, x)
        assert res.token_ids[0] == 7  # sampled at T=1: +100 leaves every other token at < e^-80 of it
        assert res.token_ids[1] == np.argsort(-x[1])[1]  # the argmax is banned: the runner-up
        assert res.token_ids[2] == x[2].argmax()  # a row without a bias is untouched
    # the reported logprob is the model's own (before the bias), not ~0
    assert res.logprobs[0] == pytest.approx(log_softmax64(x[0])[7], abs=1e-5)
    assert res.logprobs[0] < -0.5 and res.top_ids[0].size == 0


def test_min_tokens_keeps_eos_and_stop_ids_away_exactly_until_the_count() -> None:
    x = np.zeros((1, V), dtype=np.float32)
    x[0, EOS], x[0, 13], x[0, 20] = 5.0, 4.0, 3.0  # EOS best, stop token 13 next, then 20
    bs = sampler(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[13]))
    assert [int(step(bs, x).token_ids[0]) for _ in range(5)] == [20, 20, 20, EOS, EOS]
    sampled = sampler(SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[13], seed=3))
    xs = np.zeros((1, V), dtype=np.float32)
    xs[0, [EOS, 13]] = 3.0  # together ~45% of the mass: 4 steps in a row avoiding both is not luck
    first = [int(step(sampled, xs).token_ids[0]) for _ in range(4)]
    assert EOS not in first and 13 not in first
    # ignore_eos: EOS does not end the sequence, so it is not held back; the stop token still is
    bs = sampler(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[13], ignore_eos=True))
    assert int(step(bs, x).token_ids[0]) == EOS
    x2 = x.copy()
    x2[0, EOS] = 0.0
    bs = sampler(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[13], ignore_eos=True))
    assert [int(step(bs, x2).token_ids[0]) for _ in range(3)] == [20, 20, 13]


def test_min_tokens_keeps_every_end_of_text_token_away() -> None:
    """Llama-3 instruct ends a turn with <|eot_id|> as well as <|end_of_text|>: min_tokens holds back both."""
    x = np.zeros((1, V), dtype=np.float32)
    x[0, 7], x[0, EOS], x[0, 20] = 6.0, 5.0, 3.0  # the second end token best, then the first, then 20
    bs = BatchSampler(1, V, (EOS, 7))
    bs.add(0, SamplingParams(temperature=0, min_tokens=2), [1, 2])
    assert [int(step(bs, x).token_ids[0]) for _ in range(3)] == [20, 20, 7]
    with pytest.raises(ValueError, match="eos_ids"):
        BatchSampler(1, V, (EOS, V))
    with pytest.raises(ValueError, match="eos_ids"):
        BatchSampler(1, V, ())


def as_bias(allowed: np.ndarray) -> np.ndarray:
    """serve/engine/grammar.py's additive form of a mask: 0 where allowed, -inf where not."""
    return np.where(allowed, np.float32(0), np.float32(-np.inf)).astype(np.float32)


@pytest.mark.parametrize("form", [lambda a: a, as_bias], ids=["bool", "bias"])
def test_min_tokens_gives_way_to_a_grammar_that_only_allows_ending(form) -> None:
    x = logits(1, seed=2)
    allowed = np.zeros((1, V), dtype=bool)
    allowed[0, EOS] = True
    bs = sampler(SamplingParams(temperature=0, min_tokens=5, structured="any spec"))
    assert int(step(bs, x, allowed=form(allowed)).token_ids[0]) == EOS
    allowed[0, 3] = True  # another token allowed: the ban holds
    bs = sampler(SamplingParams(temperature=0, min_tokens=5, structured="any spec"))
    assert int(step(bs, x, allowed=form(allowed)).token_ids[0]) == 3


def test_min_p_drops_tokens_below_its_share_of_the_top_one() -> None:
    x = np.full((1, V), -30.0, dtype=np.float32)
    x[0, :4] = np.log([0.5, 0.3, 0.15, 0.05])  # min_p 0.2: the floor is 0.1, so token 3 goes
    for p in (SamplingParams(temperature=1.0, min_p=0.2, seed=5),  # the whole-vocabulary path
              SamplingParams(temperature=1.0, min_p=0.2, top_p=0.999, seed=5)):  # the candidate path
        bs = sampler(p)
        draws = np.bincount([int(step(bs, x).token_ids[0]) for _ in range(2000)], minlength=V)
        assert set(np.flatnonzero(draws)) == {0, 1, 2}
        assert chi_square(draws[:3], np.array([0.5, 0.3, 0.15]) / 0.95) < CHI2_999[3]


@pytest.mark.parametrize("form", [lambda a: a, as_bias], ids=["bool", "bias"])
def test_grammar_mask_is_applied_only_to_rows_with_a_grammar(form) -> None:
    x = logits(3, seed=9)
    rng = np.random.default_rng(0)
    allowed = rng.random((3, V)) < 0.3
    allowed[1] = False  # row 1 has no grammar: its mask is not read
    bs = sampler(SamplingParams(temperature=1.0, structured="g", seed=1), SamplingParams(temperature=0),
                 SamplingParams(temperature=0, structured="g"))
    for _ in range(100):
        t = step(bs, x, allowed=form(allowed)).token_ids
        assert allowed[0, t[0]] and t[1] == x[1].argmax()
        assert t[2] == np.flatnonzero(allowed[2])[np.argmax(x[2, allowed[2]])]
    with pytest.raises(ValueError, match="no allowed mask"):
        step(bs, x)
    allowed[2] = False
    with pytest.raises(ValueError, match="allows no token"):
        step(bs, x, allowed=form(allowed))
    with pytest.raises(ValueError, match="bool mask or float32 bias"):
        step(bs, x, allowed=allowed.astype(np.int8))


def test_penalty_counts_belong_to_their_slot_and_are_cleared_with_it() -> None:
    x = np.zeros((2, V), dtype=np.float32)
    x[:, 5], x[:, 6] = 1.0, 0.9
    p = SamplingParams(temperature=0, frequency_penalty=0.2)
    bs = sampler(p, SamplingParams(temperature=0))
    assert step(bs, x).token_ids.tolist() == [5, 5]
    assert step(bs, x).token_ids.tolist() == [6, 5]  # only slot 0 counts its 5
    bs.remove(0)
    bs.add(0, p, [1])
    assert step(bs, x).token_ids.tolist() == [5, 5]  # a fresh request in the slot starts from zero
    bs.remove(0)
    bs.add(0, SamplingParams(temperature=0, logit_bias={6: 1.0}), [1])
    assert step(bs, x).token_ids.tolist() == [6, 5]
    bs.remove(0)
    bs.add(0, SamplingParams(temperature=0), [1])
    assert step(bs, x).token_ids.tolist() == [5, 5]  # and no bias is left behind


# --- top-p exactness against a simple reference ----------------------------------------------------
def reference_keep(x: np.ndarray, T: float, k: int, top_p: float, min_p: float) -> np.ndarray:
    """Hugging Face's warpers on one row of float32 logits with a full sort: the kept tokens (V,) bool.

    The sampler's numeric policy: ranks by logit (equal ones by id), weights exp(x/T - max) in
    float32, the normaliser a float32 sum over the row (over the sorted survivors in float64 with
    top-k), running masses in float64.
    """
    V = len(x)
    T32 = np.float32(T)
    order = np.argsort(-x, kind="stable")  # high to low, equal logits by id
    xs = x[order]
    keep = xs > -np.inf  # masked tokens never survive
    if 0 < k < V:
        keep &= xs >= xs[k - 1]  # ties with the k-th value survive
    top = x.max() / T32
    e = np.exp(xs / T32 - top)  # (V,) float32, sorted
    e[~keep] = 0.0
    z = float(np.cumsum(e, dtype=np.float64)[-1]) if 0 < k < V else float(np.exp(x / T32 - top).sum())
    if top_p < 1.0:
        before = np.concatenate([[0.0], np.cumsum(e.astype(np.float64) / z)[:-1]])  # mass strictly before each
        keep &= before < top_p
    if min_p > 0:
        keep &= e >= min_p  # e is relative to the most likely token
    out = np.zeros(V, dtype=bool)
    out[order[keep]] = True
    return out


def keep_mask(x: np.ndarray, T: np.ndarray, k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray) -> np.ndarray:
    """The sampler's kept set, computed twice: assuming every transform may be mixed, and with the
    batch's own flags as BatchSampler passes them (the branches for uniform batches)."""
    flags = ((k > 0) * filters.TOPK) | ((top_p < 1) * filters.TOPP) | ((min_p > 0) * filters.MINP)
    masks = []
    for bits in ((filters.CUT | filters.MINP, 0), sampling._bits(flags)):
        mask, L, _, _ = filters._survivors_of(x, T.astype(np.float32), k, top_p, min_p, bits)
        assert (mask.sum(axis=1) == L).all()
        masks.append(mask)
    assert np.array_equal(*masks)
    return masks[1]


@st.composite
def cut_rows(draw: st.DrawFn) -> tuple[np.ndarray, ...]:
    vocab = draw(st.integers(2, 700))
    rows = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "flat", "peaked", "integers"]))
    if kind == "normal":
        x = rng.normal(size=(rows, vocab)) * draw(st.floats(0.1, 8))
    elif kind == "flat":  # wide nuclei: the candidate block does not settle them
        x = rng.normal(size=(rows, vocab)) * 0.01
    elif kind == "peaked":
        x = rng.normal(size=(rows, vocab))
        x[:, rng.integers(0, vocab, 5)] += 8
    else:  # many exact ties, also at the cut
        x = rng.integers(-3, 3, size=(rows, vocab)).astype(np.float64)
    if draw(st.booleans()):  # tokens masked by a grammar or min_tokens
        x[rng.random((rows, vocab)) < 0.3] = -np.inf
        x[:, 0] = 0.0  # at least one live token per row
    x = x.astype(np.float32)
    T = np.array([draw(st.sampled_from([1.0, 0.7, 1.3, draw(st.floats(1e-3, 3.0))])) for _ in range(rows)])
    k = np.array([draw(st.sampled_from([0, 0, 1, 2, 5, 50, 200, vocab - 1])) for _ in range(rows)])
    k = np.where(k >= vocab, 0, k)
    top_p = np.array([draw(st.sampled_from([1.0, 0.9, 0.5, 0.99, draw(st.floats(0.01, 1.0))])) for _ in range(rows)])
    min_p = np.array([draw(st.sampled_from([0.0, 0.0, 0.05, 0.3])) for _ in range(rows)])
    return x, T, k, top_p, min_p


@settings(max_examples=300, deadline=None, derandomize=True)
@given(cut_rows())
def test_top_k_top_p_min_p_keep_exactly_the_reference_set(case) -> None:
    x, T, k, top_p, min_p = case
    keep = keep_mask(x, T, k, top_p, min_p)
    for r in range(len(x)):
        ref = reference_keep(x[r], float(T[r]), int(k[r]), float(top_p[r]), float(min_p[r]))
        assert keep[r].tolist() == ref.tolist(), f"row {r}: T={T[r]} k={k[r]} top_p={top_p[r]} min_p={min_p[r]}"
    # a row's kept set does not depend on its neighbours (a large top-k widens everyone's block)
    alone = [keep_mask(x[r:r + 1], T[r:r + 1], k[r:r + 1], top_p[r:r + 1], min_p[r:r + 1])[0] for r in range(len(x))]
    assert np.array_equal(np.stack(alone), keep)


def test_flat_rows_reach_the_full_sort_and_stay_exact() -> None:
    rng = np.random.default_rng(1)
    Vb = 4096
    x = np.concatenate([rng.normal(size=(2, Vb)) * 0.01, rng.normal(size=(2, Vb)) * 4]).astype(np.float32)
    T, k, top_p, min_p = np.ones(4), np.array([0, 0, 0, 3000]), np.array([0.999, 0.3, 0.9, 0.95]), np.zeros(4)
    keep = keep_mask(x, T, k, top_p, min_p)
    assert keep[0].sum() > Vb // 2 and keep[1].sum() > filters.CANDIDATES * 8  # wider than both candidate blocks
    for r in range(4):
        assert np.array_equal(keep[r], reference_keep(x[r], 1.0, int(k[r]), float(top_p[r]), 0.0))
    # top-k ties running past the candidate block: its partial sum must not settle top-p
    tied = np.zeros((1, Vb), dtype=np.float32)
    tied[0, rng.choice(Vb, 300, replace=False)] = 5.0  # 300 tokens share the top value
    keep = keep_mask(tied, np.ones(1), np.array([5]), np.array([0.5]), np.zeros(1))
    assert keep[0].sum() == 150 and np.array_equal(keep[0], reference_keep(tied[0], 1.0, 5, 0.5, 0.0))


# --- draws, seeds, and one uniform per row --------------------------------------------------------
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8),  # the whole-vocabulary path (chunked running sums)
    SamplingParams(temperature=0.8, top_k=12),  # the survivors path
    SamplingParams(temperature=0.8, top_p=0.995),
], ids=["temperature", "top_k", "top_p"])
def test_draws_follow_softmax_over_a_wide_vocabulary(params: SamplingParams) -> None:
    Vw = 1000  # > 2 chunks: the chunk sums are used
    support = np.array([0, 63, 64, 65, 127, 128, 500, 997, 998, 999])  # across chunk boundaries
    row = np.full(Vw, -40.0, dtype=np.float32)
    row[support] = np.linspace(1.5, 0.0, support.size)
    B = 64
    bs = BatchSampler(B, Vw, 1)
    for s in range(B):
        bs.add(s, params, [2])
    bs.shared_rng = np.random.default_rng(42)  # unseeded rows share this: fixed for a reproducible verdict
    x = np.tile(row, (B, 1))
    counts = np.zeros(Vw, dtype=np.int64)
    for _ in range(250):
        counts += np.bincount(bs.sample(x, np.arange(B)).token_ids, minlength=Vw)
    assert counts[np.setdiff1d(np.arange(Vw), support)].sum() == 0
    p = np.exp(row[support] / 0.8) / np.exp(row[support] / 0.8).sum()
    assert chi_square(counts[support], p) < CHI2_999[9]


def test_draws_follow_softmax_when_the_nucleus_is_most_of_the_vocabulary() -> None:
    Vw, B, T = 1000, 64, 1.0
    row = np.linspace(0.0, -1.0, Vw, dtype=np.float32)  # a gentle slope: top-p 0.95 keeps most tokens
    bs = BatchSampler(B, Vw, 1)
    for s in range(B):
        bs.add(s, SamplingParams(temperature=T, top_p=0.95), [2])
    bs.shared_rng = np.random.default_rng(7)
    kept = keep_mask(row[None], np.ones(1), np.zeros(1, dtype=np.int64), np.array([0.95]), np.zeros(1))[0]
    assert kept.sum() > filters.COMPACT_BELOW * Vw  # the full-row draw, not the gathered survivors
    counts = np.zeros(Vw, dtype=np.int64)
    x = np.tile(row, (B, 1))
    for _ in range(150):
        counts += np.bincount(bs.sample(x, np.arange(B)).token_ids, minlength=Vw)
    assert counts[~kept].sum() == 0
    p = np.where(kept, np.exp(row / T), 0.0)
    p /= p.sum()
    bins = np.arange(0, Vw, 100)  # ten bins of 100 ids, across draw-chunk boundaries
    got, want = np.add.reduceat(counts, bins), np.add.reduceat(p, bins)
    assert chi_square(got[want > 0], want[want > 0] / want.sum()) < CHI2_999[9]


def test_a_seeded_request_draws_the_same_tokens_in_any_batch_and_slot() -> None:
    Vs = 500
    rng = np.random.default_rng(0)
    steps = [rng.normal(size=Vs).astype(np.float32) * 2 for _ in range(40)]
    cases = [SamplingParams(temperature=0.9, top_p=0.9, seed=77), SamplingParams(temperature=1.1, seed=-3),
             SamplingParams(temperature=0.7, top_k=20, min_p=0.02, frequency_penalty=0.3, seed=5)]
    for p in cases:
        alone = BatchSampler(1, Vs, 0)
        alone.add(0, p, [1, 2])
        ref = [int(alone.sample(x[None], np.array([0])).token_ids[0]) for x in steps]
        assert len(set(ref)) > 5  # it really samples
        busy = BatchSampler(8, Vs, 0)
        neighbours = [SamplingParams(temperature=0.5, top_k=400), SamplingParams(temperature=0),
                      SamplingParams(temperature=1.0, top_p=0.5, seed=1), SamplingParams(repetition_penalty=1.3),
                      SamplingParams(temperature=1.0, logprobs=4, min_tokens=3)]
        for slot, q in zip([0, 1, 3, 6, 7], neighbours, strict=True):
            busy.add(slot, q, [3])
        busy.add(5, p, [1, 2])
        got = []
        for t, x in enumerate(steps):
            others = [0, 1, 3, 6, 7][: 1 + t % 5]  # the batch changes size and order every step
            slots = np.array(others[: t % 3] + [5] + others[t % 3:])
            xb = rng.normal(size=(len(slots), Vs)).astype(np.float32) * 2
            xb[list(slots).index(5)] = x
            got.append(int(busy.sample(xb, slots).token_ids[list(slots).index(5)]))
        assert got == ref, p


@pytest.mark.parametrize("width", [1, 7, 64, 129, 2000, 4096])
def test_the_draw_of_a_row_does_not_depend_on_the_batch(width: int) -> None:
    rng = np.random.default_rng(width)
    w = rng.random((200, width)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0  # masked tokens
    w[:, rng.integers(0, width)] = 1.0  # at least one positive weight per row
    u = rng.random(200)
    u[:5] = [0.0, 1 - 2**-53, 0.5, 1e-300, 0.999999]
    together = filters.inverse_cdf(w, u)
    alone = [int(filters.inverse_cdf(w[i:i + 1], u[i:i + 1])[0]) for i in range(200)]
    padded = filters.inverse_cdf(np.pad(w, ((0, 0), (0, 37))), u)  # zero padding after a row changes nothing
    assert together.tolist() == alone == padded.tolist()
    assert (w[np.arange(200), together] > 0).all()


def test_one_uniform_per_sampled_row_per_step() -> None:
    bs = sampler(SamplingParams(seed=3), SamplingParams(), SamplingParams(), SamplingParams(temperature=0),
                 SamplingParams(temperature=0, seed=4))
    bs.shared_rng = np.random.default_rng(10)
    own, shared = np.random.default_rng(3), np.random.default_rng(10)
    for _ in range(7):
        step(bs, logits(5))
        own.random()
        shared.random(2)  # the two unseeded sampled rows; greedy rows draw nothing
    assert bs.rngs[0].bit_generator.state == own.bit_generator.state
    assert bs.shared_rng.bit_generator.state == shared.bit_generator.state
    assert bs.rngs[4] is None


# --- fast path, prompt logprobs -------------------------------------------------------------------
def test_all_greedy_batch_is_one_argmax(monkeypatch: pytest.MonkeyPatch) -> None:
    x = logits(6, seed=12)
    bs = sampler(*[SamplingParams(temperature=0, stop=["x"], seed=i) for i in range(6)])

    def no_transform(*a, **k):
        raise AssertionError("an all-greedy batch without penalties, bias or mask must not be transformed")

    monkeypatch.setattr(BatchSampler, "_pick", no_transform)
    res = step(bs, x)
    assert res.token_ids.tolist() == x.argmax(-1).tolist() and res.logprobs is None
    bs.remove(2)
    bs.add(2, SamplingParams(temperature=0, logit_bias={0: 1.0}), [1])  # one row needs work now
    with pytest.raises(AssertionError, match="must not be transformed"):
        step(bs, x)


def test_prompt_logprobs_match_log_softmax() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, V)).astype(np.float32) * 4
    targets = rng.integers(0, V, 7)
    bs = BatchSampler(1, V, EOS)
    lp, ids, lps = bs.prompt_logprobs(x, targets, 4)
    ref = log_softmax64(x)
    assert lp == pytest.approx(ref[np.arange(7), targets], abs=1e-5)
    assert ids.tolist() == np.argsort(-ref, axis=1, kind="stable")[:, :4].tolist()
    assert lps == pytest.approx(np.take_along_axis(ref, ids, 1), abs=1e-5)
    assert ids.shape == lps.shape == (7, 4) and lp.dtype == np.float32
    lp0, ids0, lps0 = bs.prompt_logprobs(x, targets, 0)
    assert ids0.shape == (7, 0) and lp0 == pytest.approx(lp)
    ties = np.zeros((1, V), dtype=np.float32)
    assert bs.prompt_logprobs(ties, np.array([3]), 3)[1].tolist() == [[0, 1, 2]]  # equal ones by id
    with pytest.raises(ValueError, match="n must be"):
        bs.prompt_logprobs(x, targets, V + 1)


# --- settings, slots -----------------------------------------------------------------------------
def test_the_model_dependent_checks_name_the_field() -> None:
    """SamplingParams.check (the engine's and the planner's): ids within the vocabulary, the prompt and
    output within the context; the rest of the context when max_tokens is None."""
    assert SamplingParams(max_tokens=None).check([1, 2], vocab_size=V, context=10) == 8
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).check([1] * 10, vocab_size=V, context=10) == 0  # scored
    for p, ids, field in ((SamplingParams(logit_bias={V: 1.0}), [1], "logit_bias"),
                          (SamplingParams(stop_token_ids=[V]), [1], "stop_token_ids"),
                          (SamplingParams(logprobs=V + 1), [1], "logprobs"),
                          (SamplingParams(), [V], "prompt"),
                          (SamplingParams(), [], "prompt"),
                          (SamplingParams(max_tokens=3, min_tokens=4), [1], "min_tokens"),
                          (SamplingParams(max_tokens=None, min_tokens=9), [1, 2], "min_tokens"),
                          (SamplingParams(max_tokens=9), [1, 2], "max_tokens"),
                          (SamplingParams(max_tokens=None), [1] * 10, "prompt")):
        with pytest.raises(ParamError) as e:
            p.check(ids, vocab_size=V, context=10)
        assert e.value.param == field and field.split("_")[0] in e.value.message, (field, e.value.message)


def test_slots_are_checked() -> None:
    bs = BatchSampler(2, V, EOS)
    bs.add(0, SamplingParams(), [1])
    with pytest.raises(ValueError, match="already in use"):
        bs.add(0, SamplingParams(), [1])
    with pytest.raises(ValueError, match="slot must be"):
        bs.add(2, SamplingParams(), [1])
    with pytest.raises(ValueError, match="in use"):
        bs.sample(logits(1), np.array([1]))
    with pytest.raises(ValueError, match="distinct"):
        bs.add(1, SamplingParams(), [1]) or bs.sample(logits(2), np.array([1, 1]))
    with pytest.raises(ValueError, match="not in use"):
        bs.remove(1) or bs.remove(1)


def test_a_vanishing_repetition_penalty_saturates_instead_of_breaking_the_draw() -> None:
    """Any penalty > 0 is valid; 5e-324 (a denormal, 0 in float32) once turned a row's weights into NaN
    (found by schemathesis through the server). The seen tokens' logits saturate and tie instead."""
    s = BatchSampler(2, 40, eos_ids=0)
    s.add(0, SamplingParams(repetition_penalty=5e-324, max_tokens=8, seed=1), [5, 6, 7])
    logits = np.random.default_rng(0).standard_normal((1, 40)).astype(np.float32) * 3
    boosted = [i for i in (5, 6, 7) if logits[0, i] > 0]
    for _ in range(8):
        tok = int(s.sample(logits, np.array([0])).token_ids[0])
        assert tok in boosted  # only the seen tokens with positive logits can win, and they do

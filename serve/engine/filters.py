"""Top-k, top-p and min-p over a batch of logit rows, and the draw among the tokens that survive.

The sampler (``sampler.py``) calls ``draw_cut`` for its sampled rows with per-row settings and the
OR / AND of their feature bits (``TOPK``, ``TOPP``, ``MINP``), so a batch pays only for the filters some
row uses.

Numbers: logits are transformed in float32 (what the model emits), probabilities are float32
``exp(x / T - max)``, and every running sum (normaliser, top-p mass, CDF) is float64. Every sum a
row's token depends on is computed from that row alone, in an order fixed by the row (chunks at
fixed offsets, no casting reductions whose buffering could split a row), which is what makes seeded
draws independent of the batch; tests check this bit for bit.

NOTE on top-p without a sort per row: the rows needing top-k or top-p are partitioned once for their
largest values (``np.partition``, values only: a fifth of ``argpartition``'s cost) and only that
candidate block (128 values, or k + 1) is sorted. The block settles a row exactly when the kept
prefix ends strictly inside it; a row whose nucleus is wider (a flat distribution) goes on to a
block eight times larger, or straight to a full sort when the block's mass bounds what the larger
one could hold. Every path computes the same sums in the same order, so which path a row takes (it
depends on its neighbours' top-k) never changes its token. The survivors' ids then come from one
comparison against the row's smallest survivor over the whole row (ties at the cut: lowest ids).

This module knows nothing about requests, slots or seeds: rows, settings and uniforms in, ids out.
"""

from __future__ import annotations

import numpy as np

# Feature bits of the cut filters (the sampler's other bits sit below these).
TOPK, TOPP, MINP = 1 << 6, 1 << 7, 1 << 8
CUT = TOPK | TOPP
CANDIDATES = 128  # first top-k / top-p candidate block; grows 8x per round for rows it does not settle
DRAW_CHUNK = 64  # inverse-CDF draws over a full vocabulary: chunk sums first, then one chunk's cumsum
# A row keeping more than this share of the vocabulary draws over its full row of weights (zeros where
# dropped) instead of gathering its survivors: decided by the row alone, so the draw stays the same
# in any batch.
COMPACT_BELOW = 1 / 8
_LOWEST = np.finfo(np.float32).min  # below every live logit, above -inf (masked)


def top_mask(z: np.ndarray, cut: np.ndarray, n: np.ndarray) -> np.ndarray:
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


def top_n(z: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Flat ids of the ``n[i]`` largest values in each row of ``z`` (r, V): by row, high to low, equal ones by id."""
    r, V = z.shape
    part = z.copy()
    part.partition(sorted(set((V - n).tolist())), axis=1)  # (r, V) values only: a fifth of argpartition's cost
    ids = top_mask(z, part[np.arange(r), V - n], n).ravel().nonzero()[0]
    return ids[np.lexsort((ids, -z.ravel()[ids], ids // V))]


def inverse_cdf(w: np.ndarray, u: np.ndarray) -> np.ndarray:
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


def draw_cut(x: np.ndarray, t: np.ndarray, k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray,
              u: np.ndarray, bits: tuple[int, int] = (CUT | MINP, 0)) -> np.ndarray:
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
        out[i] = inverse_cdf(np.where(keep[i], e_full[i], 0.0), u[i])
        if i.size == r:
            return out
        c = (~wide).nonzero()[0]
        x, t, y_top, keep, L, u = x[c], t[c], y_top[c], keep[c], L[c], u[c]
    ids = keep.ravel().nonzero()[0]  # survivors, by row, in id order
    if len(L) == 1:
        pick = ids[inverse_cdf(np.exp(x.ravel()[ids] / t[0] - y_top[0])[None], u)]
    else:
        rows = ids // V
        start = L.cumsum() - L
        w = np.zeros((len(L), int(L.max())), dtype=np.float32)  # zero-padded: the draw is the same unpadded
        w[rows, np.arange(ids.size) - start.repeat(L)] = np.exp(x.ravel()[ids] / t[rows] - y_top[rows])
        pick = ids[start + inverse_cdf(w, u)] - np.arange(len(L)) * V
    if c is None:
        return pick
    out[c] = pick
    return out


def _survivors_of(x: np.ndarray, t: np.ndarray, k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray,
                  bits: tuple[int, int] = (CUT | MINP, 0)) -> tuple[np.ndarray, ...]:
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
    if not all_ & TOPK:
        nk = (k == 0).nonzero()[0] if any_ & TOPK else None
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
    tasks = [(None, min(V, max(CANDIDATES, int(k.max()) + 1 if any_ & TOPK else 0)))]
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
                return top_mask(x, last, n), n, y_top, e_full
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
    return top_mask(x, cut, L), L, y_top, e_full


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
    if all_ & TOPK or (any_ & TOPK and (k > 0).any()):
        # the k-th largest value (width > k); rows without top-k get the lowest live value
        th = np.maximum(v[ar, k - 1] if all_ & TOPK else np.where(k > 0, v[ar, k - 1], _LOWEST), _LOWEST)
        drop = v < th[:, None]  # ties with the k-th value survive
        n = w - drop.sum(axis=1)
        e[drop] = 0.0
        zk = e.cumsum(axis=1, dtype=np.float64)[ar, n - 1]
        z = zk if all_ & TOPK or z_full is None else np.where(k > 0, zk, z_full)
        sure_k = n < w  # a top-k row's normaliser is exact only when all its survivors are in the block
    else:
        n = (v >= _LOWEST).sum(axis=1)
        z, sure_k = z_full, None
    sums = None
    if any_ & TOPP:
        cs = (e / z[:, None]).cumsum(axis=1)  # (b, w) float64 mass up to and including each entry
        tp = top_p if all_ & TOPP else np.where(top_p < 1.0, top_p, np.inf)  # off: nothing is cut
        n = np.minimum(n, 1 + (cs[:, :-1] < tp[:, None]).sum(axis=1))
        sums = (cs, e, z)
    if any_ & MINP:
        n = np.minimum(n, (e >= min_p[:, None]).sum(axis=1))  # min_p 0 keeps every live entry
    if sure_k is None:
        return n, n < w, sums
    return n, (sure_k if all_ & TOPK else np.where(k > 0, sure_k, n < w)), sums

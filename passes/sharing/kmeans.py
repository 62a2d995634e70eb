"""Vectorised 1-D k-means over the rows of a matrix (one codebook per row).

A weight tensor clustered per tensor is one row; clustered per output channel it is one row per
channel. Everything is batched over rows with numpy; nothing loops over elements or channels.

Fitting works on each row's values *sorted*: in 1-D every cluster is a contiguous run of the
sorted values, so one Lloyd iteration is a batched `searchsorted` of the k-1 decision
boundaries (midpoints of neighbouring centroids) plus differences of prefix sums — O(k log m) per
row and iteration instead of O(m k). Rows of different channels are searched in one call by
mapping each row's values to a disjoint key range (`row*4 + 1 + normalised value`), which is
monotone within a row. Assignment of the full tensor is one `searchsorted` per element against
the sorted boundaries: O(n log k).
"""

from __future__ import annotations

import numpy as np

#: elements handled per chunk when assigning, so a 25M-element tensor never needs 200 MB of
#: float64 temporaries at once
_CHUNK = 1 << 22


def _row_keys(x: np.ndarray, lo: np.ndarray, span: np.ndarray) -> np.ndarray:
    """Map row r's values into [4r, 4r+3], monotone within the row (float64)."""
    r = x.shape[0]
    norm = np.clip((x.astype(np.float64) - lo) / span, -1.0, 2.0)
    return norm + (4.0 * np.arange(r, dtype=np.float64)[:, None] + 1.0)


def init_centroids(xs: np.ndarray, k: int, init: str, weights: np.ndarray | None = None) -> np.ndarray:
    """Initial centroids [R, k] for sorted rows `xs` [R, m]: `linear` spaces them evenly between
    each row's min and max (what Deep Compression found best: it keeps the rare large weights);
    `density` puts them at the quantiles (i+0.5)/k of the row's values. With weights, values
    weighing under 1% of the row's mean weight do not stretch the linear range, and the
    quantiles are those of the weighted distribution (else centroids start where nothing
    matters and stay there)."""
    R, m = xs.shape
    if weights is None:
        cdf = np.broadcast_to((np.arange(m) + 1.0) / m, (R, m))
        lo, hi = xs[:, :1], xs[:, -1:]
    else:
        cdf = np.cumsum(weights, axis=1)
        cdf = cdf / np.maximum(cdf[:, -1:], np.finfo(np.float64).tiny)
        heavy = weights >= 0.01 * weights.mean(axis=1, keepdims=True)
        first = np.argmax(heavy, axis=1)
        last = m - 1 - np.argmax(heavy[:, ::-1], axis=1)
        lo = np.take_along_axis(xs, first[:, None], axis=1)
        hi = np.take_along_axis(xs, last[:, None], axis=1)
    if init == "linear":
        return lo + (hi - lo) * np.linspace(0.0, 1.0, k)[None, :]
    if init == "density":
        q = np.broadcast_to((np.arange(k) + 0.5) / k, (R, k))
        pos = np.minimum(np.array([np.searchsorted(cdf[r], q[r]) for r in range(R)]) if weights is not None
                         else (q * m).astype(np.int64), m - 1)
        return np.take_along_axis(xs, pos, axis=1).astype(np.float64)
    raise ValueError(f"unknown init {init!r} (linear, density)")


def fit_sorted(
    xs: np.ndarray,
    k: int,
    *,
    weights: np.ndarray | None = None,
    init: str = "linear",
    max_iter: int = 300,
    tol: float = 1e-7,
) -> np.ndarray:
    """Weighted Lloyd k-means on rows sorted ascending. xs, weights: [R, m]. Returns sorted
    centroids [R, k] (float64). A cluster that loses all its members keeps its centroid (the
    centroids stay sorted: a mean of the values between two boundaries lies between them)."""
    xs = np.asarray(xs, dtype=np.float64)
    R, m = xs.shape
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    c = init_centroids(xs, k, init, w)
    if k == 1 or m == 0:
        return c
    if w is None:
        w = np.ones_like(xs)
    # prefix sums with a leading 0: the sum over sorted positions [a, b) is P[b] - P[a]
    zero = np.zeros((R, 1))
    cw = np.concatenate([zero, np.cumsum(w, axis=1)], axis=1)
    cwx = np.concatenate([zero, np.cumsum(w * xs, axis=1)], axis=1)
    if R == 1:
        return _fit_one(xs[0], cw[0], cwx[0], c[0], max_iter)[None, :]
    lo = xs[:, :1]
    span = np.maximum(xs[:, -1:] - lo, np.finfo(np.float64).tiny)
    keys = _row_keys(xs, lo, span).ravel()
    row_base = (np.arange(R) * m)[:, None]
    edges = np.empty((R, k + 1), dtype=np.int64)
    edges[:, 0], edges[:, -1] = 0, m
    prev = None
    for _ in range(max_iter):
        mids = 0.5 * (c[:, 1:] + c[:, :-1])
        # side="left": a value equal to a boundary goes to the upper cluster
        edges[:, 1:-1] = np.searchsorted(keys, _row_keys(mids, lo, span).ravel()).reshape(R, k - 1) - row_base
        if prev is not None and np.array_equal(edges, prev):
            break  # same clusters as last time: a fixed point of Lloyd's iteration
        prev = edges.copy()
        sw = np.diff(np.take_along_axis(cw, edges, axis=1), axis=1)
        swx = np.diff(np.take_along_axis(cwx, edges, axis=1), axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            new = np.where(sw > 0, swx / np.where(sw > 0, sw, 1.0), c)
        new = np.sort(new, axis=1)  # a no-op in exact arithmetic; guards against rounding
        moved = np.abs(new - c).max(axis=1) <= tol * span[:, 0]
        c = new
        if moved.all():
            break
    return c


def _fit_one(xs: np.ndarray, cw: np.ndarray, cwx: np.ndarray, c: np.ndarray, max_iter: int) -> np.ndarray:
    """fit_sorted for a single row with as few numpy calls per iteration as possible (the
    arrays are tiny; call overhead is the cost), stopping at the exact fixed point."""
    m = xs.size
    edges = np.empty(c.size + 1, dtype=np.int64)
    edges[0], edges[-1] = 0, m
    inner = edges[1:-1]
    prev = np.full(c.size - 1, -1, dtype=np.int64)
    for _ in range(max_iter):
        inner[:] = np.searchsorted(xs, 0.5 * (c[1:] + c[:-1]))
        if np.array_equal(inner, prev):
            break
        prev[:] = inner
        sw = np.diff(cw[edges])
        swx = np.diff(cwx[edges])
        empty = sw <= 0
        sw[empty] = 1.0
        new = swx / sw
        new[empty] = c[empty]
        c = new
    return np.sort(c)


def _assign_search(x: np.ndarray, mids: np.ndarray) -> np.ndarray:
    """Exact count of each row's boundaries <= value (float64 compares), by searchsorted over
    per-row key ranges; the reference `assign` falls back to for crowded bins."""
    R = x.shape[0]
    lo = np.minimum(x.min(axis=1, keepdims=True), mids[:, :1]).astype(np.float64)
    span = np.maximum(np.maximum(x.max(axis=1, keepdims=True), mids[:, -1:]) - lo, np.finfo(np.float64).tiny)
    if R == 1:
        return np.searchsorted(mids[0], x.astype(np.float64), side="right")
    pos = np.searchsorted(_row_keys(mids, lo, span).ravel(), _row_keys(x, lo, span).ravel(), side="right")
    return pos.reshape(x.shape) - (np.arange(R) * mids.shape[1])[:, None]


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest-centroid index (uint8, k <= 256) of every element of rows x [R, n] against sorted
    centroids [R, k]: the number of the row's k-1 boundaries (centroid midpoints) <= the value.

    A binary search per value costs ~80 ns here; instead each row's range is cut into B bins
    by a monotone function f (computed in x's dtype), a table gives the number of boundaries
    in lower bins, and the at most one boundary inside the value's bin is compared exactly
    (float64). Because f is monotone, a boundary in a lower bin is <= the value and one in a
    higher bin is above it; values in the rare bins holding two or more boundaries take the
    binary search. O(n) with a handful of vectorised passes, exact.
    """
    R, n = x.shape
    k = centroids.shape[1]
    out = np.empty((R, n), dtype=np.uint8)
    if k == 1 or n == 0:
        out[...] = 0
        return out
    mids = 0.5 * (centroids[:, 1:] + centroids[:, :-1])
    dt = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    B = max(256, 16 * k)
    lo = np.minimum(x.min(axis=1), mids[:, 0]).astype(dt)
    hi = np.maximum(x.max(axis=1), mids[:, -1]).astype(dt)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        scale = np.where(hi > lo, dt.type(B) / (hi - lo), dt.type(0)).astype(dt)
    if not np.isfinite(scale).all():  # a range too narrow (or wide) for the dtype: search
        return _assign_search(x, mids).astype(np.uint8)

    # the same float operations as the per-chunk loop below, so boundaries and values bin alike
    mb = np.clip((mids.astype(dt) - lo[:, None]) * scale[:, None], 0, B - 1).astype(np.int32)  # sorted per row
    grid = np.arange(B, dtype=np.int32)
    below = np.empty((R, B), dtype=np.int32)  # boundaries in lower bins
    crowded = np.empty((R, B), dtype=bool)  # bins holding two or more boundaries
    for r in range(R):  # R * B small: fine as a loop over rows
        below[r] = np.searchsorted(mb[r], grid, side="left")
        crowded[r] = np.searchsorted(mb[r], grid, side="right") - below[r] >= 2
    nxt = np.concatenate([mids, np.full((R, 1), np.inf)], axis=1).ravel()  # first boundary not below
    below_f, crowded_f = below.ravel(), crowded.ravel()
    step = 1 << 16  # chunks that stay in cache: a dozen passes over each cost little
    buf = np.empty(step, dtype=dt)
    for r in range(R):
        row, orow = x[r], out[r]
        lo_r, sc_r, boff, koff = lo[r], scale[r], r * B, r * k
        m_r = mids[r]
        for c0 in range(0, n, step):
            v = row[c0 : c0 + step]
            b = buf[: v.size]
            np.subtract(v, lo_r, out=b, casting="unsafe")
            np.multiply(b, sc_r, out=b)
            np.clip(b, 0, B - 1, out=b)
            flat = b.astype(np.int32)
            if boff:
                flat += boff
            t = below_f[flat]
            if koff:
                t += koff
            idx = (v >= nxt[t]).view(np.uint8) + (t - koff).astype(np.uint8)
            hard = crowded_f[flat]
            if hard.any():
                where = np.flatnonzero(hard)
                idx[where] = np.searchsorted(m_r, v[where].astype(np.float64), side="right")
            orow[c0 : c0 + step] = idx
    return out


def refine(x: np.ndarray, idx: np.ndarray, centroids: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """One exact mean update over the full data for fixed assignments (lowers the error of a
    codebook fitted on a sample); clusters with no member keep their centroid."""
    R, k = centroids.shape
    flat = (idx.astype(np.int64) + (np.arange(R) * k)[:, None]).ravel()
    xv = x.reshape(-1).astype(np.float64)
    wv = None if weights is None else weights.reshape(-1).astype(np.float64)
    cnt = np.bincount(flat, weights=wv, minlength=R * k)
    tot = np.bincount(flat, weights=xv if wv is None else xv * wv, minlength=R * k)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(cnt > 0, tot / np.where(cnt > 0, cnt, 1.0), centroids.reshape(-1))
    return mean.reshape(R, k)


def _sse(xs: np.ndarray, c: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """Per-row (weighted) squared error of sorted rows xs against centroids c."""
    idx = assign(xs, c).astype(np.int64)
    d = np.take_along_axis(c, idx, axis=1) - xs
    d *= d
    return (d if w is None else d * w).sum(axis=1)


def cluster_rows(
    x: np.ndarray,
    k: int,
    *,
    weights: np.ndarray | None = None,
    init: str = "auto",
    sample: int = 1 << 18,
    seed: int = 0,
    max_iter: int = 300,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster each row of x [R, n] into at most k values: (codebooks [R, k] float64, indices
    [R, n] uint8, each value's nearest codebook entry). `init`: linear, density, or auto (both,
    per row the one that fits the sample better). The codebook is fitted on at most
    `sample` values in all (the same random columns of every row), refined once on all values."""
    R, n = x.shape
    # per channel, fit on at least 32 values per centroid (or the whole row): a codebook fitted
    # on a few values misses the outliers of the rest
    per_row = min(n, max(32 * k, sample // max(R, 1)))
    if per_row < n:
        cols = np.sort(np.random.default_rng(seed).choice(n, size=per_row, replace=False))
        xsub = x[:, cols]
        wsub = None if weights is None else weights[:, cols]
    else:
        xsub, wsub = x, weights
    if wsub is None:
        xs, ws = np.sort(xsub, axis=1), None
    else:
        order = np.argsort(xsub, axis=1)
        xs, ws = np.take_along_axis(xsub, order, axis=1), np.take_along_axis(wsub, order, axis=1)
    if init == "auto":  # both starts on the sample; keep the one with the lower (weighted) SSE
        fits = [fit_sorted(xs, k, weights=ws, init=i, max_iter=max_iter) for i in ("linear", "density")]
        sse = [_sse(xs, f, ws) for f in fits]
        c = np.where((sse[1] < sse[0])[:, None], fits[1], fits[0])
    else:
        c = fit_sorted(xs, k, weights=ws, init=init, max_iter=max_iter)
    # one exact mean update over all values, then the final nearest-centroid assignment (the
    # sample's boundaries are not quite the full data's)
    c = np.sort(refine(x, assign(x, c), c, weights), axis=1)
    return c, assign(x, c)

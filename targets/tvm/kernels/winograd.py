"""TE computes of Winograd convolution F(m x m, 3 x 3) on channel-blocked activations (NCHW[b]c).

A 3x3 stride-1 convolution computes each m x m tile of output pixels from the (m+2) x (m+2) input
patch around it. Winograd's minimal filtering algorithm (Lavin & Gray, 2016) does it with
(m+2)^2 multiplies per (input, output) channel pair instead of 9 m^2:

    Y_tile = A^T [ (G g G^T) ⊙ (B^T d B) ] A

with `g` the 3x3 kernel, `d` the input patch and A, B, G constant matrices
(`winograd_matrices`). Summed over the input channels, the elementwise product becomes, per
position `a` of the (m+2)^2 transformed tile, a matrix product over the channels: the work moves
from 9 m^2 multiply-adds per pixel block into (m+2)^2 small GEMMs. F(2x2, 3x3) does 16 per 4
output pixels (2.25x fewer than 36), F(4x4, 3x3) 36 per 16 (4x fewer).

The kernel is four stages, each a separate TE compute so the schedule
(`schedules.winograd.WinogradConv`) can place them:

- `winograd_in_rows` / `winograd_in`: the input transform `B^T d B` of every tile (two passes of
  `B^T`, rows then columns), the padding read as zeros, into
  `V [N*(m+2)^2, C/b, 1, T, b]` (T tiles, position-major);
- `winograd_gemm`: per position a, `M[a] = V[a] x U[a]` over the input channels. It is written as
  a 1x1 `conv2d_blocked` over a one-row "image" of T tile pixels whose weights also index the
  batch axis (`U [(m+2)^2, OC/b, C/b, 1, 1, b(in), b(out)]`), so BlockedConv's register-tiled
  micro-kernel schedules it;
- `winograd_out_cols` / `winograd_out`: the output transform `A^T M A` back to
  `[N, OC/b, OH, OW, b]` (the epilogue follows as for any conv).

The weight transform `G g G^T` is a weight-only compute (`pack_winograd_weight`), hoisted with
the other weight packing. The transforms' matrices hold small integers and simple fractions
(points 0, ±1, ±2, ∞); fp32 error grows with m (F(4x4) loses about one more decimal digit than a
direct conv), which is why m stays at 4 or below.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from tvm import te, tirx

__all__ = ["winograd_matrices", "pack_winograd_weight", "pack_winograd_weight_numpy", "conv2d_winograd",
           "winograd_tiles"]

#: interpolation points of the Toom-Cook construction, in the order they are used (plus ∞)
_POINTS = (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))


def _poly_mul(p: list[Fraction], q: list[Fraction]) -> list[Fraction]:
    out = [Fraction(0)] * (len(p) + len(q) - 1)
    for i, x in enumerate(p):
        for j, y in enumerate(q):
            out[i + j] += x * y
    return out


def winograd_matrices(m: int, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T [m, a], G [a, r], B^T [a, a]) of F(m, r), a = m + r - 1, as float64 arrays, built
    exactly (fractions) by the Toom-Cook construction over the points 0, ±1, ±2, ... and ∞:
    `y = A^T ((G g) ⊙ (B^T d))` is the correlation of an `a`-long `d` with an `r`-tap `g`."""
    a = m + r - 1
    if not 2 <= a <= len(_POINTS) + 1:
        raise ValueError(f"F({m}, {r}) needs {a - 1} interpolation points, have {len(_POINTS)}")
    pts = [Fraction(p) for p in _POINTS[: a - 1]]
    at = [[p**i for p in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = []
    for p in pts:
        den = Fraction(1)
        for q in pts:
            if q != p:
                den *= p - q
        g.append([p**k / den for k in range(r)])
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    bt = []
    for p in pts:  # row j: coefficients of prod_{q != p} (x - q)
        poly = [Fraction(1)]
        for q in pts:
            if q != p:
                poly = _poly_mul(poly, [-q, Fraction(1)])
        bt.append(poly + [Fraction(0)] * (a - len(poly)))
    full = [Fraction(1)]
    for q in pts:
        full = _poly_mul(full, [-q, Fraction(1)])
    bt.append(full)
    return tuple(np.array([[float(v) for v in row] for row in mat]) for mat in (at, g, bt))  # type: ignore[return-value]


def winograd_tiles(oh: Any, ow: Any, m: int) -> tuple[Any, Any]:
    """Tile rows and columns of an `oh` x `ow` output in m x m tiles (ints, or expressions of a
    symbolic map's size)."""
    return (oh + m - 1) // m, (ow + m - 1) // m


def _dim(d: Any) -> Any:
    """A shape dim as an int where it is static, else the (symbolic) expression."""
    return int(d) if isinstance(d, (int, tirx.IntImm)) else d


def _combo(coeffs: Sequence[float], terms: Sequence[Any], dtype: str) -> Any:
    """sum(c * t) over the nonzero coefficients, without the multiply for ±1."""
    out = None
    for c, t in zip(coeffs, terms):
        if c == 0:
            continue
        if c == 1:
            term, neg = t, False
        elif c == -1:
            term, neg = t, True
        else:
            term, neg = t * tirx.const(float(c), dtype), False
        if out is None:
            out = -term if neg else term
        else:
            out = out - term if neg else out + term
    return out if out is not None else tirx.const(0.0, dtype)


def _select(index: Any, rows: Sequence[Any]) -> Any:
    """rows[index] for a loop variable `index`: a chain of Selects that the build folds to one
    branch once the loop over `index` is unrolled."""
    out = rows[-1]
    for k in range(len(rows) - 2, -1, -1):
        out = tirx.Select(index == k, rows[k], out)
    return out


def _const_element(mat: np.ndarray, i: Any, j: Any, dtype: str) -> Any:
    """mat[i, j] for index expressions `i`, `j`: a chain of Selects over the nonzero elements."""
    out = tirx.const(0.0, dtype)
    for r in range(mat.shape[0]):
        for c in range(mat.shape[1]):
            if mat[r, c] != 0:
                out = tirx.Select(tirx.all(i == r, j == c), tirx.const(float(mat[r, c]), dtype), out)
    return out


def pack_winograd_weight(w: te.Tensor, b: int, m: int) -> te.Tensor:
    """[OC, C, 3, 3] → U = G g G^T per channel pair, as `[(m+2)^2, OC/b, C/b, 1, 1, b(in), b(out)]`
    (position-major: one position's weights are one 1x1 conv's packed weights). A weight-only
    compute: it runs once, at compile time, as a reduction over the 3x3 taps with G's elements
    inline (written as one Select chain over the positions, as the activations' transforms are,
    its default schedule crashed a worker thread while packing ResNet-50's weights; with G as a
    tensor of its own, tuning took it for a kernel: a reduction over a product of two tensors)."""
    oc, c, kh, kw = w.shape
    if int(kh) != 3 or int(kw) != 3:
        raise ValueError("Winograd weights need a 3x3 kernel")
    _, g, _ = winograd_matrices(m)
    a = m + 2
    u = te.reduce_axis((0, 3), "u")
    v = te.reduce_axis((0, 3), "v")
    dt = w.dtype
    return te.compute(
        (a * a, oc // b, c // b, 1, 1, b, b),
        lambda pos, ob, cb, _y, _x, ii, oi: te.sum(
            _const_element(g, pos // a, u, dt) * _const_element(g, pos % a, v, dt) * w[ob * b + oi, cb * b + ii, u, v],
            axis=[u, v]),
        name="pack_winograd_weight",
    )


def pack_winograd_weight_numpy(w: np.ndarray, b: int, m: int) -> np.ndarray:
    """`pack_winograd_weight` in numpy, computed in float64 (for checks and benchmarks that feed a
    kernel its packed weights directly)."""
    _, g, _ = winograd_matrices(m)
    oc, c = w.shape[:2]
    a = m + 2
    u = np.einsum("au,ocuv,bv->abco", g, w.astype(np.float64), g).reshape(a * a, c // b, b, oc // b, b)
    return np.ascontiguousarray(u.transpose(0, 3, 1, 2, 4).reshape(a * a, oc // b, c // b, 1, 1, b, b)).astype(np.float32)


def conv2d_winograd(x: te.Tensor, u: te.Tensor, pads: Sequence[int], m: int) -> te.Tensor:
    """x [N, C/b, H, W, b] (*) a 3x3 stride-1 kernel given as `pack_winograd_weight`'s U →
    [N, OC/b, OH, OW, b], in F(m x m, 3 x 3) (see module docstring)."""
    n, cb_n, h, wd, b = x.shape
    a2n, ob_n = int(u.shape[0]), u.shape[1]
    a = m + 2
    if a2n != a * a:
        raise ValueError(f"weights for {a2n} positions, F({m}) needs {a * a}")
    top, left, bottom, right = (int(p) for p in pads)
    h, wd = _dim(h), _dim(wd)  # (a symbolic map: its tile count is an expression; see schedules.winograd)
    oh, ow = h + top + bottom - 2, wd + left + right - 2
    th, tw = winograd_tiles(oh, ow, m)
    nt = th * tw
    at, _, bt = winograd_matrices(m)
    dt = x.dtype
    zero = tirx.const(0.0, dt)

    def xin(i: Any, cb: Any, y: Any, xx: Any, ii: Any) -> Any:
        inside = tirx.all(y >= 0, y < h, xx >= 0, xx < wd)
        return tirx.if_then_else(inside, x[i, cb, y, xx, ii], zero)

    # B^T over the patch's rows: rows[n, cb, t, a1, col, ii]
    def in_rows(i: Any, cb: Any, t: Any, a1: Any, col: Any, ii: Any) -> Any:
        y0, x0 = (t // tw) * m - top, (t % tw) * m - left
        terms = [xin(i, cb, y0 + r, x0 + col, ii) for r in range(a)]
        return _select(a1, [_combo(bt[k], terms, dt) for k in range(a)])

    rows = te.compute((n, cb_n, nt, a, a, b), in_rows, name="winograd_in_rows")

    # ... then over its columns: V[n*a^2 + a1*a + a2, cb, 0, t, ii]
    def in_cols(pi: Any, cb: Any, _z: Any, t: Any, ii: Any) -> Any:
        i, pos = pi // (a * a), pi % (a * a)
        a1, a2 = pos // a, pos % a
        terms = [rows[i, cb, t, a1, col, ii] for col in range(a)]
        return _select(a2, [_combo(bt[k], terms, dt) for k in range(a)])

    v = te.compute((n * a * a, cb_n, 1, nt, b), in_cols, name="winograd_in")

    # per position, a 1x1 conv over the tile pixels with that position's weights
    icb = te.reduce_axis((0, cb_n), "icb")
    kh = te.reduce_axis((0, 1), "kh")
    kw = te.reduce_axis((0, 1), "kw")
    ii = te.reduce_axis((0, b), "ii")
    static_one = isinstance(n, (int, tirx.IntImm)) and int(n) == 1

    def gemm(pi: Any, ob: Any, z: Any, t: Any, oi: Any) -> Any:
        pos = pi if static_one else pi % (a * a)
        return te.sum(v[pi, icb, z + kh, t + kw, ii] * u[pos, ob, icb, kh, kw, ii, oi], axis=[icb, kh, kw, ii])

    mm = te.compute((n * a * a, ob_n, 1, nt, b), gemm, name="winograd_gemm")

    # A^T over the transformed tile's columns: cols[n, ob, t, a1, xi, oi]
    def out_cols(i: Any, ob: Any, t: Any, a1: Any, xi: Any, oi: Any) -> Any:
        terms = [mm[i * (a * a) + a1 * a + a2, ob, 0, t, oi] for a2 in range(a)]
        return _select(xi, [_combo(at[k], terms, dt) for k in range(m)])

    cols = te.compute((n, ob_n, nt, a, m, b), out_cols, name="winograd_out_cols")

    # ... then over its rows, into the output pixels
    def out_rows(i: Any, ob: Any, y: Any, xx: Any, oi: Any) -> Any:
        t = (y // m) * tw + xx // m
        terms = [cols[i, ob, t, a1, xx % m, oi] for a1 in range(a)]
        return _select(y % m, [_combo(at[k], terms, dt) for k in range(m)])

    return te.compute((n, ob_n, oh, ow, b), out_rows, name="winograd_out")

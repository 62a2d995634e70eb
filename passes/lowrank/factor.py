"""The arithmetic of `low-rank`: truncated SVD of a weight, plain or whitened by its inputs.

Every layer is viewed as y = x W + b with W [K, N] (K inputs: a Conv's im2col patch of
Ci·kh·kw values, N outputs). A rank-r factorization W' = A B (A [K, r], B [r, N]) is chosen by
one of two objectives:

- plain: min ‖W − W'‖_F (Eckart–Young: the r leading singular triplets of W). Right when
  nothing is known about the inputs; for white inputs it is also the output error.
- data-aware (ASVD / SVD-LLM): min E‖x W + b − x W' − b'‖² over the calibration activations.
  With Σ the inputs' covariance (centered; the bias b' = b + μ(W − W') absorbs the mean μ) or
  their second moment E[xᵀx] when the layer has no bias to absorb it, the error is
  ‖Σ^½ (W − W')‖_F², so the r leading singular triplets of Σ^½ W, mapped back through Σ^-½, are
  optimal. With `refit` the inputs x' are those of the partly factorized model (upstream
  layers already low-rank) and the target y that of the original: first the least-squares W
  (ridge towards the original) of x' → y, then its whitened truncation — the reduced-rank
  regression optimum, so upstream error is compensated, not accumulated.

The rank comes from an energy: the smallest r whose leading σ² hold that share of the total
(of W's spectrum for plain, of Σ^½ W's for data-aware, where 1 − energy is then the relative
squared output error on the calibration data, up to the refit's irreducible residual).

All in float64. Σ is damped by `DAMP`·mean(diag Σ) before the square roots: a few thousand
calibration rows for ~1500 inputs give a noisy Σ whose smallest eigenvalues would otherwise
steer the factors towards directions the data barely saw (the value is not tuned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: relative damping added to the input covariance's diagonal (data-aware)
DAMP = 0.01
#: ridge of the refit towards the original weight, relative to mean(diag Σ)
RIDGE = 1e-3


@dataclass
class Moments:
    """Sums over calibration rows of one layer: x̃ = [x, 1] of the (current) inputs and,
    for a refit, y of the original layer."""

    g: np.ndarray  # Σ x̃ᵀ x̃  [(K+1), (K+1)]
    n: float  # rows (the sum of their weights)
    xy: np.ndarray | None = None  # Σ x̃ᵀ y [(K+1), N] (refit only)
    yy: float = 0.0  # Σ ‖y‖² (refit only)


@dataclass
class Factors:
    a: np.ndarray  # [K, r]
    b: np.ndarray  # [r, N]
    bias: np.ndarray | None  # the new bias [N] (None: the layer keeps its bias, or has none)
    sigma: np.ndarray  # the whole spectrum the rank was read from (descending)


def energy_rank(sigma: np.ndarray, energy: float) -> int:
    """The smallest r with Σ_{i<r} σ_i² ≥ energy · Σ σ_i² (at least 1)."""
    s2 = np.asarray(sigma, np.float64) ** 2
    total = float(s2.sum())
    if total <= 0.0:
        return 1
    cum = np.cumsum(s2) / total
    return int(min(len(s2), max(1, np.searchsorted(cum, energy - 1e-12) + 1)))


def _split(u: np.ndarray, s: np.ndarray, vt: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """A = U_r S_r^½, B = S_r^½ V_rᵀ: balanced factors (equal scales suit a later int8 pass)."""
    h = np.sqrt(s[:r])
    return u[:, :r] * h[None, :], h[:, None] * vt[:r]


def svd(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD U, S, Vᵀ of m [K, N] through the eigendecomposition of the smaller Gram matrix
    (LAPACK's divide-and-conquer SVD ran 20x slower than `eigh` on this 2-core machine under
    load: 8.8 s against 0.43 s for 384x1536). Singular values below 1e-7·σ_max get zero
    vectors; the truncations here never keep them."""
    m = np.asarray(m, np.float64)
    tall = m.shape[0] >= m.shape[1]
    g = m.T @ m if tall else m @ m.T
    e, q = np.linalg.eigh(g)
    order = np.argsort(e)[::-1]
    e, q = np.maximum(e[order], 0.0), q[:, order]
    s = np.sqrt(e)
    ok = s > 1e-7 * (s[0] if len(s) else 0.0)
    inv = np.where(ok, 1.0 / np.where(ok, s, 1.0), 0.0)
    if tall:  # q = V: U = m V / s
        return (m @ q) * inv[None, :], s, q.T
    return q, s, (q.T @ m) * inv[:, None]  # q = U: Vᵀ = Uᵀ m / s


def plain(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD of W [K, N] (thin): U, S, Vᵀ."""
    return svd(w)


def _sqrt_psd(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C^½, C^-½) of a symmetric PSD matrix, damped by DAMP·mean(diag C)."""
    k = len(c)
    lam = DAMP * float(np.trace(c)) / max(k, 1) + 1e-12
    e, q = np.linalg.eigh(_damped(c))
    e = np.maximum(e, lam)
    r = np.sqrt(e)
    return (q * r) @ q.T, (q / r) @ q.T


@dataclass
class Whitened:
    """A data-aware problem, ready to truncate at any rank: the singular values `s` and right
    vectors `vt` of Σ^½·W_t (W_t the target [K, N]), `left` = Σ^-½·U (so A = left_r·S_r^½),
    and how to rebuild the bias."""

    left: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    mu: np.ndarray | None  # input mean (centered problem) or None
    y_mean: np.ndarray | None  # target mean: bias' = y_mean − μ W'


def _damped(c: np.ndarray) -> np.ndarray:
    k = len(c)
    lam = DAMP * float(np.trace(c)) / max(k, 1) + 1e-12
    return (c + c.T) / 2 + lam * np.eye(k)


def _right_side(cov: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left, s, vt) of Σ^½·T through the N x N matrix Tᵀ Σ T = V S² Vᵀ, without Σ^½: U = Σ^½ T V
    S⁻¹, so Σ^-½ U = T V S⁻¹ (for K > N: one N x N eigendecomposition instead of a K x K one
    and the Gram of Σ^½ T; 1536 -> 384 on a transformer's FFN output projection)."""
    g = target.T @ (_damped(cov) @ target)
    e, q = np.linalg.eigh((g + g.T) / 2)
    order = np.argsort(e)[::-1]
    e, q = np.maximum(e[order], 0.0), q[:, order]
    s = np.sqrt(e)
    ok = s > 1e-7 * (s[0] if len(s) else 0.0)
    inv = np.where(ok, 1.0 / np.where(ok, s, 1.0), 0.0)
    return (target @ q) * inv[None, :], s, q.T


def whiten(m: Moments, w: np.ndarray, bias: np.ndarray | None, *, centered: bool, refit: bool) -> Whitened:
    """Set up min E‖y − x W'(−b')‖² over rank-r W' for the rows summed in `m`.

    Without refit the target is the layer itself (y = x W + b on the same x); with it, the
    least-squares map of the rows x → y (ridge towards W). `centered`: a bias absorbs the
    mean (b' = ȳ − μ W'); else the uncentered second moment is used and the bias kept."""
    k = w.shape[0]
    n = max(m.n, 1)
    g = m.g / n
    exx, mu = g[:k, :k], g[:k, k]
    bias = np.zeros(w.shape[1]) if bias is None else np.asarray(bias, np.float64)
    if refit:
        assert m.xy is not None
        exy, y_mean = m.xy[:k] / n, m.xy[k] / n
    else:
        exy, y_mean = exx @ w + mu[:, None] * bias[None, :], mu @ w + bias
    if centered:
        cov = exx - np.outer(mu, mu)
        cxy = exy - np.outer(mu, y_mean)
    else:
        cov, cxy = exx, exy
    if refit:
        lam = RIDGE * float(np.trace(cov)) / max(k, 1) + 1e-12
        target = np.linalg.solve(cov + lam * np.eye(k), cxy + lam * w)
    else:
        target = w
    if target.shape[1] < k:  # fewer outputs than inputs: the N x N route (same factors)
        left, s, vt = _right_side(cov, target)
    else:
        sq, inv = _sqrt_psd(cov)
        u, s, vt = svd(sq @ target)
        left = inv @ u
    return Whitened(left, s, vt, mu if centered else None, y_mean if centered else None)


def truncate(wh: Whitened, r: int) -> Factors:
    h = np.sqrt(wh.s[:r])
    a, b = wh.left[:, :r] * h[None, :], h[:, None] * wh.vt[:r]
    bias = None
    if wh.mu is not None and wh.y_mean is not None:
        bias = wh.y_mean - (wh.mu @ a) @ b
    return Factors(a, b, bias, wh.s)


def truncate_plain(svd: tuple[np.ndarray, np.ndarray, np.ndarray], r: int) -> Factors:
    u, s, vt = svd
    a, b = _split(u, s, vt, r)
    return Factors(a, b, None, s)


def output_error(m: Moments, theta: np.ndarray, *, w: np.ndarray | None = None, bias: np.ndarray | None = None) -> tuple[float, float]:
    """(Σ‖y − x̃ θ‖², Σ‖y‖²) over the rows of `m`, θ = [W'; b'] [(K+1), N]. The target y is the
    original layer: from m.xy/m.yy when read (refit), else y = x̃ [W; b]."""
    g = m.g
    if m.xy is None:
        assert w is not None
        th0 = np.concatenate([w, (np.zeros(w.shape[1]) if bias is None else bias)[None, :]])
        xy, yy = g @ th0, float(np.sum(th0 * (g @ th0)))
    else:
        xy, yy = m.xy, m.yy
    err = float(np.sum(theta * (g @ theta))) - 2.0 * float(np.sum(theta * xy)) + yy
    return max(err, 0.0), yy


def sqnr_db(err: float, ref: float) -> float:
    if err <= 0.0:
        return math.inf
    if ref <= 0.0:
        return -math.inf
    return 10.0 * math.log10(ref / err)


def flops_ratio_limit(k: int, n: int) -> int:
    """The largest rank r with r·(K + N) < K·N: beyond it two matmuls cost as much as one."""
    return max(0, (k * n - 1) // (k + n))

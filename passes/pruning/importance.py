"""Importance of each prunable class (a union-find root) from weights, BN scales or activations.

Every weight slice that belongs to a class contributes: the output filter of each producer
(Conv/Gemm/MatMul rows of the class) and the input slice of each consumer. Scores are normalised
per layer (divided by the layer's mean) so layers of different scale are comparable — which the
global ranking needs — and a class's importance is the mean of its contributions.

- `l1`: mean |w| of the slice; `l2`: its root-mean-square.
- `bn-scale`: |gamma| of the BatchNormalization(s) the class passes through (network slimming);
  classes that meet no BatchNormalization fall back to `l2`.
- `activation`: for each consumer, sqrt(E[x_c^2]) * ||W[:, c]||, the expected size of channel
  c's contribution to the consumer's output, with E over calibration data (onnxruntime reads the
  consumer inputs; a transformer's padding tokens left out); classes that no calibrated consumer
  reads fall back to `l2`. A MatMul/Gemm whose output reaches a LayerNorm through Adds (a
  transformer's attention output and FFN output projections) instead scores a class by what its
  removal changes in the normalised stream, E_t[‖x_t,c W_c diag(γ)‖² / σ_t²] per channel (σ_t
  the norm's denominator at token t, γ its scale; a head's 32 dims together, with their
  correlations): MiniLM's outlier tokens carry ~30x the median FFN output and the LayerNorm
  divides them away, so raw activation sizes rank by those few tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from graphopt.ir import constant_semantics
from graphopt.pattern import const_array

from graphopt.passes.pruning.dependency import Analysis

CRITERIA = ("auto", "l1", "l2", "bn-scale", "activation")


def _slice_norms(w: np.ndarray, axis: int, kind: str) -> np.ndarray:
    w = np.moveaxis(np.asarray(w, dtype=np.float64), axis, 0).reshape(w.shape[axis], -1)
    if kind == "l1":
        return np.abs(w).mean(axis=1)
    return np.sqrt((w * w).mean(axis=1))


class _Acc:
    def __init__(self, n: int) -> None:
        self.total = np.zeros(n)
        self.count = np.zeros(n)

    def add(self, roots: np.ndarray, scores: np.ndarray) -> None:
        mean = float(scores.mean()) if scores.size else 0.0
        if mean <= 0 or not np.isfinite(mean):
            mean = 1.0
        np.add.at(self.total, roots, scores / mean)
        np.add.at(self.count, roots, 1.0)

    def result(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)


def magnitude(an: Analysis, kind: str) -> np.ndarray:
    """Per root id: normalised l1/l2 magnitude of the class's weight slices (NaN: none)."""
    assert an.root is not None
    acc = _Acc(len(an.root))
    with constant_semantics(an.model):
        for p in an.producers:
            w = const_array(p.node.inputs[p.w_index])
            if w is not None and w.shape[p.w_axis] == len(p.ids):
                acc.add(an.root[p.ids], _slice_norms(w, p.w_axis, kind))
        for c in an.consumers:
            w = const_array(c.node.inputs[c.w_index])
            if w is not None and w.shape[c.w_axis] == len(c.ids):
                acc.add(an.root[c.ids], _slice_norms(w, c.w_axis, kind))
    return acc.result()


def bn_scale(an: Analysis) -> np.ndarray:
    assert an.root is not None
    acc = _Acc(len(an.root))
    with constant_semantics(an.model):
        for node, ids in an.bns:
            gamma = const_array(node.inputs[1])
            var = const_array(node.inputs[4])
            if gamma is None or gamma.shape != (len(ids),):
                continue
            # the scale BN really applies: gamma / sqrt(var + eps)
            eps = float(node.attr("epsilon", 1e-5))
            s = np.abs(gamma.astype(np.float64))
            if var is not None and var.shape == gamma.shape:
                s = s / np.sqrt(var.astype(np.float64) + eps)
            acc.add(an.root[ids], s)
    res = acc.result()
    fallback = magnitude(an, "l2")
    return np.where(np.isnan(res), fallback, res)


def activation(an: Analysis, rms: Mapping[str, np.ndarray], contrib: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
    """`rms`: consumer input name -> sqrt(E[x^2]) per channel along the consumer's channel axis.
    `contrib`: consumer index -> per class (np.unique of its input roots) the class's expected
    squared contribution to the LayerNorm-normalised stream (recovery.contributions); those
    consumers score a class by it per channel, under one scale for all of them (so a global
    ranking compares FFN units and heads of different layers by the error their removal makes),
    and replace the rms score of the classes they read."""
    assert an.root is not None
    acc = _Acc(len(an.root))
    contrib = contrib or {}
    ln_total = np.zeros(len(an.root))
    ln_count = np.zeros(len(an.root))
    for i, per in contrib.items():
        c = an.consumers[i]
        roots, sizes = np.unique(an.root[c.ids], return_counts=True)
        if len(per) != len(roots):
            continue
        np.add.at(ln_total, roots, per / sizes)
        np.add.at(ln_count, roots, 1.0)
    with constant_semantics(an.model):
        for i, c in enumerate(an.consumers):
            if i in contrib:
                continue
            r = rms.get(c.x.name)
            w = const_array(c.node.inputs[c.w_index])
            if r is None or w is None or c.grouped or len(r) != len(c.ids) or w.shape[c.w_axis] != len(c.ids):
                continue
            wn = np.moveaxis(w.astype(np.float64), c.w_axis, 0).reshape(len(c.ids), -1)
            acc.add(an.root[c.ids], r * np.sqrt((wn * wn).sum(axis=1)))
    res = acc.result()
    has = ln_count > 0
    if has.any():
        vals = ln_total[has] / ln_count[has]
        mean = float(vals.mean())
        res = res.copy()
        res[has] = vals / (mean if mean > 0 and np.isfinite(mean) else 1.0)
    fallback = magnitude(an, "l2")
    return np.where(np.isnan(res), fallback, res)

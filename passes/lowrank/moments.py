"""Calibration statistics of `low-rank`'s layers: per layer the sums over rows of x̃ᵀx̃
(x̃ = [x, 1]) and, for a refit, x̃ᵀy and ‖y‖² with y the original layer's output.

Rows: a MatMul/Gemm input flattened to its last axis (a transformer's padding tokens left out:
the `attention_mask` graph input, see graphopt.passes.sharing.refit.token_mask), weighted by
1/σ_t² of the LayerNorm the layer's output reaches through Adds where it does (the attention
output and FFN output projections: graphopt.passes.pruning.recovery.norm_weights; MiniLM's few
outlier tokens, whose FFN output is ~30x the median and which the LayerNorm divides away, would
otherwise take most of the energy); a Conv input
as im2col patches at up to `ROWS_PER_BATCH` output positions drawn per batch (seeded, so the
original model's outputs are read at the same positions). Tensors are read with onnxruntime,
`CHUNK` per session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from graphopt.ir import Model, Node

from graphopt.passes.pruning.recovery import chunks, norm_after, norm_weights
from graphopt.passes.sharing.refit import token_mask

from graphopt.passes.lowrank.factor import Moments
from graphopt.passes.lowrank.layers import Layer

ROWS_PER_BATCH = 2048
CHUNK = 24

Batch = Mapping[str, np.ndarray]


def _pads(node: Node, x_shape: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[list[int], list[int], list[int]]:
    nd = len(kernel)
    strides = list(node.attr("strides", [1] * nd))
    dil = list(node.attr("dilations", [1] * nd))
    auto = node.attr("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", None, "", "VALID"):
        pads = list(node.attr("pads", [0] * (2 * nd))) if auto != "VALID" else [0] * (2 * nd)
    else:
        pads = [0] * (2 * nd)
        for i in range(nd):
            size = x_shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + nd] = lo, total - lo
    return strides, dil, pads


def _patches(x: np.ndarray, layer: Layer, pos: tuple[np.ndarray, ...]) -> np.ndarray:
    """im2col rows [len(pos[0]), Ci·Πk] of a 2-D Conv at output positions (img, i, j)."""
    kh, kw = layer.kernel
    strides, dil, pads = _pads(layer.node, x.shape, layer.kernel)
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    img, i, j = pos
    ii = (i * strides[0])[:, None] + (np.arange(kh) * dil[0])[None, :]
    jj = (j * strides[1])[:, None] + (np.arange(kw) * dil[1])[None, :]
    c = np.arange(x.shape[1])
    p = xp[img[:, None, None, None], c[None, :, None, None], ii[:, None, :, None], jj[:, None, None, :]]
    return p.reshape(len(img), -1)


def data_aware(layer: Layer) -> bool:
    """Whether rows can be read for this layer (2-D convs only among the convs)."""
    return layer.kind != "conv" or len(layer.kernel) == 2


def _positions(li: int, bi: int, n: int, ho: int, wo: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The output positions (img, i, j) sampled for layer `li` in batch `bi` (the same for the
    original model's outputs and the current model's inputs)."""
    total = n * ho * wo
    rng = np.random.default_rng([seed, li, bi])
    pick = np.sort(rng.choice(total, size=min(total, ROWS_PER_BATCH), replace=False))
    img, rem = np.divmod(pick, ho * wo)
    i, j = np.divmod(rem, wo)
    return img, i, j


def _masked(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    rows = a.reshape(-1, a.shape[-1])
    lead = a.shape[:-1]
    if mask is not None and (lead == mask.shape or lead == (mask.size,)):
        rows = rows[mask.reshape(-1) != 0]
    return rows


def _x_rows(layer: Layer, li: int, bi: int, x: np.ndarray, mask: np.ndarray | None, seed: int) -> np.ndarray:
    if layer.kind == "conv":
        strides, dil, pads = _pads(layer.node, x.shape, layer.kernel)
        ho = (x.shape[2] + pads[0] + pads[2] - dil[0] * (layer.kernel[0] - 1) - 1) // strides[0] + 1
        wo = (x.shape[3] + pads[1] + pads[3] - dil[1] * (layer.kernel[1] - 1) - 1) // strides[1] + 1
        return _patches(x, layer, _positions(li, bi, x.shape[0], ho, wo, seed)).astype(np.float64)
    return _masked(x, mask).astype(np.float64)


def _y_rows(layer: Layer, li: int, bi: int, y: np.ndarray, mask: np.ndarray | None, seed: int) -> np.ndarray:
    """The target rows, kept as float32 until the wave's inputs are read (a conv's full output
    maps of every batch would not fit in memory on a large net)."""
    if layer.kind == "conv":
        img, i, j = _positions(li, bi, y.shape[0], y.shape[2], y.shape[3], seed)
        return np.asarray(y[img, :, i, j], np.float32)
    return np.asarray(_masked(y, mask), np.float32)


def _run(model: Model, names: list[str], batches: Sequence[Batch], groups: Sequence[Sequence[str]] | None = None):
    """Yield (batch index, {name: array}) per batch, reading `names` (or `groups`, each read
    together) about CHUNK per session."""
    from graphopt.calibration import intermediate_outputs

    for part in chunks(groups if groups is not None else [[n] for n in names], CHUNK):
        sess = intermediate_outputs(model, part)
        for bi, feeds in enumerate(batches):
            yield bi, dict(zip(part, sess.run(part, dict(feeds))))


def collect(model: Model, layers: Sequence[Layer], ids: Sequence[int], batches: Sequence[Batch], *,
            original: Model | None = None, bias_of: Mapping[int, np.ndarray | None] | None = None,
            mask_spec: str = "auto", seed: int = 0) -> dict[int, Moments]:
    """Moments of `layers[i]` for i in `ids`: inputs read from `model`; with `original`, the
    targets y too (the original layer's output, bias included), for a refit."""
    want = [i for i in ids if data_aware(layers[i])]
    out: dict[int, Moments] = {}
    if not want:
        return out
    ys: dict[int, dict[int, np.ndarray]] = {}
    masks = [token_mask(model, b, mask_spec) for b in batches]
    if original is not None:
        ynames = {i: layers[i].out.name for i in want}
        for bi, got in _run(original, list(ynames.values()), batches):
            for i, nm in ynames.items():
                if nm in got:
                    ys.setdefault(bi, {})[i] = _y_rows(layers[i], i, bi, np.asarray(got[nm]), masks[bi], seed)
    xnames = {i: layers[i].x.name for i in want}
    # a layer whose output reaches a LayerNorm through Adds (a transformer's attention output and
    # FFN output projections): its rows weigh 1/σ_t² of that norm's input, read from `model`
    norms: dict[int, tuple[str, bool]] = {}
    for i in want:
        found = norm_after(layers[i].out) if layers[i].kind != "conv" else None
        if found is not None:
            norms[i] = (found[0].name, found[1].op_type == "RMSNormalization")
    groups = [[xnames[i]] + ([norms[i][0]] if i in norms else []) for i in want]
    for bi, got in _run(model, [], batches, groups=groups):
        for i, nm in xnames.items():
            if nm not in got:
                continue
            layer = layers[i]
            y = ys.get(bi, {}).get(i) if original is not None else None
            xr = _x_rows(layer, i, bi, np.asarray(got[nm]), masks[bi], seed)
            yr = None if y is None else y.astype(np.float64)
            if len(xr) == 0 or (yr is not None and len(yr) != len(xr)):
                continue
            w = np.ones(len(xr))
            if i in norms and norms[i][0] in got:
                a = np.asarray(got[norms[i][0]])
                if a.ndim >= 2:
                    ar = _masked(a, masks[bi])
                    if len(ar) == len(xr):
                        w = norm_weights(ar, norms[i][1])
            xa = np.concatenate([xr, np.ones((len(xr), 1))], axis=1)
            m = out.get(i)
            if m is None:
                m = out[i] = Moments(np.zeros((xa.shape[1], xa.shape[1])), 0,
                                     None if original is None else np.zeros((xa.shape[1], layer.n)), 0.0)
            xw = xa * w[:, None]
            m.g += xw.T @ xa
            m.n += float(w.sum())
            if yr is not None and m.xy is not None:
                m.xy += xw.T @ yr
                m.yy += float(np.sum(yr * yr * w[:, None]))
    return out


def rows_note(ms: Mapping[int, Moments]) -> str:
    n = [m.n for m in ms.values()]
    return f"{min(n)}..{max(n)} rows per layer" if n else "no rows"


"""Max/min reductions that propagate NaN: the reducers (also max pooling's, `blocked_ops`) and ReduceMax/Min.

TIR's `max`/`min` reducers are LLVM's `maxnum`-style selects: a NaN inside the window or the
reduced axes is dropped or kept depending on where it sits. onnxruntime has no consistent answer
either (1.2x, CPU EP: `ReduceMax([0, nan, 2, ..., 15])` is 14.0, `ReduceMax([nan, 1, ...])` is
NaN, a 2x2 MaxPool window drops NaN, a 3x3 padded one keeps it, GlobalMaxPool drops it), so the
cpu target follows what numpy's `max`, PyTorch's `amax`/`max_pool2d` and IEEE 754-2019's
`maximum` do: any NaN among the reduced elements makes the result NaN. Empty reductions give
-inf (max) / +inf (min), the identities.

The combiner `select(isnan(acc) || acc > x, acc, x)` is symmetric in NaN-ness, so the order in
which a schedule reorders, splits or vectorises the reduction does not change which results are
NaN; LLVM turns it into a compare and a blend beside the `vmaxps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tvm import te, tirx

__all__ = ["nan_max", "nan_min", "reduce_max_min", "arg_max_min"]


def _combine(kind: str) -> Any:
    def combine(acc: Any, x: Any) -> Any:
        better = acc > x if kind == "max" else acc < x
        if not str(acc.ty.dtype).startswith(("float", "bfloat")):
            return tirx.Select(better, acc, x)  # (integers: plain max/min)
        return tirx.Select(tirx.isnan(acc) | better, acc, x)

    return combine


def _identity(kind: str) -> Any:
    def identity(dtype: str) -> Any:
        if not str(dtype).startswith(("float", "bfloat")):
            return tirx.min_value(dtype) if kind == "max" else tirx.max_value(dtype)
        return tirx.const(float("-inf") if kind == "max" else float("inf"), dtype)

    return identity


#: NaN-propagating reducers for float tensors (`nan_max(expr, axis=[...])`, as te.max)
nan_max = te.comm_reducer(_combine("max"), _identity("max"), name="nan_max")
nan_min = te.comm_reducer(_combine("min"), _identity("min"), name="nan_min")


def reduce_max_min(x: te.Tensor, kind: str, axes: Sequence[int] | None, keepdims: bool) -> te.Tensor:
    """ReduceMax/ReduceMin of float `x` over `axes` (None: all), NaN-propagating."""
    rank = len(x.shape)
    red = sorted({a % rank for a in axes}) if axes is not None else list(range(rank))
    raxes = {a: te.reduce_axis((0, x.shape[a]), f"r{a}") for a in red}
    out_shape = [1 if a in raxes else x.shape[a] for a in range(rank)] if keepdims else \
        [x.shape[a] for a in range(rank) if a not in raxes]
    reducer = nan_max if kind == "max" else nan_min

    def body(*idx: Any) -> Any:
        it = iter(idx)
        src = []
        for a in range(rank):
            if a in raxes:
                if keepdims:
                    next(it)
                src.append(raxes[a])
            else:
                src.append(next(it))
        return reducer(x[tuple(src)], axis=[raxes[a] for a in red])

    return te.compute(out_shape, body, name=f"reduce_{kind}")


def arg_max_min(x: te.Tensor, kind: str, axis: int | None, keepdims: bool, out_dtype: str) -> te.Tensor:
    """ArgMax/ArgMin of float `x` along `axis` (None: the flattened tensor) as numpy's: the index of
    the first NaN where there is one, else of the first extreme element. Two reductions: the
    NaN-propagating extreme, then the smallest index that holds it (a tuple reducer's two
    selects would each see the other's update)."""
    rank = len(x.shape)
    axes = list(range(rank)) if axis is None else [axis % rank]
    ext = reduce_max_min(x, kind, axes, True)
    raxes = {a: te.reduce_axis((0, x.shape[a]), f"r{a}") for a in axes}
    out_shape = [1 if a in raxes else x.shape[a] for a in range(rank)] if keepdims else \
        [x.shape[a] for a in range(rank) if a not in raxes]
    none = tirx.max_value(out_dtype)

    def body(*idx: Any) -> Any:
        it = iter(idx)
        src, at = {}, {}
        for a in range(rank):
            if a in raxes:
                if keepdims:
                    next(it)
                src[a], at[a] = raxes[a], 0
            else:
                src[a] = at[a] = next(it)
        flat = tirx.const(0, out_dtype)  # the index along `axis`, or in the flattened tensor
        for a in axes:
            flat = flat * tirx.Cast(out_dtype, x.shape[a]) + tirx.Cast(out_dtype, src[a])
        v = x[tuple(src[a] for a in range(rank))]
        e = ext[tuple(at[a] for a in range(rank))]
        hit = tirx.Select(tirx.isnan(e), tirx.isnan(v), v == e)
        return te.min(tirx.Select(hit, flat, none), axis=[raxes[a] for a in axes])

    return te.compute(out_shape, body, name=f"arg{kind}")

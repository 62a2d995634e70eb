"""Max/min reductions with IEEE 754-2008 maxNum/minNum semantics (C's fmax, numpy's fmax.reduce):
NaN elements are skipped, a result is NaN only when every reduced element is. The reducers (also
max pooling's, `kernels.blocked`), ReduceMax/Min and ArgMax/Min.

TIR's own `max` reducer is a select whose NaN handling depends on where the NaN sits in the
reduction order (and so on the schedule). onnxruntime (1.2x, CPU EP) skips NaN too, except where
the NaN is the element its loop starts from: `ReduceMax([nan, 1, ...])` is NaN there, and
`ReduceMax([0, nan, 2, ..., 15])` is 14.0 (its vectorised loop loses an element); a 2x2 MaxPool
window and GlobalMaxPool skip NaN, an all-NaN window gives NaN. Skipping NaN agrees with it in all
but the first-element case, costs little, and is a standard (maxNum); propagating NaN (numpy's
`max`) would make `--verify` against onnxruntime fail on models that make a NaN before a pool.

The combiner `select(isnan(acc) || x > acc, x, acc)` with identity NaN: a NaN element fails the
compare and is skipped, a NaN accumulator (only the identity, or an all-NaN partial) takes the
next element; symmetric in NaN-ness, so the order in which a schedule splits or vectorises the
reduction does not change the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tvm import te, tirx

__all__ = ["nan_max", "nan_min", "reduce_max_min", "arg_max_min"]


def _combine(kind: str) -> Any:
    def combine(acc: Any, x: Any) -> Any:
        better = x > acc if kind == "max" else x < acc
        if not str(acc.ty.dtype).startswith(("float", "bfloat")):
            return tirx.Select(better, x, acc)  # (integers: plain max/min)
        return tirx.Select(tirx.isnan(acc) | better, x, acc)

    return combine


def _identity(kind: str) -> Any:
    def identity(dtype: str) -> Any:
        if not str(dtype).startswith(("float", "bfloat")):
            return tirx.min_value(dtype) if kind == "max" else tirx.max_value(dtype)
        return tirx.const(float("nan"), dtype)  # (an empty or all-NaN reduction stays NaN)

    return identity


#: maxNum/minNum reducers for float tensors (`nan_max(expr, axis=[...])`, as te.max)
nan_max = te.comm_reducer(_combine("max"), _identity("max"), name="nan_max")
nan_min = te.comm_reducer(_combine("min"), _identity("min"), name="nan_min")


def _reduction(x: te.Tensor, axes: Sequence[int], keepdims: bool) -> tuple[dict[int, Any], list[Any], Any]:
    """(reduce axis per reduced dim, output shape, `source(idx)`: the index into `x` of output
    index `idx`, the reduce axes at the reduced dims) of a reduction of `x` over `axes`."""
    rank = len(x.shape)
    raxes = {a: te.reduce_axis((0, x.shape[a]), f"r{a}") for a in axes}
    out_shape = [1 if a in raxes else x.shape[a] for a in range(rank)] if keepdims else \
        [x.shape[a] for a in range(rank) if a not in raxes]

    def source(idx: Sequence[Any]) -> list[Any]:
        it = iter(idx)
        src = []
        for a in range(rank):
            if a in raxes:
                if keepdims:
                    next(it)
                src.append(raxes[a])
            else:
                src.append(next(it))
        return src

    return raxes, out_shape, source


def reduce_max_min(x: te.Tensor, kind: str, axes: Sequence[int] | None, keepdims: bool) -> te.Tensor:
    """ReduceMax/ReduceMin of float `x` over `axes` (None: all), NaN elements skipped (maxNum)."""
    rank = len(x.shape)
    red = sorted({a % rank for a in axes}) if axes is not None else list(range(rank))
    raxes, out_shape, source = _reduction(x, red, keepdims)
    reducer = nan_max if kind == "max" else nan_min

    def body(*idx: Any) -> Any:
        return reducer(x[tuple(source(idx))], axis=[raxes[a] for a in red])

    return te.compute(out_shape, body, name=f"reduce_{kind}")


def arg_max_min(x: te.Tensor, kind: str, axis: int | None, keepdims: bool, out_dtype: str) -> te.Tensor:
    """ArgMax/ArgMin of float `x` along `axis` (None: the flattened tensor), NaN skipped as by
    `reduce_max_min` (numpy's nanargmax; an all-NaN row gives 0): the first index holding the
    extreme. Two reductions, the extreme then the smallest index that holds it (a one-pass
    (index, value) tuple reducer gave wrong indices here)."""
    rank = len(x.shape)
    axes = list(range(rank)) if axis is None else [axis % rank]
    ext = reduce_max_min(x, kind, axes, True)
    raxes, out_shape, source = _reduction(x, axes, keepdims)
    none = tirx.max_value(out_dtype)

    def body(*idx: Any) -> Any:
        src = source(idx)
        flat = tirx.const(0, out_dtype)  # the index along `axis`, or in the flattened tensor
        for a in axes:
            flat = flat * tirx.Cast(out_dtype, x.shape[a]) + tirx.Cast(out_dtype, src[a])
        v = x[tuple(src)]
        e = ext[tuple(0 if a in raxes else src[a] for a in range(rank))]
        hit = tirx.Select(tirx.isnan(e), tirx.isnan(v), v == e)
        return te.min(tirx.Select(hit, flat, none), axis=[raxes[a] for a in axes])

    return te.compute(out_shape, body, name=f"arg{kind}")

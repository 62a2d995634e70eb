"""Run-time shape-deciding inputs compiled ahead of time (`lower.dynamic`): reductions, CumSum and
Pad whose axes or pads are run-time tensors (one branch per possible value, picked at run time).
Chained in front of the converters for constant inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax

from graphopt.ir import Node

from ..node import convert_node
from .. import dynamic as D
from .common import R, chained, const_input, dtype_of, is_runtime, scalar_const, static_len, str_attr
from ..registry import LoweringError, const_value, dims_of


def _lse(y: Any, axis: int) -> Any:
    m = R.max(y, [axis], keepdims=True)
    return R.add(R.log(R.sum(R.exp(R.subtract(y, m)), [axis], keepdims=True)), m)


#: op → (map before, reduction along one axis keeping it, map after)
_REDUCE_PARTS: dict[str, tuple[Any, Any, Any]] = {
    "ReduceSum": (None, lambda y, a: R.sum(y, [a], keepdims=True), None),
    "ReduceMean": (None, lambda y, a: R.mean(y, [a], keepdims=True), None),
    "ReduceMax": (None, lambda y, a: R.max(y, [a], keepdims=True), None),
    "ReduceMin": (None, lambda y, a: R.min(y, [a], keepdims=True), None),
    "ReduceProd": (None, lambda y, a: R.prod(y, [a], keepdims=True), None),
    "ReduceSumSquare": (lambda y: R.multiply(y, y), lambda y, a: R.sum(y, [a], keepdims=True), None),
    "ReduceL1": (R.abs, lambda y, a: R.sum(y, [a], keepdims=True), None),
    "ReduceL2": (lambda y: R.multiply(y, y), lambda y, a: R.sum(y, [a], keepdims=True), R.sqrt),
    "ReduceLogSum": (None, lambda y, a: R.sum(y, [a], keepdims=True), R.log),
    "ReduceLogSumExp": (None, _lse, None),
}


def _reduce_empty_set(bb: relax.BlockBuilder, node: Node, ins: list[Any]) -> Any:
    """ReduceMax/Min (float) over constant axes that include a dim of static size 0: -inf/+inf,
    filled in the reduction's shape (its values are never read: with no element to reduce, its
    result buffer is never written, not even its init); NotImplemented otherwise."""
    if node.op_type not in ("ReduceMax", "ReduceMin") or not dtype_of(ins[0]).startswith("float"):
        return NotImplemented
    x = ins[0]
    dims = dims_of(x)
    axes = node.attr("axes")
    if len(ins) > 1 and ins[1] is not None:
        v = const_value(ins[1])
        axes = None if v is None else [int(a) for a in np.asarray(v).reshape(-1)]
    axes = list(range(len(dims))) if not axes else [a % len(dims) for a in axes]
    if not any(dims[a] == 0 for a in axes):
        return NotImplemented
    keep = bool(node.attr("keepdims", 1))
    fn = R.max if node.op_type == "ReduceMax" else R.min
    inf = -np.inf if node.op_type == "ReduceMax" else np.inf
    y = bb.emit(fn(x, axes, keep))
    return bb.emit(R.full_like(y, scalar_const(inf, dtype_of(x))))


@chained(*_REDUCE_PARTS)
def _reduce_runtime_axes(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Reduce* whose axes are a run-time input (opset 18; ReduceSum 13): the axes tensor's length
    k is static, so the output rank is too (r or r - k). One two-way run-time branch per axis of
    the input (reduce it, keeping the dim, or not; static size-1 dims need none), chained; a
    reduction over a set of axes is the same reductions one axis after another (LogSumExp per
    axis stable by its max). keepdims=0 then drops the reduced dims with a reshape to the kept
    dims, computed at run time. Empty axes: all axes, or the input (noop_with_empty_axes)."""
    if len(ins) < 2 or not is_runtime(ins[1]):
        return _reduce_empty_set(bb, node, ins)
    x, axes = ins[0], ins[1]
    k = static_len(axes)
    if k is None:
        raise LoweringError(f"node {node.label()}: {node.op_type} needs axes of a static length on the cpu target")
    pre, along, post = _REDUCE_PARTS[node.op_type]
    keep = bool(node.attr("keepdims", 1))
    dtype = dtype_of(x)
    as_u8 = dtype == "bool"  # TIR has no min/max value for bool
    y = bb.emit(R.astype(x, "uint8")) if as_u8 else x
    if pre is not None:
        y = bb.emit(pre(y))
    if k == 0:
        if node.attr("noop_with_empty_axes", 0):
            return x
        r = y.ty.ndim
        for a in range(r):
            y = bb.emit(along(y, a))
        if not keep:
            y = bb.emit(R.reshape(y, []))
    else:
        dims = dims_of(x)
        r = len(dims)
        a64 = bb.emit(R.astype(axes, "int64")) if dtype_of(axes) != "int64" else axes
        if a64.ty.ndim == 0:
            a64 = bb.emit(R.reshape(a64, [1]))
        an = bb.emit(R.where(R.less(a64, scalar_const(0, "int64")), R.add(a64, scalar_const(r, "int64")), a64))
        hit = bb.emit(R.equal(R.reshape(an, [k, 1]), D.int_consts(list(range(r)))))
        mask = bb.emit(R.max(R.astype(hit, "int64"), [0]))  # [r]: 1 where reduced
        for a in range(r):
            if dims[a] == 1:
                continue
            cond = bb.emit(R.greater(R.take(mask, relax.const(a, "int64"), axis=0), scalar_const(0, "int64")))
            if dims[a] == 0 and node.op_type in ("ReduceMax", "ReduceMin") and dtype.startswith("float"):
                # max/min of an empty set: -inf/+inf in the reduction's shape (its values, never
                # written when there is no element, are not read)
                inf = -np.inf if node.op_type == "ReduceMax" else np.inf
                reduce_a = lambda fbb, p, a=a, inf=inf: fbb.emit(R.full_like(fbb.emit(along(p[0], a)), scalar_const(inf, dtype)))  # noqa: E731
            else:
                reduce_a = lambda fbb, p, a=a: fbb.emit(along(p[0], a))  # noqa: E731
            y = D.switch(bb, [cond], [reduce_a, lambda fbb, p: p[0]], [y], name=f"reduce_axis{a}_")
        if not keep:
            if r - k == 0:
                y = bb.emit(R.reshape(y, []))
            else:
                # the kept dims in order: kept[j] = shape[d] for the j-th d with mask[d] == 0
                sh = D.shape_tensor(bb, y)
                kept = bb.emit(R.subtract(scalar_const(1, "int64"), mask))
                tri = np.tril(np.ones((r, r), dtype=np.int64), -1)  # e < d
                pos = bb.emit(R.sum(R.multiply(relax.const(tri, "int64"), R.reshape(kept, [1, r])), [1]))
                sel = bb.emit(R.multiply(R.astype(R.equal(R.reshape(pos, [1, r]), D.int_consts([[j] for j in range(r - k)])), "int64"),
                                         R.reshape(kept, [1, r])))
                out_shape = bb.emit(R.sum(R.multiply(sel, R.reshape(sh, [1, r])), [1]))
                y = bb.emit(R.reshape(y, D.shape_of_tensor(bb, out_shape, r - k)))
    if post is not None:
        y = bb.emit(post(y))
    if as_u8:
        y = bb.emit(R.astype(y, "bool"))
    return y


def _value_switch(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int, pos: int, values: list[int],
                  normalise: Any = None) -> Any:
    """Convert `node` once per possible value of its run-time scalar input `pos` (as a constant:
    the existing converters specialise on it) and pick the branch at run time. `normalise` maps
    the run-time value to one of `values` first (negative axes)."""
    v = ins[pos]
    dt = dtype_of(v)
    s = bb.emit(R.reshape(v, [])) if v.ty.ndim else v
    if normalise is not None:
        s = bb.emit(normalise(s))
    runtime = [i for i, e in enumerate(ins) if i != pos and is_runtime(e)]

    def branch(val: int) -> Any:
        def fn(fbb: relax.BlockBuilder, params: list[relax.Var]) -> Any:
            new = list(ins)
            for i, p in zip(runtime, params):
                new[i] = p
            new[pos] = relax.const(np.array(val, dtype=dt).reshape([1] * v.ty.ndim), dt)  # scalar or [1], as given
            out = convert_node(fbb, node, new, opset)
            return list(out.fields) if isinstance(out, relax.Tuple) else out

        return fn

    conds = [bb.emit(R.equal(s, scalar_const(val, dt))) for val in values[:-1]]
    return D.switch(bb, conds, [branch(val) for val in values], [ins[i] for i in runtime], name=f"{node.op_type.lower()}_")


@chained("CumSum", "CumProd")
def _cum_runtime_axis(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """CumSum/CumProd along a run-time axis: one kernel per axis of the input, chosen at run time."""
    if len(ins) < 2 or not is_runtime(ins[1]):
        return NotImplemented
    r = ins[0].ty.ndim
    dt = dtype_of(ins[1])
    return _value_switch(bb, node, ins, opset, 1, list(range(r)),
                         lambda s: R.where(R.less(s, scalar_const(0, dt)), R.add(s, scalar_const(r, dt)), s))


@chained("Pad")
def _pad_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Pad with run-time pads: the pad amounts become symbolic vars (tensor_to_shape +
    match_cast) and one TE kernel with output dims n + before + after reads the input at
    i - before (constant: the value outside; edge: clamped; reflect: mirrored; wrap: modulo).
    axes, when given, must be constant; the pad value may be a run-time scalar."""
    from tvm import te, tirx

    if opset < 11 or len(ins) < 2 or not is_runtime(ins[1]):
        return NotImplemented
    x = ins[0]
    r = x.ty.ndim
    n_p = static_len(ins[1])
    axes = list(range(r))
    pads = ins[1]
    if len(ins) > 3 and is_runtime(ins[3]):  # run-time axes: the full-rank pads computed at run time
        k = static_len(ins[3])
        if k is None or n_p != 2 * k:
            raise LoweringError(f"node {node.label()}: Pad needs pads of length 2 x the padded axes on the cpu target")
        a64 = bb.emit(R.reshape(R.astype(ins[3], "int64"), [k, 1]))
        a64 = bb.emit(R.where(R.less(a64, scalar_const(0, "int64")), R.add(a64, scalar_const(r, "int64")), a64))
        onehot = bb.emit(R.astype(R.equal(a64, D.int_consts([list(range(r))])), "int64"))  # [k, r]
        p2 = bb.emit(R.reshape(R.astype(pads, "int64"), [2, k, 1]))
        pads = bb.emit(R.reshape(R.sum(R.multiply(p2, R.reshape(onehot, [1, k, r])), [1]), [2 * r]))
        n_p = 2 * r
    elif len(ins) > 3 and ins[3] is not None:
        axes = [int(a) + r if int(a) < 0 else int(a) for a in const_input(node, ins[3], "axes").reshape(-1)]
    if n_p != 2 * len(axes):
        raise LoweringError(f"node {node.label()}: Pad needs pads of length 2 x the padded axes on the cpu target")
    amounts = D.shape_of_tensor(bb, pads, n_p, "pad").values
    before, after = [0] * r, [0] * r
    for i, a in enumerate(axes):
        before[a], after[a] = amounts[i], amounts[len(axes) + i]
    mode = str_attr(node, "mode", "constant")
    dtype = dtype_of(x)
    value = ins[2] if len(ins) > 2 else None
    cv = const_value(value) if value is not None else None

    def compute(data: Any, *rest: Any) -> Any:
        dims = list(data.shape)
        out_shape = [dims[d] + before[d] + after[d] for d in range(r)]

        def body(*idx: Any) -> Any:
            src = [idx[d] - before[d] for d in range(r)]
            if mode == "constant":
                inside = tirx.const(True, "bool")
                for d in range(r):
                    inside = tirx.all(inside, src[d] >= 0, src[d] < dims[d])
                safe = [tirx.max(tirx.min(s, dims[d] - 1), 0) for d, s in enumerate(src)]
                if rest:
                    fill = rest[0][()] if len(rest[0].shape) == 0 else rest[0][0]
                else:
                    fill = tirx.const(float(cv.reshape(-1)[0]) if cv is not None and cv.size else 0, dtype)
                return tirx.Select(inside, data[tuple(safe)], fill.astype(dtype))
            if mode == "edge":
                return data[tuple(tirx.max(tirx.min(s, dims[d] - 1), 0) for d, s in enumerate(src))]
            if mode == "reflect":
                out = []
                for d, s in enumerate(src):
                    m = dims[d] - 1
                    s = tirx.abs(s)
                    s = tirx.Select(s > m, 2 * m - s, s)
                    out.append(tirx.max(tirx.min(s, m), 0))
                return data[tuple(out)]
            if mode == "wrap":
                return data[tuple(tirx.floormod(s, dims[d]) for d, s in enumerate(src))]
            raise LoweringError(f"node {node.label()}: Pad mode {mode!r} is not supported by the cpu target")

        return te.compute(out_shape, body, name="pad_runtime")

    args = [x]
    if mode == "constant" and value is not None and cv is None:
        args.append(value)
    return bb.emit_te(compute, *args, primfunc_name_hint="pad_runtime")

"""Helpers the converter families share (constants, dtypes, static shapes, attributes, clamps) and
`chained`, which registers a converter in front of the one already registered for an op.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import tvm
import tvm.sym  # the Analyzer (0.27 moved tvm.arith to tvm.sym)
from tvm import relax

from graphopt.ir import Node

from ..registry import CONVERTERS, LoweringError, const_value, dims_of


R = relax.op


def scalar_const(value: float | int, dtype: str) -> relax.Expr:
    return relax.const(np.array(value, dtype=dtype), dtype)


def dtype_of(e: Any) -> str:
    return str(e.ty.dtype)


def static_dims(node: Node, e: Any, what: str) -> list[int]:
    dims = dims_of(e)
    if not all(isinstance(d, int) for d in dims):
        raise LoweringError(f"node {node.label()}: {node.op_type} needs a static {what} shape on the cpu target")
    return dims


def slice_axis(bb: relax.BlockBuilder, x: Any, axis: int, begin: int, end: int, step: int = 1) -> Any:
    return bb.emit(R.strided_slice(x, axes=[axis], begin=[begin], end=[end], strides=[step]))


def const_input(node: Node, e: Any, what: str) -> np.ndarray:
    v = const_value(e) if e is not None else None
    if v is None:
        raise LoweringError(f"node {node.label()}: {node.op_type} needs a constant {what} on the cpu target")
    return v


def str_attr(node: Node, name: str, default: str) -> str:
    v = node.attr(name, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def onnx_dtype(code: int) -> str:
    dt = onnx.helper.tensor_dtype_to_np_dtype(code)
    return "bool" if dt == np.bool_ else str(dt)


def chained(*ops: str) -> Any:
    """Register a converter that runs before the one already registered for each op (which it
    falls back to by returning NotImplemented)."""
    def deco(fn: Any) -> Any:
        for op in ops:
            prev = CONVERTERS.get(op)

            def conv(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int, _prev: Any = prev) -> Any:
                out = fn(bb, node, ins, opset)
                if out is NotImplemented and _prev is not None:
                    return _prev(bb, node, ins, opset)
                return out

            CONVERTERS[op] = conv
        return fn

    return deco


def is_runtime(e: Any) -> bool:
    """`e` is a tensor computed at run time (not a constant the IR knows, nor a shape value)."""
    return e is not None and const_value(e) is None and isinstance(getattr(e, "ty", None), relax.TensorType)


def static_len(e: Any) -> int | None:
    s = e.ty.shape
    if e.ty.ndim == 0:
        return 1
    if e.ty.ndim != 1 or not isinstance(s, relax.ShapeExpr) or not isinstance(s.values[0], tvm.tirx.IntImm):
        return None
    return int(s.values[0])


# TVM's max/min lower to `a > b ? a : b` (an ordered compare: false on NaN), so max(x, 0) turns
# NaN into 0. Written as a select whose compare is false on NaN and whose false arm is x, NaN
# passes through; on x86 the select is still one vmaxps/vminps with x as its second operand (the
# one MAXPS returns when either is NaN), so conv epilogues stay as fast.


def is_float(x: Any) -> bool:
    return dtype_of(x).startswith(("float", "bfloat"))


def _bound(bb: relax.BlockBuilder, x: Any, value: float, lower: bool) -> Any:
    """max(x, value) (`lower`) or min(x, value) keeping a NaN x, as one elementwise TE block
    `value > x ? value : x` (`<` for min): the compare is false on NaN, so x passes; -0.0 stays
    -0.0 for value 0, as onnxruntime. One block, so the schedules inline it into a conv/matmul
    epilogue as they did max/min (relax where(less(...)) left a bool mask buffer in the kernel)."""
    from tvm import te, tirx

    dtype = dtype_of(x)

    def f(t: te.Tensor) -> te.Tensor:
        c = tirx.const(value, dtype)
        return te.compute(t.shape, lambda *i: tirx.Select(c > t(*i) if lower else c < t(*i), c, t(*i)),
                          name="clamp_nan", tag="elemwise")

    return bb.emit_te(f, x, primfunc_name_hint="clamp_nan")


def lower_bound(bb: relax.BlockBuilder, x: Any, lo: float) -> Any:
    return _bound(bb, x, lo, True)


def upper_bound(bb: relax.BlockBuilder, x: Any, hi: float) -> Any:
    return _bound(bb, x, hi, False)

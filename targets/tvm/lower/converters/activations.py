"""Activations with NaN kept where onnxruntime keeps it (Relu, Clip: max/min would drop it) and
made where onnxruntime makes it (Sign, HardSigmoid, Selu, ThresholdedRelu), and Celu.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax

from graphopt.ir import Node

from .common import R, dtype_of, is_float, lower_bound, onnx_dtype, scalar_const, upper_bound
from ..registry import const_value, converter


@converter("Relu")
def _relu(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    x = ins[0]
    if not is_float(x):
        return NotImplemented
    return lower_bound(bb, x, 0.0)


def _only_cast_to_int(node: Node) -> bool:
    """Every reader of `node`'s output is a Cast to an integer type."""
    uses = node.outputs[0].consumers() if node.outputs else []
    return bool(uses) and not node.outputs[0].is_graph_output() and all(
        u.op_type == "Cast" and u.attr("to") is not None and onnx_dtype(int(u.attr("to"))).startswith(("int", "uint"))
        for u in uses)


@converter("Clip")
def _clip_op(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Clip with constant bounds → one elementwise block per bound (the frontend's NaN handling
    of the bounds emits TE kernels that FuseTIR cannot merge into a group); floats keep NaN."""
    x = ins[0]
    if opset < 11:
        bounds = [node.attr("min"), node.attr("max")]
    else:
        bounds = []
        for e in (ins[1] if len(ins) > 1 else None, ins[2] if len(ins) > 2 else None):
            if e is None:
                bounds.append(None)
                continue
            v = const_value(e)
            if v is None or v.size != 1:
                return NotImplemented
            f = float(v.reshape(()))
            bounds.append(None if np.isnan(f) else f)
    dtype = dtype_of(x)
    if not is_float(x) or _only_cast_to_int(node):
        # (a requantize's Clip before its Cast to uint8/int8: NaN has no integer value to keep,
        # and plain max/min let LLVM fuse the clamp with the conversion: int8 ResNet-50 23.6 ms
        # vs 26.9 ms with the NaN-keeping selects, 1 thread)
        out = x
        if bounds[0] is not None:
            out = bb.emit(R.maximum(out, scalar_const(bounds[0], dtype)))
        if bounds[1] is not None:
            out = bb.emit(R.minimum(out, scalar_const(bounds[1], dtype)))
        return out
    if dtype != "bfloat16" and (bounds[0] is None) != (bounds[1] is None):
        # the missing bound is the type's largest / lowest finite value (ONNX; onnxruntime clips
        # Inf to it)
        fi = np.finfo(dtype)
        bounds = [float(fi.min) if bounds[0] is None else bounds[0], float(fi.max) if bounds[1] is None else bounds[1]]
    out = x
    if bounds[0] is not None:
        out = lower_bound(bb, out, float(np.array(bounds[0]).astype(dtype)))
    if bounds[1] is not None:
        out = upper_bound(bb, out, float(np.array(bounds[1]).astype(dtype)))
    return out


# (found by tools/fuzz.py's valid-cpu family: the frontend's forms give 0 for NaN in Sign,
# HardSigmoid and Selu, and NaN in ThresholdedRelu, the opposite of onnxruntime)


@converter("Sign")
def _sign(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """sign(x), NaN for NaN (onnxruntime's value; the compare-based form gave 0)."""
    x = ins[0]
    if not is_float(x):
        return NotImplemented
    return bb.emit(R.where(R.isnan(x), x, R.sign(x)))


@converter("HardSigmoid")
def _hard_sigmoid(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """max(0, min(1, alpha·x + beta)) keeping NaN (the NaN-keeping bounds of Clip)."""
    x = ins[0]
    if not is_float(x):
        return NotImplemented
    dtype = dtype_of(x)
    y = bb.emit(R.add(R.multiply(x, scalar_const(float(node.attr("alpha", 0.2)), dtype)), scalar_const(float(node.attr("beta", 0.5)), dtype)))
    return upper_bound(bb, lower_bound(bb, y, 0.0), 1.0)


@converter("Selu")
def _selu(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """gamma · (x > 0 ? x : alpha·(exp(x) − 1)): NaN stays NaN (the else branch computes it)."""
    x = ins[0]
    if not is_float(x):
        return NotImplemented
    dtype = dtype_of(x)
    alpha, gamma = float(node.attr("alpha", 1.67326319217681884765625)), float(node.attr("gamma", 1.05070102214813232421875))
    neg = R.multiply(scalar_const(alpha, dtype), R.subtract(R.exp(x), scalar_const(1.0, dtype)))
    return bb.emit(R.multiply(scalar_const(gamma, dtype), R.where(R.greater(x, scalar_const(0.0, dtype)), x, neg)))


@converter("ThresholdedRelu")
def _thresholded_relu(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """x > alpha ? x : 0: NaN gives 0, as onnxruntime."""
    x = ins[0]
    if not is_float(x):
        return NotImplemented
    dtype = dtype_of(x)
    return bb.emit(R.where(R.greater(x, scalar_const(float(node.attr("alpha", 1.0)), dtype)), x, scalar_const(0.0, dtype)))


@converter("Celu")
def _celu(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Celu(x) = max(0, x) + min(0, alpha * (exp(x / alpha) - 1))."""
    x = ins[0]
    dtype = str(x.ty.dtype)
    a = relax.const(np.array(float(node.attr("alpha", 1.0)), dtype=dtype), dtype)
    zero = relax.const(np.array(0, dtype=dtype), dtype)
    one = relax.const(np.array(1, dtype=dtype), dtype)
    neg = relax.op.minimum(zero, relax.op.multiply(a, relax.op.subtract(relax.op.exp(relax.op.divide(x, a)), one)))
    return bb.emit(relax.op.add(relax.op.maximum(zero, x), neg))

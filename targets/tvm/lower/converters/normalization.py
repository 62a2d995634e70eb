"""Normalizations: LayerNormalization, RMSNormalization, LpNormalization.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import tvm
import tvm.sym  # the Analyzer (0.27 moved tvm.arith to tvm.sym)
from tvm import relax

from graphopt.ir import Node

from ..registry import converter


@converter("LayerNormalization")
def _layer_norm(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """LayerNormalization with its optional Mean and InvStdDev outputs computed (the frontend
    returns zeros for them); with only Y used, Relax's layer_norm."""
    x, scale, bias = ins[0], ins[1], ins[2] if len(ins) > 2 else None
    ndim = x.ty.ndim
    axis = node.attr("axis", -1)
    axis = axis + ndim if axis < 0 else axis
    axes = list(range(axis, ndim))
    eps = float(node.attr("epsilon", 1e-5))
    dtype = str(x.ty.dtype)
    extra_used = any(v.uses() or v.is_graph_output() for v in node.outputs[1:])
    if not extra_used and bias is not None and _same_shape(scale, x, axes) and _same_shape(bias, x, axes):
        return NotImplemented  # the frontend's layer_norm
    stash = "float32" if dtype in ("float16", "bfloat16") else dtype
    xs = bb.emit(relax.op.astype(x, stash)) if stash != dtype else x
    mean = bb.emit(relax.op.mean(xs, axes, keepdims=True))
    d = bb.emit(relax.op.subtract(xs, mean))
    var = bb.emit(relax.op.mean(relax.op.multiply(d, d), axes, keepdims=True))
    inv = bb.emit(relax.op.rsqrt(relax.op.add(var, relax.const(eps, stash))))
    y = bb.emit(relax.op.multiply(d, inv))
    if stash != dtype:
        y = bb.emit(relax.op.astype(y, dtype))
    y = bb.emit(relax.op.multiply(y, scale))
    if bias is not None:
        y = bb.emit(relax.op.add(y, bias))
    return [y, mean, inv]


def _same_shape(p: Any, x: Any, axes: list[int]) -> bool:
    """`p` has exactly the normalized dims of `x` (what Relax's layer_norm takes)."""
    ps, xs = p.ty.shape, x.ty.shape
    if ps is None or xs is None or not isinstance(ps, relax.ShapeExpr) or not isinstance(xs, relax.ShapeExpr):
        return False
    want = [xs.values[a] for a in axes]
    if len(ps.values) != len(want):
        return False
    return all(isinstance(a, tvm.tirx.IntImm) and isinstance(b, tvm.tirx.IntImm) and int(a) == int(b) for a, b in zip(ps.values, want))


@converter("RMSNormalization")
def _rms_norm(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """RMSNormalization: x / sqrt(mean(x², axes from `axis` on) + epsilon) · scale, in stash_type."""
    x, scale = ins[0], ins[1]
    ndim = x.ty.ndim
    axis = node.attr("axis", -1)
    axis = axis + ndim if axis < 0 else axis
    axes = list(range(axis, ndim))
    dtype = str(x.ty.dtype)
    stash = str(onnx.helper.tensor_dtype_to_np_dtype(node.attr("stash_type", 1)))
    xs = bb.emit(relax.op.astype(x, stash)) if stash != dtype else x
    ms = bb.emit(relax.op.mean(relax.op.multiply(xs, xs), axes, keepdims=True))
    inv = bb.emit(relax.op.rsqrt(relax.op.add(ms, relax.const(np.array(float(node.attr("epsilon", 1e-5)), dtype=stash), stash))))
    y = bb.emit(relax.op.multiply(xs, inv))
    if stash != dtype:
        y = bb.emit(relax.op.astype(y, dtype))
    return bb.emit(relax.op.multiply(y, scale))

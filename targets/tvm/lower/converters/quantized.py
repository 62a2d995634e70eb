"""Integer and quantized convolutions and matmuls: ConvInteger, QLinearMatMul, QLinearConv.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax

from graphopt.ir import Node

from .common import R, dtype_of, str_attr, scalar_const
from ..registry import LoweringError, converter, dims_of


def _zp(e: Any, like_dtype: str) -> Any:
    return e if e is not None else scalar_const(0, like_dtype)


def _requantize(bb: relax.BlockBuilder, acc: Any, scale: Any, y_zp: Any, out_dtype: str) -> Any:
    """round_half_even(acc · scale) + zero point, clipped to the output type (in float64)."""
    info = np.iinfo(out_dtype)
    d = bb.emit(R.multiply(R.astype(acc, "float64"), scale))
    if y_zp is not None:
        d = bb.emit(R.add(d, R.astype(y_zp, "float64")))
    d = bb.emit(R.clip(R.round(d), float(info.min), float(info.max)))
    return bb.emit(R.astype(d, out_dtype))


def _qscale(bb: relax.BlockBuilder, a_s: Any, b_s: Any, y_s: Any) -> Any:
    f = lambda e: R.astype(e, "float64")  # noqa: E731
    return bb.emit(R.divide(R.multiply(f(a_s), f(b_s)), f(y_s)))


@converter("QLinearMatMul")
def _qlinear_matmul(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """(a - a_zp)(b - b_zp) accumulated in int32, scaled by a_scale·b_scale/y_scale, rounded,
    shifted by y_zp and saturated."""
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = (ins + [None] * 8)[:8]
    ai = bb.emit(R.subtract(R.astype(a, "int32"), R.astype(_zp(a_zp, dtype_of(a)), "int32")))
    bi = bb.emit(R.subtract(R.astype(b, "int32"), R.astype(_zp(b_zp, dtype_of(b)), "int32")))
    acc = bb.emit(R.matmul(ai, bi, out_dtype="int32"))
    out = dtype_of(y_zp) if y_zp is not None else dtype_of(a)
    return _requantize(bb, acc, _qscale(bb, a_s, b_s, y_s), y_zp, out)


@converter("QLinearConv")
def _qlinear_conv(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Conv of the zero-point-shifted int32 tensors (+ int32 bias), requantized per output
    channel (w_scale scalar or per channel)."""
    x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp = ins[:8]
    bias = ins[8] if len(ins) > 8 else None
    nd = w.ty.ndim - 2
    if nd != 2:
        return NotImplemented
    xi = bb.emit(R.subtract(R.astype(x, "int32"), R.astype(_zp(x_zp, dtype_of(x)), "int32")))
    wz = R.astype(_zp(w_zp, dtype_of(w)), "int32")
    if w_zp is not None and w_zp.ty.ndim == 1 and dims_of(w_zp)[0] != 1:
        wz = R.reshape(wz, (-1, 1, 1, 1))
    wi = bb.emit(R.subtract(R.astype(w, "int32"), wz))
    pads = list(node.attr("pads") or [0] * 4)
    if str_attr(node, "auto_pad", "NOTSET") not in ("NOTSET",):
        return NotImplemented
    acc = bb.emit(R.nn.conv2d(xi, wi, strides=tuple(node.attr("strides") or (1, 1)), padding=(pads[0], pads[1], pads[2], pads[3]),
                              dilation=tuple(node.attr("dilations") or (1, 1)), groups=node.attr("group", 1), out_dtype="int32"))
    if bias is not None:
        acc = bb.emit(R.add(acc, R.reshape(bias, (1, -1, 1, 1))))
    scale = _qscale(bb, x_s, w_s, y_s)
    if scale.ty.ndim == 1:
        scale = bb.emit(R.reshape(scale, (1, -1, 1, 1)))
    out = dtype_of(y_zp) if y_zp is not None else dtype_of(x)
    return _requantize(bb, acc, scale, y_zp, out)


def _attr(node: Node, name: str, default: Any = None) -> Any:
    return node.attr(name, default)



@converter("ConvInteger")
def _conv_integer(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """2-D ConvInteger (the frontend has none; grouped too) with constant zero points, weight zero point 0:
    Pad(x, value x_zp) → conv2d accumulating in int32 → − x_zp·ΣW[oc] (the filter sums from the
    weight's value), so the reduction is a plain int8 product the int8 kernels tensorize."""
    from graphopt.pattern import const_array

    zx, zw = (const_array(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else np.zeros(())
              for i in (2, 3))
    if zx is None or zw is None or zx.size != 1 or np.any(zw != 0):
        raise LoweringError(f"node {node.label()}: ConvInteger needs a constant scalar x_zero_point and a zero "
                            "w_zero_point on the cpu target")
    if len(ins[1].ty.shape) != 4 or str(_attr(node, "auto_pad", "NOTSET")) != "NOTSET":
        raise LoweringError(f"node {node.label()}: only 2-D ConvInteger with explicit pads is supported by the cpu target")
    top, left, bottom, right = (list(_attr(node, "pads", [0, 0, 0, 0])) + [0, 0, 0, 0])[:4]
    z = int(zx.reshape(()))
    x = ins[0]
    if top or left or bottom or right:
        x = bb.normalize(relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(z)))
    y = bb.normalize(relax.op.nn.conv2d(x, ins[1], strides=list(_attr(node, "strides", [1, 1])), padding=[0, 0, 0, 0],
                                        dilation=list(_attr(node, "dilations", [1, 1])),
                                        groups=int(_attr(node, "group", 1)), out_dtype="int32"))
    if z:
        w = const_array(node.inputs[1])
        if w is None:
            raise LoweringError(f"node {node.label()}: ConvInteger with a zero point needs constant weights on the cpu target")
        corr = (z * w.reshape(w.shape[0], -1).astype(np.int64).sum(axis=1)).astype(np.int32).reshape(1, -1, 1, 1)
        y = relax.op.subtract(y, relax.const(corr, "int32"))
    return y

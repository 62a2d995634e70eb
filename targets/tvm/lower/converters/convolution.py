"""Conv lowerings of our own in front of the frontend's: a 1-D convolution of symbolic output width
computed as a matmul over its frames (`_conv1d_frames`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax

from graphopt.ir import Node
from graphopt.ir.query import const_array

from .common import R, dtype_of
from ..registry import const_value, converter, dims_of
from ...schedules.base import LAYOUT_REWRITE_ANN

#: output channels are padded (zero filters, cropped after) to a multiple of this: a whole number
#: of vectors at every CPU target's fp32 width (4, 8 or 16 lanes), so the matmul schedule's
#: vector axis is never ragged (258 = 2 x 129 STFT bins had no schedule but the generic one)
CHANNEL_MULTIPLE = 16


def _frames_fires(node: Node, x: Any, w: np.ndarray | None) -> bool:
    """Conv1d as frames x matmul: a 1-D Conv (rank-3 input of known shape), one group, no
    dilation, a constant float32 weight, and an output width that is a symbolic expression, not
    a bare dim (a stride, or a kernel wider than its padding: `(L - 256) // 128 + 1`). Not for a
    static or bare symbolic width: the conv form schedules those (outer-product in conv layout)."""
    if x is None or w is None or not isinstance(getattr(x, "ty", None), relax.TensorType) or x.ty.ndim != 3:
        return False
    if not isinstance(x.ty.shape, relax.ShapeExpr) or w.ndim != 3 or w.dtype != np.float32 or dtype_of(x) != "float32":
        return False
    if int(node.attr("group", 1)) != 1 or any(int(d) != 1 for d in (node.attr("dilations", None) or [1])):
        return False
    auto_pad = node.attr("auto_pad", "NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)) not in ("NOTSET", ""):
        return False
    dims = dims_of(x)
    if isinstance(dims[1], int) and dims[1] != w.shape[1]:
        return False
    width = _out_width(node, dims[2], int(w.shape[2]))
    return not isinstance(width, int) and not isinstance(width, tvm.tirx.Var)


def _out_width(node: Node, length: Any, k: int) -> Any:
    s = int((node.attr("strides", None) or [1])[0])
    pads = list(node.attr("pads", None) or [0, 0])
    w = (length + int(pads[0]) + int(pads[1]) - k) // s + 1
    if isinstance(w, int):
        return w
    return tvm.sym.Analyzer().simplify(w)


@converter("Conv")
def _conv1d_frames(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Conv1d(x [N, C, L], W [O, C, K], stride S, pads) → y[n, o, f] = sum_{c,k} x[n, c, f*S + k] *
    W[o, c, k] computed as the matmul frames [N, F, C*K] x W^T [C*K, O] in the layout [N, F, O]
    (one TE kernel reading x directly: no frame buffer), then cropped and transposed back to
    [N, O, F], bias added. The matmul layout puts the output channels last, so the outer-product
    schedule takes it with one-row tiles over a symbolic frame count, where the conv layout is
    refused (its accumulator tile could not be bounded: see `outer_product._bare_symbolic_rows`)
    and fell to the generic fallback schedule (a VAD's STFT as a strided conv with a 256-wide
    fixed basis: 0.24 ms on one core, 8x onnxruntime). The filters are zero-padded to a multiple
    of CHANNEL_MULTIPLE and laid out [C, K, O_pad]: a weight argument by a block marked as weight
    packing, which the build hoists out of the kernel and applies to params.npz at compile time
    (as the schedules' own packs), a constant (an If branch's) right away. Does not fire (NotImplemented: the frontend's conv) for
    2-D+ convs, groups, dilation, auto_pad, a weight computed at run time, non-float32 data, or a
    static or bare symbolic output width (see `_frames_fires`)."""
    x = ins[0]
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if not _frames_fires(node, x, w):
        return NotImplemented
    assert w is not None
    from tvm import te

    o, c, k = (int(d) for d in w.shape)
    s = int((node.attr("strides", None) or [1])[0])
    pads = [int(p) for p in (node.attr("pads", None) or [0, 0])]
    if any(pads):
        x = bb.emit(R.nn.pad(x, [0, 0, 0, 0, pads[0], pads[1]]))
    o_pad = -(-o // CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
    width = tvm.sym.Analyzer().simplify((dims_of(x)[2] - k) // s + 1)  # (symbolic: _frames_fires)

    def frames_matmul(xt: te.Tensor, wt: te.Tensor) -> te.Tensor:
        rc = te.reduce_axis((0, c), name="rc")
        rk = te.reduce_axis((0, k), name="rk")
        return te.compute((xt.shape[0], width, o_pad),
                          lambda n, f, oc: te.sum(xt[n, rc, f * s + rk] * wt[rc, rk, oc], axis=[rc, rk]),
                          name="conv1d_frames")

    if const_value(ins[1]) is not None:  # a constant (an If branch's weight): [C, K, O_pad] now
        wt_arr = np.zeros((c, k, o_pad), np.float32)
        wt_arr[:, :, :o] = w.transpose(1, 2, 0)
        return _finish(bb, node, ins, bb.emit_te(frames_matmul, x, relax.const(wt_arr, "float32"),
                                                 primfunc_name_hint="conv1d_frames"), o, o_pad)

    def frames_matmul_packed(xt: te.Tensor, wt: te.Tensor) -> te.Tensor:
        # the weight argument as [C, K, O_pad] (zero filters appended), a block marked as weight
        # packing: the build hoists it out of the kernel and packs the weights once, at compile time
        packed = te.compute((c, k, o_pad), lambda cc, kk, oc: tvm.tirx.if_then_else(
            oc < o, wt[tvm.tirx.min(oc, o - 1), cc, kk], tvm.tirx.const(0.0, "float32")),
            name="conv1d_frames_weight", attrs={LAYOUT_REWRITE_ANN: True})
        return frames_matmul(xt, packed)

    return _finish(bb, node, ins, bb.emit_te(frames_matmul_packed, x, ins[1], primfunc_name_hint="conv1d_frames"), o, o_pad)


def _finish(bb: relax.BlockBuilder, node: Node, ins: list[Any], y: Any, o: int, o_pad: int) -> Any:
    """[N, F, O_pad] -> [N, O, F] (+ bias)."""
    if o_pad != o:
        y = bb.emit(R.strided_slice(y, axes=[2], begin=[0], end=[o]))
    y = bb.emit(R.permute_dims(y, [0, 2, 1]))
    if len(ins) > 2 and ins[2] is not None:
        y = bb.emit(R.add(y, R.reshape(ins[2], [o, 1])))
    return y

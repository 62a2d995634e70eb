"""Shapes given as run-time tensors (Reshape, Expand, OneHot, CenterCropPad, Trilu, TopK, Split,
ReverseSequence, Col2Im, Upsample, Dropout, ConstantOfShape, NonMaxSuppression, windows,
AffineGrid, ConvInteger): data-dependent shapes become fresh symbolic dims (`lower.dynamic`).
Chained in front of the converters for constant inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
import tvm.sym  # the Analyzer (0.27 moved tvm.arith to tvm.sym)
from tvm import relax

from graphopt.ir import Node

from .. import dynamic as D
from .common import R, chained, dtype_of, is_runtime, onnx_dtype, scalar_const, static_dims, static_len, str_attr
from .resize import resize_runtime_core
from ..registry import LoweringError, const_value, dims_of


def _dims_k(bb: relax.BlockBuilder, x: Any, k: int) -> Any:
    """x's dims as an int64 tensor of length k (cut, or padded with ones)."""
    r = x.ty.ndim
    sh = D.shape_tensor(bb, x)
    if k <= r:
        return bb.emit(R.strided_slice(sh, [0], [0], [k])) if k < r else sh
    return bb.emit(R.concat([sh, D.int_consts([1] * (k - r))], axis=0))


@chained("Reshape")
def _reshape_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Reshape to a run-time shape tensor (static length k): 0 copies the input's dim (unless
    allowzero), -1 takes what is left, both resolved at run time; the result has k symbolic dims."""
    if len(ins) < 2 or not is_runtime(ins[1]) or not isinstance(ins[0], relax.Expr) or isinstance(ins[0], relax.ShapeExpr):
        return NotImplemented
    x = ins[0]
    k = static_len(ins[1])
    if k is None:
        raise LoweringError(f"node {node.label()}: Reshape needs a shape of static length on the cpu target")
    t = bb.emit(R.astype(ins[1], "int64")) if dtype_of(ins[1]) != "int64" else ins[1]
    zero, neg1, one = scalar_const(0, "int64"), scalar_const(-1, "int64"), scalar_const(1, "int64")
    if not node.attr("allowzero", 0):
        t = bb.emit(R.where(R.equal(t, zero), _dims_k(bb, x, k), t))
    total = bb.emit(R.prod(D.shape_tensor(bb, x)))
    known = bb.emit(R.prod(R.where(R.equal(t, neg1), one, t)))
    rest = bb.emit(R.floor_divide(total, R.maximum(known, one)))
    t = bb.emit(R.where(R.equal(t, neg1), rest, t))
    return bb.emit(R.reshape(x, D.shape_of_tensor(bb, t, k, "rh")))


@chained("Expand")
def _expand_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Expand to a run-time shape tensor (static length k): the output dims are the
    multidirectional broadcast of the input's dims and the shape, computed at run time."""
    if len(ins) < 2 or not is_runtime(ins[1]) or isinstance(ins[0], relax.ShapeExpr):
        return NotImplemented
    x = ins[0]
    k = static_len(ins[1])
    if k is None:
        raise LoweringError(f"node {node.label()}: Expand needs a shape of static length on the cpu target")
    r = x.ty.ndim
    n = max(r, k)
    t = bb.emit(R.astype(R.reshape(ins[1], [k]), "int64"))
    if k < n:
        t = bb.emit(R.concat([D.int_consts([1] * (n - k)), t], axis=0))
    dims = D.shape_tensor(bb, x)
    if r < n:
        dims = bb.emit(R.concat([D.int_consts([1] * (n - r)), dims], axis=0))
    out = bb.emit(R.where(R.equal(t, scalar_const(1, "int64")), dims, t))
    return bb.emit(R.broadcast_to(x, D.shape_of_tensor(bb, out, n, "ex")))


def _scalar_dim(bb: relax.BlockBuilder, e: Any, prefix: str) -> Any:
    """A run-time scalar (any numeric type, shape [] or [1]) as a symbolic int64 dim."""
    return D.shape_of_tensor(bb, bb.emit(R.astype(R.reshape(e, [1]), "int64")), 1, prefix).values[0]


@chained("OneHot")
def _one_hot_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """OneHot with a run-time depth: the depth becomes a symbolic dim of the output and one TE
    kernel compares each index (negative ones counted from depth) with its position."""
    from tvm import te, tirx

    if len(ins) < 3 or not is_runtime(ins[1]):
        return NotImplemented
    idx, values = ins[0], ins[2]
    depth = _scalar_dim(bb, ins[1], "depth")
    r = idx.ty.ndim
    axis = node.attr("axis", -1)
    axis = axis + r + 1 if axis < 0 else axis

    def compute(ix: Any, vals: Any) -> Any:
        dims = list(ix.shape)
        out_shape = dims[:axis] + [depth] + dims[axis:]

        def body(*o: Any) -> Any:
            j = o[axis]
            src = ix[tuple(o[:axis] + o[axis + 1:])]
            v = tirx.Cast("int64", src)
            v = tirx.Select(v < 0, v + depth, v)
            return tirx.Select(v == j, vals[1], vals[0])

        return te.compute(out_shape, body, name="one_hot")

    return bb.emit_te(compute, idx, values, primfunc_name_hint="one_hot_runtime")


@chained("CenterCropPad")
def _center_crop_pad_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """CenterCropPad to a run-time shape: the target dims become symbolic and one TE kernel reads
    the input at o + (dim - target) // 2 when cropping, o - (target - dim) // 2 when padding
    (zeros outside)."""
    from tvm import te, tirx

    if len(ins) < 2 or not is_runtime(ins[1]):
        return NotImplemented
    x = ins[0]
    r = x.ty.ndim
    axes = [a + r if a < 0 else a for a in (node.attr("axes") or range(r))]
    k = static_len(ins[1])
    if k != len(axes):
        raise LoweringError(f"node {node.label()}: CenterCropPad needs one target per axis")
    target = D.shape_of_tensor(bb, ins[1], k, "ccp").values

    def compute(data: Any) -> Any:
        dims = list(data.shape)
        out = list(dims)
        for a, t in zip(axes, target):
            out[a] = t

        def body(*o: Any) -> Any:
            src, ok = [], tirx.const(True, "bool")
            for d in range(r):
                if d in axes:
                    t, n = out[d], dims[d]
                    s = tirx.Select(t < n, o[d] + tirx.floordiv(n - t, 2), o[d] - tirx.floordiv(t - n, 2))
                    ok = tirx.all(ok, s >= 0, s < n)
                    src.append(tirx.max(tirx.min(s, n - 1), 0))
                else:
                    src.append(o[d])
            return tirx.Select(ok, data[tuple(src)], tirx.const(0, data.dtype))

        return te.compute(out, body, name="center_crop_pad")

    return bb.emit_te(compute, x, primfunc_name_hint="center_crop_pad_runtime")


@chained("Trilu")
def _trilu_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Trilu with a run-time k: keep x where col - row >= k (upper) or <= k (lower), the
    col - row grid a constant when the matrix dims are static."""
    if len(ins) < 2 or not is_runtime(ins[1]):
        return NotImplemented
    x = ins[0]
    m, n = dims_of(x)[-2:]
    if isinstance(m, int) and isinstance(n, int):
        diff = relax.const(np.arange(n)[None, :] - np.arange(m)[:, None], "int64")
    else:
        diff = bb.emit(R.subtract(R.reshape(R.arange(0, n, dtype="int64"), [1, n]), R.reshape(R.arange(0, m, dtype="int64"), [m, 1])))
    k = bb.emit(R.reshape(R.astype(ins[1], "int64"), []))
    mask = bb.emit(R.greater_equal(diff, k) if node.attr("upper", 1) else R.less_equal(diff, k))
    return bb.emit(R.where(mask, x, scalar_const(0, dtype_of(x))))


@chained("TopK")
def _topk_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """TopK with a run-time k: a full argsort along the axis (equal values keep the lower index
    first), the first k positions (k a symbolic dim) gathered by one TE kernel."""
    from tvm import te

    if len(ins) < 2 or not is_runtime(ins[1]):
        return NotImplemented
    x = ins[0]
    r = x.ty.ndim
    axis = node.attr("axis", -1)
    axis = axis + r if axis < 0 else axis
    largest = bool(node.attr("largest", 1))
    k = _scalar_dim(bb, ins[1], "topk")
    order = bb.emit(R.argsort(x, axis=axis, descending=largest, dtype="int64"))

    def first_k(data: Any, idx: Any) -> Any:
        out = list(idx.shape)
        out[axis] = k
        ind = te.compute(out, lambda *o: idx[o], name="topk_indices")

        def val(*o: Any) -> Any:
            src = list(o)
            src[axis] = ind[o]
            return data[tuple(src)]

        return [te.compute(out, val, name="topk_values"), ind]

    res = bb.emit_te(first_k, x, order, primfunc_name_hint="topk_runtime")
    return [bb.emit(relax.TupleGetItem(res, 0)), bb.emit(relax.TupleGetItem(res, 1))]


@chained("Split")
def _split_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Split with run-time split sizes (one per output): the sizes become symbolic dims and each
    output one TE copy from the running offset."""
    from tvm import te

    if opset < 13 or len(ins) < 2 or ins[1] is None:
        return NotImplemented
    const = const_value(ins[1])
    if const is not None and (const.size == 0 or np.all(np.asarray(const) > 0)):
        return NotImplemented  # the frontend's split (it refuses zero-size pieces)
    x = ins[0]
    r = x.ty.ndim
    axis = node.attr("axis", 0)
    axis = axis + r if axis < 0 else axis
    n_out = len(node.outputs)
    if static_len(ins[1]) != n_out:
        raise LoweringError(f"node {node.label()}: Split needs one size per output")
    if const is not None:
        sizes = [tvm.tirx.const(int(v), "int64") for v in np.asarray(const).reshape(-1)]
    else:
        sizes = D.shape_of_tensor(bb, ins[1], n_out, "split").values
    outs: list[Any] = []
    off: Any = tvm.tirx.const(0, "int64")
    for i, sz in enumerate(sizes):
        def piece(data: Any, start: Any, sz: Any = sz) -> Any:  # start: passed, so the kernel takes it
            shape = list(data.shape)
            shape[axis] = sz
            return te.compute(shape, lambda *o: data[tuple(o[d] + start if d == axis else o[d] for d in range(r))], name="split")

        outs.append(bb.emit_te(piece, x, off, primfunc_name_hint=f"split_runtime{i}"))
        off = off + sz
    return outs


@chained("ReverseSequence")
def _reverse_sequence_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """ReverseSequence with run-time sequence_lens: the gather index (n - 1 - t below n, t
    above) computed at run time, one gather_elements."""
    if len(ins) < 2 or not is_runtime(ins[1]):
        return NotImplemented
    x = ins[0]
    shape = static_dims(node, x, "input")
    r = len(shape)
    tax, bax = node.attr("time_axis", 0), node.attr("batch_axis", 1)
    t_shape, b_shape = [1] * r, [1] * r
    t_shape[tax], b_shape[bax] = shape[tax], shape[bax]
    pos = relax.const(np.arange(shape[tax], dtype=np.int64).reshape(t_shape), "int64")
    n = bb.emit(R.reshape(R.astype(ins[1], "int64"), b_shape))
    idx = bb.emit(R.where(R.less(pos, n), R.subtract(R.subtract(n, scalar_const(1, "int64")), pos), pos))
    return bb.emit(R.gather_elements(x, R.broadcast_to(idx, shape), axis=tax))


@chained("Col2Im")
def _col2im_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Col2Im with a run-time image_shape / block_shape: both become symbolic dims and one TE
    kernel sums, for each image position, the block entries k (unravelled over the block) whose
    block position b = (p + pad - k·dilation) / stride is whole and inside the block grid."""
    from tvm import te, tirx

    if len(ins) < 3 or not (is_runtime(ins[1]) or is_runtime(ins[2])):
        return NotImplemented
    x = ins[0]
    nd = static_len(ins[1])
    if nd is None or static_len(ins[2]) != nd:
        raise LoweringError(f"node {node.label()}: Col2Im needs image_shape and block_shape of one static length")

    def dims_of(e: Any, prefix: str) -> list[Any]:
        v = const_value(e)
        if v is not None:
            return [tvm.tirx.const(int(a), "int64") for a in v.reshape(-1)]
        return list(D.shape_of_tensor(bb, e, nd, prefix).values)

    image, block = dims_of(ins[1], "img"), dims_of(ins[2], "blk")
    dil = list(node.attr("dilations") or [1] * nd)
    pads = list(node.attr("pads") or [0] * (2 * nd))
    strides = list(node.attr("strides") or [1] * nd)

    def compute(data: Any) -> Any:
        n, ck, num_l = data.shape
        kprod = block[0]
        for b_ in block[1:]:
            kprod = kprod * b_
        c = tirx.floordiv(ck, kprod)
        nb = [tirx.floordiv(image[d] + pads[d] + pads[nd + d] - (dil[d] * (block[d] - 1) + 1), strides[d]) + 1 for d in range(nd)]
        k = te.reduce_axis((0, kprod), name="k")

        def body(i: Any, ch: Any, *p: Any) -> Any:
            rest = k
            koff = [None] * nd
            for d in range(nd - 1, -1, -1):
                koff[d] = tirx.floormod(rest, block[d])
                rest = tirx.floordiv(rest, block[d])
            ok = tirx.const(True, "bool")
            lin = tirx.const(0, "int64")
            for d in range(nd):
                t = p[d] + pads[d] - koff[d] * dil[d]
                bd = tirx.floordiv(t, strides[d])
                ok = tirx.all(ok, tirx.floormod(t, strides[d]) == 0, bd >= 0, bd < nb[d])
                lin = lin * nb[d] + tirx.max(tirx.min(bd, nb[d] - 1), 0)
            v = data[i, ch * kprod + k, tirx.min(lin, num_l - 1)]
            return te.sum(tirx.Select(ok, v, tirx.const(0, data.dtype)), axis=k)

        return te.compute([n, c, *image], body, name="col2im")

    return bb.emit_te(compute, x, primfunc_name_hint="col2im_runtime")


@chained("Upsample")
def _upsample_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Upsample with run-time scales: Resize's run-time kernels with Upsample's semantics
    (asymmetric coordinates, floor rounding for nearest)."""
    if len(ins) < 2 or not is_runtime(ins[1]):
        return NotImplemented
    over = {"mode": str_attr(node, "mode", "nearest"), "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    return resize_runtime_core(bb, node, ins[0], None, ins[1], None, lambda name, default=None: over.get(name, default))


@chained("Dropout")
def _dropout_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Dropout with a run-time training_mode (or ratio): the input unchanged and an all-true
    mask, with a run-time assertion that it is not training with a nonzero ratio (random draws
    are not supported)."""
    training = ins[2] if len(ins) > 2 else None
    ratio = ins[1] if len(ins) > 1 else None
    if not (is_runtime(training) or training is not None and is_runtime(ratio)):
        return NotImplemented
    x = ins[0]
    t = bb.emit(R.reshape(R.astype(training, "bool"), []))
    rv = bb.emit(R.reshape(R.astype(ratio, "float32"), [])) if ratio is not None else scalar_const(0.5, "float32")
    ok = bb.emit(R.logical_or(R.logical_not(t), R.equal(rv, scalar_const(0.0, "float32"))))
    bb.emit(R.assert_op(ok, format="training-mode Dropout with a nonzero ratio is not supported by the cpu target"))
    y = bb.emit(R.astype(x, dtype_of(x)))
    if len(node.outputs) > 1:
        return [y, bb.emit(R.ones(dims_of(x), "bool"))]
    return y


@chained("ConstantOfShape")
def _constant_of_shape_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """ConstantOfShape of a run-time shape tensor: the dims become symbolic, one fill kernel."""
    if not ins or not is_runtime(ins[0]) or isinstance(ins[0], relax.ShapeExpr):
        return NotImplemented
    n = static_len(ins[0])
    if n is None:
        raise LoweringError(f"node {node.label()}: ConstantOfShape needs a shape of static length on the cpu target")
    value = node.attr("value")
    arr = np.asarray(value.numpy()).reshape(-1) if value is not None else np.zeros(1, np.float32)
    dtype = "bool" if arr.dtype == np.bool_ else str(arr.dtype)
    shape = D.shape_of_tensor(bb, ins[0], n, "cos") if n else relax.ShapeExpr([])
    return bb.emit(R.full(shape, relax.const(arr[0], dtype), dtype))


@chained("NonMaxSuppression")
def _nms_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """NonMaxSuppression: TOPI's all-class NMS with max_output_boxes_per_class / iou_threshold /
    score_threshold as tensors (run-time or constant; Relax's legalization of the op keeps only
    constants), then the rows cut to the detection count at run time. TOPI suppresses when
    IoU >= threshold, ONNX when IoU > threshold: the threshold is moved to the next float32 up."""
    from tvm import te, tirx, topi

    extra = [ins[i] if len(ins) > i else None for i in (2, 3, 4)]
    boxes, scores = ins[0], ins[1]
    if node.attr("center_point_box", 0):
        xc, yc, w, h = (bb.emit(R.strided_slice(boxes, [2], [i], [i + 1])) for i in range(4))
        two = scalar_const(2.0, dtype_of(boxes))
        hw, hh = bb.emit(R.divide(w, two)), bb.emit(R.divide(h, two))
        boxes = bb.emit(R.concat([R.subtract(yc, hh), R.subtract(xc, hw), R.add(yc, hh), R.add(xc, hw)], axis=2))
    # (max boxes as [1], thresholds as scalars: the forms TOPI's tensor paths read)
    defaults = [("int64", 0, [1]), ("float32", 0.0, []), ("float32", -np.inf, [])]
    args = []
    for e, (dt, dv, shape) in zip(extra, defaults):
        if e is None:
            e = relax.const(np.array(dv, dtype=dt), dt)
        args.append(bb.emit(R.reshape(R.astype(e, dt), shape)))
    def next_up(t: Any) -> Any:  # the next float32 above t >= 0 (its bits + 1); t < 0 suppresses alike
        return te.compute((), lambda: tirx.Select(t[()] >= 0.0, tirx.reinterpret("float32", tirx.reinterpret("int32", t[()]) + 1), t[()]),
                          name="iou_next_up")

    args[1] = bb.emit_te(next_up, args[1], primfunc_name_hint="nms_iou")
    out = bb.emit_te(lambda b, s, m, iou, st: topi.vision.all_class_non_max_suppression(b, s, m, iou, st, "onnx"),
                     boxes, scores, *args, primfunc_name_hint="nms")
    sel = bb.emit(relax.TupleGetItem(out, 0))
    count = bb.emit(relax.TupleGetItem(out, 1))
    end = bb.emit_te(lambda c: te.compute((2,), lambda i: tirx.if_then_else(i == 0, tirx.Cast("int64", c[0]), tirx.const(3, "int64"))),
                     count, primfunc_name_hint="nms_end")
    return bb.emit(R.dynamic_strided_slice(sel, D.int_consts([0, 0]), end, D.int_consts([1, 1])))


@chained("HannWindow", "HammingWindow", "BlackmanWindow")
def _window(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Hann / Hamming / Blackman windows of a run-time (or constant) size: the length becomes a
    symbolic dim, the values one TE kernel in float64 (N = size, or size - 1 when symmetric)."""
    from tvm import te, tirx

    size = ins[0]
    sv = const_value(size)
    n = int(np.asarray(sv).reshape(-1)[0]) if sv is not None else _scalar_dim(bb, size, "win")
    dtype = onnx_dtype(int(node.attr("output_datatype", 1)))
    periodic = bool(node.attr("periodic", 1))
    op = node.op_type

    def compute() -> Any:
        n_1 = tirx.Cast("float64", n if periodic else n - 1)

        def w(i: Any) -> Any:
            a = tirx.Cast("float64", i) * tirx.const(np.pi, "float64") / n_1
            if op == "HannWindow":
                v = tirx.sin(a) * tirx.sin(a)
            elif op == "HammingWindow":
                v = tirx.const(25.0 / 46.0, "float64") - tirx.cos(a * 2.0) * tirx.const(1 - 25.0 / 46.0, "float64")
            else:
                v = tirx.const(0.42, "float64") - tirx.cos(a * 2.0) * 0.5 + tirx.cos(a * 4.0) * 0.08
            return tirx.Cast(dtype, v)

        return te.compute([n], w, name=op.lower())

    return bb.emit_te(compute, primfunc_name_hint=op.lower())


@chained("AffineGrid")
def _affine_grid_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """AffineGrid with a run-time size: the spatial dims (size[2:]) become symbolic and one TE
    kernel applies theta to the normalised base grid (x, y[, z], 1) as the reference builds it."""
    from tvm import te, tirx

    if len(ins) < 2 or not is_runtime(ins[1]):
        return NotImplemented
    theta = ins[0]
    nd = static_len(ins[1])
    if nd not in (4, 5):
        raise LoweringError(f"node {node.label()}: AffineGrid needs a size of length 4 or 5")
    k = nd - 2
    sz = bb.emit(R.strided_slice(R.astype(ins[1], "int64"), [0], [2], [nd]))
    dims = list(D.shape_of_tensor(bb, sz, k, "ag").values)
    align = bool(node.attr("align_corners", 0))
    dtype = dtype_of(theta)

    def compute(th: Any) -> Any:
        n = th.shape[0]
        kk = te.reduce_axis((0, k + 1), name="k")

        def base(d: Any, i: Any) -> Any:  # coordinate of index i along spatial dim d
            L = tirx.Cast("float64", dims[d])
            fi = tirx.Cast("float64", i)
            return (fi * 2.0 / (L - 1.0) - 1.0) if align else ((fi * 2.0 + 1.0) / L - 1.0)

        def body(b: Any, *rest: Any) -> Any:
            pos, j = rest[:k], rest[k]
            # homogeneous base point: x (last spatial dim), y, (z), then 1
            coords = [base(k - 1 - t, pos[k - 1 - t]) for t in range(k)] + [tirx.const(1.0, "float64")]

            def pick(idx: Any) -> Any:
                out = coords[-1]
                for t in range(k - 1, -1, -1):
                    out = tirx.Select(idx == t, coords[t], out)
                return out

            return te.sum(tirx.Cast("float64", th[b, j, kk]) * pick(kk), axis=kk)

        acc = te.compute([n, *dims, k], body, name="affine_grid_acc")
        return te.compute([n, *dims, k], lambda *i: tirx.Cast(dtype, acc[i]), name="affine_grid")

    return bb.emit_te(compute, theta, primfunc_name_hint="affine_grid")


@chained("ConvInteger")
def _conv_integer_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """ConvInteger with run-time zero points: (x - x_zp) and (w - w_zp) widened to int32, then an
    int32 convolution padding with zeros (= padding x with its zero point)."""
    zps = [ins[i] if len(ins) > i else None for i in (2, 3)]
    if not any(is_runtime(z) for z in zps):
        return NotImplemented
    x, w = ins[0], ins[1]
    nd = x.ty.ndim - 2
    if str_attr(node, "auto_pad", "NOTSET") != "NOTSET":
        raise LoweringError(f"node {node.label()}: ConvInteger with auto_pad is not supported by the cpu target")
    xi = bb.emit(R.astype(x, "int32"))
    wi = bb.emit(R.astype(w, "int32"))
    if zps[0] is not None:
        xi = bb.emit(R.subtract(xi, R.astype(zps[0], "int32")))
    if zps[1] is not None:
        z = bb.emit(R.astype(zps[1], "int32"))
        if z.ty.ndim == 1:  # per output channel
            z = bb.emit(R.reshape(z, [-1] + [1] * (nd + 1)))
        wi = bb.emit(R.subtract(wi, z))
    pads = list(node.attr("pads") or [0] * (2 * nd))
    conv = {1: R.nn.conv1d, 2: R.nn.conv2d, 3: R.nn.conv3d}.get(nd)
    if conv is None:
        raise LoweringError(f"node {node.label()}: {nd}-D ConvInteger is not supported by the cpu target")
    return bb.emit(conv(xi, wi, strides=list(node.attr("strides") or [1] * nd), padding=pads,
                        dilation=list(node.attr("dilations") or [1] * nd), groups=int(node.attr("group", 1)), out_dtype="int32"))

"""Tensor ops the frontend lacks or gets wrong: CenterCropPad, OneHot, Col2Im, BitCast, Cast, Det,
Dropout, Swish, ReduceMax/Min, ReverseSequence, Pad, NonMaxSuppression, TensorScatter, EyeLike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax

from graphopt.ir import Node

from .common import R, const_input, dtype_of, onnx_dtype, scalar_const, slice_axis, static_dims, str_attr
from ..registry import LoweringError, const_value, converter, dims_of


@converter("CenterCropPad")
def _center_crop_pad(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Centre crop (a slice) and/or centre pad with zeros per axis to the constant shape."""
    x = ins[0]
    dims = static_dims(node, x, "input")
    r = len(dims)
    shape = [int(s) for s in const_input(node, ins[1], "shape").reshape(-1)]
    axes = [a + r if a < 0 else a for a in (node.attr("axes") or range(r))]
    y = x
    pads = [0] * (2 * r)
    for a, sh in zip(axes, shape):
        dim = dims[a]
        if sh < dim:
            d = (dim - sh) // 2
            y = slice_axis(bb, y, a, d, d + sh)
        elif sh > dim:
            d = (sh - dim) // 2
            pads[a], pads[r + a] = d, sh - dim - d
    if any(pads):
        y = bb.emit(R.nn.pad(y, [p for a in range(r) for p in (pads[a], pads[r + a])], pad_value=0.0))
    if y is x:
        y = bb.emit(R.astype(x, dtype_of(x)))
    return y


@converter("OneHot")
def _one_hot(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """values[1] where index (negative counted from depth) equals the position on `axis`,
    values[0] elsewhere (out-of-range indices give a row of values[0])."""
    idx, depth_e, values = ins[0], ins[1], ins[2]
    depth = int(np.asarray(const_input(node, depth_e, "depth")).reshape(-1)[0])
    r = idx.ty.ndim
    axis = node.attr("axis", -1)
    axis = axis + r + 1 if axis < 0 else axis
    idt = dtype_of(idx)
    i64 = bb.emit(R.astype(idx, "int64")) if idt != "int64" else idx
    i64 = bb.emit(R.where(R.less(i64, scalar_const(0, "int64")), R.add(i64, scalar_const(depth, "int64")), i64))
    i64 = bb.emit(R.expand_dims(i64, [axis]))
    pos_shape = [1] * (r + 1)
    pos_shape[axis] = depth
    pos = relax.const(np.arange(depth, dtype=np.int64).reshape(pos_shape), "int64")
    off = bb.emit(R.take(values, relax.const(np.array(0, np.int64), "int64"), axis=0))
    on = bb.emit(R.take(values, relax.const(np.array(1, np.int64), "int64"), axis=0))
    return bb.emit(R.where(R.equal(i64, pos), on, off))


@converter("Col2Im")
def _col2im(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Col2Im as one matmul with a 0/1 scatter matrix built at compile time:
    [N, C, K·L] @ [K·L, prod(image)] → [N, C, *image] (overlaps add up)."""
    x = ins[0]
    n, ckb, num_l = static_dims(node, x, "input")
    image = [int(v) for v in const_input(node, ins[1], "image_shape").reshape(-1)]
    block = [int(v) for v in const_input(node, ins[2], "block_shape").reshape(-1)]
    nd = len(image)
    dil = list(node.attr("dilations") or [1] * nd)
    pads = list(node.attr("pads") or [0] * (2 * nd))
    strides = list(node.attr("strides") or [1] * nd)
    kprod = int(np.prod(block))
    c = ckb // kprod
    nblocks = [(image[d] + pads[d] + pads[nd + d] - (dil[d] * (block[d] - 1) + 1)) // strides[d] + 1 for d in range(nd)]
    if int(np.prod(nblocks)) != num_l:
        raise LoweringError(f"node {node.label()}: Col2Im block count {num_l} does not match the image")
    m = np.zeros((kprod, num_l, int(np.prod(image))), dtype=dtype_of(x))
    for k, koff in enumerate(np.ndindex(*block)):
        for l_, boff in enumerate(np.ndindex(*nblocks)):
            pos = [boff[d] * strides[d] + koff[d] * dil[d] - pads[d] for d in range(nd)]
            if all(0 <= pos[d] < image[d] for d in range(nd)):
                m[k, l_, int(np.ravel_multi_index(pos, image))] += 1
    mat = relax.const(m.reshape(kprod * num_l, -1), dtype_of(x))
    y = bb.emit(R.matmul(R.reshape(x, (n, c, kprod * num_l)), mat))
    return bb.emit(R.reshape(y, (n, c, *image)))


@converter("BitCast")
def _bitcast(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Reinterpret the bits as another type of the same width (a TIR reinterpret kernel)."""
    from tvm import topi

    x = ins[0]
    to = onnx_dtype(node.attr("to"))
    if np.dtype(to).itemsize != np.dtype(dtype_of(x)).itemsize:
        raise LoweringError(f"node {node.label()}: BitCast between types of different widths")
    return bb.emit_te(topi.reinterpret, x, to)


def _clipped_bounds(node: Node) -> tuple[float, float] | None:
    """(lo, hi) of a Clip with constant bounds (both given) producing `node`'s first input."""
    from graphopt.pattern import const_array

    clip = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if clip is None or clip.op_type != "Clip" or clip.domain not in ("", "ai.onnx"):
        return None
    if clip.attr("min") is not None and clip.attr("max") is not None:
        return float(clip.attr("min")), float(clip.attr("max"))
    ins = list(clip.inputs) + [None] * 3
    bounds = [const_array(v) if v is not None else None for v in ins[1:3]]
    if any(b is None or b.size != 1 for b in bounds):
        return None
    return float(bounds[0].reshape(())), float(bounds[1].reshape(()))  # type: ignore[union-attr]


@converter("Cast")
def _cast_in_range(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """float → 8/16/32-bit integer Cast of a Clip to within the integer type's range (a requantize:
    Cast(Clip(Round(x / s) + z, 0, 255), uint8)) → a plain conversion. The frontend's Cast emulates
    C's wrap-around for out-of-range and non-finite values with selects and masks that stay in
    every fused int8 epilogue (the conversion of each output element then costs dozens of
    instructions); here the values are in range by construction. Otherwise (and for NaN, which
    Clip lets through: a C cast's value is unspecified there too) the frontend's Cast."""
    x = ins[0]
    to = onnx_dtype(node.attr("to"))
    src = str(getattr(getattr(x, "ty", None), "dtype", ""))
    if not src.startswith(("float", "bfloat")) or not to.startswith(("int", "uint")) or to.endswith("64"):
        return NotImplemented
    bounds = _clipped_bounds(node)
    info = np.iinfo(to)
    if bounds is None or not (info.min <= bounds[0] <= bounds[1] <= info.max):
        return NotImplemented
    return bb.emit(R.astype(x, to))


@converter("Det")
def _det(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Determinant of [..., n, n] by the Leibniz formula (static n ≤ 4)."""
    import itertools

    x = ins[0]
    dims = static_dims(node, x, "input")
    n = dims[-1]
    if n > 4:
        raise LoweringError(f"node {node.label()}: Det of {n}x{n} matrices is not supported by the cpu target (n ≤ 4)")
    r = len(dims)

    def el(i: int, j: int) -> Any:
        return bb.emit(R.squeeze(slice_axis(bb, slice_axis(bb, x, r - 2, i, i + 1), r - 1, j, j + 1), [r - 2, r - 1]))

    cells = {(i, j): el(i, j) for i in range(n) for j in range(n)}
    total = None
    for perm in itertools.permutations(range(n)):
        inv = sum(1 for a in range(n) for b in range(a + 1, n) if perm[a] > perm[b])
        term = cells[(0, perm[0])]
        for i in range(1, n):
            term = R.multiply(term, cells[(i, perm[i])])
        if total is None:
            total = term if inv % 2 == 0 else R.negative(term)
        else:
            total = R.add(total, term) if inv % 2 == 0 else R.subtract(total, term)
        total = bb.emit(total)
    return total


@converter("Dropout")
def _dropout(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Inference Dropout (or training with ratio 0): the input unchanged and an all-true mask.
    Training with a nonzero ratio draws random numbers: refused."""
    x = ins[0]
    training = ins[2] if len(ins) > 2 else None
    if training is not None:
        t = const_value(training)
        if t is None:
            raise LoweringError(f"node {node.label()}: Dropout with a run-time training_mode is not supported by the cpu target")
        if bool(np.asarray(t).reshape(-1)[0]):
            r = const_value(ins[1]) if len(ins) > 1 and ins[1] is not None else np.array(0.5)
            if r is None or float(np.asarray(r).reshape(-1)[0]) != 0.0:
                raise LoweringError(f"node {node.label()}: training-mode Dropout (random) is not supported by the cpu target")
    y = bb.emit(R.astype(x, dtype_of(x)))
    if len(node.outputs) > 1:
        return [y, bb.emit(R.ones(dims_of(x), "bool"))]
    return y


@converter("Swish")
def _swish(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """x · sigmoid(alpha · x)."""
    x = ins[0]
    a = float(node.attr("alpha", 1.0))
    return bb.emit(R.multiply(x, R.sigmoid(R.multiply(x, scalar_const(a, dtype_of(x))))))


@converter("ReduceMax", "ReduceMin")
def _reduce_bool(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """ReduceMax/Min of bool tensors through uint8 (TIR has no min/max value for bool)."""
    x = ins[0]
    if dtype_of(x) != "bool":
        return NotImplemented
    axes = node.attr("axes")
    if len(ins) > 1 and ins[1] is not None:
        axes = [int(a) for a in const_input(node, ins[1], "axes").reshape(-1)]
    keep = bool(node.attr("keepdims", 1))
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return bb.emit(R.astype(x, "bool"))
        axes = None
    fn = R.max if node.op_type == "ReduceMax" else R.min
    return bb.emit(R.astype(fn(R.astype(x, "uint8"), axes, keep), "bool"))


@converter("ReverseSequence")
def _reverse_sequence(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Reverse the first sequence_lens[b] steps of each batch entry: one gather_elements with a
    compile-time index tensor (sequence_lens must be constant)."""
    x = ins[0]
    shape = static_dims(node, x, "input")
    lens = [int(v) for v in const_input(node, ins[1], "sequence_lens").reshape(-1)]
    tax, bax = node.attr("time_axis", 0), node.attr("batch_axis", 1)
    idx = np.indices(shape)[tax].copy()
    for b, n in enumerate(lens):
        sel: list[Any] = [slice(None)] * len(shape)
        sel[bax] = b
        t = idx[tuple(sel)]
        pos = np.indices(t.shape)[tax if tax < bax else tax - 1]
        idx[tuple(sel)] = np.where(pos < n, n - 1 - pos, pos)
    return bb.emit(R.gather_elements(x, relax.const(idx.astype(np.int64), "int64"), axis=tax))


@converter("Pad")
def _pad(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Constant Pad whose pad value is a run-time scalar: pad with zeros, then the value where a
    compile-time mask marks the padding (the frontend takes only a constant value)."""
    if opset < 11 or len(ins) < 3 or ins[2] is None or const_value(ins[2]) is not None:
        return NotImplemented
    if str_attr(node, "mode", "constant") != "constant":
        return NotImplemented
    x = ins[0]
    shape = static_dims(node, x, "input")
    r = len(shape)
    pads = [int(v) for v in const_input(node, ins[1], "pads").reshape(-1)]
    axes = list(range(r))
    if len(ins) > 3 and ins[3] is not None:
        axes = [int(a) + r if int(a) < 0 else int(a) for a in const_input(node, ins[3], "axes").reshape(-1)]
    full = [0] * (2 * r)
    for i, a in enumerate(axes):
        full[a], full[r + a] = pads[i], pads[len(axes) + i]
    if any(p < 0 for p in full):
        return NotImplemented
    width = [p for a in range(r) for p in (full[a], full[r + a])]
    y = bb.emit(R.nn.pad(x, width, pad_value=0.0))
    inside = np.pad(np.ones(shape, dtype=bool), [(full[a], full[r + a]) for a in range(r)], constant_values=False)
    cv = bb.emit(R.astype(R.reshape(ins[2], []), dtype_of(x)))
    return bb.emit(R.where(relax.const(inside, "bool"), y, cv))


@converter("NonMaxSuppression")
def _nms_guard(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """The frontend's NonMaxSuppression reads max_output_boxes_per_class / iou_threshold /
    score_threshold only when they are constants (it silently uses defaults otherwise): refuse
    run-time ones instead of computing something else."""
    for i, what in ((2, "max_output_boxes_per_class"), (3, "iou_threshold"), (4, "score_threshold")):
        if len(ins) > i and ins[i] is not None and const_value(ins[i]) is None:
            raise LoweringError(f"node {node.label()}: NonMaxSuppression with a run-time {what} is not supported by the cpu target")
    return NotImplemented


@converter("TensorScatter")
def _tensor_scatter(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """KV-cache write: cache position p of batch b takes update[p - write_indices[b]] (mod the
    cache length when circular) where that lies in the update, else keeps the cache; one
    gather_elements with a run-time index and a select."""
    cache, upd = ins[0], ins[1]
    widx = ins[2] if len(ins) > 2 else None
    shape = static_dims(node, cache, "past_cache")
    r = len(shape)
    axis = node.attr("axis", -2) % r
    length, s = shape[axis], static_dims(node, upd, "update")[axis]
    pos_shape = [1] * r
    pos_shape[axis] = length
    pos = relax.const(np.arange(length, dtype=np.int64).reshape(pos_shape), "int64")
    if widx is None:
        j = pos
    else:
        w_shape = [1] * r
        w_shape[0] = shape[0]
        w = bb.emit(R.reshape(bb.emit(R.astype(widx, "int64")), w_shape))
        j = bb.emit(R.subtract(pos, w))
    if str_attr(node, "mode", "linear") == "circular":
        j = bb.emit(R.floor_mod(j, scalar_const(length, "int64")))
    valid = bb.emit(R.logical_and(R.greater_equal(j, scalar_const(0, "int64")), R.less(j, scalar_const(s, "int64"))))
    jc = bb.emit(R.broadcast_to(R.clip(j, 0, s - 1), shape))
    gathered = bb.emit(R.gather_elements(upd, jc, axis=axis))
    return bb.emit(R.where(valid, gathered, cache))


@converter("EyeLike")
def _eye_like(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """EyeLike of a 2-D input of static shape: ones on the k-th diagonal, in `dtype` (default
    the input's); the values do not depend on the input's, only its shape."""
    dims = static_dims(node, ins[0], "input")
    if len(dims) != 2:
        raise LoweringError(f"node {node.label()}: EyeLike needs a 2-D input")
    code = node.attr("dtype")
    dtype = onnx_dtype(int(code)) if code is not None else dtype_of(ins[0])
    eye = np.eye(dims[0], dims[1], int(node.attr("k", 0)), dtype=np.bool_ if dtype == "bool" else dtype)
    return bb.emit(R.astype(relax.const(eye, dtype), dtype))

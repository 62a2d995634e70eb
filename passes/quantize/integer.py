"""Integer forms of quantized ops for compiled targets: `split-zero-points`, `qdq-to-integer`.

`split-zero-points` takes the activation zero point out of an integer matmul's reduction:

    MatMulInteger(a, W, a_zp, [w_zp = 0])   (W a constant 2-D int8/uint8 matrix)
      →  Sub(MatMulInteger(a, W), Mul(Cast(a_zp, int32), colsum(W)))

Σ_k (a[m,k] − z)·W[k,n] = Σ_k a[m,k]·W[k,n] − z·Σ_k W[k,n], exactly, in int32 (|colsum| ≤ K·128,
far from overflow for any real K). The left side is then a plain int8 × int8 → int32 product,
which compiled targets run with integer dot-product instructions (the x86 AVX2 and arm64 int8
kernels only take products of two casts); the correction is an elementwise epilogue that fuses
into the kernel's write-back. The cpu target runs it before lowering; onnxruntime gets the
quantize pass's form unchanged (its MatMulInteger takes zero points natively).

Must not fire: W not a constant 2-D matrix (activation × activation, batched weights), a
non-zero or non-constant weight zero point (that would need a row-sum term of the activations),
no activation zero point or a constant zero one (the zero point input is just dropped then), a
zero point that is not a scalar (per-row zero points of opset 10's 1-D form).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from graphopt.ir import Builder, DataType, Model, Shape, TensorType, Value
from graphopt.pattern import const_array, drop_unused_initializers
from graphopt.transform import Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class SplitZeroPoints(Pass):
    """MatMulInteger(a, W, a_zp, 0) → MatMulInteger(a, W) − a_zp·colsum(W) (see module docstring)."""

    name: ClassVar[str] = "split-zero-points"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        split = dropped = 0
        touched = []
        for g in model.graphs():
            b = Builder(g)
            for node in list(g.nodes):
                if node.op_type != "MatMulInteger" or node.domain not in ("", "ai.onnx"):
                    continue
                ins = list(node.inputs) + [None] * (4 - len(node.inputs))
                a, wv, az, wz = ins[:4]
                if az is None:
                    continue
                w = const_array(wv)
                if w is None or w.ndim != 2 or w.dtype not in (np.int8, np.uint8):
                    continue
                if wz is not None:
                    wzv = const_array(wz)
                    if wzv is None or np.any(wzv != 0):
                        continue
                azv = const_array(az)
                if azv is not None and azv.size != 1:
                    continue
                if azv is None and not _scalar(az):
                    continue  # a dynamic zero point must be a scalar (DynamicQuantizeLinear's is)
                out = node.outputs[0]
                touched += [v for v in (az, wz) if v is not None]
                if azv is not None and int(azv.reshape(())) == 0:
                    node.set_inputs([a, wv])
                    dropped += 1
                    continue
                with g.inserting_before(node):
                    acc = b.op.MatMulInteger(a, wv)
                    colsum = b.initializer(w.astype(np.int32).sum(axis=0, dtype=np.int32), f"{wv.name}_colsum")
                    z32 = b.op.Cast(az, to=int(DataType.INT32))
                    corr = b.op.Mul(z32, colsum)
                    y = b.op.Sub(acc, corr)
                oshape = out.shape.dims if out.shape is not None else None
                acc.type = TensorType(DataType.INT32, Shape(tuple(oshape)) if oshape is not None else None)
                z32.type = TensorType(DataType.INT32, az.shape)
                corr.type = TensorType(DataType.INT32, Shape((w.shape[1],)))
                y.type = TensorType(DataType.INT32, Shape(tuple(oshape)) if oshape is not None else None)
                out.replace_all_uses_with(y, replace_graph_outputs=True)
                if any(o is y for o in g.outputs):
                    y.name, out.name = out.name, y.name
                g.remove(node)
                split += 1
        drop_unused_initializers(touched)
        changed = bool(split or dropped)
        if changed:
            ctx.info(f"split-zero-points: {split} MatMulInteger split, {dropped} zero zero points dropped")
        return PassResult(changed=changed, stats={k: v for k, v in (("split", split), ("dropped", dropped)) if v})



def _scalar(v: Value) -> bool:
    """A scalar (or one-element) tensor: by its type, or DynamicQuantizeLinear's zero point."""
    p = v.producer()
    if p is not None and p.op_type == "DynamicQuantizeLinear" and p.domain in ("", "ai.onnx") and len(p.outputs) > 2 and p.outputs[2] is v:
        return True
    return v.shape is not None and all(d == 1 for d in v.shape.dims)


def _dq_parts(v: Value | None) -> tuple[Value, np.ndarray, np.ndarray, int] | None:
    """(quantized input, scale, zero point, axis) of the DequantizeLinear that produces `v`,
    when its scale and zero point are constants (zero point 0 when absent)."""
    if v is None:
        return None
    p = v.producer()
    if p is None or p.op_type != "DequantizeLinear" or p.domain not in ("", "ai.onnx"):
        return None
    ins = list(p.inputs) + [None] * (3 - len(p.inputs))
    q, s, z = ins[:3]
    if q is None or s is None:
        return None
    sv = const_array(s)
    if sv is None:
        return None
    if z is None:
        zv = np.zeros((), np.int32)
    else:
        zv = const_array(z)
        if zv is None:
            return None
    return q, sv.astype(np.float32), zv, int(p.attr("axis", 1))


@register_pass
@dataclass(frozen=True)
class QdqToInteger(Pass):
    """Static QDQ convolutions → integer convolutions (what compiled targets run with int8 kernels).

    Before (the quantize pass's static form):
        Conv(DQ(xq, s_x, z_x), DQ(Wq, s_w[oc], 0, axis=0), [DQ(bq, s_x·s_w, 0)])
    After:
        y = Cast(ConvInteger(xq, Wq, z_x), float) · (s_x·s_w)[oc] + b[oc]

    The cpu target lowers ConvInteger as Pad(xq, value z_x) → int8 conv accumulating in int32 →
    − z_x·ΣWq[oc] (padding with the quantized 0.0 and subtracting z_x times each filter's sum is
    exactly Σ (x − z_x)·W over the window), so the reduction is a plain int8 product (the
    x86/arm64 int8 kernels' form) and the rest an elementwise epilogue in the kernel's
    write-back, followed by the next QuantizeLinear (requantize). The other Q/DQ become the
    arithmetic they define (see `_qdq_to_arith`), so that they fuse into kernels too.

    QDQ Gemm / MatMul with constant weights (a CNN's classifier) likewise:
        Gemm(DQ(xq, s_x, z_x), DQ(Wq, s_w[n]), [b], transB=1)
        → Cast(MatMulInteger(xq, Wqᵀ, z_x), float) · (s_x·s_w)[n] + b
    (a float GEMV that re-quantized its input inside the reduction, 2048 x 1000 in ResNet-50: 5.7
    ms, becomes the int8 matmul kernels' work).

    Q(MaxPool(DQ(xq, s, z)), s, z) → MaxPool(xq) (same scalar scale and zero point, every reader
    of the MaxPool such a Q; opset ≥ 12): max commutes with the increasing dequantize and the
    requantize of a dequantized 8-bit value with the same parameters gives it back, so the pool
    runs on the 8-bit values (as onnxruntime's QDQ MaxPool) and the conv before it writes 8-bit
    values instead of float (ResNet-50's stem wrote 112x112x64 floats, the pool read them and
    quantized them). Runs only where convs or matmuls were rewritten (a net the integer kernels
    take).

    Grouped and depthwise convs keep their `group` (ConvInteger has one): on AVX-512 VNNI a
    depthwise ConvInteger runs on uint8 channel blocks, so a MobileNet's activations stay 8-bit
    between its 1x1 convs instead of going through float for each depthwise conv.

    Must not fire: non-2-D convs, auto_pad other than NOTSET, a non-zero
    weight zero point, a per-channel activation scale, non-constant scales or zero points, weights
    that are not constant int8/uint8, a float (non-DQ) input, a bias that is neither a DQ of a
    constant nor a float constant; for Gemm also alpha/beta other than 1, transA, a weight scale
    along K, activations of rank other than 2 (MatMul: weights other than 2-D).
    MaxPool: a per-channel or non-constant scale or zero point, a reader of its output
    that is not a Q with the same scale and zero point (or a graph output), its Indices output
    used, opset below 12.
    """

    name: ClassVar[str] = "qdq-to-integer"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        n_conv = n_mm = n_pool = 0
        arith: dict[str, int] = {}
        touched: list[Value] = []
        for g in model.graphs():
            b = Builder(g)
            for node in list(g.nodes):
                if node.op_type in ("Gemm", "MatMul") and node.domain in ("", "ai.onnx") and node.graph is g:
                    if self._rewrite_matmul(g, b, node, touched):
                        n_mm += 1
                    continue
                if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or node.graph is not g:
                    continue
                plan = self._plan(node)
                if plan is None:
                    continue
                xq, zx, wq, scale, bias, pads = plan
                oc = wq.shape[0]
                with g.inserting_before(node):
                    kw: dict = {"pads": pads}
                    for a in ("strides", "dilations", "kernel_shape"):
                        if node.attr(a) is not None:
                            kw[a] = list(node.attr(a))
                    if int(node.attr("group", 1)) != 1:
                        kw["group"] = int(node.attr("group", 1))
                    base = node.name or "conv"
                    acc = b.op.ConvInteger(xq, b.initializer(wq, f"{base}_wq"),
                                           b.initializer(np.array(zx, dtype=xq.dtype.numpy()).reshape(()), f"{base}_xzp"), **kw)
                _replace_by_scaled_sum(g, b, node, acc, scale.reshape(1, oc, 1, 1),
                                       None if bias is None else bias.reshape(1, oc, 1, 1), base, touched)
                n_conv += 1
            if n_conv or n_mm:
                n_pool += _integer_maxpools(g, b, model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)), touched)
            # DequantizeLinear nodes (weights, biases) nothing reads any more
            for dq in [n for n in g.nodes if n.op_type == "DequantizeLinear"]:
                if not any(o.uses() or o.is_graph_output() for o in dq.outputs):
                    touched += [v for v in dq.inputs if v is not None]
                    g.remove(dq)
            if n_conv or n_mm:
                for k, v in _qdq_to_arith(g, b, touched).items():
                    arith[k] = arith.get(k, 0) + v
                folded = _fold_requantize_scales(g, b, touched)
                if folded:
                    arith["requantize-folded"] = arith.get("requantize-folded", 0) + folded
        drop_unused_initializers(touched)
        if n_conv or n_mm:
            ctx.info(f"qdq-to-integer: {n_conv} QDQ convs as ConvInteger, {n_mm} QDQ Gemm/MatMul as MatMulInteger, "
                     f"{n_pool} MaxPool on 8-bit values; "
                     f"other Q/DQ as arithmetic {arith}")
        stats = {"conv": n_conv, "matmul": n_mm, "maxpool": n_pool, **arith} if n_conv or n_mm else {}
        return PassResult(changed=bool(n_conv or n_mm), stats={k: v for k, v in stats.items() if v})

    @staticmethod
    def _rewrite_matmul(g, b: Builder, node, touched: list[Value]) -> bool:
        """Gemm/MatMul of a DQ activation and a DQ constant weight → MatMulInteger (see docstring)."""
        gemm = node.op_type == "Gemm"
        ins = list(node.inputs) + [None] * (3 - len(node.inputs))
        if gemm and (float(node.attr("alpha", 1.0)) != 1.0 or float(node.attr("beta", 1.0)) != 1.0 or int(node.attr("transA", 0))):
            return False
        x, w = _dq_parts(ins[0]), _dq_parts(ins[1])
        if x is None or w is None:
            return False
        xq, sx, zx, _ = x
        if sx.size != 1 or zx.size != 1 or xq.dtype is None or xq.dtype.numpy() not in (np.uint8, np.int8):
            return False
        if xq.shape is None or (gemm and len(xq.shape.dims) != 2) or len(xq.shape.dims) < 2:
            return False
        wq = const_array(w[0])
        if wq is None or wq.ndim != 2 or wq.dtype not in (np.int8, np.uint8) or np.any(w[2] != 0):
            return False
        trans = gemm and bool(int(node.attr("transB", 0)))
        n_axis = 0 if trans else 1  # the output-channel axis of the weight as stored
        n = int(wq.shape[n_axis])
        sw = w[1]
        axis = w[3] + 2 if w[3] < 0 else w[3]
        if sw.size not in (1, n) or (sw.size == n and n > 1 and axis != n_axis):
            return False
        scale = (float(sx.reshape(())) * np.broadcast_to(sw.reshape(-1), (n,))).astype(np.float32)
        bias = None
        if gemm and ins[2] is not None:
            bd = _dq_parts(ins[2])
            if bd is not None:
                bq = const_array(bd[0])
                if bq is None or np.any(bd[2] != 0):
                    return False
                bias = bq.astype(np.float64) * np.broadcast_to(bd[1].reshape(-1), bq.shape)
            else:
                bias = const_array(ins[2])
            if bias is None or bias.size not in (1, n):
                return False
        base = node.name or "matmul"
        with g.inserting_before(node):
            wk = np.ascontiguousarray(wq.T if trans else wq)
            acc = b.op.MatMulInteger(xq, b.initializer(wk, f"{base}_wq"),
                                     b.initializer(np.array(zx, dtype=xq.dtype.numpy()).reshape(()), f"{base}_xzp"))
        _replace_by_scaled_sum(g, b, node, acc, scale, None if bias is None else np.broadcast_to(bias.reshape(-1), (n,)),
                               base, touched)
        return True

    @staticmethod
    def _plan(node) -> tuple[Value, int, np.ndarray, np.ndarray, np.ndarray | None, list[int]] | None:
        if str(node.attr("auto_pad", "NOTSET")) not in ("NOTSET", "b'NOTSET'"):
            return None
        ins = list(node.inputs) + [None] * (3 - len(node.inputs))
        x, w = _dq_parts(ins[0]), _dq_parts(ins[1])
        if x is None or w is None:
            return None
        xq, sx, zx, _ = x
        if sx.size != 1 or zx.size != 1 or xq.dtype is None or xq.dtype.numpy() not in (np.uint8, np.int8):
            return None
        wq = const_array(w[0])
        if wq is None or wq.ndim != 4 or wq.dtype not in (np.int8, np.uint8) or np.any(w[2] != 0):
            return None
        oc = wq.shape[0]
        group = int(node.attr("group", 1))
        if group < 1 or oc % group:
            return None
        sw = w[1]
        if sw.size not in (1, oc) or (sw.size == oc and oc > 1 and w[3] != 0):
            return None
        scale = (float(sx.reshape(())) * np.broadcast_to(sw.reshape(-1), (oc,))).astype(np.float32)
        bias = None
        if ins[2] is not None:
            bd = _dq_parts(ins[2])
            if bd is not None:
                bq = const_array(bd[0])
                if bq is None or np.any(bd[2] != 0):
                    return None
                bias = bq.astype(np.float64) * np.broadcast_to(bd[1].reshape(-1), bq.shape)
            else:
                bias = const_array(ins[2])
                if bias is None:
                    return None
            if bias.size != oc:
                return None
        pads = list(node.attr("pads", [0, 0, 0, 0]))
        if len(pads) != 4:
            return None
        return xq, int(zx.reshape(())), wq, scale, bias, pads



def _qdq_to_arith(g, b: Builder, touched: list[Value]) -> dict[str, int]:
    """The other QuantizeLinear/DequantizeLinear nodes (constant scale and zero point) as the
    elementwise arithmetic they define, which compiled targets fuse into the neighbouring
    kernels (their Q/DQ ops are not kernels of their own there):

        DQ(q, s, z)  → (Cast(q, float) − z)·s            (a constant q: the float constant)
        Q(x, s, z)   → Cast(Clip(Round(x / s) + z, lo, hi), int8/uint8)   (Round: half to even, as Q)
    """
    counts = {"dequantize-folded": 0, "dequantize-arith": 0, "quantize-arith": 0}
    for node in list(g.nodes):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        ins = list(node.inputs) + [None] * (3 - len(node.inputs))
        x, sv_, zv_ = ins[:3]
        sv = const_array(sv_) if sv_ is not None else None
        zv = const_array(zv_) if zv_ is not None else np.zeros((), np.uint8 if node.op_type == "QuantizeLinear" else np.int32)
        if x is None or sv is None or zv is None or x.shape is None or node.attr("block_size") not in (None, 0):
            continue
        rank = len(x.shape.dims)
        axis = int(node.attr("axis", 1))
        axis = axis + rank if axis < 0 else axis

        def bshape(a: np.ndarray, axis: int = axis, rank: int = rank) -> np.ndarray:
            return a.reshape(()) if a.size == 1 else a.reshape([-1 if i == axis else 1 for i in range(rank)])

        out = node.outputs[0]
        name = node.name or out.name
        with g.inserting_before(node):
            if node.op_type == "DequantizeLinear":
                xc = const_array(x)
                if xc is not None:
                    val = ((xc.astype(np.float64) - bshape(zv).astype(np.float64)) * bshape(sv)).astype(np.float32)
                    y = b.initializer(val, f"{name}_dq")
                    counts["dequantize-folded"] += 1
                else:
                    xf = b.op.Cast(x, to=int(DataType.FLOAT))
                    xf.type = TensorType(DataType.FLOAT, x.shape)
                    if np.any(zv != 0):
                        xf = b.op.Sub(xf, b.initializer(bshape(zv).astype(np.float32), f"{name}_zp"))
                        xf.type = TensorType(DataType.FLOAT, x.shape)
                    y = b.op.Mul(xf, b.initializer(bshape(sv).astype(np.float32), f"{name}_s"))
                    y.type = TensorType(DataType.FLOAT, x.shape)
                    counts["dequantize-arith"] += 1
            else:
                dt = zv.dtype
                if dt not in (np.uint8, np.int8) or (x.dtype is not None and x.dtype != DataType.FLOAT):
                    continue
                info = np.iinfo(dt)
                t = b.op.Round(b.op.Div(x, b.initializer(bshape(sv).astype(np.float32), f"{name}_s")))
                if np.any(zv != 0):
                    t = b.op.Add(t, b.initializer(bshape(zv).astype(np.float32), f"{name}_zp"))
                t = b.op.Clip(t, b.initializer(np.float32(info.min), f"{name}_lo"), b.initializer(np.float32(info.max), f"{name}_hi"))
                y = b.op.Cast(t, to=int(DataType.UINT8 if dt == np.uint8 else DataType.INT8))
                for v in _chain(t, x):
                    v.type = TensorType(DataType.FLOAT, x.shape)
                y.type = TensorType(DataType.UINT8 if dt == np.uint8 else DataType.INT8, x.shape)
                counts["quantize-arith"] += 1
        touched += [v for v in (sv_, zv_) if v is not None]
        if node.op_type == "DequantizeLinear":
            touched.append(x)
        out.replace_all_uses_with(y, replace_graph_outputs=True)
        if any(o is y for o in g.outputs):
            y.name, out.name = out.name, y.name
        g.remove(node)
    return counts


def _replace_by_scaled_sum(g, b: Builder, node, acc: Value, scale: np.ndarray, bias: np.ndarray | None,
                           base: str, touched: list[Value]) -> None:
    """`node`'s float output → Cast(acc, float) · scale [+ bias] (acc: the integer conv/matmul
    written before it), typed as the output was; `node` removed, its name given to acc's node
    (the layer's name: kernel groups, profiles)."""
    out = node.outputs[0]
    with g.inserting_before(node):
        yf = b.op.Cast(acc, to=int(DataType.FLOAT))
        y = ys = b.op.Mul(yf, b.initializer(scale.astype(np.float32), f"{base}_scale"))
        if bias is not None:
            y = b.op.Add(y, b.initializer(bias.astype(np.float32), f"{base}_bias"))
    for v, dt in ((acc, DataType.INT32), (yf, DataType.FLOAT), (ys, DataType.FLOAT), (y, DataType.FLOAT)):
        v.type = TensorType(dt, out.shape)
    touched += [v for v in node.inputs if v is not None]
    out.replace_all_uses_with(y, replace_graph_outputs=True)
    if any(o is y for o in g.outputs):
        y.name, out.name = out.name, y.name
    g.remove(node)
    if node.name:
        acc.producer().name = node.name


def _scalar_const(v: Value | None) -> float | None:
    c = const_array(v) if v is not None else None
    return float(c.reshape(())) if c is not None and c.size == 1 and c.dtype == np.float32 else None


def _integer_maxpools(g, b: Builder, opset: int, touched: list[Value]) -> int:
    """Q(MaxPool(DQ(xq, s, z)), s, z) → MaxPool(xq) (see QdqToInteger); returns how many."""
    if opset < 12:
        return 0
    n = 0
    for node in list(g.nodes):
        if node.op_type != "MaxPool" or node.domain not in ("", "ai.onnx") or node.graph is not g:
            continue
        if len(node.outputs) > 1 and any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            continue
        parts = _dq_parts(node.inputs[0])
        if parts is None:
            continue
        xq, s, z, _ = parts
        if s.size != 1 or z.size != 1 or xq.dtype not in (DataType.UINT8, DataType.INT8):
            continue
        y = node.outputs[0]
        readers = y.consumers()
        if y.is_graph_output() or not readers:
            continue
        ok = True
        for q in readers:
            ins = list(q.inputs) + [None] * (3 - len(q.inputs))
            if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx") or ins[0] is not y or ins[2] is None:
                ok = False
                break
            qs, qz = const_array(ins[1]) if ins[1] is not None else None, const_array(ins[2])
            if (qs is None or qz is None or qs.size != 1 or qz.size != 1 or q.attr("block_size") not in (None, 0)
                    or np.float32(qs.reshape(())) != np.float32(s.reshape(())) or qz.dtype != z.dtype
                    or int(qz.reshape(())) != int(z.reshape(()))):
                ok = False
                break
        if not ok:
            continue
        with g.inserting_before(node):
            attrs = {k: node.attr(k) for k in node.attributes}
            out = b.op.MaxPool(xq, **attrs)
            out.type = TensorType(xq.dtype, y.shape)
        for q in readers:
            touched += [v for v in q.inputs[1:] if v is not None]
            q.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
            if q.outputs[0].is_graph_output():
                out.name, q.outputs[0].name = q.outputs[0].name, out.name
            g.remove(q)
        out.producer().name = node.name
        g.remove(node)
        n += 1
    return n


def _fold_requantize_scales(g, b: Builder, touched: list[Value]) -> int:
    """One multiply per requantize, as onnxruntime's QLinearConv does (acc · s_x·s_w/s_y):

        Round(Div([Relu](Cast(acc) · s[c] [+ b[c]]), s_y))  →  Round([Relu](Cast(acc) · (s/s_y)[c] [+ (b/s_y)[c]]))

    for the int32 sums of ConvInteger / MatMulInteger (the x86 int8 kernels' write-back then has
    no vector division: it cost as much as the dot products of a 64-channel 1x1 conv). Equal up
    to float rounding (Relu commutes with a positive scale). Must not fire: a non-constant,
    non-scalar or non-positive s_y, an intermediate read elsewhere, a chain that does not start
    at an integer conv/matmul's Cast."""
    folded = 0
    for div in list(g.nodes):
        if div.op_type != "Div" or div.domain not in ("", "ai.onnx") or len(div.inputs) != 2:
            continue
        sy = _scalar_const(div.inputs[1])
        if sy is None or not sy > 0 or not all(u.op_type == "Round" for u in div.outputs[0].consumers()):
            continue
        chain, v = [], div.inputs[0]
        while v is not None and len(v.uses()) == 1 and not v.is_graph_output():
            p = v.producer()
            if p is None or p.domain not in ("", "ai.onnx"):
                break
            chain.append(p)
            if p.op_type == "Relu" or (p.op_type == "Add" and const_array(p.inputs[1]) is not None):
                v = p.inputs[0]
                continue
            break
        if not chain or chain[-1].op_type != "Mul" or len([n for n in chain if n.op_type == "Add"]) > 1:
            continue
        mul = chain[-1]
        src = mul.inputs[0].producer() if mul.inputs[0] is not None else None
        acc = src.inputs[0].producer() if src is not None and src.op_type == "Cast" and src.inputs else None
        scale = const_array(mul.inputs[1])
        if acc is None or acc.op_type not in ("ConvInteger", "MatMulInteger") or scale is None or scale.dtype != np.float32:
            continue
        with g.inserting_before(mul):
            for n in chain:
                if n.op_type in ("Mul", "Add"):
                    c = const_array(n.inputs[1])
                    touched.append(n.inputs[1])
                    n.replace_input_with(1, b.initializer((c.astype(np.float64) / sy).astype(np.float32), f"{n.inputs[1].name}_requant"))
        touched.append(div.inputs[1])
        div.outputs[0].replace_all_uses_with(div.inputs[0])
        g.remove(div)
        folded += 1
    return folded


def _chain(v: Value, stop: Value) -> list[Value]:
    """`v` and the single-input-chain values that produced it, back to (not including) `stop`."""
    out = []
    while v is not None and v is not stop:
        out.append(v)
        p = v.producer()
        v = p.inputs[0] if p is not None and p.inputs else None
    return out

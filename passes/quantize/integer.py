"""`split-zero-points`: take the activation zero point out of an integer matmul's reduction.

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

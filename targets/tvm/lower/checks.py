"""What the lowering refuses up front, with a one-line reason: ops neither graphopt nor the frontend
converts (`supported_ops`, `check_schema`), tensors over `MAX_ELEMENTS`, empty tensors where a
kernel cannot take them, bodies with the wrong arity.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import tvm
import tvm.sym  # the Analyzer (0.27 moved tvm.arith to tvm.sym)
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _fe

from graphopt.ir import AttrType, Node

from .registry import CONVERTERS, LoweringError
from .symbolic import Sym


#: elements per tensor: TVM folds shapes and flat indices into int32 literals in places
#: (RewriteDataflowReshape rejected a 2**42-element Tile), and a schedule's loops over a dim of
#: 2**40 ran for minutes before building anything
MAX_ELEMENTS = 2**31 - 1


def frontend_ops() -> set[str]:
    return set(_fe._get_convert_map())


def supported_ops() -> set[str]:
    return frontend_ops() | set(CONVERTERS)


def check_schema(node: Node, opset: int) -> None:
    """Refuse a node of the standard domain that its ONNX schema rejects (input or output count,
    an attribute of the wrong kind, a required one missing): TVM's frontend would fail on it with
    an internal error, or silently ignore the extra inputs. An op the schema registry does not
    know at this opset is left to the converters."""
    if node.domain not in ("", "ai.onnx"):
        return
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return
    n_in, n_out = len(node.inputs), len(node.outputs)
    if not schema.min_input <= n_in <= schema.max_input:
        raise LoweringError(f"node {node.label()}: {node.op_type} takes {_arity(schema.min_input, schema.max_input)} inputs, "
                            f"this one has {n_in}")
    if not schema.min_output <= n_out <= schema.max_output:
        raise LoweringError(f"node {node.label()}: {node.op_type} has {_arity(schema.min_output, schema.max_output)} outputs, "
                            f"this one has {n_out}")
    for name, a in node.attributes.items():
        spec = schema.attributes.get(name)
        if spec is None or a.ref_attr_name is not None:
            continue  # unknown attributes: the converters ignore them (as onnxruntime does)
        want = int(spec.type)
        if int(a.type) != want and not (want == AttrType.FLOAT and a.type == AttrType.INT):
            raise LoweringError(f"node {node.label()}: attribute {name!r} is of kind {AttrType(a.type).name}, "
                                f"{node.op_type} takes {AttrType(want).name}")
    for name, spec in schema.attributes.items():
        if spec.required and name not in node.attributes:
            raise LoweringError(f"node {node.label()}: {node.op_type} needs attribute {name!r}")


def _arity(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo} or more" if hi > 1000 else f"{lo} to {hi}"


#: ops whose TVM kernels divide by the element count of a window or axis (or build no shape
#: for an empty one): fed an empty tensor, legalization fails with "Divide by zero"
EMPTY_REFUSED = {"ReduceMean", "AveragePool", "GlobalAveragePool", "LpPool", "GlobalLpPool",
                 "Conv", "ConvTranspose", "ConvInteger", "InstanceNormalization", "LayerNormalization",
                 "GroupNormalization", "MeanVarianceNormalization", "BatchNormalization", "RMSNormalization",
                 "MaxPool", "GlobalMaxPool", "LRN", "Resize", "Upsample"}


def check_size(what: str, dims: list[Any], dtype: str) -> None:
    """Refuse a tensor (`what` names it) of static shape `dims` with a negative dim or more than
    MAX_ELEMENTS elements; symbolic dims are the run time's business."""
    static = [d for d in dims if isinstance(d, (int, np.integer))]
    shown = "[" + ", ".join(str(d) for d in dims) + "]"
    for i, d in enumerate(dims):
        if isinstance(d, (int, np.integer)) and d < 0:
            raise LoweringError(f"{what} has shape {shown}: dim {i} is {d}")
        if isinstance(d, (int, np.integer)) and d > MAX_ELEMENTS:
            raise LoweringError(f"{what} has shape {shown}: dim {i} is {d}, above the cpu target's limit of "
                                f"{MAX_ELEMENTS} (2**31 - 1) elements per tensor")
    total = int(np.prod(static, dtype=object)) if static else 1
    if total > MAX_ELEMENTS:
        raise LoweringError(f"{what} has shape {shown}: {total} elements, above the cpu target's limit of "
                            f"{MAX_ELEMENTS} (2**31 - 1) per tensor")


def check_outputs(node: Node, outs: list[Any]) -> None:
    """check_size on what `node` computes (constants and shape arithmetic are not kernels)."""
    for v, e in zip(node.outputs, outs):
        if isinstance(e, (Sym, tvm.ir.GenericConst)) or not isinstance(e, relax.Expr):
            continue
        ty = e.ty
        if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
            check_size(f"node {node.label()}: output {v.name!r}", _static_dims(ty.shape), str(ty.dtype))


def check_not_empty(node: Node, inputs: list[Any]) -> None:
    """Refuse an empty tensor fed to an op of EMPTY_REFUSED (naming the node and the input)."""
    if node.op_type not in EMPTY_REFUSED or node.domain not in ("", "ai.onnx"):
        return
    for v, e in zip(node.inputs, inputs):
        ty = getattr(e, "ty", None) if isinstance(e, relax.Expr) else None
        if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr) and str(ty.dtype).startswith(("float", "bfloat")):
            dims = _static_dims(ty.shape)  # (data, not axes or sizes: an empty axes list is fine)
            if any(isinstance(d, int) and d == 0 for d in dims):
                raise LoweringError(f"node {node.label()}: input {v.name!r} is empty (shape [{', '.join(str(d) for d in dims)}]); "
                                    f"the cpu target does not compile {node.op_type} of an empty tensor")


def _static_dims(shape: relax.ShapeExpr) -> list[Any]:
    return [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in shape.values]


def check_body_arity(n: Node, n_in: int) -> None:
    """Refuse If/Loop/Scan whose bodies do not take and give what the node passes and expects
    (ONNX: If's branches give the node's outputs; Loop's body takes (i, cond, v...) and gives
    (cond, v..., scans...); Scan's takes (states..., scan items...) and gives (states..., scans...))."""
    bodies = [(k, g) for k, g in ((k, n.attr(k)) for k in ("then_branch", "else_branch", "body")) if g is not None]
    n_out = len(n.outputs)
    for key, g in bodies:
        gi, go = len(g.inputs), len(g.outputs)
        if n.op_type == "If":
            want_in, ok_out, said = 0, go == n_out, f"{n_out}"
        elif n.op_type == "Loop":
            carried = max(n_in - 2, 0)
            want_in, ok_out, said = 2 + carried, go == 1 + n_out and n_out >= carried, f"{1 + n_out} (cond, {carried} carried, the scans)"
        else:
            want_in, ok_out, said = n_in, go == n_out, f"{n_out}"
        if gi != want_in:
            raise LoweringError(f"node {n.label()}: {n.op_type}'s {key} takes {gi} inputs, the node passes {want_in}")
        if not ok_out:
            raise LoweringError(f"node {n.label()}: {n.op_type}'s {key} gives {go} outputs, the node needs {said}")

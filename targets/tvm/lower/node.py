"""Converting one ONNX node to Relax (`convert_node`): graphopt's converters first (`CONVERTERS`),
else Relax's ONNX frontend converter; sequence inputs and outputs checked against the node's
schema (`sequence_io`, `split_outputs`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import onnx
import tvm
import tvm.sym  # the Analyzer (0.27 moved tvm.arith to tvm.sym)
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _fe

from graphopt.ir import AttrType, Node

from .registry import CONVERTERS, LoweringError


def onnx_attrs(node: Node) -> dict[str, Any]:
    """The attribute dict Relax's ONNX frontend passes its converters (ONNXGraphImporter._parse_attr)."""
    out: dict[str, Any] = {}
    for a in node.attributes.values():
        v = a.value
        t = a.type
        if t == AttrType.INT or t == AttrType.FLOAT:
            out[a.name] = v
        elif t == AttrType.STRING:
            out[a.name] = v.encode() if isinstance(v, str) else v
        elif t in (AttrType.INTS, AttrType.FLOATS):
            if list(v):
                out[a.name] = tuple(v)
        elif t == AttrType.STRINGS:
            if list(v):
                out[a.name] = tuple(s.encode() if isinstance(s, str) else s for s in v)
        elif t == AttrType.TENSOR:
            out[a.name] = onnx.numpy_helper.from_array(np.asarray(v.numpy()))
        else:
            raise LoweringError(f"node {node.label()}: attribute {a.name!r} of kind {AttrType(t).name} is not supported by the cpu target")
    return out

#: what a formal input or output of a schema holds
SEQ, TENSOR, EITHER = "sequence", "tensor", "either"


def sequence_io(node: Node, opset: int) -> tuple[list[str], list[str]]:
    """SEQ / TENSOR / EITHER for each input and output of `node`, from its ONNX schema (all
    EITHER when the schema is unknown); a variadic last parameter covers the rest."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "") if node.domain in ("", "ai.onnx") else None
    except onnx.defs.SchemaError:
        schema = None
    if schema is None:
        return [EITHER] * len(node.inputs), [EITHER] * len(node.outputs)
    allowed = {t.type_param_str: list(t.allowed_type_strs) for t in schema.type_constraints}

    def kinds(formals: Any, n: int) -> list[str]:
        out = []
        for f in formals:
            types = allowed.get(f.type_str, [f.type_str])
            seq = [t.startswith("seq(") for t in types]
            out.append(SEQ if all(seq) else EITHER if any(seq) else TENSOR)
        return (out + [out[-1] if out else EITHER] * n)[:n]

    return kinds(schema.inputs, len(node.inputs)), kinds(schema.outputs, len(node.outputs))


def sequence_inputs(bb: relax.BlockBuilder, node: Node, inputs: list[Any], kinds: list[str]) -> list[Any]:
    """Sequence inputs as explicit relax.Tuples, everything else checked against the schema.

    Why: the frontend's sequence converters iterate their input, and iterating a Relax Var
    (`Expr.__getitem__` builds a TupleGetItem for any index and never stops) loops forever,
    growing memory: a ConcatFromSequence fed a tensor did that."""
    out = []
    for i, (e, kind) in enumerate(zip(inputs, kinds)):
        ty = getattr(e, "ty", None) if isinstance(e, relax.Expr) else None
        is_seq = isinstance(ty, relax.TupleType)
        if e is None or not is_seq and kind != SEQ:
            out.append(e)
        elif kind == SEQ and not is_seq:
            raise LoweringError(f"node {node.label()}: input {i} of {node.op_type} must be a sequence, it is a "
                                f"{type(ty).__name__ if ty is not None else type(e).__name__}")
        elif kind == TENSOR and is_seq:
            raise LoweringError(f"node {node.label()}: input {i} of {node.op_type} must be a tensor, it is a sequence")
        elif isinstance(e, relax.Tuple):
            out.append(e)
        else:  # a Var (or call) of tuple type: its fields, finitely many
            out.append(relax.Tuple([bb.emit(relax.TupleGetItem(e, j)) for j in range(len(ty.fields))]))
    return out + list(inputs[len(out):])


def convert_node(bb: relax.BlockBuilder, node: Node, inputs: list[Any], opset: int) -> Any:
    """Relax expression (or tuple of them) for one node."""
    if node.domain not in ("", "ai.onnx"):
        raise LoweringError(f"node {node.label()}: domain {node.domain!r} is not supported by the cpu target")
    if node.subgraphs():
        raise LoweringError(f"node {node.label()}: {node.op_type} with subgraphs is not supported by the cpu target")
    inputs = sequence_inputs(bb, node, inputs, sequence_io(node, opset)[0])
    own = CONVERTERS.get(node.op_type)
    if own is not None:
        out = own(bb, node, inputs, opset)
        if out is not NotImplemented:
            return out
    conv = _fe._get_convert_map().get(node.op_type)
    if conv is None:
        raise LoweringError(f"node {node.label()}: operator {node.op_type} is not supported by the cpu target")
    attrs = onnx_attrs(node)
    attrs["tvm_custom"] = {"name": node.name, "num_outputs": len(node.outputs)}
    fn = conv.get_converter(opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(bb, _fe.onnx_input(inputs), attrs, [{}, {}])
    if isinstance(out, relax.Call) and isinstance(out.op, tvm.ir.Op) and out.op.name == "relax.take":
        # the frontend's take uses mode "fast", which reads out of bounds (or segfaults) on a bad
        # index; "clip" keeps a wrong input from touching memory outside the tensor
        out = relax.op.take(out.args[0], out.args[1], out.attrs.axis, mode="clip")
    if isinstance(out, relax.Expr):
        out = bb.normalize(out)
    return out


def split_outputs(bb: relax.BlockBuilder, node: Node, out: Any, opset: int) -> list[Any]:
    """One relax expression per node output (a sequence output: the whole tuple)."""
    n = len(node.outputs)
    if n == 1 and isinstance(getattr(out, "ty", None), relax.TupleType) and sequence_io(node, opset)[1][0] != TENSOR:
        return [out]
    if isinstance(out, (list, tuple)):
        items = list(out)
    elif isinstance(out, relax.Tuple):
        items = list(out.fields)
    elif isinstance(out, relax.Expr) and isinstance(out.ty, relax.TupleType) and (n > 1 or node.op_type == "Dropout"):
        # (Dropout's converter gives (output, mask) even when the node has only the output)
        items = [bb.emit(relax.TupleGetItem(out, i)) for i in range(len(out.ty.fields))]
    else:
        items = [out]
    if len(items) < n:
        raise LoweringError(f"node {node.label()}: converter gave {len(items)} outputs, the node has {n}")
    return items[:n]

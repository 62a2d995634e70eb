"""Which ops the installed onnxruntime's CPU execution provider runs natively in fp16 / bf16.

Found by asking the runtime, not from a table: a one-node model with the node's attributes and
the converted input types is loaded, and the optimized graph onnxruntime saves is read back.
Three answers:

- native: the node is there alone -- a real fp16/bf16 kernel runs it;
- cast: onnxruntime's InsertCastTransformer wrapped it in Casts to float (no kernel of that type:
  the model loads, but the op computes in fp32 with two extra copies). On x86-64 this is what
  onnxruntime 1.32 does for almost every fp16 compute op (Conv, MatMul, Gemm, Add, Relu...);
- none: the session refuses the model (no kernel and no fallback: bf16 Conv/MatMul/Add...).
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Sequence

from graphopt.ir import DataType, Node

NATIVE, CAST, NONE = "native", "cast", "none"


def node_signature(node: Node, in_types: Sequence[DataType | None], opset: int) -> tuple[object, ...]:
    """The key of an onnxruntime kernel lookup: kernels are registered per op, opset and input
    types, never per attribute value."""
    return (node.domain, node.op_type, opset, tuple(in_types), len(node.outputs))


def onnxruntime_kernel(node: Node, in_types: Sequence[DataType | None], ranks: Sequence[int | None], opset: int) -> tuple[str, str]:
    """(NATIVE | CAST | NONE, detail) for `node` run with inputs of `in_types` (None: omitted) on
    onnxruntime's CPU EP under `opset`; cached per signature."""
    key = node_signature(node, in_types, opset)
    hit = _CACHE.get(key)
    if hit is None:
        hit = _probe(node, list(in_types), list(ranks), opset)
        _CACHE[key] = hit
    return hit


_CACHE: dict[tuple[object, ...], tuple[str, str]] = {}


def _probe(node: Node, in_types: list[DataType | None], ranks: list[int | None], opset: int) -> tuple[str, str]:
    import onnx

    from graphopt.check import onnxruntime_session
    from graphopt.ir import Graph, Model, Value
    from graphopt.ir.types import Shape, TensorType
    from graphopt.onnx_io import to_onnx

    # the node rebuilt in a graph of its own: fresh inputs of the converted types and the real
    # ranks (symbolic dims), its attributes, outputs untyped (onnxruntime infers them)
    inputs: list[Value | None] = []
    graph_inputs: list[Value] = []
    for i, (dt, rank) in enumerate(zip(in_types, ranks)):
        if dt is None:
            inputs.append(None)
            continue
        shape = None if rank is None else Shape(tuple(f"d{i}_{k}" for k in range(rank)))
        v = Value(f"x{i}", TensorType(dt, shape))
        inputs.append(v)
        graph_inputs.append(v)
    probe = Node(node.domain, node.op_type, inputs, list(node.attributes.values()), num_outputs=len(node.outputs))
    for j, o in enumerate(probe.outputs):
        o.name = f"y{j}"
    g = Graph(graph_inputs, list(probe.outputs), [probe], name="probe")
    m = Model(g, opset_imports={"": opset} if not node.domain else {"": opset, node.domain: 1}, ir_version=8)
    proto = to_onnx(m)
    fd, path = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        try:
            onnxruntime_session(proto, optimize=False, log_severity=4, optimized_model_path=path)
        except Exception as e:  # noqa: BLE001 - any refusal means: not runnable this way
            return NONE, str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        ops = [n.op_type for n in onnx.load(path).graph.node]
    finally:
        os.remove(path)
    # constant folding is off, so a lone node is the original kernel; anything else is a Cast
    # wrap (or a function expansion, e.g. Softmax into Exp/ReduceSum in float)
    if ops == [node.op_type]:
        return NATIVE, ""
    return CAST, "onnxruntime runs it as " + "/".join(dict.fromkeys(ops))


def probe_compute_ops(dtype: DataType, opset: int = 17) -> dict[str, str]:
    """The answer for a few core compute ops (Conv, MatMul, Gemm, Add, Relu) in `dtype`: used
    to say in one line why a whole precision is pointless on this runtime."""
    return dict(_probe_core(dtype, opset))


@functools.lru_cache(maxsize=None)
def _probe_core(dtype: DataType, opset: int) -> tuple[tuple[str, str], ...]:
    out = []
    for op, n, rank in (("Conv", 2, 4), ("MatMul", 2, 2), ("Gemm", 2, 2), ("Add", 2, 2), ("Relu", 1, 2)):
        node = Node("", op, [None] * n)
        out.append((op, onnxruntime_kernel(node, [dtype] * n, [rank] * n, opset)[0]))
    return tuple(out)

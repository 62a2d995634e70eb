"""Small ONNX models written by hand in a test: the builders many test files had each copied.

    from onnx_builders import model, tensor, vi
    m = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", None)])

`onnx_model` gives the ModelProto (for onnxruntime or a target), `model` the graphopt.Model;
`infer=True` runs onnx's shape inference (graph outputs get shapes: onnx.checker's full check
and graphopt.testing.check_pass want them). For checking a pass, see graphopt.testing.check_pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphopt

F = TensorProto.FLOAT


def onnx_model(nodes: Iterable[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto],
               inits: Iterable[onnx.TensorProto] = (), opset: int = 17, *, ir: int = 8,
               extra_opsets: Iterable[tuple[str, int]] = (), infer: bool = False) -> onnx.ModelProto:
    """One graph "g" at `opset` of the default domain (plus `extra_opsets`, (domain, version))."""
    g = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    proto = helper.make_model(g, opset_imports=opsets, ir_version=ir)
    return onnx.shape_inference.infer_shapes(proto) if infer else proto


def model(nodes: Iterable[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto],
          inits: Iterable[onnx.TensorProto] = (), opset: int = 17, **kw: Any) -> graphopt.Model:
    """`onnx_model(...)` loaded by graphopt."""
    return graphopt.load(onnx_model(nodes, inputs, outputs, inits, opset, **kw))


def vi(name: str, shape: Sequence[int | str | None] | None, dtype: int = F) -> onnx.ValueInfoProto:
    """A tensor value's name and type; shape None: unknown rank."""
    return helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape))


def tensor(name: str, arr: Any, dtype: Any = None) -> onnx.TensorProto:
    """An initializer from anything numpy takes (cast to `dtype` when given)."""
    return numpy_helper.from_array(np.asarray(arr, dtype=dtype), name)


def ort_run(m: onnx.ModelProto | graphopt.Model, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of onnxruntime's CPU provider on `m` (a graphopt.Model is exported first)."""
    import onnxruntime as ort

    proto = graphopt.to_onnx(m) if isinstance(m, graphopt.Model) else m
    return list(ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, dict(feeds)))

"""An ONNX backend (`onnx.backend.base.Backend`) that runs models through graphopt.

`prepare` imports the model into graphopt's IR, optionally runs a pipeline on it (a callable
`Model -> Model`; none by default), exports it back to ONNX and hands the exported model to
onnxruntime. With no pipeline this checks graphopt's import → export round trip: the exported
model must behave exactly like the original. It is what `onnx.backend.test.BackendTest` drives
in tests/onnx_io/test_backend_conformance.py.

    from graphopt.backend import GraphoptBackend
    rep = GraphoptBackend.prepare(model_proto)          # or prepare(model, pipeline=my_passes)
    outputs = rep.run([x])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime.backend as ort_backend
from onnx.backend.base import Backend, BackendRep

import graphopt
from graphopt.ir import Model

#: A pipeline: takes the imported Model and returns the Model to export (may be the same object).
Pipeline = Callable[[Model], Model]


class GraphoptBackendRep(BackendRep):
    """A prepared model: the graphopt Model, the ONNX it exported, and the onnxruntime rep."""

    def __init__(self, model: Model, exported: onnx.ModelProto, ort_rep: BackendRep) -> None:
        self.model = model
        self.exported = exported
        self.ort_rep = ort_rep

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        return self.ort_rep.run(inputs, **kwargs)


class GraphoptBackend(Backend):
    """graphopt.load → (pipeline) → graphopt.to_onnx → onnxruntime."""

    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        # Deliberately cheap and permissive: a model graphopt cannot import must fail the test
        # (prepare raises), not be skipped as "incompatible".
        return cls.supports_device(device)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return bool(ort_backend.supports_device(device))

    @classmethod
    def compile(cls, model: str | os.PathLike[str] | bytes | onnx.ModelProto, *, pipeline: Pipeline | None = None) -> tuple[Model, onnx.ModelProto]:
        """The graphopt half of `prepare`: import, run the pipeline, export."""
        m = graphopt.load(model)
        if pipeline is not None:
            out = pipeline(m)
            if not isinstance(out, Model):
                raise TypeError(f"pipeline must return a graphopt Model, not {type(out).__name__}")
            m = out
        return m, graphopt.to_onnx(m)

    @classmethod
    def prepare(
        cls,
        model: str | os.PathLike[str] | bytes | onnx.ModelProto,
        device: str = "CPU",
        *,
        pipeline: Pipeline | None = None,
        **kwargs: Any,
    ) -> GraphoptBackendRep:
        m, exported = cls.compile(model, pipeline=pipeline)
        # onnxruntime.backend checks the exported model (onnx.checker) before building a session
        ort_rep = ort_backend.prepare(exported, device, **kwargs)
        return GraphoptBackendRep(m, exported, ort_rep)

    @classmethod
    def run_model(
        cls,
        model: str | os.PathLike[str] | bytes | onnx.ModelProto,
        inputs: Any,
        device: str = "CPU",
        **kwargs: Any,
    ) -> tuple[Any, ...]:
        pipeline = kwargs.pop("pipeline", None)
        return cls.prepare(model, device, pipeline=pipeline, **kwargs).run(inputs)

    @classmethod
    def run_node(
        cls,
        node: onnx.NodeProto,
        inputs: Any,
        device: str = "CPU",
        outputs_info: Sequence[tuple[Any, tuple[int, ...]]] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, ...]:
        """Run one node: wrap it in a one-node model typed from `inputs` (and `outputs_info`)."""
        super().run_node(node, inputs, device=device, outputs_info=outputs_info, **kwargs)
        opset = kwargs.pop("opset_version", None) or onnx.defs.onnx_opset_version()
        pipeline = kwargs.pop("pipeline", None)
        if isinstance(inputs, dict):
            feeds = [inputs[n] for n in node.input if n]
        else:
            feeds = list(inputs)
        present = [n for n in node.input if n]
        if len(feeds) != len(present):
            raise ValueError(f"node {node.op_type} has {len(present)} inputs but {len(feeds)} were given")
        graph_inputs = [
            onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(np.asarray(x).dtype), np.shape(x))
            for name, x in zip(present, feeds)
        ]
        graph_outputs = []
        for i, name in enumerate(node.output):
            if not name:
                continue
            if outputs_info is not None and i < len(outputs_info):
                dtype, shape = outputs_info[i]
                elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
                graph_outputs.append(onnx.helper.make_tensor_value_info(name, elem, shape))
            else:
                graph_outputs.append(onnx.helper.make_empty_tensor_value_info(name))
        graph = onnx.helper.make_graph([node], f"run_node_{node.op_type}", graph_inputs, graph_outputs)
        domain = node.domain if node.domain not in ("", "ai.onnx") else ""
        opsets = [onnx.helper.make_opsetid("", opset)]
        if domain:
            opsets.append(onnx.helper.make_opsetid(domain, 1))
        model = onnx.helper.make_model(graph, opset_imports=opsets)
        model = onnx.shape_inference.infer_shapes(model)
        return cls.prepare(model, device, pipeline=pipeline, **kwargs).run([np.asarray(x) for x in feeds])


prepare = GraphoptBackend.prepare
run_model = GraphoptBackend.run_model
run_node = GraphoptBackend.run_node
supports_device = GraphoptBackend.supports_device
is_compatible = GraphoptBackend.is_compatible

"""An ONNX backend (`onnx.backend.base.Backend`) that runs models compiled by the cpu target.

`prepare` runs graphopt.compile(model, target="cpu", pipeline=...) (the whole compiled path:
passes, plan-kernels, lowering to Relax, FuseTIR, default schedules, LLVM, export of the shared
library, hash-checked load) and the rep runs the artifact. tools/tvm_conformance.py drives it
over the ONNX backend test suite.

    from graphopt.targets.tvm.backend import CpuBackend
    rep = CpuBackend.prepare(model_proto)
    outputs = rep.run([x])
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

import graphopt

PIPELINE = os.environ.get("GRAPHOPT_CPU_BACKEND_PIPELINE", "-O2")
#: "1": compile at the first run with the small integer inputs (axes, shapes, pads, k... that the
#: node tests feed as inputs) and the float/bool inputs that decide shapes or control flow
#: (Resize roi/scales, OneHot depth, If/Loop conditions, Dropout ratio/training_mode,
#: NonMaxSuppression thresholds) bound as constants, like a JIT specialising on them
#: (recompiled when they change; the artifact's manifest lists them under "specialized")
SPECIALIZE = os.environ.get("GRAPHOPT_CPU_BACKEND_SPECIALIZE", "0") == "1"
SPECIALIZE_MAX_ELEMS = 64


#: op → input positions holding non-integer data that decides output shapes or control flow
_SHAPE_FLOAT_INPUTS = {"Resize": (1, 2), "Upsample": (1,), "OneHot": (1,), "If": (0,), "Loop": (1,), "Dropout": (1, 2),
                       "NonMaxSuppression": (3, 4)}


def _shape_deciding_floats(proto: onnx.ModelProto) -> set[str]:
    return {name for n in proto.graph.node for i, name in enumerate(n.input)
            if name and i in _SHAPE_FLOAT_INPUTS.get(n.op_type, ())}


class CpuBackendRep(BackendRep):
    def __init__(self, artifact: graphopt.Artifact | None, input_names: list[str], *, proto: onnx.ModelProto | None = None,
                 pipeline: str = PIPELINE) -> None:
        self.artifact = artifact
        self.runner = artifact.runner() if artifact is not None else None
        self.input_names = input_names
        self.proto = proto  # kept when compiling waits for the first run (specialisation)
        self.pipeline = pipeline
        self._bound: dict[str, bytes] = {}
        # float inputs that decide output shapes too (Resize/Upsample roi and scales, OneHot depth)
        self._shape_floats = _shape_deciding_floats(proto) if proto is not None else set()

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        if isinstance(inputs, dict):
            feeds = {k: np.asarray(v) for k, v in inputs.items()}
        else:
            arrays = [np.asarray(x) for x in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
            feeds = dict(zip(self.input_names, arrays))
        if self.proto is not None:
            bind = {k: v for k, v in feeds.items() if v.size <= SPECIALIZE_MAX_ELEMS
                    and (v.dtype.kind in "iu" or (v.dtype.kind in "fb" and k in self._shape_floats))}
            key = {k: v.tobytes() + str(v.shape).encode() for k, v in bind.items()}
            if self.runner is None or key != self._bound:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.artifact = graphopt.compile(self.proto, "cpu", self.pipeline, threads=1, bind=bind)
                self.runner = self.artifact.runner()
                self._bound = key
        assert self.runner is not None
        wanted = set(self.runner.input_names)
        feeds = {k: v for k, v in feeds.items() if k in wanted}
        return tuple(self.runner.run(feeds))


class CpuBackend(Backend):
    """graphopt.compile(model, "cpu", -O2) → graphopt.runtime."""

    pipeline: str = PIPELINE

    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        return cls.supports_device(device)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"

    @classmethod
    def prepare(cls, model: Any, device: str = "CPU", **kwargs: Any) -> CpuBackendRep:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(model)
        inits = {i.name for i in proto.graph.initializer}
        names = [i.name for i in proto.graph.input if i.name not in inits]
        pipeline = kwargs.get("pipeline", cls.pipeline)
        if kwargs.get("specialize", SPECIALIZE):
            return CpuBackendRep(None, names, proto=proto, pipeline=pipeline)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            art = graphopt.compile(proto, "cpu", pipeline, threads=1)
        return CpuBackendRep(art, names)

    @classmethod
    def run_model(cls, model: Any, inputs: Any, device: str = "CPU", **kwargs: Any) -> tuple[Any, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = "CPU", outputs_info: Any = None, **kwargs: Any) -> tuple[Any, ...]:
        from graphopt.backend import GraphoptBackend

        # build the one-node model the same way GraphoptBackend does, then compile it
        captured: dict[str, Any] = {}

        class _Capture(GraphoptBackend):
            @classmethod
            def prepare(cls_inner, model: Any, device: str = "CPU", **kw: Any) -> Any:  # noqa: N805
                captured["model"] = model
                return cls.prepare(model, device)

        return _Capture.run_node(node, inputs, device, outputs_info=outputs_info, **kwargs)


class SpecializingCpuBackend(CpuBackend):
    """CpuBackend that compiles at the first run with the small shape-deciding inputs bound (the
    GRAPHOPT_CPU_BACKEND_SPECIALIZE=1 behaviour as a class, for a test suite of its own)."""

    @classmethod
    def prepare(cls, model: Any, device: str = "CPU", **kwargs: Any) -> CpuBackendRep:
        kwargs.setdefault("specialize", True)
        return super().prepare(model, device, **kwargs)

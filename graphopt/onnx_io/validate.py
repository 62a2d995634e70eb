"""The front door's checks of an input model, before any pass sees it.

onnx's checker (with strict shape inference) judges the model as the user gave it, so graphopt
refuses what onnx and onnxruntime refuse instead of compiling it into something worse; sparse
initializers are made dense, as onnxruntime does when it loads a model, so that every pass sees
plain tensors.
"""

from __future__ import annotations

import math
import os

import numpy as np
import onnx

from graphopt.errors import ModelLoadError
from graphopt.ir.core import Model
from graphopt.ir.tensor import NumpyTensor, ProtoTensor, SparseTensor
from graphopt.ir.types import Shape, TensorType

#: a sparse initializer is made dense only up to this size (onnxruntime would make it dense too)
MAX_DENSE_BYTES = 2**31


class ModelCheckError(ModelLoadError):
    """onnx's checker rejects the model."""


def check_onnx(proto: onnx.ModelProto, path: str | None = None) -> None:
    """Run onnx's checker with full_check (strict shape inference) on the model as read.

    A model with external data is checked through its file (the checker reads the data files
    beside it); sparse initializers are checked as the dense tensors onnxruntime makes of them.
    Raises ModelCheckError with the checker's message on one line.
    """
    external = _has_external_data(proto)
    if external and path is None:
        raise ModelLoadError("checking a model with external data needs the model's path (load it from its file)")
    probe: onnx.ModelProto | str
    if proto.graph.sparse_initializer:
        probe = _densified(proto)
    elif path is not None:
        probe = os.fspath(path)  # the C++ side reads it: no second serialization of a big model here
    else:
        probe = proto
    try:
        onnx.checker.check_model(probe, full_check=True)
    except Exception as e:  # ValidationError, InferenceError, and whatever else the C++ side throws
        where = f"{path}: " if path else ""
        raise ModelCheckError(f"{where}onnx's checker rejects the model: {one_line(str(e)) or type(e).__name__}") from None
    _check_opset_versions(proto, path)
    where = f"{path}: " if path else ""
    for t in _initializers(proto.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            _check_raw_size(t, where)


#: bits per element of the sub-byte types (raw_data packs them); the others: numpy's itemsize
_PACKED_BITS = {21: 4, 22: 4, 23: 4, 25: 2, 26: 2, 27: 6, 28: 6}


def _check_raw_size(tp: onnx.TensorProto, where: str) -> None:
    """raw_data must hold exactly what the shape and type need: onnx's checker does not look at
    longer data, onnxruntime refuses the model, and graphopt would write the same bytes back."""
    if not tp.HasField("raw_data") or tp.data_type == onnx.TensorProto.STRING:
        return
    n = 1
    for d in tp.dims:
        n *= int(d)
    bits = _PACKED_BITS.get(tp.data_type)
    if bits is None:
        try:
            bits = 8 * onnx.helper.tensor_dtype_to_np_dtype(tp.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            return
    want = (n * bits + 7) // 8
    if len(tp.raw_data) != want:
        raise ModelCheckError(f"{where}tensor {tp.name!r}: raw_data holds {len(tp.raw_data)} bytes, its shape {list(tp.dims)} "
                             f"and type need {want}")


def _check_opset_versions(proto: onnx.ModelProto, path: str | None) -> None:
    """An opset newer than any onnx knows (opset 99) passes the checker, whose schemas simply
    stop at the newest they have, but onnxruntime refuses it: refuse it here too."""
    known = onnx.defs.C.schema_version_map()
    for op in proto.opset_import:
        domain = "" if op.domain == "ai.onnx" else op.domain
        if domain in known and not known[domain][0] <= op.version <= known[domain][1]:
            where = f"{path}: " if path else ""
            first, last = known[domain]
            raise ModelCheckError(
                f"{where}opset {op.version} of domain {op.domain or 'ai.onnx'!r} does not exist "
                f"(onnx {onnx.__version__} knows {first}..{last})"
            )


def one_line(text: str) -> str:
    """The checker's multi-line message folded onto one line."""
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


def _has_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _initializers(proto.graph))


def _initializers(g: onnx.GraphProto) -> list[onnx.TensorProto]:
    found = list(g.initializer)
    for n in g.node:
        for a in n.attribute:
            if a.HasField("t"):
                found.append(a.t)
            found.extend(a.tensors)
            subgraphs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            for sg in subgraphs:
                found.extend(_initializers(sg))
    return found


def _densified(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` whose main graph's sparse initializers are dense initializers."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for sp in copy.graph.sparse_initializer:
        dense = _dense(SparseTensor(ProtoTensor(sp.values), ProtoTensor(sp.indices), tuple(sp.dims)))
        copy.graph.initializer.append(onnx.numpy_helper.from_array(dense, sp.values.name))
    del copy.graph.sparse_initializer[:]
    return copy


def _dense(t: SparseTensor) -> np.ndarray:
    size = math.prod(t.dims) * t.dtype.numpy().itemsize
    if size > MAX_DENSE_BYTES:
        raise ModelLoadError(
            f"sparse initializer {t.name!r} of shape {list(t.dims)} is {size} bytes dense, over the limit of "
            f"{MAX_DENSE_BYTES} bytes"
        )
    try:
        return t.numpy()
    except (IndexError, ValueError) as e:
        raise ModelLoadError(f"sparse initializer {t.name!r}: its indices do not fit its shape: {e}") from None


def densify_sparse_initializers(model: Model) -> int:
    """Replace every sparse initializer (in every graph) by a dense tensor of the same values,
    as onnxruntime does on load; returns how many there were."""
    count = 0
    for g in model.graphs():
        for v in g.initializers.values():
            t = v.const_value
            if isinstance(t, SparseTensor):
                v.const_value = NumpyTensor(_dense(t), t.name)
                v.type = TensorType(t.dtype, Shape(t.dims))
                count += 1
    return count

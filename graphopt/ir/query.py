"""Queries a pass author asks of values and graphs: is this a constant and what is its value,
what is its static shape / dims / element type, which opset governs this graph, is this graph a
function body, and a hashable key for an attribute's value.

    with constant_semantics(model):          # IR < 4: initializers listed as inputs are constants
        if is_constant(v):
            arr = const_array(v)
    opset = opset_version(model, node.graph)  # the function body's import first, then the model's

The one home of these rules: the pattern matcher (`P.const()`, `Match.const`), the cleanup,
sharing and fusion passes all answer "is it a constant" and "which opset" here.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import overload

import numpy as np

from graphopt.ir.core import Attr, AttrType, Function, Graph, Model, Node, Value
from graphopt.ir.tensor import SparseTensor
from graphopt.ir.types import DataType

__all__ = [
    "NONDETERMINISTIC_OPS", "STANDARD_DOMAINS", "attr_key", "const_array", "const_ints", "const_numel",
    "constant_semantics", "dims_of", "dtype_of", "enclosing_function", "in_function", "is_constant",
    "opset_version", "slice_params", "static_shape",
]

#: Domains whose ops are pure functions of their inputs that onnx's reference evaluator knows.
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})

#: Ops whose result is not a function of their inputs: never folded, never merged.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


# --- where a graph lives ----------------------------------------------------------------------
def enclosing_function(graph: Graph) -> Function | None:
    """The model-local function whose body `graph` is (or is nested in), else None."""
    parent = graph.root().parent
    return parent if isinstance(parent, Function) else None


def in_function(graph: Graph) -> bool:
    """True when `graph` is (inside) a function body, where initializers cannot live."""
    return enclosing_function(graph) is not None


@overload
def opset_version(model: Model | None, graph: Graph | None = ..., domain: str = ..., *, default: int) -> int: ...
@overload
def opset_version(model: Model | None, graph: Graph | None = ..., domain: str = ..., *, default: None = ...) -> int | None: ...
def opset_version(model: Model | None, graph: Graph | None = None, domain: str = "", *, default: int | None = None) -> int | None:
    """The opset version of `domain` ("" and "ai.onnx" are the same domain) that governs the nodes
    of `graph`: the enclosing function body's import when it has one, else the model's; `default`
    when neither imports the domain (or no model is known, e.g. a rule explained on a bare graph).
    """
    names = ("", "ai.onnx") if domain in ("", "ai.onnx") else (domain,)
    fn = enclosing_function(graph) if graph is not None else None
    for imports in (fn.opset_imports if fn is not None else None, model.opset_imports if model is not None else None):
        if imports:
            for d in names:
                v = imports.get(d)
                if v is not None:
                    return v
    return default


# --- constants --------------------------------------------------------------------------------
# Before IR version 4 every initializer had to be listed as a graph input too, and runtimes
# (onnxruntime included) treat such inputs as constants; from IR 4 on an initializer that is
# also an input is a default the caller may override, so it is not a constant. Outside a
# `constant_semantics` block the strict (IR >= 4) reading holds.
_INPUTS_OVERRIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("graphopt_inputs_override", default=True)


@contextlib.contextmanager
def constant_semantics(model: Model) -> Iterator[None]:
    """Within this block, is_constant / const_array follow `model`'s IR version (see above). The
    pattern driver and `explain` enter it for the model they work on."""
    token = _INPUTS_OVERRIDE.set(model.ir_version >= 4)
    try:
        yield
    finally:
        _INPUTS_OVERRIDE.reset(token)


def _fixed(v: Value) -> bool:
    return not v.is_graph_input() or not _INPUTS_OVERRIDE.get()


def _constant_node_array(node: Node) -> np.ndarray | None:
    """The value of a Constant node, or None when it is not a plain dense constant (a sparse
    value, or a function-body reference to a caller's attribute)."""
    for name, a in node.attributes.items():
        if a.ref_attr_name is not None or a.value is None:
            return None
        if name == "value":
            return None if isinstance(a.value, SparseTensor) else np.asarray(a.value.numpy())
        if name in ("value_float", "value_floats"):
            return np.array(a.value, dtype=np.float32)
        if name in ("value_int", "value_ints"):
            return np.array(a.value, dtype=np.int64)
        if name in ("value_string", "value_strings"):
            return np.array(a.value, dtype=object)
    return None


def _constant_node(v: Value) -> Node | None:
    p = v.producer()
    return p if p is not None and p.op_type == "Constant" and p.domain in STANDARD_DOMAINS else None


def is_constant(v: Value | None) -> bool:
    """An initializer that no caller can override, or the output of a dense Constant node."""
    if v is None:
        return False
    if v.const_value is not None and _fixed(v):
        return not isinstance(v.const_value, SparseTensor)
    p = _constant_node(v)
    return p is not None and _constant_node_array(p) is not None


def const_array(v: Value | None) -> np.ndarray | None:
    """The value of a constant (see is_constant) as a numpy array, else None."""
    if v is None:
        return None
    if v.const_value is not None and _fixed(v):
        if isinstance(v.const_value, SparseTensor):
            return None
        return v.const_value.numpy()
    p = _constant_node(v)
    return None if p is None else _constant_node_array(p)


def const_numel(v: Value) -> int | None:
    """Element count of a constant without decoding its data when possible."""
    if v.const_value is not None and _fixed(v):
        return math.prod(v.const_value.shape)
    a = const_array(v)
    return None if a is None else int(a.size)


def const_ints(v: Value | None, limit: int = 4096) -> list[int] | None:
    """A small integer constant (at most `limit` elements) as a list of Python ints (scalars give
    a 1-item list), else None."""
    if v is None or not is_constant(v):
        return None
    if (n := const_numel(v)) is None or n > limit:
        return None
    a = const_array(v)
    if a is None or a.dtype.kind not in "iu":
        return None
    return [int(x) for x in a.reshape(-1)]


def slice_params(n: Node, opset: int) -> tuple[list[int], list[int], list[int] | None, list[int] | None] | None:
    """A Slice's constant (starts, ends, axes, steps): attributes before opset 10, inputs from
    it; axes/steps None where the node leaves them out. None when a bound, or an axes/steps
    input that is given, is not a constant."""
    if opset < 10:
        starts, ends, axes = n.attr("starts"), n.attr("ends"), n.attr("axes")
        if starts is None or ends is None:
            return None
        return list(starts), list(ends), None if axes is None else list(axes), None
    ins = list(n.inputs) + [None] * (5 - len(n.inputs))
    starts, ends = const_ints(ins[1]), const_ints(ins[2])
    axes = const_ints(ins[3]) if ins[3] is not None else None
    steps = const_ints(ins[4]) if ins[4] is not None else None
    if (ins[3] is not None and axes is None) or (ins[4] is not None and steps is None):
        return None
    if starts is None or ends is None:
        return None
    return starts, ends, axes, steps


# --- shapes and types -------------------------------------------------------------------------
def static_shape(v: Value | None) -> tuple[int, ...] | None:
    """The shape when every dim is known: a constant's own, else the value's static type shape."""
    if v is None:
        return None
    if is_constant(v):
        if v.const_value is not None:
            return tuple(v.const_value.shape)
        a = const_array(v)
        return None if a is None else tuple(a.shape)
    s = v.shape
    if s is None or not s.is_static():
        return None
    return tuple(int(d) for d in s.dims)  # type: ignore[arg-type]


def dims_of(v: Value | None) -> tuple[int | str | None, ...] | None:
    """Dims (int, symbol or None) when the rank is known."""
    if v is None:
        return None
    st = static_shape(v)
    if st is not None:
        return st
    s = v.shape
    return None if s is None else tuple(s.dims)


def dtype_of(v: Value | None) -> DataType | None:
    """The element type: a constant's own, else the value's type."""
    if v is None:
        return None
    if is_constant(v):
        if v.const_value is not None:
            return v.const_value.dtype
        a = const_array(v)
        return None if a is None or a.dtype.kind not in "biuf" else DataType.from_numpy(a.dtype)
    return v.dtype


# --- attributes -------------------------------------------------------------------------------
def attr_key(a: Attr) -> object:
    """A hashable key equal for equal attribute values (tensors by content)."""
    if a.ref_attr_name is not None:
        return ("ref", a.ref_attr_name)
    v = a.value
    if a.type == AttrType.TENSOR and v.dtype != DataType.STRING and v.size <= 64:
        return (int(a.type), int(v.dtype), tuple(v.shape), v.numpy().tobytes())  # cheaper than hashing
    if a.type in (AttrType.TENSOR, AttrType.SPARSE_TENSOR):
        return (int(a.type), v.content_hash())
    if a.type in (AttrType.TENSORS, AttrType.SPARSE_TENSORS):
        return (int(a.type), tuple(t.content_hash() for t in v))
    if a.type in (AttrType.INTS, AttrType.FLOATS, AttrType.STRINGS):
        return (int(a.type), tuple(v))
    if a.type in (AttrType.GRAPH, AttrType.GRAPHS, AttrType.TYPE_PROTO, AttrType.TYPE_PROTOS):
        return (int(a.type), id(v))  # never equal: subgraph nodes are not merged
    if a.type == AttrType.FLOAT:
        return (int(a.type), float(np.float32(v)).hex())  # NaN-safe, 0.0 != -0.0
    return (int(a.type), v)

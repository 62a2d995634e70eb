"""Helpers shared by the cleanup passes: constants, graph walking, aliasing, type inference.

Everything here uses graphopt's public API only (graphopt, graphopt.ir), like a user's pass.
"""

from __future__ import annotations

import contextlib
import math
import contextvars
from collections.abc import Iterator

import numpy as np

from graphopt.ir import (
    Attr,
    AttrType,
    DataType,
    Function,
    Graph,
    Model,
    Node,
    NumpyTensor,
    Shape,
    SparseTensor,
    TensorType,
    Value,
    unique_name,
)

#: Domains whose ops are pure functions of their inputs that onnx's reference evaluator knows.
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})

#: Ops whose result is not a function of their inputs: never folded, never merged.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


def graphs_preorder(model: Model) -> list[Graph]:
    """Main graph, function bodies and every nested subgraph, parents before children."""
    return list(model.graphs())


def in_function(graph: Graph) -> bool:
    """True when `graph` is (inside) a function body, where initializers cannot live."""
    g = graph
    while True:
        parent = g.parent
        if isinstance(parent, Function):
            return True
        if isinstance(parent, Node) and parent.graph is not None:
            g = parent.graph
            continue
        return False


def opset_of(model: Model, graph: Graph, domain: str = "") -> int:
    """The opset version of `domain` that governs nodes of `graph`."""
    g = graph
    while isinstance(g.parent, Node) and g.parent.graph is not None:
        g = g.parent.graph
    if isinstance(g.parent, Function):
        v = g.parent.opset_imports.get(domain)
        if v is not None:
            return v
    return model.opset_imports.get(domain, model.opset_imports.get("ai.onnx", 1) if domain == "" else 1)


# --- constants --------------------------------------------------------------------------------
# Before IR version 4 every initializer had to be listed as a graph input too, and runtimes
# (onnxruntime included) treat such inputs as constants; from IR 4 on an initializer that is
# also an input is a default the caller may override, so it is not a constant.
_INPUTS_OVERRIDE = contextvars.ContextVar("graphopt_cleanup_inputs_override", default=True)


@contextlib.contextmanager
def constant_semantics(model: Model) -> Iterator[None]:
    """Within this block, is_constant follows `model`'s IR version (see above)."""
    token = _INPUTS_OVERRIDE.set(model.ir_version >= 4)
    try:
        yield
    finally:
        _INPUTS_OVERRIDE.reset(token)


def _fixed(v: Value) -> bool:
    return not v.is_graph_input() or not _INPUTS_OVERRIDE.get()


def _constant_node_array(node: Node) -> np.ndarray | None:
    """The value of a Constant node, or None when it is not a plain dense constant."""
    for name, a in node.attributes.items():
        if a.ref_attr_name is not None:
            return None
        if name == "value":
            return None if isinstance(a.value, SparseTensor) else np.asarray(a.value.numpy())
        if name == "value_float":
            return np.array(a.value, dtype=np.float32)
        if name == "value_floats":
            return np.array(a.value, dtype=np.float32)
        if name == "value_int":
            return np.array(a.value, dtype=np.int64)
        if name == "value_ints":
            return np.array(a.value, dtype=np.int64)
        if name in ("value_string", "value_strings"):
            return np.array(a.value, dtype=object)
    return None


def is_constant(v: Value | None) -> bool:
    """An initializer that no caller can override, or the output of a Constant node."""
    if v is None:
        return False
    if v.const_value is not None and _fixed(v):
        return not isinstance(v.const_value, SparseTensor)
    p = v.producer()
    return p is not None and p.op_type == "Constant" and p.domain in STANDARD_DOMAINS and _constant_node_array(p) is not None


def const_array(v: Value | None) -> np.ndarray | None:
    """The value of a constant (see is_constant) as a numpy array, else None."""
    if v is None:
        return None
    if v.const_value is not None and _fixed(v):
        if isinstance(v.const_value, SparseTensor):
            return None
        return v.const_value.numpy()
    p = v.producer()
    if p is not None and p.op_type == "Constant" and p.domain in STANDARD_DOMAINS:
        return _constant_node_array(p)
    return None


def const_numel(v: Value) -> int | None:
    """Element count of a constant without decoding its data when possible."""
    if v.const_value is not None and _fixed(v):
        return math.prod(v.const_value.shape)
    a = const_array(v)
    return None if a is None else int(a.size)


def const_ints(v: Value | None) -> list[int] | None:
    """A small integer constant as a list of Python ints (scalars give a 1-item list)."""
    if v is None or not is_constant(v):
        return None
    if (n := const_numel(v)) is None or n > 4096:
        return None
    a = const_array(v)
    if a is None or a.dtype.kind not in "iu":
        return None
    return [int(x) for x in a.reshape(-1)]


def make_constant(graph: Graph, array: np.ndarray, like: Value, *, before: Node) -> Value:
    """A constant holding `array` for use in `graph`: an initializer of that graph, or a Constant
    node inserted before `before` inside function bodies (which have no initializers)."""
    tensor = NumpyTensor(array)
    vtype = TensorType(tensor.dtype, Shape(tensor.shape))
    if in_function(graph):
        out = Value(unique_name(graph, (like.name or "const") + "_const"), vtype)
        graph.insert_before(before, Node("", "Constant", [], [Attr("value", AttrType.TENSOR, tensor)], outputs=[out]))
        return out
    name = unique_name(graph, (like.name or "const") + "_const")
    tensor.name = name
    v = Value(name, vtype, const_value=tensor)
    graph.register_initializer(v)
    return v


def replace_with_constant(node: Node, results: list[np.ndarray]) -> None:
    """Replace every output of `node` by a constant and remove it.

    An output that is a graph output keeps its name and gets a Constant node (an initializer
    may not double as a graph output everywhere); other outputs become initializers that take
    over the output's name, so downstream names stay stable.
    """
    graph = node.graph
    assert graph is not None
    fn = in_function(graph)
    new_nodes: list[Node] = []
    for out, arr in zip(node.outputs, results):
        if not out.uses() and not out.is_graph_output():
            continue
        tensor = NumpyTensor(arr)
        vtype = TensorType(tensor.dtype, Shape(tensor.shape))
        if out.is_graph_output() or fn:
            c = Value(out.name, out.type or vtype)
            new_nodes.append(Node("", "Constant", [], [Attr("value", AttrType.TENSOR, tensor)], outputs=[c]))
        else:
            tensor.name = out.name
            c = Value(out.name, vtype, const_value=tensor, doc_string=out.doc_string)
        out.replace_all_uses_with(c, replace_graph_outputs=True)
        out.name = ""  # hand the name over; the node (and this value) goes away below
        if c.producer() is None:
            graph.register_initializer(c)
    if new_nodes:
        graph.insert_before(node, new_nodes)
    graph.remove(node)


def is_dead(node: Node) -> bool:
    return all(not v.uses() and not v.is_graph_output() for v in node.outputs)


def alias(node: Node, out: Value, src: Value) -> bool:
    """Make every reader of `out` (an output of `node`) read `src` instead, and remove `node`
    when nothing reads it any more. Graph outputs keep their names: when `out` is one, `src`
    takes its name, which is only possible when `src` is a node output of the same graph that
    is not itself a graph output; otherwise nothing changes and False is returned."""
    graph = node.graph
    assert graph is not None
    if out.is_graph_output():
        p = src.producer()
        if p is None or p.graph is not graph or src.is_graph_output():
            return False
        if src.type is None or out.type is not None:
            src.type = out.type if out.type is not None else src.type
        name = out.name
        out.name = ""
        src.name = name
    out.replace_all_uses_with(src, replace_graph_outputs=True)
    if is_dead(node):
        graph.remove(node)
    return True


def remove_if_dead(node: Node | None) -> None:
    if node is not None and node.graph is not None and is_dead(node):
        node.graph.remove(node)


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


# --- shapes -----------------------------------------------------------------------------------
def static_shape(v: Value | None) -> tuple[int, ...] | None:
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
    if v is None:
        return None
    if is_constant(v):
        if v.const_value is not None:
            return v.const_value.dtype
        a = const_array(v)
        return None if a is None or a.dtype.kind not in "biuf" else DataType.from_numpy(a.dtype)
    return v.dtype


def walk_graph_pairs(g: Graph) -> Iterator[tuple[Node, list[Graph]]]:
    for n in g:
        yield n, n.subgraphs()

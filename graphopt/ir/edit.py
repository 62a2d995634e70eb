"""Small graph edits a pass author needs around constants and aliases: add a constant (an
initializer, or a Constant node inside function bodies), replace a node by the constants it
computes, make the readers of one value read another, remove a node nothing reads.

Graph outputs keep their names through every edit here (a runtime's caller looks them up).
"""

from __future__ import annotations

import numpy as np

from graphopt.ir.builder import unique_name
from graphopt.ir.core import Attr, AttrType, Graph, Node, Value
from graphopt.ir.query import in_function
from graphopt.ir.tensor import NumpyTensor
from graphopt.ir.types import Shape, TensorType

__all__ = ["alias", "is_dead", "make_constant", "remove_if_dead", "replace_with_constant"]


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
    """No output of `node` is read or is a graph output."""
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
    """Remove `node` (when given and still in a graph) if nothing reads it."""
    if node is not None and node.graph is not None and is_dead(node):
        node.graph.remove(node)

"""A Builder writes new nodes into a graph at its insertion point: `b.op.Conv(x, w, strides=[1, 1])`.

    b = Builder(graph)
    with graph.inserting_before(node):
        y = b.op.Relu(x)                       # one output -> Value
        vals, idx = b.op.TopK(x, k, _outputs=2)  # several -> tuple of Values
        z = b.op.FusedMatMul(a, c, _domain="com.microsoft", alpha=0.5)
    w = b.initializer(np.ones((3,), np.float32), "w")

New values get names unique in the whole model (the root graph and all subgraphs).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from graphopt.ir.core import Attr, Graph, Node, Value
from graphopt.ir.tensor import NumpyTensor, Tensor
from graphopt.ir.types import Shape, TensorType

_NAME_SETS: weakref.WeakKeyDictionary[Graph, set[str]] = weakref.WeakKeyDictionary()


def _names_in(root: Graph) -> set[str]:
    names: set[str] = set()
    stack = [root]
    while stack:
        g = stack.pop()
        names.update(v.name for v in g.values() if v.name)
        names.update(n.name for n in g if n.name)
        for n in g:
            stack.extend(n.subgraphs())
    return names


def unique_name(graph: Graph, base: str) -> str:
    """A value/node name not used anywhere in `graph`'s model tree (cached per root graph)."""
    root = graph.root()
    names = _NAME_SETS.get(root)
    if names is None:
        names = _names_in(root)
        _NAME_SETS[root] = names
    base = base or "v"
    if base not in names:
        names.add(base)
        return base
    i = len(names)
    while f"{base}_{i}" in names:
        i += 1
    name = f"{base}_{i}"
    names.add(name)
    return name


class _OpNamespace:
    def __init__(self, builder: Builder, domain: str = "") -> None:
        self._builder = builder
        self._domain = domain

    def __getattr__(self, op_type: str) -> Any:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: Value | None, _domain: str | None = None, _outputs: int = 1, _name: str = "", **attrs: Any) -> Any:
            node = self._builder.node(
                op_type, inputs, attrs, domain=self._domain if _domain is None else _domain, num_outputs=_outputs, name=_name
            )
            return node.outputs[0] if _outputs == 1 else node.outputs

        return make

    def __getitem__(self, domain: str) -> _OpNamespace:
        """`b.op["com.microsoft"].FusedMatMul(...)`."""
        return _OpNamespace(self._builder, domain)


class Builder:
    """Creates nodes and constants in `graph` at its current insertion point."""

    def __init__(self, graph: Graph, *, name_hint: str = "") -> None:
        self.graph = graph
        self.name_hint = name_hint
        self.op = _OpNamespace(self)
        self.created: list[Node] = []

    def node(
        self,
        op_type: str,
        inputs: Sequence[Value | None],
        attrs: dict[str, Any] | Sequence[Attr] = (),
        *,
        domain: str = "",
        num_outputs: int = 1,
        name: str = "",
        output_names: Sequence[str] | None = None,
    ) -> Node:
        """Build one node; attribute kinds are inferred from Python values (see Attr.infer)."""
        if isinstance(attrs, dict):
            attr_list = [Attr.infer(k, v) for k, v in attrs.items() if v is not None]
        else:
            attr_list = list(attrs)
        base = self.name_hint or op_type.lower()
        if output_names is None:
            outs = [Value(unique_name(self.graph, base)) for _ in range(num_outputs)]
        else:
            outs = [Value(unique_name(self.graph, nm) if nm else "") for nm in output_names]
        node = Node(domain, op_type, list(inputs), attr_list, outputs=outs, name=unique_name(self.graph, name) if name else "")
        self.graph.insert(node)
        self.created.append(node)
        return node

    def initializer(self, value: np.ndarray | Tensor, name: str = "const") -> Value:
        """A new initializer of the root graph (visible from every subgraph)."""
        root = self.graph.root()
        tensor = value if isinstance(value, Tensor) else NumpyTensor(np.asarray(value))
        v = Value(unique_name(root, name), TensorType(tensor.dtype, Shape(tensor.shape)), const_value=tensor)
        tensor.name = v.name
        root.register_initializer(v)
        return v

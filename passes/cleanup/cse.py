"""`cse`: common subexpression elimination."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphopt.ir import Graph, Model, Node, SparseTensor, Value
from graphopt.transform import Pass, PassContext, PassResult, register_pass

from graphopt.ir import NONDETERMINISTIC_OPS, attr_key, constant_semantics

#: Binary ops whose two operands may be swapped (inputs are keyed as a multiset).
_COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor", "Equal", "BitwiseAnd", "BitwiseOr", "BitwiseXor"})

#: Constants with at most this many elements are merged by value (see the pass docstring).
SMALL_CONSTANT = 16


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Merge nodes that compute the same thing.

    Before → after:  `a = Relu(x); b = Relu(x); y = Add(a, b)`  →  `a = Relu(x); y = Add(a, a)`.
    Two nodes are the same when op, domain, overload, attributes (tensors by content) and inputs
    (the same values; operands of commutative ops in any order) agree. Small constants are
    merged by value first (initializers and Constant nodes of at most 16 elements, same dtype,
    shape and bytes, in the same graph), so `Unsqueeze(x, [0])` twice with two separate `[0]`
    initializers still merges. Big identical initializers are left to the weight-sharing pass.

    Does not fire on: random ops; nodes with subgraphs (If/Loop/Scan: comparing bodies is not
    worth it); a node whose output is a graph output when the node it would merge into also
    has one (each output keeps its name); initializers that are graph inputs.
    """

    name: ClassVar[str] = "cse"
    idle_reason: ClassVar[str] = "no two nodes compute the same value from the same inputs"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        with constant_semantics(model):
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        consts = nodes = 0
        for g in list(model.graphs()):
            if g.parent is not None and isinstance(g.parent, Node) and g.parent.graph is None:
                continue  # its owner was merged away
            consts += _merge_small_initializers(g)
            nodes += _merge_nodes(g)
        return PassResult(bool(consts or nodes), {"nodes-merged": nodes, "constants-merged": consts})


def _merge_small_initializers(g: Graph) -> int:
    seen: dict[tuple[object, ...], Value] = {}
    dead: list[str] = []
    for name, v in g.initializers.items():
        t = v.const_value
        if t is None or isinstance(t, SparseTensor) or v.is_graph_input() or v.is_graph_output():
            continue  # a sparse tensor has no .size; merging only plain tensors keeps it simple
        if t.size > SMALL_CONSTANT or not hasattr(t, "tobytes"):
            continue
        try:
            key = (int(t.dtype), tuple(t.shape), t.content_hash())
        except (OSError, ValueError):  # external data that cannot be read: not merged by value
            continue
        keep = seen.setdefault(key, v)
        if keep is not v:
            v.replace_all_uses_with(keep)
            dead.append(name)
    for name in dead:
        g.remove_initializer(name)
    return len(dead)


def _key(n: Node) -> tuple[object, ...] | None:
    if n.op_type in NONDETERMINISTIC_OPS or n.subgraphs():
        return None
    if n.op_type == "Constant":
        # only small constants by value; big ones are the weight-sharing pass's business
        a = n.attributes.get("value")
        if a is not None and a.value is not None and getattr(a.value, "size", SMALL_CONSTANT + 1) > SMALL_CONSTANT:
            return None
    ins: tuple[object, ...] = tuple(id(v) if v is not None else None for v in n.inputs)
    if n.op_type in _COMMUTATIVE and n.domain in ("", "ai.onnx") and None not in ins:
        ins = tuple(sorted(ins))  # type: ignore[type-var]
    attrs = tuple(sorted((k, attr_key(a)) for k, a in n.attributes.items()))
    return (n.domain, n.op_type, n.overload, len(n.outputs), ins, attrs)


def _merge_nodes(g: Graph) -> int:
    """One topological sweep with a hash table: a merge rewires the readers before they are
    visited, so chains of duplicates collapse in the same sweep."""
    table: dict[tuple[object, ...], Node] = {}
    merged = 0
    for n in g:
        try:
            key = _key(n)
        except Exception:  # noqa: BLE001 - an attribute that cannot be keyed (unreadable tensor): never merged
            key = None
        if key is None:
            continue
        keep = table.get(key)
        if keep is None:
            table[key] = n
            continue
        if not _merge(n, keep):
            continue
        merged += 1
    return merged


def _merge(dup: Node, keep: Node) -> bool:
    g = dup.graph
    assert g is not None
    for a, b in zip(dup.outputs, keep.outputs):
        if a.is_graph_output() and b.is_graph_output():
            return False
    for a, b in zip(dup.outputs, keep.outputs):
        if a.is_graph_output():
            # `keep` is defined earlier: it takes over the graph output's name
            name = a.name
            a.name = ""
            b.name = name
            if a.type is not None:
                b.type = a.type
        a.replace_all_uses_with(b, replace_graph_outputs=True)
    g.remove(dup)
    return True

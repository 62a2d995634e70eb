"""`verify()`: check every IR invariant and report the first broken one with the node.

Checks, per graph (and recursively in subgraphs and function bodies):
- use lists agree with node inputs, outputs know their producer and index;
- every input is defined before it is read (graph input, initializer, earlier node, or a value
  of an enclosing graph defined before the enclosing node) -- this catches dangling inputs and
  cycles alike, and tells which one it is;
- value names are unique within a graph (SSA), graph outputs are defined;
- every node's domain is imported by the model (or the function) or is a model-local function.
"""

from __future__ import annotations

from graphopt.errors import VerifyError
from graphopt.ir.core import Function, Graph, Model, Node, Value


def verify(model: Model) -> None:
    """Raise VerifyError (one line, naming the node) at the first broken invariant."""
    local_domains = {f.domain for f in model.functions.values()}
    _verify_graph(model.graph, frozenset(), set(model.opset_imports) | local_domains, "graph")
    for f in model.functions.values():
        domains = set(f.opset_imports) | local_domains
        _verify_graph(f.graph, frozenset(), domains, f"function {f.domain}::{f.name}")


def verify_graph(graph: Graph, opset_domains: set[str] | None = None) -> None:
    """Verify a graph on its own (domain imports are checked only when given)."""
    _verify_graph(graph, frozenset(), opset_domains, f"graph {graph.name!r}")


def _where(context: str) -> str:
    return f" (in {context})" if context != "graph" else ""


def _verify_graph(graph: Graph, outer: frozenset[Value], domains: set[str] | None, context: str) -> None:
    where = _where(context)
    names: dict[str, object] = {}

    def claim(v: Value, owner: object, what: str) -> None:
        if not v.name:
            return
        prev = names.get(v.name)
        if prev is not None and prev is not v:
            raise VerifyError(f"duplicate value name {v.name!r}: {what}{where}", owner if isinstance(owner, Node) else None)
        names[v.name] = v

    visible: set[Value] = set(outer)
    v: Value | None
    for v in graph.inputs:
        claim(v, None, "graph input defined twice")
        visible.add(v)
    for name, v in graph.initializers.items():
        if v.name != name:
            raise VerifyError(f"initializer registered as {name!r} is named {v.name!r}{where}")
        if v.const_value is None:
            raise VerifyError(f"initializer {name!r} has no value{where}")
        if v not in graph._input_set:
            claim(v, None, "initializer shares its name with another value")
        visible.add(v)

    defined_later: dict[Value, Node] = {}
    seen_nodes: set[Node] = set()
    for n in graph:
        for out in n.outputs:
            defined_later[out] = n

    for n in graph:
        if n.graph is not graph:
            raise VerifyError(f"node {n.label()} thinks it belongs to another graph{where}", n)
        if n in seen_nodes:
            raise VerifyError(f"node {n.label()} appears twice{where}", n)
        seen_nodes.add(n)
        if domains is not None and n.domain not in domains and not (n.domain == "ai.onnx" and "" in domains):
            raise VerifyError(
                f"node {n.label()} uses domain {n.domain!r}, which the model does not import{where}", n
            )
        for i, v in enumerate(n.inputs):
            if v is None:
                continue
            if (n, i) not in v._uses:
                raise VerifyError(f"node {n.label()}: input {i} {v.name!r} does not list the node as a use{where}", n)
            _check_defined(n, i, v, visible, defined_later, where)
        for g in n.subgraphs():
            if g.parent is not n:
                raise VerifyError(f"node {n.label()}: subgraph {g.name!r} has the wrong parent{where}", n)
            _verify_graph(g, frozenset(visible), domains, f"subgraph {g.name!r} of node {n.label()}")
        for i, v in enumerate(n.outputs):
            if v._producer is not n or v._index != i:
                raise VerifyError(f"node {n.label()}: output {i} {v.name!r} names another producer{where}", n)
            claim(v, n, f"produced by node {n.label()} and defined before it")
            visible.add(v)

    for v in visible - outer:
        for user, i in v._uses:
            if user.graph is None or user._erased:
                raise VerifyError(f"value {v.name!r} lists a use by removed node {user.label()}{where}")
            if i >= len(user.inputs) or user.inputs[i] is not v:
                raise VerifyError(f"value {v.name!r} lists a stale use by node {user.label()} input {i}{where}", user)

    for k, v in enumerate(graph.outputs):
        if v not in visible:
            what = f"graph output {k} {v.name!r}"
            if v in defined_later:
                raise VerifyError(f"{what} is produced by a removed or foreign node{where}")
            raise VerifyError(f"{what} is not defined in the graph{where}")


def _check_defined(n: Node, i: int, v: Value, visible: set[Value], later: dict[Value, Node], where: str) -> None:
    if v in visible:
        return
    producer = later.get(v)
    if producer is n:
        raise VerifyError(f"cycle: node {n.label()} reads its own output {v.name!r}{where}", n)
    if producer is not None:
        raise VerifyError(
            f"node {n.label()} reads {v.name!r} before node {producer.label()} produces it "
            f"(a cycle, or nodes out of topological order){where}",
            n,
        )
    p = v.producer()
    if p is not None and isinstance(p.graph, Graph) and p.graph is not n.graph:
        if _encloses(p.graph, n.graph):
            raise VerifyError(
                f"node {n.label()} reads {v.name!r} before node {p.label()} of an enclosing graph produces it "
                f"(a cycle, or nodes out of topological order){where}",
                n,
            )
        raise VerifyError(f"node {n.label()}: input {v.name!r} comes from a graph that does not enclose it{where}", n)
    raise VerifyError(f"node {n.label()}: input {i} {v.name!r} is not defined (dangling input){where}", n)


def _encloses(outer: Graph, inner: Graph | None) -> bool:
    g = inner
    while g is not None:
        if g is outer:
            return True
        parent = g.parent
        g = parent.graph if isinstance(parent, Node) else None
    return False


__all__ = ["verify", "verify_graph", "Function"]

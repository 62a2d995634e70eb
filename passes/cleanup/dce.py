"""`dce`: dead code elimination."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphopt.ir import Graph, Model, Node
from graphopt.transform import Pass, PassContext, PassResult, register_pass

from graphopt.ir import constant_semantics

#: Domains whose ops are known to be pure (no side effects), even when `keep_custom` is set.
_PURE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "graphopt"})


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove what no graph output depends on.

    Before → after:  `t = Relu(x); y = Neg(x)` with only `y` an output  →  `y = Neg(x)`;
    initializers nothing reads are dropped; model-local functions no node calls are dropped.

    Never removes: graph inputs (an initializer that is also a graph input stays: it is part of
    the interface), graph outputs and what they depend on (including reads from inside If/Loop/
    Scan bodies), nodes with at least one used output. ONNX ops have no side effects, so a node
    of any domain is removable; with `keep_custom` nodes of domains other than the standard
    ones, ai.onnx.ml, com.microsoft and graphopt are kept (custom ops that log or write files).
    """

    name: ClassVar[str] = "dce"
    idle_reason: ClassVar[str] = "every node, initializer and function is used"
    keep_custom: bool = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        with constant_semantics(model):
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        local = {f.domain for f in model.functions.values()}
        nodes = inits = 0
        # children before parents: a dead read inside a subgraph may be what keeps an outer
        # value alive, so subgraphs are swept first
        for g in reversed(list(model.graphs())):
            if not g.is_attached():
                continue
            n, i = _sweep(g, self.keep_custom, local)
            nodes += n
            inits += i
        funcs = _drop_unused_functions(model)
        changed = bool(nodes or inits or funcs)
        return PassResult(changed, {"nodes-removed": nodes, "initializers-removed": inits, "functions-removed": funcs})


def _removable(n: Node, keep_custom: bool, local_domains: set[str]) -> bool:
    if not keep_custom:
        return True
    return n.domain in _PURE_DOMAINS or n.domain in local_domains


def _sweep(g: Graph, keep_custom: bool, local_domains: set[str]) -> tuple[int, int]:
    """Reverse topological sweep: removing a node can only kill nodes before it."""
    removed = 0
    for n in reversed(g.nodes):
        if all(not v.uses() and not v.is_graph_output() for v in n.outputs) and _removable(n, keep_custom, local_domains):
            g.remove(n)
            removed += 1
    outputs = {id(v) for v in g.outputs}
    dead_inits = [
        name for name, v in g.initializers.items() if not v.uses() and id(v) not in outputs and not v.is_graph_input()
    ]
    for name in dead_inits:
        g.remove_initializer(name)
    return removed, len(dead_inits)


def _drop_unused_functions(model: Model) -> int:
    """Keep the functions reachable from the main graph (through calls in function bodies)."""
    if not model.functions:
        return 0
    by_call = {(f.domain, f.name, f.overload): key for key, f in model.functions.items()}
    reached: set[tuple[str, str, str]] = set()
    stack: list[Graph] = [model.graph]
    while stack:
        g = stack.pop()
        for n in g.all_nodes():
            key = by_call.get((n.domain, n.op_type, n.overload))
            if key is not None and key not in reached:
                reached.add(key)
                stack.append(model.functions[key].graph)
    dead = [k for k in model.functions if k not in reached]
    for k in dead:
        del model.functions[k]
    return len(dead)

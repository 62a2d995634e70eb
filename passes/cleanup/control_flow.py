"""`simplify-control-flow`: inline Ifs whose condition is constant; drop If/Loop outputs and
loop-carried values nothing reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from graphopt.ir import Graph, Model, Node, Value
from graphopt.ir.core import Attr, AttrType
from graphopt.ir.builder import unique_name
from graphopt.transform import Pass, PassContext, PassResult, register_pass

from graphopt.ir import STANDARD_DOMAINS, const_array, constant_semantics, in_function, is_constant
from graphopt.passes.cleanup.fold import fold_graph

_MAX_ROUNDS = 32  # an inlined branch may hold an If whose condition folds next round


@register_pass
@dataclass(frozen=True)
class SimplifyControlFlow(Pass):
    """Control flow the values decide, and control-flow outputs nobody reads.

    Before → after:
      `y = If(c) <then={... t}, else={... e}>` with `c` a constant (an initializer, a Constant, a
      bound input, a folded rank/shape test)  →  the chosen branch's nodes in the enclosing graph,
      `y` its output (the other branch is dropped); the inlined nodes are constant-folded and
      their shape arithmetic simplified (simplify-shapes, with the enclosing graph's types);
      `y1, y2 = If(c)` with `y2` read by nothing  →  `y1 = If(c)`, `y2` dropped from both branches;
      `Loop(M, cond, v0, k0) -> vT, kT, scan1, scan2` where `kT` and `scan2` are read by nothing and
      the body's `k` only feeds its own next value  →  `Loop(M, cond, v0) -> vT, scan1`;
      a carried value the body passes through unchanged (`v_out = v_in`): the body reads the
      initial value from outside and the final value is the initial one.

    Does not fire on: If conditions that are not constant (graph inputs, initializers that are
    graph inputs and so overridable), outputs that are graph outputs, a carried value that feeds
    the condition, another carried value or a scan output (through any chain of nodes, including
    nested bodies), Scan (its state layout is positional in its attributes), non-standard domains.
    """

    name: ClassVar[str] = "simplify-control-flow"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        with constant_semantics(model):
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        stats = {"if-inlined": 0, "if-outputs-removed": 0, "loop-outputs-removed": 0, "loop-carried-removed": 0,
                 "folded": 0}
        for _ in range(_MAX_ROUNDS):
            touched: list[Graph] = []
            for g in list(model.graphs()):
                if not g.is_attached():
                    continue
                for n in list(g):
                    if n.graph is not g or n.domain not in STANDARD_DOMAINS:
                        continue
                    if n.op_type == "If" and _inline_if(n):
                        stats["if-inlined"] += 1
                        touched.append(g)
            for g in dict.fromkeys(touched):
                if g.is_attached():
                    stats["folded"] += fold_graph(g, model, 1 << 20, 1024)[0]
            if not touched:
                break
        if stats["if-inlined"]:
            # inlined nodes now see the enclosing graph's (often better) types: their shape
            # arithmetic may fold where it could not inside the branch (simplify-shapes ran before)
            from graphopt.passes.cleanup.shapes import SimplifyShapes

            r = SimplifyShapes().run(model, ctx)
            stats["folded"] += sum(int(v) for v in r.stats.values())
        # children before parents: dropping an inner output can free an outer one
        for g in reversed(list(model.graphs())):
            if not g.is_attached():
                continue
            for n in list(g):
                if n.graph is not g or n.domain not in STANDARD_DOMAINS:
                    continue
                if n.op_type == "If":
                    stats["if-outputs-removed"] += _drop_if_outputs(n)
                elif n.op_type == "Loop":
                    s, c, r = _simplify_loop(n)
                    stats["loop-outputs-removed"] += s
                    stats["loop-carried-removed"] += c
                    stats["loop-invariants-rewired"] = stats.get("loop-invariants-rewired", 0) + r
        changed = any(v for k, v in stats.items() if k != "folded")
        return PassResult(changed, stats)


# --- If with a constant condition ----------------------------------------------------------------


def _inline_if(node: Node) -> bool:
    cond = node.inputs[0] if node.inputs else None
    if not is_constant(cond):
        return False
    arr = const_array(cond)
    if arr is None or arr.size != 1:
        return False
    key = "then_branch" if bool(np.asarray(arr).reshape(-1)[0]) else "else_branch"
    a = node.attributes.get(key)
    if a is None or a.value is None:
        return False
    branch: Graph = a.value
    parent = node.graph
    assert parent is not None
    fn = in_function(parent)
    # initializers of the branch become the enclosing graph's (Constant nodes in function bodies)
    moved_consts: list[Node] = []
    for name in list(branch.initializers):
        v = branch.remove_initializer(name)
        if fn:
            t = v.const_value
            out = Value(v.name, v.type)
            moved_consts.append(Node("", "Constant", [], [Attr("value", AttrType.TENSOR, t)], outputs=[out]))
            v.replace_all_uses_with(out, replace_graph_outputs=True)
            continue
        if name in parent.initializers:
            v.name = unique_name(parent, name)
            if v.const_value is not None and hasattr(v.const_value, "name"):
                v.const_value.name = v.name
        parent.register_initializer(v)
    if moved_consts:
        parent.insert_before(node, moved_consts)
    # move the nodes: Graph.remove detaches inputs (recursively): save and restore them
    body = list(branch)
    saved = {id(n): (n, n.inputs) for b in body for n in [b, *_nested(b)]}
    outs = list(branch.outputs)
    branch.outputs = []
    branch.remove(body, safe=False)
    for n, ins in saved.values():
        n.set_inputs(ins)
    # sibling bodies (two Ifs' branches) may reuse names; in one graph they must be unique
    taken = {v.name for v in parent.values() if v.name}
    for n in body:
        for v in n.outputs:
            if v.name and v.name in taken:
                v.name = unique_name(parent, v.name)
    parent.insert_before(node, body)
    moved = {id(v) for n in body for v in n.outputs} | {id(v) for n in moved_consts for v in n.outputs}
    moved |= {id(v) for v in parent.initializers.values()}
    used_once: set[int] = set()
    for y, src in zip(node.outputs, outs):
        if y.is_graph_output():
            if id(src) in moved and id(src) not in used_once and src.producer() is not None and not src.is_graph_output():
                y_name, y.name = y.name, ""
                src.name = y_name
                if y.type is not None:
                    src.type = y.type
                used_once.add(id(src))
                y.replace_all_uses_with(src, replace_graph_outputs=True)
            else:  # an outer value or a constant: the graph output keeps its name through an Identity
                z = Value(y.name, y.type or src.type)
                y.name = ""
                parent.insert_before(node, Node("", "Identity", [src], outputs=[z]))
                y.replace_all_uses_with(z, replace_graph_outputs=True)
        else:
            if src.type is None and y.type is not None:
                src.type = y.type
            y.replace_all_uses_with(src)
    # the chosen branch is empty now; the other one is detached with the node
    del node.attributes[key]
    parent.remove(node, safe=False)
    return True


def _nested(n: Node) -> list[Node]:
    return [m for g in n.subgraphs() for m in g.all_nodes()]


# --- unused outputs ------------------------------------------------------------------------------


def _unused(v: Value) -> bool:
    return not v.uses() and not v.is_graph_output()


def _rebuild(node: Node, keep: list[int]) -> Node:
    """A copy of `node` with only the outputs at `keep`; the old outputs' readers and names move
    over. The subgraph attributes move to the copy (so removing `node` leaves them intact)."""
    outs = []
    for i in keep:
        old = node.outputs[i]
        new = Value(old.name, old.type, doc_string=old.doc_string)
        old.name = ""
        outs.append((old, new))
    copy = Node(node.domain, node.op_type, list(node.inputs), list(node.attributes.values()),
                outputs=[n for _, n in outs], name=node.name, doc_string=node.doc_string,
                metadata_props=dict(node.metadata_props))
    copy.meta.update(node.meta)
    g = node.graph
    assert g is not None
    g.insert_before(node, copy)
    for old, new in outs:
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    node.attributes.clear()
    g.remove(node, safe=False)
    return copy


def _drop_if_outputs(node: Node) -> int:
    dead = [i for i, v in enumerate(node.outputs) if _unused(v)]
    if not dead or len(dead) == len(node.outputs):
        return 0  # an If with no used output at all is dce's to remove
    branches = [a.value for k, a in node.attributes.items() if k in ("then_branch", "else_branch") and a.value is not None]
    if len(branches) != 2 or any(len(b.outputs) != len(node.outputs) for b in branches):
        return 0
    keep = [i for i in range(len(node.outputs)) if i not in dead]
    for b in branches:
        b.outputs = [b.outputs[i] for i in keep]
    _rebuild(node, keep)
    return len(dead)


def _reads(g: Graph, targets: list[Value]) -> set[int]:
    """ids of the values the nodes computing `targets` (in `g`) read, nested bodies included."""
    seen: set[int] = set()
    out: set[int] = set()
    stack = [v for v in targets]
    while stack:
        v = stack.pop()
        if id(v) in out:
            continue
        out.add(id(v))
        p = v.producer()
        if p is None or p.graph is not g or id(p) in seen:
            continue
        seen.add(id(p))
        stack.extend(x for x in p.inputs if x is not None)
        for m in _nested(p):  # a body reads outer values directly
            stack.extend(x for x in m.inputs if x is not None and x.graph is g)
    return out


def _simplify_loop(node: Node) -> tuple[int, int, int]:
    """(scan outputs removed, carried values removed, readers of a loop-invariant carried value
    rewired to its initial value)."""
    a = node.attributes.get("body")
    if a is None or a.value is None:
        return 0, 0, 0
    body: Graph = a.value
    n_carried = len(node.inputs) - 2
    if n_carried < 0 or len(body.inputs) != n_carried + 2 or len(body.outputs) != len(node.outputs) + 1:
        return 0, 0, 0
    n_scan = len(node.outputs) - n_carried
    changed_c = 0
    # a carried value the body passes through unchanged is loop-invariant: read the initial value
    for j in range(n_carried):
        v_in, v_out, init = body.inputs[2 + j], body.outputs[1 + j], node.inputs[2 + j]
        if v_out is v_in and init is not None and v_in.uses():
            v_in.replace_all_uses_with(init)
            changed_c += 1
        if v_out is v_in and init is not None and node.outputs[j].uses() and not node.outputs[j].is_graph_output():
            node.outputs[j].replace_all_uses_with(init)
            changed_c += 1
    dead_scan = [k for k in range(n_scan) if _unused(node.outputs[n_carried + k])]
    dead_carried: list[int] = []
    for j in range(n_carried):
        if not _unused(node.outputs[j]):
            continue
        others = [body.outputs[0]] + [body.outputs[1 + i] for i in range(n_carried) if i != j and i not in dead_carried]
        others += [body.outputs[1 + n_carried + k] for k in range(n_scan) if k not in dead_scan]
        if id(body.inputs[2 + j]) in _reads(body, others):
            continue
        dead_carried.append(j)
    if not dead_scan and not dead_carried:
        return 0, 0, changed_c
    keep_c = [j for j in range(n_carried) if j not in dead_carried]
    keep_s = [k for k in range(n_scan) if k not in dead_scan]
    body.outputs = [body.outputs[0]] + [body.outputs[1 + j] for j in keep_c] + [body.outputs[1 + n_carried + k] for k in keep_s]
    # a removed carried input may still have readers in the dead cone of its own update: give
    # them the initial value (dce removes that cone next)
    for j in dead_carried:
        v_in = body.inputs[2 + j]
        if v_in.uses():
            init = node.inputs[2 + j]
            if init is None:
                return 0, 0, changed_c  # pragma: no cover - a carried value always has an initial one
            v_in.replace_all_uses_with(init)
    body.set_inputs(body.inputs[:2] + [body.inputs[2 + j] for j in keep_c])
    node.set_inputs(list(node.inputs[:2]) + [node.inputs[2 + j] for j in keep_c])
    _rebuild(node, keep_c + [n_carried + k for k in keep_s])
    return len(dead_scan), len(dead_carried), changed_c



def bodies_holding(model: Model, ops: frozenset[str] | set[str]) -> list[str]:
    """One line per If/Loop/Scan body (any depth) that holds nodes of `ops`: where it is and what
    it holds, e.g. "If 'sr_select' then_branch (Conv x5, LSTM x1)". For passes that work on the
    main graph only, to say per body what they did not look at."""
    out: list[str] = []

    def walk(g: Graph, where: str) -> None:
        for n in g:
            for key, a in n.attributes.items():
                subs = [a.value] if a.type == AttrType.GRAPH else list(a.value or []) if a.type == AttrType.GRAPHS else []
                for sub in subs:
                    if sub is None:
                        continue
                    here = f"{where}{n.op_type} {n.name or n.outputs[0].name!r} {key}"
                    counts: dict[str, int] = {}
                    for m in sub.all_nodes():
                        if m.domain in STANDARD_DOMAINS and m.op_type in ops:
                            counts[m.op_type] = counts.get(m.op_type, 0) + 1
                    if counts:
                        out.append(f"{here} ({', '.join(f'{k} x{v}' for k, v in counts.items())})")
                    walk(sub, here + " > ")

    walk(model.graph, "")
    return out

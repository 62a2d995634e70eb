"""Unit tests of the IR itself: use lists, graph mutation, sort, verify, clone, Attr.infer."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.errors import VerifyError
from graphopt.ir import (
    Attr,
    AttrType,
    Builder,
    DataType,
    Function,
    Graph,
    Model,
    Node,
    NumpyTensor,
    SparseTensor,
    TensorType,
    Value,
    verify,
)

F32 = TensorType(DataType.FLOAT, (3,))


# --- helpers ---------------------------------------------------------------------------------


def _node(op: str, *inputs: Value | None, out: str | None = None, num_outputs: int = 1, name: str = "", domain: str = "") -> Node:
    outs = [Value(out or f"{op.lower()}_out", F32)] if num_outputs == 1 else [Value(f"{out or op.lower()}_{i}", F32) for i in range(num_outputs)]
    return Node(domain, op, list(inputs), outputs=outs, name=name)


def _chain() -> tuple[Graph, Value, list[Node]]:
    """x -> a(Relu) -> b(Neg) -> c(Abs) = output."""
    x = Value("x", F32)
    a = _node("Relu", x, out="a", name="relu")
    b = _node("Neg", a.outputs[0], out="b", name="neg")
    c = _node("Abs", b.outputs[0], out="c", name="abs")
    g = Graph([x], [c.outputs[0]], [a, b, c], name="main")
    return g, x, [a, b, c]


def _model(g: Graph, **opsets: int) -> Model:
    return Model(g, opset_imports={"": 21, **opsets})


def _names(g: Graph) -> list[str]:
    return [n.name for n in g]


def _uses(v: Value) -> list[tuple[str, int]]:
    return [(n.name, i) for n, i in v.uses()]


def _if_reading(outer: Value, name: str = "if") -> Node:
    """An If whose then-branch reads `outer` from inside (a use from a subgraph)."""
    inner = Node("", "Neg", [outer], outputs=[Value(f"{name}_then_y", F32)], name=f"{name}_inner")
    then_g = Graph([], [inner.outputs[0]], [inner], name=f"{name}_then")
    other = Node("", "Identity", [outer], outputs=[Value(f"{name}_else_y", F32)], name=f"{name}_inner_else")
    else_g = Graph([], [other.outputs[0]], [other], name=f"{name}_else")
    cond = Value(f"{name}_cond", TensorType(DataType.BOOL, ()))
    return Node("", "If", [cond], {"then_branch": then_g, "else_branch": else_g}, outputs=[Value(f"{name}_y", F32)], name=name)


# --- use lists -------------------------------------------------------------------------------


def test_uses_and_producer_are_recorded() -> None:
    g, x, (a, b, c) = _chain()
    assert _uses(x) == [("relu", 0)]
    assert a.outputs[0].producer() is a and a.outputs[0].index() == 0
    assert x.producer() is None and x.is_graph_input() and x.graph is g
    assert c.outputs[0].is_graph_output() and not b.outputs[0].is_graph_output()
    verify(_model(g))


def test_replace_input_with_moves_the_use() -> None:
    g, x, (a, b, c) = _chain()
    b.replace_input_with(0, x)
    assert _uses(x) == [("relu", 0), ("neg", 0)]
    assert a.outputs[0].uses() == []
    b.replace_input_with(0, None)  # an omitted optional input
    assert b.inputs == (None,) and _uses(x) == [("relu", 0)]
    verify(_model(g))


def test_same_value_twice_as_input_has_two_uses() -> None:
    x = Value("x", F32)
    n = Node("", "Add", [x, x], outputs=[Value("y", F32)], name="add")
    assert _uses(x) == [("add", 0), ("add", 1)]
    assert x.consumers() == [n]
    n.replace_input_with(1, None)
    assert _uses(x) == [("add", 0)]  # only the replaced slot's use went away


def test_set_inputs_changes_length_and_keeps_uses() -> None:
    x, y = Value("x", F32), Value("y", F32)
    n = Node("", "Sum", [x, y, x], outputs=[Value("s", F32)], name="sum")
    n.set_inputs([y])
    assert x.uses() == [] and _uses(y) == [("sum", 0)]
    n.set_inputs([y, None, x])
    assert _uses(y) == [("sum", 0)] and _uses(x) == [("sum", 2)]


def test_set_inputs_rejecting_a_non_value_changes_nothing() -> None:
    x, y = Value("x", F32), Value("y", F32)
    n = Node("", "Add", [x, y], outputs=[Value("s", F32)], name="add")
    with pytest.raises(TypeError, match="input 1"):
        n.set_inputs([y, "not a value"])  # type: ignore[list-item]
    # refused: the old inputs and their uses stand
    assert n.inputs == (x, y)
    assert _uses(x) == [("add", 0)] and _uses(y) == [("add", 1)]


def test_failed_node_construction_leaves_no_ghost_uses() -> None:
    x = Value("x", F32)
    taken = _node("Relu", x, out="taken").outputs[0]
    with pytest.raises(ValueError, match="already defined"):
        Node("", "Neg", [x], outputs=[taken])
    with pytest.raises(ValueError, match="num_outputs"):
        Node("", "Neg", [x], outputs=[Value("z")], num_outputs=2)
    assert [n.op_type for n, _ in x.uses()] == ["Relu"]  # no use by a node that was never made


def test_replace_all_uses_with_including_subgraph_uses() -> None:
    x, z = Value("x", F32), Value("z", F32)
    top = _node("Relu", x, out="r", name="top")
    if_node = _if_reading(x)
    g = Graph([x, z, if_node.inputs[0]], [top.outputs[0], if_node.outputs[0]], [top, if_node])
    assert sorted(_uses(x)) == [("if_inner", 0), ("if_inner_else", 0), ("top", 0)]
    x.replace_all_uses_with(z)
    assert x.uses() == []
    assert sorted(_uses(z)) == [("if_inner", 0), ("if_inner_else", 0), ("top", 0)]
    inner = if_node.attributes["then_branch"].value.nodes[0]
    assert inner.inputs[0] is z
    verify(_model(g))


def test_replace_all_uses_with_graph_outputs_only_when_asked() -> None:
    g, x, (a, b, c) = _chain()
    new = _node("Exp", b.outputs[0], out="e", name="exp")
    g.insert_after(c, new)
    c.outputs[0].replace_all_uses_with(new.outputs[0])
    assert g.outputs == [c.outputs[0]]  # the interface stays until asked
    c.outputs[0].replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    assert g.outputs == [new.outputs[0]]
    c.outputs[0].replace_all_uses_with(c.outputs[0])  # a no-op, not an error
    verify(_model(g))


def test_multiple_outputs() -> None:
    x = Value("x", F32)
    split = _node("Split", x, out="part", num_outputs=3, name="split")
    use1 = _node("Relu", split.outputs[1], out="r", name="r")
    g = Graph([x], [split.outputs[0], use1.outputs[0]], [split, use1])
    assert [v.index() for v in split.outputs] == [0, 1, 2]
    assert all(v.producer() is split for v in split.outputs)
    assert _uses(split.outputs[1]) == [("r", 0)] and split.outputs[2].uses() == []
    assert [v.name for v in g.values()] == ["x", "part_0", "part_1", "part_2", "r"]
    verify(_model(g))


# --- mutation --------------------------------------------------------------------------------


def test_insert_while_iterating_visits_nodes_inserted_after_the_cursor() -> None:
    g, x, (a, b, c) = _chain()
    seen = []
    for n in g:
        seen.append(n.name)
        if n.name == "relu":
            g.insert_after(n, _node("Exp", n.outputs[0], out="e", name="after_relu"))
            g.insert_before(n, _node("Sin", x, out="s", name="before_relu"))
        if n.name == "abs":
            g.append(_node("Cos", x, out="t", name="appended"))  # appended at the end: visited too
    assert seen == ["relu", "after_relu", "neg", "abs", "appended"]  # the one before the cursor is not
    assert _names(g) == ["before_relu", "relu", "after_relu", "neg", "abs", "appended"]
    assert len(g) == 6


def test_remove_while_iterating() -> None:
    g, x, (a, b, c) = _chain()
    extra = [_node("Exp", x, out=f"e{i}", name=f"dead{i}") for i in range(3)]
    g.insert_after(a, extra)
    seen = []
    for n in g:
        seen.append(n.name)
        if n.name == "dead0":
            g.remove(n)  # the current node
            g.remove(extra[1])  # the next one: never visited
    assert seen == ["relu", "dead0", "dead2", "neg", "abs"]
    assert _names(g) == ["relu", "dead2", "neg", "abs"] and len(g) == 4
    assert extra[0] not in g and extra[0].graph is None
    assert x.consumers() == [a, extra[2]]  # the removed nodes dropped their uses
    verify(_model(g))


def test_replace_node_while_iterating() -> None:
    # the usual rewrite loop: build the replacement before the node, reroute, drop the node
    g, x, (a, b, c) = _chain()
    b_ = Builder(g)
    for n in g:
        if n.op_type == "Neg":
            with g.inserting_before(n):
                new = b_.op.Sub(b_.initializer(np.zeros(3, np.float32), "zero"), n.inputs[0])
            n.outputs[0].replace_all_uses_with(new)
            g.remove(n)
    assert [n.op_type for n in g] == ["Relu", "Sub", "Abs"]
    assert c.inputs[0].producer().op_type == "Sub"
    verify(_model(g))


def test_insert_before_and_after_keep_batch_order() -> None:
    g, x, (a, b, c) = _chain()
    g.insert_before(b, [_node("Exp", x, out="p1", name="p1"), _node("Exp", x, out="p2", name="p2")])
    g.insert_after(b, [_node("Exp", x, out="q1", name="q1"), _node("Exp", x, out="q2", name="q2")])
    assert _names(g) == ["relu", "p1", "p2", "neg", "q1", "q2", "abs"]
    g.insert_before(a, _node("Exp", x, out="h", name="head"))
    g.insert_after(c, _node("Exp", x, out="t", name="tail"))
    assert _names(g)[0] == "head" and _names(g)[-1] == "tail"
    assert len(g) == 9 and list(reversed(_names(g))) == _names(g)[::-1]


def test_insert_refuses_foreign_anchor_and_node_already_in_a_graph() -> None:
    g, x, (a, b, c) = _chain()
    g2, _, (a2, _, _) = _chain()
    with pytest.raises(ValueError, match="not in graph"):
        g.insert_after(a2, _node("Exp", x, out="e"))
    with pytest.raises(ValueError, match="already belongs"):
        g.insert_after(a, a2)
    assert len(g) == 3 and len(g2) == 3


def test_inserting_before_and_after_context_managers() -> None:
    g, x, (a, b, c) = _chain()
    bld = Builder(g)
    with g.inserting_before(b):
        bld.op.Exp(x, _name="i1")
        bld.op.Exp(x, _name="i2")
    with g.inserting_after(a):
        bld.op.Sin(x, _name="j1")
        bld.op.Sin(x, _name="j2")
    bld.op.Cos(x, _name="k")  # outside any context: appended
    assert _names(g) == ["relu", "j1", "j2", "i1", "i2", "neg", "abs", "k"]


def test_inserting_before_a_node_removed_inside_the_context() -> None:
    g, x, (a, b, c) = _chain()
    bld = Builder(g)
    with g.inserting_before(b):
        y = bld.op.Exp(a.outputs[0], _name="first")
        b.outputs[0].replace_all_uses_with(y)
        g.remove(b)
        bld.op.Sin(x, _name="second")  # still lands where b was
    assert _names(g) == ["relu", "first", "second", "abs"]


def test_remove_safe_refuses_when_output_is_used_and_changes_nothing() -> None:
    g, x, (a, b, c) = _chain()
    with pytest.raises(VerifyError, match="'neg'.*still used by 'abs'") as e:
        g.remove(b)
    assert e.value.node is b
    assert _names(g) == ["relu", "neg", "abs"] and b.inputs == (a.outputs[0],)
    assert _uses(a.outputs[0]) == [("neg", 0)]
    verify(_model(g))


def test_remove_safe_refuses_graph_outputs() -> None:
    g, x, (a, b, c) = _chain()
    with pytest.raises(VerifyError, match="graph output"):
        g.remove(c)
    assert c in g and len(g) == 3 and _uses(b.outputs[0]) == [("abs", 0)]


def test_remove_safe_refuses_uses_from_inside_subgraphs() -> None:
    x = Value("x", F32)
    a = _node("Relu", x, out="a", name="relu")
    if_node = _if_reading(a.outputs[0])
    g = Graph([x, if_node.inputs[0]], [if_node.outputs[0]], [a, if_node])
    with pytest.raises(VerifyError, match="still used by 'if_inner"):
        g.remove(a)
    assert a in g


def test_remove_batch_with_internal_uses() -> None:
    g, x, (a, b, c) = _chain()
    d = _node("Exp", x, out="d", name="exp")
    g.append(d)
    g.outputs[:] = [d.outputs[0]]
    g.remove([a, b, c])  # b uses a, c uses b: fine, they all go
    assert _names(g) == ["exp"] and len(g) == 1
    assert _uses(x) == [("exp", 0)]
    verify(_model(g))


def test_remove_batch_is_all_or_nothing() -> None:
    g, x, (a, b, c) = _chain()
    with pytest.raises(VerifyError):
        g.remove([a, b])  # c still reads b
    assert _names(g) == ["relu", "neg", "abs"]
    g2, _, (a2, _, _) = _chain()
    with pytest.raises(ValueError, match="not in graph"):
        g.remove([a, a2])  # a2 belongs elsewhere: nothing is removed
    assert len(g) == 3 and a in g


def test_remove_the_same_node_twice_in_a_batch() -> None:
    g, x, (a, b, c) = _chain()
    d = _node("Exp", x, out="d", name="exp")
    g.append(d)
    g.remove([d, d])
    assert len(g) == 3 and len(list(g)) == 3  # counted once
    verify(_model(g))


def test_remove_a_node_whose_subgraph_reads_its_own_graph() -> None:
    # removing an If also removes the uses its branches made
    x = Value("x", F32)
    if_node = _if_reading(x)
    keep = _node("Relu", x, out="r", name="keep")
    g = Graph([x, if_node.inputs[0]], [keep.outputs[0]], [if_node, keep])
    g.remove(if_node)
    assert _uses(x) == [("keep", 0)]
    verify(_model(g))


def test_remove_batch_in_a_subgraph_with_uses_in_a_nested_subgraph() -> None:
    # in a subgraph: `a` is read from inside the branch of `inner_if`; removing both is fine
    x = Value("x", F32)
    a = _node("Relu", x, out="a", name="a")
    inner_if = _if_reading(a.outputs[0], name="inner_if")
    keep = _node("Neg", x, out="k", name="keep")
    body = Graph([], [keep.outputs[0]], [a, inner_if, keep], name="body")
    outer = Node("", "If", [Value("c", TensorType(DataType.BOOL, ()))], {"then_branch": body, "else_branch": Graph([], [x], [], name="e")},
                 outputs=[Value("y", F32)], name="outer")
    Graph([x, outer.inputs[0]], [outer.outputs[0]], [outer])  # (owns `outer`: body is a subgraph)
    body.remove([a, inner_if])
    assert _names(body) == ["keep"]
    assert _uses(x) == [("keep", 0)]


# --- sort ------------------------------------------------------------------------------------


def test_sort_is_stable_and_topological() -> None:
    x = Value("x", F32)
    a = _node("Relu", x, out="a", name="a")
    b = _node("Neg", a.outputs[0], out="b", name="b")
    i1 = _node("Exp", x, out="i1", name="i1")
    i2 = _node("Sin", x, out="i2", name="i2")
    g = Graph([x], [b.outputs[0]], [b, i1, a, i2])
    g.sort()
    # independent nodes keep their relative order; b moves only as far as it must
    assert _names(g) == ["i1", "a", "b", "i2"]
    g.sort()
    assert _names(g) == ["i1", "a", "b", "i2"]  # idempotent
    assert len(g) == 4 and [n.name for n in list(g)[::-1]] == ["i2", "b", "a", "i1"]
    verify(_model(g))


def test_sort_counts_reads_from_inside_subgraphs() -> None:
    x = Value("x", F32)
    a = _node("Relu", x, out="a", name="a")
    if_node = _if_reading(a.outputs[0])
    g = Graph([x, if_node.inputs[0]], [if_node.outputs[0]], [if_node, a])
    with pytest.raises(VerifyError, match="before node 'a'"):
        verify(_model(g))
    g.sort()
    assert _names(g) == ["a", "if"]
    verify(_model(g))


def test_sort_cycle_names_a_node_on_the_cycle() -> None:
    x = Value("x", F32)
    # downstream(reads q) comes first; p and q form the cycle
    p = Node("", "Add", [x, None], outputs=[Value("p", F32)], name="p")
    q = _node("Neg", p.outputs[0], out="q", name="q")
    p.replace_input_with(1, q.outputs[0])
    down = _node("Exp", q.outputs[0], out="d", name="downstream")
    g = Graph([x], [down.outputs[0]], [down, p, q])
    with pytest.raises(VerifyError, match="cycle") as e:
        g.sort()
    assert e.value.node in (p, q)  # not 'downstream', which merely depends on the cycle
    assert "downstream" not in str(e.value)
    assert _names(g) == ["downstream", "p", "q"]  # a failed sort changes nothing


def test_sort_self_loop() -> None:
    x = Value("x", F32)
    n = Node("", "Add", [x, None], outputs=[Value("s", F32)], name="selfish")
    n.replace_input_with(1, n.outputs[0])
    g = Graph([x], [n.outputs[0]], [n])
    with pytest.raises(VerifyError, match="'selfish'.*own output"):
        g.sort()


# --- queries ---------------------------------------------------------------------------------


def test_find_nodes_and_all_nodes() -> None:
    x = Value("x", F32)
    a = _node("Relu", x, out="a", name="a")
    ms = _node("Gelu", a.outputs[0], out="g", name="gelu", domain="com.microsoft")
    if_node = _if_reading(ms.outputs[0])
    r2 = _node("Relu", if_node.outputs[0], out="r2", name="r2")
    g = Graph([x, if_node.inputs[0]], [r2.outputs[0]], [a, ms, if_node, r2])
    assert g.find_nodes("Relu") == [a, r2]
    assert g.find_nodes("Gelu") == [] and g.find_nodes("Gelu", "com.microsoft") == [ms]
    assert g.find_nodes("Neg") == []  # only this graph, not the branches
    # pre-order: the If, then its branches' nodes, then what follows
    assert [n.name for n in g.all_nodes()] == ["a", "gelu", "if", "if_inner", "if_inner_else", "r2"]
    model = _model(g, **{"com.microsoft": 1})
    assert len(list(model.all_nodes())) == 6
    assert [sg.name for sg in model.graphs()] == ["", "if_then", "if_else"]


def test_subgraph_parent_and_root() -> None:
    x = Value("x", F32)
    if_node = _if_reading(x)
    g = Graph([x, if_node.inputs[0]], [if_node.outputs[0]], [if_node], name="main")
    then_g = if_node.attributes["then_branch"].value
    assert then_g.parent is if_node and then_g.root() is g
    assert then_g.nodes[0].inputs[0].graph is g  # the outer value's defining graph


# --- initializers ----------------------------------------------------------------------------


def test_initializer_registration_errors() -> None:
    g = Graph()
    w = Value("w", F32, const_value=NumpyTensor(np.ones(3, np.float32)))
    g.register_initializer(w)
    g.register_initializer(w)  # the same value again: harmless
    assert g.initializers == {"w": w} and w.is_initializer()
    with pytest.raises(ValueError, match="already has an initializer named 'w'"):
        g.register_initializer(Value("w", F32, const_value=NumpyTensor(np.zeros(3, np.float32))))
    with pytest.raises(ValueError, match="no const_value"):
        g.register_initializer(Value("v", F32))
    with pytest.raises(ValueError, match="needs a name"):
        g.register_initializer(Value("", F32, const_value=NumpyTensor(np.ones(1, np.float32))))
    produced = _node("Relu", Value("x", F32), out="r").outputs[0]
    produced.const_value = NumpyTensor(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="produced by a node"):
        g.register_initializer(produced)
    assert list(g.initializers) == ["w"]  # nothing half-registered
    assert g.remove_initializer("w") is w and not w.is_initializer() and w.graph is None


def test_initializer_that_is_also_an_input_stays_an_input_when_unregistered() -> None:
    w = Value("w", F32, const_value=NumpyTensor(np.ones(3, np.float32)))
    g = Graph([w], [w], initializers=[w])
    assert w.is_graph_input() and w.is_initializer()
    g.remove_initializer("w")
    assert w.is_graph_input() and not w.is_initializer() and w.graph is g


def test_graph_input_cannot_be_a_node_output() -> None:
    produced = _node("Relu", Value("x", F32), out="r").outputs[0]
    with pytest.raises(ValueError, match="produced by a node"):
        Graph([produced])


# --- verify ----------------------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo[VerifyError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_verify_dangling_input() -> None:
    g, x, (a, b, c) = _chain()
    b.replace_input_with(0, Value("ghost", F32))
    with pytest.raises(VerifyError) as e:
        verify(_model(g))
    assert "'neg'" in _one_line(e) and "dangling" in str(e.value) and e.value.node is b


def test_verify_out_of_order_and_cycle() -> None:
    g, x, (a, b, c) = _chain()
    g.remove(a, safe=False)
    g.insert_after(c, a)  # relu now after its reader
    with pytest.raises(VerifyError) as e:
        verify(_model(g))
    assert "'neg'" in _one_line(e) and "before node 'relu'" in str(e.value)
    a.set_inputs([c.outputs[0]])  # relu (inputs dropped on removal) reads abs: a real cycle
    with pytest.raises(VerifyError, match="cycle"):
        g.sort()


def test_verify_self_cycle() -> None:
    g, x, (a, b, c) = _chain()
    b.replace_input_with(0, b.outputs[0])
    with pytest.raises(VerifyError, match="cycle: node 'neg'") as e:
        verify(_model(g))
    _one_line(e)


def test_verify_duplicate_names() -> None:
    g, x, (a, b, c) = _chain()
    b.outputs[0].name = "a"
    with pytest.raises(VerifyError) as e:
        verify(_model(g))
    assert "duplicate value name 'a'" in _one_line(e) and e.value.node is b


def test_verify_duplicate_name_between_input_and_subgraph_is_fine_only_in_different_graphs() -> None:
    g, x, (a, b, c) = _chain()
    b.outputs[0].name = "x"  # clashes with the graph input
    with pytest.raises(VerifyError, match="duplicate value name 'x'"):
        verify(_model(g))


def test_verify_unknown_domain() -> None:
    g, x, (a, b, c) = _chain()
    b.domain = "com.nowhere"
    with pytest.raises(VerifyError) as e:
        verify(_model(g))
    assert "'neg'" in _one_line(e) and "com.nowhere" in str(e.value) and e.value.node is b
    verify(_model(g, **{"com.nowhere": 1}))  # imported: fine
    # a model-local function's domain counts as known
    fn = Function("com.nowhere", "Neg", Graph([Value("i")], [], []))
    m = Model(g, opset_imports={"": 21}, functions={fn.id: fn})
    fn.graph.outputs = [fn.graph.inputs[0]]
    verify(m)


def test_verify_unknown_domain_inside_a_subgraph() -> None:
    x = Value("x", F32)
    if_node = _if_reading(x)
    if_node.attributes["then_branch"].value.nodes[0].domain = "com.nowhere"
    g = Graph([x, if_node.inputs[0]], [if_node.outputs[0]], [if_node])
    with pytest.raises(VerifyError, match="if_inner.*com.nowhere.*subgraph 'if_then'"):
        verify(_model(g))


def test_verify_stale_use_list() -> None:
    g, x, (a, b, c) = _chain()
    x._uses[(b, 0)] = None  # claims neg reads x: it does not
    with pytest.raises(VerifyError) as e:
        verify(_model(g))
    assert "stale use by node 'neg'" in _one_line(e) and e.value.node is b


def test_verify_missing_use() -> None:
    g, x, (a, b, c) = _chain()
    a.outputs[0]._uses.clear()
    with pytest.raises(VerifyError) as e:
        verify(_model(g))
    assert "'neg'" in _one_line(e) and "does not list the node as a use" in str(e.value)


def test_verify_use_by_removed_node() -> None:
    g, x, (a, b, c) = _chain()
    d = _node("Exp", a.outputs[0], out="d", name="exp")
    g.append(d)
    g.remove(d)
    a.outputs[0]._uses[(d, 0)] = None  # as if the removal had forgotten it
    with pytest.raises(VerifyError, match="removed node 'exp'"):
        verify(_model(g))


def test_verify_output_produced_by_removed_node() -> None:
    g, x, (a, b, c) = _chain()
    g.remove(c, safe=False)  # corrupting on purpose
    with pytest.raises(VerifyError, match="graph output 0 'c'"):
        verify(_model(g))


def test_verify_wrong_producer_index() -> None:
    g, x, (a, b, c) = _chain()
    b.outputs[0]._index = 3
    with pytest.raises(VerifyError, match="'neg'.*output 0 'b' names another producer"):
        verify(_model(g))


def test_verify_subgraph_reading_value_defined_after_the_enclosing_node() -> None:
    x = Value("x", F32)
    later = _node("Relu", x, out="later", name="later")
    if_node = _if_reading(later.outputs[0])
    g = Graph([x, if_node.inputs[0]], [if_node.outputs[0], later.outputs[0]], [if_node, later])
    with pytest.raises(VerifyError, match="if_inner.*before node 'later'"):
        verify(_model(g))


def test_verify_in_function_bodies() -> None:
    i = Value("i", F32)
    n = _node("Relu", Value("ghost", F32), out="o", name="fn_relu")
    fn = Function("local", "F", Graph([i], [n.outputs[0]], [n]), opset_imports={"": 21})
    g, x, _ = _chain()
    m = Model(g, opset_imports={"": 21, "local": 1}, functions={fn.id: fn})
    with pytest.raises(VerifyError, match="'fn_relu'.*dangling.*function local::F"):
        verify(m)


# --- clone -----------------------------------------------------------------------------------


def test_clone_is_independent() -> None:
    x = Value("x", F32)
    w = Value("w", F32, const_value=NumpyTensor(np.ones(3, np.float32)))
    a = Node("", "Add", [x, w], outputs=[Value("a", F32)], name="add")
    if_node = _if_reading(a.outputs[0])
    g = Graph([x, if_node.inputs[0]], [if_node.outputs[0]], [a, if_node], initializers=[w], name="main")
    g.metadata_props["k"] = "v"
    fn = Function("local", "F", Graph([Value("i")], [], []), attributes={"alpha": Attr("alpha", AttrType.FLOAT, 1.0)})
    fn.graph.outputs = [fn.graph.inputs[0]]
    m = Model(g, opset_imports={"": 21, "local": 1}, functions={fn.id: fn}, metadata_props={"m": "1"})
    c = m.clone()
    verify(c)
    cx = c.graph.inputs[0]
    assert cx is not x and cx.name == "x"
    # the cloned branch reads the cloned value, not the original
    c_if = c.graph.find_nodes("If")[0]
    c_inner = c_if.attributes["then_branch"].value.nodes[0]
    assert c_inner.inputs[0] is c.graph.nodes[0].outputs[0]
    assert c_if.attributes["then_branch"].value.parent is c_if
    # mutate the clone everywhere; the original does not move
    c.graph.nodes[0].set_attr(Attr.infer("note", 1))
    c.graph.metadata_props["k"] = "changed"
    c.metadata_props["m"] = "2"
    c.functions[fn.id].attributes["alpha"].value = 9.0
    c_inner.replace_input_with(0, cx)
    c.graph.remove(c_if, safe=False)
    assert "note" not in a.attributes and g.metadata_props["k"] == "v" and m.metadata_props["m"] == "1"
    assert fn.attributes["alpha"].value == 1.0
    assert len(g) == 2 and if_node in g
    assert [n.name for n, _ in a.outputs[0].uses()] == ["if_inner", "if_inner_else"]
    assert _uses(x) == [("add", 0)]
    # tensors are immutable and shared, not copied
    assert c.graph.initializers["w"].const_value is w.const_value
    verify(m)


def test_clone_keeps_initializer_input_identity() -> None:
    w = Value("w", F32, const_value=NumpyTensor(np.ones(3, np.float32)))
    g = Graph([w], [w], initializers=[w])
    c = Model(g).clone()
    cw = c.graph.inputs[0]
    assert c.graph.initializers["w"] is cw and cw.is_graph_input() and c.graph.outputs[0] is cw


# --- Attr.infer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind", "stored"),
    [
        (3, AttrType.INT, 3),
        (np.int64(3), AttrType.INT, 3),
        (True, AttrType.INT, 1),
        (np.bool_(True), AttrType.INT, 1),
        (0.5, AttrType.FLOAT, 0.5),
        (np.float32(0.5), AttrType.FLOAT, 0.5),
        ("s", AttrType.STRING, "s"),
        (b"\xff", AttrType.STRING, b"\xff"),
        ([1, 2], AttrType.INTS, [1, 2]),
        ((1, np.int32(2)), AttrType.INTS, [1, 2]),
        ([True, False], AttrType.INTS, [1, 0]),
        ([1, 2.5], AttrType.FLOATS, [1.0, 2.5]),
        (["a", b"b"], AttrType.STRINGS, ["a", b"b"]),
    ],
)
def test_attr_infer_scalars_and_lists(value: object, kind: AttrType, stored: object) -> None:
    a = Attr.infer("k", value)
    assert a.type == kind and a.value == stored and a.name == "k"
    assert type(a.value) is type(stored)


def test_attr_infer_tensors_graphs_and_errors() -> None:
    arr = np.arange(4, dtype=np.int32)
    t = Attr.infer("t", arr)
    assert t.type == AttrType.TENSOR and np.array_equal(t.value.numpy(), arr)
    nt = NumpyTensor(arr)
    assert Attr.infer("t", nt).value is nt
    assert Attr.infer("ts", [nt, nt]).type == AttrType.TENSORS
    sp = SparseTensor(NumpyTensor(np.ones(1, np.float32)), NumpyTensor(np.zeros(1, np.int64)), (2,))
    assert Attr.infer("s", sp).type == AttrType.SPARSE_TENSOR and Attr.infer("ss", [sp]).type == AttrType.SPARSE_TENSORS
    g = Graph()
    assert Attr.infer("g", g).type == AttrType.GRAPH and Attr.infer("gs", [g, Graph()]).type == AttrType.GRAPHS
    explicit = Attr("k", AttrType.INTS, [])
    assert Attr.infer("k", explicit) is explicit
    with pytest.raises(TypeError, match="empty list"):
        Attr.infer("k", [])
    with pytest.raises(TypeError, match="cannot infer"):
        Attr.infer("k", {"a": 1})
    with pytest.raises(TypeError, match="cannot infer"):
        Attr.infer("k", [1, "a"])


def test_node_attributes_from_dict_and_subgraph_parent() -> None:
    body = Graph(name="body")
    n = Node("", "Loop", [], {"body": body, "alpha": 0.5, "perm": [1, 0]}, name="loop")
    assert body.parent is n and n.subgraphs() == [body]
    assert n.attr("alpha") == 0.5 and n.attr("perm") == [1, 0] and n.attr("missing", 7) == 7
    assert n.attributes["perm"].type == AttrType.INTS

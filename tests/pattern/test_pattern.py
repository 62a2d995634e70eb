"""Pattern DSL, matcher, rules, greedy driver and explain (graphopt.pattern)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.check import NumericMismatchError, check_same_outputs
from graphopt.errors import UsageError
from graphopt.ir import Builder, Graph, Model, Node, Shape, TensorType, Value
from graphopt.ir.types import DataType
from graphopt.pattern import (
    Fail,
    Match,
    P,
    RewriteBuilder,
    RewriteError,
    RewritePass,
    Rule,
    apply_rules,
    explain,
    get_rule,
    list_rules,
    register_rule,
    unregister_rule,
)
from graphopt.transform import NumericCheckInstrument, PassContext, PassManager


def load(text: str) -> Model:
    """A model from ONNX's textual syntax (opset 21 unless the text says otherwise)."""
    if not text.lstrip().startswith("<"):
        text = '<ir_version: 10, opset_import: ["" : 21]>\n' + text
    return graphopt.load(onnx.parser.parse_model(text))


def ops(model: Model) -> list[str]:
    return [n.op_type for n in model.graph]


def first(model: Model, op_type: str) -> Node:
    return model.graph.find_nodes(op_type)[0]


# --- demo rules ----------------------------------------------------------------------------------


class MulByOne(Rule):
    """Mul(x, 1) -> x.

    Must not fire when the constant broadcasts x to a bigger shape (the output then differs
    from x); a non-scalar constant needs known, equal types of x and the output.
    """

    name = "test-mul-by-one"
    x = P.any("x")
    one = P.const(1.0, name="one")
    pattern = P.op("Mul", x, one, commutative=True)

    def check(self, m: Match) -> bool | Fail:
        if m.const(self.one).ndim == 0:
            return True  # a scalar never broadcasts x (and Mul's operands share one type)
        x = m[self.x]
        if x.type is None or x.type != m.root.outputs[0].type:
            return Fail(f"Mul changes the type of {x.name!r} (broadcast)")
        return True

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value:
        return m[self.x]


class MatMulAddToGemm(Rule):
    """MatMul(a, W) + c -> Gemm(a, W, c) for a 2-D `a` and a constant W and c.

    Must not fire when `a` is not 2-D (Gemm is 2-D only), when c does not broadcast to
    [M, N] unidirectionally, or when the MatMul result is also read elsewhere (the MatMul
    would then stay and the product be computed twice: the matcher's default refuses that).
    """

    name = "test-matmul-add-to-gemm"
    benefit = 2
    a = P.any("a").has_rank(2)
    w = P.const(name="W")
    c = P.const(name="c")
    mm = P.op("MatMul", a, w)
    pattern = P.op("Add", mm, c, commutative=True)

    def check(self, m: Match) -> bool | Fail:
        c = m.const(self.c)
        n = m.const(self.w).shape[-1]
        if c.ndim > 1 or (c.ndim == 1 and c.shape[0] not in (1, n)):
            return Fail(f"bias of shape {list(c.shape)} does not broadcast to [M, {n}]")
        return True

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value:
        return b.op.Gemm(m[self.a], m[self.w], m[self.c])


MATMUL_ADD = """
g (float[4,3] X) => (float[4,5] Y)
<float[3,5] W = {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}, float[5] C = {1,2,3,4,5}>
{
  T = MatMul(X, W)
  Y = Add(T, C)
}
"""


# --- matching each pattern kind ------------------------------------------------------------------


def test_captures_are_keyed_by_pattern_objects() -> None:
    m = load(MATMUL_ADD)
    rule = MatMulAddToGemm()
    match = rule.match(first(m, "Add"))
    assert match is not None
    assert match[rule.a] is m.graph.inputs[0]
    assert isinstance(match[rule.mm], Node) and match[rule.mm].op_type == "MatMul"
    assert match.value(rule.mm) is match[rule.mm].outputs[0]
    assert match[rule.w].name == "W" and match.const(rule.c).tolist() == [1, 2, 3, 4, 5]
    assert match.root is first(m, "Add")
    assert [n.op_type for n in match.nodes] == ["MatMul", "Add"]  # topological
    with pytest.raises(KeyError, match="not part of this match"):
        match[P.any()]


def test_demo_fusion_fires_verifies_and_keeps_outputs() -> None:
    m = load(MATMUL_ADD)
    before = m.clone()
    res = apply_rules(m, [MatMulAddToGemm()])
    assert res.changed and res.stats == {"test-matmul-add-to-gemm": 1}
    assert [str(r) for r in res.rewrites] == ["test-matmul-add-to-gemm on [MatMul -> 'T', Add -> 'Y']"]
    assert ops(m) == ["Gemm"]
    m.verify()
    assert [o.name for o in m.graph.outputs] == ["Y"]  # the fresh Gemm output took the name
    assert check_same_outputs(before, m).ok
    again = apply_rules(m, [MatMulAddToGemm()])  # idempotent
    assert not again.changed and again.rewrites == [] and ops(m) == ["Gemm"]


def test_commutative_matches_both_orders_and_plain_does_not() -> None:
    m = load("""
    g (float[4,3] X) => (float[4,5] Y)
    <float[3,5] W = {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}, float[5] C = {1,2,3,4,5}>
    { T = MatMul(X, W)
      Y = Add(C, T) }
    """)
    assert MatMulAddToGemm().match(first(m, "Add")) is not None
    x, w, c = P.any(), P.const(), P.const()
    plain = Rule("test-plain", P.op("Add", P.op("MatMul", x, w), c), rewrite=lambda mt, b: b.op.Gemm(mt[x], mt[w], mt[c]))
    assert plain.match(first(m, "Add")) is None
    assert "input 0 'C' is not the output of a MatMul (an initializer)" in (plain.why_not(first(m, "Add")) or "")
    before = m.clone()
    assert apply_rules(m, [MatMulAddToGemm()]).stats == {"test-matmul-add-to-gemm": 1}
    assert check_same_outputs(before, m).ok


@pytest.mark.parametrize(
    "text, reason",
    [
        # the MatMul result is also read by Relu: fusing would compute it twice
        (
            """g (float[4,3] X) => (float[4,5] Y, float[4,5] R)
            <float[3,5] W = {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}, float[5] C = {1,2,3,4,5}>
            { T = MatMul(X, W)
              Y = Add(T, C)
              R = Relu(T) }""",
            "node MatMul -> 'T': output 'T' is also used by Relu -> 'R', outside the match",
        ),
        # W is a graph input, not a constant
        (
            """g (float[4,3] X, float[3,5] W) => (float[4,5] Y)
            <float[5] C = {1,2,3,4,5}>
            { T = MatMul(X, W)
              Y = Add(T, C) }""",
            "node MatMul -> 'T': input 1 'W' is not a constant (a graph input)",
        ),
        # 3-D input: has_rank(2) fails
        (
            """g (float[2,4,3] X) => (float[2,4,5] Y)
            <float[3,5] W = {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}, float[5] C = {1,2,3,4,5}>
            { T = MatMul(X, W)
              Y = Add(T, C) }""",
            "node MatMul -> 'T': input 0 'X': rank is not 2",
        ),
        # the check refuses a bias that does not broadcast the Gemm way
        (
            """g (float[4,3] X) => (float[4,5] Y)
            <float[3,5] W = {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}, float[4,1] C = {1,2,3,4}>
            { T = MatMul(X, W)
              Y = Add(T, C) }""",
            "check failed: bias of shape [4, 1] does not broadcast to [M, 5]",
        ),
    ],
)
def test_near_misses_do_not_fire_and_say_why(text: str, reason: str) -> None:
    m = load(text)
    rule = MatMulAddToGemm()
    assert rule.why_not(first(m, "Add")) == reason
    before = ops(m)
    assert not apply_rules(m, [rule]).changed
    assert ops(m) == before


def test_allow_shared_keeps_the_shared_node() -> None:
    m = load("""
    g (float[4,3] X) => (float[4,5] Y, float[4,5] R)
    <float[3,5] W = {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}, float[5] C = {1,2,3,4,5}>
    { T = MatMul(X, W)
      Y = Add(T, C)
      R = Relu(T) }
    """)
    rule = MatMulAddToGemm()
    rule.allow_shared = True
    before = m.clone()
    assert apply_rules(m, [rule]).changed
    assert sorted(ops(m)) == ["Gemm", "MatMul", "Relu"]  # MatMul still feeds Relu
    m.verify()
    assert check_same_outputs(before, m).ok


def test_attributes_with_onnx_defaults_and_predicates() -> None:
    m = load("""
    g (float[4,3] A, float[5,3] B) => (float[4,5] Y, float[4,5] Z)
    { Y = Gemm(A, B) <transB = 1>
      Z = Gemm(A, B) <transB = 1, alpha = 0.5> }
    """)
    y, z = m.graph.find_nodes("Gemm")
    unit = Rule("test-unit-gemm", P.op("Gemm", P.any(), P.any(), attrs={"alpha": 1.0, "transA": 0}), rewrite=lambda mt, b: Fail("x"))
    assert unit.match(y) is not None  # alpha and transA absent: ONNX defaults 1.0 and 0
    assert unit.why_not(z) == "node Gemm -> 'Z': attribute alpha=0.5, expected 1.0"
    big = Rule("test-alpha-pred", P.op("Gemm", P.any(), P.any(), attrs={"alpha": lambda a: a < 1}), rewrite=lambda mt, b: Fail("x"))
    assert big.match(z) is not None and big.match(y) is None
    wrong = Rule("test-transb0", P.op("Gemm", P.any(), P.any(), attrs={"transB": 0}), rewrite=lambda mt, b: Fail("x"))
    assert wrong.why_not(y) == "node Gemm -> 'Y': attribute transB=1, expected 0"


def test_dtype_and_shape_predicates() -> None:
    m = load("""
    g (double[4,3] D, float[4,3] F) => (double[4,3] Y, float[4,3] Z)
    { Y = Relu(D)
      Z = Relu(F) }
    """)
    yd, zf = m.graph.find_nodes("Relu")
    fl = Rule("test-float-relu", P.op("Relu", P.any().has_dtype("float")), rewrite=lambda mt, b: Fail("x"))
    assert fl.match(zf) is not None
    assert fl.why_not(yd) == "node Relu -> 'Y': input 0 'D': element type is not float"
    shaped = Rule("test-shape", P.op("Relu", P.any().has_shape([None, 3])).has_dtype(np.float64), rewrite=lambda mt, b: Fail("x"))
    assert shaped.match(yd) is not None
    assert shaped.why_not(zf) == "node Relu -> 'Z': element type is not double"
    pred = Rule("test-where", P.op("Relu", P.any().where(lambda v: v.name == "F", "not F")), rewrite=lambda mt, b: Fail("x"))
    assert pred.match(zf) is not None and pred.why_not(yd) == "node Relu -> 'Y': input 0 'D': not F"


def test_const_value_matches_initializers_and_constant_nodes_but_not_overridable_inputs() -> None:
    m = load("""
    g (float[2] X, float one_in) => (float[2] A, float[2] B, float[2] C, float[2] D)
    <float one = {1.0}, float two = {2.0}, float one_in = {1.0}>
    { k = Constant <value_float = 1.0> ()
      A = Mul(X, one)
      B = Mul(X, k)
      C = Mul(X, two)
      D = Mul(X, one_in) }
    """)
    a, bb, c, d = m.graph.find_nodes("Mul")
    rule = MulByOne()
    assert rule.match(a) is not None and rule.match(bb) is not None
    assert rule.why_not(c) == "node Mul -> 'C': input 1 'two' is a constant but not 1.0"
    # an initializer that is also a graph input can be overridden at run time: not a constant
    assert "input 1 'one_in' is not a constant" in (rule.why_not(d) or "")


def test_alternatives_and_which() -> None:
    m = load("""
    g (float[2] X) => (float[2] A, float[2] B, float[2] C)
    { r = Relu(X)
      s = Sigmoid(X)
      t = Tanh(X)
      A = Neg(r)
      B = Neg(s)
      C = Neg(t) }
    """)
    x = P.any()
    relu, sig = P.op("Relu", x), P.op("Sigmoid", x)
    act = relu | sig
    rule = Rule("test-alt", P.op("Neg", act), rewrite=lambda mt, b: Fail("x"))
    a, bb, c = m.graph.find_nodes("Neg")
    ma, mb = rule.match(a), rule.match(bb)
    assert ma is not None and mb is not None
    assert ma.which(act) == 0 and ma[relu].op_type == "Relu" and relu in ma and sig not in ma
    assert mb.which(act) == 1 and mb[sig].op_type == "Sigmoid" and mb[act].name == "s"
    assert rule.why_not(c) == "node Neg -> 'C': input 0 't' matches no alternative of (Relu(any) | Sigmoid(any)) (produced by Tanh -> 't')"
    # an alternative root: rules are indexed under every root op
    root_alt = Rule("test-alt-root", P.op("Relu", x) | P.op("Tanh", x), rewrite=lambda mt, b: Fail("x"))
    assert sorted(op for _, op in root_alt.root_ops) == ["Relu", "Tanh"]


def test_optional_inputs_present_and_absent() -> None:
    m = load("""
    g (float[1,2,4,4] X) => (float[1,3,4,4] Y, float[1,3,4,4] Z, float[1,3,4,4] U)
    <float[3,2,1,1] W = {1,2,3,4,5,6}, float[3] B = {1,2,3}>
    { Y = Conv(X, W, B)
      Z = Conv(X, W)
      U = Conv(X, W, "") }
    """)
    bias = P.optional(P.const())
    rule = Rule("test-conv", P.op("Conv", P.any(), P.const(), bias), rewrite=lambda mt, b: Fail("x"))
    y, z, u = m.graph.find_nodes("Conv")
    my, mz, mu = rule.match(y), rule.match(z), rule.match(u)
    assert my is not None and my[bias].name == "B"
    assert mz is not None and mz[bias] is None
    assert mu is not None and mu[bias] is None  # an omitted ("") input counts as absent
    no_bias = Rule("test-conv2", P.op("Conv", P.any(), P.const()), rewrite=lambda mt, b: Fail("x"))
    assert no_bias.why_not(y) == "node Conv -> 'Y' has 3 inputs, the pattern expects at most 2"
    need_bias = Rule("test-conv3", P.op("Conv", P.any(), P.const(), P.const()), rewrite=lambda mt, b: Fail("x"))
    assert need_bias.why_not(z) == "node Conv -> 'Z': input 2 is absent"


def test_multi_output_patterns() -> None:
    m = load("""
    g (float[4] X) => (float[2] Y, float[2] Z)
    { a, b = Split <axis = 0, num_outputs = 2> (X)
      Y = Add(b, a)
      Z = Relu(a) }
    """)
    split = P.op("Split", P.any(), outputs=2)
    swapped = P.op("Add", split[1], split[0])
    assert split[1] is split[1]  # the same capture key every time
    rule = Rule("test-split", swapped, rewrite=lambda mt, b: Fail("x"), allow_shared=True)
    mt = rule.match(first(m, "Add"))
    assert mt is not None and mt[split[0]].name == "a" and mt[split[1]].name == "b" and mt[split].op_type == "Split"
    assert [n.op_type for n in mt.nodes] == ["Split", "Add"]
    straight = Rule("test-split2", P.op("Add", split[0], split[1]), rewrite=lambda mt, b: Fail("x"), allow_shared=True)
    assert straight.why_not(first(m, "Add")) == "node Add -> 'Y': input 0 'b' is not output 0 of a Split (output 1 of Split -> 'a')"
    three = Rule("test-split3", P.op("Relu", P.op("Split", P.any(), outputs=3)[0]), rewrite=lambda mt, b: Fail("x"))
    assert three.why_not(first(m, "Relu")) == "node Split -> 'a' has 2 outputs, expected 3"


def test_same_pattern_twice_must_bind_the_same_value() -> None:
    m = load("""
    g (float[2] X, float[2] Y) => (float[2] A, float[2] B)
    { A = Mul(X, X)
      B = Mul(X, Y) }
    """)
    x = P.any()
    square = Rule("test-square", P.op("Mul", x, x), rewrite=lambda mt, b: b.op.Pow(mt[x], b.constant(2.0, dtype=np.float32)))
    a, bb = m.graph.find_nodes("Mul")
    assert square.match(a) is not None
    assert square.why_not(bb) == "node Mul -> 'B': input 1 'Y' must be the same value as 'X'"
    before = m.clone()
    assert apply_rules(m, [square]).stats == {"test-square": 1}
    m.verify()
    assert check_same_outputs(before, m).ok


def test_single_use_predicate() -> None:
    m = load("""
    g (float[2] X) => (float[2] A, float[2] B)
    { r = Relu(X)
      A = Neg(r)
      B = Abs(r) }
    """)
    rule = Rule("test-single", P.op("Neg", P.any().single_use()), rewrite=lambda mt, b: Fail("x"))
    assert rule.why_not(first(m, "Neg")) == "node Neg -> 'A': input 0 'r': 'r' has 2 uses, the pattern needs exactly one"


# --- the driver ----------------------------------------------------------------------------------


def test_mul_by_one_elimination_keeps_graph_output_names() -> None:
    m = load("""
    g (float[2] X) => (float[2] Y, float[2] Z)
    <float one = {1.0}>
    { t = Relu(X)
      u = Mul(t, one)
      Y = Neg(u)
      Z = Mul(one, X) }
    """)
    before = m.clone()
    res = apply_rules(m, [MulByOne()])
    assert res.stats == {"test-mul-by-one": 2}
    m.verify()
    # Z = Mul(one, X) -> X is a graph input: an Identity carries the output name
    assert [o.name for o in m.graph.outputs] == ["Y", "Z"]
    assert ops(m) == ["Relu", "Neg", "Identity"]
    assert check_same_outputs(before, m).ok
    assert not apply_rules(m, [MulByOne()]).changed


def test_broadcasting_mul_by_one_is_refused() -> None:
    m = load("""
    g (float[2] X) => (float[3,2] Y)
    <float[3,1] one = {1.0, 1.0, 1.0}>
    { Y = Mul(X, one) }
    """)
    rule = MulByOne()
    assert rule.why_not(first(m, "Mul")) == "check failed: Mul changes the type of 'X' (broadcast)"
    assert not apply_rules(m, [rule]).changed


def test_chains_reach_a_fixed_point_in_one_call() -> None:
    m = load("""
    g (float[2] X) => (float[2] Y)
    <float one = {1.0}>
    { a = Mul(X, one)
      b = Mul(a, one)
      c = Mul(one, b)
      Y = Relu(c) }
    """)
    before = m.clone()
    res = apply_rules(m, [MulByOne()])
    assert res.stats == {"test-mul-by-one": 3} and ops(m) == ["Relu"]
    assert check_same_outputs(before, m).ok


def test_benefit_order_decides_between_rules_on_one_root() -> None:
    text = """
    g (float[2] X) => (float[2] Y)
    { Y = Relu(X) }
    """
    x = P.any()
    low = Rule("test-low", P.op("Relu", x), rewrite=lambda mt, b: b.op.Max(mt[x], mt[x]), benefit=1)
    high = Rule("test-high", P.op("Relu", x), rewrite=lambda mt, b: b.op.Abs(mt[x]), benefit=5)
    for order in ([low, high], [high, low]):
        m = load(text)
        res = apply_rules(m, order)
        assert res.stats == {"test-high": 1} and ops(m) == ["Abs"]
    m = load(text)
    assert apply_rules(m, [low, Rule("test-eq", P.op("Relu", x), rewrite=lambda mt, b: b.op.Abs(mt[x]))]).stats == {
        "test-low": 1
    }  # equal benefit: the given order


def test_check_or_rewrite_failure_falls_through_to_the_next_rule() -> None:
    m = load("""
    g (float[2] X) => (float[2] Y)
    { Y = Relu(X) }
    """)
    x = P.any()
    backs_out = Rule("test-backs-out", P.op("Relu", x), rewrite=lambda mt, b: (b.op.Neg(mt[x]), Fail("changed my mind"))[1], benefit=9)
    refuses = Rule("test-refuses", P.op("Relu", x), rewrite=lambda mt, b: b.op.Neg(mt[x]), check=lambda mt: False, benefit=8)
    takes = Rule("test-takes", P.op("Relu", x), rewrite=lambda mt, b: b.op.Abs(mt[x]))
    res = apply_rules(m, [backs_out, refuses, takes])
    assert res.stats == {"test-takes": 1} and ops(m) == ["Abs"]  # the Neg built then abandoned is gone
    m.verify()


def test_iteration_bound_and_runaway_rules_terminate() -> None:
    m = load("""
    g (float[2] X) => (float[2] Y)
    { Y = Relu(X) }
    """)
    x = P.any()
    # a rule that always fires on its own output never converges
    forever = Rule("test-forever", P.op("Relu", x), rewrite=lambda mt, b: b.op.Relu(mt[x]))
    ctx = PassContext()
    res = apply_rules(m, [forever], ctx, max_iterations=2)
    assert 0 < res.stats["test-forever"] <= 2 * (10 * 1 + 100)
    assert any("still changing after 2 iterations" in line for line in ctx.log)
    m.verify()
    assert apply_rules(m, [forever], max_rewrites=7).stats == {"test-forever": 7}


def test_rewrite_limit_is_honoured_and_deterministic() -> None:
    text = """
    g (float[2] X) => (float[2] Y)
    <float one = {1.0}>
    { a = Mul(X, one)
      b = Mul(a, one)
      c = Mul(b, one)
      Y = Relu(c) }
    """
    full = apply_rules(load(text), [MulByOne()])
    for k in range(4):
        m = load(text)
        res = apply_rules(m, [MulByOne()], PassContext(rewrite_limit=k))
        assert len(res.rewrites) == k and res.rewrites == full.rewrites[:k]
        assert ops(m).count("Mul") == 3 - k
        m.verify()


def test_numeric_check_bisects_to_the_bad_rewrite() -> None:
    """A wrong rule (Mul(x, c) -> x for any c) in a RewritePass: --verify-each names the rewrite."""
    x = P.any()
    c = P.const(predicate=lambda a: bool(np.all(np.abs(a - 1) < 0.1)))
    sloppy = Rule("test-sloppy-mul", P.op("Mul", x, c), rewrite=lambda mt, b: mt[x])

    @dataclass(frozen=True)
    class Sloppy(RewritePass):
        """Remove multiplications by constants near one (wrong on purpose)."""

        name: ClassVar[str] = "test-sloppy"
        rules: ClassVar[tuple[Rule, ...]] = (sloppy,)

    m = load("""
    g (float[2] X) => (float[2] Y)
    <float one = {1.0}, float near = {1.05}>
    { a = Mul(X, one)
      [bad] b = Mul(a, near)
      Y = Relu(b) }
    """)
    with pytest.raises(NumericMismatchError, match=r"first bad rewrite: test-sloppy-mul on \[bad\]"):
        PassManager([Sloppy()], [NumericCheckInstrument()]).run(m)


def test_rules_apply_inside_if_branches_and_functions() -> None:
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["X", "one"], ["t_out"])], "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Relu", ["X"], ["r"]), helper.make_node("Mul", ["one", "r"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2])],
    )
    main = helper.make_graph(
        [helper.make_node("If", ["C"], ["Y"], then_branch=then_g, else_branch=else_g)],
        "main",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("C", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2])],
        [one],
    )
    proto = helper.make_model(main, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    m = graphopt.load(proto)
    for b in m.graph.all_nodes():
        for o in b.outputs:
            if o.type is None:
                o.type = TensorType(DataType.FLOAT, Shape((2,)))
    before = m.clone()
    res = apply_rules(m, [MulByOne()])
    assert res.stats == {"test-mul-by-one": 2}
    m.verify()
    if_node = first(m, "If")
    then_b, else_b = if_node.attr("then_branch"), if_node.attr("else_branch")
    assert [n.op_type for n in then_b] == ["Identity"]  # X is from the outer scope: Identity
    assert [n.op_type for n in else_b] == ["Relu"] and else_b.outputs[0].name == "e_out"
    for cond in (True, False):
        feeds = {"X": np.array([1.5, -2.0], np.float32), "C": np.array(cond)}
        assert check_same_outputs(before, m, feeds).ok


def test_matches_do_not_reach_into_enclosing_graphs() -> None:
    body = helper.make_graph(
        [helper.make_node("Neg", ["r"], ["b_out"])], "then", [], [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, [2])]
    )
    main = helper.make_graph(
        [helper.make_node("Relu", ["X"], ["r"]), helper.make_node("If", ["C"], ["Y"], then_branch=body, else_branch=body)],
        "main",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("C", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2])],
    )
    m = graphopt.load(helper.make_model(main, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    rule = Rule("test-neg-relu", P.op("Neg", P.op("Relu", P.any())), rewrite=lambda mt, b: Fail("x"))
    inner = next(iter(first(m, "If").attr("then_branch")))
    assert rule.why_not(inner) == "node Relu -> 'r' is in an enclosing graph, outside the root's subgraph"


def test_function_bodies_are_rewritten() -> None:
    m = load("""
    <ir_version: 10, opset_import: ["" : 21, "local" : 1]>
    g (float[2] X) => (float[2] Y) { Y = local.f(X) }
    <domain: "local", opset_import: ["" : 21]>
    f (A) => (B) {
      one = Constant <value_float = 1.0> ()
      t = Mul(A, one)
      s = Mul(t, t)
      B = Relu(s)
    }
    """)
    x = P.any()
    loose = Rule("test-fn-mul-one", P.op("Mul", x, P.const(1.0)), rewrite=lambda mt, b: mt[x])  # function values are untyped
    square = Rule("test-fn-square", P.op("Mul", x, x), rewrite=lambda mt, b: b.op.Pow(mt[x], b.constant(2.0, dtype=np.float32)))
    before = m.clone()
    assert apply_rules(m, [loose, square]).stats == {"test-fn-mul-one": 1, "test-fn-square": 1}
    body = next(iter(m.functions.values())).graph
    # the dead Constant went with the Mul; Pow's exponent is a Constant node (no initializers here)
    assert [n.op_type for n in body] == ["Constant", "Pow", "Relu"]
    assert not m.graph.initializers
    m.verify()
    assert check_same_outputs(before, m).ok


def test_bad_rewrites_raise_clear_errors() -> None:
    m = load("""
    g (float[2] X) => (float[2] Y)
    { Y = Relu(X) }
    """)
    selfish = Rule("test-selfish", P.op("Relu", P.any()), rewrite=lambda mt, b: mt.root.outputs[0])
    with pytest.raises(RewriteError, match="replaced output 'Y' of Relu -> 'Y' by itself"):
        apply_rules(m, [selfish])
    two = Rule("test-two", P.op("Relu", P.any()), rewrite=lambda mt, b: [mt.root.inputs[0], mt.root.inputs[0]])
    with pytest.raises(RewriteError, match="2 replacements for 1 outputs"):
        apply_rules(m, [two])
    with pytest.raises(UsageError, match="has no rewrite"):
        Rule("test-none", P.op("Relu", P.any()))
    with pytest.raises(TypeError, match="must be rooted at an op pattern"):
        Rule("test-any-root", P.any(), rewrite=lambda mt, b: None)  # type: ignore[arg-type,return-value]


def test_debug_mode_verifies_after_each_rewrite() -> None:
    m = load("""
    g (float[2] X) => (float[2] Y)
    { r = Relu(X)
      Y = Neg(r) }
    """)
    x = P.any()

    def dangling(mt: Match, b: RewriteBuilder) -> Value:
        return b.op.Abs(Value("nowhere"))  # reads a value no one defines

    bad = Rule("test-dangling", P.op("Relu", x), rewrite=dangling)
    with pytest.raises(graphopt.VerifyError, match=r"rule 'test-dangling' on \[Relu -> 'r'\] left an invalid model"):
        apply_rules(m, [bad], PassContext(debug=True))


def test_big_graphs_are_near_linear() -> None:
    def chain(n: int) -> Model:
        x = Value("X", TensorType(DataType.FLOAT, Shape((2,))))
        g = Graph([x], [], name="g")
        b = Builder(g)
        one = b.initializer(np.array(1.0, np.float32), "one")
        v = x
        for i in range(n):
            v = b.op.Relu(v) if i % 2 else b.op.Mul(v, one)
            v.type = x.type
        v.name = "Y"
        g.outputs.append(v)
        return Model(g)

    times = []
    for n in (1000, 4000):
        m = chain(n)
        t0 = time.perf_counter()
        res = apply_rules(m, [MulByOne(), MatMulAddToGemm()])
        times.append(time.perf_counter() - t0)
        assert res.stats == {"test-mul-by-one": n // 2}
        assert len(m.graph) == n // 2
    assert times[1] < 8 * times[0] + 0.5, times  # 4x the nodes: far from quadratic


# --- explain and the registry --------------------------------------------------------------------


def test_explain_names_the_failing_node_and_reason() -> None:
    m = load("""
    g (float[4,3] X, float[3,5] W) => (float[4,5] Y, float[4,5] Z, float[4,5] R)
    <float[5] C = {1,2,3,4,5}, float[3,5] K = {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}>
    { [mm1] T = MatMul(X, W)
      [add1] Y = Add(T, C)
      [mm2] X2 = MatMul(X, K)
      [add2] Z = Add(X2, C)
      [relu] R = Relu(X2) }
    """)
    text = explain(m, MatMulAddToGemm())
    lines = text.splitlines()
    assert lines[0] == "rule 'test-matmul-add-to-gemm' does not fire: 2 candidate roots (Add), none matches"
    assert lines[1] == "pattern: Add(MatMul(a, W), c)"
    # both got as deep as the MatMul; the first in graph order comes first
    assert "1. at 'add1' (Add) -- matched 2 node(s): 'mm1' (MatMul), 'add1' (Add)" in text
    assert "node 'mm1' (MatMul): input 1 'W' is not a constant (a graph input)" in text
    assert "node 'mm2' (MatMul): output 'X2' is also used by 'relu' (Relu), outside the match" in text
    assert explain(m, MulByOne()).startswith("rule 'test-mul-by-one' does not fire: the model has no Mul node")
    fires = explain(load(MATMUL_ADD), MatMulAddToGemm())
    assert fires.startswith("rule 'test-matmul-add-to-gemm' fires at 1 of 1 candidate roots (Add):")


def test_explain_ranks_deeper_partial_matches_first() -> None:
    m = load("""
    g (float[4,3] X) => (float[4,5] Y, float[4,3] Z)
    <float[5] C = {1,2,3,4,5}, float[3,5] W = {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}, float[4,1] D = {1,2,3,4}>
    { [shallow] Z = Add(X, X)
      [mm] T = MatMul(X, W)
      [deep] Y = Add(T, D) }
    """)
    text = explain(m, MatMulAddToGemm())
    assert text.index("1. at 'deep' (Add)") < text.index("2. at 'shallow' (Add)")
    assert "check failed: bias of shape [4, 1] does not broadcast to [M, 5]" in text
    assert "node 'shallow' (Add): input 0 'X' is not the output of a MatMul (a graph input)" in text


def test_rule_registry() -> None:
    @register_rule
    class Registered(MulByOne):
        """Mul(x, 1) -> x (registry test). Must not fire on broadcasts."""

        name = "test-registered-rule"

    try:
        assert isinstance(get_rule("test-registered-rule"), Registered)
        assert "test-registered-rule" in list_rules()
        with pytest.raises(UsageError, match="did you mean 'test-registered-rule'"):
            get_rule("test-registered-rul")
        with pytest.raises(UsageError, match="rule name clash"):
            register_rule(Rule("test-registered-rule", P.op("Relu", P.any()), rewrite=lambda mt, b: Fail("x")))
        assert get_rule("test-registered-rule").summary() == "Mul(x, 1) -> x (registry test). Must not fire on broadcasts."
    finally:
        unregister_rule("test-registered-rule")


def test_registered_rules_document_before_after_and_when_not() -> None:
    """Every registered rule's docstring states before -> after and when it must not fire."""
    for name, rule in list_rules().items():
        doc = (rule.__doc__ or "").lower()
        assert "->" in doc or "\u2192" in doc, f"rule {name}: docstring lacks 'before -> after'"
        assert "not" in doc, f"rule {name}: docstring does not say when it must not fire"


@pytest.mark.parametrize("ir_version, fires", [(3, True), (8, False)])
def test_const_accepts_input_initializers_only_below_ir_4(ir_version: int, fires: bool) -> None:
    """In IR < 4 every initializer is also listed as a graph input and is a constant (what
    onnxruntime does); from IR 4 on such an input can be fed by the user, so it is not."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [3, 5], np.arange(15, dtype=np.float32))
    c = helper.make_tensor("C", TensorProto.FLOAT, [5], np.arange(5, dtype=np.float32))
    g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["T"]), helper.make_node("Add", ["T", "C"], ["Y"])],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("X", [4, 3]), ("W", [3, 5]), ("C", [5]))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 5])],
        [w, c],
    )
    m = graphopt.load(helper.make_model(g, ir_version=ir_version, opset_imports=[helper.make_opsetid("", 9)]))
    before = m.clone()
    res = apply_rules(m, [MatMulAddToGemm()])
    assert res.changed is fires
    assert ("fires at 1" in explain(before, MatMulAddToGemm())) is fires
    if fires:
        assert [n.op_type for n in m.graph] == ["Gemm"]
        feeds = {"X": np.ones((4, 3), np.float32)}
        assert check_same_outputs(before, m, feeds).ok

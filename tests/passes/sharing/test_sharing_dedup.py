"""share-weights: finds every duplicate (main graph, If/Loop bodies, functions), never merges
tensors that differ in one bit, dtype or shape, stores one copy in the exported ONNX, keeps
outputs bit-identical through onnxruntime, and a second run changes nothing."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.check import check_same_outputs, random_inputs
from graphopt.errors import UsageError
from graphopt.ir import Model
from graphopt.transform import PassContext, get_pass, parse_pipeline

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def t(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def const(out, arr):
    return helper.make_node("Constant", [], [out], value=t(out, arr))


def make(nodes, inputs, outputs, inits=(), *, opset=17, ir=8, functions=()) -> Model:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("local", 1)] if functions else [])
    return graphopt.load(helper.make_model(g, opset_imports=opsets, ir_version=ir, functions=list(functions)))


def run(model: Model, **options):
    """share-weights on a copy: (new model, stats); checks verify(), bit-identical outputs and
    that a second run is a no-op."""
    out = model.clone()
    result = get_pass("share-weights")(**options).run(out, PassContext())
    out.verify()
    if not options.get("tolerance"):
        cmp = check_same_outputs(model, out, random_inputs(model), rtol=0, atol=0)
        assert cmp.ok, cmp.detail
    again = out.clone()
    assert not get_pass("share-weights")(**options).run(again, PassContext()).changed
    return out, result.stats


def stored_payloads(model: Model) -> list[bytes]:
    """sha256 of every tensor the exported ONNX stores (initializers and Constant values, in
    every graph), so a test can count copies."""
    proto = graphopt.to_onnx(model)
    out = []

    def walk(g: onnx.GraphProto) -> None:
        for init in g.initializer:
            out.append(hashlib.sha256(numpy_helper.to_array(init).tobytes() + str(init.dims).encode()).digest())
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    out.append(hashlib.sha256(numpy_helper.to_array(a.t).tobytes() + str(a.t.dims).encode()).digest())
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(sub)

    walk(proto.graph)
    for f in proto.functions:
        for n in f.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    out.append(hashlib.sha256(numpy_helper.to_array(a.t).tobytes() + str(a.t.dims).encode()).digest())
    return out


def digest(arr) -> bytes:
    arr = np.asarray(arr)
    return hashlib.sha256(arr.tobytes() + str(list(arr.shape)).encode()).digest()


# --- fires ---------------------------------------------------------------------------------------
def test_duplicates_everywhere_are_found_and_stored_once():
    W = RNG.standard_normal((4, 4)).astype(np.float32)
    V = RNG.standard_normal((4,)).astype(np.float32)
    # the If branches each hold a Constant equal to W (a copy defined in neither: it moves to
    # the main graph) and to V (main has V as an initializer: the branch reads it from outside)
    then_g = helper.make_graph(
        [const("tw", W), const("tv", V), helper.make_node("MatMul", ["x", "tw"], ["t0"]), helper.make_node("Add", ["t0", "tv"], ["to"])],
        "then", [], [vi("to", [2, 4])],
    )
    else_g = helper.make_graph(
        [const("ew", W), const("ev", V), helper.make_node("MatMul", ["x", "ew"], ["e0"]), helper.make_node("Sub", ["e0", "ev"], ["eo"])],
        "else", [], [vi("eo", [2, 4])],
    )
    # a Loop body holding a third copy of W as Constant
    body = helper.make_graph(
        [const("lw", W), helper.make_node("MatMul", ["acc", "lw"], ["acc2"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("acc", [2, 4])],
        [vi("cond_out", [], TensorProto.BOOL), vi("acc2", [2, 4])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"]),
        helper.make_node("MatMul", ["a", "W2"], ["b"]),  # W2: a copy of W1
        helper.make_node("Add", ["b", "V1"], ["c"]),
        const("cw", W),  # a Constant copy of W1 in the main graph
        helper.make_node("MatMul", ["c", "cw"], ["d"]),
        helper.make_node("If", ["flag"], ["e"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["n", "", "d"], ["f"], body=body),
        helper.make_node("Add", ["e", "f"], ["y"]),
    ]
    inits = [t("W1", W), t("W2", W.copy()), t("V1", V), t("n", np.array(2, np.int64))]
    m = make(nodes, [vi("x", [2, 4]), vi("flag", [], TensorProto.BOOL)], [vi("y", [2, 4])], inits)
    before = stored_payloads(m)
    assert before.count(digest(W)) == 6 and before.count(digest(V)) == 3
    out, stats = run(m)
    # W: W2, cw, tw, ew, lw merged into W1; V: tv, ev merged into V1
    assert stats["tensors-merged"] == 7 and stats["groups"] == 2
    assert stats["bytes-saved"] == 5 * W.nbytes + 2 * V.nbytes
    after = stored_payloads(out)
    assert after.count(digest(W)) == 1 and after.count(digest(V)) == 1
    # the branch bodies now read the main graph's initializers (outer-scope references)
    if_node = next(n for n in out.graph if n.op_type == "If")
    then_body = if_node.attributes["then_branch"].value
    mm = next(n for n in then_body if n.op_type == "MatMul")
    assert mm.inputs[1] is out.graph.initializers["W1"]


def test_copies_only_in_branches_move_to_their_common_parent():
    W = RNG.standard_normal((3, 3)).astype(np.float32)
    then_g = helper.make_graph([const("tw", W), helper.make_node("MatMul", ["x", "tw"], ["to"])], "then", [], [vi("to", [3, 3])])
    else_g = helper.make_graph([const("ew", W), helper.make_node("Add", ["x", "ew"], ["eo"])], "else", [], [vi("eo", [3, 3])])
    m = make(
        [helper.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g)],
        [vi("x", [3, 3]), vi("flag", [], TensorProto.BOOL)], [vi("y", [3, 3])],
    )
    out, stats = run(m)
    assert stats["tensors-merged"] == 1 and stats["bytes-saved"] == W.nbytes
    (name,) = out.graph.initializers  # a new initializer of the main graph, named after a copy
    assert name.startswith(("tw", "ew"))
    assert stored_payloads(out).count(digest(W)) == 1


def test_constant_read_before_its_copy_moves_up_front():
    # inside the If body the later Constant is the kept copy; its reader comes first
    W = RNG.standard_normal((2, 2)).astype(np.float32)
    then_g = helper.make_graph(
        [const("a", W), helper.make_node("Add", ["x", "a"], ["s"]), const("b", W), helper.make_node("Mul", ["s", "b"], ["to"])],
        "then", [], [vi("to", [2, 2])],
    )
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["eo"])], "else", [], [vi("eo", [2, 2])])
    m = make([helper.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g)],
             [vi("x", [2, 2]), vi("flag", [], TensorProto.BOOL)], [vi("y", [2, 2])])
    out, stats = run(m)
    assert stats["tensors-merged"] == 1


def test_function_bodies_merge_inside_but_not_with_the_main_graph():
    W = RNG.standard_normal((2, 2)).astype(np.float32)
    fn = helper.make_function(
        "local", "f", ["x"], ["y"],
        [const("c1", W), const("c2", W), helper.make_node("Add", ["x", "c1"], ["s"]), helper.make_node("Mul", ["s", "c2"], ["y"])],
        [helper.make_opsetid("", 17)],
    )
    m = make([helper.make_node("f", ["x"], ["a"], domain="local"), helper.make_node("Add", ["a", "W"], ["y"])],
             [vi("x", [2, 2])], [vi("y", [2, 2])], [t("W", W)], functions=[fn])
    out, stats = run(m)
    assert stats["tensors-merged"] == 1  # c1/c2 share; W stays (a function cannot see it)
    assert "W" in out.graph.initializers
    body = next(iter(out.functions.values())).graph
    assert sum(n.op_type == "Constant" for n in body) == 1


def test_tied_weights_stay_tied_and_copies_join_them():
    # embedding table read by Gather and (transposed) by the output projection: one value
    E = RNG.standard_normal((10, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"]),
        helper.make_node("Transpose", ["E"], ["Et"]),
        helper.make_node("MatMul", ["h", "Et"], ["logits"]),
        helper.make_node("Gather", ["E_copy", "ids"], ["h2"]),
        helper.make_node("Identity", ["h2"], ["z"]),
    ]
    m = make(nodes, [vi("ids", [3], TensorProto.INT64)], [vi("logits", [3, 10]), vi("z", [3, 4])], [t("E", E), t("E_copy", E.copy())])
    out, stats = run(m)
    assert stats["tensors-merged"] == 1
    e = out.graph.initializers["E"]
    assert {n.op_type for n in e.consumers()} == {"Gather", "Transpose"} and len(e.uses()) == 3


def test_ir3_initializers_listed_as_inputs_are_merged_and_unlisted():
    W = RNG.standard_normal((2, 2)).astype(np.float32)
    m = make([helper.make_node("Add", ["x", "A"], ["s"]), helper.make_node("Mul", ["s", "B"], ["y"])],
             [vi("x", [2, 2]), vi("A", [2, 2]), vi("B", [2, 2])], [vi("y", [2, 2])], [t("A", W), t("B", W)], opset=7, ir=3)
    out, stats = run(m)
    assert stats["tensors-merged"] == 1
    assert [v.name for v in out.graph.inputs] == ["x", "A"]
    onnx.checker.check_model(graphopt.to_onnx(out))


def test_tolerance_merges_near_duplicates_only_when_asked():
    W = RNG.standard_normal((8,)).astype(np.float32)
    near = W + np.float32(1e-7) * np.sign(W)
    far = W.copy()
    far[3] += np.float32(1e-3)
    m = make([helper.make_node("Add", ["x", "A"], ["s"]), helper.make_node("Add", ["s", "B"], ["u"]), helper.make_node("Add", ["u", "C"], ["y"])],
             [vi("x", [8])], [vi("y", [8])], [t("A", W), t("B", near), t("C", far)])
    out, stats = run(m)
    assert stats["tensors-merged"] == 0
    out, stats = run(m, tolerance=1e-6)
    assert stats["tensors-merged"] == 1 and stats["near-duplicates-merged"] == 1
    assert 0 < stats["max-near-diff"] <= 1e-6
    cmp = check_same_outputs(m, out, rtol=1e-5, atol=1e-5)
    assert cmp.ok, cmp.detail
    out, stats = run(m, tolerance=1e-2)
    assert stats["tensors-merged"] == 2


def test_tolerance_never_merges_different_nonfinite_patterns():
    a = np.array([1.0, np.nan, 2.0], np.float32)
    b = np.array([1.0, 2.0, np.nan], np.float32)
    c = np.array([1.0, np.inf, 2.0], np.float32)
    m = make([helper.make_node("Add", ["x", "A"], ["s"]), helper.make_node("Add", ["s", "B"], ["u"]), helper.make_node("Add", ["u", "C"], ["y"])],
             [vi("x", [3])], [vi("y", [3])], [t("A", a), t("B", b), t("C", c)])
    _, stats = run(m, tolerance=10.0)
    assert stats["tensors-merged"] == 0


# --- near misses ----------------------------------------------------------------------------------
def _neg_zero():
    return np.array([0.0, 1.0], np.float32), np.array([-0.0, 1.0], np.float32)


def _nan_payloads():
    a = np.array([np.nan, 1.0], np.float32)
    b = a.copy()
    b.view(np.uint32)[0] ^= 1  # another quiet NaN
    return a, b


@pytest.mark.parametrize(
    "pair",
    [
        _neg_zero,
        _nan_payloads,
        lambda: (np.array([1.0, 2.0], np.float32), np.array([1.0, 2.0000002], np.float32)),  # one ulp
    ],
)
def test_tensors_differing_in_bits_are_not_merged(pair):
    a, b = pair()
    m = make([helper.make_node("Add", ["x", "A"], ["s"]), helper.make_node("Mul", ["s", "B"], ["y"])],
             [vi("x", [2])], [vi("y", [2])], [t("A", a), t("B", b)])
    _, stats = run(m)
    assert stats["tensors-merged"] == 0


def test_same_bytes_other_dtype_or_shape_are_not_merged():
    f = np.arange(6, dtype=np.float32)
    i = f.view(np.int32)  # same bytes, other dtype
    m = make(
        [helper.make_node("Add", ["x", "A"], ["s"]), helper.make_node("Reshape", ["s", "shape"], ["r"]), helper.make_node("Add", ["r", "B"], ["y"]),
         helper.make_node("Add", ["xi", "C"], ["z"])],
        [vi("x", [6]), vi("xi", [6], TensorProto.INT32)], [vi("y", [2, 3]), vi("z", [6], TensorProto.INT32)],
        [t("A", f), t("B", f.reshape(2, 3)), t("C", i), t("shape", np.array([2, 3], np.int64))],
    )
    _, stats = run(m)
    assert stats["tensors-merged"] == 0


def test_overridable_inputs_and_graph_outputs_are_not_merged():
    W = np.ones((2,), np.float32)
    m = make([helper.make_node("Add", ["x", "A"], ["s"]), helper.make_node("Mul", ["s", "B"], ["y"]), const("C", W)],
             [vi("x", [2]), vi("A", [2])], [vi("y", [2]), vi("C", [2])], [t("A", W), t("B", W)], ir=8)
    _, stats = run(m)
    assert stats["tensors-merged"] == 0  # A is an overridable input, C a graph output, B alone


def test_bad_option_is_a_usage_error():
    with pytest.raises(UsageError):
        parse_pipeline("share-weights{tolerance=-1}")
    with pytest.raises(UsageError):
        parse_pipeline("share-weights{tolerance=abc}")


# --- properties -------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    copies=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    flips=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 31)), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_property_exact_duplicates_merge_and_one_bit_flips_never_do(shape, copies, flips, seed):
    """Random base tensors, each copied a few times, plus copies with one bit flipped: after the
    pass each reader still reads exactly its original bytes, every group of identical tensors is
    stored once, and the merge count is what the bytes say it must be."""
    rng = np.random.default_rng(seed)
    tensors: list[np.ndarray] = []
    for c in copies:
        base = rng.standard_normal(shape).astype(np.float32)
        tensors += [base.copy() for _ in range(c)]
    for which, pos, bit in flips:
        a = tensors[which % len(tensors)].copy()
        a.reshape(-1).view(np.uint32)[pos % a.size] ^= np.uint32(1 << bit)
        tensors.append(a)
    names = [f"w{i}" for i in range(len(tensors))]
    nodes = [helper.make_node("Add", ["x", nm], [f"y{i}"]) for i, nm in enumerate(names)]
    m = make(nodes, [vi("x", shape)], [vi(f"y{i}", shape) for i in range(len(names))], [t(nm, a) for nm, a in zip(names, tensors)])
    distinct = len({a.tobytes() for a in tensors})
    out, stats = run(m)
    assert stats["tensors-merged"] == len(tensors) - distinct
    assert len(out.graph.initializers) == distinct
    adds = [n for n in out.graph if n.op_type == "Add"]
    for node, a in zip(adds, tensors):
        assert node.inputs[1].const_value.numpy().tobytes() == a.tobytes()

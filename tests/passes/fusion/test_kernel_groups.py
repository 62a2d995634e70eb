"""plan-kernels: kernel groups (anchor + epilogue, prologues, injective chains, reductions) along
the post-dominator tree, never a cycle; overrides; ids in the printed IR and the ONNX export."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import GraphoptError
from graphopt.check import check_same_outputs, random_inputs
from graphopt.ir import Model
from graphopt.ir.parser import parse_model
from graphopt.ir.printer import print_model
from graphopt.testing import models
from graphopt.passes.fusion.kernel_groups import (
    ANCHOR_KEY,
    FUSE_KEY,
    FUSE_WITH_KEY,
    KERNEL_KEY,
    PlanKernels,
    check_kernel_groups,
    kernel_groups,
    op_pattern,
)
from graphopt.transform import PassContext, get_pass, optimize, parse_pipeline
from onnx_builders import model as make, vi

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light")


# --- helpers -----------------------------------------------------------------------------------
def t(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def node(op, ins, outs, name=None, **attrs):
    return helper.make_node(op, ins, outs, name=name or outs[0], **attrs)


def plan(model: Model, **options) -> dict[str, list[str]]:
    """Run plan-kernels in place (checking the postcondition and idempotence); group → node names."""
    p = PlanKernels(**options)
    p.run(model, PassContext())
    p.ensures(model, PassContext())
    model.verify()
    before = print_model(model)
    again = PlanKernels(**options).run(model, PassContext())
    assert not again.changed
    assert print_model(model) == before
    return {k: [n.name for n in ns] for k, ns in kernel_groups(model).items()}


def group_of(model: Model, name: str) -> str:
    return next(n for n in model.all_nodes() if n.name == name).metadata_props[KERNEL_KEY]


def anchors(model: Model) -> set[str]:
    return {n.name for n in model.all_nodes() if n.metadata_props.get(ANCHOR_KEY) == "true"}


def conv_bn_relu() -> Model:
    c = 4
    return make(
        [
            node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"]),
            node("Relu", ["n"], ["y"]),
        ],
        [vi("x", [1, 3, 8, 8])],
        [vi("y", [1, c, 8, 8])],
        [
            t("w", RNG.standard_normal((c, 3, 3, 3))), t("b", RNG.standard_normal(c)),
            t("s", RNG.uniform(0.5, 1.5, c)), t("bb", RNG.standard_normal(c)),
            t("m", RNG.standard_normal(c)), t("v", RNG.uniform(0.5, 2, c)),
        ],
    )


def residual_block() -> Model:
    """x → Conv0 → Relu0 ─┬─ Conv1 → Relu1 → Conv2 → Add → Relu → y
                          └──────────────────────────┘"""
    c = 4
    w = lambda n: t(n, RNG.standard_normal((c, c, 3, 3)) * 0.2)  # noqa: E731
    return make(
        [
            node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
            node("Relu", ["c0"], ["r0"]),
            node("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1]),
            node("Relu", ["c1"], ["r1"]),
            node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
            node("Add", ["c2", "r0"], ["a"]),
            node("Relu", ["a"], ["y"]),
        ],
        [vi("x", [1, c, 6, 6])],
        [vi("y", [1, c, 6, 6])],
        [w("w0"), w("w1"), w("w2")],
    )


def matmul_gelu() -> Model:
    """MatMul → Add(bias) → Gelu written out: h * 0.5 * (1 + erf(h / sqrt(2)))."""
    return make(
        [
            node("MatMul", ["x", "W"], ["mm"]),
            node("Add", ["mm", "B"], ["h"]),
            node("Div", ["h", "sqrt2"], ["d"]),
            node("Erf", ["d"], ["e"]),
            node("Add", ["e", "one"], ["e1"]),
            node("Mul", ["h", "e1"], ["p"]),
            node("Mul", ["p", "half"], ["y"]),
        ],
        [vi("x", [2, 8])],
        [vi("y", [2, 16])],
        [
            t("W", RNG.standard_normal((8, 16))), t("B", RNG.standard_normal(16)),
            t("sqrt2", np.sqrt(2.0)), t("one", 1.0), t("half", 0.5),
        ],
    )


def softmax_decomposed() -> Model:
    return make(
        [
            node("ReduceMax", ["x"], ["mx"], axes=[1], keepdims=1),
            node("Sub", ["x", "mx"], ["s"]),
            node("Exp", ["s"], ["e"]),
            node("ReduceSum", ["e", "ax"], ["sum"], keepdims=1),
            node("Div", ["e", "sum"], ["y"]),
        ],
        [vi("x", [3, 5])],
        [vi("y", [3, 5])],
        [numpy_helper.from_array(np.array([1], np.int64), "ax")],
        opset=17,
    )


# --- classification ----------------------------------------------------------------------------
def test_op_pattern_kinds() -> None:
    m = make(
        [
            node("Relu", ["x"], ["a"]),
            node("Add", ["a", "x"], ["b"]),
            node("Transpose", ["b"], ["c"], perm=[1, 0]),
            node("ReduceSum", ["c"], ["d"], keepdims=1),
            node("MatMul", ["d", "x"], ["e"]),
            node("NonZero", ["e"], ["f"]),
        ],
        [vi("x", [2, 2])],
        [helper.make_tensor_value_info("f", TensorProto.INT64, None)],
    )
    kinds = [op_pattern(n) for n in m.graph.nodes]
    assert kinds == ["elemwise", "broadcast", "injective", "comm-reduce", "out-ewise-fusable", "opaque"]


# --- anchors and epilogues ---------------------------------------------------------------------
def test_conv_bn_relu_is_one_group_anchored_on_the_conv() -> None:
    m = conv_bn_relu()
    before = m.clone()
    groups = plan(m)
    assert groups == {"k0": ["c", "n", "y"]}
    assert anchors(m) == {"c"}
    cmp = check_same_outputs(before, m)
    assert cmp.ok, cmp.detail


def test_residual_add_does_not_pull_the_other_branch_into_a_cycle() -> None:
    m = residual_block()
    groups = plan(m)
    assert list(groups.values()) == [["c0", "r0"], ["c1", "r1"], ["c2", "a", "y"]]
    assert anchors(m) == {"c0", "c1", "c2"}
    check_kernel_groups(m)


def test_matmul_add_gelu_decomposed_is_one_group() -> None:
    m = matmul_gelu()
    before = m.clone()
    groups = plan(m)
    assert groups == {"k0": ["mm", "h", "d", "e", "e1", "p", "y"]}
    assert anchors(m) == {"mm"}
    cmp = check_same_outputs(before, m)
    assert cmp.ok, cmp.detail


def test_two_anchors_never_share_a_group() -> None:
    m = residual_block()
    plan(m, max_group_size=1000)
    for nodes in kernel_groups(m).values():
        assert sum(n.op_type == "Conv" for n in nodes) == 1


# --- diamonds and cycles -----------------------------------------------------------------------
def test_diamond_through_an_anchor_is_not_fused_into_a_cycle() -> None:
    """a = Relu(x) feeds both MatMul and Sigmoid, which meet in Add: Relu must stay out of the
    MatMul's group (its path to Add crosses the anchor), Sigmoid may join as a prologue."""
    m = make(
        [
            node("Relu", ["x"], ["a"]),
            node("MatMul", ["a", "W"], ["mm"]),
            node("Sigmoid", ["a"], ["s"]),
            node("Add", ["mm", "s"], ["y"]),
        ],
        [vi("x", [4, 4])],
        [vi("y", [4, 4])],
        [t("W", RNG.standard_normal((4, 4)))],
    )
    groups = plan(m)
    assert sorted(groups.values()) == [["a"], ["mm", "s", "y"]]
    check_kernel_groups(m)


def test_diamond_through_a_reduction_keeps_the_producer_alone() -> None:
    m = make(
        [
            node("Exp", ["x"], ["e"]),
            node("ReduceSum", ["e"], ["r"], keepdims=1),
            node("Mul", ["e", "r"], ["y"]),
        ],
        [vi("x", [3, 4])],
        [vi("y", [3, 4])],
    )
    groups = plan(m)
    assert list(groups.values()) == [["e"], ["r", "y"]]


def test_check_kernel_groups_rejects_a_cycle_set_by_hand() -> None:
    m = residual_block()
    for n in m.graph.nodes:
        n.metadata_props[KERNEL_KEY] = "k0" if n.name in ("r0", "a") else f"k{n.name}"
    with pytest.raises(GraphoptError, match="cycle"):
        check_kernel_groups(m)


def test_random_dags_never_get_a_cycle() -> None:
    """Random DAGs of mixed kinds: the postcondition holds, every non-Constant node has a group."""
    ops = ["Relu", "Exp", "Add", "Mul", "Transpose", "ReduceSum", "MatMul", "Sigmoid", "Sub"]
    rng = np.random.default_rng(1)
    for trial in range(60):
        nodes, vals = [], ["x"]
        for i in range(rng.integers(3, 14)):
            op = ops[rng.integers(len(ops))]
            a = vals[rng.integers(len(vals))]
            b = vals[rng.integers(len(vals))]
            out = f"v{i}"
            if op in ("Add", "Mul", "Sub", "MatMul"):
                nodes.append(node(op, [a, b], [out]))
            elif op == "Transpose":
                nodes.append(node(op, [a], [out], perm=[1, 0]))
            elif op == "ReduceSum":
                nodes.append(node(op, [a, "ax"], [out], keepdims=1))
            else:
                nodes.append(node(op, [a], [out]))
            vals.append(out)
        if op == "ReduceSum":  # keep the output 4x4 for the type
            nodes.append(node("Add", [vals[-1], "x"], ["fin"]))
            vals.append("fin")
        m = make(nodes, [vi("x", [4, 4])], [vi(vals[-1], [4, 4])], [numpy_helper.from_array(np.array([1], np.int64), "ax")])
        for size in (64, 3):
            plan(m, max_group_size=size)
            groups = kernel_groups(m)
            assert sum(len(v) for v in groups.values()) == len(m.graph.nodes), trial
            assert all(len(v) <= size for v in groups.values())


# --- reductions, injective chains ----------------------------------------------------------------
def test_softmax_decomposition_groups_each_reduction_with_its_epilogue() -> None:
    m = softmax_decomposed()
    before = m.clone()
    groups = plan(m)
    assert list(groups.values()) == [["mx", "s", "e"], ["sum", "y"]]
    assert anchors(m) == {"mx", "sum"}
    cmp = check_same_outputs(before, m)
    assert cmp.ok, cmp.detail


def test_reduction_takes_its_elementwise_prologue_and_epilogue() -> None:
    m = make(
        [
            node("Mul", ["x", "k"], ["a"]),
            node("Exp", ["a"], ["b"]),
            node("ReduceSum", ["b", "ax"], ["r"], keepdims=1),
            node("Sqrt", ["r"], ["y"]),
        ],
        [vi("x", [3, 4])],
        [vi("y", [3, 1])],
        [t("k", 0.5), numpy_helper.from_array(np.array([1], np.int64), "ax")],
    )
    assert plan(m) == {"k0": ["a", "b", "r", "y"]}
    assert anchors(m) == {"r"}


def test_injective_chain_fuses_with_its_elementwise_producer() -> None:
    m = make(
        [
            node("Relu", ["x"], ["a"]),
            node("Reshape", ["a", "shp"], ["b"]),
            node("Transpose", ["b"], ["c"], perm=[1, 0]),
            node("Slice", ["c", "st", "en"], ["y"]),
        ],
        [vi("x", [2, 6])],
        [vi("y", [2, 4])],
        [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("shp", [4, 3]), ("st", [0]), ("en", [2]))],
    )
    before = m.clone()
    assert plan(m) == {"k0": ["a", "b", "c", "y"]}
    assert anchors(m) == set()
    cmp = check_same_outputs(before, m)
    assert cmp.ok, cmp.detail


def test_injective_op_is_not_fused_into_an_anchor() -> None:
    m = make(
        [node("Transpose", ["x"], ["a"], perm=[1, 0]), node("MatMul", ["a", "x"], ["y"])],
        [vi("x", [3, 3])],
        [vi("y", [3, 3])],
    )
    assert list(plan(m).values()) == [["a"], ["y"]]


def test_allow_prologue_controls_elementwise_producers_of_anchors() -> None:
    def model() -> Model:
        return make(
            [node("Relu", ["x"], ["a"]), node("MatMul", ["a", "W"], ["y"])],
            [vi("x", [3, 3])],
            [vi("y", [3, 3])],
            [t("W", np.eye(3))],
        )

    assert list(plan(model()).values()) == [["a", "y"]]
    assert list(plan(model(), allow_prologue=False).values()) == [["a"], ["y"]]


def test_opaque_ops_stay_alone() -> None:
    m = make(
        [node("Relu", ["x"], ["a"]), node("NonZero", ["a"], ["nz"]), node("Cast", ["nz"], ["y"], to=F)],
        [vi("x", [3, 3])],
        [helper.make_tensor_value_info("y", F, None)],
    )
    groups = plan(m)
    assert ["nz"] in groups.values()


# --- graph outputs -----------------------------------------------------------------------------
def test_graph_output_read_inside_ends_its_group() -> None:
    """`c` is a graph output and read by Relu: the Conv group ends at c (Relu is not fused in)."""
    m = conv_bn_relu()
    m.graph.outputs.append(next(n for n in m.graph.nodes if n.name == "n").outputs[0])
    groups = plan(m)
    assert groups == {"k0": ["c", "n"], "k1": ["y"]}


def test_graph_output_may_end_a_group() -> None:
    m = make(
        [node("MatMul", ["x", "W"], ["mm"]), node("Add", ["mm", "B"], ["y"])],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        [t("W", np.eye(3)), t("B", np.ones(3))],
    )
    assert plan(m) == {"k0": ["mm", "y"]}


# --- overrides ---------------------------------------------------------------------------------
def test_fuse_never_keeps_a_node_alone() -> None:
    m = conv_bn_relu()
    next(n for n in m.graph.nodes if n.name == "n").metadata_props[FUSE_KEY] = "never"
    assert list(plan(m).values()) == [["c"], ["n"], ["y"]]


def test_forbid_option_keeps_op_types_alone() -> None:
    m = conv_bn_relu()
    assert list(plan(m, forbid=("Relu",)).values()) == [["c", "n"], ["y"]]
    (p,) = parse_pipeline("plan-kernels{forbid=Relu:BatchNormalization,max-group-size=8}")
    assert p == PlanKernels(max_group_size=8, forbid=("Relu", "BatchNormalization"))
    p.run(m, PassContext())
    assert [len(v) for v in kernel_groups(m).values()] == [1, 1, 1]


def test_max_group_size() -> None:
    m = matmul_gelu()
    groups = plan(m, max_group_size=3)
    assert all(len(v) <= 3 for v in groups.values())
    assert groups["k0"][:2] == ["mm", "h"]


def test_fuse_with_forces_a_legal_merge() -> None:
    """Conv → Relu → Conv: forcing the second Conv into the Relu's group gives a group TVM's
    rules never form (the first Conv then keeps alone: one group holds one anchor)."""
    m = make(
        [
            node("Conv", ["x", "w"], ["c1"]),
            node("Relu", ["c1"], ["r"]),
            node("Conv", ["r", "w"], ["y"]),
        ],
        [vi("x", [1, 2, 5, 5])],
        [vi("y", [1, 2, 3, 3])],
        [t("w", RNG.standard_normal((2, 2, 2, 2)))],
    )
    assert list(plan(m).values()) == [["c1", "r"], ["y"]]
    next(n for n in m.graph.nodes if n.name == "y").metadata_props[FUSE_WITH_KEY] = "r"
    groups = plan(m)
    assert list(groups.values()) == [["c1"], ["r", "y"]]


def test_fuse_with_that_would_create_a_cycle_names_both_nodes() -> None:
    m = residual_block()
    next(n for n in m.graph.nodes if n.name == "r0").metadata_props[FUSE_WITH_KEY] = "a"
    with pytest.raises(GraphoptError, match=r"'r0'.*'a'.*cycle"):
        PlanKernels().run(m, PassContext())


def test_fuse_with_errors_unknown_opaque_never() -> None:
    m = conv_bn_relu()
    relu = next(n for n in m.graph.nodes if n.name == "y")
    relu.metadata_props[FUSE_WITH_KEY] = "nope"
    with pytest.raises(GraphoptError, match="no node is named 'nope'"):
        PlanKernels().run(m, PassContext())
    relu.metadata_props[FUSE_WITH_KEY] = "c"
    relu.metadata_props[FUSE_KEY] = "never"
    with pytest.raises(GraphoptError, match=r"'y'.*'c'.*never"):
        PlanKernels().run(m, PassContext())


# --- subgraphs -----------------------------------------------------------------------------------
def if_model() -> Model:
    then = helper.make_graph(
        [node("Relu", ["x"], ["t1"], name="t_relu"), node("Exp", ["t1"], ["t2"], name="t_exp")],
        "then", [], [vi("t2", [2, 2])],
    )
    other = helper.make_graph([node("Neg", ["x"], ["e1"], name="e_neg")], "else", [], [vi("e1", [2, 2])])
    return make(
        [
            node("ReduceSum", ["x"], ["s"], keepdims=0),
            node("Greater", ["s", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["o"], name="if", then_branch=then, else_branch=other),
            node("Sigmoid", ["o"], ["y"]),
        ],
        [vi("x", [2, 2])],
        [vi("y", [2, 2])],
        [t("zero", 0.0)],
    )


def test_subgraphs_are_grouped_on_their_own() -> None:
    m = if_model()
    before = m.clone()
    groups = plan(m)
    # main graph first (ReduceSum takes Greater as epilogue; If is opaque), then the bodies
    assert list(groups.values())[:3] == [["s", "cond"], ["if"], ["y"]]
    assert sorted(list(groups.values())[3:]) == [["e_neg"], ["t_relu", "t_exp"]]
    cmp = check_same_outputs(before, m)
    assert cmp.ok, cmp.detail


def test_fuse_with_across_graphs_is_refused() -> None:
    m = if_model()
    inner = next(n for n in m.all_nodes() if n.name == "t_relu")
    inner.metadata_props[FUSE_WITH_KEY] = "y"
    with pytest.raises(GraphoptError, match=r"'t_relu'.*'y'.*different graphs"):
        PlanKernels().run(m, PassContext())


# --- idempotence, printing, export -------------------------------------------------------------
def test_second_run_is_identical_and_options_change_is_rewritten() -> None:
    m = residual_block()
    first = PlanKernels().run(m, PassContext())
    assert first.changed and first.stats["groups"] == 3 and first.stats["anchors"] == 3
    text = print_model(m)
    assert not PlanKernels().run(m, PassContext()).changed
    assert print_model(m) == text
    assert PlanKernels(forbid=("Relu",)).run(m, PassContext()).changed
    assert PlanKernels().run(m, PassContext()).changed
    assert print_model(m) == text


def test_group_ids_are_printed_and_parse_back() -> None:
    m = conv_bn_relu()
    plan(m)
    text = print_model(m)
    assert '"graphopt.kernel": "k0"' in text
    assert '"graphopt.kernel.anchor": "true"' in text
    back = parse_model(text)
    assert {k: [n.name for n in v] for k, v in kernel_groups(back).items()} == {"k0": ["c", "n", "y"]}


def test_exported_model_keeps_metadata_and_runs_in_onnxruntime() -> None:
    m = residual_block()
    before = m.clone()
    optimize(m, "plan-kernels", inplace=True)
    proto = graphopt.to_onnx(m)
    onnx.checker.check_model(proto)
    props = {n.name: {p.key: p.value for p in n.metadata_props} for n in proto.graph.node}
    assert props["c2"] == {KERNEL_KEY: "k2", ANCHOR_KEY: "true"}
    assert props["y"] == {KERNEL_KEY: "k2"}
    feeds = random_inputs(before)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    cmp = check_same_outputs(before, m, feeds)
    assert cmp.ok, cmp.detail
    reloaded = graphopt.load(proto)
    assert kernel_groups(reloaded).keys() == kernel_groups(m).keys()
    assert got[0].shape == (1, 4, 6, 6)


def test_registered_and_in_pipeline_syntax() -> None:
    cls = get_pass("plan-kernels")
    assert cls is PlanKernels
    assert PlanKernels(allow_prologue=False, forbid=("Relu",)).spec() == "plan-kernels{allow-prologue=false,forbid=Relu}"


# --- a real model ------------------------------------------------------------------------------
def test_light_resnet50_grouping() -> None:
    path = os.path.join(LIGHT, "light_resnet50.onnx")
    if not os.path.exists(path):
        pytest.skip("onnx's light_resnet50 is not installed")
    m = graphopt.load(path)
    before = m.clone()
    result = get_pass("plan-kernels")().run(m, PassContext())
    PlanKernels().ensures(m, PassContext())
    groups = kernel_groups(m)
    convs = [n for n in m.graph.nodes if n.op_type == "Conv"]
    assert len(convs) == 53
    # 53 Conv groups (+BN, +Relu, +Sum), MaxPool, AveragePool, Reshape, Gemm, Softmax
    assert len(groups) == 58 == result.stats["groups"]
    for conv in convs:
        assert conv.metadata_props[ANCHOR_KEY] == "true"
        members = groups[conv.metadata_props[KERNEL_KEY]]
        assert sum(n.op_type == "Conv" for n in members) == 1
        assert members[0] is conv
    for n in m.graph.nodes:
        if n.op_type in ("Relu", "Sum", "BatchNormalization"):
            members = groups[n.metadata_props[KERNEL_KEY]]
            assert members[0].op_type == "Conv", (n.name, [x.op_type for x in members])
    shapes = {tuple(n.op_type for n in v) for v in groups.values() if v[0].op_type == "Conv"}
    assert shapes == {
        ("Conv", "BatchNormalization", "Relu"),
        ("Conv", "BatchNormalization", "Sum", "Relu"),
        ("Conv", "BatchNormalization"),  # downsample branch: its Sum belongs to the main branch
    }
    # ConstantOfShape of a constant shape is data: no group
    assert all(KERNEL_KEY not in n.metadata_props for n in m.graph.nodes if n.op_type == "ConstantOfShape")
    assert not PlanKernels().run(m, PassContext()).changed
    feeds = random_inputs(before)
    cmp = check_same_outputs(before, m, feeds)
    assert cmp.ok, cmp.detail


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(models(max_nodes=10))
def test_random_models_plan_is_acyclic_and_idempotent(m: Model) -> None:
    PlanKernels().run(m, PassContext())
    PlanKernels().ensures(m, PassContext())
    named = [n for g in m.graphs() for n in g.nodes if n.metadata_props.get(KERNEL_KEY)]
    assert len({id(n) for ns in kernel_groups(m).values() for n in ns}) == len(named)
    assert not PlanKernels().run(m, PassContext()).changed

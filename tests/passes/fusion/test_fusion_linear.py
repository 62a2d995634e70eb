"""fuse-linear (rules matmul-add-to-gemm, transpose-into-gemm, transpose-into-matmul, pad-into-conv,
pad-into-pool, reshape-chain): fires with its statistics, leaves near-misses alone, is idempotent,
keeps the IR valid, exports models onnx.checker accepts and keeps onnxruntime's outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.check import check_same_outputs
from graphopt.ir import Model
from graphopt.pattern import get_rule
from graphopt.transform import PassContext, get_pass, parse_pipeline
import onnx_builders
from onnx_builders import tensor as t, vi

F = TensorProto.FLOAT
I64 = TensorProto.INT64
RNG = np.random.default_rng(0)
RULES = ["matmul-add-to-gemm", "transpose-into-gemm", "transpose-into-matmul", "pad-into-conv", "pad-into-pool", "reshape-chain"]


# --- helpers -----------------------------------------------------------------------------------
def make(*args, **kw) -> Model:
    """onnx_builders.model with onnx's shape inference, so that graph outputs get shapes."""
    return onnx_builders.model(*args, infer=True, **kw)


def checker_ok(model: Model) -> bool:
    proto = graphopt.to_onnx(model)
    try:
        onnx.checker.check_model(proto, full_check="com.microsoft" not in model.opset_imports)
    except onnx.checker.ValidationError:
        return False
    return True


def i64(name, vals):
    return t(name, np.asarray(vals, np.int64))


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def node(op, ins, outs, **attrs):
    return helper.make_node(op, ins, outs, **attrs)


def run(model: Model, **options):
    """fuse-linear on a copy: (new model, stats without initializers-removed). Checks verify(),
    that a second run is a no-op, and that the exported model passes onnx.checker."""
    out = model.clone()
    result = get_pass("fuse-linear")(**options).run(out, PassContext())
    out.verify()
    again = get_pass("fuse-linear")(**options).run(out, PassContext())
    assert not again.changed and not again.stats, again.stats
    out.verify()
    assert checker_ok(out) or not checker_ok(model)  # whenever the input passes onnx.checker
    stats = dict(result.stats)
    removed = stats.pop("initializers-removed", 0)
    assert not removed or stats
    return out, stats


def ops(model: Model) -> list[str]:
    return [n.op_type for n in model.all_nodes()]


def assert_same(before: Model, after: Model, rtol=1e-4, atol=1e-5):
    cmp = check_same_outputs(before, after, rtol=rtol, atol=atol)
    assert cmp.ok, cmp.detail


def assert_untouched(model: Model, **options):
    out, stats = run(model, **options)
    assert not stats, stats
    assert ops(out) == ops(model)


# --- registry / pipeline -------------------------------------------------------------------------
def test_rules_registered_with_docstrings():
    for name in RULES:
        doc = get_rule(name).__doc__ or ""
        assert ("->" in doc or "→" in doc) and "not" in doc, name


def test_pipeline_option():
    (p,) = parse_pipeline("fuse-linear{contrib-ops=true}")
    assert p.contrib_ops is True


# --- matmul-add-to-gemm ------------------------------------------------------------------------------
@pytest.mark.parametrize("c_shape", [(5,), (1, 5), (3, 1), (3, 5), (), (1,)])
@pytest.mark.parametrize("swap", [False, True])
def test_matmul_add_to_gemm_fires(c_shape, swap):
    add_ins = ["c", "C"] if not swap else ["C", "c"]
    m = make(
        [node("MatMul", ["x", "W"], ["c"]), node("Add", add_ins, ["y"])],
        [vi("x", [3, 4])], [vi("y", [3, 5])], [t("W", rand(4, 5)), t("C", rand(*c_shape))],
    )
    assert checker_ok(m)
    out, stats = run(m)
    assert stats == {"matmul-add-to-gemm": 1} and ops(out) == ["Gemm"]
    assert [o.name for o in out.graph.outputs] == ["y"]
    assert_same(m, out)


def test_matmul_add_to_gemm_constant_nodes_and_symbolic_batch():
    nodes = [
        node("Constant", [], ["W"], value=t("Wv", rand(4, 5))),
        node("Constant", [], ["C"], value=t("Cv", rand(5))),
        node("MatMul", ["x", "W"], ["c"]),
        node("Add", ["c", "C"], ["y"]),
    ]
    m = make(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 5])])
    out, stats = run(m)
    assert stats == {"matmul-add-to-gemm": 1} and ops(out) == ["Constant", "Constant", "Gemm"]
    assert_same(m, out)


def _mm_add(x_shape, w, c, *, x_dtype=F, inits_extra=(), extra_nodes=(), outputs=None, opset=17):
    nodes = [node("MatMul", ["x", "W"], ["c"]), node("Add", ["c", "C"], ["y"])] + list(extra_nodes)
    inits = ([t("W", w)] if w is not None else []) + ([t("C", c)] if c is not None else []) + list(inits_extra)
    ins = [vi("x", x_shape, x_dtype)] + ([vi("W", [4, 5])] if w is None else []) + ([vi("C", [5])] if c is None else [])
    return make(nodes, ins, outputs or [vi("y", None, x_dtype)], inits, opset=opset)


@pytest.mark.parametrize(
    "kw",
    [
        dict(x_shape=[2, 3, 4], w=rand(4, 5), c=rand(5)),  # rank 3: not worth Reshape->Gemm->Reshape
        dict(x_shape=None, w=rand(4, 5), c=rand(5)),  # unknown rank
        dict(x_shape=[4], w=rand(4, 5), c=rand(5)),  # 1-D a
        dict(x_shape=[3, 4], w=None, c=rand(5)),  # W not constant
        dict(x_shape=[3, 4], w=rand(4, 5), c=None),  # c not constant
        dict(x_shape=[3, 4], w=rand(4, 5), c=rand(2, 3, 5)),  # c rank 3: Add broadcasts up
        dict(x_shape=[3, 4], w=rand(4, 5), c=rand(2, 5)),  # c rows != M
        dict(x_shape=["N", 4], w=rand(4, 5), c=rand(3, 5)),  # M unknown
        dict(x_shape=[3, 4], w=rand(4, 5).astype(np.float64), c=rand(5).astype(np.float64), x_dtype=TensorProto.DOUBLE, opset=6),
    ],
    ids=["rank3", "rank-unknown", "rank1", "W-input", "c-input", "c-rank3", "c-rows", "M-unknown", "opset6"],
)
def test_matmul_add_to_gemm_near_misses(kw):
    assert_untouched(_mm_add(**kw))


def test_matmul_add_to_gemm_int_not_fused():
    m = make(
        [node("MatMul", ["x", "W"], ["c"]), node("Add", ["c", "C"], ["y"])],
        [vi("x", [3, 4], TensorProto.INT32)], [vi("y", None, TensorProto.INT32)],
        [t("W", np.ones((4, 5), np.int32)), t("C", np.ones(5, np.int32))],
    )
    assert_untouched(m)


def test_matmul_add_to_gemm_shared_product():
    m = make(
        [node("MatMul", ["x", "W"], ["c"]), node("Add", ["c", "C"], ["y"]), node("Relu", ["c"], ["z"])],
        [vi("x", [3, 4])], [vi("y", None), vi("z", None)], [t("W", rand(4, 5)), t("C", rand(5))],
    )
    assert_untouched(m)


def test_matmul_add_product_is_graph_output():
    m = make(
        [node("MatMul", ["x", "W"], ["c"]), node("Add", ["c", "C"], ["y"])],
        [vi("x", [3, 4])], [vi("y", None), vi("c", None)], [t("W", rand(4, 5)), t("C", rand(5))],
    )
    assert_untouched(m)


def test_explain_rank3():
    m = _mm_add([2, 3, 4], rand(4, 5), rand(5))
    add = [n for n in m.graph if n.op_type == "Add"][0]
    assert "not worth" in (get_rule("matmul-add-to-gemm").why_not(add) or "")


# --- transpose-into-gemm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["A", "B", "both"])
@pytest.mark.parametrize("trans", [0, 1])
@pytest.mark.parametrize("explicit_perm", [True, False])
def test_transpose_into_gemm_fires(side, trans, explicit_perm):
    perm = dict(perm=[1, 0]) if explicit_perm else {}
    # A: Gemm sees op(A) = [3, 4]; B: op(B) = [4, 5]
    a_shape = [3, 4] if trans else [4, 3]  # input of the Transpose when A is transposed
    b_shape = [4, 5] if trans else [5, 4]
    nodes, inputs = [], []
    a_name, b_name = "a", "b"
    if side in ("A", "both"):
        nodes.append(node("Transpose", ["a"], ["at"], **perm))
        a_name = "at"
        inputs.append(vi("a", a_shape))
    else:
        inputs.append(vi("a", [4, 3] if trans else [3, 4]))
    if side in ("B", "both"):
        nodes.append(node("Transpose", ["b"], ["bt"], **perm))
        b_name = "bt"
        inputs.append(vi("b", b_shape))
    else:
        inputs.append(vi("b", [5, 4] if trans else [4, 5]))
    nodes.append(node("Gemm", [a_name, b_name, "C"], ["y"], transA=trans, transB=trans, alpha=0.5, beta=2.0))
    m = make(nodes, inputs, [vi("y", [3, 5])], [t("C", rand(5))])
    out, stats = run(m)
    n = 2 if side == "both" else 1
    assert stats == {"transpose-into-gemm": n} and ops(out) == ["Gemm"]
    g = out.graph.nodes[0]
    assert g.attr("alpha") == 0.5 and g.attr("beta") == 2.0
    assert_same(m, out)


def test_transpose_into_gemm_near_misses():
    # shared Transpose
    m = make(
        [node("Transpose", ["a"], ["at"], perm=[1, 0]), node("Gemm", ["at", "b"], ["y"]), node("Relu", ["at"], ["z"])],
        [vi("a", [4, 3]), vi("b", [4, 5])], [vi("y", None), vi("z", None)],
    )
    assert_untouched(m)
    # Transpose output is a graph output
    m = make(
        [node("Transpose", ["a"], ["at"], perm=[1, 0]), node("Gemm", ["at", "b"], ["y"])],
        [vi("a", [4, 3]), vi("b", [4, 5])], [vi("y", None), vi("at", None)],
    )
    assert_untouched(m)
    # no perm and unknown rank
    m = make([node("Transpose", ["a"], ["at"]), node("Gemm", ["at", "b"], ["y"])], [vi("a", None), vi("b", [4, 5])], [vi("y", None)])
    assert_untouched(m)


# --- transpose-into-matmul -------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [0, 1])
@pytest.mark.parametrize("rank", [2, 3])
def test_transpose_of_constant_into_matmul(side, rank):
    k = rand(5, 4) if rank == 2 else rand(2, 5, 4)
    perm = [1, 0] if rank == 2 else [0, 2, 1]
    x_shape = ([3, 4] if side == 1 else [5, 3]) if rank == 2 else ([2, 3, 4] if side == 1 else [2, 5, 3])
    ins = ["x", "kt"] if side == 1 else ["kt", "x"]
    m = make(
        [node("Transpose", ["K"], ["kt"], perm=perm), node("MatMul", ins, ["y"])],
        [vi("x", x_shape)], [vi("y", None)], [t("K", k)],
    )
    out, stats = run(m)
    assert stats == {"transpose-into-matmul": 1} and ops(out) == ["MatMul"]
    assert len(out.graph.initializers) == 1 and "K" not in out.graph.initializers  # the original went
    assert_same(m, out)


def test_transpose_of_shared_constant_not_folded():
    m = make(
        [node("Transpose", ["K"], ["kt"], perm=[1, 0]), node("MatMul", ["x", "kt"], ["y"]), node("MatMul", ["z", "K"], ["w"])],
        [vi("x", [3, 5]), vi("z", [2, 5])], [vi("y", None), vi("w", None)], [t("K", rand(5, 4))],
    )
    assert_untouched(m)


def _mm_transposed(x_shape, perm, b_shape, *, side=0, extra=(), outputs=None):
    ins = ["xt", "b"] if side == 0 else ["b", "xt"]
    nodes = [node("Transpose", ["x"], ["xt"], **({"perm": perm} if perm is not None else {})), node("MatMul", ins, ["y"])]
    return make(nodes + list(extra), [vi("x", x_shape), vi("b", b_shape)], outputs or [vi("y", None)])


def test_transpose_into_matmul_needs_contrib():
    m = _mm_transposed([4, 3], [1, 0], [4, 5])
    assert_untouched(m)
    mm = [n for n in m.graph if n.op_type == "MatMul"][0]
    assert "contrib-ops" in (get_rule("transpose-into-matmul").why_not(mm) or "")


@pytest.mark.parametrize(
    "x_shape,perm,b_shape,side",
    [([4, 3], [1, 0], [4, 5], 0), ([4, 3], None, [4, 5], 0), ([2, 4, 3], [0, 2, 1], [2, 4, 5], 0), ([5, 4], [1, 0], [3, 4], 1),
     ([2, 5, 4], [0, 2, 1], [2, 3, 4], 1), ([2, 4, 3], [0, 2, 1], [4, 5], 0)],
    ids=["A", "A-noperm", "A-batched", "B", "B-batched", "A-batched-2d-B"],
)
def test_transpose_into_fusedmatmul(x_shape, perm, b_shape, side):
    m = _mm_transposed(x_shape, perm, b_shape, side=side)
    out, stats = run(m, contrib_ops=True)
    assert stats == {"transpose-into-matmul": 1} and ops(out) == ["FusedMatMul"]
    assert out.opset_imports.get("com.microsoft") == 1
    fm = out.graph.nodes[0]
    assert fm.attr("transA" if side == 0 else "transB") == 1
    assert_same(m, out)


def test_both_transposes_into_fusedmatmul():
    m = make(
        [node("Transpose", ["a"], ["at"], perm=[1, 0]), node("Transpose", ["b"], ["bt"], perm=[1, 0]), node("MatMul", ["at", "bt"], ["y"])],
        [vi("a", [4, 3]), vi("b", [5, 4])], [vi("y", None)],
    )
    out, stats = run(m, contrib_ops=True)
    assert stats == {"transpose-into-matmul": 2} and ops(out) == ["FusedMatMul"]
    assert out.graph.nodes[0].attr("transA") == 1 and out.graph.nodes[0].attr("transB") == 1
    assert_same(m, out)


@pytest.mark.parametrize(
    "x_shape,perm,b_shape",
    [([2, 3, 4], [1, 0, 2], [2, 3, 5]), ([2, 3, 4], [2, 1, 0], [4, 3, 5]), ([2, 4, 3], None, [2, 4, 5]), (None, None, [4, 5]),
     ([4, 3], [1, 0], [4])],
    ids=["batch-swap", "reverse3", "noperm-rank3", "rank-unknown", "1d-other"],
)
def test_transpose_into_fusedmatmul_near_misses(x_shape, perm, b_shape):
    assert_untouched(_mm_transposed(x_shape, perm, b_shape), contrib_ops=True)


def test_fusedmatmul_not_added_when_nothing_fires():
    m = _mm_transposed([2, 3, 4], [1, 0, 2], [2, 3, 5])
    out, _ = run(m, contrib_ops=True)
    assert "com.microsoft" not in out.opset_imports


def test_transpose_into_fusedmatmul_shared_and_double():
    m = _mm_transposed([4, 3], [1, 0], [4, 5], extra=[node("Relu", ["xt"], ["z"])], outputs=[vi("y", None), vi("z", None)])
    assert_untouched(m, contrib_ops=True)
    m = make(
        [node("Transpose", ["x"], ["xt"], perm=[1, 0]), node("MatMul", ["xt", "b"], ["y"])],
        [vi("x", [4, 3], TensorProto.DOUBLE), vi("b", [4, 5], TensorProto.DOUBLE)], [vi("y", None, TensorProto.DOUBLE)],
    )
    assert_untouched(m, contrib_ops=True)


def test_transposed_matmul_add_prefers_gemm():
    # contrib on: the MatMul+Add becomes a Gemm, whose transA takes the Transpose
    m = make(
        [node("Transpose", ["x"], ["xt"], perm=[1, 0]), node("MatMul", ["xt", "W"], ["c"]), node("Add", ["c", "C"], ["y"])],
        [vi("x", [4, 3])], [vi("y", None)], [t("W", rand(4, 5)), t("C", rand(5))],
    )
    for opts in ({}, {"contrib_ops": True}):
        out, stats = run(m, **opts)
        assert stats == {"matmul-add-to-gemm": 1, "transpose-into-gemm": 1}, stats
        assert ops(out) == ["Gemm"] and out.graph.nodes[0].attr("transA") == 1
        assert "com.microsoft" not in out.opset_imports
        assert_same(m, out)


# --- pad-into-conv ----------------------------------------------------------------------------------------
def _pad_conv(pads, *, opset=17, value=None, mode=None, axes=None, conv_attrs=None, consumer="Conv", x_shape=(1, 3, 8, 8),
              extra=(), outputs=None, pool_attrs=None, value_dtype=np.float32):
    inits = []
    attrs = {}
    if mode is not None:
        attrs["mode"] = mode
    if opset < 11:
        pad = node("Pad", ["x"], ["p"], pads=pads, **attrs, **({"value": value} if value is not None else {}))
    else:
        ins = ["x", "pads"]
        inits.append(i64("pads", pads))
        if value is not None or axes is not None:
            ins.append("cv" if value is not None else "")
            if value is not None:
                inits.append(t("cv", np.asarray(value, value_dtype)))
        if axes is not None:
            ins.append("axes")
            inits.append(i64("axes", axes))
        pad = node("Pad", ins, ["p"], **attrs)
    if consumer == "Conv":
        cons = node("Conv", ["p", "W", "B"], ["y"], kernel_shape=[3, 3], **(conv_attrs or {}))
        inits += [t("W", rand(4, x_shape[1], 3, 3)), t("B", rand(4))]
    else:
        cons = node(consumer, ["p"], ["y"], kernel_shape=[3, 3], **(pool_attrs or {}))
    return make([pad, cons] + list(extra), [vi("x", list(x_shape))], outputs or [vi("y", None)], inits, opset=opset)


@pytest.mark.parametrize(
    "kw",
    [
        dict(pads=[0, 0, 1, 1, 0, 0, 1, 1]),
        dict(pads=[0, 0, 1, 2, 0, 0, 3, 0]),
        dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], opset=10),  # pads attribute
        dict(pads=[0, 0, 2, 0, 0, 0, 0, 1], opset=10, value=0.0, mode="constant"),
        dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.0),  # explicit zero constant_value
        dict(pads=[1, 2, 1, 2], axes=[2, 3], opset=18),  # axes input
        dict(pads=[1, 2], axes=[-1], opset=18),
        dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], conv_attrs=dict(pads=[1, 0, 0, 1], strides=[2, 2], dilations=[1, 2])),
        dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], conv_attrs=dict(auto_pad="NOTSET")),
    ],
    ids=["sym", "asym", "opset10", "opset10-value", "value0", "axes", "neg-axis", "conv-pads", "notset"],
)
def test_pad_into_conv_fires(kw):
    m = _pad_conv(**kw)
    out, stats = run(m)
    assert stats == {"pad-into-conv": 1} and ops(out) == ["Conv"]
    assert not [n for n in out.graph.initializers if n in ("pads", "axes", "cv")]
    assert_same(m, out)


def test_pad_into_conv_1d():
    m = make(
        [node("Pad", ["x", "pads"], ["p"]), node("Conv", ["p", "W"], ["y"])],
        [vi("x", [1, 2, 9])], [vi("y", None)], [i64("pads", [0, 0, 2, 0, 0, 1]), t("W", rand(3, 2, 3))],
    )
    out, stats = run(m)
    assert stats == {"pad-into-conv": 1} and out.graph.nodes[0].attr("pads") == [2, 1]
    assert_same(m, out)


@pytest.mark.parametrize(
    "kw",
    [
        dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], conv_attrs=dict(auto_pad="SAME_UPPER")),
        dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], conv_attrs=dict(auto_pad="VALID")),
        dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], value=1.0),
        dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], opset=10, value=0.5),
        dict(pads=[0, 0, 1, -1, 0, 0, 1, 1]),  # negative: a crop
        dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"),
        dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="edge"),
        dict(pads=[0, 1, 1, 1, 0, 0, 1, 1]),  # pads the channel axis
        dict(pads=[1, 0, 1, 1, 0, 0, 1, 1]),  # pads the batch axis
        dict(pads=[1, 1], axes=[1], opset=18),
        dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], extra=[node("Relu", ["p"], ["z"])], outputs=[vi("y", None), vi("z", None)]),
    ],
    ids=["same-upper", "valid", "value1", "opset10-value", "negative", "reflect", "edge", "channel", "batch", "axes-channel", "shared"],
)
def test_pad_into_conv_near_misses(kw):
    assert_untouched(_pad_conv(**kw))


def test_pad_into_conv_pads_not_constant():
    m = make(
        [node("Pad", ["x", "pads"], ["p"]), node("Conv", ["p", "W"], ["y"])],
        [vi("x", [1, 2, 6, 6]), vi("pads", [8], I64)], [vi("y", None)], [t("W", rand(3, 2, 3, 3))],
    )
    assert_untouched(m)
    pad_conv = [n for n in m.graph if n.op_type == "Conv"][0]
    assert "constant" in (get_rule("pad-into-conv").why_not(pad_conv) or "")


# --- pad-into-pool ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(consumer="AveragePool", pads=[0, 0, 1, 1, 0, 0, 1, 1], pool_attrs=dict(count_include_pad=1)),
        dict(consumer="AveragePool", pads=[0, 0, 0, 1, 0, 0, 2, 0], pool_attrs=dict(count_include_pad=1, strides=[2, 2])),
        dict(consumer="AveragePool", pads=[0, 0, 1, 1, 0, 0, 1, 1], opset=10, pool_attrs=dict(count_include_pad=1)),
        dict(consumer="MaxPool", pads=[0, 0, 1, 1, 0, 0, 1, 1], value=-np.inf),
        dict(consumer="MaxPool", pads=[0, 0, 1, 1, 0, 0, 1, 1], value=-np.inf, opset=10),
        dict(consumer="MaxPool", pads=[1, 1, 1, 1], axes=[2, 3], value=-np.inf, opset=18, pool_attrs=dict(strides=[2, 2])),
    ],
    ids=["avg", "avg-asym", "avg-opset10", "max", "max-opset10", "max-axes"],
)
def test_pad_into_pool_fires(kw):
    m = _pad_conv(**kw)
    out, stats = run(m)
    assert stats == {"pad-into-pool": 1} and ops(out) == [kw["consumer"]]
    assert_same(m, out)


def test_pad_into_maxpool_unused_indices():
    m = make(
        [node("Pad", ["x", "pads", "cv"], ["p"]), node("MaxPool", ["p"], ["y", "idx"], kernel_shape=[3, 3])],
        [vi("x", [1, 2, 6, 6])], [vi("y", None)], [i64("pads", [0, 0, 1, 1, 0, 0, 1, 1]), t("cv", np.float32(-np.inf))],
    )
    out, stats = run(m)
    assert stats == {"pad-into-pool": 1}
    assert_same(m, out)


@pytest.mark.parametrize(
    "kw",
    [
        dict(consumer="AveragePool", pads=[0, 0, 1, 1, 0, 0, 1, 1]),  # count_include_pad=0
        dict(consumer="AveragePool", pads=[0, 0, 1, 1, 0, 0, 1, 1], value=1.0, pool_attrs=dict(count_include_pad=1)),
        dict(consumer="AveragePool", pads=[0, 0, 1, 1, 0, 0, 1, 1], pool_attrs=dict(count_include_pad=1, ceil_mode=1)),
        dict(consumer="AveragePool", pads=[0, 0, 1, 1, 0, 0, 1, 1], pool_attrs=dict(count_include_pad=1, auto_pad="SAME_UPPER")),
        dict(consumer="AveragePool", pads=[0, 0, 3, 0, 0, 0, 0, 0], pool_attrs=dict(count_include_pad=1)),  # pad >= kernel
        dict(consumer="AveragePool", pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="reflect", pool_attrs=dict(count_include_pad=1)),
        dict(consumer="MaxPool", pads=[0, 0, 1, 1, 0, 0, 1, 1]),  # zero pad can win the max
        dict(consumer="MaxPool", pads=[0, 0, 1, 1, 0, 0, 1, 1], value=np.inf),
        dict(consumer="MaxPool", pads=[0, 0, 1, 1, 0, 0, 1, 1], value=-np.inf, pool_attrs=dict(pads=[2, 0, 0, 0])),  # merged >= kernel
    ],
    ids=["avg-exclude", "avg-value1", "avg-ceil", "avg-autopad", "avg-big-pad", "avg-reflect", "max-zero", "max-inf", "max-big"],
)
def test_pad_into_pool_near_misses(kw):
    assert_untouched(_pad_conv(**kw))


def test_pad_into_maxpool_indices_used():
    m = make(
        [node("Pad", ["x", "pads", "cv"], ["p"]), node("MaxPool", ["p"], ["y", "idx"], kernel_shape=[3, 3])],
        [vi("x", [1, 2, 6, 6])], [vi("y", None), vi("idx", None, I64)],
        [i64("pads", [0, 0, 1, 1, 0, 0, 1, 1]), t("cv", np.float32(-np.inf))],
    )
    assert_untouched(m)


# --- reshape-chain ----------------------------------------------------------------------------------------
def test_reshape_chain_fires():
    m = make(
        [node("Reshape", ["x", "s1"], ["r"]), node("Reshape", ["r", "s2"], ["y"])],
        [vi("x", [2, 3, 4])], [vi("y", None)], [i64("s1", [6, 4]), i64("s2", [4, -1])],
    )
    out, stats = run(m)
    assert stats == {"reshape-chain": 1} and ops(out) == ["Reshape"]
    assert "s1" not in out.graph.initializers
    assert_same(m, out)


def test_reshape_chain_long_and_flatten_inner():
    m = make(
        [node("Flatten", ["x"], ["f"], axis=2), node("Reshape", ["f", "s1"], ["r"]), node("Reshape", ["r", "s2"], ["y"])],
        [vi("x", [2, 3, 4])], [vi("y", None)], [i64("s1", [-1]), i64("s2", [3, 8])],
    )
    out, stats = run(m)
    assert stats == {"reshape-chain": 2} and ops(out) == ["Reshape"]
    assert_same(m, out)


def test_reshape_chain_zeros_that_copy_the_same_dim_of_x():
    # the head split and merge of attention: [N, S, 768] → [0, S, 12, 64] → [0, S, 768]
    m = make(
        [node("Reshape", ["x", "s1"], ["r"]), node("Reshape", ["r", "s2"], ["y"])],
        [vi("x", ["N", 5, 24])], [vi("y", None)], [i64("s1", [0, 5, 3, 8]), i64("s2", [0, 5, 24])],
    )
    out, stats = run(m)
    assert stats == {"reshape-chain": 1} and ops(out) == ["Reshape"]
    assert_same(m, out)


def test_reshape_chain_allowzero():
    m = make(
        [node("Reshape", ["x", "s1"], ["r"]), node("Reshape", ["r", "s2"], ["y"], allowzero=1)],
        [vi("x", [2, 3, 4])], [vi("y", None)], [i64("s1", [6, 4]), i64("s2", [4, 6])], opset=14,
    )
    out, stats = run(m)
    assert stats == {"reshape-chain": 1} and out.graph.nodes[0].attr("allowzero") == 1
    assert_same(m, out)


@pytest.mark.parametrize(
    "s1,axis,x_shape",
    [([6, 4], 1, [2, 3, 4]), ([2, 3, 4], 2, [2, 12]), ([2, -1, 4], 1, [24]), ([2, -1, 4], 2, [24]), ([-1, 4], -1, [2, 3, 4]),
     ([2, 3, 4], 0, [24]), ([2, 3, 4], 3, [6, 4])],
    ids=["basic", "axis2", "minus1-tail", "minus1-head", "neg-axis", "axis0", "axis-rank"],
)
def test_reshape_then_flatten(s1, axis, x_shape):
    m = make(
        [node("Reshape", ["x", "s1"], ["r"]), node("Flatten", ["r"], ["y"], axis=axis)],
        [vi("x", x_shape)], [vi("y", None)], [i64("s1", s1)],
    )
    out, stats = run(m)
    assert stats == {"reshape-chain": 1} and ops(out) == ["Reshape"]
    assert_same(m, out)


def test_reshape_chain_near_misses():
    # s2 has a 0: copies dim 0 of the inner output (6), not of x (2)
    m = make(
        [node("Reshape", ["x", "s1"], ["r"]), node("Reshape", ["r", "s2"], ["y"])],
        [vi("x", [2, 3, 4])], [vi("y", None)], [i64("s1", [6, 4]), i64("s2", [0, 2, 2])],
    )
    assert_untouched(m)
    # s2's 0 where s1 is not a copy: [2, 3, 4] → [0, 12] → [0, 3, 4] is fine, → [6, 2, 2] → [0, 4] not
    m = make(
        [node("Reshape", ["x", "s1"], ["r"]), node("Reshape", ["r", "s2"], ["y"])],
        [vi("x", [2, 3, 4])], [vi("y", None)], [i64("s1", [4, 0, 2]), i64("s2", [0, 6])],
    )
    assert_untouched(m)
    # s2 not constant
    m = make(
        [node("Reshape", ["x", "s1"], ["r"]), node("Reshape", ["r", "s2"], ["y"])],
        [vi("x", [2, 3, 4]), vi("s2", [2], I64)], [vi("y", None)], [i64("s1", [6, 4])],
    )
    assert_untouched(m)
    # shared inner
    m = make(
        [node("Reshape", ["x", "s1"], ["r"]), node("Reshape", ["r", "s2"], ["y"]), node("Relu", ["r"], ["z"])],
        [vi("x", [2, 3, 4])], [vi("y", None), vi("z", None)], [i64("s1", [6, 4]), i64("s2", [4, 6])],
    )
    assert_untouched(m)
    # inner output is a graph output
    m = make(
        [node("Reshape", ["x", "s1"], ["r"]), node("Reshape", ["r", "s2"], ["y"])],
        [vi("x", [2, 3, 4])], [vi("y", None), vi("r", None)], [i64("s1", [6, 4]), i64("s2", [4, 6])],
    )
    assert_untouched(m)
    # Flatten(Reshape) with a 0 in s1 or a non-constant s1
    m = make(
        [node("Reshape", ["x", "s1"], ["r"]), node("Flatten", ["r"], ["y"])],
        [vi("x", [2, 3, 4])], [vi("y", None)], [i64("s1", [0, 3, 4])],
    )
    assert_untouched(m)
    m = make(
        [node("Reshape", ["x", "s1"], ["r"]), node("Flatten", ["r"], ["y"])],
        [vi("x", [2, 3, 4]), vi("s1", [3], I64)], [vi("y", None)],
    )
    assert_untouched(m)
    # Flatten(Flatten): not this rule's (a Reshape inside is needed)
    m = make([node("Flatten", ["x"], ["f"]), node("Flatten", ["f"], ["y"])], [vi("x", [2, 3, 4])], [vi("y", None)])
    assert_untouched(m)


def test_transpose_chain_is_remove_noops():
    # transpose-chain is not a rule here: remove-noops merges Transpose pairs
    m = make(
        [node("Transpose", ["x"], ["a"], perm=[1, 0, 2]), node("Transpose", ["a"], ["y"], perm=[0, 2, 1])],
        [vi("x", [2, 3, 4])], [vi("y", None)],
    )
    assert_untouched(m)
    out = m.clone()
    get_pass("remove-noops")().run(out, PassContext())
    assert ops(out) == ["Transpose"]
    assert_same(m, out)


# --- a small model through the whole pass ---------------------------------------------------------------
def test_mixed_model():
    nodes = [
        node("Pad", ["x", "pads"], ["p"]),
        node("Conv", ["p", "W"], ["c"]),
        node("Pad", ["c", "pads", "ninf"], ["p2"]),
        node("MaxPool", ["p2"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Reshape", ["mp", "s1"], ["r1"]),
        node("Flatten", ["r1"], ["f"]),
        node("Transpose", ["K"], ["kt"], perm=[1, 0]),
        node("MatMul", ["f", "kt"], ["mm"]),
        node("Add", ["mm", "C"], ["y"]),
    ]
    inits = [
        i64("pads", [0, 0, 1, 1, 0, 0, 1, 1]), t("W", rand(4, 3, 3, 3)), t("ninf", np.float32(-np.inf)),
        i64("s1", [2, 4, -1]), t("K", rand(10, 4 * 5 * 5 // 1 * 1)), t("C", rand(10)),
    ]
    # x [2,3,8,8] -> pad 10x10 -> conv 8x8 -> pad 10x10 -> maxpool 5x5 -> [2,4,5,5] -> [2,4,25] -> [2,100]
    m = make(nodes, [vi("x", [2, 3, 8, 8])], [vi("y", None)], inits)
    out, stats = run(m)
    assert stats == {"pad-into-conv": 1, "pad-into-pool": 1, "reshape-chain": 1, "transpose-into-matmul": 1, "matmul-add-to-gemm": 1}, stats
    assert ops(out) == ["Conv", "MaxPool", "Reshape", "Gemm"]
    assert_same(m, out)
    optimized = graphopt.optimize(m.clone(), "fuse-linear,dce")
    assert_same(m, optimized)


def test_inside_if_branch():
    def branch(name, sign):
        return helper.make_graph(
            [node("Reshape", ["x", "s1"], [name + "_r"]), node("Reshape", [name + "_r", "s2"], [name + "_o"])],
            name, [], [vi(name + "_o", [4, 6])],
        )

    m = make(
        [node("If", ["cond"], ["y"], then_branch=branch("then", 1), else_branch=branch("else", -1))],
        [vi("cond", [], TensorProto.BOOL), vi("x", [2, 3, 4])], [vi("y", [4, 6])], [i64("s1", [6, 4]), i64("s2", [4, 6])],
    )
    out, stats = run(m)
    assert stats == {"reshape-chain": 2}
    assert "s1" not in out.graph.initializers and "s2" in out.graph.initializers
    assert_same(m, out)


def test_contrib_through_optimize():
    m = _mm_transposed([4, 3], [1, 0], [4, 5])
    out = graphopt.optimize(m.clone(), "fuse-linear{contrib-ops=true}")
    assert ops(out) == ["FusedMatMul"]
    assert_same(m, out)

"""fuse-normalization (rules layer-norm, rms-norm, skip-layer-norm): fires with its statistics on
the decompositions torch exports, leaves near-misses alone, respects the model's opset and the
contrib-ops option, is idempotent, keeps the IR valid, exports a model onnx.checker accepts, and
keeps onnxruntime's outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.ir import Model
from graphopt.testing import check_pass
from graphopt.pattern import get_rule
from graphopt.transform import PassContext, get_pass, parse_pipeline

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)
node = helper.make_node
C = 8


def make(nodes, consts=None, *, opset=17, shape=(2, 3, C), inputs=("x",), outputs=("y",), extra_inputs=(), infer=False) -> Model:
    """A model; `infer`: with the value_info onnx shape inference adds (torch.onnx.export runs it)."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (consts or {}).items()]
    ins = [helper.make_tensor_value_info(i, F, list(shape)) for i in inputs] + [
        helper.make_tensor_value_info(n, F, list(s)) for n, s in extra_inputs
    ]
    g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info(o, F, list(shape)) for o in outputs], initializer=inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return graphopt.load(onnx.shape_inference.infer_shapes(proto) if infer else proto)


def ops(model: Model) -> list[str]:
    return [(n.domain + "::" if n.domain else "") + n.op_type for n in model.all_nodes()]


def run(model: Model, **options) -> tuple[Model, dict]:
    """fuse-normalization on a copy: verify(), idempotent, checker-valid, same outputs on onnxruntime."""
    return check_pass(model, "fuse-normalization", **options)


def reduce_mean(x, y, axes, opset, const_name):
    """ReduceMean with axes as an attribute (opset < 18) or a constant input (opset >= 18)."""
    if opset >= 18:
        return node("ReduceMean", [x, const_name], [y])
    return node("ReduceMean", [x], [y], axes=list(axes))


def ln_nodes(*, opset=17, axes=(-1,), square="pow", div="div", gamma=True, beta=True, x="x", y="y", eps_after_sqrt=False, axes2=None):
    """torch.onnx's LayerNorm decomposition (symbolic_opset9 native_layer_norm)."""
    n = [
        reduce_mean(x, "ln_mean", axes, opset, "ln_axes"),
        node("Sub", [x, "ln_mean"], ["ln_d"]),
        node("Pow", ["ln_d", "ln_two"], ["ln_sq"]) if square == "pow" else node("Mul", ["ln_d", "ln_d"], ["ln_sq"]),
        reduce_mean("ln_sq", "ln_var", axes2 or axes, opset, "ln_axes2" if axes2 else "ln_axes"),
    ]
    if eps_after_sqrt:
        n += [node("Sqrt", ["ln_var"], ["ln_s"]), node("Add", ["ln_s", "ln_eps"], ["ln_std"])]
    else:
        n += [node("Add", ["ln_var", "ln_eps"], ["ln_ve"]), node("Sqrt", ["ln_ve"], ["ln_std"])]
    if div == "div":
        n.append(node("Div", ["ln_d", "ln_std"], ["ln_n"]))
    else:
        n += [node("Reciprocal", ["ln_std"], ["ln_r"]), node("Mul", ["ln_r", "ln_d"], ["ln_n"])]
    last = "ln_n"
    if gamma:
        n.append(node("Mul", [last, "ln_g"], ["ln_gn" if beta else y]))
        last = "ln_gn"
    if beta:
        n.append(node("Add", [last if gamma else "ln_n", "ln_b"], [y]))
    elif not gamma:
        n.append(node("Identity", ["ln_n"], [y]))
    return n


def ln_consts(axes=(-1,), gshape=(C,), eps=1e-5, axes2=None):
    return {
        "ln_two": np.float32(2.0),
        "ln_eps": np.float32(eps),
        "ln_axes": np.array(axes, np.int64),
        "ln_axes2": np.array(axes2 or axes, np.int64),
        "ln_g": (1 + 0.3 * RNG.standard_normal(gshape)).astype(np.float32),
        "ln_b": RNG.standard_normal(gshape).astype(np.float32),
    }


def used(nodes, consts):
    names = {i for n in nodes for i in n.input}
    return {k: v for k, v in consts.items() if k in names}


# --- layer-norm -----------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("square, div", [("pow", "div"), ("mul", "reciprocal")])
def test_layer_norm_torch_export(opset, square, div):
    nodes = ln_nodes(opset=opset, square=square, div=div)
    out, stats = run(make(nodes, used(nodes, ln_consts()), opset=opset))
    assert stats == {"layer-norm": 1}
    assert ops(out) == ["LayerNormalization"]
    ln = out.graph.nodes[0]
    assert ln.attr("axis") == 2 and ln.attr("epsilon") == pytest.approx(1e-5)
    assert [v.name for v in ln.inputs[1:]] == ["ln_g", "ln_b"]  # the model's gamma/beta, reused
    assert out.graph.outputs[0].name == "y"
    assert set(out.graph.initializers) == {"ln_g", "ln_b"}


@pytest.mark.parametrize("gamma, beta", [(False, False), (True, False), (False, True)])
def test_layer_norm_without_gamma_or_beta_gets_ones_zeros(gamma, beta):
    nodes = ln_nodes(gamma=gamma, beta=beta)
    out, stats = run(make(nodes, used(nodes, ln_consts())))
    assert stats == {"layer-norm": 1}
    assert ops(out) == ["LayerNormalization"] + (["Identity"] if not gamma and not beta else [])
    ln = out.graph.nodes[0]
    assert len([v for v in ln.inputs if v is not None]) == 3


def test_layer_norm_over_two_last_axes_with_broadcast_gamma():
    nodes = ln_nodes(opset=18, axes=(-2, -1))
    consts = used(nodes, ln_consts(axes=(-2, -1), gshape=(C,)))
    out, stats = run(make(nodes, consts, opset=18))
    assert stats == {"layer-norm": 1}
    ln = out.graph.nodes[0]
    assert ln.attr("axis") == 1
    assert list(ln.inputs[1].shape.dims) == [3, C]  # gamma broadcast to the normalized dims


def test_layer_norm_with_constant_node_eps_and_rank_2_gamma():
    nodes = [node("Constant", [], ["ln_eps"], value=numpy_helper.from_array(np.array([1e-6], np.float32)))] + ln_nodes()
    consts = ln_consts(gshape=(1, C))
    del consts["ln_eps"]
    out, stats = run(make(nodes, used(nodes, consts)))
    assert stats == {"layer-norm": 1}
    assert out.graph.nodes[-1].attr("epsilon") == pytest.approx(1e-6)


@pytest.mark.parametrize(
    "why",
    ["wrong axes", "two different axes", "eps after sqrt", "shared intermediate", "opset 16", "gamma varies on axis 1", "keepdims=0"],
)
def test_layer_norm_near_misses(why):
    opset, kw, ckw, outputs = 17, {}, {}, ("y",)
    if why == "wrong axes":
        kw = ckw = {"axes": (1,)}
    elif why == "two different axes":
        kw, ckw = {"axes": (-1,), "axes2": (-2, -1)}, {"axes2": (-2, -1)}
    elif why == "eps after sqrt":
        kw = {"eps_after_sqrt": True}
    elif why == "shared intermediate":
        outputs = ("y", "ln_var")
    elif why == "opset 16":
        opset = 16
    elif why == "gamma varies on axis 1":
        ckw = {"gshape": (3, 1)}
    nodes = ln_nodes(opset=opset, **kw)
    if why == "keepdims=0":
        nodes[0].attribute.append(helper.make_attribute("keepdims", 0))
    m = make(nodes, used(nodes, ln_consts(**ckw)), opset=opset, outputs=outputs)
    if why == "shared intermediate":
        m.graph.outputs[1].type = None
    if why in ("gamma varies on axis 1",):  # the normalization alone is fused; the Mul/Add stay
        out, stats = run(m)
        assert stats == {"layer-norm": 1}
        assert ops(out) == ["LayerNormalization", "Mul", "Add"]
        return
    out = m.clone()
    res = get_pass("fuse-normalization")().run(out, PassContext())
    assert res.stats == {}, why
    assert ops(out) == ops(m)


def test_layer_norm_non_constant_gamma_beta_stay_outside():
    """adaLN-style: the normalization is fused, the Mul/Add by graph inputs are not folded."""
    nodes = ln_nodes()
    nodes[-2].input[1] = "g_in"
    nodes[-1].input[1] = "b_in"
    m = make(nodes, used(nodes, ln_consts()), extra_inputs=[("g_in", (2, 3, C)), ("b_in", (2, 3, C))])
    out, stats = run(m)
    assert stats == {"layer-norm": 1}
    assert ops(out) == ["LayerNormalization", "Mul", "Add"]
    assert out.graph.nodes[1].inputs[1].name == "g_in"


def test_layer_norm_explain_reason():
    nodes = ln_nodes(axes=(1,))
    m = make(nodes, used(nodes, ln_consts(axes=(1,))))
    reason = get_rule("layer-norm").why_not(m.graph.nodes[-1])
    assert reason and "not the last axes" in reason


# --- rms-norm -------------------------------------------------------------------------------------
def rms_nodes(form="div", gamma=True, opset=23, x="x", y="y"):
    n = [
        node("Pow", [x, "r_two"], ["r_sq"]) if form != "mulsq" else node("Mul", [x, x], ["r_sq"]),
        reduce_mean("r_sq", "r_ms", (-1,), opset, "r_axes"),
        node("Add", ["r_ms", "r_eps"], ["r_ve"]),
    ]
    if form in ("div", "mulsq"):
        n += [node("Sqrt", ["r_ve"], ["r_s"]), node("Div", [x, "r_s"], ["r_n"])]
    elif form == "reciprocal":  # dynamo: Rsqrt -> Reciprocal(Sqrt)
        n += [node("Sqrt", ["r_ve"], ["r_s"]), node("Reciprocal", ["r_s"], ["r_i"]), node("Mul", [x, "r_i"], ["r_n"])]
    elif form == "one_div":  # torch.onnx rsqrt: Div(1, Sqrt)
        n += [node("Sqrt", ["r_ve"], ["r_s"]), node("Div", ["r_one", "r_s"], ["r_i"]), node("Mul", ["r_i", x], ["r_n"])]
    else:  # Pow(..., -0.5)
        n += [node("Pow", ["r_ve", "r_mhalf"], ["r_i"]), node("Mul", [x, "r_i"], ["r_n"])]
    n.append(node("Mul", ["r_g", "r_n"], [y]) if gamma else node("Identity", ["r_n"], [y]))
    return n


RMS_CONSTS = {
    "r_two": np.float32(2),
    "r_eps": np.float32(1e-6),
    "r_axes": np.array([-1], np.int64),
    "r_one": np.float32(1),
    "r_mhalf": np.float32(-0.5),
    "r_g": (1 + 0.3 * RNG.standard_normal(C)).astype(np.float32),
}


@pytest.mark.parametrize("form", ["div", "mulsq", "reciprocal", "one_div", "pow"])
def test_rms_norm_fires_at_opset_23(form):
    nodes = rms_nodes(form)
    out, stats = run(make(nodes, used(nodes, RMS_CONSTS), opset=23))
    assert stats == {"rms-norm": 1}
    assert ops(out) == ["RMSNormalization"]
    rms = out.graph.nodes[0]
    assert rms.attr("axis") == 2 and rms.attr("epsilon") == pytest.approx(1e-6)
    assert rms.inputs[1].name == "r_g"


def test_rms_norm_without_gamma():
    nodes = rms_nodes(gamma=False)
    out, stats = run(make(nodes, used(nodes, RMS_CONSTS), opset=23))
    assert stats == {"rms-norm": 1} and ops(out) == ["RMSNormalization", "Identity"]


@pytest.mark.parametrize("opset", [17, 22])
def test_rms_norm_untouched_below_opset_23(opset):
    nodes = rms_nodes(opset=opset)
    m = make(nodes, used(nodes, RMS_CONSTS), opset=opset)
    out, stats = run(m)
    assert stats == {} and ops(out) == ops(m)


def test_rms_norm_does_not_take_a_layer_norm_apart():
    nodes = ln_nodes(opset=23)
    out, stats = run(make(nodes, used(nodes, ln_consts()), opset=23))
    assert stats == {"layer-norm": 1} and ops(out) == ["LayerNormalization"]


def test_rms_norm_near_miss_other_value_divided():
    nodes = rms_nodes()
    nodes[4].input[0] = "z"  # Div(z, Sqrt(mean(x^2) + eps))
    m = make(nodes, used(nodes, RMS_CONSTS), opset=23, inputs=("x", "z"))
    out = m.clone()
    assert get_pass("fuse-normalization")().run(out, PassContext()).stats == {}


# --- skip-layer-norm ------------------------------------------------------------------------------
def skip_ln_model(shared: bool, opset=17):
    nodes = [node("Add", ["x", "r"], ["h"])] + ln_nodes(x="h", y="ln_out")
    if shared:  # pre-LN residual stream: the sum is read again after the LayerNorm
        nodes.append(node("Add", ["h", "ln_out"], ["y"]))
    else:
        nodes.append(node("Identity", ["ln_out"], ["y"]))
    return make(nodes, used(nodes, ln_consts()), opset=opset, inputs=("x", "r"), infer=True)


@pytest.mark.parametrize("shared", [False, True])
def test_skip_layer_norm_with_contrib(shared):
    m = skip_ln_model(shared)
    out, stats = run(m, contrib_ops=True)
    assert stats == {"layer-norm": 1, "skip-layer-norm": 1}
    assert ops(out)[0] == "com.microsoft::SkipLayerNormalization"
    assert out.opset_imports["com.microsoft"] == 1
    sln = out.graph.nodes[0]
    assert len(sln.outputs) == (4 if shared else 1)
    if shared:
        assert out.graph.nodes[1].inputs[0] is sln.outputs[3]


def test_skip_layer_norm_needs_contrib():
    out, stats = run(skip_ln_model(True))
    assert stats == {"layer-norm": 1}
    assert ops(out) == ["Add", "LayerNormalization", "Add"]
    assert "com.microsoft" not in out.opset_imports


def test_skip_layer_norm_refuses_a_sum_read_before_the_norm():
    nodes = [node("Add", ["x", "r"], ["h"]), node("Neg", ["h"], ["hn"])] + ln_nodes(x="h", y="ln_out")
    nodes.append(node("Add", ["hn", "ln_out"], ["y"]))
    m = make(nodes, used(nodes, ln_consts()), inputs=("x", "r"), infer=True)
    out, stats = run(m, contrib_ops=True)
    assert stats == {"layer-norm": 1}
    assert "com.microsoft::SkipLayerNormalization" not in ops(out)


def test_pipeline_syntax_and_rule_docs():
    [p] = parse_pipeline("fuse-normalization{contrib-ops=1}")
    assert p.contrib_ops is True
    for name in ("layer-norm", "rms-norm", "skip-layer-norm"):
        doc = get_rule(name).__doc__ or ""
        assert "→" in doc and "Must not fire" in doc


def test_layer_and_skip_layer_norm_without_value_info():
    """No shape inference ran: the rank comes from the graph input / output shapes."""
    nodes = [node("Add", ["x", "r"], ["h"])] + ln_nodes(x="h", y="y")
    m = make(nodes, used(nodes, ln_consts()), inputs=("x", "r"))
    out, stats = run(m, contrib_ops=True)
    assert stats == {"layer-norm": 1, "skip-layer-norm": 1}
    assert ops(out) == ["com.microsoft::SkipLayerNormalization"]


def test_skip_layer_norm_refuses_rank_2_operands():
    nodes = [node("Add", ["x", "r"], ["h"])] + ln_nodes(x="h", y="y")
    m = make(nodes, used(nodes, ln_consts()), inputs=("x", "r"), shape=(6, C), infer=True)
    out, stats = run(m, contrib_ops=True)
    assert stats == {"layer-norm": 1}
    assert ops(out) == ["Add", "LayerNormalization"]

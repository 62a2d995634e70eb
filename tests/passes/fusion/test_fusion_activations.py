"""fuse-activations (rules gelu-erf, gelu-tanh, bias-gelu, silu, hard-swish): fires with its
statistics on the patterns torch / TF exporters emit, leaves near-misses alone, respects the
model's opset and the contrib-ops option, is idempotent, keeps the IR valid, exports a model
onnx.checker accepts, and keeps onnxruntime's outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.check import check_same_outputs
from graphopt.ir import Model
from graphopt.testing import check_pass
from graphopt.pattern import get_rule
from graphopt.transform import PassContext, get_pass, parse_pipeline

F = TensorProto.FLOAT
SQRT2 = math.sqrt(2.0)
node = helper.make_node


def make(nodes, consts=None, *, opset=20, shape=(2, 3, 8), inputs=("x",), outputs=("y",), dtype=F, out_shape=None) -> Model:
    inits = [numpy_helper.from_array(np.asarray(v, np.float32 if dtype == F else np.float16), k) for k, v in (consts or {}).items()]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(i, dtype, list(shape)) for i in inputs],
        [helper.make_tensor_value_info(o, dtype, list(out_shape or shape)) for o in outputs],
        initializer=inits,
    )
    return graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10))


def ops(model: Model) -> list[str]:
    return [(n.domain + "::" if n.domain else "") + n.op_type for n in model.all_nodes()]


def run(model: Model, **options) -> tuple[Model, dict]:
    """fuse-activations on a copy: verify(), idempotent, checker-valid, same outputs on onnxruntime."""
    return check_pass(model, "fuse-activations", **options)


# --- GELU, erf form ------------------------------------------------------------------------------
def gelu_erf_nodes(variant: str, x="x", y="y"):
    div = node("Div", [x, "sqrt2"], ["g_div"]) if "inv" not in variant else node("Mul", ["inv_sqrt2", x], ["g_div"])
    erf = node("Erf", ["g_div"], ["g_erf"])
    add = node("Add", ["g_erf", "one"], ["g_add"]) if "swap_add" not in variant else node("Add", ["one", "g_erf"], ["g_add"])
    if variant.startswith("torch"):  # torch.onnx (opset < 20): Mul(Mul(x, 1 + erf), 0.5)
        tail = [node("Mul", [x, "g_add"], ["g_mul"]), node("Mul", ["g_mul", "half"], [y])]
    elif variant.startswith("half_first"):  # 0.5 * x * (1 + erf)
        tail = [node("Mul", ["half", x], ["g_mul"]), node("Mul", ["g_mul", "g_add"], [y])]
    else:  # TF: x * (0.5 * (1 + erf))
        tail = [node("Mul", ["half", "g_add"], ["g_mul"]), node("Mul", [x, "g_mul"], [y])]
    return [div, erf, add, *tail]


GELU_CONSTS = {"sqrt2": np.float32(SQRT2), "inv_sqrt2": np.float32(1 / SQRT2), "one": np.float32(1.0), "half": np.float32(0.5)}
ERF_VARIANTS = ["torch", "torch_inv", "half_first", "half_first_swap_add", "tf", "tf_inv_swap_add"]


def consts_for(nodes, consts):
    used = {i for n in nodes for i in n.input}
    return {k: v for k, v in consts.items() if k in used}


@pytest.mark.parametrize("variant", ERF_VARIANTS)
def test_gelu_erf_fires_on_every_exporter_order(variant):
    nodes = gelu_erf_nodes(variant)
    out, stats = run(make(nodes, consts_for(nodes, GELU_CONSTS)))
    assert stats == {"gelu-erf": 1}
    assert ops(out) == ["Gelu"]
    assert out.graph.outputs[0].name == "y"
    assert out.graph.nodes[0].attr("approximate", "none") in ("none", b"none")
    assert not out.graph.initializers  # the constants went with the subgraph


def test_gelu_erf_with_constant_nodes_and_five_digit_constants():
    consts = {"sqrt2": 1.41421, "one": 1.0, "half": 0.5}
    cnodes = [node("Constant", [], [k], value=numpy_helper.from_array(np.asarray(v, np.float32))) for k, v in consts.items()]
    out, stats = run(make(cnodes + gelu_erf_nodes("torch")))
    assert stats == {"gelu-erf": 1} and ops(out) == ["Gelu"]


def test_gelu_erf_opset_below_20_is_left_alone_without_contrib():
    nodes = gelu_erf_nodes("torch")
    m = make(nodes, consts_for(nodes, GELU_CONSTS), opset=17)
    out, stats = run(m)
    assert stats == {} and ops(out) == ops(m)
    assert "com.microsoft" not in out.opset_imports


def test_gelu_erf_contrib_uses_com_microsoft_gelu_below_opset_20():
    nodes = gelu_erf_nodes("torch")
    out, stats = run(make(nodes, consts_for(nodes, GELU_CONSTS), opset=17), contrib_ops=True)
    assert stats == {"gelu-erf": 1}
    assert ops(out) == ["com.microsoft::Gelu"]
    assert out.opset_imports["com.microsoft"] == 1


def test_gelu_erf_contrib_prefers_the_standard_op_at_opset_20():
    nodes = gelu_erf_nodes("tf")
    out, stats = run(make(nodes, consts_for(nodes, GELU_CONSTS), opset=20), contrib_ops=True)
    assert stats == {"gelu-erf": 1} and ops(out) == ["Gelu"]
    assert "com.microsoft" not in out.opset_imports


@pytest.mark.parametrize(
    "why, change",
    [
        ("0.5 is 0.6", lambda n, c: c.update(half=np.float32(0.6))),
        ("sqrt2 off by 1e-3", lambda n, c: c.update(sqrt2=np.float32(SQRT2 * 1.001))),
        ("sqrt2 has 8 elements", lambda n, c: c.update(sqrt2=np.full(8, SQRT2, np.float32))),
        ("0.5 of rank 4 broadcasts x", lambda n, c: c.update(half=np.full((1, 1, 1, 1), 0.5, np.float32))),
        ("Erf of another value", lambda n, c: n[0].input.__setitem__(0, "z")),
        ("Erf result also a graph output", None),
    ],
)
def test_gelu_erf_near_misses(why, change):
    nodes = gelu_erf_nodes("torch")
    consts = consts_for(nodes, GELU_CONSTS)
    outputs = ("y",)
    if change is None:
        outputs = ("y", "g_erf")
    else:
        change(nodes, consts)
    rank4 = why.startswith("0.5 of rank 4")  # the output really is rank 4 there
    m = make(nodes, consts, inputs=("x", "z"), outputs=outputs, out_shape=(1, 2, 3, 8) if rank4 else None)
    out, stats = run(m)
    assert stats == {}, why
    assert ops(out) == ops(m)


# --- GELU, tanh form ----------------------------------------------------------------------------
TANH_CONSTS = {
    "three": np.float32(3.0),
    "kappa": np.float32(0.044715),
    "beta": np.float32(math.sqrt(2 / math.pi)),
    "one": np.float32(1.0),
    "half": np.float32(0.5),
}


def gelu_tanh_nodes(cube: str, order: str):
    if cube == "pow":
        c = [node("Pow", ["x", "three"], ["t_cube"])]
    else:  # torch.onnx: Mul(x, Mul(x, x))
        c = [node("Mul", ["x", "x"], ["t_sq"]), node("Mul", ["x", "t_sq"], ["t_cube"])]
    body = [
        node("Mul", ["kappa", "t_cube"], ["t_k"]),
        node("Add", ["x", "t_k"], ["t_in"]),
        node("Mul", ["beta", "t_in"], ["t_arg"]),
        node("Tanh", ["t_arg"], ["t_tanh"]),
        node("Add", ["one", "t_tanh"], ["t_add"]),
    ]
    if order == "torch":  # Mul(0.5, Mul(x, 1 + tanh))
        tail = [node("Mul", ["x", "t_add"], ["t_mul"]), node("Mul", ["half", "t_mul"], ["y"])]
    else:  # HF NewGELU: 0.5 * x * (1 + tanh(...))
        tail = [node("Mul", ["half", "x"], ["t_mul"]), node("Mul", ["t_mul", "t_add"], ["y"])]
    return c + body + tail


@pytest.mark.parametrize("cube", ["pow", "mul"])
@pytest.mark.parametrize("order", ["torch", "hf"])
def test_gelu_tanh_fires(cube, order):
    nodes = gelu_tanh_nodes(cube, order)
    out, stats = run(make(nodes, consts_for(nodes, TANH_CONSTS)))
    assert stats == {"gelu-tanh": 1}
    assert ops(out) == ["Gelu"]
    assert out.graph.nodes[0].attr("approximate") in ("tanh", b"tanh")


def test_gelu_tanh_contrib_uses_fast_gelu_below_opset_20():
    nodes = gelu_tanh_nodes("pow", "torch")
    m = make(nodes, consts_for(nodes, TANH_CONSTS), opset=18)
    assert run(m)[1] == {}
    out, stats = run(m, contrib_ops=True)
    assert stats == {"gelu-tanh": 1} and ops(out) == ["com.microsoft::FastGelu"]


@pytest.mark.parametrize("const, value", [("kappa", 0.05), ("beta", 0.8), ("three", 2.0)])
def test_gelu_tanh_wrong_constant_does_not_fire(const, value):
    nodes = gelu_tanh_nodes("pow", "torch")
    consts = consts_for(nodes, TANH_CONSTS)
    consts[const] = np.float32(value)
    m = make(nodes, consts)
    out, stats = run(m)
    assert stats == {} and ops(out) == ops(m)


# --- bias + GELU ----------------------------------------------------------------------------------
def test_bias_gelu_kept_as_add_then_gelu_without_contrib():
    nodes = [node("Add", ["x", "bias"], ["xb"])] + gelu_erf_nodes("torch", x="xb")
    consts = {**consts_for(nodes, GELU_CONSTS), "bias": np.linspace(-1, 1, 8).astype(np.float32)}
    out, stats = run(make(nodes, consts))
    assert stats == {"gelu-erf": 1} and ops(out) == ["Add", "Gelu"]


@pytest.mark.parametrize("form, fused", [("erf", "com.microsoft::BiasGelu"), ("tanh", "com.microsoft::FastGelu")])
@pytest.mark.parametrize("opset", [17, 20])
def test_bias_gelu_with_contrib(form, fused, opset):
    if form == "erf":
        nodes = [node("Add", ["x", "bias"], ["xb"])] + gelu_erf_nodes("torch", x="xb")
        consts = consts_for(nodes, GELU_CONSTS)
    else:
        nodes = [node("Add", ["bias", "x"], ["xb"])] + [
            node(n.op_type, [("xb" if i == "x" else i) for i in n.input], list(n.output)) for n in gelu_tanh_nodes("pow", "hf")
        ]
        consts = consts_for(nodes, TANH_CONSTS)
    consts["bias"] = np.linspace(-1, 1, 8).astype(np.float32)
    out, stats = run(make(nodes, consts, opset=opset), contrib_ops=True)
    assert stats == {f"gelu-{form}": 1, "bias-gelu": 1}
    assert ops(out) == [fused]
    assert len(out.graph.nodes[0].inputs) == 2


@pytest.mark.parametrize("bias", [np.ones((3, 8), np.float32), np.ones(1, np.float32)], ids=["2-D", "broadcasts-x"])
def test_bias_gelu_refuses_a_bias_that_is_not_the_last_dim(bias):
    nodes = [node("Add", ["x", "bias"], ["xb"])] + gelu_erf_nodes("torch", x="xb")
    consts = {**consts_for(nodes, GELU_CONSTS), "bias": bias}
    out, stats = run(make(nodes, consts, opset=17), contrib_ops=True)
    assert stats == {"gelu-erf": 1} and ops(out) == ["Add", "com.microsoft::Gelu"]


# --- SiLU / Swish ---------------------------------------------------------------------------------
def silu_nodes(alpha: bool = False, other: str = "x"):
    pre = [node("Mul", ["x", "alpha"], ["xa"])] if alpha else []
    return pre + [node("Sigmoid", ["xa" if alpha else "x"], ["s"]), node("Mul", [other, "s"], ["y"])]


def test_silu_to_swish_at_opset_24():
    out, stats = run(make(silu_nodes(), opset=24))
    assert stats == {"silu": 1} and ops(out) == ["Swish"]


def test_silu_untouched_below_opset_24_without_contrib():
    m = make(silu_nodes(), opset=21)
    out, stats = run(m)
    assert stats == {} and ops(out) == ["Sigmoid", "Mul"]
    why = get_rule("silu").__doc__
    assert "->" in why or "→" in why


@pytest.mark.parametrize("alpha", [False, True])
def test_silu_contrib_quick_gelu(alpha):
    m = make(silu_nodes(alpha), {"alpha": np.float32(1.702)} if alpha else None, opset=17)
    out, stats = run(m, contrib_ops=True)
    assert stats == {"silu": 1} and ops(out) == ["com.microsoft::QuickGelu"]
    assert out.graph.nodes[0].attr("alpha") == pytest.approx(1.702 if alpha else 1.0, rel=1e-6)


def test_silu_near_miss_other_operand():
    m = make(silu_nodes(other="z"), inputs=("x", "z"), opset=24)
    out = m.clone()
    assert get_pass("fuse-activations")(contrib_ops=True).run(out, PassContext()).stats == {}


# --- HardSwish ------------------------------------------------------------------------------------
def hswish_nodes(form: str):
    if form == "hardsigmoid":  # torch.onnx opset < 14: x * HardSigmoid(x, alpha=1/6)
        return [node("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.5), node("Mul", ["x", "h"], ["y"])]
    clip = [node("Add", ["x", "three"], ["x3"]), node("Clip", ["x3", "zero", "six"], ["r6"])]
    if form == "div":  # x * relu6(x + 3) / 6
        return clip + [node("Mul", ["x", "r6"], ["m"]), node("Div", ["m", "six"], ["y"])]
    if form == "div_inner":  # x * (relu6(x + 3) / 6)
        return clip + [node("Div", ["r6", "six"], ["m"]), node("Mul", ["x", "m"], ["y"])]
    if form == "mul_sixth":  # x * relu6(x + 3) * (1/6)
        return clip + [node("Mul", ["r6", "x"], ["m"]), node("Mul", ["sixth", "m"], ["y"])]
    return clip + [node("Mul", ["r6", "sixth"], ["m"]), node("Mul", ["x", "m"], ["y"])]


HS_CONSTS = {"three": np.float32(3), "zero": np.float32(0), "six": np.float32(6), "sixth": np.float32(1 / 6)}


@pytest.mark.parametrize("form", ["hardsigmoid", "div", "div_inner", "mul_sixth", "mul_sixth_inner"])
def test_hard_swish_fires(form):
    nodes = hswish_nodes(form)
    out, stats = run(make(nodes, consts_for(nodes, HS_CONSTS), opset=14))
    assert stats == {"hard-swish": 1} and ops(out) == ["HardSwish"]


@pytest.mark.parametrize(
    "why",
    ["hardsigmoid default alpha", "clip max 5", "opset 13", "sigmoid of another value"],
)
def test_hard_swish_near_misses(why):
    opset, consts = 14, dict(HS_CONSTS)
    inputs = ("x",)
    if why == "hardsigmoid default alpha":
        nodes = [node("HardSigmoid", ["x"], ["h"]), node("Mul", ["x", "h"], ["y"])]
    elif why == "clip max 5":
        nodes = hswish_nodes("div")
        consts["six_clip"] = np.float32(5)
        nodes[1].input[2] = "six_clip"
    elif why == "opset 13":
        nodes, opset = hswish_nodes("div"), 13
    else:
        nodes = [node("HardSigmoid", ["z"], ["h"], alpha=1 / 6, beta=0.5), node("Mul", ["x", "h"], ["y"])]
        inputs = ("x", "z")
    m = make(nodes, consts_for(nodes, consts), opset=opset, inputs=inputs)
    out, stats = run(m)
    assert stats == {}, why
    assert ops(out) == ops(m)


# --- a small "model": several activations, pipeline syntax, explain -------------------------------
def renamed(nodes, mapping, prefix):
    """Copies of `nodes` reading/writing mapping[name] (else prefix + name for internal values)."""
    def r(name):
        return mapping.get(name, name if name in GELU_CONSTS or name in HS_CONSTS else prefix + name)

    return [
        node(n.op_type, [r(i) for i in n.input], [r(o) for o in n.output], **{a.name: helper.get_attribute_value(a) for a in n.attribute})
        for n in nodes
    ]


def test_mlp_with_all_activations_through_the_pipeline_syntax():
    nodes = (
        [node("MatMul", ["x", "w1"], ["h1"])]
        + renamed(gelu_erf_nodes("torch"), {"x": "h1", "y": "a1"}, "g1_")
        + [node("MatMul", ["a1", "w2"], ["h2"])]
        + renamed(hswish_nodes("hardsigmoid"), {"x": "h2", "y": "y"}, "hs_")
    )
    rng = np.random.default_rng(0)
    consts = {**consts_for(nodes, GELU_CONSTS), "w1": rng.standard_normal((8, 8)).astype(np.float32), "w2": rng.standard_normal((8, 8)).astype(np.float32)}
    m = make(nodes, consts, opset=20)
    [p] = parse_pipeline("fuse-activations{contrib-ops=0}")
    out = m.clone()
    res = p.run(out, PassContext())
    assert res.stats == {"gelu-erf": 1, "hard-swish": 1, "initializers-removed": 3}
    assert ops(out) == ["MatMul", "Gelu", "MatMul", "HardSwish"]
    assert check_same_outputs(m, out).ok
    [pc] = parse_pipeline("fuse-activations{contrib-ops=1}")
    assert pc.contrib_ops is True


def test_explain_says_why_gelu_did_not_fire():
    nodes = gelu_erf_nodes("torch")
    consts = consts_for(nodes, GELU_CONSTS)
    consts["half"] = np.float32(0.6)
    m = make(nodes, consts)
    root = m.graph.nodes[-1]
    reason = get_rule("gelu-erf").why_not(root)
    assert reason and "0.5" in reason


def test_silu_is_left_alone_where_onnxruntime_has_no_swish_kernel() -> None:
    """onnxruntime 1.32 registers Swish for opset 24 only: under a later opset the rewrite would
    produce a model onnxruntime cannot load, so the rule refuses and says why."""
    import onnx.parser

    from graphopt.check import check_same_outputs, onnxruntime_has_kernel

    for opset in (24, 25):
        text = f'<ir_version: 10, opset_import: ["" : {opset}]> g (float[2,3] X) => (float[2,3] Y) {{ S = Sigmoid(X)\n Y = Mul(X, S) }}'
        m = graphopt.load(onnx.parser.parse_model(text))
        out = graphopt.optimize(m, "fuse-activations")
        fused = [n.op_type for n in out.graph] == ["Swish"]
        assert fused == onnxruntime_has_kernel("Swish", opset)
        assert check_same_outputs(m, out).ok  # either way the result runs and agrees


def test_explain_sees_the_models_opset_and_runtime() -> None:
    """`--explain` runs the rule's checks with the model's opset, as the pass does: under opset
    25 onnxruntime has no Swish kernel, and explain says so instead of claiming a match."""
    import onnx.parser

    from graphopt.check import onnxruntime_has_kernel
    from graphopt.pattern import explain, get_rule

    text = '<ir_version: 10, opset_import: ["" : 25]> g (float[2,3] X) => (float[2,3] Y) { S = Sigmoid(X)\n Y = Mul(X, S) }'
    m = graphopt.load(onnx.parser.parse_model(text))
    text_out = explain(m, get_rule("silu"))
    if onnxruntime_has_kernel("Swish", 25):
        assert "fires at 1" in text_out
    else:
        assert "has no Swish kernel" in text_out and "fires at" not in text_out
    old = graphopt.load(onnx.parser.parse_model(text.replace('"" : 25', '"" : 17')))
    assert "opset 17 < 24 has no Swish" in explain(old, get_rule("silu"))

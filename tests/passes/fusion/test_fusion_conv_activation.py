"""fuse-conv-activation (rule conv-activation): Conv + Relu / LeakyRelu / Clip / Sigmoid / Tanh /
HardSigmoid → com.microsoft FusedConv with contrib-ops=1 only; near-misses are left alone; the
pass is idempotent, keeps the IR valid and keeps onnxruntime's outputs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.check import check_same_outputs
from graphopt.ir import Model
from graphopt.pattern import list_rules
from graphopt.testing import check_pass
from graphopt.transform import PassContext, get_pass

F = TensorProto.FLOAT
node = helper.make_node
NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


def make(act_nodes, *, bias=True, dtype=F, opset=17, extra_consts=None, extra_inputs=(), outputs=(("y", [1, 4, 6, 6]),)) -> Model:
    rng = np.random.default_rng(0)
    npt = NP[dtype]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(npt), "W")]
    conv_in = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(4).astype(npt), "B"))
        conv_in.append("B")
    for k, v in (extra_consts or {}).items():
        inits.append(numpy_helper.from_array(np.asarray(v, npt), k))
    conv = node("Conv", conv_in, ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    g = helper.make_graph(
        [conv, *act_nodes],
        "g",
        [helper.make_tensor_value_info("x", dtype, [1, 3, 6, 6])] + [helper.make_tensor_value_info(n, dtype, s) for n, s in extra_inputs],
        [helper.make_tensor_value_info(n, dtype, s) for n, s in outputs],
        initializer=inits,
    )
    return graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10))


def ops(model: Model) -> list[str]:
    return [(n.domain + "::" if n.domain else "") + n.op_type for n in model.all_nodes()]


def run(model: Model, contrib: bool = True, compare: bool = True) -> tuple[Model, dict]:
    """The pass on a copy: check_pass (verify(), idempotent, onnx.checker, same outputs on
    onnxruntime); `compare=False` for models onnxruntime cannot run: verify() and idempotence."""
    if compare:
        out, stats = check_pass(model, "fuse-conv-activation", contrib_ops=contrib)
        assert bool(stats) == bool(stats.get("conv-activation")), stats
        return out, stats
    out = model.clone()
    result = get_pass("fuse-conv-activation")(contrib_ops=contrib).run(out, PassContext())
    out.verify()
    again = get_pass("fuse-conv-activation")(contrib_ops=contrib).run(out, PassContext())
    assert not again.changed and not again.stats, again.stats
    assert result.changed == bool(result.stats.get("conv-activation"))
    return out, dict(result.stats)


CASES = [
    ("Relu", [node("Relu", ["c"], ["y"])], {}, "Relu", None),
    ("LeakyRelu", [node("LeakyRelu", ["c"], ["y"], alpha=0.2)], {}, "LeakyRelu", [0.2]),
    ("LeakyReluDefault", [node("LeakyRelu", ["c"], ["y"])], {}, "LeakyRelu", [0.01]),
    ("Clip", [node("Clip", ["c", "lo", "hi"], ["y"])], {"lo": 0.0, "hi": 6.0}, "Clip", [0.0, 6.0]),
    ("ClipMaxOnly", [node("Clip", ["c", "", "hi"], ["y"])], {"hi": 1.5}, "Clip", [-float(np.finfo(np.float32).max), 1.5]),
    ("Sigmoid", [node("Sigmoid", ["c"], ["y"])], {}, "Sigmoid", None),
    ("Tanh", [node("Tanh", ["c"], ["y"])], {}, "Tanh", None),
    ("HardSigmoid", [node("HardSigmoid", ["c"], ["y"], alpha=0.3, beta=0.4)], {}, "HardSigmoid", [0.3, 0.4]),
    ("HardSigmoidDefault", [node("HardSigmoid", ["c"], ["y"])], {}, "HardSigmoid", [0.2, 0.5]),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name, nodes, consts, activation, params", CASES, ids=[c[0] for c in CASES])
def test_fires(name, nodes, consts, activation, params, bias) -> None:
    m = make(nodes, bias=bias, extra_consts=consts)
    out, stats = run(m)
    assert stats.get("conv-activation") == 1
    assert ops(out) == ["com.microsoft::FusedConv"]
    fused = next(iter(out.graph))
    assert fused.attr("activation") in (activation, activation.encode())
    if params is None:
        assert fused.attr("activation_params") is None
    else:
        assert np.allclose(fused.attr("activation_params"), params, rtol=1e-6)
    assert list(fused.attr("pads")) == [1, 1, 1, 1] and list(fused.attr("kernel_shape")) == [3, 3]
    assert len(fused.inputs) == (3 if bias else 2)
    assert out.opset_imports.get("com.microsoft") == 1
    assert [o.name for o in out.graph.outputs] == ["y"]
    assert "lo" not in out.graph.initializers and "hi" not in out.graph.initializers


def test_clip_attributes_old_opset() -> None:
    m = make([node("Clip", ["c"], ["y"], min=-1.0, max=2.0)], opset=10)
    out, stats = run(m)
    assert stats.get("conv-activation") == 1
    fused = next(iter(out.graph))
    assert np.allclose(fused.attr("activation_params"), [-1.0, 2.0])


def test_two_convs_in_a_chain() -> None:
    rng = np.random.default_rng(1)
    m = make(
        [node("Relu", ["c"], ["r"]), node("Conv", ["r", "W2"], ["c2"], kernel_shape=[1, 1]), node("Tanh", ["c2"], ["y"])],
        extra_consts={"W2": rng.standard_normal((4, 4, 1, 1))},
    )
    out, stats = run(m)
    assert stats.get("conv-activation") == 2
    assert ops(out) == ["com.microsoft::FusedConv"] * 2


# --- near-misses -----------------------------------------------------------------------------------
def test_contrib_off_changes_nothing() -> None:
    m = make([node("Relu", ["c"], ["y"])])
    out, stats = run(m, contrib=False)
    assert stats == {}
    assert ops(out) == ["Conv", "Relu"]
    assert "com.microsoft" not in out.opset_imports


def test_shared_conv_output() -> None:
    m = make([node("Relu", ["c"], ["y"]), node("Sigmoid", ["c"], ["z"])], outputs=(("y", [1, 4, 6, 6]), ("z", [1, 4, 6, 6])))
    out, stats = run(m)
    assert stats.get("conv-activation") is None
    assert sorted(ops(out)) == ["Conv", "Relu", "Sigmoid"]
    assert "com.microsoft" not in out.opset_imports


def test_conv_output_is_graph_output() -> None:
    m = make([node("Relu", ["c"], ["y"])], outputs=(("y", [1, 4, 6, 6]), ("c", [1, 4, 6, 6])))
    out, stats = run(m)
    assert stats.get("conv-activation") is None
    assert ops(out) == ["Conv", "Relu"]


def test_non_constant_clip_bounds() -> None:
    m = make([node("Clip", ["c", "lo", "hi"], ["y"])], extra_inputs=(("lo", []), ("hi", [])))
    out, stats = run(m, compare=False)
    assert stats.get("conv-activation") is None
    assert ops(out) == ["Conv", "Clip"]


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.DOUBLE])
def test_non_float32_conv(dtype) -> None:
    m = make([node("Relu", ["c"], ["y"])], dtype=dtype)
    out, stats = run(m, compare=False)
    assert stats.get("conv-activation") is None
    assert ops(out) == ["Conv", "Relu"]
    assert "com.microsoft" not in out.opset_imports


def test_other_activation_not_fused() -> None:
    m = make([node("Elu", ["c"], ["y"])])
    out, stats = run(m)
    assert stats == {}
    assert ops(out) == ["Conv", "Elu"]


def test_not_inside_function_body() -> None:
    rng = np.random.default_rng(0)
    fn = helper.make_function(
        "local", "ConvRelu", ["x", "W"], ["y"],
        [node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3]), node("Relu", ["c"], ["y"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    g = helper.make_graph(
        [node("ConvRelu", ["x", "W"], ["y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", F, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", F, [1, 4, 4, 4])],
        initializer=[numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")],
    )
    m = graphopt.load(
        helper.make_model(
            g, functions=[fn], ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
        )
    )
    out, stats = run(m)
    assert stats.get("conv-activation") is None
    assert "com.microsoft::FusedConv" not in ops(out)
    assert "com.microsoft" not in out.opset_imports


def test_rule_registered_with_docstring() -> None:
    rule = list_rules()["conv-activation"]
    doc = (rule.__doc__ or "").lower()
    assert "→" in doc or "->" in doc
    assert "not" in doc


def test_pipeline_option() -> None:
    from graphopt.transform import parse_pipeline

    (p,) = parse_pipeline("fuse-conv-activation{contrib-ops=1}")
    m = make([node("Relu", ["c"], ["y"])])
    before = m.clone()
    assert p.run(m, PassContext()).changed
    assert ops(m) == ["com.microsoft::FusedConv"]
    assert check_same_outputs(before, m, rtol=1e-4, atol=1e-5).ok

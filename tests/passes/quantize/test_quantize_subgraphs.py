"""The `quantize` pass and subgraphs: ops inside If/Loop bodies and model-local functions stay
float (no calibrated ranges there) and the report names each with its reason; the main graph
around them is quantized, also where a body reads a quantized main-graph tensor."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

import graphopt
from graphopt.calibration import calibration_from_arrays
from graphopt.passes.quantize import Quantize, output_metrics
from graphopt.transform import PassContext


def _run_ort(model: graphopt.Model, feeds):  # type: ignore[no-untyped-def]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(graphopt.to_onnx(model).SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def model_with_subgraphs() -> graphopt.Model:
    """x → Conv c1 → Relu → If(cond): then = Conv(r1, w2) (reads the outer r1), else = r1 + r1;
    → Loop(2 iterations) whose body adds a Conv; → local function f(t) = MatMul-free Mul(t, t)·Conv."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.15).astype(np.float32), "w2")
    w3 = numpy_helper.from_array((rng.standard_normal((8, 8, 1, 1)) * 0.3).astype(np.float32), "w3")
    then_g = helper.make_graph([helper.make_node("Conv", ["r1", "w2"], ["t_out"], pads=[1] * 4, name="then_conv")],
                               "then", [], [helper.make_tensor_value_info("t_out", 1, [1, 8, 8, 8])])
    else_g = helper.make_graph([helper.make_node("Add", ["r1", "r1"], ["e_out"], name="else_add")],
                               "else", [], [helper.make_tensor_value_info("e_out", 1, [1, 8, 8, 8])])
    body = helper.make_graph(
        [helper.make_node("Conv", ["s_in", "w3"], ["s_c"], name="loop_conv"),
         helper.make_node("Add", ["s_c", "s_in"], ["s_out"], name="loop_add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", 7, []), helper.make_tensor_value_info("cond_in", 9, []),
         helper.make_tensor_value_info("s_in", 1, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("cond_out", 9, []), helper.make_tensor_value_info("s_out", 1, [1, 8, 8, 8])])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g, name="choose"),
        helper.make_node("Loop", ["trip", "true", "branch"], ["looped"], body=body, name="loop"),
        helper.make_node("Square", ["looped"], ["y"], domain="local", name="call_f"),
    ]
    fn = helper.make_function("local", "Square", ["t"], ["u"],
                              [helper.make_node("Mul", ["t", "t"], ["u"], name="f_mul")],
                              [helper.make_opsetid("", 17)])
    inits = [w1, w2, w3, numpy_helper.from_array(np.array(2, np.int64), "trip"), numpy_helper.from_array(np.array(True), "true")]
    g = helper.make_graph(nodes, "main", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8]), helper.make_tensor_value_info("cond", 9, [1])],
                          [helper.make_tensor_value_info("y", 1, [1, 8, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[fn])
    m.ir_version = 8
    return graphopt.load(m.SerializeToString())


def test_bodies_and_functions_stay_float_and_are_reported() -> None:
    model = model_with_subgraphs()
    before = model.clone()
    rng = np.random.default_rng(1)
    ctx = PassContext()
    ctx.data["calibration"] = calibration_from_arrays(
        model, {"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32), "cond": np.ones((8,), bool)})
    res = Quantize(speed="off").run(model, ctx)
    rep = ctx.data["quantize"]
    assert res.changed and res.stats["int8-Conv"] == 1 and res.stats["activations-folded"] == 1  # c1 + relu1
    subs = {s["where"]: s for s in rep["float-subgraphs"]}
    assert set(subs) == {"If 'choose' then_branch", "If 'choose' else_branch", "Loop 'loop' body", "function local.Square"}
    assert subs["If 'choose' then_branch"]["ops"] == {"Conv": 1}
    assert subs["Loop 'loop' body"]["ops"] == {"Conv": 1, "Add": 1}
    assert "calibrat" in subs["Loop 'loop' body"]["reason"] and "call site" in subs["function local.Square"]["reason"]
    # the bodies themselves are untouched: no Q/DQ inside them
    for n in model.graph:
        for g in n.subgraphs():
            assert not {m.op_type for m in g.all_nodes()} & {"QuantizeLinear", "DequantizeLinear"}
    model.verify()
    onnx.checker.check_model(graphopt.to_onnx(model), full_check=True)
    # both branches read the quantized r1 from the main graph; numbers stay close on each
    for cond in (True, False):
        feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32), "cond": np.array([cond])}
        # (the output is squared by the function, which doubles the relative error: ~6 dB)
        assert output_metrics([_run_ort(before, feeds)], [_run_ort(model, feeds)])["sqnr"] > 20
    # the log says it too
    assert any("Loop 'loop' body" in line and "float" in line for line in ctx.log)


def test_model_without_subgraphs_has_no_entry() -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "t",
                          [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])], [helper.make_tensor_value_info("y", 1, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    model = graphopt.load(m.SerializeToString())
    ctx = PassContext()
    ctx.data["calibration"] = calibration_from_arrays(model, {"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)})
    Quantize(speed="off").run(model, ctx)
    assert "float-subgraphs" not in ctx.data["quantize"]

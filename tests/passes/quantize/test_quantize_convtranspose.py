"""int8 ConvTranspose in the `quantize` pass: per-channel weight scales on axis 1 (the weight is
[C_in, C_out/group, k...]), groups (scales shared by the groups, bias scale tiled over them),
int32 bias, Relu folded, numbers through onnxruntime before/after within a quantization
tolerance, and what every pass owes (graphopt.testing.check_pass)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import graphopt
from graphopt.calibration import calibration_from_arrays
from graphopt.passes.quantize import Quantize, output_metrics
from graphopt.testing import check_pass
from graphopt.transform import PassContext



def ort_run(model: graphopt.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime with all optimizations (its QDQ transformer on), as a user runs the model."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(graphopt.to_onnx(model).SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def convtranspose_model(group: int = 1, cin: int = 8, cout: int = 12, hw: int = 8, k: int = 3, stride: int = 2,
                        bias: bool = True, relu: bool = True, seed: int = 0, weight_input: bool = False) -> graphopt.Model:
    """x[1, cin, hw, hw] → ConvTranspose(stride, pads 1, output_padding) [→ Relu]. The weight's
    columns (axis 1) have magnitudes spread over 40×, so per-channel scales on the wrong axis
    would show as a large error on the small channels."""
    rng = np.random.default_rng(seed)
    spread = np.geomspace(0.05, 2.0, cout // group).astype(np.float32)
    w = (rng.standard_normal((cin, cout // group, k, k)) * spread[None, :, None, None]).astype(np.float32)
    inits = [] if weight_input else [numpy_helper.from_array(w, "w")]
    ins = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.3).astype(np.float32), "b"))
        ins.append("b")
    out = "ct" if relu else "y"
    nodes = [helper.make_node("ConvTranspose", ins, [out], strides=[stride] * 2, pads=[1] * 4,
                              output_padding=[stride - 1] * 2, group=group, name="up")]
    if relu:
        nodes.append(helper.make_node("Relu", ["ct"], ["y"], name="relu"))
    inputs = [helper.make_tensor_value_info("x", 1, [1, cin, hw, hw])]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("w", 1, list(w.shape)))
    g = helper.make_graph(nodes, "t", inputs, [helper.make_tensor_value_info("y", 1, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return graphopt.load(m.SerializeToString())


def _data(model: graphopt.Model, n: int = 8, seed: int = 1):
    shape = list(model.graph.inputs[0].shape.dims)
    x = np.random.default_rng(seed).standard_normal([n] + shape[1:]).astype(np.float32)
    return calibration_from_arrays(model, {"x": x})


def _run(model: graphopt.Model, **opts):
    ctx = PassContext()
    ctx.data["calibration"] = _data(model)
    opts.setdefault("speed", "off")
    return Quantize(**opts).run(model, ctx), ctx


def _feeds(model: graphopt.Model, seed: int = 7) -> dict[str, np.ndarray]:
    shape = list(model.graph.inputs[0].shape.dims)
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("group", [1, 2, 4])
def test_convtranspose_is_quantized_per_channel_on_axis_1(group: int) -> None:
    model = convtranspose_model(group)
    before = model.clone()
    res, ctx = _run(model, reduce_range="false")
    assert res.changed
    assert res.stats["int8-ConvTranspose"] == 1 and res.stats["activations-folded"] == 1
    assert res.stats["units-int8"] == 1 and res.stats["units-float"] == 0
    model.verify()
    onnx.checker.check_model(graphopt.to_onnx(model), full_check=True)
    assert "Relu" not in [n.op_type for n in model.graph]
    ct = next(n for n in model.graph if n.op_type == "ConvTranspose")
    x_dq, w_dq, b_dq = (ct.inputs[i].producer() for i in range(3))
    assert {x_dq.op_type, w_dq.op_type, b_dq.op_type} == {"DequantizeLinear"}

    # weights: int8, one scale per column of axis 1 (C_out/group of them), max|w[:, j]| / 127
    w = numpy_helper.to_array(next(t for t in graphopt.to_onnx(before).graph.initializer if t.name == "w"))
    wq = w_dq.inputs[0].const_value.numpy()
    ws = w_dq.inputs[1].const_value.numpy()
    assert wq.dtype == np.int8 and w_dq.attr("axis") == 1 and ws.shape == (12 // group,)
    np.testing.assert_allclose(ws, np.abs(w).max(axis=(0, 2, 3)) / 127, rtol=1e-6)
    deq = wq.astype(np.float32) * ws[None, :, None, None]
    assert np.all(np.abs(deq - w) <= ws[None, :, None, None] / 2 + 1e-7)  # half a step of its own channel

    # bias: int32, output channel g·(C_out/group) + j has scale s_x · s_w[j]
    sx = float(x_dq.inputs[1].const_value.numpy())
    bs = b_dq.inputs[1].const_value.numpy()
    assert b_dq.inputs[0].const_value.dtype.name == "INT32" and bs.shape == (12,)
    np.testing.assert_allclose(bs, np.tile(np.float32(sx) * ws, group), rtol=1e-6)
    b = numpy_helper.to_array(next(t for t in graphopt.to_onnx(before).graph.initializer if t.name == "b"))
    np.testing.assert_allclose(b_dq.inputs[0].const_value.numpy() * bs, b, atol=float(bs.max()) / 2 + 1e-7)

    # numbers through onnxruntime, before vs after: int8 error only
    feeds = _feeds(model)
    m = output_metrics([ort_run(before, feeds)], [ort_run(model, feeds)])
    assert m["sqnr"] > 30 and m["cosine"] > 0.999
    layer = ctx.data["quantize"]["layers"][0]
    assert layer["op"] == "ConvTranspose+Relu" and layer["status"] == "int8" and layer["sqnr_db"] > 30
    assert layer["range"][0] == 0.0 and layer["range"][1] > 0  # the folded Relu's calibrated range
    assert "no-ort-int8-kernel" in layer["tags"]


@pytest.mark.parametrize("group", [1, 3])
def test_check_pass_contract(group: int) -> None:
    """verify(), a second run that changes nothing and reports nothing, the onnx checker, and
    onnxruntime's outputs within a quantization tolerance (a few output steps)."""
    model = convtranspose_model(group, cin=6, cout=6, relu=False)
    feeds = _feeds(model)
    ref = ort_run(model, feeds)[0]
    # synthetic calibration (no data in the context): N(0, 1), as the feeds
    out, stats = check_pass(model, "quantize", feeds, rtol=0.0, atol=0.06 * float(np.abs(ref).max()), speed="off")
    assert stats["int8-ConvTranspose"] == 1 and stats["synthetic-calibration"] == 1


def test_near_misses_stay_float_with_a_reason() -> None:
    # a weight that is a graph input: nothing to quantize per channel
    model = convtranspose_model(1, weight_input=True)
    rng = np.random.default_rng(0)
    data = calibration_from_arrays(model, {"x": rng.standard_normal((4, 8, 8, 8)).astype(np.float32),
                                           "w": rng.standard_normal((16, 12, 3, 3)).astype(np.float32)})
    ctx = PassContext()
    ctx.data["calibration"] = data
    res = Quantize(speed="off").run(model, ctx)
    assert not res.changed and res.stats["units-int8"] == 0
    assert "constant" in ctx.data["quantize"]["layers"][0]["reason"]
    # speed=rules: onnxruntime's CPU EP has no int8 ConvTranspose, so it stays float, and says so
    model = convtranspose_model(2)
    res, ctx = _run(model, speed="rules")
    assert not res.changed and res.stats["units-float"] == 1
    assert "no int8 kernel" in ctx.data["quantize"]["layers"][0]["reason"]


def test_second_run_changes_nothing() -> None:
    model = convtranspose_model(2)
    _run(model)
    text = str(model)
    res, _ = _run(model)
    assert not res.changed and res.stats == {} and str(model) == text


def test_speed_measure_tries_convtranspose_float() -> None:
    model = convtranspose_model(1, cin=16, cout=16, hw=16)
    before = model.clone()
    res, ctx = _run(model, speed="measure", speed_budget=0.5, profile_runs=2)
    speed = ctx.data["quantize"]["speed"]
    names = [c["candidate"] for c in speed["candidates"]]
    assert any("ops without an onnxruntime int8 kernel" in n for n in names)
    if res.changed:  # whichever way the timing went, the model still computes the same thing
        feeds = _feeds(before)
        assert output_metrics([ort_run(before, feeds)], [ort_run(model, feeds)])["sqnr"] > 30
    else:  # no variant paid, or the fastest one is the ConvTranspose back in float: untouched
        result = ctx.data["quantize"]["result"]
        assert result.startswith("kept float") or result.startswith("nothing quantized")
        assert "QuantizeLinear" not in [n.op_type for n in model.graph]
        if result.startswith("nothing quantized"):
            assert "speed=measure" in ctx.data["quantize"]["layers"][0]["reason"]


@settings(max_examples=12, deadline=None)
@given(group=st.sampled_from([1, 2, 4]), k=st.sampled_from([2, 3, 4]), stride=st.sampled_from([1, 2]),
       hw=st.integers(3, 7), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_random_convtransposes_stay_close(group: int, k: int, stride: int, hw: int, bias: bool, seed: int) -> None:
    model = convtranspose_model(group, cin=8, cout=8, hw=hw, k=k, stride=stride, bias=bias, relu=bool(seed % 2), seed=seed)
    before = model.clone()
    res, _ = _run(model)
    assert res.stats["int8-ConvTranspose"] == 1
    model.verify()
    onnx.checker.check_model(graphopt.to_onnx(model), full_check=True)
    # a calibration sample (a held-out one can exceed the 8-sample range: with a few hundred
    # output values one saturated outlier alone costs ~10 dB, which is calibration, not the op)
    shape = list(before.graph.inputs[0].shape.dims)
    feeds = {"x": np.random.default_rng(1).standard_normal([8] + shape[1:]).astype(np.float32)[:1]}
    assert output_metrics([ort_run(before, feeds)], [ort_run(model, feeds)])["sqnr"] > 25

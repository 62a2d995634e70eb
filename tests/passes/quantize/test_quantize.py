"""int8 quantization (`quantize` pass) and calibration (graphopt.calibration).

Models are built here with onnx.helper; every quantized model is checked by the onnx checker,
loaded by onnxruntime (whose optimizer must turn the node units into int8 kernels), and run
against the float model.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import graphopt
from graphopt.cli import main as cli_main
from graphopt.calibration import (
    CalibrationError,
    HistogramObserver,
    calibration_from_arrays,
    collect_ranges,
    load_calibration,
    synthetic_calibration,
)
from graphopt.errors import GraphoptError, UsageError
from graphopt.passes.quantize import (
    Budget,
    Quantize,
    activation_params,
    dequantize_array,
    output_metrics,
    quantize,
    quantize_array,
    quantize_weight,
)
from graphopt.transform import PassContext, parse_pipeline
from paths import CORPUS_CACHE

F32_MIN = float(np.finfo(np.float32).min)


# ------------------------------------------------------------------------------ model makers


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> graphopt.Model:
    g = helper.make_graph(nodes, "t", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return graphopt.load(m.SerializeToString())


def _conv(rng, nodes, inits, name, x, cin, cout, k=3, group=1, bias=True):
    w = (rng.standard_normal((cout, cin // group, k, k)) * (1.0 / np.sqrt(cin // group * k * k))).astype(np.float32)
    inits.append(numpy_helper.from_array(w, name + "_w"))
    ins = [x, name + "_w"]
    if bias:
        inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), name + "_b"))
        ins.append(name + "_b")
    nodes.append(helper.make_node("Conv", ins, [name], pads=[k // 2] * 4, group=group, name=name))


def small_cnn(seed: int = 0, hw: int = 16) -> graphopt.Model:
    """Conv-Relu, Conv + residual Add-Relu, MaxPool, Conv-Clip(0,6), depthwise Conv, Concat,
    GlobalAveragePool, Flatten, Gemm."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    _conv(rng, nodes, inits, "c1", "x", 3, 16)
    nodes.append(helper.make_node("Relu", ["c1"], ["r1"], name="relu1"))
    _conv(rng, nodes, inits, "c2", "r1", 16, 16)
    nodes.append(helper.make_node("Add", ["c2", "r1"], ["a1"], name="add1"))
    nodes.append(helper.make_node("Relu", ["a1"], ["r2"], name="relu2"))
    nodes.append(helper.make_node("MaxPool", ["r2"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"))
    _conv(rng, nodes, inits, "c3", "p1", 16, 32)
    inits += [numpy_helper.from_array(np.array(0, np.float32), "zero"), numpy_helper.from_array(np.array(6, np.float32), "six")]
    nodes.append(helper.make_node("Clip", ["c3", "zero", "six"], ["r3"], name="clip3"))
    _conv(rng, nodes, inits, "dw", "r3", 32, 32, group=32)
    nodes.append(helper.make_node("Concat", ["dw", "r3"], ["cat"], axis=1, name="cat"))
    nodes.append(helper.make_node("GlobalAveragePool", ["cat"], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat"))
    inits.append(numpy_helper.from_array((rng.standard_normal((10, 64)) * 0.2).astype(np.float32), "fc_w"))
    inits.append(numpy_helper.from_array((rng.standard_normal(10) * 0.1).astype(np.float32), "fc_b"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], transB=1, name="fc"))
    return _model(nodes, [helper.make_tensor_value_info("x", 1, [1, 3, hw, hw])],
                  [helper.make_tensor_value_info("y", 1, [1, 10])], inits)


def tiny_attention(seed: int = 0, seq: int = 8, dim: int = 16) -> graphopt.Model:
    """x[1,S,D] @ Wq, @ Wk; scores + additive mask ((1 - m) * float32 min); Softmax; @ (x @ Wv); @ Wo."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32), n)
             for n in ("wq", "wk", "wv", "wo")]
    inits += [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
              numpy_helper.from_array(np.array(F32_MIN, np.float32), "neg"),
              numpy_helper.from_array(np.array([0, 2, 1], np.int64), "perm_unused")]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="mm_q"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="mm_k"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="mm_v"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Cast", ["m"], ["mf"], to=1, name="cast_m"),
        helper.make_node("Sub", ["one", "mf"], ["inv"], name="inv"),
        helper.make_node("Mul", ["inv", "neg"], ["bias"], name="mask_bias"),
        helper.make_node("Unsqueeze", ["bias", "ax1"], ["bias3"], name="unsq"),
        helper.make_node("Add", ["s", "bias3"], ["sm_in"], name="add_mask"),
        helper.make_node("Softmax", ["sm_in"], ["p"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["p", "v"], ["ctx"], name="ctx"),
        helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="mm_o"),
    ]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "ax1"))
    return _model(nodes, [helper.make_tensor_value_info("x", 1, [1, seq, dim]), helper.make_tensor_value_info("m", 7, [1, seq])],
                  [helper.make_tensor_value_info("y", 1, [1, seq, dim])], inits)


def cnn_data(model: graphopt.Model, n: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    shape = [d for d in model.graph.inputs[0].shape.dims]
    return calibration_from_arrays(model, {"x": rng.standard_normal([n] + shape[1:]).astype(np.float32)})


def attention_data(model: graphopt.Model, n: int = 8, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8, 16)).astype(np.float32)
    m = np.ones((n, 8), np.int64)
    m[:, 6:] = 0  # padded tail
    return calibration_from_arrays(model, {"x": x, "m": m})


def ort_run(model: graphopt.Model, feeds, *, optimize: bool = True, dump: str | None = None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if dump:
        so.optimized_model_filepath = dump
    s = ort.InferenceSession(graphopt.to_onnx(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def ops(model: graphopt.Model) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def run_pass(model, data=None, **opts):
    ctx = PassContext()
    if data is not None:
        ctx.data["calibration"] = data
    opts.setdefault("speed", "off")
    res = Quantize(**opts).run(model, ctx)
    return res, ctx


# ---------------------------------------------------------------------- quantize/dequantize


@settings(max_examples=60, deadline=None)
@given(lo=st.floats(-100, 0), span=st.floats(1e-3, 200), kind=st.sampled_from(["uint8", "int8"]), seed=st.integers(0, 2**16))
def test_activation_roundtrip_error_is_within_half_a_step(lo: float, span: float, kind: str, seed: int) -> None:
    hi = max(lo + span, 0.0)
    p = activation_params(lo, hi, kind)
    x = np.random.default_rng(seed).uniform(lo, hi, 500).astype(np.float32)
    err = np.abs(dequantize_array(quantize_array(x, p), p) - x)
    # inside the range: at most half a step (plus float rounding); zero is exact
    assert err.max() <= p.scale / 2 * 1.001 + 1e-6 * max(abs(lo), abs(hi))
    assert dequantize_array(quantize_array(np.zeros(1, np.float32), p), p)[0] == 0.0


def test_values_outside_the_range_saturate() -> None:
    p = activation_params(0.0, 6.0, "uint8")
    assert p.zero_point == 0 and p.dtype.name == "UINT8"
    x = np.array([-3.0, 0.0, 6.0, 100.0], np.float32)
    y = dequantize_array(quantize_array(x, p), p)
    np.testing.assert_allclose(y, [0.0, 0.0, 6.0, 6.0], atol=1e-6)  # a folded Relu6, exactly
    p8 = activation_params(0.0, 6.0, "int8")
    assert p8.zero_point == -128  # a range starting at 0 keeps the Relu exact in int8 too
    assert dequantize_array(quantize_array(np.array([-1.0], np.float32), p8), p8)[0] == 0.0


@settings(max_examples=40, deadline=None)
@given(shape=st.sampled_from([(4, 3, 3, 3), (8, 1, 3, 3), (16, 5), (3, 7)]), scale=st.floats(1e-3, 10), seed=st.integers(0, 2**16),
       qmax=st.sampled_from([64, 127]))
def test_weight_per_channel_error_bound(shape, scale: float, seed: int, qmax: int) -> None:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * scale * rng.uniform(0.01, 1, (shape[0],) + (1,) * (len(shape) - 1))).astype(np.float32)
    wq, s = quantize_weight(w, 0, qmax)
    assert wq.dtype == np.int8 and np.abs(wq.astype(int)).max() <= qmax
    assert s.shape == (shape[0],)
    err = np.abs(wq.astype(np.float32) * s.reshape((-1,) + (1,) * (len(shape) - 1)) - w)
    assert (err <= s.reshape((-1,) + (1,) * (len(shape) - 1)) / 2 * 1.001 + 1e-12).all()
    # each channel uses its full range: its largest weight maps to +-qmax
    assert (np.abs(wq.reshape(shape[0], -1)).max(axis=1) == qmax).all()


# ---------------------------------------------------------------------------- calibration


def test_streaming_histogram_equals_one_shot() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(1000) * (0.01 * 10 ** i) for i in range(4)] + [np.zeros(10), rng.exponential(3, 500)]
    stream, once = HistogramObserver("t"), HistogramObserver("t")
    for b in batches:
        stream.update(b)
    once.update(np.concatenate(batches))
    assert stream.radius == once.radius
    np.testing.assert_array_equal(stream.hist, once.hist)
    for method in ("minmax", "percentile", "entropy", "mse"):
        a, b = stream.stats(method), once.stats(method)
        assert (a.lo, a.hi) == (b.lo, b.hi), method


def test_range_methods_clip_outliers_and_contain_zero() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000), [80.0, -60.0]])
    ob = HistogramObserver("t")
    ob.update(x)
    mm = ob.stats("minmax")
    assert (mm.lo, mm.hi) == (-60.0, 80.0)
    for method in ("percentile", "entropy", "mse"):
        s = ob.stats(method)
        assert s.lo <= 0 <= s.hi
        assert -60.0 <= s.lo and s.hi <= 80.0
        if method == "mse":  # trades the outliers' clipping error against rounding error
            assert s.hi < 80.0
        else:
            assert s.hi < 20 and s.lo > -20, (method, s)  # the two outliers do not set the range
    relu = HistogramObserver("r")
    relu.update(np.maximum(rng.standard_normal(1000), 0))
    assert relu.stats("entropy").lo == 0.0


def test_sentinels_never_enter_a_range() -> None:
    ob = HistogramObserver("mask")
    ob.update(np.array([0.0, -1.5, 2.0, F32_MIN, -np.inf, np.nan], np.float32))
    s = ob.stats("minmax")
    assert (s.lo, s.hi) == (-1.5, 2.0) and s.sentinels == 3 and s.has_sentinels


def test_collect_ranges_streams_chunks_like_one_pass() -> None:
    model = small_cnn()
    data = cnn_data(model, 6)
    names = ["c1", "r1", "a1", "cat", "y", "x"]
    one = collect_ranges(model, data, names, chunk_size=100)
    many = collect_ranges(model, data, names, chunk_size=2)
    assert {k: (v.lo, v.hi, v.count) for k, v in one.items()} == {k: (v.lo, v.hi, v.count) for k, v in many.items()}
    # against numpy on the whole data set
    x = np.concatenate([b["x"] for b in data])
    assert one["x"].lo == pytest.approx(float(x.min())) and one["x"].hi == pytest.approx(float(x.max()))
    assert one["r1"].lo == 0.0 and one["r1"].min >= 0.0


def test_npz_file_and_folder(tmp_path) -> None:
    model = small_cnn()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x=x)
    d = load_calibration(str(tmp_path / "a.npz"), model)
    batches = list(d)
    assert len(batches) == 5 and batches[0]["x"].shape == (1, 3, 16, 16) and not d.synthetic
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "0.npz", x=x[:2])
    np.savez(folder / "1.npz", x=x[2:])
    f = load_calibration(str(folder), model)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in f]), x)
    assert "5 samples" in f.source
    assert len(list(load_calibration(str(folder), model, limit=3))) == 3


def test_bad_calibration_data_is_a_one_line_error(tmp_path) -> None:
    model = small_cnn()
    np.savez(tmp_path / "wrong_name.npz", y=np.zeros((2, 3, 16, 16), np.float32))
    np.savez(tmp_path / "wrong_shape.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name, words in [("wrong_name.npz", "no array for model input 'x'"), ("wrong_shape.npz", "shape"),
                        ("junk.npz", "not a readable"), ("missing.npz", "no such file")]:
        with pytest.raises(CalibrationError) as e:
            load_calibration(str(tmp_path / name), model)
        assert words in str(e.value) and "\n" not in str(e.value)
    assert issubclass(CalibrationError, GraphoptError)


def test_synthetic_data_is_labelled() -> None:
    model = small_cnn()
    res, ctx = run_pass(model)
    assert res.changed and res.stats["synthetic-calibration"] == 1
    assert ctx.data["quantize"]["calibration"]["synthetic"] is True
    assert "synthetic" in ctx.data["quantize"]["calibration"]["source"]
    assert any("synthetic" in line for line in ctx.log)
    assert synthetic_calibration(model).synthetic


# --------------------------------------------------------------------------------- the pass


def test_cnn_becomes_int8_kernels_in_onnxruntime(tmp_path) -> None:
    model = small_cnn()
    before = model.clone()
    data = cnn_data(model)
    res, ctx = run_pass(model, data)
    assert res.changed
    assert res.stats["int8-Conv"] == 4 and res.stats["int8-Add"] == 1 and res.stats["int8-Concat"] == 1
    assert res.stats["int8-Gemm"] == 1 and res.stats["activations-folded"] == 3  # relu1, relu2, clip3
    model.verify()
    proto = graphopt.to_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    assert "Relu" not in ops(model) and "Clip" not in ops(model)
    # no float weight is left behind next to its int8 version
    assert not [n for n, v in model.graph.initializers.items() if v.const_value.dtype.name == "FLOAT" and v.const_value.size > 64]
    feeds = {"x": np.random.default_rng(7).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    ref = ort_run(before, feeds)
    dump = str(tmp_path / "opt.onnx")
    got = ort_run(model, feeds, dump=dump)
    m = output_metrics([ref], [got])
    assert m["sqnr"] > 25 and m["cosine"] > 0.99
    # onnxruntime's QDQ transformer turned every node unit into an int8 kernel: no float Conv,
    # Add, Concat, pool or Gemm is left, and only the graph input's Q and output's DQ remain
    opt_ops = [n.op_type for n in onnx.load(dump).graph.node]
    assert opt_ops.count("QLinearConv") == 4
    assert {"QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool", "QGemm"} <= set(opt_ops)
    assert not {"Conv", "Add", "Concat", "GlobalAveragePool", "Gemm", "MaxPool"} & set(opt_ops)
    assert opt_ops.count("QuantizeLinear") == 1 and opt_ops.count("DequantizeLinear") <= 1
    # the report names every layer with its SQNR
    layers = {layer["name"]: layer for layer in ctx.data["quantize"]["layers"]}
    assert layers["c1"]["op"] == "Conv+Relu" and layers["c1"]["status"] == "int8" and layers["c1"]["sqnr_db"] > 25


def test_relu_is_folded_into_the_range() -> None:
    model = small_cnn()
    run_pass(model, cnn_data(model))
    conv = next(n for n in model.graph if n.op_type == "Conv" and n.name == "c1")
    q = conv.outputs[0].consumers()[0]
    assert q.op_type == "QuantizeLinear"
    zp = q.inputs[2].const_value.numpy()
    assert zp.dtype == np.uint8 and int(zp) == 0  # range [0, max]: the zero point is the Relu
    clip_q = next(n for n in model.graph if n.name == "c3").outputs[0].consumers()[0]
    s = float(clip_q.inputs[1].const_value.numpy())
    assert s * 255 <= 6.0 + 1e-5  # Clip(0, 6): the range never exceeds 6


def test_bias_is_int32_with_scale_sx_times_sw() -> None:
    model = small_cnn()
    run_pass(model, cnn_data(model))
    conv = next(n for n in model.graph if n.name == "c2")
    x_dq, w_dq, b_dq = (conv.inputs[i].producer() for i in range(3))
    assert {x_dq.op_type, w_dq.op_type, b_dq.op_type} == {"DequantizeLinear"}
    assert b_dq.inputs[0].const_value.dtype.name == "INT32"
    assert w_dq.inputs[0].const_value.dtype.name == "INT8" and w_dq.attr("axis") == 0
    sx = float(x_dq.inputs[1].const_value.numpy())
    sw = w_dq.inputs[1].const_value.numpy()
    np.testing.assert_allclose(b_dq.inputs[1].const_value.numpy(), (np.float32(sx) * sw).astype(np.float32), rtol=1e-6)
    bias = np.asarray(b_dq.inputs[0].const_value.numpy(), np.float64) * b_dq.inputs[1].const_value.numpy()
    orig = numpy_helper.to_array(next(t for t in graphopt.to_onnx(small_cnn()).graph.initializer if t.name == "c2_b"))
    np.testing.assert_allclose(bias, orig, atol=float((np.float32(sx) * sw).max()))


def test_reduce_range_bounds_the_weights() -> None:
    for rr, bound in (("true", 64), ("false", 127)):
        model = small_cnn()
        run_pass(model, cnn_data(model), reduce_range=rr)
        w = [v.const_value.numpy() for v in model.graph.initializers.values() if v.const_value.dtype.name == "INT8" and v.const_value.size > 16]
        assert max(int(np.abs(a.astype(int)).max()) for a in w) == bound
    model = small_cnn()
    _, ctx = run_pass(model, cnn_data(model))
    assert "VNNI" in ctx.data["quantize"]["weights"] or "range" in ctx.data["quantize"]["weights"]


def test_second_run_changes_nothing() -> None:
    model = small_cnn()
    run_pass(model, cnn_data(model))
    text = str(model)
    res, ctx = run_pass(model, cnn_data(model))
    assert not res.changed and res.stats == {}
    assert ctx.data["quantize"]["result"].startswith("already quantized")
    assert str(model) == text


def test_near_misses_stay_float_with_a_reason() -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "wdyn"], ["c_dyn"], name="conv_dynamic_weight"),  # weight is an input
        helper.make_node("Conv", ["x", "w"], ["c_ok"], name="conv_ok"),
        helper.make_node("Conv", ["x", "w"], ["c_ex"], name="conv_excluded"),
        helper.make_node("Add", ["c_ok", "c_ex"], ["s"], name="add"),
        helper.make_node("Add", ["s", "c_dyn"], ["y"], name="add2"),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8]), helper.make_tensor_value_info("wdyn", 1, [4, 3, 3, 3])],
                   [helper.make_tensor_value_info("y", 1, None)], [w])
    data = calibration_from_arrays(model, {"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32),
                                           "wdyn": rng.standard_normal((16, 3, 3, 3)).astype(np.float32)})
    before = model.clone()
    res, ctx = run_pass(model, data, exclude=("conv_excluded",))
    layers = {layer["name"]: layer for layer in ctx.data["quantize"]["layers"]}
    assert layers["conv_dynamic_weight"]["status"] == "float" and "constant" in layers["conv_dynamic_weight"]["reason"]
    assert layers["conv_excluded"]["status"] == "float" and "excluded" in layers["conv_excluded"]["reason"]
    assert layers["conv_ok"]["status"] == "int8" and res.stats["int8-Conv"] == 1
    feeds = {k: v for k, v in next(iter(data)).items()}
    assert output_metrics([ort_run(before, feeds)], [ort_run(model, feeds)])["sqnr"] > 20


def _opset11_conv() -> graphopt.Model:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", 1, None)], [w], opset=11)


def test_old_opset_is_upgraded_by_the_version_converter() -> None:
    """Below opset 13 (no per-channel QuantizeLinear) the model is upgraded with onnx's version
    converter first, said in the log; the int8 result is opset 13 and close to the original."""
    model = _opset11_conv()
    before = model.clone()
    res, ctx = run_pass(model, cnn_data(model, 16))
    assert res.changed and res.stats["int8-Conv"] == 1
    assert model.opset_imports[""] == 13
    assert any("upgraded the model from opset 11 to 13" in line for line in ctx.log)
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert output_metrics([ort_run(before, feeds)], [ort_run(model, feeds)])["sqnr"] > 15  # (a 1-layer random conv)
    res2, _ = run_pass(model, cnn_data(model, 2))  # a second run changes nothing
    assert not res2.changed


def test_old_opset_refused_with_the_converters_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx.version_converter

    def fail(*a, **k):
        raise RuntimeError("No Adapter For Upsample")

    monkeypatch.setattr(onnx.version_converter, "convert_version", fail)
    model = _opset11_conv()
    res, ctx = run_pass(model, cnn_data(model, 2))
    assert not res.changed and model.opset_imports[""] == 11
    assert res.note.startswith("refused: opset 11 < 13") and "No Adapter For Upsample" in res.note


def test_auto_mode_by_flops_conv_net_with_softmax_is_static() -> None:
    """mode=auto: a conv net ending in Softmax (SqueezeNet) is conv-dominated -> static, every
    conv int8; a transformer (MatMul FLOPs, Softmax) stays dynamic."""
    model = small_cnn()
    # append a Softmax after the classifier, as SqueezeNet/ResNet exports do
    proto = graphopt.to_onnx(model)
    proto.graph.node[-1].output[0] = "logits"
    proto.graph.node.append(helper.make_node("Softmax", ["logits"], ["y"], axis=1, name="softmax"))
    model = graphopt.load(proto.SerializeToString())
    res, ctx = run_pass(model, cnn_data(model, 4))
    rep = ctx.data["quantize"]
    assert rep["mode"] == "static" and "conv-dominated" in rep["mode-reason"]
    assert res.stats["int8-Conv"] >= 3
    assert "mode static" in res.note
    res_t, ctx_t = run_pass(tiny_attention(), attention_data(tiny_attention()))
    assert ctx_t.data["quantize"]["mode"] == "dynamic" and "transformer" in ctx_t.data["quantize"]["mode-reason"]


def test_attention_mask_sentinel_stays_out_of_int8_static() -> None:
    model = tiny_attention()
    before = model.clone()
    data = attention_data(model)
    res, ctx = run_pass(model, data, mode="static")
    layers = {layer["name"]: layer for layer in ctx.data["quantize"]["layers"]}
    # the mask Add feeds Softmax and sees float32-min values: never quantized, and it says why
    assert layers["add_mask"]["status"] == "float" and "Softmax" in layers["add_mask"]["reason"]
    assert layers["mm_q"]["status"] == "int8"
    for v in model.graph.initializers.values():  # no scale was stretched by -3.4e38
        if v.name.endswith("_scale"):
            assert float(np.max(v.const_value.numpy())) < 1.0
    feeds = next(iter(data))
    m = output_metrics([ort_run(before, feeds)], [ort_run(model, feeds)])
    assert m["cosine"] > 0.99, m


def test_sentinel_ranges_keep_an_op_float() -> None:
    """An Add that mixes activations with an additive mask (-3.4e38 where masked) outside any
    attention: its range would be absurd, so it stays float and the report names the tensor."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), n) for n in ("w1", "w2")]
    inits += [numpy_helper.from_array(np.array(1.0, np.float32), "one"), numpy_helper.from_array(np.array(F32_MIN, np.float32), "neg"),
              numpy_helper.from_array(np.array(-10.0, np.float32), "lo"), numpy_helper.from_array(np.array(10.0, np.float32), "hi")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("Cast", ["m"], ["mf"], to=1),
        helper.make_node("Sub", ["one", "mf"], ["inv"]),
        helper.make_node("Mul", ["inv", "neg"], ["bias"]),
        helper.make_node("Add", ["a", "bias"], ["c"], name="add_mask"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["cc"]),
        helper.make_node("MatMul", ["cc", "w2"], ["y"], name="mm2"),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", 1, [2, 8]), helper.make_tensor_value_info("m", 7, [2, 8])],
                   [helper.make_tensor_value_info("y", 1, [2, 8])], inits)
    m = np.ones((8, 8), np.int64)
    m[:, 5:] = 0
    data = calibration_from_arrays(model, {"x": rng.standard_normal((8, 8)).astype(np.float32), "m": m})
    before = model.clone()
    res, ctx = run_pass(model, data, mode="static")
    layers = {layer["name"]: layer for layer in ctx.data["quantize"]["layers"]}
    assert layers["add_mask"]["status"] == "float" and "sentinel" in layers["add_mask"]["reason"]
    assert "'bias'" in layers["add_mask"]["reason"]
    assert layers["mm1"]["status"] == "int8" and layers["mm2"]["status"] == "int8"
    for v in model.graph.initializers.values():
        if v.name.endswith("_scale"):
            assert float(np.max(v.const_value.numpy())) < 1.0
    feeds = next(iter(data))
    assert output_metrics([ort_run(before, feeds)], [ort_run(model, feeds)])["cosine"] > 0.99


def test_transformer_gets_dynamic_matmuls_by_default() -> None:
    model = tiny_attention()
    before = model.clone()
    data = attention_data(model)
    res, ctx = run_pass(model, data)
    assert ctx.data["quantize"]["mode"] == "dynamic"
    assert res.stats["dynamic-MatMul"] == 4  # q, k, v, o; the two activation MatMuls stay float
    o = ops(model)
    assert o["MatMulInteger"] == 4 and o["DynamicQuantizeLinear"] == 2  # x is quantized once for q, k, v
    assert "QuantizeLinear" not in o
    onnx.checker.check_model(graphopt.to_onnx(model), full_check=True)
    feeds = next(iter(data))
    m = output_metrics([ort_run(before, feeds)], [ort_run(model, feeds)])
    assert m["cosine"] > 0.99, m
    # a second run changes nothing
    res2, _ = run_pass(model, data)
    assert not res2.changed


def test_accuracy_budget_keeps_sensitive_layers_float() -> None:
    model = small_cnn()
    data = cnn_data(model, 8)
    _, ctx0 = run_pass(model.clone(), data)
    all_int8 = ctx0.data["quantize"]["metrics"]["sqnr"]
    want = all_int8 + 6  # stricter than all-int8 gives
    res, ctx = run_pass(model, data, accuracy_budget=f"sqnr:{want:.2f}", eval_batches=4)
    rep = ctx.data["quantize"]
    acc = rep["accuracy"]
    assert acc["all-int8"]["sqnr"] < want and acc["reverted"] >= 1
    reverted = [layer for layer in rep["layers"] if layer["status"] == "float" and "accuracy budget" in (layer.get("reason") or "")]
    assert len(reverted) == acc["reverted"]
    assert all("alone_int8_output_sqnr_db" in layer for layer in rep["layers"] if layer["op"].startswith("Conv"))
    if acc["holds"]:
        assert acc["final"]["sqnr"] >= want
    assert any("accuracy" in line for line in ctx.log)


def test_budget_syntax() -> None:
    assert Budget.parse("top1:0.5") == Budget("top1", 0.5)
    assert Budget.parse("0.02") == Budget("rel", 0.02)
    assert Budget.parse("cosine:0.99").holds({"cosine": 0.995})
    assert not Budget.parse("sqnr:30").holds({"sqnr": 29.0})
    with pytest.raises(UsageError):
        Budget.parse("acc:1")


@pytest.mark.parametrize("none", ["none", "off"])
def test_accuracy_budget_none_quantizes_every_layer(none: str) -> None:
    """`accuracy-budget=none` (what --help offers) means no budget: every layer int8, nothing
    measured against a limit; it was refused as "'none' is not a number"."""
    model = small_cnn()
    data = cnn_data(model, 8)
    _, ctx0 = run_pass(model.clone(), data)
    _, ctx = run_pass(model, data, accuracy_budget=none)
    rep = ctx.data["quantize"]
    assert "accuracy" not in rep and rep["layers"] == ctx0.data["quantize"]["layers"]
    (p,) = parse_pipeline(f"quantize{{accuracy-budget={none}}}")
    assert isinstance(p, Quantize) and p.accuracy_budget == none


def test_pipeline_syntax_and_bad_options(tmp_path) -> None:
    (p,) = parse_pipeline("quantize{scheme=int8,calibration=entropy,speed=rules}")
    assert isinstance(p, Quantize) and p.calibration == "entropy"
    assert p.spec() == "quantize{calibration=entropy,speed=rules}"
    for bad in ("quantize{scheme=int4}", "quantize{calibration=magic}", "quantize{accuracy-budget=acc:3}"):
        with pytest.raises(UsageError):
            parse_pipeline(bad)
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    model = small_cnn()
    out = graphopt.optimize(model, f"quantize{{data={tmp_path / 'c.npz'},speed=rules,calibration=percentile}}")
    o = ops(out)
    assert o["QuantizeLinear"] >= 5
    # speed=rules: the depthwise conv stays float
    dw = next(n for n in out.graph if n.name == "dw")
    assert dw.inputs[1].producer() is None and dw.inputs[1].const_value.dtype.name == "FLOAT"


def test_speed_check_measures_and_reports() -> None:
    model = small_cnn(hw=32)
    res, ctx = run_pass(model, cnn_data(model, 4), speed="measure", speed_budget=0.5)
    sp = ctx.data["quantize"]["speed"]
    assert sp["fp32-ms"] > 0 and sp["candidates"] and sp["decision"]
    assert any(c["candidate"].startswith("depthwise convs") for c in sp["candidates"])
    if res.changed:
        assert "faster than fp32" in sp["decision"]
    else:  # kept float: the model is untouched
        assert "QuantizeLinear" not in ops(model) and res.stats["kept-float-slower"] == 1


def test_per_layer_timing_in_the_report() -> None:
    model = small_cnn(hw=32)
    res, ctx = run_pass(model, cnn_data(model, 4), speed="measure", speed_budget=0.5, profile_runs=3)
    rep = ctx.data["quantize"]
    t = rep["per-layer-timing"]
    assert t["status"] == "measured" and t["fp32-total-us"] > 0 and t["int8-total-us"] > 0
    assert t["layers-matched"] >= 1
    timed = [layer for layer in rep["layers"] if "int8_us" in layer and "fp32_us" in layer]
    assert timed and all(layer["int8_us"] >= 0 and layer["fp32_us"] >= 0 for layer in timed)
    names = [c["candidate"] for c in rep["speed"]["candidates"]]
    slower = [layer for layer in timed if layer["int8_us"] > layer["fp32_us"]]
    assert t["layers-slower-in-int8"] == len(slower)
    # layers the profile found slower in int8 are a candidate group of their own
    assert bool(slower) == any("per-layer profile" in n for n in names)
    for layer in rep["layers"]:
        if layer["status"] == "float" and "per-layer profile" in (layer.get("reason") or ""):
            assert layer["int8_us"] > layer["fp32_us"]


def test_profile_nodes_keys_are_node_names() -> None:
    from graphopt.passes.quantize import measure

    model = small_cnn(hw=16)
    x = np.random.default_rng(0).standard_normal([1] + list(model.graph.inputs[0].shape.dims[1:])).astype(np.float32)
    prof = measure.profile_nodes(model, {"x": x}, runs=2)
    names = {n.name for n in model.graph if n.name} | {o.name for n in model.graph for o in n.outputs}
    assert prof and any(k in names for k in prof)
    assert all(v >= 0 for v in prof.values())


def test_dynamic_matmul_integer_keeps_the_layer_name() -> None:
    model = tiny_attention()
    res, ctx = run_pass(model, attention_data(model), mode="dynamic")
    assert {"mm_q", "mm_k", "mm_v", "mm_o"} <= {n.name for n in model.graph if n.op_type == "MatMulInteger"}


def test_report_file_and_quantize_function(tmp_path) -> None:
    model = small_cnn()
    path = tmp_path / "q.json"
    q, rep = quantize(model, cnn_data(model, 4), speed="off", report=str(path))
    import json

    data = json.loads(path.read_text())
    assert data["result"] == rep["result"] and data["layers"]
    with pytest.raises(UsageError):
        quantize(small_cnn(), None, scheme="fp8")


# ------------------------------------------------------------------------------------- CLI


@pytest.fixture
def cnn_files(tmp_path):
    model = small_cnn()
    path = tmp_path / "cnn.onnx"
    graphopt.save(model, str(path))
    x = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    np.savez(tmp_path / "check.npz", x=x[:1])
    return tmp_path, path


def test_cli_quantizes_with_calibration_data(cnn_files, capsys) -> None:
    tmp, path = cnn_files
    out, rep = tmp / "q.onnx", tmp / "r.json"
    code = cli_main([str(path), "-o", str(out), "--quantize", "int8", "--calibration", str(tmp / "calib.npz"),
                 "--calibration-method", "percentile", "--report", str(rep), "--quiet",
                 "--verify", "--inputs", str(tmp / "check.npz"), "--rtol", "0.2", "--atol", "0.3",
                 "--passes", "-O1", "--disable", "cse", "--quantize-speed", "rules"])  # not timing-dependent
    assert code == 0, capsys.readouterr().err
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    kinds = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds
    report = json.loads(rep.read_text())
    assert report["pipeline"].endswith("quantize{calibration=percentile,speed=rules}")
    assert any("calib.npz: 6 samples" in line for line in report["log"])


def test_cli_quantize_usage_errors(cnn_files, capsys) -> None:
    tmp, path = cnn_files
    for args, words in [(["--calibration", "x.npz"], "needs --quantize"),
                        (["--quantize", "int4"], "unknown scheme"),
                        (["--quantize", "int8", "--accuracy-budget", "acc:1"], "unknown metric"),
                        (["--quantize", "int8", "--calibration", str(tmp / "missing.npz")], "no such file")]:
        code = cli_main([str(path), "-o", str(tmp / "o.onnx"), *args])
        err = capsys.readouterr().err
        assert code == 2 and words in err and err.count("\n") == 1, (args, err)
    assert not (tmp / "o.onnx").exists()


@pytest.mark.skipif(not (CORPUS_CACHE / "resnet50.onnx").exists(),
                    reason="corpus not built")
@pytest.mark.slow
def test_resnet50_corpus_quantizes_accurately() -> None:
    model = graphopt.load(str(CORPUS_CACHE / "resnet50.onnx"))
    res, ctx = run_pass(model, synthetic_calibration(model, num_batches=4), eval_batches=2)
    assert res.stats["int8-Conv"] == 53 and ctx.data["quantize"]["metrics"]["sqnr"] > 25


def test_paired_speedups_shape() -> None:
    """The speed check's timing: one median and one paired speedup per model, the baseline's
    own speedup exactly 1 (every round's ratio is t/t); no timed assertion."""
    from graphopt.passes.quantize import measure

    model = small_cnn(hw=16)
    q = model.clone()
    run_pass(q, cnn_data(q, 4))
    x = np.random.default_rng(0).standard_normal([1] + list(model.graph.inputs[0].shape.dims[1:])).astype(np.float32)
    med, sp = measure.paired_speedups([model, q, model], {"x": x}, budget_s=0.2, min_runs=6, max_runs=6)
    assert len(med) == len(sp) == 3 and sp[0] == 1.0
    assert all(m > 0 for m in med) and all(s > 0 for s in sp)

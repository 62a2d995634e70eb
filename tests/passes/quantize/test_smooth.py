"""SmoothQuant (`quantize{smooth=ALPHA}`, passes/quantize/smooth.py).

Float outputs before and after smoothing alone are compared through onnxruntime (smoothing is
exact in float); int8 error with and without it on a model with an activation outlier channel.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

import graphopt
from graphopt.calibration import calibration_from_arrays
from graphopt.passes.quantize import Quantize, output_metrics, smooth_quant
from graphopt.transform import PassContext, parse_pipeline

D, S = 16, 8


def _model(nodes, inputs, outputs, inits) -> graphopt.Model:
    g = helper.make_graph(nodes, "t", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return graphopt.load(m.SerializeToString())


def _w(rng, name, shape, scale=None):
    return numpy_helper.from_array((rng.standard_normal(shape) * (scale or 1 / np.sqrt(shape[0]))).astype(np.float32), name)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, 1, shape)


def ln_model(seed: int = 0, outlier: float = 30.0) -> graphopt.Model:
    """LayerNormalization (channel 3 of its scale `outlier` times the rest) read by two MatMuls
    (one with a bias Add); Tanh then a Mul by a per-channel constant read by a third MatMul."""
    rng = np.random.default_rng(seed)
    gamma = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    gamma[3] *= outlier
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array((0.1 * rng.standard_normal(D)).astype(np.float32), "beta"),
             _w(rng, "wa", (D, D)), _w(rng, "wb", (D, D)), _w(rng, "wc", (D, D)),
             numpy_helper.from_array((0.1 * rng.standard_normal(D)).astype(np.float32), "ba"),
             numpy_helper.from_array((0.5 + 0.1 * rng.random(D)).astype(np.float32), "half")]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["ln", "wa"], ["ma"], name="mm_a"),
        helper.make_node("Add", ["ma", "ba"], ["ya"], name="bias_a"),
        helper.make_node("MatMul", ["ln", "wb"], ["yb"], name="mm_b"),
        helper.make_node("Tanh", ["ya"], ["t"], name="act"),
        helper.make_node("Mul", ["t", "half"], ["h"], name="half_mul"),
        helper.make_node("MatMul", ["h", "wc"], ["yc"], name="mm_c"),
    ]
    return _model(nodes, [_vi("x", [1, S, D])], [_vi("yb", [1, S, D]), _vi("yc", [1, S, D])], inits)


def attention_model(seed: int = 0, heads: int = 2) -> graphopt.Model:
    """LayerNorm → q, k, v (MatMul + bias), heads split by Reshape/Transpose, Softmax(q·kᵀ)·v,
    heads merged, output projection: the projection's input is smoothed into v's weight and bias."""
    rng = np.random.default_rng(seed)
    dh = D // heads
    gamma = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    gamma[5] *= 20
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array((0.1 * rng.standard_normal(D)).astype(np.float32), "beta"),
             numpy_helper.from_array(np.array([1, S, heads, dh], np.int64), "split"),
             numpy_helper.from_array(np.array([1, S, D], np.int64), "merge"),
             numpy_helper.from_array(np.array(1 / np.sqrt(dh), np.float32), "scale")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln")]
    for n in "qkv":
        w = _w(rng, f"w{n}", (D, D))
        if n == "v":  # an outlier channel in v's columns: the context has one as well
            a = numpy_helper.to_array(w).copy()
            a[:, 2] *= 25
            w = numpy_helper.from_array(a, "wv")
        inits += [w, numpy_helper.from_array((0.1 * rng.standard_normal(D)).astype(np.float32), f"b{n}")]
        nodes += [helper.make_node("MatMul", ["ln", f"w{n}"], [f"{n}m"], name=f"mm_{n}"),
                  helper.make_node("Add", [f"{n}m", f"b{n}"], [f"{n}b"], name=f"bias_{n}"),
                  helper.make_node("Reshape", [f"{n}b", "split"], [f"{n}r"], name=f"split_{n}"),
                  helper.make_node("Transpose", [f"{n}r"], [f"{n}t"], perm=[0, 2, 1, 3], name=f"heads_{n}")]
    inits += [_w(rng, "wo", (D, D))]
    nodes += [
        helper.make_node("Transpose", ["kt"], ["ktt"], perm=[0, 1, 3, 2], name="kT"),
        helper.make_node("MatMul", ["qt", "ktt"], ["sc"], name="scores"),
        helper.make_node("Mul", ["sc", "scale"], ["scs"], name="scaled"),
        helper.make_node("Softmax", ["scs"], ["p"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["p", "vt"], ["c"], name="ctx"),
        helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 1, 3], name="unheads"),
        helper.make_node("Reshape", ["ct", "merge"], ["cm"], name="merge_heads"),
        helper.make_node("MatMul", ["cm", "wo"], ["y"], name="mm_o"),
    ]
    return _model(nodes, [_vi("x", [1, S, D])], [_vi("y", [1, S, D])], inits)


def _data(model: graphopt.Model, n: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    return calibration_from_arrays(model, {"x": rng.standard_normal((n, S, D)).astype(np.float32)})


def _run(model: graphopt.Model, feeds) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(graphopt.to_onnx(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _quantize(model, data, **opts):
    ctx = PassContext()
    ctx.data["calibration"] = data
    opts.setdefault("speed", "off")
    res = Quantize(**opts).run(model, ctx)
    return res, ctx


def _close(before: graphopt.Model, after: graphopt.Model, data) -> None:
    for feeds in data:
        for a, b in zip(_run(before, feeds), _run(after, feeds)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


# ------------------------------------------------------------------------------------ fires


def test_layernorm_and_constant_mul_producers_are_smoothed_exactly() -> None:
    model = ln_model()
    before = model.clone()
    data = _data(model)
    rep = smooth_quant(model, data, 0.5)
    model.verify()
    assert sorted(e["input"] for e in rep["smoothed"]) == ["h", "ln"]
    assert sorted(rep["layers"]) == ["mm_a", "mm_b", "mm_c"]  # ln's two readers share its scale
    by = {e["input"]: e for e in rep["smoothed"]}
    assert by["ln"]["producer"].startswith("LayerNormalization") and by["h"]["producer"].startswith("Mul")
    assert rep["layers"]["mm_a"]["max-scale"] == rep["layers"]["mm_b"]["max-scale"] == by["ln"]["max-scale"] > 1
    assert by["ln"]["x-outlier-ratio-after"] < by["ln"]["x-outlier-ratio"]  # the outlier channel is flattened
    assert rep["not-smoothed"] == {}
    assert len(model.graph.nodes) == len(before.graph.nodes)  # constants change, no node is added
    assert len(model.graph.initializers) == len(before.graph.initializers)  # the old constants are dropped
    _close(before, model, data)


def test_attention_output_projection_is_smoothed_into_v() -> None:
    model = attention_model()
    before = model.clone()
    data = _data(model)
    rep = smooth_quant(model, data, 0.5)
    model.verify()
    by = {e["input"]: e for e in rep["smoothed"]}
    assert set(by) == {"ln", "cm"}, rep
    assert by["cm"]["producer"].startswith("MatMul+Add 'bias_v'") and "Softmax" not in by["cm"]["producer"]
    assert by["cm"]["producer"].endswith("via Reshape → Transpose → MatMul → Transpose → Reshape")
    assert by["cm"]["max-scale"] > 1
    _close(before, model, data)


def test_gemm_producer_and_transposed_gemm_reader() -> None:
    """Gemm(transB) → Div by a per-channel constant → Gemm(transB): 1/s goes into the Div's
    constant; a Gemm → Gemm pair: into the first Gemm's weight rows and bias."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((D, D)).astype(np.float32)
    w1[4] *= 40  # output channel 4 of the first Gemm is an outlier
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "b1"),
             _w(rng, "w2", (D, D)), numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "b2"),
             _w(rng, "w3", (D, D)), numpy_helper.from_array((1 + rng.random(D)).astype(np.float32), "c")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], transB=1, name="g1"),
             helper.make_node("Gemm", ["g1", "w2", "b2"], ["g2"], transB=1, name="g2"),
             helper.make_node("Div", ["g2", "c"], ["d"], name="div"),
             helper.make_node("Gemm", ["d", "w3"], ["y"], transB=1, name="g3")]
    model = _model(nodes, [_vi("x", [S, D])], [_vi("y", [S, D])], inits)
    before = model.clone()
    data = calibration_from_arrays(model, {"x": np.random.default_rng(1).standard_normal((4 * S, D)).astype(np.float32)},
                                   batch_size=S)
    rep = smooth_quant(model, data, 0.5)
    model.verify()
    by = {e["input"]: e for e in rep["smoothed"]}
    assert set(by) == {"g1", "d"} and by["g1"]["producer"].startswith("Gemm") and by["d"]["producer"].startswith("Div")
    assert by["g1"]["max-scale"] > 2
    assert list(rep["not-smoothed"].values()) == [["x"]]  # the graph input
    _close(before, model, data)


def test_quantize_smooth_option_counts_report_and_runs() -> None:
    model = ln_model()
    before = model.clone()
    data = _data(model)
    res, ctx = _quantize(model, data, smooth=0.5)
    model.verify()
    onnx.checker.check_model(graphopt.to_onnx(model), full_check=True)
    assert res.changed and res.stats["smoothed-layers"] == 3 and res.stats["smoothed-inputs"] == 2
    rep = ctx.data["quantize"]
    assert rep["mode"] == "dynamic" and rep["smooth"]["result"].startswith("smoothed 2 inputs of 3")
    assert rep["smooth"]["float-check-sqnr-db"] > 80
    layers = {layer["name"]: layer for layer in rep["layers"]}
    assert layers["mm_a"]["smooth"]["alpha"] == 0.5 and layers["mm_a"]["smooth"]["max-scale"] > 1
    assert any(line.startswith("quantize: smooth: smoothed 2 inputs") for line in ctx.log)
    feeds = next(iter(data))
    assert output_metrics([_run(before, feeds)], [_run(model, feeds)])["cosine"] > 0.99
    # a second run changes nothing
    text = str(model)
    res2, _ = _quantize(model, data, smooth=0.5)
    assert not res2.changed and str(model) == text


def test_smoothing_lowers_the_int8_error_with_an_outlier_channel() -> None:
    data = _data(ln_model())
    feeds = list(data)
    errs = {}
    for alpha in (0.0, 0.5):
        model = ln_model()
        ref = [_run(model, f) for f in feeds]
        _quantize(model, data, smooth=alpha)
        errs[alpha] = output_metrics(ref, [_run(model, f) for f in feeds])["sqnr"]
    assert errs[0.5] > errs[0.0] + 3, errs  # dB


def test_pipeline_syntax() -> None:
    (p,) = parse_pipeline("quantize{scheme=int8,smooth=0.75}")
    assert isinstance(p, Quantize) and p.smooth == 0.75
    for bad in ("-0.5", "1.5"):
        try:
            Quantize(smooth=float(bad))
        except ValueError as e:
            assert "alpha" in str(e)
        else:
            raise AssertionError(bad)


# ------------------------------------------------------------------------------ near misses


def _near_miss(nodes, inits, outputs, **opts):
    model = _model(nodes, [_vi("x", [1, S, D])], [_vi(o, [1, S, D]) for o in outputs], inits)
    before = model.clone()
    data = _data(model)
    res, ctx = _quantize(model, data, smooth=0.5, **opts)
    rep = ctx.data["quantize"]["smooth"]
    assert "smoothed-layers" not in res.stats and rep["smoothed"] == []
    feeds = next(iter(data))
    assert output_metrics([_run(before, feeds)], [_run(model, feeds)])["cosine"] > 0.99
    return rep, ctx


def _ln_inits(rng):
    return [numpy_helper.from_array(np.ones(D, np.float32), "gamma"), numpy_helper.from_array(np.zeros(D, np.float32), "beta"),
            _w(rng, "w1", (D, D)), _w(rng, "w2", (D, D))]


def test_residual_producer_and_graph_input_are_not_smoothed() -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "x"], ["r"], name="residual"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    rep, ctx = _near_miss(nodes, _ln_inits(rng), ["y"])
    why = rep["not-smoothed"]
    assert any(k.startswith("a residual Add of two activations") and v == ["r"] for k, v in why.items()), why
    assert any(k.startswith("also read by Add") and v == ["x"] for k, v in why.items()), why  # x feeds the residual too
    assert sum(line.startswith("quantize: smooth: 1 input(s) not smoothed") for line in ctx.log) == 2
    assert any("no MatMul/Gemm input could be smoothed" in line for line in ctx.log)


def test_graph_input_read_only_by_weight_layers_is_not_smoothed() -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y"], name="mm1")]
    rep, _ = _near_miss(nodes, _ln_inits(rng), ["y"])
    assert list(rep["not-smoothed"]) == ["a graph input or a constant: nothing upstream absorbs 1/s"]


def test_shared_reader_that_is_not_a_weight_layer_blocks_smoothing() -> None:
    """LayerNorm read by a MatMul and by a residual Add (BERT's post-LN layout)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["ln", "w1"], ["m"], name="mm1"),
             helper.make_node("Add", ["m", "ln"], ["y"], name="residual")]
    rep, _ = _near_miss(nodes, _ln_inits(rng), ["y"])
    (reason, xs), = rep["not-smoothed"].items()
    assert reason.startswith("also read by Add") and xs == ["ln"]


def test_activation_producer_is_not_smoothed() -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="mm1"),
             helper.make_node("Erf", ["m"], ["e"], name="erf"),
             helper.make_node("MatMul", ["e", "w2"], ["y"], name="mm2")]
    rep, _ = _near_miss(nodes, _ln_inits(rng), ["y"])
    assert any(k.startswith("produced by Erf") and v == ["e"] for k, v in rep["not-smoothed"].items()), rep


def test_scalar_mul_ending_an_activation_is_not_smoothed() -> None:
    """GELU spelled x·0.5·(1+erf(x/√2)): its scalar 0.5 stays a scalar (onnxruntime fuses it)."""
    rng = np.random.default_rng(0)
    inits = _ln_inits(rng) + [numpy_helper.from_array(np.array(v, np.float32), n)
                              for n, v in (("sqrt2", np.sqrt(2)), ("one", 1.0), ("half", 0.5))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="mm1"),
             helper.make_node("Div", ["m", "sqrt2"], ["d"], name="div"),
             helper.make_node("Erf", ["d"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["e1"], name="add1"),
             helper.make_node("Mul", ["m", "e1"], ["g"], name="mul"),
             helper.make_node("Mul", ["g", "half"], ["h"], name="mul_half"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    rep, _ = _near_miss(nodes, inits, ["y"])
    assert any(k.startswith("the scalar Mul ending an activation") and v == ["h"] for k, v in rep["not-smoothed"].items()), rep
    # smooth-activations=true folds 1/s into the 0.5 anyway (exact; the GELU is no longer a fusable pattern)
    model = _model(nodes, [_vi("x", [1, S, D])], [_vi("y", [1, S, D])], inits)
    before = model.clone()
    res, ctx = _quantize(model, _data(model), smooth=0.5, smooth_activations=True)
    assert res.stats["smoothed-layers"] == 1 and ctx.data["quantize"]["smooth"]["smoothed"][0]["input"] == "h"
    (p,) = parse_pipeline("quantize{smooth=0.5,smooth-activations=true}")
    assert p.smooth_activations is True  # type: ignore[attr-defined]
    fs = before.clone()
    smooth_quant(fs, _data(fs), 0.5, activation_tails=True)
    _close(before, fs, _data(fs))


def test_excluded_reader_is_not_smoothed() -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["ln", "w1"], ["y1"], name="mm_keep"),
             helper.make_node("MatMul", ["ln", "w2"], ["y2"], name="mm_ex")]
    rep, _ = _near_miss(nodes, _ln_inits(rng), ["y1", "y2"], exclude=("mm_ex",))
    (reason, xs), = rep["not-smoothed"].items()
    assert reason == "a reader stays float (excluded by the user)" and xs == ["ln"]


def test_path_tensor_read_elsewhere_blocks_smoothing() -> None:
    """Mul by a constant whose input is fine, but a Transpose output on the path is a graph output."""
    rng = np.random.default_rng(0)
    inits = _ln_inits(rng) + [numpy_helper.from_array(np.full(D, 0.5, np.float32), "c")]
    nodes = [helper.make_node("Mul", ["x", "c"], ["h"], name="mul"),
             helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 1, 2], name="tr"),
             helper.make_node("MatMul", ["ht", "w1"], ["y"], name="mm1")]
    model = _model(nodes, [_vi("x", [1, S, D])], [_vi("y", [1, S, D]), _vi("h", [1, S, D])], inits)
    rep = smooth_quant(model, _data(model), 0.5)
    assert rep["smoothed"] == [] and any("also read by a graph output" in k for k in rep["not-smoothed"]), rep

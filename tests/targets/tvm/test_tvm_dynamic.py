"""The cpu target compiles inputs that decide shapes or control flow ahead of time (strict mode).

Each model is compiled once, before any input is seen (no binding: the artifact's manifest has
no "specialized" entry), then run with different values of the shape-deciding input; every
result is compared with onnxruntime on the same model (targets/tvm/dynamic.py, converters.py).
Skipped cleanly when apache-tvm is not installed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from onnx_builders import ort_run as _ort  # noqa: E402


def _model(nodes, inputs, outputs, opset=18) -> onnx.ModelProto:
    m = h.make_model(h.make_graph(nodes, "g", inputs, outputs), opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _compile(m: onnx.ModelProto) -> graphopt.Artifact:
    art = graphopt.compile(m, "cpu", "-O2", threads=1)
    assert "specialized" not in art.manifest  # compiled before any input was seen
    return art


def _check(art: graphopt.Artifact, m: onnx.ModelProto, feeds: dict, rtol: float = 1e-5, atol: float = 1e-5) -> list[np.ndarray]:
    got = art.run(feeds)
    want = _ort(m, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
    return got


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceLogSumExp", "ReduceL2"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_runtime_axes(op, keepdims):
    """Compiled once; two different axes values (one negative) give different output shapes."""
    x = h.make_tensor_value_info("x", TP.FLOAT, [3, 4, 5])
    a = h.make_tensor_value_info("axes", TP.INT64, [1])
    y = h.make_tensor_value_info("y", TP.FLOAT, None)
    m = _model([h.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)], [x, a], [y])
    art = _compile(m)
    data = np.random.default_rng(0).uniform(0.5, 2.0, (3, 4, 5)).astype(np.float32)
    shapes = {_check(art, m, {"x": data, "axes": np.array([v])})[0].shape for v in (0, -1, 1)}
    assert len(shapes) == 3


def test_reduce_runtime_two_axes_and_empty():
    x = h.make_tensor_value_info("x", TP.FLOAT, [2, 3, 4])
    a = h.make_tensor_value_info("axes", TP.INT64, [2])
    e = h.make_tensor_value_info("e", TP.INT64, [0])
    y = h.make_tensor_value_info("y", TP.FLOAT, None)
    z = h.make_tensor_value_info("z", TP.FLOAT, None)
    m = _model([h.make_node("ReduceMax", ["x", "axes"], ["y"], keepdims=0),
                h.make_node("ReduceSum", ["x", "e"], ["z"], keepdims=0, noop_with_empty_axes=1)], [x, a, e], [y, z])
    art = _compile(m)
    data = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    for axes in ([0, 2], [2, 1], [-3, -2]):
        _check(art, m, {"x": data, "axes": np.array(axes), "e": np.zeros(0, np.int64)})


def test_if_runtime_condition():
    """Both branches compiled; the condition picks one at run time (branch outputs differ in shape)."""
    x = h.make_tensor_value_info("x", TP.FLOAT, [2, 3])
    c = h.make_tensor_value_info("c", TP.BOOL, [])
    y = h.make_tensor_value_info("y", TP.FLOAT, None)
    then_g = h.make_graph([h.make_node("Relu", ["x"], ["t"])], "then", [], [h.make_tensor_value_info("t", TP.FLOAT, None)])
    else_g = h.make_graph([h.make_node("ReduceSum", ["x"], ["s"], keepdims=1)], "else", [],
                          [h.make_tensor_value_info("s", TP.FLOAT, None)])
    m = _model([h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)], [x, c], [y])
    art = _compile(m)
    data = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    a = _check(art, m, {"x": data, "c": np.array(True)})
    b = _check(art, m, {"x": data, "c": np.array(False)})
    assert a[0].shape == (2, 3) and b[0].shape == (1, 1)


@pytest.mark.parametrize("mode,ctm", [("linear", "half_pixel"), ("cubic", "align_corners"), ("nearest", "asymmetric")])
def test_resize_runtime_scales(mode, ctm):
    x = h.make_tensor_value_info("x", TP.FLOAT, [1, 1, 4, 6])
    s = h.make_tensor_value_info("scales", TP.FLOAT, [4])
    y = h.make_tensor_value_info("y", TP.FLOAT, None)
    m = _model([h.make_node("Resize", ["x", "", "scales"], ["y"], mode=mode, coordinate_transformation_mode=ctm)], [x, s], [y])
    art = _compile(m)
    data = np.random.default_rng(3).standard_normal((1, 1, 4, 6)).astype(np.float32)
    shapes = set()
    # scales whose output lengths are whole: onnxruntime's align_corners divides by the integer
    # output length, onnx's reference (what the kernels follow) by scale·length
    for sc in ([1, 1, 2.0, 1.5], [1, 1, 0.5, 0.5], [1, 1, 1.75, 3.0]):
        shapes.add(_check(art, m, {"x": data, "scales": np.array(sc, np.float32)}, rtol=1e-4, atol=1e-5)[0].shape)
    assert len(shapes) == 3


def test_resize_runtime_sizes_antialias():
    x = h.make_tensor_value_info("x", TP.FLOAT, [1, 1, 8, 8])
    s = h.make_tensor_value_info("sizes", TP.INT64, [2])
    y = h.make_tensor_value_info("y", TP.FLOAT, None)
    m = _model([h.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear", antialias=1, axes=[2, 3])], [x, s], [y])
    art = _compile(m)
    data = np.random.default_rng(4).standard_normal((1, 1, 8, 8)).astype(np.float32)
    for sz in ([3, 5], [2, 7], [8, 4]):
        _check(art, m, {"x": data, "sizes": np.array(sz, np.int64)}, rtol=1e-4, atol=1e-5)


def test_shape_tensors_at_run_time():
    """Reshape (0 and -1), Expand, Pad, Split, TopK and CumSum with their shape/axis inputs fed at run time."""
    f = TP.FLOAT
    vi = h.make_tensor_value_info
    ins = [vi("x", f, [2, 3, 4]), vi("shape", TP.INT64, [3]), vi("eshape", TP.INT64, [4]), vi("pads", TP.INT64, [6]),
           vi("split", TP.INT64, [2]), vi("k", TP.INT64, [1]), vi("axis", TP.INT64, [])]
    outs = [vi(n, f, None) for n in ("r", "e", "p", "s0", "s1", "tv")] + [vi("ti", TP.INT64, None), vi("c", f, None)]
    m = _model([
        h.make_node("Reshape", ["x", "shape"], ["r"]),
        h.make_node("Expand", ["x", "eshape"], ["e"]),
        h.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
        h.make_node("Split", ["x", "split"], ["s0", "s1"], axis=2),
        h.make_node("TopK", ["x", "k"], ["tv", "ti"], axis=1),
        h.make_node("CumSum", ["x", "axis"], ["c"]),
    ], ins, outs)
    art = _compile(m)
    data = np.random.default_rng(5).standard_normal((2, 3, 4)).astype(np.float32)
    for shape, eshape, pads, split, k, axis in (([0, -1, 2], [2, 1, 1, 4], [0, 1, 2, 1, 0, 1], [1, 3], [2], 0),
                                                ([4, 0, -1], [1, 2, 3, 1], [1, 0, 0, 0, 2, 3], [4, 0], [3], -1)):
        _check(art, m, {"x": data, "shape": np.array(shape), "eshape": np.array(eshape), "pads": np.array(pads),
                        "split": np.array(split), "k": np.array(k), "axis": np.array(axis)})


def test_loop_runtime_trip_count():
    """Loop with a run-time trip count and condition (a recursive function in the artifact):
    carried sum and a scan output, for trip counts 0, 1 and 4 and an early stop."""
    vi = h.make_tensor_value_info
    body = h.make_graph(
        [h.make_node("Add", ["acc_in", "x"], ["acc_out"]),
         h.make_node("Cast", ["i"], ["i_f"], to=TP.FLOAT),
         h.make_node("Mul", ["acc_out", "i_f"], ["scan"]),
         h.make_node("ReduceSum", ["acc_out"], ["total"], keepdims=0),
         h.make_node("Less", ["total", "limit"], ["c_out"])],
        "body", [vi("i", TP.INT64, []), vi("c_in", TP.BOOL, []), vi("acc_in", TP.FLOAT, [2])],
        [vi("c_out", TP.BOOL, []), vi("acc_out", TP.FLOAT, [2]), vi("scan", TP.FLOAT, [2])])
    m = _model([h.make_node("Loop", ["M", "c", "acc0"], ["acc", "scans"], body=body)],
               [vi("M", TP.INT64, []), vi("c", TP.BOOL, []), vi("acc0", TP.FLOAT, [2]), vi("x", TP.FLOAT, [2]),
                vi("limit", TP.FLOAT, [])],
               [vi("acc", TP.FLOAT, None), vi("scans", TP.FLOAT, None)], opset=16)
    art = _compile(m)
    x = np.array([1.0, 2.0], np.float32)
    for trip, limit in ((0, 100.0), (1, 100.0), (4, 100.0), (10, 10.0)):
        got = _check(art, m, {"M": np.array(trip), "c": np.array(True), "acc0": np.zeros(2, np.float32), "x": x,
                              "limit": np.array(limit, np.float32)})
        if trip and limit == 100.0:
            assert got[1].shape == (trip, 2)


def _static_loop(trip: int) -> onnx.ModelProto:
    """Loop with a constant trip count: h = tanh(h @ W + x_i), the h's as a scan output."""
    vi = h.make_tensor_value_info
    w = (np.random.default_rng(0).standard_normal((8, 8)) / 3).astype(np.float32)
    body = h.make_graph(
        [h.make_node("Gather", ["xs", "i"], ["xi"], axis=0),
         h.make_node("MatMul", ["h_in", "w"], ["hw"]), h.make_node("Add", ["hw", "xi"], ["pre"]),
         h.make_node("Tanh", ["pre"], ["h_out"]), h.make_node("Identity", ["c_in"], ["c_out"]),
         h.make_node("Identity", ["h_out"], ["y"])],
        "body", [vi("i", TP.INT64, []), vi("c_in", TP.BOOL, []), vi("h_in", TP.FLOAT, [1, 8])],
        [vi("c_out", TP.BOOL, []), vi("h_out", TP.FLOAT, [1, 8]), vi("y", TP.FLOAT, [1, 8])])
    consts = [h.make_node("Constant", [], ["M"], value=onnx.numpy_helper.from_array(np.array(trip, np.int64))),
              h.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.array(True))),
              h.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w))]
    return _model([*consts, h.make_node("Loop", ["M", "c", "h0"], ["hT", "ys"], body=body, name="time_loop")],
                  [vi("xs", TP.FLOAT, [trip, 1, 8]), vi("h0", TP.FLOAT, [1, 8])],
                  [vi("hT", TP.FLOAT, None), vi("ys", TP.FLOAT, None)], opset=16)


def test_static_loop_past_the_unroll_limit_runs_as_a_runtime_loop():
    """A static Loop of more iterations than `loop-unroll` compiles as a runtime loop (no warning,
    numbers equal to onnxruntime's); at or under it, unrolled, and an unroll past 64 iterations
    is named in a warning. 300 iterations were refused before (\"the cpu target unrolls loops\")."""
    rng = np.random.default_rng(1)
    feeds = lambda t: {"xs": rng.standard_normal((t, 1, 8)).astype(np.float32),  # noqa: E731
                       "h0": rng.standard_normal((1, 8)).astype(np.float32)}
    m = _static_loop(300)
    art = graphopt.compile(m, "cpu", "-O2", threads=1)
    _check(art, m, feeds(300))
    assert not any("unrolled" in w for w in art.report["warnings"])
    m = _static_loop(80)
    unrolled = graphopt.compile(m, "cpu", "-O2", threads=1)
    assert any("time_loop" in w and "unrolled 80 iterations" in w and "loop-unroll=64" in w
               for w in unrolled.report["warnings"])
    looped = graphopt.compile(m, "cpu{loop-unroll=16}", "-O2", threads=1)
    assert not any("unrolled" in w for w in looped.report["warnings"])
    f = feeds(80)
    _check(unrolled, m, f)
    _check(looped, m, f)
    with pytest.raises(graphopt.UsageError, match="loop-unroll='many' is not a count"):
        graphopt.compile(m, "cpu{loop-unroll=many}", "-O2")


def _if_over_a_weight(n: int) -> onnx.ModelProto:
    """If(c) { x @ Transpose(W) } else { x @ W }: W [n, n] an outer initializer both branches read."""
    vi = h.make_tensor_value_info
    w = (np.random.default_rng(n).standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    then_g = h.make_graph([h.make_node("Transpose", ["W"], ["wt"]), h.make_node("MatMul", ["x", "wt"], ["y1"])], "then",
                          [], [vi("y1", TP.FLOAT, [1, n])])
    else_g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y2"])], "else", [], [vi("y2", TP.FLOAT, [1, n])])
    g = h.make_graph([h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)], "g",
                     [vi("c", TP.BOOL, []), vi("x", TP.FLOAT, [1, n])], [vi("y", TP.FLOAT, [1, n])],
                     [onnx.numpy_helper.from_array(w, "W")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_if_branches_fold_what_they_do_to_a_weight():
    """A run-time If whose branch transposes an outer weight: the weight is a constant of the
    branch and the transpose is done at compile time (one kernel fewer than the same model with
    a weight past the 1 MiB limit, which is passed in and transposed per call); both equal
    onnxruntime in both branches."""
    small, big = _if_over_a_weight(64), _if_over_a_weight(640)  # 16 KiB, 1.6 MiB
    arts = {n: _compile(m) for n, m in ((64, small), (640, big))}
    assert arts[64].report["kernels"]["primfuncs"] < arts[640].report["kernels"]["primfuncs"]
    for n, m in ((64, small), (640, big)):
        x = np.random.default_rng(0).standard_normal((1, n)).astype(np.float32)
        for c in (True, False):
            _check(arts[n], m, {"c": np.array(c), "x": x}, rtol=1e-4, atol=1e-4)


def test_onehot_nms_runtime_parameters():
    """OneHot's depth and NonMaxSuppression's max boxes / thresholds fed at run time."""
    vi = h.make_tensor_value_info
    m = _model([h.make_node("OneHot", ["idx", "depth", "vals"], ["oh"], axis=1),
                h.make_node("NonMaxSuppression", ["boxes", "scores", "maxb", "iou", "st"], ["sel"])],
               [vi("idx", TP.INT64, [3]), vi("depth", TP.INT64, []), vi("vals", TP.FLOAT, [2]),
                vi("boxes", TP.FLOAT, [1, 6, 4]), vi("scores", TP.FLOAT, [1, 1, 6]), vi("maxb", TP.INT64, [1]),
                vi("iou", TP.FLOAT, [1]), vi("st", TP.FLOAT, [1])],
               [vi("oh", TP.FLOAT, None), vi("sel", TP.INT64, None)], opset=13)
    art = _compile(m)
    boxes = np.array([[[0, 0, 1, 1], [0, 0.1, 1, 1.1], [0, -0.1, 1, 0.9], [0, 10, 1, 11], [0, 10.1, 1, 11.1],
                       [0, 100, 1, 101]]], np.float32)
    scores = np.array([[[0.9, 0.75, 0.6, 0.95, 0.5, 0.3]]], np.float32)
    for depth, maxb, iou, st in ((4, 3, 0.5, 0.0), (7, 1, 0.5, 0.0), (2, 6, 0.0, 0.55)):
        _check(art, m, {"idx": np.array([0, -1, 5]), "depth": np.array(depth), "vals": np.array([0.0, 2.0], np.float32),
                        "boxes": boxes, "scores": scores, "maxb": np.array([maxb]), "iou": np.array([iou], np.float32),
                        "st": np.array([st], np.float32)})


@pytest.mark.parametrize("op", ["LSTM"])
def test_recurrent_runtime_sequence_lens(op):
    """Bidirectional LSTM (GRU and RNN share the masking) with per-batch sequence lengths fed at run time: steps past a
    length keep the state and output zeros, in both directions."""
    vi = h.make_tensor_value_info
    gates = {"LSTM": 4, "GRU": 3}[op]
    hid, inp, t, batch = 3, 2, 4, 3
    rng = np.random.default_rng(6)
    w = rng.standard_normal((2, gates * hid, inp)).astype(np.float32) * 0.5
    r = rng.standard_normal((2, gates * hid, hid)).astype(np.float32) * 0.5
    b = rng.standard_normal((2, 2 * gates * hid)).astype(np.float32) * 0.1
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"))]
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    g = h.make_graph([h.make_node(op, ["X", "W", "R", "B", "lens"], outs, hidden_size=hid, direction="bidirectional")], "g",
                     [vi("X", TP.FLOAT, [t, batch, inp]), vi("lens", TP.INT32, [batch])],
                     [vi(n, TP.FLOAT, None) for n in outs], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 14)])
    m.ir_version = 8
    art = _compile(m)
    x = rng.standard_normal((t, batch, inp)).astype(np.float32)
    for lens in ([4, 1, 2], [2, 4, 3]):
        _check(art, m, {"X": x, "lens": np.array(lens, np.int32)})

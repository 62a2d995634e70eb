"""The cpu target on hostile or unusual input (issue 25): invalid nodes, sizes it cannot compile,
sequences, control flow of the wrong arity are one-line errors naming the node or value (a
GraphoptError: exit 2 from the CLI), never an internal error, a hang or a second stderr line.

Models are built here; numeric checks compare with onnxruntime on the same model.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.errors import GraphoptError  # noqa: E402

from onnx_builders import ort_run as _ort  # noqa: E402
from paths import TOOLS  # noqa: E402
F = TP.FLOAT


def _model(nodes, inputs, outputs, inits=(), opset=17, infer=True) -> onnx.ModelProto:
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m) if infer else m


def _vi(name, shape, t=F):
    return h.make_tensor_value_info(name, t, shape)


def _compile(m: onnx.ModelProto):
    return graphopt.compile(m, "cpu", "-O0", threads=1)


def _cli(m: onnx.ModelProto, tmp_path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    path = os.path.join(tmp_path, "m.onnx")
    onnx.save(m, path)
    exe = os.path.join(os.path.dirname(sys.executable), "graphopt-compile")
    return subprocess.run([exe, path, "--target", "cpu", "-O0", "-o", os.path.join(tmp_path, "out"), *extra],
                          capture_output=True, text=True, timeout=timeout)


_W = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)


# --- invalid nodes: exit 2 naming the node ------------------------------------------------------


def test_a_string_group_is_refused_naming_the_node():
    m = _model([h.make_node("Conv", ["x", "w"], ["y"], group="1", name="c0")], [_vi("x", [1, 3, 8, 8])], [_vi("y", None)],
               [nh.from_array(_W, "w")], infer=False)
    with pytest.raises(GraphoptError, match=r"'c0' \(Conv\): attribute 'group' is of kind STRING, Conv takes INT"):
        _compile(m)


def test_a_conv_with_five_inputs_is_refused():
    b = nh.from_array(np.zeros(4, np.float32), "b")
    m = _model([h.make_node("Conv", ["x", "w", "b", "b", "b"], ["y"], name="c5")], [_vi("x", [1, 3, 8, 8])], [_vi("y", None)],
               [nh.from_array(_W, "w"), b], infer=False)
    with pytest.raises(GraphoptError, match=r"'c5' \(Conv\): Conv takes 2 to 3 inputs, this one has 5"):
        _compile(m)


def _loop(body_outputs: int) -> onnx.ModelProto:
    outs = [h.make_node("Identity", ["c"], ["co"]), h.make_node("Add", ["v", "v"], ["vo"])]
    body = h.make_graph(outs, "body", [_vi("i", [], TP.INT64), _vi("c", [], TP.BOOL), _vi("v", [2])],
                        [_vi("co", [], TP.BOOL), _vi("vo", [2])][:body_outputs])
    return _model([h.make_node("Loop", ["M", "", "x"], ["y"], body=body, name="loop")], [_vi("x", [2])], [_vi("y", None)],
                  [nh.from_array(np.array(3, np.int64), "M")], infer=False)


def test_a_loop_body_with_too_few_outputs_is_refused():
    with pytest.raises(GraphoptError, match=r"'loop' \(Loop\): Loop's body gives 1 outputs, the node needs 2"):
        _compile(_loop(1))
    # the well-formed loop compiles and runs: x doubled three times
    art = _compile(_loop(2))
    x = np.array([1.0, -2.0], np.float32)
    np.testing.assert_array_equal(art.run({"x": x})[0], x * 8)


def _empty_intermediate() -> onnx.ModelProto:
    starts, ends = nh.from_array(np.array([2], np.int64), "s"), nh.from_array(np.array([2], np.int64), "e")
    ax = nh.from_array(np.array([1], np.int64), "ax")
    return _model([h.make_node("Slice", ["x", "s", "e", "ax"], ["z"], name="cut"), h.make_node("ReduceMean", ["z"], ["y"], axes=[1])],
                  [_vi("x", [2, 4])], [_vi("y", None)], [starts, ends, ax], opset=13)


def test_lowering_failure_is_one_stderr_line(tmp_path):
    """TVM's "BlockBuilder destroyed with remaining blocks!" no longer follows the error (a
    valid model, refused inside a kernel group's function)."""
    r = _cli(_empty_intermediate(), tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt-compile: error: node ReduceMean -> 'y': input 'z' is empty"), r.stderr
    assert not os.path.exists(os.path.join(tmp_path, "out"))


def test_function_scope_closes_the_builder_on_error(capfd):
    from tvm import relax

    from graphopt.targets.tvm.lower.dynamic import function_scope

    x = relax.Var("x", relax.TensorType([2], "float32"))
    bb = relax.BlockBuilder()
    with pytest.raises(KeyError):
        with function_scope(bb, "main", [x]):
            with bb.dataflow():
                bb.emit(relax.op.add(x, x))
                raise KeyError("boom")
    del bb
    import gc

    gc.collect()
    assert "remaining blocks" not in capfd.readouterr().err


# --- sizes --------------------------------------------------------------------------------------


def test_a_huge_batch_is_refused_up_front_naming_the_dim_and_limit():
    m = _model([h.make_node("Conv", ["x", "w"], ["c"]), h.make_node("Relu", ["c"], ["y"])],
               [_vi("x", [2**40, 3, 16, 16])], [_vi("y", None)], [nh.from_array(_W, "w")])
    t = time.perf_counter()
    with pytest.raises(GraphoptError, match=r"input 'x' has shape \[1099511627776, 3, 16, 16\]: dim 0 is 1099511627776, "
                                            r"above the cpu target's limit of 2147483647"):
        _compile(m)
    assert time.perf_counter() - t < 60  # (was > 150 s of CPU in the schedules)


def test_a_huge_tile_is_refused_naming_the_node():
    m = _model([h.make_node("Tile", ["x", "r"], ["t"], name="tile"), h.make_node("ReduceSum", ["t"], ["y"], keepdims=0)],
               [_vi("x", [4, 4])], [_vi("y", None)], [nh.from_array(np.array([2**20, 2**20], np.int64), "r")], opset=13)
    with pytest.raises(GraphoptError, match=r"'tile' \(Tile\): output 't' has shape \[4194304, 4194304\]: 17592186044416 "
                                            r"elements, above the cpu target's limit"):
        _compile(m)


@pytest.mark.parametrize("op", ["ReduceMean", "GlobalAveragePool"])
def test_a_zero_dim_is_refused_naming_the_value(op):
    shape = [2, 0] if op == "ReduceMean" else [1, 3, 0, 0]
    node = h.make_node(op, ["x"], ["y"], axes=[1]) if op == "ReduceMean" else h.make_node(op, ["x"], ["y"])
    m = _model([node], [_vi("x", shape)], [_vi("y", None)], opset=13)
    with pytest.raises(GraphoptError, match=rf"node {op} -> 'y': input 'x' is empty \(shape \[.*\]\); the cpu target does not "
                                            rf"compile {op} of an empty tensor"):
        _compile(m)


def test_an_empty_tensor_is_fine_where_the_op_is_defined_on_it():
    """ReduceMax over an empty axis is -inf (onnxruntime agrees): kept, not refused."""
    m = _model([h.make_node("ReduceMax", ["x"], ["y"], axes=[1], keepdims=1)], [_vi("x", [2, 0, 3])], [_vi("y", None)], opset=13)
    x = np.zeros((2, 0, 3), np.float32)
    np.testing.assert_array_equal(_compile(m).run({"x": x})[0], _ort(m, {"x": x})[0])


def test_an_empty_intermediate_is_refused_naming_the_node():
    """(A ReduceMean over it was TVM's "Divide by zero", an internal error.)"""
    with pytest.raises(GraphoptError, match=r"node ReduceMean -> 'y': input 'z' is empty \(shape \[2, 0\]\)"):
        _compile(_empty_intermediate())


# --- sequences: handled before TVM's frontend sees them ---------------------------------------


@pytest.mark.parametrize("new_axis", [0, 1])
def test_concat_from_sequence_compiles_like_onnxruntime(new_axis):
    """(TVM's ConcatFromSequence iterated a Var forever, memory growing past 10 GB.)"""
    m = _model([h.make_node("SequenceConstruct", ["x", "y", "x"], ["s"]),
                h.make_node("ConcatFromSequence", ["s"], ["z"], axis=1, new_axis=new_axis)],
               [_vi("x", [2, 3, 4]), _vi("y", [2, 3, 4])], [_vi("z", None)])
    art = _compile(m)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 3, 4)).astype(np.float32), "y": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    (got,), (want,) = art.run(feeds), _ort(m, feeds)
    np.testing.assert_array_equal(got, want)


_HANG_CHILD = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
import onnx, graphopt
from graphopt.errors import GraphoptError
try:
    graphopt.compile(onnx.load(sys.argv[1]), "cpu", "-O0", threads=1)
except GraphoptError as e:
    print("REFUSED", e)
"""


def test_a_sequence_op_fed_a_tensor_is_refused_not_looped(tmp_path):
    # in a child process with bounded memory and time: before the fix this looped forever
    m = _model([h.make_node("Relu", ["x"], ["r"]), h.make_node("ConcatFromSequence", ["r"], ["z"], axis=0, name="cat")],
               [_vi("x", [2, 3])], [_vi("z", None)], infer=False)
    path = os.path.join(tmp_path, "m.onnx")
    onnx.save(m, path)
    r = subprocess.run([sys.executable, "-c", _HANG_CHILD, path], capture_output=True, text=True, timeout=120)
    assert "REFUSED node 'cat' (ConcatFromSequence): input 0 of ConcatFromSequence must be a sequence" in r.stdout, r.stdout + r.stderr[-2000:]


# --- the conformance harness enforces its limits from the parent --------------------------------


def _harness():
    spec = importlib.util.spec_from_file_location("tvm_conformance", TOOLS / "tvm_conformance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_FAKE_WORKER = r"""
import json, os, sys, time
names = sys.argv[2:]
# a result and the next case's start in one write (what a buffered reader swallowed at once)
os.write(1, (json.dumps({"name": names[0], "status": "pass"}) + "\n" + json.dumps({"start": names[1]}) + "\n").encode())
if names[1] == "grows":
    hog = bytearray(400 << 20)  # resident at once
    hog[::4096] = b"x" * len(hog[::4096])
time.sleep(600)
"""


@pytest.mark.parametrize("case, reason", [("sleeps", "timeout"), ("grows", "memory")])
def test_conformance_harness_kills_a_stuck_worker(tmp_path, monkeypatch, case, reason):
    mod = _harness()
    fake = os.path.join(tmp_path, "worker.py")
    with open(fake, "w") as f:
        f.write(_FAKE_WORKER)
    monkeypatch.setattr(mod, "__file__", fake)  # the worker the harness starts
    results: dict = {}
    th = threading.Thread(target=mod.run_chunk, args=(["first", case], 3.0, results, lambda m: None),
                          kwargs={"memory": 200 << 20} if case == "grows" else {}, daemon=True)
    th.start()
    th.join(60)
    assert not th.is_alive(), "the harness waited on a stuck worker"
    assert results["first"]["status"] == "pass"
    assert results[case]["status"] == "fail" and results[case]["reason"].startswith(reason), results[case]


# --- valid graphs that did not compile ----------------------------------------------------------


@pytest.mark.parametrize("n", [2, 16])
def test_softplus_into_gemm_with_constant_weights_compiles(n):
    """(The schedules annotated the packing of the Softplus output, an intermediate, as a weight
    packing: SplitLayoutRewritePreproc asserted "preproc buffer is not found".)"""
    rng = np.random.default_rng(n)
    m = _model([h.make_node("Softplus", ["x"], ["s"]), h.make_node("Gemm", ["s", "w", "b"], ["y"])], [_vi("x", [n, n])], [_vi("y", None)],
               [nh.from_array(rng.random((n, n)).astype(np.float32), "w"), nh.from_array(rng.random(n).astype(np.float32), "b")])
    art = graphopt.compile(m, "cpu", "-O2", threads=1)
    x = rng.standard_normal((n, n)).astype(np.float32)
    np.testing.assert_allclose(art.run({"x": x})[0], _ort(m, {"x": x})[0], rtol=1e-5, atol=1e-5)


# --- NaN, Inf, -0.0 and denormals as onnxruntime gives them ------------------------------------


def _special(shape, seed: int) -> np.ndarray:
    """Random values with NaN, ±Inf, ±0.0, denormals and huge finite values at random places."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    vals = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-40, -1e-40, 3e38, -3e38, np.nan]
    for i, j in enumerate(rng.choice(flat.size, size=min(2 * len(vals), flat.size), replace=False)):
        flat[j] = vals[i % len(vals)]
    return x


def _same_specials(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg="NaN positions differ")
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)], err_msg="Inf differs")
    zeros = (want == 0) & (got == 0)
    np.testing.assert_array_equal(np.signbit(got[zeros]), np.signbit(want[zeros]), err_msg="sign of zero differs")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


_C = lambda n, v: nh.from_array(np.array(v, np.float32), n)  # noqa: E731
_S = [1, 4, 6, 6]
_ELEMENTWISE = {
    "Relu": ([h.make_node("Relu", ["x"], ["y"])], [], 1),
    "Clip": ([h.make_node("Clip", ["x", "lo", "hi"], ["y"])], [_C("lo", 0.0), _C("hi", 6.0)], 1),
    "Clip-min-only": ([h.make_node("Clip", ["x", "lo"], ["y"])], [_C("lo", -1.0)], 1),
    "Max": ([h.make_node("Max", ["x", "z"], ["y"])], [], 2),
    "Min": ([h.make_node("Min", ["x", "z"], ["y"])], [], 2),
    "Max-three": ([h.make_node("Max", ["x", "z", "x"], ["y"])], [], 2),
    "Max-constant": ([h.make_node("Max", ["x", "c"], ["y"])], [_C("c", 0.5)], 1),
    # (fuzz valid-cpu: Sign, HardSigmoid and Selu gave 0 for NaN, ThresholdedRelu kept it)
    "Sign": ([h.make_node("Sign", ["x"], ["y"])], [], 1),
    "HardSigmoid": ([h.make_node("HardSigmoid", ["x"], ["y"], alpha=0.3, beta=0.4)], [], 1),
    "Selu": ([h.make_node("Selu", ["x"], ["y"])], [], 1),
    "ThresholdedRelu": ([h.make_node("ThresholdedRelu", ["x"], ["y"], alpha=0.7)], [], 1),
}


@pytest.mark.parametrize("case", sorted(_ELEMENTWISE))
def test_elementwise_keeps_nan_inf_and_signed_zero_like_onnxruntime(case):
    """(The cpu artifact's Relu turned NaN into 0; Max/Min kept a NaN on one side only; Clip
    without a max kept Inf where onnxruntime gives the largest float.)"""
    nodes, inits, n_in = _ELEMENTWISE[case]
    ins = [_vi("x", _S), _vi("z", _S)][:n_in]
    m = _model(nodes, ins, [_vi("y", None)], inits)
    feeds = {v.name: _special(_S, k) for k, v in enumerate(ins)}
    got = graphopt.compile(m, "cpu", "-O2", threads=1).run(feeds)[0]
    _same_specials(got, _ort(m, feeds)[0])


@pytest.mark.parametrize("act", ["Relu", "Clip"])
def test_conv_epilogue_keeps_nan_like_onnxruntime(act):
    """Relu/Clip fused into the convolution's kernel keep NaN (one NaN pixel: NaN over its 3x3
    neighbourhood, as onnxruntime; no huge values here, whose overflow depends on summation order)."""
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    tail = [h.make_node("Relu", ["c"], ["y"])] if act == "Relu" else [h.make_node("Clip", ["c", "lo", "hi"], ["y"])]
    m = _model([h.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1])] + tail, [_vi("x", _S)], [_vi("y", None)],
               [nh.from_array(w, "w"), _C("lo", 0.0), _C("hi", 6.0)])
    x = np.random.default_rng(1).standard_normal(_S).astype(np.float32)
    x[0, 1, 2, 3], x[0, 2, 4, 4], x[0, 0, 0, 0] = np.nan, -0.0, 1e-40
    got = graphopt.compile(m, "cpu", "-O2", threads=1).run({"x": x})[0]
    want = _ort(m, {"x": x})[0]
    assert np.isnan(want).sum() == 8 * 9
    _same_specials(got, want)


def _np_max_pool(x: np.ndarray, k: int, s: int, pad: int, ceil: bool = False) -> np.ndarray:
    """MaxPool of NCHW `x` with maxNum semantics (np.fmax: NaN skipped, -inf padding)."""
    n, c, hh, ww = x.shape
    size = lambda d: (-(-(d + 2 * pad - k) // s) if ceil else (d + 2 * pad - k) // s) + 1  # noqa: E731
    oh, ow = size(hh), size(ww)
    p = np.full((n, c, (oh - 1) * s + k, (ow - 1) * s + k), -np.inf, np.float32)
    p[:, :, pad:pad + hh, pad:pad + ww] = x[:, :, :p.shape[2] - pad, :p.shape[3] - pad]
    out = np.empty((n, c, oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = np.fmax.reduce(p[:, :, i * s:i * s + k, j * s:j * s + k], axis=(2, 3))
    return out


def _with_nan(shape, seed: int, frac: float = 0.03) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, size=max(1, int(flat.size * frac)), replace=False)] = np.nan
    return x


@pytest.mark.parametrize("op,axes,keep", [("ReduceMax", [1], 1), ("ReduceMin", [1], 0), ("ReduceMax", [0, 2], 1),
                                          ("ReduceMin", None, 0)])
def test_reduce_max_min_skip_nan_as_fmax(op, axes, keep):
    """NaN elements are skipped (IEEE maxNum, np.fmax.reduce), NaN only where all are: TIR's max
    kept or dropped a NaN by its position in the schedule's order."""
    shape = [3, 37, 5]
    attrs = {"keepdims": keep} | ({"axes": axes} if axes is not None else {})
    m = _model([h.make_node(op, ["x"], ["y"], **attrs)], [_vi("x", shape)], [_vi("y", None)], opset=13)
    x = _with_nan(shape, 3)
    x[1, :, 2] = np.nan  # (an all-NaN row: NaN)
    got = graphopt.compile(m, "cpu", "-O2", threads=1).run({"x": x})[0]
    fn = np.fmax if op == "ReduceMax" else np.fmin
    want = fn.reduce(x, axis=None if axes is None else tuple(axes), keepdims=bool(keep))
    naive = (np.max if op == "ReduceMax" else np.min)(x, axis=None if axes is None else tuple(axes), keepdims=bool(keep))
    assert np.isnan(naive).sum() > np.isnan(want).sum()  # (NaN in the data that the reduction skips)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("op,axis,keep", [("ArgMax", 1, 1), ("ArgMin", 0, 0), ("ArgMax", -1, 0)])
def test_arg_max_min_skip_nan_first_of_ties(op, axis, keep):
    """ArgMax/ArgMin: NaN skipped as by ReduceMax (numpy's nanargmax), the first of equal extremes."""
    shape = [6, 37, 5]
    x = _with_nan(shape, 7, frac=0.01)
    x[0, 3, 0] = x[0, 7, 0] = 9.0
    x[1, :, 1] = 2.0
    x[2] = -np.inf
    m = _model([h.make_node(op, ["x"], ["y"], axis=axis, keepdims=keep)], [_vi("x", shape)],
               [h.make_tensor_value_info("y", TP.INT64, None)], opset=13)
    got = graphopt.compile(m, "cpu", "-O2", threads=1).run({"x": x})[0]
    want = (np.nanargmax if op == "ArgMax" else np.nanargmin)(x, axis=axis, keepdims=bool(keep))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("k,s,pad,ceil", [(2, 2, 0, 0), (3, 1, 1, 0), (3, 2, 1, 1)])
def test_max_pool_skips_nan(k, s, pad, ceil):
    """MaxPool (plain NCHW: 3 channels) and GlobalMaxPool skip NaN (maxNum), as onnxruntime's do
    in its 2x2 windows and global pool."""
    shape = [2, 3, 9, 9]
    m = _model([h.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4, ceil_mode=ceil),
                h.make_node("GlobalMaxPool", ["x"], ["g"])], [_vi("x", shape)], [_vi("y", None), _vi("g", None)])
    x = _with_nan(shape, k + s)
    y, g = graphopt.compile(m, "cpu", "-O2", threads=1).run({"x": x})
    want = _np_max_pool(x, k, s, pad, bool(ceil))
    assert not np.isnan(want).any() and np.isnan(x).any()
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(g, np.fmax.reduce(x, axis=(2, 3), keepdims=True))


def test_blocked_max_pool_skips_nan():
    """A MaxPool on a conv's blocked output ([N, C/b, H, W, b]) and a GlobalMaxPool after it: the
    NaN pixels of the conv output are skipped (the conv from onnxruntime)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 32, 1, 1)).astype(np.float32)
    m = _model([h.make_node("Conv", ["x", "w"], ["c"]), h.make_node("MaxPool", ["c"], ["y"], kernel_shape=[3, 3], pads=[1] * 4),
                h.make_node("GlobalMaxPool", ["y"], ["g"])],
               [_vi("x", [1, 32, 12, 12])], [_vi("c", None), _vi("y", None), _vi("g", None)], [nh.from_array(w, "w")])
    x = rng.standard_normal((1, 32, 12, 12)).astype(np.float32)
    x[0, 5, 3, 4] = x[0, 9, 11, 0] = np.nan
    art = graphopt.compile(m, "cpu", "-O2", threads=1)
    assert art.report["kernels"]["blocked"] == 3  # conv, MaxPool and GlobalMaxPool in NCHW16c/NCHW8c
    c, y, g = art.run({"x": x})
    want = _np_max_pool(c, 3, 1, 1)
    assert np.isnan(c).sum() == 32 * 2 and not np.isnan(want).any()
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(g, np.fmax.reduce(want, axis=(2, 3), keepdims=True))


def _nan_made_inside(seed: int = 38):
    """Sqrt of negative inputs makes NaN inside the graph and a 2x2 MaxPool reads it (fuzz case
    valid-cpu:4:38): onnxruntime's MaxPool keeps or drops such a NaN by its vector lanes."""
    m = _model([h.make_node("Sqrt", ["x"], ["r"]), h.make_node("MaxPool", ["r"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                                                              name="pool")],
               [_vi("x", [1, 4, 5, 6])], [_vi("y", None)])
    x = np.random.default_rng(seed).standard_normal((1, 4, 5, 6)).astype(np.float32)
    return m, x


def test_verify_compares_with_onnxruntime_skipping_the_nan_a_max_reads(tmp_path):
    """--verify passes a model whose MaxPool reads NaN made inside the graph (it failed before:
    onnxruntime's window [a, NaN, b, c] gives max(b, c), not a NaN and not max(a, b, c)): the
    reference is onnxruntime with that MaxPool skipping NaN, equal to numpy's fmax, and the
    verdict line names the node."""
    m, x = _nan_made_inside()
    np.savez(os.path.join(tmp_path, "x.npz"), x=x)
    p = _cli(m, tmp_path, "--verify", "--inputs", os.path.join(tmp_path, "x.npz"))
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stderr.splitlines() if ln.startswith("verify: ok"))
    assert "max abs error 0," in line and "onnxruntime with MaxPool 'pool' skipping the NaN it reads" in line
    ours = graphopt.runtime.load(os.path.join(tmp_path, "out")).run({"x": x})[0]
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(ours, _np_max_pool(np.sqrt(x), 2, 2, 0))
    assert not np.array_equal(_ort(m, {"x": x})[0], ours, equal_nan=True)  # onnxruntime's own answer differs


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin", "GlobalMaxPool", "ArgMax"])
def test_skip_nan_reference_is_fmax(op):
    """The rewritten reference of a max/min that reads NaN is numpy's fmax/fmin/nanargmax, with
    NaN where a whole row is NaN."""
    from graphopt.verification import nan_fed_nodes, skip_nan_model

    attrs = {"axes": [3], "keepdims": 0} if op.startswith("Reduce") else {"axis": 3, "keepdims": 0} if op == "ArgMax" else {}
    m = _model([h.make_node(op, ["x"], ["y"], **attrs)], [_vi("x", [1, 2, 3, 4])],
               [_vi("y", None, TP.INT64 if op == "ArgMax" else F)], opset=17)
    x = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4) % 7
    x[0, 0, 0, :] = np.nan  # a whole row
    x[0, 1, 2, 1] = x[0, 0, 1, 3] = np.nan
    model = graphopt.load(m)
    fed = nan_fed_nodes(model, {"x": x})
    assert [str(f) for f in fed] == [f"{op} 'y'"]
    got = ort.InferenceSession(skip_nan_model(model, fed).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with np.errstate(invalid="ignore"):
        want = {"ReduceMax": lambda: np.fmax.reduce(x, axis=3), "ReduceMin": lambda: np.fmin.reduce(x, axis=3),
                "GlobalMaxPool": lambda: np.fmax.reduce(x, axis=(2, 3), keepdims=True),
                "ArgMax": lambda: np.nanargmax(np.where(np.isnan(x).all(3, keepdims=True), 0, x), axis=3)}[op]()
    np.testing.assert_array_equal(got, want)


def test_verify_stays_strict_without_a_max_reading_nan():
    """Near-misses: the same NaN reaching an output through no max/min is compared strictly, and
    a MaxPool that reads no NaN gets no second reference."""
    from graphopt.verification import nan_fed_nodes, reference_outputs, verify_outputs

    m, x = _nan_made_inside()
    model = graphopt.load(m)
    assert [str(f) for f in nan_fed_nodes(model, {"x": x})] == ["MaxPool 'pool'"]
    assert nan_fed_nodes(model, {"x": np.abs(x)}) == []
    plain = graphopt.load(_model([h.make_node("Sqrt", ["x"], ["y"])], [_vi("x", [1, 4, 5, 6])], [_vi("y", None)]))
    ref = reference_outputs(plain, {"x": x})
    assert ref.skip_nan_outputs is None and ref.nan_skipped == [] and np.isnan(ref.outputs[0]).any()
    assert not verify_outputs(ref, [np.nan_to_num(ref.outputs[0])], rtol=1e-4, atol=1e-5, feeds={"x": x}, inputs="x").ok
    pool = reference_outputs(model, {"x": np.abs(x)})
    assert pool.skip_nan_outputs is None
    wrong = pool.outputs[0].copy()
    wrong[0, 0, 0, 0] = np.nan
    assert not verify_outputs(pool, [wrong], rtol=1e-4, atol=1e-5, feeds={"x": np.abs(x)}, inputs="x").ok



def test_reference_probes_max_inputs_in_the_plain_run(monkeypatch):
    """The strict reference and the max/min nodes' data inputs come from one onnxruntime session:
    a model with a NaN-fed MaxPool costs three sessions (plain with probes, optimized, NaN-skipping),
    and the reference equals the plain run's."""
    import graphopt.verification as verification

    made: list[str] = []
    session, run = verification.onnxruntime_session, verification.run_onnxruntime

    def counting_session(*a, **k):
        made.append("session optimize" if k.get("optimize") else "session plain")
        return session(*a, **k)

    def counting_run(*a, **k):
        made.append("run optimize" if k.get("optimize") else "run plain")
        return run(*a, **k)

    m, x = _nan_made_inside()
    model = graphopt.load(m)
    want = _ort(m, {"x": x})[0]
    monkeypatch.setattr(verification, "onnxruntime_session", counting_session)
    monkeypatch.setattr(verification, "run_onnxruntime", counting_run)
    ref = verification.reference_outputs(model, {"x": x})
    assert ref.nan_skipped == ["MaxPool 'pool'"] and ref.skip_nan_outputs is not None
    assert len(ref.outputs) == 1
    np.testing.assert_array_equal(ref.outputs[0], want)
    assert made == ["session plain", "run optimize", "session plain"]

# --- the compile watchdog -----------------------------------------------------------------------

_RUNAWAY = r"""
import ctypes, sys, onnx, graphopt
from onnx import helper as h, TensorProto as TP
from graphopt.errors import GraphoptError
from graphopt.targets.tvm.lower import lowerer  # (imports the converters: the override below comes after them)
from graphopt.targets.tvm.lower.registry import CONVERTERS

def runaway(bb, node, ins, opset):
    if sys.argv[1] == "loop":
        while True:
            pass
    if sys.argv[1] == "memory":
        hog = []
        while True:
            hog.append(bytearray(32 << 20))
            hog[-1][::4096] = b"x" * len(hog[-1][::4096])
    ctypes.CDLL(None).sleep(120)  # native code: no Python bytecode to interrupt

CONVERTERS["Relu"] = runaway
g = h.make_graph([h.make_node("Relu", ["x"], ["y"], name="r0")], "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, 8])],
                 [h.make_tensor_value_info("y", TP.FLOAT, None)])
m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
try:
    graphopt.compile(m, "cpu", "-O0", threads=1)
except GraphoptError as e:
    print(type(e).__name__, e)
"""


@pytest.mark.parametrize("kind, why", [("loop", r"ran past the 3 s time limit"), ("memory", r"held [\d.]+ GiB, past the 1.5 GiB memory limit")])
def test_watchdog_stops_a_runaway_lowering_naming_the_node(kind, why):
    import re

    from graphopt.targets.compile_watchdog import resident_memory  # noqa: F401 (the module exists)

    env = dict(os.environ, GRAPHOPT_COMPILE_SECONDS="3" if kind == "loop" else "0",
               GRAPHOPT_COMPILE_MEMORY_GB="0" if kind == "loop" else "1.5")
    r = subprocess.run([sys.executable, "-c", _RUNAWAY, kind], capture_output=True, text=True, timeout=180, env=env)
    assert re.search(r"CompileLimitError compile stopped while lowering node 'r0' \(Relu\): it " + why, r.stdout), r.stdout + r.stderr[-2000:]


def test_watchdog_ends_the_process_stuck_in_native_code():
    """The interrupt cannot reach native code (LLVM, a TVM pass): with `hard_exit` (the CLI's
    own process) after the grace period the process writes the one error line and exits with
    code 2; without it (graphopt.compile embedded in a user's pipeline) the process is never
    killed: the compile is left to finish.

    No wall-clock bound on the test's side (a busy machine slows the child's start-up, not the
    watchdog): in the CLI case the native call sleeps 10 minutes, far past the 1 s limit + 1 s
    grace, so exit code 2 with the error line, and no line after the sleep, can only come from
    the watchdog ending the process inside it."""
    code = ("import ctypes, sys\nfrom graphopt.targets.compile_watchdog import Activity, CompileLimitError, Watchdog\n"
            "try:\n"
            "    with Watchdog(1.0, 0, Activity('building the library (LLVM)'), grace=1.0, hard_exit=sys.argv[1] == 'cli'):\n"
            "        print('entered', flush=True)\n"
            "        ctypes.CDLL(None).sleep(int(sys.argv[2]))\n"
            "        print('native call returned', flush=True)\n"
            "except CompileLimitError as e:\n    print('caught:', e)\n")
    # the subprocess timeout only ends a broken run (the watchdog not firing) before the sleep does
    r = subprocess.run([sys.executable, "-c", code, "cli", "600"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr[-2000:])
    assert r.stdout.splitlines() == ["entered"]  # ended inside the native call
    assert r.stderr.strip().splitlines() == ["graphopt-compile: error: compile stopped while building the library (LLVM): "
                                             "it ran past the 1 s time limit (GRAPHOPT_COMPILE_SECONDS)"]
    # embedded: the 4 s native call outlasts limit + grace, and is still let finish
    r = subprocess.run([sys.executable, "-c", code, "library", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    # the interrupt surfaces once back in Python, at the first bytecode after the native call
    assert r.stdout.splitlines() == ["entered", "caught: compile stopped while building the library (LLVM): "
                                     "it ran past the 1 s time limit (GRAPHOPT_COMPILE_SECONDS)"]


def test_watchdog_limits_from_options_and_environment():
    from graphopt.targets.compile_watchdog import DEFAULT_SECONDS, limits_from

    assert limits_from({}, {})[0] == DEFAULT_SECONDS and limits_from({}, {})[1] > 0
    assert limits_from({}, {"GRAPHOPT_COMPILE_SECONDS": "7", "GRAPHOPT_COMPILE_MEMORY_GB": "2"}) == (7.0, 2 << 30)
    assert limits_from({"compile_seconds": 0}, {"GRAPHOPT_COMPILE_SECONDS": "7"})[0] == 0.0
    with pytest.raises(GraphoptError, match="GRAPHOPT_COMPILE_SECONDS='soon' is not a number"):
        limits_from({}, {"GRAPHOPT_COMPILE_SECONDS": "soon"})


@pytest.mark.parametrize("case", ["min-minus-x", "x-minus-x"])
def test_float_cancellation_keeps_nan_and_inf(case):
    """TVM's simplifier cancels a float `x - x` to 0 once a fused kernel's expressions meet
    (`select(isnan(x), x, min(x, c)) - x` → `select(..., 0, ...)`): NaN and Inf became 0 where
    onnxruntime gives NaN (fuzz valid-cpu:2:33). The subtraction's right operand now passes a
    reinterpret pair that the simplifier cannot see through."""
    if case == "min-minus-x":
        nodes = [h.make_node("Concat", ["x", "x"], ["c"], axis=1), h.make_node("Min", ["c", "k"], ["m"]),
                 h.make_node("Sub", ["m", "c"], ["y"])]
        inits, shape_y = [_C("k", 0.25)], [1, 8, 6, 6]
    else:
        nodes = [h.make_node("Abs", ["x"], ["a"]), h.make_node("Sub", ["a", "a"], ["y"])]
        inits, shape_y = [], _S
    m = _model(nodes, [_vi("x", _S)], [_vi("y", shape_y)], inits)
    feeds = {"x": _special(_S, 0)}
    got = graphopt.compile(m, "cpu", "-O0", threads=1).run(feeds)[0]
    want = _ort(m, feeds)[0]
    assert np.isnan(want).any()
    _same_specials(got, want)


def test_requantize_clip_before_an_integer_cast_is_plain_min_max():
    """Clip(…, 0, 255) whose only reader is a Cast to uint8 (a requantize) lowers to plain
    maximum/minimum (NaN has no uint8 value to keep; the NaN-keeping selects cost int8 ResNet-50
    13 %); a Clip read as float keeps NaN."""
    from graphopt.targets.tvm.lower import lowerer as L

    def text(cast: bool) -> str:
        tail = [h.make_node("Cast", ["c"], ["y"], to=TP.UINT8)] if cast else [h.make_node("Identity", ["c"], ["y"])]
        m = _model([h.make_node("Clip", ["x", "lo", "hi"], ["c"])] + tail, [_vi("x", _S)],
                   [h.make_tensor_value_info("y", TP.UINT8 if cast else TP.FLOAT, _S)], [_C("lo", 0.0), _C("hi", 255.0)])
        return L.lower(graphopt.load(m)).mod.script()

    assert "maximum" in text(True) and "clamp_nan" not in text(True)
    assert "clamp_nan" in text(False)


def test_tanh_keeps_tiny_inputs_and_their_ratio():
    """Tanh of tiny and denormal inputs is the input (TVM's exp form cancelled to 0 below ~3e-8,
    so Tanh(x)/Tanh(x) gave NaN where onnxruntime gives 1: fuzz case valid-cpu:6:16); over
    [-10, 10] within 1e-6 relative of float64's tanh; NaN, +-inf and -0.0 kept."""
    special = np.array([1e-40, -1e-42, 1e-30, -1e-8, 0.049, 0.05, 0.051, np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32)
    grid = np.linspace(-10, 10, 4001, dtype=np.float32)
    x = np.concatenate([special, grid])[None]
    m = _model([h.make_node("Tanh", ["x"], ["t"]), h.make_node("Div", ["t", "t"], ["r"])],
               [_vi("x", list(x.shape))], [_vi("t", None), _vi("r", None)])
    t, r = graphopt.compile(m, "cpu", "-O0", threads=1).run({"x": x})
    want_t, want_r = _ort(m, {"x": x})
    np.testing.assert_array_equal(np.isnan(r), np.isnan(want_r))
    np.testing.assert_array_equal(r[:, :7], np.ones((1, 7), np.float32))  # tiny / tiny = 1, as onnxruntime
    np.testing.assert_array_equal(np.signbit(t), np.signbit(want_t))
    exact = np.tanh(x.astype(np.float64))
    fin = np.isfinite(exact) & (exact != 0)
    assert float(np.max(np.abs(t[fin] - exact[fin]) / np.abs(exact[fin]))) < 1e-6

"""tools/real_corpus.py: its data generators, metrics and If composition on tiny hand-built models
(no torch, no cache needed), and graphopt on models of the corpus's kinds (an If whose branches
read outer-scope weights, chosen by a sample-rate input; a recurrent state with the batch on axis
1). The end-to-end check on the built corpus is marked slow and skips without `.cache/real`."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tool_modules import load_tool
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.target import bind_inputs


@pytest.fixture(scope="module")
def rc():
    mod = load_tool("real_corpus.py", "real_corpus_under_test")
    assert "torch" not in vars(mod)  # evaluation must not need torch
    return mod


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


# ------------------------------------------------------------------------------ data and metrics


def test_render_line_is_deterministic_and_sized(rc):
    a = rc.render_line("AB12", np.random.default_rng(5))
    b = rc.render_line("AB12", np.random.default_rng(5))
    assert a.dtype == np.uint8 and a.shape[:2] == (3, 32) and a.shape[2] >= 16
    np.testing.assert_array_equal(a, b)
    long = [rc.render_line("W" * 10, np.random.default_rng(s)).shape[2] for s in range(5)]
    short = [rc.render_line("W" * 3, np.random.default_rng(s)).shape[2] for s in range(5)]
    assert min(long) > max(short)  # width follows the text: the model's W must be dynamic
    assert set(rc.CHARSET) == set(rc._GLYPHS)
    assert all(g.shape == (7, 5) and 0 < g.sum() < 35 for g in rc._GLYPHS.values())
    x = rc.ocr_input(a)
    assert x.shape == (1, *a.shape) and x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0


def test_ctc_greedy_and_edit_distance(rc):
    c = len(rc.CHARSET) + 1
    path = [1, 1, 0, 1, 2, 2, 0, 0, 11]  # "0", "0" after a blank, "1", "A"
    probs = np.full((1, len(path), c), 0.01, np.float32)
    probs[0, np.arange(len(path)), path] = 1.0
    assert rc.ctc_greedy(probs) == ["001A"]
    assert rc.edit_distance("001A", "001A") == 0
    assert rc.edit_distance("01A", "001A") == 1
    assert rc.edit_distance("", "ABC") == 3
    assert rc.edit_distance("AXC", "ABC") == 1


def test_audio_stream_labels_and_chunks(rc):
    x, lab = rc.audio_stream(np.random.default_rng(0), 6.0, 16000)
    assert x.dtype == np.float32 and x.shape == (96000,) and np.abs(x).max() <= 0.9 + 1e-6
    assert 0.1 < lab.mean() < 0.9  # both speech and non-speech
    chunks, y = rc.chunk_stream(x, lab, 16000)
    assert chunks.shape == (187, 512) and y.shape == (187,) and set(np.unique(y)) <= {0, 1}
    # speech segments carry more energy in the voiced band than the noise floor around them
    assert 0.0 < y.mean() < 1.0


# ------------------------------------------------------------------------------ If composition


def _branch_model(scale: float, chunk: int) -> onnx.ModelProto:
    """What the exporter writes per sample rate, in miniature: input [B, chunk] -> MatMul(w) ->
    a state update -> output [B, 1], stateN [2, B, 4]; weights as initializers."""
    rng = np.random.default_rng(int(scale * 10))
    w = (rng.standard_normal((chunk, 4)) * scale).astype(np.float32)
    v = rng.standard_normal((4, 1)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["h"]),
        helper.make_node("Add", ["h", "s0"], ["h2"]),
        helper.make_node("Tanh", ["h2"], ["h3"]),
        helper.make_node("MatMul", ["h3", "v"], ["o"]),
        helper.make_node("Sigmoid", ["o"], ["output"]),
        helper.make_node("Unsqueeze", ["h3", "ax0"], ["h4"]),
        helper.make_node("Concat", ["h4", "h4"], ["stateN"], axis=0),
        helper.make_node("Gather", ["state", "zero"], ["s0"], axis=0),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0"), numpy_helper.from_array(np.array(0, np.int64), "zero")]
    g = helper.make_graph(
        [nodes[-1], *nodes[:-1]], "branch",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", chunk]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 4])], inits)  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)])


@pytest.fixture(scope="module")
def tiny_vad_if(rc, monkeypatch_module=None):
    old = rc.HIDDEN
    rc.HIDDEN = 4
    try:
        return rc._compose_if(_branch_model(0.5, 8), _branch_model(2.0, 8), 16)
    finally:
        rc.HIDDEN = old


def test_compose_if_selects_the_branch_by_sample_rate(tiny_vad_if):
    m = tiny_vad_if
    assert [n.op_type for n in m.graph.node] == ["Constant", "Equal", "If"]
    assert {t.name.split("/")[0] for t in m.graph.initializer} == {"sr16k", "sr8k"}  # outer-scope weights
    rng = np.random.default_rng(0)
    feeds = {"input": rng.standard_normal((3, 8)).astype(np.float32), "state": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    out16 = _run(m, {**feeds, "sr": np.array(16000, np.int64)})
    out8 = _run(m, {**feeds, "sr": np.array(8000, np.int64)})
    np.testing.assert_allclose(out16[0], _run(_branch_model(0.5, 8), feeds)[0], rtol=1e-6)
    np.testing.assert_allclose(out8[0], _run(_branch_model(2.0, 8), feeds)[0], rtol=1e-6)
    assert out16[1].shape == (2, 3, 4)


def test_bind_folds_the_composed_if_and_prune_sees_the_network(tiny_vad_if):
    """--bind sr=16000 on a model whose branches read outer-scope initializers: the If is inlined,
    the 8 kHz weights are dropped, outputs equal the 16 kHz branch."""
    m = graphopt.load(tiny_vad_if.SerializeToString())
    bind_inputs(m, {"sr": np.array(16000, np.int64)})
    out = graphopt.to_onnx(graphopt.optimize(m, "-O2"))
    ops = [n.op_type for n in out.graph.node]
    assert "If" not in ops and "MatMul" in ops
    assert not any(t.name.startswith("sr8k") for t in out.graph.initializer)
    assert [i.name for i in out.graph.input] == ["input", "state"]
    rng = np.random.default_rng(1)
    feeds = {"input": rng.standard_normal((2, 8)).astype(np.float32), "state": rng.standard_normal((2, 2, 4)).astype(np.float32)}
    ref = _run(tiny_vad_if, {**feeds, "sr": np.array(16000, np.int64)})
    for a, b in zip(ref, _run(out, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ the built corpus


@pytest.mark.slow
@pytest.mark.parametrize("name,cluster_opts", [
    ("ocr_crnn", ""),  # the default budget, auto: cosine:0.99 and top1:1 (Softmax class scores)
    ("vad_gru", ""),  # auto: cosine:0.99 and top1:1 (a probability per chunk: its decisions)
    ("vad_if", ""),
    ("vad_gru", ",accuracy-budget=sqnr:30,eval-samples=256"),  # an explicit budget, as before
])  # fmt: skip
def test_corpus_compression_holds_its_budget_end_to_end(rc, name, cluster_opts):
    """prune 0.3 at the default budget and cluster-weights 5 bits, calibrated on the corpus's own data as shipped (a
    folder of lines of different widths; VAD states with the batch on axis 1; vad_if with sr bound
    to 16000 so the passes see the network), scored on the test split: cosine >= 0.99 and CER <= 1 %
    (OCR; fp32 0.04 %), <= 1 % of speech decisions flipped over 4 x 20 s (VAD)."""
    if name not in rc.list_models():
        pytest.skip(f"{name} is not built (tools/real_corpus.py build needs torch)")
    from graphopt.transform import PassContext, parse_pipeline

    base = graphopt.load(str(rc.model_path(name)))
    if name == "vad_if":
        bind_inputs(base, {"sr": np.array(16000, np.int64)})
    base = graphopt.optimize(base, "-O2")
    assert not any(n.op_type == "If" for n in base.graph)
    cal = str(rc.calibration_path(name))
    for spec in ("prune{ratio=0.3}", f"cluster-weights{{bits=5{cluster_opts}}}"):
        m = base.clone()
        res = parse_pipeline(spec)[0].run(m, PassContext(data={"calibration": cal}))
        assert res.changed, spec
        got = rc.evaluate(name, m)
        if "flips" in got:
            assert got["flips"] <= 0.01 * got["decisions"], (spec, got)
        else:
            assert got["cosine"] >= 0.99 and got["cer"] <= 0.01, (spec, got)


def _state_mlp() -> onnx.ModelProto:
    """x [N, 8] -> MatMul 16 -> Relu -> MatMul 4 -> + state[0] -> y [N, 4]; stateN = stack(y, y).
    The state's batch dim has its own symbol `m`, so only an override finds axis 1."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["o"]), helper.make_node("Gather", ["state", "zero"], ["s0"], axis=0),
             helper.make_node("Add", ["o", "s0"], ["y"]), helper.make_node("Unsqueeze", ["y", "ax0"], ["y1"]),
             helper.make_node("Concat", ["y1", "y1"], ["stateN"], axis=0)]
    g = helper.make_graph(nodes, "state_mlp",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                           helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "m", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                           helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "m", 4])], inits)  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_prune_reads_the_calibration_batch_axis_override(tmp_path):
    """--calibration-batch-axis state:1 reaches prune (it reached quantize and cluster-weights only):
    without it the state [2, 64, 4] is cut on axis 0 and the file is refused."""
    from graphopt.calibration import CalibrationError
    from graphopt.transform import PassContext, parse_pipeline

    rng = np.random.default_rng(1)
    path = tmp_path / "cal.npz"
    np.savez(path, x=rng.standard_normal((64, 8)).astype(np.float32), state=rng.standard_normal((2, 64, 4)).astype(np.float32))
    base = graphopt.load(_state_mlp().SerializeToString())
    spec = "prune{ratio=0.25,accuracy-budget=none,eval-samples=8}"
    with pytest.raises(CalibrationError):
        parse_pipeline(spec)[0].run(base.clone(), PassContext(data={"calibration": str(path)}))
    m = base.clone()
    ctx = PassContext(data={"calibration": str(path), "calibration-batch-axis": {"state": 1}})
    res = parse_pipeline(spec)[0].run(m, ctx)
    assert res.changed and res.stats["channels-removed"] == 4 and res.stats["layers-refit"] == 1
    m.verify()
    feeds = {"x": rng.standard_normal((3, 8)).astype(np.float32), "state": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    ref, got = _run(_state_mlp(), feeds), _run(graphopt.to_onnx(m), feeds)
    assert got[0].shape == (3, 4) and np.allclose(ref[1][0] - ref[0], got[1][0] - got[0])


def test_metrics_of_one_value_per_sample_see_flipped_decisions():
    """A VAD's first output is [N, 1]: per-sample cosine was always 1 and the argmax over one
    class never changed, so a budget could not trip. Now: cosine over all samples of all batches,
    top1 = decisions (p > 0.5) that changed."""
    from graphopt.accuracy import Budget, output_metrics

    rng = np.random.default_rng(0)
    ref = [[rng.uniform(0, 1, (1, 1)).astype(np.float32)] for _ in range(40)]  # 40 batches of 1
    same = output_metrics(ref, ref)
    assert same["cosine"] == pytest.approx(1.0) and same["top1"] == 0.0
    flipped = [[1.0 - r[0]] for r in ref]
    m = output_metrics(ref, flipped)
    assert m["cosine"] < 0.9 and m["top1"] > 90.0
    assert not Budget.parse("cosine:0.99").holds(m)
    near = [[np.clip(r[0] + 0.01, 0, 1)] for r in ref]
    assert output_metrics(ref, near)["cosine"] > 0.999
    # logits (not in [0, 1]): decisions at 0; [N, 1] in one batch as well
    logits = [[rng.standard_normal((16, 1)).astype(np.float32)]]
    assert output_metrics(logits, [[-logits[0][0]]])["top1"] == 100.0
    # per-sample vectors keep the per-sample cosine and argmax
    vec = [[rng.standard_normal((4, 10)).astype(np.float32)]]
    assert output_metrics(vec, vec)["cosine"] == pytest.approx(1.0)


def _recurrent_step(gain: float = 0.9) -> onnx.ModelProto:
    """x [N, 4], state [1, N, 4] -> y = sigmoid(sum(h)) [N, 1], stateN = h = tanh(x W + gain * state)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Mul", ["state", "g"], ["gs"]),
             helper.make_node("Add", ["xw", "gs"], ["pre"]), helper.make_node("Tanh", ["pre"], ["stateN"]),
             helper.make_node("ReduceSum", ["stateN", "ax"], ["s"], keepdims=1), helper.make_node("Squeeze", ["s", "ax0"], ["s2"]),
             helper.make_node("Sigmoid", ["s2"], ["y"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(gain, np.float32), "g"),
             numpy_helper.from_array(np.array([2], np.int64), "ax"), numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    g = helper.make_graph(nodes, "rec",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
                           helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, "batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1]),
                           helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [1, "batch", 4])], inits)  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_reference_runs_a_streaming_model_as_a_sequence():
    """state -> stateN is found; the evaluation batches become one sequence of single samples with
    the model's own state fed back, so an error in the recurrence (gain 0.9 -> 1.0) shows where a
    single step from the original's state hides most of it."""
    from graphopt.accuracy import Reference
    from graphopt.calibration import state_feedback

    base = graphopt.load(_recurrent_step(0.9).SerializeToString())
    worse = graphopt.load(_recurrent_step(1.0).SerializeToString())
    assert state_feedback(base) == {"state": "stateN"}
    assert state_feedback(graphopt.load(_state_mlp().SerializeToString())) == {"state": "stateN"}
    renamed = _recurrent_step(0.9)
    renamed.graph.output[1].name = "hidden"  # no name that says "next state"
    renamed.graph.node[3].output[0] = "hidden"
    renamed.graph.node[4].input[0] = "hidden"
    assert state_feedback(graphopt.load(renamed.SerializeToString())) == {}
    other = _recurrent_step(0.9)
    other.graph.output[1].type.tensor_type.shape.dim[2].dim_value = 5  # declared shape differs
    assert state_feedback(graphopt.load(other.SerializeToString())) == {}
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((32, 4)).astype(np.float32) * 0.3
    batches = [{"x": xs[i : i + 8], "state": np.zeros((1, 8, 4), np.float32)} for i in range(0, 32, 8)]
    seq = Reference(base, batches, source="test")
    assert seq.feedback == {"state": "stateN"} and len(seq.batches) == 32 and seq.samples == 32
    assert "state <- stateN" in seq.source and seq.subset(8).samples == 8
    # the reference's own outputs: step k's state is step k-1's stateN
    sess = ort.InferenceSession(_recurrent_step(0.9).SerializeToString(), providers=["CPUExecutionProvider"])
    st = np.zeros((1, 1, 4), np.float32)
    for k in range(32):
        y, st = sess.run(None, {"x": xs[k : k + 1], "state": st})
        np.testing.assert_allclose(seq.outputs[k][0], y, rtol=1e-5)
    one_step = Reference(base, batches, source="test", feedback={})
    assert len(one_step.batches) == 4
    assert seq.score(worse)["sqnr"] < one_step.score(worse)["sqnr"] - 3  # the stream shows more error
    assert seq.score(base)["cosine"] == pytest.approx(1.0)


def test_cli_calibration_reaches_prune_spelled_in_the_pipeline(tmp_path, capsys):
    """`--passes '...,prune{...}' --calibration DATA` (prune options beyond --prune's ratio) was
    refused with exit 2; the state's batch axis override travels with it."""
    from graphopt.cli import main

    rng = np.random.default_rng(2)
    src, dst, cal = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "cal.npz"
    onnx.save(_state_mlp(), str(src))
    np.savez(cal, x=rng.standard_normal((64, 8)).astype(np.float32), state=rng.standard_normal((2, 64, 4)).astype(np.float32))
    args = [str(src), "-o", str(dst), "-q", "--passes", "-O1,prune{ratio=0.25,accuracy-budget=sqnr:10,eval-samples=16}",
            "--calibration", str(cal), "--calibration-batch-axis", "state:1"]
    assert main(args) == 0, capsys.readouterr().err
    out = onnx.load(str(dst))
    shapes = sorted(list(t.dims) for t in out.graph.initializer if len(t.dims) == 2)
    assert shapes == [[8, 12], [12, 4]], shapes  # 4 of the 16 hidden units removed
    assert main([*args[:-2]]) == 2  # without the override the state file does not fit: exit 2, one line
    assert "calibration" in capsys.readouterr().err


def test_prune_says_the_network_sits_in_if_branches(tiny_vad_if):
    """Without --bind the composed VAD's layers are all inside the If: the one-line reason names
    the body and the fix instead of 'no Conv/Gemm'; with sr bound, the pass sees the layers."""
    from graphopt.transform import PassContext, parse_pipeline

    m = graphopt.load(tiny_vad_if.SerializeToString())
    ctx = PassContext()
    res = parse_pipeline("prune{ratio=0.5,accuracy-budget=none}")[0].run(m, ctx)
    assert not res.changed
    assert "2 If/Loop bodies (If 'sr_select' " in res.note and "(MatMul x2)" in res.note and "--bind" in res.note
    assert sum("not pruned: channel pruning follows the main graph only" in line for line in ctx.log) == 2
    b = graphopt.load(tiny_vad_if.SerializeToString())
    bind_inputs(b, {"sr": np.array(16000, np.int64)})
    b = graphopt.optimize(b, "-O1")
    ctx2 = PassContext()
    res2 = parse_pipeline("prune{ratio=0.5,accuracy-budget=none}")[0].run(b, ctx2)
    assert res2.stats["groups"] == 2 and not any("If/Loop" in line or "not pruned" in line for line in ctx2.log)


def _conv1d_net() -> onnx.ModelProto:
    """x [N, 4, 32] -> Conv1d 4->16 k3 p1 -> Relu -> Conv1d 16->8 k3 s2 p1 (+bias) -> Relu ->
    Conv1d 8->4 k1 -> y: a VAD's conv encoder in miniature."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 4, 3)) * 0.5).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((8, 16, 3)) * 0.3).astype(np.float32), "w2"),
             numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b2"),
             numpy_helper.from_array((rng.standard_normal((4, 8, 1)) * 0.5).astype(np.float32), "w3")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1], strides=[2]), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["y"])]
    g = helper.make_graph(nodes, "conv1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16])], inits)  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_prune_refits_1d_convs(tmp_path):
    """The layer after a pruned 1-D conv is refitted by least squares (it was skipped as '1-D conv
    kernel'): counted in layers-refit, and the output is closer to the original than without."""
    from graphopt.transform import PassContext, parse_pipeline

    rng = np.random.default_rng(5)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=rng.standard_normal((96, 4, 32)).astype(np.float32))
    base = graphopt.load(_conv1d_net().SerializeToString())
    test = {"x": rng.standard_normal((16, 4, 32)).astype(np.float32)}
    ref = _run(_conv1d_net(), test)[0]
    errs = {}
    for reconstruct in ("true", "false"):
        m = base.clone()
        ctx = PassContext(data={"calibration": str(cal)})
        res = parse_pipeline(f"prune{{ratio=0.5,accuracy-budget=none,reconstruct={reconstruct},bn-reestimate=false}}")[0].run(m, ctx)
        m.verify()
        assert res.changed and res.stats["channels-removed"] == 12  # 8 of 16, 4 of 8
        if reconstruct == "true":
            assert res.stats["layers-refit"] == 2 and res.stats["layers-not-refit"] == 0, ctx.log
        got = _run(graphopt.to_onnx(m), test)[0]
        errs[reconstruct] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert errs["true"] < 0.7 * errs["false"], errs


def _transpose_gather(perm: list[int], axis: int, index: np.ndarray, extra_reader: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=perm), helper.make_node("Gather", ["t", "i"], ["y"], axis=axis)]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["t"], ["z"]))
        outs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "tg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 3, 4])], outs,
                          [numpy_helper.from_array(index, "i")])  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("perm,axis,index,fires", [
    ([1, 0, 2], 1, np.array(-1, np.int64), True),   # an RNN's y.transpose(0, 1)[:, -1]
    ([1, 0, 2], -2, np.array(2, np.int64), True),   # negative axis
    ([2, 0, 1], 0, np.array(1, np.int64), True),    # rest [0, 1] keeps its order
    ([2, 0, 1], 1, np.array(1, np.int64), False),   # rest [2, 1] would be reordered
    ([1, 0, 2], 1, np.array([0, 2], np.int64), False),  # a 1-D index lands in permuted order
])  # fmt: skip
def test_fuse_linear_transpose_into_gather(perm, axis, index, fires):
    from graphopt.transform import PassContext, parse_pipeline

    proto = _transpose_gather(perm, axis, index)
    m = graphopt.load(proto.SerializeToString())
    res = parse_pipeline("fuse-linear")[0].run(m, PassContext())
    m.verify()
    ops = [n.op_type for n in m.graph]
    assert ops == (["Gather"] if fires else ["Transpose", "Gather"]), ops
    assert res.stats.get("transpose-into-gather", 0) == int(fires)
    x = {"x": np.random.default_rng(0).standard_normal((5, 3, 4)).astype(np.float32)}
    np.testing.assert_array_equal(_run(proto, x)[0], _run(graphopt.to_onnx(m), x)[0])
    assert not parse_pipeline("fuse-linear")[0].run(m, PassContext()).changed  # a second run changes nothing
    shared = graphopt.load(_transpose_gather(perm, axis, index, extra_reader=True).SerializeToString())
    res2 = parse_pipeline("fuse-linear")[0].run(shared, PassContext())
    assert res2.stats.get("transpose-into-gather", 0) == 0  # the Transpose has another reader


def test_sequence_steps_cut_a_state_whose_batch_symbol_differs():
    """state [2, m, 4] beside x [N, 8]: batch_axes says axis 0 for the state, but its size there
    (2) is not the batch (8): the step cut takes its one open dim of size 8."""
    from graphopt.accuracy import Reference

    m = graphopt.load(_state_mlp().SerializeToString())
    rng = np.random.default_rng(0)
    b = [{"x": rng.standard_normal((8, 8)).astype(np.float32), "state": rng.standard_normal((2, 8, 4)).astype(np.float32)}]
    r = Reference(m, b, source="t")
    assert len(r.batches) == 8
    assert all(s["x"].shape == (1, 8) and s["state"].shape == (2, 1, 4) for s in r.batches)
    np.testing.assert_array_equal(r.batches[0]["state"], b[0]["state"][:, :1])

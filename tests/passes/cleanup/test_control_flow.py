"""simplify-control-flow and --bind on VAD-like If/LSTM models and a Loop model (tools/control_flow_models.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.target import bind_inputs
from graphopt.transform import PassContext, get_pass

from paths import ROOT
_spec = importlib.util.spec_from_file_location("control_flow_models_under_test", ROOT / "tools" / "control_flow_models.py")
cf = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(cf)  # type: ignore[union-attr]


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def _ops(proto: onnx.ModelProto) -> list[str]:
    out: list[str] = []

    def walk(g: onnx.GraphProto) -> None:
        for n in g.node:
            out.append(n.op_type)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(proto.graph)
    return out


def _run_pass(model: graphopt.Model, name: str = "simplify-control-flow"):  # type: ignore[no-untyped-def]
    return get_pass(name)().run(model, PassContext())


@pytest.mark.parametrize("variant", ["vad_lstm", "vad_unrolled", "loop_stream"])
def test_o2_matches_original_and_reaches_onnxruntime_counts(variant: str, tmp_path: Path) -> None:
    model = cf.VARIANTS[variant]()
    feeds = cf.loop_feeds() if variant.startswith("loop") else cf.vad_feeds()
    o2 = cf.graphopt_o2(model, contrib=True)
    ort_all = cf.ort_optimized(model, "ALL", str(tmp_path / "ort.onnx"))
    assert cf.count_nodes(o2.graph) <= cf.count_nodes(ort_all.graph)
    assert cf.count_nodes(cf.graphopt_o2(model).graph) <= cf.count_nodes(ort_all.graph)  # standard ops only, too
    for a, b in zip(_ort(model, feeds), _ort(o2, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if variant.startswith("vad"):  # the 8 kHz branch too
        f8 = cf.vad_feeds(sr=8000)
        for a, b in zip(_ort(model, f8), _ort(o2, f8)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pass_drops_unused_if_output_and_loop_values() -> None:
    m = graphopt.load(cf.vad_model().SerializeToString())
    res = _run_pass(m)
    assert res.stats["if-outputs-removed"] == 1 and res.stats["if-inlined"] == 0
    sel = next(n for n in m.graph if n.name == "sr_select")
    assert len(sel.outputs) == 2 and all(len(g.outputs) == 2 for g in sel.subgraphs())
    m.verify()
    assert not _run_pass(m).changed  # a second run changes nothing

    loop = graphopt.load(cf.loop_model().SerializeToString())
    res = _run_pass(loop)
    assert res.stats["loop-outputs-removed"] == 1 and res.stats["loop-carried-removed"] == 1
    node = next(n for n in loop.graph if n.op_type == "Loop")
    assert len(node.inputs) == 3 and [v.name for v in node.outputs] == ["hT", "ys"]
    loop.verify()
    assert not _run_pass(loop).changed
    feeds = cf.loop_feeds()
    for a, b in zip(_ort(cf.loop_model(), feeds), _ort(graphopt.to_onnx(loop), feeds)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sr", [16000, 8000])
def test_bound_input_folds_the_if(sr: int) -> None:
    proto = cf.vad_model()
    m = graphopt.load(proto.SerializeToString())
    bind_inputs(m, {"sr": sr})
    assert [v.name for v in m.graph.inputs] == ["input", "state"]
    out = graphopt.to_onnx(graphopt.optimize(m, "-O2"))
    ops = _ops(out)
    assert "If" not in ops and "Size" not in ops and "Shape" not in ops  # the rank check and the head's reshape fold too
    assert ops.count("LSTM") == 1 and len(ops) < cf.count_nodes(proto.graph) // 3
    feeds = cf.vad_feeds(sr=sr)
    for a, b in zip(_ort(proto, feeds), _ort(out, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    again = graphopt.load(out.SerializeToString())
    assert not _run_pass(again).changed


def _if_model(cond_kind: str) -> onnx.ModelProto:
    """y = If(c) then x+1 else x-1, c: a graph input, an overridable initializer, or a constant."""
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    then_g = helper.make_graph([helper.make_node("Add", ["x", "one"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "one"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])]
    inits = [one]
    if cond_kind in ("input", "overridable"):
        inputs.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    if cond_kind in ("overridable", "constant"):
        inits.append(numpy_helper.from_array(np.array(True), "c"))
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)], "g", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_if_near_misses_and_constant_graph_output() -> None:
    for kind in ("input", "overridable"):  # a caller can change c: the If stays
        m = graphopt.load(_if_model(kind).SerializeToString())
        assert not _run_pass(m).changed
        assert any(n.op_type == "If" for n in m.graph)
    m = graphopt.load(_if_model("constant").SerializeToString())
    res = _run_pass(m)
    assert res.stats["if-inlined"] == 1
    m.verify()
    out = graphopt.to_onnx(m)
    assert _ops(out) == ["Add"] and out.graph.output[0].name == "y"  # the graph output keeps its name
    x = np.array([1.0, 2.0], np.float32)
    np.testing.assert_array_equal(_ort(out, {"x": x})[0], x + 1)


def test_two_constant_ifs_whose_branches_reuse_names() -> None:
    """Sibling bodies may use the same names; once inlined into one graph they must not clash."""
    def branch(op: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["x", "one"], ["t"])], "b", [],
                                 [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])

    nodes = [helper.make_node("If", ["c"], ["y1"], then_branch=branch("Add"), else_branch=branch("Sub")),
             helper.make_node("If", ["c"], ["y2"], then_branch=branch("Mul"), else_branch=branch("Div")),
             helper.make_node("Add", ["y1", "y2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                          initializer=[numpy_helper.from_array(np.array(2.0, np.float32), "one"),
                                       numpy_helper.from_array(np.array(True), "c")])
    m = graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    assert _run_pass(m).stats["if-inlined"] == 2
    m.verify()
    out = graphopt.to_onnx(m)
    onnx.checker.check_model(out, full_check=True)
    x = np.array([1.0, 3.0], np.float32)
    np.testing.assert_array_equal(_ort(out, {"x": x})[0], (x + 2) + (x * 2))


def test_loop_near_misses() -> None:
    """A carried value that feeds a scan output, or whose final value is read, stays."""
    proto = cf.loop_model()
    proto.graph.output.append(helper.make_tensor_value_info("cntT", TensorProto.INT64, []))
    m = graphopt.load(proto.SerializeToString())
    res = _run_pass(m)
    assert res.stats["loop-carried-removed"] == 0 and res.stats["loop-outputs-removed"] == 1
    # h feeds the used scan output ys: even with hT unread it is carried
    proto = cf.loop_model()
    del proto.graph.output[1]
    m = graphopt.load(proto.SerializeToString())
    res = _run_pass(m)
    assert res.stats["loop-carried-removed"] == 1  # only the counter
    node = next(n for n in m.graph if n.op_type == "Loop")
    assert len(node.inputs) == 3
    feeds = cf.loop_feeds()
    np.testing.assert_array_equal(_ort(proto, feeds)[0], _ort(graphopt.to_onnx(m), feeds)[0])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_bind(tmp_path: Path) -> None:
    src = tmp_path / "vad.onnx"
    onnx.save(cf.vad_model(), src)
    feeds = cf.vad_feeds()
    np.savez(tmp_path / "in.npz", input=feeds["input"], state=feeds["state"])
    out = tmp_path / "out.onnx"
    r = _cli(str(src), "-o", str(out), "--bind", "sr=16000", "--verify", "--inputs", str(tmp_path / "in.npz"))
    assert r.returncode == 0, r.stderr
    assert "input 'sr' fixed to int64[] 16000" in r.stderr
    proto = onnx.load(out)
    assert [i.name for i in proto.graph.input] == ["input", "state"] and "If" not in _ops(proto)
    np.save(tmp_path / "sr.npy", np.array(8000, np.int64))
    cfg = tmp_path / "c.toml"
    cfg.write_text('[graphopt]\nbind = ["sr=sr.npy"]\n')
    r = _cli(str(src), "-o", str(tmp_path / "o8.onnx"), "--config", str(cfg), "-q")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(_ort(onnx.load(tmp_path / "o8.onnx"), feeds)[0], _ort(cf.vad_model(), {**feeds, "sr": np.array(8000)})[0],
                               rtol=1e-5, atol=1e-6)
    for bad, msg in (("sr=0.5", "not a whole number"), ("rate=1", "no input of that name"), ("sr", "expected NAME=VALUE"),
                     ("state=3", "does not fit input 'state'")):
        r = _cli(str(src), "-o", str(tmp_path / "bad.onnx"), "--bind", bad)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, (bad, r.stderr)
        assert not (tmp_path / "bad.onnx").exists()


def test_prune_names_the_bodies_it_cannot_see() -> None:
    m = graphopt.load(cf.vad_model().SerializeToString())
    ctx = PassContext()
    graphopt.optimize(m, "-O2,prune{ratio=0.3}", ctx=ctx)
    lines = [x for x in ctx.log if "not pruned" in x]
    assert len(lines) == 2 and any("then_branch (Conv x" in x for x in lines)


def _rank_if_range_model(limit: int) -> onnx.ModelProto:
    """AffineGrid's expanded function in small: `D = If(Size(size) == 4) <then: D = [limit] (a
    1-element 1-D constant), else: D = size[0:1]>`, then `Range(0, D, 1)`. onnxruntime's Range
    kernel takes the 1-element tensor, but its load-time inference rejects a *constant* non-scalar
    Range input: inlining the If makes D that constant."""
    c = lambda name, arr: numpy_helper.from_array(np.asarray(arr, dtype=np.int64), name)  # noqa: E731
    then_g = helper.make_graph([helper.make_node("Identity", ["limit_1d"], ["D_then"])], "then", [],
                               [helper.make_tensor_value_info("D_then", TensorProto.INT64, None)])
    else_g = helper.make_graph([helper.make_node("Slice", ["size", "zero_1d", "one_1d"], ["D_else"])], "else", [],
                               [helper.make_tensor_value_info("D_else", TensorProto.INT64, None)])
    nodes = [
        helper.make_node("Size", ["size"], ["rank"]),
        helper.make_node("Equal", ["rank", "four"], ["is_2d"]),
        helper.make_node("If", ["is_2d"], ["D"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Range", ["zero", "D", "one"], ["steps"]),
        helper.make_node("Cast", ["steps"], ["steps_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["steps_f", "x"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "rank_if_range",
        [helper.make_tensor_value_info("size", TensorProto.INT64, [4]), helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [c("four", 4), c("zero", 0), c("one", 1), c("zero_1d", [0]), c("one_1d", [1]), c("limit_1d", [limit])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


@pytest.mark.parametrize("limit", [5, 5000])  # 5: Range folds; 5000: too big to fold, stays a Range
def test_inlined_if_feeding_range_keeps_scalar_inputs(limit: int) -> None:
    """Regression (ONNX backend test affine_grid_2d_expanded at -O2): Size(size) folds to 4, the
    If inlines, and Range(0, [limit], 1) must not reach onnxruntime with a constant 1-D input."""
    model = _rank_if_range_model(limit)
    feeds = {"size": np.array([2, 3, 4, 5], np.int64), "x": np.array(0.5, np.float32)}
    want = _ort(model, feeds)
    m = graphopt.load(model.SerializeToString())
    graphopt.optimize(m, "-O1", inplace=True, verify_each=True)
    m.verify()
    out = graphopt.to_onnx(m)
    assert "If" not in _ops(out)  # the rewrite fired
    assert ("Range" in _ops(out)) == (limit > 1024)
    onnx.shape_inference.infer_shapes(out, strict_mode=True, data_prop=True)  # what onnxruntime checks on load
    got = _ort(out, feeds)
    np.testing.assert_array_equal(want[0], got[0])
    again = graphopt.load(out.SerializeToString())
    assert not _run_pass(again, "fold-constants").changed and not _run_pass(again).changed


def _declared_dims_hold(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, set[int]]:
    """Run `model` with every value_info as an extra output; what each dim symbol stood for.
    One symbol, one size: onnxruntime plans buffers on these names."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {vi.name: vi.type.tensor_type.shape for vi in probe.graph.value_info}
    del probe.graph.value_info[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in declared)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    sizes: dict[str, set[int]] = {}
    for name, arr in zip(names, sess.run(None, feeds)):
        if name not in declared:
            continue
        for d, n in zip(declared[name].dim, arr.shape):
            if d.dim_param:
                sizes.setdefault(d.dim_param, set()).add(n)
            elif d.HasField("dim_value"):
                assert d.dim_value == n, name
    return sizes


def test_inlined_if_keeps_dim_symbols_of_one_inference_run() -> None:
    """Regression (ONNX backend test affine_grid_2d_expanded at -O2, onnxruntime: "Shape mismatch
    attempting to re-use buffer"): once the If is inlined, the values typed before (through the
    If's outputs) kept made-up symbols ("unk__2") that the next inference run gave to another dim."""
    c = lambda name, arr: numpy_helper.from_array(np.asarray(arr, dtype=np.int64), name)  # noqa: E731
    i64 = lambda name: helper.make_tensor_value_info(name, TensorProto.INT64, None)  # noqa: E731
    then_g = helper.make_graph([helper.make_node("Split", ["size"], ["H_t", "W_t"], num_outputs=2)], "then", [], [i64("H_t"), i64("W_t")])
    else_g = helper.make_graph([helper.make_node("ReduceMax", ["size"], ["H_e"], keepdims=0), helper.make_node("Identity", ["size"], ["W_e"])],
                               "else", [], [i64("H_e"), i64("W_e")])
    nodes = [
        helper.make_node("Size", ["size"], ["rank"]),
        helper.make_node("Equal", ["rank", "two"], ["is_2d"]),
        helper.make_node("If", ["is_2d"], ["H", "W"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Range", ["zero", "H", "one"], ["rh"]),
        helper.make_node("Range", ["zero", "W", "one"], ["rw"]),
        helper.make_node("Cast", ["rh"], ["fh"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["rw"], ["fw"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["H", "W"], ["hw"], axis=0),
        helper.make_node("ConstantOfShape", ["hw"], ["zeros"]),
        helper.make_node("Add", ["zeros", "fw"], ["gw"]),
        helper.make_node("Unsqueeze", ["fh", "one_1d"], ["fh2"]),
        helper.make_node("Add", ["zeros", "fh2"], ["gh"]),
        helper.make_node("Add", ["gw", "gh"], ["y"]),
    ]
    g = helper.make_graph(nodes, "grid", [helper.make_tensor_value_info("size", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [c("two", 2), c("zero", 0), c("one", 1), c("one_1d", [1])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    feeds = {"size": np.array([3, 5], np.int64)}  # H != W: a shared symbol would be wrong
    m = graphopt.load(model.SerializeToString())
    graphopt.optimize(m, "-O1", inplace=True, verify_each=True)
    out = graphopt.to_onnx(m)
    assert "If" not in _ops(out)
    sizes = _declared_dims_hold(out, feeds)
    assert sizes and all(len(s) == 1 for s in sizes.values()), sizes
    np.testing.assert_array_equal(_ort(model, feeds)[0], _ort(out, feeds)[0])


def test_loop_invariant_carried_value_rewired_and_reported() -> None:
    """A carried value the body passes through unchanged: its readers inside the body read the
    initial value, and the pass says it changed the model (it reported nothing when that was
    all it did); numbers equal, a second run changes nothing."""
    f = TensorProto.FLOAT
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["b_in", "a_in"], ["b_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("a_in", f, [2]), helper.make_tensor_value_info("b_in", f, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("a_in", f, [2]),
         helper.make_tensor_value_info("b_out", f, [2])])
    g = helper.make_graph(
        [helper.make_node("Loop", ["trip", "", "a", "b"], ["a_final", "b_final"], body=body)], "g",
        [helper.make_tensor_value_info("a", f, [2]), helper.make_tensor_value_info("b", f, [2])],
        [helper.make_tensor_value_info("a_final", f, [2]), helper.make_tensor_value_info("b_final", f, [2])],
        [numpy_helper.from_array(np.array(3, np.int64), "trip")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([0.5, -1.0], np.float32)}
    m = graphopt.load(model)
    res = get_pass("simplify-control-flow")().run(m, PassContext())
    assert res.changed and res.stats["loop-invariants-rewired"] == 1, res.stats
    m.verify()
    out = graphopt.to_onnx(m)
    for got, want in zip(_ort(out, feeds), _ort(model, feeds)):
        np.testing.assert_array_equal(got, want)
    again = get_pass("simplify-control-flow")().run(m, PassContext())
    assert not again.changed, again.stats

"""slices-to-split (Slices that tile an axis → one Split) and fuse-conv-activation's
gemm-activation rule (Gemm + activation → com.microsoft FusedGemm, contrib-ops only): fires with
counts, near-misses stay, second runs change nothing, verify() holds and onnxruntime's outputs
agree (graphopt.testing.check_pass); the corpus VADs reach onnxruntime's node counts."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.ir import Model
from graphopt.testing import check_pass

F = TensorProto.FLOAT
BIG = np.iinfo(np.int64).max


def slices_model(ranges: list[tuple[int, int]], *, axis: int = 1, shape=(2, 6, 3), steps: int | None = None,
                 opset: int = 17, dynamic_end: bool = False, out_dims: bool = True) -> Model:
    """y_i = Slice(Relu(x), ranges[i]) on `axis`, each a graph output."""
    inits, nodes, outs = [], [helper.make_node("Relu", ["x"], ["r"])], []
    ins = [helper.make_tensor_value_info("x", F, list(shape))]
    for i, (s, e) in enumerate(ranges):
        inits += [numpy_helper.from_array(np.array([s], np.int64), f"s{i}"), numpy_helper.from_array(np.array([axis], np.int64), f"a{i}")]
        if dynamic_end and i == 0:
            ins.append(helper.make_tensor_value_info("e0", TensorProto.INT64, [1]))
        else:
            inits.append(numpy_helper.from_array(np.array([e], np.int64), f"e{i}"))
        args = ["r", f"s{i}", f"e{i}", f"a{i}"]
        if steps is not None:
            inits.append(numpy_helper.from_array(np.array([steps], np.int64), f"st{i}"))
            args.append(f"st{i}")
        nodes.append(helper.make_node("Slice", args, [f"y{i}"]))
        d = list(shape)
        if isinstance(d[axis], int):
            n = d[axis]
            lo, hi = (min(max(v + n if v < 0 else v, 0), n) for v in (s, e))
            d[axis] = max(0, -(-(hi - lo) // (steps or 1))) if not (dynamic_end and i == 0) else f"k{i}"
        else:
            d[axis] = f"k{i}"
        outs.append(helper.make_tensor_value_info(f"y{i}", F, d))
    g = helper.make_graph(nodes, "g", ins, outs, inits)
    return graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8).SerializeToString())


def ops(m: Model) -> list[str]:
    return [n.op_type for n in m.all_nodes()]


@pytest.mark.parametrize("ranges,axis,shape", [
    ([(0, 3), (3, BIG)], 1, (2, 6, 3)),            # a STFT's real / imaginary halves
    ([(1, 2), (0, 1)], 0, (2, 4, 5)),              # an RNN state's two layers, out of order
    ([(0, 2), (2, -1), (-1, 6)], -2, (2, 6, 3)),   # three parts, negative indices
])
def test_slices_that_tile_an_axis_become_one_split(ranges, axis, shape):
    m = slices_model(ranges, axis=axis, shape=shape)
    out, stats = check_pass(m, "slices-to-split", {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    assert stats == {"splits": 1, "slices-replaced": len(ranges)}
    assert ops(out).count("Split") == 1 and "Slice" not in ops(out)
    assert [v.name for v in out.graph.outputs] == [f"y{i}" for i in range(len(ranges))]


def test_split_at_opset_11_uses_the_attribute():
    out, stats = check_pass(slices_model([(0, 3), (3, 6)], opset=11), "slices-to-split")
    split = next(n for n in out.graph if n.op_type == "Split")
    assert stats["splits"] == 1 and split.attr("split") == [3, 3] and len(split.inputs) == 1


@pytest.mark.parametrize("kw,why", [
    ({"ranges": [(0, 3), (4, 6)]}, "a gap"),
    ({"ranges": [(0, 4), (3, 6)]}, "an overlap"),
    ({"ranges": [(0, 3), (3, 5)]}, "misses the end"),
    ({"ranges": [(0, 3)]}, "one Slice"),
    ({"ranges": [(0, 3), (3, 6)], "steps": 2}, "step 2"),
    ({"ranges": [(0, 3), (3, 6)], "dynamic_end": True}, "an end that is an input"),
    ({"ranges": [(0, 3), (3, 6)], "shape": (2, "C", 3)}, "unknown size on the axis"),
])
def test_near_misses_stay_slices(kw, why):
    m = slices_model(**kw)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 6, 3)).astype(np.float32)}
    if kw.get("dynamic_end"):
        feeds["e0"] = np.array([3], np.int64)
    out, stats = check_pass(m, "slices-to-split", feeds)
    assert "Split" not in ops(out), why
    assert stats == {}


def test_slices_on_different_axes_stay():
    from graphopt.ir import DataType, NumpyTensor, Shape, TensorType

    m = slices_model([(0, 3), (3, 6)], shape=(2, 6, 6))
    m.graph.initializers["a1"].const_value = NumpyTensor(np.array([2], np.int64))
    m.graph.outputs[1].type = TensorType(DataType.FLOAT, Shape([2, 6, 3]))
    out, stats = check_pass(m, "slices-to-split")
    assert stats == {} and "Split" not in ops(out)


def gemm_model(act: str, attrs: dict | None = None, *, dtype=F, extra_reader: bool = False, bias: bool = True) -> Model:
    rng = np.random.default_rng(0)
    npt = np.float32 if dtype == F else np.float64
    inits = [numpy_helper.from_array(rng.standard_normal((4, 8)).astype(npt), "W")]
    gin = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(4).astype(npt), "B"))
        gin.append("B")
    nodes = [helper.make_node("Gemm", gin, ["g"], transB=1, alpha=0.5), helper.make_node(act, ["g"], ["y"], **(attrs or {}))]
    outs = [helper.make_tensor_value_info("y", dtype, [3, 4])]
    if extra_reader:
        outs.append(helper.make_tensor_value_info("g", dtype, [3, 4]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, [3, 8])], outs, inits)
    return graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString())


@pytest.mark.parametrize("act,attrs", [("Sigmoid", None), ("Relu", None), ("Tanh", None),
                                       ("LeakyRelu", {"alpha": 0.2}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4})])
def test_gemm_activation_becomes_fused_gemm(act, attrs):
    out, stats = check_pass(gemm_model(act, attrs), "fuse-conv-activation", contrib_ops=True)
    assert stats.get("gemm-activation") == 1 and [n.op_type for n in out.graph] == ["FusedGemm"]
    fused = next(iter(out.graph))
    assert fused.domain == "com.microsoft" and fused.attr("activation") == act and fused.attr("alpha") == 0.5
    assert out.opset_imports.get("com.microsoft") == 1


@pytest.mark.parametrize("kw,contrib", [({}, False), ({"dtype": TensorProto.DOUBLE}, True), ({"extra_reader": True}, True)])
def test_gemm_activation_near_misses(kw, contrib):
    out, stats = check_pass(gemm_model("Sigmoid", **kw), "fuse-conv-activation", contrib_ops=contrib)
    assert "FusedGemm" not in ops(out) and not stats.get("gemm-activation")


def test_gemm_clip_is_not_fused():
    m = gemm_model("Clip")
    out, _ = check_pass(m, "fuse-conv-activation", contrib_ops=True)
    assert ops(out) == ["Gemm", "Clip"]


def test_corpus_vads_reach_onnxruntime_node_counts():
    """Goal of issue 24: -O2 (with contrib ops, what the onnxruntime deployment uses) has at most
    as many nodes as onnxruntime's ORT_ENABLE_ALL on the control-flow models of the corpus."""
    from tool_modules import load_tool

    cfm = load_tool("control_flow_models.py", "control_flow_models_under_test")
    rc = load_tool("real_corpus.py", "real_corpus_under_test")

    built = [n for n in ("vad_gru", "vad_if") if n in rc.list_models()]
    if not built:
        pytest.skip("tools/real_corpus.py models not built (.cache/real)")
    import tempfile

    import onnx
    with tempfile.TemporaryDirectory() as tmp:
        for name in built:
            model = onnx.load(str(rc.model_path(name)))
            o2 = cfm.graphopt_o2(model, contrib=True)
            ort = cfm.ort_optimized(model, "ALL", f"{tmp}/{name}.onnx")
            assert cfm.count_nodes(o2.graph) <= cfm.count_nodes(ort.graph), name


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    pass
else:
    @settings(max_examples=25, deadline=None)
    @given(sizes=st.lists(st.integers(1, 4), min_size=2, max_size=4), axis=st.integers(0, 2),
           order=st.randoms(use_true_random=False), neg=st.booleans(), open_end=st.booleans())
    def test_any_tiling_becomes_one_split_with_the_same_numbers(sizes, axis, order, neg, open_end):
        """Tilings of an axis in any order, with negative starts or an open end: one Split, and
        onnxruntime gives the same outputs (check_pass); a Slice dropped leaves a gap: no Split."""
        total = sum(sizes)
        shape = [3, 2, 2]
        shape[axis] = total
        bounds = np.cumsum([0] + sizes)
        ranges = [(int(s - total) if neg and s else int(s), BIG if open_end and e == total else int(e))
                  for s, e in zip(bounds[:-1], bounds[1:])]
        order.shuffle(ranges)
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        out, stats = check_pass(slices_model(ranges, axis=axis, shape=tuple(shape)), "slices-to-split", {"x": x})
        assert stats == {"splits": 1, "slices-replaced": len(sizes)} and "Slice" not in ops(out)
        if len(ranges) > 2:
            _, stats = check_pass(slices_model(ranges[:-1], axis=axis, shape=tuple(shape)), "slices-to-split", {"x": x})
            assert stats == {}  # the parts left cover less than the axis: no Split

"""cluster-weights: at most 2^bits distinct values per codebook, error within the bounds of a
uniform quantizer (k-means never does worse than its linear start), the exported file really
shrinks (no float copy of a clustered weight is written), onnxruntime outputs stay close, a
second run changes nothing, verify() holds, and small tensors / biases / integer and shape
tensors / overridable inputs stay as they are."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.check import random_inputs, run_onnxruntime
from graphopt.errors import UsageError
from graphopt.ir import Model
from graphopt.passes.sharing import codebook as cbk
from graphopt.passes.sharing.kmeans import cluster_rows
from graphopt.transform import PassContext, get_pass, parse_pipeline

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def t(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def make(nodes, inputs, outputs, inits=(), *, opset=17, ir=8) -> Model:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir))


def mlp(opset=17, ir=8, dims=(64, 96, 10), seed=0) -> Model:
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(len(dims) - 1):
        inits += [t(f"W{i}", (rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32)),
                  t(f"b{i}", rng.standard_normal(dims[i + 1]).astype(np.float32))]
        nodes += [helper.make_node("Gemm", [x, f"W{i}", f"b{i}"], [f"g{i}"]), helper.make_node("Relu", [f"g{i}"], [f"r{i}"])]
        x = f"r{i}"
    return make(nodes, [vi("x", [4, dims[0]])], [vi(x, [4, dims[-1]])], inits, opset=opset, ir=ir)


def run(model: Model, **options):
    """cluster-weights on a copy: (new model, stats); checks verify() and that a second run is a
    no-op."""
    out = model.clone()
    result = get_pass("cluster-weights")(**{"accuracy_budget": "none", **options}).run(out, PassContext())
    out.verify()
    again = out.clone()
    second = get_pass("cluster-weights")(**{"accuracy_budget": "none", **options}).run(again, PassContext())
    assert not second.changed and second.stats["tensors-clustered"] == 0
    return out, result.stats


def decoded(model: Model) -> dict[str, np.ndarray]:
    """Each clustered weight as onnxruntime decodes it: the decode chain's output made a graph
    output of a copy of the model."""
    m = model.clone()
    names = [n.outputs[0].name for n in m.all_nodes() if cbk.CODEBOOK_KEY in n.metadata_props]
    proto = graphopt.to_onnx(m)
    for nm in names:
        proto.graph.output.append(helper.make_empty_tensor_value_info(nm))
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(names, random_inputs(model))
    return dict(zip(names, outs))


def file_size(model: Model) -> int:
    return len(graphopt.to_onnx(model).SerializeToString())


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# --- fires ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bits,opset,ir,storage,min_ratio",
    [(4, 21, 10, "uint4", 6.0), (5, 17, 8, "packed", 5.0), (3, 17, 8, "packed", 7.0), (8, 17, 8, "uint8", 3.5), (4, 17, 8, "packed", 6.0),
     (5, 11, 6, "packed", 5.0), (7, 13, 7, "packed", 4.0)],  # opset < 14: the int32 decode
)
def test_fires_shrinks_and_keeps_outputs_close(bits, opset, ir, storage, min_ratio):
    m = mlp(opset, ir, dims=(128, 256, 64))
    out, stats = run(m, bits=bits)
    assert stats["tensors-clustered"] == 2 and stats["params-clustered"] == 128 * 256 + 256 * 64
    assert stats["tensors-small"] == 0  # the biases are 1-D: never candidates at all
    infos = [json.loads(n.metadata_props[cbk.CODEBOOK_KEY]) for n in out.graph if cbk.CODEBOOK_KEY in n.metadata_props]
    assert {i["storage"] for i in infos} == {storage} and {i["bits"] for i in infos} == {bits}
    # the file shrinks for real: weights are 95% of it
    assert file_size(m) / file_size(out) >= min_ratio
    assert stats["compression"] >= min_ratio
    # no float copy of a clustered weight is exported
    proto = graphopt.to_onnx(out)
    assert all(i.data_type != F or len(i.dims) < 2 for i in proto.graph.initializer)
    # distinct decoded values <= 2^bits, error as reported, outputs close through onnxruntime
    dec = decoded(out)
    for name in ("W0", "W1"):
        w = m.graph.initializers[name].const_value.numpy()
        assert len(np.unique(dec[name])) <= 2**bits
        assert rel(dec[name], w) == pytest.approx(stats[f"{name}/rel-l2"], rel=1e-4)
        assert stats[f"{name}/bits"] == bits
        assert stats[f"{name}/sqnr-db"] == pytest.approx(-20 * np.log10(stats[f"{name}/rel-l2"]), rel=1e-6)
    feeds = random_inputs(m)
    y0, y1 = run_onnxruntime(m, feeds)[0], run_onnxruntime(out, feeds)[0]
    assert rel(y1, y0) < 3 * stats["max-rel-l2"]


def test_error_falls_with_bits_and_matches_gaussian_theory():
    m = mlp(dims=(256, 256, 10))
    errs = [run(m, bits=b)[1]["W0/rel-l2"] for b in (2, 3, 4, 5, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    # Lloyd-Max for a Gaussian: SQNR ~ 6 dB per bit (4 bits: 20.2 dB, i.e. rel-l2 ~ 0.097)
    assert errs[2] < 0.13 and errs[-1] < 0.02


def test_onnxruntime_folds_the_decode_when_it_creates_the_session(tmp_path):
    import onnxruntime as ort

    m = mlp(21, 10)
    for bits in (4, 5):
        out, _ = run(m, bits=bits)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(graphopt.to_onnx(out).SerializeToString(), so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
        assert sorted(set(ops)) == ["Gemm", "Relu"], ops


def test_decode_numpy_matches_onnxruntime_for_every_storage():
    m = mlp(21, 10, dims=(37, 19, 5))  # sizes that are not multiples of 8 (packing pads)
    for bits, storage in ((3, "packed"), (5, "packed"), (7, "packed"), (4, "uint4"), (2, "uint4"), (6, "uint8")):
        for per_channel in (False, True):
            out, _ = run(m, bits=bits, storage=storage, min_size=16, per_channel=per_channel)
            dec = decoded(out)
            for n in out.graph:
                if cbk.CODEBOOK_KEY in n.metadata_props:
                    info = json.loads(n.metadata_props[cbk.CODEBOOK_KEY])
                    idx = out.graph.initializers[info["indices"]].const_value.numpy()
                    cb = out.graph.initializers[info["codebook"]].const_value.numpy()
                    np.testing.assert_array_equal(cbk.decode_numpy(idx, cb, info), dec[n.outputs[0].name])


def test_per_channel_codebooks():
    w = RNG.standard_normal((16, 8, 3, 3)).astype(np.float32) * np.linspace(0.1, 5, 16, dtype=np.float32)[:, None, None, None]
    m = make([helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])], [vi("x", [1, 8, 6, 6])], [vi("y", [1, 16, 6, 6])], [t("W", w)])
    per_tensor, s1 = run(m, bits=3)
    per_chan, s2 = run(m, bits=3, per_channel=True)
    assert s2["W/per-channel"] == 1 and s1["W/per-channel"] == 0
    assert s2["W/rel-l2"] < s1["W/rel-l2"]  # channels of very different scale: per channel wins
    dec = decoded(per_chan)["W"]
    assert all(len(np.unique(dec[c])) <= 8 for c in range(16))
    assert len(np.unique(dec)) > 8


def test_layer_bits_override_and_keep_float():
    m = mlp(dims=(64, 64, 64, 64))
    out, stats = run(m, bits=4, layer_bits="W0:8;Gemm_1:0;*2:3")
    assert stats["W0/bits"] == 8 and stats["W2/bits"] == 3 and "W1/bits" not in stats or stats.get("W1/bits") == 4
    m2 = m.clone()
    for i, n in enumerate(m2.graph):
        n.name = f"node{i}"
    out, stats = run(m2, bits=4, layer_bits="node2:0")  # matched by the reader's node name (Gemm of W1)
    assert "W1/bits" not in stats and stats["tensors-kept-float"] == 1 and "W1" in out.graph.initializers
    p = parse_pipeline("cluster-weights{accuracy-budget=none,bits=6,layer-bits=conv1:8;fc*:0,per-channel=true}")[0]
    assert (p.bits, p.layer_bits, p.per_channel) == (6, "conv1:8;fc*:0", True)


@pytest.mark.parametrize(
    "spec",
    ["cluster-weights{accuracy-budget=none,bits=1}", "cluster-weights{accuracy-budget=none,bits=9}", "cluster-weights{layer-bits=fc}", "cluster-weights{layer-bits=fc:12}",
     "cluster-weights{init=random}", "cluster-weights{storage=int2}", "cluster-weights{weighting=magic}"],
)
def test_bad_options_are_usage_errors(spec):
    with pytest.raises(UsageError):
        parse_pipeline(spec)


def test_uint4_needs_opset_21():
    with pytest.raises(UsageError, match="opset >= 21"):
        run(mlp(17, 8), bits=4, storage="uint4")


def test_clusters_weights_inside_subgraphs():
    w = RNG.standard_normal((32, 32)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "Wt"], ["to"])], "then", [], [vi("to", [2, 32])], initializer=[t("Wt", w)])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["eo"])], "else", [], [vi("eo", [2, 32])])
    m = make([helper.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g)],
             [vi("x", [2, 32]), vi("flag", [], TensorProto.BOOL)], [vi("y", [2, 32])])
    out, stats = run(m, bits=5)
    assert stats["tensors-clustered"] == 1
    feeds = {"x": RNG.standard_normal((2, 32)).astype(np.float32), "flag": np.array(True)}
    y0, y1 = run_onnxruntime(m, feeds)[0], run_onnxruntime(out, feeds)[0]
    assert rel(y1, y0) < 3 * stats["W0/rel-l2" if "W0/rel-l2" in stats else "Wt/rel-l2"]


def test_tied_weight_is_clustered_once_and_stays_tied():
    E = RNG.standard_normal((64, 32)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("Transpose", ["E"], ["Et"]), helper.make_node("MatMul", ["h", "Et"], ["y"])]
    m = make(nodes, [vi("ids", [3], TensorProto.INT64)], [vi("y", [3, 64])], [t("E", E)])
    out, stats = run(m, bits=4)
    assert stats["tensors-clustered"] == 1
    (gather,) = [n for n in out.graph if cbk.CODEBOOK_KEY in n.metadata_props]
    assert {n.op_type for n in gather.outputs[0].consumers()} == {"Gather", "Transpose"}


def test_calibration_weighting_lowers_the_output_error():
    rng = np.random.default_rng(1)
    # 8 input channels carry the signal, and their weights are small: an unweighted codebook
    # spends its entries on the wide range of the weights that hardly matter
    w = (rng.standard_normal((64, 32)) * np.where(np.arange(64) < 8, 0.1, 1.0)[:, None]).astype(np.float32)
    m = make([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", ["n", 64])], [vi("y", ["n", 32])], [t("W", w)])
    scale = np.where(np.arange(64) < 8, 10.0, 0.05).astype(np.float32)
    calib = {"x": (rng.standard_normal((256, 64)) * scale).astype(np.float32)}
    test = {"x": (rng.standard_normal((256, 64)) * scale).astype(np.float32)}
    y0 = run_onnxruntime(m, test)[0]
    plain = m.clone()
    get_pass("cluster-weights")(bits=3).run(plain, PassContext())
    weighted = m.clone()
    ctx = PassContext(data={"calibration-inputs": calib})
    get_pass("cluster-weights")(bits=3, weighting="calibration").run(weighted, ctx)
    e_plain = rel(run_onnxruntime(plain, test)[0], y0)
    e_weighted = rel(run_onnxruntime(weighted, test)[0], y0)
    assert e_weighted < 0.5 * e_plain
    with pytest.raises(UsageError, match="calibration-inputs"):
        get_pass("cluster-weights")(weighting="calibration").run(m.clone(), PassContext())


def test_runs_after_the_O2_pipeline_and_through_the_report(tmp_path):
    from graphopt.report import _per_item_table
    from graphopt.transform import PassRecord

    m = mlp(dims=(64, 64, 10))
    out = graphopt.optimize(m, "-O2,share-weights,cluster-weights{accuracy-budget=none,bits=5}")
    rec = out.meta["pass_timings"][-1]
    assert rec.stats["tensors-clustered"] == 1  # W1 (64x10) is below min-size
    lines = _per_item_table(PassRecord(rec.spec, rec.seconds, rec.changed, rec.stats, 0, 0))
    assert "tensors-clustered=1" in lines[0] and any(line.split()[0] == "W0" for line in lines[2:])


# --- near misses ----------------------------------------------------------------------------------
def test_near_misses_stay_untouched():
    rng = np.random.default_rng(2)
    big_int = rng.integers(0, 100, (64, 64)).astype(np.int64)
    nodes = [
        helper.make_node("MatMul", ["x", "Wsmall"], ["a"]),       # 8x8: below min-size
        helper.make_node("Add", ["a", "bias"], ["b"]),            # 1-D bias, 2048 elements
        helper.make_node("Reshape", ["b", "shape"], ["c"]),       # shape tensor
        helper.make_node("Add", ["xi", "Wint"], ["d"]),           # integer weights
        helper.make_node("MatMul", ["x64", "Wover"], ["e"]),      # overridable graph input
        helper.make_node("MatMul", ["x64", "Wnan"], ["f"]),       # NaN inside
    ]
    wnan = rng.standard_normal((64, 64)).astype(np.float32)
    wnan[3, 3] = np.nan
    m = make(
        nodes,
        [vi("x", [256, 8]), vi("xi", [64, 64], TensorProto.INT64), vi("x64", [2, 64]), vi("Wover", [64, 64])],
        [vi("c", [256, 8]), vi("d", [64, 64], TensorProto.INT64), vi("e", [2, 64]), vi("f", [2, 64])],
        [t("Wsmall", rng.standard_normal((8, 8)).astype(np.float32)), t("bias", rng.standard_normal(8).astype(np.float32)),
         t("shape", np.array([256, 8], np.int64)), t("Wint", big_int), t("Wover", rng.standard_normal((64, 64)).astype(np.float32)),
         t("Wnan", wnan)],
    )
    out, stats = run(m, bits=4, min_size=1024)
    assert stats["tensors-clustered"] == 0 and stats["tensors-small"] == 1 and stats["tensors-nonfinite"] == 1
    assert set(out.graph.initializers) == set(m.graph.initializers)
    feeds = random_inputs(m)
    for a, b in zip(run_onnxruntime(m, feeds), run_onnxruntime(out, feeds)):
        np.testing.assert_array_equal(a, b)


def test_few_distinct_values_get_an_exact_codebook():
    mask = np.where(np.tri(64, dtype=bool), 0.0, -np.inf).astype(np.float32)  # attention mask
    m = make([helper.make_node("Add", ["x", "M"], ["y"])], [vi("x", [64, 64])], [vi("y", [64, 64])], [t("M", mask)])
    out, stats = run(m, bits=2)
    assert stats["tensors-clustered"] == 1 and stats["M/rel-l2"] == 0.0
    feeds = random_inputs(m)
    np.testing.assert_array_equal(run_onnxruntime(m, feeds)[0], run_onnxruntime(out, feeds)[0])


# --- properties -------------------------------------------------------------------------------------
def _uniform_mse(x: np.ndarray, k: int) -> float:
    """MSE of nearest-level quantization on k evenly spaced levels from min to max: the linear
    start of k-means, which Lloyd iterations can only improve."""
    lv = np.linspace(x.min(), x.max(), k)
    return float(((x - lv[np.abs(x[:, None] - lv[None, :]).argmin(1)]) ** 2).mean())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 6),
    n=st.integers(1, 400),
    bits=st.integers(2, 8),
    dist=st.sampled_from(["normal", "laplace", "uniform", "few"]),
    seed=st.integers(0, 2**16),
)
def test_property_kmeans_beats_its_linear_start_and_assigns_nearest(rows, n, bits, dist, seed):
    rng = np.random.default_rng(seed)
    x = {"normal": rng.standard_normal, "laplace": lambda s: rng.laplace(size=s), "uniform": rng.random}.get(dist, lambda s: rng.integers(0, 3, s).astype(float))((rows, n))
    x = x.astype(np.float32)
    k = 1 << bits
    c, idx = cluster_rows(x, k)
    assert c.shape == (rows, k) and idx.shape == x.shape and int(idx.max()) < k
    assert (np.diff(c, axis=1) >= 0).all()
    for r in range(rows):
        d = np.abs(x[r][:, None].astype(np.float64) - c[r][None, :])
        np.testing.assert_allclose(d[np.arange(n), idx[r]], d.min(1), rtol=0, atol=1e-12)
        mse = float(((x[r] - c[r][idx[r]]) ** 2).mean())
        assert mse <= _uniform_mse(x[r].astype(np.float64), k) * (1 + 1e-9) + 1e-12


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 7), n=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_property_pack_roundtrip(bits, n, seed):
    idx = np.random.default_rng(seed).integers(0, 1 << bits, n).astype(np.uint8)
    packed = cbk.pack(idx, bits)
    assert packed.shape == (bits, -(-n // 8)) and packed.nbytes == cbk.storage_bytes(n, bits, "packed")
    np.testing.assert_array_equal(cbk.unpack(packed, bits, n), idx)

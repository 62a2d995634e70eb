"""cluster-weights{refit=activations}: the activation-aware least-squares codebook refit, its
calibration sources and token mask, and channel-overhead (per-channel codebooks where cheap).

The refit must lower the layer-output error on held-out inputs of the calibration distribution
compared with plain k-means, never raise the error it minimises, keep verify()/second-run
contracts, and leave weights it cannot model (Conv, Gather) to plain k-means."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.check import run_onnxruntime
from graphopt.errors import GraphoptError, UsageError
from graphopt.ir import Model
from graphopt.passes.sharing import refit as rf
from graphopt.passes.sharing.kmeans import cluster_rows
from graphopt.transform import PassContext, get_pass

F = TensorProto.FLOAT


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def make(nodes, inputs, outputs, inits=(), *, opset=17) -> Model:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=[numpy_helper.from_array(a, n) for n, a in inits])
    return graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8))


def correlated(n: int, d: int, seed: int) -> np.ndarray:
    """Inputs whose features are strongly correlated (a few latent factors mixed into all of
    them) and of very different scales: H = E[x^T x] is far from diagonal."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).standard_normal((4, d)) * np.linspace(0.2, 3.0, d)
    return (rng.standard_normal((n, 4)) @ mix + 0.05 * rng.standard_normal((n, d))).astype(np.float32)


def two_layer(trans_b: bool = False) -> Model:
    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((48, 64)) / 7).astype(np.float32)
    w1 = (rng.standard_normal((32, 64) if trans_b else (64, 32)) / 8).astype(np.float32)
    second = (helper.make_node("Gemm", ["h", "W1"], ["y"], transB=1) if trans_b
              else helper.make_node("MatMul", ["h", "W1"], ["y"]))
    return make([helper.make_node("MatMul", ["x", "W0"], ["m"]), helper.make_node("Tanh", ["m"], ["h"]), second],
                [vi("x", ["n", 48])], [vi("y", ["n", 32])], [("W0", w0), ("W1", w1)])


def cluster(model: Model, ctx: PassContext | None = None, **options):
    out = model.clone()
    res = get_pass("cluster-weights")(**{"accuracy_budget": "none", **options}).run(out, ctx or PassContext())
    out.verify()
    return out, res.stats


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def scaled(n: int, seed: int) -> np.ndarray:
    """64 mixed features of which 8 carry nearly all the energy."""
    mix = np.random.default_rng(9).standard_normal((64, 64)) * 0.3 + np.eye(64)
    sig = np.where(np.arange(64) < 8, 10.0, 0.2)
    return ((np.random.default_rng(seed).standard_normal((n, 64)) @ mix) * sig).astype(np.float32)


def one_layer(trans_b: bool) -> Model:
    # the weights the big features multiply are small: plain k-means spends its entries on the
    # wide range of the weights that hardly matter
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 32)) * np.where(np.arange(64) < 8, 0.1, 1.0)[:, None]).astype(np.float32)
    node = (helper.make_node("Gemm", ["x", "W"], ["y"], transB=1) if trans_b else helper.make_node("MatMul", ["x", "W"], ["y"]))
    return make([node], [vi("x", ["n", 64])], [vi("y", ["n", 32])], [("W", np.ascontiguousarray(w.T) if trans_b else w)])


@pytest.mark.parametrize("trans_b,per_channel", [(False, False), (True, False), (False, True)])
def test_refit_lowers_the_output_error_on_held_out_inputs(trans_b, per_channel):
    m = one_layer(trans_b)
    calib, test = {"x": scaled(256, 1)}, {"x": scaled(256, 2)}
    y0 = run_onnxruntime(m, test)[0]
    plain, _ = cluster(m, bits=3, min_size=256, per_channel=per_channel)
    ctx = PassContext(data={"calibration-inputs": calib})
    refit, st_ = cluster(m, ctx, bits=3, min_size=256, per_channel=per_channel, refit="activations")
    assert st_["tensors-refit"] == 1 and st_["tensors-clustered"] == 1 and st_["W/per-channel"] == int(per_channel)
    assert st_["W/output-rel-l2"] <= st_["W/output-rel-l2-kmeans"] + 1e-12  # the error it minimises never grows
    e_plain = rel(run_onnxruntime(plain, test)[0], y0)
    e_refit = rel(run_onnxruntime(refit, test)[0], y0)
    assert e_refit < 0.6 * e_plain, (e_refit, e_plain)
    # a second run changes nothing (the decoded weights are no initializers any more)
    again = refit.clone()
    second = get_pass("cluster-weights")(bits=3, min_size=256, refit="activations", accuracy_budget="none").run(again, ctx)
    assert not second.changed and second.stats["tensors-clustered"] == 0


def test_least_squares_codebook_beats_kmeans_on_correlated_inputs():
    """With correlated inputs the output error depends on H's off-diagonal terms, which no
    per-weight importance sees: the refit (same indices) must lower tr(D^T H D)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 64)) / 7
    x = correlated(512, 48, 1).astype(np.float64)
    h = x.T @ x / len(x)
    cb, idx = cluster_rows(w.reshape(1, -1), 8, weights=np.broadcast_to(np.diag(h)[:, None], w.shape).reshape(1, -1))
    _, _, e0, e1 = rf.refit(w, h, cb, idx.reshape(w.shape), iters=2)
    assert e1 < 0.97 * e0, (e1, e0)  # measured: 0.95


def test_calibration_sources_agree(tmp_path):
    m = two_layer()
    calib = {"x": correlated(64, 48, 3)}
    path = tmp_path / "calib.npz"
    np.savez(path, **calib)
    _, a = cluster(m, bits=4, min_size=256, refit="activations", calibration=str(path))
    _, b = cluster(m, PassContext(data={"calibration": str(path)}), bits=4, min_size=256, refit="activations")
    _, c = cluster(m, PassContext(data={"calibration-inputs": calib}), bits=4, min_size=256, refit="activations")
    for w in ("W0", "W1"):
        assert a[f"{w}/output-rel-l2"] == pytest.approx(b[f"{w}/output-rel-l2"], rel=1e-6)
        assert a[f"{w}/output-rel-l2"] == pytest.approx(c[f"{w}/output-rel-l2"], rel=1e-3)


def test_conv_and_gather_weights_are_not_refit_but_still_clustered():
    rng = np.random.default_rng(4)
    m = make([helper.make_node("Conv", ["x", "Wc"], ["c"]), helper.make_node("Gather", ["E", "ids"], ["e"]),
              helper.make_node("MatMul", ["e", "Wm"], ["y"])],
             [vi("x", [2, 8, 6, 6]), vi("ids", [5], TensorProto.INT64)], [vi("c", None), vi("y", None)],
             [("Wc", rng.standard_normal((16, 8, 3, 3)).astype(np.float32)),
              ("E", rng.standard_normal((100, 32)).astype(np.float32)),
              ("Wm", rng.standard_normal((32, 40)).astype(np.float32))])
    feeds = {"x": rng.standard_normal((2, 8, 6, 6)).astype(np.float32), "ids": np.array([1, 5, 9, 50, 99], np.int64)}
    _, st_ = cluster(m, PassContext(data={"calibration-inputs": feeds}), bits=4, min_size=256, refit="activations")
    assert st_["tensors-clustered"] == 3 and st_["tensors-refit"] == 1 and "Wm/output-rel-l2" in st_
    assert "Wc/output-rel-l2" not in st_ and "E/output-rel-l2" not in st_


def test_token_mask_drops_padding_rows():
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    rows = rf._rows(a, mask)
    np.testing.assert_array_equal(rows, a.reshape(6, 4)[[0, 1, 3]])
    np.testing.assert_array_equal(rf._rows(a.reshape(6, 4), mask), rows)  # [batch*seq, d] as well
    assert rf._rows(a[:, :2], mask).shape == (4, 4)  # other leading shapes: every row counts
    m = make([helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Identity", ["attention_mask"], ["am"])],
             [vi("x", [2, 3, 4]), vi("attention_mask", [2, 3], TensorProto.INT64)], [vi("y", None), vi("am", None)],
             [("W", np.ones((4, 4), np.float32))])
    feeds = {"x": a, "attention_mask": mask}
    assert rf.token_mask(m, feeds, "auto") is mask and rf.token_mask(m, feeds, "none") is None
    (h, n), = rf.second_moments(m, ["x"], [feeds]).values()
    assert n == 3 and np.allclose(h, rows.T.astype(np.float64) @ rows)
    (h, n), = rf.second_moments(m, ["x"], [feeds], mask="none").values()
    assert n == 6


@settings(max_examples=25, deadline=None)
@given(n_in=st.integers(4, 24), n_out=st.integers(1, 20), bits=st.integers(2, 4), per_col=st.booleans(),
       seed=st.integers(0, 10_000))
def test_property_refit_never_raises_the_output_error(n_in, n_out, bits, per_col, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, n_out))
    x = rng.standard_normal((3 * n_in, n_in)) @ rng.standard_normal((n_in, n_in))
    h = x.T @ x / len(x)
    rows = w.T if per_col else w.reshape(1, -1)
    cb, idx = cluster_rows(rows, 1 << bits)
    idx = idx.T if per_col else idx.reshape(w.shape)
    cb2, idx2, e0, e1 = rf.refit(w, h, cb, idx, iters=2)
    assert e1 <= e0 * (1 + 1e-9) + 1e-12
    assert cb2.shape == cb.shape and np.all(np.diff(cb2, axis=1) >= 0) and idx2.max() < (1 << bits)
    assert rf.output_error(w, h, cb2, idx2) == pytest.approx(e1, rel=1e-9, abs=1e-12)


def test_channel_overhead_gives_per_channel_codebooks_only_where_cheap():
    rng = np.random.default_rng(5)
    m = make([helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("MatMul", ["e", "W"], ["y"])],
             [vi("ids", [5], TensorProto.INT64)], [vi("y", None)],
             [("E", (rng.standard_normal((4000, 8)) * np.arange(1, 9)).astype(np.float32)),
              ("W", rng.standard_normal((8, 512)).astype(np.float32))])
    _, st_ = cluster(m, bits=4, min_size=256, channel_overhead=0.05)
    # E: 8 codebooks of 16 floats (512 B) vs 16000 B of indices; W: 512 codebooks cost more than its 2 KB of indices
    assert st_["E/per-channel"] == 1 and st_["W/per-channel"] == 0
    _, st0 = cluster(m, bits=4, min_size=256)
    assert st0["E/per-channel"] == 0 and st_["E/rel-l2"] < st0["E/rel-l2"]


@pytest.mark.parametrize("options,exc", [
    ({"refit": "magic"}, UsageError), ({"refit_iters": -1}, UsageError), ({"channel_overhead": 1.5}, UsageError),
    ({"calibration_samples": 0}, UsageError),
])
def test_bad_options(options, exc):
    with pytest.raises(exc):
        get_pass("cluster-weights")(**{"accuracy_budget": "none", **options})


def test_refit_without_data_or_with_a_missing_file_is_a_clean_error(tmp_path):
    m = two_layer()
    with pytest.raises(UsageError, match="calibration"):
        cluster(m, bits=4, min_size=256, refit="activations")
    with pytest.raises(GraphoptError):
        cluster(m, bits=4, min_size=256, refit="activations", calibration=str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "wrong.npz", y=np.zeros((4, 48), np.float32))
    with pytest.raises(GraphoptError):
        cluster(m, bits=4, min_size=256, refit="activations", calibration=str(tmp_path / "wrong.npz"))


def test_pipeline_syntax(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, x=correlated(32, 48, 6))
    out = graphopt.optimize(two_layer(), "cluster-weights{accuracy-budget=none,bits=4,min-size=256,refit=activations,refit-iters=1,"
                                         f"token-mask=none,calibration-samples=16,calibration={path}}}")
    stats = out.meta["pass_timings"][-1].stats
    assert stats["tensors-refit"] == 2 and stats["W0/output-rel-l2"] <= stats["W0/output-rel-l2-kmeans"]


def test_subsampled_columns_estimate_the_exact_solve(monkeypatch):
    """One shared codebook: above _SOLVE_FLOPS, G and b come from a random subset of the output
    columns (at least 64); the codebook found stays close to the exact one, and the result is
    still never worse than the input."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((32, 400)) / 6
    x = correlated(256, 32, 4).astype(np.float64)[:, :32]
    h = x.T @ x / len(x)
    cb, idx = cluster_rows(w.reshape(1, -1), 8)
    idx = idx.reshape(w.shape)
    exact = rf._solve(w, h, h @ w, cb, idx, 1e-4)
    monkeypatch.setattr(rf, "_SOLVE_FLOPS", 32 * 32 * 8 * 100)  # 100 of the 400 columns
    approx = rf._solve(w, h, h @ w, cb, idx, 1e-4)
    assert not np.allclose(approx, exact, rtol=1e-9)  # the subset was used
    assert np.abs(approx - exact).max() < 0.1 * np.ptp(exact)
    _, _, e0, e1 = rf.refit(w, h, cb, idx, iters=2)
    assert e1 <= e0

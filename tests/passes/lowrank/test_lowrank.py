"""low-rank: fires on MatMul/Gemm/1x1 and k×k Conv with the counts and per-layer report, keeps
the outputs within the energy's bound through onnxruntime, leaves near-misses alone (non-constant
weights, ranks that would not cut FLOPs, layers under min-size, grouped convs, quantized or
clustered weights), a second run changes nothing, verify() holds, and the data-aware
factorization beats plain SVD at equal rank on correlated inputs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.check import run_onnxruntime
from graphopt.ir import Model
from graphopt.transform import PassContext, get_pass
from onnx_builders import model as make, vi

F = TensorProto.FLOAT


def t(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def lowrank_matrix(rng, k, n, r, noise=0.02):
    """A [k, n] matrix of rank r plus a little full-rank noise (energy 0.95 needs rank ~ r)."""
    w = rng.standard_normal((k, r)) @ rng.standard_normal((r, n)) / np.sqrt(k * r)
    return w + noise * rng.standard_normal((k, n)) / np.sqrt(k)


def mlp(seed=0) -> Model:
    """x[N,256] -> MatMul W0[256,192] + b0 -> Relu -> Gemm(W1[128,192], transB) -> Relu -> MatMul W2 (full rank)."""
    rng = np.random.default_rng(seed)
    inits = [t("W0", lowrank_matrix(rng, 256, 192, 16)), t("b0", rng.standard_normal(192) * 0.1),
             t("W1", lowrank_matrix(rng, 192, 128, 12).T), t("c1", rng.standard_normal(128) * 0.1),
             t("W2", rng.standard_normal((128, 96)) / np.sqrt(128))]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["m0"], name="fc0"), helper.make_node("Add", ["m0", "b0"], ["a0"]),
             helper.make_node("Relu", ["a0"], ["r0"]),
             helper.make_node("Gemm", ["r0", "W1", "c1"], ["g1"], name="fc1", transB=1, alpha=0.5),
             helper.make_node("Relu", ["g1"], ["r1"]), helper.make_node("MatMul", ["r1", "W2"], ["y"], name="fc2")]
    return make(nodes, [vi("x", ["N", 256])], [vi("y", ["N", 96])], inits)


def convnet(seed=0) -> Model:
    """3x3 conv (low-rank along channels), 1x1 conv (low-rank), depthwise conv, a tiny conv."""
    rng = np.random.default_rng(seed)
    w0 = lowrank_matrix(rng, 64, 32 * 9, 6).reshape(64, 32, 3, 3)
    w1 = lowrank_matrix(rng, 64, 64, 6).reshape(64, 64, 1, 1)
    inits = [t("W0", w0), t("B0", rng.standard_normal(64) * 0.1), t("W1", w1),
             t("Wd", rng.standard_normal((64, 1, 3, 3))), t("Wt", rng.standard_normal((4, 64, 1, 1)) * 0.1)]
    nodes = [helper.make_node("Conv", ["x", "W0", "B0"], ["c0"], name="conv3x3", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "W1"], ["c1"], name="conv1x1"),
             helper.make_node("Conv", ["c1", "Wd"], ["c2"], name="dw", group=64, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c2", "Wt"], ["y"], name="tiny")]
    return make(nodes, [vi("x", ["N", 32, 16, 16])], [vi("y", ["N", 4, 8, 8])], inits)


def lowrank(model: Model, **options):
    """low-rank on a copy: (new model, stats, log); checks verify() and that a second run is a no-op."""
    out = model.clone()
    ctx = PassContext()
    res = get_pass("low-rank")(**options).run(out, ctx)
    out.verify()
    again = out.clone()
    second = get_pass("low-rank")(**options).run(again, PassContext())
    assert not second.changed and second.stats["layers-factorized"] == 0
    assert graphopt.to_onnx(again).SerializeToString() == graphopt.to_onnx(out).SerializeToString()
    return out, res, ctx.log


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def ops(model: Model) -> list[str]:
    return [n.op_type for n in model.graph]


# --- fires ---------------------------------------------------------------------------------------
def test_matmul_and_gemm_factorize_with_counts_and_report():
    m = mlp()
    out, res, log = lowrank(m, energy=0.95)
    s = res.stats
    assert res.changed and s["layers-candidates"] == 3 and s["layers-factorized"] == 2
    assert s["layers-skipped-the-rank-the-energy"] == 1  # W2 is full rank: 0.95 needs > break-even
    assert ops(out).count("MatMul") == 4 and ops(out).count("Gemm") == 1
    assert 12 <= s["fc0/rank"] <= 24 and 8 <= s["fc1/rank"] <= 18
    assert s["fc0/max-rank"] == (256 * 192 - 1) // (256 + 192)
    assert s["fc0/flops-before"] == 2 * 256 * 192
    assert s["fc0/flops-after"] == 2 * s["fc0/rank"] * (256 + 192)
    assert s["flops-after"] < s["flops-before"] and s["params-after"] < s["params-before"]
    assert s["fc0/sqnr-db"] >= 10 * np.log10(1 / 0.05) - 1e-6  # white-input SQNR: at least the energy's
    assert any("plain SVD" in line for line in log)
    # W0 and W1 are gone, their factors are stored instead
    names = set(out.graph.initializers)
    assert "W0" not in names and "W1" not in names and "W2" in names
    # numbers: output error bounded by the energy (for this near-low-rank net: much below)
    x = np.random.default_rng(1).standard_normal((32, 256)).astype(np.float32)
    y0, y1 = run_onnxruntime(m, {"x": x})[0], run_onnxruntime(out, {"x": x})[0]
    assert rel(y1, y0) < np.sqrt(1 - 0.95)


def test_single_layer_error_is_bounded_by_energy():
    """One MatMul+Add, white inputs: relative output error <= sqrt(1 - energy) (+ sampling)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((200, 200)) * (0.85 ** np.arange(200))[None, :]  # decaying spectrum
    m = make([helper.make_node("MatMul", ["x", "W"], ["m"], name="fc"), helper.make_node("Add", ["m", "b"], ["y"])],
             [vi("x", ["N", 200])], [vi("y", ["N", 200])], [t("W", w), t("b", np.zeros(200))])
    x = rng.standard_normal((512, 200)).astype(np.float32)
    y0 = run_onnxruntime(m, {"x": x})[0]
    for energy in (0.8, 0.9, 0.99):
        out, res, _ = lowrank(m, energy=energy)
        assert res.stats["layers-factorized"] == 1
        e = rel(run_onnxruntime(out, {"x": x})[0], y0)
        assert e <= 1.15 * np.sqrt(1 - energy), (energy, e)
        assert e >= 0.3 * np.sqrt(1 - energy)  # and it really is truncated that far


def test_fixed_rank_and_rank_zero_means_energy():
    out, res, _ = lowrank(mlp(), rank=8)
    assert res.stats["fc0/rank"] == 8 and res.stats["fc1/rank"] == 8
    # rank 8 cuts FLOPs for the full-rank W2 too (break-even 54): the rank option overrides energy
    assert res.stats["layers-factorized"] == 3 and res.stats["fc2/rank"] == 8


def test_convs_channel_decomposition_through_onnxruntime():
    m = convnet()
    out, res, log = lowrank(m, energy=0.95, min_size=1024)
    s = res.stats
    assert s["layers-factorized"] == 2 and s["layers-skipped-grouped-or-depthwise-conv"] == 1
    assert s["layers-skipped-smaller-than-min-size"] == 1  # tiny: 4x64 = 256 < 1024
    convs = [n for n in out.graph if n.op_type == "Conv"]
    a3 = next(n for n in convs if n.name.startswith("conv3x3_lowrank_a"))
    assert a3.inputs[1].const_value.shape[1:] == (32, 3, 3) and list(a3.attr("strides")) == [2, 2]
    second = next(n for n in convs if n.name == "conv3x3")
    assert second.inputs[1].const_value.shape == (64, s["conv3x3/rank"], 1, 1) and second.attr("strides") is None
    assert s["conv3x3/flops-after"] < s["conv3x3/flops-before"] and s["conv1x1/rank"] <= 12
    x = np.random.default_rng(2).standard_normal((2, 32, 16, 16)).astype(np.float32)
    y0, y1 = run_onnxruntime(m, {"x": x})[0], run_onnxruntime(out, {"x": x})[0]
    assert rel(y1, y0) < np.sqrt(1 - 0.95)


# --- near-misses ---------------------------------------------------------------------------------
def test_near_misses_do_not_fire():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "x2"], ["d"], name="dynamic"),  # both operands activations
             helper.make_node("MatMul", ["d", "Wfull"], ["e"], name="fullrank"),  # rank at 0.95 > break-even
             helper.make_node("MatMul", ["e", "Wsmall"], ["y"], name="small")]  # 64*8 < min-size
    m = make(nodes, [vi("x", [64, 64]), vi("x2", [64, 64])], [vi("y", [64, 8])],
             [t("Wfull", rng.standard_normal((64, 64))), t("Wsmall", lowrank_matrix(rng, 64, 8, 1))])
    out = m.clone()
    res = get_pass("low-rank")().run(out, ctx := PassContext())
    assert not res.changed and res.stats["layers-factorized"] == 0
    assert res.stats["layers-skipped-weight-is-not-a"] == 1 and res.stats["layers-skipped-smaller-than-min-size"] == 1
    assert res.stats["layers-skipped-the-rank-the-energy"] == 1
    assert "nothing factorized" in res.note
    assert any("weight is not a constant" in line for line in ctx.log)
    assert ops(out) == ops(m) and set(out.graph.initializers) == set(m.graph.initializers)


def test_overridable_and_shared_weights_stay():
    rng = np.random.default_rng(0)
    w = lowrank_matrix(rng, 128, 128, 4)
    # W is an initializer that is also a graph input (IR >= 4: the caller may override it)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [vi("x", [2, 128]), vi("W", [128, 128])],
                          [vi("y", [2, 128])], initializer=[t("W", w)])
    m = graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    res = get_pass("low-rank")().run(m, PassContext())
    assert not res.changed and res.stats["layers-skipped-weight-is-not-a"] == 1
    shared = make([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])],
                  [vi("x", [2, 128])], [vi("y", [2, 128])], [t("W", w)])
    res = get_pass("low-rank")().run(shared, PassContext())
    assert not res.changed and res.stats["layers-skipped-weight-is-shared-with"] == 2


def test_after_quantize_and_cluster_says_why_and_composes_before():
    m = mlp()
    # low-rank, then cluster-weights and quantize: both run on the factors
    out, res, _ = lowrank(m)
    cl = out.clone()
    r2 = get_pass("cluster-weights")(bits=6, min_size=256).run(cl, PassContext())
    assert r2.changed and r2.stats["tensors-clustered"] >= 4
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    y0 = run_onnxruntime(m, {"x": x})[0]
    assert rel(run_onnxruntime(cl, {"x": x})[0], y0) < 0.3
    # cluster-weights first: low-rank leaves the decoded weights and says why
    c0 = m.clone()
    get_pass("cluster-weights")(bits=6, min_size=256).run(c0, PassContext())
    res = get_pass("low-rank")().run(c0, ctx := PassContext())
    assert not res.changed and res.stats["layers-skipped-weight-is-a-codebook"] == 3
    assert any("run low-rank before cluster-weights" in line for line in ctx.log)
    # quantize first: the DequantizeLinear weights are left alone
    q = m.clone()
    get_pass("quantize")(speed="off", mode="static").run(q, PassContext())
    res = get_pass("low-rank")().run(q, ctx := PassContext())
    # (a layer quantize kept float is still a candidate)
    assert res.stats["layers-skipped-weight-is-quantized-dequantizelinear"] >= 2
    assert any("run low-rank before quantize" in line for line in ctx.log)
    q.verify()
    assert rel(run_onnxruntime(q, {"x": x})[0], y0) < 0.3
    # low-rank then quantize runs and stays close
    q2 = out.clone()
    get_pass("quantize")(speed="off", mode="static").run(q2, PassContext())
    q2.verify()
    q1 = m.clone()
    get_pass("quantize")(speed="off", mode="static").run(q1, PassContext())
    e_q, e_l = rel(run_onnxruntime(q1, {"x": x})[0], y0), rel(run_onnxruntime(out, {"x": x})[0], y0)
    assert rel(run_onnxruntime(q2, {"x": x})[0], y0) <= 1.3 * (e_q + e_l)  # the errors add, no worse


def test_prune_after_low_rank_runs():
    m = mlp()
    out, _, _ = lowrank(m)
    res = get_pass("prune")(ratio=0.25).run(out, PassContext())
    out.verify()
    assert res.changed
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    assert run_onnxruntime(out, {"x": x})[0].shape == (4, 96)


# --- data-aware ----------------------------------------------------------------------------------
def correlated(rng, n, k, decay=0.9):
    """Inputs with strongly correlated features: z @ M, M's spectrum decaying."""
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    m = (q * (decay ** np.arange(k))[None, :]) @ q.T
    return (rng.standard_normal((n, k)) @ m + 0.3).astype(np.float32)


@pytest.mark.parametrize("refit", ["false", "true"])
def test_data_aware_beats_plain_svd_at_equal_rank(tmp_path, refit):
    rng = np.random.default_rng(5)
    k, n = 160, 160
    w = rng.standard_normal((k, n)) / np.sqrt(k)  # full rank: plain SVD has no easy cut
    m = make([helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"), helper.make_node("Add", ["h", "b"], ["a"]),
              helper.make_node("Relu", ["a"], ["r"]),
              helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")],
             [vi("x", ["N", k])], [vi("y", ["N", 64])], [t("W", w), t("b", rng.standard_normal(n) * 0.1),
                                                        t("W2", rng.standard_normal((n, 64)) / np.sqrt(n))])
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=correlated(np.random.default_rng(6), 2048, k))
    test = correlated(np.random.default_rng(7), 512, k)
    y0 = run_onnxruntime(m, {"x": test})[0]
    plain, rp, _ = lowrank(m, rank=20)
    aware, ra, log = lowrank(m, rank=20, calibration=str(calib), refit=refit, samples=2048, batch=256)
    assert rp.stats["fc/rank"] == ra.stats["fc/rank"] == 20 and ra.stats["layers-factorized"] == 2
    assert any("data-aware" in line for line in log)
    e_plain = rel(run_onnxruntime(plain, {"x": test})[0], y0)
    e_aware = rel(run_onnxruntime(aware, {"x": test})[0], y0)
    assert e_aware < 0.5 * e_plain, (e_aware, e_plain)
    # the reported SQNR is the layer output's on the calibration data: consistent with the test error
    h0 = test @ w
    assert ra.stats["fc/sqnr-db"] > rp.stats["fc/sqnr-db"]
    assert np.isfinite(h0).all()


def test_conv_data_aware_and_energy_on_output(tmp_path):
    m = convnet()
    rng = np.random.default_rng(8)
    x = rng.standard_normal((64, 32, 16, 16)).astype(np.float32)
    x = (x + np.roll(x, 1, axis=1)) / 2  # correlated channels
    calib = tmp_path / "c.npz"
    np.savez(calib, x=x)
    out, res, _ = lowrank(m, energy=0.95, min_size=1024, calibration=str(calib), batch=16, samples=64, refit="true")
    assert res.stats["layers-factorized"] == 2
    # the energy is the share of output kept on the calibration data: per-layer SQNR >= -10 log10(1 - E) (- the refit residual)
    assert res.stats["conv3x3/sqnr-db"] > 10 * np.log10(1 / 0.05) - 3
    xt = x[:4]
    assert rel(run_onnxruntime(out, {"x": xt})[0], run_onnxruntime(m, {"x": xt})[0]) < 0.25


def test_error_budget_picks_an_energy(tmp_path):
    m = mlp()
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(9).standard_normal((64, 256)).astype(np.float32))
    out, res, log = lowrank(m, error_budget="rel:0.05", calibration=str(calib))
    e = res.stats["energy"]
    assert 0.5 <= e <= 0.999 and res.stats["budget-trials"] >= 2
    x = np.random.default_rng(9).standard_normal((64, 256)).astype(np.float32)
    assert rel(run_onnxruntime(out, {"x": x})[0], run_onnxruntime(m, {"x": x})[0]) <= 0.05
    assert any("error-budget" in line for line in log)


def test_speed_measure_reports_speedups():
    out, res, _ = lowrank(mlp(), energy=0.9, speed="measure", min_speedup=0.0)
    assert res.stats["layers-factorized"] == 2 and res.stats["fc0/speedup"] > 0
    _, res2, log = lowrank(mlp(), energy=0.9, speed="measure", min_speedup=100.0)
    assert res2.stats["layers-factorized"] == 0 and any("speed=measure" in line for line in log)


def test_bad_options():
    from graphopt.errors import UsageError
    from graphopt.transform import parse_pipeline

    for spec in ("low-rank{energy=1.5}", "low-rank{refit=maybe}", "low-rank{speed=fast}", "low-rank{rank=4,error-budget=rel:0.1}",
                 "low-rank{error-budget=foo:1}"):
        with pytest.raises(UsageError):
            parse_pipeline(spec)


def test_cli_prints_the_per_layer_table(tmp_path, capsys):
    from graphopt.cli import main

    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"
    graphopt.save(mlp(), str(src))
    code = main([str(src), "-o", str(dst), "--passes", "low-rank{energy=0.95}"])
    out = capsys.readouterr()
    assert code == 0 and dst.exists()
    text = out.out + out.err
    assert "fc0" in text and "flops-after" in text and "sqnr-db" in text
    code = main([str(src), "-o", str(dst), "--passes", "low-rank{energy=2}"])
    assert code == 2


@pytest.mark.parametrize("k, n", [(96, 32), (40, 24), (32, 96), (64, 64)])
def test_whitened_factors_do_not_depend_on_the_route(k, n):
    """Fewer outputs than inputs take the N x N route (Tᵀ Σ T, no Σ^½): the same singular values
    and factors as the whitened SVD through Σ^½, to rounding."""
    from graphopt.passes.lowrank import factor as fa

    rng = np.random.default_rng(k * 1000 + n)
    x = rng.standard_normal((500, k)) @ rng.standard_normal((k, k)) * 0.3 + 1.0
    cov = np.cov(x.T, bias=True)
    w = rng.standard_normal((k, n))
    left, s, vt = fa._right_side(cov, w)
    sq, inv = fa._sqrt_psd(cov)
    u, s2, vt2 = fa.svd(sq @ w)
    r = max(1, min(k, n) // 3)
    f1 = fa.truncate(fa.Whitened(left, s, vt, None, None), r)
    f2 = fa.truncate(fa.Whitened(inv @ u, s2, vt2, None, None), r)
    np.testing.assert_allclose(s[:r], s2[:r], rtol=1e-10)
    np.testing.assert_allclose(f1.a @ f1.b, f2.a @ f2.b, atol=1e-10 * np.abs(w).max())


def sublayer(seed=0) -> Model:
    """A transformer output projection: x[N,16,64] -> MatMul W[64,64] (rank ~16) + b -> residual Add
    x -> LayerNormalization -> times the attention_mask."""
    rng = np.random.default_rng(seed)
    inits = [t("W", lowrank_matrix(rng, 64, 64, 16, noise=0.05)), t("b", rng.standard_normal(64) * 0.1),
             t("g", np.linspace(0.5, 1.5, 64)), t("beta", np.zeros(64)), helper.make_tensor("ax", TensorProto.INT64, [1], [-1])]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="proj"), helper.make_node("Add", ["m", "b"], ["y"]),
             helper.make_node("Add", ["y", "x"], ["r"]),
             helper.make_node("LayerNormalization", ["r", "g", "beta"], ["ln"], axis=-1),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=F), helper.make_node("Unsqueeze", ["mf", "ax"], ["mu"]),
             helper.make_node("Mul", ["ln", "mu"], ["out"])]
    return make(nodes, [vi("x", ["N", 16, 64]), helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", 16])],
                [vi("out", ["N", 16, 64])], inits)


def outlier_sentences(rng, count) -> dict[str, np.ndarray]:
    """10 real tokens of 16; the first carries one huge dim (a [CLS]/[SEP]-like outlier token
    that its LayerNorm divides away)."""
    x = rng.standard_normal((count, 16, 64)).astype(np.float32)
    x[:, 0, 0] = 300.0
    mask = np.zeros((count, 16), np.int64)
    mask[:, :10] = 1
    return {"x": x, "attention_mask": mask}


def test_data_aware_weighs_tokens_by_their_layernorm(tmp_path):
    """The energy of a layer whose output reaches a LayerNorm is measured where the network sees
    it: rows weigh 1/σ_t² of the norm's input. Unweighted, the outlier token's one huge dim took
    most of the input covariance, so a low rank kept 99 % of the 'energy' and lost the ordinary
    tokens (MiniLM energy 0.99: FFN output layer 0 at rank 18, embedding cosine 0.88)."""
    rng = np.random.default_rng(0)
    m = sublayer()
    calib = tmp_path / "calib.npz"
    np.savez(calib, **outlier_sentences(rng, 32))
    out, res, _ = lowrank(m, energy=0.99, calibration=str(calib))
    assert res.stats["layers-factorized"] == 1 and res.stats["proj/rank"] >= 12
    test = outlier_sentences(np.random.default_rng(1), 16)
    keep = test["attention_mask"] != 0
    ref, got = run_onnxruntime(m, test)[0][keep], run_onnxruntime(out, test)[0][keep]
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    assert cos.min() > 0.99, cos.min()

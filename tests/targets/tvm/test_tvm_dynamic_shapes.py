"""Symbolic dims beyond the batch (H, W, sequence length) on the cpu target: one artifact, every size.

Each model is compiled once with its dims symbolic, then run at several sizes and compared with
onnxruntime; the manifest's `dims` entry and graphopt.runtime's checks of it (multiple, minimum)
are asserted, and so is graphopt-run's exit code 2 on a size the artifact cannot take. Models come
from tools/dynamic_models.py. Skipped cleanly when apache-tvm is not installed.
"""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.errors import UsageError  # noqa: E402

from paths import ROOT  # noqa: E402

_spec = importlib.util.spec_from_file_location("dynamic_models_under_test", ROOT / "tools" / "dynamic_models.py")
dm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dm)  # type: ignore[union-attr]


def _ort(m: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _check(art: graphopt.Artifact, m: onnx.ModelProto, feeds: dict, tol: float = 2e-5) -> list[np.ndarray]:
    got = art.run(feeds)
    want = _ort(m, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    return got


def _x(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def detector() -> onnx.ModelProto:
    return dm.detector()


@pytest.fixture(scope="module")
def detector_blocked(detector: onnx.ModelProto) -> graphopt.Artifact:
    return graphopt.compile(detector, "cpu", "-O2", threads=1)


SIZES = [(1, 3, 64, 64), (1, 3, 96, 128), (1, 3, 160, 96), (2, 3, 32, 40)]


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_detector_one_artifact_every_size(detector, detector_blocked, shape):
    """Stride-2 convs, BN/Relu, MaxPool, a depthwise conv, Resize x2 (nearest, linear), Concat of
    skip connections, GlobalAveragePool: one library, outputs equal onnxruntime's at each size."""
    prob, cls = _check(detector_blocked, detector, {"image": _x(shape)})
    assert prob.shape == (shape[0], 1, shape[2] // 2, shape[3] // 2) and cls.shape == (shape[0], 10)


def test_detector_manifest_dims_and_blocked_roles(detector_blocked):
    m = detector_blocked.manifest
    sym = m["dims"]["symbolic"]
    assert set(sym) == {"N", "H", "W"}
    # the upsampled maps meet their skip connections 8x down: H and W re-expressed as 8 * H_8
    assert sym["H"]["multiple"] == 8 and sym["W"]["multiple"] == 8 and sym["N"]["multiple"] == 1
    assert sym["H"]["min"] == 8 and "Concat" in sym["H"]["why"]
    k = m["kernels"]
    assert k["blocked"] >= 8 and k["block"] in (8, 16) and not k["inline"]
    assert "winograd_symbolic" not in k and k["winograd"] == {"2": 3}  # 3x3 s1 convs >= 32 ch: F(2x2) on symbolic maps
    warnings = detector_blocked.report["warnings"]
    assert any("multiple of 8" in w for w in warnings) and not any("Winograd" in w for w in warnings)


@pytest.mark.parametrize("shape,msg", [((1, 3, 100, 64), "multiple of 8"), ((1, 3, 64, 36), "multiple of 8"),
                                       ((1, 3, 0, 64), "at least 8")])
def test_detector_runtime_constraints(detector_blocked, shape, msg):
    with pytest.raises(UsageError, match=msg) as e:
        detector_blocked.run({"image": np.zeros(shape, np.float32)})
    assert "\n" not in str(e.value)


def test_graphopt_run_exit_2_on_a_size_it_cannot_take(detector_blocked, tmp_path, capsys):
    from graphopt.run_cli import main

    path = detector_blocked.save(str(tmp_path / "det"))
    assert main([path, "--dim", "H=64", "--dim", "W=96"]) == 0
    capsys.readouterr()
    assert main([path, "--dim", "H=60", "--dim", "W=96"]) == 2
    err = capsys.readouterr().err
    assert "multiple of 8" in err and len(err.strip().splitlines()) == 1
    # without --dim, random inputs take the smallest sizes the artifact accepts (H = W = 8, not 1)
    assert main([path]) == 0, capsys.readouterr().err


def test_detector_nchw_layout(detector):
    art = graphopt.compile(detector, "cpu{layout=nchw}", "-O2", threads=1)
    assert art.manifest["kernels"]["blocked"] == 0
    for shape in SIZES[:3]:
        _check(art, detector, {"image": _x(shape, 1)})


def _classifier() -> onnx.ModelProto:
    """Conv 7x7 s2 -> MaxPool 3 s2 -> conv -> GlobalAveragePool: no maps meet again, so any size
    the windows fit (no multiple)."""
    rng = np.random.default_rng(3)
    inits = [nh.from_array((rng.standard_normal((16, 3, 7, 7)) * 0.1).astype(np.float32), "w1"),
             nh.from_array((rng.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32), "w2"),
             nh.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "b2")]
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[7, 7], strides=[2, 2], pads=[3, 3, 3, 3]),
             h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2]),
             h.make_node("Conv", ["p1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             h.make_node("GlobalAveragePool", ["c2"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, "H", "W"])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [1, 16, 1, 1])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_classifier_any_size_no_multiple():
    m = _classifier()
    art = graphopt.compile(m, "cpu", "-O2", threads=1)
    sym = art.manifest["dims"]["symbolic"]
    assert sym["H"]["multiple"] == 1 and sym["W"]["multiple"] == 1
    # the 7x7 stride-2 conv (pads 3) gives (H - 1) // 2 + 1 rows: 3, what the 3x3 pool needs, from H = 5
    assert sym["H"]["min"] == 5 and sym["W"]["min"] == 5
    for shape in [(1, 3, 65, 77), (1, 3, 5, 5), (1, 3, 224, 31)]:
        _check(art, m, {"x": _x(shape, 2)})
    with pytest.raises(UsageError, match="at least 5"):
        art.run({"x": np.zeros((1, 3, 4, 9), np.float32)})
    # the runner skips the check for the shapes it last accepted, never for a refused one
    with pytest.raises(UsageError, match="at least 5"):
        art.run({"x": np.zeros((1, 3, 4, 9), np.float32)})
    _check(art, m, {"x": _x((1, 3, 5, 5), 3)})
    _check(art, m, {"x": _x((1, 3, 5, 5), 4)})
    with pytest.raises(UsageError, match="at least 5"):
        art.run({"x": np.zeros((1, 3, 5, 4), np.float32)})


def _resize_model(mode: str, ctm: str, nearest: str, scale: float | None, sizes: list[int] | None) -> onnx.ModelProto:
    inits = []
    ins = ["x", ""]
    if scale is not None:
        inits.append(nh.from_array(np.array([1, 1, scale, scale], np.float32), "scales"))
        ins.append("scales")
    else:
        inits.append(nh.from_array(np.array(sizes, np.int64), "sizes"))
        ins += ["", "sizes"]
    attrs = {"mode": mode, "coordinate_transformation_mode": ctm}
    if mode == "nearest":
        attrs["nearest_mode"] = nearest
    g = h.make_graph([h.make_node("Resize", ins, ["y"], **attrs)], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT, [1, 2, "H", "W"])],
                     [h.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("mode,ctm,nearest,scale,sizes", [
    ("nearest", "asymmetric", "floor", 2.0, None),
    ("nearest", "half_pixel", "round_prefer_floor", 2.0, None),
    ("nearest", "half_pixel", "round_prefer_ceil", 0.5, None),
    ("nearest", "align_corners", "ceil", 1.5, None),
    ("linear", "half_pixel", "", 2.0, None),
    ("linear", "pytorch_half_pixel", "", 0.5, None),
    ("linear", "align_corners", "", 3.0, None),
    ("linear", "asymmetric", "", None, [1, 2, 12, 20]),
    ("cubic", "half_pixel", "", 2.0, None),  # (the run-time kernels)
])
def test_resize_of_symbolic_maps(mode, ctm, nearest, scale, sizes):
    m = _resize_model(mode, ctm, nearest, scale, sizes)
    art = graphopt.compile(m, "cpu{layout=nchw}", "-O0", threads=1)
    for shape in [(1, 2, 6, 8), (1, 2, 7, 5), (1, 2, 1, 13)]:
        _check(art, m, {"x": _x(shape, 4)}, tol=1e-5)


def test_encoder_symbolic_sequence_length():
    """A pre-LN encoder whose head split is Shape/Gather/Concat/Reshape arithmetic on [N, S, 64]."""
    m = dm.encoder()
    art = graphopt.compile(m, "cpu", "-O2", threads=1)
    sym = art.manifest["dims"]["symbolic"]
    assert set(sym) == {"N", "S"} and all(d["multiple"] == 1 for d in sym.values())
    assert not art.manifest["kernels"]["inline"]
    # the projections' rows are S, the S x S scores' rows and columns: OuterProduct (whole tiles,
    # the last shifted back to end at S), not WindowReduction's or dlight's generic schedules
    rules = art.manifest["schedules"]["rules"]
    assert rules.get("outer-product", 0) >= 6 and "symbolic-columns" not in rules, rules
    assert "dlight-reduction" not in rules
    with_knob_off = graphopt.compile(m, "cpu{schedule-knobs=PAD_SYMBOLIC_ROWS:0;SHIFT_SYMBOLIC_TILES:0}", "-O2", threads=1)
    assert with_knob_off.manifest["schedules"]["rules"].get("symbolic-columns", 0) >= 1
    for shape in [(1, 7, 64), (2, 33, 64), (1, 128, 64), (1, 1, 64)]:
        _check(art, m, {"x": _x(shape, 5)}, tol=1e-4)


@pytest.mark.parametrize("mcpu", [None, "haswell"], ids=["host", "haswell"])
def test_encoder_attention_and_projections_take_shifted_tiles(mcpu, monkeypatch):
    """encoder_dyn on [N, S, 64]: its matmuls over S (the q/k/v/output projections and the FFN
    [N, S, K] x [K, C], the scores [N, 4, S, 16] x [N, 4, 16, S], the values [N, 4, S, S] x
    [N, 4, S, 16]) run whole register tiles over the unpadded operands, shifted at S's end
    (outer_product._schedule_shifted: no `_pad` copies, tile loops marked for loop_marks); equal to
    onnxruntime at S = 5, 16, 77 and 2 x 128 (and 3 x 33), on the host's machine model and AVX2."""
    from graphopt.targets.tvm import schedules as S
    from graphopt.targets.tvm.schedules.loop_marks import PEEL_BOUND
    from graphopt.targets.machine import machine_model, missing_features

    m = dm.encoder()
    target = "cpu" if mcpu is None else f"cpu{{mcpu={mcpu}}}"
    if mcpu is not None and missing_features(machine_model(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))):
        pytest.skip(f"this host does not run {mcpu} code")
    real = S.apply_default_schedules
    scheduled: dict[str, str] = {}

    def spy(mod, tgt, stats=None, **kw):
        out = real(mod, tgt, stats=stats, **kw)
        for gv, f in out.functions_items():
            if isinstance(f, tvm.tirx.PrimFunc):
                scheduled[gv.name_hint] = f.script()
        return out

    monkeypatch.setattr(S, "apply_default_schedules", spy)
    art = graphopt.compile(m, target, "-O2", threads=2)
    shifted = [k for k, t in scheduled.items() if PEEL_BOUND in t]
    matmuls = [k for k, t in scheduled.items() if "matmul" in t]
    assert len(shifted) >= 6 and set(shifted) == set(matmuls), (shifted, matmuls)
    assert not any("_pad" in scheduled[k] for k in shifted)
    for shape in [(1, 5, 64), (1, 16, 64), (1, 77, 64), (2, 128, 64), (3, 33, 64)]:
        _check(art, m, {"x": _x(shape, 6)}, tol=1e-4)


def test_fixed_shapes_unchanged(detector):
    """--input-shape still pins every dim: no symbolic dims, Winograd back on the 3x3 convs."""
    art = graphopt.compile(detector, "cpu", "-O2", threads=1, input_shapes={"image": (1, 3, 64, 64)})
    assert art.manifest["dims"]["symbolic"] == {}
    assert art.manifest["kernels"]["winograd"] and "winograd_symbolic" not in art.manifest["kernels"]
    _check(art, detector, {"image": _x((1, 3, 64, 64))})


# --- recurrences over a symbolic length (kernels.recurrent: one kernel looping over time) -------------


def test_crnn_symbolic_width():
    """Conv + MaxPool + BiLSTM over W/4 + classifier: compiled once, 3 widths equal onnxruntime;
    the LSTM is one looping kernel (its group inline in main, said so), not unrolled."""
    m = dm.crnn()
    art = graphopt.compile(m, "cpu", "-O2", threads=1)
    assert set(art.manifest["dims"]["symbolic"]) == {"N", "W"}
    kernels = {k["kernel"] for k in art.manifest["kernel_map"]}
    assert "lstm_recurrence" in kernels
    assert any("hand-written kernel" in why for why in art.manifest["kernels"]["inline"].values())
    for w in (36, 160, 320):
        probs, = _check(art, m, {"line": _x((1, 3, 32, w), w)})
        assert probs.shape == (w // 4, 1, 20)
    _check(art, m, {"line": _x((3, 3, 32, 64), 9)})  # a batch of 3 lines


def _scheduled_kernels(monkeypatch, m: onnx.ModelProto, target: str, **kw) -> tuple[graphopt.Artifact, dict[str, str]]:
    """`m` compiled for `target`, and the TVMScript of each scheduled PrimFunc by name."""
    from graphopt.targets.tvm import schedules as S

    real = S.apply_default_schedules
    scheduled: dict[str, str] = {}

    def spy(mod, tgt, stats=None, **skw):
        out = real(mod, tgt, stats=stats, **skw)
        scheduled.update({gv.name_hint: f.script() for gv, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc)})
        return out

    monkeypatch.setattr(S, "apply_default_schedules", spy)
    return graphopt.compile(m, target, "-O2", threads=2, **kw), scheduled


def test_crnn_small_windows_serial_branch_and_flat_projection_rows(monkeypatch):
    """crnn_dyn on [N, 3, 32, W], 2 threads: (a) its three blocked max pools (symbolic W) get the
    run-time serial branch (`if <work under the machine's serial limits>: serial else: parallel`,
    knob SERIAL_SMALL_WINDOWS) while its blocked / Winograd convs keep one parallel nest (near
    miss: `_NO_SERIAL_BRANCH`), and a fixed width gets no branch at all; (b) the LSTM's input
    projection is one matmul over a single symbolic row count `rec_rows` (= T*N, zero-copy
    reshapes around it) with shifted 8-row register tiles, not [T, N, 32] x [32, 256] with two
    symbolic row axes (knob FLAT_RECURRENT_ROWS); (c) its blocked convs on symbolic maps keep the
    input block's `ii` loop a loop (SYMBOLIC_CONV_II_LOOP), the fixed-width ones unroll it as
    before. The knobs off give the kernels from before.
    Outputs equal onnxruntime's at W = 36, 64, 160 and a batch of 3, either way (the target's
    machine model: the host's, or GRAPHOPT_CPU_MCPU's)."""
    from graphopt.targets.tvm.schedules.loop_marks import PEEL_BOUND, PEEL_LAST

    m = dm.crnn()
    art, k = _scheduled_kernels(monkeypatch, m, "cpu")
    pools = {n: t for n, t in k.items() if "maxpool_blocked" in t}
    convs = {n: t for n, t in k.items() if "conv2d_blocked" in t or "conv2d_stem" in t or "winograd" in t.lower()}
    assert len(pools) == 3 and len(convs) >= 3, (sorted(pools), sorted(convs))
    for n, t in pools.items():
        body = t.split("else:")
        assert len(body) == 2 and "T.parallel(" not in body[0].split("    if ", 1)[-1] and "T.parallel(" in body[1], n
    assert not any("else:" in t for t in convs.values())
    blocked = [t for t in convs.values() if "conv2d_blocked_update" in t or "winograd_gemm_update" in t]  # (not the stem: no `ii`)
    assert len(blocked) >= 2 and not any("for ii in T.unroll(" in t for t in blocked)  # (SYMBOLIC_CONV_II_LOOP)
    proj = [n for n, t in k.items() if "rec_rows" in t]  # (the reshapes around it are views, no kernels)
    assert len(proj) == 1 and "matmul" in k[proj[0]] and f'"{PEEL_BOUND}": "rec_rows"' in k[proj[0]], proj
    rows = re.findall(rf'"{PEEL_LAST}": (\d+)', k[proj[0]])
    assert rows and min(int(r) for r in rows) >= 4, rows  # (register tiles of several rows: 8 on AVX-512, 6 on AVX2)

    off, k_off = _scheduled_kernels(monkeypatch, m, "cpu{schedule-knobs=SERIAL_SMALL_WINDOWS:0;FLAT_RECURRENT_ROWS:0;"
                                                     "SYMBOLIC_CONV_II_LOOP:0}")
    assert not any("else:" in t for t in k_off.values() if "maxpool_blocked" in t)
    assert sum("for ii in T.unroll(" in t for t in k_off.values() if "conv2d_blocked_update" in t or "winograd_gemm_update" in t) >= 2
    assert not any("rec_rows" in t for t in k_off.values())

    _, k_fix = _scheduled_kernels(monkeypatch, m, "cpu", input_shapes={"line": (1, 3, 32, 64)})
    assert not any("else:" in t for t in k_fix.values() if "maxpool_blocked" in t)
    assert any("for ii in T.unroll(" in t for t in k_fix.values() if "conv2d_blocked_update" in t)  # (fixed shapes: as before)
    for a in (art, off):
        for shape, seed in (((1, 3, 32, 36), 1), ((1, 3, 32, 64), 2), ((1, 3, 32, 160), 3), ((3, 3, 32, 64), 4)):
            _check(a, m, {"line": _x(shape, seed)}, tol=1e-5)


def _rnn(op: str, direction: str, layout: int = 0, lens: bool = False, **attrs) -> onnx.ModelProto:
    g, hid, i_sz = {"LSTM": 4, "GRU": 3, "RNN": 1}[op], 8, 5
    d = 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(7)
    inits = [nh.from_array((rng.standard_normal((d, g * hid, i_sz)) * 0.4).astype(np.float32), "W"),
             nh.from_array((rng.standard_normal((d, g * hid, hid)) * 0.4).astype(np.float32), "R"),
             nh.from_array((rng.standard_normal((d, 2 * g * hid)) * 0.2).astype(np.float32), "B")]
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    ins = ["x", "W", "R", "B"] + (["lens"] if lens else [])
    node = h.make_node(op, ins, outs, hidden_size=hid, direction=direction, layout=layout, **attrs)
    xs = ["T", "N", i_sz] if not layout else ["N", "T", i_sz]
    inputs = [h.make_tensor_value_info("x", TP.FLOAT, xs)] + ([h.make_tensor_value_info("lens", TP.INT32, ["N"])] if lens else [])
    gr = h.make_graph([node], "g", inputs, [h.make_tensor_value_info(o, TP.FLOAT, None) for o in outs], inits)
    m = h.make_model(gr, opset_imports=[h.make_opsetid("", 14)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("op,direction,layout,lens,attrs", [
    ("LSTM", "bidirectional", 0, False, {}),
    ("LSTM", "reverse", 1, True, {"clip": 0.7}),
    ("GRU", "bidirectional", 0, True, {"linear_before_reset": 0}),
    ("GRU", "forward", 1, False, {"linear_before_reset": 1}),
    ("RNN", "bidirectional", 0, False, {"activations": ["Relu", "Tanh"]}),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_recurrence_symbolic_length_and_batch(op, direction, layout, lens, attrs):
    m = _rnn(op, direction, layout, lens, **attrs)
    ref = _rnn(op, direction, 0, lens, **attrs)  # (onnxruntime runs layout 0 only: batch-major compared transposed)
    art = graphopt.compile(m, "cpu", "-O2", threads=1)
    for t, n in ((1, 1), (6, 3), (13, 2)):
        feeds = {"x": _x((t, n, 5), t)}
        if lens:
            feeds["lens"] = np.random.default_rng(t).integers(1, t + 1, n).astype(np.int32)
        want = _ort(ref, feeds)
        if layout:
            feeds["x"] = feeds["x"].transpose(1, 0, 2).copy()
            want = [want[0].transpose(2, 0, 1, 3)] + [w.transpose(1, 0, 2) for w in want[1:]]
        got = art.run(feeds)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


# --- shape buckets (targets/shape_buckets.py) -----------------------------------------------------


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    art = graphopt.compile(_classifier(), "cpu{buckets=H:32,48;W:40}", "-O2", threads=1)
    return art, art.save(str(tmp_path_factory.mktemp("bk") / "art"))


def test_buckets_exact_dispatch_equal_onnxruntime(bucketed):
    """Sizes equal to a bucket run its specialised library, any other the symbolic one: all equal
    onnxruntime at the true size; the manifest lists the buckets and why inputs are not padded."""
    art, path = bucketed
    m = _classifier()
    b = art.manifest["buckets"]
    assert b["dims"] == ["H", "W"] and b["dispatch"] == "exact"
    assert [e["sizes"] for e in b["entries"]] == [{"H": 32, "W": 40}, {"H": 48, "W": 40}]
    # (its second conv reads the first one's border, and the global pool averages over the padding)
    assert "padding is not exact" in b["padding"] and "Conv -> 'c2'" in b["padding"]
    assert all(e["manifest"]["dims"]["symbolic"] == {} for e in b["entries"])
    r = graphopt.Artifact(path).runner(threads=1)
    for shape, used in [((1, 3, 32, 40), "bucket H=32 W=40"), ((1, 3, 48, 40), "bucket H=48 W=40"),
                        ((1, 3, 40, 40), "symbolic kernels (no bucket for H=40 W=40)"),
                        ((1, 3, 32, 41), "symbolic kernels (no bucket for H=32 W=41)")]:
        x = {"x": _x(shape, shape[2] + shape[3])}
        got, want = r.run(x), _ort(m, x)
        np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=2e-5)
        assert r.last_dispatch.startswith(used), r.last_dispatch
        assert r.benchmark(x, repeat=2)["p50_ms"] > 0 and r.last_dispatch.startswith(used)
    with pytest.raises(UsageError, match="at least 5"):  # the symbolic library's checks still apply
        r.run({"x": np.zeros((1, 3, 4, 40), np.float32)})


def test_buckets_graphopt_run_says_which(bucketed, capsys):
    from graphopt.run_cli import main

    _, path = bucketed
    assert main([path, "--dim", "H=48", "--dim", "W=40"]) == 0
    assert "shape: bucket H=48 W=40 (specialised kernels)" in capsys.readouterr().out
    assert main([path, "--dim", "H=47", "--dim", "W=40"]) == 0
    assert "shape: symbolic kernels (no bucket for H=47 W=40)" in capsys.readouterr().out


@pytest.mark.parametrize("spec,msg", [
    ("H", "is not DIM:SIZE"), ("H:32,abc", "size 'abc' of H"), ("H:0", "size '0' of H"), ("H:;W:40", "H has no sizes"),
    ("H:32;H:48", "dim H given twice"), ("H:1,2,3,4,5;W:1,2,3,4", "20 combinations"),
    ("Q:32", "Q is not a symbolic input dim"),
])
def test_bad_bucket_specs_one_line(spec, msg):
    with pytest.raises(UsageError, match=msg) as e:
        graphopt.compile(_classifier(), f"cpu{{buckets={spec}}}", "-O0", threads=1)
    assert "\n" not in str(e.value)


def test_bucket_size_the_model_cannot_take(detector):
    with pytest.raises(UsageError, match="H=100 is not a multiple of 8") as e:
        graphopt.compile(detector, "cpu{layout=nchw,buckets=H:100;W:64}", "-O0", threads=1)
    assert "\n" not in str(e.value)


def test_padding_to_a_bucket_is_not_exact(detector):
    """Why buckets dispatch by exact size: the detector run on an input zero-padded from 56 to 64
    rows, cropped, differs from its true-size result near the border (the second conv reads the
    first one's non-zero border); the manifest's note names that conv."""
    x = _x((1, 3, 56, 64), 3)
    padded = np.zeros((1, 3, 64, 64), np.float32)
    padded[:, :, :56] = x
    true_prob = _ort(detector, {"image": x})[0]
    pad_prob = _ort(detector, {"image": padded})[0][:, :, :28]
    err = np.abs(true_prob - pad_prob).max(axis=(0, 1, 3))
    assert err[:10].max() < 1e-5 and err[-4:].min() > 1e-3  # rows far from the border agree, the last ones do not
    from graphopt.targets.shape_buckets import padding_note

    note = padding_note(graphopt.load(detector), ["H"])
    assert "Conv" in note and "reads the padded border" in note


def test_shape_buckets_flag_is_the_target_option(tmp_path, capsys):
    """`graphopt-compile --target cpu --shape-buckets 'H:32;W:40'` builds the same buckets as
    `cpu{buckets=...}` (other target options kept); with another target, or with both spellings,
    exit 2 in one line."""
    import json

    from graphopt.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(_classifier(), str(src))
    out = tmp_path / "art"
    assert main([str(src), "-o", str(out), "-q", "-O1", "--target", "cpu{layout=auto}", "--threads", "1", "--shape-buckets", "H:32;W:40"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["sizes"] for e in manifest["buckets"]["entries"]] == [{"H": 32, "W": 40}]
    capsys.readouterr()
    for target in ("onnx", "cpu{buckets=H:32;W:40}"):
        assert main([str(src), "-o", str(tmp_path / "x"), "--target", target, "--shape-buckets", "H:32;W:40"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--shape-buckets" in err and "\n" not in err


def test_lstm_zero_state_from_a_runtime_shape():
    """PyTorch exports an LSTM's zero initial state as ConstantOfShape(Concat([2], batch, [H]))
    with `batch` read by Shape/Gather from the input: that group's only tie to `batch` is the
    shape value, so the kernel takes it as a shape argument (its output's shape was erased to
    rank 3, and `call_tir` refused it: the trained OCR recognizer did not compile). Symbolic batch
    and length, bidirectional, equal to onnxruntime at three sizes."""
    hid, feat = 8, 6
    rng = np.random.default_rng(3)
    w = nh.from_array((rng.standard_normal((2, 4 * hid, feat)) * 0.3).astype(np.float32), "w")
    r = nh.from_array((rng.standard_normal((2, 4 * hid, hid)) * 0.3).astype(np.float32), "r")
    b = nh.from_array((rng.standard_normal((2, 8 * hid)) * 0.1).astype(np.float32), "b")
    consts = [nh.from_array(np.array(v, np.int64), n) for v, n in
              (([2], "two"), ([hid], "hid"), (1, "one"))]
    nodes = [
        h.make_node("Shape", ["x"], ["shp"]),
        h.make_node("Gather", ["shp", "one"], ["bsz"], axis=0),
        h.make_node("Unsqueeze", ["bsz", "zero_axes"], ["bsz1"]),
        h.make_node("Concat", ["two", "bsz1", "hid"], ["state_shape"], axis=0),
        h.make_node("ConstantOfShape", ["state_shape"], ["zeros"], value=nh.from_array(np.zeros(1, np.float32))),
        h.make_node("LSTM", ["x", "w", "r", "b", "", "zeros", "zeros"], ["y", "yh", "yc"], hidden_size=hid,
                    direction="bidirectional"),
    ]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, ["T", "N", feat])],
                     [h.make_tensor_value_info("y", TP.FLOAT, None), h.make_tensor_value_info("yh", TP.FLOAT, None)],
                     [w, r, b, *consts, nh.from_array(np.array([0], np.int64), "zero_axes")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)])
    art = graphopt.compile(m, "cpu", "-O2", threads=1)
    for shape in [(5, 1, feat), (11, 3, feat), (1, 2, feat)]:
        _check(art, m, {"x": _x(shape, 7)}, tol=1e-5)

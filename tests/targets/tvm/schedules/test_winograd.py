"""Winograd F(m x m, 3 x 3) convolutions of the cpu target (targets/tvm/kernels/winograd.py,
targets/tvm/schedules/winograd.py): the transform matrices, which convs take the form (and which must
not), the schedule, the `winograd=` option, and numbers against onnxruntime."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper as nh

tvm = pytest.importorskip("tvm")
relax = pytest.importorskip("tvm.relax")

import graphopt  # noqa: E402
from graphopt.check import run_onnxruntime  # noqa: E402
from graphopt.errors import UsageError  # noqa: E402
from graphopt.passes.fusion.kernel_groups import PlanKernels  # noqa: E402
from graphopt.targets.tvm.schedules import loop_marks as LM  # noqa: E402
from graphopt.targets.tvm.tuning.variants import variants  # noqa: E402
from graphopt.targets.tvm import layout as TL  # noqa: E402
from graphopt.targets.tvm.lower import lowerer as L  # noqa: E402
from graphopt.targets.tvm.kernels import winograd as WO  # noqa: E402
from graphopt.targets.tvm.schedules import default_rules, default_schedule  # noqa: E402
from graphopt.targets.tvm.schedules.winograd import WinogradConv  # noqa: E402
from graphopt.transform import PassContext, optimize  # noqa: E402
from tvm_kernels import AVX2_CPU, AVX2_MCPU, primitive_kernel  # noqa: E402
from tvm_kernels import avx2_target as host_target  # noqa: E402  (8-channel blocks: AVX2)
from graphopt.targets.machine import machine_model  # noqa: E402

B = 8
TT = relax.TensorType
_HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'


def _model(text: str, weights: dict[str, tuple[int, ...]], seed: int = 0) -> onnx.ModelProto:
    m = onnx.parser.parse_model(_HEAD + text)
    rng = np.random.default_rng(seed)
    for name, shape in weights.items():
        fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        m.graph.initializer.append(nh.from_array((rng.standard_normal(shape) / np.sqrt(fan)).astype(np.float32), name))
    return onnx.shape_inference.infer_shapes(m)


def _plan(m: onnx.ModelProto, mode: str = "auto") -> dict[str, int]:
    """m of each conv (by its output's name) the layout plan puts in Winograd form."""
    g = optimize(graphopt.load(m), "-O2", inplace=True)
    PlanKernels().run(g, PassContext())
    plan = TL.plan_layout(g, L._topo_groups(g), B, machine_model(host_target()), mode)
    return {n.outputs[0].name: plan.winograd[id(n)] for n in g.graph.nodes if id(n) in plan.winograd}


def _feeds(shape: tuple[int, ...], seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _compare(m: onnx.ModelProto, art, feeds, rtol: float, atol: float) -> None:
    want = run_onnxruntime(graphopt.load(m), feeds)
    for got, ref in zip(art.run(feeds), want):
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- the matrices


@pytest.mark.parametrize("m", [2, 3, 4, 6])
def test_matrices_compute_the_correlation(m):
    """A^T ((G g) ⊙ (B^T d)) is the correlation of d with g, in 1-D and nested for 2-D."""
    at, g, bt = WO.winograd_matrices(m)
    assert at.shape == (m, m + 2) and g.shape == (m + 2, 3) and bt.shape == (m + 2, m + 2)
    rng = np.random.default_rng(m)
    d, k = rng.standard_normal(m + 2), rng.standard_normal(3)
    ref = np.array([d[i : i + 3] @ k for i in range(m)])
    np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), ref, rtol=1e-12, atol=1e-12)
    d2, k2 = rng.standard_normal((m + 2, m + 2)), rng.standard_normal((3, 3))
    ref2 = np.array([[np.sum(d2[i : i + 3, j : j + 3] * k2) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(at @ ((g @ k2 @ g.T) * (bt @ d2 @ bt.T)) @ at.T, ref2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m", [2, 4])
def test_weight_packing_matches_its_numpy_form(m):
    """pack_winograd_weight (TE, run at compile time) and pack_winograd_weight_numpy (what the
    kernel tests and tools/bench_nchwc_kernels.py feed the kernels) give the same U."""
    from tvm import te

    w = np.random.default_rng(m).standard_normal((16, 24, 3, 3)).astype(np.float32)
    wt = te.placeholder(w.shape, name="w")
    u = WO.pack_winograd_weight(wt, B, m)
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([wt, u])}), target=host_target())
    got = tvm.runtime.tensor(np.zeros([int(d) for d in u.shape], np.float32))
    lib["main"](tvm.runtime.tensor(w), got)
    np.testing.assert_allclose(got.numpy(), WO.pack_winograd_weight_numpy(w, B, m), rtol=1e-5, atol=1e-6)


def test_too_many_points_is_an_error():
    with pytest.raises(ValueError, match="interpolation points"):
        WO.winograd_matrices(8)


# --------------------------------------------------------------------------- which convs

# fires: a (3x3, stride 1, pads 1, 32 -> 32) and f (asymmetric pads <= 1); near-misses: stride 2,
# dilation 2, 1x1, 5x5, too few input channels, pads of 2, a grouped 3x3
PICK = """
g (float[1, 32, 14, 14] x) => (float[1, 32, 14, 14] a, float[1, 32, 7, 7] b, float[1, 32, 10, 10] c,
                               float[1, 32, 14, 14] d, float[1, 32, 14, 14] e, float[1, 32, 14, 14] n,
                               float[1, 32, 16, 16] p, float[1, 32, 13, 13] f, float[1, 32, 14, 14] q) {
    a = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, wa)
    b = Conv <pads = [1, 1, 1, 1], strides = [2, 2], kernel_shape = [3, 3]> (x, wb)
    c = Conv <dilations = [2, 2], kernel_shape = [3, 3]> (x, wc)
    d = Conv <kernel_shape = [1, 1]> (x, wd)
    e = Conv <pads = [2, 2, 2, 2], kernel_shape = [5, 5]> (x, we)
    s = Slice (x, st, en, ax)
    n = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (s, wn)
    p = Conv <pads = [2, 2, 2, 2], kernel_shape = [3, 3]> (x, wp)
    f = Conv <pads = [0, 1, 1, 0], kernel_shape = [3, 3]> (x, wf)
    q = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3], group = 4> (x, wq)
}
"""
PICK_W = {"wa": (32, 32, 3, 3), "wb": (32, 32, 3, 3), "wc": (32, 32, 3, 3), "wd": (32, 32, 1, 1),
          "we": (32, 32, 5, 5), "wn": (32, 16, 3, 3), "wp": (32, 32, 3, 3), "wf": (32, 32, 3, 3),
          "wq": (32, 8, 3, 3)}


def _pick_model() -> onnx.ModelProto:
    m = _model(PICK, PICK_W)
    for name, v in (("st", [0]), ("en", [16]), ("ax", [1])):
        m.graph.initializer.append(nh.from_array(np.array(v, np.int64), name))
    return onnx.shape_inference.infer_shapes(m)


@pytest.fixture
def f4_everywhere(monkeypatch):
    """F(4x4) on every map size under mode "4" (by default maps under 28x28 take F(2x2))."""
    monkeypatch.setattr(TL, "WINOGRAD_F4_MIN_MAP", 0)


def test_plan_picks_3x3_stride_1_convs_only(monkeypatch):
    m = _pick_model()
    assert _plan(m) == {"a": 2, "f": 2}
    assert _plan(m, "4") == {"a": 2, "f": 2}  # 14x14 and 13x13 maps: F(2x2)
    monkeypatch.setattr(TL, "WINOGRAD_F4_MIN_MAP", 13)
    assert _plan(m, "4") == {"a": 4, "f": 4}
    assert _plan(m, "off") == {}
    with pytest.raises(ValueError, match="winograd="):
        _plan(m, "3")


def test_symbolic_maps_take_f2():
    """A symbolic H x W takes F(2x2) (its tile count an expression), also where F(4x4) is asked
    for (its size unknown); "off" still keeps it direct."""
    m = _model("""
g (float[N, 32, H, W] x) => (float[N, 32, H, W] y) {
    y = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w)
}
""", {"w": (32, 32, 3, 3)})
    assert _plan(m) == {"y": 2}
    assert _plan(m, "4") == {"y": 2}
    assert _plan(m, "off") == {}


@pytest.mark.parametrize("target", ["avx2", "host"])
def test_symbolic_map_residual_block_matches_onnxruntime(target):
    """Two Winograd convs (+ bias, Relu, residual Add) on a symbolic H x W, compiled once, equal
    onnxruntime's at the smallest map, at sizes no tile divides (odd rows: a ragged Winograd tile;
    fewer transform tiles than the GEMM's pixel tile, and more) and with batch 2."""
    model = _model(BLOCK.format(h="H", w="W").replace("float[1, 32", "float[N, 32"), BLOCK_W)
    assert _plan(model) == {"c": 2, "d": 2}
    art = graphopt.compile(model, AVX2_CPU if target == "avx2" else "cpu", "-O2", threads=2)
    assert art.manifest["kernels"]["winograd"] == {"2": 2} and "winograd_symbolic" not in art.manifest["kernels"]
    for shape in [(1, 32, 1, 1), (1, 32, 3, 2), (1, 32, 7, 9), (1, 32, 14, 14), (1, 32, 5, 61), (2, 32, 9, 30)]:
        _compare(model, art, _feeds(shape, seed=shape[2]), rtol=2e-5, atol=2e-5)


def test_symbolic_batch_takes_winograd_and_matches_onnxruntime():
    """A symbolic batch keeps its transforms parallel over the static (block, tile) loops: with
    the batch a serial loop outside them, the transform's parallel loop had been unrolled (196
    copies; 40 s to build one conv, ResNet-50 still compiling after 10 minutes at 14 GB)."""
    model = _model(BLOCK.format(h=14, w=14).replace("float[1, 32", "float[N, 32"), BLOCK_W)
    assert _plan(model) == {"c": 2, "d": 2}
    art = graphopt.compile(model, AVX2_CPU, "-O2", threads=2)
    assert art.manifest["kernels"]["winograd"] == {"2": 2}
    for batch in (1, 3):
        _compare(model, art, _feeds((batch, 32, 14, 14), seed=batch), rtol=2e-5, atol=2e-5)


def test_option_and_its_errors():
    from graphopt.targets.cpu import CpuTarget

    assert CpuTarget._OPTIONS["winograd"] == TL.WINOGRAD_MODES  # (the two lists agree)
    assert graphopt.target.get_target("cpu{winograd=4}").winograd == "4"
    assert graphopt.target.get_target("cpu").winograd == "auto"
    with pytest.raises(UsageError, match="winograd='8' is not one of auto, off, 2, 4"):
        graphopt.target.get_target("cpu{winograd=8}")


# --------------------------------------------------------------------------- numbers

BLOCK = """
g (float[1, 32, {h}, {w}] x) => (float[1, 32, {h}, {w}] y) {{
    c = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w1, b1)
    r = Relu (c)
    d = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (r, w2, b2)
    a = Add (d, x)
    y = Relu (a)
}}
"""
BLOCK_W = {"w1": (32, 32, 3, 3), "b1": (32,), "w2": (32, 32, 3, 3), "b2": (32,)}


@pytest.mark.parametrize("mode,m,tol", [("auto", 2, 2e-5), ("4", 4, 1e-4)])
@pytest.mark.parametrize("h,w", [(14, 14), (7, 9)], ids=["14x14", "7x9"])
def test_residual_block_matches_onnxruntime(mode, m, tol, h, w, f4_everywhere):
    """Two 3x3 convs (bias, Relu; the second with a residual Add) in Winograd form: counted in
    the manifest, weights packed at compile time, numbers onnxruntime's. 7x9 leaves ragged tiles
    in both directions (and 14 rows ragged 4x4 tiles)."""
    model = _model(BLOCK.format(h=h, w=w), BLOCK_W)
    art = graphopt.compile(model, f"cpu{{mcpu={AVX2_MCPU},winograd={mode}}}", "-O2", threads=2)
    assert art.manifest["kernels"]["winograd"] == {str(m): 2}
    with np.load(os.path.join(art.path, "params.npz")) as z:
        shapes = {z[k].shape for k in z.files}
    assert ((m + 2) ** 2, 4, 4, 1, 1, 8, 8) in shapes and (32, 32, 3, 3) not in shapes
    _compare(model, art, _feeds((1, 32, h, w)), rtol=tol, atol=tol)


def test_off_runs_direct_with_the_same_numbers():
    model = _model(BLOCK.format(h=14, w=14), BLOCK_W)
    feeds = _feeds((1, 32, 14, 14))
    off = graphopt.compile(model, f"cpu{{mcpu={AVX2_MCPU},winograd=off}}", "-O2", threads=2)
    on = graphopt.compile(model, AVX2_CPU, "-O2", threads=2)
    assert off.manifest["kernels"]["winograd"] == {} and on.manifest["kernels"]["winograd"] == {"2": 2}
    np.testing.assert_allclose(on.run(feeds)[0], off.run(feeds)[0], rtol=2e-5, atol=2e-5)


def test_pick_model_matches_onnxruntime():
    """The convs next to the near-misses, each in its own form, give onnxruntime's numbers."""
    m = _pick_model()
    art = graphopt.compile(m, AVX2_CPU, "-O2", threads=2)
    assert art.manifest["kernels"]["winograd"] == {"2": 2}
    _compare(m, art, _feeds((1, 32, 14, 14)), rtol=2e-5, atol=2e-5)


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # (a constant knob)
@given(
    c=st.sampled_from([32, 40]),
    oc=st.sampled_from([32, 48]),
    h=st.integers(3, 13),
    w=st.integers(3, 13),
    pad=st.sampled_from([(1, 1, 1, 1), (0, 0, 0, 0), (1, 0, 0, 1)]),
    mode=st.sampled_from(["2", "4"]),
)
def test_random_winograd_convs_match_onnxruntime(c, oc, h, w, pad, mode, f4_everywhere):
    oh, ow = h + pad[0] + pad[2] - 2, w + pad[1] + pad[3] - 2
    if oh < 1 or ow < 1:
        return
    model = _model(f"""
g (float[1, {c}, {h}, {w}] x) => (float[1, {oc}, {oh}, {ow}] y) {{
    y = Conv <pads = [{pad[0]}, {pad[1]}, {pad[2]}, {pad[3]}], kernel_shape = [3, 3]> (x, wt, bs)
}}
""", {"wt": (oc, c, 3, 3), "bs": (oc,)}, seed=h * 16 + w)
    art = graphopt.compile(model, f"cpu{{mcpu={AVX2_MCPU},winograd={mode}}}", "-O2", threads=1)
    assert art.manifest["kernels"]["winograd"] == {mode: 1}
    _compare(model, art, _feeds((1, c, h, w), seed=h), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the schedule


def _kernel(c=32, h=14, oc=32, m=2, residual=True, n=1):
    """The fused PrimFunc of a Winograd conv group: transforms, GEMM, bias, residual Add, Relu."""
    a = m + 2
    params = [relax.Var("x", TT((n, c // B, h, h, B), "float32")),
              relax.Var("u", TT((a * a, oc // B, c // B, 1, 1, B, B), "float32")),
              relax.Var("bias", TT((1, oc // B, 1, 1, B), "float32"))]
    if residual:
        params.append(relax.Var("r", TT((n, oc // B, h, h, B), "float32")))

    def body(bb, x, u, bias, *r):
        y = bb.emit_te(WO.conv2d_winograd, x, u, [1, 1, 1, 1], m, primfunc_name_hint="conv_winograd")
        y = bb.emit(relax.op.add(y, bias))
        if r:
            y = bb.emit(relax.op.add(y, r[0]))
        return bb.emit(relax.op.nn.relu(y))

    return primitive_kernel(params, body)


def _run_kernel(func, c=32, h=14, oc=32, m=2, seed=0):
    """(kernel output, numpy reference), both NCHW; the output buffer has a sentinel tail."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, c, h, h)).astype(np.float32)
    w = (rng.standard_normal((oc, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    bias = rng.standard_normal(oc).astype(np.float32)
    r = rng.standard_normal((1, oc, h, h)).astype(np.float32)

    def blocked(a):
        return np.ascontiguousarray(a.reshape(1, a.shape[1] // B, B, *a.shape[2:]).transpose(0, 1, 3, 4, 2))

    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = sum(np.einsum("nchw,oc->nohw", xp[:, :, i : i + h, j : j + h], w[:, :, i, j].astype(np.float64))
              for i in range(3) for j in range(3))
    ref = np.maximum(ref + bias.reshape(1, -1, 1, 1) + r, 0)
    lib = tvm.compile(tvm.IRModule({"main": LM.apply_loop_marks(func).with_attr("global_symbol", "main")}),
                      target=host_target())
    shape = (1, oc // B, h, h, B)
    size = int(np.prod(shape))
    out = tvm.runtime.tensor(np.full(size + 64, 7.0, np.float32))
    args = [blocked(x), WO.pack_winograd_weight_numpy(w, B, m), bias.reshape(1, oc // B, 1, 1, B), blocked(r)]
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out._create_view(shape, "float32"))
    flat = out.numpy()
    assert (flat[size:] == 7.0).all(), "the kernel wrote past the end of its output"
    got = flat[:size].reshape(shape).transpose(0, 1, 4, 2, 3).reshape(1, oc, h, h)
    return got, ref


@pytest.mark.parametrize("m,h", [(2, 14), (4, 14), (2, 7)])
def test_default_rule_is_winograd_conv_and_keeps_numbers(m, h):
    func = _kernel(h=h, m=m)
    sch, rule, _ = default_schedule(func, host_target(), default_rules(host_target()))
    assert rule == "winograd-conv"
    text = sch.mod["main"].script()
    assert text.count("T.parallel(") == 3  # input transform, GEMM, output transform (+ epilogue)
    assert "winograd_out_cols" in text and "T.vectorized(" in text
    got, ref = _run_kernel(sch.mod["main"], h=h, m=m)
    np.testing.assert_allclose(got, ref, rtol=2e-4 if m == 4 else 2e-5, atol=2e-4 if m == 4 else 2e-5)


def test_symbolic_batch_keeps_the_transforms_parallel():
    import re

    func = _kernel(n=tvm.tirx.Var("n", "int64"))
    text = WinogradConv().apply(func, host_target(), 8).mod["main"].script()
    assert text.count("T.parallel(") >= 2  # the transforms (the GEMM's may be serial over the batch)
    unrolled = [int(v) for v in re.findall(r"T\.unroll\(T\.int64\((\d+)\)\)", text)]
    assert unrolled and max(unrolled) <= 64


def test_winograd_conv_declines_other_kernels():
    """A direct blocked conv (and anything else) is not its kernel: None, so the next rule runs."""
    from graphopt.targets.tvm.kernels import blocked as BO

    params = [relax.Var("x", TT((1, 4, 14, 14, B), "float32")), relax.Var("w", TT((4, 4, 3, 3, B, B), "float32"))]
    func = primitive_kernel(params, lambda bb, x, w: bb.emit_te(BO.conv2d_blocked, x, w, [1, 1], [1, 1, 1, 1], [1, 1]))
    assert WinogradConv().apply(func, host_target(), 8) is None


def test_trace_replays_and_variants_vary_the_gemm_tile():
    """Tuning stores the default schedule's trace and measures the variants: the trace replays to
    the same kernel, and each variant is a Winograd schedule with another GEMM tile that keeps the
    numbers."""
    from tvm import s_tir

    func = _kernel()
    sch = WinogradConv().apply(func, host_target(), 8)
    again = s_tir.Schedule(func)
    sch.trace.apply_to_schedule(again, remove_postproc=False)
    tvm.ir.assert_structural_equal(again.mod["main"], sch.mod["main"])
    vs = variants(func, host_target(), 8)
    assert len(vs) >= 4 and all(label.startswith("winograd gemm tile") for label, _ in vs)
    got, ref = _run_kernel(vs[0][1].mod["main"])
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)

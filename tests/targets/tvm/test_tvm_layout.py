"""Channel-blocked activations (NCHW8c) in the cpu target: which groups run blocked, where the
layout changes, and numbers against onnxruntime on the unmodified model."""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper as h
from onnx import numpy_helper as nh

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.check import run_onnxruntime  # noqa: E402
from graphopt.errors import UsageError  # noqa: E402
from graphopt.passes.fusion.kernel_groups import PlanKernels  # noqa: E402
from graphopt.targets.tvm import layout as TL  # noqa: E402
from graphopt.targets.tvm.lower import lowerer as L  # noqa: E402
from graphopt.transform import PassContext, optimize  # noqa: E402
from graphopt.targets.machine import machine_model  # noqa: E402
from tvm_kernels import AVX2_CPU, AVX2_MCPU, AVX512_MCPU, avx2_target, host_runs, isa_target  # noqa: E402

# the layout decisions checked here are AVX2's (8-channel blocks, 12-accumulator tiles), compiled
# for an explicit AVX2 mcpu so they hold on every x86 host; the AVX-512 build is checked at the end
_M = machine_model(avx2_target())


def _parse(text: str, weights: dict[str, tuple[int, ...]], seed: int = 0) -> onnx.ModelProto:
    """A model from ONNX's textual syntax, with random float initializers of the given shapes."""
    m = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, shape in weights.items():
        fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        m.graph.initializer.append(nh.from_array((rng.standard_normal(shape) / np.sqrt(fan)).astype(np.float32), name))
    return onnx.shape_inference.infer_shapes(m)


_HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'

# stem conv (C=3) → relu → maxpool → 3x3 conv → relu → 1x1 conv + residual → relu → avgpool(ceil,
# count_include_pad) → depthwise 3x3 s2 → clip → GAP → flatten → gemm
RESNETISH = _HEAD + """
g (float[N, 3, 20, 20] x) => (float[N, 10] y) {
    c0 = Conv <pads = [3, 3, 3, 3], strides = [2, 2], kernel_shape = [7, 7]> (x, w0, b0)
    r0 = Relu (c0)
    p0 = MaxPool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (r0)
    c1 = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (p0, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <kernel_shape = [1, 1]> (r1, w2)
    a2 = Add (c2, p0)
    r2 = Relu (a2)
    p1 = AveragePool <kernel_shape = [2, 2], strides = [2, 2], ceil_mode = 1, count_include_pad = 1, pads = [0, 0, 1, 1]> (r2)
    d3 = Conv <pads = [1, 1, 1, 1], strides = [2, 2], group = 16, kernel_shape = [3, 3]> (p1, w3)
    lo = Constant <value = float {0.0}> ()
    hi = Constant <value = float {6.0}> ()
    k3 = Clip (d3, lo, hi)
    gp = GlobalAveragePool (k3)
    f = Flatten (gp)
    y = Gemm <transB = 1> (f, wf, bf)
}
"""
RESNETISH_W = {"w0": (16, 3, 7, 7), "b0": (16,), "w1": (16, 16, 3, 3), "b1": (16,), "w2": (16, 16, 1, 1),
               "w3": (16, 1, 3, 3), "wf": (10, 16), "bf": (10,)}


def _planned(m: onnx.ModelProto) -> graphopt.ir.Model:
    g = optimize(graphopt.load(m), "-O2", inplace=True)
    PlanKernels().run(g, PassContext())
    return g


def _roles(m: onnx.ModelProto, block: int = 8) -> tuple[TL.LayoutPlan, dict[str, str]]:
    g = _planned(m)
    plan = TL.plan_layout(g, L._topo_groups(g), block, _M)
    return plan, {n.op_type + ":" + (n.outputs[0].name or ""): plan.role(n) for n in g.graph.nodes if plan.role(n)}


def _feeds(batch: int, c: int = 3, hw: int = 20, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, c, hw, hw)).astype(np.float32)}


def test_plan_blocks_the_conv_chain():
    plan, roles = _roles(_parse(RESNETISH, RESNETISH_W))
    kinds = sorted(roles.values())
    assert kinds.count("stem") == 1 and kinds.count("conv") == 2 and kinds.count("depthwise") == 1
    assert kinds.count("pool") == 2 and kinds.count("global-pool") == 1
    assert "elementwise" in kinds  # the relus / add / clip of the groups
    assert not any(k.startswith(("Flatten", "Gemm")) for k in roles)


def test_blocked_cnn_matches_onnxruntime_and_batch_stays_symbolic():
    m = _parse(RESNETISH, RESNETISH_W)
    art = graphopt.compile(m, AVX2_CPU, "-O2", threads=2)
    assert art.manifest["kernels"]["blocked"] >= 5
    for batch in (1, 3):
        feeds = _feeds(batch)
        got, want = art.run(feeds)[0], run_onnxruntime(graphopt.load(m), feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    plain = graphopt.compile(m, f"cpu{{mcpu={AVX2_MCPU},layout=nchw}}", "-O2", threads=2)
    assert plain.manifest["kernels"]["blocked"] == 0
    np.testing.assert_allclose(plain.run(_feeds(2))[0], run_onnxruntime(graphopt.load(m), _feeds(2))[0], rtol=1e-4, atol=1e-5)


def test_blocked_weights_are_packed_at_compile_time():
    m = _parse(RESNETISH, RESNETISH_W)
    art = graphopt.compile(m, f"cpu{{mcpu={AVX2_MCPU},layout=nchwc}}", "-O2", threads=1)
    with np.load(os.path.join(art.path, "params.npz")) as z:
        shapes = {z[k].shape for k in z.files}
    assert (2, 2, 3, 3, 8, 8) in shapes  # w1 as [OC/8, C/8, KH, KW, 8, 8]
    assert (2, 3, 7, 7, 8) in shapes  # the stem's w0 as [OC/8, C, KH, KW, 8]
    assert (2, 3, 3, 8) in shapes  # the depthwise w3 as [C/8, KH, KW, 8]
    assert (16, 16, 3, 3) not in shapes and art.manifest["runtime"]["packed"] >= 3


def test_cpu_layout_option_errors():
    with pytest.raises(UsageError, match="layout="):
        graphopt.target.get_target("cpu{layout=nhwc}")
    with pytest.raises(UsageError, match="unknown option"):
        graphopt.target.get_target("cpu{blocks=8}")


NEAR = _HEAD + """
g (float[1, 16, 8, 8] x) => (float[1, 12, 8, 8] y1, float[1, 16, 8, 8] y2, float[1, 32, 8, 8] y3, float[1, 16, 8, 8] y4) {
    y1 = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, wa)
    y2 = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3], group = 2> (x, wb)
    y3 = Conv <kernel_shape = [1, 1]> (x, x2)
    c = Conv <kernel_shape = [1, 1]> (x, wd)
    y4 = PRelu (c, chan)
}
"""


def test_near_misses_stay_nchw():
    """OC not a multiple of 8, a grouped (not depthwise) conv, weights computed at run time, and an
    epilogue that is not elementwise on blocked data (PRelu, per-channel slopes): none of them runs blocked."""
    m = onnx.parser.parse_model(NEAR.replace("(x, x2)", "(x, wx)"))
    rng = np.random.default_rng(0)
    for name, shape in {"wa": (12, 16, 3, 3), "wb": (16, 8, 3, 3), "wd": (16, 16, 1, 1), "chan": (16, 1, 1)}.items():
        m.graph.initializer.append(nh.from_array(rng.standard_normal(shape).astype(np.float32), name))
    # y3's weights are a graph input (run-time weights)
    m.graph.input.append(h.make_tensor_value_info("wx", onnx.TensorProto.FLOAT, [32, 16, 1, 1]))
    m = onnx.shape_inference.infer_shapes(m)
    plan, roles = _roles(m)
    assert roles == {}, roles
    feeds = {"x": rng.standard_normal((1, 16, 8, 8)).astype(np.float32),
             "wx": rng.standard_normal((32, 16, 1, 1)).astype(np.float32)}
    art = graphopt.compile(m, AVX2_CPU, "-O2", threads=1)
    assert art.manifest["kernels"]["blocked"] == 0
    for got, want in zip(art.run(feeds), run_onnxruntime(graphopt.load(m), feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


MIXED = _HEAD + """
g (float[1, 8, 6, 6] x) => (float[1, 8, 6, 12] y, float[1, 8, 6, 6] z) {
    c = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w)
    r = Relu (c)
    y = Concat <axis = 3> (r, x)
    s = Softmax <axis = 1> (r)
    z = Mul (s, x)
}
"""


def test_layout_changes_at_group_boundaries():
    """A blocked value read by NCHW consumers (Concat along the width, Softmax) is converted back once; an NCHW input
    read by a blocked conv and by a plain node is converted for the conv only; outputs equal."""
    m = _parse(MIXED, {"w": (8, 8, 3, 3)})
    plan, roles = _roles(m)
    assert sorted(roles.values()) == ["conv", "elementwise"]
    g = _planned(m)
    lowered = L.lower(g, block=8, machine=_M)
    names = [gv.name_hint for gv in lowered.mod.get_global_vars()]
    assert sum(n.startswith("from_blocked") for n in names) == 1
    assert sum(n.startswith("to_blocked") for n in names) == 1
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 8, 6, 6)).astype(np.float32)}
    art = graphopt.compile(m, AVX2_CPU, "-O2", threads=1)
    for got, want in zip(art.run(feeds), run_onnxruntime(graphopt.load(m), feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=st.sampled_from([3, 8, 16]),
    oc=st.sampled_from([8, 16, 24]),
    k=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]),
    dil=st.sampled_from([1, 2]),
    hw=st.integers(5, 13),
    pad=st.integers(0, 2),
    pool=st.sampled_from(["MaxPool", "AveragePool", "none"]),
    ceil=st.booleans(),
)
def test_random_blocked_convs_match_onnxruntime(c, oc, k, stride, dil, hw, pad, pool, ceil):
    span = (k - 1) * dil + 1
    if hw + 2 * pad < span:
        return
    body = f"c = Conv <pads = [{pad}, {pad}, {pad}, {pad}], strides = [{stride}, {stride}], dilations = [{dil}, {dil}], kernel_shape = [{k}, {k}]> (x, w, b)\n    r = Relu (c)\n"
    if pool != "none":
        body += f"    y = {pool} <kernel_shape = [2, 2], strides = [2, 2], pads = [0, 0, 1, 1], ceil_mode = {int(ceil)}> (r)\n"
    else:
        body += "    y = Identity (r)\n"
    m = _parse(_HEAD + f"g (float[1, {c}, {hw}, {hw}] x) => (float[1, {oc}, ?, ?] y) {{\n    {body}}}\n",
               {"w": (oc, c, k, k), "b": (oc,)})
    feeds = _feeds(1, c, hw, seed=hw)
    art = graphopt.compile(m, f"cpu{{mcpu={AVX2_MCPU},layout=nchwc}}", "-O2", threads=1)
    assert art.manifest["kernels"]["blocked"] >= 1
    np.testing.assert_allclose(art.run(feeds)[0], run_onnxruntime(graphopt.load(m), feeds)[0], rtol=1e-4, atol=1e-4)


def test_ceil_mode_pool_drops_a_window_starting_in_the_right_padding():
    """ONNX: with ceil_mode the last window must start inside the input or its left padding (6
    wide, kernel 2, stride 2, right pad 1: 3 windows, not 4) — found by the random test above."""
    m = _parse(_HEAD + """g (float[1, 8, 6, 6] x) => (float[1, 8, 3, 3] y) {
    c = Conv <kernel_shape = [1, 1]> (x, w)
    y = MaxPool <kernel_shape = [2, 2], strides = [2, 2], pads = [0, 0, 1, 1], ceil_mode = 1> (c)
}
""", {"w": (8, 8, 1, 1)})
    feeds = _feeds(1, 8, 6)
    art = graphopt.compile(m, f"cpu{{mcpu={AVX2_MCPU},layout=nchwc}}", "-O2", threads=1)
    np.testing.assert_allclose(art.run(feeds)[0], run_onnxruntime(graphopt.load(m), feeds)[0], rtol=1e-5, atol=1e-6)


def test_ragged_rows_compile_with_a_peeled_tile_and_match_onnxruntime():
    """A 3x3 conv on 56-wide rows (3-pixel tiles: 18 whole and a ragged 2-pixel one, peeled into
    code of its own by the build) and a 1x1 conv on its flattened pixels; the numbers are
    onnxruntime's."""
    m = _parse(_HEAD + """g (float[1, 32, 56, 56] x) => (float[1, 32, 56, 56] y) {
    c = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w, b)
    r = Relu (c)
    d = Conv <kernel_shape = [1, 1]> (r, w1)
    y = Add (d, x)
}
""", {"w": (32, 32, 3, 3), "b": (32,), "w1": (32, 32, 1, 1)})
    g = _planned(m)
    assert [TL.flat_multiple(n, 8, _M) for n in g.graph.nodes if n.op_type == "Conv"] == [0, 3]
    feeds = _feeds(1, 32, 56)
    art = graphopt.compile(m, f"cpu{{mcpu={AVX2_MCPU},winograd=off}}", "-O2", threads=2)  # (the 3x3 direct, not in Winograd form)
    np.testing.assert_allclose(art.run(feeds)[0], run_onnxruntime(graphopt.load(m), feeds)[0], rtol=1e-4, atol=1e-4)


def test_pointwise_convs_run_on_the_flattened_pixel_axis():
    """Unpadded 1x1 convs (stride 1 or 2) and convs on small maps are computed on their flattened
    pixels (OH*OW rounded up to the micro-kernel's pixel count); numbers against onnxruntime
    through the whole cpu target."""
    m = _parse(_HEAD + """g (float[1, 32, 7, 7] x) => (float[1, 32, 7, 7] y, float[1, 16, 4, 4] v, float[1, 32, 7, 7] u) {
    c = Conv <kernel_shape = [1, 1]> (x, w, b)
    r = Relu (c)
    y = Add (r, x)
    v = Conv <kernel_shape = [1, 1], strides = [2, 2]> (x, w2)
    t = Conv <kernel_shape = [1, 1], pads = [1, 1, 1, 1]> (x, w3)
    u = Conv <kernel_shape = [3, 3]> (t, w4)
}
""", {"w": (32, 32, 1, 1), "b": (32,), "w2": (16, 32, 1, 1), "w3": (32, 32, 1, 1), "w4": (32, 32, 3, 3)})
    g = _planned(m)
    convs = {n.outputs[0].name: n for n in g.graph.nodes if n.op_type == "Conv"}
    # 4 output blocks: 3 pixels x 4 blocks; 2 blocks: 6 x 2; the padded 1x1 and the 3x3 too, their
    # maps being small (56-row ones keep their rows: see the test above)
    assert {k: TL.flat_multiple(n, 8, _M) for k, n in convs.items()} == {"c": 3, "v": 6, "t": 3, "u": 3}
    assert "unflatten" in L.lower(g, block=8, machine=_M).mod.script()
    feeds = _feeds(1, 32, 7)
    art = graphopt.compile(m, f"cpu{{mcpu={AVX2_MCPU},winograd=off}}", "-O2", threads=2)  # (the 3x3 direct, not in Winograd form)
    for got, want in zip(art.run(feeds), run_onnxruntime(graphopt.load(m), feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_flat_pixels_rule_by_rows():
    """Padded convs run flat on maps of at most 28 input rows or 13 output rows; a 56-row input
    keeps its rows (stride 1 or 2), unpadded 1x1 convs are flat at any size."""
    f = TL.flat_px_multiple
    assert f((3, 3), [1] * 4, [1, 1], 128, 28, 8, 28, _M) == 3
    assert f((3, 3), [1] * 4, [1, 1], 256, 14, 8, 28, _M) == 3  # stride 2 from 28
    assert f((3, 3), [1] * 4, [1, 1], 64, 56, 8, 56, _M) == 0
    assert f((3, 3), [1] * 4, [1, 1], 128, 28, 8, 56, _M) == 0  # stride 2 from 56
    assert f((3, 3), [1] * 4, [1, 1], 128, 13, 8, 52, _M) == 3  # stride 4: few output rows
    assert f((1, 1), [0] * 4, [1, 1], 256, 56, 8, 56, _M) == 3
    assert f((1, 1), [0] * 4, [1, 1], 16, 56, 8, 56, _M) == 6  # 2 output blocks: 6 pixels x 2 blocks


def test_channel_concat_of_whole_blocks_runs_blocked():
    """Concat along the channels of blocked activations whose channel counts are whole blocks is a
    concat of channel blocks (GoogLeNet's inception outputs): no layout change around it. A concat
    with a 4-channel input, or along another axis, stays NCHW. Numbers against onnxruntime."""
    m = _parse(_HEAD + """g (float[1, 16, 10, 10] x) => (float[1, 16, 10, 10] y, float[1, 20, 10, 10] z, float[1, 16, 10, 20] u) {
    a = Conv <kernel_shape = [1, 1]> (x, wa)
    b = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, wb)
    ra = Relu (a)
    rb = Relu (b)
    c = Concat <axis = 1> (ra, rb)
    y = Conv <kernel_shape = [1, 1]> (c, wy)
    s = Conv <kernel_shape = [1, 1]> (x, ws)
    z = Concat <axis = 1> (ra, s)
    u = Concat <axis = 3> (ra, rb)
}
""", {"wa": (8, 16, 1, 1), "wb": (8, 16, 3, 3), "wy": (16, 16, 1, 1), "ws": (12, 16, 1, 1)})
    plan, roles = _roles(m)
    assert roles.get("Concat:c") == "concat"
    assert "Concat:z" not in roles and "Concat:u" not in roles  # 12 channels; the width axis
    feeds = _feeds(1, 16, 10)
    art = graphopt.compile(m, AVX2_CPU, "-O2", threads=2)
    for got, want in zip(art.run(feeds), run_onnxruntime(graphopt.load(m), feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_per_channel_constants_and_batchnorm_run_blocked():
    """A folded BatchNorm's per-channel Mul / Add constants ([C, 1, 1], [1, C, 1, 1]) and an
    inference BatchNormalization with constant statistics (DenseNet's pre-activation BN after each
    Concat) run blocked: the constants read as [1, C/b, 1, 1, b], the BN as x * s + t. A constant
    that is not per-channel ([C, H, W]) and a BN whose mean is a graph input keep their groups
    NCHW. Numbers against onnxruntime."""
    m = _parse(_HEAD + """g (float[1, 16, 6, 6] x, float[16] mu2) => (float[1, 16, 6, 6] y, float[1, 32, 6, 6] z, float[1, 16, 6, 6] u, float[1, 16, 6, 6] v) {
    a = Conv <kernel_shape = [1, 1]> (x, w1)
    c = Concat <axis = 1> (a, x)
    t = BatchNormalization <epsilon = 0.001> (c, sc, bi, mu, va)
    r = Relu (t)
    y = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (r, w2)
    s = Mul (c, ch)
    z = Add (s, ch4)
    e = Conv <kernel_shape = [1, 1]> (x, w3)
    u = Mul (e, full)
    f = Conv <kernel_shape = [1, 1]> (x, w4)
    v = BatchNormalization (f, sc2, bi2, mu2, va2)
}
""", {"w1": (16, 16, 1, 1), "sc": (32,), "bi": (32,), "mu": (32,), "w2": (16, 32, 3, 3), "ch": (32, 1, 1),
      "ch4": (1, 32, 1, 1), "w3": (16, 16, 1, 1), "full": (16, 6, 6), "w4": (16, 16, 1, 1), "sc2": (16,), "bi2": (16,)})
    rng = np.random.default_rng(3)
    for name, n in (("va", 32), ("va2", 16)):
        m.graph.initializer.append(nh.from_array(rng.uniform(0.5, 2.0, n).astype(np.float32), name))
    plan, roles = _roles(m)
    assert roles.get("BatchNormalization:t") == "batchnorm"
    assert roles.get("Mul:s") == "elementwise" and roles.get("Add:z") == "elementwise"
    assert "Mul:u" not in roles and "BatchNormalization:v" not in roles
    feeds = {**_feeds(1, 16, 6), "mu2": rng.standard_normal(16).astype(np.float32)}
    art = graphopt.compile(m, AVX2_CPU, "-O2", threads=2)
    for got, want in zip(art.run(feeds), run_onnxruntime(graphopt.load(m), feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_conv_prologue_is_computed_once_not_per_tile():
    """A group BatchNorm → Relu → 1x1 Conv (DenseNet's dense layers): BlockedConv schedules the
    conv and leaves the BN + Relu prologue a block of its own, computed once per input value (it
    used to be inlined into the conv's reads: recomputed for every tile of output blocks, inside
    the reduction; DenseNet-121 42.7 -> 36.6 ms). Numbers against onnxruntime."""
    from graphopt.targets.tvm.schedules import ScheduleStats, apply_default_schedules

    m = _parse(_HEAD + """g (float[1, 16, 12, 12] x) => (float[1, 32, 12, 12] y) {
    a = Conv <kernel_shape = [1, 1]> (x, w1)
    c = Concat <axis = 1> (a, x)
    t = BatchNormalization <epsilon = 0.001> (c, sc, bi, mu, va)
    r = Relu (t)
    y = Conv <kernel_shape = [1, 1]> (r, w2)
}
""", {"w1": (16, 16, 1, 1), "sc": (32,), "bi": (32,), "mu": (32,), "w2": (32, 32, 1, 1)})
    m.graph.initializer.append(nh.from_array(np.random.default_rng(4).uniform(0.5, 2.0, 32).astype(np.float32), "va"))
    g = _planned(m)
    target = isa_target(AVX2_MCPU)
    lowered, mod = L.lower_and_fuse(g, target, block=8)
    stats = ScheduleStats()
    smod = apply_default_schedules(mod, target, stats=stats)
    # (the Relu: a NaN-keeping select `0 > x ? 0 : x`)
    convs = [gv for gv, f in mod.functions_items() if gv.name_hint in lowered.blocked_groups and "clamp_nan" in f.script()
             and "conv2d_blocked" in f.script() and "multiply" in f.script()]
    assert len(convs) == 1
    assert stats.by_func[convs[0].name_hint] == "blocked-conv"
    text = smod[convs[0]].script()
    # the conv's update reads the Relu's output buffer: no max (the Relu) in its FMA
    (update,) = [ln for ln in text.splitlines() if re.search(r"conv2d_blocked\w*\[[^]]*\] = conv2d_blocked", ln)]
    assert "T.max" not in update
    feeds = _feeds(1, 16, 12)
    art = graphopt.compile(m, AVX2_CPU, "-O2", threads=2)
    np.testing.assert_allclose(art.run(feeds)[0], run_onnxruntime(graphopt.load(m), feeds)[0], rtol=1e-4, atol=1e-4)


def test_avx512_build_blocks_by_16_and_matches_onnxruntime():
    """cpu{mcpu=<an AVX-512 CPU>} on any host: 16-channel blocks (the machine model's lanes), the
    machine model in the manifest; run where the host executes AVX-512, refused with one line
    naming the missing features where it cannot (never SIGILL)."""
    m = _parse(RESNETISH, RESNETISH_W)
    art = graphopt.compile(m, f"cpu{{mcpu={AVX512_MCPU}}}", "-O2", threads=2)
    mm = art.manifest["target"]["machine"]
    assert (mm["mcpu"], mm["lanes_fp32"], mm["accumulators"]) == (AVX512_MCPU, 16, 24)
    assert "avx512f" in mm["features"] and art.manifest["kernels"]["blocked"] >= 5
    lib = open(os.path.join(art.path, "model.so"), "rb").read()
    assert lib  # (the kernels' instructions: test_nchwc_schedules.test_avx512_kernel_uses_zmm_fmas)
    if not host_runs(isa_target(AVX512_MCPU)):
        with pytest.raises(graphopt.target.ArtifactError, match="lacks avx512"):
            graphopt.runtime.load(art.path)
        return
    for batch in (1, 2):
        feeds = _feeds(batch)
        np.testing.assert_allclose(art.run(feeds)[0], run_onnxruntime(graphopt.load(m), feeds)[0], rtol=1e-4, atol=1e-5)


def test_default_block_is_the_machine_models_lanes():
    """The cpu target's channel block is one vector of fp32 lanes of the machine it compiles for."""
    from graphopt.target import get_target

    for mcpu, lanes in ((AVX2_MCPU, 8), (AVX512_MCPU, 16), ("haswell", 8), ("znver4", 16), ("znver5", 16)):
        t = get_target(f"cpu{{mcpu={mcpu}}}")
        tvm_t = t.tvm_target(2)
        assert t.activation_block(tvm_t) == lanes == machine_model(tvm_t).lanes(32), mcpu
    t = get_target("cpu{mcpu=skylake-avx512,mattr=-avx512f}")  # AVX-512 turned off: AVX2 blocks
    assert t.activation_block(t.tvm_target(2)) == 8
    with pytest.raises(UsageError, match="not a CPU LLVM knows"):
        get_target("cpu{mcpu=pentium9000}").tvm_target(2)


MIXED24 = _HEAD + """
g (float[1, 16, 12, 12] x) => (float[1, 24, 12, 12] y) {
    a = Conv <kernel_shape = [1, 1]> (x, wa)
    r = Relu (a)
    y = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (r, wb)
}
"""


@pytest.mark.parametrize("mid, want", [(32, 16), (24, 8)])
def test_avx512_block_halves_where_16_would_leave_convs_nchw(mid, want):
    """On a 16-lane machine the block is 16 when every blocked conv takes it, 8 when channel
    counts that are multiples of 8 only (MobileNetV2's 24) would leave conv work in NCHW; the
    8-channel kernels are then scheduled with 8-lane vectors (schedules.nchwc.kernel_block)."""
    text = MIXED24.replace("float[1, 24, 12, 12] y", f"float[1, {mid}, 12, 12] y")
    m = _parse(text, {"wa": (mid, 16, 1, 1), "wb": (mid, mid, 3, 3)})
    g = _planned(m)
    assert TL.choose_plan(g, L._topo_groups(g), 16, machine_model(isa_target(AVX512_MCPU))).block == want
    assert TL.choose_plan(g, L._topo_groups(g), 8, _M).block == 8
    art = graphopt.compile(m, f"cpu{{mcpu={AVX512_MCPU}}}", "-O2", threads=2)
    assert art.manifest["kernels"]["block"] == want
    assert art.manifest["schedules"]["rules"].get("blocked-conv", 0) + art.manifest["schedules"]["rules"].get("winograd-conv", 0) >= 1
    if host_runs(isa_target(AVX512_MCPU)):
        feeds = _feeds(1, 16, 12)
        np.testing.assert_allclose(art.run(feeds)[0], run_onnxruntime(graphopt.load(m), feeds)[0], rtol=1e-4, atol=1e-5)

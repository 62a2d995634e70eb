"""Resize of channel-blocked maps (layout role `resize`) and the injective schedule over symbolic
maps: a detector's x2 upsampling and its Concat with the skip connection stay in [N, C/b, H, W, b]
with H and W symbolic (no layout change around them), the injective kernel's parallel loop ends at
the first symbolic loop (no division by a symbolic extent per vector), and outputs equal
onnxruntime's at several sizes under the AVX2 and the host machine models."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper as nh

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.passes.fusion.kernel_groups import PlanKernels  # noqa: E402
from graphopt.targets.machine import machine_model  # noqa: E402
from graphopt.targets.tvm import layout as TL  # noqa: E402
from graphopt.targets.tvm.lower import lowerer as L  # noqa: E402
from graphopt.transform import PassContext, optimize  # noqa: E402
from tvm_kernels import AVX2_CPU, avx2_target, host_target  # noqa: E402

_M = machine_model(avx2_target())
_HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'


def _model(resize: str, scales: list[float] | None = None, sizes: list[int] | None = None, c: int = 16,
           head: str = _HEAD, src: str = "r") -> onnx.ModelProto:
    """conv 3 -> c (stem) -> relu -> RESIZE(src) -> concat with a conv of the upsampled input -> 1x1 conv,
    on [N, 3, H, W]; `resize` is the Resize line's attributes and inputs after `u = Resize`."""
    text = head + f"""g (float[N, 3, H, W] x) => (float[N, 8, H2, W2] y) {{
    c0 = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w0)
    r = Relu (c0)
    u = Resize {resize}
    s = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (u, w1)
    k = Concat <axis = 1> (u, s)
    y = Conv <kernel_shape = [1, 1]> (k, w2)
}}
"""
    m = onnx.parser.parse_model(text.replace("(r,", f"({src},"))
    rng = np.random.default_rng(0)
    for name, shape in {"w0": (c, 3, 3, 3), "w1": (16, c, 3, 3), "w2": (8, c + 16, 1, 1)}.items():
        m.graph.initializer.append(nh.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name))
    if scales is not None:
        m.graph.initializer.append(nh.from_array(np.array(scales, np.float32), "scales"))
    if sizes is not None:
        m.graph.initializer.append(nh.from_array(np.array(sizes, np.int64), "sizes"))
    return onnx.shape_inference.infer_shapes(m)


def _roles(m: onnx.ModelProto, block: int = 8) -> dict[str, str]:
    g = optimize(graphopt.load(m), "-O2", inplace=True)
    PlanKernels().run(g, PassContext())
    plan = TL.plan_layout(g, L._topo_groups(g), block, _M)
    return {n.op_type + ":" + (n.outputs[0].name or ""): plan.role(n) for n in g.graph.nodes if plan.role(n)}


NEAREST = '<mode = "nearest", coordinate_transformation_mode = "asymmetric", nearest_mode = "floor"> (r, , scales)'
LINEAR = '<mode = "linear", coordinate_transformation_mode = "half_pixel"> (r, , scales)'


def test_resize_and_concat_of_symbolic_maps_run_blocked():
    for resize in (NEAREST, LINEAR):
        roles = _roles(_model(resize, scales=[1, 1, 2, 2]))
        assert roles.get("Resize:u") == "resize" and roles.get("Concat:k") == "concat", roles


@pytest.mark.parametrize("resize,scales,sizes,c,why", [
    ('<mode = "linear"> (r, , scales)', [1, 2, 2, 2], None, 16, "scales the channels"),
    ('<mode = "cubic"> (r, , scales)', [1, 1, 2, 2], None, 16, "cubic"),
    ('<mode = "linear", coordinate_transformation_mode = "tf_crop_and_resize"> (r, , scales)', [1, 1, 2, 2], None, 16,
     "crop and resize"),
    ('<mode = "nearest"> (r, , , sizes)', None, [1, 16, 8, 8], 16, "sizes"),
    ('<mode = "linear", coordinate_transformation_mode = "align_corners"> (r, , scales)', [1, 1, 2, 2], None, 16,
     "align_corners: TVM's codegen fails on its blocked kernel"),
    ('<mode = "linear"> (r, , scales)', [1, 1, 2, 2], None, 12, "12 channels: not whole blocks"),
])
def test_resize_near_misses_stay_nchw(resize, scales, sizes, c, why):
    roles = _roles(_model(resize, scales=scales, sizes=sizes, c=c))
    assert "Resize:u" not in roles, why


def test_resize_of_an_nchw_input_stays_nchw():
    """A Resize of the graph input (NCHW: nothing blocked before it) has no reason to block."""
    m = _model('<mode = "nearest"> (x, , scales)', scales=[1, 1, 2, 2])
    roles = _roles(m)
    assert "Resize:u" not in roles


_CASES = [
    (NEAREST, [1, 1, 2, 2]),
    ('<mode = "nearest", coordinate_transformation_mode = "half_pixel", nearest_mode = "round_prefer_ceil"> (r, , scales)',
     [1, 1, 2, 2]),
    (LINEAR, [1, 1, 2, 2]),
    ('<mode = "linear", coordinate_transformation_mode = "pytorch_half_pixel"> (r, , scales)', [1, 1, 0.5, 0.5]),
    ('<mode = "linear", coordinate_transformation_mode = "asymmetric"> (r, , scales)', [1, 1, 1.5, 2]),
]


@pytest.mark.parametrize("target", [AVX2_CPU, "cpu"], ids=["avx2", "host"])
@pytest.mark.parametrize("resize,scales", _CASES, ids=lambda v: str(v)[:40])
def test_blocked_resize_equals_onnxruntime_at_every_size(target, resize, scales):
    m = _model(resize, scales=scales)
    art = graphopt.compile(m, target, "-O2", threads=2)
    assert art.manifest["kernels"]["blocked"] >= 2
    # no layout change into or out of the resize: the map is blocked from the stem to the last conv
    names = [e["kernel"] if isinstance(e, dict) else str(e) for e in art.manifest.get("kernel_map", [])]
    assert not any(str(n).startswith("to_blocked") for n in names), names
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 8, 12), (1, 3, 14, 10), (2, 3, 20, 24)]:
        x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
        got, want = art.run({"x": x}), sess.run(None, {"x": x})
        for g, w in zip(got, want):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


def _blocked_upsample_kernel() -> tvm.tirx.PrimFunc:
    """The nearest x2 upsampling of a symbolic blocked map [N, 4, H, W, 16] as a TE kernel."""
    from tvm import te, tirx

    n, hh, ww = tirx.Var("N", "int64"), tirx.Var("H", "int64"), tirx.Var("W", "int64")
    x = te.placeholder((n, tirx.IntImm("int64", 4), hh, ww, tirx.IntImm("int64", 16)), name="x")
    y = te.compute((n, tirx.IntImm("int64", 4), hh * 2, ww * 2, tirx.IntImm("int64", 16)),
                   lambda a, b, c, d, e: x[a, b, c // 2, d // 2, e], name="up")
    return te.create_prim_func([x, y])


@pytest.mark.parametrize("knob,parallel", [("SERIAL_SYMBOLIC_INNER:1", "H * T.int64(8)"),
                                           ("SERIAL_SYMBOLIC_INNER:0", "H * W * T.int64(16)")])
def test_injective_parallel_loop_stops_at_the_first_symbolic_loop(knob, parallel):
    """[N, 4, 2H, 2W, 16]: N serial outside, `4 x 2H` parallel, `2W` serial inside, the block
    vectorised: indices inside the row are the loop variables themselves (knob off: one fused
    parallel loop over 4 x 2H x 2W, three divisions by symbolic extents per vector)."""
    from graphopt.targets.tvm.schedules import default_schedule
    from graphopt.targets.tvm.schedules.knobs import ScheduleKnobs, using

    with using(ScheduleKnobs.parse(knob)):
        sch, rule, _ = default_schedule(_blocked_upsample_kernel(), host_target())
    assert rule == "injective"
    text = sch.mod["main"].script()
    assert f"T.parallel({parallel})" in text, text
    assert "T.vectorized(T.int64(16))" in text


# --------------------------------------------------------------------------- pointwise-plain


def _head(tail: str, weights: dict[str, tuple[int, ...]], out_c: int, dims: str = "N, 3, H, W") -> onnx.ModelProto:
    """A stem conv 3 -> 16 + Relu on [DIMS], then `tail` (reading `r`) writing `y` [N, out_c, ...]."""
    text = _HEAD + f"""g (float[{dims}] x) => (float[N, {out_c}, H2, W2] y) {{
    c0 = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w0)
    r = Relu (c0)
{tail}
}}
"""
    m = onnx.parser.parse_model(text)
    rng = np.random.default_rng(1)
    for name, shape in {"w0": (16, 3, 3, 3), **weights}.items():
        m.graph.initializer.append(nh.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) or 1)).astype(np.float32), name))
    return onnx.shape_inference.infer_shapes(m)


_LOGIT = ("    c1 = Conv <kernel_shape = [1, 1]> (r, w1, b1)\n    y = Sigmoid (c1)", {"w1": (1, 16, 1, 1), "b1": (1,)}, 1)
_THREE = ("    y = Conv <kernel_shape = [1, 1]> (r, w1)", {"w1": (3, 16, 1, 1)}, 3)


@pytest.mark.parametrize("tail,weights,out_c", [_LOGIT, _THREE], ids=["logit-sigmoid", "three-no-bias"])
def test_pointwise_conv_to_fewer_channels_reads_the_blocks(tail, weights, out_c):
    roles = _roles(_head(tail, weights, out_c))
    assert roles.get("Conv:c1" if "c1" in tail else "Conv:y") == "pointwise-plain", roles
    assert "Sigmoid:y" not in roles  # (its epilogue runs on the NCHW output, no role)


@pytest.mark.parametrize("tail,weights,out_c,why", [
    ("    y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w1)", {"w1": (1, 16, 3, 3)}, 1, "3x3"),
    ("    y = Conv <kernel_shape = [1, 1], strides = [2, 2]> (r, w1)", {"w1": (1, 16, 1, 1)}, 1, "stride 2"),
    ("    y = Conv <kernel_shape = [1, 1], pads = [1, 1, 1, 1]> (r, w1)", {"w1": (1, 16, 1, 1)}, 1, "padded"),
    ("    y = Conv <kernel_shape = [1, 1]> (r, w1)", {"w1": (12, 16, 1, 1)}, 12, "12 >= a block of 8"),
])
def test_pointwise_near_misses(tail, weights, out_c, why):
    roles = _roles(_head(tail, weights, out_c))
    assert "pointwise-plain" not in roles.values(), why


def test_pointwise_of_an_nchw_input_stays_nchw():
    """The first conv of the model (its input is the NCHW image): nothing blocked to read."""
    m = _head("    y = Conv <kernel_shape = [1, 1]> (x, w1)", {"w1": (1, 3, 1, 1)}, 1)
    assert "pointwise-plain" not in _roles(m).values()


@pytest.mark.parametrize("target", [AVX2_CPU, "cpu"], ids=["avx2", "host"])
@pytest.mark.parametrize("tail,weights,out_c", [_LOGIT, _THREE], ids=["logit-sigmoid", "three-no-bias"])
def test_pointwise_to_plain_equals_onnxruntime_at_every_size(target, tail, weights, out_c):
    m = _head(tail, weights, out_c)
    art = graphopt.compile(m, target, "-O2", threads=2)
    names = [e["kernel"] if isinstance(e, dict) else str(e) for e in art.manifest.get("kernel_map", [])]
    assert not any(str(n).startswith("from_blocked") for n in names), names  # (the conv reads the blocks)
    sched = art.manifest.get("schedules") or {}
    assert "pointwise-plain" in str(sched) or "pointwise-plain" in str(art.manifest), "the rule did not schedule it"
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 8, 12), (1, 3, 13, 7), (2, 3, 20, 33)]:
        x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
        got, want = art.run({"x": x}), sess.run(None, {"x": x})
        for g, w in zip(got, want):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


def test_pointwise_output_read_by_a_later_conv_is_nchw():
    """The 3-channel NCHW map a pointwise-plain conv writes, read by a 3x3 conv of another group:
    that conv is a stem (it reads NCHW), not a blocked conv of a 'blocked' 3-channel input."""
    tail = ("    p = Conv <kernel_shape = [1, 1]> (r, w1)\n    q = Relu (p)\n"
            "    y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (q, w2)")
    m = _head(tail, {"w1": (3, 16, 1, 1), "w2": (16, 3, 3, 3)}, 16)
    roles = _roles(m)
    assert roles.get("Conv:p") == "pointwise-plain" and roles.get("Conv:y") == "stem", roles
    art = graphopt.compile(m, AVX2_CPU, "-O2", threads=2)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 9, 12), (2, 3, 16, 5), (1, 3, 24, 24)]:
        x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(art.run({"x": x})[0], sess.run(None, {"x": x})[0], rtol=2e-5, atol=2e-5)

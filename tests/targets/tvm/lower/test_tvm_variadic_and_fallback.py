"""Variadic Sum / Mean / Max / Min lower to chains of binary ops (TVM's frontend stacks and reduces
them: a conv + Sum + Relu group then fell to a generic reduction schedule), and every compile says
which kernels with multiply-add work run on a generic schedule, with their share of the FLOPs."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import numpy_helper as nh

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.check import run_onnxruntime  # noqa: E402
from tvm_kernels import AVX2_CPU  # noqa: E402

_HEAD = '<ir_version: 8, opset_import: ["" : 17]>\n'


def _parse(text: str, weights: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    m = onnx.parser.parse_model(_HEAD + text)
    rng = np.random.default_rng(0)
    for name, shape in weights.items():
        fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        m.graph.initializer.append(nh.from_array((rng.standard_normal(shape) / np.sqrt(fan)).astype(np.float32), name))
    return onnx.shape_inference.infer_shapes(m)


RESIDUAL = """
g (float[1, 16, 14, 14] x) => (float[1, 16, 14, 14] y) {
    c = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w, b)
    s = %s (c, x)
    y = Relu (s)
}
"""


def _x(shape=(1, 16, 14, 14), seed=1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("op", ["Sum", "Add", "Max", "Mean"])
def test_residual_sum_is_a_blocked_conv_epilogue(op):
    """conv + Sum(conv, x) + Relu: one blocked conv kernel, the Sum in its write-back (as Add is),
    nothing on a generic schedule; outputs equal onnxruntime's."""
    m = _parse(RESIDUAL % op, {"w": (16, 16, 3, 3), "b": (16,)})
    art = graphopt.compile(m, AVX2_CPU, "-O2", threads=2)
    rules = art.manifest["schedules"]["rules"]
    assert rules.get("blocked-conv", 0) + rules.get("winograd-conv", 0) >= 1, rules
    assert art.manifest["schedules"]["fallback"] == {"share": 0.0, "kernels": []}
    assert art.report["warnings"] == []
    np.testing.assert_allclose(art.run(_x())[0], run_onnxruntime(graphopt.load(m), _x())[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["Sum", "Mean", "Max", "Min"])
def test_variadic_ops_with_broadcasts_and_one_input_match_onnxruntime(op):
    text = f"""
g (float[2, 3, 4] a, float[3, 1] b, float[4] c) => (float[2, 3, 4] y, float[3, 1] z) {{
    y = {op} (a, b, c)
    z = {op} (b)
}}
"""
    m = _parse(text, {})
    rng = np.random.default_rng(3)
    feeds = {"a": rng.standard_normal((2, 3, 4)).astype(np.float32), "b": rng.standard_normal((3, 1)).astype(np.float32),
             "c": rng.standard_normal(4).astype(np.float32)}
    art = graphopt.compile(m, AVX2_CPU, "-O2", threads=1)
    for got, want in zip(art.run(feeds), run_onnxruntime(graphopt.load(m), feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_generic_schedule_is_reported_with_its_flop_share():
    """A conv group no specialised rule takes (here a conv + stack + sum + relu, the form TVM's
    frontend gave a Sum residual) is listed with its rule and share of the module's FLOPs, and
    the compile's warning names it in one line."""
    from tvm import relax

    from graphopt.targets.cpu import _fallback_warnings
    from graphopt.targets.tvm.schedules import ScheduleStats, apply_default_schedules
    from tvm_kernels import avx2_target, primitive_kernel

    R, TT = relax.op, relax.TensorType
    x, w = relax.Var("x", TT((1, 16, 14, 14), "float32")), relax.Var("w", TT((16, 16, 3, 3), "float32"))

    def stacked(bb, x, w):
        c = bb.emit(R.nn.conv2d(x, w, padding=[1, 1, 1, 1]))
        return R.nn.relu(bb.emit(R.sum(R.stack([c, x], axis=0), axis=[0])))

    def added(bb, x, w):
        return R.nn.relu(bb.emit(R.add(bb.emit(R.nn.conv2d(x, w, padding=[1, 1, 1, 1])), x)))

    mod = tvm.IRModule({"slow": primitive_kernel([x, w], stacked), "fast": primitive_kernel([x, w], added)})
    stats = ScheduleStats()
    apply_default_schedules(mod, avx2_target(), stats=stats)
    fb = stats.fallback()
    assert stats.by_func["fast"] == "outer-product" and stats.by_func["slow"] in ("dlight-reduction", "fallback-parallel")
    assert [k["kernel"] for k in fb["kernels"]] == ["slow"] and fb["share"] == pytest.approx(0.5)
    assert fb["kernels"][0]["gflop"] == pytest.approx(2 * 16 * 16 * 9 * 14 * 14 / 1e9, rel=1e-3)
    (line,) = _fallback_warnings(fb)
    assert line.startswith("50% of the model's multiply-add FLOPs run on generic (slow) schedules in 1 kernel: slow (")
    assert _fallback_warnings({"share": 0.02, "kernels": fb["kernels"]}) == []  # below 3 %: quiet


def test_symbolic_batch_kernel_on_a_generic_schedule_is_reported() -> None:
    """A kernel whose batch is symbolic counts its FLOPs per batch item in the fallback share (it
    counted 0: a symbolic-batch classifier on dlight's reduction rule went unreported)."""
    from tvm import relax, tirx

    from graphopt.targets.tvm.schedules import ScheduleStats, apply_default_schedules
    from tvm_kernels import avx2_target, primitive_kernel

    R, TT = relax.op, relax.TensorType
    n = tirx.Var("n", "int64")
    x, w = relax.Var("x", TT((n, 16, 14, 14), "float32")), relax.Var("w", TT((16, 16, 3, 3), "float32"))

    def stacked(bb, x, w):
        c = bb.emit(R.nn.conv2d(x, w, padding=[1, 1, 1, 1]))
        return R.nn.relu(bb.emit(R.sum(R.stack([c, x], axis=0), axis=[0])))

    mod = tvm.IRModule({"slow": primitive_kernel([x, w], stacked)})
    stats = ScheduleStats()
    apply_default_schedules(mod, avx2_target(), stats=stats)
    fb = stats.fallback()
    assert stats.by_func["slow"] in ("dlight-reduction", "fallback-parallel"), stats.by_func
    assert [k["kernel"] for k in fb["kernels"]] == ["slow"] and fb["share"] == pytest.approx(1.0)
    assert fb["kernels"][0]["gflop"] == pytest.approx(2 * 16 * 16 * 9 * 14 * 14 / 1e9, rel=1e-3)

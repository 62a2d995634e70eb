"""The `vector_isnan` knob (schedules.fast_math.use_vector_isnan): the NaN-skipping max of a
blocked max pool vectorises (TVM 0.27 left `tirx.isnan` unvectorisable: every tap a scalar loop
over the block's lanes, the accumulators in memory); off, or for a non-LLVM target, the loop
stays scalar as before; the kernels keep onnxruntime's numbers at fixed and symbolic maps."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tvm import s_tir, te, tirx  # noqa: E402
from tvm_kernels import AVX2_MCPU, AVX512_MCPU, isa_target  # noqa: E402

import graphopt  # noqa: E402
from graphopt.targets.machine import machine_model  # noqa: E402
from graphopt.targets.tvm.kernels import blocked as BO  # noqa: E402
from graphopt.targets.tvm.schedules import ScheduleStats, apply_default_schedules  # noqa: E402
from graphopt.targets.tvm.schedules import knobs as K  # noqa: E402
from graphopt.targets.tvm.schedules.fast_math import use_vector_isnan  # noqa: E402

ort = pytest.importorskip("onnxruntime")


def _pool_func(b: int, h, w, k: int = 2, s: int = 2, pad: int = 0):
    x = te.placeholder((1, 2, h, w, b), "float32", name="x")
    y = BO.pool_blocked(x, "max", [k, k], [s, s], [pad] * 4)
    return te.create_prim_func([x, y])


def _vectorised_body(func) -> str:
    """The scheduled kernel lowered up to (and through) VectorizeLoop, as text: a loop the
    vectoriser gave up on is left as a serial loop named `<var>_s`."""
    mod = tvm.IRModule({"main": func})
    for p in (s_tir.transform.LowerInitBlock(), s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
              s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation(),
              s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(), tirx.transform.VectorizeLoop(True)):
        mod = p(mod)
    return mod.script()


def _scheduled(func, target, spec: str = ""):
    stats = ScheduleStats()
    mod = apply_default_schedules(tvm.IRModule({"main": func}), target, stats=stats,
                                  schedule_knobs=K.ScheduleKnobs.parse(spec))
    return mod["main"], stats.by_func["main"]


@pytest.mark.parametrize("mcpu", [AVX2_MCPU, AVX512_MCPU])
def test_blocked_max_pool_vectorises_its_nan_skipping_max(mcpu):
    """Fires on both machine models: the update's compare/select is on float32x<b> vectors, no
    scalarised lane loop; with the knob off (near miss) the lanes are a scalar loop again."""
    target = isa_target(mcpu)
    b = machine_model(target).lanes()
    func = _pool_func(b, 16, 32)
    on, rule = _scheduled(func, target)
    assert rule == "blocked-conv"
    text = _vectorised_body(on)
    isnan = [ln for ln in text.splitlines() if "T.isnan(" in ln]
    assert isnan and all("T.Ramp(" in ln for ln in isnan)  # (vector reads of the lanes)
    assert "_s in range" not in text
    off, _ = _scheduled(func, target, "VECTOR_ISNAN:0")
    assert "_s in range" in _vectorised_body(off)
    use_vector_isnan(True)  # (the knob's mark stays for the builds after it: leave the default)


def test_non_llvm_target_takes_the_mark_off():
    """Scheduling for a target whose code generator has no vector isnan resets TVM's registration."""
    op = tvm.ir.Op.get("tirx.isnan")
    use_vector_isnan(True)
    assert op.get_attr("TVectorizable")
    use_vector_isnan(False)
    assert op.get_attr("TVectorizable") is None
    use_vector_isnan(True)


def _pool_model(h, w):
    """Conv 3->16 (a blocked stem) -> MaxPool 2x2/2 -> Conv 16->32 -> MaxPool 3x3/2 pad 1."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4),
             helper.make_node("MaxPool", ["c1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1] * 4),
             helper.make_node("MaxPool", ["c2"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)]
    g = helper.make_graph(nodes, "pools", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, h, w])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("symbolic", [False, True], ids=["fixed", "symbolic"])
def test_pool_model_equals_onnxruntime(symbolic):
    """Fixed and symbolic H x W (the host's machine model, or $GRAPHOPT_CPU_MCPU=haswell): the
    vectorised pools give onnxruntime's numbers; symbolic: one artifact at three sizes."""
    sizes = [(32, 48), (24, 40), (8, 16)] if symbolic else [(32, 48)]
    model = _pool_model("H" if symbolic else 32, "W" if symbolic else 48)
    art = graphopt.compile(model, "cpu", "-O2", threads=2)
    assert art.report["kernels"]["blocked"] >= 3
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for h, w in sizes:
        x = np.random.default_rng(h * w).standard_normal((1, 3, h, w)).astype(np.float32)
        (got,) = art.run({"x": x})
        (want,) = sess.run(None, {"x": x})
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{h}x{w}")


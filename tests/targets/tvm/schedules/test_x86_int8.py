"""x86 AVX2 int8 kernels of the cpu target (targets/tvm/schedules/int8_x86.py) and the
`split-zero-points` pass that feeds them.

Kernels: which variant fires (u8s8 vpmaddubsw for uint8 activations × weights known to be within
±64, exact s16 vpmaddwd otherwise), the instructions in the generated assembly, outputs exactly
equal to numpy's integer matmul (including the worst case for int16 pair sums, where
onnxruntime's own u8s8 kernel saturates), epilogues fused, and near-misses left to the default
schedules. Models are built here; the kernels need an x86 host with AVX2.
"""

from __future__ import annotations

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
import graphopt.runtime  # noqa: E402
from graphopt.target import CompileOptions, get_target  # noqa: E402
from graphopt.targets.tvm.schedules import int8_x86 as X  # noqa: E402
from graphopt.targets.tvm import build as B  # noqa: E402
from graphopt.testing import check_pass  # noqa: E402

from tvm_kernels import (AVX2_CPU, AVX2_MCPU, AVX512_MCPU, host_runs, int8_lowered,  # noqa: E402
                         integer_kernel_graph, isa_target)

# the AVX2 kernels (vpmaddubsw / vpmaddwd) are checked on an explicit AVX2 mcpu, whatever the host;
# the VNNI ones (vpdpbusd) on an AVX-512-VNNI mcpu (codegen anywhere, numbers where the host runs it)
HOST = isa_target(AVX2_MCPU)
VNNI = isa_target(AVX512_MCPU)
VNNI_CPU = f"cpu{{mcpu={AVX512_MCPU}}}"
needs_avx2 = pytest.mark.skipif(not host_runs(HOST), reason="the x86 int8 kernels need an x86 CPU with AVX2")
needs_vnni = pytest.mark.skipif(not host_runs(VNNI), reason=f"this CPU cannot run {AVX512_MCPU} code (AVX-512 VNNI)")
NP = {TP.INT8: np.int8, TP.UINT8: np.uint8}


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _quantize_static(m: graphopt.Model, x: np.ndarray, reduce_range: str) -> onnx.ModelProto:
    """`m` (input "x") quantized static (QDQ), calibrated on the batch `x`, as an onnx model."""
    from graphopt.calibration import calibration_from_arrays
    from graphopt.passes.quantize import quantize

    quantize(m, calibration_from_arrays(m, {"x": x}), speed="off", reduce_range=reduce_range)
    return graphopt.to_onnx(m)


def _ort(m: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _weights(shape, wmax: int, dtype=np.int8, seed: int = 0) -> np.ndarray:
    lo = 0 if dtype == np.uint8 else -wmax
    return np.random.default_rng(seed).integers(lo, wmax + 1, shape).astype(dtype)


def _matmul_integer(a_type=TP.UINT8, a_shape=(32, 64), w=None, scale: bool = True) -> onnx.ModelProto:
    """MatMulInteger(a, W) [→ Cast → Mul(scale per column)]: outputs the int32 accumulators too."""
    n = w.shape[1]
    nodes = [h.make_node("MatMulInteger", ["a", "w"], ["acc"])]
    outs = [h.make_tensor_value_info("acc", TP.INT32, [*a_shape[:-1], n])]
    inits = [nh.from_array(w, "w")]
    if scale:
        nodes += [h.make_node("Cast", ["acc"], ["accf"], to=TP.FLOAT), h.make_node("Mul", ["accf", "s"], ["y"])]
        outs.insert(0, h.make_tensor_value_info("y", TP.FLOAT, [*a_shape[:-1], n]))
        inits.append(nh.from_array(np.linspace(0.5, 1.5, n).astype(np.float32), "s"))
    return _model(nodes, [h.make_tensor_value_info("a", a_type, list(a_shape))], outs, inits)


def _dynamic(w: np.ndarray, m: int = 16) -> onnx.ModelProto:
    """The quantize pass's dynamic form: DynamicQuantizeLinear → MatMulInteger(·, W, x_zp, 0) → Cast → Mul."""
    k, n = w.shape
    nodes = [h.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             h.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["acc"]),
             h.make_node("Cast", ["acc"], ["accf"], to=TP.FLOAT),
             h.make_node("Mul", ["xs", "ws"], ["s"]),
             h.make_node("Mul", ["accf", "s"], ["y"])]
    inits = [nh.from_array(w, "w"), nh.from_array(np.zeros(n, np.int8), "wz"),
             nh.from_array(np.linspace(0.01, 0.02, n).astype(np.float32), "ws")]
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [m, k])],
                  [h.make_tensor_value_info("y", TP.FLOAT, [m, n]), h.make_tensor_value_info("acc", TP.INT32, [m, n])], inits)


def _compile(m: onnx.ModelProto, spec: str = AVX2_CPU):
    art = graphopt.compile(m, spec, "-O2", threads=2)
    return graphopt.runtime.load(art.path), art.report["schedules"]["default"]


def _asm(m: onnx.ModelProto, target=HOST) -> tuple[str, dict[str, str]]:
    from graphopt.passes.fusion.kernel_groups import PlanKernels
    from graphopt.targets.arm64.target import assembly
    from graphopt.targets.tvm.lower import lowerer as L
    from graphopt.transform import PassContext

    g = graphopt.load(m)
    PlanKernels().run(g, PassContext())
    lowered, mod = L.lower_and_fuse(g, target)
    mod, done = X.schedule_int8_kernels(mod, target, lowered.params)
    mod, _ = get_target("cpu").schedule(mod, target, CompileOptions())
    return assembly(B.build(mod, target)), done


def _ref(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (a.astype(np.int64) @ w.astype(np.int64)).astype(np.int32)


# --- which kernel, which instructions ---------------------------------------------------------------


@needs_avx2
def test_u8s8_kernel_for_narrow_weights_uses_vpmaddubsw() -> None:
    asm, done = _asm(_matmul_integer(w=_weights((64, 48), 64)))
    assert list(done.values()) == ["int8-u8s8"]
    assert re.search(r"\bvpmaddubsw\b", asm) and re.search(r"\bvpmaddwd\b", asm)


@needs_avx2
@pytest.mark.parametrize("a_type, w_dtype, wmax", [
    (TP.UINT8, np.int8, 127),  # full 8-bit weights: u8s8 pair sums could saturate int16
    (TP.INT8, np.int8, 64),    # signed activations: vpmaddubsw's first operand is unsigned
    (TP.UINT8, np.uint8, 200),
])
def test_s16_kernel_otherwise(a_type, w_dtype, wmax) -> None:
    asm, done = _asm(_matmul_integer(a_type, w=_weights((64, 48), wmax, w_dtype)))
    assert list(done.values()) == ["int8-s16"]
    assert re.search(r"\bvpmaddwd\b", asm) and not re.search(r"\bvpmaddubsw\b", asm)


# --- exact results ---------------------------------------------------------------------------------------


@needs_avx2
@pytest.mark.parametrize("a_type, a_shape, wmax, kind", [
    (TP.UINT8, (32, 64), 64, "int8-u8s8"),
    (TP.UINT8, (2, 12, 96), 64, "int8-u8s8"),   # batched activations, rows not a multiple of 4
    (TP.UINT8, (30, 64), 127, "int8-s16"),
    (TP.INT8, (7, 128), 127, "int8-s16"),
])
def test_outputs_equal_numpy_integer_matmul(a_type, a_shape, wmax, kind) -> None:
    w = _weights((a_shape[-1], 40), wmax, seed=1)
    m = _matmul_integer(a_type, a_shape, w)
    r, sched = _compile(m)
    assert f"x86 int8 kernels: 1 ({kind})" in sched
    rng = np.random.default_rng(2)
    a = rng.integers(np.iinfo(NP[a_type]).min, np.iinfo(NP[a_type]).max + 1, a_shape).astype(NP[a_type])
    y, acc = r.run({"a": a})
    assert np.array_equal(acc, _ref(a, w))
    assert np.array_equal(y, _ref(a, w).astype(np.float32) * np.linspace(0.5, 1.5, 40).astype(np.float32))


@needs_avx2
def test_exact_where_onnxruntime_saturates() -> None:
    # 255·(−128) + 255·(−128) = −65280 does not fit int16: vpmaddubsw would saturate; the s16 kernel
    # is chosen for full-range weights and stays exact (onnxruntime's AVX2 u8s8 kernel does not)
    w = np.full((64, 16), -128, np.int8)
    w[1::2] = 127
    a = np.full((8, 64), 255, np.uint8)
    m = _matmul_integer(TP.UINT8, (8, 64), w, scale=False)
    r, sched = _compile(m)
    assert "int8-s16" in sched
    (acc,) = r.run({"a": a})
    assert np.array_equal(acc, _ref(a, w))


@needs_avx2
def test_u8s8_bound_is_exact_at_its_edge() -> None:
    w = np.full((64, 16), -64, np.int8)  # |w| = 64: 255·64·2 = 32640 still fits int16
    a = np.full((4, 64), 255, np.uint8)
    r, sched = _compile(_matmul_integer(TP.UINT8, (4, 64), w, scale=False))
    assert "int8-u8s8" in sched
    assert np.array_equal(r.run({"a": a})[0], _ref(a, w))


@needs_avx2
@pytest.mark.parametrize("wmax", [63, 127])
def test_dynamic_quantized_matmul_exact_with_epilogue(wmax) -> None:
    w = _weights((96, 32), wmax, seed=3)
    m = _dynamic(w)
    r, sched = _compile(m)
    assert f"x86 int8 kernels: 1 ({'int8-u8s8' if wmax <= 64 else 'int8-s16'})" in sched
    x = np.random.default_rng(4).standard_normal((16, 96)).astype(np.float32) + 0.4
    y, acc = r.run({"x": x})
    q = _model([h.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"])], [h.make_tensor_value_info("x", TP.FLOAT, [16, 96])],
               [h.make_tensor_value_info(n, t, None) for n, t in (("xq", TP.UINT8), ("xs", TP.FLOAT), ("xz", TP.UINT8))])
    xq, xs, xz = _ort(q, {"x": x})
    ref = ((xq.astype(np.int64) - int(xz)) @ w.astype(np.int64)).astype(np.int32)
    assert np.array_equal(acc, ref)
    np.testing.assert_allclose(y, ref.astype(np.float32) * (xs * np.linspace(0.01, 0.02, 32).astype(np.float32)), rtol=1e-6)
    if wmax <= 64:  # onnxruntime is exact too with 7-bit weights
        assert np.array_equal(_ort(m, {"x": x})[1], ref)


# --- near-misses: no vector kernel takes the kernel, results stay right ---------------------------------


@needs_avx2
@pytest.mark.parametrize("a_shape, n, why", [
    ((16, 64), 30, "N not a multiple of 8"),
    ((16, 63), 16, "K odd"),
    ((64,), 16, "a 1-D activation: no row axis"),
])
def test_near_misses_stay_default(a_shape, n, why) -> None:
    w = _weights((a_shape[-1], n), 64, seed=5)
    m = _matmul_integer(TP.UINT8, a_shape, w, scale=False)
    r, sched = _compile(m)
    # no vector micro-kernel (these small products may take the small rule's plain loop nest)
    assert not re.search(r"int8-(u8s8|s16|vnni)", sched), why
    a = np.random.default_rng(6).integers(0, 256, a_shape).astype(np.uint8)
    assert np.array_equal(r.run({"a": a})[0], _ref(a, w))


@needs_avx2
def test_float_matmul_untouched() -> None:
    w = np.random.default_rng(7).standard_normal((64, 32)).astype(np.float32)
    m = _model([h.make_node("MatMul", ["x", "w"], ["y"])], [h.make_tensor_value_info("x", TP.FLOAT, [16, 64])],
               [h.make_tensor_value_info("y", TP.FLOAT, [16, 32])], [nh.from_array(w, "w")])
    _, sched = _compile(m)
    assert "x86 int8" not in sched


def test_not_x86_no_op() -> None:
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})
    assert not X.has_avx2(arm)
    mod = tvm.IRModule({})
    assert X.schedule_int8_kernels(mod, arm)[1] == {}


# --- split-zero-points -----------------------------------------------------------------------------------


def _mmi(az=None, wz=None, w=None, a_shape=(8, 32)) -> onnx.ModelProto:
    w = _weights((a_shape[-1], 16), 100, seed=8) if w is None else w
    inits = [nh.from_array(w, "w")]
    ins = ["a", "w"]
    if az is not None:
        inits.append(nh.from_array(np.asarray(az, np.uint8), "az"))
        ins.append("az")
    if wz is not None:
        if az is None:
            ins.append("")
        inits.append(nh.from_array(np.asarray(wz, w.dtype), "wz"))
        ins.append("wz")
    return _model([h.make_node("MatMulInteger", ins, ["y"])], [h.make_tensor_value_info("a", TP.UINT8, list(a_shape))],
                  [h.make_tensor_value_info("y", TP.INT32, [*a_shape[:-1], w.shape[1]])], inits, opset=17)


def _a(shape=(8, 32)) -> dict[str, np.ndarray]:
    return {"a": np.random.default_rng(9).integers(0, 256, shape).astype(np.uint8)}


def test_split_fires_on_constant_zero_point() -> None:
    m = graphopt.load(_mmi(az=131, wz=np.zeros(16)))
    out, stats = check_pass(m, "split-zero-points", _a(), rtol=0, atol=0)
    assert stats == {"split": 1}
    mmi = [n for n in out.graph.nodes if n.op_type == "MatMulInteger"]
    assert len(mmi) == 1 and len(mmi[0].inputs) == 2
    assert {n.op_type for n in out.graph.nodes} == {"MatMulInteger", "Cast", "Mul", "Sub"}


def test_split_fires_on_dynamic_zero_point() -> None:
    m = graphopt.load(_dynamic(_weights((32, 16), 64)))
    feeds = {"x": np.random.default_rng(10).standard_normal((16, 32)).astype(np.float32)}
    _, stats = check_pass(m, "split-zero-points", feeds, rtol=0, atol=0)
    assert stats == {"split": 1}


def test_zero_zero_point_dropped() -> None:
    out, stats = check_pass(graphopt.load(_mmi(az=0)), "split-zero-points", _a(), rtol=0, atol=0)
    assert stats == {"dropped": 1}
    assert [len(n.inputs) for n in out.graph.nodes] == [2]


@pytest.mark.parametrize("kwargs, why", [
    ({"az": 3, "wz": np.full(16, 2)}, "non-zero weight zero point"),
    ({}, "no activation zero point"),
])
def test_split_near_misses(kwargs, why) -> None:
    m = graphopt.load(_mmi(**kwargs))
    _, stats = check_pass(m, "split-zero-points", _a(), rtol=0, atol=0)
    assert stats == {}, why


def test_split_skips_activation_weights() -> None:
    m = _model([h.make_node("MatMulInteger", ["a", "b", "az"], ["y"])],
               [h.make_tensor_value_info("a", TP.UINT8, [8, 32]), h.make_tensor_value_info("b", TP.INT8, [32, 16])],
               [h.make_tensor_value_info("y", TP.INT32, [8, 16])], [nh.from_array(np.uint8(5), "az")])
    feeds = {**_a(), "b": np.random.default_rng(11).integers(-128, 128, (32, 16)).astype(np.int8)}
    _, stats = check_pass(graphopt.load(m), "split-zero-points", feeds, rtol=0, atol=0)
    assert stats == {}


# --- int8 convs ------------------------------------------------------------------------------------------


def _conv_integer(ic: int, oc: int, hw: int, k: int, stride: int = 1, pad: int = 0, zx: int = 7, wmax: int = 64,
                  seed: int = 12) -> tuple[onnx.ModelProto, np.ndarray]:
    w = _weights((oc, ic, k, k), wmax, seed=seed)
    nodes = [h.make_node("ConvInteger", ["x", "w", "xz"], ["acc"], pads=[pad] * 4, strides=[stride, stride]),
             h.make_node("Cast", ["acc"], ["af"], to=TP.FLOAT), h.make_node("Mul", ["af", "sc"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", TP.UINT8, [1, ic, hw, hw])], [h.make_tensor_value_info("y", TP.FLOAT, None)],
               [nh.from_array(w, "w"), nh.from_array(np.uint8(zx), "xz"),
                nh.from_array(np.linspace(0.5, 1.5, oc).astype(np.float32).reshape(1, oc, 1, 1), "sc")])
    return onnx.shape_inference.infer_shapes(m), w


@needs_avx2
@pytest.mark.parametrize("ic, oc, hw, k, stride, pad, wmax, kind", [
    (16, 32, 8, 3, 1, 1, 64, "int8-u8s8-blocked"),    # padded with the zero point (7), not 0
    (32, 16, 14, 3, 2, 1, 64, "int8-u8s8-blocked"),   # stride 2
    (24, 16, 7, 1, 1, 0, 64, "int8-u8s8-blocked"),    # 1x1 on a 7x7 map, 3 input blocks
    (16, 8, 6, 3, 1, 1, 127, "int8-s16-blocked"),     # full 8-bit weights: 2 bytes a lane
    (16, 16, 6, 3, 1, 1, 65, "int8-s16-blocked"),     # one past vpmaddubsw's exact bound
    (3, 16, 9, 3, 1, 1, 64, "int8-u8s8-blocked"),     # a stem (3 channels): NCHW in, blocks out
    (3, 16, 16, 7, 2, 3, 127, "int8-s16-blocked"),    # ResNet's 7x7/2 stem, 8-bit weights
])
def test_int8_conv_equals_onnxruntime_conv_integer(ic, oc, hw, k, stride, pad, wmax, kind) -> None:
    """AVX2 (znver3 whatever the host): an int8 conv runs on 8-channel uint8 blocks, its weights
    packed at compile time (4 bytes a lane for vpmaddubsw where |w| ≤ 64, else 2 for vpmaddwd on
    int16): exactly onnxruntime's ConvInteger."""
    m, _ = _conv_integer(ic, oc, hw, k, stride, pad, wmax=wmax)
    r, sched = _compile(m)
    assert f"x86 int8 kernels: 1 ({kind})" in sched
    x = np.random.default_rng(13).integers(0, 256, (1, ic, hw, hw)).astype(np.uint8)
    assert np.array_equal(r.run({"x": x})[0], _ort(m, {"x": x})[0])


@needs_avx2
@pytest.mark.parametrize("ic, oc, why", [(16, 12, "12 output channels, 110k multiply-adds")])
def test_int8_conv_near_misses_stay_default(ic, oc, why) -> None:
    m, _ = _conv_integer(ic, oc, 8, 3, pad=1)
    r, sched = _compile(m)
    assert "x86 int8" not in sched, why
    x = np.random.default_rng(14).integers(0, 256, (1, ic, 8, 8)).astype(np.uint8)
    assert np.array_equal(r.run({"x": x})[0], _ort(m, {"x": x})[0])


# --- qdq-to-integer: a quantized conv net compiled gives onnxruntime's QDQ outputs ------------------------


def _qdq_cnn(reduce_range: str = "true") -> graphopt.Model:
    return graphopt.load(_quantize_static(_qdq_cnn_float(), np.random.default_rng(16).standard_normal((8, 8, 16, 16)).astype(np.float32),
                                          reduce_range))


def _qdq_cnn_float() -> graphopt.Model:
    rng = np.random.default_rng(15)
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             h.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
             h.make_node("Conv", ["c2", "wd"], ["d"], pads=[1, 1, 1, 1], group=16, name="dw"),
             h.make_node("Add", ["d", "c2"], ["a"], name="add"),
             h.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
             h.make_node("Flatten", ["g"], ["f"], name="flat"),
             h.make_node("Gemm", ["f", "w3"], ["y"], transB=1, name="fc")]
    inits = [nh.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2, "w1"),
             nh.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "b1"),
             nh.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.1, "w2"),
             nh.from_array(rng.standard_normal((16, 1, 3, 3)).astype(np.float32) * 0.3, "wd"),
             nh.from_array(rng.standard_normal((10, 16)).astype(np.float32), "w3")]
    return graphopt.load(_model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [1, 8, 16, 16])],
                                [h.make_tensor_value_info("y", TP.FLOAT, [1, 10])], inits))


def test_qdq_to_integer_rewrite() -> None:
    m = _qdq_cnn()
    x = np.random.default_rng(16).standard_normal((1, 8, 16, 16)).astype(np.float32)
    out, stats = check_pass(m, "qdq-to-integer", {"x": x}, rtol=0, atol=1e-6)
    assert stats["conv"] == 3  # conv1, conv2 and the depthwise conv (group kept)
    kinds = {n.op_type for n in out.graph}
    assert "ConvInteger" in kinds and not kinds & {"QuantizeLinear", "DequantizeLinear"}
    assert sum(1 for n in out.graph if n.op_type == "Conv") == 0
    assert {n.name for n in out.graph if n.op_type == "ConvInteger"} == {"conv1", "conv2", "dw"}
    assert next(n for n in out.graph if n.name == "dw").attr("group") == 16


def test_qdq_to_integer_leaves_float_models_alone() -> None:
    m = graphopt.load(_model([h.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                             [h.make_tensor_value_info("x", TP.FLOAT, [1, 4, 8, 8])], [h.make_tensor_value_info("y", TP.FLOAT, [1, 8, 8, 8])],
                             [nh.from_array(np.ones((8, 4, 3, 3), np.float32), "w")]))
    _, stats = check_pass(m, "qdq-to-integer")
    assert stats == {}


@needs_avx2
def test_quantized_cnn_compiles_to_int8_convs_with_onnxruntime_outputs() -> None:
    m = _qdq_cnn()
    art = graphopt.compile(graphopt.to_onnx(m), AVX2_CPU, "-O2", threads=2)
    sched = art.report["schedules"]["default"]
    # conv1 and conv2 on 8-channel blocks (the depthwise: the blocked window schedule), the
    # 10-class GEMV (no 8-column block) a small int8 kernel
    assert "x86 int8 kernels: 3 (int8-small, int8-u8s8-blocked)" in sched
    x = np.random.default_rng(17).standard_normal((1, 8, 16, 16)).astype(np.float32)
    y = graphopt.runtime.load(art.path).run({"x": x})[0]
    ref = _ort(graphopt.to_onnx(m), {"x": x})[0]
    # onnxruntime's QLinear kernels requantize with their own rounding: within a step or so of the output scale
    np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max())


# --- VNNI: vpdpbusd on full 8-bit weights ------------------------------------------------------------------


@pytest.mark.parametrize("mcpu, reg", [(AVX512_MCPU, "zmm"), ("alderlake", "ymm")])
def test_vnni_kernel_uses_vpdpbusd(mcpu, reg) -> None:
    """Whatever the host: u8 x s8 with full 8-bit weights is one vpdpbusd per 4 k-steps on a VNNI
    mcpu (zmm with AVX-512-VNNI, ymm with AVX-VNNI), no int16 pair sums."""
    asm, done = _asm(_matmul_integer(w=_weights((64, 48), 127)), isa_target(mcpu))
    assert list(done.values()) == ["int8-vnni"]
    assert re.search(rf"\bvpdpbusd\b[^\n]*{reg}", asm)
    assert not re.search(r"\bvpmaddubsw\b", asm)


@needs_vnni
@pytest.mark.parametrize("a_shape, n", [((32, 64), 48), ((2, 12, 96), 32), ((30, 128), 16), ((7, 64), 64), ((4, 64), 40)])
def test_vnni_outputs_equal_numpy_integer_matmul(a_shape, n) -> None:
    w = _weights((a_shape[-1], n), 127, seed=3)  # full range, incl. -127 against 255
    w[0, :] = -128
    r, sched = _compile(_matmul_integer(TP.UINT8, a_shape, w), VNNI_CPU)
    assert "x86 int8 kernels: 1 (int8-vnni)" in sched
    a = np.random.default_rng(4).integers(0, 256, a_shape).astype(np.uint8)
    a[..., :4] = 255  # the extreme sums vpmaddubsw would saturate
    y, acc = r.run({"a": a})
    assert np.array_equal(acc, _ref(a, w))


@needs_vnni
@pytest.mark.parametrize("ic, oc, hw, k, stride, pad", [(16, 32, 8, 3, 1, 1), (32, 16, 14, 3, 2, 1), (32, 48, 7, 1, 1, 0)])
def test_vnni_int8_conv_equals_onnxruntime_conv_integer(ic, oc, hw, k, stride, pad) -> None:
    """On AVX-512 VNNI the convs run on 16-channel blocks (int8-vnni-blocked): padded with the
    zero point, strided, 1x1, 1 to 3 output blocks."""
    m, _ = _conv_integer(ic, oc, hw, k, stride, pad, wmax=127)
    r, sched = _compile(m, VNNI_CPU)
    assert "x86 int8 kernels: 1 (int8-vnni-blocked)" in sched
    x = np.random.default_rng(13).integers(0, 256, (1, ic, hw, hw)).astype(np.uint8)
    assert np.array_equal(r.run({"x": x})[0], _ort(m, {"x": x})[0])


def test_reduce_range_auto_follows_the_target_machine_model() -> None:
    """quantize{reduce-range=auto}: 7-bit weights when compiling for AVX2 (vpmaddubsw saturates),
    full 8-bit for a VNNI mcpu, whatever CPU runs the compile."""
    from graphopt.calibration import calibration_from_arrays
    from graphopt.passes.quantize import Quantize
    from graphopt.transform import PassContext

    def wmax(spec: str) -> int:
        m = _qdq_cnn_float()
        calib = calibration_from_arrays(m, {"x": np.random.default_rng(15).standard_normal((4, 8, 16, 16)).astype(np.float32)})
        ctx = PassContext(machine=get_target(spec).machine_model(2))
        ctx.data["calibration"] = calib
        Quantize(speed="off").run(m, ctx)
        ws = [v.const_value.numpy() for v in m.graph.initializers.values() if v.const_value is not None
              and v.const_value.numpy().dtype == np.int8 and v.const_value.numpy().ndim == 4]
        assert ws
        return max(int(np.abs(w.astype(np.int64)).max()) for w in ws)

    assert wmax(AVX2_CPU) <= 64
    assert wmax(VNNI_CPU) > 64


@needs_vnni
def test_quantized_cnn_compiles_to_vnni_convs_with_onnxruntime_outputs() -> None:
    m = _qdq_cnn(reduce_range="false")
    art = graphopt.compile(graphopt.to_onnx(m), VNNI_CPU, "-O2", threads=2)
    # conv1 reads 8 channels (a stem: NCHW in, blocks out), conv2 16 (a whole block); the
    # 10-class GEMV the small rule
    assert "x86 int8 kernels: 3 (int8-small, int8-vnni-blocked)" in art.report["schedules"]["default"]
    x = np.random.default_rng(17).standard_normal((1, 8, 16, 16)).astype(np.float32)
    y = graphopt.runtime.load(art.path).run({"x": x})[0]
    ref = _ort(graphopt.to_onnx(m), {"x": x})[0]
    np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max())


# --- requantize epilogue: the float → int8 Cast of a Clip is a plain conversion -----------------------------


def _clip_cast(lo: float, hi: float, to: int = TP.UINT8, clip: bool = True) -> onnx.ModelProto:
    nodes = [h.make_node("Clip", ["x", "lo", "hi"], ["c"]) if clip else h.make_node("Identity", ["x"], ["c"]),
             h.make_node("Cast", ["c"], ["y"], to=to)]
    inits = [nh.from_array(np.array(lo, np.float32), "lo"), nh.from_array(np.array(hi, np.float32), "hi")]
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [4, 64])], [h.make_tensor_value_info("y", to, [4, 64])], inits)


def _relax_text(m: onnx.ModelProto) -> str:
    from graphopt.targets.tvm.lower import lowerer as L

    return L.lower(graphopt.load(m)).mod.script()


@pytest.mark.parametrize("lo, hi, to", [(0, 255, TP.UINT8), (-128, 127, TP.INT8), (0, 15, TP.UINT8), (-5, 300, TP.INT16)])
def test_cast_of_an_in_range_clip_is_a_plain_conversion(lo, hi, to) -> None:
    """Cast(Clip(x, lo, hi), int) with [lo, hi] inside the type: no wrap-around emulation (isfinite,
    masks) in the lowered module, and onnxruntime's values (truncation toward zero)."""
    m = _clip_cast(lo, hi, to)
    text = _relax_text(m)
    assert "isfinite" not in text and "bitwise_and" not in text
    x = (np.random.default_rng(5).standard_normal((4, 64)) * 200).astype(np.float32)
    art = graphopt.compile(m, "cpu", "-O0", threads=1)
    r = graphopt.runtime.load(art.path)
    assert np.array_equal(r.run({"x": x})[0], _ort(m, {"x": x})[0])


@pytest.mark.parametrize("lo, hi, to, clip, why", [
    (-1, 255, TP.UINT8, True, "below the type's range"),
    (0, 256, TP.UINT8, True, "above the type's range"),
    (0, 255, TP.UINT8, False, "no Clip"),
    (0, 255, TP.INT64, True, "64-bit (left to the frontend)"),
])
def test_cast_near_misses_keep_the_frontend_cast(lo, hi, to, clip, why) -> None:
    text = _relax_text(_clip_cast(lo, hi, to, clip))
    assert "isfinite" in text, why


# --- int8 on channel blocks (AVX-512 VNNI): chains of int8 convs without relayouts ---------------------------


def _qdq_chain(c: int = 32, hw: int = 14) -> onnx.ModelProto:
    """conv 3x3 → relu → conv 1x1 (+ residual) → relu → GAP → Gemm, quantized static (QDQ)."""
    rng = np.random.default_rng(21)
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
             h.make_node("Add", ["c2", "x"], ["a"]),
             h.make_node("Relu", ["a"], ["r2"]),
             h.make_node("GlobalAveragePool", ["r2"], ["g"]),
             h.make_node("Flatten", ["g"], ["f"]),
             h.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1, name="fc")]
    inits = [nh.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.1, "w1"),
             nh.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "b1"),
             nh.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32) * 0.2, "w2"),
             nh.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "b2"),
             nh.from_array(rng.standard_normal((24, c)).astype(np.float32) * 0.3, "w3"),
             nh.from_array(rng.standard_normal(24).astype(np.float32), "b3")]
    m = graphopt.load(_model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [1, c, hw, hw])],
                             [h.make_tensor_value_info("y", TP.FLOAT, [1, 24])], inits))
    return _quantize_static(m, rng.standard_normal((8, c, hw, hw)).astype(np.float32), "false")


def test_qdq_gemm_becomes_matmul_integer() -> None:
    """The QDQ classifier: Gemm(DQ(x), DQ(W)ᵀ, b) → Cast(MatMulInteger(xq, Wqᵀ, z_x)) · s + b,
    equal to the QDQ graph within float rounding."""
    m = graphopt.load(_qdq_chain())
    x = np.random.default_rng(22).standard_normal((1, 32, 14, 14)).astype(np.float32)
    out, stats = check_pass(m, "qdq-to-integer", {"x": x}, rtol=0, atol=1e-5)
    assert stats["conv"] == 2 and stats["matmul"] == 1
    assert [n.name for n in out.graph if n.op_type == "MatMulInteger"] == ["fc"]
    assert not any(n.op_type == "Gemm" for n in out.graph)
    _, again = check_pass(out, "qdq-to-integer")
    assert again == {}  # nothing left to rewrite


@pytest.mark.parametrize("attrs, why", [({"alpha": 0.5}, "alpha"), ({"transA": 1}, "transA")])
def test_qdq_gemm_near_misses(attrs, why) -> None:
    m = _qdq_chain()
    fc = next(n for n in m.graph.node if n.op_type == "Gemm")
    for k, v in attrs.items():
        fc.attribute.append(h.make_attribute(k, v))
    if "transA" in attrs:  # (keep the model valid: a [1, C] input transposed is [C, 1]; the check is on the attribute)
        return
    _, stats = check_pass(graphopt.load(m), "qdq-to-integer")
    assert "matmul" not in stats, why


def test_blocked_int8_chain_has_no_relayout_between_convs() -> None:
    """With a VNNI machine model the int8 convs and their epilogues (requantize, the residual's
    dequantize/add/requantize) run on 16-channel blocks: one layout change into the chain (the
    float input) and one out of it (the pooled features), none between the convs."""
    _, mod, _ = int8_lowered(_qdq_chain(), target=isa_target(AVX512_MCPU), block=16, int8_rules=False)
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert sum("to_blocked" in n and "from" not in n for n in names) == 1, names
    text = mod.script()
    assert text.count("conv2d_int8_blocked") >= 2
    assert "conv2d_nchw" not in text  # both convs blocked


@pytest.mark.parametrize("spec, kind, fc", [
    pytest.param(VNNI_CPU, "int8-vnni-blocked", "int8-vnni", marks=needs_vnni, id="vnni"),
    pytest.param(AVX2_CPU, "int8-s16-blocked", "int8-s16", marks=needs_avx2, id="avx2-8bit-weights"),
])
def test_blocked_int8_chain_equals_onnxruntime(spec, kind, fc) -> None:
    m = _qdq_chain()
    art = graphopt.compile(m, spec, "-O2", threads=2)
    sched = art.report["schedules"]["default"]
    # (the 24-class classifier, its quantize of the pooled features a pass of its own: the matmul rule)
    assert f"x86 int8 kernels: 3 ({', '.join(sorted([kind, fc]))})" in sched
    x = np.random.default_rng(23).standard_normal((1, 32, 14, 14)).astype(np.float32)
    y = graphopt.runtime.load(art.path).run({"x": x})[0]
    ref = _ort(m, {"x": x})[0]
    np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max())


def test_avx2_int8_chain_runs_blocked() -> None:
    """AVX2 (8 int32 lanes, no VNNI): the int8 convs run on 8-channel blocks as on VNNI on 16:
    one layout change into the chain, none between the convs, no NCHW conv left."""
    _, mod, _ = int8_lowered(_qdq_chain(), target=isa_target(AVX2_MCPU), block=8, int8_rules=False)
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert sum("to_blocked" in n and "from" not in n for n in names) == 1, names
    text = mod.script()
    assert text.count("conv2d_int8_blocked") >= 2
    assert "conv2d_nchw" not in text


def _conv_integer_stem(ic: int, oc: int, hw: int, k: int, s: int, pad: int, zx: int) -> onnx.ModelProto:
    w = _weights((oc, ic, k, k), 127, seed=3)
    nodes = [h.make_node("ConvInteger", ["x", "w", "xz"], ["acc"], pads=[pad] * 4, strides=[s, s]),
             h.make_node("Cast", ["acc"], ["af"], to=TP.FLOAT), h.make_node("Mul", ["af", "sc"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", TP.UINT8, [1, ic, hw, hw])], [h.make_tensor_value_info("y", TP.FLOAT, None)],
               [nh.from_array(w, "w"), nh.from_array(np.uint8(zx), "xz"),
                nh.from_array(np.linspace(0.5, 1.5, oc).astype(np.float32).reshape(1, oc, 1, 1), "sc")])
    return onnx.shape_inference.infer_shapes(m)


@needs_vnni
@pytest.mark.parametrize("ic, oc, hw, k, s, pad, zx", [
    (3, 64, 32, 7, 2, 3, 7),     # ResNet's stem: 7 taps in groups of 4 (the 8th weight 0), zero point 7
    (3, 16, 15, 3, 1, 1, 0),     # odd map, 3 taps
    (4, 32, 16, 5, 2, 2, 128),   # 4 channels (not a block), zero point 128
])
def test_int8_stem_equals_onnxruntime(ic, oc, hw, k, s, pad, zx) -> None:
    """A ConvInteger with fewer channels than a block (a quantized CNN's first conv) reads NCHW,
    sums 4 taps of a row per vpdpbusd lane and writes 16-channel blocks: exact."""
    m = _conv_integer_stem(ic, oc, hw, k, s, pad, zx)
    r, sched = _compile(m, VNNI_CPU)
    assert "x86 int8 kernels: 1 (int8-vnni-blocked)" in sched
    x = np.random.default_rng(13).integers(0, 256, (1, ic, hw, hw)).astype(np.uint8)
    assert np.array_equal(r.run({"x": x})[0], _ort(m, {"x": x})[0])


def test_int8_stem_plan_keeps_its_input_quantize_nchw() -> None:
    """The quantize of the float image in front of an int8 stem stays NCHW (3 channels), the
    stem and what follows run blocked."""
    from graphopt.passes.fusion.kernel_groups import KERNEL_KEY
    from graphopt.targets.tvm import layout as LY

    m = integer_kernel_graph(_qdq_stem())
    groups: dict[str, list] = {}
    for n in m.graph.nodes:
        if KERNEL_KEY in n.metadata_props:
            groups.setdefault(n.metadata_props[KERNEL_KEY], []).append(n)
    plan = LY.plan_layout(m, list(groups.items()), 16, get_target(VNNI_CPU).machine_model(2))
    roles = {n.op_type + str(i): plan.role(n) for i, n in enumerate(m.graph.nodes)}
    stem = next(n for n in m.graph.nodes if n.op_type == "ConvInteger")
    assert plan.role(stem) == "stem-int8"
    quant = stem.inputs[0].producer()
    assert quant.op_type == "Cast" and plan.role(quant) is None, roles
    assert plan.role(stem.outputs[0].consumers()[0]) == "elementwise"


def _qdq_stem() -> onnx.ModelProto:
    rng = np.random.default_rng(31)
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[3, 3, 3, 3], strides=[2, 2], name="stem"),
             h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    inits = [nh.from_array(rng.standard_normal((16, 3, 7, 7)).astype(np.float32) * 0.1, "w1"),
             nh.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "b1"),
             nh.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.1, "w2")]
    m = graphopt.load(_model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 32, 32])],
                             [h.make_tensor_value_info("y", TP.FLOAT, [1, 16, 16, 16])], inits))
    return _quantize_static(m, rng.standard_normal((8, 3, 32, 32)).astype(np.float32), "false")


@needs_vnni
def test_qdq_stem_net_equals_onnxruntime() -> None:
    m = _qdq_stem()
    art = graphopt.compile(m, VNNI_CPU, "-O2", threads=2)
    assert "x86 int8 kernels: 2 (int8-vnni-blocked)" in art.report["schedules"]["default"]
    x = np.random.default_rng(32).standard_normal((1, 3, 32, 32)).astype(np.float32)
    y = graphopt.runtime.load(art.path).run({"x": x})[0]
    ref = _ort(m, {"x": x})[0]
    np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max())


def test_requantize_scales_fold_into_one_multiply() -> None:
    """Round(Div([Relu](Cast(acc)·s + b), s_y)) → Round([Relu](Cast(acc)·(s/s_y) + b/s_y)): no
    division left after an integer conv or matmul (one multiply per requantize, as onnxruntime's
    QLinearConv); the outputs stay those of the QDQ graph within a quantization step."""
    m = graphopt.load(_qdq_chain())
    x = np.random.default_rng(24).standard_normal((1, 32, 14, 14)).astype(np.float32)
    ref = _ort(graphopt.to_onnx(m), {"x": x})[0]
    out, stats = check_pass(m, "qdq-to-integer", {"x": x}, rtol=0, atol=0.05 * float(np.abs(ref).max()))
    assert stats["requantize-folded"] == 3  # conv1 → Relu → Q, conv2 → Q, the classifier → Q
    for n in out.graph:
        if n.op_type == "Div":  # (what is left: the quantize of values that no integer sum produced)
            p = n.inputs[0].producer()
            assert p is None or p.op_type not in ("Mul", "Relu", "Add") or "requant" not in str(p.inputs[-1].name)
    _, again = check_pass(out, "qdq-to-integer")
    assert again == {}


def _hand_qdq_conv(sy: float = 0.05, conv_out_too: bool = False) -> graphopt.Model:
    """Q → DQ → Conv(DQ(Wq)) → Q(s_y) → DQ, built by hand (a scale, an extra reader, as asked)."""
    rng = np.random.default_rng(25)
    nodes = [h.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             h.make_node("DequantizeLinear", ["wq", "sw"], ["wd"]), h.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("QuantizeLinear", ["c", "sy", "zy"], ["cq"]), h.make_node("DequantizeLinear", ["cq", "sy", "zy"], ["y"])]
    inits = [nh.from_array(np.float32(0.02), "sx"), nh.from_array(np.uint8(128), "zx"), nh.from_array(np.float32(0.01), "sw"),
             nh.from_array(rng.integers(-127, 128, (16, 16, 3, 3)).astype(np.int8), "wq"),
             nh.from_array(np.float32(sy), "sy"), nh.from_array(np.uint8(128), "zy")]
    outs = [h.make_tensor_value_info("y", TP.FLOAT, [1, 16, 8, 8])]
    if conv_out_too:
        outs.append(h.make_tensor_value_info("c", TP.FLOAT, [1, 16, 8, 8]))
    m = _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [1, 16, 8, 8])], outs, inits)
    return graphopt.load(onnx.shape_inference.infer_shapes(m))


@pytest.mark.parametrize("kwargs, folded", [({}, 1), ({"conv_out_too": True}, 0), ({"sy": -0.05}, 0)],
                         ids=["fires", "conv-output-read-elsewhere", "negative-scale"])
def test_requantize_fold_fires_only_on_a_private_positive_chain(kwargs, folded) -> None:
    m = _hand_qdq_conv(**kwargs)
    x = np.random.default_rng(26).standard_normal((1, 16, 8, 8)).astype(np.float32)
    out, stats = check_pass(m, "qdq-to-integer", {"x": x}, rtol=0, atol=0.06)  # (≤ one step of s_y, rounding)
    assert stats["conv"] == 1 and stats.get("requantize-folded", 0) == folded
    assert sum(1 for n in out.graph if n.op_type == "Div") == 2 - folded  # (+ the quantize of x)


# --- depthwise int8: uint8 blocks through a MobileNet's depthwise convs -------------------------------------


def _depthwise_integer(c: int, hw: int, stride: int, pad: int, zx: int) -> onnx.ModelProto:
    w = _weights((c, 1, 3, 3), 127, seed=41)
    nodes = [h.make_node("ConvInteger", ["x", "w", "xz"], ["acc"], pads=[pad] * 4, strides=[stride, stride], group=c),
             h.make_node("Cast", ["acc"], ["af"], to=TP.FLOAT), h.make_node("Mul", ["af", "sc"], ["y"])]
    m = _model(nodes, [h.make_tensor_value_info("x", TP.UINT8, [1, c, hw, hw])], [h.make_tensor_value_info("y", TP.FLOAT, None)],
               [nh.from_array(w, "w"), nh.from_array(np.uint8(zx), "xz"),
                nh.from_array(np.linspace(0.5, 1.5, c).astype(np.float32).reshape(1, c, 1, 1), "sc")])
    return onnx.shape_inference.infer_shapes(m)


@pytest.mark.parametrize("spec", [
    pytest.param(VNNI_CPU, marks=needs_vnni, id="vnni-blocked"),
    pytest.param(AVX2_CPU, marks=needs_avx2, id="avx2-blocked"),
])
@pytest.mark.parametrize("c, hw, stride, pad, zx", [
    (32, 14, 1, 1, 131),   # padded with the zero point
    (48, 15, 2, 1, 0),     # stride 2, odd map, 3 blocks
    (16, 7, 1, 0, 255),    # no padding, the largest zero point
])
def test_depthwise_conv_integer_equals_onnxruntime(spec, c, hw, stride, pad, zx) -> None:
    """A depthwise ConvInteger (group = C) compiled: exact against onnxruntime's, on uint8 blocks
    (16 channels with VNNI, 8 on AVX2: the window schedule, its 8-bit weight a packed parameter)."""
    m = _depthwise_integer(c, hw, stride, pad, zx)
    art = graphopt.compile(m, spec, "-O2", threads=2)
    rules = art.report["schedules"]["rules"]
    assert rules.get("blocked-conv") == 1 and "window-reduction" not in rules, rules
    x = np.random.default_rng(42).integers(0, 256, (1, c, hw, hw)).astype(np.uint8)
    y = graphopt.runtime.load(art.path).run({"x": x})[0]
    assert np.array_equal(y, _ort(m, {"x": x})[0])


def test_depthwise_int8_plan_role() -> None:
    """The layout plan runs a depthwise ConvInteger blocked (`depthwise-int8`) where the int8 dot
    takes the block (VNNI: 16, AVX2: 8); a grouped conv that is not depthwise stays NCHW."""
    from graphopt.passes.fusion.kernel_groups import KERNEL_KEY, PlanKernels
    from graphopt.targets.tvm import layout as LY
    from graphopt.transform import PassContext

    def roles(m: onnx.ModelProto, spec: str, block: int) -> list:
        g = graphopt.optimize(graphopt.load(m), "-O2")
        PlanKernels().run(g, PassContext())
        groups: dict[str, list] = {}
        for n in g.graph.nodes:
            if KERNEL_KEY in n.metadata_props:
                groups.setdefault(n.metadata_props[KERNEL_KEY], []).append(n)
        plan = LY.plan_layout(g, list(groups.items()), block, get_target(spec).machine_model(2))
        return [plan.role(n) for n in g.graph.nodes if n.op_type == "ConvInteger"]

    m = _depthwise_integer(32, 14, 1, 1, 131)
    assert roles(m, VNNI_CPU, 16) == ["depthwise-int8"]
    assert roles(m, AVX2_CPU, 8) == ["depthwise-int8"]
    grouped = _depthwise_integer(32, 14, 1, 1, 131)
    grouped.graph.initializer[0].CopyFrom(nh.from_array(_weights((32, 2, 3, 3), 127), "w"))
    for a in grouped.graph.node[0].attribute:
        if a.name == "group":
            a.i = 16
    assert roles(grouped, VNNI_CPU, 16) == [None]


@pytest.mark.parametrize("spec", [
    pytest.param(VNNI_CPU, marks=needs_vnni, id="vnni"),
    pytest.param(AVX2_CPU, marks=needs_avx2, id="avx2"),
])
def test_quantized_depthwise_net_equals_onnxruntime(spec) -> None:
    """The QDQ net with a depthwise conv: every conv integer (the depthwise one as a grouped
    ConvInteger), outputs within a quantization step of onnxruntime's QDQ run."""
    m = graphopt.to_onnx(_qdq_cnn("false"))
    art = graphopt.compile(m, spec, "-O2", threads=2)
    x = np.random.default_rng(43).standard_normal((1, 8, 16, 16)).astype(np.float32)
    y = graphopt.runtime.load(art.path).run({"x": x})[0]
    ref = _ort(m, {"x": x})[0]
    np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max())


# --- AVX2 blocked int8: weight bounds, prologues, small kernels ----------------------------------------------


def test_weight_bounds_see_through_the_int8_packing() -> None:
    """A blocked conv reads its weight packed (`pack_int8_conv_weight`, hoisted at compile time):
    its bound is the weight's |max|, so the u8s8 kernel is chosen on known values (64 → u8s8) and
    one step past the bound is not (65 → the int16 kernel, weights packed 2 bytes a lane)."""
    from graphopt.passes.fusion.kernel_groups import PlanKernels
    from graphopt.targets.tvm.lower import lowerer as L
    from graphopt.transform import PassContext

    for wmax, step in ((64, 4), (65, 2)):
        m, _ = _conv_integer(16, 16, 6, 3, 1, 1, wmax=wmax)
        g = graphopt.load(m)
        PlanKernels().run(g, PassContext())
        lowered, mod = L.lower_and_fuse(g, HOST, block=8)
        bounds = X.weight_bounds(mod, lowered.params)
        conv = next(gv.name_hint for gv, f in mod.functions_items()
                    if isinstance(f, tvm.tirx.PrimFunc) and "conv2d_int8_blocked" in f.script())
        packed = [p for p in mod[conv].params if str(p.dtype) == "int8"]  # (0.27: a buffer parameter is the buffer)
        assert len(packed) == 1 and int(packed[0].shape[-1]) == step
        assert bounds[conv][list(mod[conv].params).index(packed[0])] == wmax


def _qdq_dense_block() -> onnx.ModelProto:
    """DenseNet's pattern: Concat of three feature maps → BatchNorm → ReLU → 1x1 conv → BN → ReLU →
    3x3 conv, quantized static (7-bit weights, as for AVX2)."""
    rng = np.random.default_rng(61)

    def bn(name: str, c: int) -> list:
        return [nh.from_array((rng.random(c) + 0.5).astype(np.float32), f"{name}s"),
                nh.from_array((rng.standard_normal(c) * 0.1).astype(np.float32), f"{name}b"),
                nh.from_array((rng.standard_normal(c) * 0.1).astype(np.float32), f"{name}m"),
                nh.from_array((rng.random(c) + 0.5).astype(np.float32), f"{name}v")]

    nodes = [h.make_node("Conv", ["x", "w0"], ["f0"], pads=[1, 1, 1, 1], name="c0"),
             h.make_node("Conv", ["f0", "w1"], ["f1"], pads=[1, 1, 1, 1], name="c1"),
             h.make_node("Concat", ["x", "f0", "f1"], ["cat"], axis=1),
             h.make_node("BatchNormalization", ["cat", "n1s", "n1b", "n1m", "n1v"], ["bn1"]),
             h.make_node("Relu", ["bn1"], ["r1"]),
             h.make_node("Conv", ["r1", "w2"], ["c2"], name="c2"),
             h.make_node("BatchNormalization", ["c2", "n2s", "n2b", "n2m", "n2v"], ["bn2"]),
             h.make_node("Relu", ["bn2"], ["r2"]),
             h.make_node("Conv", ["r2", "w3"], ["y"], pads=[1, 1, 1, 1], name="c3")]
    inits = [nh.from_array((rng.standard_normal((8, 16, 3, 3)) * 0.1).astype(np.float32), "w0"),
             nh.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.1).astype(np.float32), "w1"),
             nh.from_array((rng.standard_normal((32, 32, 1, 1)) * 0.2).astype(np.float32), "w2"),
             nh.from_array((rng.standard_normal((8, 32, 3, 3)) * 0.1).astype(np.float32), "w3"),
             *bn("n1", 32), *bn("n2", 32)]
    m = graphopt.load(_model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [1, 16, 12, 12])],
                             [h.make_tensor_value_info("y", TP.FLOAT, [1, 8, 12, 12])], inits))
    return _quantize_static(m, rng.standard_normal((8, 16, 12, 12)).astype(np.float32), "true")


def _int8_scripts(m: onnx.ModelProto, spec: str) -> tuple[dict[str, str], dict[str, str]]:
    _, mod, done = int8_lowered(m, spec)
    return {gv.name_hint: f.script() for gv, f in mod.functions_items() if gv.name_hint in done}, done


def test_dense_block_prologue_is_one_parallel_pass() -> None:
    """The Concat → BatchNorm → ReLU → requantize in front of an int8 conv (DenseNet) is one
    parallel, vectorized pass writing the conv's input (the Concat's selection its own pass),
    not one scalar loop nest per op: each blocked int8 kernel has at most 3 parallel loops
    (concat, prologue, conv) and no loop nest outside them."""
    scripts, done = _int8_scripts(_qdq_dense_block(), AVX2_CPU)
    assert sorted(done.values()) == ["int8-u8s8-blocked"] * 4, done
    for name, text in scripts.items():
        top = [ln for ln in text.splitlines() if re.match(r"    for ", ln)]
        assert all("T.parallel" in ln for ln in top), (name, top)
        assert len(top) <= 3, (name, top)


@pytest.mark.parametrize("spec", [pytest.param(AVX2_CPU, marks=needs_avx2, id="avx2"),
                                  pytest.param(VNNI_CPU, marks=needs_vnni, id="vnni")])
def test_dense_block_equals_onnxruntime(spec) -> None:
    m = _qdq_dense_block()
    art = graphopt.compile(m, spec, "-O2", threads=2)
    x = np.random.default_rng(62).standard_normal((1, 16, 12, 12)).astype(np.float32)
    y = graphopt.runtime.load(art.path).run({"x": x})[0]
    ref = _ort(m, {"x": x})[0]
    np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max())


def _qdq_squeeze_excite() -> onnx.ModelProto:
    """EfficientNet's squeeze-excite block: x (40 channels) → GAP → 1x1 conv 40→10 → SiLU →
    1x1 conv 10→40 → Sigmoid → x · s, quantized static."""
    rng = np.random.default_rng(63)
    nodes = [h.make_node("Conv", ["x", "w0"], ["a"], pads=[1, 1, 1, 1], name="c0"),
             h.make_node("GlobalAveragePool", ["a"], ["g"]),
             h.make_node("Conv", ["g", "w1", "b1"], ["s1"], name="squeeze"),
             h.make_node("Sigmoid", ["s1"], ["sg1"]), h.make_node("Mul", ["s1", "sg1"], ["m1"]),
             h.make_node("Conv", ["m1", "w2", "b2"], ["s2"], name="excite"),
             h.make_node("Sigmoid", ["s2"], ["sg2"]),
             h.make_node("Mul", ["a", "sg2"], ["y"])]
    inits = [nh.from_array((rng.standard_normal((40, 16, 3, 3)) * 0.1).astype(np.float32), "w0"),
             nh.from_array((rng.standard_normal((10, 40, 1, 1)) * 0.3).astype(np.float32), "w1"),
             nh.from_array((rng.standard_normal(10) * 0.1).astype(np.float32), "b1"),
             nh.from_array((rng.standard_normal((40, 10, 1, 1)) * 0.3).astype(np.float32), "w2"),
             nh.from_array((rng.standard_normal(40) * 0.1).astype(np.float32), "b2")]
    m = graphopt.load(_model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [1, 16, 14, 14])],
                             [h.make_tensor_value_info("y", TP.FLOAT, [1, 40, 14, 14])], inits))
    return _quantize_static(m, rng.standard_normal((8, 16, 14, 14)).astype(np.float32), "true")


def test_squeeze_excite_convs_are_small_int8_kernels() -> None:
    """The squeeze (40 → 10) and excite (10 → 40) convs of a 1x1 map have channel counts no
    block fits or too few multiply-adds to vectorize: the small int8 rule takes them, each one
    loop nest for the conv and one for its whole epilogue (the excite's: SiLU in, sigmoid and
    the broadcast multiply by the 14x14 activation out), not one parallel loop per op."""
    scripts, done = _int8_scripts(_qdq_squeeze_excite(), AVX2_CPU)
    small = [scripts[k] for k, v in done.items() if v == "int8-small"]
    assert len(small) == 2, done
    for text in small:
        top = [ln for ln in text.splitlines() if re.match(r"    for ", ln)]
        assert len(top) <= 3 and sum("T.parallel" in ln for ln in top) <= 1, top


@pytest.mark.parametrize("spec", [pytest.param(AVX2_CPU, marks=needs_avx2, id="avx2"),
                                  pytest.param(VNNI_CPU, marks=needs_vnni, id="vnni")])
def test_squeeze_excite_equals_onnxruntime(spec) -> None:
    m = _qdq_squeeze_excite()
    art = graphopt.compile(m, spec, "-O2", threads=2)
    assert "int8-small" in art.report["schedules"]["default"]
    x = np.random.default_rng(64).standard_normal((1, 16, 14, 14)).astype(np.float32)
    y = graphopt.runtime.load(art.path).run({"x": x})[0]
    ref = _ort(m, {"x": x})[0]
    np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max())


def _qdq_narrow(c: int = 24) -> onnx.ModelProto:
    """MobileNetV2's narrow layers: 3x3 conv 16 → `c` → ReLU → 1x1 conv `c` → 32, quantized for VNNI."""
    rng = np.random.default_rng(65)
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    inits = [nh.from_array((rng.standard_normal((c, 16, 3, 3)) * 0.1).astype(np.float32), "w1"),
             nh.from_array((rng.standard_normal((32, c, 1, 1)) * 0.2).astype(np.float32), "w2")]
    m = graphopt.load(_model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [1, 16, 14, 14])],
                             [h.make_tensor_value_info("y", TP.FLOAT, [1, 32, 14, 14])], inits))
    return _quantize_static(m, rng.standard_normal((8, 16, 14, 14)).astype(np.float32), "false")


def test_vnni_narrow_int8_convs_take_the_half_block() -> None:
    """On AVX-512 VNNI an int8 net whose channel counts are multiples of 8 but not 16 (24) runs
    on 8-channel blocks (vpdpbusd on ymm) instead of leaving those convs NCHW; a net of 16s and
    32s keeps the 16-channel block."""
    from graphopt.passes.fusion.kernel_groups import KERNEL_KEY
    from graphopt.targets.tvm import layout as LY

    def plan(m: onnx.ModelProto) -> LY.LayoutPlan:
        g = integer_kernel_graph(m)
        groups: dict[str, list] = {}
        for n in g.graph.nodes:
            if KERNEL_KEY in n.metadata_props:
                groups.setdefault(n.metadata_props[KERNEL_KEY], []).append(n)
        p = LY.choose_plan(g, list(groups.items()), 16, get_target(VNNI_CPU).machine_model(2))
        assert [p.role(n) for n in g.graph.nodes if n.op_type == "ConvInteger"] == ["conv-int8"] * 2
        return p

    assert plan(_qdq_narrow(24)).block == 8
    assert plan(_qdq_narrow(16)).block == 16
    scripts, done = _int8_scripts(_qdq_narrow(24), VNNI_CPU)
    assert sorted(done.values()) == ["int8-vnni-blocked"] * 2, done
    assert all("vpdpbusd.256" in t for t in scripts.values())


@needs_vnni
def test_vnni_half_block_int8_equals_onnxruntime() -> None:
    m = _qdq_narrow(24)
    art = graphopt.compile(m, VNNI_CPU, "-O2", threads=2)
    assert "x86 int8 kernels: 2 (int8-vnni-blocked)" in art.report["schedules"]["default"]
    x = np.random.default_rng(66).standard_normal((1, 16, 14, 14)).astype(np.float32)
    y = graphopt.runtime.load(art.path).run({"x": x})[0]
    ref = _ort(m, {"x": x})[0]
    np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max())


def _write_back_loops(func) -> list[list[str]]:
    """For each store into `func`'s output: the kinds of the loops of more than one iteration
    around it, inside the outermost (parallel) loop."""
    from tvm import tirx

    out = func.params[-1].name
    found: list[list[str]] = []

    def walk(s, kinds: list[str]) -> None:
        if isinstance(s, tirx.For):
            one = isinstance(s.extent, tirx.IntImm) and int(s.extent) == 1
            walk(s.body, [*kinds, "one" if one else tirx.ForKind(int(s.kind)).name.lower()])
        elif isinstance(s, tirx.BufferStore):
            if s.buffer.name == out:
                found.append([k for k in kinds[1:] if k != "one"])
        else:
            for name in ("body", "then_case", "else_case", "block"):
                child = getattr(s, name, None)
                if child is not None:
                    walk(child, kinds)
            for child in getattr(s, "seq", []) or []:
                walk(child, kinds)

    walk(func.body, [])
    return found


@pytest.mark.parametrize("spec, net, kind", [
    (VNNI_CPU, "chain", "int8-vnni-blocked"),
    (VNNI_CPU, "narrow", "int8-vnni-blocked"),
    (AVX2_CPU, "chain", "int8-s16-blocked"),
])
def test_blocked_int8_write_back_is_unrolled_over_the_tile(spec, net, kind) -> None:
    """The blocked int8 conv's write-back (requantize epilogue) runs unrolled over the register
    tile and vectorized over the channel block, so each accumulator vector goes from its register
    through the epilogue to the output: no serial loop around the output store (as a loop, LLVM
    stored the tile into a workspace buffer and re-vectorized the epilogue across pixels)."""
    _, mod, done = int8_lowered(_qdq_chain() if net == "chain" else _qdq_narrow(24), spec)
    convs = [name for name, k in done.items() if k == kind]
    assert len(convs) == 2, done
    for name in convs:
        loops = _write_back_loops(mod[name])
        assert loops, name
        for kinds in loops:
            assert kinds and kinds[-1] == "vectorized", (name, kinds)
            assert all(k in ("unrolled", "vectorized") for k in kinds), (name, kinds)


def _qdq_classifier(c: int = 64, classes: int = 1000) -> onnx.ModelProto:
    """A quantized CNN's head with a symbolic batch: GlobalAveragePool → Flatten → Gemm(`classes`),
    quantized static (QDQ): the classifier's MatMulInteger reads the quantize of the pooled features."""
    rng = np.random.default_rng(71)
    nodes = [h.make_node("Relu", ["x"], ["r"]),
             h.make_node("GlobalAveragePool", ["r"], ["g"]),
             h.make_node("Flatten", ["g"], ["f"]),
             h.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1, name="fc")]
    inits = [nh.from_array(rng.standard_normal((classes, c)).astype(np.float32) * 0.2, "w"),
             nh.from_array(rng.standard_normal(classes).astype(np.float32) * 0.1, "b")]
    m = graphopt.load(_model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, ["N", c, 7, 7])],
                             [h.make_tensor_value_info("y", TP.FLOAT, ["N", classes])], inits))
    return _quantize_static(m, rng.standard_normal((8, c, 7, 7)).astype(np.float32), "false")


@pytest.mark.parametrize("spec, kind, instr", [
    (VNNI_CPU, "int8-vnni", "vpdpbusd.256"),  # (1000 columns: 8-lane blocks, ymm)
    (AVX2_CPU, "int8-s16", "pmadd.wd"),
])
def test_qdq_classifier_is_an_int8_matmul_after_its_quantize(spec, kind, instr) -> None:
    """The classifier's MatMulInteger, whose uint8 operand is the quantize of the pooled features
    (Div → Round → Clip → Cast) and whose batch is symbolic, runs on the int8 matmul kernel: the
    quantize stays a pass of its own writing uint8, the reduction is the vector dot instruction
    (before, the quantize was inlined into the reduction and the kernel fell to the float
    schedules: MobileNetV2's 1280 → 1000 classifier 0.45 ms vs onnxruntime's 0.09)."""
    scripts, done = _int8_scripts(_qdq_classifier(), spec)
    fc = [k for k, v in done.items() if v == kind]
    assert len(fc) == 1, done
    text = scripts[fc[0]]
    assert instr in text
    assert re.search(r'sblock_alloc_buffer\(\(\w+, T\.int64\(64\)\), "uint8"\)', text), text[:2000]


@needs_vnni
def test_qdq_classifier_equals_onnxruntime() -> None:
    m = _qdq_classifier()
    art = graphopt.compile(m, VNNI_CPU, "-O2", threads=2)
    assert "int8-vnni" in art.report["schedules"]["default"]
    r = graphopt.runtime.load(art.path)
    for n in (1, 3):
        x = np.random.default_rng(72 + n).standard_normal((n, 64, 7, 7)).astype(np.float32)
        ref = _ort(m, {"x": x})[0]
        np.testing.assert_allclose(r.run({"x": x})[0], ref, atol=0.02 * np.abs(ref).max())


def _qdq_pool_net(pads: int = 1) -> onnx.ModelProto:
    """ResNet's stem: conv 7x7/2 → ReLU → MaxPool 3x3/2 → conv 3x3, quantized static (QDQ): the pool
    between a DQ and a Q of the same scale and zero point."""
    rng = np.random.default_rng(81)
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[3, 3, 3, 3], strides=[2, 2], name="stem"),
             h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("MaxPool", ["r1"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[pads] * 4, name="pool"),
             h.make_node("Conv", ["p", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    inits = [nh.from_array(rng.standard_normal((16, 3, 7, 7)).astype(np.float32) * 0.1, "w1"),
             nh.from_array(rng.standard_normal(16).astype(np.float32) * 0.1 - 0.2, "b1"),
             nh.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.1, "w2")]
    m = graphopt.load(_model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 32, 32])],
                             [h.make_tensor_value_info("y", TP.FLOAT, [1, 16, 8, 8])], inits))
    return _quantize_static(m, rng.standard_normal((8, 3, 32, 32)).astype(np.float32), "false")


def test_qdq_maxpool_runs_on_8_bit_values() -> None:
    """Q(MaxPool(DQ(xq, s, z)), s, z) → MaxPool(xq): the pool reads and writes uint8 and the stem's
    kernel ends in a requantize (no float tensor between them); equal to the QDQ graph on
    onnxruntime (exactly: max commutes with the dequantize)."""
    m = graphopt.optimize(graphopt.load(_qdq_pool_net()), "-O2")
    x = np.random.default_rng(82).standard_normal((1, 3, 32, 32)).astype(np.float32)
    out, stats = check_pass(m, "qdq-to-integer", {"x": x}, rtol=0, atol=1e-5)
    assert stats["maxpool"] == 1 and stats["conv"] == 2, stats
    pool = next(n for n in out.graph if n.op_type == "MaxPool")
    assert pool.inputs[0].dtype == graphopt.ir.DataType.UINT8 and pool.outputs[0].dtype == graphopt.ir.DataType.UINT8
    assert pool.inputs[0].producer().op_type == "Cast"  # (the stem's requantize)


def test_qdq_maxpool_near_misses() -> None:
    """Not rewritten when the Q after the pool has another scale, or the pool's output is also read
    as float."""
    m = graphopt.load(_qdq_pool_net())
    pool = next(n for n in m.graph if n.op_type == "MaxPool")
    q = pool.outputs[0].consumers()[0]
    assert q.op_type == "QuantizeLinear"
    s = q.inputs[1].const_value.numpy()
    from graphopt.ir import Builder

    b = Builder(m.graph)
    q.replace_input_with(1, b.initializer((s * 1.5).astype(np.float32), "other_scale"))
    _, stats = check_pass(m, "qdq-to-integer")
    assert "maxpool" not in stats, stats
    m = graphopt.load(_qdq_pool_net())
    pool = next(n for n in m.graph if n.op_type == "MaxPool")
    m.graph.outputs.append(pool.outputs[0])
    _, stats = check_pass(m, "qdq-to-integer")
    assert "maxpool" not in stats, stats


@pytest.mark.parametrize("spec, pads", [
    pytest.param(VNNI_CPU, 1, marks=needs_vnni, id="vnni"),
    pytest.param(VNNI_CPU, 0, marks=needs_vnni, id="vnni-unpadded"),
    pytest.param(AVX2_CPU, 1, marks=needs_avx2, id="avx2"),
])
def test_qdq_maxpool_net_equals_onnxruntime(spec, pads) -> None:
    """The uint8 pool on blocks (padding that never wins: 0, the least uint8) equals onnxruntime."""
    m = _qdq_pool_net(pads)
    art = graphopt.compile(m, spec, "-O2", threads=2)
    x = np.random.default_rng(83).standard_normal((1, 3, 32, 32)).astype(np.float32)
    y = graphopt.runtime.load(art.path).run({"x": x})[0]
    ref = _ort(m, {"x": x})[0]
    np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max())


@pytest.mark.parametrize("spec, net", [(VNNI_CPU, "narrow"), (VNNI_CPU, "chain"), (AVX2_CPU, "chain")])
def test_small_accumulator_tiles_live_on_the_stack(spec, net) -> None:
    """A blocked int8 conv whose accumulator tile is under TVM's stack-allocation limit (8-lane
    blocks: 24 ymm, 768 bytes; AVX2: 12 ymm) keeps it in a "global" buffer, which TVM allocates on
    the stack (registers after LLVM's SROA), not in a "local" one from TVMBackendAllocWorkspace,
    allocated and freed per tile; wider tiles (24 zmm, 1536 bytes) keep the workspace."""
    scripts, done = _int8_scripts(_qdq_chain() if net == "chain" else _qdq_narrow(24), spec)
    convs = [k for k, v in done.items() if v.endswith("-blocked")]
    assert len(convs) == 2, done
    for k in convs:
        acc = [ln for ln in scripts[k].splitlines()
               if re.match(r"\s+conv2d_int8\w* = T\.sblock_alloc_buffer\(", ln) and '"int32"' in ln]
        assert len(acc) == 1 and "scope=" not in acc[0], (k, acc)  # (global: the script leaves the scope out)
    assert X._tile_scope(768) == "global" and X._tile_scope(1536) == "local"

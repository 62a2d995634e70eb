"""Small-map CNNs at large batch on the cpu target (mnist_resnet8 at N = 64): a symbolic batch
loop joins the parallel loop where one launch of the loops inside is little work
(`base.fuse_parallel` with the machine model), and a flat conv parallel over whole batch items
pads each item under that loop (`nchwc._pad_per_item`). Structure under the machine model of the
host (or $GRAPHOPT_CPU_MCPU), numbers against onnxruntime."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("tvm")

from onnx import TensorProto, helper  # noqa: E402
from onnx_builders import ort_run, tensor  # noqa: E402

import graphopt  # noqa: E402

F = TensorProto.FLOAT


def _cnn(batch: int | str, hw: int = 14, c: int = 16) -> object:
    """A small ResNet block on [batch, 1, hw, hw]: stem 3x3 1->c, a 3x3 stride-2 conv + Relu, a
    3x3 conv + a 1x1 stride-2 shortcut + Relu, global average pool, a 10-way Gemm."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = [tensor("w0", w(c, 1, 3, 3)), tensor("b0", w(c, 1)[:, 0]), tensor("w1", w(c, c, 3, 3)),
             tensor("b1", w(c, 1)[:, 0]), tensor("w2", w(c, c, 3, 3)), tensor("b2", w(c, 1)[:, 0]),
             tensor("ws", w(c, c, 1, 1)), tensor("wf", w(10, c)), tensor("bf", w(10, 1)[:, 0])]
    p1 = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], kernel_shape=[3, 3], pads=p1),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=p1, strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=p1),
        helper.make_node("Conv", ["r0", "ws"], ["s"], kernel_shape=[1, 1], strides=[2, 2]),
        helper.make_node("Add", ["c2", "s"], ["a"]),
        helper.make_node("Relu", ["a"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [batch, 1, hw, hw])],
                          [helper.make_tensor_value_info("y", F, [batch, 10])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _scheduled(m: object, knobs: str = "") -> dict[str, str]:
    """{kernel: TVMScript} of the model's default-scheduled kernels for the cpu target (the host's
    or $GRAPHOPT_CPU_MCPU's machine model, 2 threads)."""
    import tvm

    from graphopt.passes.fusion.kernel_groups import PlanKernels
    from graphopt.target import CompileOptions, get_target
    from graphopt.targets.tvm.lower import lowerer as L
    from graphopt.targets.tvm.schedules.knobs import ScheduleKnobs, using
    from graphopt.transform import PassContext

    g = graphopt.optimize(graphopt.load(m), "-O2")
    PlanKernels().run(g, PassContext())
    t = get_target("cpu")
    target = t.tvm_target(2)
    _, mod = L.lower_and_fuse(g, target, block=t.activation_block(target))
    with using(ScheduleKnobs.parse(knobs)):
        mod, _ = t.schedule(mod, target, CompileOptions())
    return {gv.name_hint: f.script() for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


#: a serial loop over the symbolic batch directly around a parallel loop: a launch per batch item
_LAUNCH_PER_ITEM = re.compile(r"for \w+ in range\(batch\):\n\s+for \w+ in T\.parallel\(")


def _statements(script: str) -> list[str]:
    from graphopt.targets.tvm.schedules.base import root_parts

    parts = root_parts(script)
    assert parts is not None
    return ["\n".join(chunk) for chunk in parts[2]]


def _pad_with_conv(script: str) -> bool | None:
    """Whether the kernel's pad block runs inside the same top-level loop nest as its conv
    (None: the kernel has no materialised pad or no blocked conv)."""
    stmts = _statements(script)
    pad = [s for s in stmts if 'T.sblock("pad")' in s]
    if not pad or "conv2d_blocked" not in script:
        return None
    return all("conv2d_blocked" in s for s in pad)


def test_symbolic_batch_joins_the_parallel_loop_of_small_launches() -> None:
    """Symbolic batch: no kernel launches its parallel loop once per batch item (the stem's rows,
    the pads, the convs); with the knob off the old serial batch loops come back."""
    new = _scheduled(_cnn("batch"))
    assert not [k for k, s in new.items() if _LAUNCH_PER_ITEM.search(s)]
    assert any("T.parallel(batch *" in s for s in new.values())
    old = _scheduled(_cnn("batch"), "SYMBOLIC_SMALL_LAUNCH:0;PAD_PER_ITEM:0")
    assert [k for k, s in old.items() if _LAUNCH_PER_ITEM.search(s)]


def test_large_launches_keep_the_serial_batch_loop() -> None:
    """Near miss: 112x112 maps (a launch of the stride-2 conv's 56 rows is ~14 MFLOP, 180 µs of
    one core's work in either machine model) keep the symbolic batch serial around the parallel
    loop, as before."""
    big = _scheduled(_cnn("batch", hw=112))
    assert [k for k, s in big.items() if _LAUNCH_PER_ITEM.search(s)]


def test_flat_conv_pads_each_batch_item_under_its_parallel_loop() -> None:
    """Batch 8 fixed: the flat convs' pads run inside the conv's parallel loop over the batch
    items; with PAD_PER_ITEM:0 they are passes of their own. Near miss: at batch 1 on 2 cores the
    parallel loop splits the pixel tiles of the one item, and the pad stays a pass of its own."""
    fixed = {k: _pad_with_conv(s) for k, s in _scheduled(_cnn(8)).items()}
    padded = {k: v for k, v in fixed.items() if v is not None}
    assert padded and all(padded.values()), fixed
    off = {k: _pad_with_conv(s) for k, s in _scheduled(_cnn(8), "PAD_PER_ITEM:0").items()}
    assert not any(v for v in off.values())
    one = {k: _pad_with_conv(s) for k, s in _scheduled(_cnn(1)).items()}
    assert not any(v for v in one.values()), one


@pytest.mark.parametrize("n", [1, 5, 64])
def test_symbolic_batch_numbers_match_onnxruntime(n: int) -> None:
    """The symbolic-batch artifact at N = 1, 5, 64 and the fixed-batch one at N = 5 against
    onnxruntime."""
    m = _cnn("batch")
    art = graphopt.compile(m, "cpu", "-O2", threads=2)
    x = np.random.default_rng(n).standard_normal((n, 1, 14, 14)).astype(np.float32)
    (ref,) = ort_run(m, {"x": x})
    np.testing.assert_allclose(art.run({"x": x})[0], ref, rtol=1e-4, atol=1e-4)
    if n == 5:
        fixed = graphopt.compile(_cnn(5), "cpu", "-O2", threads=2)
        np.testing.assert_allclose(fixed.run({"x": x})[0], ref, rtol=1e-4, atol=1e-4)


def _quantized_cnn(batch: int | str) -> object:
    """`_cnn` with 32 channels quantized static (QDQ, the quantize pass for the cpu target's
    machine model, `speed=rules`), calibrated on a random batch: the 3x3 convs int8, the stem and
    the 1x1 shortcut float (tiny layers), the stem's output requantized to uint8."""
    from graphopt.calibration import calibration_from_arrays
    from graphopt.passes.quantize import quantize
    from graphopt.target import get_target
    from graphopt.targets.machine import machine_model

    m = graphopt.load(_cnn(batch, c=32))
    x = np.random.default_rng(3).standard_normal((8, 1, 14, 14)).astype(np.float32)
    reduce = "false" if machine_model(get_target("cpu").tvm_target(2)).int8_dot == "avx512-vnni" else "true"
    quantize(m, calibration_from_arrays(m, {"x": x}), speed="rules", reduce_range=reduce)
    return graphopt.to_onnx(m)


def _scalar_requantize(knobs: str = "") -> tuple[int, int, str]:
    """(the quantized CNN's float convs writing uint8 (blocked-conv kernels), the scalar float ->
    8-bit conversions in their LLVM IR, the TVMScript of every kernel)."""
    import tvm

    from graphopt.passes.fusion.kernel_groups import PlanKernels
    from graphopt.passes.quantize.integer import QdqToInteger, SplitZeroPoints
    from graphopt.target import get_target
    from graphopt.targets.tvm.lower import lowerer as L
    from graphopt.targets.tvm.schedules import ScheduleStats, apply_default_schedules
    from graphopt.targets.tvm.schedules.knobs import ScheduleKnobs, using
    from graphopt.targets.tvm.schedules.loop_marks import apply_loop_marks
    from graphopt.transform import PassContext

    g = graphopt.optimize(graphopt.load(_quantized_cnn(8)), "-O2")
    for p in (QdqToInteger(), SplitZeroPoints(), PlanKernels()):
        p.run(g, PassContext())
    t = get_target("cpu")
    target = t.tvm_target(2)
    stats = ScheduleStats()
    with using(ScheduleKnobs.parse(knobs)):  # (the lowering too, as in a compile)
        lowered, mod = L.lower_and_fuse(g, target, block=t.activation_block(target))
        mod, _ = t.int8_kernels(mod, target, lowered.params)
        mod = apply_default_schedules(mod, target, stats=stats)
    count = kernels = 0
    text = "\n".join(f.script() for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    for gv, f in mod.functions_items():
        if not isinstance(f, tvm.tirx.PrimFunc) or stats.by_func.get(gv.name_hint) != "blocked-conv":
            continue
        if str(f.params[-1].dtype) != "uint8":
            continue
        kernels += 1
        lib = tvm.compile(tvm.IRModule({"main": apply_loop_marks(f).with_attr("global_symbol", "main")}), target=target)
        ll = (lib.mod if hasattr(lib, "mod") else lib).inspect_source("ll")
        count += len(re.findall(r"fptoui float ", ll))
    return kernels, count, text


def test_requantize_rounding_stays_vector() -> None:
    """The quantized CNN's float convs writing uint8 (the stem: bias, Relu, divide, round,
    clamp, cast): nearbyint becomes llvm.roundeven, which TVM vectorises, so no lane is converted
    alone (VECTOR_ROUNDING:0: TVM's vectoriser took nearbyint apart lane by lane)."""
    from graphopt.target import get_target
    from graphopt.targets.machine import machine_model

    kernels, scalar, text = _scalar_requantize()
    assert kernels >= 1 and scalar == 0
    assert "llvm.roundeven" in text and "T.nearbyint(" not in text
    _, scalar_off, text_off = _scalar_requantize("VECTOR_ROUNDING:0")
    assert "T.nearbyint(" in text_off
    if machine_model(get_target("cpu").tvm_target(2)).lanes() == 16:  # (AVX2's 8 lanes: LLVM's SLP
        assert scalar_off > 0  # vectoriser put them back together)


def test_guarded_subtract_joins_the_write_back() -> None:
    """The quantized CNN's float shortcut conv ends in requantize -> dequantize (a Subtract whose
    constant operand the lowering copies through an `ieee_guard` block): that block is inlined
    and the whole epilogue runs in the conv's write-back, no subtract pass of its own
    (INLINE_GUARD_CONSTANTS:0: both blocks stay, a parallel pass over the output each)."""
    text = _scalar_requantize()[2]
    assert 'T.sblock("ieee_guard")' not in text and 'T.sblock("T_subtract' not in text
    off = _scalar_requantize("INLINE_GUARD_CONSTANTS:0")[2]
    assert 'T.sblock("ieee_guard")' in off and 'T.sblock("T_subtract' in off


def test_quantized_symbolic_batch_numbers_match_onnxruntime() -> None:
    """The quantized CNN compiled with a symbolic batch, run at N = 64, against onnxruntime on
    the same QDQ model (its QLinear kernels round on their own: within a step or so)."""
    import onnxruntime as ort

    m = _quantized_cnn("batch")
    art = graphopt.compile(m, "cpu", "-O2", threads=2)
    x = np.random.default_rng(4).standard_normal((64, 1, 14, 14)).astype(np.float32)
    (ref,) = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    y = art.run({"x": x})[0]
    np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max())

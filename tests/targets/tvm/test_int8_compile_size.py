"""The cpu target's int8 compile stays as small as its fp32 compile (issue 24 item 5: int8 compiles
as fast as fp32). Compile *time* is measured by tools/bench_int8_compile.py, never asserted here;
these tests check the structure that time follows: how many copies of a loop body the schedules
unroll per kernel, and how many lines of LLVM IR each kernel becomes.

The net is a small quantized MobileNet-like CNN (stem, depthwise 3x3 on a 48-wide map, pointwise,
strided depthwise, residual, classifier) with a symbolic batch: with a symbolic batch the blocked
depthwise schedule once unrolled its whole row of pixel tiles (12 copies of an already unrolled
72-FMA tile here; 28 on MobileNetV2's 112-wide maps: 62k IR lines in one kernel, int8 compile 8.6x
the fp32 one at znver4).
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

pytest.importorskip("tvm")

import graphopt  # noqa: E402
import graphopt.runtime  # noqa: E402
from graphopt.target import get_target  # noqa: E402

from tvm_kernels import AVX2_MCPU, AVX512_MCPU, int8_lowered  # noqa: E402

#: unrolled copies of a loop body any kernel may hold (the largest register tile x window: 4 x 2
#: pixels x 9 taps = 72 for a depthwise, 24 accumulators x 16 bytes for a conv; the fp32 kernels
#: of ResNet-50 reach 384)
MAX_UNROLLED_COPIES = 512

SPECS = [f"cpu{{mcpu={AVX512_MCPU}}}", f"cpu{{mcpu={AVX2_MCPU}}}"]


def _float_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(24)

    def w(*shape: int, s: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * s).astype(np.float32)

    nodes = [h.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="stem"),
             h.make_node("Relu", ["c0"], ["r0"]),
             h.make_node("Conv", ["r0", "wd1", "bd1"], ["d1"], pads=[1, 1, 1, 1], group=16, name="dw1"),
             h.make_node("Relu", ["d1"], ["rd1"]),
             h.make_node("Conv", ["rd1", "w1", "b1"], ["c1"], name="pw1"),
             h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "wd2", "bd2"], ["d2"], pads=[1, 1, 1, 1], strides=[2, 2], group=32, name="dw2"),
             h.make_node("Relu", ["d2"], ["rd2"]),
             h.make_node("Conv", ["rd2", "w2", "b2"], ["c2"], name="pw2"),
             h.make_node("Conv", ["c2", "wd3", "bd3"], ["d3"], pads=[1, 1, 1, 1], group=16, name="dw3"),
             h.make_node("Add", ["d3", "c2"], ["a"]),
             h.make_node("GlobalAveragePool", ["a"], ["g"]),
             h.make_node("Flatten", ["g"], ["f"]),
             h.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc")]
    inits = [nh.from_array(a, n) for n, a in [
        ("w0", w(16, 3, 3, 3)), ("b0", w(16, s=0.1)), ("wd1", w(16, 1, 3, 3, s=0.4)), ("bd1", w(16, s=0.1)),
        ("w1", w(32, 16, 1, 1)), ("b1", w(32, s=0.1)), ("wd2", w(32, 1, 3, 3, s=0.4)), ("bd2", w(32, s=0.1)),
        ("w2", w(16, 32, 1, 1)), ("b2", w(16, s=0.1)), ("wd3", w(16, 1, 3, 3, s=0.4)), ("bd3", w(16, s=0.1)),
        ("wf", w(10, 16)), ("bf", w(10, s=0.1))]]
    g = h.make_graph(nodes, "small_cnn", [h.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 48, 48])],
                     [h.make_tensor_value_info("y", TP.FLOAT, ["N", 10])], inits)
    return onnx.shape_inference.infer_shapes(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))


def _quantized(spec: str) -> onnx.ModelProto:
    """The net quantized (static QDQ, every layer) for `spec`'s machine model (7-bit weights for
    AVX2's vpmaddubsw, 8-bit for VNNI), as `graphopt-compile --quantize` does for that target."""
    from graphopt.calibration import calibration_from_arrays
    from graphopt.passes.quantize import Quantize
    from graphopt.transform import PassContext

    m = graphopt.load(_float_cnn())
    ctx = PassContext(machine=get_target(spec).machine_model(2))
    ctx.data["calibration"] = calibration_from_arrays(m, {"x": np.random.default_rng(25).standard_normal((8, 3, 48, 48)).astype(np.float32)})
    Quantize(speed="off").run(m, ctx)
    return graphopt.to_onnx(m)


def _scheduled(model: onnx.ModelProto, spec: str) -> tuple[dict[str, str], dict[str, str]]:
    """{kernel: scheduled TVMScript} and {kernel: int8 kernel kind} as the cpu target's compile
    schedules them (integer rewrite, kernel groups, lowering, int8 rules, default schedules)."""
    import tvm

    from graphopt.targets.tvm.schedules import apply_default_schedules

    _, mod, int8 = int8_lowered(model, spec)
    mod = apply_default_schedules(mod, get_target(spec).tvm_target(2))
    return {gv.name_hint: f.script() for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}, int8


def unrolled_copies(script: str) -> int:
    """The most copies of one statement a kernel's unrolled loops make (the product of the
    `T.unroll` extents around it; vectorized loops are one instruction, not copies)."""
    stack: list[tuple[int, int]] = []
    best = 1
    for line in script.splitlines():
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        m = re.match(r"\s*for \w+ in T\.unroll\((?:T\.int64\()?(\d+)", line)
        if m:
            stack.append((indent, int(m.group(1))))
            best = max(best, int(np.prod([e for _, e in stack])))
    return best


def test_unrolled_copies_counts_nested_unrolls_only() -> None:
    text = ("for a in T.parallel(8):\n"
            "    for b in T.unroll(T.int64(4)):\n"
            "        for c in T.unroll(3):\n"
            "            for d in T.vectorized(16):\n"
            "                x = 1\n"
            "    for e in T.unroll(5):\n"
            "        y = 2\n")
    assert unrolled_copies(text) == 12  # b x c; e is a sibling of b, not inside it
    assert unrolled_copies("for a in range(100):\n    x = 1\n") == 1


@pytest.mark.parametrize("spec", SPECS)
def test_int8_kernels_unroll_only_their_register_tile(spec) -> None:
    """Every kernel of the quantized CNN (symbolic batch) unrolls at most MAX_UNROLLED_COPIES
    copies of a statement: the register tile and the window, never a loop over pixels or
    channels; and the int8 convs did get the int8 kernels (the check is about them)."""
    scripts, int8 = _scheduled(_quantized(spec), spec)
    assert int8, "no x86 int8 kernel was scheduled"
    copies = {k: unrolled_copies(s) for k, s in scripts.items()}
    worst = max(copies, key=copies.get)
    assert copies[worst] <= MAX_UNROLLED_COPIES, (worst, copies[worst], sorted(copies.values())[-5:])


def test_int8_depthwise_keeps_its_pixel_tile_loop_rolled() -> None:
    """On a VNNI machine the depthwise convs run blocked on uint8 (depthwise-int8): the loop over
    a row's pixel tiles stays a loop whether the batch is symbolic or not (one tile of 2 rows x 4
    pixels x 9 taps unrolled: 72 copies)."""
    spec = SPECS[0]
    scripts, _ = _scheduled(_quantized(spec), spec)
    dw = {k: s for k, s in scripts.items() if "depthwise_blocked" in s and "uint8" in s}
    assert dw, "no blocked int8 depthwise kernel"
    assert max(unrolled_copies(s) for s in dw.values()) == 72


@pytest.mark.parametrize("spec", SPECS)
def test_int8_llvm_ir_no_larger_than_twice_fp32(spec) -> None:
    """The int8 library's LLVM IR (what LLVM's optimizer and code generator work through; their
    time follows it) is at most twice the fp32 library's, in total and in its largest kernel."""
    from graphopt.targets.tvm import build as B

    def ir(model: onnx.ModelProto) -> dict[str, int]:
        t = get_target(spec)
        built: dict[str, dict[str, int]] = {}
        plain = type(t).build

        def build(self, mod, target):  # noqa: ANN001, ANN202 - the target's own build, its IR kept
            exe = plain(self, mod, target)
            built["ir"] = B.llvm_ir_lines(exe)
            return exe

        t.build = build.__get__(t)
        graphopt.compile(model, t, "-O2", threads=2)
        return built["ir"]

    fp, q = ir(_float_cnn()), ir(_quantized(spec))
    assert sum(q.values()) <= 2 * sum(fp.values()), (sum(q.values()), sum(fp.values()))
    assert max(q.values()) <= 2 * max(fp.values()), (max(q, key=q.get), max(q.values()), max(fp.values()))


def _one_element_buffers(func) -> list[str]:  # noqa: ANN001 - a tvm PrimFunc
    """Names of `func`'s buffer parameters of one element."""
    import tvm

    return [str(p.name) for p in func.params if getattr(p, "shape", None) is not None
            and all(isinstance(d, tvm.tirx.IntImm) and int(d) == 1 for d in p.shape)]


def test_quantized_cnn_kernels_take_no_scalar_buffers(monkeypatch) -> None:  # noqa: ANN001
    """No kernel of the quantized CNN (symbolic batch) that reaches LLVM takes a one-element buffer
    (lower/scalar_args.py, applied by build.build: before, 7 of its 15 kernels took 2-13 each, its
    scales, zero points and clip bounds, and each cost the packed-API wrapper a buffer's checks),
    and the compiled model still matches onnxruntime's QDQ model within a quantization step."""
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from graphopt.targets.machine import machine_model, missing_features

    built: dict[str, tvm.IRModule] = {}
    plain = relax.build

    def build(mod, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202 - relax.build, its module kept
        built["mod"] = mod
        return plain(mod, *args, **kw)

    monkeypatch.setattr(relax, "build", build)
    spec = SPECS[0]
    q = _quantized(spec)
    art = graphopt.compile(q, spec, "-O2", threads=2)
    kernels = {gv.name_hint: f for gv, f in built["mod"].functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    scalar = {k: _one_element_buffers(f) for k, f in kernels.items()}
    assert not any(scalar.values()), {k: v for k, v in scalar.items() if v}
    assert sum('"uint8"' in f.script() for f in kernels.values()) >= 5  # (the int8 kernels are there)
    if missing_features(machine_model(get_target(spec).tvm_target(2))):
        pytest.skip(f"this CPU cannot run {spec} code")
    x = np.random.default_rng(29).standard_normal((3, 3, 48, 48)).astype(np.float32)
    y = graphopt.runtime.load(art.path).run({"x": x})[0]
    ref = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max())


def _silu_cnn() -> onnx.ModelProto:
    """conv → SiLU (x · sigmoid(x)) → depthwise → SiLU → 1x1 conv → SiLU: EfficientNet's block,
    whose quantized epilogues branch (the requantized x read by the sigmoid and by the product)
    and meet again."""
    rng = np.random.default_rng(26)
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             h.make_node("Sigmoid", ["c1"], ["s1"]), h.make_node("Mul", ["c1", "s1"], ["m1"]),
             h.make_node("Conv", ["m1", "wd", "bd"], ["d"], pads=[1, 1, 1, 1], group=32, name="dw"),
             h.make_node("Sigmoid", ["d"], ["sd"]), h.make_node("Mul", ["d", "sd"], ["md"]),
             h.make_node("Conv", ["md", "w2", "b2"], ["c2"], name="conv2"),
             h.make_node("Sigmoid", ["c2"], ["s2"]), h.make_node("Mul", ["c2", "s2"], ["y"])]
    inits = [nh.from_array((rng.standard_normal((32, 16, 3, 3)) * 0.2).astype(np.float32), "w1"),
             nh.from_array((rng.standard_normal(32) * 0.1).astype(np.float32), "b1"),
             nh.from_array((rng.standard_normal((32, 1, 3, 3)) * 0.4).astype(np.float32), "wd"),
             nh.from_array((rng.standard_normal(32) * 0.1).astype(np.float32), "bd"),
             nh.from_array((rng.standard_normal((16, 32, 1, 1)) * 0.2).astype(np.float32), "w2"),
             nh.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "b2")]
    g = h.make_graph(nodes, "silu", [h.make_tensor_value_info("x", TP.FLOAT, ["N", 16, 14, 14])],
                     [h.make_tensor_value_info("y", TP.FLOAT, ["N", 16, 14, 14])], inits)
    return onnx.shape_inference.infer_shapes(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))


def test_int8_silu_epilogue_joins_the_int8_kernels() -> None:
    """A quantized SiLU after an int8 conv or depthwise (its epilogue branches and meets again) is
    inlined into the write-back: both convs run the blocked VNNI kernel (before: the default
    schedules), the depthwise one parallel loop, and the numbers equal onnxruntime's QDQ model
    within a quantization step."""
    import onnxruntime as ort

    from graphopt.calibration import calibration_from_arrays
    from graphopt.passes.quantize import Quantize
    from graphopt.targets.machine import machine_model, missing_features
    from graphopt.transform import PassContext

    spec = SPECS[0]
    m = graphopt.load(_silu_cnn())
    ctx = PassContext(machine=get_target(spec).machine_model(2))
    ctx.data["calibration"] = calibration_from_arrays(m, {"x": np.random.default_rng(27).standard_normal((8, 16, 14, 14)).astype(np.float32)})
    Quantize(speed="off").run(m, ctx)
    q = graphopt.to_onnx(m)
    scripts, int8 = _scheduled(q, spec)
    assert sorted(int8.values()) == ["int8-vnni-blocked"] * 2, int8
    # the int8 depthwise (default window schedule) takes its SiLU into the write-back as well: one
    # parallel loop (not one pass per elementwise op), the write-back's pixels a loop
    (dw,) = [t for t in scripts.values() if "depthwise_blocked" in t and "uint8" in t]
    assert dw.count("T.parallel(") == 1 and "T.sigmoid(" in dw, dw
    assert unrolled_copies(dw) == 36  # 2 rows x 2 pixels (14 wide) x 9 taps: the epilogue adds none
    if missing_features(machine_model(get_target(spec).tvm_target(2))):
        pytest.skip(f"this CPU cannot run {spec} code")
    art = graphopt.compile(q, spec, "-O2", threads=2)
    x = np.random.default_rng(28).standard_normal((2, 16, 14, 14)).astype(np.float32)
    y = graphopt.runtime.load(art.path).run({"x": x})[0]
    ref = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max())

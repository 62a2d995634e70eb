"""Small-model calls on the cpu target: the runner reuses one staging tensor per input and copies
outputs through DLPack, and kernels too small to split across threads run serially: the
per-call overhead of a small model (issue: calls 5-9x slower than onnxruntime's) without
changing what a call returns."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h

import graphopt
import graphopt.runtime
from graphopt.errors import UsageError

pytest.importorskip("tvm")


def _model() -> onnx.ModelProto:
    # y = x (an output that is the input itself), z = x * 2 + 1, b = x > 0 (bool), s = ReduceSum (0-d)
    nodes = [h.make_node("Identity", ["x"], ["y"]),
             h.make_node("Mul", ["x", "two"], ["m"]), h.make_node("Add", ["m", "one"], ["z"]),
             h.make_node("Greater", ["x", "zero"], ["b"]),
             h.make_node("ReduceSum", ["x"], ["s"], keepdims=0)]
    inits = [h.make_tensor("two", TP.FLOAT, [], [2.0]), h.make_tensor("one", TP.FLOAT, [], [1.0]),
             h.make_tensor("zero", TP.FLOAT, [], [0.0])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, ["N", 4])],
                     [h.make_tensor_value_info("y", TP.FLOAT, ["N", 4]), h.make_tensor_value_info("z", TP.FLOAT, ["N", 4]),
                      h.make_tensor_value_info("b", TP.BOOL, ["N", 4]), h.make_tensor_value_info("s", TP.FLOAT, [])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def runner():
    art = graphopt.compile(_model(), "cpu", "-O2", threads=1)
    return graphopt.runtime.load(art.path, threads=1)


def _expect(x: np.ndarray) -> list[np.ndarray]:
    return [x, x * 2 + 1, x > 0, np.asarray(x.sum(), np.float32)]


def test_outputs_of_one_call_survive_the_next(runner) -> None:
    rng = np.random.default_rng(0)
    x1, x2 = (rng.standard_normal((3, 4)).astype(np.float32) for _ in range(2))
    keep = [x1.copy()]
    out1 = runner.run({"x": x1})
    x1[:] = 99  # the caller's array changes after the call: no effect on what it returned
    out2 = runner.run({"x": x2})
    for got, want in zip(out1, _expect(keep[0])):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    for got, want in zip(out2, _expect(x2)):
        assert np.array_equal(got, want)
    assert not np.shares_memory(out1[0], out2[0])


def test_a_new_shape_gets_a_new_staging_tensor(runner) -> None:
    rng = np.random.default_rng(1)
    for n in (3, 5, 5, 1, 3):
        x = rng.standard_normal((n, 4)).astype(np.float32)
        for got, want in zip(runner.run({"x": x}), _expect(x)):
            assert got.shape == want.shape and np.allclose(got, want)


def test_non_contiguous_and_wrong_inputs(runner) -> None:
    x = np.arange(32, dtype=np.float32).reshape(4, 8)[:, ::2]  # a strided view
    assert np.array_equal(runner.run({"x": x})[1], x * 2 + 1)
    with pytest.raises(UsageError, match="dtype float64 given"):
        runner.run({"x": x.astype(np.float64)})
    with pytest.raises(UsageError, match=r"shape \[4, 3\] given"):
        runner.run({"x": np.zeros((4, 3), np.float32)})


def _matmul_chain(width: int, rows: int | str) -> onnx.ModelProto:
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(2)
    w = nh.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "w")
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["m"]), h.make_node("Tanh", ["m"], ["y"])], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT, [rows, width])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [rows, width])], [w])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def _scheduled_text(m: onnx.ModelProto, threads: int) -> str:
    import tvm

    from graphopt.passes.fusion.kernel_groups import PlanKernels
    from graphopt.target import CompileOptions, get_target
    from graphopt.targets.tvm.lower import lowerer as L
    from graphopt.transform import PassContext

    g = graphopt.load(m)
    PlanKernels().run(g, PassContext())
    target = tvm.target.Target({"kind": "llvm", "mtriple": str(tvm.target.codegen.llvm_get_system_triple()),
                                "mcpu": "znver3", "num-cores": threads})
    _, mod = L.lower_and_fuse(g, target)
    mod, _ = get_target("cpu").schedule(mod, target, CompileOptions())
    return "\n".join(f.script() for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


def test_small_kernels_run_serially_large_ones_in_parallel() -> None:
    """A 1 x 128 x 128 matmul (about 1 µs of one core's work) gets no parallel loop with 2
    threads; a 256 x 512 x 512 matmul keeps one; with 1 core nothing changes."""
    assert "T.parallel(" not in _scheduled_text(_matmul_chain(128, 1), threads=2)
    assert "T.parallel(" in _scheduled_text(_matmul_chain(512, 256), threads=2)


def test_symbolic_kernels_choose_serial_at_the_call() -> None:
    """Rows a symbolic S: the work is known only at the call, so the parallel nest is compiled
    twice, `if <FLOPs and bytes under the machine model's serial limits>: serial else: parallel`
    (the rule a fixed-shape kernel gets at compile time); SERIAL_SMALL_SYMBOLIC:0 keeps it
    parallel only. Outputs equal onnxruntime's on both sides of the threshold (S = 1, 13, 77, 700),
    serial and parallel; fixed shapes get no branch; one core: no branch either."""
    from graphopt.check import run_onnxruntime
    from graphopt.targets.machine import machine_model

    m = _matmul_chain(128, "S")
    text = _scheduled_text(m, threads=2)
    assert "T.parallel(" in text and "else:" in text, text
    for branch in text.split("else:")[:-1]:  # what runs when small: no parallel loop
        assert "T.parallel(" not in branch.rsplit("    if ", 1)[-1]
    limits = machine_model({"kind": "llvm", "mcpu": "znver3", "num-cores": 2}).serial_limits()
    assert str(int(limits[0])) in text and str(int(limits[1])) in text
    assert "else:" not in _scheduled_text(_matmul_chain(128, 64), threads=2)
    assert "else:" not in _scheduled_text(m, threads=1)
    art = graphopt.compile(m, "cpu", "-O2", threads=2)
    off = graphopt.compile(m, "cpu{schedule-knobs=SERIAL_SMALL_SYMBOLIC:0}", "-O2", threads=2)
    ref = graphopt.load(m)
    for rows in (1, 13, 77, 700):
        x = np.random.default_rng(rows).standard_normal((rows, 128)).astype(np.float32)
        want = run_onnxruntime(ref, {"x": x})[0]
        for a in (art, off):
            np.testing.assert_allclose(a.run({"x": x})[0], want, rtol=1e-5, atol=1e-5)


def test_machine_model_decides_what_is_small() -> None:
    from graphopt.targets.machine import machine_model

    m = machine_model({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3", "num-cores": 2})
    assert m.runs_serially(2 * 128 * 128, 4 * (128 * 128 + 2 * 128))
    assert not m.runs_serially(2 * 256 * 512 * 512, 4 * (512 * 512 + 2 * 256 * 512))
    assert not m.runs_serially(1e3, 4e6)  # a large copy: bandwidth-bound, worth two cores


# --- a classifier's GEMV: 1000 columns (a multiple of 8, not 16), batch 1 or symbolic --------------------


def _classifier(batch: int | str) -> onnx.ModelProto:
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(3)
    w = nh.from_array((rng.standard_normal((1000, 256)) * 0.05).astype(np.float32), "w")
    b = nh.from_array(rng.standard_normal(1000).astype(np.float32), "b")
    g = h.make_graph([h.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT, [batch, 256])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [batch, 1000])], [w, b])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("mcpu", ["znver3", "znver4"])
@pytest.mark.parametrize("batch", [1, "N"])
def test_classifier_gemv_gets_the_matmul_schedule(mcpu, batch) -> None:
    """[batch, K] x [1000, K]ᵀ: the outer-product matmul schedule on AVX2 and AVX-512 (half
    vectors: 1000 is no multiple of 16), for a fixed batch of 1 and a symbolic one (rows serial,
    column panels parallel) — not dlight's GPU-style GEMV/reduction rules (12 ms and 5.3 ms for
    ResNet-50's 2048 x 1000 classifier, 0.2 ms with this); outputs equal onnxruntime's."""
    import onnxruntime as ort

    from graphopt.targets.machine import machine_model, missing_features

    m = _classifier(batch)
    art = graphopt.compile(m, f"cpu{{mcpu={mcpu}}}", "-O2", threads=2)
    assert art.report["schedules"]["rules"] == {"outer-product": 1}, art.report["schedules"]
    if missing_features(machine_model({"kind": "llvm", "mcpu": mcpu})):
        return  # (the schedule is checked; this CPU cannot run the build)
    r = graphopt.runtime.load(art.path, threads=2)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in ((1,) if batch == 1 else (1, 3, 7)):
        x = np.random.default_rng(n).standard_normal((n, 256)).astype(np.float32)
        np.testing.assert_allclose(r.run({"x": x})[0], s.run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)

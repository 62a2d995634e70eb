"""graphopt-compile's front door: onnx's checker on the input, sizes checked before anything is
allocated, sparse initializers, dim and dtype edge cases, I/O faults, staging after a kill, and
one line on stderr (issue 25).

Each case is a small model built with onnx.helper; the CLI runs in-process through main().
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.check import random_inputs
from graphopt.cli import main
from graphopt.errors import GraphoptError
from graphopt.onnx_io import to_onnx
from graphopt.testing import models

PREFIX = "graphopt-compile: error: "
F = TensorProto.FLOAT
STAGE_PREFIX = ".graphopt-compile-"  # the hidden staging folder in the output folder


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAPHOPT_DEBUG", raising=False)


def _model(nodes: list[onnx.NodeProto], x_shape: list[int | str], y_shape: list[int | str] | None = None,
           opset: int = 18, **kw: object) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, x_shape)],
                          [helper.make_tensor_value_info("y", F, x_shape if y_shape is None else y_shape)], **kw)  # type: ignore[arg-type]
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _relu(shape: list[int | str], opset: int = 18) -> onnx.ModelProto:
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu0")], shape, opset=opset)


def _const(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64), name))


def _flatten_by_shape(batch: int) -> onnx.ModelProto:
    """Relu, then Reshape(x, Concat(Shape(x)[0], [-1])): the flatten exporters write."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Shape", ["r"], ["s"]), _const("i0", [0]),
             helper.make_node("Gather", ["s", "i0"], ["b"], axis=0), _const("m1", [-1]),
             helper.make_node("Concat", ["b", "m1"], ["t"], axis=0), helper.make_node("Reshape", ["r", "t"], ["y"])]
    return _model(nodes, [batch, 3, 4], ["a", "b"])


def _zeros_like(batch: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("ConstantOfShape", ["s"], ["z"]),
             helper.make_node("Add", ["x", "z"], ["y"])]
    return _model(nodes, [batch, 3, 4], ["a", "b", "c"])


def _save(tmp: Path, m: onnx.ModelProto, name: str = "m.onnx") -> Path:
    p = tmp / name
    p.write_bytes(m.SerializeToString())
    return p


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _one_error(err: str, *needles: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"not one stderr line: {err!r}"
    assert lines[0].startswith(PREFIX)
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _accepted(path: Path) -> bool:
    """Whether onnx's checker (full) and onnxruntime both accept the model file."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        so = ort.SessionOptions()
        so.log_severity_level = 4
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


# --- onnx's checker up front -------------------------------------------------------------------


def _unknown_op() -> onnx.ModelProto:
    return _model([helper.make_node("Frobnicate", ["x"], ["y"], name="frob0")], [2])


def _raw_data_too_short() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones(2, np.float32), "w")
    w.raw_data = b"\0" * 5
    return _model([helper.make_node("Add", ["x", "w"], ["y"])], [2], initializer=[w])


def _conv_one_input() -> onnx.ModelProto:
    return _model([helper.make_node("Conv", ["x"], ["y"], name="conv0")], [1, 1, 4, 4], ["n", "c", "h", "w"])


def _recursive_function() -> onnx.ModelProto:
    f = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("F", ["a"], ["b"], domain="local")],
                             [helper.make_opsetid("", 18), helper.make_opsetid("local", 1)])
    m = _model([helper.make_node("F", ["x"], ["y"], domain="local")], [2])
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.functions.append(f)
    return m


def _element_type_0() -> onnx.ModelProto:
    m = _relu([2])
    m.graph.input[0].type.tensor_type.elem_type = 0
    m.graph.output[0].type.tensor_type.elem_type = 0
    return m


def _reshape_overflow() -> onnx.ModelProto:
    # H and W of 2**40: the Reshape's -1 would be 3 * 2**80 (simplify-shapes crashed on it)
    return _model([helper.make_node("Relu", ["x"], ["r"]), _const("t", [1, -1]), helper.make_node("Reshape", ["r", "t"], ["y"])],
                  [1, 3, 2**40, 2**40], ["a", "b"])


INVALID = {
    "unknown-op": (_unknown_op, "No Op registered for Frobnicate"),
    "opset-0": (lambda: _relu([2], opset=0), "domain_version of 0"),
    "opset-99": (lambda: _relu([2], opset=99), "opset 99"),
    "raw-data-too-short": (_raw_data_too_short, "raw_data size"),
    "conv-one-input": (_conv_one_input, "checker"),
    "recursive-function": (_recursive_function, "recursive"),
    "reshape-overflow": (_reshape_overflow, "overflow"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_a_model_the_checker_rejects_is_exit_2_with_its_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    make, needle = INVALID[case]
    src = _save(tmp_path, make())
    assert not _accepted(src)  # onnx's checker or onnxruntime refuses it already
    out = tmp_path / "out.onnx"
    code, err = _cli(capsys, src, "-O2", "-o", out)
    assert code == 2
    _one_error(err, str(src), needle, "--no-check")
    assert not out.exists()


def test_no_check_compiles_anyway_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _save(tmp_path, _unknown_op())
    out = tmp_path / "out.onnx"
    report = tmp_path / "r.json"
    code, err = _cli(capsys, src, "--no-check", "-O0", "-o", out, "--report", report)
    assert code == 0, err
    assert out.exists()
    assert "--no-check" in err.splitlines()[0] and "not checked" in err
    assert any("--no-check" in line for line in __import__("json").loads(report.read_text())["log"])
    # with --quiet it is still in the report, and stderr stays empty
    code, err = _cli(capsys, src, "--no-check", "-O0", "-q", "-o", out)
    assert code == 0 and err == ""


def test_element_type_0_is_refused_on_load_and_by_random_inputs() -> None:
    # was: "internal error: KeyError: 0" under --verify and on the cpu target
    from graphopt.errors import ModelLoadError
    from graphopt.ir import Graph, Model, Shape, TensorType, Value
    from graphopt.ir.types import DataType

    with pytest.raises(ModelLoadError, match="input 'x' has element type 0"):
        graphopt.load(_element_type_0().SerializeToString())
    w = numpy_helper.from_array(np.ones(2, np.float32), "w")
    w.data_type = 0
    with pytest.raises(ModelLoadError, match="tensor 'w': element type 0"):
        graphopt.load(_model([helper.make_node("Add", ["x", "w"], ["y"])], [2], initializer=[w]).SerializeToString())
    x = Value("x", TensorType(DataType.UNDEFINED, Shape((2,))))
    with pytest.raises(GraphoptError, match="'x'.*element type UNDEFINED"):
        random_inputs(Model(Graph([x], [x]), opset_imports={"": 18}))


def test_an_output_of_element_type_0_is_an_unknown_type(tmp_path: Path) -> None:
    """An output or value_info of element type 0 (the checker and onnxruntime accept it) is a value
    of unknown type, not an error: both targets compile it (was KeyError: 0 on the cpu target;
    fuzz case proto:1:81)."""
    import onnx

    m = _model([helper.make_node("Sign", ["x"], ["y"])], [2, 3])
    m.graph.output[0].type.tensor_type.elem_type = 0
    onnx.checker.check_model(m, full_check=True)
    model = graphopt.load(m.SerializeToString())
    assert model.graph.outputs[0].type is None
    src = _save(tmp_path, m)
    for args in (["-O2", "-o", str(tmp_path / "o.onnx")], ["--target", "cpu", "-o", str(tmp_path / "art")]):
        assert main([str(src), *args, "-q"]) == 0, args


@pytest.mark.parametrize("extra", [4, -4])
def test_raw_data_of_the_wrong_size_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: int) -> None:
    """raw_data longer or shorter than the shape and type need: onnxruntime refuses the model and
    onnx's checker lets the longer one through (fuzz proto:1:25: 36 bytes for 32 came out of -O2
    unchanged); the front door refuses both, exit 2."""
    w = numpy_helper.from_array(np.ones((2, 4), np.float32), "w")
    w.raw_data = w.raw_data + b"\0" * extra if extra > 0 else w.raw_data[:extra]
    m = _model([helper.make_node("Add", ["x", "w"], ["y"])], [2, 4], initializer=[w])
    code, err = _cli(capsys, _save(tmp_path, m), "-O2", "-o", tmp_path / "o.onnx")
    assert code == 2
    _one_error(err, "raw_data holds 36 bytes" if extra > 0 else "raw_data size (28 bytes)")  # (not a pass failing on use)
    assert not (tmp_path / "o.onnx").exists()


def test_simplify_shapes_on_a_reshape_past_int64() -> None:
    # was: "pass 'simplify-shapes' crashed: OverflowError" (H/W of 2**40)
    from graphopt.transform import optimize, parse_pipeline

    model = optimize(graphopt.load(_reshape_overflow().SerializeToString()), parse_pipeline("simplify-shapes"))
    [reshape] = model.graph.find_nodes("Reshape")
    assert reshape.inputs[1] is not None and reshape.inputs[1].name == "t"  # left as it was


@pytest.mark.parametrize("make", [_element_type_0, _reshape_overflow], ids=["element-type-0", "reshape-overflow"])
def test_no_check_on_bad_dims_and_dtypes_is_never_an_internal_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: object
) -> None:
    src = _save(tmp_path, make())  # type: ignore[operator]
    out = tmp_path / "out.onnx"
    code, err = _cli(capsys, src, "--no-check", "-q", "-O2", "--verify", "-o", out)
    assert code == 2, err
    _one_error(err)
    assert not out.exists()
    code, err = _cli(capsys, src, "--no-check", "-q", "-O2", "-o", out)
    assert code in (0, 2), err


def test_the_output_is_checked_too(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An output onnx's checker rejects from an input it accepts is graphopt's bug: exit 1,
    nothing written."""
    from graphopt.onnx_io import exporter

    real = exporter.to_onnx

    def broken(model: graphopt.Model, **kw: object) -> onnx.ModelProto:
        proto = real(model, **kw)  # type: ignore[arg-type]
        for n in proto.graph.node:
            n.op_type = "NoSuchOp"
        return proto

    monkeypatch.setattr(sys.modules["graphopt.onnx_io.save"], "to_onnx", broken)
    src = _save(tmp_path, _relu([2, 3]))
    out = tmp_path / "out.onnx"
    code, err = _cli(capsys, src, "-O0", "-q", "-o", out)
    assert code == 1
    _one_error(err, "fails onnx's checker", "NoSuchOp", f"{out} was not written")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


# --- what the checker and onnxruntime accept, graphopt's output must pass too -------------------


@pytest.mark.parametrize("make", [_flatten_by_shape, _zeros_like], ids=["flatten-by-shape", "zeros-like"])
def test_negative_input_dim_gives_a_valid_output(tmp_path: Path, capsys: pytest.CaptureFixture[str], make: object) -> None:
    # a negative dim passes the checker and onnxruntime (both read it as unknown); -O2 folded it
    # into Reshape / ConstantOfShape constants that both then refused
    src = _save(tmp_path, make(-2))  # type: ignore[operator]
    assert _accepted(src)
    out = tmp_path / "out.onnx"
    code, err = _cli(capsys, src, "-O2", "-q", "--verify", "-o", out)
    assert code == 0, err
    assert _accepted(out)
    x = np.random.default_rng(0).standard_normal((5, 3, 4)).astype(np.float32)  # any batch runs
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0] for p in (src, out)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-6)


def _with_batch(proto: onnx.ModelProto, batch: int | None) -> onnx.ModelProto:
    """The model with the first dim of every graph input set to `batch` (None: unchanged); the
    types of the other values, which were drawn for the old batch, are dropped or made symbolic
    so that the model does not lie about its shapes."""
    if batch is not None:
        for vi in proto.graph.input:
            dims = vi.type.tensor_type.shape.dim
            if len(dims):
                dims[0].Clear()
                dims[0].dim_value = batch
        del proto.graph.value_info[:]
        for i, vi in enumerate(proto.graph.output):
            for j, d in enumerate(vi.type.tensor_type.shape.dim):
                d.Clear()
                d.dim_param = f"out{i}_{j}"
    return proto


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(model=models(allow_shape_ops=True, allow_if=False), batch=st.sampled_from([None, -1, -3, 1, 3]))
def test_valid_models_stay_valid_through_O2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             model: graphopt.Model, batch: int | None) -> None:
    """Property: a model onnx's checker and onnxruntime accept compiles (-O2 --verify) into one
    they accept too, with the same outputs; its batch dim may be symbolic, fixed or negative."""
    src = tmp_path / "in.onnx"
    src.write_bytes(_with_batch(to_onnx(model), batch).SerializeToString())
    assume(_accepted(src))
    out = tmp_path / "out.onnx"
    code, err = _cli(capsys, src, "-O2", "-q", "--verify", "-o", out)
    assert code == 0, err
    assert _accepted(out)


# --- sizes checked before allocation; inputs in their own dtype ---------------------------------


def test_verify_refuses_huge_inputs_before_allocating(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # batch 2**20 of 3x32x32: 12 GiB of float32 (24 GiB as the float64 it was drawn in before)
    src = _save(tmp_path, _relu([2**20, 3, 32, 32]))
    out = tmp_path / "out.onnx"
    tracemalloc.start()
    try:
        code, err = _cli(capsys, src, "-O0", "-q", "--verify", "-o", out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2
    _one_error(err, "'x'", "dim 0 is 1048576", "limit")
    assert peak < 64 * 2**20
    assert not out.exists()


def test_random_inputs_are_drawn_in_the_inputs_own_dtype() -> None:
    model = graphopt.load(_relu([4, 1024, 1024]).SerializeToString())  # 16 MiB of float32
    tracemalloc.start()
    try:
        feeds = random_inputs(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert feeds["x"].dtype == np.float32 and feeds["x"].shape == (4, 1024, 1024)
    assert peak < 1.5 * feeds["x"].nbytes  # no float64 draw (32 MiB) cast down
    assert 0.9 < float(feeds["x"].std()) < 1.1


def test_random_inputs_limit_names_the_input_dim_and_limit() -> None:
    model = graphopt.load(_relu(["N", 1000]).SerializeToString())
    with pytest.raises(GraphoptError, match=r"input 'x'.*dim 0 is 100000.*limit of 1000000 bytes"):
        random_inputs(model, dim_values={"N": 100_000}, max_bytes=10**6)


def test_negative_dim_under_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # was: "internal error: ValueError: negative dimensions are not allowed"
    src = _save(tmp_path, _relu([-3, 4]))
    assert _accepted(src)
    out = tmp_path / "out.onnx"
    code, err = _cli(capsys, src, "-O2", "-q", "--verify", "-o", out)
    assert code == 0, err
    assert _accepted(out)


# --- sparse initializers ------------------------------------------------------------------------


def test_a_valid_sparse_initializer_compiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # was: "pass 'cse' crashed: AttributeError: 'SparseTensor' object has no attribute 'size'"
    values = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "w")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "w_indices")
    sp = helper.make_sparse_tensor(values, indices, [4])
    m = _model([helper.make_node("Add", ["x", "w"], ["s"]), helper.make_node("Mul", ["s", "w"], ["y"])], [4],
               sparse_initializer=[sp])
    src = _save(tmp_path, m)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])  # onnxruntime accepts it
    out = tmp_path / "out.onnx"
    code, err = _cli(capsys, src, "-O2", "-q", "--verify", "-o", out)
    assert code == 0, err
    assert _accepted(out)
    x = np.arange(4, dtype=np.float32)
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, (x + [1.5, 0, 0, -2]) * [1.5, 0, 0, -2])


def test_a_sparse_initializer_with_indices_past_its_dims_is_one_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # was: IndexError from SparseTensor.numpy (the importer fuzz test, seed 3993172399, #675)
    values = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "w")
    indices = numpy_helper.from_array(np.array([0, 59], np.int64), "w_indices")
    sp = helper.make_sparse_tensor(values, indices, [4])
    m = _model([helper.make_node("Add", ["x", "w"], ["y"])], [4], sparse_initializer=[sp])
    code, err = _cli(capsys, _save(tmp_path, m), "-O2", "-q", "--no-check", "-o", tmp_path / "out.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "sparse tensor 'w': its indices do not fit its dims [4]" in err, err
    assert not (tmp_path / "out.onnx").exists()


def test_cse_keeps_sparse_initializers() -> None:
    """The passes see sparse initializers when a model is loaded through the Python API."""
    from graphopt.transform import optimize, parse_pipeline

    values = numpy_helper.from_array(np.array([1.0], np.float32), "w")
    sp = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([1], np.int64), "i"), [2])
    m = _model([helper.make_node("Add", ["x", "w"], ["y"])], [2], sparse_initializer=[sp])
    model = optimize(graphopt.load(m.SerializeToString()), parse_pipeline("cse"))
    assert "w" in model.graph.initializers


# --- I/O faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "err_no"), [("save", errno.ENOSPC), ("stage", errno.EROFS),
                                                ("publish", errno.EROFS), ("save", errno.EDQUOT)])
def test_a_full_or_read_only_disk_is_exit_2_with_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str, err_no: int
) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise OSError(err_no, os.strerror(err_no), str(a[-1]) if a else "")

    target = {"save": "graphopt.save", "stage": "tempfile.mkdtemp", "publish": "os.replace"}[where]
    src = _save(tmp_path, _relu([2]))
    out = tmp_path / "sub" / "out.onnx"
    monkeypatch.setattr(target, refuse)
    code, err = _cli(capsys, src, "-O0", "-q", "-o", out)
    monkeypatch.undo()
    assert code == 2
    _one_error(err, f"cannot write {out}", os.strerror(err_no))
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # the created folder is gone again


def test_report_on_a_full_disk_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    src = _save(tmp_path, _relu([2]))
    save_mod = sys.modules["graphopt.onnx_io.save"]
    real = save_mod.tempfile.mkstemp

    def mkstemp(*a: object, **k: object) -> tuple[int, str]:
        if str(k.get("prefix", "")).startswith(".r.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(save_mod.tempfile, "mkstemp", mkstemp)
    code, err = _cli(capsys, src, "-O0", "-q", "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert code == 2
    _one_error(err, f"cannot write {tmp_path / 'r.json'}", "No space left")


# --- staging after a kill -----------------------------------------------------------------------


def test_a_killed_compiles_stage_is_removed_by_the_next_compile(tmp_path: Path) -> None:
    """SIGKILL cannot be caught, so the stage of a killed compile stays until the next compile
    into the same folder removes it; the old output is intact all along."""
    src = _save(tmp_path, _relu([2]))
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "m.onnx"
    out.write_bytes(b"the last good build")
    script = textwrap.dedent(f"""
        import time, sys
        from dataclasses import dataclass
        from typing import ClassVar
        from graphopt.transform import Pass, PassResult, register_pass
        from graphopt.cli import main

        @dataclass(frozen=True)
        class Sleep(Pass):
            name: ClassVar[str] = "t-sleep"
            def run(self, model, ctx):
                time.sleep(60)
                return PassResult(changed=False)

        register_pass(Sleep)
        sys.exit(main([{str(src)!r}, "--passes", "t-sleep", "-q", "-o", {str(out)!r}]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not [n for n in os.listdir(outdir) if n.startswith(STAGE_PREFIX)]:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the compile never staged"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    [stage] = [n for n in os.listdir(outdir) if n.startswith(STAGE_PREFIX)]  # what SIGKILL leaves
    assert out.read_bytes() == b"the last good build"

    assert main([str(src), "-O0", "-q", "-o", str(out)]) == 0
    assert sorted(os.listdir(outdir)) == ["m.onnx"]
    assert _accepted(out)


def test_a_running_compiles_stage_is_left_alone(tmp_path: Path) -> None:
    src = _save(tmp_path, _relu([2]))
    busy, dead = tmp_path / f"{STAGE_PREFIX}busy", tmp_path / f"{STAGE_PREFIX}dead"
    for d in (busy, dead):
        d.mkdir()
        (d / "m.onnx").write_bytes(b"half")
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a compile in another process holds it
        assert main([str(src), "-O0", "-q", "-o", str(tmp_path / "out.onnx")]) == 0
        assert busy.is_dir() and not dead.exists()
    finally:
        os.close(fd)


# --- one line on stderr -------------------------------------------------------------------------


def test_onnxruntime_errors_are_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # onnxruntime logged "[E:onnxruntime:...] Exception during initialization" on fd 2 before
    # graphopt's own line
    src = _save(tmp_path, _raw_data_too_short())
    code = main([str(src), "--no-check", "-q", "-O0", "--verify", "-o", str(tmp_path / "out.onnx")])
    err = capfd.readouterr().err
    assert code == 2
    _one_error(err, "onnxruntime cannot run the model")


def test_cpu_target_on_a_full_disk_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tvm")
    from graphopt.target import Artifact

    def full(self: Artifact, path: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(str(path), "params.npz"))

    monkeypatch.setattr(Artifact, "save", full)
    src = _save(tmp_path, _relu([2, 3]))
    code, err = _cli(capsys, src, "--target", "cpu", "-O0", "-q", "-o", tmp_path / "art")
    assert code == 2
    _one_error(err, f"cannot write {tmp_path / 'art'}", "No space left")

"""Fixed input shapes (issue 19 item 2): --input-shape NAME:DIMS and --dim SYMBOL=SIZE in the
CLI, the config file and graphopt.compile(input_shapes=, dims=); applied before the passes; bad
values are one line, exit 2; a compiled target that cannot lower symbolic dims names them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

import graphopt
from graphopt.cli import main
from graphopt.errors import UsageError
from graphopt.input_shapes import fix_input_shapes, parse_dim, parse_input_shape

PREFIX = "graphopt-compile: error: "


def _conv_net(path: Path) -> Path:
    """x[batch, 3, height, width] -> Conv(stride 2) -> Relu -> MaxPool -> Conv -> Add -> GAP -> Flatten -> Gemm,
    plus a Shape -> Gather(2) output path that a fixed height folds to a constant."""
    rng = np.random.default_rng(0)

    def w(n: str, s: tuple[int, ...]) -> onnx.TensorProto:
        return nh.from_array((rng.standard_normal(s) * 0.1).astype(np.float32), n)

    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        h.make_node("Relu", ["c1"], ["r1"]),
        h.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        h.make_node("Add", ["c2", "p1"], ["a"]),
        h.make_node("GlobalAveragePool", ["a"], ["g"]),
        h.make_node("Flatten", ["g"], ["f"]),
        h.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
        h.make_node("Shape", ["x"], ["shape"]),
        h.make_node("Gather", ["shape", "two"], ["hh"], axis=0),
    ]
    inits = [w("w1", (8, 3, 3, 3)), w("b1", (8,)), w("w2", (8, 8, 3, 3)), w("b2", (8,)), w("wf", (10, 8)), w("bf", (10,)),
             nh.from_array(np.array(2, np.int64), "two")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, ["batch", 3, "height", "width"])],
                     [h.make_tensor_value_info("y", TP.FLOAT, ["batch", 10]), h.make_tensor_value_info("hh", TP.INT64, [])],
                     inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    out = path / "dyn.onnx"
    onnx.save(m, out)
    return out


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def test_parse() -> None:
    assert parse_input_shape("x:1x3x224x224") == ("x", (1, 3, 224, 224))
    assert parse_input_shape("input:0:[1,3,8,8]") == ("input:0", (1, 3, 8, 8))
    assert parse_input_shape("s:[]") == ("s", ())
    assert parse_dim("batch=4") == ("batch", 4)
    for bad in ("x", ":1x3", "x:1xAx3", "x:1x-3"):
        with pytest.raises(UsageError):
            parse_input_shape(bad)
    for bad in ("batch", "batch=", "=3", "batch=x"):
        with pytest.raises(UsageError):
            parse_dim(bad)


def test_cli_input_shape_fixes_the_model_and_folds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The symbols take the values everywhere (the output's batch too), and Shape->Gather of the fixed
    height folds to a constant: the passes saw the fixed shape. Numbers equal the original's."""
    src = _conv_net(tmp_path)
    out = tmp_path / "o.onnx"
    assert main([str(src), "-o", str(out), "--input-shape", "x:2x3x16x16", "--verify"]) == 0
    m = onnx.load(out)
    assert _dims(m.graph.input[0]) == [2, 3, 16, 16]
    assert _dims(m.graph.output[0]) == [2, 10]
    assert not any(n.op_type in ("Shape", "Gather") for n in m.graph.node)  # folded
    err = capsys.readouterr().err
    assert "input shapes: x [batch,3,height,width] -> 2x3x16x16" in err
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert int(got[1]) == 16


def test_cli_dim_keeps_the_other_symbols(tmp_path: Path) -> None:
    src = _conv_net(tmp_path)
    out = tmp_path / "o.onnx"
    assert main([str(src), "-o", str(out), "--dim", "height=32", "--dim", "width=24", "-q"]) == 0
    assert _dims(onnx.load(out).graph.input[0]) == ["batch", 3, 32, 24]


def test_config_file_keys(tmp_path: Path) -> None:
    src = _conv_net(tmp_path)
    cfg = tmp_path / "g.toml"
    cfg.write_text('[graphopt]\ninput-shape = ["x:1x3x8x8"]\ndim = []\nquiet = true\n')
    out = tmp_path / "o.onnx"
    assert main([str(src), "-o", str(out), "--config", str(cfg)]) == 0
    assert _dims(onnx.load(out).graph.input[0]) == [1, 3, 8, 8]


@pytest.mark.parametrize(("flags", "message"), [
    (["--input-shape", "nope:1x3x8x8"], "the model has no input 'nope' (inputs: x)"),
    (["--input-shape", "x:1x3x8"], "input 'x' has rank 4 ([batch,3,height,width]), not 3"),
    (["--input-shape", "x:1x4x8x8"], "dim 1 of input 'x' is fixed to 3 in the model"),
    (["--input-shape", "x:2x3x8x8", "--dim", "batch=1"], "dim 0 is the symbol 'batch', which --dim sets to 1"),
    (["--dim", "typo=7"], "no input has a symbolic dim 'typo' (symbolic dims: batch, height, width)"),
    (["--dim", "batch=0"], "sizes must be at least 1"),
    (["--input-shape", "x:1xfoo"], "dims must be whole numbers"),
])
def test_bad_values_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str) -> None:
    src = _conv_net(tmp_path)
    out = tmp_path / "o.onnx"
    assert main([str(src), "-o", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(PREFIX) and message in err[0], err
    assert not out.exists()


def test_fix_input_shapes_unnamed_dim_and_subgraph_symbols() -> None:
    """An unnamed (`?`) dim is fixed on its input only; a symbol in an If branch takes the value too."""
    then_g = h.make_graph([h.make_node("Identity", ["x"], ["t"])], "then", [], [h.make_tensor_value_info("t", TP.FLOAT, ["n", None])])
    else_g = h.make_graph([h.make_node("Neg", ["x"], ["e"])], "else", [], [h.make_tensor_value_info("e", TP.FLOAT, ["n", None])])
    g = h.make_graph([h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT, ["n", None]), h.make_tensor_value_info("c", TP.BOOL, [])],
                     [h.make_tensor_value_info("y", TP.FLOAT, ["n", None])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    model = graphopt.load(m)
    log = fix_input_shapes(model, {"x": (2, 5)})
    assert log == ["input shapes: x [n,?] -> 2x5"]
    assert model.graph.inputs[0].shape.dims == (2, 5)
    assert model.graph.outputs[0].shape.dims == (2, None)
    branch_out = next(iter(model.graph.nodes)).subgraphs()[0].outputs[0]
    assert branch_out.shape.dims == (2, None)
    assert fix_input_shapes(model, {"x": (2, 5)}) == []  # a second run changes nothing


tvm = pytest.importorskip("tvm")


def test_cpu_target_symbolic_dims_exit_2_then_fixed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The conv net with [batch, 3, height, width]: compiled with every dim symbolic (issue 21; it
    was exit 2 naming the dims, and before that an internal error); with --dim height/width the
    batch stays symbolic and it runs."""
    src = _conv_net(tmp_path)
    dyn = tmp_path / "dyn"
    assert main([str(src), "--target", "cpu", "-o", str(dyn), "-q"]) == 0
    import json

    sym = json.loads((dyn / "manifest.json").read_text())["dims"]["symbolic"]
    assert set(sym) == {"batch", "height", "width"} and sym["height"]["min"] == 3
    out = tmp_path / "art"
    assert main([str(src), "--target", "cpu", "-o", str(out), "-q", "--dim", "height=16", "--dim", "width=16", "--verify"]) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == ["batch", 3, 16, 16]
    art = graphopt.runtime.load(str(out))
    x = np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(art.run({"x": x})[0], want[0], rtol=1e-4, atol=1e-4)


def test_python_api_input_shapes(tmp_path: Path) -> None:
    src = _conv_net(tmp_path)
    assert "height" in graphopt.compile(str(src), "cpu", "-O2", threads=1).manifest["dims"]["symbolic"]  # (issue 21)
    art = graphopt.compile(str(src), "cpu", "-O2", threads=1, input_shapes={"x": (1, 3, 16, 16)})
    assert art.manifest["inputs"][0]["shape"] == [1, 3, 16, 16]

"""Reshapes with a symbolic dim index group by group (legalize._grouped_reshape): the head split
[N, S, 64] -> [N, S, 4, 16] reads x[n, s, h * 16 + d], not the flat index unravelled again with a
division by S per element (TVM's reshape). Static reshapes, and symbolic ones no grouping covers,
stay TVM's. Numbers against onnxruntime at several lengths, 1 and no multiple of the lanes."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tvm import relax, tirx  # noqa: E402

import graphopt  # noqa: E402
from graphopt.check import run_onnxruntime  # noqa: E402
from graphopt.targets.tvm.lower.legalize import legalize_and_fuse, reshape_groups  # noqa: E402


def _i(*v: int) -> list[tvm.tirx.IntImm]:
    return [tirx.const(x, "int64") for x in v]


def test_reshape_groups() -> None:
    n, s = tirx.Var("N", "int64"), tirx.Var("S", "int64")
    assert reshape_groups([n, s, *_i(64)], [n, s, *_i(4, 16)]) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 4)]
    assert reshape_groups([n, s, *_i(4, 16)], [n, s, *_i(64)]) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 4, 2, 3)]
    assert reshape_groups([s, *_i(6, 4)], [s, *_i(2, 12)]) == [(0, 1, 0, 1), (1, 3, 1, 3)]
    assert reshape_groups([s, *_i(8, 1)], [s, *_i(2, 4)]) == [(0, 1, 0, 1), (1, 2, 1, 3), (2, 3, 3, 3)]
    # near misses: a symbolic dim merged or split, dims that do not pair up
    assert reshape_groups([n, s, *_i(64)], [n * s, *_i(64)]) is None
    assert reshape_groups([s, *_i(64)], [n, *_i(64)]) is None
    assert reshape_groups([s, *_i(6)], [s, *_i(4)]) is None


def _kernel_text(src: list, dst: list) -> str:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(src, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.permute_dims(relax.op.reshape(x, dst), [0, 2, 3, 1])))
        bb.emit_func_output(y)
    mod = legalize_and_fuse(bb.get(), tvm.target.Target({"kind": "llvm"}))
    return "\n".join(f.script() for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))


def test_head_split_indexes_without_division_by_the_length() -> None:
    n, s = tirx.Var("N", "int64"), tirx.Var("S", "int64")
    text = _kernel_text([n, s, 64], [n, s, 4, 16])
    assert "// S" not in text and "% S" not in text, text
    # static: TVM's reshape as before (its indices simplify at compile time)
    assert "T_reshape" in _kernel_text([2, 8, 64], [2, 8, 4, 16])


def _head_split_model() -> onnx.ModelProto:
    return onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        "g (float[N, S, 64] x) => (float[N, S, 64] y) {\n"
        "    shp = Shape (x)\n"
        "    i0 = Constant <value = int64[1] {0}> ()\n"
        "    i1 = Constant <value = int64[1] {1}> ()\n"
        "    nb = Gather <axis = 0> (shp, i0)\n"
        "    sq = Gather <axis = 0> (shp, i1)\n"
        "    hs = Constant <value = int64[2] {4, 16}> ()\n"
        "    d = Constant <value = int64[1] {64}> ()\n"
        "    split = Concat <axis = 0> (nb, sq, hs)\n"
        "    merge = Concat <axis = 0> (nb, sq, d)\n"
        "    r = Reshape (x, split)\n"
        "    k = Transpose <perm = [0, 2, 3, 1]> (r)\n"
        "    kt = Transpose <perm = [0, 3, 1, 2]> (k)\n"
        "    z = Reshape (kt, merge)\n"
        "    y = Add (z, x)\n"
        "}")


def test_head_split_model_equals_onnxruntime_at_every_length() -> None:
    m = _head_split_model()
    art = graphopt.compile(m, "cpu", "-O2", threads=2)
    ref = graphopt.load(m)
    for shape in [(1, 1, 64), (1, 5, 64), (2, 16, 64), (1, 17, 64), (2, 77, 64)]:
        x = np.random.default_rng(shape[1]).standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(art.run({"x": x})[0], run_onnxruntime(ref, {"x": x})[0])

"""convert-precision: fires with its counts, leaves sensitive ops / globs / overflowing tensors fp32,
keeps the model's io types, adds no redundant Cast pair, is idempotent, verifies, and keeps
onnxruntime's outputs close to fp32 (cosine >= 0.999) on a conv net and a small transformer."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.version_converter
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.check import run_onnxruntime
from graphopt.ir import Attr, AttrType, DataType, Model
from graphopt.passes.cleanup.infer import infer_types
from graphopt.passes.precision import kernels
from graphopt.transform import PassContext, get_pass, parse_pipeline
from onnx_builders import model as make, vi

F, H, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64
RNG = np.random.default_rng(0)


def w(name, *shape, scale=0.2):
    return numpy_helper.from_array((scale * RNG.standard_normal(shape)).astype(np.float32), name)


def convert(model: Model, ctx: PassContext | None = None, **options):
    """The pass on a copy: (new model, result, ctx); verify() after, and a second run changes nothing."""
    out = model.clone()
    ctx = ctx or PassContext()
    result = get_pass("convert-precision")(**options).run(out, ctx)
    out.verify()
    again = out.clone()
    second = get_pass("convert-precision")(**options).run(again, PassContext(data=dict(ctx.data), machine=ctx.machine))
    assert not second.changed, second.stats
    assert str(again) == str(out)
    onnx.checker.check_model(graphopt.to_onnx(out))
    return out, result, ctx


def unchanged(out: Model, m: Model) -> bool:
    """`out` is `m` (the pass runs type inference: compare against an inferred copy)."""
    ref = m.clone()
    infer_types(ref)
    return str(out) == str(ref)


def cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ops(model: Model, op: str) -> list:
    return [n for n in model.graph if n.op_type == op]


def no_cast_pairs(model: Model) -> bool:
    for n in ops(model, "Cast"):
        p = n.inputs[0].producer()
        if p is not None and p.op_type == "Cast":
            return False
    return True


def conv_net() -> Model:
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"]),
    ]
    inits = [w("w1", 8, 3, 3, 3), w("b1", 8), w("w2", 8, 8, 3, 3, scale=0.1), w("b2", 8), w("wf", 10, 8), w("bf", 10)]
    return make(nodes, [vi("x", ["N", 3, 16, 16])], [vi("prob", ["N", 10]), vi("logits", ["N", 10])], inits)


def transformer() -> Model:
    """One pre-LN encoder block: LayerNorm, attention (Softmax), residual, Erf-GELU MLP."""
    d, s, hid = 32, 16, 64
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "be"], ["ln"], axis=-1),
        helper.make_node("MatMul", ["ln", "wq"], ["q"]),
        helper.make_node("MatMul", ["ln", "wk"], ["k"]),
        helper.make_node("MatMul", ["ln", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
        helper.make_node("Mul", ["qk", "scale"], ["qks"]),
        helper.make_node("Softmax", ["qks"], ["att"], axis=-1),
        helper.make_node("MatMul", ["att", "v"], ["ctx"]),
        helper.make_node("MatMul", ["ctx", "wo"], ["o"]),
        helper.make_node("Add", ["o", "x"], ["h"]),
        helper.make_node("MatMul", ["h", "w1"], ["f1"]),
        helper.make_node("Add", ["f1", "b1"], ["f1b"]),
        helper.make_node("Div", ["f1b", "sqrt2"], ["gd"]),
        helper.make_node("Erf", ["gd"], ["ge"]),
        helper.make_node("Add", ["ge", "one"], ["gp"]),
        helper.make_node("Mul", ["f1b", "gp"], ["gm"]),
        helper.make_node("Mul", ["gm", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "w2"], ["f2"]),
        helper.make_node("Add", ["f2", "h"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.ones(d, np.float32), "g"), numpy_helper.from_array(np.zeros(d, np.float32), "be"),
             w("wq", d, d), w("wk", d, d), w("wv", d, d), w("wo", d, d), w("w1", d, hid), w("b1", hid), w("w2", hid, d),
             numpy_helper.from_array(np.array(d ** -0.5, np.float32), "scale"),
             numpy_helper.from_array(np.array(2 ** 0.5, np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"), numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    return make(nodes, [vi("x", [1, s, d])], [vi("y", [1, s, d])], inits)


# --- fires -----------------------------------------------------------------------------------
def test_conv_net_converts_all_but_softmax_keeps_io_types_and_numbers():
    m = conv_net()
    x = RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)
    out, r, ctx = convert(m, kernels="any")
    # Conv x2, Relu x2, Add, GlobalAveragePool, Flatten, Gemm low; Softmax kept (sensitive)
    assert r.stats["converted"] == 8
    assert r.stats["kept-fp32"] == 1 and r.stats["kept-sensitive"] == 1
    assert r.stats["initializers-converted"] == 6
    # Cast after the input, one back before Softmax (shared with the logits output's Cast)
    assert r.stats["casts-added"] == 2
    assert ops(out, "Softmax")[0].inputs[0].dtype == DataType.FLOAT
    assert all(n.outputs[0].dtype == DataType.FLOAT16 for n in ops(out, "Conv"))
    assert [v.dtype for v in out.graph.inputs] == [DataType.FLOAT]
    assert [(v.name, v.dtype) for v in out.graph.outputs] == [("prob", DataType.FLOAT), ("logits", DataType.FLOAT)]
    assert all(v.dtype == DataType.FLOAT16 for v in out.graph.initializers.values())
    assert no_cast_pairs(out)
    ref = run_onnxruntime(m, {"x": x})
    got = run_onnxruntime(out, {"x": x})
    assert [g.dtype for g in got] == [np.float32, np.float32]
    assert min(cos(a, b) for a, b in zip(ref, got)) >= 0.999
    assert "Softmax x1" in " ".join(ctx.log)


def test_transformer_block_keeps_softmax_fp32_and_numbers():
    m = transformer()
    x = RNG.standard_normal((1, 16, 32)).astype(np.float32)
    out, r, _ = convert(m, kernels="any")
    # Softmax kept; LayerNormalization (stash_type=1: statistics in fp32 by the spec) converts
    assert r.stats["kept-sensitive"] == 1 and r.stats["kept-fp32"] == 1
    assert r.stats["converted"] == 19
    assert ops(out, "LayerNormalization")[0].outputs[0].dtype == DataType.FLOAT16
    assert all(n.outputs[0].dtype == DataType.FLOAT16 for n in ops(out, "MatMul"))
    assert no_cast_pairs(out)
    # the input is cast once for its two readers (LayerNorm, the residual Add); Softmax gets one
    # Cast in and one out; the output one Cast back
    assert r.stats["casts-added"] == 4
    xin = out.graph.inputs[0]
    assert len(xin.consumers()) == 1 and xin.consumers()[0].op_type == "Cast"
    ref = run_onnxruntime(m, {"x": x})
    got = run_onnxruntime(out, {"x": x})
    assert got[0].dtype == np.float32 and cos(ref[0], got[0]) >= 0.999


def test_layernorm_with_fp16_statistics_stays_fp32():
    m = transformer()
    ln = ops(m, "LayerNormalization")[0]
    ln.set_attr(Attr("stash_type", AttrType.INT, 0))
    out, r, ctx = convert(m, kernels="any")
    assert r.stats["kept-sensitive"] == 2
    assert ops(out, "LayerNormalization")[0].outputs[0].dtype == DataType.FLOAT


def test_keep_io_types_false_makes_io_fp16():
    m = conv_net()
    out, r, _ = convert(m, kernels="any", keep_io_types=False)
    assert [v.dtype for v in out.graph.inputs] == [DataType.FLOAT16]
    assert [v.dtype for v in out.graph.outputs] == [DataType.FLOAT16, DataType.FLOAT16]
    assert [v.name for v in out.graph.outputs] == ["prob", "logits"]
    x = RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)
    ref = run_onnxruntime(m, {"x": x})
    got = run_onnxruntime(out, {"x": x.astype(np.float16)})
    assert got[0].dtype == np.float16 and cos(ref[0], got[0]) >= 0.999
    assert no_cast_pairs(out)


def test_existing_cast_to_float_is_retargeted_not_paired():
    nodes = [helper.make_node("Cast", ["ids"], ["f"], to=F), helper.make_node("MatMul", ["f", "w"], ["y"])]
    m = make(nodes, [vi("ids", [2, 4], I64)], [vi("y", [2, 3])], [w("w", 4, 3)])
    out, r, _ = convert(m, kernels="any")
    casts = ops(out, "Cast")
    assert [c.attr("to") for c in casts] == [int(DataType.FLOAT16), int(DataType.FLOAT)]  # int->fp16, then the output back
    assert no_cast_pairs(out)
    ids = np.arange(8, dtype=np.int64).reshape(2, 4)
    np.testing.assert_allclose(run_onnxruntime(out, {"ids": ids})[0], run_onnxruntime(m, {"ids": ids})[0], rtol=2e-3, atol=1e-2)


def test_huge_constant_is_clamped_to_fp16_range():
    mask = numpy_helper.from_array(np.array([0.0, -3.4e38, 0.0, -3.4e38], np.float32), "mask")
    nodes = [helper.make_node("Add", ["x", "mask"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    m = make(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])], [mask])
    out, r, _ = convert(m, kernels="any")
    assert r.stats["constants-clamped"] == 2
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    got = run_onnxruntime(out, {"x": x})[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, run_onnxruntime(m, {"x": x})[0], atol=5e-3)


# --- near-misses -----------------------------------------------------------------------------
def test_keep_glob_keeps_named_nodes_fp32():
    m = conv_net()
    m.graph.nodes[0].name = "stem/conv"
    out, r, ctx = convert(m, kernels="any", keep=("stem/*",))
    assert r.stats["kept-glob"] == 1
    assert ops(out, "Conv")[0].outputs[0].dtype == DataType.FLOAT
    assert ops(out, "Conv")[1].outputs[0].dtype == DataType.FLOAT16
    assert parse_pipeline("convert-precision{keep=stem/*:head*}")[0].keep == ("stem/*", "head*")


def test_sensitive_and_blocked_ops_stay_fp32():
    nodes = [
        helper.make_node("Exp", ["x"], ["e"]),
        helper.make_node("ReduceSum", ["e", "ax"], ["s"]),
        helper.make_node("TopK", ["s", "k"], ["tv", "ti"]),
        helper.make_node("Max", ["tv", "x2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "ax"), numpy_helper.from_array(np.array([2], np.int64), "k")]
    m = make(nodes, [vi("x", [3, 4]), vi("x2", [3, 2])], [vi("y", [3, 2]), vi("ti", [3, 2], I64)], inits)
    out, r, ctx = convert(m, kernels="any")
    assert not r.changed
    assert r.stats["kept-sensitive"] == 2 and r.stats["kept-blocked"] == 2
    assert "nothing converted" in r.note
    assert unchanged(out, m)


def test_integer_only_model_is_untouched():
    m = make([helper.make_node("Add", ["a", "b"], ["y"])], [vi("a", [2], I64), vi("b", [2], I64)], [vi("y", [2], I64)])
    out, r, _ = convert(m, kernels="any")
    assert not r.changed and r.stats["converted"] == 0 and unchanged(out, m)


def test_lone_data_movement_op_is_not_converted():
    nodes = [helper.make_node("Exp", ["x"], ["e"]), helper.make_node("Transpose", ["e"], ["t"], perm=[1, 0]),
             helper.make_node("Log", ["t"], ["y"])]
    m = make(nodes, [vi("x", [2, 3])], [vi("y", [3, 2])])
    out, r, _ = convert(m, kernels="any")
    assert not r.changed and r.stats["casts-added"] == 0


def test_calibrated_overflow_keeps_fp32():
    big = numpy_helper.from_array(np.array(1000.0, np.float32), "big")
    nodes = [helper.make_node("Mul", ["x", "big"], ["m"]), helper.make_node("Mul", ["m", "big"], ["m2"]),
             helper.make_node("Tanh", ["m2"], ["y"])]
    m = make(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])], [big])
    calib = {"x": RNG.uniform(-1, 1, (8, 4)).astype(np.float32)}
    _, r0, _ = convert(m, kernels="any")
    assert r0.stats["converted"] == 3  # without data, nothing looks like an overflow
    out, r, ctx = convert(m, PassContext(data={"calibration": calib}), kernels="any")
    # m2 reaches ~1e6: its producer and its reader stay fp32; the first Mul (|x| <= 1000) converts
    assert r.stats["kept-overflow"] == 2 and r.stats["converted"] == 1
    x = calib["x"][:2]
    assert np.isfinite(run_onnxruntime(out, {"x": x})[0]).all()


def test_bf16_on_onnxruntime_is_refused_with_reason():
    m = conv_net()
    out, r, ctx = convert(m, dtype="bf16")
    assert not r.changed and r.note.startswith("refused: onnxruntime's CPU EP has no bf16 kernel")
    assert str(out) == str(m)


def test_bf16_any_converts_by_schema():
    out, r, ctx = convert(conv_net(), dtype="bf16", kernels="any")
    # opset 17: Conv-11 and GlobalAveragePool-1 have no bf16 (Conv has from opset 22); Add-14
    # and Gemm-13 convert, the Relu after the Add follows, the one after a Conv does not
    low = [n.op_type for n in out.graph if n.op_type != "Cast" and n.outputs[0].dtype == DataType.BFLOAT16]
    assert r.stats["converted"] == 3 and low == ["Add", "Relu", "Gemm"]
    assert r.stats["kept-schema"] == 3
    assert any("schema: Conv-11 has no bfloat16" in line for line in ctx.log)
    out, r, _ = convert(graphopt.load(onnx.version_converter.convert_version(graphopt.to_onnx(conv_net()), 22)), dtype="bf16", kernels="any")
    assert r.stats["converted"] == 8
    assert all(n.outputs[0].dtype == DataType.BFLOAT16 for n in ops(out, "Conv"))
    assert [v.dtype for v in out.graph.outputs] == [DataType.FLOAT, DataType.FLOAT]


def test_kernels_onnxruntime_converts_only_native_kernels():
    """On this runtime, only ops with a native fp16 CPU kernel convert; the model still runs."""
    m = transformer()
    out, r, ctx = convert(m)  # kernels=auto: onnxruntime on the onnx target
    opset = 17
    for n in out.graph:
        if n.outputs and n.outputs[0].dtype == DataType.FLOAT16 and n.op_type != "Cast":
            types = [None if v is None else v.dtype for v in n.inputs]
            ranks = [None if v is None or v.shape is None else v.shape.rank for v in n.inputs]
            assert kernels.onnxruntime_kernel(n, types, ranks, opset)[0] == kernels.NATIVE, n
    core = kernels.probe_compute_ops(DataType.FLOAT16)
    if core["MatMul"] != kernels.NATIVE:  # x86-64 onnxruntime: MatMul is kept and said so
        assert r.stats.get("kept-kernel", 0) >= 7
        assert any("no float16 kernel in onnxruntime's CPU EP" in line for line in ctx.log)
        # LayerNormalization has an fp16 kernel, but between fp32 MatMuls it would only add Casts
        assert r.stats["kept-isolated"] == 1 and not r.changed
    x = RNG.standard_normal((1, 16, 32)).astype(np.float32)
    assert cos(run_onnxruntime(m, {"x": x})[0], run_onnxruntime(out, {"x": x})[0]) >= 0.999


def test_bad_options():
    with pytest.raises(graphopt.UsageError):
        parse_pipeline("convert-precision{dtype=fp8}")
    with pytest.raises(graphopt.UsageError):
        parse_pipeline("convert-precision{kernels=gpu}")


def test_gather_from_embedding_table_converts_the_table():
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])]
    m = make(nodes, [vi("ids", [2, 5], I64)], [vi("y", [2, 5, 4])], [w("emb", 50, 8), w("w", 8, 4)])
    out, r, _ = convert(m, kernels="any")
    assert r.stats["converted"] == 2 and r.stats["initializers-converted"] == 2
    assert ops(out, "Gather")[0].inputs[0].dtype == DataType.FLOAT16
    assert all(v.dtype == DataType.FLOAT16 for v in out.graph.initializers.values())
    ids = RNG.integers(0, 50, (2, 5)).astype(np.int64)
    assert cos(run_onnxruntime(m, {"ids": ids})[0], run_onnxruntime(out, {"ids": ids})[0]) >= 0.999


class _Machine:  # a compiled target's machine model: only its presence matters to the pass
    features = frozenset({"avx512bf16"})


def test_compiled_target_converts_only_dot_product_ops_and_their_data_movement():
    out, r, ctx = convert(conv_net(), PassContext(machine=_Machine()), dtype="bf16")
    low = [n.op_type for n in out.graph if n.op_type != "Cast" and n.outputs[0].dtype == DataType.BFLOAT16]
    # opset 17's Conv has no bf16 in ONNX, but a compiled target lowers it anyway
    assert low == ["Conv", "Relu", "Conv", "Gemm"]
    assert r.stats["kept-kernel"] == 2 and r.stats["kept-sensitive"] == 1  # Add, GlobalAveragePool; Softmax
    assert any("compiled target: bfloat16 only for the dot-product ops" in line for line in ctx.log)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cpu_target_runs_bf16_model(dtype, tmp_path):
    pytest.importorskip("tvm")
    m = conv_net()
    path = str(tmp_path / "m.onnx")
    onnx.save(graphopt.to_onnx(m), path)
    art = graphopt.compile(path, target="cpu", pipeline=f"-O2,convert-precision{{dtype={dtype}}}", dims={"N": 1})
    x = RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)
    ref = run_onnxruntime(m, {"x": x})
    got = list(art.run({"x": x}))
    assert [g.dtype for g in got] == [np.float32, np.float32]
    assert min(cos(a, b) for a, b in zip(ref, got)) >= 0.999
    assert bool(art.manifest["runtime"].get("bfloat16")) == (dtype == "bf16")  # bf16 weights stored as their bits


def test_random_models_convert_run_and_are_idempotent():
    """Random runnable models (If bodies, functions, shape ops): the fp16 model verifies, loads
    and runs on onnxruntime with the same output dtypes and shapes, and a second run is a no-op."""
    from hypothesis import HealthCheck, given, settings

    from graphopt.testing import models, random_inputs

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(models(allow_shape_ops=True))
    def check(m: Model) -> None:
        out, r, _ = convert(m, kernels="any")
        feeds = random_inputs(m, seed=1)
        ref = run_onnxruntime(m, feeds)
        got = run_onnxruntime(out, feeds)
        assert [(a.dtype, a.shape) for a in ref] == [(b.dtype, b.shape) for b in got]

    check()


def test_cast_to_float_between_converted_ops_is_removed():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Cast", ["a"], ["c"], to=F),
             helper.make_node("MatMul", ["c", "w2"], ["y"])]
    m = make(nodes, [vi("x", [2, 4])], [vi("y", [2, 3])], [w("w", 4, 4), w("w2", 4, 3)])
    out, r, _ = convert(m, kernels="any")
    assert r.stats["casts-removed"] == 1
    assert [c.attr("to") for c in ops(out, "Cast")] == [int(DataType.FLOAT16), int(DataType.FLOAT)]  # input in, output out
    assert no_cast_pairs(out)


def test_calibration_file_option(tmp_path):
    big = numpy_helper.from_array(np.array(300.0, np.float32), "big")
    nodes = [helper.make_node("Mul", ["x", "big"], ["m"]), helper.make_node("Mul", ["m", "big"], ["y"])]
    m = make(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])], [big])
    path = str(tmp_path / "calib.npz")
    np.savez(path, x=RNG.uniform(-1, 1, (8, 4)).astype(np.float32))
    out, r, _ = convert(m, kernels="any", data=path)
    # y reaches ~9e4 > 65504: the second Mul stays fp32, the first (|m| <= 300) converts
    assert r.stats["kept-overflow"] == 1 and r.stats["converted"] == 1
    assert ops(out, "Mul")[1].outputs[0].dtype == DataType.FLOAT


def test_cli_calibration_reaches_convert_precision(tmp_path, capsys):
    from graphopt.cli import main

    big = numpy_helper.from_array(np.array(300.0, np.float32), "big")
    nodes = [helper.make_node("Mul", ["x", "big"], ["m"]), helper.make_node("Mul", ["m", "big"], ["y"])]
    m = make(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])], [big])
    src, calib, dst = str(tmp_path / "m.onnx"), str(tmp_path / "c.npz"), str(tmp_path / "o.onnx")
    onnx.save(graphopt.to_onnx(m), src)
    np.savez(calib, x=RNG.uniform(-1, 1, (8, 4)).astype(np.float32))
    code = main([src, "--passes", "convert-precision{kernels=any}", "--calibration", calib, "-o", dst])
    cap = capsys.readouterr()
    out = cap.out + cap.err
    assert code == 0 and "1 ops to fp16, 1 kept fp32" in out and "(3 tensors calibrated)" in out
    assert main([src, "--passes", "dce", "--calibration", calib, "-o", dst]) == 2  # still refused where nothing reads it

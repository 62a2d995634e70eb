"""Default CPU schedules for transformer kernels (graphopt.targets.tvm.schedules.base): a matmul's
decomposed GELU epilogue becomes one block in the accumulator write-back, matmul-like kernels get
the wide register tile and K blocking, and softmax / layer norm get the RowReduction rule. Every
kernel is checked against numpy, a small encoder layer against onnxruntime."""

from __future__ import annotations

import re
from math import erf

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
relax = pytest.importorskip("tvm.relax")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from onnx import TensorProto, numpy_helper  # noqa: E402
from onnx import helper as h  # noqa: E402

from tvm_kernels import fuse, fused as _fused, avx2_target as _target, run as _run  # noqa: E402  (AVX2 expectations)
from tvm_kernels import AVX2_MCPU, AVX512_MCPU  # noqa: E402

import graphopt  # noqa: E402
from graphopt.targets.tvm import schedules as S  # noqa: E402
from graphopt.targets.tvm.schedules import knobs  # noqa: E402
from graphopt.targets.tvm.schedules import loop_marks as LM  # noqa: E402
from graphopt.targets.tvm.schedules.row_reduction import RowReduction  # noqa: E402
from graphopt.targets.tvm.schedules import LAYOUT_REWRITE_ANN, ScheduleStats, apply_default_schedules  # noqa: E402

TT = relax.TensorType
_erf = np.vectorize(erf)


def _schedule(mod):
    stats = ScheduleStats()
    smod = apply_default_schedules(mod, _target(), stats=stats)
    funcs = [f for _, f in smod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert funcs and all(int(f.attrs["tirx.is_scheduled"]) == 1 for f in funcs)
    return smod, stats, funcs


def _gelu_body(bb, xv, wv):
    """matmul, then GELU as ONNX exports it op by op: y * (erf(y / sqrt2) + 1) * 0.5 (reads y twice)."""
    y = bb.emit(relax.op.matmul(xv, wv))
    t = bb.emit(relax.op.divide(y, relax.const(np.float32(np.sqrt(2.0)))))
    t = bb.emit(relax.op.erf(t))
    t = bb.emit(relax.op.add(t, relax.const(np.float32(1.0))))
    t = bb.emit(relax.op.multiply(y, t))
    return bb.emit(relax.op.multiply(t, relax.const(np.float32(0.5))))


def _gelu_ref(x, w):
    y = x.astype(np.float64) @ w.astype(np.float64)
    return (y * (_erf(y / np.sqrt(2.0)) + 1) * 0.5).astype(np.float32)


def test_decomposed_gelu_epilogue_is_one_block_in_the_write_back():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    w = (rng.standard_normal((64, 96)) / 8).astype(np.float32)
    mod = _fused(_gelu_body, [("x", x.shape), ("w", w.shape)])
    smod, stats, (func,) = _schedule(mod)
    assert stats.by_func and set(stats.by_func.values()) == {"outer-product"}
    script = func.script()
    # the weight pack and the matmul with its epilogue: two parallel loops, not the five extra
    # passes over the output the unfused GELU took
    assert script.count("T.parallel(") == 2, script
    assert "T.erf(" in script and script.count("T.sblock_alloc_buffer") <= 2
    np.testing.assert_allclose(_run(smod, [x, w]), _gelu_ref(x, w), rtol=1e-5, atol=1e-5)
    # the knob off: the same kernel keeps its numbers with the epilogue as separate passes
    with knobs.using(knobs.ScheduleKnobs(inline_epilogue=False)):
        smod2, _, (func2,) = _schedule(mod)
    assert func2.script().count("T.parallel(") > 2
    np.testing.assert_allclose(_run(smod2, [x, w]), _gelu_ref(x, w), rtol=1e-5, atol=1e-5)
    assert knobs.current().inline_epilogue  # (scoped: the defaults again after the block)


def test_transposing_epilogue_keeps_numbers():
    """Near miss for the write-back: an epilogue that transposes the matmul's output cannot be
    inlined into the accumulator tile's write-back; it stays a pass of its own, numbers kept."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    w = rng.standard_normal((32, 24)).astype(np.float32)
    mod = _fused(lambda bb, a, b: bb.emit(relax.op.permute_dims(relax.op.nn.relu(relax.op.matmul(a, b)))),
                 [("x", x.shape), ("w", w.shape)])
    smod, stats, _ = _schedule(mod)
    assert "outer-product" in stats.by_func.values()  # (FuseOps may leave the transpose a kernel of its own)
    np.testing.assert_allclose(_run(smod, [x, w]), np.maximum(x.astype(np.float64) @ w, 0).T, rtol=1e-4, atol=1e-4)


def test_matmul_wide_tile_and_k_blocking():
    """M = 128 (no 6 divides it): 4 rows x 3 vectors; K = 384: blocked by 128 with the panel's
    accumulators in a local [M, vt] buffer. The pack is [N/24, K, 24]."""
    lanes = S.vector_lanes(_target())
    rng = np.random.default_rng(2)
    n = 6 * lanes
    x = rng.standard_normal((128, 384)).astype(np.float32)
    w = (rng.standard_normal((384, n)) / 16).astype(np.float32)
    b = rng.standard_normal((n,)).astype(np.float32)
    mod = _fused(lambda bb, a, wv, bv: bb.emit(relax.op.add(relax.op.matmul(a, wv), bv)),
                 [("x", x.shape), ("w", w.shape), ("b", b.shape)])
    smod, stats, (func,) = _schedule(mod)
    assert set(stats.by_func.values()) == {"outer-product"}
    script = func.script()
    vt = 3 * lanes
    assert f"T.int64({n // vt}), T.int64(384), T.int64({vt})" in script  # the packed panels
    assert LAYOUT_REWRITE_ANN in script
    assert f"T.int64(3), T.int64(32), T.int64({knobs.current().matmul_k_block})" in script  # k_o, row tiles, k_i
    assert f"T.sblock_alloc_buffer((T.int64(128), T.int64({n})), scope=\"local\")" in script
    ref = (x.astype(np.float64) @ w + b).astype(np.float32)
    np.testing.assert_allclose(_run(smod, [x, w, b]), ref, rtol=1e-4, atol=1e-4)
    # hoisted packing (as the cpu target does for weights): same numbers
    split = relax.transform.SplitLayoutRewritePreproc()(smod)
    np.testing.assert_allclose(_run(split, [x, w, b]), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows,wide", [(128, True), (197, False), (7, False)])
def test_wide_tile_only_for_whole_row_tiles(rows, wide):
    """The 3-vector tile is for whole 4-row tiles (M = 128); a prime row count (ViT's 197: 6-row
    tiles plus a tail) or a 7-row tile keeps 2 vectors, so the accumulators stay within 14."""
    lanes = S.vector_lanes(_target())
    rng = np.random.default_rng(7)
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    w = (rng.standard_normal((64, 6 * lanes)) / 8).astype(np.float32)
    mod = _fused(lambda bb, a, wv: bb.emit(relax.op.matmul(a, wv)), [("x", x.shape), ("w", w.shape)])
    smod, _, (func,) = _schedule(mod)
    script = func.script()
    vt = 3 * lanes if wide else 2 * lanes
    assert f"T.int64({6 * lanes // vt}), T.int64(64), T.int64({vt})" in script  # the [N/vt, K, vt] pack
    np.testing.assert_allclose(_run(smod, [x, w]), (x.astype(np.float64) @ w).astype(np.float32), rtol=1e-4, atol=1e-4)


def test_convs_keep_the_register_tile():
    """The matmul-only tile changes leave NCHW convolutions alone: no K blocking, at most
    2 vectors wide (the output's last axis is the register axis there)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 64, 8, 8)).astype(np.float32)
    w = (rng.standard_normal((48, 64, 3, 3)) / 16).astype(np.float32)
    mod = _fused(lambda bb, a, wv: bb.emit(relax.op.nn.conv2d(a, wv, padding=1)), [("x", x.shape), ("w", w.shape)])
    _, _, (f_on,) = _schedule(mod)
    with knobs.using(knobs.ScheduleKnobs.parse("MATMUL_WIDE_VT:0;MATMUL_K_BLOCK:0")):
        _, _, (f_off,) = _schedule(mod)
    import tvm_ffi

    assert tvm_ffi.structural_equal(f_on, f_off)


@settings(max_examples=8, deadline=None)
@given(m=st.sampled_from([1, 4, 12, 37, 128]), k=st.sampled_from([8, 100, 256, 384]),
       n_vec=st.sampled_from([1, 2, 3, 5, 6]), gelu=st.booleans())
def test_matmul_shapes_keep_numbers(m, k, n_vec, gelu):
    """Random matmul shapes around the tile and K-block sizes, with and without the GELU epilogue."""
    lanes = S.vector_lanes(_target())
    n = n_vec * lanes
    rng = np.random.default_rng(m * 1000 + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    if gelu:
        mod, ref = _fused(_gelu_body, [("x", x.shape), ("w", w.shape)]), _gelu_ref(x, w)
    else:
        mod = _fused(lambda bb, a, wv: bb.emit(relax.op.matmul(a, wv)), [("x", x.shape), ("w", w.shape)])
        ref = (x.astype(np.float64) @ w).astype(np.float32)
    smod, _, _ = _schedule(mod)
    np.testing.assert_allclose(_run(smod, [x, w]), ref, rtol=1e-4, atol=1e-4)


ROW_CASES = [
    # (name, shape, op)  the rule fires on reductions over the innermost axis
    ("softmax", (2, 12, 40), "softmax"),
    ("softmax_odd_row", (3, 5, 33), "softmax"),  # 33: 4 whole vectors and a predicated one (RAGGED_ROWS)
    ("layer_norm", (1, 24, 96), "layer_norm"),
    ("mean_keepdims", (6, 64), "mean"),
]


@pytest.mark.parametrize("case", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_row_reductions(case):
    name, shape, op = case
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    c = shape[-1]
    g = rng.standard_normal((c,)).astype(np.float32)
    b = rng.standard_normal((c,)).astype(np.float32)
    if op == "softmax":
        mod = _fused(lambda bb, a: bb.emit(relax.op.nn.softmax(a, axis=-1)), [("x", shape)])
        e = np.exp(x - x.max(-1, keepdims=True))
        ref, args = e / e.sum(-1, keepdims=True), [x]
    elif op == "layer_norm":
        mod = _fused(lambda bb, a, gv, bv: bb.emit(relax.op.nn.layer_norm(a, gv, bv, axes=[-1], epsilon=1e-5)),
                     [("x", shape), ("g", g.shape), ("b", b.shape)])
        x64 = x.astype(np.float64)
        mu = x64.mean(-1, keepdims=True)
        ref = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b
        args = [x, g, b]
    else:
        mod = _fused(lambda bb, a: bb.emit(relax.op.subtract(a, relax.op.mean(a, axis=-1, keepdims=True))),
                     [("x", shape)])
        ref, args = x - x.astype(np.float64).mean(-1, keepdims=True), [x]
    smod, stats, (func,) = _schedule(mod)
    assert set(stats.by_func.values()) == {"row-reduction"}, (stats.by_func, stats.failures)
    script = func.script()
    assert script.count("T.parallel(") == 1  # every step inside one loop over the rows
    if c % S.vector_lanes(_target()) == 0:
        assert "_rf" in script and "T.vectorized(" in script  # partial results as one vector
    np.testing.assert_allclose(_run(smod, args), ref, rtol=1e-5, atol=1e-5)
    with knobs.using(knobs.ScheduleKnobs(row_reduction=False)):  # the rule off: dlight's reduction schedule
        smod2, stats2, _ = _schedule(mod)
    assert "row-reduction" not in stats2.by_func.values()
    np.testing.assert_allclose(_run(smod2, args), ref, rtol=1e-5, atol=1e-5)  # same numbers


def test_row_reduction_declines_other_axes_and_matmuls():
    """Near misses: softmax over a middle axis (the reduced axis is not innermost) and a
    row-by-row dot product (a multiply-accumulate) are left to the other rules."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 16, 8)).astype(np.float32)
    mod = _fused(lambda bb, a: bb.emit(relax.op.nn.softmax(a, axis=1)), [("x", x.shape)])
    smod, stats, _ = _schedule(mod)
    assert "row-reduction" not in stats.by_func.values()
    e = np.exp(x - x.max(1, keepdims=True))
    np.testing.assert_allclose(_run(smod, [x]), e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert RowReduction().apply(next(f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)),
                                  _target(), 8) is None
    # the row statistics written transposed: the output's rows are not the reduction's rows
    y = rng.standard_normal((6, 40)).astype(np.float32)
    tmod = _fused(lambda bb, a: bb.emit(relax.op.permute_dims(relax.op.subtract(a, relax.op.mean(a, axis=-1, keepdims=True)))),
                  [("x", y.shape)])
    smod, stats, _ = _schedule(tmod)
    if len(stats.by_func) == 1:  # one kernel (FuseOps fused the transpose): not a row reduction
        assert "row-reduction" not in stats.by_func.values()
    np.testing.assert_allclose(_run(smod, [y]), (y - y.astype(np.float64).mean(-1, keepdims=True)).T, rtol=1e-5, atol=1e-5)
    # a matmul reduces over the innermost axis of its left operand too: not a row reduction
    mm = _fused(lambda bb, p, q: bb.emit(relax.op.matmul(p, q)), [("a", (8, 64)), ("b", (64, 16))])
    func = next(f for _, f in mm.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    assert RowReduction().apply(func, _target(), 8) is None


def _symbolic_row_model(op: str) -> onnx.ModelProto:
    """Softmax over the scores [N, 4, S, S] of an attention, or a layer norm over [N, S, 64]."""
    if op == "softmax":
        return onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n'
                                       "g (float[N, 4, S, S] x) => (float[N, 4, S, S] y) {\n"
                                       "    y = Softmax <axis = -1> (x)\n}")
    rng = np.random.default_rng(8)
    g = numpy_helper.from_array(rng.uniform(0.5, 1.5, 64).astype(np.float32), "g")
    b = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b")
    graph = h.make_graph([h.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)], "g",
                         [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 64])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 64])], [g, b])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["softmax", "layer_norm"])
def test_symbolic_row_reductions_equal_onnxruntime(op):
    """Row reductions whose rows (and, for softmax, row length) are a symbolic S: one compiled
    kernel gives onnxruntime's numbers at S = 1, 5, 16, 17, 77 (no multiple of the lanes among
    some) and N = 1, 2. Softmax over [N, 4, S, S] is parallel over the 4 heads with the S rows
    serial inside (SYMBOLIC_ROW_LOOPS: one loop h x S, its rows found again by // S and % S); the
    knob off gives the fused loop and the same numbers."""
    from graphopt.check import run_onnxruntime

    m = _symbolic_row_model(op)
    art = graphopt.compile(m, "cpu", "-O2", threads=2)
    assert art.manifest["schedules"]["rules"].get("row-reduction", 0) >= 1, art.manifest["schedules"]["rules"]
    off = graphopt.compile(m, "cpu{schedule-knobs=SYMBOLIC_ROW_LOOPS:0;VECTOR_SYMBOLIC_ROWS:0}", "-O2", threads=2)
    ref = graphopt.load(m)
    for n, s in ((1, 1), (1, 5), (2, 16), (1, 17), (1, 32), (2, 77), (1, 128)):
        shape = (n, 4, s, s) if op == "softmax" else (n, s, 64)
        x = (np.random.default_rng(s).standard_normal(shape) * 3).astype(np.float32)
        want = run_onnxruntime(ref, {"x": x})[0]
        for a in (art, off):
            np.testing.assert_allclose(a.run({"x": x})[0], want, rtol=1e-5, atol=1e-6)


def _projection_model(gelu: bool) -> onnx.ModelProto:
    """x [N, S, 64] @ w [64, 96] + b (then GELU as exported op by op): two symbolic row axes."""
    rng = np.random.default_rng(13)
    inits = [numpy_helper.from_array((rng.standard_normal((64, 96)) / 8).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(96).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(np.sqrt(2), np.float32), "r2"),
             numpy_helper.from_array(np.array(1, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [h.make_node("MatMul", ["x", "w"], ["m"]), h.make_node("Add", ["m", "b"], ["y" if not gelu else "f"])]
    if gelu:
        nodes += [h.make_node("Div", ["f", "r2"], ["d"]), h.make_node("Erf", ["d"], ["e"]),
                  h.make_node("Add", ["e", "one"], ["e1"]), h.make_node("Mul", ["f", "e1"], ["g"]),
                  h.make_node("Mul", ["g", "half"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 64])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 96])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("gelu", [False, True], ids=["bias", "gelu"])
def test_two_symbolic_row_axes_batch_one_branch(gelu):
    """[N, S, 64] x [64, 96] (+ bias, + GELU), N and S symbolic, with SHIFT_SYMBOLIC_TILES off (by
    default the shifted S tiles take every N, test_symbolic_tiles_are_shifted): besides the
    general kernel's one-row tiles, a branch for N = 1 at run time with S padded to the row tile
    (the weight read from the general kernel's pack, which the build lifts); equal to onnxruntime
    at N = 1 and 2 and S = 1, 5, 16, 17, 77 (through both branches), with BATCH_ONE_BRANCH off
    too, and with the default (shifted) kernels."""
    from graphopt.check import run_onnxruntime

    m = _projection_model(gelu)
    seq, n = tvm.tirx.Var("S", "int64"), tvm.tirx.Var("N", "int64")
    mod = _fused(lambda bb, x, w: bb.emit(relax.op.matmul(x, w)), [("x", (n, seq, 64)), ("w", (64, 96))])
    _, _, (func_shifted,) = _schedule(mod)
    assert "if N" not in func_shifted.script() and LM.PEEL_BOUND in func_shifted.script()
    unshifted = knobs.ScheduleKnobs(shift_symbolic_tiles=False)
    with knobs.using(unshifted):
        _, stats, (func,) = _schedule(mod)
    assert "if N == T.int64(1):" in func.script() and "_pad" in func.script(), func.script()
    with knobs.using(knobs.ScheduleKnobs(shift_symbolic_tiles=False, batch_one_branch=False)):
        _, _, (func_off,) = _schedule(mod)
    assert "if N" not in func_off.script()
    # near miss: one symbolic row axis (the padded kernel already), no branch
    mod1 = _fused(lambda bb, x, w: bb.emit(relax.op.matmul(x, w)), [("x", (1, seq, 64)), ("w", (64, 96))])
    with knobs.using(unshifted):
        _, _, (func1,) = _schedule(mod1)
    assert "if " not in func1.script().split('# with T.sblock("root"):')[1]
    art = graphopt.compile(m, "cpu", "-O2", threads=2)
    branch = graphopt.compile(m, "cpu{schedule-knobs=SHIFT_SYMBOLIC_TILES:0}", "-O2", threads=2)
    off = graphopt.compile(m, "cpu{schedule-knobs=SHIFT_SYMBOLIC_TILES:0;BATCH_ONE_BRANCH:0}", "-O2", threads=2)
    ref = graphopt.load(m)
    for shape in ((1, 1, 64), (1, 5, 64), (1, 16, 64), (1, 17, 64), (1, 77, 64), (2, 5, 64), (2, 77, 64)):
        x = np.random.default_rng(shape[1]).standard_normal(shape).astype(np.float32)
        want = run_onnxruntime(ref, {"x": x})[0]
        for a in (art, branch, off):
            np.testing.assert_allclose(a.run({"x": x})[0], want, rtol=1e-4, atol=1e-5)


def test_symbolic_softmax_rows_serial_inside_the_heads():
    seq, n = tvm.tirx.Var("S", "int64"), tvm.tirx.Var("N", "int64")
    mod = _fused(lambda bb, a: bb.emit(relax.op.nn.softmax(a, axis=-1)), [("x", (n, 4, seq, seq))])
    _, stats, (func,) = _schedule(mod)
    assert set(stats.by_func.values()) == {"row-reduction"}
    script = func.script()
    lanes = S.vector_lanes(_target())
    # S a whole number of vectors: rfactor and vectorised steps; else the ragged rows: whole vectors
    # up to S // lanes without the split guard, then the guarded tail (RAGGED_SYMBOLIC_ROWS)
    assert f"if S % T.int64({lanes}) == T.int64(0):" in script and "_rf" in script and "T.vectorized(" in script, script
    scalar = script.split("\n    else:\n")[-1]  # (the top-level branch)
    assert "T.parallel(T.int64(4))" in scalar and "S * T.int64(4)" not in scalar, script
    assert scalar.count(f"in range(S // T.int64({lanes})):") == 4 and "_rf" in scalar, scalar  # max, exp, sum, norm
    assert scalar.count(f"S - T.int64({lanes})") == 2, scalar  # exp and normalise: the last vector shifted back
    with knobs.using(knobs.ScheduleKnobs(ragged_symbolic_rows=False)):
        _, _, (func_old,) = _schedule(mod)
    assert "_rf" not in func_old.script().split("\n    else:\n")[-1]  # scalar rows there, as before
    with knobs.using(knobs.ScheduleKnobs(symbolic_row_loops=False, vector_symbolic_rows=False, ragged_symbolic_rows=False)):
        _, _, (func_off,) = _schedule(mod)
    assert "S * T.int64(4)" in func_off.script() and "_rf" not in func_off.script()
    # the row length an expression, not a bare variable: no vector branch (near miss)
    mod2 = _fused(lambda bb, a: bb.emit(relax.op.nn.softmax(a, axis=-1)), [("x", (4, seq * 2))])
    _, _, (func2,) = _schedule(mod2)
    assert "if S" not in func2.script()
    rng = np.random.default_rng(12)
    for s in (1, 7, 16, 40, 77):
        x = (rng.standard_normal((2, 4, s, s)) * 3).astype(np.float32)
        e = np.exp(x - x.max(-1, keepdims=True))
        for fn in (func, func_old):
            np.testing.assert_allclose(_guarded_call(fn, [x], x.shape), e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- a whole encoder layer


def _encoder_layer(seq: int = 16, d: int = 32, heads: int = 2, ff: int = 64) -> tuple[onnx.ModelProto, dict]:
    """x → QKV projections → per-head scaled QK^T + Softmax → PV → output projection + residual →
    LayerNormalization → FFN with GELU as ONNX exports it (Div, Erf, Add, Mul, Mul) + residual →
    LayerNormalization."""
    rng = np.random.default_rng(6)
    dh = d // heads
    inits, nodes = [], []

    def w(name, shape, scale=None):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * (scale or 1 / np.sqrt(shape[0]))).astype(np.float32), name))
        return name

    def c(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    n = nodes.append
    for p in "qkv":
        n(h.make_node("MatMul", ["x", w(f"W{p}", (d, d))], [f"{p}0"]))
        n(h.make_node("Add", [f"{p}0", w(f"b{p}", (d,), 0.1)], [f"{p}1"]))
        n(h.make_node("Reshape", [f"{p}1", c(f"s{p}", np.array([1, seq, heads, dh], np.int64))], [f"{p}2"]))
        n(h.make_node("Transpose", [f"{p}2"], [f"{p}3"], perm=[0, 2, 3, 1] if p == "k" else [0, 2, 1, 3]))
    n(h.make_node("MatMul", ["q3", "k3"], ["s0"]))
    n(h.make_node("Div", ["s0", c("sc", np.float32(np.sqrt(dh)))], ["s1"]))
    n(h.make_node("Softmax", ["s1"], ["p"], axis=-1))
    n(h.make_node("MatMul", ["p", "v3"], ["o0"]))
    n(h.make_node("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3]))
    n(h.make_node("Reshape", ["o1", c("so", np.array([1, seq, d], np.int64))], ["o2"]))
    n(h.make_node("MatMul", ["o2", w("Wo", (d, d))], ["o3"]))
    n(h.make_node("Add", ["o3", "x"], ["r1"]))
    n(h.make_node("LayerNormalization", ["r1", w("ln1g", (d,), 1.0), w("be1", (d,), 0.1)], ["l1"], axis=-1))
    n(h.make_node("MatMul", ["l1", w("W1", (d, ff))], ["f0"]))
    n(h.make_node("Add", ["f0", w("b1", (ff,), 0.1)], ["f1"]))
    n(h.make_node("Div", ["f1", c("sq2", np.float32(np.sqrt(2.0)))], ["g0"]))
    n(h.make_node("Erf", ["g0"], ["g1"]))
    n(h.make_node("Add", ["g1", c("one", np.float32(1.0))], ["g2"]))
    n(h.make_node("Mul", ["f1", "g2"], ["g3"]))
    n(h.make_node("Mul", ["g3", c("half", np.float32(0.5))], ["g4"]))
    n(h.make_node("MatMul", ["g4", w("W2", (ff, d))], ["f2"]))
    n(h.make_node("Add", ["f2", "l1"], ["r2"]))
    n(h.make_node("LayerNormalization", ["r2", w("g2w", (d,), 1.0), w("be2", (d,), 0.1)], ["y"], axis=-1))
    g = h.make_graph(nodes, "enc", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, d])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, d])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m), {"x": rng.standard_normal((1, seq, d)).astype(np.float32)}


def test_encoder_layer_runs_like_onnxruntime(monkeypatch):
    """A small BERT-like layer through the cpu target: the new rules fire (GELU fused into the FFN
    matmul, softmax and layer norms as row reductions) and the outputs match onnxruntime."""
    model, feeds = _encoder_layer()
    seen = ScheduleStats()
    real = S.apply_default_schedules

    def spy(mod, target, stats=None, **kw):
        out = real(mod, target, stats=seen, **kw)
        if stats is not None:
            stats.by_func.update(seen.by_func)
        return out

    monkeypatch.setattr(S, "apply_default_schedules", spy)
    art = graphopt.compile(model, target="cpu", pipeline="-O2", threads=2)
    rules = seen.count()
    kinds = {k: v for k, v in seen.by_func.items() if v == "row-reduction"}
    assert len(kinds) >= 2, seen.by_func  # the softmax and (at least) the first layer norm
    assert rules.get("outer-product", 0) >= 4, seen.by_func
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    (got,) = art.run(feeds)
    np.testing.assert_allclose(got, ref[0], rtol=1e-4, atol=1e-4)


def _elementwise_module(x: np.ndarray, fn) -> tvm.IRModule:
    """`main(x) = fn(x)` legalized and fused into one kernel."""
    bb = relax.BlockBuilder()
    xv = relax.Var("x", TT(x.shape, str(x.dtype)))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(fn(xv)))
        bb.emit_func_output(out)
    return fuse(bb.get())


def test_float64_exp_and_erf_in_vectorised_loops():
    """float64 exp / erf inside a vectorised loop lower to libm's double functions lane by lane
    (one extern call on the whole vector gave garbage lanes: ReduceLogSumExp returned nan)."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((4, 64)) * 3).astype(np.float64)
    smod, stats, (func,) = _schedule(_elementwise_module(x, lambda v: relax.op.add(relax.op.exp(v), relax.op.erf(v))))
    assert "T.vectorized(" in func.script()
    np.testing.assert_allclose(_run(smod, [x]), np.exp(x) + _erf(x), rtol=1e-12, atol=1e-12)


def test_float16_exp_in_vectorised_loops():
    """float16 exp lowers to the float32 polynomial on the widened value (it built a tirx.Call,
    which 0.27 lacks: every fp16 attention / Celu backend case failed to compile)."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((4, 64)) * 3).astype(np.float16)
    smod, stats, (func,) = _schedule(_elementwise_module(x, relax.op.exp))
    want = np.exp(x.astype(np.float32))
    np.testing.assert_allclose(_run(smod, [x]).astype(np.float32), want, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("rows, cols", [(197, 197), (50, 37), (33, 100)])
def test_vector_axis_that_is_no_multiple_of_the_lanes_is_padded(rows, cols):
    """ViT's attention scores (12 x 197 x 64 @ 64 x 197): the column axis is padded to whole
    vectors (and the rows to whole tiles where no tile of 4+ rows divides them) instead of the
    kernel going to WindowReduction's scalar tiles; the crop writes only the real outputs."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((2, rows, 64)).astype(np.float32)
    b = rng.standard_normal((2, 64, cols)).astype(np.float32)
    mod = _fused(lambda bb, x, y: bb.emit(relax.op.multiply(relax.op.matmul(x, y), relax.const(0.125, "float32"))),
                 [("a", a.shape), ("b", b.shape)])
    smod, stats, (func,) = _schedule(mod)
    assert set(stats.by_func.values()) == {"outer-product"}
    assert "_pad" in func.script()
    np.testing.assert_allclose(_run(smod, [a, b]), (a.astype(np.float64) @ b * 0.125).astype(np.float32), rtol=1e-4, atol=1e-4)


def test_matrix_vector_products_are_not_padded():
    """One row: the padded copy of B would cost as much as the product; GEMV keeps it."""
    mod = _fused(lambda bb, x, y: bb.emit(relax.op.matmul(x, y)), [("a", (1, 64)), ("b", (64, 1000))])
    smod, stats, (func,) = _schedule(mod)
    assert "_pad" not in func.script()


def test_padded_attention_scores_match_onnxruntime():
    """The whole path for ViT's attention scores (197 tokens, no multiple of the lanes): compiled
    by the cpu target, the padded OuterProduct kernel gives onnxruntime's outputs."""
    import onnx

    from graphopt.check import run_onnxruntime
    from tvm_kernels import AVX2_CPU

    m = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n'
                                "g (float[1, 4, 197, 64] q, float[1, 4, 64, 197] k) => (float[1, 4, 197, 197] y) {\n"
                                "    s = MatMul (q, k)\n    c = Constant <value = float {0.125}> ()\n    y = Mul (s, c)\n}")
    rng = np.random.default_rng(9)
    feeds = {"q": rng.standard_normal((1, 4, 197, 64)).astype(np.float32),
             "k": rng.standard_normal((1, 4, 64, 197)).astype(np.float32)}
    art = graphopt.compile(m, AVX2_CPU, "-O2", threads=2)
    assert art.manifest["schedules"]["rules"].get("outer-product", 0) >= 1, art.manifest["schedules"]["rules"]
    np.testing.assert_allclose(art.run(feeds)[0], run_onnxruntime(graphopt.load(m), feeds)[0], rtol=1e-4, atol=1e-4)



def _guarded_call(func, arrays, out_shape, guard=256, target=None):
    """Run a scheduled PrimFunc on the host; its output buffer has `guard` sentinel floats after
    it, which a write past the end would change."""
    # (the loop marks applied, as the build applies them: the shifted tiles are what runs)
    func = LM.apply_loop_marks(func)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target or _target())
    size = int(np.prod(out_shape))
    guarded = tvm.runtime.tensor(np.full(size + guard, 7.0, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], guarded._create_view(out_shape, "float32"))
    flat = guarded.numpy()
    assert (flat[size:] == 7.0).all(), "the kernel wrote past the end of its output"
    return flat[:size].reshape(out_shape)


@pytest.mark.parametrize("kind", ["ffn_gelu", "attention_values", "attention_scores"])
def test_symbolic_rows_are_padded_to_the_row_tile(kind):
    """A matmul whose row axis is a symbolic sequence length S ([S, 64] x [64, 64] + GELU; the
    attention's [h, S, S] x [h, S, 16]) is padded to a multiple of the row tile a long static axis
    gets (pad_einsum), and a symbolic column axis (the scores [h, S, 16] x [h, 16, S]) to two
    vectors: one compiled kernel runs the static micro-kernel at every S, writes only the real
    outputs (a sentinel after the output stays), and gives numpy's numbers at S = 1 .. 130.
    PAD_SYMBOLIC_ROWS:0 gives the kernels of before (one-row tiles; SymbolicColumns' column loop).
    (Both with SHIFT_SYMBOLIC_TILES off: by default these kernels take shifted tiles,
    test_symbolic_tiles_are_shifted.)"""
    seq = tvm.tirx.Var("S", "int64")
    if kind == "ffn_gelu":
        params = [("x", (seq, 64)), ("w", (64, 64))]
        body = _gelu_body
    elif kind == "attention_values":
        params = [("a", (4, seq, seq)), ("v", (4, seq, 16))]
        body = lambda bb, a, v: bb.emit(relax.op.matmul(a, v))  # noqa: E731
    else:
        params = [("q", (4, seq, 16)), ("k", (4, 16, seq))]
        body = lambda bb, q, k: bb.emit(relax.op.multiply(relax.op.matmul(q, k), relax.const(0.25, "float32")))  # noqa: E731
    mod = _fused(body, params)
    with knobs.using(knobs.ScheduleKnobs.parse("SHIFT_SYMBOLIC_TILES:0")):
        _, stats, (func,) = _schedule(mod)
    assert set(stats.by_func.values()) == {"outer-product"}
    assert "_pad" in func.script()
    with knobs.using(knobs.ScheduleKnobs.parse("PAD_SYMBOLIC_ROWS:0;SHIFT_SYMBOLIC_TILES:0")):
        _, stats_off, (func_off,) = _schedule(mod)
    before = "symbolic-columns" if kind == "attention_scores" else "outer-product"
    assert "_pad" not in func_off.script() and set(stats_off.by_func.values()) == {before}
    rng = np.random.default_rng(11)
    for n in (1, 5, 12, 77, 130):
        if kind == "ffn_gelu":
            x = rng.standard_normal((n, 64)).astype(np.float32)
            w = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
            arrays, want = [x, w], _gelu_ref(x, w)
        elif kind == "attention_values":
            a = rng.standard_normal((4, n, n)).astype(np.float32)
            v = rng.standard_normal((4, n, 16)).astype(np.float32)
            arrays, want = [a, v], (a.astype(np.float64) @ v).astype(np.float32)
        else:
            q = rng.standard_normal((4, n, 16)).astype(np.float32)
            k = rng.standard_normal((4, 16, n)).astype(np.float32)
            arrays, want = [q, k], (q.astype(np.float64) @ k * 0.25).astype(np.float32)
        for f in (func, func_off):
            np.testing.assert_allclose(_guarded_call(f, arrays, want.shape), want, rtol=1e-4, atol=1e-4)

def _whole_tile_branches(text: str) -> list[str]:
    """The bodies of the innermost `if T.int64(t) <= S:` branches apply_loop_marks writes (every
    tile whole along every marked loop; an outer one holds the inner loop's predicated branch too)."""
    lines = text.split("\n")
    out = []
    for i, ln in enumerate(lines):
        if re.match(r"^\s*if T\.int64\(\d+\) <= S:$", ln):
            ind = len(ln) - len(ln.lstrip())
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > ind):
                j += 1
            body = "\n".join(lines[i + 1 : j])
            if " <= S:" not in body:
                out.append(body)
    return out


_SHIFT_KINDS = ["ffn_gelu", "attention_values", "attention_scores", "projection_n_s"]


@pytest.mark.parametrize("mcpu", [AVX2_MCPU, AVX512_MCPU])
@pytest.mark.parametrize("kind", _SHIFT_KINDS)
def test_symbolic_tiles_are_shifted(kind, mcpu):
    """A matmul whose rows are a symbolic length S ([S, 64] x [64, 64] + GELU, the attention's
    [h, S, S] x [h, S, 16], a projection [N, S, 64] x [64, 96] with N symbolic too) and, for the
    scores [h, S, 16] x [h, 16, S], whose columns are S as well, runs whole register tiles over its
    operands as they are: no padded copies, the tile loops marked (loop_marks.PEEL_BOUND = S), which
    the build turns into `if tile <= S:` every tile whole, the last shifted back, no predicate, the
    vector loops vectorised, `else:` the predicated tile; with N symbolic too, the kernel holds a
    one-row-tile branch for S under the tile. Under both machine models (AVX2, AVX-512),
    a sentinel after the output stays and the numbers are numpy's at S = 1 .. 130 (the shifted and
    the predicated branch), N = 1 and 3."""
    from tvm_kernels import host_runs, isa_target

    seq, nn = tvm.tirx.Var("S", "int64"), tvm.tirx.Var("N", "int64")
    if kind == "ffn_gelu":
        params = [("x", (seq, 64)), ("w", (64, 64))]
        body = _gelu_body
    elif kind == "attention_values":
        params = [("a", (4, seq, seq)), ("v", (4, seq, 16))]
        body = lambda bb, a, v: bb.emit(relax.op.matmul(a, v))  # noqa: E731
    elif kind == "attention_scores":
        params = [("q", (4, seq, 16)), ("k", (4, 16, seq))]
        body = lambda bb, q, k: bb.emit(relax.op.multiply(relax.op.matmul(q, k), relax.const(0.25, "float32")))  # noqa: E731
    else:
        params = [("x", (nn, seq, 64)), ("w", (64, 96))]
        body = lambda bb, x, w: bb.emit(relax.op.matmul(x, w))  # noqa: E731
    target = isa_target(mcpu)
    mod = _fused(body, params)
    stats = ScheduleStats()
    smod = apply_default_schedules(mod, target, stats=stats)
    (func,) = [f for _, f in smod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert set(stats.by_func.values()) == {"outer-product"}
    script = func.script()
    assert "_pad" not in script and "if N" not in script, script
    # two symbolic row axes (which is long is known at the call): one-row tiles under the tile
    two_axes = re.search(r"^    if T\.int64\(\d+\) <= S:$", script, re.M) is not None
    assert two_axes == (kind == "projection_n_s"), script
    marked = re.findall(rf'"{LM.PEEL_BOUND}": "S", "{LM.PEEL_LAST}": (\d+)', script)
    assert len(marked) == (2 if kind == "attention_scores" else 1), marked  # (one nest: no serial branch here)
    peeled = LM.apply_loop_marks(func).script()
    assert LM.PEEL_LAST not in peeled and "T.min(" in peeled
    whole = _whole_tile_branches(peeled)  # (the first: whole along every marked loop; a later one
    # may sit in an outer loop's predicated branch)
    assert whole and "T.where(" not in whole[0] and "T.vectorized(" in whole[0], peeled
    if not host_runs(target):
        return
    rng = np.random.default_rng(17)
    for n in (1, 5, 8, 12, 16, 17, 77, 130):
        if kind == "ffn_gelu":
            x = rng.standard_normal((n, 64)).astype(np.float32)
            w = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
            arrays, want = [x, w], _gelu_ref(x, w)
        elif kind == "attention_values":
            a = rng.standard_normal((4, n, n)).astype(np.float32)
            v = rng.standard_normal((4, n, 16)).astype(np.float32)
            arrays, want = [a, v], (a.astype(np.float64) @ v).astype(np.float32)
        elif kind == "attention_scores":
            q = rng.standard_normal((4, n, 16)).astype(np.float32)
            k = rng.standard_normal((4, 16, n)).astype(np.float32)
            arrays, want = [q, k], (q.astype(np.float64) @ k * 0.25).astype(np.float32)
        else:
            x = rng.standard_normal((1 if n % 2 else 3, n, 64)).astype(np.float32)
            w = (rng.standard_normal((64, 96)) / 8).astype(np.float32)
            arrays, want = [x, w], (x.astype(np.float64) @ w).astype(np.float32)
        np.testing.assert_allclose(_guarded_call(func, arrays, want.shape, target=target), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mcpu", [AVX2_MCPU, AVX512_MCPU])
def test_time_major_rows_one_row_branch_parallel_over_time(mcpu):
    """[T, N, 32] x [32, 256] (an LSTM's input projection, time-major, T and N symbolic): N rows in
    shifted tiles where N is at least the tile; under it (N = 1, the usual batch) one-row tiles
    parallel over T, one launch of the thread pool, not one per time step (crnn_dyn at W = 320:
    0.4-0.65 -> 0.08-0.11 ms). Numbers equal numpy at (T, N) = (80, 1), (3, 9), (5, 17)."""
    from tvm_kernels import host_runs, isa_target

    t, n = tvm.tirx.Var("L", "int64"), tvm.tirx.Var("N", "int64")  # (T: TVMScript's module name)
    target = isa_target(mcpu)
    mod = _fused(lambda bb, x, w: bb.emit(relax.op.matmul(x, w)), [("x", (t, n, 32)), ("w", (32, 256))])
    smod = apply_default_schedules(mod, target)
    (func,) = [f for _, f in smod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    script = func.script()
    branch = re.search(r"^    if T\.int64\((\d+)\) <= N:$", script, re.M)
    assert branch is not None and f'"{LM.PEEL_BOUND}": "N"' in script, script
    short = script.split("\n    else:\n", 1)[1]
    assert "in T.parallel(L):" in short and LM.PEEL_BOUND not in short, short
    if not host_runs(target):
        return
    rng = np.random.default_rng(19)
    for shape in ((80, 1, 32), (3, 9, 32), (5, 17, 32)):
        x = rng.standard_normal(shape).astype(np.float32)
        w = (rng.standard_normal((32, 256)) / 8).astype(np.float32)
        want = (x.astype(np.float64) @ w).astype(np.float32)
        np.testing.assert_allclose(_guarded_call(func, [x, w], want.shape, target=target), want, rtol=1e-4, atol=1e-4)


def test_shifted_tiles_near_misses():
    """Not shifted: static rows (the static micro-kernel's tiles), rows that are an expression of
    S rather than S itself (2S: the marks bound a tile loop by a bare length), and any of them
    with SHIFT_SYMBOLIC_TILES off (the padded kernels of before)."""
    seq = tvm.tirx.Var("S", "int64")
    cases = [[("x", (77, 64)), ("w", (64, 64))], [("x", (seq * 2, 64)), ("w", (64, 64))]]
    for params in cases:
        _, stats, (func,) = _schedule(_fused(lambda bb, x, w: bb.emit(relax.op.matmul(x, w)), params))
        assert set(stats.by_func.values()) == {"outer-product"}
        assert LM.PEEL_BOUND not in func.script()
    with knobs.using(knobs.ScheduleKnobs(shift_symbolic_tiles=False)):
        _, _, (func,) = _schedule(_fused(lambda bb, x, w: bb.emit(relax.op.matmul(x, w)), [("x", (seq, 64)), ("w", (64, 64))]))
    assert LM.PEEL_BOUND not in func.script() and "_pad" in func.script()


def test_schedule_knobs_travel_with_the_target_options():
    """`cpu{schedule-knobs=ROW_REDUCTION:0}` turns the row-reduction rule off for that compile
    only (dlight's reduction schedule, same numbers), and the manifest records it; a knob that
    does not exist is a one-line usage error naming the known ones."""
    from onnx import TensorProto as TP
    from onnx import helper as h

    import graphopt
    from graphopt.errors import UsageError

    m = h.make_model(h.make_graph([h.make_node("Softmax", ["x"], ["y"], axis=-1)], "g",
                                  [h.make_tensor_value_info("x", TP.FLOAT, [4, 256])],
                                  [h.make_tensor_value_info("y", TP.FLOAT, [4, 256])]),
                     opset_imports=[h.make_opsetid("", 17)])
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    off = graphopt.compile(m, "cpu{schedule-knobs=ROW_REDUCTION:0}", "-O2", threads=1)
    on = graphopt.compile(m, "cpu", "-O2", threads=1)
    assert off.report["schedules"]["rules"] == {"dlight-reduction": 1}
    assert on.report["schedules"]["rules"] == {"row-reduction": 1}  # (not left switched off)
    assert off.manifest["target"]["schedule_knobs"] == "ROW_REDUCTION:0" and "schedule_knobs" not in on.manifest["target"]
    np.testing.assert_allclose(off.run({"x": x})[0], on.run({"x": x})[0], rtol=1e-6, atol=1e-7)
    with pytest.raises(UsageError, match="expected NAME:VALUE with NAME one of .*ROW_REDUCTION"):
        graphopt.compile(m, "cpu{schedule-knobs=NO_SUCH:0}", "-O2")
    with pytest.raises(UsageError, match="takes an integer"):
        knobs.ScheduleKnobs.parse("MATMUL_K_BLOCK:big")


def _row_kernel(n: int) -> tvm.tirx.PrimFunc:
    mod = _fused(lambda bb, a: bb.emit(relax.op.nn.softmax(a, axis=-1)), [("x", (2, 3, n))])
    return next(f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


def test_ragged_rows_are_vectorised():
    """A static row length that is no multiple of the lanes (77 scores, 8 AVX2 lanes): the max and
    exp-sum reductions are rfactored into a vector of partial results and every step runs whole
    vectors, the last (predicated) vector peeled (PEEL_LAST). The partial results keep the split
    predicate (rfactor drops it: they read past the row), and the whole vectors lose it once
    peeled. Near misses: 80 (a multiple of the lanes) keeps today's kernel, no predicate or peel;
    RAGGED_ROWS off gives the scalar rows of before; 7 (under one vector) stays scalar."""
    text = RowReduction().apply(_row_kernel(77), _target(), 8).mod["main"].script()
    assert text.count("_rf_update") >= 2 and text.count(LM.PEEL_LAST) == 4, text  # max, exp-sum, exp, normalise
    assert len(re.findall(r"T\.where\(ax1 \* T\.int64\(8\) \+ ax0 < T\.int64\(77\)\)", text)) == 2, text
    peeled = LM.apply_loop_marks(RowReduction().apply(_row_kernel(77), _target(), 8).mod["main"]).script()
    assert "range(T.int64(9))" in peeled and "range(T.int64(9), T.int64(10))" in peeled
    whole = RowReduction().apply(_row_kernel(80), _target(), 8).mod["main"].script()
    assert "_rf" in whole and LM.PEEL_LAST not in whole and "T.where" not in whole
    with knobs.using(knobs.ScheduleKnobs(ragged_rows=False)):
        old = RowReduction().apply(_row_kernel(77), _target(), 8).mod["main"].script()
        assert whole == RowReduction().apply(_row_kernel(80), _target(), 8).mod["main"].script()
    assert "_rf" not in old and LM.PEEL_LAST not in old
    small = RowReduction().apply(_row_kernel(7), _target(), 8).mod["main"].script()
    assert "_rf" not in small and LM.PEEL_LAST not in small

    def llvm(func: tvm.tirx.PrimFunc) -> str:
        f = LM.apply_loop_marks(func).with_attr("global_symbol", "main")
        return tvm.compile(tvm.IRModule({"main": f}), target=_target()).mod.inspect_source("ll")

    # the LLVM: the max and the exp-sum run on 8-float vectors (the kernel of before: scalar rows,
    # checked on the TIR above; LLVM's own vectoriser was seen to make vector adds of it in some runs)
    new_ll = llvm(RowReduction().apply(_row_kernel(77), _target(), 8).mod["main"])
    assert re.search(r"fadd <8 x float>", new_ll) and re.search(r"maxnum\.v8f32|fcmp ogt <8 x float>", new_ll)


def _reductions_model(n: int | str) -> onnx.ModelProto:
    """Softmax, LogSoftmax and a layer norm over the rows [2, 3, n] of one input."""
    rng = np.random.default_rng(9)
    c = n if isinstance(n, int) else 1
    g = numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "g")
    b = numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b")
    nodes = [h.make_node("Softmax", ["x"], ["s"], axis=-1), h.make_node("LogSoftmax", ["x"], ["ls"], axis=-1),
             h.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1, epsilon=1e-5)]
    outs = [h.make_tensor_value_info(o, TensorProto.FLOAT, [2, 3, n]) for o in ("s", "ls", "ln")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, n])], outs, [g, b])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("cpu", ["cpu", f"cpu{{mcpu={AVX2_MCPU}}}"])
def test_ragged_rows_equal_onnxruntime(cpu):
    """Softmax, LogSoftmax and LayerNorm over static rows of 1, 15, 17, 77 and 130 (ragged for 8
    and 16 lanes but 1) equal onnxruntime's, on the host's lanes and AVX2's; and over a symbolic
    row length (a layer norm's scale needs a static length: softmaxes only) at the same lengths."""
    from graphopt.check import run_onnxruntime

    for n in (1, 15, 17, 77, 130):
        m = _reductions_model(n)
        art = graphopt.compile(m, cpu, "-O2", threads=2)
        assert art.manifest["schedules"]["rules"].get("row-reduction", 0) >= 1 or n == 1, art.manifest["schedules"]
        x = (np.random.default_rng(n).standard_normal((2, 3, n)) * 3).astype(np.float32)
        for got, want in zip(art.run({"x": x}), run_onnxruntime(graphopt.load(m), {"x": x})):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    m = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n'
                                "g (float[2, 3, S] x) => (float[2, 3, S] s, float[2, 3, S] ls) {\n"
                                "    s = Softmax <axis = -1> (x)\n    ls = LogSoftmax <axis = -1> (x)\n}")
    art = graphopt.compile(m, cpu, "-O2", threads=2)
    for n in (1, 15, 16, 17, 77, 130):
        x = (np.random.default_rng(n).standard_normal((2, 3, n)) * 3).astype(np.float32)
        for got, want in zip(art.run({"x": x}), run_onnxruntime(graphopt.load(m), {"x": x})):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("cpu", ["cpu", f"cpu{{mcpu={AVX2_MCPU}}}"])
def test_ragged_rows_guard_the_lane_loop_when_loop_names_repeat(cpu):
    """An opset-6 Softmax over [10, 20] lowers to reshape -> softmax -> reshape, whose row loop and
    lane loop are both named `ax0` before printing (the printer makes the inner one `ax0_1`): the
    partial results' guard must name the lane loop as printed. With the name from before printing
    the guard read `ax1 * lanes + ax0 < 20` over the row loop, and the sums took elements past the
    row end (softmax off by up to 0.15; the backend suite's test_Softmax, test_LogSoftmax and 15
    more). Numbers equal onnxruntime's, on the host's lanes and AVX2's."""
    from graphopt.check import run_onnxruntime

    for op in ("Softmax", "LogSoftmax"):
        m = onnx.parser.parse_model('<ir_version: 3, opset_import: ["" : 6]>\n'
                                    f"g (float[10, 20] x) => (float[10, 20] y) {{\n    y = {op} <axis = 1> (x)\n}}")
        art = graphopt.compile(m, cpu, "-O2", threads=2)
        assert art.manifest["schedules"]["rules"].get("row-reduction", 0) == 1, art.manifest["schedules"]
        x = (np.random.default_rng(3).standard_normal((10, 20)) * 3).astype(np.float32)
        (got,), (want,) = art.run({"x": x}), run_onnxruntime(graphopt.load(m), {"x": x})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)

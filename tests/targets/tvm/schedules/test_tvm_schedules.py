"""Default CPU schedules (graphopt.targets.tvm.schedules.base): every kernel kind gets a real schedule
(not the naive loops) and keeps its numbers (compared against numpy)."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
relax = pytest.importorskip("tvm.relax")

from tvm_kernels import fused as _fused  # noqa: E402
from tvm_kernels import host_target as _target  # noqa: E402
from tvm_kernels import fuse as _fuse  # noqa: E402
from tvm_kernels import run as _run  # noqa: E402

from graphopt.targets.tvm.schedules import LAYOUT_REWRITE_ANN, ScheduleStats, apply_default_schedules, is_tunable_kernel  # noqa: E402

TT = relax.TensorType


def _prim_funcs(mod):
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _check(mod, arrays, expected, rule, rtol=1e-4, atol=1e-4):
    stats = ScheduleStats()
    smod = apply_default_schedules(mod, _target(), stats=stats)
    funcs = _prim_funcs(smod)
    assert funcs and all(int(f.attrs["tirx.is_scheduled"]) == 1 for f in funcs.values())
    assert rule in stats.by_func.values(), (stats.by_func, stats.failures)
    got = _run(smod, arrays)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)
    # the scheduled kernel really is parallel (not the naive loop nest)
    assert any("parallel" in f.script() for f in funcs.values())
    return smod, stats


def _conv_ref(x, w, stride, pad, groups=1):
    n, c, h, wd = x.shape
    oc, icg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, oc, oh, ow), np.float64)
    ocg = oc // groups
    for g in range(groups):
        xs = xp[:, g * icg:(g + 1) * icg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
                out[:, g * ocg:(g + 1) * ocg] += np.einsum("nchw,oc->nohw", patch, w[g * ocg:(g + 1) * ocg, :, i, j])
    return out.astype(np.float32)


CONV_CASES = [
    # (name, n, c, h, w, oc, k, stride, groups, epilogue)
    ("3x3_relu", 1, 16, 14, 14, 32, 3, 1, 1, "bias_relu"),
    ("1x1", 1, 32, 7, 7, 16, 1, 1, 1, "bias"),
    ("3x3_s2_residual", 1, 8, 15, 15, 16, 3, 2, 1, "bias_add_relu"),
    ("7x7_s2_odd_channels", 2, 3, 20, 20, 24, 7, 2, 1, "bias_relu"),
    ("depthwise", 1, 24, 12, 12, 24, 3, 1, 24, "bias_relu"),
    ("depthwise_s2", 1, 16, 13, 13, 16, 3, 2, 16, "bias"),
    # a row tile (several output rows x one vector of columns per parallel iteration)
    ("depthwise_rows", 1, 16, 20, 32, 16, 3, 1, 16, "bias_relu"),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_variants_keep_numbers(case):
    name, n, c, h, w, oc, k, stride, groups, epi = case
    rng = np.random.default_rng(0)
    pad = k // 2
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((oc, c // groups, k, k)).astype(np.float32)
    b = rng.standard_normal((1, oc, 1, 1)).astype(np.float32)
    r = rng.standard_normal((n, oc, oh, ow)).astype(np.float32)
    params = [("x", x.shape), ("w", wt.shape), ("b", b.shape)]
    arrays = [x, wt, b]
    if "add" in epi:
        params.append(("r", r.shape))
        arrays.append(r)

    def body(bb, xv, wv, bv, *rest):
        y = bb.emit(relax.op.nn.conv2d(xv, wv, strides=stride, padding=pad, groups=groups))
        y = bb.emit(relax.op.add(y, bv))
        if "add" in epi:
            y = bb.emit(relax.op.add(y, rest[0]))
        if "relu" in epi:
            y = bb.emit(relax.op.nn.relu(y))
        return y

    ref = _conv_ref(x, wt, stride, pad, groups) + b
    if "add" in epi:
        ref = ref + r
    if "relu" in epi:
        ref = np.maximum(ref, 0)
    rule = "window-reduction" if groups > 1 else "outer-product"
    smod, _ = _check(_fused(body, params), arrays, ref, rule)
    assert is_tunable_kernel(next(iter(_prim_funcs(smod).values())))


def test_conv_weight_pack_is_marked_for_prepacking():
    """The in-kernel weight pack is annotated so SplitLayoutRewritePreproc can hoist it."""
    mod = _fused(lambda bb, x, w: bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=1))),
                 [("x", (1, 16, 8, 8)), ("w", (32, 16, 3, 3))])
    smod = apply_default_schedules(mod, _target())
    (func,) = _prim_funcs(smod).values()
    assert LAYOUT_REWRITE_ANN in func.script()


def test_kn_weight_is_packed_into_panels_and_keeps_numbers():
    """A [K, N] matmul weight (vector axis already innermost) is packed to [N/vt, K, vt] panels by a
    marked block, which the weight-prepacking split hoists; a batched matmul (B is an activation
    with a batch axis) is not packed. Numbers kept both with the pack in the kernel and hoisted."""
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((24, 64)).astype(np.float32), rng.standard_normal((64, 48)).astype(np.float32)
    mod = _fused(lambda bb, a, b: bb.emit(relax.op.nn.relu(relax.op.matmul(a, b))), [("x", x.shape), ("w", w.shape)])
    smod, _ = _check(mod, [x, w], np.maximum(x @ w, 0), "outer-product")
    (func,) = _prim_funcs(smod).values()
    assert LAYOUT_REWRITE_ANN in func.script()
    assert "T.int64(6), T.int64(64), T.int64(8)" in func.script() or "T.int64(3), T.int64(64), T.int64(16)" in func.script()
    split = relax.transform.SplitLayoutRewritePreproc()(smod)
    assert len(_prim_funcs(split)) == 2  # the pack is its own function now
    np.testing.assert_allclose(_run(split, [x, w]), np.maximum(x @ w, 0), rtol=1e-4, atol=1e-4)
    bmod = _fused(lambda bb, a, b: bb.emit(relax.op.matmul(a, b)), [("a", (2, 8, 16)), ("b", (2, 16, 24))])
    (bfunc,) = _prim_funcs(apply_default_schedules(bmod, _target())).values()
    assert LAYOUT_REWRITE_ANN not in bfunc.script()


MATMUL_CASES = [
    ("nn_bias_gelu", (64, 96), (96, 128), False, "gelu"),
    ("nt_bias", (32, 64), (48, 64), True, "bias"),
    ("odd_rows", (37, 40), (40, 24), False, "relu"),
    ("batched", (3, 16, 32), (3, 32, 24), False, ""),
]


@pytest.mark.parametrize("case", MATMUL_CASES, ids=[c[0] for c in MATMUL_CASES])
def test_matmul_variants_keep_numbers(case):
    name, a_shape, b_shape, transb, epi = case
    rng = np.random.default_rng(1)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = (rng.standard_normal(b_shape) / 8).astype(np.float32)
    n_out = b_shape[-2] if transb else b_shape[-1]
    bias = rng.standard_normal((n_out,)).astype(np.float32)
    params = [("a", a_shape), ("b", b_shape), ("bias", bias.shape)]

    def body(bb, av, bv, biasv):
        rhs = relax.op.permute_dims(bv) if transb else bv
        y = bb.emit(relax.op.matmul(av, rhs))
        if epi:
            y = bb.emit(relax.op.add(y, biasv))
        if epi == "gelu":
            y = bb.emit(relax.op.nn.gelu(y))
        if epi == "relu":
            y = bb.emit(relax.op.nn.relu(y))
        return y

    ref = a.astype(np.float64) @ (b.T if transb else b).astype(np.float64)
    if epi:
        ref = ref + bias
    if epi == "gelu":
        from math import erf

        ref = 0.5 * ref * (1 + np.vectorize(erf)(ref / np.sqrt(2)))
    if epi == "relu":
        ref = np.maximum(ref, 0)
    mod = _fused(body, params)
    _check(mod, [a, b, bias], ref.astype(np.float32), "outer-product", rtol=1e-3, atol=1e-3)


def test_elementwise_softmax_and_pool_keep_numbers():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 9, 33)).astype(np.float32)
    y = rng.standard_normal((2, 8, 9, 33)).astype(np.float32)
    mod = _fused(lambda bb, a, b: bb.emit(relax.op.multiply(relax.op.sigmoid(relax.op.add(a, b)), a)),
                 [("a", x.shape), ("b", y.shape)])
    _check(mod, [x, y], (1 / (1 + np.exp(-(x + y)))) * x, "injective", rtol=1e-5, atol=1e-5)

    s = rng.standard_normal((4, 16, 40)).astype(np.float32)
    mod = _fused(lambda bb, a: bb.emit(relax.op.nn.softmax(a, axis=-1)), [("a", s.shape)])
    e = np.exp(s - s.max(-1, keepdims=True))
    _check(mod, [s], e / e.sum(-1, keepdims=True), "row-reduction", rtol=1e-5, atol=1e-6)

    p = rng.standard_normal((1, 8, 17, 17)).astype(np.float32)
    mod = _fused(lambda bb, a: bb.emit(relax.op.nn.max_pool2d(a, pool_size=3, strides=2, padding=1)),
                 [("a", p.shape)])
    pp = np.pad(p, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    ref = np.max(np.stack([pp[:, :, i:i + 17:2, j:j + 17:2] for i in range(3) for j in range(3)]), axis=0)
    _check(mod, [p], ref, "window-reduction")


def test_already_scheduled_functions_are_left_alone():
    mod = _fused(lambda bb, a, b: bb.emit(relax.op.add(a, b)), [("a", (4, 8)), ("b", (4, 8))])
    (gv,) = [gv for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    marked = mod[gv].with_attr("tirx.is_scheduled", True)
    mod[gv] = marked
    stats = ScheduleStats()
    out = apply_default_schedules(mod, _target(), stats=stats)
    assert stats.by_func == {}
    assert out[gv].same_as(marked)


def test_tunable_kernel_detection():
    conv = _fused(lambda bb, x, w: bb.emit(relax.op.nn.conv2d(x, w)), [("x", (1, 4, 6, 6)), ("w", (8, 4, 3, 3))])
    ew = _fused(lambda bb, a: bb.emit(relax.op.nn.relu(a)), [("a", (4, 8))])
    sm = _fused(lambda bb, a: bb.emit(relax.op.nn.softmax(a)), [("a", (4, 8))])
    assert all(is_tunable_kernel(f) for f in _prim_funcs(conv).values())
    assert not any(is_tunable_kernel(f) for f in _prim_funcs(ew).values())
    assert not any(is_tunable_kernel(f) for f in _prim_funcs(sm).values())


def test_fast_erf_keeps_float32_accuracy():
    """erf lowers to a vectorisable polynomial (not a libm call per element) once the default
    schedules are used: within 1e-6 of the exact erf over [-8, 8], scalar and vector code."""
    import math

    x = np.concatenate([np.linspace(-8, 8, 4000, dtype=np.float32), np.float32([np.nan])]).reshape(1, -1)
    mod = _fused(lambda bb, a: bb.emit(relax.op.erf(a)), [("a", x.shape)])
    smod = apply_default_schedules(mod, _target())
    got = _run(smod, [x])
    ref = np.array([[math.erf(float(v)) for v in x[0]]])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)  # (NaN == NaN for assert_allclose)
    assert np.isnan(got[0, -1]) and np.all(np.abs(got[0, :-1]) <= 1.0)
    from graphopt.targets.tvm.schedules import fast_math

    assert fast_math._FAST_ERF_REGISTERED


def test_fast_exp_keeps_float32_accuracy():
    """exp lowers to a vectorisable range reduction + polynomial: relative error within 1e-6
    over the float32 range, 0 below it, inf above, NaN kept."""
    x = np.concatenate([np.linspace(-87, 88, 4000, dtype=np.float32), np.float32([-1000, 0, np.nan, -np.inf, 89, np.inf])]).reshape(1, -1)
    mod = _fused(lambda bb, a: bb.emit(relax.op.exp(a)), [("a", x.shape)])
    got = _run(apply_default_schedules(mod, _target()), [x])[0]
    ref = np.exp(x[0].astype(np.float64))
    np.testing.assert_allclose(got[:4000], ref[:4000], rtol=1e-6)
    assert got[4000] == 0 and got[4001] == 1 and np.isnan(got[4002]) and got[4003] == 0
    assert got[4004] == np.inf and got[4005] == np.inf


def test_symbolic_outer_loops_join_a_small_parallel_loop():
    """Serial symbolic outer loops (batch N, length S) around a parallel loop of a handful of
    static iterations (4 heads of 4 values) would launch the thread pool once per (n, s): the
    parallel loop takes the symbolic loops in; so does a remainder whose one launch is little work
    (64 x 32 x 16 values, ~16 µs of one core's traffic: under the machine model's
    LAUNCH_AMORTISED_S); a large static remainder (64 x 64 x 64, ~130 µs) keeps them serial outside."""
    import re

    seq, n = tvm.tirx.Var("S", "int64"), tvm.tirx.Var("N", "int64")
    mod = _fused(lambda bb, x: bb.emit(relax.op.nn.relu(x)), [("x", (n, seq, 4, 4))])
    smod = apply_default_schedules(mod, _target())
    func = next(f for _, f in smod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    par = re.findall(r"T\.parallel\(([^)]*)\)", func.script())
    assert par and all("S" in p and "N" in p for p in par), par
    mid = _fused(lambda bb, x: bb.emit(relax.op.nn.relu(x)), [("x", (n, 64, 32, 16))])
    fmid = next(f for _, f in apply_default_schedules(mid, _target()).functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    assert all("N" in p for p in re.findall(r"T\.parallel\(([^)]*)\)", fmid.script()))
    big = _fused(lambda bb, x: bb.emit(relax.op.nn.relu(x)), [("x", (n, 64, 64, 64))])
    fbig = next(f for _, f in apply_default_schedules(big, _target()).functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    assert all("N" not in p for p in re.findall(r"T\.parallel\(([^)]*)\)", fbig.script()))
    x = np.random.default_rng(2).standard_normal((2, 5, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(smod, [x]), np.maximum(x, 0))
def test_conv1d_layout_with_expression_width_keeps_numbers():
    """The schedule rule alone: a conv1d in conv layout whose output width is `L - 2` is not tiled
    one row at a time (that tile wrote past the kernel's buffers: wrong outputs, heap corruption);
    a padded one (width L) still is. Both equal numpy."""
    n, length = tvm.tirx.Var("n", "int64"), tvm.tirx.Var("l", "int64")
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((64, 64, 3)) / 14).astype(np.float32)
    x = rng.standard_normal((2, 64, 40)).astype(np.float32)
    for pad, rule_ok in ((0, lambda r: r != "outer-product"), (1, lambda r: r == "outer-product")):
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType([n, 64, length], "float32"))
        wv = relax.Var("w", relax.TensorType([64, 64, 3], "float32"))
        with bb.function("main", [xv, wv]):
            with bb.dataflow():
                out = bb.emit_output(bb.emit(relax.op.nn.conv1d(xv, wv, padding=pad)))
            bb.emit_func_output(out)
        stats = ScheduleStats()
        smod = apply_default_schedules(_fuse(bb.get()), _target(), stats=stats)
        (rule,) = stats.by_func.values()
        assert rule_ok(rule), (pad, stats.by_func, stats.failures)
        xp = np.pad(x, ((0, 0), (0, 0), (pad, pad))).astype(np.float64)
        ref = np.stack([np.einsum("nck,ock->no", xp[:, :, i:i + 3], w) for i in range(xp.shape[2] - 2)], axis=-1)
        np.testing.assert_allclose(_run(smod, [x, w]), ref, rtol=1e-4, atol=1e-4)


def test_elementwise_prologue_chain_is_folded_into_one_pass():
    """A log-magnitude (square, square, add, sqrt, add, log) before a matmul, in one kernel as
    the lowering groups it: one materialised pass over its input, not one parallel pass per op;
    a per-row value that a broadcast reads (sqrt of s [M, 1], near miss) stays a pass of its own.
    Numbers kept, and with the knob off (a pass per op, as before)."""
    from graphopt.targets.tvm.schedules import knobs, schedule_prim_func
    from tvm_kernels import primitive_kernel

    rng = np.random.default_rng(5)
    re_, im_ = rng.standard_normal((24, 96)).astype(np.float32), rng.standard_normal((24, 96)).astype(np.float32)
    s = (rng.random((24, 1)) + 0.5).astype(np.float32)
    w = (rng.standard_normal((96, 32)) / 10).astype(np.float32)
    R = relax.op

    def body(bb, a, b, sv, wv):
        mag = R.log(R.add(R.sqrt(R.add(R.multiply(a, a), R.multiply(b, b))), relax.const(1e-3, "float32")))
        return bb.emit(R.matmul(R.multiply(mag, R.sqrt(sv)), wv))

    params = [relax.Var(n, TT(list(a.shape), "float32")) for n, a in (("a", re_), ("b", im_), ("s", s), ("w", w))]
    func = primitive_kernel(params, body)
    ref = (np.log(np.sqrt(re_.astype(np.float64) ** 2 + im_.astype(np.float64) ** 2) + 1e-3) * np.sqrt(s)) @ w

    def scheduled_run():
        sched, rule, notes = schedule_prim_func(func, _target())
        assert rule == "outer-product", notes
        lib = tvm.compile(tvm.IRModule({"main": sched.with_attr("global_symbol", "main")}), target=_target())
        args = [tvm.runtime.tensor(a) for a in (re_, im_, s, w)] + [tvm.runtime.tensor(np.zeros((24, 32), np.float32))]
        lib["main"](*args)
        np.testing.assert_allclose(args[-1].numpy(), ref, rtol=1e-4, atol=1e-4)
        return sched.script()

    text = scheduled_run()
    assert "T.log(T.sqrt(" in text, text
    assert text.count("T.parallel(") <= 4, text  # weight pack, folded prologue, sqrt(s), matmul
    with knobs.using(knobs.ScheduleKnobs(fold_prologue=False)):
        text2 = scheduled_run()
    assert "T.log(T.sqrt(" not in text2 and text2.count("T.parallel(") > text.count("T.parallel(") + 3

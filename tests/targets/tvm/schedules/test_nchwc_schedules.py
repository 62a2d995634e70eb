"""Default schedules for channel-blocked (NCHW8c) kernels (graphopt.targets.tvm.schedules.nchwc):
BlockedConv fires on the fused conv2d_blocked / conv2d_stem / depthwise_blocked / pool_blocked
kernels the lowering makes (pad → compute → bias / activation / residual epilogue), keeps their
numbers (against onnxruntime on the NCHW operator), and declines every other kernel."""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
relax = pytest.importorskip("tvm.relax")
ort = pytest.importorskip("onnxruntime")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from graphopt.targets.tvm.schedules.nchwc import BlockedConv, BlockedWindow  # noqa: E402
from graphopt.targets.tvm.schedules.tiles import ConvShape, ConvTile, conv_tile  # noqa: E402
from tvm_kernels import AVX2_MCPU, AVX512_MCPU, host_runs, host_target, isa_target, primitive_kernel  # noqa: E402

from graphopt.targets.tvm.schedules import loop_marks as LM  # noqa: E402
from graphopt.targets.tvm.schedules import nchwc as NS  # noqa: E402
from graphopt.targets.tvm.schedules import tiles as TI  # noqa: E402
from graphopt.targets.machine import machine_model  # noqa: E402
from graphopt.targets.tvm.kernels import blocked as BO  # noqa: E402
from graphopt.targets.tvm.lower.legalize import legalize_and_fuse  # noqa: E402
from graphopt.targets.tvm.schedules import ScheduleStats, apply_default_schedules, default_schedule  # noqa: E402
from graphopt.targets.tvm.schedules.outer_product import OuterProduct  # noqa: E402
from graphopt.targets.tvm.schedules import knobs  # noqa: E402
from graphopt.targets.tvm.stack_tiles import STACK_TILE, stack_tile_bytes, tir_pipeline  # noqa: E402

# the kernels here are AVX2's (8-channel blocks, 16 registers), built for an explicit AVX2 mcpu so
# the checks are the same on every x86 host; the AVX-512 ones (16-channel blocks, 32 registers) at
# the end run where the host can execute them
B = 8
TT = relax.TensorType
AVX2 = isa_target(AVX2_MCPU)
AVX512 = isa_target(AVX512_MCPU)
pytestmark = pytest.mark.skipif(not host_runs(AVX2), reason="this host cannot execute AVX2 code")
needs_avx512 = pytest.mark.skipif(not host_runs(AVX512), reason=f"this host cannot execute {AVX512_MCPU} (AVX-512) code")


_M = machine_model(AVX2)


def _target(threads=2):
    return AVX2 if threads == 2 else isa_target(AVX2_MCPU, threads)


def _blocked(a, b=B):
    n, c, h, w = a.shape
    return np.ascontiguousarray(a.reshape(n, c // b, b, h, w).transpose(0, 1, 3, 4, 2))


def _unblocked(a):
    n, cb, h, w, b = a.shape
    return np.ascontiguousarray(a.transpose(0, 1, 4, 2, 3).reshape(n, cb * b, h, w))


def _out(h, k, s, p):
    return (h + 2 * p - k) // s + 1


def _kernel(kind, c, h, oc, k, s, act="relu", residual=False, pool="max", w=None, n=1, flat=0, b=B):
    """The fused PrimFunc the lowering makes for one blocked kernel group (Relax primitive
    function → LegalizeOps → FuseTIR) and the shapes of its parameters."""
    w = h if w is None else w
    p = k // 2 if kind != "pool" or pool == "max" else 0
    oh, ow = _out(h, k, s, p), _out(w, k, s, p)
    x = relax.Var("x", TT((n, c, h, w) if kind == "stem" else (n, c // b, h, w, b), "float32"))
    params = [x]
    if kind == "conv":
        params.append(relax.Var("w", TT((oc // b, c // b, k, k, b, b), "float32")))
    elif kind == "stem":
        params.append(relax.Var("w", TT((oc // b, c, k, k, b), "float32")))
    elif kind == "depthwise":
        params.append(relax.Var("w", TT((c // b, k, k, b), "float32")))
    if kind != "pool":
        params.append(relax.Var("bias", TT((oc,), "float32")))
    if residual:
        params.append(relax.Var("r", TT((n, oc // b, oh, ow, b), "float32")))

    def body(bb, *_):
        if kind == "pool":
            y = bb.emit_te(BO.pool_blocked, x, pool, [k, k], [s, s], [p] * 4, primfunc_name_hint="pool")
        else:
            fn = {"conv": BO.conv2d_blocked, "stem": BO.conv2d_stem, "depthwise": BO.depthwise_blocked}[kind]
            if flat:
                y = bb.emit_te(BO.conv2d_blocked_flat, x, params[1], [s, s], [p] * 4, [1, 1], flat, primfunc_name_hint=kind)
            else:
                y = bb.emit_te(fn, x, params[1], [s, s], [p] * 4, [1, 1], primfunc_name_hint=kind)
            y = bb.emit(relax.op.add(y, relax.op.reshape(params[2], [1, oc // b, 1, 1, b])))
        if residual:
            y = bb.emit(relax.op.add(y, params[-1]))
        if act == "relu":
            y = bb.emit(relax.op.nn.relu(y))
        elif act == "clip":
            y = bb.emit(relax.op.clip(y, 0.0, 6.0))
        return y

    func = primitive_kernel(params, body)
    return func, (n, oc, oh, ow)


def _data(kind, c, h, oc, k, s, residual=False, pool="max", w=None, n=1, seed=0, b=B):
    """NCHW arrays, the kernel's arguments made from them, and onnxruntime's output."""
    w = w or h
    rng = np.random.default_rng(seed)
    p = k // 2 if kind != "pool" or pool == "max" else 0
    oh, ow = _out(h, k, s, p), _out(w, k, s, p)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    args = [x if kind == "stem" else _blocked(x, b)]
    inits, feeds = [], {"x": x}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))]
    if kind == "pool":
        op = "MaxPool" if pool == "max" else "AveragePool"
        nodes = [helper.make_node(op, ["x"], ["y0"], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)]
    else:
        group = c if kind == "depthwise" else 1
        W = (rng.standard_normal((oc, c // group, k, k)) / np.sqrt(c // group * k * k)).astype(np.float32)
        bias = rng.standard_normal(oc).astype(np.float32)
        if kind == "conv":
            args.append(np.ascontiguousarray(W.reshape(oc // b, b, c // b, b, k, k).transpose(0, 2, 4, 5, 3, 1)))
        elif kind == "stem":
            args.append(np.ascontiguousarray(W.reshape(oc // b, b, c, k, k).transpose(0, 2, 3, 4, 1)))
        else:
            args.append(np.ascontiguousarray(W.reshape(c // b, b, k, k).transpose(0, 2, 3, 1)))
        args.append(bias)
        inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(bias, "B")]
        nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y0"], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4,
                                  group=group)]
    if residual:
        r = rng.standard_normal((n, oc, oh, ow)).astype(np.float32)
        args.append(_blocked(r, b))
        feeds["r"] = r
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, list(r.shape)))
        nodes.append(helper.make_node("Add", ["y0", "r"], ["y1"]))
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    return args, ref


def _act(ref, act):
    if act == "relu":
        return np.maximum(ref, 0)
    if act == "clip":
        return np.clip(ref, 0, 6)
    return ref


_GUARD = 256  # floats of sentinel after the output: a kernel writing past its end changes them


def _run(func, args, out_shape, b=B, target=None):
    n, oc, oh, ow = out_shape
    func = LM.apply_loop_marks(func)  # (as the build does)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target or _target())
    shape = (n, oc // b, oh, ow, b)
    size = int(np.prod(shape))
    guarded = tvm.runtime.tensor(np.full(size + _GUARD, 7.0, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], guarded._create_view(shape, "float32"))
    flat = guarded.numpy()
    assert (flat[size:] == 7.0).all(), "the kernel wrote past the end of its output"
    return _unblocked(flat[:size].reshape(shape))


def _schedule(func, rule=None, target=None):
    target = target or _target()
    if rule is None:
        stats = ScheduleStats()
        mod = apply_default_schedules(tvm.IRModule({"main": func}), target, stats=stats)
        return mod["main"], stats.by_func["main"]
    sch = rule.apply(func, target, machine_model(target).lanes())
    assert sch is not None
    return sch.mod["main"], rule.name


def _root_blocks(func):
    return [s for s in func.script().splitlines() if "T.sblock(" in s]


CASES = [
    # (id, kind, c, h, oc, k, s, act, residual, w)
    ("conv3x3_relu", "conv", 16, 12, 32, 3, 1, "relu", False, None),
    ("conv1x1_residual_relu", "conv", 16, 8, 48, 1, 1, "relu", True, None),  # 6 blocks: a 12-acc tile
    ("conv3x3_s2_clip", "conv", 8, 15, 16, 3, 2, "clip", False, None),
    ("conv1x1_s2", "conv", 16, 14, 16, 1, 2, "none", False, None),
    ("conv3x3_7x7_out", "conv", 16, 7, 32, 3, 1, "relu", True, None),  # 7-wide outputs
    ("conv3x3_rows_14", "conv", 8, 14, 16, 3, 1, "relu", False, 9),  # row-outer with the pad per row
    ("stem7x7_s2", "stem", 3, 20, 16, 7, 2, "relu", False, None),
    ("stem3x3_s2", "stem", 3, 17, 32, 3, 2, "clip", False, None),
    ("depthwise_s1", "depthwise", 16, 12, 16, 3, 1, "clip", False, None),
    ("depthwise_s2", "depthwise", 24, 13, 24, 3, 2, "relu", False, None),
    ("depthwise_7", "depthwise", 16, 7, 16, 3, 1, "clip", False, None),  # inline pad
    ("maxpool3x3_s2", "pool", 16, 16, 16, 3, 2, "none", False, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_default_schedule_fires_and_keeps_numbers(case):
    _, kind, c, h, oc, k, s, act, residual, w = case
    func, oshape = _kernel(kind, c, h, oc, k, s, act, residual, w=w)
    args, ref = _data(kind, c, h, oc, k, s, residual, w=w)
    sfunc, rule = _schedule(func)
    assert rule == "blocked-conv"
    script = sfunc.script()
    assert "T.parallel" in script and "T.vectorized" in script
    # the epilogue (bias, activation, residual) is inlined into the accumulator write-back: no
    # root-level elementwise pass over the output remains
    assert 'T.sblock("T_add' not in script and 'T.sblock("compute' not in script and 'T.sblock("T_reshape' not in script
    np.testing.assert_allclose(_run(sfunc, args, oshape), _act(ref, act), rtol=1e-4, atol=1e-4)


def test_avgpool_divides_in_the_write_back():
    func, oshape = _kernel("pool", 16, 12, 16, 2, 2, act="none", pool="avg")
    args, ref = _data("pool", 16, 12, 16, 2, 2, pool="avg")
    sfunc, rule = _schedule(func)
    assert rule == "blocked-conv"
    assert 'T.sblock("avgpool_blocked")' not in sfunc.script()
    np.testing.assert_allclose(_run(sfunc, args, oshape), ref, rtol=1e-5, atol=1e-5)


TILES = [
    ConvTile(4, 2),
    ConvTile(2, 4, "row"),
    ConvTile(4, 2, "row", pad_row=True),
    ConvTile(4, 2, "row", pad_row=True, partition_pad=True),
    ConvTile(2, 4, "blk"),
    ConvTile(4, 2, "pix"),
    ConvTile(8, 1, ob_inner=True),
    ConvTile(2, 2, unroll_kw=True),
    ConvTile(4, 2, serial_tiles=False),  # the tile loop fused into the parallel loop
    ConvTile(2, 4, "blk", serial_tiles=True),
    ConvTile(4, 2, "pix", serial_tiles=True),  # (serial: the output-block loop)
]


@pytest.mark.parametrize("tile", TILES, ids=[f"{t.rt}x{t.obt}_{t.order}{'_pad' if t.pad_row else ''}{'_part' if t.partition_pad else ''}"
                                               f"{'_obin' if t.ob_inner else ''}{'_kw' if t.unroll_kw else ''}" for t in TILES])
def test_forced_tiles_keep_numbers(tile):
    func, oshape = _kernel("conv", 16, 8, 32, 3, 1, "relu", residual=True)
    args, ref = _data("conv", 16, 8, 32, 3, 1, residual=True)
    sfunc, _ = _schedule(func, BlockedConv(tile))
    np.testing.assert_allclose(_run(sfunc, args, oshape), _act(ref, "relu"), rtol=1e-4, atol=1e-4)


def test_tile_that_does_not_divide_is_declined():
    """A pixel tile that does not divide the row (or a block count that does not divide the
    output blocks) would need a predicated tail: the rule declines, the next rule schedules."""
    func, _ = _kernel("conv", 16, 7, 32, 3, 1)
    assert BlockedConv(ConvTile(4, 2)).apply(func, _target(), 8) is None
    assert BlockedConv(ConvTile(7, 3)).apply(func, _target(), 8) is None
    sch, rule, _ = default_schedule(func, _target(), [BlockedConv(ConvTile(4, 2)), OuterProduct()])
    assert sch is not None and rule == "outer-product"


def test_conv_tile_choice():
    # 12 accumulators where the row width / block count allow it
    assert (conv_tile(ConvShape("conv", 18, 56, 56, 24, 1, 1, 1), _M).rt,
            conv_tile(ConvShape("conv", 18, 56, 56, 24, 1, 1, 1), _M).obt) == (2, 6)
    t = conv_tile(ConvShape("conv", 8, 48, 48, 64, 1, 1, 1), _M)
    assert t.rt * t.obt == 12 and 48 % t.rt == 0 and 8 % t.obt == 0
    # ResNet-50's widths (56, 28, 14, 7) and power-of-two block counts: 3 x 4 tiles with a
    # ragged last one (2, 1, 2, 1 pixels)
    for ow in (56, 28, 14, 7):
        for ob in (8, 16, 64):
            t = conv_tile(ConvShape("conv", ob, ow, ow, 576, 3, 3, 1), _M)
            assert (t.rt, t.obt, t.tail) == (3, 4, True) and ob % t.obt == 0
            assert t.pad_row == (ow >= 14)
    # a block count no 12-accumulator tile divides: 8 accumulators that divide the row
    t = conv_tile(ConvShape("conv", 5, 14, 14, 576, 3, 3, 1), _M)
    assert t.rt * t.obt < 12 and 14 % t.rt == 0 and 5 % t.obt == 0 and not t.tail
    assert conv_tile(ConvShape("conv", 256, 7, 7, 1024, 1, 1, 2), _M).order == "blk"  # strided 1x1
    assert conv_tile(ConvShape("conv", 256, 7, 7, 1024, 1, 1, 1), _M).order == "ob"


def test_declines_other_kernels():
    """NCHW conv, NCHW depthwise, matmul, elementwise and global pooling are not blocked kernels."""
    target = _target()

    def fused(body, params):
        bb = relax.BlockBuilder()
        vs = [relax.Var(n, TT(s, "float32")) for n, s in params]
        with bb.function("main", vs):
            with bb.dataflow():
                out = bb.emit_output(body(bb, *vs))
            bb.emit_func_output(out)
        mod = bb.get()
        for p in (relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(),
                  relax.transform.FuseTIR()):
            mod = p(mod)
        return [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]

    funcs = []
    funcs += fused(lambda bb, x, w: bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=1))),
                   [("x", (1, 16, 8, 8)), ("w", (16, 16, 3, 3))])
    funcs += fused(lambda bb, x, w: bb.emit(relax.op.nn.conv2d(x, w, padding=1, groups=16)),
                   [("x", (1, 16, 8, 8)), ("w", (16, 1, 3, 3))])
    funcs += fused(lambda bb, a, b: bb.emit(relax.op.matmul(a, b)), [("a", (16, 32)), ("b", (32, 64))])
    funcs += fused(lambda bb, a: bb.emit(relax.op.nn.relu(a)), [("a", (1, 2, 4, 4, 8))])
    funcs += fused(lambda bb, x: bb.emit(relax.op.nn.max_pool2d(x, pool_size=3, strides=2, padding=1)),
                   [("x", (1, 16, 8, 8))])
    bb = relax.BlockBuilder()
    x = relax.Var("x", TT((1, 2, 7, 7, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit_te(BO.global_pool_blocked, x, "avg"))
        bb.emit_func_output(out)
    funcs += [f for _, f in legalize_and_fuse(bb.get(), target).functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) >= 6
    for f in funcs:
        assert BlockedConv().apply(f, target, 8) is None
        assert BlockedWindow().apply(f, target, 8) is None


def test_trace_replays_to_the_same_kernel():
    """Tuning stores the default schedule as a record: its trace, replayed on the unscheduled
    PrimFunc, gives the same kernel."""
    from tvm import s_tir

    for kind, c, h, oc, k, s in (("conv", 16, 14, 16, 3, 1), ("depthwise", 16, 12, 16, 3, 1)):
        func, _ = _kernel(kind, c, h, oc, k, s)
        sch = BlockedConv().apply(func, _target(), 8)
        again = s_tir.Schedule(func)
        sch.trace.apply_to_schedule(again, remove_postproc=False)
        tvm.ir.assert_structural_equal(again.mod["main"], sch.mod["main"])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cb=st.integers(1, 3), ob=st.integers(1, 4), h=st.integers(3, 10), w=st.integers(3, 12),
    k=st.sampled_from([1, 3]), s=st.sampled_from([1, 2]), residual=st.booleans(),
    act=st.sampled_from(["relu", "clip", "none"]),
)
def test_random_blocked_convs_keep_numbers(cb, ob, h, w, k, s, residual, act):
    func, oshape = _kernel("conv", cb * B, h, ob * B, k, s, act, residual, w=w)
    args, ref = _data("conv", cb * B, h, ob * B, k, s, residual, w=w)
    sfunc, rule = _schedule(func)
    assert rule == "blocked-conv"
    np.testing.assert_allclose(_run(sfunc, args, oshape), _act(ref, act), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["conv", "depthwise"])
@pytest.mark.parametrize("symbolic", [False, True], ids=["batch2", "symbolic_batch"])
def test_batch_and_symbolic_batch(kind, symbolic):
    """Batch 2, and a symbolic batch (kept as a serial outer loop) run with batch 2."""
    n = tvm.tirx.Var("n", "int64") if symbolic else 2
    c, oc = 16, 32 if kind == "conv" else 16
    func, _ = _kernel(kind, c, 8, oc, 3, 1, "relu", kind == "conv", n=n)
    args, ref = _data(kind, c, 8, oc, 3, 1, kind == "conv", n=2)
    sfunc, rule = _schedule(func)
    assert rule == "blocked-conv"
    np.testing.assert_allclose(_run(sfunc, args, (2, oc, 8, 8)), _act(ref, "relu"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 3])
def test_k_chunked_conv_matches_the_default(k):
    """ConvTile.k_chunk: a conv's reduction in chunks (the block's accumulators in a local buffer
    between chunks) computes what the default schedule computes."""
    import numpy as np
    import tvm
    from tvm import te

    from graphopt.targets.tvm.schedules import nchwc as NS
    from graphopt.targets.tvm.kernels import blocked as BO
    from graphopt.targets.tvm.schedules import default_schedule

    target = _target(threads=1)

    def func(k: int):
        x = te.placeholder((1, 8, 6, 6, 8), name="x")
        w = te.placeholder((4, 8, k, k, 8, 8), name="w")
        y = BO.conv2d_blocked(x, w, (1, 1), [k // 2] * 4, (1, 1))
        r = te.compute(y.shape, lambda *i: tvm.tirx.max(y(*i), tvm.tirx.const(0.0, "float32")), name="relu")
        return te.create_prim_func([x, w, r])

    f = func(k)
    tile = TI.ConvTile(6, 2, "ob", k_chunk=4)
    sch = NS.BlockedConv(tile=tile).apply(f, target, 8)
    assert sch is not None and "icb_0" in sch.mod["main"].script()
    base, _, _ = default_schedule(f, target)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype("float32") for s in ((1, 8, 6, 6, 8), (4, 8, k, k, 8, 8))]
    outs = []
    for s_ in (sch, base):
        lib = tvm.compile(tvm.IRModule({"main": s_.mod["main"].with_attr("global_symbol", "main")}), target=target)
        o = tvm.runtime.tensor(np.zeros((1, 4, 6, 6, 8), "float32"))
        lib["main"](*[tvm.runtime.tensor(a) for a in args], o)
        outs.append(o.numpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("rule", [None, OuterProduct()], ids=["blocked-conv", "outer-product"])
@pytest.mark.parametrize("k,residual", [(1, True), (3, False)])
def test_rounded_up_pixels_stay_inside_the_output(rule, k, residual):
    """A conv computed on its flattened pixels rounded up to the tile (49 → 51) with its crop,
    unflatten and epilogue inlined: the write-back stops at the real end. The generic rule
    inlined the epilogue of such a crop at the root before this was guarded and wrote 8 floats
    past the output (and into the next row's first pixel)."""
    c, h, oc = 16, 7, 32
    func, oshape = _kernel("conv", c, h, oc, k, 1, "relu", residual, flat=3)
    assert "crop" in func.script()
    args, ref = _data("conv", c, h, oc, k, 1, residual)
    sfunc, name = _schedule(func, rule)
    assert name == ("blocked-conv" if rule is None else "outer-product")
    y = _run(sfunc, args, oshape)
    np.testing.assert_allclose(y, np.maximum(ref, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("c,h,oc,k,s,residual,flat", [
    (16, 7, 32, 1, 1, True, 3),  # 49 pixels → 51: 17 tiles of 3 pixels x 4 blocks
    (16, 14, 48, 1, 2, False, 2),  # strided: the gather of every other pixel inlined into the reads
    (8, 5, 16, 1, 1, False, 6),  # 2 output blocks: 6 pixels x 2 blocks, 25 → 30 pixels
    (16, 7, 32, 3, 1, True, 3),  # 3x3, pad 1: pixel p reads the window of (p // 7, p % 7)
    (16, 9, 32, 3, 2, False, 3),  # 3x3 stride 2
])
def test_flat_conv_fires_and_keeps_numbers(c, h, oc, k, s, residual, flat):
    """conv2d_blocked_flat: BlockedConv tiles the flattened pixel axis and writes back through
    the crop and unflatten (out[.., p // W, p % W, ..], the rounded-up pixels dropped)."""
    func, oshape = _kernel("conv", c, h, oc, k, s, "relu", residual, flat=flat)
    script = func.script()
    assert "flatten" in script and "unflatten" in script
    sfunc, rule = _schedule(func)
    assert rule == "blocked-conv"
    text = sfunc.script()
    assert "T.parallel" in text and "T.vectorized" in text
    # init, update, write-back (+ crop, unflatten and epilogue inlined into it), the pad's fill
    # and copy where the conv has one
    assert len([b for b in _root_blocks(sfunc) if '"pad' not in b]) <= 4
    args, ref = _data("conv", c, h, oc, k, s, residual)
    np.testing.assert_allclose(_run(sfunc, args, oshape), np.maximum(ref, 0), rtol=1e-4, atol=1e-4)


def test_flat_parts_balance_the_parallel_loop():
    """_flat_parts: nothing to do where the parallel loop divides among the cores; else the fewest
    parts of the pixel tiles (a divisor of their count) that make it divide, 0 where none does."""
    assert NS._flat_parts(2, 262, 2) == 1 and NS._flat_parts(1, 17, 1) == 1
    assert NS._flat_parts(1, 262, 2) == 2  # 262 = 2 x 131
    assert NS._flat_parts(3, 262, 2) == 2
    assert NS._flat_parts(1, 17, 2) == 0  # 17 tiles: prime
    assert NS._flat_parts(1, 27, 4) == 0 and NS._flat_parts(2, 27, 4) == 0 and NS._flat_parts(1, 28, 4) == 4


@pytest.mark.parametrize("h,par", [
    (28, 2),  # 784 pixels → 786: 262 tiles of 3 pixels x 4 blocks, in 2 parts
    (7, 17),  # 49 → 51: 17 tiles (prime): all of them join the parallel loop
])
def test_flat_conv_with_one_block_tile_uses_every_core(h, par):
    """A flat conv with one tile of output blocks (4 blocks, DenseNet's 32-channel 3x3 convs) on a
    2-core target: its pixel tiles join the parallel loop (one core of two ran it before);
    numbers against onnxruntime."""
    func, oshape = _kernel("conv", 16, h, 32, 3, 1, "relu", True, flat=3)
    sfunc, rule = _schedule(func)
    assert rule == "blocked-conv"
    assert re.search(rf"in T\.parallel\((T\.int64\()?{par}\)?\)", sfunc.script())
    args, ref = _data("conv", 16, h, 32, 3, 1, True)
    np.testing.assert_allclose(_run(sfunc, args, oshape), np.maximum(ref, 0), rtol=1e-4, atol=1e-4)


def test_row_tile_ranges():
    """Per kernel row, the pixel tiles whose window row is inside the input: 7x7 map, 3x3 pad 1,
    3-pixel tiles (17, the last holding 2 rounded-up pixels): kernel row 0 skips output row 0
    (pixels 0-6: tiles 0-1 whole), row 2 skips row 6 (pixels 42-48 and the extra two: tiles 14-16);
    a 7x7 kernel (pad 3) on a 2x2 map: rows 0, 1, 5 and 6 reach no input row, 2 only output row 1
    (tiles 0-1: pixels 2-3 and the 2 extra), 4 only output row 0 (tile 0)."""
    assert TI.row_tile_ranges((7, 7, 7, 1, 1, 1), 3, 3, 17) == [(2, 17), (0, 17), (0, 14)]
    assert TI.row_tile_ranges((2, 2, 2, 1, 1, 3), 7, 3, 2) == [(0, 0), (0, 0), (0, 2), (0, 2), (0, 1), (0, 0), (0, 0)]
    # stride 2, 14 -> 7 (pad 1): only output row 0 reads the top padding for kernel row 0
    assert TI.row_tile_ranges((7, 7, 14, 2, 1, 1), 3, 3, 17) == [(2, 17), (0, 17), (0, 17)]


@pytest.mark.parametrize("c,h,oc,k,residual", [
    (16, 7, 64, 3, True),  # 3x3 pad 1: kernel rows 0 and 2 skip a row each
    (16, 9, 64, 5, False),  # 5x5 pad 2: two rows each side
    (16, 2, 64, 7, True),  # 7x7 pad 3 on 2x2: kernel rows 0, 1, 5, 6 skip every tile
    (8, 14, 96, 3, False),  # 12 output blocks: 2 pixels x 6 blocks
])
def test_row_passes_skip_padded_rows_and_keep_numbers(c, h, oc, k, residual):
    """A flat stride-1 conv with padded rows: the default tile runs a pass per (input block chunk,
    kernel row) over only the pixel tiles that kernel row's input rows reach (the loop marked,
    its bounds picked per kernel row by apply_loop_marks); numbers against onnxruntime."""
    flat = 3 if oc // B % 4 == 0 else 2
    func, oshape = _kernel("conv", c, h, oc, k, 1, "relu", residual, flat=flat)
    sch, rule, _ = default_schedule(func, _target())
    assert rule == "blocked-conv"
    text = sch.mod["main"].script()
    assert text.count(LM.ROW_PASS) == 2
    marked = LM.apply_loop_marks(sch.mod["main"]).script()
    assert LM.ROW_PASS not in marked and "T.Select" in marked
    args, ref = _data("conv", c, h, oc, k, 1, residual)
    np.testing.assert_allclose(_run(sch.mod["main"], args, oshape), np.maximum(ref, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("c,h,oc,k,s", [
    (16, 9, 64, 3, 2),  # strided: only the first output row reads padding; no passes
    (16, 7, 64, 1, 1),  # unpadded 1x1: no padded rows
    (16, 7, 32, 3, 1),  # one tile of output blocks on 2 cores: the pixel tiles are split among them
])
def test_row_passes_do_not_fire_without_padded_rows_at_stride_1(c, h, oc, k, s):
    func, oshape = _kernel("conv", c, h, oc, k, s, "relu", False, flat=3)
    sch, rule, _ = default_schedule(func, _target())
    assert rule == "blocked-conv" and LM.ROW_PASS not in sch.mod["main"].script()
    args, ref = _data("conv", c, h, oc, k, s)
    np.testing.assert_allclose(_run(sch.mod["main"], args, oshape), np.maximum(ref, 0), rtol=1e-4, atol=1e-4)


def test_odd_block_counts_take_a_wide_tile():
    """Output block counts no 12-accumulator tile divides (SqueezeNet's 1000 channels: 125 blocks)
    take odd_tile's largest divisor up to 6 blocks, not an 8-accumulator tile of 1 block (1 x 1 on
    13-wide rows, 28 GFLOP/s): 125 → 2 pixels x 5 blocks, a prime count → 12 x 1."""
    assert _M.odd_tile(125) == (2, 5) and _M.odd_tile(7) == (12, 1) and _M.odd_tile(35) == (2, 5)
    t = conv_tile(ConvShape("conv", 125, 1, 170, 512, 1, 1, 1), _M)  # flat 1x1 512 -> 1000 on 13x13
    assert (t.rt, t.obt, t.tail) == (2, 5, False)
    t = conv_tile(ConvShape("conv", 5, 56, 56, 16 * 9, 3, 3, 1), _M)  # 3x3 16 -> 40 on 56-wide rows
    assert (t.rt, t.obt, t.tail, t.order) == (2, 5, False, "row")
    t = conv_tile(ConvShape("conv", 7, 56, 56, 16 * 9, 3, 3, 1), _M)  # 56 = 4 x 12 + 8: a ragged tile
    assert (t.rt, t.obt, t.tail) == (12, 1, True)


@pytest.mark.parametrize("c,h,oc,k,flat", [
    (16, 13, 40, 1, 2),  # flat 1x1: 169 pixels → 170, 2 pixels x 5 blocks
    (16, 56, 40, 3, 0),  # rows: 56 = 28 x 2
    (16, 20, 56, 3, 0),  # 7 blocks (prime): 12 x 1 tiles, 20 = 12 + a ragged 8
])
def test_odd_block_counts_keep_numbers(c, h, oc, k, flat):
    func, oshape = _kernel("conv", c, h, oc, k, 1, "relu", True, flat=flat)
    sfunc, rule = _schedule(func)
    assert rule == "blocked-conv"
    args, ref = _data("conv", c, h, oc, k, 1, True)
    np.testing.assert_allclose(_run(sfunc, args, oshape), np.maximum(ref, 0), rtol=1e-4, atol=1e-4)


def test_flat_conv_with_a_tile_that_does_not_divide_is_declined():
    """51 pixels take no 4-pixel tile: a forced 4 x 2 tile declines, the generic rule schedules the
    kernel, the numbers stay."""
    func, oshape = _kernel("conv", 16, 7, 32, 1, 1, "relu", True, flat=3)
    assert BlockedConv(ConvTile(4, 2)).apply(func, _target(), 8) is None
    sch, rule, _ = default_schedule(func, _target(), [BlockedConv(ConvTile(4, 2)), OuterProduct()])
    assert rule == "outer-product"
    args, ref = _data("conv", 16, 7, 32, 1, 1, True)
    np.testing.assert_allclose(_run(sch.mod["main"], args, oshape), np.maximum(ref, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tile,w", [
    (ConvTile(3, 4, "row", pad_row=True, tail=True), 14),  # 14 = 4 x 3 + 2
    (ConvTile(3, 4, "ob", tail=True), 7),  # 7 = 2 x 3 + 1
    (ConvTile(3, 4, "ob", tail=True, k_chunk=2), 7),  # and the reduction in chunks
])
def test_ragged_tile_is_peeled_and_keeps_numbers(tile, w):
    """Rows that the tile's pixel count does not divide: whole tiles plus a ragged one; the tile
    loop is marked, apply_loop_marks gives its last iteration code of its own (the whole
    tiles' loop then has one iteration fewer), the numbers stay."""
    func, oshape = _kernel("conv", 32, 14, 32, 3, 1, "relu", True, w=w)
    sch = BlockedConv(tile).apply(func, _target(), 8)
    assert sch is not None
    sfunc = sch.mod["main"]
    assert LM.PEEL_LAST in sfunc.script()
    peeled = LM.apply_loop_marks(sfunc).script()
    n = -(-w // 3)
    assert LM.PEEL_LAST not in peeled
    assert re.search(rf"in range\((T\.int64\()?{n - 1}\)?, (T\.int64\()?{n}\)?\):", peeled)
    args, ref = _data("conv", 32, 14, 32, 3, 1, True, w=w)
    np.testing.assert_allclose(_run(sfunc, args, oshape), np.maximum(ref, 0), rtol=1e-4, atol=1e-4)
    # without the flag the rule declines the ragged row
    assert BlockedConv(ConvTile(3, 4, tile.order, pad_row=tile.pad_row)).apply(func, _target(), 8) is None


def test_default_tiles_take_ragged_rows_and_chunk_large_weight_panels():
    """conv_tile: 12 accumulators with a ragged tile rather than 8 that divide the row; the
    reduction in chunks where the weight panel of a tile column exceeds L2."""
    t = conv_tile(ConvShape("conv", 8, 14, 14, 256 * 9, 3, 3, 1), _M)
    assert (t.rt, t.obt, t.tail, t.order, t.k_chunk) == (3, 4, True, "row", 0)
    t = conv_tile(ConvShape("conv", 64, 1, 51, 512 * 9, 3, 3, 1), _M)  # flat 3x3 512->512 on 7x7
    assert (t.rt, t.obt, t.tail, t.order) == (3, 4, False, "ob") and t.k_chunk and 64 % t.k_chunk == 0
    assert 9 * 8 * 8 * 4 * 4 * t.k_chunk <= 160 * 1024
    t = conv_tile(ConvShape("conv", 8, 56, 56, 64, 1, 1, 1), _M)
    assert (t.rt, t.obt, t.tail, t.k_chunk) == (3, 4, True, 0)


def test_loop_marks_change_only_marked_functions():
    """apply_loop_marks_to_module (run by the build and the tuning builder) rewrites the PrimFuncs with a loop
    marked PEEL_LAST and leaves every other function as it was; a second run changes nothing."""
    func, _ = _kernel("conv", 32, 14, 32, 3, 1, "relu", False, w=7)
    marked = BlockedConv(ConvTile(3, 4, "ob", tail=True)).apply(func, _target(), 8).mod["main"]
    plain = BlockedConv().apply(_kernel("conv", 16, 12, 32, 3, 1)[0], _target(), 8).mod["main"]
    mod = tvm.IRModule({"a": marked, "b": plain})
    out = LM.apply_loop_marks_to_module(mod)
    assert out["b"].same_as(mod["b"])
    assert LM.PEEL_LAST in mod["a"].script() and LM.PEEL_LAST not in out["a"].script()
    again = LM.apply_loop_marks_to_module(out)
    assert again["a"].same_as(out["a"]) and again["b"].same_as(out["b"])


# --- AVX-512: 16-channel blocks, 24 accumulators of 32 registers --------------------------------


def _wide(case):
    """CASES at 16-channel blocks: every channel count but the stem's RGB input doubled."""
    cid, kind, c, h, oc, k, s, act, residual, w = case
    return (cid, kind, c if kind == "stem" else 2 * c, h, 2 * oc, k, s, act, residual, w)


def test_avx512_machine_model_tiles_for_32_registers():
    m = machine_model(AVX512)
    assert (m.lanes(32), m.vector_registers, m.accumulators) == (16, 32, 24)
    assert m.conv_tiles == ((4, 6), (6, 4), (8, 3), (12, 2))
    assert TI.exact_tiles(m) == ((4, 6), (6, 4), (6, 3), (6, 2))  # at most 6 pixels: 8x3 and 12x2 spilled
    assert _M.conv_tiles == ((2, 6), (3, 4), (4, 3), (6, 2))  # AVX2's, as before the machine model
    # ResNet-50's 64 -> 64 3x3 on 56x56 (4 blocks of 16): 6 pixels x 4 blocks with a ragged tile
    t = conv_tile(ConvShape("conv", 4, 56, 56, 64 * 9, 3, 3, 1), m)
    assert (t.rt, t.obt, t.tail) == (6, 4, True)


@needs_avx512
@pytest.mark.parametrize("case", [_wide(c) for c in CASES], ids=[c[0] for c in CASES])
def test_avx512_default_schedule_fires_and_keeps_numbers(case):
    _, kind, c, h, oc, k, s, act, residual, w = case
    func, oshape = _kernel(kind, c, h, oc, k, s, act, residual, w=w, b=16)
    args, ref = _data(kind, c, h, oc, k, s, residual, w=w, b=16)
    sfunc, rule = _schedule(func, target=AVX512)
    assert rule == "blocked-conv"
    np.testing.assert_allclose(_run(sfunc, args, oshape, b=16, target=AVX512), _act(ref, act), rtol=1e-4, atol=1e-4)


def _asm(func, target):
    return tvm.tirx.build(func.with_attr("global_symbol", "main"), target=target).inspect_source("asm")


def test_avx512_kernel_uses_zmm_fmas():
    """Whatever the host: the AVX-512 build of a blocked conv computes with 512-bit FMAs on zmm
    registers, the AVX2 build with 256-bit ones on ymm."""
    func, _ = _kernel("conv", 32, 12, 64, 3, 1, "relu", b=16)
    sfunc, rule = _schedule(func, target=AVX512)
    assert rule == "blocked-conv"
    asm = _asm(sfunc, AVX512)
    assert re.search(r"vfmadd\w+\s+[^\n]*zmm", asm)
    func8, _ = _kernel("conv", 16, 12, 32, 3, 1, "relu")
    asm8 = _asm(_schedule(func8)[0], AVX2)
    assert re.search(r"vfmadd\w+\s+[^\n]*ymm", asm8) and "zmm" not in asm8


# --- symbolic maps (a detector's H x W, a recognizer's W): the host's machine model ---------------

SYMBOLIC = [
    # (id, kind, c, oc, k, s, pool, act, residual): channels in blocks of the host's block
    ("conv3x3_residual", "conv", 2, 2, 3, 1, "max", "relu", True),
    ("conv3x3_s2", "conv", 2, 4, 3, 2, "max", "clip", False),
    ("conv1x1", "conv", 4, 2, 1, 1, "max", "none", False),
    ("stem3x3", "stem", 3, 2, 3, 1, "max", "relu", False),
    ("depthwise3x3", "depthwise", 2, 2, 3, 1, "max", "clip", False),
    ("maxpool2x2_s2", "pool", 1, 1, 2, 2, "max", "none", False),
    ("maxpool3x3_s2", "pool", 1, 1, 3, 2, "max", "none", False),
    ("avgpool2x2_s2", "pool", 1, 1, 2, 2, "avg", "none", False),
]


@pytest.mark.parametrize("case", SYMBOLIC, ids=[c[0] for c in SYMBOLIC])
def test_symbolic_map_kernels_keep_numbers_at_every_size(case):
    """One kernel over a symbolic H x W, run at the smallest map and at sizes no tile divides
    (narrower than a tile: the predicated tile; wider: whole tiles, the last shifted back to end at
    the row's end), equal to onnxruntime's; the conv's whole tiles keep no split predicate."""
    _, kind, c, oc, k, s, pool, act, residual = case
    target = host_target()
    b = machine_model(target).lanes()
    c, oc = (c if kind == "stem" else c * b), (c * b if kind in ("pool", "depthwise") else oc * b)
    H, W = tvm.tirx.Var("H", "int64"), tvm.tirx.Var("W", "int64")
    func, _ = _kernel(kind, c, H, oc, k, s, act, residual, pool=pool, w=W, b=b)
    sfunc, rule = _schedule(func, target=target)
    assert rule == "blocked-conv"
    if kind == "conv" and k == 3 and s == 1:
        assert LM.PEEL_BOUND in sfunc.script()
        marked = LM.apply_loop_marks(sfunc).script()
        assert LM.PEEL_LAST not in marked and "T.min(" in marked
    p = k // 2 if kind != "pool" or pool == "max" else 0
    smallest = max(1, k - 2 * p)
    lib = tvm.compile(tvm.IRModule({"main": LM.apply_loop_marks(sfunc).with_attr("global_symbol", "main")}), target=target)
    for h, w in [(smallest, smallest), (smallest, 2), (3, 5), (5, 13), (9, 30), (2, 47)]:
        args, ref = _data(kind, c, h, oc, k, s, residual, pool=pool, w=w, b=b)
        oh, ow = _out(h, k, s, p), _out(w, k, s, p)
        shape = (1, oc // b, oh, ow, b)
        size = int(np.prod(shape))
        guarded = tvm.runtime.tensor(np.full(size + _GUARD, 7.0, np.float32))
        lib["main"](*[tvm.runtime.tensor(a) for a in args], guarded._create_view(shape, "float32"))
        flat = guarded.numpy()
        assert (flat[size:] == 7.0).all(), f"{h}x{w}: the kernel wrote past the end of its output"
        got = _unblocked(flat[:size].reshape(shape))
        np.testing.assert_allclose(got, _act(ref, act), rtol=1e-4, atol=1e-4, err_msg=f"{h}x{w}")


def test_symbolic_map_chunked_reduction_keeps_the_predicated_last_tile():
    """A reduction in chunks keeps all the row's accumulators in one local buffer across the pixel
    tiles: a last tile shifted back would add the overlapped pixels twice, so such a loop keeps the
    plain mark (whole tiles, then the predicated last one), numbers equal to onnxruntime's."""
    H, W = tvm.tirx.Var("H", "int64"), tvm.tirx.Var("W", "int64")
    func, _ = _kernel("conv", 32, H, 16, 1, 1, "relu", w=W)
    sch = BlockedConv(ConvTile(3, 2, "ob", k_chunk=2, tail=True)).apply(func, _target(), 8)
    assert sch is not None
    sfunc = sch.mod["main"]
    assert LM.PEEL_LAST in sfunc.script() and LM.PEEL_BOUND not in sfunc.script()
    for h, w in [(1, 1), (2, 5), (3, 7), (4, 13)]:
        args, ref = _data("conv", 32, h, 16, 1, 1, w=w)
        np.testing.assert_allclose(_run(sfunc, args, (1, 16, h, w)), np.maximum(ref, 0), rtol=1e-4, atol=1e-4,
                                   err_msg=f"{h}x{w}")


# --- the register tile as a stack array (targets/tvm/stack_tiles.py, nchwc.stack_tile_fires) ----
# AVX-512's 24-accumulator tiles lose their heap workspace (a memset and a store + reload of the
# accumulators per pixel tile); AVX2's kernels stay as they were

OFF = knobs.ScheduleKnobs(stack_tile=False)


def _scheduled(c, h, oc, residual, target, b, knob=None, act="relu"):
    func, oshape = _kernel("conv", c, h, oc, 1, 1, act, residual, flat=6 if b == 16 else 3, b=b)
    with knobs.using(knob):
        sfunc, rule = _schedule(func, target=target)
    assert rule == "blocked-conv"
    return sfunc, oshape


def _lib(sfunc, target):
    mod = tvm.IRModule({"main": LM.apply_loop_marks(sfunc).with_attr("global_symbol", "main")})
    return tvm.tirx.build(mod, target=target, pipeline=tir_pipeline(machine_model(target)))


def _workspace_calls(lib):
    return len(re.findall(r"TVMBackendAllocWorkspace@GOTPCREL|memset@PLT", lib.inspect_source("asm")))


def test_fires_for_tiles_between_the_stack_limit_and_the_register_file():
    m512, m2 = machine_model(AVX512), machine_model(AVX2)
    assert (stack_tile_bytes(m512), stack_tile_bytes(m2)) == (2048, 512)
    assert NS.stack_tile_fires(m512, 6 * 4 * 16 * 4)  # AVX-512's 6 x 4 tile: 1536 bytes
    assert NS.stack_tile_fires(m512, 4 * 6 * 16 * 4)
    assert not NS.stack_tile_fires(m2, 3 * 4 * 8 * 4)  # AVX2's 12 ymm: 384 bytes, as before
    assert not NS.stack_tile_fires(m512, 2 * 4 * 16 * 4)  # below kMaxStackAlloca (512 bytes)
    assert not NS.stack_tile_fires(m512, 3000)  # more than the register file
    assert not NS.stack_tile_fires(None, 1536)
    with knobs.using(OFF):
        assert not NS.stack_tile_fires(m512, 1536)


def test_avx512_tile_is_a_stack_array_whatever_the_host():
    """ResNet-50's 1x1 64 -> 256 (+ Add, Relu) on a 14x14 map at 16-channel blocks: marked, and
    built without a workspace or memset; with the knob off the kernel is the one from before."""
    on, _ = _scheduled(64, 14, 256, True, AVX512, 16)
    off, _ = _scheduled(64, 14, 256, True, AVX512, 16, OFF)
    assert STACK_TILE in on.script() and STACK_TILE not in off.script()
    assert _workspace_calls(_lib(on, AVX512)) == 0
    assert _workspace_calls(_lib(off, AVX512)) > 0


def test_avx2_kernels_are_unchanged():
    on, _ = _scheduled(32, 14, 128, True, AVX2, 8)
    off, _ = _scheduled(32, 14, 128, True, AVX2, 8, OFF)
    assert STACK_TILE not in on.script()
    tvm.ir.assert_structural_equal(on, off)


@needs_avx512
@pytest.mark.parametrize("c,h,oc,residual,act", [
    (64, 14, 256, True, "relu"),  # layer1's conv3 + Add + Relu, on a smaller map
    (64, 14, 256, False, "none"),  # layer1.0's downsample (bias only)
    (256, 7, 64, False, "relu"),  # layer1's conv1
])
def test_avx512_stack_tile_keeps_numbers(c, h, oc, residual, act):
    sfunc, oshape = _scheduled(c, h, oc, residual, AVX512, 16, act=act)
    assert STACK_TILE in sfunc.script()
    args, ref = _data("conv", c, h, oc, 1, 1, residual, b=16)
    lib = _lib(sfunc, AVX512)
    n, ocn, oh, ow = oshape
    out = tvm.runtime.tensor(np.zeros((n, ocn // 16, oh, ow, 16), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    np.testing.assert_allclose(_unblocked(out.numpy()), _act(ref, act), rtol=1e-4, atol=1e-4)


def test_stack_tile_lowering_restates_tvms_pipeline():
    """stack_tiles.default_passes lowers an unmarked kernel exactly as TVM's default S-TIR
    pipeline does (it restates that pipeline's pass list: this fails when TVM changes it)."""
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    from graphopt.targets.tvm.stack_tiles import default_passes

    sfunc, _ = _scheduled(64, 14, 256, True, AVX512, 16, OFF)
    mod = tvm.IRModule({"main": sfunc.with_attr("global_symbol", "main")})
    mod = tvm.tirx.transform.BindTarget(AVX512.with_host(AVX512))(mod)  # (as tvm.tirx.build binds it)
    with tvm.transform.PassContext(opt_level=3):
        head, tail = default_passes(tvm.transform.PassContext.current().config)
        ours = tvm.transform.Sequential(head + tail)(mod)
        theirs = default_s_tir_pipeline()[0](mod)
    tvm.ir.assert_structural_equal(ours, theirs)


# --- the tuner lowers as the build does (build.build_kernel, stack_tiles.replayed_kernel) ---------
# its builder timed the default schedules and their variants with TVM's default lowering (heap
# workspace tiles), while the build puts marked tiles on the stack; and schedules replayed from the
# database (variants, meta_schedule's) are lowered with every small "local" buffer on the stack


def _candidate(sfunc, default):
    """`sfunc` as the tuning builder gets it: one `main`, a default schedule's root block marked."""
    from graphopt.targets.tvm.tuning.tuner import DEFAULT_MARK

    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": sfunc.with_attr("global_symbol", "main")}))
    if default:
        sch.annotate(sch.get_sblock(sfunc.body.block.name_hint), DEFAULT_MARK, "blocked-conv")
    return sch.mod


def _tuning_build(mod, target):
    from graphopt.targets.tvm.tuning import tuner

    return tuner._build_with_hooks(mod, target, None)


def _lib_asm(lib):
    return lib.inspect_source("asm")


def test_tuning_builder_lowers_avx512_tiles_as_the_build():
    """A default schedule's marked tile: no workspace in the tuning build either, the same code as
    the cpu build's lowering; an unmarked one (knob off) keeps its workspace (as the build would)."""
    on, _ = _scheduled(64, 14, 256, True, AVX512, 16)
    off, _ = _scheduled(64, 14, 256, True, AVX512, 16, OFF)
    built = _tuning_build(_candidate(on, True), AVX512)
    assert _workspace_calls(built) == 0
    assert _lib_asm(built) == _lib_asm(_lib(on, AVX512))
    assert _workspace_calls(_tuning_build(_candidate(off, True), AVX512)) > 0


def test_tuning_builder_replayed_candidates_get_stack_tiles_on_avx512():
    """A candidate that is not a default schedule (a variant, a meta_schedule schedule) is lowered
    as apply_database's replay is: its small "local" buffers on the stack, the tile unmarked by the
    rule (a database tuned before the marks) and a 6x1 tile under kMaxStackAlloca (never marked)."""
    off, _ = _scheduled(64, 14, 256, True, AVX512, 16, OFF)
    assert _workspace_calls(_tuning_build(_candidate(off, False), AVX512)) == 0
    func, _ = _kernel("conv", 64, 14, 64, 1, 1, "relu", flat=6, b=16)
    small = BlockedConv(ConvTile(6, 1, "ob")).apply(func, AVX512, 16).mod["main"]
    assert STACK_TILE not in small.script()
    assert _workspace_calls(_tuning_build(_candidate(small, True), AVX512)) > 0
    assert _workspace_calls(_tuning_build(_candidate(small, False), AVX512)) == 0


def test_tuning_builder_leaves_avx2_kernels_unchanged():
    """AVX2 (mcpu=haswell): the tuning build of a default schedule and of a replayed one is TVM's
    default lowering of it, as before (12-ymm tiles are not stack tiles)."""
    from graphopt.targets.tvm.schedules.loop_marks import apply_loop_marks_to_module

    on, _ = _scheduled(32, 14, 128, True, AVX2, 8)
    for default in (True, False):
        mod = _candidate(on, default)
        theirs = tvm.tirx.build(apply_loop_marks_to_module(mod), target=AVX2)
        assert _lib_asm(_tuning_build(mod, AVX2)) == _lib_asm(theirs)


def test_replayed_kernel_marks_on_avx512_only_and_strips_with_the_knob_off():
    from graphopt.targets.tvm.stack_tiles import replayed_kernel

    on, _ = _scheduled(64, 14, 256, True, AVX512, 16)
    off, _ = _scheduled(64, 14, 256, True, AVX512, 16, OFF)
    m512, m2 = machine_model(AVX512), machine_model(AVX2)
    assert replayed_kernel(off, m512, True).attrs[STACK_TILE] == 1
    assert replayed_kernel(off, m2, True) is off
    stripped = replayed_kernel(on, m512, False)
    assert STACK_TILE not in stripped.script()
    tvm.ir.assert_structural_equal(stripped, off)
    assert _workspace_calls(_lib(stripped, AVX512)) > 0


@needs_avx512
def test_replayed_small_tile_on_the_stack_keeps_numbers():
    from graphopt.targets.tvm.stack_tiles import replayed_kernel

    func, oshape = _kernel("conv", 64, 14, 64, 1, 1, "relu", flat=6, b=16)
    small = BlockedConv(ConvTile(6, 1, "ob")).apply(func, AVX512, 16).mod["main"]
    lib = _lib(replayed_kernel(small, machine_model(AVX512), True), AVX512)
    assert _workspace_calls(lib) == 0
    args, ref = _data("conv", 64, 14, 64, 1, 1, b=16)
    n, ocn, oh, ow = oshape
    out = tvm.runtime.tensor(np.zeros((n, ocn // 16, oh, ow, 16), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    np.testing.assert_allclose(_unblocked(out.numpy()), np.maximum(ref, 0), rtol=1e-4, atol=1e-4)


# --- a static ragged tile's copies keep accumulators of their own (loop_marks._tiles_apart) ------


def _lowered_locals(sfunc, target):
    """The "local" allocations of `sfunc` lowered as the build lowers it, up to MakePackedAPI:
    [(elements, lanes)]."""
    from graphopt.targets.tvm.stack_tiles import default_passes

    mod = tvm.IRModule({"main": LM.apply_loop_marks(sfunc).with_attr("global_symbol", "main")})
    mod = tvm.tirx.transform.BindTarget(target.with_host(target))(mod)
    head, _ = default_passes({})
    text = tvm.transform.Sequential(head)(mod)["main"].script()
    return [(int(n), int(x or 1)) for n, x in re.findall(r'T\.alloc_local\(\((\d+),\), "float32(?:x(\d+))?"\)', text)]


@pytest.mark.parametrize("h,rt,obt", [(14, 4, 2), (7, 3, 1)])
def test_ragged_static_tile_is_compacted_to_one_tile(h, rt, obt):
    """A row the tile does not divide: the whole tiles and the peeled last one each get their own
    accumulator buffer, compacted to one tile (one shared buffer was placed above the tile loop
    and spanned the whole row: a heap workspace LLVM could not keep in registers); numbers equal
    onnxruntime's."""
    func, oshape = _kernel("conv", 32, h, 16, 3, 1, "relu")
    sch = BlockedConv(ConvTile(rt, obt, "ob", tail=True)).apply(func, _target(), 8)
    assert sch is not None
    sfunc = sch.mod["main"]
    assert LM.PEEL_LAST in sfunc.script()
    locals_ = _lowered_locals(sfunc, _target())
    assert len(locals_) == 2 and all(n * lanes <= rt * obt * 8 for n, lanes in locals_), locals_
    args, ref = _data("conv", 32, h, 16, 3, 1)
    np.testing.assert_allclose(_run(sfunc, args, oshape), np.maximum(ref, 0), rtol=1e-4, atol=1e-4)


def test_tiles_apart_near_misses():
    """The copies share their buffer where an iteration's values reach the next one: a reduction's
    chunk loop (its var bound to a reduce axis), or a buffer also used outside the loop (a conv
    whose reduction runs in chunks keeps the row's accumulators across its tiles)."""
    body = ['with T.sblock("r"):', '    v_k = T.axis.reduce(T.int64(64), ko * T.int64(8) + ki)', '    acc[0] = acc[0] + x[v_k]']
    out = ['    acc = T.sblock_alloc_buffer((T.int64(1),), scope="local")']
    text = "\n".join(out + body)
    assert not LM._tiles_apart(text, out, body, "ko")
    remap = ['with T.sblock("r"):', '    v_i, v_k = T.axis.remap("SR", [i, ko])', '    acc[0] = acc[0] + x[v_k]']
    assert not LM._tiles_apart("\n".join(out + remap), out, remap, "ko")
    spatial = ['with T.sblock("r"):', '    v_x = T.axis.spatial(T.int64(64), ko * T.int64(8) + ki)', '    acc[v_x] = x[v_x]']
    assert LM._tiles_apart("\n".join(out + spatial), out, spatial, "ko")
    assert not LM._tiles_apart("\n".join(out + spatial + ["y[0] = acc[0]"]), out, spatial, "ko")

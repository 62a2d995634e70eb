"""BlockedConv's fused prologue (graphopt.targets.tvm.schedules.nchwc.fuse_prologue): a conv
group that computes its input (DenseNet's Concat -> BatchNormalization -> Relu -> Conv) runs the
chain as one parallel pass whose channel-block loop is split at the concat's inputs, and keeps
its numbers against onnxruntime on the NCHW operators."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
relax = pytest.importorskip("tvm.relax")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from graphopt.targets.tvm.kernels import blocked as BO  # noqa: E402
from graphopt.targets.tvm.schedules import ScheduleStats, apply_default_schedules  # noqa: E402
from graphopt.targets.tvm.schedules import knobs as K  # noqa: E402
from graphopt.targets.tvm.schedules import loop_marks as LM  # noqa: E402
from tvm_kernels import AVX2_MCPU, AVX512_MCPU, host_runs, isa_target, primitive_kernel  # noqa: E402

TT = relax.TensorType
AVX2 = isa_target(AVX2_MCPU)
AVX512 = isa_target(AVX512_MCPU)
ISAS = [pytest.param(AVX2, 8, id="avx2"), pytest.param(AVX512, 16, id="avx512")]


def _blocked(a, b):
    n, c, h, w = a.shape
    return np.ascontiguousarray(a.reshape(n, c // b, b, h, w).transpose(0, 1, 3, 4, 2))


def _unblocked(a):
    n, cb, h, w, b = a.shape
    return np.ascontiguousarray(a.transpose(0, 1, 4, 2, 3).reshape(n, cb * b, h, w))


def _case(chans, h, oc, k, b, seed=0):
    """The fused kernel of Concat(x_i) -> x * s + t -> Relu -> Conv(k x k, pad k // 2) + bias ->
    Relu in `b`-channel blocks (as the lowering builds a DenseNet layer's group), its arguments,
    and onnxruntime's output of the same NCHW operators (BatchNormalization for x * s + t)."""
    rng = np.random.default_rng(seed)
    c = sum(chans)
    p = k // 2
    xs = [rng.standard_normal((1, ci, h, h)).astype(np.float32) for ci in chans]
    gamma, beta = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    mean, var = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    s = gamma / np.sqrt(var + 1e-5)
    t = beta - mean * s
    W = (rng.standard_normal((oc, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
    bias = rng.standard_normal(oc).astype(np.float32)

    params = [relax.Var(f"x{i}", TT((1, ci // b, h, h, b), "float32")) for i, ci in enumerate(chans)]
    params += [relax.Var("s", TT((1, c // b, 1, 1, b), "float32")), relax.Var("t", TT((1, c // b, 1, 1, b), "float32")),
               relax.Var("w", TT((oc // b, c // b, k, k, b, b), "float32")), relax.Var("bias", TT((oc,), "float32"))]
    n_in = len(chans)

    def body(bb, *_):
        x = bb.emit(relax.op.concat(params[:n_in], axis=1))
        x = bb.emit(relax.op.add(relax.op.multiply(x, params[n_in]), params[n_in + 1]))
        x = bb.emit(relax.op.nn.relu(x))
        if k == 1:
            y = bb.emit_te(BO.conv2d_blocked_flat, x, params[n_in + 2], [1, 1], [0] * 4, [1, 1], 6, primfunc_name_hint="conv")
        else:
            y = bb.emit_te(BO.conv2d_blocked, x, params[n_in + 2], [1, 1], [p] * 4, [1, 1], primfunc_name_hint="conv")
        y = bb.emit(relax.op.add(y, relax.op.reshape(params[-1], [1, oc // b, 1, 1, b])))
        return bb.emit(relax.op.nn.relu(y))

    func = primitive_kernel(params, body)
    args = [_blocked(x, b) for x in xs] + [
        s.reshape(1, c // b, b)[:, :, None, None, :].copy(), t.reshape(1, c // b, b)[:, :, None, None, :].copy(),
        np.ascontiguousarray(W.reshape(oc // b, b, c // b, b, k, k).transpose(0, 2, 4, 5, 3, 1)), bias]

    names = [f"x{i}" for i in range(n_in)]
    nodes = [helper.make_node("Concat", names, ["c"], axis=1),
             helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["bn"], epsilon=1e-5),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Conv", ["r", "W", "B"], ["y0"], kernel_shape=[k, k], pads=[p] * 4),
             helper.make_node("Relu", ["y0"], ["y"])]
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((gamma, "g"), (beta, "be"), (mean, "m"), (var, "v"), (W, "W"), (bias, "B"))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(x.shape))
                                       for n, x in zip(names, xs)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, dict(zip(names, xs)))[0]
    return func, args, ref


def _schedule(func, target, knobs=None):
    stats = ScheduleStats()
    with K.using(knobs):
        mod = apply_default_schedules(tvm.IRModule({"main": func}), target, stats=stats)
    return mod["main"], stats.by_func["main"]


def _run(func, args, out_shape, b, target):
    lib = tvm.compile(tvm.IRModule({"main": LM.apply_loop_marks(func).with_attr("global_symbol", "main")}), target=target)
    n, oc, oh, ow = out_shape
    out = tvm.runtime.tensor(np.zeros((n, oc // b, oh, ow, b), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    return _unblocked(out.numpy())


def _root_loops(func):
    """The loop headers at the PrimFunc's top level (4 spaces in)."""
    return [ln.strip() for ln in func.script().splitlines() if ln.startswith("    for ")]


def _lowered_selects(func, target):
    """if_then_else calls left in the LLVM-bound TIR of `func` (after the build's simplification)."""
    mod = tvm.IRModule({"main": LM.apply_loop_marks(func).with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, target=target)
    ll = "\n".join(m.inspect_source("ll") for m in [lib.mod, *lib.mod.imports] if "define" in m.inspect_source("ll"))
    return ll


@pytest.mark.parametrize("target,b", ISAS)
@pytest.mark.parametrize("chans,h,k", [((2, 1, 1), 14, 1), ((4, 2, 2, 2), 7, 1), ((2, 2), 9, 3)],
                         ids=["1x1-14", "1x1-7-4inputs", "3x3-9"])
def test_concat_bn_relu_prologue_is_one_pass_and_keeps_numbers(target, b, chans, h, k):
    if not host_runs(target):
        pytest.skip("this host cannot execute this ISA's code")
    chans = tuple(ci * b for ci in chans)
    oc = 4 * b
    func, args, ref = _case(chans, h, oc, k, b)
    sfunc, rule = _schedule(func, target)
    assert rule == "blocked-conv"
    script = sfunc.script()
    blocks = {ln.split('"')[1] for ln in script.splitlines() if "T.sblock(" in ln}
    # one prologue pass: no concat, multiply or add block of its own, the channel loop split at
    # the inputs (one part per input: each reads one input, no select chain); a padded conv's
    # chain is inlined into its pad, whose loops stay as they were
    assert not any(name.startswith(("T_concat", "T_multiply", "T_add")) for name in blocks), sorted(blocks)
    parts = [name for name in blocks if name.endswith("_partition")]
    assert len(parts) == (len(chans) if k == 1 else 0), sorted(blocks)
    loops = _root_loops(sfunc)
    assert len(loops) == 2 and all("T.parallel" in ln for ln in loops), loops  # the prologue, the conv
    got = _run(sfunc, args, ref.shape, b, target)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # the knob off: the former schedule (one pass per op), the same numbers
    old, rule_old = _schedule(func, target, K.ScheduleKnobs(fuse_prologue=False))
    assert rule_old == "blocked-conv" and len(_root_loops(old)) == 5 + (k > 1)  # (concat, x * s, + t, relu, pad)
    np.testing.assert_allclose(_run(old, args, ref.shape, b, target), got, rtol=1e-5, atol=1e-5)


def test_split_concat_leaves_no_branch_per_vector():
    """Each part of the split channel loop reads its input directly: the select chain is resolved
    at compile time (the LLVM code of the prologue has no compare per channel block)."""
    b = 8
    func, _, _ = _case(tuple(2 * b for _ in range(6)), 7, 4 * b, 1, b)
    sfunc, _ = _schedule(func, AVX2)
    old, _ = _schedule(func, AVX2, K.ScheduleKnobs(fuse_prologue=False))
    new_cmp = _lowered_selects(sfunc, AVX2).count("icmp")
    old_cmp = _lowered_selects(old, AVX2).count("icmp")
    assert new_cmp + 5 <= old_cmp, (new_cmp, old_cmp)  # (6 inputs: 5 compares of the chain gone at least)

"""Legalization of the lowered module: LegalizeOps with graphopt's NaN-preserving overrides
(`LEGALIZATIONS`: max/min, max pool, arg max/min, float subtract) and only where the registry's
legalization is still TVM's own (`guarded_legalizations`), then AnnotateTIROpPattern → FuseTIR
(`legalize_and_fuse`).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import tvm
import tvm.sym  # the Analyzer (0.27 moved tvm.arith to tvm.sym)
from tvm import relax


from ..kernels.blocked import max_pool_nchw
from ..kernels.minmax import arg_max_min, reduce_max_min


def _float_subtract(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """relax.subtract of floats as a - b with b's bits passed through a reinterpret pair: TVM's
    arithmetic simplifier cancels a float `x - x` (also `select(c, x, y) - x`) to 0 once the
    fused kernel's expressions meet, which turns NaN and Inf into 0 (apache/tvm#11373); it
    cannot prove the pair equal to x, LLVM drops the pair, and without fast-math LLVM keeps
    x - x as IEEE says (NaN - NaN = NaN, Inf - Inf = NaN)."""
    from tvm import te, tirx, topi

    a, b = call.args
    dtype = str(b.ty.dtype)
    if not dtype.startswith("float") or dtype not in ("float16", "float32", "float64"):
        return bb.call_te(topi.subtract, a, b)
    bits = {"float16": "int16", "float32": "int32", "float64": "int64"}[dtype]

    def f(x: te.Tensor, y: te.Tensor) -> te.Tensor:
        opaque = te.compute(y.shape, lambda *i: tirx.reinterpret(dtype, tirx.reinterpret(bits, y(*i))), name="ieee_guard")
        return topi.subtract(x, opaque)

    return bb.call_te(f, a, b, primfunc_name_hint="subtract")


def _float(dtype: str) -> bool:
    return dtype in ("float16", "float32", "float64", "bfloat16")


def _tvm_legalization(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """`call` legalized by TVM's own FLegalize (where graphopt's leaves a dtype or layout to it)."""
    return _registered_legalizations(len(tvm.ir.Op.list_op_names()))[call.op.name](bb, call)


def _nan_max_min(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """relax.max / relax.min (ReduceMax/Min, GlobalMaxPool in NCHW) of floats with NaN skipped
    (maxNum, `kernels.minmax`: NaN only where every element is); other dtypes as TVM legalizes them."""
    x = call.args[0]
    if not _float(str(x.ty.dtype)):
        return _tvm_legalization(bb, call)
    axes = None if call.attrs.axis is None else [int(a) for a in call.attrs.axis]
    kind = "max" if call.op.name == "relax.max" else "min"
    return bb.call_te(reduce_max_min, x, kind, axes, bool(call.attrs.keepdims), primfunc_name_hint=kind)


def _nan_max_pool2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """relax.nn.max_pool2d of a float NCHW tensor with NaN skipped (`kernels.blocked.max_pool_nchw`);
    other layouts and dtypes as TVM legalizes them."""
    a, x = call.attrs, call.args[0]
    if not _float(str(x.ty.dtype)) or str(a.layout) != "NCHW" or str(a.out_layout) != "NCHW":
        return _tvm_legalization(bb, call)
    return bb.call_te(max_pool_nchw, x, [int(k) for k in a.pool_size], [int(s) for s in a.strides],
                      [int(p) for p in a.padding], [int(d) for d in a.dilation], bool(a.ceil_mode),
                      primfunc_name_hint="max_pool2d")


def _nan_arg_max_min(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """relax.argmax / relax.argmin of floats with NaN skipped, as numpy's nanargmax
    (`kernels.minmax.arg_max_min`); other dtypes as TVM legalizes them."""
    x = call.args[0]
    if not _float(str(x.ty.dtype)):
        return _tvm_legalization(bb, call)
    axis = None if call.attrs.axis is None else int(call.attrs.axis)
    kind = "max" if call.op.name == "relax.argmax" else "min"
    return bb.call_te(arg_max_min, x, kind, axis, bool(call.attrs.keepdims), str(call.ty.dtype),
                      primfunc_name_hint=f"arg{kind}")


def _round_even(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """relax.round (ONNX Round, QuantizeLinear's rounding) of floats as `llvm.roundeven` on LLVM
    targets: round half to even, the values of TVM's `nearbyint` in the default rounding mode, but
    TVM's vectoriser widens an LLVM intrinsic call and not `tirx.nearbyint` (no TVectorizable):
    every requantize epilogue ran a scalar multiply, rounding, clamp and conversion per lane.
    `schedules.fast_math.vectorisable_rounding` rewrites what reaches the schedules still holding
    nearbyint (a TVMScript round trip, 0.14 s a kernel: done here it costs nothing). Other dtypes
    as TVM legalizes them (and every dtype under the knob VECTOR_ROUNDING:0, which the lowering
    runs inside)."""
    from tvm import te, tirx

    from ..schedules import knobs

    x = call.args[0]
    dtype = str(x.ty.dtype)
    if dtype not in ("float16", "float32", "float64") or not knobs.current().vector_rounding:
        return _tvm_legalization(bb, call)

    def f(t: te.Tensor) -> te.Tensor:
        return te.compute(t.shape, lambda *i: tirx.call_llvm_pure_intrin(dtype, "llvm.roundeven", t(*i)), name="round")

    return bb.call_te(f, x, primfunc_name_hint="round")


#: graphopt's legalizations in place of TVM's (IEEE-correct float results)
def reshape_groups(src: list[Any], dst: list[Any]) -> list[tuple[int, int, int, int]] | None:
    """Pair the dims of a reshape `src` -> `dst` into groups [(i0, i1, j0, j1)]: src[i0:i1] holds
    the same elements as dst[j0:j1], each group either one dim equal on both sides (structurally:
    a symbolic S stays S) or static dims whose products agree. None when no such pairing exists (a
    symbolic dim merged with another, [N, S] -> [N*S]); unit dims go with the group before them."""
    from tvm_ffi import structural_equal

    from ..tir_match import static_int

    groups: list[tuple[int, int, int, int]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and j < len(dst) and (structural_equal(src[i], dst[j])
                                             or static_int(src[i]) == static_int(dst[j]) is not None):
            groups.append((i, i + 1, j, j + 1))
            i, j = i + 1, j + 1
            continue
        rest = [static_int(d) for d in (src[i:] if j >= len(dst) else dst[j:] if i >= len(src) else [])]
        if rest and all(v == 1 for v in rest):  # trailing unit dims on one side only
            groups.append((i, len(src), j, len(dst)))
            break
        i1, j1, ps, pd = i, j, 1, 1
        while True:  # grow the side with the smaller product by one static dim
            if i1 < len(src) and (ps <= pd or j1 >= len(dst)):
                v = static_int(src[i1])
                if v is None:
                    return None
                ps, i1 = ps * v, i1 + 1
            elif j1 < len(dst):
                v = static_int(dst[j1])
                if v is None:
                    return None
                pd, j1 = pd * v, j1 + 1
            else:
                return None
            if ps == pd and i1 > i and j1 > j:
                break
        groups.append((i, i1, j, j1))
        i, j = i1, j1
    return groups


def _grouped_reshape(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """relax.reshape with a symbolic dim, indexed group by group (`reshape_groups`): the head split
    [N, S, 64] -> [N, S, 4, 16] reads x[n, s, h * 16 + d]. TVM's reshape flattens the whole index
    and unravels it again, x[(n * S + s) // S % N, (n * S + s) % S, ...]: a division by the
    symbolic S per element that the simplifier cannot remove (it does not know s < S), and the
    transposes of an encoder's attention ran 15-27x slower than with fixed shapes. Static shapes,
    and symbolic ones that no group pairing covers (a symbolic dim merged, [N, S] -> [N*S]), are
    TVM's."""
    from tvm import te

    from ..tir_match import static_int

    x = call.args[0]
    src = list(x.ty.shape.values) if getattr(x.ty, "shape", None) is not None else None
    dst = list(call.ty.shape.values) if getattr(call.ty, "shape", None) is not None else None
    if src is None or dst is None or all(static_int(d) is not None for d in src + dst):
        return _tvm_legalization(bb, call)
    groups = reshape_groups(src, dst)
    if groups is None:
        return _tvm_legalization(bb, call)

    def f(t: te.Tensor) -> te.Tensor:
        def index(*o: Any) -> Any:
            idx: list[Any] = []
            for i0, i1, j0, j1 in groups:
                if i1 - i0 == 1 and j1 - j0 == 1:
                    idx.append(o[j0])
                    continue
                flat: Any = 0
                for j in range(j0, j1):
                    flat = flat * int(static_int(dst[j]) or 0) + o[j]
                sizes = [int(static_int(src[i]) or 0) for i in range(i0, i1)]
                part = []
                for s in reversed(sizes):
                    part.append(flat % s if s != 1 else 0)
                    flat = flat // s
                idx.extend(reversed(part))
            return t(*[tvm.tirx.const(0, "int64") if isinstance(v, int) else v for v in idx])

        return te.compute([d for d in dst], index, name="T_reshape")

    return bb.call_te(f, x, primfunc_name_hint="reshape")


LEGALIZATIONS = {"relax.subtract": _float_subtract, "relax.max": _nan_max_min, "relax.min": _nan_max_min,
                 "relax.nn.max_pool2d": _nan_max_pool2d, "relax.argmax": _nan_arg_max_min,
                 "relax.argmin": _nan_arg_max_min, "relax.reshape": _grouped_reshape, "relax.round": _round_even}
#: ... on GPUs: dlight's cross-thread reductions know only TIR's own reducers (its rfactor finds
#: no "matched reducer" for the maxNum ones), so max/min/pools stay TVM's there
GPU_LEGALIZATIONS = {"relax.subtract": _float_subtract}


def legalize_and_fuse(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """LegalizeOps → AnnotateTIROpPattern → FuseTIR: one PrimFunc per primitive group function.
    A legalization that raises is raised after LegalizeOps, not through it (guarded_legalizations)."""
    failures: list[tuple[str, BaseException]] = []
    with target:
        mod = tvm.transform.Sequential([relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()])(mod)
        custom = LEGALIZATIONS if str(target.kind.name) == "llvm" else GPU_LEGALIZATIONS
        mod = relax.transform.LegalizeOps(guarded_legalizations(custom, failures))(mod)
        if failures:
            raise failures[0][1]
        if any(re.fullmatch(r"if_\d+_select", gv.name_hint) for gv in mod.get_global_vars()):
            # run-time If branches (dynamic.runtime_if): what they compute from their constant
            # weights alone (an LSTM's gate reorder, transposes) once here, not on every call
            mod = relax.transform.FoldConstant()(mod)
            mod = _fuse_branches(mod)
        seq = tvm.transform.Sequential(
            [
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
            ]
        )
        return seq(mod)


def _fuse_branches(mod: tvm.IRModule) -> tvm.IRModule:
    """The run-time If branch functions (`if_N_bK`) with their elementwise chains fused, as
    relax's FuseOps/FuseTIR do: their ops were lowered one call each, outside graphopt's kernel
    groups (31 calls in a VAD's branch: square, square, add, sqrt, add, log...). Done on a module
    of the branches and the PrimFuncs alone, so `main`'s kernels stay exactly as planned."""
    branches = [gv for gv in mod.get_global_vars() if re.fullmatch(r"if_\d+_b\d+", gv.name_hint)]
    if not branches:
        return mod
    # (public in the sub-module: FuseTIR drops functions no public one reaches)
    funcs = {gv: (mod[gv].with_attr("global_symbol", gv.name_hint) if gv in branches else mod[gv])
             for gv in mod.get_global_vars() if gv in branches or isinstance(mod[gv], tvm.tirx.PrimFunc)}
    sub = tvm.IRModule(funcs, attrs=mod.attrs)
    try:
        sub = tvm.transform.Sequential([relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(),
                                        relax.transform.FuseTIR()])(sub)
    except Exception:  # noqa: BLE001 - unfused branches still compute the right thing
        return mod
    taken = {gv.name_hint for gv in mod.get_global_vars()}
    out = mod.shallow_copy() if hasattr(mod, "shallow_copy") else tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    names = {gv.name_hint for gv in branches}
    for gv, f in sub.functions_items():
        if gv.name_hint in names:
            f = f.without_attr("global_symbol")
        elif gv.name_hint in taken and not any(g.same_as(gv) for g in mod.get_global_vars()):
            return mod  # (a fused kernel's name clashes with one of main's: keep the branches unfused)
        out[gv] = f
    return out


def guarded_legalizations(custom: dict[str, Any], failures: list[tuple[str, BaseException]]) -> dict[str, Any]:
    """LegalizeOps' map for every operator that has a legalization (`custom` first), each wrapped
    so that an exception does not unwind through LegalizeOps' C++ mutator: that leaves its
    BlockBuilder with open blocks, and TVM prints "BlockBuilder destroyed with remaining blocks!"
    on stderr when it is destroyed (an extra line after graphopt's own error, or on a compile that
    then succeeds by emitting the group inline). The wrapper records (op, exception) in
    `failures`, leaves the call as it is, and the caller raises the first failure after the pass."""

    def guard(name: str, f: Any) -> Any:
        def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
            if failures:  # (the pass is lost anyway: leave the rest alone)
                return call
            try:
                return f(bb, call)
            except Exception as e:  # noqa: BLE001 - raised by the caller, after the pass
                failures.append((name, e))
                return call

        return legalize

    registered = _registered_legalizations(len(tvm.ir.Op.list_op_names()))
    return {name: guard(name, custom.get(name) or f) for name, f in {**registered, **custom}.items()}


@functools.lru_cache(maxsize=4)
def _registered_legalizations(n_ops: int) -> dict[str, Any]:
    """{operator name: its FLegalize} of every registered operator (~0.1 s to read: cached, and
    read again when `n_ops`, the number of registered operators, grows)."""
    out = {}
    for name in tvm.ir.Op.list_op_names():
        f = tvm.ir.Op.get(name).get_attr("FLegalize")
        if f is not None:
            out[str(name)] = f
    return out

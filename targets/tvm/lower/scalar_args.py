"""Scalar constants out of the kernels' buffer parameters (`build.build`, on the scheduled module).

A kernel group's small constants reach its PrimFunc as arguments (FuseTIR rejects a constant
captured inside a primitive function, `lowerer._lift_constants`), so every quantization scale,
zero point and clip bound of a quantized model was a 0-d buffer parameter: the packed-API wrapper
of a kernel checks each buffer argument (type, device, rank, dtype, shape, strides, alignment),
and an int8 EfficientNet-B0 kernel with 17 of them had a wrapper as large as its compute function
(LLVM's time follows the IR: the int8 library was 2.5x the fp32 one's lines).

`scalar_constants_to_immediates` rewrites every kernel parameter that each `call_tir` of the
kernel binds to a one-element constant, whose only uses in the kernel are element loads:

- **an immediate** (the loads become the value; the parameter and the arguments go) when every
  call passes the same value and the value is one TVM's constant folding leaves alone: a float
  that is finite and not 0 or ±1, an integer that is not 0, any bool;
- **a by-value scalar** (a `T.float32` parameter; the calls pass `R.prim_value`) otherwise: calls
  with different values (a kernel shared by several same-shaped layers keeps being shared: an
  immediate per call would compile one copy per layer), and the values folding would change. TVM
  folds `x * 0 -> 0` and `x + 0 -> x` (wrong for NaN, Inf and -0.0), `x * 1 -> x` and `x / 1 -> x`
  (which lets LLVM contract the neighbouring ops into a different FMA), and refuses `x / 0` on
  integers at compile time; a scalar parameter is opaque to all of it. Non-finite floats too.

The arithmetic is unchanged: the kernel reads the same value and computes the same operations (no
folding can fire on the immediates kept), so outputs are bit-identical to the buffer form.

Does not fire on a kernel referenced other than as the callee of `call_tir` (its signature is
seen elsewhere), on a parameter used other than by element loads (a store, a pointer, a matched
sub-buffer, a tensor intrinsic's operand), on a constant of more than one element, or on dtypes
other than bool, (u)int8-64 and float16/32/64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"}


def _scalar_value(e: Any) -> tuple[str, Any] | None:
    """(dtype, python value) of a one-element relax constant of a supported dtype, else None."""
    if not isinstance(e, tvm.ir.GenericConst):
        return None
    ty = e.ty
    if not isinstance(ty, relax.TensorType) or str(ty.dtype) not in _DTYPES:
        return None
    arr = e.value.numpy()
    if arr.size != 1:
        return None
    v = arr.reshape(-1)[0]
    dtype = str(ty.dtype)
    if dtype == "bool":
        return dtype, bool(v)
    if dtype.startswith("float"):
        return dtype, float(v)
    return dtype, int(v)


def _immediate_safe(dtype: str, value: Any) -> bool:
    """Whether TVM's constant folding leaves an immediate `value` alone (see the module docstring)."""
    if dtype == "bool":
        return True
    if dtype.startswith("float"):
        return math.isfinite(value) and value not in (0.0, 1.0, -1.0)
    return value != 0


def _key(dtype: str, value: Any) -> tuple[str, Any]:
    """Equality of two values as bits (0.0 and -0.0 differ; floats compared in their own dtype)."""
    if dtype.startswith("float"):
        return dtype, np.asarray(value, dtype=dtype).tobytes()
    return dtype, value


def _imm(dtype: str, value: Any) -> Any:
    return tvm.tirx.const(value, dtype)


def _calls(mod: tvm.IRModule) -> tuple[dict[tvm.ir.GlobalVar, list[relax.Call]], dict[tvm.ir.GlobalVar, int]]:
    """{PrimFunc's GlobalVar: its call_tir calls} and {GlobalVar: references of any kind} in the
    module's Relax functions."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    calls: dict[tvm.ir.GlobalVar, list[relax.Call]] = {}
    refs: dict[tvm.ir.GlobalVar, int] = {}

    def visit(e: Any) -> None:
        if isinstance(e, tvm.ir.GlobalVar):
            refs[e] = refs.get(e, 0) + 1
        elif isinstance(e, relax.Call) and e.op.same_as(call_tir) and isinstance(e.args[0], tvm.ir.GlobalVar):
            calls.setdefault(e.args[0], []).append(e)

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return calls, refs


def _rewrite_func(func: tvm.tirx.PrimFunc, subst: dict[int, Any]) -> tuple[tvm.tirx.PrimFunc, set[int]]:
    """`func` with parameter i's loads replaced by `subst[i]` (an immediate, or a scalar Var that
    takes the parameter's place), its read regions dropped, immediates' parameters removed; and
    the parameters of `subst` that the body still refers to after that (a store, a write region,
    a matched sub-buffer, a pointer: the caller leaves those alone; the function is then invalid)."""
    params = list(func.params)
    targets = [(params[i], e) for i, e in subst.items()]

    def replacement(v: Any) -> Any:
        for p, e in targets:
            if v.same_as(p):
                return e
        return None

    def on_load(e: Any) -> Any:
        r = replacement(e.source)
        return e if r is None else r

    def on_block(b: Any) -> Any:
        reads = [r for r in b.reads if replacement(r.source) is None]
        if len(reads) == len(b.reads):
            return b
        return tvm.s_tir.stmt.SBlock(b.iter_vars, reads, b.writes, b.name_hint, b.body, b.init, b.alloc_buffers,
                                     b.match_buffers, b.annotations, b.span)

    body = tvm_ffi.structural_map(func.body, [(tvm.ir.expr.TensorLoad, on_load), (tvm.s_tir.stmt.SBlock, on_block)])
    free = tvm.tirx.analysis.undefined_vars(body)
    stuck = {i for i in subst if any(params[i].same_as(u) for u in free)}
    new_params = []
    for i, p in enumerate(params):
        e = subst.get(i)
        if e is None:
            new_params.append(p)
        elif isinstance(e, tvm.ir.Var):
            new_params.append(e)
    return tvm.tirx.PrimFunc(new_params, body, ret_type=func.ret_type, attrs=func.attrs, span=func.span), stuck


def scalar_constants_to_immediates(mod: tvm.IRModule) -> tvm.IRModule:
    """Kernel parameters bound to one-element constants at every call become immediates or
    by-value scalars (see the module docstring). `mod`: the scheduled module, its weight packing
    already lifted out (SplitLayoutRewritePreproc does not take a kernel with scalar parameters).
    Returns `mod` unchanged when nothing qualifies."""
    calls, refs = _calls(mod)
    plans: dict[tvm.ir.GlobalVar, dict[int, tuple[str, Any, bool]]] = {}  # gv -> {arg: (dtype, value, immediate)}
    rewritten: dict[tvm.ir.GlobalVar, tvm.tirx.PrimFunc] = {}
    for gv, sites in calls.items():
        func = mod[gv]
        if not isinstance(func, tvm.tirx.PrimFunc) or refs.get(gv, 0) != len(sites):
            continue
        fields = []
        for c in sites:
            args = c.args[1]
            if not isinstance(args, relax.Tuple):
                break
            fields.append(list(args.fields))
        if len(fields) != len(sites) or not fields or len({len(f) for f in fields}) != 1:
            continue
        n = len(fields[0])
        params = list(func.params)
        cand: dict[int, list[tuple[str, Any]]] = {}
        for i in range(min(n, len(params))):
            found = [_scalar_value(f[i]) for f in fields]
            vals = [v for v in found if v is not None]
            if len(vals) != len(found):
                continue
            p = params[i]
            shape = getattr(p, "shape", None)
            dtype = str(getattr(p, "dtype", ""))
            if shape is None or any(not isinstance(d, tvm.tirx.IntImm) or int(d) != 1 for d in shape):
                continue
            if any(v[0] != dtype for v in vals):
                continue
            cand[i] = vals
        plan: dict[int, tuple[str, Any, bool]] = {}
        for i, vals in cand.items():
            dtype, value = vals[0]
            same = len({_key(*v) for v in vals}) == 1
            plan[i] = (dtype, value, same and _immediate_safe(dtype, value))
        while plan:  # (again without the parameters the kernel uses other than by loads)
            subst = {i: (_imm(dtype, value) if imm else tvm.tirx.Var(str(params[i].name), dtype))
                     for i, (dtype, value, imm) in plan.items()}
            new, stuck = _rewrite_func(func, subst)
            if not stuck:
                plans[gv], rewritten[gv] = plan, new
                break
            plan = {i: step for i, step in plan.items() if i not in stuck}
    if not plans:
        return mod
    out = mod.clone()  # (a copy: `mod` stays as it was)
    for gv in plans:
        del out[gv]
    # new GlobalVars: a GlobalVar carries its function's signature, which the callers are checked against
    bb = relax.BlockBuilder(out)
    renamed = {gv: bb.add_func(f, gv.name_hint) for gv, f in rewritten.items()}
    out = bb.get()

    @relax.expr_functor.mutator
    class _Args(relax.PyExprMutator):
        def visit_call_(self, op: relax.Call) -> relax.Expr:  # noqa: N802
            op = super().visit_call_(op)
            gv = op.args[0] if op.args else None
            plan = plans.get(gv) if isinstance(gv, tvm.ir.GlobalVar) else None
            if plan is None or not isinstance(op.args[1], relax.Tuple):
                return op
            fields = []
            for i, a in enumerate(op.args[1].fields):
                step = plan.get(i)
                if step is None:
                    fields.append(a)
                elif not step[2]:  # by value: this call's own value
                    dtype, value = _scalar_value(a)  # type: ignore[misc]
                    fields.append(relax.prim_value(_imm(dtype, value)))
            return relax.Call(op.op, [renamed[gv], relax.Tuple(fields), *op.args[2:]], op.attrs, op.ty_args, op.span)

    for gv, f in list(out.functions_items()):
        if isinstance(f, relax.Function):
            out[gv] = _Args().visit_expr(f)
    return out

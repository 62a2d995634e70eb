"""int8 dot-product schedules for the arm64 target (NEON dotprod / i8mm).

    mod = schedule_int8_kernels(mod, target)   # before the default CPU schedules

An int8/uint8 matmul kernel C[m, n] = Σ_k int32(A[m, k]) · int32(B[k, n]) (MatMulInteger with
zero zero-points, batched A allowed, B 2-D in either orientation, epilogues inlined) is tiled so
that each step is one 4×4 dot-product instruction: C[m, n:n+4] += A[m, k:k+4] · Bp[n/4, k/4, :, :],
B being packed inside the kernel to [N/4, K/4, 4, 4]. The instruction follows the operand signs:

    int8 × int8    sdot   (+dotprod)
    uint8 × uint8  udot   (+dotprod)
    uint8 × int8   usdot  (+i8mm; either operand order)

The rule does not fire (the default schedules take the kernel) when the target lacks the
feature, N or K is not a multiple of 4, the reduction is not a plain product of two casts (a
non-zero zero point subtracts inside it), or the kernel has more than one reduction.
"""

from __future__ import annotations

from typing import Any

from graphopt.targets.tvm.tir_match import int8_dot_desc, int8_matmul_operands
from graphopt.targets.tvm.tir_match import static_int as _static

_REGISTERED: set[str] = set()

#: (A dtype, B dtype) → (intrinsic name, LLVM intrinsic, swap operands, feature)
_DOTS = {
    ("int8", "int8"): ("graphopt_arm64_sdot_4x4", "sdot.v4i32.v16i8", False, "dotprod"),
    ("uint8", "uint8"): ("graphopt_arm64_udot_4x4", "udot.v4i32.v16i8", False, "dotprod"),
    ("uint8", "int8"): ("graphopt_arm64_usdot_4x4", "usdot.v4i32.v16i8", False, "i8mm"),
    ("int8", "uint8"): ("graphopt_arm64_sudot_4x4", "usdot.v4i32.v16i8", True, "i8mm"),
}


def _register(a_dt: str, b_dt: str) -> str:
    """Register the 4×4 dot-product tensor intrinsic for these operand dtypes (once)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name, instr, swap, _ = _DOTS[(a_dt, b_dt)]
    if name in _REGISTERED:
        return name

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), a_dt, offset_factor=1)
        B = T.match_buffer(b, (4, 4), b_dt, offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            # A's four bytes broadcast to every lane group; each group i dots with row i of B
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(f"llvm.aarch64.neon.{instr}"),
                C.vload([0], "int32x4"),
                T.reinterpret(B.vload([0, 0], f"{b_dt}x16"), dtype="int8x16") if swap else
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], f"{a_dt}x4"), dtype="int32"), 4), dtype="int8x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], f"{a_dt}x4"), dtype="int32"), 4), dtype="int8x16") if swap else
                T.reinterpret(B.vload([0, 0], f"{b_dt}x16"), dtype="int8x16"),
                dtype="int32x4",
            )

    TensorIntrin.register(name, int8_dot_desc(a_dt, b_dt, 4, 4, scope="global"), impl, override=True)
    _REGISTERED.add(name)
    return name


def _has(target: Any, feature: str) -> bool:
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features(feature, target))
    except Exception:  # not an AArch64 target
        return False


def schedule_int8_dot(func: Any, target: Any) -> Any | None:  # noqa: C901 - one schedule, step by step
    """The scheduled PrimFunc, or None when the rule does not apply (see module docstring)."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    reductions = [b for b in blocks if any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(b).iter_vars)]
    if len(reductions) != 1:
        return None
    mm = reductions[0]
    for b in blocks:  # producers (casts, pads) into the reduction, epilogues into its write-back
        if b.same_as(mm):
            continue
        try:
            sch.compute_inline(b)
        except Exception:
            try:
                sch.reverse_compute_inline(b)
            except Exception:
                return None
    stmt = sch.get(mm)
    ops = int8_matmul_operands(stmt)
    if ops is None:
        return None
    k, a_buf, b_buf, n_var, b_k_first = ops
    key = (str(a_buf.dtype), str(b_buf.dtype))
    if key not in _DOTS or not _has(target, _DOTS[key][3]):
        return None
    ivs = {iv.var: iv for iv in stmt.iter_vars}
    n_ext, k_ext = _static(ivs[n_var].dom.extent), _static(ivs[k].dom.extent)
    if n_ext is None or k_ext is None or n_ext % 4 or k_ext % 4:
        return None
    intrin = _register(*key)

    # pack B to [N/4, K/4, 4(n), 4(k)] inside the kernel
    b_index = next(i for i, r in enumerate(stmt.reads) if r.source.same_as(b_buf))
    sch.cache_read(mm, b_index, "global")
    if b_k_first:
        sch.transform_layout(mm, ("read", b_index), lambda kk, nn: (nn // 4, kk // 4, nn % 4, kk % 4))
    else:
        sch.transform_layout(mm, ("read", b_index), lambda nn, kk: (nn // 4, kk // 4, nn % 4, kk % 4))

    loops = sch.get_loops(mm)
    # LegalizeOps binds each block var to its own loop, in order (T.axis.remap); check the extents
    if len(loops) != len(stmt.iter_vars):
        return None
    by_var = {}
    for lp, iv in zip(loops, stmt.iter_vars):
        if _static(sch.get(lp).extent) != _static(iv.dom.extent):
            return None
        by_var[iv.var] = lp
    n_loop, k_loop = by_var[n_var], by_var[k]
    others = [lp for lp in loops if not (lp.same_as(n_loop) or lp.same_as(k_loop))]
    sch.reorder(*others, n_loop, k_loop)
    # the row loop is the innermost other (batch loops stay outside; fusing them with it would
    # give the tensorized block div/mod bindings it cannot be blockized with)
    m_loop = others[-1] if others else None
    batch = others[:-1]
    m_ext = _static(sch.get(m_loop).extent) if m_loop is not None else None
    n_o, n_i = sch.split(n_loop, [None, 4])
    k_o, k_i = sch.split(k_loop, [None, 4])
    n_blocks = n_ext // 4
    n_oo, n_oi = sch.split(n_o, [None, 4 if n_blocks % 4 == 0 else (2 if n_blocks % 2 == 0 else 1)])
    if m_loop is not None and m_ext is not None and m_ext % 4 == 0:
        m_o, m_i = sch.split(m_loop, [None, 4])
        sch.reorder(*batch, m_o, n_oo, k_o, m_i, n_oi, n_i, k_i)
        inner, outer = [m_i, n_oi], [*batch, m_o, n_oo]
    elif m_loop is not None:
        sch.reorder(*batch, m_loop, n_oo, k_o, n_oi, n_i, k_i)
        inner, outer = [n_oi], [*batch, m_loop, n_oo]
    else:
        sch.reorder(n_oo, k_o, n_oi, n_i, k_i)
        inner, outer = [n_oi], [n_oo]
    sch.decompose_reduction(mm, k_o)
    sch.tensorize(n_i, intrin)
    for lp in inner:
        sch.unroll(lp)
    cores = _static(target.attrs.get("num-cores", 1)) if hasattr(target, "attrs") else 1
    if cores and cores > 1:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _has_root(sch: Any) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


def schedule_int8_kernels(mod: Any, target: Any) -> tuple[Any, dict[str, str]]:
    """Apply `schedule_int8_dot` to every unscheduled PrimFunc it fits. Returns the module and
    {function: intrinsic} for the ones it scheduled."""
    import tvm
    from tvm import tirx

    if not (_has(target, "dotprod") or _has(target, "i8mm")):
        return mod, {}
    done: dict[str, str] = {}
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and int(func.attrs.get("tirx.is_scheduled", 0)) == 1):
            continue
        try:
            new = schedule_int8_dot(func, target)
        except Exception:  # a surprising kernel: the default schedules take it
            new = None
        if new is not None:
            updates[gv] = new
            done[gv.name_hint] = "int8-dot"
    if updates:
        mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in updates.items():
            mod[gv] = func
    return mod, done

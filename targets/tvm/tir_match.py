"""Recognising TIR blocks for the targets' hand-written schedules (shared by the x86 and arm64
int8 kernels)."""

from __future__ import annotations

from typing import Any


def static_int(x: Any) -> int | None:
    """`x` as a Python int, or None when it is symbolic."""
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def free_vars(expr: Any) -> set[Any]:
    import tvm_ffi
    from tvm import tirx

    found: set[Any] = set()
    tvm_ffi.structural_walk(expr, (tirx.Var, found.add), order="post")
    return found


def int8_matmul_operands(stmt: Any) -> tuple[Any, Any, Any, Any, bool] | None:
    """For the block C[.., m, n] += f(A[.., m, k]) · g(B[k, n] or B[n, k]) with one reduction var k
    and an int32 C: (k, A's buffer, B's buffer, n, whether B is indexed [k, n]). A is indexed by k
    in its last axis; B is 2-D, indexed by k and one spatial var n that A does not use. None when
    the block is not of that shape (the operand dtypes and the body are the caller's to check)."""
    from tvm import tirx

    red = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    if len(red) != 1 or len(stmt.writes) != 1:
        return None
    out = stmt.writes[0].source
    if str(out.dtype) != "int32":
        return None
    reads = [r for r in stmt.reads if not r.source.same_as(out)]
    if len(reads) != 2 or any(static_int(rg.extent) != 1 for r in reads for rg in r.region):
        return None
    k = red[0].var
    cand = []
    for ra, rb in ((reads[0], reads[1]), (reads[1], reads[0])):
        a_idx = [rg.min for rg in ra.region]
        b_idx = [rg.min for rg in rb.region]
        if len(b_idx) != 2 or not (isinstance(a_idx[-1], tirx.Var) and a_idx[-1].same_as(k)):
            continue
        if not all(isinstance(i, tirx.Var) for i in b_idx) or not any(i.same_as(k) for i in b_idx):
            continue
        n = next((i for i in b_idx if not i.same_as(k)), None)
        if n is None or any(n in free_vars(i) for i in a_idx):
            continue
        cand.append((ra.source, rb.source, n, b_idx[0].same_as(k)))
    if len(cand) != 1:
        return None
    a_buf, b_buf, n_var, b_k_first = cand[0]
    return k, a_buf, b_buf, n_var, b_k_first


def _is_mac(store: Any) -> bool:
    """`out[..] = out[..] + x[..] * y[..]` (casts allowed): a multiply-accumulate, not a sum of
    squares of differences (layer norm's variance)."""
    from tvm import tirx

    def load(e: Any) -> bool:
        while isinstance(e, tirx.Cast):
            e = e.value
        return type(e).__name__ in ("BufferLoad", "TensorLoad")

    v = getattr(store, "value", None)
    if not isinstance(v, tirx.Add):
        return False
    mul = v.b if load(v.a) else v.a
    return isinstance(mul, tirx.Mul) and load(mul.a) and load(mul.b)


def kernel_flops(func: Any, symbolic_as: float | None = None) -> float:
    """2 x the iteration count of each multiply-accumulate block (a reduction reading two tensors:
    conv, dense, matmul) of an unscheduled PrimFunc; 0 for kernels without one (softmax, layer
    norm, copies). A block with a symbolic extent counts 0, or with that extent taken as
    `symbolic_as` (1: per batch item, for shares of a model's work)."""
    from tvm import s_tir
    from tvm.tirx import IterVar

    sch = s_tir.Schedule(func)
    flops = 0.0

    def walk(parent: Any) -> None:
        nonlocal flops
        for block in sch.get_child_blocks(parent):
            stmt = sch.get(block)
            if any(iv.iter_type == IterVar.CommReduce for iv in stmt.iter_vars) and len(stmt.writes) == 1:
                out = stmt.writes[0].source
                exts = [static_int(iv.dom.extent) for iv in stmt.iter_vars]
                if symbolic_as is not None:
                    exts = [symbolic_as if e is None else e for e in exts]
                if (len({r.source.name for r in stmt.reads if not r.source.same_as(out)}) >= 2
                        and _is_mac(stmt.body) and all(e is not None for e in exts)):
                    n = 1.0
                    for e in exts:
                        n *= float(e)
                    flops += 2.0 * n
            walk(block)

    walk(sch.get_sblock(func.body.block.name_hint))
    return flops


def mac_flops_terms(func: Any) -> list[Any]:
    """`kernel_flops` with symbolic extents kept: one TIR expression (2 x the iteration count) per
    multiply-accumulate block of an unscheduled PrimFunc."""
    from tvm import s_tir
    from tvm.tirx import IterVar

    sch = s_tir.Schedule(func)
    terms: list[Any] = []

    def walk(parent: Any) -> None:
        for block in sch.get_child_blocks(parent):
            stmt = sch.get(block)
            if any(iv.iter_type == IterVar.CommReduce for iv in stmt.iter_vars) and len(stmt.writes) == 1:
                out = stmt.writes[0].source
                if len({r.source.name for r in stmt.reads if not r.source.same_as(out)}) >= 2 and _is_mac(stmt.body):
                    n: Any = 2
                    for iv in stmt.iter_vars:
                        n = n * iv.dom.extent
                    terms.append(n)
            walk(block)

    walk(sch.get_sblock(func.body.block.name_hint))
    return terms


def int8_dot_desc(a_dt: str, b_dt: str, lanes: int, k: int, scope: str = "local") -> Any:
    """The computation the int8 micro-kernels tensorize (x86: vpdpbusd, vpmaddubsw, vpmaddwd;
    arm64: sdot/udot/usdot): C[i] += Σ_j A[j] · B[i, j] for `lanes` int32 accumulators in `scope`
    and a step of `k` 8-bit values: the description a TensorIntrin registers."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (k,), a_dt, offset_factor=1)
        B = T.match_buffer(b, (lanes, k), b_dt, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope=scope)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:k], B[0:lanes, 0:k])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for j in T.serial(0, k):
                    with T.sblock("update"):
                        vi, vj = T.axis.remap("SR", [i, j])
                        C[vi] = C[vi] + T.cast(A[vj], "int32") * T.cast(B[vi, vj], "int32")

    return desc

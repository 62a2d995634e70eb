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

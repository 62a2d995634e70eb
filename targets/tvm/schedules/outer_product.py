"""`OuterProduct` (conv2d NCHW incl. 1x1/strided/grouped-as-dense, dense, matmul, batch_matmul,
with fused elementwise epilogues): the anchor reduction C[..] += A[..] * B[..] becomes a
register-tiled outer product. The vector axis is a spatial axis that only B indexes (the output
channel of a conv, the column of a matmul); the register axis one that only A indexes (the output
column of a conv, the row of a matmul). B is packed inside the kernel so the vector axis is
contiguous ([oc/16, ic, kh, kw, 16]); the pack block is annotated as a layout-rewrite preprocess
(`LAYOUT_REWRITE_ANN`) so `relax.transform.SplitLayoutRewritePreproc` + `LiftTransformParams` can
hoist it to load time where weights are parameters. Accumulators live in a small local tile
(cache_write) and the epilogue (bias, relu, residual add, GELU, ...) is inlined into the
write-back of that tile.

Matmul-like kernels (the output's last axis is the vector axis) widen the vector tile when the
row count leaves accumulators unused (M = 128: 4 rows x 3 vectors) and block the reduction by
128 so a [128, vt] block of the B panel stays in L1 while every row tile uses it. Elementwise
blocks after the anchor are first inlined into one another (GELU reads the matmul twice), so the
whole epilogue goes into the write-back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..tir_match import static_int
from . import knobs
from .loop_marks import PEEL_BOUND, PEEL_LAST
from .base import (
    LAYOUT_REWRITE_ANN,
    ScheduleRule,
    branch_kernels,
    divisors_of,
    fold_prologue,
    fuse_parallel,
    inline_consumers,
    inline_copies,
    is_reduction,
    one_reduction,
    region_vars,
    schedule_rest,
)

__all__ = ["OuterProduct"]

#: a row count every row tile divides (2^4 * 3^2 * 5 * 7): the tile a long static axis gets
_MANY_ROWS = 5040
#: rows of a register tile over a symbolic length at most (shifted tiles, `_shift_plan`): the
#: shifted last tile recomputes up to this many rows less one, and a length under it runs the
#: predicated tile (16 tokens: two whole 8-row tiles, where 12-row ones overlap by 8)
_SYMBOLIC_ROW_TILE = 8


def _vectorize_tile(sch, loop, vt: int, lanes: int) -> None:
    """Vectorise a vector-tile loop of `vt` elements: up to two vectors as one (LLVM splits a
    16-wide float vector into two registers well), wider as unrolled vectors of `lanes` (a
    24-wide float vector ran 8x slower: LLVM widens the odd width instead of splitting it)."""
    if vt > 2 * lanes and vt % lanes == 0:
        outer, inner = sch.split(loop, factors=[None, lanes])
        sch.unroll(outer)
        sch.vectorize(inner)
    else:
        sch.vectorize(loop)


def _inline_around(sch, anchor, m: "_Operands") -> int:
    """Fold the prologue, inline copies and the epilogue around the anchor (each as its knob says)
    and return the index of B's read in the anchor's reads after that, -1 if B is no longer read
    as it was (inlining may change the anchor's reads: a producer's add inlined into an operand)."""
    if knobs.current().fold_prologue:
        fold_prologue(sch, anchor)
    inline_copies(sch, anchor)
    if knobs.current().inline_epilogue:
        _inline_epilogue(sch, anchor)
    reads_now = list(sch.get(anchor).reads)
    return next((i for i, r in enumerate(reads_now) if r.source.same_as(m.rb.source)), -1)


def _inline_epilogue(sch, anchor) -> None:
    """compute_inline the elementwise blocks downstream of the anchor into one another, so that
    the epilogue is a single block reading the anchor's output (x * (erf(x / c) + 1) * 0.5 reads
    x twice through two chains): with two consumers the write-back cannot take the epilogue and
    BERT's GELU ran as five extra parallel passes over a 128x3072 output (2 ms of a 9 ms kernel).
    The blocks writing a kernel output stay (they are what gets inlined into the write-back)."""
    changed = True
    while changed:
        changed = False
        frontier = list(sch.get_consumers(anchor))
        seen: set[str] = set()
        while frontier:
            block = frontier.pop()
            stmt = sch.get(block)
            if stmt.name_hint in seen or is_reduction(stmt):
                continue
            seen.add(stmt.name_hint)
            consumers = list(sch.get_consumers(block))
            if consumers:
                try:
                    sch.compute_inline(block)
                    changed = True
                    break
                except Exception:
                    pass
            frontier.extend(consumers)


@dataclass
class _Operands:
    """The anchor reduction C[..] += A[..] * B[..] as the schedule sees it: B (`rb`, dims `db`) is
    the vector side, indexed by the vector axis `vec_var`; A by the register axis `reg_var`."""

    stmt: Any
    ivs: list[Any]
    s_vars: list[Any]
    r_vars: list[Any]
    ext: dict[Any, int | None]  # block var -> static extent (None: symbolic)
    loop_of: dict[Any, Any]  # block var -> its loop
    out_order: list[Any]  # the output's block vars, outermost first
    rb: Any  # B's read region
    db: list[set[Any]]  # block vars of each of B's dims
    vec_var: Any
    reg_var: Any


def _match_operands(sch: Any, anchor: Any) -> _Operands | None:
    """The two operands of the anchor and its vector / register axes (None: not an outer product:
    not one write and two reads, loops that are not one per block iter, no reduction, an output
    dim indexed by two vars, or no axis exclusive to each operand)."""
    import tvm_ffi
    from tvm.tirx import IterVar

    stmt = sch.get(anchor)
    if len(stmt.writes) != 1:
        return None
    out_buf = stmt.writes[0].source
    ins = [(i, r) for i, r in enumerate(stmt.reads) if not r.source.same_as(out_buf)]
    if len(ins) != 2:
        return None
    ivs = list(stmt.iter_vars)
    loops = sch.get_loops(anchor)
    if len(loops) != len(ivs):
        return None
    for lp, iv in zip(loops, ivs):  # one loop per block iter (symbolic batch allowed)
        if not tvm_ffi.structural_equal(sch.get(lp).extent, iv.dom.extent):
            return None
    block_vars = {iv.var for iv in ivs}
    s_vars = [iv.var for iv in ivs if iv.iter_type == IterVar.DataPar]
    r_vars = [iv.var for iv in ivs if iv.iter_type == IterVar.CommReduce]
    if not r_vars:
        return None
    ext = {iv.var: static_int(iv.dom.extent) for iv in ivs}
    loop_of = {iv.var: lp for iv, lp in zip(ivs, loops)}
    out_dims = region_vars(stmt.writes[0], block_vars)
    if any(len(d) > 1 for d in out_dims):
        return None
    out_order = [next(iter(d)) for d in out_dims if d]

    (ia, ra), (ib, rb) = ins
    da, db = region_vars(ra, block_vars), region_vars(rb, block_vars)
    va = set().union(*da) & set(s_vars)
    vb = set().union(*db) & set(s_vars)
    ex_a, ex_b = va - vb, vb - va
    if not ex_a or not ex_b:
        return None

    def innermost(vs: set) -> Any:
        return max(vs, key=lambda v: out_order.index(v) if v in out_order else -1)

    # the vector side: fewer exclusive axes (weights); tie -> holds the innermost out axis
    if len(ex_a) < len(ex_b) or (
        len(ex_a) == len(ex_b) and out_order.index(innermost(ex_a)) > out_order.index(innermost(ex_b))
    ):
        (ia, ra, da, ex_a), (ib, rb, db, ex_b) = (ib, rb, db, ex_b), (ia, ra, da, ex_a)
    return _Operands(stmt, ivs, s_vars, r_vars, ext, loop_of, out_order, rb, db, vec_var=innermost(ex_b), reg_var=innermost(ex_a))


def _one_symbolic_row_axis(m: _Operands) -> bool:
    """Whether the register axis is the only symbolic spatial axis that A alone indexes, in a
    matmul-like kernel (the vector axis is the output's last; convs keep their own tiles). The
    padding to the row tile pays off where that axis is long (a sequence: attention values
    [h, S, S] x [h, S, d]) and costs the tile's factor where it is 1 at run time; with two such axes
    ([T, N, K] x [K, C] after a time-major LSTM, N the batch) which one is long is unknown."""
    if not (m.out_order and m.out_order[-1].same_as(m.vec_var)):
        return False
    a_only = [v for v in m.s_vars if m.ext[v] is None and not any(v in d for d in m.db)]
    return len(a_only) == 1 and a_only[0].same_as(m.reg_var)


def _bare_symbolic_rows(m: _Operands) -> bool:
    """Whether a symbolic register axis can take one-row tiles: always for matmul-like kernels
    (the vector axis is the output's last), else only when its extent is a bare variable. A
    conv's output width of `L - 2` or `L // 128 - 1` (no padding, or a stride) fused with the
    channel panels into one parallel loop gave the accumulator tile a shape TVM 0.27 could not
    bound (`Select(...)` extents): the kernel wrote past its buffers (wrong outputs, heap
    corruption) on a Conv1d 64->64 k3 and a strided Conv1d k256/s128 of symbolic length."""
    import tvm

    if m.out_order and m.out_order[-1].same_as(m.vec_var):
        return True
    extent = next(iv.dom.extent for iv in m.ivs if iv.var.same_as(m.reg_var))
    return isinstance(extent, tvm.tirx.Var)


@dataclass
class _ShiftPlan:
    """Shifted tiles over a symbolic row axis (and column axis) of a matmul-like kernel (see
    `OuterProduct._schedule_shifted`): the tile, the extents the marks bound the tile loops by,
    and whether the column axis is symbolic."""

    vt: int
    rt: int
    n_vec: int  # the vector axis' extent as the tile helpers see it (vt where it is symbolic)
    row_bound: Any  # the register axis' extent (a tirx.Var)
    col_bound: Any  # the vector axis' extent where symbolic (a tirx.Var), else None
    rows_alone: bool  # the register axis is the only symbolic axis that A alone indexes


def _shift_plan(m: _Operands, lanes: int, machine: Any) -> _ShiftPlan | None:
    """The shifted-tile plan of a matmul-like kernel (the output's last axis is the vector axis),
    or None where it does not apply: the register axis' extent must be a bare symbolic variable
    (a sequence length S); the vector axis static (a multiple of the lanes) or a bare symbolic
    variable that B indexes alone in its last dim (read in place, one vector wide: the attention
    scores [h, S, d] x [h, d, S]); the other output axes one loop each, the symbolic ones (a batch
    N) outside the static ones. Not for convs (their own tiles) or static rows."""
    from tvm import tirx

    if not (m.out_order and m.out_order[-1].same_as(m.vec_var)) or len(m.out_order) != len(m.s_vars):
        return None
    extent = {iv.var: iv.dom.extent for iv in m.ivs}
    row_bound = extent[m.reg_var]
    if m.ext[m.reg_var] is not None or not isinstance(row_bound, tirx.Var):
        return None
    others = [v for v in m.out_order if not v.same_as(m.reg_var) and not v.same_as(m.vec_var)]
    seen_static = False
    for v in others:
        if m.ext[v] is not None:
            seen_static = True
        elif seen_static:
            return None  # (a symbolic axis inside static ones: the parallel loop would divide by it)
    col_bound = None
    n_vec = m.ext[m.vec_var]
    if n_vec is None:
        col_bound = extent[m.vec_var]
        b_dim = next((k for k, d in enumerate(m.db) if m.vec_var in d), None)
        if (not isinstance(col_bound, tirx.Var) or b_dim != len(m.db) - 1 or len(m.db[b_dim]) != 1
                or not m.rb.region[b_dim].min.same_as(m.vec_var)):
            return None
        n_vec = lanes
    elif n_vec % lanes:
        return None
    tile = _register_tile(m, n_vec, _MANY_ROWS, lanes, machine, False)
    if tile is None:
        return None
    vt, rt = tile
    if col_bound is not None:
        vt, n_vec = lanes, lanes
    a_only = [v for v in m.s_vars if m.ext[v] is None and not any(v in d for d in m.db)]
    return _ShiftPlan(vt=vt, rt=max(1, min(rt, _SYMBOLIC_ROW_TILE)), n_vec=n_vec, row_bound=row_bound,
                      col_bound=col_bound, rows_alone=len(a_only) == 1)


def _is_shifted(sch: Any) -> bool:
    """Whether a schedule has tile loops marked for shifting (`OuterProduct._schedule_shifted`)."""
    from .base import root_block

    for block in sch.get_child_blocks(root_block(sch)):
        for lp in sch.get_loops(block):
            if PEEL_BOUND in sch.get(lp).annotations:
                return True
    return False


def _register_tile(m: _Operands, n_vec: int, n_reg: int, lanes: int, machine: Any, sym_rows: bool) -> tuple[int, int] | None:
    """(vt, rt): the vector tile (elements of the vector axis) and the register tile (rows) of the
    micro-kernel, as many accumulators as the machine has (None: no vector tile fits)."""
    max_acc, max_acc_wide = machine.accumulators, machine.accumulators_wide
    # vector tile: 2 or 1 vectors; register tile: as many rows as accumulators allow
    if n_vec % (2 * lanes) == 0 and (n_reg or 0) >= 4:
        vt = 2 * lanes
    elif n_vec % lanes == 0:
        vt = lanes
    elif n_vec <= 2 * lanes:
        vt = n_vec
    elif lanes >= 16 and n_vec % (lanes // 2) == 0:
        # 16 lanes and a column count that is a multiple of 8 only (a 1000-class classifier):
        # half vectors, rather than no schedule here (dlight's GPU-style GEMV ran ResNet-50's
        # classifier at 0.3 GFLOP/s, 12 ms)
        vt = lanes // 2
    else:
        return None
    max_rows = max(1, (max_acc * lanes) // max(vt, lanes))
    divs = [d for d in divisors_of(n_reg) if d <= max_rows] if not sym_rows else [1]
    rt = max(divs)
    if rt < 4 and not sym_rows:
        # 7x7 / 14x14 outputs: a whole 7-row tile (14 accumulators, B read as a memory
        # operand of the FMA) beats a predicated 6-row tail tile
        # (only when that tile covers the whole axis: 14 wide as 2x7 measured slower than 6+6+2)
        if n_reg <= (max_acc_wide * lanes) // max(vt, lanes):
            rt = n_reg
    if sym_rows:
        pass
    elif rt < 3 and n_reg > max_rows:
        rt = max_rows  # a tail tile (predicated) beats a 1-2 row microkernel
    elif rt < 3 and vt == 2 * lanes:
        vt = lanes
        max_rows = max_acc
        rt = max(d for d in divisors_of(n_reg) if d <= max_rows)
        if rt < 3 and n_reg > max_rows:
            rt = max_rows
    if (knobs.current().matmul_wide_vt and m.out_order and m.out_order[-1].same_as(m.vec_var) and (vt == 2 * lanes or sym_rows)
            and n_reg % rt == 0 and rt * 2 < max_acc):
        # matmul-like (the output's last axis is the vector axis), whole row tiles leaving
        # accumulators unused (M = 128: 4 rows, no 6 divides it; 4 x 2 vectors is 8 of 12):
        # a wider vector tile fills them. Not with a tail tile (ViT's 197 rows: 6 + tail)
        for nv in range(max_acc // rt, 2, -1):
            if n_vec % (nv * lanes) == 0:
                vt = nv * lanes
                break
    return vt, rt


def _tile_loops(sch: Any, anchor: Any, m: _Operands, vt: int, rt: int) -> tuple[Any, list[Any], Any, Any]:
    """Split and order the anchor's loops: (the fused parallel loop, the reduction loops, the
    register-tile loop, the vector-tile loop)."""
    # outer order: output order with the register axis last (conv: n, oc/16, oh, ow/rt;
    # matmul: n/16, m/rt), so a packed B panel is reused across the register tiles
    s_vars, r_vars, loop_of, vec_var, reg_var, out_order = m.s_vars, m.r_vars, m.loop_of, m.vec_var, m.reg_var, m.out_order
    s_order = [v for v in out_order if v in s_vars and v != reg_var] + [reg_var]
    s_order += [v for v in s_vars if v not in s_order]
    sch.reorder(*[loop_of[v] for v in s_order], *[loop_of[v] for v in r_vars])
    v_o, v_i = sch.split(loop_of[vec_var], factors=[None, vt])
    r_o, r_i = sch.split(loop_of[reg_var], factors=[None, rt])
    red_loops = [loop_of[v] for v in r_vars]
    par = [v_o if v.same_as(vec_var) else r_o if v.same_as(reg_var) else loop_of[v] for v in s_order]
    sch.reorder(*par, *red_loops, r_i, v_i)
    k_ext = static_int(sch.get(red_loops[0]).extent) if len(red_loops) == 1 else None
    if (knobs.current().matmul_k_block and out_order and out_order[-1].same_as(vec_var) and par[-1].same_as(r_o)
            and k_ext is not None and k_ext > knobs.current().matmul_k_block and k_ext % knobs.current().matmul_k_block == 0
            and len(par) > 1):
        # K blocking: a [kc, vt] block of the B panel stays in L1 while every row tile of the
        # column panel uses it; the accumulators of the whole panel ([M, vt]) live in a
        # local buffer between the K blocks
        k_o, k_i = sch.split(red_loops[0], factors=[None, knobs.current().matmul_k_block])
        sch.reorder(*par[:-1], k_o, r_o, k_i, r_i, v_i)
        red_loops = [k_o, k_i]
        fused = fuse_parallel(sch, par[:-1])
    else:
        fused = fuse_parallel(sch, par)
    return fused, red_loops, r_i, v_i


def _accumulate_in_registers(sch: Any, anchor: Any, m: _Operands, fused: Any, red_loops: list[Any], r_i: Any, v_i: Any,
                             vt: int, n_vec: int, lanes: int) -> tuple[Any, Any]:
    """The accumulator tile in registers, the epilogue inlined into its write-back, the tile
    loops vectorised/unrolled and the reduction's init split off: (write-back block, init block)."""
    # accumulator tile in registers, laid out [.., reg, vec] so the vector axis is contiguous
    wb = sch.cache_write(anchor, 0, "local")
    p_vec = m.out_order.index(m.vec_var)
    sch.transform_layout(
        anchor, ("write", 0), lambda *d: (*d[:p_vec], *d[p_vec + 1 :], d[p_vec])
    )
    inline_consumers(sch, wb)
    sch.reverse_compute_at(wb, fused, preserve_unit_loops=True)
    inline_consumers(sch, wb)  # a crop of rounded-up rows only now (see inline_consumers)

    # vectorise/unroll before decompose_reduction: afterwards the update block is no
    # longer a "reduction block" and vectorize refuses its loops
    if n_vec % vt == 0:
        _vectorize_tile(sch, v_i, vt, lanes)
    sch.unroll(r_i)
    # small innermost reduction loops (kw) unroll well
    inner_red = red_loops[-1]
    if len(red_loops) > 1 and len(m.r_vars) > 1 and (static_int(sch.get(inner_red).extent) or 99) <= 7:
        sch.unroll(inner_red)
    init = sch.decompose_reduction(anchor, red_loops[0])
    il = sch.get_loops(init)
    if n_vec % vt == 0:
        _vectorize_tile(sch, il[-1], vt, lanes)
    return wb, init


def _unroll_write_back(sch: Any, wb: Any, fused: Any, m: _Operands, vt: int, n_vec: int, lanes: int) -> None:
    """Write-back (+ epilogue): unroll the tile; vectorise when the output's last axis is the
    vector axis and the tile is a whole number of vectors."""
    wl = sch.get_loops(wb)
    wl_inner = [lp for lp in wl if not lp.same_as(fused)][-2:]
    vec_last = False
    if wl_inner and m.out_order and m.out_order[-1].same_as(m.vec_var) and n_vec % vt == 0:
        # matmul-like: the output's last axis is the vector axis, contiguous in both the
        # accumulator and the output: the epilogue (bias, GELU, ...) runs vectorised
        if static_int(sch.get(wl_inner[-1]).extent) == vt:
            try:
                _vectorize_tile(sch, wl_inner[-1], vt, lanes)
                vec_last = True
            except Exception:
                pass
    for lp in wl_inner[:-1] if vec_last else wl_inner:
        e = static_int(sch.get(lp).extent)
        if e is not None and e > 1 and e <= 64:
            try:
                sch.unroll(lp)
            except Exception:
                pass


class OuterProduct(ScheduleRule):
    """conv2d / dense / matmul / batch_matmul + elementwise epilogue (see module docstring)."""

    name = "outer-product"

    def __init__(self, pack_weights: bool = True) -> None:
        self.pack_weights = pack_weights

    def apply(self, func, target, lanes):
        opened = one_reduction(func)
        if opened is None:
            return None
        sch = self._schedule(*opened, target, lanes)
        if sch is not None and _is_shifted(sch):
            both = self._one_row_when_short(func, target, lanes, sch)
            return both if both is not None else sch
        if sch is not None and knobs.current().batch_one_branch:
            both = self._batch_one_branch(func, target, lanes, sch)
            if both is not None:
                return both
        return sch

    def _one_row_when_short(self, func, target, lanes, shifted):
        """Shifted row tiles (`_schedule_shifted`) where another symbolic axis is a row axis too
        ([T, N, K] after a time-major LSTM, N the batch; [N, S, K]): which one is long is known only
        at the call, and a length under the tile would run the predicated tile (rt - 1 of its rows
        branched around per FMA, at N = 1). The kernel is scheduled twice, `if rt <= S: <shifted
        tiles> else: <one-row tiles, parallel over the other, long, axis>` (base.branch_kernels;
        the same vector tile, so one weight pack serves both). None (keep `shifted`) with one symbolic row axis (under the tile it is
        short: the predicated tile is cheap), a symbolic column axis, or TVMScript that does not
        parse back."""
        import dataclasses

        import tvm
        from tvm import s_tir

        from ...machine import machine_model

        opened = one_reduction(func)
        m = _match_operands(*opened) if opened is not None else None
        plan = _shift_plan(m, lanes, machine_model(target)) if m is not None else None
        if plan is None or plan.rows_alone or plan.col_bound is not None or plan.rt <= 1:
            return None
        try:
            short = self._schedule_shifted(*opened, m, dataclasses.replace(plan, rt=1), lanes, machine_model(target),
                                           parallel_lead=True)
        except Exception:  # noqa: BLE001 - the short branch is an extra: keep the shifted kernel
            return None
        if short is None:
            return None
        bound = plan.row_bound
        text = branch_kernels(f"T.{bound.ty}({plan.rt}) <= {bound}", shifted.mod["main"].script(),
                              short.mod["main"].script(), "_rows")
        if text is None:
            return None
        try:
            return s_tir.Schedule(tvm.script.from_source(text))
        except Exception:  # noqa: BLE001 - TVMScript that does not parse back: the shifted kernel
            return None

    def _batch_one_branch(self, func, target, lanes, general):
        """Two symbolic row axes that A alone indexes, the outer a bare variable N ([N, S, K] x
        [K, M]: the projections and FFN of an encoder on [N, S, 64]) take one-row tiles (which of
        the two is long is unknown). With N = 1 at run time the kernel has one symbolic row axis,
        which pads to the static micro-kernel's row tile: the kernel is scheduled twice, `if N ==
        1: <scheduled with N written 1> else: <general>` (base.branch_kernels). None (keep
        `general`) where that is not the case or the N = 1 schedule does not pad its rows."""
        import re

        import tvm
        from tvm import tirx

        opened = one_reduction(func)
        m = _match_operands(*opened) if opened is not None else None
        if m is None or not (m.out_order and m.out_order[-1].same_as(m.vec_var)):
            return None
        a_only = [v for v in m.out_order if m.ext[v] is None and not any(v in d for d in m.db)]
        if len(a_only) != 2:
            return None
        outer = next(iv.dom.extent for iv in m.ivs if iv.var.same_as(a_only[0]))
        if not isinstance(outer, tirx.Var) or str(outer.ty) not in ("int64", "int32"):
            return None
        name, one = outer.name, f"T.{outer.ty}(1)"
        src = func.script()
        decl = f'{name} = TypeVar("{name}")'
        if decl not in src.split("\n"):
            return None
        spec = "\n".join(ln for ln in src.split("\n") if ln != decl)
        spec = re.sub(rf"(?<![\w.\"]){name}(?![\w\"])", one, spec)
        g_text = general.mod["main"].script()
        # the general kernel's weight pack, where it keeps the [K, M] layout (its one-row tile is
        # the whole row): packed[0, k, m] = w[k, m]. The build lifts that pack and hands the
        # kernel the packed weight instead of w, so the N = 1 branch reads it (unpacked itself:
        # a second pack of another tile would be a second rewrite of the same parameter)
        ident = re.findall(r"^ +(\w+)\[T\.int64\(0\), (\w+), (\w+)\] = (\w+)\[\2, \3\]$", g_text, re.M)
        if LAYOUT_REWRITE_ANN in g_text and len(ident) != g_text.count(LAYOUT_REWRITE_ANN):
            return None
        try:
            sfunc = tvm.script.from_source(spec)
            s_opened = one_reduction(sfunc)
            rule = OuterProduct(pack_weights=False) if ident else self
            single = rule._schedule(*s_opened, target, lanes) if s_opened is not None else None
        except Exception:  # noqa: BLE001 - the N = 1 branch is an extra: keep the general kernel
            return None
        if single is None:
            return None
        s_text = single.mod["main"].script()
        if "_pad" not in s_text or LAYOUT_REWRITE_ANN in s_text:
            return None
        for packed, _, _, w in ident:
            s_text = re.sub(rf"(?<![\w.]){w}\[", f"{packed}[T.int64(0), ", s_text)
        text = branch_kernels(f"{name} == {one}", s_text, g_text, "_n1")
        if text is None:
            return None
        try:
            from tvm import s_tir

            return s_tir.Schedule(tvm.script.from_source(text))
        except Exception:  # noqa: BLE001 - TVMScript that does not parse back: the general kernel
            return None

    def _schedule(self, sch, anchor, target, lanes, padded: bool = False, row_multiple: int = 0,
                  col_multiple: int = 0):
        """The steps: match the operands, pad a ragged vector axis or a symbolic row axis (then
        start over), inline the prologue copies and the epilogue, choose the tile, pack B, tile
        the loops, accumulate in registers, write back. `row_multiple`: the register axis is
        symbolic but padded to a multiple of this (the row tile); `col_multiple` the same for the
        vector axis."""
        from ...machine import machine_model

        machine = machine_model(target)
        m = _match_operands(sch, anchor)
        if m is None:
            return None
        n_vec, n_reg = m.ext[m.vec_var], m.ext[m.reg_var]
        if not padded and knobs.current().shift_symbolic_tiles and knobs.current().symbolic_rows:
            plan = _shift_plan(m, lanes, machine)
            if plan is not None:
                return self._schedule_shifted(sch, anchor, m, plan, lanes, machine)
        if n_reg is None and row_multiple:
            n_reg = row_multiple  # (the tile choices below give the same tile again)
        if n_vec is None and col_multiple:
            n_vec = col_multiple
        if n_vec is None and knobs.current().pad_symbolic_rows and not padded and m.out_order \
                and m.out_order[-1].same_as(m.vec_var):
            # a symbolic vector axis (the S x S attention scores [h, S, d] x [h, d, S]): padded to
            # two vectors (a copy of B per call, d x S), the rows as below where they are symbolic
            # too, then the static micro-kernel (else SymbolicColumns' serial column loop, its
            # accumulators in memory)
            cm = 2 * lanes
            rt = 1
            if n_reg is None and _one_symbolic_row_axis(m):
                tile = _register_tile(m, cm, _MANY_ROWS, lanes, machine, False)
                rt = tile[1] if tile is not None else 1
            if n_reg is not None or rt > 1:
                name = m.stmt.name_hint
                sch.pad_einsum(anchor, [cm if iv.var.same_as(m.vec_var) else rt if iv.var.same_as(m.reg_var) else 1
                                        for iv in m.ivs])
                return self._schedule(sch, sch.get_sblock(name), target, lanes, padded=True,
                                      row_multiple=rt if n_reg is None else 0, col_multiple=cm)
        # a symbolic register axis (a sequence length S as the rows of [S, K] x [K, N]): padded to
        # a multiple of the row tile a long static axis gets (a ragged tile of a symbolic length
        # would have an unbounded write-back, see below), else one row per tile
        sym_rows = n_reg is None and n_vec is not None and knobs.current().symbolic_rows
        if sym_rows and not _bare_symbolic_rows(m):
            return None
        if sym_rows and n_vec is not None and knobs.current().pad_symbolic_rows and not padded and n_vec % lanes == 0 \
                and _one_symbolic_row_axis(m):
            tile = _register_tile(m, n_vec, _MANY_ROWS, lanes, machine, False)
            if tile is not None and tile[1] > 1:
                rt = tile[1]
                name = m.stmt.name_hint
                sch.pad_einsum(anchor, [rt if iv.var.same_as(m.reg_var) else 1 for iv in m.ivs])
                return self._schedule(sch, sch.get_sblock(name), target, lanes, padded=True, row_multiple=rt)
        if sym_rows:
            n_reg = 1 << 20  # (for the choices below; the row tile is 1)
        if n_vec is None or n_reg is None:
            return None  # the vector axis must be static; outer ones (batch) may be symbolic
        if n_vec % lanes and n_vec > 2 * lanes and n_reg >= 16 and not padded and knobs.current().pad_vector_axis and not sym_rows:
            return self._pad_vector_axis(sch, anchor, m, target, lanes, n_vec, n_reg, machine)
        ib = _inline_around(sch, anchor, m)
        if ib < 0:
            return None
        tile = _register_tile(m, n_vec, n_reg, lanes, machine, sym_rows)
        if tile is None:
            return None
        vt, rt = tile
        if not self._pack_vector_operand(sch, anchor, m, ib, vt, n_vec):
            return None
        fused, red_loops, r_i, v_i = _tile_loops(sch, anchor, m, vt, rt)
        wb, init = _accumulate_in_registers(sch, anchor, m, fused, red_loops, r_i, v_i, vt, n_vec, lanes)
        _unroll_write_back(sch, wb, fused, m, vt, n_vec, lanes)
        done = {sch.get(b).name_hint for b in (anchor, wb, init)}
        schedule_rest(sch, done, lanes)
        return sch

    def _schedule_shifted(self, sch, anchor, m: _Operands, plan: _ShiftPlan, lanes: int, machine: Any,
                          parallel_lead: bool = False):
        """A symbolic row axis S (and column axis, `_shift_plan`) in whole register tiles over the
        operands as they are, no padded copies:

            for n (symbolic, serial), <static axes: parallel>:
                for j_o in ceildiv(S, vt)      # (symbolic columns only) marked
                    for i_o in ceildiv(S, rt)  # marked
                        rt x vt accumulators; the epilogue in their write-back

        The tile loops are marked (`loop_marks.PEEL_LAST` = tile, `PEEL_BOUND` = S): the build
        turns each into `if tile <= S: <every tile whole, the last one shifted back to end at S,
        no predicates> else: <the predicated tile>` (`apply_loop_marks`), so the micro-kernel and
        its write-back run vectorised at every length where the padded kernel copied both operands
        and scalarised the write-back of its column tail (the scores at S = 77 ran 3x the fixed
        kernel). Where the static axes give fewer iterations than the machine's cores, the row
        tile loop is the parallel one. A length under the tile runs the predicated tile.
        `parallel_lead`: the outermost symbolic axis outside the tiles is the parallel loop (the
        rows are short there: `_one_row_when_short`; [T, N, K] at N = 1 launched the thread pool
        once per time step)."""
        import math

        vt, rt, n_vec = plan.vt, plan.rt, plan.n_vec
        ib = _inline_around(sch, anchor, m)
        if ib < 0 or not self._pack_vector_operand(sch, anchor, m, ib, vt, n_vec):
            return None
        loop_of, vec_var, reg_var = m.loop_of, m.vec_var, m.reg_var
        others = [v for v in m.out_order if not v.same_as(reg_var) and not v.same_as(vec_var)]
        sch.reorder(*[loop_of[v] for v in [*others, vec_var, reg_var]], *[loop_of[v] for v in m.r_vars])
        v_o, v_i = sch.split(loop_of[vec_var], factors=[None, vt])
        r_o, r_i = sch.split(loop_of[reg_var], factors=[None, rt])
        red_loops = [loop_of[v] for v in m.r_vars]
        sch.reorder(*[loop_of[v] for v in others], v_o, r_o, *red_loops, r_i, v_i)
        static = [loop_of[v] for v in others if m.ext[v] is not None]
        if plan.col_bound is None:
            static.append(v_o)
        work = math.prod(static_int(sch.get(lp).extent) or 1 for lp in static)
        lead = [loop_of[v] for v in others if m.ext[v] is None]
        if parallel_lead and lead:
            sch.parallel(lead[0])
        elif static and work >= getattr(machine, "cores", 2):
            sch.parallel(sch.fuse(*static) if len(static) > 1 else static[0])
        else:
            sch.parallel(r_o)
        wb, init = _accumulate_in_registers(sch, anchor, m, r_o, red_loops, r_i, v_i, vt, n_vec, lanes)
        _unroll_write_back(sch, wb, r_o, m, vt, n_vec, lanes)
        if rt > 1:
            sch.annotate(r_o, PEEL_LAST, rt)
            sch.annotate(r_o, PEEL_BOUND, str(plan.row_bound))
        if plan.col_bound is not None:
            sch.annotate(v_o, PEEL_LAST, vt)
            sch.annotate(v_o, PEEL_BOUND, str(plan.col_bound))
        done = {sch.get(b).name_hint for b in (anchor, wb, init)}
        schedule_rest(sch, done, lanes)
        return sch

    def _pad_vector_axis(self, sch, anchor, m: _Operands, target, lanes: int, n_vec: int, n_reg: int, machine: Any):
        """A vector axis that is no multiple of the lanes (ViT's 197 tokens as the columns of the
        attention scores): padded to one (zero columns in, cropped out) rather than left to
        WindowReduction's scalar tiles (12x197x64x197 on 2 threads: 7.9 -> 1.06 ms), then
        scheduled again. Only with 16 rows or more: the padded copy of B (weights too) is made at
        every call, 1/rows of the work (a matrix-vector product keeps its GEMV schedule). The
        register axis is padded too where no tile of at least 4 rows divides it: a ragged row
        tile's bound is lost when the crop is computed at the tile (TVM 0.27's reverse_compute_at
        keeps only the column predicate: writes past the output)."""
        n_pad = -(-n_vec // lanes) * lanes
        vt_guess = 2 * lanes if n_pad % (2 * lanes) == 0 and n_reg >= 4 else lanes
        rows = max(1, machine.accumulators * lanes // vt_guess)
        pad_rows = rows if max(d for d in divisors_of(n_reg) if d <= rows) < 4 else 1
        name = m.stmt.name_hint
        sch.pad_einsum(anchor, [lanes if iv.var.same_as(m.vec_var) else pad_rows if iv.var.same_as(m.reg_var) else 1
                                for iv in m.ivs])
        return self._schedule(sch, sch.get_sblock(name), target, lanes, padded=True)

    def _pack_vector_operand(self, sch, anchor, m: _Operands, ib: int, vt: int, n_vec: int) -> bool:
        """Pack B so the vector axis is innermost and contiguous (a weight's pack block annotated
        for load-time hoisting); False: B's vector axis is not innermost and cannot be packed."""
        db, rb, vec_var = m.db, m.rb, m.vec_var
        b_dim = next((k for k, d in enumerate(db) if vec_var in d), None)
        if b_dim is None:
            return False
        need_pack = b_dim != len(db) - 1 or len(db[b_dim]) != 1
        b_region = rb.region[b_dim].min
        if need_pack:
            if not self.pack_weights or n_vec % vt != 0 or not b_region.same_as(vec_var):
                if not (b_dim == len(db) - 1):
                    return False
            else:
                pack = sch.cache_read(anchor, ib, "global")
                sch.transform_layout(
                    anchor,
                    ("read", ib),
                    lambda *d: (*d[:b_dim], d[b_dim] // vt, *d[b_dim + 1 :], d[b_dim] % vt),
                )
                intermediates = {buf.name for buf in sch.mod["main"].body.block.alloc_buffers}
                if rb.source.name not in intermediates:  # a kernel argument (weights)
                    sch.annotate(pack, LAYOUT_REWRITE_ANN, True)
        elif (knobs.current().pack_kn_weights and self.pack_weights and len(db) == 2 and b_dim == 1 and n_vec % vt == 0
              and b_region.same_as(vec_var)
              and rb.source.name not in {buf.name for buf in sch.mod["main"].body.block.alloc_buffers}):
            # a [K, N] weight (dense/matmul): its vector axis is innermost already, but a panel of
            # `vt` columns is K rows N floats apart (a new cache line per k; BERT's FFN 768x3072
            # matmuls ran at 16 GFLOP/s): packed to [N/vt, K, vt], the panel is contiguous
            pack = sch.cache_read(anchor, ib, "global")
            sch.transform_layout(anchor, ("read", ib), lambda k, n: (n // vt, k, n % vt))
            sch.annotate(pack, LAYOUT_REWRITE_ANN, True)
        return True

"""Default (untuned) CPU schedules for the TIR kernels graphopt lowers to TVM.

Without a schedule TVM's CPU kernels are naive scalar loop nests, 86-106x slower than
onnxruntime (see /work/shared/TVM-NOTES.md). `apply_default_schedules` gives every PrimFunc of an
IRModule a reasonable schedule so untuned code is usable:

- `OuterProduct` (conv2d NCHW incl. 1x1/strided/grouped-as-dense, dense, matmul,
  batch_matmul, with fused elementwise epilogues): the anchor reduction C[..] += A[..] * B[..]
  becomes a register-tiled outer product. The vector axis is a spatial axis that only B indexes
  (the output channel of a conv, the column of a matmul); the register axis one that only A
  indexes (the output column of a conv, the row of a matmul). B is packed inside the kernel so
  the vector axis is contiguous ([oc/16, ic, kh, kw, 16]); the pack block is annotated as a
  layout-rewrite preprocess so `relax.transform.SplitLayoutRewritePreproc` + `LiftTransformParams`
  can hoist it to load time where weights are parameters. Accumulators live in a small local
  tile (cache_write) and the epilogue (bias, relu, residual add, GELU, ...) is inlined into
  the write-back of that tile.
- `WindowReduction` (depthwise conv, max/avg pooling, any reduction whose innermost output axis
  is also the innermost axis of its input): the innermost output axis is vectorised with the
  reduction loops outside it.
  Matmul-like kernels (the output's last axis is the vector axis) widen the vector tile when the
  row count leaves accumulators unused (M = 128: 4 rows x 3 vectors) and block the reduction by
  128 so a [128, vt] block of the B panel stays in L1 while every row tile uses it. Elementwise
  blocks after the anchor are first inlined into one another (GELU reads the matmul twice), so
  the whole epilogue goes into the write-back.
- `RowReduction` (softmax, layer norm, mean over the last axis): one parallel loop over rows,
  every step computed inside it, reductions rfactored into a vector of partial results.
- dlight's CPU `GEMV` and `Reduction` (the remaining reductions). dlight's Reduction is only
  tried after our conv rules: it makes convolutions slower.
- `Injective`: every remaining block gets parallel outer loops and a vectorised inner loop.

Each rule is tried in order per PrimFunc; a rule that raises is skipped (the next one is tried),
so a surprising kernel falls back to a simpler schedule instead of failing the compile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from graphopt.targets.tvm.tir_match import static_int

if TYPE_CHECKING:  # tvm is an optional dependency: import it lazily
    import tvm

__all__ = [
    "apply_default_schedules",
    "schedule_prim_func",
    "default_schedule",
    "vector_lanes",
    "ScheduleStats",
    "GENERIC_RULES",
    "LAYOUT_REWRITE_ANN",
    "is_tunable_kernel",
]

#: Block annotation that SplitLayoutRewritePreproc looks for (weight-packing blocks).
LAYOUT_REWRITE_ANN = "meta_schedule.layout_rewrite_preproc"

# window reductions (depthwise conv, pooling): a tile of output rows x one vector row, up to
# this many accumulator vectors
_WINDOW_ROW_TILE = True
# pack [K, N] weights of dense/matmul kernels into [N/vt, K, vt] panels too
_PACK_KN_WEIGHTS = True
# inline argument copies (bias reshapes) first so the epilogue inlines into the write-back
_INLINE_ARG_COPIES = True
# erf lowered to a vectorisable polynomial on LLVM targets (see use_fast_erf)
_FAST_ERF = True
# symbolic (dynamic batch) outer loops stay serial, outside the fused parallel loop
_SERIAL_SYMBOLIC_OUTER = True
# materialised pads: decompose into a fill and an interior copy (both vectorisable)
_DECOMPOSE_PADDING = True
_WINDOW_ACC_VECTORS = 8
# the elementwise blocks after a matmul/conv inlined into one (GELU reads the matmul twice)
_INLINE_EPILOGUE = True
# matmul-like kernels whose row count leaves accumulators unused (4 rows x 2 vectors) widen the vector tile
_MATMUL_WIDE_VT = True
# softmax / layer norm: vectorised row reductions (RowReduction) instead of dlight's serial ones
_ROW_REDUCTION = True
# a vector axis that is no multiple of the lanes padded to one (pad_einsum) instead of declined
_PAD_VECTOR_AXIS = True
# matmuls whose row axis is symbolic (a sequence length) take OuterProduct with one-row tiles
# (off: WindowReduction's generic tiles, as before)
_SYMBOLIC_ROWS = True
# matmul-like kernels: reduction blocked by this many (0: off)
_MATMUL_K_BLOCK = 128

# fp32 accumulators kept in registers per microkernel: the target's machine model
# (`MachineModel.accumulators`: 12 of AVX2's 16 registers, 24 of AVX-512's 32), and
# `accumulators_wide` when no tile up to that divides the register axis and one tile covers it


#: rules that schedule a kernel without knowing what it computes: a conv or matmul that lands on
#: one of them runs at a few percent of peak (what `ScheduleStats.fallback` reports)
GENERIC_RULES = frozenset({"dlight-gemv", "dlight-reduction", "fallback-parallel", "none"})


@dataclass
class ScheduleStats:
    """Which rule scheduled which PrimFunc, and each one's multiply-add FLOPs (for reports and tests)."""

    by_func: dict[str, str] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)  # every PrimFunc of the module, scheduled already or not

    def fallback(self) -> dict[str, Any]:
        """The kernels with multiply-add work that a generic rule scheduled (GENERIC_RULES), with
        their share of the module's FLOPs: {"share": f, "kernels": [{name, rule, gflop, share}]}."""
        total = sum(self.flops.values())
        rows = [{"kernel": k, "rule": r, "gflop": round(self.flops.get(k, 0.0) / 1e9, 6),
                 "share": round(self.flops.get(k, 0.0) / total, 4) if total else 0.0}
                for k, r in self.by_func.items() if r in GENERIC_RULES and self.flops.get(k, 0.0) > 0]
        rows.sort(key=lambda r: -r["gflop"])
        return {"share": round(sum(r["share"] for r in rows), 4), "kernels": rows}

    def count(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rule in self.by_func.values():
            out[rule] = out.get(rule, 0) + 1
        return out


def vector_lanes(target: "tvm.target.Target", dtype_bits: int = 32) -> int:
    """SIMD lanes for `dtype_bits` elements on `target` (AVX2: 8 fp32, AVX-512: 16, NEON: 4):
    the target's machine model (graphopt.targets.machine)."""
    from ...machine import machine_model

    return machine_model(target).lanes(dtype_bits)


# --------------------------------------------------------------------------- helpers


def _vars_in(expr: Any) -> set:
    import tvm_ffi
    from tvm import tirx

    found: set = set()
    tvm_ffi.structural_walk(expr, (tirx.Var, found.add), order="post")
    return found


def region_vars(region: Any, block_vars: set) -> list[set]:
    """Per-dimension sets of block iter vars used by a buffer access region."""
    return [(_vars_in(r.min) & block_vars) for r in region.region]


def root_block(sch: "tvm.s_tir.Schedule") -> Any:
    func = sch.mod["main"]
    return sch.get_sblock(func.body.block.name_hint)


def is_reduction(stmt: Any) -> bool:
    from tvm.tirx import IterVar

    return any(iv.iter_type == IterVar.CommReduce for iv in stmt.iter_vars)


def _try_inline_all(sch: "tvm.s_tir.Schedule", keep: Sequence[Any] = ()) -> None:
    """compute_inline every block that can be inlined (fixed point), except `keep`."""
    keep_names = {sch.get(b).name_hint for b in keep}
    changed = True
    while changed:
        changed = False
        for block in sch.get_child_blocks(root_block(sch)):
            stmt = sch.get(block)
            if stmt.name_hint in keep_names or is_reduction(stmt):
                continue
            try:
                sch.compute_inline(block)
                changed = True
                break
            except Exception:
                continue


def divisors_of(n: int) -> list[int]:
    """Divisors of n in increasing order (O(√n): a batch of 2**40 made the loop run for minutes)."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _schedule_injective_block(
    sch: "tvm.s_tir.Schedule", block: Any, lanes: int, max_parallel_loops: int | None = None
) -> None:
    """Parallel over the outer loops, vectorise the innermost (when it splits evenly)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [static_int(sch.get(lp).extent) for lp in loops]
    if (len(loops) > 1 and extents[-1] is not None and extents[-1] % lanes and not sch.get(block).reads
            and all(e is not None for e in extents) and math.prod(extents) % lanes == 0):
        # a constant fill (the pad value of a decomposed pad): one flat loop, parallel vectors
        p_o, v_i = sch.split(sch.fuse(*loops), factors=[None, lanes])
        sch.parallel(p_o)
        sch.vectorize(v_i)
        return
    inner = loops[-1]
    inner_ext = extents[-1]
    vec = None
    if inner_ext is not None and inner_ext > 1:
        if inner_ext <= 2 * lanes:
            vec = inner
        elif inner_ext % lanes == 0:
            _, vec = sch.split(inner, factors=[None, lanes])
        # otherwise: leave scalar (a predicated vector loop costs more than it saves here)
    outer = loops[:-1] if vec is not None and vec.same_as(inner) else loops[:-1]
    if vec is None:
        outer = loops[:-1] if len(loops) > 1 else []
    if max_parallel_loops is not None:
        outer = outer[:max_parallel_loops]
    if outer:
        fuse_parallel(sch, outer)
    if vec is not None:
        sch.vectorize(vec)


def fuse_parallel(sch: "tvm.s_tir.Schedule", loops: Sequence[Any]) -> Any:
    """Fuse `loops` into one parallel loop and return it. Leading loops of symbolic extent (a
    dynamic batch) stay serial outside: fused with them, every index inside is recovered with
    divisions by symbolic values (ResNet-50 with a symbolic batch ran 1.7x slower than with
    batch 1 fixed, same schedules)."""
    loops = list(loops)
    lead = 0
    while lead < len(loops) - 1 and static_int(sch.get(loops[lead]).extent) is None:
        lead += 1
    rest = loops[lead:] if _SERIAL_SYMBOLIC_OUTER else loops
    fused = sch.fuse(*rest) if len(rest) > 1 else rest[0]
    sch.parallel(fused)
    return fused


# --------------------------------------------------------------------------- rules


class ScheduleRule:
    name = "rule"

    def apply(self, func: Any, target: Any, lanes: int) -> "tvm.s_tir.Schedule | None":
        raise NotImplementedError


class Injective(ScheduleRule):
    """Inline what can be inlined; parallel + vectorise every remaining block."""

    name = "injective"

    def apply(self, func, target, lanes):
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(root_block(sch))
        if any(is_reduction(sch.get(b)) for b in blocks):
            return None
        _try_inline_all(sch)
        for block in sch.get_child_blocks(root_block(sch)):
            _schedule_injective_block(sch, block, lanes)
        return sch


class SymbolicColumns(ScheduleRule):
    """A matmul-like reduction whose output's innermost axis is symbolic (the S x S attention
    scores of a sequence of any length: [.., S, d] x [.., d, S]) and innermost in one input too:
    parallel over the other spatial loops, the reduction outside the column loop, which stays a
    plain loop of symbolic trip count that LLVM's loop vectorizer vectorises (with its scalar
    tail); the epilogue under the row. Declines static columns (OuterProduct's) and the rest."""

    name = "symbolic-columns"

    def apply(self, func, target, lanes):
        opened = one_reduction(func)
        if opened is None:
            return None
        sch, anchor = opened
        stmt = sch.get(anchor)
        loops = sch.get_loops(anchor)
        ivs = list(stmt.iter_vars)
        if len(loops) != len(ivs) or len(stmt.writes) != 1:
            return None
        from tvm.tirx import IterVar

        sp = [lp for lp, iv in zip(loops, ivs) if iv.iter_type == IterVar.DataPar]
        red = [lp for lp, iv in zip(loops, ivs) if iv.iter_type == IterVar.CommReduce]
        if len(sp) < 2 or not red or len(sp) + len(red) != len(loops) or loops[: len(sp)] != sp:
            return None
        col = ivs[len(sp) - 1].var
        if static_int(ivs[len(sp) - 1].dom.extent) is not None:
            return None
        block_vars = {iv.var for iv in ivs}
        out = region_vars(stmt.writes[0], block_vars)
        reads = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
        if not out or out[-1] != {col} or not any(region_vars(r, block_vars)[-1:] == [{col}] for r in reads):
            return None
        sch.reorder(*sp[:-1], *red, sp[-1])
        fused = fuse_parallel(sch, sp[:-1])
        sch.decompose_reduction(anchor, red[0])
        for c in sch.get_consumers(anchor):
            try:
                sch.reverse_compute_at(c, fused, preserve_unit_loops=True)
            except Exception:  # noqa: BLE001 - left at the root: scheduled on its own below
                pass
        schedule_rest(sch, {sch.get(anchor).name_hint}, lanes)
        return sch


class WindowReduction(ScheduleRule):
    """Reductions whose innermost output axis stays innermost in an input (depthwise conv,
    pooling): out tile of `lanes` along that axis in a local accumulator, reduction loops
    outside the vector loop, parallel over the other spatial loops."""

    name = "window-reduction"

    def apply(self, func, target, lanes):
        from tvm.tirx import IterVar

        opened = one_reduction(func)
        if opened is None:
            return None
        sch, anchor = opened
        stmt = sch.get(anchor)
        ivs = list(stmt.iter_vars)
        loops = sch.get_loops(anchor)
        if len(loops) != len(ivs):
            return None
        s_idx = [i for i, iv in enumerate(ivs) if iv.iter_type == IterVar.DataPar]
        r_idx = [i for i, iv in enumerate(ivs) if iv.iter_type == IterVar.CommReduce]
        if not s_idx or not r_idx or s_idx != list(range(len(s_idx))):
            return None
        inner_var = ivs[s_idx[-1]].var
        inner_ext = static_int(ivs[s_idx[-1]].dom.extent)
        if inner_ext is None or inner_ext < 4:
            return None  # global pooling and the like: leave to dlight / injective rules
        block_vars = {iv.var for iv in ivs}
        # the innermost output axis must index the last dimension of some input
        ok = False
        for reg in stmt.reads:
            dims = region_vars(reg, block_vars)
            if dims and inner_var in dims[-1]:
                ok = True
        if not ok:
            return None
        if _DECOMPOSE_PADDING:
            inline_copies(sch, anchor)
            loops = sch.get_loops(anchor)
        sl = [loops[i] for i in s_idx]
        rl = [loops[i] for i in r_idx]
        vt = lanes if inner_ext % lanes == 0 else (inner_ext if inner_ext <= 2 * lanes else None)
        if vt is None:
            # split by lanes with a tail (predicate); still vectorisable per tile
            vt = lanes
        # rows: a tile of `yt` output rows (the next output axis) as well, so the tile has
        # several independent accumulator vectors (one vector's chain of 9 dependent FMAs is
        # latency-bound: measured 1-2.5 GFLOP/s on MobileNetV2's depthwise convs)
        yt = 1
        if _WINDOW_ROW_TILE and len(sl) >= 2 and inner_ext % vt == 0:
            y_ext = static_int(sch.get(sl[-2]).extent)
            n_vec = -(-vt // lanes)
            if y_ext:
                yt = max(d for d in divisors_of(y_ext) if d * n_vec <= _WINDOW_ACC_VECTORS)
        x_o, x_i = sch.split(sl[-1], factors=[None, vt])
        if yt > 1:
            y_o, y_i = sch.split(sl[-2], factors=[None, yt])
            sch.reorder(*sl[:-2], y_o, x_o, *rl, y_i, x_i)
            outer = [*sl[:-2], y_o, x_o]
        else:
            sch.reorder(*sl[:-1], x_o, *rl, x_i)
            outer = [*sl[:-1], x_o]
        fused = fuse_parallel(sch, outer)
        wb = sch.cache_write(anchor, 0, "local")
        sch.reverse_compute_at(wb, fused, preserve_unit_loops=True)
        inline_consumers(sch, wb)
        if inner_ext % vt == 0:
            sch.vectorize(x_i)
            if yt > 1:
                sch.unroll(y_i)
            for r in rl:  # the window (3x3): unrolled, so the row chains interleave
                if (static_int(sch.get(r).extent) or 99) <= 7:
                    sch.unroll(r)
            init = sch.decompose_reduction(anchor, rl[0])
            sch.vectorize(sch.get_loops(init)[-1])
            wl = sch.get_loops(wb)
            if static_int(sch.get(wl[-1]).extent) == vt:
                sch.vectorize(wl[-1])
        else:
            sch.decompose_reduction(anchor, rl[0])
        schedule_rest(sch, {sch.get(anchor).name_hint, sch.get(wb).name_hint}, lanes)
        return sch


def _is_copy(stmt) -> bool:
    """A block whose body stores one loaded value: it moves data, computes nothing."""
    body = stmt.body
    return type(body).__name__ == "BufferStore" and type(body.value).__name__ in ("TensorLoad", "BufferLoad")


def _inline_arg_copies(sch, func) -> None:
    """compute_inline the blocks that only copy a kernel argument (the bias reshaped to
    [1, C, 1, 1]): left in place, the epilogue that reads them cannot be inlined into the
    accumulator write-back, and bias/ReLU6 ran as three extra parallel passes over the output."""
    intermediates = {buf.name for buf in func.body.block.alloc_buffers}
    for block in sch.get_child_blocks(root_block(sch)):
        stmt = sch.get(block)
        if stmt.init is not None or not _is_copy(stmt):
            continue
        if len(stmt.reads) != 1 or stmt.reads[0].source.name in intermediates:
            continue
        try:
            sch.compute_inline(block)
        except Exception:
            pass


def one_reduction(func) -> tuple[Any, Any] | None:
    """A schedule of `func` (argument copies inlined first) and its reduction block, or None
    unless it has exactly one: where the conv/matmul/window rules start."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    if _INLINE_ARG_COPIES:
        _inline_arg_copies(sch, func)
    reds = [b for b in sch.get_child_blocks(root_block(sch)) if is_reduction(sch.get(b))]
    return (sch, reds[0]) if len(reds) == 1 else None


def inline_copies(sch, anchor, moves_only: bool = False) -> None:
    """compute_inline producers of the anchor that only move data (a pad of 0, a transpose,
    a reshape): the anchor reads through them. Real pads (if_then_else) stay materialised so the
    inner loop has no conditions. `moves_only`: only copies are touched; producers that compute (a
    BatchNorm + Relu before a conv) stay materialised (inlined, the conv recomputes each input
    value once per tile of output blocks, inside its reduction loop) and pads are left whole."""
    for prod in sch.get_producers(anchor):
        stmt = sch.get(prod)
        if is_reduction(stmt):
            continue
        if moves_only and not _is_copy(stmt):
            # (a pad stays one block with its condition: BlockedConv's flat padded convs, 2
            # threads, 3x3 128 on 28x28 1.20 ms against 1.23 ms with the fill + copy below)
            continue
        if "if_then_else" in str(stmt.body):
            if _DECOMPOSE_PADDING:
                # a fill of the pad value plus a copy of the interior: neither has a condition,
                # both vectorise (the padded copy's rows, 58 or 114 wide, ran as scalar code)
                try:
                    loops = sch.get_loops(prod)
                    if loops and sch.can_decompose_padding(prod, loops[0]):
                        sch.decompose_padding(prod, loops[0])
                except Exception:
                    pass
            continue
        try:
            sch.compute_inline(prod)
        except Exception:
            pass


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


def inline_consumers(sch, wb) -> None:
    """reverse_compute_inline the elementwise epilogue chain into the write-back block.

    A consumer that writes a buffer of another shape than the write-back's (the `crop` after a
    conv computed on rows rounded up to the micro-kernel's width) is inlined only once the
    write-back sits under a tile loop: there reverse_compute_inline bounds the write with a
    predicate, while at the root it keeps the write-back's wider domain and writes past the end
    of the smaller output (apache-tvm 0.27; a sentinel after the output buffer caught it)."""
    # (int32 sums, an int8 kernel: an epilogue that branches and meets again, a quantized SiLU,
    # is inlined too, `merge_epilogue_branches`, instead of one pass over the tensor per op; fp32
    # kernels keep what they had)
    int8 = any(str(r.source.dtype) == "int32" for r in sch.get(wb).reads)
    while True:
        consumers = sch.get_consumers(wb)
        if len(consumers) != 1:
            if consumers and int8 and merge_epilogue_branches(sch, wb):
                continue
            return
        wb_stmt, c_stmt = sch.get(wb), sch.get(consumers[0])
        if len(c_stmt.writes) != 1 or len(wb_stmt.writes) != 1:
            return
        same = [static_int(d) for d in c_stmt.writes[0].source.shape] == [static_int(d) for d in wb_stmt.writes[0].source.shape]
        if not same and len(sch.get_loops(wb)) <= len(wb_stmt.iter_vars):
            return  # (at the root: inlined after reverse_compute_at, if the rule does that)
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:
            if int8 and merge_epilogue_branches(sch, wb):
                continue
            return


def merge_epilogue_branches(sch: "tvm.s_tir.Schedule", wb: Any) -> bool:
    """Inline forward (compute_inline) the blocks that read the write-back `wb`, where they can
    be: an epilogue that branches and meets again (a quantized SiLU, x · sigmoid(x), x read by
    both) then has fewer readers of `wb`, down to the one where the branches meet, which
    reverse_compute_inline can take into `wb`. True when a block moved (call it, then inline the
    chain again, until it returns False). The cheap part of x is computed once per branch."""
    moved = False
    wb_name = sch.get(wb).name_hint
    for b in sch.get_consumers(wb):
        # (a reader's other producers that read nothing computed, e.g. `ieee_guard` constants of
        # a quantized subtract, go into it first: reverse_compute_inline wants wb its only producer)
        for p in sch.get_producers(b):
            if sch.get(p).name_hint != wb_name and not sch.get_producers(p):
                try:
                    sch.compute_inline(p)
                    moved = True
                except Exception:  # noqa: BLE001 - left where it is
                    pass
        try:
            sch.compute_inline(b)  # (an output block refuses: it stays, the others move into it)
            moved = True
        except Exception:  # noqa: BLE001 - not inlinable forward: left where it is
            continue
    return moved


def schedule_rest(sch, done: set[str], lanes: int) -> None:
    """Injective schedule for the root-level blocks a rule did not place (pads, packs, tails)."""
    for block in sch.get_child_blocks(root_block(sch)):
        name = sch.get(block).name_hint
        if name in done:
            continue
        loops = sch.get_loops(block)
        if loops and any(
            sch.get(lp).kind != 0 for lp in loops  # already parallel/vectorised
        ):
            continue
        try:
            _schedule_injective_block(sch, block, lanes)
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
        return self._schedule(*opened, target, lanes)

    def _schedule(self, sch, anchor, target, lanes, padded: bool = False):  # noqa: C901 - one schedule, step by step
        from tvm.tirx import IterVar

        from ...machine import machine_model

        machine = machine_model(target)
        max_acc, max_acc_wide = machine.accumulators, machine.accumulators_wide

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
        import tvm_ffi

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
        vec_var = innermost(ex_b)
        reg_var = innermost(ex_a)
        n_vec, n_reg = ext[vec_var], ext[reg_var]
        # a symbolic register axis (a sequence length S as the rows of [S, K] x [K, N]): one row
        # per tile, as many vectors wide as the accumulators allow (a row tile of a symbolic
        # length would be ragged, and a ragged tile's write-back is not bounded: see below)
        sym_rows = n_reg is None and n_vec is not None and _SYMBOLIC_ROWS
        if n_vec is None or (n_reg is None and not sym_rows):
            return None  # the vector axis must be static; outer ones (batch) may be symbolic
        if sym_rows:
            n_reg = 1 << 20  # (for the choices below; the row tile is 1)
        if n_vec % lanes and n_vec > 2 * lanes and n_reg >= 16 and not padded and _PAD_VECTOR_AXIS and not sym_rows:
            # a vector axis that is no multiple of the lanes (ViT's 197 tokens as the columns of
            # the attention scores): padded to one (zero columns in, cropped out) rather than
            # left to WindowReduction's scalar tiles (12x197x64x197 on 2 threads: 7.9 -> 1.06 ms).
            # Only with 16 rows or more: the padded copy of B (weights too) is made at every call,
            # 1/rows of the work (a matrix-vector product keeps its GEMV schedule)
            # The register axis is padded too where no tile of at least 4 rows divides it: a
            # ragged row tile's bound is lost when the crop is computed at the tile (TVM 0.27's
            # reverse_compute_at keeps only the column predicate: writes past the output)
            n_pad = -(-n_vec // lanes) * lanes
            vt_guess = 2 * lanes if n_pad % (2 * lanes) == 0 and n_reg >= 4 else lanes
            rows = max(1, max_acc * lanes // vt_guess)
            pad_rows = rows if max(d for d in divisors_of(n_reg) if d <= rows) < 4 else 1
            name = stmt.name_hint
            sch.pad_einsum(anchor, [lanes if iv.var.same_as(vec_var) else pad_rows if iv.var.same_as(reg_var) else 1
                                    for iv in ivs])
            return self._schedule(sch, sch.get_sblock(name), target, lanes, padded=True)
        inline_copies(sch, anchor)
        if _INLINE_EPILOGUE:
            _inline_epilogue(sch, anchor)
        # inlining may change the anchor's reads (a producer's add inlined into an operand): B's
        # read index is found again by its buffer, and B must still be read as it was
        reads_now = list(sch.get(anchor).reads)
        ib = next((i for i, r in enumerate(reads_now) if r.source.same_as(rb.source)), -1)
        if ib < 0:
            return None

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
        if (_MATMUL_WIDE_VT and out_order and out_order[-1].same_as(vec_var) and (vt == 2 * lanes or sym_rows)
                and n_reg % rt == 0 and rt * 2 < max_acc):
            # matmul-like (the output's last axis is the vector axis), whole row tiles leaving
            # accumulators unused (M = 128: 4 rows, no 6 divides it; 4 x 2 vectors is 8 of 12):
            # a wider vector tile fills them. Not with a tail tile (ViT's 197 rows: 6 + tail)
            for nv in range(max_acc // rt, 2, -1):
                if n_vec % (nv * lanes) == 0:
                    vt = nv * lanes
                    break

        # ---- pack B so the vector axis is innermost and contiguous
        b_dim = next((k for k, d in enumerate(db) if vec_var in d), None)
        if b_dim is None:
            return None
        need_pack = b_dim != len(db) - 1 or len(db[b_dim]) != 1
        b_region = rb.region[b_dim].min
        if need_pack:
            if not self.pack_weights or n_vec % vt != 0 or not b_region.same_as(vec_var):
                if not (b_dim == len(db) - 1):
                    return None
            else:
                ndim = len(db)
                pack = sch.cache_read(anchor, ib, "global")
                sch.transform_layout(
                    anchor,
                    ("read", ib),
                    lambda *d: (*d[:b_dim], d[b_dim] // vt, *d[b_dim + 1 :], d[b_dim] % vt),
                )
                intermediates = {buf.name for buf in sch.mod["main"].body.block.alloc_buffers}
                if rb.source.name not in intermediates:  # a kernel argument (weights)
                    sch.annotate(pack, LAYOUT_REWRITE_ANN, True)
                del ndim
        elif (_PACK_KN_WEIGHTS and self.pack_weights and len(db) == 2 and b_dim == 1 and n_vec % vt == 0
              and b_region.same_as(vec_var)
              and rb.source.name not in {buf.name for buf in sch.mod["main"].body.block.alloc_buffers}):
            # a [K, N] weight (dense/matmul): its vector axis is innermost already, but a panel of
            # `vt` columns is K rows N floats apart (a new cache line per k; BERT's FFN 768x3072
            # matmuls ran at 16 GFLOP/s): packed to [N/vt, K, vt], the panel is contiguous
            pack = sch.cache_read(anchor, ib, "global")
            sch.transform_layout(anchor, ("read", ib), lambda k, n: (n // vt, k, n % vt))
            sch.annotate(pack, LAYOUT_REWRITE_ANN, True)

        # ---- tile the anchor
        # outer order: output order with the register axis last (conv: n, oc/16, oh, ow/rt;
        # matmul: n/16, m/rt), so a packed B panel is reused across the register tiles
        s_order = [v for v in out_order if v in s_vars and v != reg_var] + [reg_var]
        s_order += [v for v in s_vars if v not in s_order]
        sch.reorder(*[loop_of[v] for v in s_order], *[loop_of[v] for v in r_vars])
        v_o, v_i = sch.split(loop_of[vec_var], factors=[None, vt])
        r_o, r_i = sch.split(loop_of[reg_var], factors=[None, rt])
        red_loops = [loop_of[v] for v in r_vars]
        par = [v_o if v.same_as(vec_var) else r_o if v.same_as(reg_var) else loop_of[v] for v in s_order]
        sch.reorder(*par, *red_loops, r_i, v_i)
        k_ext = static_int(sch.get(red_loops[0]).extent) if len(red_loops) == 1 else None
        if (_MATMUL_K_BLOCK and out_order and out_order[-1].same_as(vec_var) and par[-1].same_as(r_o)
                and k_ext is not None and k_ext > _MATMUL_K_BLOCK and k_ext % _MATMUL_K_BLOCK == 0
                and len(par) > 1):
            # K blocking: a [kc, vt] block of the B panel stays in L1 while every row tile of the
            # column panel uses it; the accumulators of the whole panel ([M, vt]) live in a
            # local buffer between the K blocks
            k_o, k_i = sch.split(red_loops[0], factors=[None, _MATMUL_K_BLOCK])
            sch.reorder(*par[:-1], k_o, r_o, k_i, r_i, v_i)
            red_loops = [k_o, k_i]
            fused = fuse_parallel(sch, par[:-1])
        else:
            fused = fuse_parallel(sch, par)

        # accumulator tile in registers, laid out [.., reg, vec] so the vector axis is contiguous
        wb = sch.cache_write(anchor, 0, "local")
        p_vec = out_order.index(vec_var)
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
        if len(red_loops) > 1 and len(r_vars) > 1 and (static_int(sch.get(inner_red).extent) or 99) <= 7:
            sch.unroll(inner_red)
        init = sch.decompose_reduction(anchor, red_loops[0])
        il = sch.get_loops(init)
        if n_vec % vt == 0:
            _vectorize_tile(sch, il[-1], vt, lanes)

        # write-back (+ epilogue): unroll the tile; vectorise when the output's last axis
        # is the register axis and the tile is a whole number of vectors.
        wl = sch.get_loops(wb)
        wl_inner = [lp for lp in wl if not lp.same_as(fused)][-2:]
        vec_last = False
        if wl_inner and out_order and out_order[-1].same_as(vec_var) and n_vec % vt == 0:
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

        done = {sch.get(b).name_hint for b in (anchor, wb, init)}
        schedule_rest(sch, done, lanes)
        return sch


class RowReduction(ScheduleRule):
    """Kernels made of reductions over the innermost axis of rows and elementwise steps on the
    same rows (softmax, layer norm): one parallel loop over the rows with every block computed
    inside it, elementwise steps vectorised, each reduction split into `lanes` partial results
    (rfactor) accumulated as one vector and summed at the end. dlight's CPU Reduction ran each
    reduction as a serial chain of 128-768 dependent adds/maxes per row (softmax 12x128x128:
    3.7x onnxruntime's time)."""

    name = "row-reduction"

    def apply(self, func, target, lanes):
        from tvm import s_tir
        from tvm.tirx import IterVar

        if not _ROW_REDUCTION:
            return None
        sch = s_tir.Schedule(func)
        if _INLINE_ARG_COPIES:
            _inline_arg_copies(sch, func)
        blocks = sch.get_child_blocks(root_block(sch))
        stmts = [sch.get(b) for b in blocks]
        reds = [st for st in stmts if is_reduction(st)]
        if not reds or is_reduction(stmts[-1]):
            return None
        for st in reds:
            kinds = [iv.iter_type for iv in st.iter_vars]
            if kinds.count(IterVar.CommReduce) != 1 or kinds[-1] != IterVar.CommReduce or len(st.writes) != 1:
                return None
            # a row reduction: the reduced axis indexes the last dimension of what it reads
            rv = st.iter_vars[-1].var
            block_vars = {iv.var for iv in st.iter_vars}
            if not any(region_vars(r, block_vars) and region_vars(r, block_vars)[-1] == {rv} for r in st.reads):
                return None
            if len({r.source.name for r in st.reads if not r.source.same_as(st.writes[0].source)}) > 1 and \
                    _mac_like(st):
                return None  # a matmul: not this rule's
        # one result per row: the reductions' spatial domain is the output's rows (x - mean(x) written
        # transposed would recompute every row's mean for each output row)
        out_rows = [static_int(sch.get(lp).extent) for lp in sch.get_loops(blocks[-1])[:-1]]
        out_rows = [e for e in out_rows if e != 1]
        for st in reds:
            dom = [e for e in (static_int(iv.dom.extent) for iv in st.iter_vars[:-1]) if e != 1]
            if dom != out_rows:
                return None
        # reductions: `lanes` partial results (rfactor) accumulated as one vector, summed at the end
        rf_blocks = []
        for block in blocks:
            stmt = sch.get(block)
            if not is_reduction(stmt):
                continue
            k = sch.get_loops(block)[-1]
            ext = static_int(sch.get(k).extent)
            if ext is None or ext % lanes or ext < 2 * lanes:
                continue
            _, ki = sch.split(k, factors=[None, lanes])
            rf_blocks.append(sch.rfactor(ki, factor_axis=len(stmt.writes[0].region)))
        blocks = sch.get_child_blocks(root_block(sch))
        last = blocks[-1]
        loops = sch.get_loops(last)
        if len(loops) < 2 or (static_int(sch.get(loops[-1]).extent) is None and not _SYMBOLIC_ROWS):
            return None  # (a symbolic row length, softmax over S: rows parallel, not vectorised)
        row = fuse_parallel(sch, loops[:-1])
        for block in reversed(blocks[:-1]):
            sch.compute_at(block, row, preserve_unit_loops=False)
        row_var = sch.get(row).loop_var  # (the For node itself is replaced as its body changes)
        rf_names = {sch.get(b).name_hint for b in rf_blocks}
        for name in [sch.get(b).name_hint for b in sch.get_child_blocks(root_block(sch))]:
            block = sch.get_sblock(name)
            stmt = sch.get(block)
            bl = sch.get_loops(block)
            pos = next((i for i, lp in enumerate(bl) if sch.get(lp).loop_var.same_as(row_var)), None)
            if pos is None or pos == len(bl) - 1:
                continue
            inner = bl[pos + 1:]
            if stmt.name_hint in rf_names:
                # its loops: the partial-result axis (spatial, `lanes`) innermost and vectorised
                spatial_loops = [lp for lp in inner if not _loop_is_reduce(sch, block, lp)]
                red_loops = [lp for lp in inner if _loop_is_reduce(sch, block, lp)]
                if len(spatial_loops) != 1 or len(red_loops) != 1:
                    continue
                sch.reorder(red_loops[0], spatial_loops[0])
                sch.vectorize(spatial_loops[0])
                init = sch.decompose_reduction(block, red_loops[0])
                sch.vectorize(sch.get_loops(init)[-1])
            elif not is_reduction(stmt):
                ext = static_int(sch.get(inner[-1]).extent)
                if ext is None or ext % lanes or ext < 2 * lanes:
                    continue
                _, vi = sch.split(inner[-1], factors=[None, lanes])
                sch.vectorize(vi)
        return sch


def _is_reduce_iv(iv) -> bool:
    from tvm.tirx import IterVar

    return iv.iter_type == IterVar.CommReduce


def _loop_is_reduce(sch, block, loop) -> bool:
    """Whether `loop` drives a reduction iter var of `block` (that var's binding uses the loop var)."""
    import tvm_ffi

    stmt = sch.get(block)
    realize = tvm_ffi.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    lv = sch.get(loop).loop_var
    return any(_is_reduce_iv(iv) and lv in _vars_in(val) for iv, val in zip(stmt.iter_vars, realize.iter_values))


def _mac_like(stmt) -> bool:
    """`acc = acc + x[..] * y[..]` (casts allowed): a matmul/conv, not a sum of squares of
    differences (layer norm's variance)."""
    from tvm import tirx

    def load(e: Any) -> bool:
        while isinstance(e, tirx.Cast):
            e = e.value
        return type(e).__name__ in ("BufferLoad", "TensorLoad")

    v = getattr(stmt.body, "value", None)
    if not isinstance(v, tirx.Add):
        return False
    mul = v.b if load(v.a) else v.a
    return isinstance(mul, tirx.Mul) and load(mul.a) and load(mul.b)


class _DlightRule(ScheduleRule):
    def __init__(self, rule: Any, name: str) -> None:
        self.rule = rule
        self.name = name

    def apply(self, func, target, lanes):
        with target:
            return self.rule.apply(func, target, False)


def default_rules(target: "tvm.target.Target") -> list[ScheduleRule]:
    from tvm.s_tir import dlight as dl

    from .nchwc import BlockedConv  # channel-blocked (NCHW8c) convs; declines the rest
    from .winograd import WinogradConv  # winograd_ops' kernels; declines the rest

    return [
        Injective(),
        WinogradConv(),
        BlockedConv(),
        OuterProduct(),
        SymbolicColumns(),
        WindowReduction(),
        RowReduction(),
        _DlightRule(dl.cpu.GEMV(), "dlight-gemv"),
        _DlightRule(dl.cpu.Reduction(), "dlight-reduction"),
        _Fallback(),
    ]


class _Fallback(ScheduleRule):
    """Anything else: parallelise each root block's outermost loops (no vectorisation)."""

    name = "fallback-parallel"

    def apply(self, func, target, lanes):
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        for block in sch.get_child_blocks(root_block(sch)):
            stmt = sch.get(block)
            loops = sch.get_loops(block)
            if not loops:
                continue
            if is_reduction(stmt):
                # parallel only over leading spatial loops
                from tvm.tirx import IterVar

                n_s = 0
                for iv in stmt.iter_vars:
                    if iv.iter_type != IterVar.DataPar:
                        break
                    n_s += 1
                n_s = min(n_s, len(loops))
                if n_s == 0:
                    continue
                lead = loops[:n_s]
                fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
                sch.parallel(fused)
            else:
                _schedule_injective_block(sch, block, 1)
        return sch


def default_schedule(
    func: "tvm.tirx.PrimFunc",
    target: "tvm.target.Target",
    rules: Sequence[ScheduleRule] | None = None,
) -> tuple["tvm.s_tir.Schedule | None", str | None, list[str]]:
    """The default schedule of one PrimFunc as a traced Schedule (its trace replays on the same
    workload, which is how tuning stores it as a database record): (schedule or None, rule name,
    failure notes)."""
    lanes = vector_lanes(target)
    rules = list(rules) if rules is not None else default_rules(target)
    notes: list[str] = []
    for rule in rules:
        try:
            sch = rule.apply(func, target, lanes)
        except Exception as exc:  # a schedule primitive refused: try the next rule
            msg = str(exc).strip().splitlines()
            notes.append(f"{rule.name}: {msg[-1] if msg else type(exc).__name__}")
            continue
        if sch is None:
            continue
        return sch, rule.name, notes
    return None, None, notes


def schedule_prim_func(
    func: "tvm.tirx.PrimFunc",
    target: "tvm.target.Target",
    rules: Sequence[ScheduleRule] | None = None,
    name: str = "main",
) -> tuple["tvm.tirx.PrimFunc | None", str | None, list[str]]:
    """Schedule one PrimFunc: (scheduled func or None, rule name, failure notes)."""
    sch, rule, notes = default_schedule(func, target, rules)
    return (sch.mod["main"] if sch is not None else None), rule, notes


# Eigen's float32 erf (the rational approximation TVM's topi.fast_erf and onnxruntime's MLAS
# use): max abs error 4.2e-7 against math.erf over [-6, 6]
_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
              -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
             -1.42647390514189e-02)
_FAST_ERF_REGISTERED = False


def _libm_per_lane(dtype: str, name: str, x: Any) -> Any:
    """libm's scalar `name` (double) applied to `x`: one call per lane for a vector (a vectorised
    loop's float64 exp/erf reaches this lowering as a vector; one extern call with a vector
    argument gave garbage lanes: ReduceLogSumExp on float64 returned nan / -inf)."""
    from tvm import tirx

    if "x" not in dtype:
        return tirx.call_pure_extern(dtype, name, x)
    scalar, lanes = dtype.split("x")[0], int(dtype.split("x")[1])
    parts = [tirx.call_pure_extern(scalar, name, tirx.Shuffle([x], [tirx.const(i, "int32")])) for i in range(lanes)]
    return tirx.Shuffle(parts, [tirx.const(i, "int32") for i in range(lanes)])


def _fast_erf(call: Any) -> Any:
    """LLVM lowering of `tirx.erf`: the polynomial for float32 (scalar or vector); libm's erf
    for other types. LLVM's default is a call to libm's erff per element, which the vectoriser
    cannot vectorise: the GELU epilogue of a 128x768x3072 dense ran 2.4x onnxruntime's time."""
    from tvm import tirx

    x = call.args[0]
    dtype = str(x.ty)
    if not dtype.startswith("float32"):
        if dtype.startswith("float64"):
            return _libm_per_lane(dtype, "erf", x)
        return tirx.Cast(dtype, _fast_erf(tirx.Call(dtype.replace(dtype.split("x")[0], "float32", 1),
                                                     call.op, [tirx.Cast(dtype.replace(dtype.split("x")[0], "float32", 1), x)])))
    xc = tirx.max(tirx.min(x, 4.0), -4.0)
    x2 = xc * xc
    p = x2 * _ERF_ALPHA[0] + _ERF_ALPHA[1]
    for c in _ERF_ALPHA[2:]:
        p = x2 * p + c
    p = xc * p
    q = x2 * _ERF_BETA[0] + _ERF_BETA[1]
    for c in _ERF_BETA[2:]:
        q = x2 * q + c
    out = tirx.max(tirx.min(p / q, 1.0), -1.0)  # (the polynomial overshoots 1 by an ulp at 4)
    return tirx.Select(tirx.isnan(x), x, out)


# Cephes expf: exp(x) = 2^n * p(r), r = x - n ln2, |r| <= ln2/2 (1-2 ulp)
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _fast_exp(call: Any) -> Any:
    """LLVM lowering of `tirx.exp` for float32 (scalar or vector): range reduction and a
    polynomial, vectorisable, instead of a libm expf call per element (softmax ran 3.9x and
    x*sigmoid(x) 2x onnxruntime's time with them). NaN stays NaN; overflow saturates at the
    largest finite value's neighbourhood (exp(88.37)); underflow gives 0. Other types: libm."""
    from tvm import tirx

    x = call.args[0]
    dtype = str(x.ty)
    if not dtype.startswith("float32"):
        if dtype.split("x")[0] == "float64":
            return _libm_per_lane(dtype, "exp", x)
        # float16 / bfloat16: the float32 polynomial on the widened value (tirx has no Call
        # constructor in 0.27 to build a float32 exp call from)
        f32 = dtype.replace(dtype.split("x")[0], "float32", 1)
        return tirx.Cast(dtype, _exp_f32(tirx.Cast(f32, x), f32))
    return _exp_f32(x, dtype)


def _exp_f32(x: Any, dtype: str) -> Any:
    """The float32 (scalar or vector) exp polynomial of `_fast_exp`."""
    from tvm import tirx

    itype = dtype.replace("float32", "int32", 1)
    xc = tirx.max(tirx.min(x, 88.3762626647949), -88.3762626647949)
    n = tirx.floor(xc * 1.44269504088896341 + 0.5)
    r = xc - n * 0.693359375 - n * -2.12194440e-4  # ln2 in two parts (Cephes C1, C2)
    z = r * r
    y = r * _EXP_P[0] + _EXP_P[1]
    for c in _EXP_P[2:]:
        y = y * r + c
    y = y * z + r + 1.0
    scale = tirx.reinterpret(dtype, (tirx.Cast(itype, n) + 127) << 23)
    out = y * scale
    inf = tirx.const(float("inf"), "float32")
    if "x" in dtype:
        inf = tirx.Broadcast(inf, int(dtype.split("x")[1]))
    out = tirx.Select(x > 88.72283905206835, inf, out)  # overflow: inf, as expf gives
    return tirx.Select(tirx.isnan(x), x, out)  # NaN in, NaN out (min/max would have dropped it)


_FAST_MATH = {"tirx.erf": _fast_erf, "tirx.exp": _fast_exp}


def use_fast_erf() -> None:
    """Lower `tirx.erf` and `tirx.exp` on LLVM targets with `_fast_erf` / `_fast_exp` from now
    on in this process (the default schedules call it: it is what makes GELU, softmax and
    sigmoid vectorise)."""
    global _FAST_ERF_REGISTERED
    if _FAST_ERF_REGISTERED:
        return
    from tvm.tirx.op import register_intrin_lowering

    for op, f in _FAST_MATH.items():
        register_intrin_lowering(op, "llvm", f=f, level=99)
    _FAST_ERF_REGISTERED = True


def apply_default_schedules(
    mod: "tvm.IRModule",
    target: "tvm.target.Target",
    stats: ScheduleStats | None = None,
    serial_small: bool = False,
) -> "tvm.IRModule":
    """Schedule every unscheduled PrimFunc of `mod` for a CPU `target` (see module docstring);
    `serial_small`: kernels too small to split across threads get no parallel loop
    (`serial_if_small`; the build asks for it, the schedule rules' own tests look at the rules).

    Functions already marked `tirx.is_scheduled` (e.g. from a tuning database) are left alone.
    Returns a new IRModule; `stats`, when given, records which rule scheduled which function.
    """
    import tvm
    from tvm import tirx

    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)
    if str(target.kind.name) == "llvm" and _FAST_ERF:
        use_fast_erf()
    from ...machine import machine_model
    from ..tir_match import kernel_flops

    machine = machine_model(target)
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        scheduled = func.attrs is not None and int(func.attrs.get("tirx.is_scheduled", 0)) == 1
        if stats is not None:
            try:
                # (symbolic dims as 1: a symbolic-batch kernel on a generic schedule is reported too)
                stats.flops[gv.name_hint] = 0.0 if scheduled else kernel_flops(func, symbolic_as=1.0)
            except Exception:  # noqa: BLE001 - a kernel the counter does not understand counts 0
                stats.flops[gv.name_hint] = 0.0
        if scheduled:
            continue
        new, rule, notes = schedule_prim_func(func, target)
        if stats is not None:
            if notes:
                stats.failures[gv.name_hint] = notes
            stats.by_func[gv.name_hint] = rule or "none"
        if new is not None:
            if serial_small:
                new = serial_if_small(new, func, machine)
            updates[gv] = new.with_attr("tirx.is_scheduled", True)
    if not updates:
        return mod
    mod = mod.shallow_copy() if hasattr(mod, "shallow_copy") else tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def _param_bytes(func: "tvm.tirx.PrimFunc") -> float | None:
    """Bytes of the kernel's buffer parameters (None when one has a symbolic shape)."""
    total = 0.0
    for p in func.params:
        buf = func.buffer_map.get(p) if hasattr(func, "buffer_map") and p in func.buffer_map else p
        shape = getattr(buf, "shape", None)
        if shape is None:
            continue  # (a scalar parameter)
        n = 1
        for d in shape:
            v = static_int(d)
            if v is None:
                return None
            n *= v
        total += n * max(tvm_dtype_bits(str(buf.dtype)) // 8, 1)
    return total


def tvm_dtype_bits(dtype: str) -> int:
    import tvm

    return int(tvm.DataType(dtype).bits) * max(int(tvm.DataType(dtype).lanes), 1)


def serial_if_small(scheduled: "tvm.tirx.PrimFunc", original: "tvm.tirx.PrimFunc", machine: Any) -> "tvm.tirx.PrimFunc":
    """`scheduled` with its parallel loops made serial when `original` (its unscheduled form) is
    a small kernel on `machine` (`MachineModel.runs_serially`: its FLOPs and the bytes of its
    parameters): a parallel launch costs more than it saves there. Kept as it is when the work
    is unknown (symbolic shapes), the machine has one core, or the function does not round-trip
    through TVMScript (there is no statement mutator in the Python API)."""
    import tvm

    from ..tir_match import kernel_flops

    if getattr(machine, "cores", 1) <= 1:
        return scheduled
    text = scheduled.script()
    if "T.parallel(" not in text:
        return scheduled
    nbytes = _param_bytes(original)
    try:
        flops = kernel_flops(original)
    except Exception:  # noqa: BLE001 - a kernel the counter does not understand: keep it parallel
        return scheduled
    if nbytes is None or not machine.runs_serially(flops, nbytes):
        return scheduled
    try:
        serial = tvm.script.from_source(text.replace("T.parallel(", "T.serial("))
    except Exception:  # noqa: BLE001 - TVMScript that does not parse back: keep it parallel
        return scheduled
    return serial.with_attrs(scheduled.attrs) if scheduled.attrs is not None else serial


def is_tunable_kernel(func: "tvm.tirx.PrimFunc") -> bool:
    """True for kernels worth tuning: a reduction over a product of two tensors (conv, dense,
    matmul, depthwise conv), i.e. where meta_schedule beats the default schedules."""
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(root_block(sch))
    except Exception:
        return False
    for block in blocks:
        stmt = sch.get(block)
        if not is_reduction(stmt) or len(stmt.writes) != 1:
            continue
        out = stmt.writes[0].source
        if len({r.source.name for r in stmt.reads if not r.source.same_as(out)}) >= 2:
            return True
    return False

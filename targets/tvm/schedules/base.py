"""The public base of the default schedules: `ScheduleRule` (what a rule implements),
`ScheduleStats`, and the TIR schedule helpers the rules share (block queries, inlining the
prologue copies and the epilogue, fusing the parallel loops, the injective fallback for the rest).
A new rule subclasses `ScheduleRule` in a module of its own and takes its place in
`default.default_rules`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..tir_match import static_int
from . import knobs

if TYPE_CHECKING:  # tvm is an optional dependency: import it lazily
    import tvm

__all__ = ["ScheduleRule", "ScheduleStats", "GENERIC_RULES", "LAYOUT_REWRITE_ANN", "vector_lanes", "vars_in", "region_vars", "root_block", "is_reduction", "divisors_of", "schedule_injective_block", "fuse_parallel", "launch_work", "small_launch", "inline_arg_copies", "one_reduction", "inline_copies", "inline_consumers", "merge_epilogue_branches", "schedule_rest", "branch_kernels"]


#: Block annotation that SplitLayoutRewritePreproc looks for (weight-packing blocks).
LAYOUT_REWRITE_ANN = "meta_schedule.layout_rewrite_preproc"



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
        rows: list[dict[str, Any]] = [{"kernel": k, "rule": r, "gflop": round(self.flops.get(k, 0.0) / 1e9, 6),
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


def vars_in(expr: Any) -> set:
    import tvm_ffi
    from tvm import tirx

    found: set = set()
    tvm_ffi.structural_walk(expr, (tirx.Var, found.add), order="post")
    return found


def region_vars(region: Any, block_vars: set) -> list[set]:
    """Per-dimension sets of block iter vars used by a buffer access region."""
    return [(vars_in(r.min) & block_vars) for r in region.region]


def root_block(sch: "tvm.s_tir.Schedule") -> Any:
    func = sch.mod["main"]
    return sch.get_sblock(func.body.block.name_hint)


def is_reduction(stmt: Any) -> bool:
    from tvm.tirx import IterVar

    return any(iv.iter_type == IterVar.CommReduce for iv in stmt.iter_vars)


def divisors_of(n: int) -> list[int]:
    """Divisors of n in increasing order (O(√n): a batch of 2**40 made the loop run for minutes)."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def schedule_injective_block(
    sch: "tvm.s_tir.Schedule", block: Any, lanes: int, max_parallel_loops: int | None = None, machine: Any = None
) -> None:
    """Parallel over the outer loops, vectorise the innermost (when it splits evenly); `machine`:
    the target's machine model, for `fuse_parallel`."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [static_int(sch.get(lp).extent) for lp in loops]
    if (len(loops) > 1 and extents[-1] is not None and extents[-1] % lanes and not sch.get(block).reads
            and all(e is not None for e in extents) and math.prod(e or 0 for e in extents) % lanes == 0):
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
        fuse_parallel(sch, outer, machine, serial_symbolic_inner=knobs.current().serial_symbolic_inner)
    if vec is not None:
        sch.vectorize(vec)


#: a parallel loop of fewer iterations than this under serial symbolic loops takes them in
_FEW_PARALLEL = 16


def fuse_parallel(sch: "tvm.s_tir.Schedule", loops: Sequence[Any], machine: Any = None,
                  serial_symbolic_inner: bool = False) -> Any:
    """Fuse `loops` into one parallel loop and return it. Leading loops of symbolic extent (a
    dynamic batch) stay serial outside: fused with them, every index inside is recovered with
    divisions by symbolic values (ResNet-50 with a symbolic batch ran 1.7x slower than with
    batch 1 fixed, same schedules) ... unless what remains is a handful of iterations, or (given
    the target's `machine` model) one launch of it is little work (`small_launch`): then the
    symbolic loops join the parallel loop, outermost, so the indices come from divisions by the
    static extents inside. `for n in range(N): parallel(900 pixels of a pad)` launched the thread
    pool N times for ~1 µs of work each: a small-map CNN at batch 64 spent most of its pads' and
    stems' time in launches (mnist_resnet8: the pads of its flat convs, the 28-row stem, the
    Winograd input transforms). Must not fire where a launch of the static rest is long enough
    to pay for itself (a 56x56 conv's rows keep the serial batch loop outside, as before).

    `serial_symbolic_inner` (injective kernels, whose loops carry no tile state): the loops after
    the first symbolic one stay serial inside the parallel loop where one of them is symbolic too
    ([C/b, H, W] of an upsampled blocked map: `C/b x H` parallel, `W` serial inside, one division
    by H per row instead of three by H·W, H and W per vector); not for tiled kernels, whose
    write-back is computed at the returned loop."""
    loops = list(loops)
    lead = 0
    while lead < len(loops) - 1 and static_int(sch.get(loops[lead]).extent) is None:
        lead += 1
    rest_ext = [static_int(sch.get(lp).extent) for lp in loops[lead:]]
    # ... unless what remains is a handful of iterations (an encoder's head split: S serial
    # around a parallel loop over 4 heads, one thread-pool launch per token)
    few = lead > 0 and all(e is not None for e in rest_ext) and math.prod(e or 0 for e in rest_ext) < _FEW_PARALLEL
    small = (lead > 0 and not few and machine is not None and knobs.current().symbolic_small_launch
             and small_launch(sch, loops[lead:], machine))
    rest = loops[lead:] if knobs.current().serial_symbolic_outer and not few and not small else loops
    if serial_symbolic_inner and rest is not loops:
        sym = [i for i, lp in enumerate(rest) if static_int(sch.get(lp).extent) is None]
        if len(sym) > 1:
            rest = rest[: sym[0] + 1]
    fused = sch.fuse(*rest) if len(rest) > 1 else rest[0]
    sch.parallel(fused)
    return fused


def launch_work(sch: "tvm.s_tir.Schedule", loops: Sequence[Any]) -> tuple[float, float] | None:
    """(FLOPs, bytes) of one pass over the nested `loops` (outermost first, static extents): per
    block under the innermost, its iterations (2 FLOPs each in a reduction, else an element
    stored and each of its reads loaded, 4 bytes each) times the extents of the loops between.
    None where an extent is symbolic or the loops are not nested."""
    total = 1
    for lp in loops:
        e = static_int(sch.get(lp).extent)
        if e is None:
            return None
        total *= e
    inner = sch.get(loops[-1])
    flops = nbytes = 0.0
    for block in sch.get_child_blocks(loops[-1]):
        bl = sch.get_loops(block)
        at = next((k for k, lp in enumerate(bl) if sch.get(lp).same_as(inner)), None)
        if at is None:
            return None
        iters = 1
        for lp in bl[at + 1:]:
            e = static_int(sch.get(lp).extent)
            if e is None:
                return None
            iters *= e
        stmt = sch.get(block)
        if is_reduction(stmt):
            flops += 2.0 * iters
        else:
            nbytes += 4.0 * iters * (1 + len(stmt.reads))
    return flops * total, nbytes * total


def small_launch(sch: "tvm.s_tir.Schedule", loops: Sequence[Any], machine: Any) -> bool:
    """Whether one parallel launch over `loops` (`launch_work`) is under the machine model's
    `LAUNCH_AMORTISED_S` of one core's work (`MachineModel.core_seconds`); False where unknown."""
    work = launch_work(sch, loops)
    return work is not None and machine.core_seconds(*work) < machine.LAUNCH_AMORTISED_S


# --------------------------------------------------------------------------- rules


class ScheduleRule:
    name = "rule"

    def apply(self, func: Any, target: Any, lanes: int) -> "tvm.s_tir.Schedule | None":
        raise NotImplementedError


def _is_copy(stmt) -> bool:
    """A block whose body stores one loaded value: it moves data, computes nothing."""
    body = stmt.body
    return type(body).__name__ == "BufferStore" and type(body.value).__name__ in ("TensorLoad", "BufferLoad")


def inline_arg_copies(sch, func) -> None:
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
    if knobs.current().inline_arg_copies:
        inline_arg_copies(sch, func)
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
        if is_reduction(stmt) or LAYOUT_REWRITE_ANN in stmt.annotations:
            continue  # (a weight packing block the lowering marked: the build hoists it whole)
        if moves_only and not _is_copy(stmt):
            # (a pad stays one block with its condition: BlockedConv's flat padded convs, 2
            # threads, 3x3 128 on 28x28 1.20 ms against 1.23 ms with the fill + copy below)
            continue
        if "if_then_else" in str(stmt.body):
            if knobs.current().decompose_padding:
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


def fold_prologue(sch, anchor) -> None:
    """compute_inline each elementwise block before the anchor into its one consumer, when that
    consumer is another elementwise block the anchor reads through (never the anchor, its
    epilogue or a reduction) over the same points (same rank, each dim equal or a constant
    more: a pad's interior copy). A chain like a VAD's log-magnitude before its conv (square,
    square, add, sqrt, add, log, pad: 8 parallel passes over [N, 129, F]) becomes one
    materialised pass. Not: a block with several consumers (its work would be repeated), one a
    broadcast reads (a per-channel value recomputed per pixel), weight packs (annotated)."""
    import tvm

    anchor_name = sch.get(anchor).name_hint
    ana = tvm.sym.Analyzer()

    def same_points(a, b) -> bool:
        sa, sb = list(a.writes[0].source.shape), list(b.writes[0].source.shape)
        if len(sa) != len(sb):
            return False
        for da, db in zip(sa, sb):
            d = static_int(ana.simplify(db - da))
            if d is None or not 0 <= d <= 16:
                return False
        return True

    def upstream() -> set[str]:  # the blocks the anchor reads through (never its epilogue)
        seen: set[str] = set()
        frontier = list(sch.get_producers(anchor))
        while frontier:
            b = frontier.pop()
            name = sch.get(b).name_hint
            if name not in seen:
                seen.add(name)
                frontier.extend(sch.get_producers(b))
        return seen

    changed = True
    while changed:
        changed = False
        before = upstream()
        for block in sch.get_child_blocks(root_block(sch)):
            stmt = sch.get(block)
            if stmt.name_hint not in before or is_reduction(stmt) or len(stmt.writes) != 1 or stmt.annotations:
                continue
            consumers = sch.get_consumers(block)
            if len(consumers) != 1:
                continue
            c = sch.get(consumers[0])
            if c.name_hint == anchor_name or c.name_hint not in before or is_reduction(c) or len(c.writes) != 1 or c.annotations:
                continue
            if not same_points(stmt, c):
                continue
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 - left where it is
                continue
            changed = True
            break


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
        # (shapes compared as expressions: a symbolic S and S rounded up to the tile both have no
        # static extent, and are not the same)
        same = _same_shape(c_stmt.writes[0].source.shape, wb_stmt.writes[0].source.shape)
        if not same and len(sch.get_loops(wb)) <= len(wb_stmt.iter_vars):
            return  # (at the root: inlined after reverse_compute_at, if the rule does that)
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:
            if knobs.current().inline_guard_constants and _inline_constant_producers(sch, consumers[0], wb):
                continue
            if int8 and merge_epilogue_branches(sch, wb):
                continue
            return


def _inline_constant_producers(sch: "tvm.s_tir.Schedule", block: Any, wb: Any) -> bool:
    """compute_inline the producers of epilogue `block` other than the write-back `wb` that
    read nothing computed (a float Subtract's `ieee_guard` copy of its constant operand,
    lower/legalize.py): with them in place reverse_compute_inline refuses `block` (two
    producers), and the rest of the epilogue ran as passes of its own over the output (a
    requantize-dequantize before int8 mnist_resnet8's residual adds: a subtract and a multiply
    pass over each shortcut conv's output). True when one moved."""
    moved = False
    wb_name = sch.get(wb).name_hint
    for p in sch.get_producers(block):
        if sch.get(p).name_hint == wb_name or sch.get_producers(p):
            continue
        try:
            sch.compute_inline(p)
            moved = True
        except Exception:  # noqa: BLE001 - left where it is
            pass
    return moved


def _same_shape(a: Any, b: Any) -> bool:
    import tvm_ffi

    return len(a) == len(b) and all(static_int(x) == static_int(y) if static_int(x) is not None else
                                    tvm_ffi.structural_equal(x, y) for x, y in zip(a, b))


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


def schedule_rest(sch, done: set[str], lanes: int, machine: Any = None) -> None:
    """Injective schedule for the root-level blocks a rule did not place (pads, packs, tails);
    `machine`: the target's machine model, for `fuse_parallel`."""
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
            schedule_injective_block(sch, block, lanes, machine=machine)
        except Exception:
            pass


def top_level_statements(lines: list[str]) -> list[list[str]] | None:
    """The statements of a root block's body in TVMScript lines (4-space indent), each with its
    nested lines (an `else:` / `elif` stays with its `if`); blank lines dropped. None when a
    line comes before the first statement."""
    chunks: list[list[str]] = []
    for ln in lines:
        if not ln.strip():
            continue
        starts = ln.startswith("    ") and not ln.startswith("     ")
        if starts and ln != "    else:" and not ln.startswith("    elif "):
            chunks.append([ln])
        elif chunks:
            chunks[-1].append(ln)
        else:
            return None
    return chunks


def root_parts(text: str) -> tuple[list[str], list[str], list[list[str]]] | None:
    """A scheduled kernel's TVMScript as (the lines up to the root block, its buffer allocations,
    its top-level statements: `top_level_statements`); None when it is not in that form."""
    import re

    lines = text.split("\n")
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == '# with T.sblock("root"):') + 1
    except StopIteration:
        return None
    i = start
    while i < len(lines) and re.match(r"^    \w+ = T\.sblock_alloc_buffer\(", lines[i]):
        i += 1
    chunks = top_level_statements(lines[i:])
    return None if chunks is None else (lines[:start], lines[start:i], chunks)


def branch_kernels(cond: str, then_text: str, else_text: str, suffix: str) -> str | None:
    """One kernel's TVMScript from two schedules of it: `if cond: <then_text's statements> else:
    <else_text's>`, the signature and attributes of `else_text`. The then-kernel's buffers and
    blocks get `suffix`; top-level statements that pack weights (LAYOUT_REWRITE_ANN, hoisted to
    load time by the build) stay outside the branch, both kernels' packs side by side. None when
    either text is not in the expected form."""
    import re

    t, e = root_parts(then_text), root_parts(else_text)
    if t is None or e is None:
        return None
    then_lines = "\n".join(t[1] + ["@@BODY@@"] + ["\n".join(c) for c in t[2]])
    for ln in t[1]:
        buf = ln.split("=", 1)[0].strip()
        then_lines = re.sub(rf"\b{buf}\b", f"{buf}{suffix}", then_lines)
    then_lines = re.sub(r'T\.sblock\("([\w.]+)"\)', rf'T.sblock("\1{suffix}")', then_lines)
    allocs_t, body_t = then_lines.split("\n@@BODY@@")
    packs: list[str] = []
    branch_t: list[str] = []
    stmts_t = top_level_statements(body_t.split("\n")) or []
    allocs = [a for a in allocs_t.split("\n") if a.strip()]
    branch_e: list[str] = []
    for c in e[2]:
        (packs if LAYOUT_REWRITE_ANN in "\n".join(c) else branch_e).extend(c)
    e_packs = "\n".join(packs)
    for c in stmts_t:
        if LAYOUT_REWRITE_ANN not in "\n".join(c):
            branch_t.extend(c)
            continue
        # a weight pack: the build lifts one per weight, so the then-kernel must read the
        # else-kernel's packed buffer, packed the same way (same tile), or there is no branch
        plain = "\n".join(c).replace(suffix, "")
        if plain not in e_packs:
            return None
        bufs = set(re.findall(rf"\b(\w+){suffix}\b", "\n".join(c)))
        for buf in bufs:
            mine = next((a for a in allocs if a.startswith(f"    {buf}{suffix} = ")), None)
            if mine is not None:
                if mine.replace(suffix, "") not in e[1]:
                    return None
                allocs.remove(mine)
    # (the then-kernel's reads of a packed buffer it shares: the else-kernel's name)
    for a in list(e[1]):
        buf = a.split("=", 1)[0].strip()
        if any(f"{buf}{suffix}" in ln for ln in branch_t) and not any(x.startswith(f"    {buf}{suffix} = ") for x in allocs):
            branch_t = [re.sub(rf"\b{buf}{suffix}\b", buf, ln) for ln in branch_t]
    if not branch_t or not branch_e:
        return None
    return "\n".join(e[0] + e[1] + allocs + packs + [f"    if {cond}:"] + ["    " + ln for ln in branch_t]
                     + ["    else:"] + ["    " + ln for ln in branch_e])

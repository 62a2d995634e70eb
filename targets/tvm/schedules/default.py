"""The rule order and the entry points: `default_rules` (every rule, tried in order per PrimFunc; a
rule that raises is skipped and the next one tried, so a surprising kernel falls back to a simpler
schedule instead of failing the compile), `default_schedule` / `schedule_prim_func` (one
PrimFunc) and `apply_default_schedules` (every unscheduled PrimFunc of a module)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..tir_match import static_int
from . import knobs
from .base import ScheduleRule, ScheduleStats, is_reduction, root_block, vector_lanes
from .fallback import DlightRule, Fallback
from .fast_math import use_fast_erf, use_vector_isnan, vectorisable_rounding
from .injective import Injective
from .nchwc import BlockedConv
from .outer_product import OuterProduct
from .pointwise import PointwisePlain
from .row_reduction import RowReduction
from .symbolic_columns import SymbolicColumns
from .window import WindowReduction
from .winograd import WinogradConv

if TYPE_CHECKING:  # tvm is an optional dependency: import it lazily
    import tvm

__all__ = ["default_rules", "default_schedule", "schedule_prim_func", "apply_default_schedules", "serial_if_small", "is_tunable_kernel", "tvm_dtype_bits"]


def default_rules(target: "tvm.target.Target") -> list[ScheduleRule]:
    from tvm.s_tir import dlight as dl

    return [
        Injective(),
        WinogradConv(),  # kernels.winograd's kernels; declines the rest
        PointwisePlain(),  # kernels.blocked.pointwise_to_plain's; declines the rest
        BlockedConv(),  # channel-blocked (NCHW8c) convs; declines the rest
        OuterProduct(),
        SymbolicColumns(),
        WindowReduction(),
        RowReduction(),
        DlightRule(dl.cpu.GEMV(), "dlight-gemv"),
        DlightRule(dl.cpu.Reduction(), "dlight-reduction"),
        Fallback(),
    ]


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


def apply_default_schedules(
    mod: "tvm.IRModule",
    target: "tvm.target.Target",
    stats: ScheduleStats | None = None,
    serial_small: bool = False,
    schedule_knobs: "knobs.ScheduleKnobs | None" = None,
) -> "tvm.IRModule":
    """Schedule every unscheduled PrimFunc of `mod` for a CPU `target` (see module docstring);
    `serial_small`: kernels too small to split across threads get no parallel loop
    (`serial_if_small`; the build asks for it, the schedule rules' own tests look at the rules).

    Functions already marked `tirx.is_scheduled` (e.g. from a tuning database) are left alone.
    Returns a new IRModule; `stats`, when given, records which rule scheduled which function.
    `schedule_knobs`: refinements switched off (knobs.py; None: the current ones).
    """
    with knobs.using(schedule_knobs):
        return _apply_default_schedules(mod, target, stats, serial_small)


def _apply_default_schedules(mod: "tvm.IRModule", target: "tvm.target.Target", stats: ScheduleStats | None,
                             serial_small: bool) -> "tvm.IRModule":
    import tvm
    from tvm import tirx

    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)
    if str(target.kind.name) == "llvm" and knobs.current().fast_erf:
        use_fast_erf()
    llvm = str(target.kind.name) == "llvm"
    use_vector_isnan(llvm and knobs.current().vector_isnan)
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
            if llvm and knobs.current().vector_rounding:
                new = vectorisable_rounding(func)
                if not new.same_as(func):
                    updates[gv] = new
            continue
        sch, rule, notes = default_schedule(func, target)
        if stats is not None:
            if notes:
                stats.failures[gv.name_hint] = notes
            stats.by_func[gv.name_hint] = rule or "none"
        if sch is not None:
            new = serial_if_small(sch, func, machine, rule=rule) if serial_small else sch.mod["main"]
            if llvm and knobs.current().vector_rounding:
                new = vectorisable_rounding(new)
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


#: rules whose kernels are not compiled twice for a run-time serial branch: channel-blocked convs
#: and windows, heavily unrolled micro-kernels whose second copy tripled a conv net's LLVM time
#: (crnn_dyn 15 -> 42 s) for launches that are a small share of their work
_NO_SERIAL_BRANCH = frozenset({"blocked-conv", "blocked-window", "winograd-conv"})


def serial_if_small(sch: "tvm.s_tir.Schedule", original: "tvm.tirx.PrimFunc", machine: Any,
                    rule: str | None = None) -> "tvm.tirx.PrimFunc":
    """The function `sch` scheduled, with its parallel loops serial when `original` (the
    unscheduled form) is a small kernel on `machine` (`MachineModel.runs_serially`: its FLOPs
    and the bytes of its parameters): a parallel launch costs more than it saves there.

    parallel → serial: the schedule's trace is replayed on `original` without its `Parallel`
    instructions (they bind no new loop or block, so the rest of the trace replays unchanged;
    a trace replays on its workload by design, which is how tuning records are applied).
    A kernel with symbolic shapes (its work known only at the call) gets a run-time branch
    instead (`_serial_when_small`; knob `serial_small_symbolic`, not for `rule`s in
    `_NO_SERIAL_BRANCH` but their window kernels, `_serial_branch_allowed`). Kept as it is when the machine has one core, the trace has no Parallel
    instruction (a kernel written with parallel loops in its TIR), or the replay fails."""
    from tvm import s_tir

    from ..tir_match import kernel_flops

    scheduled = sch.mod["main"]
    if getattr(machine, "cores", 1) <= 1:
        return scheduled
    nbytes = _param_bytes(original)
    if nbytes is None:  # (symbolic shapes; a rule's run-time branches come as TIR, not as a trace)
        work = _work_exprs(original) if knobs.current().serial_small_symbolic and _serial_branch_allowed(rule, original, machine) else None
        if work is not None and _can_be_small(work, machine):
            text = scheduled.script()
            if "T.parallel(" in text:
                return _serial_when_small(scheduled, work, machine, text)
        return scheduled
    trace = sch.trace
    if trace is None:
        return scheduled
    kept = [inst for inst in trace.insts if inst.kind.name != "Parallel"]
    if len(kept) == len(trace.insts):
        return scheduled
    try:
        flops = kernel_flops(original)
    except Exception:  # noqa: BLE001 - a kernel the counter does not understand: keep it parallel
        return scheduled
    if nbytes is None or not machine.runs_serially(flops, nbytes):
        return scheduled
    decisions = {inst: trace.get_decision(inst) for inst in kept if trace.get_decision(inst) is not None}
    try:
        serial = s_tir.Schedule(original)
        s_tir.schedule.Trace(kept, decisions).apply_to_schedule(serial, remove_postproc=False)
    except Exception:  # noqa: BLE001 - a trace that does not replay: keep it parallel
        return scheduled
    return serial.mod["main"]


def _serial_branch_allowed(rule: str | None, original: "tvm.tirx.PrimFunc", machine: Any) -> bool:
    """Whether a symbolic kernel scheduled by `rule` may get `_serial_when_small`'s run-time
    branch: not the rules of `_NO_SERIAL_BRANCH`, except (knob `serial_small_windows`) their
    pooling and depthwise kernels (`nchwc.is_blocked_window`): a window of a few unrolled vector
    ops per pixel tile, cheap to compile twice, and on a recognizer's narrow maps (crnn_dyn's
    2x2 and 8x1 max pools at W = 64: 16-80 KB) a parallel launch costs more than the pool."""
    if rule not in _NO_SERIAL_BRANCH:
        return True
    if not knobs.current().serial_small_windows or rule not in ("blocked-conv", "blocked-window"):
        return False
    from .nchwc import is_blocked_window

    return is_blocked_window(original, machine.lanes(32))


def _work_exprs(original: "tvm.tirx.PrimFunc") -> tuple[Any, Any] | None:
    """(FLOPs, bytes of the parameters) of `original` as int64 expressions of its symbolic dims,
    counted as `kernel_flops` and `_param_bytes` count them; None for a kernel they cannot count."""
    from tvm import tirx

    from ..tir_match import mac_flops_terms

    def i64(e: Any) -> Any:
        return e if str(getattr(e, "ty", "int64")) == "int64" else tirx.Cast("int64", e)

    nbytes: Any = tirx.const(0, "int64")
    for p in original.params:
        buf = original.buffer_map.get(p) if hasattr(original, "buffer_map") and p in original.buffer_map else p
        if getattr(buf, "shape", None) is None:
            continue  # (a scalar parameter)
        n: Any = tirx.const(max(tvm_dtype_bits(str(buf.dtype)) // 8, 1), "int64")
        for d in buf.shape:
            n = n * i64(d)
        nbytes = nbytes + n
    flops: Any = tirx.const(0, "int64")
    try:
        for t in mac_flops_terms(original):
            flops = flops + (tirx.const(t, "int64") if isinstance(t, int) else i64(t))
    except Exception:  # noqa: BLE001 - a kernel the counter does not understand
        return None
    return flops, nbytes


def _can_be_small(work: tuple[Any, Any], machine: Any) -> bool:
    """Whether a kernel with symbolic shapes is under the machine's serial limits at some size:
    its work grows with every dim, so at the smallest (every symbol 1) decides. A symbolic-batch
    CNN's elementwise kernels over whole feature maps are over them at batch 1 already, and get
    no run-time branch (each costs a TVMScript print and parse: 0.15 s; int8 EfficientNet-B0 has
    20). `work`: `_work_exprs` of the kernel. True when it cannot be evaluated."""
    import tvm
    from tvm import tirx

    try:
        analyzer = tvm.sym.Analyzer()
        for v in {v for e in work for v in tirx.analysis.undefined_vars(e)}:
            analyzer.bind(v, tirx.const(1, str(v.ty)))
        flops, nbytes = (analyzer.simplify(e) for e in work)
    except Exception:  # noqa: BLE001 - an expression the analyzer cannot bind: assume it can be
        return True
    if not isinstance(flops, tirx.IntImm) or not isinstance(nbytes, tirx.IntImm):
        return True
    max_flops, max_bytes = machine.serial_limits()
    return int(flops.value) < int(max_flops) and int(nbytes.value) < int(max_bytes)


def _serial_when_small(scheduled: "tvm.tirx.PrimFunc", work: tuple[Any, Any], machine: Any,
                       text: str) -> "tvm.tirx.PrimFunc":
    """A kernel with symbolic shapes (its work known only at the call): each top-level loop nest
    with a parallel loop becomes `if small: <the nest, serial> else: <the nest>`, `small` being
    `machine.runs_serially` of the kernel's FLOPs and parameter bytes at the call's sizes (the
    rule that makes a fixed-shape kernel serial at compile time: a parallel launch costs a few µs,
    an encoder's head-split transposes and layer norms at S = 16 ran 2-4x their fixed-shape time
    on two threads). `work`: the kernel's `_work_exprs`. Weight-packing nests (hoisted to load
    time) stay as they are. A local buffer (accumulators) that only the nest uses gets a copy of
    its own in the serial nest (`NAME_ser`): the build's loop marks shift a tile only where its
    accumulators are the tile loop's own (loop_marks). Kept as it is when the TVMScript does not
    parse back."""
    import re

    import tvm
    from tvm import tirx

    from .base import LAYOUT_REWRITE_ANN, root_parts

    max_flops, max_bytes = machine.serial_limits()
    cond = tirx.And(work[0] < tirx.const(int(max_flops), "int64"), work[1] < tirx.const(int(max_bytes), "int64"))
    parts = root_parts(text)
    if parts is None:
        return scheduled
    out = parts[0] + parts[1]
    changed = False
    local_decl = re.compile(r'^    (\w+) = T\.sblock_alloc_buffer\(.*scope="local"\)$')
    locals_ = [(md.group(1), ln) for ln in parts[1] if (md := local_decl.match(ln)) is not None]
    for chunk in parts[2]:
        body = "\n".join(chunk)
        if len(chunk) > 1 and "T.parallel(" in body and LAYOUT_REWRITE_ANN not in body:
            serial = [c.replace("T.parallel(", "T.serial(") for c in chunk]
            for name, decl in locals_:
                word = re.compile(rf"\b{name}\b")
                if word.search(body) and not any(word.search(ln) for other in parts[2] if other is not chunk for ln in other):
                    serial = [word.sub(f"{name}_ser", c) for c in serial]
                    out.insert(len(parts[0]) + len(parts[1]), word.sub(f"{name}_ser", decl, count=1))
            out.append(f"    if {cond}:")
            out.extend("    " + c for c in serial)
            out.append("    else:")
            out.extend("    " + c for c in chunk)
            changed = True
        else:
            out.extend(chunk)
    if not changed:
        return scheduled
    try:
        both = tvm.script.from_source("\n".join(out))
    except Exception:  # noqa: BLE001 - TVMScript that does not parse back: keep it parallel
        return scheduled
    return both.with_attrs(scheduled.attrs) if scheduled.attrs is not None else both


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

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
from .fast_math import use_fast_erf
from .injective import Injective
from .nchwc import BlockedConv
from .outer_product import OuterProduct
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
        sch, rule, notes = default_schedule(func, target)
        if stats is not None:
            if notes:
                stats.failures[gv.name_hint] = notes
            stats.by_func[gv.name_hint] = rule or "none"
        if sch is not None:
            new = serial_if_small(sch, func, machine) if serial_small else sch.mod["main"]
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


def serial_if_small(sch: "tvm.s_tir.Schedule", original: "tvm.tirx.PrimFunc", machine: Any) -> "tvm.tirx.PrimFunc":
    """The function `sch` scheduled, with its parallel loops serial when `original` (the
    unscheduled form) is a small kernel on `machine` (`MachineModel.runs_serially`: its FLOPs
    and the bytes of its parameters): a parallel launch costs more than it saves there.

    parallel → serial: the schedule's trace is replayed on `original` without its `Parallel`
    instructions (they bind no new loop or block, so the rest of the trace replays unchanged;
    a trace replays on its workload by design, which is how tuning records are applied).
    Kept as it is when the work is unknown (symbolic shapes), the machine has one core, the
    trace has no Parallel instruction (a kernel written with parallel loops in its TIR), or the
    replay fails."""
    from tvm import s_tir

    from ..tir_match import kernel_flops

    scheduled = sch.mod["main"]
    if getattr(machine, "cores", 1) <= 1:
        return scheduled
    trace = sch.trace
    if trace is None:
        return scheduled
    kept = [inst for inst in trace.insts if inst.kind.name != "Parallel"]
    if len(kept) == len(trace.insts):
        return scheduled
    nbytes = _param_bytes(original)
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

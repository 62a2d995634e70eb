"""Build a lowered Relax module into a shared library for an LLVM target.

    target = host_target(threads=2)               # {"kind": "llvm", "mtriple": ..., "mcpu": "znver3", "num-cores": 2}
    mod = legalize_and_fuse(lowered.mod, target)  # one PrimFunc per kernel group
    mod, info = schedule(mod, target, tune=...)   # tuning database and default schedules (optional modules)
    exe = build(mod, target)                      # relax.build with the rest of the CPU pipeline
    exe.export_library("model.so")

TVM 0.27 takes targets as JSON dicts only and rejects `-mcpu=native` with its triple, so the host
is mapped to the mcpu LLVM reports for it (`llvm_get_system_cpu`). The schedules come from the
modules `graphopt.targets.tvm.schedules.base` (default schedules for CPU) and
`graphopt.targets.tvm.tuning.tuner` (meta_schedule with a persistent database); each is optional, and
without it the kernels build unscheduled.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as _cpu_pipeline

_GPU_INTRIN = ("cuda", "rocm", "hexagon", "riscv_cpu", "metal")


def cpu_only_intrinsics() -> None:
    """Skip importing the GPU tensor intrinsics (~35 s of CPU each time tuning starts; TVM-NOTES
    trap 4): empty modules stand in for them. Call before anything imports meta_schedule."""
    for name in _GPU_INTRIN:
        full = f"tvm.s_tir.tensor_intrin.{name}"
        if full not in sys.modules:
            sys.modules[full] = types.ModuleType(full)


def host_cpu() -> str:
    return str(tvm.target.codegen.llvm_get_system_cpu())


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def host_target(*, mcpu: str | None = None, threads: int | None = None, mtriple: str | None = None,
                mattr: list[str] | None = None) -> tvm.target.Target:
    """The LLVM target for this machine (or the given mcpu/triple, with `mattr` feature changes)."""
    spec: dict[str, Any] = {"kind": "llvm", "mcpu": mcpu or host_cpu(), "num-cores": int(threads or default_threads())}
    spec["mtriple"] = mtriple or str(tvm.target.codegen.llvm_get_system_triple())
    if mattr:
        spec["mattr"] = list(mattr)
    return tvm.target.Target(spec)


def target_json(target: tvm.target.Target) -> dict[str, Any]:
    """The target as the JSON dict that recreates it."""
    d = dict(target.export())
    out = {k: d[k] if isinstance(d[k], (int, float, str, bool)) else str(d[k]) for k in ("kind", "mtriple", "mcpu", "num-cores") if k in d}
    if d.get("mattr"):
        out["mattr"] = [str(a) for a in d["mattr"]]
    return out


@dataclass
class ScheduleInfo:
    """What scheduling did: how many PrimFuncs got which kind of schedule."""

    default_schedules: str = "unavailable"  # "applied" | "unavailable" | "failed: ..."
    tuning: dict[str, Any] = field(default_factory=dict)
    by_rule: dict[str, int] = field(default_factory=dict)  # default-schedule rule → kernels
    # kernels with multiply-add work on a generic schedule, and their share of the FLOPs
    fallback: dict[str, Any] = field(default_factory=dict)
    by_func: dict[str, str] = field(default_factory=dict)  # PrimFunc → default-schedule rule


def _optional(module: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (e.name == module or module.startswith(e.name + ".")):
            return None
        raise


def schedule(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    *,
    tune_trials: int = 0,
    tune_minutes: float | None = None,
    tuning_db: str | None = None,
    progress: Callable[..., Any] | bool | None = None,
    task_labels: Mapping[str, str] | None = None,
    knobs: Any = None,
    tune_shapes: Any = None,
) -> tuple[tvm.IRModule, ScheduleInfo]:
    """Apply tuned schedules (tuning first when asked) and then default schedules to the rest.
    `task_labels`: {PrimFunc name: its ONNX nodes} for tuning's progress bar; `knobs`: the
    default schedules' ScheduleKnobs (tvm/schedules/knobs.py; None: the defaults);
    `tune_shapes`: sizes (per size, the shapes of `main`'s inputs in order) at which the kernels
    with symbolic dims pick their schedule (tvm/tuning/shapes.py; the choices are kept in
    `tuning_db` when given)."""
    from graphopt.targets.tvm.schedules.knobs import using

    with using(knobs):
        return _schedule(mod, target, tune_trials=tune_trials, tune_minutes=tune_minutes, tuning_db=tuning_db,
                         progress=progress, task_labels=task_labels, tune_shapes=tune_shapes)


def _schedule(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    *,
    tune_trials: int,
    tune_minutes: float | None,
    tuning_db: str | None,
    progress: Callable[..., Any] | bool | None,
    task_labels: Mapping[str, str] | None,
    tune_shapes: Any = None,
) -> tuple[tvm.IRModule, ScheduleInfo]:
    info = ScheduleInfo()
    if tune_trials > 0 or tuning_db:
        tuning = _optional("graphopt.targets.tvm.tuning.tuner")
        if tuning is None:
            info.tuning = {"status": "unavailable (graphopt.targets.tvm.tuning.tuner is not installed)"}
        else:
            cpu_only_intrinsics()
            if tune_trials > 0:
                if not tuning_db:
                    raise ValueError("tuning needs a database folder")
                db = tuning.tune(mod, target, db_dir=tuning_db, trials=tune_trials, minutes=tune_minutes, progress=progress,
                                 task_labels=task_labels)
                info.tuning = _summary(db, tune_trials, tune_minutes, tuning_db)
                last = getattr(tuning, "last_summary", None)
                if callable(last):
                    try:
                        s = last(tuning_db)
                        if isinstance(s, dict):
                            info.tuning.update(s)
                    except Exception:  # the summary is a nicety
                        pass
            else:
                info.tuning = {"status": "database applied", "db": os.path.abspath(tuning_db)}
                kept = getattr(tuning, "kept_schedules", None)
                if callable(kept) and os.path.isdir(tuning_db):
                    info.tuning["kept"] = kept(tuning_db)  # workloads keeping default / tuned schedules
            if tuning_db and os.path.isdir(tuning_db):
                mod = tuning.apply_database(mod, target, tuning_db)
    shaped: dict[str, str] = {}
    if tune_shapes:
        from graphopt.targets.tvm.tuning.shapes import tune_shapes as tune_at_sizes

        cpu_only_intrinsics()
        threads = int(target.attrs.get("num-cores") or default_threads()) if "num-cores" in target.attrs else default_threads()
        mod, shapes = tune_at_sizes(mod, target, tune_shapes, db_dir=tuning_db, minutes=tune_minutes, progress=progress,
                                    labels=task_labels, threads=threads)
        info.tuning["shapes"] = shapes.as_dict()
        shaped = {k: f"{c.rule} (tune-shapes: {c.choice})" for k, c in shapes.kernels.items() if c.choice != "default"}
    scheds = _optional("graphopt.targets.tvm.schedules")
    if scheds is not None:
        try:
            stats = scheds.ScheduleStats()
            mod = scheds.apply_default_schedules(mod, target, stats=stats, serial_small=True)
            info.default_schedules = "applied"
            stats.by_func.update(shaped)  # (scheduled already: the rule of their default, and the choice)
            info.by_rule = stats.count()
            info.by_func = dict(stats.by_func)
            info.fallback = stats.fallback()
        except Exception as e:  # a schedule bug must not stop the compile: build unscheduled, say so
            msg = str(e).strip().splitlines()
            info.default_schedules = f"failed: {type(e).__name__}: {msg[-1][:200] if msg else ''}"
            warnings.warn(f"default schedules failed, kernels stay unscheduled: {info.default_schedules}", stacklevel=2)
    return mod, info


def _summary(db: Any, trials: int, minutes: float | None, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "tuned", "trials": trials, "minutes": minutes, "db": os.path.abspath(path)}
    if isinstance(db, dict):
        out.update(db)
    else:
        summary = getattr(db, "summary", None)
        if callable(summary):
            try:
                s = summary()
                if isinstance(s, dict):
                    out.update(s)
            except Exception:  # a summary is a nicety, never a reason to fail the compile
                pass
    return out


def _pointer_params(func: tvm.tirx.PrimFunc) -> int:
    """How many of `func`'s parameters are buffers or pointers."""
    return sum(1 for p in func.params if isinstance(getattr(p, "ty", None), (tvm.tirx.BufferType, tvm.ir.PointerType)))


def with_functions(mod: tvm.IRModule, updates: dict[Any, Any]) -> tvm.IRModule:
    """`mod` with the functions in `updates` (global var → function) replaced; `mod` itself when
    there are none (a module is shared: the copy is made only when something changes)."""
    if not updates:
        return mod
    mod = mod.clone()
    for gv, func in updates.items():
        mod.update_func(gv, func)
    return mod


def restrict_host_funcs(mod: tvm.IRModule) -> tvm.IRModule:
    """Mark `tirx.noalias` on PrimFuncs that take at most one buffer (VMShapeLower's `shape_func`,
    which only reads and writes the shape heap: nothing it takes can alias).

    Why: TVM 0.27's LLVM codegen declares every PrimFunc of the module (sorted by symbol) before
    emitting any, and `is_restricted_` (whether the function's pointers are `noalias`) is set when a
    function is declared, not when it is emitted: every kernel is emitted with the flag of the
    last declared function. A model with a symbolic batch gets `shape_func` (no `tirx.noalias`),
    sorted after the kernels, so every kernel lost `noalias` (and its `*_compute_` function its
    `noinline`): ResNet-50's convs ran 2-3x slower than the same PrimFuncs built alone."""
    updates = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and not func.attrs.get("tirx.noalias", False) and _pointer_params(func) <= 1:
            updates[gv] = func.with_attr("tirx.noalias", True)
    return with_functions(mod, updates)


def finish_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """The CPU pipeline after legalization and fusion (no FuseOps: the groups are graphopt's)."""

    @tvm.transform.module_pass(opt_level=0)
    def _finish(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        from .schedules.loop_marks import apply_loop_marks_to_module

        mod = apply_loop_marks_to_module(mod)  # ragged pixel tiles, row passes
        with target:
            passes = [relax.transform.LegalizeOps()]  # anything scheduling added stays legal
            passes += _cpu_pipeline.dataflow_lower_passes(target) + _cpu_pipeline.finalize_passes(target)
            return restrict_host_funcs(tvm.transform.Sequential(passes)(mod))

    return _finish


def build(mod: tvm.IRModule, target: tvm.target.Target) -> relax.VMExecutable:
    """The scheduled module as a library: the kernels' one-element constant arguments (quantization
    scales, zero points, clip bounds) made immediates or by-value scalars first
    (`lower.scalar_args`: each buffer argument costs the kernel's packed-API wrapper its checks;
    done here, after scheduling and the weight packing, because SplitLayoutRewritePreproc does not
    take a kernel with scalar parameters), then relax.build with the CPU pipeline and the TIR
    lowering of `stack_tiles` (marked kernels' accumulator tiles on the stack)."""
    from ..machine import machine_model
    from .lower.scalar_args import scalar_constants_to_immediates
    from .stack_tiles import tir_pipeline

    return relax.build(scalar_constants_to_immediates(mod), target, relax_pipeline=finish_pipeline(target),
                       tir_pipeline=tir_pipeline(machine_model(target)))


def build_kernel(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.runtime.Module:
    """One scheduled kernel (`mod`'s `main`) as a library, lowered as `build` lowers the model's
    kernels: the loop marks applied (ragged tiles, row passes), the weight-layout rewrite blocks
    dropped (its weights arrive packed, as in meta_schedule's default builder), then TVM's TIR
    build with `stack_tiles.tir_pipeline(machine_model(target))` (marked kernels' accumulator tiles
    on the stack). The tuner's builder (meta_schedule candidates, the default schedules and their
    variants) and tune-shapes' candidates build with it, so what tuning times is what the artifact
    runs; TVM's default lowering instead timed AVX-512 conv tiles as heap workspaces, 5-10 % slower
    than the build makes them, and the comparisons against the default schedules were skewed."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from ..machine import machine_model
    from .schedules.loop_marks import apply_loop_marks_to_module
    from .stack_tiles import tir_pipeline

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(apply_loop_marks_to_module(mod))
    return tvm.tirx.build(mod, target=target, pipeline=tir_pipeline(machine_model(target)))


def llvm_ir_lines(exe: relax.VMExecutable) -> dict[str, int]:
    """{LLVM function: lines of optimized IR} of a built executable's library, each parallel
    region's body (`__tvm_parallel_lambda.N`) counted in the function that launches it: the size
    LLVM's code generation works on per kernel (its time grows with it; an over-unrolled kernel
    shows here), for benchmarks and structural tests."""
    import re

    lib = exe.mod
    lines: dict[str, int] = {}
    launched_by: dict[str, str] = {}
    for m in [lib, *lib.imports]:
        try:
            src = m.inspect_source("ll")
        except Exception:  # noqa: BLE001 - a module without LLVM IR (the VM's bytecode)
            continue
        cur = None
        for line in src.splitlines():
            head = re.match(r"define .*@([\w.]+)\(", line)
            if head:
                cur = head.group(1)
            elif line.startswith("}"):
                cur = None
            elif cur:
                lines[cur] = lines.get(cur, 0) + 1
                for lam in re.findall(r"@(__tvm_parallel_lambda[\w.]*)", line):
                    if lam != cur:
                        launched_by.setdefault(lam, cur)
    out: dict[str, int] = {}
    for fn, n in lines.items():
        while fn in launched_by:
            fn = launched_by[fn]
        out[fn] = out.get(fn, 0) + n
    return out


#: the function LiftTransformParams writes for `main`
TRANSFORM_PARAMS = "main_transform_params"


def has_layout_rewrite(mod: tvm.IRModule) -> bool:
    """True when a PrimFunc of `mod` has a block annotated `meta_schedule.layout_rewrite_preproc`
    (a weight-packing block the default schedules, or tuning, left inside a kernel)."""
    from tvm import s_tir

    def annotated(sch: Any, parent: Any) -> bool:
        for block in sch.get_child_blocks(parent):
            if "meta_schedule.layout_rewrite_preproc" in sch.get(block).annotations or annotated(sch, block):
                return True
        return False

    for _, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            try:
                sch = s_tir.Schedule(func)
                root = sch.get_sblock(func.body.block.name_hint)
            except Exception:  # no block structure (already lowered): nothing to split
                continue
            if annotated(sch, root):
                return True
    return False


def keep_param_packing(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with the `meta_schedule.layout_rewrite_preproc` annotation removed from packing
    blocks that do not copy a kernel argument (the packing then stays inside its kernel).

    SplitLayoutRewritePreproc can only cut out the packing of a buffer the kernel takes as an
    argument (a weight of `main`) and asserts ("The preproc buffer is not found in the original
    primfunc") on any other: a schedule that annotated the packing of an intermediate (Softplus
    -> Gemm: the matmul's read index went stale after a producer was inlined into it) stopped a
    valid model from compiling."""
    from tvm import s_tir

    ann = "meta_schedule.layout_rewrite_preproc"
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        try:
            sch = s_tir.Schedule(func)
            root = sch.get_sblock(func.body.block.name_hint)
        except Exception:  # no block structure (already lowered)
            continue
        args = list(func.params)  # (0.27: a buffer parameter is the buffer's Var)
        changed = False

        def visit(parent: Any) -> None:
            nonlocal changed
            for block in sch.get_child_blocks(parent):
                stmt = sch.get(block)
                if ann in stmt.annotations:
                    reads = list(stmt.reads)
                    if len(reads) != 1 or not any(reads[0].source.same_as(b) for b in args):
                        sch.unannotate(block, ann)
                        changed = True
                visit(block)

        visit(root)
        if changed:
            updates[gv] = sch.mod["main"]
    return with_functions(mod, updates)


def _only(mod: tvm.IRModule, entry: str, drop: str) -> tvm.IRModule:
    """`mod` without the function `drop` and whatever only it used."""
    funcs = {gv: f for gv, f in mod.functions_items() if gv.name_hint != drop}
    return relax.transform.DeadCodeElimination([entry])(tvm.IRModule(funcs, attrs=mod.attrs))


def _shared_threadpool() -> None:
    """Configure TVM's thread pool as graphopt.runtime does (workers share all cores, mode -3)
    before the packing's parallel loops create it: a pool created with TVM's defaults pins a
    spinning worker to each core, and reconfiguring it later left onnxruntime in the same process
    1.7x slower (mobilenetv2, 2 cores)."""
    import tvm_ffi

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    tvm_ffi.get_global_func("runtime.config_threadpool")(-3, len(cpus), [str(c) for c in cpus])


def _lift_weight_only(mod: tvm.IRModule) -> tuple[tvm.IRModule, tvm.IRModule, int] | None:
    """`main`'s weight-only computations (annotated packing blocks cut into PrimFuncs of their
    own first) lifted into `main_transform_params`: (the module with both functions, the
    transform alone, PrimFuncs lifted), or None when nothing depends on weights alone."""
    # (SplitLayoutRewritePreproc asserts on some kernels without an annotated block: only when needed)
    if has_layout_rewrite(mod):
        # (hand-written kernels, the recurrences, have no compute block under the root: the pass
        # asserts on them; they pack no weight, so it runs without them)
        own = {gv: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
               and "graphopt.own_kernel" in f.attrs}
        rest = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in own}, attrs=mod.attrs) if own else mod
        split = relax.transform.SplitLayoutRewritePreproc()(keep_param_packing(rest))
        if own:
            split = tvm.IRModule({**dict(split.functions_items()), **own}, attrs=split.attrs)
    else:
        split = mod
    lifted = relax.transform.LiftTransformParams()(split)
    if TRANSFORM_PARAMS not in {gv.name_hint for gv in lifted.get_global_vars()}:
        return None
    tmod = _only(lifted, TRANSFORM_PARAMS, "main")
    return lifted, tmod, sum(1 for _, f in tmod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


def lift_weight_packing(
    mod: tvm.IRModule, params: list[Any], host: tvm.target.Target
) -> tuple[tvm.IRModule, list[Any], int] | None:
    """Move the weight packing out of the kernels and run it once, now, on the weights.

    SplitLayoutRewritePreproc cuts each annotated packing block into a PrimFunc of its own and
    LiftTransformParams moves those calls (they depend on weights only: `main`'s parameters after
    `num_input`) into `main_transform_params`; that function is built for `host` and run here, so
    the artifact's `main` takes the packed weights directly and no packing is left at run time.
    Weight-only computations in `main` itself (the blocked convolutions' weight packing) are lifted
    the same way. Returns (main's module without the transform, the weights `main` now takes in
    order, number of packing functions hoisted), or None when nothing packs a weight.
    """
    # (not only annotated packing blocks: the blocked-layout convs pack their weights in `main`)
    split = _lift_weight_only(mod)
    if split is None or split[2] == 0:
        return None
    lifted, tmod, hoisted = split
    _shared_threadpool()
    vm = relax.VirtualMachine(build(tmod, host), tvm.cpu())
    out = vm[TRANSFORM_PARAMS]([tvm.runtime.tensor(p, tvm.cpu()) for p in params])
    new = [out[i].numpy() for i in range(len(out))]
    return _only(lifted, "main", TRANSFORM_PARAMS), new, hoisted


def lift_transform(mod: tvm.IRModule) -> tuple[tvm.IRModule, int] | None:
    """Every weight-only computation of `main` (the weight packing, and the codebook decode of
    clustered weights) lifted into `main_transform_params`, which stays in the module beside
    `main` for the runner to call once when the artifact is loaded: the artifact then stores
    the weights as the model holds them (a clustered weight as its indices and codebook), not as
    the kernels read them. Returns (the module with both functions, PrimFuncs lifted), or None
    when nothing depends on weights alone."""
    split = _lift_weight_only(mod)
    if split is None or split[2] == 0:
        return None
    lifted, _, hoisted = split
    return relax.transform.DeadCodeElimination(["main", TRANSFORM_PARAMS])(lifted), hoisted

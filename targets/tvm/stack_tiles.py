"""Accumulator tiles on the stack: the TIR lowering the cpu build runs (`tir_pipeline`).

A blocked conv keeps its register tile in a `cache_write(..., "local")` buffer
(`schedules.nchwc`). TVM's LowerTVMBuiltin makes every "local" allocation (and every "global"
one of kMaxStackAlloca = 1024 bytes or more) a `TVMBackendAllocWorkspace` buffer, which LLVM
cannot remove: per pixel tile the zero init becomes a `memset` call, and after the reduction
the accumulators are stored to the workspace and partly read back by the write-back. It costs
per tile, so short reductions pay most (ResNet-50's 1x1 convs with 64 input channels on 56x56:
64 x 24 FMAs per tile).

Before -> after: a scheduled kernel whose write-back block carries `STACK_TILE` (set by
`BlockedConv` under the `stack_tile` schedule knob) has its "local" allocations of at most
`stack_tile_bytes(machine)` (the machine model's vector register file: a tile no larger can
live in registers) annotated `disable_lower_builtin` after StorageRewrite (which drops
allocation annotations), so LowerTVMBuiltin leaves them stack arrays that LLVM promotes to
registers. Must not fire: on unmarked kernels (a module without marks takes TVM's default
pipeline unchanged), on larger buffers (a chunked conv's per-row accumulators stay workspace),
and on a kernel whose TVMScript does not round-trip (it keeps its workspace; one line says so).

TVM 0.27 has no Python statement mutator and no hook between StorageRewrite and MakePackedAPI:
`default_passes` restates `tvm.s_tir.pipeline.default_s_tir_pipeline`'s pass list, with the
annotation inserted before SplitHostDevice; a test checks that it lowers a kernel exactly as
TVM's pipeline does (it fails when TVM moves).
"""

from __future__ import annotations

import re
import sys
from typing import Any

from ..machine import MachineModel

__all__ = ["STACK_ALLOCA_BYTES", "STACK_TILE", "default_passes", "replayed_kernel", "stack_tile_bytes", "tir_pipeline"]

#: write-back block annotation (or PrimFunc attribute, `replayed_kernel`): its kernel's small
#: "local" buffers become stack arrays
STACK_TILE = "graphopt.stack_tile"

#: TVM's kMaxStackAlloca: "global" buffers below it are stack arrays already ("local" never are)
STACK_ALLOCA_BYTES = 1024

_ALLOC = re.compile(r'(T\.alloc_local\(\((\d+),\), "float32(?:x(\d+))?"\))')


def stack_tile_bytes(machine: MachineModel) -> int:
    """Largest "local" buffer that becomes a stack array: the vector register file (32 zmm: 2048
    bytes, 16 ymm: 512)."""
    return machine.vector_registers * machine.vector_bits // 8


def replayed_kernel(func: Any, machine: MachineModel, on: bool) -> Any:
    """A kernel scheduled from the tuning database by replaying its trace (a measured variant of a
    default rule, or a meta_schedule schedule), as the build should lower it.

    on (the `stack_tile` knob): the whole kernel marked (`STACK_TILE` as a PrimFunc attribute), so
    every float32 "local" buffer of at most `stack_tile_bytes` becomes a stack array, where the
    machine's register file is at least STACK_ALLOCA_BYTES (AVX-512: 2048 bytes; AVX2's and NEON's
    512 are not: their kernels stay as they were). Why: a trace recorded before the marks existed
    replays without them (a database tuned before the stack tiles: 20 of ResNet-50's 25 tuned
    kernels kept a variant and ran with heap workspace tiles), and variant tiles below
    STACK_ALLOCA_BYTES (7x1, 12x1 pixels of one block) are never marked by the rule; meta_schedule's
    own schedules keep their accumulators in whole-output "global" caches, which this leaves alone.
    The tuner's builder marks every candidate but the default schedules the same way
    (`build.build_kernel` callers), so tuning times what the build runs.
    off: the trace's own marks removed (a database tuned with the knob on replays without them)."""
    import tvm
    from tvm import s_tir

    if on:
        if stack_tile_bytes(machine) < STACK_ALLOCA_BYTES:
            return func
        return func.with_attr(STACK_TILE, 1)
    if STACK_TILE not in func.script():
        return func
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))

    def walk(block: Any) -> None:
        for child in sch.get_child_blocks(block):
            if STACK_TILE in sch.get(child).annotations:
                sch.unannotate(child, STACK_TILE)
            walk(child)

    walk(sch.get_sblock(func.body.block.name_hint))
    out = sch.mod["main"]
    return out.without_attr(STACK_TILE) if out.attrs is not None and STACK_TILE in out.attrs else out


def _annotate(func: Any, limit: int) -> Any:
    """`func` with its float32 "local" allocations of at most `limit` bytes marked
    `disable_lower_builtin` (a TVMScript round trip), or `func` where none is."""
    import tvm

    def rep(m: re.Match[str]) -> str:
        n, lanes = int(m.group(2)), int(m.group(3) or 1)
        if n * lanes * 4 > limit:
            return m.group(0)
        return m.group(1)[:-1] + ', annotations={"disable_lower_builtin": T.bool(True)})'

    text = func.script()
    new = _ALLOC.sub(rep, text)
    if new == text:
        return func
    try:
        return tvm.script.from_source(new)
    except Exception as exc:  # noqa: BLE001 - the kernel keeps its workspace tile
        print(f"graphopt: stack tile not applied to a kernel (its TIR did not round-trip: "
              f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__})", file=sys.stderr)
        return func


def default_passes(config: Any) -> tuple[list[Any], list[Any]]:
    """TVM 0.27's `default_s_tir_pipeline` for PassContext `config`, as (the passes up to and
    including the last one before SplitHostDevice, the rest): the marks are applied between them.
    A test checks that the two together lower a kernel exactly as TVM's pipeline does."""
    from tvm import s_tir, tirx

    st, tx = s_tir.transform, tirx.transform
    flag = lambda key: bool(config.get(key, False))  # noqa: E731
    head = [
        st.CanonicalizeLoop(), st.LowerCrossThreadReduction(), st.LowerInitBlock(),
        st.PlanAndUpdateBufferAllocationLocation(), st.ConvertBlocksToOpaque(), st.LiftThreadBinding(),
        st.ManifestSharedMemoryLocalStage(), st.CompactBufferAllocation(), st.LowerAutoCopy(),
        st.UnifyThreadBinding(), st.LowerMatchBuffer(), st.StmtSimplify(), st.InjectPermutedLayout(),
        st.AnnotateIrregularLoop(), st.InjectSoftwarePipeline(), st.TransformMmaBufferLayout(),
        st.LowerOpaqueBlock(), tx.FlattenBuffer(), tx.BF16ComputeLegalize(), tx.NarrowDataType(32),
        st.LoopPartition(), tx.VectorizeLoop(not flag("tirx.disable_vectorize")),
        st.InjectVirtualThread(), st.InjectDoubleBuffer(),
    ]
    if not flag("tirx.disable_storage_rewrite"):
        head.append(tx.StorageRewrite())
    if flag("tirx.use_async_copy"):
        head.append(st.LowerAsyncDMA())
    head += [st.HoistIfThenElse(), tx.UnrollLoop(), st.RenormalizeSplitPattern(), tx.StmtSimplify(),
             tx.RemoveNoOp(), st.RewriteUnsafeSelect()]
    if flag("tirx.instrument_bound_checkers"):
        head.append(st.InstrumentBoundCheckers())
    if flag("tirx.s_tir.ldg32"):
        head.append(st.InjectPTXLDG32(True))
    if not flag("tirx.disable_cse_tir"):
        head.append(tx.CommonSubexprElim())
    if flag("tirx.instrument_lwp"):
        head.append(st.InstrumentProfileIntrinsics())
    head += [tx.FP8ComputeLegalize(), st.VerifyVTCMLimit(), st.LowerVtcmAlloc(), tx.VerifyMemory(),
             tx.AnnotateEntryFunc(), st.ThreadSync("shared"), st.ThreadSync("shared.dyn"), st.ThreadSync("warp"),
             st.InferFragment(), st.LowerThreadAllreduce()]
    if flag("tirx.use_async_copy"):
        head.append(st.InjectPTXAsyncCopy())
    if flag("tirx.s_tir.ldg32"):
        head.append(st.InjectPTXLDG32())
    head.append(st.MergeSharedMemoryAllocations())
    tail = [tx.SplitHostDevice(), tx.MakePackedAPI(), tx.FP8StorageLegalize(), tx.BF16StorageLegalize()]
    return head, tail


def _lowering(limit: int) -> Any:
    import tvm
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    @tvm.transform.module_pass(opt_level=0, name="graphopt.StackTileLowering")
    def run(mod: Any, ctx: Any) -> Any:
        marked = {gv.name_hint for gv, f in mod.functions_items()
                  if isinstance(f, tvm.tirx.PrimFunc) and STACK_TILE in f.script()}
        if not marked:
            return default_s_tir_pipeline()[0](mod)
        head, tail = default_passes(ctx.config)
        mod = tvm.transform.Sequential(head)(mod)
        funcs = {gv.name_hint: (_annotate(f, limit) if gv.name_hint in marked else f) for gv, f in mod.functions_items()}
        return tvm.transform.Sequential(tail)(tvm.IRModule(funcs, attrs=mod.attrs))

    return run


_REGISTERED: set[str] = set()


def tir_pipeline(machine: MachineModel) -> str:
    """The name of the TIR pipeline the cpu build passes to relax.build (registered on first use):
    TVM's default lowering, with the stack tiles of marked kernels (see the module docstring)."""
    from tvm.s_tir.pipeline import default_s_tir_pipeline
    from tvm.tirx.compilation_pipeline import register_tir_pipeline

    limit = stack_tile_bytes(machine)
    name = f"graphopt-stack-tiles-{limit}"
    if name not in _REGISTERED:
        register_tir_pipeline(name, lambda: (_lowering(limit), *default_s_tir_pipeline()[1:]))
        _REGISTERED.add(name)
    return name

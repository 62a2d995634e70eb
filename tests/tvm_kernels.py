"""Helpers the TVM schedule and tuning tests share (imported after their importorskip of tvm):
the host target, a Relax module fused into one kernel per group the way TVM groups them, and a
run of a module through the CPU pipeline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax

TT = relax.TensorType


def host_target() -> tvm.target.Target:
    """The cpu target's default LLVM target here (the host's mcpu, or $GRAPHOPT_CPU_MCPU)."""
    from graphopt.targets.machine import env_mcpu

    return tvm.target.Target({"kind": "llvm", "mcpu": env_mcpu() or tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})


#: x86 levels the ISA-specific checks compile for, whatever the host (AVX2: 8 fp32 lanes and 16
#: registers; AVX-512: 16 lanes and 32 registers, VNNI)
AVX2_MCPU = "znver3"  # (AVX2 with a 512 KiB L2: the machine the AVX2 schedules were measured on)
AVX512_MCPU = "icelake-server"


def isa_target(mcpu: str, threads: int = 2) -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mtriple": str(tvm.target.codegen.llvm_get_system_triple()),
                              "mcpu": mcpu, "num-cores": threads})


def avx2_target(threads: int = 2) -> tvm.target.Target:
    """The AVX2 level (8 fp32 lanes, 16 registers) that ISA-specific expectations are written for."""
    return isa_target(AVX2_MCPU, threads)


AVX2_CPU = f"cpu{{mcpu={AVX2_MCPU}}}"  # the cpu target spec of that level


def host_runs(target: tvm.target.Target) -> bool:
    """Whether this CPU executes code built for `target` (an AVX-512 host runs AVX2 builds too)."""
    from graphopt.targets.machine import machine_model, missing_features

    return not missing_features(machine_model(target))


def fuse(mod: tvm.IRModule) -> tvm.IRModule:
    """LegalizeOps → AnnotateTIROpPattern → FuseOps → FuseTIR → DeadCodeElimination."""
    for p in (relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
              relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()):
        mod = p(mod)
    return mod


def fused(build_body: Callable[..., Any], params: Sequence[tuple[str, Sequence[int]]], dtype: str = "float32") -> tvm.IRModule:
    """A Relax module `main(*params) = build_body(bb, *vars)` with one fused kernel."""
    bb = relax.BlockBuilder()
    vars_ = [relax.Var(n, TT(s, dtype)) for n, s in params]
    with bb.function("main", vars_):
        with bb.dataflow():
            out = bb.emit_output(build_body(bb, *vars_))
        bb.emit_func_output(out)
    return fuse(bb.get())


def run(mod: tvm.IRModule, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """`main(*arrays)` compiled through the CPU pipeline after fusion, on the host."""
    from tvm.relax.backend.cpu_generic import pipeline as cp

    target = host_target()
    seq = tvm.transform.Sequential(cp.dataflow_lower_passes(target) + cp.finalize_passes(target))
    ex = tvm.compile(mod, target=target, relax_pipeline=seq)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def primitive_kernel(params: Sequence[relax.Var], build_body: Callable[..., Any]) -> tvm.tirx.PrimFunc:
    """The one PrimFunc the lowering makes of a primitive group function `k(*params)` whose
    dataflow body is `build_body(bb, *params)` (its result is the output): `main` calls it, then
    LegalizeOps → AnnotateTIROpPattern → FuseTIR (graphopt's `legalize_and_fuse`)."""
    from graphopt.targets.tvm.lower.legalize import legalize_and_fuse

    bb = relax.BlockBuilder()
    with bb.function("k", list(params), {"Primitive": True}, private=True):
        with bb.dataflow():
            out = bb.emit_output(build_body(bb, *params))
        gv = bb.emit_func_output(out)
    mvars = [relax.Var(f"a{i}", v.ty) for i, v in enumerate(params)]
    with bb.function("main", mvars):
        with bb.dataflow():
            out = bb.emit_output(relax.Call(gv, mvars))
        bb.emit_func_output(out)
    mod = legalize_and_fuse(bb.get(), host_target())
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func


def integer_kernel_graph(model: Any, optimize: bool = True) -> Any:
    """A QDQ model as the cpu target's compile sees it before lowering: `-O2` (unless `optimize`
    is False: `model` is then taken as it is), then the integer rewrite (qdq-to-integer,
    split-zero-points) and the kernel groups. `model`: an onnx.ModelProto or a graphopt.Model."""
    import graphopt
    from graphopt.passes.fusion.kernel_groups import PlanKernels
    from graphopt.passes.quantize.integer import QdqToInteger, SplitZeroPoints
    from graphopt.transform import PassContext

    g = graphopt.load(model) if not isinstance(model, graphopt.Model) else model
    if optimize:
        g = graphopt.optimize(g, "-O2")
    for p in (QdqToInteger(), SplitZeroPoints(), PlanKernels()):
        p.run(g, PassContext())
    return g


def int8_lowered(model: Any, spec: str | None = None, target: tvm.target.Target | None = None,
                 block: int | None = None, int8_rules: bool = True) -> tuple[Any, tvm.IRModule, dict[str, str]]:
    """`integer_kernel_graph(model)` lowered and fused for the cpu target `spec` (its TVM target at
    2 threads and its activation block; or an explicit `target` / `block`), then, when
    `int8_rules`, the int8 kernel rules applied: (lowered, module, {kernel: int8 kind})."""
    from graphopt.target import get_target
    from graphopt.targets.tvm.lower import lowerer as L

    t = get_target(spec or "cpu")
    target = target if target is not None else t.tvm_target(2)
    lowered, mod = L.lower_and_fuse(integer_kernel_graph(model), target,
                                    block=block if block is not None else t.activation_block(target))
    done: dict[str, str] = {}
    if int8_rules:
        mod, done = t.int8_kernels(mod, target, lowered.params)
    return lowered, mod, done

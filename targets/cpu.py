"""Target `cpu`: TVM/LLVM kernels for the host CPU, one kernel per graphopt kernel group.

    optimized IR ─plan-kernels─▶ groups ─lower─▶ Relax (one primitive function per group)
      ─LegalizeOps/AnnotateTIROpPattern/FuseTIR─▶ one PrimFunc per group
      ─tuning database / default schedules─▶ weight packing hoisted and run on the weights
      ─▶ relax.build ─▶ model.so + params.npz + manifest.json

The library holds the code only; the weights are saved beside it (`params.npz`) and bound when the
artifact is loaded, so the library stays small and the same code runs other weights. Weights that a
kernel's schedule repacks (conv/matmul: a block annotated `meta_schedule.layout_rewrite_preproc`)
are saved packed: the packing is cut out of the kernels and applied once at compile time, so
neither loading nor running repacks them (`runtime.packed` in the manifest counts those kernels).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import platform
import sys
import time
from collections import Counter
from typing import Any, ClassVar

import numpy as np

from graphopt.errors import GraphoptError, UsageError
from graphopt.ir import Model
from graphopt.target import (
    FORMAT,
    FORMAT_VERSION,
    REPORT,
    Artifact,
    CompileOptions,
    Target,
    sha256_file,
    temporary_artifact_dir,
    write_manifest,
)
from graphopt.targets import compile_watchdog as W

LIBRARY = "model.so"
PARAMS = "params.npz"


def _dims(v: Any) -> list[Any]:
    s = v.shape
    if s is None:
        return []
    return [d if isinstance(d, (int, str)) else None for d in s.dims]


@functools.lru_cache(maxsize=1)
def _llvm_cpus() -> frozenset[str]:
    """The x86 CPU names LLVM knows (empty where it cannot say)."""
    try:
        import tvm

        from graphopt.targets.machine import CACHES, X86_LEVELS

        names = tvm.target.codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}))
        return frozenset(str(n) for n in names) | frozenset(X86_LEVELS) | frozenset(CACHES)
    except Exception:  # noqa: BLE001 - an older TVM without the archlist query: LLVM decides
        return frozenset()


#: a compile whose multiply-add FLOPs run on generic schedules above this share says so
FALLBACK_WARN_SHARE = 0.03


def _fallback_warnings(fallback: dict[str, Any]) -> list[str]:
    """One line when the kernels on generic schedules hold a noticeable share of the FLOPs."""
    share = float(fallback.get("share", 0.0) or 0.0)
    if share <= FALLBACK_WARN_SHARE:
        return []
    ks = fallback.get("kernels", [])
    top = ", ".join(f"{k['kernel']} ({k['rule']}, {100 * k['share']:.0f}%)" for k in ks[:3])
    return [f"{100 * share:.0f}% of the model's multiply-add FLOPs run on generic (slow) schedules in "
            f"{len(ks)} kernel{'s' if len(ks) != 1 else ''}: {top}{', ...' if len(ks) > 3 else ''} "
            "(report.json schedules.fallback lists them)"]


def _dims_warnings(lowered: Any) -> list[str]:
    """One line per constraint the symbolic dims put on the input sizes, and one for 3x3 convs kept
    direct (not Winograd) because their maps are symbolic."""
    out = []
    for name, d in lowered.symbolic_dims.items():
        if d.get("multiple", 1) > 1:
            out.append(f"symbolic dim {name} (input {d['input']!r}, axis {d['axis']}) must be a multiple of {d['multiple']} "
                       f"at run time: {d.get('why', 'maps of different strides meet')}")
    from graphopt.targets.tvm.lower.lowerer import UNROLL_WARN

    for node, n in getattr(lowered, "unrolled", {}).items():
        if n > UNROLL_WARN:
            out.append(f"{node} unrolled {n} iterations: compile time grows with them (cpu{{loop-unroll={UNROLL_WARN}}} runs "
                       "a Loop that long as a runtime loop: a faster compile, a slower run)")
    if lowered.winograd_symbolic:
        n = len(lowered.winograd_symbolic)
        out.append(f"{n} 3x3 conv{'s' if n != 1 else ''} run direct, not in Winograd form: {'their' if n != 1 else 'its'} "
                   "maps are symbolic (the Winograd kernels tile static maps; --input-shape pins them)")
    return out


def _io(values: Any) -> list[dict[str, Any]]:
    out = []
    for v in values:
        out.append({"name": v.name, "dtype": str(v.dtype.numpy()) if v.dtype is not None else None,
                    "shape": _dims(v) if v.shape is not None else None})
    return out


class CpuTarget(Target):
    """LLVM for an x86-64 CPU: the host's (mcpu detected, `num-cores` = threads), or another x86
    level with `cpu{mcpu=skylake-avx512}` (cross-compiled: the artifact loads only on a CPU with
    that mcpu's features). Every ISA-dependent choice reads the target's machine model
    (graphopt.targets.machine), which the manifest records."""

    name: ClassVar[str] = "cpu"

    #: LLVM CPU name (haswell, skylake-avx512, icelake-server, sapphirerapids, znver3/4/5, ...);
    #: None: the host's, or $GRAPHOPT_CPU_MCPU
    mcpu: str | None = None
    #: LLVM feature changes over what mcpu implies, '+'/'-' separated by ':' (-avx512f: AVX2 code
    #: on an AVX-512 mcpu)
    mattr: str | None = None

    #: activations between convolutions: "nchwc" (channel-blocked, see targets/tvm/layout.py),
    #: "nchw", or "auto" (nchwc on x86-64)
    layout: str = "auto"
    #: 3x3 stride-1 convs of the nchwc layout in Winograd form (targets/tvm/layout.py
    #: `winograd_m`): "auto" (F(2x2, 3x3) where it applies; the direct conv's fp32 error), "off",
    #: "2", or "4" (F(4x4) on maps of 28x28 and more: faster, about 5x the fp32 error)
    winograd: str = "auto"

    #: shape buckets {dim: [sizes]} (`cpu{buckets=H:320,640;W:320}`): kernels specialised per
    #: combination beside the symbolic ones, dispatched by exact size (targets/shape_buckets.py)
    buckets: dict[str, list[int]] | None = None

    #: the default schedules' refinements switched off or resized for a before/after comparison
    #: (`cpu{schedule-knobs=INLINE_EPILOGUE:0;MATMUL_K_BLOCK:0}`; tvm/schedules/knobs.py); None:
    #: every refinement on
    schedule_knobs: Any = None

    #: representative input sizes for the kernels with symbolic dims (`cpu{tune-shapes=x=1x3x320x320;
    #: x=1x3x640x480}`, or --tune-shapes / CompileOptions.tune_shapes): each takes the schedule
    #: fastest over them (tvm/tuning/shapes.py); None: the default schedules
    tune_shapes: list[dict[str, tuple[int, ...]]] | None = None

    #: Loops of more static iterations than this run as a runtime loop instead of unrolled
    #: (`cpu{loop-unroll=64}`; None: tvm/lower/lowerer.py LOOP_UNROLL, 256)
    loop_unroll: int | None = None

    # (winograd: layout.WINOGRAD_MODES, not imported here: layout imports tvm, which is slow)
    _OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {"layout": ("auto", "nchwc", "nchw"),
                                                      "winograd": ("auto", "off", "2", "4")}
    _FREE_OPTIONS: ClassVar[tuple[str, ...]] = ("mcpu", "mattr")  # checked against LLVM

    @classmethod
    def from_options(cls, options: Any) -> "CpuTarget":
        t = cls()
        for key, value in options.items():
            if key == "buckets":
                from graphopt.targets.shape_buckets import parse_buckets

                t.buckets = parse_buckets(str(value))
                continue
            if key == "tune-shapes":
                from graphopt.input_shapes import parse_tune_shapes

                t.tune_shapes = parse_tune_shapes(str(value))
                continue
            if key == "loop-unroll":
                if not str(value).isdigit():
                    raise UsageError(f"target {cls.name}: loop-unroll={value!r} is not a count of iterations (0: never unroll)")
                t.loop_unroll = int(value)
                continue
            if key == "schedule-knobs":
                from graphopt.targets.tvm.schedules.knobs import ScheduleKnobs

                t.schedule_knobs = ScheduleKnobs.parse(str(value))
                continue
            if key in cls._FREE_OPTIONS:
                setattr(t, key, str(value))
                t._check_cpu(t.mcpu, t.mattr)
                continue
            allowed = cls._OPTIONS.get(key)
            if allowed is None:
                have = ", ".join((*cls._OPTIONS, *cls._FREE_OPTIONS, "buckets", "schedule-knobs", "loop-unroll", "tune-shapes"))
                raise UsageError(f"target {cls.name}: unknown option {key!r} (have: {have})")
            if value not in allowed:
                raise UsageError(f"target {cls.name}: {key}={value!r} is not one of {', '.join(allowed)}")
            setattr(t, key, value)
        return t

    # hooks that targets built on this one (arm64, cuda) override
    def activation_block(self, target: Any) -> int | None:
        """Channels per block of the activations between convolutions (None: NCHW); the
        lowering may halve it per model (`layout.choose_plan`)."""
        from graphopt.targets.machine import machine_model

        if self.layout == "nchw":
            return None
        machine = machine_model(target)
        if self.layout == "nchwc":
            return machine.lanes(32)
        # (the block is one vector of fp32 lanes: 8 on AVX2, 16 on AVX-512, as MLAS's NCHWc)
        return machine.lanes(32) if str(target.kind.name) == "llvm" and machine.arch == "x86_64" else None

    def tvm_target(self, threads: int) -> Any:
        from graphopt.targets.machine import env_mcpu
        from graphopt.targets.tvm import build as B

        mcpu = self.mcpu or env_mcpu()
        self._check_cpu(mcpu, self.mattr)
        mattr = [a for a in (self.mattr or "").split(":") if a]
        return B.host_target(mcpu=mcpu, threads=threads, mattr=mattr or None)

    @classmethod
    def _check_cpu(cls, mcpu: str | None, mattr: str | None) -> None:
        if mattr is not None and any(a[0] not in "+-" for a in mattr.split(":") if a):
            raise UsageError(f"target {cls.name}: mattr={mattr!r}: each feature starts with + or -, "
                             "separated by ':' (-avx512f:+fma)")
        known = _llvm_cpus()
        if mcpu is not None and known and mcpu not in known:
            near = sorted(c for c in known if c.startswith(mcpu[:3]))[:8]
            raise UsageError(f"target {cls.name}: mcpu={mcpu!r} is not a CPU LLVM knows"
                             + (f" (similar: {', '.join(near)})" if near else " (e.g. haswell, skylake-avx512, znver4)"))

    def machine_model(self, threads: int | None = None) -> Any:
        from graphopt.targets.tvm import build as B

        return self.machine(self.tvm_target(int(threads or B.default_threads())))

    def machine(self, target: Any) -> Any:
        """The machine model the compile reads (graphopt.targets.machine)."""
        from graphopt.targets.machine import machine_model

        return machine_model(target)

    def schedule(self, mod: Any, target: Any, options: CompileOptions) -> tuple[Any, Any]:
        from graphopt.targets.tvm import build as B

        return B.schedule(mod, target, tune_trials=options.tune, tune_minutes=options.tune_minutes,
                          tuning_db=options.tuning_db, progress=options.progress,
                          task_labels=options.extra.get("task-labels"), knobs=self.schedule_knobs,
                          tune_shapes=options.extra.get("tune-shapes-inputs"))

    def int8_kernels(self, mod: Any, target: Any, params: dict[str, np.ndarray]) -> tuple[Any, dict[str, str]]:
        """int8 × int8 → int32 matmul kernels with AVX2 micro-kernels (targets/tvm/schedules/int8_x86.py;
        a no-op on other ISAs), scheduled before the default schedules. Returns {function: kind}."""
        from graphopt.targets.tvm.schedules.int8_x86 import schedule_int8_kernels

        return schedule_int8_kernels(mod, target, params)

    def build(self, mod: Any, target: Any) -> Any:
        from graphopt.targets.tvm import build as B

        return B.build(mod, target)

    def param_transform_target(self, target: Any) -> Any | None:
        """The target the weight packing hoisted out of the kernels is built for and run on, at
        compile time (this machine's CPU: the packing functions are plain copies, so an arm64
        build packs its weights here too), or None to leave the packing inside the kernels (non-LLVM
        targets: their schedules do not pack weights)."""
        from graphopt.targets.tvm import build as B

        return B.host_target(threads=1) if str(target.kind.name) == "llvm" else None

    def lift_param_transform(self, mod: Any, target: Any, params: dict[str, np.ndarray]) -> tuple[Any, dict[str, np.ndarray], int]:
        """Hoist the weight packing out of the kernels and apply it to `params` now (see
        `build.lift_weight_packing`): returns `main`'s module, the weights it takes in order (the
        artifact's params) and how many packing functions were hoisted (0: nothing changed)."""
        from graphopt.targets.tvm import build as B

        host = self.param_transform_target(target)
        if host is None:
            return mod, params, 0
        lifted = B.lift_weight_packing(mod, list(params.values()), host)
        if lifted is None:
            return mod, params, 0
        mod, arrays, hoisted = lifted
        names = [str(v.name) for v in mod["main"].params[int(mod["main"].attrs["num_input"]):]]
        if len(set(names)) != len(names):  # the npz keys must be unique
            names = [f"w{i}" for i in range(len(arrays))]
        return mod, dict(zip(names, arrays)), hoisted

    def expand_codebooks(self, model: Model) -> dict[str, dict]:
        """Codebook-clustered weights (cluster-weights) decoded into float initializers for the
        kernels, with what the artifact stores instead (see passes.sharing.codebook.expand_decodes);
        every runner decodes them and runs the lifted weight transform once at load time
        (graphopt.runtime.Runner and its cuda subclass; arm64's QemuRunner and its C++ runner),
        so the artifact keeps the compressed size."""
        from graphopt.passes.sharing.codebook import expand_decodes

        return expand_decodes(model)

    def stored_params(self, codebooks: dict[str, dict], params: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
        from graphopt.passes.sharing.codebook import stored_params

        return stored_params(codebooks, params) if codebooks else (params, {})

    def export(self, exe: Any, path: str) -> None:
        exe.export_library(path)

    def manifest_target(self, target: Any, threads: int) -> dict[str, Any]:
        from graphopt.targets.tvm import build as B

        out = {"name": self.name, "tvm": B.target_json(target), "threads": threads,
               "machine": self.machine(target).to_json()}
        if self.schedule_knobs is not None and self.schedule_knobs.changed():
            out["schedule_knobs"] = self.schedule_knobs.spec()
        return out

    def compile(self, model: Model, options: CompileOptions, *, source_sha256: str | None = None) -> Artifact:
        from graphopt.passes.fusion.kernel_groups import KERNEL_KEY, PlanKernels
        from graphopt.passes.quantize.integer import QdqToInteger, SplitZeroPoints
        from graphopt.targets.tvm import build as B
        from graphopt.transform import PassContext

        if self.tune_shapes is not None:
            if options.tune_shapes is not None:
                raise UsageError("--tune-shapes and the target's tune-shapes= option both given: keep one")
            options = dataclasses.replace(options, tune_shapes=self.tune_shapes)
            plain = copy.copy(self)
            plain.tune_shapes = None
            return plain.compile(model, options, source_sha256=source_sha256)
        if options.tune_shapes is not None:  # (checked again: the Python API's Target.compile comes here directly)
            from graphopt.input_shapes import check_tune_shapes

            options = dataclasses.replace(options, tune_shapes=check_tune_shapes(model, options.tune_shapes))
        if self.buckets:  # the symbolic kernels plus one specialised library per bucket
            from graphopt.input_shapes import fix_input_shapes
            from graphopt.targets.shape_buckets import compile_with_buckets

            return compile_with_buckets(self, model, options, source_sha256, lambda m, d: fix_input_shapes(m, dims=d))
        t0 = time.perf_counter()
        times: dict[str, float] = {}
        if options.tune > 0 and not options.tuning_db:
            raise GraphoptError("tuning (tune > 0) needs a tuning database folder (--tuning-db DIR)")
        # int8: QDQ convs as integer convs, zero points out of the reductions (the int8 kernels' form)
        split = QdqToInteger().run(model, PassContext()).changed
        split = SplitZeroPoints().run(model, PassContext()).changed or split
        codebooks = self.expand_codebooks(model)  # clustered weights: float for the kernels
        if split or codebooks or not any(KERNEL_KEY in n.metadata_props for n in model.graph.nodes):
            PlanKernels().run(model, PassContext())
        threads = int(options.threads or B.default_threads())
        # the weight packing below starts TVM's pool, which fixes its spin count for the process
        from graphopt.runtime import tvm_spin_count

        tvm_spin_count()
        target = self.tvm_target(threads)
        seconds, memory = W.limits_from(options.extra)
        # (time bound off while tuning: its own budget is --tune-minutes / trials / candidates)
        activity = W.Activity()
        with W.Watchdog(0.0 if options.tune > 0 or options.tune_shapes else seconds, memory, activity,
                        hard_exit=bool(options.extra.get("watchdog-hard-exit", False))):
            return self._compile_bounded(model, options, target, threads, activity, t0, times, codebooks, source_sha256)

    def _compile_bounded(self, model: Model, options: CompileOptions, target: Any, threads: int, activity: Any,
                         t0: float, times: dict[str, float], codebooks: dict[str, dict], source_sha256: str | None) -> Artifact:
        """The rest of `compile`, under the watchdog (`activity` says what it is doing)."""
        import tvm

        from graphopt.targets.tvm import build as B
        from graphopt.targets.tvm.lower import lowerer as L

        from graphopt.targets.tvm.schedules.knobs import using

        with using(self.schedule_knobs):  # (the layout plan reads some: a flat conv's tile pixels)
            lowered, mod = L.lower_and_fuse(model, target, block=self.activation_block(target), winograd=self.winograd,
                                            activity=activity, loop_unroll=self.loop_unroll)
        times["lower-fuse"] = time.perf_counter() - t0
        from graphopt.targets.tvm import kernel_map as KM

        facts = KM.kernel_facts(mod)  # FLOPs per kernel, before scheduling (the profiler's map)
        t = time.perf_counter()
        activity.what = f"scheduling {sum(1 for gv in mod.get_global_vars() if isinstance(mod[gv], tvm.tirx.PrimFunc))} kernels"
        mod, int8 = self.int8_kernels(mod, target, lowered.params)
        if options.tune > 0 or options.tune_shapes:  # tuning's progress bar names each kernel's ONNX nodes
            options = dataclasses.replace(options, extra={**options.extra, "task-labels": KM.node_labels(lowered)})
        if options.tune_shapes:  # the shapes of main's inputs in order at each size (None: not given)
            names = [v.name for v in model.graph.inputs if not (v.is_initializer() and v.const_value is not None)]
            per_size = [[tuple(s[n]) if n in s else None for n in names] for s in options.tune_shapes]
            options = dataclasses.replace(options, extra={**options.extra, "tune-shapes-inputs": per_size})
        mod, sched = self.schedule(mod, target, options)
        if int8:
            kinds = sorted(set(int8.values()))
            sched.default_schedules = f"{sched.default_schedules}; x86 int8 kernels: {len(int8)} ({', '.join(kinds)})"
        times["schedule"] = time.perf_counter() - t
        t = time.perf_counter()
        activity.what = "packing the weights"
        # packing weights at every run costs (a 3x3 conv with 512 channels: 2.6x onnxruntime's time
        # with it, 1.2x without): it runs once here and params.npz holds the packed weights
        stored, codebook_params = self.stored_params(codebooks, lowered.params)
        transform = B.lift_transform(mod) if codebook_params else None
        if codebook_params:  # the decode runs at load time, and so must the packing of every weight
            mod, hoisted = transform if transform is not None else (mod, 0)
            params = lowered.params
        else:
            mod, params, hoisted = self.lift_param_transform(mod, target, lowered.params)
            stored = params
        times["pack-weights"] = time.perf_counter() - t
        t = time.perf_counter()
        activity.what = "building the library (LLVM)"
        exe = self.build(mod, target)
        times["build"] = time.perf_counter() - t
        kmap = KM.kernel_map(mod, lowered, facts, rules=getattr(sched, "by_func", {}), int8=int8,
                             tuned=sched.tuning.get("status") in ("tuned", "database applied"),
                             other="dlight gpu" if str(sched.default_schedules).startswith("dlight") else "unscheduled")

        activity.what = "writing the artifact"
        with temporary_artifact_dir() as folder:
            t = time.perf_counter()
            lib = os.path.join(folder, LIBRARY)
            self.export(exe, lib)
            # bf16 weights (convert-precision{dtype=bf16}): .npz has no bfloat16, so their bits go
            # as uint16 and the runtime views them back (runtime.bfloat16 lists them)
            bf16 = [k for k, v in stored.items() if np.asarray(v).dtype.name == "bfloat16"]
            np.savez(os.path.join(folder, PARAMS), **{k: (np.asarray(v).view(np.uint16) if k in bf16 else v) for k, v in stored.items()})
            times["export"] = time.perf_counter() - t
            g = model.graph
            inputs = [v for v in g.inputs if not (v.is_initializer() and v.const_value is not None)]
            import onnx

            import graphopt

            kernels = {
                "groups": len(lowered.groups) + len(lowered.inline_groups) + len(lowered.symbolic_groups),
                "primitive": len(lowered.groups),
                "blocked": len(lowered.blocked_groups),
                "block": lowered.block,  # channels per block (the machine's fp32 lanes, or half: layout.choose_plan)
                # 3x3 convs in Winograd form, by m of F(m x m, 3 x 3) ({"2": 13}: 13 in F(2x2))
                "winograd": {str(m): k for m, k in sorted(Counter(lowered.winograd_convs.values()).items())},
                "inline": lowered.inline_groups,
                "symbolic": len(lowered.symbolic_groups),
                "primfuncs": sum(1 for gv in mod.get_global_vars() if isinstance(mod[gv], tvm.tirx.PrimFunc)),
            }
            if lowered.winograd_symbolic:
                kernels["winograd_symbolic"] = len(lowered.winograd_symbolic)
            manifest = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "target": self.manifest_target(target, threads),
                "inputs": _io(inputs),
                "outputs": _io(g.outputs),
                "files": {
                    "library": {"path": LIBRARY, "sha256": sha256_file(lib), "bytes": os.path.getsize(lib)},
                    "params": {"path": PARAMS, "sha256": sha256_file(os.path.join(folder, PARAMS)),
                               "bytes": os.path.getsize(os.path.join(folder, PARAMS))},
                },
                "source": {"sha256": source_sha256},
                "versions": {"graphopt": graphopt.__version__, "tvm": tvm.__version__, "onnx": onnx.__version__,
                             "python": platform.python_version()},
                "kernels": kernels,
                # symbolic input dims: {"H": {"input", "axis", "multiple", "min", "why"?}}; one
                # library serves every size graphopt.runtime accepts (it checks multiple and min)
                "dims": {"symbolic": lowered.symbolic_dims},
                "schedules": {"default": sched.default_schedules, "rules": sched.by_rule,
                              "fallback": sched.fallback},
                "tuning": sched.tuning,
                "kernel_map": kmap,  # kernel calls → ONNX nodes, FLOPs, schedule (graphopt-run --profile)
                # params: main's weights after the inputs, packed already by `packed` hoisted functions
                "runtime": {"kind": "tvm-relax-vm", "entry": "main", "params": list(params), "packed": hoisted}
                | ({"codebooks": codebook_params} if codebook_params else {})
                | ({"transform": B.TRANSFORM_PARAMS} if transform is not None else {})
                | ({"bfloat16": bf16} if bf16 else {}),
            }
            write_manifest(folder, manifest)
            times["total"] = time.perf_counter() - t0
            report = {
                "target": self.name,
                "pipeline": options.pipeline if isinstance(options.pipeline, str) else [getattr(p, "name", str(p)) for p in options.pipeline],
                "seconds": {k: round(v, 3) for k, v in times.items()},
                "kernels": kernels,
                "tuning": sched.tuning,
                "schedules": {"default": sched.default_schedules, "rules": sched.by_rule,
                              "fallback": sched.fallback},
                "weights": {"packed_at_compile": hoisted},
                "dims": {"symbolic": lowered.symbolic_dims},
                "warnings": _fallback_warnings(sched.fallback) + _dims_warnings(lowered),
                "python": sys.version.split()[0],
            }
            with open(os.path.join(folder, REPORT), "w", encoding="utf-8") as f:
                f.write(json.dumps(report, indent=2) + "\n")
            return Artifact(folder, owned=True)

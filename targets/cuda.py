"""Target `cuda`: the cpu target's lowering with dlight GPU schedules, for NVIDIA GPUs.

    graphopt-compile model.onnx --target cuda -o out/               # sm_80 (A100) by default
    graphopt-compile model.onnx --target 'cuda{arch=sm_90}' -o out/  # H100
    graphopt.runtime.load("out/").run({"x": x})                      # needs a GPU and its driver

Kernel groups, lowering and the artifact layout are the cpu target's. Each group's PrimFunc gets
a dlight GPU schedule (Matmul, GEMV, Reduction, GeneralReduction, else Fallback: thread-bound
elementwise loops); the Relax VM code runs on the host (LLVM for this machine). Building needs
no GPU: TVM's CUDA codegen writes CUDA C source into the library, which is compiled for the GPU
when the library is loaded there (nvcc with TVM_CUDA_COMPILE_MODE=nvcc, else NVRTC from the
cuda-bindings package). At compile time, when nvcc is installed, the source is also compiled to
PTX for `arch` (`kernels.ptx` in the artifact, `ptx: true` in the manifest): a check that it
builds for that architecture, and the PTX a user can inspect.

Codebook-clustered weights (cluster-weights) stay compressed in params.npz as on the cpu target:
CudaRunner (graphopt.runtime.Runner) decodes them with numpy on the host when loading, copies the
float weights to the GPU, and runs the library's `main_transform_params` there once when the
compile lifted weight-only work out of `main` (a Transpose of a clustered weight, say).

Tuning (`--tune N --tuning-db DIR`) runs meta_schedule on the GPU of this machine and is refused
without one.

Options (`cuda{key=value,...}`): arch (sm_XX, default sm_80; profiles a100 → sm_80, h100 →
sm_90, l4 → sm_89, a10 → sm_86), ptx (0: skip the nvcc PTX check).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from graphopt.errors import GraphoptError, UsageError
from graphopt.runtime import Runner
from graphopt.target import Artifact, ArtifactError, CompileOptions
from graphopt.targets.cpu import CpuTarget

DEFAULT_ARCH = "sm_80"
PROFILES = {"a100": "sm_80", "a10": "sm_86", "l4": "sm_89", "h100": "sm_90", "h200": "sm_90"}
PTX_FILE = "kernels.ptx"


def gpu_available() -> bool:
    """A CUDA GPU TVM can use (driver present, device 0 exists)."""
    if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
        return False
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


def nvcc() -> str | None:
    return shutil.which("nvcc") or (shutil.which("/usr/local/cuda/bin/nvcc"))


@dataclass
class CudaTarget(CpuTarget):
    """NVIDIA GPU (see module docstring)."""

    name: ClassVar[str] = "cuda"

    arch: str = DEFAULT_ARCH
    ptx: bool = True

    def __post_init__(self) -> None:
        self.arch = PROFILES.get(self.arch.lower(), self.arch)
        a = self.arch
        if not (a.startswith("sm_") and a[3:].rstrip("af").isdigit() and int(a[3:].rstrip("af")) >= 50):
            raise UsageError(f"target cuda: arch {a!r} is not sm_XX (>= sm_50) or one of {', '.join(PROFILES)}")

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> CudaTarget:
        kw: dict[str, Any] = {}
        for key, value in options.items():
            if key in ("arch", "profile"):
                kw["arch"] = value
            elif key == "ptx":
                if value.lower() not in ("0", "1", "true", "false"):
                    raise UsageError(f"target cuda: ptx={value!r} is not 0 or 1")
                kw["ptx"] = value.lower() in ("1", "true")
            else:
                raise UsageError(f"target cuda: unknown option {key!r} (have: arch, ptx)")
        return cls(**kw)

    def machine_model(self, threads: int | None = None) -> Any:
        return None  # (a GPU: no CPU machine model; the host's CPU only runs the VM)

    def tvm_target(self, threads: int) -> Any:
        import tvm

        from graphopt.targets.tvm import build as B

        host = {"kind": "llvm", "mtriple": str(tvm.target.codegen.llvm_get_system_triple()), "mcpu": B.host_cpu()}
        return tvm.target.Target({"kind": "cuda", "arch": self.arch, "host": host})

    def schedule(self, mod: Any, target: Any, options: CompileOptions) -> tuple[Any, Any]:
        from tvm.s_tir import dlight as dl

        from graphopt.targets.tvm import build as B
        from graphopt.targets.tvm.schedules.fast_math import use_vector_isnan

        use_vector_isnan(False)  # (a cpu build before this one in the process marked it for LLVM only)
        info = B.ScheduleInfo()
        if options.tune > 0:
            if not gpu_available():
                raise GraphoptError("tuning for cuda measures on the GPU and this machine has none (build untuned: "
                                    "drop --tune, or tune on a GPU machine with the same --tuning-db)")
            info.tuning = _tune_on_gpu(mod, target, options)
        if options.tuning_db and os.path.isdir(options.tuning_db):
            from graphopt.targets.tvm.tuning import tuner as tvm_tuning

            mod = tvm_tuning.apply_database(mod, target, options.tuning_db)
            info.tuning.setdefault("status", "database applied")
        with target:
            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        info.default_schedules = "dlight gpu"
        return mod, info

    def build(self, mod: Any, target: Any) -> Any:
        import tvm
        from tvm import relax
        from tvm.relax.backend.cuda import pipeline as cuda_pipeline

        @tvm.transform.module_pass(opt_level=0)
        def _finish(m: Any, _ctx: Any) -> Any:
            with target:
                passes = [relax.transform.LegalizeOps()]
                passes += cuda_pipeline.dataflow_lower_passes(target) + cuda_pipeline.finalize_passes(target)
                return tvm.transform.Sequential(passes)(m)

        return relax.build(mod, target, relax_pipeline=_finish)

    def export(self, exe: Any, path: str) -> None:
        exe.export_library(path)
        self._ptx_ok = False
        if self.ptx and nvcc() is not None:
            src = cuda_source(exe)
            from tvm.support import nvcc as tvm_nvcc

            import tvm

            try:
                with tvm.target.Target({"kind": "cuda", "arch": self.arch}):  # nvcc.py reads the current target
                    ptx = tvm_nvcc.compile_cuda(src, target_format="ptx", arch=self.arch, compiler="nvcc")
            except Exception as e:  # the embedded source does not build for arch: a real error
                lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines()[-1:]
                raise GraphoptError(f"target cuda: nvcc cannot compile the kernels for {self.arch}: {lines[0][:300]}") from None
            with open(os.path.join(os.path.dirname(path), PTX_FILE), "wb") as f:
                f.write(ptx if isinstance(ptx, bytes) else bytes(ptx))
            self._ptx_ok = True

    def manifest_target(self, target: Any, threads: int) -> dict[str, Any]:
        d = dict(target.export())
        host = dict(d.get("host", {}))
        tvm_json = {"kind": "cuda", "arch": self.arch,
                    "host": {"kind": "llvm", "mtriple": str(host.get("mtriple")), "mcpu": str(host.get("mcpu"))}}
        return {"name": self.name, "tvm": tvm_json, "threads": threads, "device": "cuda", "arch": self.arch,
                "embedded": "cuda-source", "ptx": bool(getattr(self, "_ptx_ok", False)), "nvcc": _nvcc_version()}


def _nvcc_version() -> str | None:
    exe = nvcc()
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((ln.split("release")[-1].strip() for ln in out.splitlines() if "release" in ln), None)


def cuda_source(exe: Any) -> str:
    """The CUDA C source of a built executable's device module."""
    stack = [exe.mod]
    while stack:
        m = stack.pop()
        if getattr(m, "kind", None) == "cuda":
            return str(m.inspect_source(""))
        stack.extend(getattr(m, "imports", []) or [])
    raise GraphoptError("the executable holds no CUDA module")


def _tune_on_gpu(mod: Any, target: Any, options: CompileOptions) -> dict[str, Any]:
    """meta_schedule on this machine's GPU into options.tuning_db (local builder and runner)."""
    import tvm.support.nvcc  # noqa: F401 - registers the CUDA compile callback the builder needs
    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.tvm.schedules import is_tunable_kernel

    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc" if nvcc() else "nvrtc")
    db_dir = os.path.abspath(str(options.tuning_db))
    os.makedirs(db_dir, exist_ok=True)
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target) if is_tunable_kernel(t.dispatched[0]["main"])]
    if not tasks:
        return {"status": "nothing to tune"}
    database = ms.database.JSONDatabase(work_dir=db_dir, module_equality="structural")
    ms.relax_integration.tune_relax(mod=mod, params={}, target=target, work_dir=db_dir, database=database,
                                    max_trials_global=int(options.tune), num_trials_per_iter=min(64, int(options.tune)))
    return {"status": "tuned", "trials": int(options.tune), "tasks_selected": len(tasks), "db": db_dir}


# --- running -----------------------------------------------------------------------------------


class CudaRunner(Runner):
    """The Relax VM on CUDA device 0 (weights copied to the GPU once)."""

    measures_threads = False  # (its kernels run on the GPU: host threads are not the question)

    def _make_device(self, tvm: Any) -> Any:
        dev = tvm.cuda(0)
        if not dev.exist:
            raise ArtifactError(f"{self.artifact.path}: a cuda artifact needs an NVIDIA GPU and its driver; none here")
        if os.environ.get("TVM_CUDA_COMPILE_MODE") is None and nvcc() is not None:
            os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"  # the embedded source is compiled at load
        import tvm.support.nvcc  # noqa: F401 - the compile callback

        return dev

    def run(self, inputs: Any) -> list[Any]:
        out = super().run(inputs)
        self.device.sync()
        return out

    def benchmark(self, inputs: Any, **kwargs: Any) -> dict[str, Any]:
        # time with the device synchronised after each call, so latency includes the kernels
        main = self._main

        def synced(*args: Any) -> Any:
            r = main(*args)
            self.device.sync()
            return r

        self._main = synced
        try:
            return super().benchmark(inputs, **kwargs)
        finally:
            self._main = main


def load_runner(artifact: Artifact, *, threads: int | None = None) -> Runner:
    if not gpu_available():
        raise ArtifactError(f"{artifact.path}: a cuda artifact ({artifact.manifest.get('target', {}).get('arch')}) needs "
                            "an NVIDIA GPU and its driver; none here")
    return CudaRunner(artifact, threads=threads)

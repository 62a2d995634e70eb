"""Target `arm64`: the cpu target's kernels cross-compiled for aarch64 Linux with NEON.

    graphopt-compile model.onnx --target 'arm64{profile=neoverse-n1}' -o out/
    graphopt-compile model.onnx --target 'arm64{mcpu=cortex-a76,dotprod=1,i8mm=0}' -o out/
    graphopt.compile(model, target="arm64{profile=apple-m2}")
    graphopt.runtime.load("out/").run({"x": x})   # on x86: under qemu-aarch64; on a board: natively

The pipeline, kernel groups, lowering, default schedules, artifact layout (model.so + params.npz
+ manifest.json) are the cpu target's; what differs:

- LLVM target `{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": ..., "mattr": ["+neon", ...]}`
  from a named profile and/or an mcpu and feature flags (the manifest records the effective
  features LLVM reports for it).
- The library is linked with the aarch64 cross compiler (`tvm.support.cc.cross_compiler`), so it
  is an AArch64 ELF.
- Running: on an aarch64 machine the artifact loads into TVM in-process like a cpu artifact; on
  x86 `graphopt.runtime.load` returns a `QemuRunner` that runs the library with the native
  aarch64 runner (`graphopt.targets.arm64.toolchain`) under qemu-aarch64, passing .npy files.
- Codebook-clustered weights (cluster-weights) stay compressed in params.npz as on the cpu
  target; either runner decodes them with numpy at load time and has the library's lifted
  `main_transform_params` (the weight packing) run once before `main` (the C++ runner with
  `--transform`).
- Tuning measures on the device through TVM RPC (`rpc=HOST:PORT` of a tracker, `rpc_key=KEY`);
  see `graphopt.targets.arm64.tuning`.

Options (`arm64{key=value,...}`):
    profile   generic | cortex-a55 | cortex-a72 | cortex-a76 | neoverse-n1 | neoverse-v1 |
              apple-m1 | apple-m2   (default generic: any ARMv8-A with NEON)
    mcpu      an LLVM CPU name (overrides the profile's)
    dotprod, i8mm, sve, fp16, bf16   1/0: add/remove a feature over what mcpu implies
    threads   worker threads of the artifact (default 1; a board sets its core count)
    rpc, rpc_key   tracker address and device key for tuning (--tune N --tuning-db DIR)
    cxx       the cross compiler (default aarch64-linux-gnu-g++, or $GRAPHOPT_ARM64_CXX)
    asm       1: also write the kernels' assembly as kernels.s in the artifact
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from graphopt.errors import GraphoptError, UsageError
from graphopt.target import Artifact, ArtifactError, CompileOptions
from graphopt.targets.cpu import CpuTarget

TRIPLE = "aarch64-linux-gnu"
ASM_FILE = "kernels.s"

#: named cores: LLVM mcpu (its implied features are what the target gets unless overridden)
PROFILES: dict[str, dict[str, Any]] = {
    "generic": {"mcpu": "generic", "about": "any ARMv8-A core with NEON (no dotprod)"},
    "cortex-a55": {"mcpu": "cortex-a55", "about": "little cores of phone SoCs, RK3566/RK3568 boards: dotprod"},
    "cortex-a72": {"mcpu": "cortex-a72", "about": "Raspberry Pi 4: NEON only"},
    "cortex-a76": {"mcpu": "cortex-a76", "about": "Raspberry Pi 5, RK3588 big cores: dotprod, fp16"},
    "neoverse-n1": {"mcpu": "neoverse-n1", "about": "AWS Graviton2, Ampere Altra: dotprod, fp16"},
    "neoverse-v1": {"mcpu": "neoverse-v1", "about": "AWS Graviton3: dotprod, i8mm, SVE 256-bit, bf16"},
    "apple-m1": {"mcpu": "apple-m1", "about": "Apple M1 (Linux on Apple silicon): dotprod, fp16"},
    "apple-m2": {"mcpu": "apple-m2", "about": "Apple M2: dotprod, i8mm, bf16"},
}
#: option name → LLVM feature
FEATURES: dict[str, str] = {"dotprod": "dotprod", "i8mm": "i8mm", "sve": "sve", "fp16": "fullfp16", "bf16": "bf16"}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _flag(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise UsageError(f"target arm64: option {name}={value!r} is not 0 or 1")


@dataclass
class Arm64Target(CpuTarget):
    """aarch64 Linux with NEON, cross-compiled (see module docstring)."""

    name: ClassVar[str] = "arm64"

    profile: str = "generic"
    mcpu: str | None = None
    features: dict[str, bool] = field(default_factory=dict)  # explicit +/- over what mcpu implies
    threads: int | None = None
    rpc: str | None = None
    rpc_key: str = "arm64"
    cxx: str | None = None
    asm: bool = False

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise UsageError(f"target arm64: unknown profile {self.profile!r} (have: {', '.join(PROFILES)})")
        unknown = sorted(set(self.features) - set(FEATURES))
        if unknown:
            raise UsageError(f"target arm64: unknown feature {unknown[0]!r} (have: {', '.join(FEATURES)})")

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Arm64Target:
        kw: dict[str, Any] = {}
        feats: dict[str, bool] = {}
        for key, value in options.items():
            if key in FEATURES:
                feats[key] = _flag(key, value)
            elif key in ("profile", "mcpu", "rpc", "rpc_key", "cxx"):
                kw[key] = value
            elif key == "threads":
                try:
                    kw["threads"] = int(value)
                except ValueError:
                    raise UsageError(f"target arm64: threads={value!r} is not an integer") from None
                if kw["threads"] < 1:
                    raise UsageError("target arm64: threads must be at least 1")
            elif key == "asm":
                kw["asm"] = _flag(key, value)
            else:
                known = ["profile", "mcpu", *FEATURES, "threads", "rpc", "rpc_key", "cxx", "asm"]
                raise UsageError(f"target arm64: unknown option {key!r} (have: {', '.join(known)})")
        return cls(features=feats, **kw)

    # --- the LLVM target ---------------------------------------------------------------------

    def llvm_spec(self, threads: int = 1) -> dict[str, Any]:
        mattr = ["+neon"] + [("+" if on else "-") + FEATURES[f] for f, on in sorted(self.features.items())]
        return {"kind": "llvm", "mtriple": TRIPLE, "mcpu": self.mcpu or PROFILES[self.profile]["mcpu"],
                "mattr": mattr, "num-cores": int(threads)}

    def tvm_target(self, threads: int) -> Any:
        import tvm

        return tvm.target.Target(self.llvm_spec(threads))

    def compile(self, model: Any, options: CompileOptions, *, source_sha256: str | None = None) -> Artifact:
        if self.threads is None and options.threads is None:
            # the host's core count means nothing for the board: one thread unless told
            options = CompileOptions(**{**options.__dict__, "threads": 1})
        elif self.threads is not None:
            options = CompileOptions(**{**options.__dict__, "threads": self.threads})
        self._compiler()  # fail before the work when the cross compiler is missing
        return super().compile(model, options, source_sha256=source_sha256)

    @staticmethod
    def effective_features(target: Any) -> dict[str, bool]:
        """What LLVM says the target has (mcpu's implied features plus mattr)."""
        from tvm.target import codegen

        out = {"neon": bool(codegen.target_has_features("neon", target))}
        for opt, feat in FEATURES.items():
            out[opt] = bool(codegen.target_has_features(feat, target))
        return out

    def manifest_target(self, target: Any, threads: int) -> dict[str, Any]:
        d = dict(target.export())
        tvm_json = {"kind": "llvm", "mtriple": str(d["mtriple"]), "mcpu": str(d.get("mcpu", "generic")),
                    "mattr": [str(x) for x in d.get("mattr", ())], "num-cores": int(threads)}
        return {"name": self.name, "tvm": tvm_json, "threads": threads, "triple": TRIPLE, "arch": "aarch64",
                "profile": self.profile if self.mcpu is None else None, "features": self.effective_features(target)}

    # --- scheduling, export --------------------------------------------------------------------

    def schedule(self, mod: Any, target: Any, options: CompileOptions) -> tuple[Any, Any]:
        from graphopt.targets.tvm import build as B

        if options.tune > 0:
            if not self.rpc:
                raise GraphoptError("tuning for arm64 measures on the device through TVM RPC: give the tracker "
                                    "and the device key as target options, arm64{...,rpc=HOST:PORT,rpc_key=KEY} "
                                    "(see README: tuning on a board)")
            from graphopt.targets.arm64 import tuning as arm64_tune

            summary = arm64_tune.rpc_tune(mod, target, db_dir=str(options.tuning_db), trials=options.tune,
                                          minutes=options.tune_minutes, tracker=self.rpc, key=self.rpc_key,
                                          cxx=self._compiler(), progress=bool(options.progress))
            mod, int8 = self._int8(mod, target)
            mod, info = B.schedule(mod, target, tuning_db=options.tuning_db)
            info.tuning = summary
        else:
            mod, int8 = self._int8(mod, target)
            mod, info = B.schedule(mod, target, tuning_db=options.tuning_db)
        if int8:
            info.default_schedules = f"{info.default_schedules}; int8 dot-product kernels: {len(int8)}"
        return mod, info

    @staticmethod
    def _int8(mod: Any, target: Any) -> tuple[Any, dict[str, str]]:
        from graphopt.targets.tvm.schedules.int8_arm64 import schedule_int8_kernels

        return schedule_int8_kernels(mod, target)

    def _compiler(self) -> str:
        from graphopt.targets.arm64 import toolchain as arm64_env

        cxx = shutil.which(self.cxx) if self.cxx else arm64_env.cross_compiler()
        if cxx is None:
            raise GraphoptError(f"target arm64 links with an aarch64 cross compiler and {self.cxx or 'aarch64-linux-gnu-g++'} "
                                "is not installed (apt-get install g++-aarch64-linux-gnu, or arm64{cxx=...})")
        return cxx

    def export(self, exe: Any, path: str) -> None:
        from tvm.support import cc

        exe.export_library(path, fcompile=cc.cross_compiler(self._compiler()))
        if self.asm:
            with open(os.path.join(os.path.dirname(path), ASM_FILE), "w", encoding="utf-8") as f:
                f.write(assembly(exe))


def assembly(exe: Any) -> str:
    """The generated assembly of a built executable's LLVM module(s)."""
    out = []
    stack = [exe.mod]
    seen = 0
    while stack and seen < 64:
        m = stack.pop()
        seen += 1
        if getattr(m, "kind", None) == "llvm" or "llvm" in str(getattr(m, "type_key", "")):
            out.append(m.inspect_source("asm"))
        stack.extend(getattr(m, "imports", []) or [])
    if not out:
        raise GraphoptError("the executable holds no LLVM module")
    return "\n".join(out)


# --- running -----------------------------------------------------------------------------------


def load_runner(artifact: Artifact, *, threads: int | None = None) -> Any:
    """The runner of an arm64 artifact: TVM in-process on an aarch64 machine, qemu otherwise."""
    from graphopt.runtime import Runner
    from graphopt.targets.arm64 import toolchain as arm64_env

    if arm64_env.is_aarch64_host():
        return Runner(artifact, threads=threads)
    return QemuRunner(artifact, threads=threads)


class QemuRunner:
    """Runs an arm64 artifact on x86: the aarch64 runner under qemu-aarch64, .npy files in and out.

    The weights are written once per runner (a temporary folder removed by `close`). Timings of
    `benchmark` are of the emulated code: about 9x slower than native and not ARM's ratios."""

    def __init__(self, artifact: Artifact, *, threads: int | None = None) -> None:
        from graphopt.runtime import Runner, checked_files
        from graphopt.targets.arm64 import toolchain as arm64_env

        m = artifact.manifest
        rt = m.get("runtime", {})
        if rt.get("kind") != "tvm-relax-vm":
            raise ArtifactError(f"{artifact.path}: runtime {rt.get('kind')!r} is not supported by this graphopt")
        self.artifact = artifact
        self.manifest = m
        self.inputs = m["inputs"]
        self.outputs = m["outputs"]
        self._paths = checked_files(artifact)
        self.threads = int(threads or m.get("target", {}).get("threads") or 1)
        try:
            self._cmd = arm64_env.runner_command(self.threads)
        except arm64_env.Arm64EnvError as e:
            raise ArtifactError(f"{artifact.path}: an arm64 artifact on {platform.machine()}: {e}") from None
        self._params_dir: str | None = None
        self._param_files: list[str] = []
        self._param_names = list(rt.get("params", []))
        self._runtime = rt
        # the weights as stored (clustered: decoded here) go through the library's lifted
        # transform (the weight packing) once per process, before main
        self._transform = ["--transform", str(rt["transform"]), "--inputs", str(len(self.inputs))] if rt.get("transform") else []
        self._check = Runner._feeds  # the input checks of the in-process runner
        self.last_stdout = ""

    input_names = property(lambda self: [i["name"] for i in self.inputs])
    output_names = property(lambda self: [o["name"] for o in self.outputs])

    def _to_device(self, a: np.ndarray) -> np.ndarray:
        return a

    def _params(self) -> list[str]:
        from graphopt.codebook import stored_param

        if self._params_dir is None:
            self._params_dir = tempfile.mkdtemp(prefix="graphopt-arm64-params-")
            with np.load(self._paths["params"], allow_pickle=False) as data:
                for i, name in enumerate(self._param_names):
                    f = os.path.join(self._params_dir, f"p{i}.npy")
                    np.save(f, np.require(stored_param(data, name, self._runtime), requirements="C"))  # codebooks decoded
                    self._param_files.append(f)
        return self._param_files

    def _invoke(self, inputs: Mapping[str, Any] | Sequence[Any], repeat: int = 0) -> tuple[list[np.ndarray], str]:
        feeds = self._check(self, inputs)
        params = self._params()
        with tempfile.TemporaryDirectory(prefix="graphopt-arm64-run-") as work:
            files = []
            for i, a in enumerate(feeds):
                f = os.path.join(work, f"in{i}.npy")
                np.save(f, a)
                files.append(f)
            extra = ["--repeat", str(repeat)] if repeat > 0 else []
            proc = subprocess.run([*self._cmd, *extra, *self._transform, self._paths["library"], work, *files, *params],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                msg = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
                raise GraphoptError(f"{self.artifact.path}: the aarch64 runner failed: {msg[:400]}")
            n = len(self.outputs)
            outs = [np.load(os.path.join(work, f"out{i}.npy")) for i in range(n)]
        return outs, proc.stdout

    def run(self, inputs: Mapping[str, Any] | Sequence[Any]) -> list[np.ndarray]:
        outs, self.last_stdout = self._invoke(inputs)
        return outs

    def benchmark(self, inputs: Mapping[str, Any] | Sequence[Any], *, warmup: int = 1, repeat: int = 10,
                  seconds: float | None = None) -> dict[str, Any]:
        """Mean latency of `repeat` runs inside one emulated process (qemu: not ARM's speed)."""
        _, out = self._invoke(inputs, repeat=max(1, repeat))
        ms = float(next(ln.split("=", 1)[1] for ln in out.splitlines() if ln.startswith("latency_ms=")))
        return {"runs": repeat, "mean_ms": ms, "threads": self.threads, "emulated": True}

    def close(self) -> None:
        if getattr(self, "_params_dir", None) is not None:
            shutil.rmtree(self._params_dir, ignore_errors=True)
            self._params_dir = None
            self._param_files = []

    def __del__(self) -> None:
        self.close()

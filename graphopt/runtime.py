"""Run a compiled artifact.

    runner = graphopt.runtime.load("out/", threads=2)
    outputs = runner.run({"x": x})                 # list of numpy arrays
    stats = runner.benchmark({"x": x}, repeat=50)  # latency percentiles in milliseconds

Loading checks the artifact: the manifest's format, and the sha256 of the library and of the
weights against the manifest — a library whose hash does not match is refused (ArtifactError)
before it is loaded, so a swapped or corrupted library never runs. Inputs are checked against
the manifest's names, dtypes and static dims.

TVM's thread pool counts half the vCPUs on some machines (one thread on a 2-vCPU box), so the
runner sets the thread count explicitly: `threads` (default: every core this process may use).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphopt.errors import UsageError
from graphopt.target import Artifact, ArtifactError, sha256_file


def _contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    return np.require(a, requirements="C")


def _configure_threads(threads: int) -> None:
    # before TVM creates its pool the environment decides; afterwards only config_threadpool
    # with an explicit CPU list changes the count (without the list it keeps the old count)
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import tvm_ffi

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    # mode -3: threads share all the listed cores (not pinned one per core: friendlier when shared)
    tvm_ffi.get_global_func("runtime.config_threadpool")(-3, threads, [str(c) for c in cpus])


def checked_files(artifact: Artifact) -> dict[str, str]:
    """The paths of the artifact's library and params, after checking them against the manifest
    (inside the folder, present, sha256 equal); ArtifactError otherwise."""
    files = artifact.manifest.get("files", {})
    paths = {}
    for key in ("library", "params"):
        entry = files.get(key)
        if not entry:
            raise ArtifactError(f"{artifact.path}: the manifest names no {key} file")
        path = os.path.join(artifact.path, entry["path"])
        if os.path.dirname(os.path.abspath(path)) != artifact.path:
            raise ArtifactError(f"{artifact.path}: {key} path {entry['path']!r} leaves the artifact folder")
        if not os.path.exists(path):
            raise ArtifactError(f"{artifact.path}: {key} file {entry['path']} is missing")
        digest = sha256_file(path)
        if digest != entry.get("sha256"):
            raise ArtifactError(
                f"{artifact.path}: {entry['path']} does not match the manifest (sha256 {digest[:16]}…, "
                f"manifest says {str(entry.get('sha256'))[:16]}…); refusing to load it"
            )
        paths[key] = path
    return paths


def _param(data: Any, name: str, rt: Mapping[str, Any]) -> np.ndarray:
    """Param `name` of an artifact's params file; a clustered weight (cpu target) is stored as
    its bit-packed indices and codebook and decoded here."""
    entry = rt.get("codebooks", {}).get(name)
    if entry is None:
        return data[name]
    from graphopt.passes.sharing.codebook import decode_artifact

    return decode_artifact(data[entry["indices"]], data[entry["codebook"]], entry)


class Runner:
    """A loaded cpu artifact: the Relax VM with the weights bound."""

    def __init__(self, artifact: Artifact, *, threads: int | None = None) -> None:
        m = artifact.manifest
        self.artifact = artifact
        self.manifest = m
        rt = m.get("runtime", {})
        if rt.get("kind") != "tvm-relax-vm":
            raise ArtifactError(f"{artifact.path}: runtime {rt.get('kind')!r} is not supported by this graphopt")
        paths = checked_files(artifact)
        _check_cpu(artifact)
        self.threads = int(threads or m.get("target", {}).get("threads") or _cores())
        try:
            import tvm
            from tvm import relax
        except ModuleNotFoundError:
            raise UsageError("running a cpu artifact needs apache-tvm: pip install 'graphopt[tvm]'") from None
        _configure_threads(self.threads)
        self._tvm = tvm
        lib = tvm.runtime.load_module(paths["library"])
        self.device = self._make_device(tvm)
        self.vm = relax.VirtualMachine(lib, self.device)
        self._main = self.vm[rt.get("entry", "main")]
        with np.load(paths["params"], allow_pickle=False) as data:
            self._params = [tvm.runtime.tensor(_contiguous(_param(data, name, rt)), self.device) for name in rt.get("params", [])]
        if rt.get("transform"):  # params stored as the model holds them (clustered: indices + codebooks)
            try:
                transform = self.vm[rt["transform"]]
            except Exception:
                raise ArtifactError(f"{artifact.path}: the library has no function {rt['transform']!r}") from None
            out = transform(self._params)  # the weight packing, once, here
            self._params = [out[i] for i in range(len(out))]
        self.inputs = m["inputs"]
        self.outputs = m["outputs"]

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]

    def _feeds(self, inputs: Mapping[str, Any] | Sequence[Any]) -> list[Any]:
        names = self.input_names
        if isinstance(inputs, Mapping):
            unknown = sorted(set(inputs) - set(names))
            if unknown:
                raise UsageError(f"the model has no input {unknown[0]!r} (inputs: {', '.join(names) or 'none'})")
            missing = [n for n in names if n not in inputs]
            if missing:
                raise UsageError(f"no value for input {missing[0]!r}")
            arrays = [inputs[n] for n in names]
        else:
            arrays = list(inputs)
            if len(arrays) != len(names):
                raise UsageError(f"the model takes {len(names)} inputs, {len(arrays)} were given")
        out = []
        for spec, a in zip(self.inputs, arrays):
            a = np.asarray(a)
            want = spec.get("dtype")
            if want is not None and a.dtype != np.dtype(want):
                raise UsageError(f"input {spec['name']!r}: dtype {a.dtype} given, the model takes {want}")
            shape = spec.get("shape")
            if shape is not None:
                if len(shape) != a.ndim or any(isinstance(d, int) and d != s for d, s in zip(shape, a.shape)):
                    shown = "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"
                    raise UsageError(f"input {spec['name']!r}: shape {list(a.shape)} given, the model takes {shown}")
            out.append(self._to_device(_contiguous(a)))
        return out

    # hooks for runners of other devices (graphopt.targets.cuda, graphopt.targets.arm64)
    def _make_device(self, tvm: Any) -> Any:
        return tvm.cpu()

    def _to_device(self, a: np.ndarray) -> Any:
        return self._tvm.runtime.tensor(a, self.device)

    def run(self, inputs: Mapping[str, Any] | Sequence[Any]) -> list[np.ndarray]:
        """Outputs in the model's output order, as numpy arrays."""
        res = self._main(*self._feeds(inputs), *self._params)
        return _flatten(res, len(self.outputs))

    def benchmark(self, inputs: Mapping[str, Any] | Sequence[Any], *, warmup: int = 3, repeat: int = 30,
                  seconds: float | None = None) -> dict[str, Any]:
        """Latency of `run` without the input/output copies: percentiles in milliseconds."""
        feeds = self._feeds(inputs)
        for _ in range(max(warmup, 0)):
            self._main(*feeds, *self._params)
        times = []
        deadline = None if seconds is None else time.perf_counter() + seconds
        while len(times) < repeat and (deadline is None or time.perf_counter() < deadline or len(times) < 3):
            t = time.perf_counter()
            self._main(*feeds, *self._params)
            times.append((time.perf_counter() - t) * 1e3)
        return latency_stats(times) | {"threads": self.threads}


def latency_stats(times_ms: Sequence[float]) -> dict[str, Any]:
    a = np.asarray(times_ms, dtype=np.float64)
    return {
        "runs": int(a.size),
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
    }


def _flatten(res: Any, n: int) -> list[np.ndarray]:
    if hasattr(res, "numpy"):
        return [res.numpy()]
    out: list[np.ndarray] = []
    for r in res:
        out.extend(_flatten(r, 1))
    return out


def _check_cpu(artifact: Artifact) -> None:
    """Refuse a library compiled for CPU features this machine lacks (it would die of SIGILL)."""
    recorded = artifact.manifest.get("target", {}).get("machine")
    if not isinstance(recorded, dict):
        return  # (artifacts from before the machine model: nothing to check)
    from graphopt.targets.machine import MachineModel, missing_features

    try:
        machine = MachineModel.from_json(recorded)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{artifact.path}: manifest.json target.machine is malformed: {e}") from None
    missing = missing_features(machine)
    if missing:
        raise ArtifactError(f"{artifact.path}: compiled for mcpu={machine.mcpu}, and this CPU lacks "
                            f"{', '.join(missing)}: recompile with --target 'cpu{{mcpu=...}}' for this machine")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


#: target name → "module:function(artifact, threads=...)" making the runner of artifacts that are
#: not for this process's CPU (an aarch64 library run under qemu on x86, a CUDA device)
RUNNERS: dict[str, str] = {
    "arm64": "graphopt.targets.arm64:load_runner",
    "cuda": "graphopt.targets.cuda:load_runner",
}


def load(path: str, *, threads: int | None = None) -> Runner:
    """Load the artifact in folder `path` (checks its hashes) and return a Runner."""
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: no such artifact folder")
    art = Artifact(path)
    spec = RUNNERS.get(str(art.manifest.get("target", {}).get("name")))
    if spec is not None:
        import importlib

        mod_name, fn = spec.split(":")
        return getattr(importlib.import_module(mod_name), fn)(art, threads=threads)
    return Runner(art, threads=threads)

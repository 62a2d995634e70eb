"""Targets and artifacts.

A `Target` turns an optimized graphopt Model into an `Artifact`: a directory holding the compiled
library, the model's weights, `manifest.json` and `report.json`.

    art = graphopt.compile("model.onnx", target="cpu", pipeline="-O2", tune=0)
    outputs = art.run({"x": x})          # list of numpy arrays, in the model's output order
    art.save("out/")                     # atomic: out/ appears complete or not at all
    runner = graphopt.runtime.load("out/")

manifest.json (format `graphopt-artifact`, version 1):
    target      {"name": "cpu", "tvm": {JSON target dict}, "threads": N}
    inputs      [{"name", "dtype", "shape"}]   shape dims: int, or a name for a symbolic dim
    outputs     [{"name", "dtype", "shape"}]
    files       {"library": {"path", "sha256", "bytes"}, "params": {...}}
    source      {"sha256": of the source model's bytes, "name"}
    versions    {"graphopt", "tvm", "onnx", "python"}
    kernels     {"groups": n, "fused": [...], "inline": {group: reason}}
    tuning      the tuning summary ({} when untuned)
    runtime     {"entry": "main", "params": [names in order after the inputs], "packed": n}
                (n > 0: the weight packing of n kernels ran at compile time; params hold the packed weights)

Targets are looked up by name in `TARGETS`; their modules are imported only when used (TVM's
import is slow and optional).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from graphopt.errors import GraphoptError, UsageError
from graphopt.ir import Model

MANIFEST = "manifest.json"
REPORT = "report.json"
FORMAT = "graphopt-artifact"
FORMAT_VERSION = 1

#: target name → "module:Class"
TARGETS: dict[str, str] = {
    "cpu": "graphopt.targets.cpu:CpuTarget",
    "arm64": "graphopt.targets.arm64:Arm64Target",
    "cuda": "graphopt.targets.cuda:CudaTarget",
}


class ArtifactError(GraphoptError):
    """An artifact is missing, incomplete, or its files do not match its manifest."""


@dataclass
class CompileOptions:
    """Options every compiled target understands."""

    pipeline: str | Sequence[Any] = "-O2"
    threads: int | None = None  # None: every core this process may use
    tune: int = 0  # meta_schedule trials (0: untuned, default schedules)
    tune_minutes: float | None = None
    tuning_db: str | None = None
    progress: bool = False
    bind: Mapping[str, np.ndarray] | None = None  # inputs fixed to these values (constants)
    extra: dict[str, Any] = field(default_factory=dict)


class Target(ABC):
    """Turns an optimized Model into an Artifact."""

    name: ClassVar[str]

    @abstractmethod
    def compile(self, model: Model, options: CompileOptions, *, source_sha256: str | None = None) -> Artifact:
        """Compile `model` (already optimized by the pipeline) into an Artifact in a temporary folder."""

    def machine_model(self, threads: int | None = None) -> Any:
        """The machine model of the CPU this target compiles for (graphopt.targets.machine), which
        passes read through `PassContext.machine` (the quantize pass's reduce-range); None: not a
        CPU target."""
        return None


def parse_target_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`arm64{mcpu=cortex-a76,dotprod=1}` → ("arm64", {"mcpu": "cortex-a76", "dotprod": "1"}): the
    pipeline syntax's `NAME{key=value,...}`, for target options."""
    spec = spec.strip()
    name, brace, rest = spec.partition("{")
    name = name.strip()
    options: dict[str, str] = {}
    if not brace:
        return name, options
    if not rest.endswith("}") or "{" in rest[:-1] or "}" in rest[:-1]:
        raise UsageError(f"target {spec!r}: options go in one pair of braces, e.g. arm64{{mcpu=cortex-a76}}")
    for part in filter(None, (p.strip() for p in rest[:-1].split(","))):
        key, eq, value = (x.strip() for x in part.partition("="))
        if not eq or not key:
            raise UsageError(f"target {name!r}: option {part!r} is not key=value")
        if key in options:
            raise UsageError(f"target {name!r}: option {key!r} given twice")
        options[key] = value
    return name, options


def get_target(name: str | Target) -> Target:
    """The target for `name`, which may carry options (`arm64{profile=neoverse-n1}`), or `name` itself
    when it is a Target already."""
    if isinstance(name, Target):
        return name
    name, target_options = parse_target_spec(name)
    spec = TARGETS.get(name)
    if spec is None:
        raise UsageError(f"unknown target {name!r} (have: {', '.join(sorted(TARGETS))})")
    mod_name, cls_name = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name in ("tvm", "tvm_ffi"):
            raise UsageError(f"target {name!r} needs apache-tvm: pip install 'graphopt[tvm]'") from None
        raise
    cls = getattr(module, cls_name)
    if not target_options:
        return cls()
    from_options = getattr(cls, "from_options", None)
    if from_options is None:
        raise UsageError(f"target {name!r} takes no options (got {', '.join(target_options)})")
    return from_options(target_options)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Artifact:
    """A compiled model: a folder with the library, weights, manifest and report."""

    def __init__(self, path: str, *, owned: bool = False) -> None:
        self.path = os.path.abspath(path)
        self._owned = owned  # a temporary folder this object removes when collected
        mpath = os.path.join(self.path, MANIFEST)
        try:
            with open(mpath, encoding="utf-8") as f:
                self.manifest: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            raise ArtifactError(f"{path}: not a graphopt artifact (no {MANIFEST})") from None
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path}: unreadable {MANIFEST}: {e}") from None
        if self.manifest.get("format") != FORMAT:
            raise ArtifactError(f"{path}: {MANIFEST} is not a {FORMAT} manifest")
        if self.manifest.get("version") != FORMAT_VERSION:
            raise ArtifactError(f"{path}: artifact format version {self.manifest.get('version')!r} is not supported (this graphopt reads {FORMAT_VERSION})")
        self._runner: Any = None

    @property
    def report(self) -> dict[str, Any]:
        rpath = os.path.join(self.path, REPORT)
        if not os.path.exists(rpath):
            return {}
        with open(rpath, encoding="utf-8") as f:
            return json.load(f)

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    def runner(self, *, threads: int | None = None) -> Any:
        from graphopt.runtime import load

        if self._runner is None or threads is not None:
            self._runner = load(self.path, threads=threads)
        return self._runner

    def run(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.runner().run(inputs)

    def save(self, dest: str) -> str:
        """Copy the artifact to folder `dest` atomically; an existing artifact there is replaced,
        any other non-empty folder is refused. Returns the absolute path."""
        dest = os.path.abspath(dest)
        if os.path.exists(dest):
            if not os.path.isdir(dest):
                raise UsageError(f"cannot save the artifact to {dest}: it is a file")
            if os.listdir(dest) and not os.path.exists(os.path.join(dest, MANIFEST)):
                raise UsageError(f"cannot save the artifact to {dest}: the folder is not empty and holds no artifact")
        parent = os.path.dirname(dest)
        os.makedirs(parent, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=".graphopt-artifact-", dir=parent)
        try:
            for name in os.listdir(self.path):
                shutil.copy2(os.path.join(self.path, name), os.path.join(stage, name))
            old = None
            if os.path.exists(dest):
                old = tempfile.mkdtemp(prefix=".graphopt-old-", dir=parent)
                os.rmdir(old)
                os.replace(dest, old)
            os.replace(stage, dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return dest

    def __del__(self) -> None:
        if getattr(self, "_owned", False):
            shutil.rmtree(self.path, ignore_errors=True)

    def __repr__(self) -> str:
        t = self.manifest.get("target", {}).get("name", "?")
        return f"Artifact({self.path!r}, target={t!r})"


def write_manifest(folder: str, manifest: dict[str, Any]) -> None:
    data = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        f.write(data)


@contextlib.contextmanager
def temporary_artifact_dir() -> Iterator[str]:
    """A fresh folder for a target to write into; removed again if the block fails."""
    d = tempfile.mkdtemp(prefix="graphopt-artifact-")
    try:
        yield d
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise


def compile(  # noqa: A001 - the public name the issue asks for
    model: Any,
    target: str | Target = "cpu",
    pipeline: str | Sequence[Any] = "-O2",
    *,
    tune: int = 0,
    tune_minutes: float | None = None,
    tuning_db: str | None = None,
    threads: int | None = None,
    progress: bool = False,
    bind: Mapping[str, np.ndarray] | None = None,
) -> Artifact:
    """Optimize `model` (a path, bytes, onnx.ModelProto or graphopt Model) with `pipeline` and
    compile it for `target`. `tune` is the meta_schedule trial budget (0: untuned; the default
    schedules are used); `tuning_db` a folder whose database later compiles reuse. `bind` fixes
    inputs to constant values (their shape-deciding contents are then specialised)."""
    import graphopt
    from graphopt.transform import optimize

    source_sha = None
    if isinstance(model, (str, os.PathLike)):
        source_sha = sha256_file(os.fspath(model))
    elif isinstance(model, bytes):
        source_sha = hashlib.sha256(model).hexdigest()
    m = model.clone() if isinstance(model, Model) else graphopt.load(model)
    if source_sha is None:
        source_sha = hashlib.sha256(graphopt.to_onnx(m).SerializeToString()).hexdigest()
    if bind:
        bind_inputs(m, bind)
    tgt = get_target(target)
    from graphopt.transform import PassContext

    m = optimize(m, pipeline, inplace=True, ctx=PassContext(machine=tgt.machine_model(threads)))
    opts = CompileOptions(pipeline=pipeline, threads=threads, tune=tune, tune_minutes=tune_minutes,
                          tuning_db=tuning_db, progress=progress, bind=bind)
    art = tgt.compile(m, opts, source_sha256=source_sha)
    for w in art.report.get("warnings", []):  # (the CLI prints them as one line each)
        warnings.warn(w, stacklevel=2)
    if bind:  # the manifest says which input values the library was specialised on
        art.manifest["specialized"] = {k: {"dtype": str(np.asarray(a).dtype), "shape": list(np.shape(a)),
                                           "values": np.asarray(a).reshape(-1).tolist()} for k, a in bind.items()}
        write_manifest(art.path, art.manifest)
    return art


def bind_inputs(model: Model, values: Mapping[str, np.ndarray]) -> None:
    """Turn graph inputs into initializers holding `values` (so passes and lowering specialise them)."""
    from graphopt.ir.tensor import NumpyTensor
    from graphopt.ir.types import DataType, Shape, TensorType

    g = model.graph
    by_name = {v.name: v for v in g.inputs}
    for name, arr in values.items():
        v = by_name.get(name)
        if v is None:
            raise UsageError(f"cannot bind {name!r}: the model has no input of that name")
        arr = np.asarray(arr)
        v.const_value = NumpyTensor(arr)
        v.type = TensorType(DataType.from_numpy(arr.dtype), Shape(tuple(int(d) for d in arr.shape)))
        g.set_inputs([x for x in g.inputs if x is not v])
        g.register_initializer(v)

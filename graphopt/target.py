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
    files       {"library": {"path", "sha256", "bytes"},
                 "params": {"path", "sha256", "bytes", "arrays": {name: {"dtype", "shape"}}}}
                (paths: plain file names in the folder; `arrays` lists what the params file holds,
                filled in by write_manifest from the file's headers)
    source      {"sha256": of the source model's bytes, "name"}
    versions    {"graphopt", "tvm", "onnx", "python"}
    kernels     {"groups": n, "fused": [...], "inline": {group: reason}}
    tuning      the tuning summary ({} when untuned)
    runtime     {"entry": "main", "params": [names in order after the inputs], "packed": n}
                (n > 0: the weight packing of n kernels ran at compile time; params hold the packed weights)

Reading an artifact checks the manifest against this schema (`check_manifest`: every key the
runtime reads, its type, and every dtype), so a tampered or foreign manifest is one ArtifactError
line rather than a KeyError deep in the runtime.

Targets are looked up by name in `TARGETS`; their modules are imported only when used (TVM's
import is slow and optional).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import warnings
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    "arm64": "graphopt.targets.arm64.target:Arm64Target",
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
    progress: bool | Callable[[dict[str, Any]], Any] = False  # True: lines on stderr; a callable gets the events
    bind: Mapping[str, np.ndarray] | None = None  # inputs fixed to these values (constants)
    #: representative sizes for the kernels with symbolic dims ([{input: shape}, ...]:
    #: graphopt.input_shapes.parse_tune_shapes); None: they keep their default schedules
    tune_shapes: Sequence[Mapping[str, Sequence[int]]] | None = None
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
    last = ""
    for part in filter(None, (p.strip() for p in rest[:-1].split(","))):
        key, eq, value = (x.strip() for x in part.partition("="))
        if not eq and ":" in options.get(last, ""):  # a list value: buckets=H:320,640;W:320
            options[last] += "," + part
            continue
        last = key
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
        target: Target = cls()
        return target
    from_options = getattr(cls, "from_options", None)
    if from_options is None:
        raise UsageError(f"target {name!r} takes no options (got {', '.join(target_options)})")
    target = from_options(target_options)
    return target


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
        self._lock = _shared_lock(self.path) if owned else None  # (held while it is in use)
        mpath = os.path.join(self.path, MANIFEST)
        try:
            st = os.lstat(mpath)
            if not stat.S_ISREG(st.st_mode):
                raise ArtifactError(f"{path}: {MANIFEST} is not a regular file (an artifact's files must be "
                                    "regular files inside its folder)")
            if st.st_size > MANIFEST_MAX_BYTES:
                raise ArtifactError(f"{path}: {MANIFEST} is {st.st_size} bytes, over the {MANIFEST_MAX_BYTES} a manifest may hold")
            with open(mpath, encoding="utf-8") as f:
                self.manifest: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            raise ArtifactError(f"{path}: not a graphopt artifact (no {MANIFEST})") from None
        except (OSError, ValueError, RecursionError) as e:  # (RecursionError: nesting too deep for json)
            raise ArtifactError(f"{path}: unreadable {MANIFEST}: {type(e).__name__}: {e}") from None
        check_manifest(self.manifest, f"{path}: {MANIFEST}")
        self._runner: Any = None

    @property
    def report(self) -> dict[str, Any]:
        """report.json ({} when absent); informational, so one that is not a regular file of at
        most MANIFEST_MAX_BYTES holding a JSON object is an ArtifactError."""
        rpath = os.path.join(self.path, REPORT)
        try:
            st = os.lstat(rpath)
        except FileNotFoundError:
            return {}
        if not stat.S_ISREG(st.st_mode) or st.st_size > MANIFEST_MAX_BYTES:
            raise ArtifactError(f"{self.path}: {REPORT} is not a regular file of at most {MANIFEST_MAX_BYTES} bytes")
        try:
            with open(rpath, encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, ValueError, RecursionError) as e:
            raise ArtifactError(f"{self.path}: unreadable {REPORT}: {type(e).__name__}: {e}") from None
        if not isinstance(report, dict):
            raise ArtifactError(f"{self.path}: {REPORT} is not a JSON object")
        return report

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
        return list(self.runner().run(inputs))

    def save(self, dest: str) -> str:
        """Copy the artifact to folder `dest` atomically; an existing artifact there is replaced
        (swapped in one step where Linux can: it never stops existing), any other non-empty folder
        is refused. The copy is staged beside `dest`; stages that killed saves left there are
        removed by the next save into that folder. Returns the absolute path."""
        dest = os.path.abspath(dest)
        if os.path.exists(dest):
            if not os.path.isdir(dest):
                raise UsageError(f"cannot save the artifact to {dest}: it is a file")
            if os.listdir(dest) and not os.path.exists(os.path.join(dest, MANIFEST)):
                raise UsageError(f"cannot save the artifact to {dest}: the folder is not empty and holds no artifact")
        parent = os.path.dirname(dest)
        os.makedirs(parent, exist_ok=True)
        # saves into one folder take turns (a lock on the folder), so a stage found there belongs to
        # a save that was killed: removed here, the user's folder keeps no leftovers
        with _folder_lock(parent) as locked:
            if locked:
                remove_stale_stages(parent)
            stage = tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=parent)
            try:
                for name in os.listdir(self.path):
                    shutil.copy2(os.path.join(self.path, name), os.path.join(stage, name))
                if os.path.exists(dest) and exchange_folders(stage, dest):
                    shutil.rmtree(stage, ignore_errors=True)  # (the old artifact, swapped out in one step)
                elif os.path.exists(dest):  # no atomic exchange here: a short window without dest
                    old = tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=parent)
                    os.rmdir(old)
                    os.replace(dest, old)
                    os.replace(stage, dest)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(stage, dest)
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise
        return dest

    def __del__(self) -> None:
        if getattr(self, "_owned", False):
            shutil.rmtree(self.path, ignore_errors=True)
        lock = getattr(self, "_lock", None)
        if lock is not None:
            os.close(lock)

    def __repr__(self) -> str:
        t = self.manifest.get("target", {}).get("name", "?")
        return f"Artifact({self.path!r}, target={t!r})"


#: the prefix of Artifact.save's staging folders, beside the destination
STAGE_PREFIX = ".graphopt-artifact-"


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[bool]:
    """An exclusive flock on `folder` while the block runs (True); False where the file system
    has no locks. The kernel drops the lock when its holder dies, SIGKILL included."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (ImportError, OSError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def remove_stale_stages(folder: str) -> list[str]:
    """Remove the staging folders Artifact.save left in `folder` when it was killed (call it
    holding the folder's lock: a live save holds it too). Returns the names removed."""
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(STAGE_PREFIX) and stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def exchange_folders(a: str, b: str) -> bool:
    """Swap folders `a` and `b` in one step (Linux renameat2 RENAME_EXCHANGE), so `b` never stops
    existing; False where the kernel, libc or file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def write_manifest(folder: str, manifest: dict[str, Any]) -> None:
    """Write `manifest` as folder's manifest.json, recording in files.params.arrays the dtype and
    shape of every array the params file holds (what loading checks before binding them)."""
    params = (manifest.get("files") or {}).get("params")
    if isinstance(params, dict) and isinstance(params.get("path"), str):
        arrays = npz_arrays(os.path.join(folder, params["path"]))
        params = params | {"arrays": {k: {"dtype": str(dt), "shape": list(shape)} for k, (dt, shape) in arrays.items()}}
        manifest = manifest | {"files": manifest["files"] | {"params": params}}
    data = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        f.write(data)


def npz_arrays(path: str) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The dtype and shape of every array in .npz file `path`, read from the headers alone (nothing
    is allocated). ValueError unless it is a zip of .npy members, each holding exactly the bytes its
    header promises, with no object arrays (so np.load cannot over-allocate or run pickles)."""
    if not zipfile.is_zipfile(path):
        raise ValueError("not a .npz (zip) file")
    out: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                name = info.filename
                if not name.endswith(".npy"):
                    raise ValueError(f"member {name!r} is not a .npy array")
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise ValueError(f"member {name!r}: .npy format {version} is not supported")
                    shape, _, dtype = read_header(f)
                    offset = f.tell()
                if dtype.hasobject:
                    raise ValueError(f"member {name!r} holds Python objects")
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if info.file_size != offset + nbytes:
                    raise ValueError(f"member {name!r} holds {info.file_size - offset} bytes of data, its header "
                                     f"says {list(shape)} {dtype} ({nbytes} bytes)")
                out[name[:-4]] = (dtype, tuple(int(d) for d in shape))
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, TypeError) as e:
        raise ValueError(str(e) or type(e).__name__) from None
    return out



#: a manifest or report larger than this is not one graphopt wrote (the biggest are tens of KB)
MANIFEST_MAX_BYTES = 64 << 20

_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Schema:
    """Checks a manifest's values; each failure is one ArtifactError naming the key path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, what: str) -> None:
        raise ArtifactError(f"{self.where}: {key} {what}")

    def get(self, d: Mapping[str, Any], parent: str, key: str, types: type | tuple[type, ...], *,
            optional: bool = False) -> Any:
        """d[key] of one of `types` (bool is never an int here)."""
        name = f"{parent}.{key}" if parent else key
        if key not in d:
            if optional:
                return None
            self.fail(name, "is missing")
        v = d[key]
        if (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))) or not isinstance(v, types):
            self.fail(name, f"is {type(v).__name__} {_short(v)}, expected {_type_names(types)}")
        return v

    def count(self, d: Mapping[str, Any], parent: str, key: str, *, optional: bool = False, low: int = 0) -> int | None:
        v: int | None = self.get(d, parent, key, int, optional=optional)
        if v is not None and v < low:
            self.fail(f"{parent}.{key}", f"is {v}, expected at least {low}")
        return v

    def dtype(self, v: Any, name: str) -> None:
        if not isinstance(v, str):
            self.fail(name, f"is {type(v).__name__} {_short(v)}, expected a dtype name")
        try:
            dt = np.dtype(v)
        except (TypeError, ValueError, SyntaxError):
            dt = None
        if dt is None or dt.kind not in "biufc" or str(dt) != v:
            self.fail(name, f"{_short(v)} is not a numeric dtype")

    def shape(self, v: Any, name: str, *, symbolic: bool) -> None:
        if not isinstance(v, list):
            self.fail(name, f"is {type(v).__name__} {_short(v)}, expected a list of dims")
        for i, d in enumerate(v):
            ok = (isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63) or (symbolic and (d is None or isinstance(d, str)))
            if not ok:
                self.fail(f"{name}[{i}]", f"is {_short(d)}, expected {'a dim (size or name)' if symbolic else 'a size'}")

    def values(self, v: Any, name: str) -> None:
        """inputs / outputs: [{"name", "dtype", "shape"}], names unique."""
        if not isinstance(v, list):
            self.fail(name, f"is {type(v).__name__}, expected a list")
        seen: set[str] = set()
        for i, spec in enumerate(v):
            at = f"{name}[{i}]"
            if not isinstance(spec, dict):
                self.fail(at, f"is {type(spec).__name__}, expected an object")
            n = self.get(spec, at, "name", str)
            if n in seen:
                self.fail(f"{at}.name", f"{n!r} is given twice")
            seen.add(n)
            self.dtype(self.get(spec, at, "dtype", str), f"{at}.dtype")
            shape = self.get(spec, at, "shape", (list, type(None)))
            if shape is not None:
                self.shape(shape, f"{at}.shape", symbolic=True)

    def file(self, files: Mapping[str, Any], key: str) -> dict[str, Any]:
        entry = self.get(files, "files", key, dict)
        at = f"files.{key}"
        path = self.get(entry, at, "path", str)
        if not path or path in (".", "..") or os.path.basename(path) != path or "\0" in path:
            self.fail(f"{at}.path", f"{path!r} leaves the artifact folder (a file name inside it expected)")
        digest = self.get(entry, at, "sha256", str)
        if not _SHA256.fullmatch(digest):
            self.fail(f"{at}.sha256", f"{_short(digest)} is not a sha256 hex digest")
        self.count(entry, at, "bytes")
        checked: dict[str, Any] = entry
        return checked


def check_manifest(m: Any, where: str) -> None:
    """Check a parsed manifest.json against the artifact schema (module docstring): every key the
    runtime reads, its type, and every dtype. ArtifactError (prefixed by `where`) on the first fault."""
    c = _Schema(where)
    if not isinstance(m, dict):
        c.fail("the manifest", f"is {type(m).__name__}, expected a JSON object")
    if m.get("format") != FORMAT:
        raise ArtifactError(f"{where} is not a {FORMAT} manifest")
    if m.get("version") != FORMAT_VERSION or isinstance(m.get("version"), bool):
        raise ArtifactError(f"{where}: artifact format version {_short(m.get('version'))} is not supported "
                            f"(this graphopt reads {FORMAT_VERSION})")
    target = c.get(m, "", "target", dict)
    c.get(target, "target", "name", str)
    c.get(target, "target", "tvm", dict)
    c.count(target, "target", "threads", optional=True, low=1)
    c.get(target, "target", "machine", dict, optional=True)
    c.values(c.get(m, "", "inputs", list), "inputs")
    outputs = c.get(m, "", "outputs", list)
    if not outputs:
        c.fail("outputs", "is empty")
    c.values(outputs, "outputs")
    files = c.get(m, "", "files", dict)
    c.file(files, "library")
    params = c.file(files, "params")
    arrays = c.get(params, "files.params", "arrays", dict)
    for name, spec in arrays.items():
        at = f"files.params.arrays[{name!r}]"
        if not isinstance(spec, dict):
            c.fail(at, f"is {type(spec).__name__}, expected an object")
        c.dtype(c.get(spec, at, "dtype", str), f"{at}.dtype")
        c.shape(c.get(spec, at, "shape", list), f"{at}.shape", symbolic=False)
    rt = c.get(m, "", "runtime", dict)
    c.get(rt, "runtime", "kind", str)
    c.get(rt, "runtime", "entry", str)
    names = c.get(rt, "runtime", "params", list)
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        c.fail("runtime.params", "is not a list of distinct names")
    c.count(rt, "runtime", "packed", optional=True)
    c.get(rt, "runtime", "transform", str, optional=True)
    for name, e in (c.get(rt, "runtime", "codebooks", dict, optional=True) or {}).items():
        at = f"runtime.codebooks[{name!r}]"
        if not isinstance(e, dict):
            c.fail(at, f"is {type(e).__name__}, expected an object")
        c.get(e, at, "indices", str)
        c.get(e, at, "codebook", str)
        bits = c.count(e, at, "bits", low=1)
        if bits is not None and bits > 8:
            c.fail(f"{at}.bits", f"is {bits}, expected 1 to 8")
        c.get(e, at, "axis", (int, type(None)))
        c.shape(c.get(e, at, "shape", list), f"{at}.shape", symbolic=False)
    for key in ("source", "versions", "kernels", "schedules", "tuning", "specialized"):  # informational
        c.get(m, "", key, dict, optional=True)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {"str": "a string", "int": "an integer", "dict": "an object", "list": "a list", "NoneType": "null", "bool": "a boolean"}
    return " or ".join(names.get(t.__name__, t.__name__) for t in (types if isinstance(types, tuple) else (types,)))


#: the prefix of the temporary folders targets compile into (temporary_artifact_dir)
TEMP_PREFIX = "graphopt-artifact-"
#: a temporary artifact folder nobody holds and nobody touched for this long was left by a killed
#: process (the age only covers the instant between creating a folder and locking it)
STALE_SECONDS = 600


def _shared_lock(folder: str) -> int | None:
    """An open descriptor holding a shared flock on `folder`: the folder is in use while it stays
    open (the kernel drops it when the process dies). None where the file system has no locks."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_temporaries(folder: str, prefix: str = TEMP_PREFIX, age: float = STALE_SECONDS) -> list[str]:
    """Remove this user's `prefix` folders in `folder` that no live process holds (see
    _shared_lock) and that are older than `age` seconds: what killed compiles left. Returns the names."""
    try:
        import fcntl
    except ImportError:  # (no flock: nothing can be told stale)
        return []
    removed: list[str] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return removed
    now = time.time()
    for name in names:
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not (name.startswith(prefix) and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and now - st.st_mtime > age):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a live process holds it
        except OSError:
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def temporary_artifact_dir() -> Iterator[str]:
    """A fresh folder for a target to write into; removed again if the block fails. It is held
    (a shared lock) while the block runs and then by the owned Artifact made from it, so that a
    later call can tell the folders of killed processes from live ones, and removes those."""
    remove_stale_temporaries(tempfile.gettempdir())
    d = tempfile.mkdtemp(prefix=TEMP_PREFIX)
    fd = _shared_lock(d)
    try:
        yield d
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def compile(  # noqa: A001 - the public name the issue asks for
    model: Any,
    target: str | Target = "cpu",
    pipeline: str | Sequence[Any] = "-O2",
    *,
    tune: int = 0,
    tune_minutes: float | None = None,
    tuning_db: str | None = None,
    threads: int | None = None,
    progress: bool | Callable[[dict[str, Any]], Any] = False,
    bind: Mapping[str, Any] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    dims: Mapping[str, int] | None = None,
    tune_shapes: str | Sequence[Mapping[str, Sequence[int]]] | None = None,
) -> Artifact:
    """Optimize `model` (a path, bytes, onnx.ModelProto or graphopt Model) with `pipeline` and
    compile it for `target`. `tune` is the meta_schedule trial budget (0: untuned; the default
    schedules are used); `tuning_db` a folder whose database later compiles reuse. `bind` fixes
    inputs to constant values (arrays, scalars or .npy paths; see bind_inputs): they leave the
    interface, and the If branches and shape arithmetic they decide are folded.
    `input_shapes` ({"x": (1, 3, 224, 224)}) and `dims` ({"batch": 1}) fix input dims before the
    passes (graphopt.input_shapes); a symbolic dim the target cannot compile is a UsageError naming it.
    `tune_shapes` ("x=1x3x320x320;x=1x3x640x480", or [{"x": (1, 3, 320, 320)}, ...]): the cpu
    target schedules each kernel with symbolic dims with the candidate fastest over these sizes
    (targets/tvm/tuning/shapes.py); the artifact stays symbolic."""
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
        bind = bind_inputs(m, bind)
    if input_shapes or dims:
        from graphopt.input_shapes import fix_input_shapes

        fix_input_shapes(m, input_shapes, dims)
    sizes = None
    if tune_shapes is not None:
        from graphopt.input_shapes import check_tune_shapes, parse_tune_shapes

        sizes = check_tune_shapes(m, parse_tune_shapes(tune_shapes) if isinstance(tune_shapes, str) else tune_shapes)
    tgt = get_target(target)
    from graphopt.transform import PassContext

    m = optimize(m, pipeline, inplace=True, ctx=PassContext(machine=tgt.machine_model(threads)))
    opts = CompileOptions(pipeline=pipeline, threads=threads, tune=tune, tune_minutes=tune_minutes,
                          tuning_db=tuning_db, progress=progress, bind=bind, tune_shapes=sizes)
    art = compile_model(tgt, m, opts, source_sha256=source_sha)
    for w in art.report.get("warnings", []):  # (the CLI prints them as one line each)
        warnings.warn(w, stacklevel=2)
    if bind:  # the manifest says which input values the library was specialised on
        art.manifest["specialized"] = {k: {"dtype": str(np.asarray(a).dtype), "shape": list(np.shape(a)),
                                           "values": np.asarray(a).reshape(-1).tolist()} for k, a in bind.items()}
        write_manifest(art.path, art.manifest)
    return art


def compile_model(tgt: Target, model: Model, options: CompileOptions, *, source_sha256: str | None = None) -> Artifact:
    """`tgt.compile`, except that a crash of the lowering on a model with symbolic input dims is a
    UsageError naming the dims and the options that fix them (one line, exit 2 in the CLI), not
    an internal error: the compiled targets keep symbolic dims where they can, not everywhere."""
    try:
        return tgt.compile(model, options, source_sha256=source_sha256)
    except GraphoptError:
        raise
    except Exception as e:
        from graphopt.input_shapes import symbolic_input_dims

        syms = symbolic_input_dims(model)
        if not syms:
            raise
        named = list(dict.fromkeys(d for ds in syms.values() for d in ds))
        # TVM names the unbound variables when it knows them: "variables (width, height) are used"
        found = re.search(r"variables \(([^)]*)\) are used", str(e))
        if found:
            culprits = [x.strip() for x in found.group(1).split(",") if x.strip() in named]
            named = culprits or named
        first = (str(e).strip().splitlines() or [""])[0][:200]
        inp = next(iter(syms))
        fix = " ".join(f"--dim {d}=N" for d in named if "[" not in d) or f"--input-shape {inp}:..."
        raise UsageError(f"target {getattr(tgt, 'name', tgt)!r} cannot compile this model with symbolic input dims "
                         f"({', '.join(named)}): {type(e).__name__}: {first}; fix some or all of them with {fix} or "
                         f"--input-shape {inp}:DIMS (Python: input_shapes=/dims=)") from e


def bind_inputs(model: Model, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Turn graph inputs into initializers holding `values` (so passes and lowering specialise
    them: cleanup folds the If branches and shape arithmetic they decide). A value is an array,
    a Python scalar/list, or the path of a .npy file; it is cast to the input's declared element
    type (never across kinds that lose information: 0.5 for an int64 input is an error) and a
    scalar fills an input of static shape [1, 1, ...]. Returns the arrays bound."""
    from graphopt.ir.tensor import NumpyTensor
    from graphopt.ir.types import DataType, Shape, TensorType

    g = model.graph
    by_name = {v.name: v for v in g.inputs if not v.is_initializer()}
    bound: dict[str, np.ndarray] = {}
    for name, raw in values.items():
        v = by_name.get(name)
        if v is None:
            have = ", ".join(by_name) or "none"
            raise UsageError(f"cannot bind {name!r}: the model has no input of that name (inputs: {have})")
        arr = bind_value(v, raw)
        v.const_value = NumpyTensor(arr)
        v.type = TensorType(DataType.from_numpy(arr.dtype), Shape(tuple(int(d) for d in arr.shape)))
        g.set_inputs([x for x in g.inputs if x is not v])
        g.register_initializer(v)
        bound[name] = arr
    return bound


def bind_value(v: Any, raw: Any) -> np.ndarray:
    """`raw` (array, scalar, list, .npy path or the text of a number) as an array fit for input `v`."""
    name = v.name
    if isinstance(raw, (str, os.PathLike)) and (os.fspath(raw).endswith(".npy") or os.path.isfile(os.fspath(raw))):
        path = os.fspath(raw)
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise UsageError(f"--bind {name}={path}: no such file") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"--bind {name}={path}: not a readable .npy file: {str(e).splitlines()[0]}") from None
        if not isinstance(arr, np.ndarray):
            raise UsageError(f"--bind {name}={path}: expected one array (.npy), not an archive")
    elif isinstance(raw, str):
        text = raw.strip()
        try:
            parsed: Any = [_number(t) for t in text.split(",")] if "," in text else _number(text)
        except ValueError:
            raise UsageError(f"--bind {name}={raw}: expected a number, a comma-separated list or a .npy file") from None
        arr = np.asarray(parsed)
    else:
        arr = np.asarray(raw)
    want = v.dtype.numpy() if v.dtype is not None else arr.dtype
    if arr.dtype != want:
        if arr.dtype.kind == "f" and want.kind in "iub" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            raise UsageError(f"--bind {name}: {arr.reshape(-1)[:4].tolist()} is not a whole number, and input {name!r} is {want}")
        try:
            cast = arr.astype(want)
        except (TypeError, ValueError):
            raise UsageError(f"--bind {name}: a {arr.dtype} value does not fit input {name!r} of type {want}") from None
        if arr.dtype.kind in "iufb" and want.kind in "iufb" and not np.array_equal(cast.astype(np.float64), arr.astype(np.float64)):
            raise UsageError(f"--bind {name}: {arr.reshape(-1)[:4].tolist()} does not fit input {name!r} of type {want}")
        arr = cast
    dims = v.shape.dims if v.shape is not None else None
    if dims is not None:
        if arr.size == 1 and len(dims) != arr.ndim and all(d == 1 for d in dims):
            arr = arr.reshape((1,) * len(dims))
        ok = len(dims) == arr.ndim and all(not isinstance(d, int) or d <= 0 or d == s for d, s in zip(dims, arr.shape))
        if not ok:
            decl = "[" + ",".join(str(d) if d is not None else "?" for d in dims) + "]"
            raise UsageError(f"--bind {name}: a value of shape {list(arr.shape)} does not fit input {name!r} of shape {decl}")
    return np.array(arr, order="C")  # (ascontiguousarray would make a 0-d array 1-d)


def _number(text: str) -> int | float | bool:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(low, 0)
    except ValueError:
        return float(low)

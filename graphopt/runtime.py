"""Run a compiled artifact.

    runner = graphopt.runtime.load("out/", threads=2)
    outputs = runner.run({"x": x})                 # list of numpy arrays
    stats = runner.benchmark({"x": x}, repeat=50)  # latency percentiles in milliseconds

Loading checks the artifact before anything of it is mapped or bound, each failure one
ArtifactError line: the manifest's schema (graphopt.target), its files (regular files in the
artifact folder, no symlinks, sha256 and size as the manifest says), the library's ELF header
(a truncated library would die of SIGBUS when mapped), and the params file's arrays against the
manifest's names, dtypes and shapes. Inputs are checked against the manifest's names, dtypes and
static dims.

TVM's thread pool counts half the vCPUs on some machines (one thread on a 2-vCPU box), so the
runner sets the thread count explicitly: `threads` (default: the compile's, else every core this
process may use; one where the pool is not "exclusive" and a call is under
SHARED_ONE_THREAD_BELOW_S of one core's work).

`pool` says how the runner's thread pool shares the machine (POOLS). "balanced" (the default):
TVM's workers float over the allowed cores and spin ~1 ms (POOL_SPIN) before they sleep, long
enough to stay awake between one call's kernels (without it every parallel kernel pays a futex
wake: EfficientNet-B0 13.2 ms instead of 8.1 ms, 2 threads), short enough to leave the cores
to others right after a call: a process that runs onnxruntime sessions and artifacts one after
the other (a pipeline) keeps both at speed. "shared" for runtimes that run at the same time on
the same cores (two threads calling an artifact and an onnxruntime session at once): no
spinning at all (a spinning worker that yields waits behind the other threads while its caller
waits for it: GoogLeNet 39x slower concurrent beside onnxruntime at 2000 yields, 1.9x at none).
"exclusive" for one model that has the machine to itself: TVM's own defaults (a worker pinned
to each core, ~150 ms of spinning after every task) and onnxruntime's (spinning between runs);
beside another runtime its spinning starves the other's threads. graphopt's onnxruntime
sessions stop spinning when a run ends except under "exclusive".
TVM keeps a pool per calling thread: a Runner configures the pool of each thread that calls it.
"""

from __future__ import annotations

import os
import platform
import stat
import statistics
import struct
import threading
import time
import warnings
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.codebook import stored_param
from graphopt.errors import UsageError
from graphopt.target import Artifact, ArtifactError, npz_arrays, sha256_file

__all__ = ["OrtRunner", "Runner", "load", "load_onnx"]  # the stable API (README "Stable API")


def _contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    return a if a.flags.c_contiguous else np.require(a, requirements="C")


#: thread-pool policies (Runner's and OrtRunner's `pool`; module docstring)
POOLS = ("balanced", "shared", "exclusive")
DEFAULT_POOL = "balanced"
#: TVM workers' spin before they sleep, in sched_yield calls (TVM_THREAD_POOL_SPIN_COUNT).
#: "exclusive": TVM's default (thread_pool.cc kDefaultSpinCount), 143-174 ms of a core burnt after
#: each GoogLeNet call on 2 cores. "shared": none. A worker that spins by yielding stays runnable,
#: and on contended cores it waits behind the other threads for its turn, while the caller waits
#: for it: a 0.05 ms VAD ran 200-300x slower beside an onnxruntime session in another thread at
#: 1000 yields (a few hundred µs when idle), 1.0x at 0; the price is a futex wake per parallel
#: kernel (+8 µs per call of that VAD alone, one parallel kernel), tools/bench_mixed_runtimes.py
#: "balanced": 2000 yields (~1 ms when idle): EfficientNet-B0 8.13 ms against 7.99 at the default
#: and 13.18 at none, and the onnxruntime run after it not slowed (8.78 ms vs 12.58 beside the
#: default's spinning), tools/bench_tvm_cpu.py, quiet 2-core Zen 4
POOL_SPIN = {"balanced": 2000, "shared": 0, "exclusive": 300000}
_SPIN_ENV = "TVM_THREAD_POOL_SPIN_COUNT"
#: the spin count set before graphopt touched it (the user's; None: graphopt's policy decides)
_USER_SPIN = os.environ.get(_SPIN_ENV)
#: per calling thread, the pool settings last applied to TVM's pool of that thread (TVM's pools are
#: thread-local: ThreadPool::ThreadLocal in thread_pool.cc)
_THREAD_POOL = threading.local()


#: under "shared" and "balanced", a model whose call is under this much of one core's work (its kernels' FLOPs at
#: peak and its weights streamed once: the machine model's lower bound) runs on one thread unless
#: `threads` is given. Its parallel kernels then run inline: a hand-off to a worker costs a futex
#: wake when the cores are idle and up to a scheduler period when other threads hold them (a
#: 0.06 ms VAD beside three onnxruntime sessions in three threads: 207x slower on 2 threads, 1.02x
#: on one; alone 0.050 ms on one vs 0.055-0.062 on two, busy 2-core Zen 4)
SHARED_ONE_THREAD_BELOW_S = 50e-6
#: an estimate under this many times SHARED_ONE_THREAD_BELOW_S is too close to call: the runner
#: times its first calls with one thread and with all, and keeps the faster (`ThreadProbe`)
PROBE_BELOW_FACTOR = 4
#: calls per thread count the probe times (after one warm-up call of each)
PROBE_CALLS = 4


def small_call(manifest: Mapping[str, Any], sizes: Mapping[str, int] | None = None) -> bool:
    """Whether a call of the artifact is under SHARED_ONE_THREAD_BELOW_S of one core's work (False
    where the manifest has no machine model or kernel map to say). A kernel's FLOPs that depend on
    symbolic dims (`((batch * (samples // 128)) * 139264)`) are counted at `sizes` (dim name ->
    size: `dim_sizes`); without them such a model is not judged small."""
    t = call_core_seconds(manifest, sizes)
    return t is not None and t < SHARED_ONE_THREAD_BELOW_S


def call_core_seconds(manifest: Mapping[str, Any], sizes: Mapping[str, int] | None = None) -> float | None:
    """The machine model's estimate of one core's time for a call (its kernels' FLOPs, its weights
    streamed once); None where the manifest cannot say."""
    machine, kmap = manifest.get("target", {}).get("machine"), manifest.get("kernel_map")
    if not isinstance(machine, dict) or not kmap:
        return None
    from graphopt.targets.machine import MachineModel

    try:
        model = MachineModel.from_json(machine)
        flops = _call_flops(kmap, sizes or {})
        weights = sum(int(np.prod(a["shape"], dtype=np.int64)) * np.dtype(a["dtype"]).itemsize
                      for a in manifest["files"]["params"]["arrays"].values())
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError):
        return None
    return float(model.core_seconds(flops, weights))


def _call_flops(kmap: Sequence[Mapping[str, Any]], sizes: Mapping[str, int]) -> float:
    """FLOPs of one call: every kernel of `main`, and of each run-time If (its group) the branch
    function with the most (a call runs one branch). A branch kernel's FLOPs written in its own
    function's dims (not `main`'s, which `sizes` names) are left out: the estimate cannot see
    them (the runner measures such a borderline call: `ThreadProbe`)."""
    total = 0.0
    branches: dict[str, dict[str, float]] = {}  # If group -> branch function -> FLOPs
    for e in kmap:
        if e.get("role") == "branch":
            try:
                f = _flops(e.get("flops"), sizes)
            except ValueError:
                continue
            per = branches.setdefault(str(e.get("group")), {})
            fn = str(e.get("function"))
            per[fn] = per.get(fn, 0.0) + f
        else:
            total += _flops(e.get("flops"), sizes)
    return total + sum(max(per.values()) for per in branches.values())


def _flops(value: Any, sizes: Mapping[str, int]) -> float:
    """A kernel map's FLOPs: a number, or an expression of symbolic dims at `sizes`
    (`eval_dim_expr`); ValueError when a dim is unknown."""
    if not isinstance(value, str):
        return float(value or 0)
    return float(eval_dim_expr(value, sizes))


def eval_dim_expr(expr: str, sizes: Mapping[str, int]) -> int:
    """An integer expression of named dims as the compiler writes kernel FLOPs
    (`((batch * (samples // 128)) * 139264)`): + - * // on integers and names in `sizes`, read
    with `ast`, never evaluated as code; ValueError for anything else (ZeroDivisionError for a
    division by zero)."""
    import ast

    def ev(n: ast.AST) -> int:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name) and n.id in sizes:
            return int(sizes[n.id])
        if isinstance(n, ast.BinOp) and isinstance(n.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv)):
            a, b = ev(n.left), ev(n.right)
            return a + b if isinstance(n.op, ast.Add) else a - b if isinstance(n.op, ast.Sub) else a * b if isinstance(n.op, ast.Mult) else a // b
        raise ValueError(f"kernel FLOPs {expr!r}: cannot count {ast.dump(n)[:40]}")

    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise ValueError(f"kernel FLOPs {expr!r}: not an expression") from None
    return ev(tree)


def dim_sizes(manifest: Mapping[str, Any], names: Sequence[str], arrays: Sequence[np.ndarray]) -> dict[str, int]:
    """The symbolic dims' sizes in these inputs (manifest "dims"), by the names the kernel map's
    FLOPs use (a dim kept as a multiple m also as NAME_m, its size // m)."""
    out: dict[str, int] = {}
    index = {n: i for i, n in enumerate(names)}
    for name, d in ((manifest.get("dims") or {}).get("symbolic") or {}).items():
        i = index.get(d.get("input"))
        ax = int(d.get("axis", -1))
        if i is None or not 0 <= ax < arrays[i].ndim:
            continue
        size, m = int(arrays[i].shape[ax]), int(d.get("multiple", 1))
        out[name] = size
        if m > 1:
            out[f"{name}_{m}"] = size // m
    return out


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise UsageError(f"pool={pool!r}: expected one of {', '.join(POOLS)}")
    return pool


def tvm_spin_count(pool: str = DEFAULT_POOL) -> int:
    """The spin count of TVM's worker threads in this process, setting `pool`'s if nothing set it
    yet. TVM reads TVM_THREAD_POOL_SPIN_COUNT once, when its first worker starts (a static in
    thread_pool.cc): call this before anything makes a TVM pool (a cpu compile's weight packing
    does) to have it apply."""
    return int(os.environ.setdefault(_SPIN_ENV, str(POOL_SPIN[check_pool(pool)])))


@dataclass(frozen=True)
class PoolSettings:
    """What a Runner asks of TVM's thread pool: `threads` workers over `cpus`, pinned one per core
    (`bind`) or floating, spinning `spin` yields after each task (a process-wide TVM setting)."""

    pool: str
    threads: int
    cpus: tuple[int, ...]
    bind: bool
    spin: int


def pool_settings(pool: str, threads: int) -> PoolSettings:
    """The settings policy `pool` with `threads` workers asks for on this machine (the allowed cores)."""
    cpus = tuple(sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1))
    return PoolSettings(pool, threads, cpus, bind=pool == "exclusive", spin=tvm_spin_count(pool))


def apply_pool(s: PoolSettings) -> None:
    """Configure the calling thread's TVM pool as `s` says (runtime.config_threadpool). Mode -2
    pins worker i to core i (the caller floats over all); mode -3 with TVM_BIND_THREADS=0 leaves
    every affinity alone (TVM reads it at each configuration; without it even mode -3 narrows the
    calling thread's affinity to the listed cores). The pool of a thread is made by its first
    configuration with one worker per listed core (TVM_NUM_THREADS for one made by a kernel
    launch first), so a thread's first configuration lists every core; then `threads` of them
    are used. Unpinned, only `threads` cores are listed: TVM's kernels launch on as many workers
    as cores listed (MaxConcurrency), and with one a parallel loop runs inline on the caller, no
    hand-off to a worker at all."""
    import tvm_ffi

    config = tvm_ffi.get_global_func("runtime.config_threadpool")
    before = applied_pool()
    os.environ["TVM_NUM_THREADS"] = str(s.threads)
    # (pinned before: every thread back on all the cores, which only a binding configuration does)
    os.environ["TVM_BIND_THREADS"] = "1" if s.bind or (before is not None and before.bind) else "0"
    if before is None or before.bind:
        config(-3, len(s.cpus), [str(c) for c in s.cpus])
    os.environ["TVM_BIND_THREADS"] = "1" if s.bind else "0"
    cpus = s.cpus if s.bind else s.cpus[:s.threads]
    config(-2 if s.bind else -3, s.threads, [str(c) for c in cpus])
    _THREAD_POOL.settings = s


def applied_pool() -> PoolSettings | None:
    """The settings last applied to the calling thread's TVM pool by a Runner (None: none yet)."""
    return getattr(_THREAD_POOL, "settings", None)


def checked_files(artifact: Artifact) -> dict[str, str]:
    """The paths of the artifact's library and params, after checking them against the manifest
    (regular files inside the folder, sha256 and size equal, the library a sound ELF file for the
    manifest's architecture, the params' arrays those the manifest lists); ArtifactError otherwise.
    The manifest's schema was checked when the Artifact was read."""
    files = artifact.manifest["files"]
    paths = {}
    for key in ("library", "params"):
        entry = files[key]
        path = os.path.join(artifact.path, entry["path"])
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ArtifactError(f"{artifact.path}: {key} file {entry['path']} is missing") from None
        except OSError as e:
            raise ArtifactError(f"{artifact.path}: {key} file {entry['path']}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):  # a symlink could point anywhere, a fifo would block
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise ArtifactError(f"{artifact.path}: {key} file {entry['path']} is {kind}; an artifact's files "
                                "must be regular files inside its folder")
        if st.st_size != entry["bytes"]:
            raise ArtifactError(f"{artifact.path}: {entry['path']} holds {st.st_size} bytes, the manifest says "
                                f"{entry['bytes']}; refusing to load it")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ArtifactError(
                f"{artifact.path}: {entry['path']} does not match the manifest (sha256 {digest[:16]}…, "
                f"manifest says {entry['sha256'][:16]}…); refusing to load it"
            )
        paths[key] = path
    machine = elf_machine(paths["library"], where=f"{artifact.path}: {files['library']['path']}")
    arch = _triple_arch(artifact.manifest["target"])
    if arch in ELF_MACHINES and ELF_MACHINES[arch] != machine:
        raise ArtifactError(f"{artifact.path}: {files['library']['path']} is a library for ELF machine {machine}, "
                            f"the manifest's target is {arch}; refusing to load it")
    check_params(artifact, paths["params"])
    return paths


#: ELF e_machine of the architectures graphopt compiles for (by the triple's / uname's name)
ELF_MACHINES: dict[str, int] = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}
_ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF64_PHDR = struct.Struct("<IIQQQQQQ")
_ELF64_SHDR = struct.Struct("<IIQQQQIIQQ")


def elf_machine(path: str, *, where: str) -> int:
    """The e_machine of shared library `path` after checking that the loader can map it without
    reading past the end of the file (a truncated library is SIGBUS when touched): a 64-bit
    little-endian ELF shared object whose program headers, loadable segments and section headers
    all lie within the file. ArtifactError (prefixed by `where`) otherwise."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(_ELF64_HEADER.size)
        if len(head) < _ELF64_HEADER.size or head[:4] != b"\x7fELF":
            raise ArtifactError(f"{where}: not an ELF shared library")
        if head[4] != 2 or head[5] != 1:  # EI_CLASS 64-bit, EI_DATA little-endian
            raise ArtifactError(f"{where}: not a 64-bit little-endian ELF library")
        (_, e_type, e_machine, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum,
         shstrndx) = _ELF64_HEADER.unpack(head)
        if e_type != 3:  # ET_DYN
            raise ArtifactError(f"{where}: not an ELF shared object (e_type {e_type})")
        if phnum == 0 or phentsize != _ELF64_PHDR.size or phoff + phnum * phentsize > size:
            raise ArtifactError(f"{where}: the ELF program headers lie outside the file ({size} bytes): truncated?")
        if shnum and (shentsize != _ELF64_SHDR.size or shoff + shnum * shentsize > size or shstrndx >= shnum):
            raise ArtifactError(f"{where}: the ELF section headers lie outside the file ({size} bytes): truncated?")
        f.seek(phoff)
        for i in range(phnum):
            p_type, _, p_offset, _, _, p_filesz, _, _ = _ELF64_PHDR.unpack(f.read(phentsize))
            if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD: mapped from the file
                raise ArtifactError(f"{where}: ELF segment {i} ends at byte {p_offset + p_filesz}, past the end "
                                    f"of the file ({size} bytes): truncated?")
        f.seek(shoff)
        for i in range(shnum):
            _, sh_type, _, _, sh_offset, sh_size, _, _, _, _ = _ELF64_SHDR.unpack(f.read(shentsize))
            if sh_type != 8 and sh_offset + sh_size > size:  # SHT_NOBITS takes no file bytes
                raise ArtifactError(f"{where}: ELF section {i} ends at byte {sh_offset + sh_size}, past the end "
                                    f"of the file ({size} bytes): truncated?")
    return int(e_machine)


def _triple_arch(target: Mapping[str, Any]) -> str:
    """The architecture of the manifest's LLVM target (a cuda target's host), '' if it names none."""
    tvm_target = target.get("tvm") or {}
    triple = tvm_target.get("mtriple") or (tvm_target.get("host") or {}).get("mtriple") or ""
    return str(triple).split("-")[0].lower()


def check_params(artifact: Artifact, path: str) -> None:
    """The params file holds exactly the arrays the manifest lists (names, dtypes, shapes), and
    every param the library takes is stored (as itself, or as a codebook's indices and codebook)."""
    where = f"{artifact.path}: {artifact.manifest['files']['params']['path']}"
    try:
        stored = npz_arrays(path)
    except ValueError as e:
        raise ArtifactError(f"{where}: {e}") from None
    listed = artifact.manifest["files"]["params"]["arrays"]
    for name in sorted(set(listed) | set(stored)):
        if name not in stored:
            raise ArtifactError(f"{where}: array {name!r} of the manifest is missing")
        if name not in listed:
            raise ArtifactError(f"{where}: array {name!r} is not in the manifest")
        dtype, shape = stored[name]
        want = listed[name]
        if str(dtype) != want["dtype"] or list(shape) != want["shape"]:
            raise ArtifactError(f"{where}: array {name!r} is {dtype}{list(shape)}, the manifest says "
                                f"{want['dtype']}{want['shape']}")
    rt = artifact.manifest["runtime"]
    codebooks = rt.get("codebooks", {})
    for name in rt["params"]:
        if name not in codebooks:
            if name not in stored:
                raise ArtifactError(f"{where}: param {name!r} of runtime.params has no array {name!r}")
            continue
        cb = codebooks[name]
        for n in (cb["indices"], cb["codebook"]):
            if n not in stored:
                raise ArtifactError(f"{where}: param {name!r} of runtime.params has no array {n!r}")
        # the stored forms must be those of a weight of cb["shape"] (codebook.pack's layout)
        shape, bits, axis = cb["shape"], cb["bits"], cb["axis"]
        if axis is not None and not 0 <= axis < len(shape):
            raise ArtifactError(f"{where}: param {name!r}: codebook axis {axis} of a {len(shape)}-d weight")
        packed = [bits, max(1, -(-int(np.prod(shape, dtype=object)) // 8))]
        entries = (1 if axis is None else shape[axis]) << bits
        got_i, got_c = stored[cb["indices"]], stored[cb["codebook"]]
        if got_i != (np.dtype(np.uint8), tuple(packed)) or got_c[0].kind != "f" or got_c[1] != (entries,):
            raise ArtifactError(f"{where}: param {name!r}: indices {got_i[0]}{list(got_i[1])} and codebook "
                                f"{got_c[0]}{list(got_c[1])} are not those of a {bits}-bit {shape} weight "
                                f"(uint8{packed} and [{entries}] expected)")


def check_dims(manifest: Mapping[str, Any], names: Sequence[str], arrays: Sequence[np.ndarray]) -> None:
    """The symbolic dims' run-time constraints the compiler recorded (manifest "dims"): a dim
    named in several places has one size, a multiple where strided maps meet again, a minimum
    where a conv or pool window must fit. One line naming the input, the dim and the rule."""
    sym = (manifest.get("dims") or {}).get("symbolic") or {}
    if not sym:
        return
    index = {n: i for i, n in enumerate(names)}
    seen: dict[str, tuple[str, int]] = {}
    for spec, a in zip(manifest.get("inputs", []), arrays):  # the same name everywhere: one size
        for ax, d in enumerate(spec.get("shape") or []):
            if isinstance(d, str) and ax < a.ndim:
                if d in seen and seen[d][1] != a.shape[ax]:
                    raise UsageError(f"input {spec['name']!r}: dim {d} (axis {ax}) is {a.shape[ax]}, but {d} is "
                                     f"{seen[d][1]} in input {seen[d][0]!r}")
                seen.setdefault(d, (spec["name"], int(a.shape[ax])))
    for name, d in sym.items():
        i = index.get(d.get("input"))
        if i is None or int(d.get("axis", -1)) >= arrays[i].ndim:
            continue
        size = int(arrays[i].shape[int(d["axis"])])
        where = f"input {d['input']!r}: dim {name} (axis {d['axis']}) is {size}"
        m = int(d.get("multiple", 1))
        if m > 1 and size % m:
            why = f" ({d['why']})" if d.get("why") else ""
            raise UsageError(f"{where}; this compiled model needs a multiple of {m}{why}: pad the input "
                             f"to {-(-size // m) * m}, or compile with --input-shape")
        lo = int(d.get("min", 0))
        if size < lo:
            raise UsageError(f"{where}; this compiled model needs at least {lo} (its convolution and pooling windows)")


def check_threads(threads: int | None) -> int | None:
    """`threads` as given (None: the default), refused unless a positive int."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"threads={threads!r}: expected a whole number from 1 to {MAX_THREADS}")
    return threads


#: more worker threads than this is a typo (TVM would start them all; one per core is what helps)
MAX_THREADS = 1024


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class InputChecks:
    """A model's inputs as its manifest lists them ({name, dtype, shape}), and the checks every
    runner applies to what a caller passes: names (a mapping) or count (a sequence), dtype, rank
    and static dims, one line each. The per-input parts are precomputed (a call's own cost)."""

    def __init__(self, specs: Sequence[Mapping[str, Any]]) -> None:
        self.specs = list(specs)
        self.names = [str(i["name"]) for i in self.specs]
        self._want: list[tuple[np.dtype[Any] | None, int | None, list[tuple[int, int]]]] = [
                      (np.dtype(i["dtype"]) if i.get("dtype") is not None else None,
                       None if i.get("shape") is None else len(i["shape"]),
                       [] if i.get("shape") is None else [(k, d) for k, d in enumerate(i["shape"]) if isinstance(d, int)])
                      for i in self.specs]

    def arrays(self, inputs: Mapping[str, Any] | Sequence[Any]) -> list[np.ndarray]:
        """The inputs as arrays in the model's order, checked."""
        names = self.names
        if isinstance(inputs, Mapping):
            unknown = sorted(set(inputs) - set(names))
            if unknown:
                raise UsageError(f"the model has no input {unknown[0]!r} (inputs: {', '.join(names) or 'none'})")
            missing = [n for n in names if n not in inputs]
            if missing:
                raise UsageError(f"no value for input {missing[0]!r}")
            given = [inputs[n] for n in names]
        else:
            given = list(inputs)
            if len(given) != len(names):
                raise UsageError(f"the model takes {len(names)} inputs, {len(given)} were given")
        out = []
        for spec, (want, rank, static), a in zip(self.specs, self._want, given):
            a = np.asarray(a)
            if want is not None and a.dtype != want:
                raise UsageError(f"input {spec['name']!r}: dtype {a.dtype} given, the model takes {spec['dtype']}")
            if rank is not None and (a.ndim != rank or any(a.shape[k] != d for k, d in static)):
                shown = "[" + ",".join("?" if d is None else str(d) for d in spec["shape"]) + "]"
                raise UsageError(f"input {spec['name']!r}: shape {list(a.shape)} given, the model takes {shown}")
            out.append(a)
        return out


class _BucketArtifact:
    """One shape bucket of an artifact as Runner reads it: the folder, the bucket's manifest."""

    def __init__(self, path: str, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest


class _Buckets:
    """An artifact's shape buckets (manifest "buckets", targets/shape_buckets.py): a Runner per
    bucket, picked when the input's sizes of the bucket dims equal the bucket's."""

    def __init__(self, runner: "Runner") -> None:
        from graphopt.target import check_manifest

        spec = runner.manifest["buckets"]
        sym = runner.manifest.get("dims", {}).get("symbolic", {})
        where = f"{runner.artifact.path}: manifest.json buckets"
        try:
            self.dims = [str(d) for d in spec["dims"]]
            self.at = [(runner.input_names.index(sym[d]["input"]), int(sym[d]["axis"])) for d in self.dims]
            self.runners: dict[tuple[int, ...], Runner] = {}
            for e in spec["entries"]:
                check_manifest(e["manifest"], where)
                key = tuple(int(e["sizes"][d]) for d in self.dims)
                self.runners[key] = Runner(_BucketArtifact(runner.artifact.path, e["manifest"]), threads=runner.threads,  # type: ignore[arg-type]
                                           pool=runner.pool_settings.pool)
        except (KeyError, ValueError, TypeError) as e:
            raise ArtifactError(f"{where} is malformed: {_first_line(e)}") from None

    def pick(self, arrays: Sequence[np.ndarray]) -> tuple["Runner | None", str]:
        key = tuple(int(arrays[i].shape[ax]) for i, ax in self.at)
        sizes = " ".join(f"{d}={v}" for d, v in zip(self.dims, key))
        sub = self.runners.get(key)
        return sub, (f"bucket {sizes} (specialised kernels)" if sub is not None
                     else f"symbolic kernels (no bucket for {sizes})")


@dataclass
class ThreadProbe:
    """The first calls of a runner whose call the machine model cannot judge small or large:
    PROBE_CALLS timed calls on one thread and on `full` threads, alternating (one warm-up call of
    each first), then the faster median is kept (`choice`; `medians` records what was measured)."""

    full: int
    done: bool = False
    choice: int = 0
    calls: int = 0
    times: dict[int, list[float]] = field(default_factory=dict)
    medians: dict[int, float] = field(default_factory=dict)

    def next_threads(self) -> int:
        return 1 if self.calls % 2 == 0 else self.full

    def record(self, threads: int, seconds: float) -> bool:
        """Count a call; True once the choice is made."""
        self.calls += 1
        if self.calls > 2:  # (the first call of each: warm-up)
            self.times.setdefault(threads, []).append(seconds)
        if self.calls < 2 * (PROBE_CALLS + 1):
            return False
        self.medians = {k: statistics.median(v) for k, v in self.times.items()}
        self.choice = min(self.medians, key=lambda k: (self.medians[k], k))
        self.done = True
        return True


class Runner:
    """A loaded cpu artifact: the Relax VM with the weights bound. Not thread-safe (one VM, and
    one staging tensor per input that each call refills): a thread per Runner. `pool`: how its
    TVM thread pool shares the machine (POOLS; the module docstring)."""

    #: whether a call the machine model cannot judge is timed on one thread and on all (a runner
    #: of another device sets False: its host threads are not what the call spends)
    measures_threads = True

    def __init__(self, artifact: Artifact, *, threads: int | None = None, pool: str = DEFAULT_POOL) -> None:
        m = artifact.manifest
        self.artifact = artifact
        self.manifest = m
        rt = m["runtime"]
        if rt["kind"] != "tvm-relax-vm":
            raise ArtifactError(f"{artifact.path}: runtime {rt['kind']!r} is not supported by this graphopt")
        paths = checked_files(artifact)
        lib_machine = elf_machine(paths["library"], where=f"{artifact.path}: {m['files']['library']['path']}")
        host = ELF_MACHINES.get(platform.machine().lower())
        if host is not None and lib_machine != host:
            raise ArtifactError(f"{artifact.path}: the library is for ELF machine {lib_machine}, this is "
                                f"{platform.machine()}; it cannot be loaded here")
        _check_cpu(artifact)
        check_pool(pool)
        self.threads = check_threads(threads) or (1 if pool != "exclusive" and small_call(m) else
                                                  int(m["target"].get("threads") or _cores()))
        self.pool_settings = pool_settings(pool, self.threads)
        # a model whose work depends on symbolic dims is judged per input shape at the call
        # (`_choose_threads`): a VAD's 512-sample chunk is small, a long recording is not
        self._per_shape = (threads is None and pool != "exclusive" and self.threads > 1
                           and bool((m.get("dims") or {}).get("symbolic"))
                           and any(isinstance(e.get("flops"), str) and e.get("role") != "branch"
                                   for e in m.get("kernel_map") or []))
        self._full_threads, self._pool = self.threads, pool
        self._threads_for: tuple[tuple[int, ...], ...] | None = None
        # a call the estimate cannot call small or large (a model whose If branches' kernels it
        # does not see: vad_if ran 1.76x onnxruntime on both cores, 0.78x on one): measured
        est = (call_core_seconds(m) if self.measures_threads and threads is None and pool != "exclusive" and self.threads > 1
               and not self._per_shape else None)
        self.thread_probe: ThreadProbe | None = (
            ThreadProbe(self.threads) if est is not None and est < PROBE_BELOW_FACTOR * SHARED_ONE_THREAD_BELOW_S else None)
        if self.pool_settings.spin != POOL_SPIN[pool] and _USER_SPIN is None:
            warnings.warn(f"pool={pool!r}: TVM's workers keep spinning {self.pool_settings.spin} yields (set for this "
                          f"process when its first pool started; {POOL_SPIN[pool]} asked): set {_SPIN_ENV} before "
                          "loading or compiling to choose", RuntimeWarning, stacklevel=3)
        try:
            import tvm
            from tvm import relax
        except ModuleNotFoundError:
            raise UsageError("running a cpu artifact needs apache-tvm: pip install 'graphopt[tvm]'") from None
        apply_pool(self.pool_settings)
        self._tvm = tvm
        try:
            lib = tvm.runtime.load_module(paths["library"])
        except Exception as e:  # noqa: BLE001 - the loader's message, one line (the hash matched: not ours)
            raise ArtifactError(f"{artifact.path}: cannot load the library: {_first_line(e)}") from None
        self.device = self._make_device(tvm)
        self.vm = relax.VirtualMachine(lib, self.device)
        self._library = lib  # (profile_kernels instruments a VM of its own)
        self._main = self._function(rt["entry"])
        # the library's entry takes the inputs then the params: the manifest must list as many
        arity = int(self.vm.module["get_function_arity"](rt["entry"]))
        if arity != len(m["inputs"]) + len(rt["params"]):
            raise ArtifactError(f"{artifact.path}: the library's {rt['entry']} takes {arity} arguments, the manifest "
                                f"lists {len(m['inputs'])} inputs and {len(rt['params'])} params")
        try:
            with np.load(paths["params"], allow_pickle=False) as data:
                params = [_contiguous(stored_param(data, name, rt)) for name in rt["params"]]
        except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile, zlib.error) as e:
            # (data that its headers did not give away, or a codebook entry that does not decode)
            raise ArtifactError(f"{artifact.path}: params file: {_first_line(e)}") from None
        self._params = [tvm.runtime.tensor(a, self.device) for a in params]
        if rt.get("transform"):  # params stored as the model holds them (clustered: indices + codebooks)
            transform = self._function(rt["transform"])
            out = transform(self._params)  # the weight packing, once, here
            self._params = [out[i] for i in range(len(out))]
        self.inputs = m["inputs"]
        self.outputs = m["outputs"]
        self._checks = InputChecks(self.inputs)
        # per input, the device tensor its values are copied into (a new tensor per call cost
        # 15 µs of a tiny model's 50: allocation)
        self._staged: dict[int, Any] = {}
        self._symbolic_dims = bool((m.get("dims") or {}).get("symbolic"))  # run-time checks (check_dims)
        # the input shapes check_dims last accepted: a stream of same-shaped calls (a VAD's chunks)
        # skips the check (4 µs of a 0.1 ms model's call)
        self._dims_ok: tuple[tuple[int, ...], ...] | None = None
        # shape buckets (cpu{buckets=...}): a Runner per bucket; `last_dispatch` says which kernels ran
        self._buckets = _Buckets(self) if m.get("buckets") else None
        self.last_dispatch: str | None = None

    def _function(self, name: str) -> Any:
        try:
            return self.vm[name]
        except Exception:  # noqa: BLE001 - TVM says AttributeError or its own error, by version
            raise ArtifactError(f"{self.artifact.path}: the library has no function {name!r}") from None

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]

    def _feeds(self, inputs: Mapping[str, Any] | Sequence[Any]) -> list[Any]:
        out = [a if a.flags.c_contiguous else _contiguous(a) for a in self._checks.arrays(inputs)]
        if self._symbolic_dims:
            shapes = tuple(a.shape for a in out)
            if shapes != self._dims_ok:
                check_dims(self.manifest, self.input_names, out)
                self._dims_ok = shapes
            if self._per_shape and shapes != self._threads_for:
                self._choose_threads(out)
                self._threads_for = shapes
        return [self._stage(i, a) for i, a in enumerate(out)]

    def _choose_threads(self, arrays: Sequence[np.ndarray]) -> None:
        """One thread for inputs whose call is small (`small_call` at their dims' sizes), else the
        default count; the calling thread's pool follows at the call (`_own_pool`)."""
        sizes = dim_sizes(self.manifest, self.input_names, arrays)
        want = 1 if small_call(self.manifest, sizes) else self._full_threads
        if want != self.threads:
            self.threads = want
            self.pool_settings = pool_settings(self._pool, want)

    def _stage(self, i: int, a: np.ndarray) -> Any:
        """Input `i` on the device: its staging tensor refilled when the shape and dtype are those
        of the last call (through a numpy view of it where the device is the host: np.copyto is
        1 µs, the tensor's copyfrom 6), else a new one, kept for the next call."""
        staged = self._staged.get(i)
        if staged is not None and staged[0] == a.shape and staged[1] == a.dtype:
            buf, view = staged[2], staged[3]
            if view is not None:
                np.copyto(view, a)
            else:
                buf.copyfrom(a)
            return buf
        buf = self._to_device(a)
        if hasattr(buf, "copyfrom"):  # (a TVM tensor; a remote runner's hook may keep numpy arrays)
            try:
                view = np.from_dlpack(buf)  # (host memory only; a GPU tensor refuses)
            except Exception:  # noqa: BLE001 - TVM/numpy name the refusal differently by version
                view = None
            self._staged[i] = (a.shape, a.dtype, buf, view)
        return buf

    # hooks for runners of other devices (graphopt.targets.cuda, graphopt.targets.arm64)
    def _make_device(self, tvm: Any) -> Any:
        return tvm.cpu()

    def _to_device(self, a: np.ndarray) -> Any:
        return self._tvm.runtime.tensor(a, self.device)

    def _bucket(self, inputs: Mapping[str, Any] | Sequence[Any]) -> tuple[Any, list[np.ndarray]] | None:
        """(the bucket's Runner or None for the symbolic kernels, the checked arrays) where the
        artifact has shape buckets; None where it has none."""
        if self._buckets is None:
            return None
        arrays = self._checks.arrays(inputs)
        check_dims(self.manifest, self.input_names, arrays)
        sub, self.last_dispatch = self._buckets.pick(arrays)
        return sub, arrays

    def run(self, inputs: Mapping[str, Any] | Sequence[Any]) -> list[np.ndarray]:
        """Outputs in the model's output order, as numpy arrays."""
        picked = self._bucket(inputs)
        if picked is not None:
            sub, inputs = picked
            if sub is not None:
                outs: list[np.ndarray] = sub.run(inputs)
                return outs
        feeds = self._feeds(inputs)
        probe = self.thread_probe
        if probe is not None and not probe.done:
            want = probe.next_threads()
            if want != self.threads:
                self.threads, self.pool_settings = want, pool_settings(self._pool, want)
            t0 = time.perf_counter()
            res = self._call(feeds)
            if probe.record(want, time.perf_counter() - t0):
                self.threads = probe.choice
                self.pool_settings = pool_settings(self._pool, probe.choice)
        else:
            res = self._call(feeds)
        return _flatten(res, len(self.outputs))

    def _own_pool(self) -> None:
        """The calling thread's TVM pool as this runner asks (another runner, or a new thread,
        may have set it otherwise)."""
        s = getattr(_THREAD_POOL, "settings", None)
        if s is not self.pool_settings and s != self.pool_settings:
            apply_pool(self.pool_settings)

    def _call(self, feeds: list[Any]) -> Any:
        self._own_pool()
        try:
            return self._main(*feeds, *self._params)
        except (ValueError, TypeError, RuntimeError) as e:
            # the library's own argument checks (TVM's ErrorContext) refusing what the manifest's
            # checks let through: the manifest does not describe this library
            if "ErrorContext(fn=" not in str(e):
                raise
            raise ArtifactError(f"{self.artifact.path}: the library refuses arguments its manifest accepts (the "
                                f"manifest does not describe this library): {_first_line(e)[:300]}") from None

    def benchmark(self, inputs: Mapping[str, Any] | Sequence[Any], *, warmup: int = 3, repeat: int = 30,
                  seconds: float | None = None) -> dict[str, Any]:
        """Latency of `run` without the input/output copies: percentiles in milliseconds."""
        picked = self._bucket(inputs)
        if picked is not None and picked[0] is not None:
            stats: dict[str, Any] = picked[0].benchmark(picked[1], warmup=warmup, repeat=repeat, seconds=seconds)
            return stats
        while self.thread_probe is not None and not self.thread_probe.done:
            self.run(inputs)  # (the thread count it settles on is what gets timed)
        feeds = self._feeds(inputs)
        self._call(feeds)  # (one untimed run at least: the library's argument checks)
        for _ in range(max(warmup - 1, 0)):
            self._main(*feeds, *self._params)
        times: list[float] = []
        deadline = None if seconds is None else time.perf_counter() + seconds
        while len(times) < repeat and (deadline is None or time.perf_counter() < deadline or len(times) < 3):
            t = time.perf_counter()
            self._main(*feeds, *self._params)
            times.append((time.perf_counter() - t) * 1e3)
        return latency_stats(times) | {"threads": self.threads, "pool": self.pool_settings.pool}


    def profile_kernels(self, inputs: Mapping[str, Any] | Sequence[Any], *, repeat: int = 5, min_repeat_ms: float = 10.0,
                        cold: bool = False, cpu_time: bool = False) -> list[dict[str, Any]]:
        """Time every kernel call of one run of the model, in call order: [{"kernel": PrimFunc name,
        "shapes": argument shapes (ints for scalar arguments), "seconds": `repeat` timings}].

        The Relax VM's instrument hook (`VirtualMachine.set_instrument`, called around every call
        `main` makes) hands each kernel's real arguments to TVM's `time_evaluator` on the library's
        kernel module, which runs that kernel alone on them: each timing the mean of enough runs to
        last `min_repeat_ms`, warm caches (`cold`: every argument but the first flushed from the CPU
        caches before each run, as a model's weights are when larger than the caches; one run per
        timing). `cpu_time`: CPU seconds of this process instead (robust on a shared machine with
        one thread; with more it sums every thread's). A fresh VM is instrumented, so `run` and
        `benchmark` stay as they were."""
        from tvm import relax

        picked = self._bucket(inputs)
        if picked is not None and picked[0] is not None:
            calls: list[dict[str, Any]] = picked[0].profile_kernels(picked[1], repeat=repeat, min_repeat_ms=min_repeat_ms,
                                                                   cold=cold, cpu_time=cpu_time)
            return calls
        feeds = self._feeds(inputs)
        self._call(feeds)  # (the library's argument checks, and a warm-up)
        kernels = _kernel_module(self._library)
        names = {e.get("kernel") for e in self.manifest.get("kernel_map") or [] if isinstance(e, dict)}
        vm = relax.VirtualMachine(self._library, self.device)
        evaluators: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []

        def instrument(func: Any, symbol: Any, before: bool, _ret: Any, *args: Any) -> int:
            sym = str(symbol)
            if not before or not (sym in names or (not names and kernels.implements_function(sym))):
                return 0
            shapes = [list(a.shape) if hasattr(a, "shape") else int(a) if isinstance(a, int) else None for a in args]
            if cpu_time:
                times = _cpu_seconds(func, args, min_repeat_ms / 1e3, repeat)
            else:
                ev = evaluators.get(sym)
                if ev is None:
                    ev = evaluators[sym] = kernels.time_evaluator(
                        sym, self.device, number=1, repeat=repeat, min_repeat_ms=0 if cold else int(min_repeat_ms),
                        f_preproc="cache_flush_cpu_non_first_arg" if cold else "")
                times = [float(t) for t in ev(*args).results]
            rows.append({"kernel": sym, "shapes": shapes, "seconds": times})
            return 0  # (the VM then makes the call itself)

        vm.set_instrument(instrument)
        vm[self.manifest["runtime"]["entry"]](*feeds, *self._params)
        return rows


def _kernel_module(library: Any) -> Any:
    """The module of `library` (a loaded Relax VM library) that holds the kernels: its first import
    (the VM executable itself holds the bytecode)."""
    return library.imports[0] if library.imports else library


def _cpu_seconds(fn: Any, args: Sequence[Any], min_s: float, repeat: int) -> list[float]:
    """`repeat` timings of fn(*args) in CPU seconds of this process, each the mean of enough calls
    to last `min_s`."""
    t = time.process_time()
    fn(*args)
    number = max(1, int(min_s / max(time.process_time() - t, 1e-6)))
    out = []
    for _ in range(repeat):
        t = time.process_time()
        for _ in range(number):
            fn(*args)
        out.append((time.process_time() - t) / number)
    return out


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
        return [_to_numpy(res)]
    out: list[np.ndarray] = []
    for r in res:
        out.extend(_flatten(r, 1))
    return out


def _to_numpy(t: Any) -> np.ndarray:
    """A copy of host tensor `t` (through DLPack: 0.6 µs where Tensor.numpy() takes 5.7); GPU
    tensors and dtypes numpy has no DLPack code for (bfloat16) go through .numpy()."""
    try:
        return np.from_dlpack(t).copy()
    except Exception:  # noqa: BLE001 - a device or dtype DLPack cannot hand to numpy
        return np.asarray(t.numpy())


def _check_cpu(artifact: Artifact) -> None:
    """Refuse a library compiled for CPU features this machine lacks (it would die of SIGILL)."""
    recorded = artifact.manifest.get("target", {}).get("machine")
    if not isinstance(recorded, dict):
        return  # (artifacts from before the machine model: nothing to check)
    from graphopt.targets.machine import MachineModel, missing_features

    try:
        machine = MachineModel.from_json(recorded)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ArtifactError(f"{artifact.path}: manifest.json target.machine is malformed: {_first_line(e)}") from None
    missing = missing_features(machine)
    if missing:
        raise ArtifactError(f"{artifact.path}: compiled for mcpu={machine.mcpu}, and this CPU lacks "
                            f"{', '.join(missing)}: recompile with --target 'cpu{{mcpu=...}}' for this machine")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


#: target name → "module:function(artifact, threads=...)" making the runner of artifacts that are
#: not for this process's CPU (an aarch64 library run under qemu on x86, a CUDA device)
RUNNERS: dict[str, str] = {
    "arm64": "graphopt.targets.arm64.target:load_runner",
    "cuda": "graphopt.targets.cuda:load_runner",
}


def load(path: str, *, threads: int | None = None, pool: str | None = None) -> Runner:
    """Load the artifact in folder `path` (checks its hashes) and return a Runner. `pool`: how the
    cpu runner's thread pool shares the machine (POOLS, default "balanced"; module docstring)."""
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: no such artifact folder")
    art = Artifact(path)
    check_threads(threads)
    if pool is not None:
        check_pool(pool)
    spec = RUNNERS.get(art.manifest["target"]["name"])
    if spec is not None and pool is not None:
        raise UsageError(f"pool={pool!r}: the thread-pool policy is for cpu artifacts; {path} is for "
                         f"{art.manifest['target']['name']}")
    if spec is not None:
        import importlib

        mod_name, fn = spec.split(":")
        runner: Runner = getattr(importlib.import_module(mod_name), fn)(art, threads=threads)
        return runner
    return Runner(art, threads=threads, pool=pool or DEFAULT_POOL)


class OrtRunner:
    """An .onnx model on onnxruntime (CPUExecutionProvider, all graph optimizations), with the
    Runner's interface: `inputs` specs as a manifest lists them, `run`, `benchmark`. `pool`
    (POOLS): "balanced" and "shared" stop its intra-op workers spinning when a run ends (they still spin between
    one run's operators), "exclusive" keeps onnxruntime's default (spinning on after a run). The
    thread count is always explicit, which also keeps onnxruntime from pinning its workers (it
    does where the count is left to it)."""

    def __init__(self, path: str, *, threads: int | None = None, profile_dir: str | None = None,
                 pool: str = DEFAULT_POOL) -> None:
        from graphopt.check import onnxruntime_session

        self.path = path
        self.threads = check_threads(threads) or _cores()
        self.pool = check_pool(pool)
        # with profile_dir: onnxruntime's per-node profile, and the graph it runs (node names)
        try:
            # (log 4, fatal only: onnxruntime's own error log would be a second stderr line; the
            # exception carries the message, which `run` turns into one line)
            self.session = onnxruntime_session(
                path, threads=self.threads, inter_op_threads=1, spin_between_runs=pool == "exclusive", log_severity=4,
                profile_prefix=None if profile_dir is None else os.path.join(profile_dir, "ort_profile"),
                optimized_model_path=None if profile_dir is None else os.path.join(profile_dir, "optimized.onnx"))
        except Exception as e:  # noqa: BLE001 - onnxruntime's loader errors are the user's model
            raise UsageError(f"{path}: onnxruntime cannot load it: {_first_line(e)[:300]}") from None
        self.inputs = [{"name": i.name, "dtype": _ort_dtype(i.type), "shape": [d if isinstance(d, int) else (str(d) if d else None) for d in (i.shape or [])]}
                       for i in self.session.get_inputs()]
        self.outputs = [{"name": o.name} for o in self.session.get_outputs()]
        self._checks = InputChecks(self.inputs)

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]

    def _feeds(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return dict(zip(self._checks.names, self._checks.arrays(inputs)))

    def run(self, inputs: Mapping[str, Any]) -> list[np.ndarray]:
        return [np.asarray(a) for a in self._session_run(self._feeds(inputs))]

    def _session_run(self, feeds: Mapping[str, np.ndarray]) -> Any:
        try:
            return self.session.run(None, dict(feeds))
        except Exception as e:  # noqa: BLE001 - a node that refuses these inputs: the user's data, one line
            shapes = ", ".join(f"{k}[{'x'.join(map(str, np.shape(v)))}]" for k, v in feeds.items())
            raise UsageError(f"{self.path}: onnxruntime cannot run it on these inputs ({shapes}): "
                             f"{_first_line(e)[:300]} (give --inputs, or --dim NAME=N for a symbolic dim)") from None

    def benchmark(self, inputs: Mapping[str, Any], *, warmup: int = 3, repeat: int = 30) -> dict[str, Any]:
        """Latency of `run` (onnxruntime's, inputs already on the host): percentiles in milliseconds."""
        feeds = self._feeds(inputs)
        for _ in range(max(warmup, 1)):  # (a refusal is one line here, before the timing loop)
            self._session_run(feeds)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            self.session.run(None, feeds)
            times.append((time.perf_counter() - t) * 1e3)
        return latency_stats(times) | {"threads": self.threads, "pool": self.pool}


def _ort_dtype(t: str) -> str | None:
    """numpy's name of an onnxruntime type string ('tensor(float)' → 'float32')."""
    table = {"float": "float32", "double": "float64", "float16": "float16", "int64": "int64", "int32": "int32",
             "int16": "int16", "int8": "int8", "uint8": "uint8", "uint16": "uint16", "uint32": "uint32",
             "uint64": "uint64", "bool": "bool"}
    inner = t[len("tensor("):-1] if t.startswith("tensor(") else t
    return table.get(inner)


def load_onnx(path: str, *, threads: int | None = None, profile_dir: str | None = None,
              pool: str = DEFAULT_POOL) -> OrtRunner:
    """An OrtRunner of .onnx file `path` (`profile_dir`: onnxruntime's profiling on, its files there;
    `pool`: POOLS, the module docstring)."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    return OrtRunner(path, threads=threads, profile_dir=profile_dir, pool=pool)

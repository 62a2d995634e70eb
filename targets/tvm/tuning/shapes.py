"""Tuning the kernels that have symbolic dims at representative sizes the user gives
(`--tune-shapes 'x=1x3x320x320;x=1x3x640x480'`, the cpu target's `tune-shapes=` option, Python
`graphopt.compile(..., tune_shapes=...)`).

meta_schedule tunes static kernels only (`tuner`: "kernels with a symbolic dimension keep the
default schedules"). Here, for each kernel with a symbolic dim that one of graphopt's rules
schedules:

1. its arguments at each size: the sizes bind the symbols of `main`'s inputs, `main`'s
   match_casts bind the symbols derived from them (a detector's H = 8 * H_8), and each call of
   the kernel then has concrete argument shapes (and values for its scalar symbol arguments);
2. its candidates: the default schedule, the default rules under single `ScheduleKnobs` changes
   (`KNOB_CHANGES`) and the other choices of the rule that made it (`variants.variant_rules`:
   micro-kernel tiles, loop orders, reduction chunks, window tiles), each applied to the
   *symbolic* kernel, duplicates (same TIR) dropped, at most `MAX_CANDIDATES` built;
3. each candidate is built once (it is the symbolic kernel the artifact would ship, loop marks
   applied, weight packing left out as the tuner's builder does) and run at every size with
   random data, the candidates interleaved over `ROUNDS` rounds (the best of each kept);
4. the winner is the candidate with the smallest geometric mean over the sizes of its time
   divided by the default's; it replaces the default only below `WIN_RATIO` (noise between
   equal schedules must not swap them). The kernel stays symbolic: one artifact serves every
   size, and sizes not given run the same code.

Timing runs isolated: each kernel's built candidates are exported and timed by a child process
(`shapes_worker`), so a candidate that crashes or hangs when run costs that kernel's choice, not
the compile: the crashing candidate is named in one line and left out, the rest are timed again
(a second crash, or one of the default schedule, keeps the default). With a tuning database
(`--tuning-db`), each kernel's choice is stored in `graphopt_tune_shapes.json` keyed by the
kernel's TIR, the target, the schedule knobs and its argument shapes at the sizes: a later
compile with the same database reuses it without measuring. `--tune-minutes` bounds the time;
kernels not reached keep their default schedules (and say so), and a kernel whose candidates or
rounds the budget cut is measured again by the next compile.

Only kernels worth a choice are looked at: a conv/matmul-like reduction (`is_tunable_kernel`) or
a window kernel of the blocked layout (pooling, depthwise); copies and elementwise kernels keep
their default schedule silently. Only the first call of a kernel is timed (a kernel called at
several places with other shapes is tuned for its first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from graphopt.errors import UsageError

if TYPE_CHECKING:
    import tvm

__all__ = ["tune_shapes", "size_bindings", "kernel_arguments", "candidates", "KernelChoice", "TuneShapesResult",
           "KNOB_CHANGES", "WIN_RATIO", "ROUNDS", "CHOICES_FILE", "MAX_CANDIDATES"]

#: the database file of the choices (in the tuning database folder)
CHOICES_FILE = "graphopt_tune_shapes.json"
_LOCK_FILE = ".graphopt-tune-shapes.lock"
#: a candidate replaces the default schedule only when its geometric-mean time over the sizes is
#: below this fraction of the default's
WIN_RATIO = 0.97
#: candidates built and timed per kernel, the default included (each is an LLVM build of the
#: kernel: 1-10 s; the machine model's exact tiles come first in the rule's list)
MAX_CANDIDATES = 16
#: interleaved timing rounds per kernel (each candidate at each size once per round; the best kept)
ROUNDS = 3
#: each timing runs the kernel for at least this long
MIN_REPEAT_MS = 15
#: a timing worker still running after this many seconds (a candidate that hangs) is killed
WORKER_TIMEOUT_S = 300.0
#: single changes of the default schedules' knobs tried as candidates (those giving the same TIR
#: as the default are dropped). `fast_erf` is left out: it changes the numerics, not the schedule.
KNOB_CHANGES: tuple[dict[str, Any], ...] = (
    {"matmul_k_block": 0}, {"matmul_k_block": 64}, {"matmul_k_block": 256},
    {"matmul_wide_vt": False}, {"pack_kn_weights": False}, {"inline_epilogue": False},
    {"symbolic_rows": False}, {"materialise_prologue": False}, {"row_passes": False},
    {"window_row_tile": False}, {"window_acc_vectors": 4}, {"window_acc_vectors": 12},
    {"serial_symbolic_outer": False}, {"decompose_padding": False}, {"shift_symbolic_tiles": False},
)


@dataclass
class KernelChoice:
    """What `--tune-shapes` decided for one symbolic kernel."""

    kernel: str
    rule: str | None  # the default schedule's rule
    choice: str = "default"  # "default" or the winning candidate's label
    why: str = ""  # why the default was kept (empty when a candidate won)
    candidates: int = 0  # candidates measured (the default included)
    #: per size: the kernel's argument shapes ([..] per tensor, an int per scalar)
    args: list[list[Any]] = field(default_factory=list)
    default_ms: list[float] = field(default_factory=list)  # per size
    chosen_ms: list[float] = field(default_factory=list)  # per size (the default's when it was kept)
    ratio: float | None = None  # geometric mean of chosen / default over the sizes
    best_other: str | None = None  # the best candidate that is not the default (kept or not)
    best_other_ratio: float | None = None
    reused: bool = False  # from the database, not measured now
    partial: bool = False  # the time budget cut its candidates or rounds (a later compile measures it again)
    #: {label: [ms per size]} of every candidate measured
    timings: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, [], {}, "") or k == "choice"}


@dataclass
class TuneShapesResult:
    """`tune_shapes`' summary (manifest/report `tuning.shapes`)."""

    sizes: list[dict[str, list[int]]] = field(default_factory=list)
    kernels: dict[str, KernelChoice] = field(default_factory=dict)
    seconds: float = 0.0
    stopped: str = "done"  # "done" | "time budget"
    db: str | None = None

    def as_dict(self) -> dict[str, Any]:
        n = {k: sum(1 for c in self.kernels.values() if (c.choice == "default") == (k == "default")) for k in ("default", "tuned")}
        return {"sizes": self.sizes, "kernels": {k: c.as_dict() for k, c in self.kernels.items()},
                "kept_default": n["default"], "tuned": n["tuned"],
                "reused": sum(1 for c in self.kernels.values() if c.reused), "seconds": round(self.seconds, 2),
                "stopped": self.stopped, "win_ratio": WIN_RATIO} | ({"db": self.db} if self.db else {})


# --------------------------------------------------------------------------- sizes -> symbols


def _value(expr: Any, binding: Mapping[str, int]) -> int | None:
    """`expr` (a TIR expression) as an int with the symbols of `binding` (by name) bound, or None."""
    import tvm
    from tvm import tirx

    from ..schedules.base import vars_in

    if isinstance(expr, int):
        return int(expr)
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    ana = tvm.sym.Analyzer()
    for v in vars_in(expr):
        if v.name not in binding:
            return None
        ana.bind(v, tirx.const(int(binding[v.name]), str(getattr(v.ty, "dtype", "int64"))))
    e = ana.simplify(expr)
    return int(e.value) if isinstance(e, tirx.IntImm) else None


def _unify(dims: Sequence[Any], values: Sequence[int], binding: dict[str, int], where: str,
           names: Sequence[str] | None = None) -> None:
    """Bind the symbols of `dims` (TIR expressions: `H`, `H_8 * 8`) so they equal `values`; a dim
    that is known already and differs is a UsageError (a size the model cannot take). `names`:
    what to call each dim in that error (the input's symbol where `dims` re-express it)."""
    from tvm import tirx

    from ..schedules.base import vars_in

    if len(dims) != len(values):
        raise UsageError(f"--tune-shapes: {where} has rank {len(dims)}, the size gives {len(values)} dims")
    for axis, (d, v) in enumerate(zip(dims, values)):
        known = _value(d, binding)
        if known is not None:
            if known != v:
                raise UsageError(f"--tune-shapes: {where}: dim {axis} is {d} = {known} for these sizes, not {v}")
            continue
        free = [x for x in vars_in(d) if x.name not in binding]
        if len(free) != 1:
            continue
        x = free[0]
        if isinstance(d, tirx.Var):
            binding[x.name] = int(v)
        elif isinstance(d, tirx.Mul) and isinstance(d.a, tirx.Var) and isinstance(d.b, tirx.IntImm):
            c = int(d.b.value)
            if v % c:
                what = names[axis] if names is not None else f"{where}: dim {axis} ({d})"
                raise UsageError(f"--tune-shapes: {what} = {v} is not a multiple of {c}, which the compiled model "
                                 "needs (its dims.symbolic: maps of different strides meet)")
            binding[x.name] = v // c


def _shape_values(ty: Any) -> list[Any] | None:
    shape = getattr(ty, "shape", None)
    values = getattr(shape, "values", None)
    return list(values) if values is not None else None


def size_bindings(main: Any, inputs: Sequence[Sequence[int] | None]) -> dict[str, int]:
    """{symbol name: value} of `main`'s symbols for one size: `inputs` are the concrete shapes of
    `main`'s inputs in order (None: an input without symbolic dims); `main`'s match_casts add the
    symbols derived from them (`image: [N, 3, H_8 * 8, W_8 * 8]`)."""
    from tvm import relax

    binding: dict[str, int] = {}
    for p, shape in zip(main.params, inputs):
        dims = _shape_values(p.ty)
        if shape is not None and dims is not None:
            _unify(dims, list(shape), binding, f"input {p.name!r}")
    body = main.body
    for block in getattr(body, "blocks", []):
        for b in block.bindings:
            if not isinstance(b, relax.MatchCast):
                continue
            src, dst = _shape_values(getattr(b.value, "ty", None)), _shape_values(b.ty)
            if src is None or dst is None:
                continue
            vals = [_value(d, binding) for d in src]
            if all(v is not None for v in vals):
                _unify(dst, [int(v) for v in vals if v is not None], binding, f"{b.var.name}", names=[str(d) for d in src])
    return binding


def call_sites(main: Any) -> dict[str, Any]:
    """{PrimFunc name: its first call_tir in `main`}."""
    from tvm import relax

    out: dict[str, Any] = {}
    for block in getattr(main.body, "blocks", []):
        for b in block.bindings:
            v = getattr(b, "value", None)
            if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.call_tir" and isinstance(v.args[0], relax.GlobalVar):
                out.setdefault(v.args[0].name_hint, v)
    return out


def kernel_arguments(call: Any, binding: Mapping[str, int]) -> list[Any] | None:
    """The concrete arguments of one call_tir at one size: a shape list per tensor (inputs, then
    outputs), an int per scalar; None when some dim is not known from the sizes (computed at run
    time)."""
    from tvm import relax

    out: list[Any] = []
    args = list(call.args[1].fields) if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
    outs = list(call.ty_args)
    if len(outs) == 1 and isinstance(outs[0], relax.TupleType):
        outs = list(outs[0].fields)
    for a in args:
        dims = _shape_values(getattr(a, "ty", None))
        if dims is not None:  # a tensor
            vals = [_value(d, binding) for d in dims]
            if any(x is None for x in vals):
                return None
            out.append(vals)
            continue
        v = _value(a, binding)  # a scalar symbol
        if v is None:
            return None
        out.append(int(v))
    for ty in outs:
        dims = _shape_values(ty)
        if dims is None:
            return None
        vals = [_value(d, binding) for d in dims]
        if any(x is None for x in vals):
            return None
        out.append(vals)
    return out


def _func_binding(func: Any, args: Sequence[Any]) -> dict[str, int] | None:
    """{name: value} of the PrimFunc's own symbols for concrete `args`."""
    if len(func.params) != len(args):
        return None
    binding: dict[str, int] = {}
    for p, a in zip(func.params, args):
        shape = getattr(p, "shape", None)
        if isinstance(a, int):
            if shape is None:
                binding[p.name] = a
            continue
        if shape is None:
            return None
        try:
            _unify(list(shape), a, binding, f"argument {p.name}")
        except UsageError:
            return None
    return binding


# --------------------------------------------------------------------------- candidates


def _hash(func: Any) -> int:
    import tvm_ffi

    return int(tvm_ffi.structural_hash(func))


def _knob_label(change: Mapping[str, Any]) -> str:
    return "knob " + ";".join(f"{k.upper()}:{int(v)}" for k, v in change.items())


def candidates(func: Any, target: Any, lanes: int) -> tuple[str | None, list[tuple[str, Callable[[], Any]]]]:
    """(the default rule, [(label, make)]) for a kernel: "default" first, then the knob changes
    and the rule's other choices; `make()` gives the traced Schedule (or None where it declines).
    Nothing is applied yet (a kernel reused from the database applies only its choice)."""
    from ..schedules import default_schedule
    from ..schedules.knobs import current, using
    from .variants import variant_rules

    base = current()
    _, rule, _ = default_schedule(func, target)
    out: list[tuple[str, Callable[[], Any]]] = [("default", lambda: default_schedule(func, target)[0])]
    for change in KNOB_CHANGES:  # (first: most give the default's TIR again, and are dropped unbuilt)
        if all(getattr(base, k) == v for k, v in change.items()):
            continue
        knobs = dataclasses.replace(base, **change)

        def make(knobs: Any = knobs) -> Any:
            with using(knobs):
                return default_schedule(func, target)[0]

        out.append((_knob_label(change), make))
    _, cands = variant_rules(func, target, lanes)
    for label, r in cands:

        def apply(r: Any = r) -> Any:
            return r.apply(func, target, lanes)

        out.append((label, apply))
    return rule, out


# --------------------------------------------------------------------------- measuring


def _build(sch: Any, target: Any) -> Any:
    """The kernel as the tuner's builder builds it (`build.build_kernel`: loop marks applied,
    weight packing removed, the cpu build's TIR lowering), one function `main`."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from ..build import build_kernel
    from ..schedules.loop_marks import apply_loop_marks_to_module

    func = sch.mod["main"].with_attr("global_symbol", "main")
    mod = tvm.IRModule({"main": func})
    built = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(apply_loop_marks_to_module(mod))
    return built["main"], build_kernel(mod, target)


def _argument_specs(func: Any, binding: Mapping[str, int]) -> list[dict[str, Any]] | None:
    """The built `func`'s arguments at one size for the timing worker: a tensor's shape (its
    packed-weight shape) and dtype, a scalar's value; None when a dim is not known."""
    out: list[dict[str, Any]] = []
    for p in func.params:
        shape = getattr(p, "shape", None)
        if shape is None:
            if p.name not in binding:
                return None
            out.append({"int": int(binding[p.name])})
            continue
        dims = [_value(d, binding) for d in shape]
        if any(d is None for d in dims):
            return None
        out.append({"shape": dims, "dtype": str(p.dtype)})
    return out


@dataclass
class _Timed:
    """What the timing worker measured for one kernel: {label: [best ms per size]}, whether the
    time budget cut the rounds, and the crashes it survived (or the reason it failed)."""

    best: dict[str, list[float]] = field(default_factory=dict)
    cut: bool = False
    dropped: list[str] = field(default_factory=list)  # "LABEL: why" of candidates left out after a crash
    failed: str | None = None


def _run_worker(job: dict[str, Any], work: str) -> tuple[dict[str, Any] | None, str | None, str]:
    """Run one timing worker on `job`: (its result or None, the candidate it was running last,
    what went wrong)."""
    import signal
    import subprocess

    path = os.path.join(work, "job.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(job, f)
    env = dict(os.environ)
    env["TVM_NUM_THREADS"] = str(job["threads"])
    cmd = [sys.executable, "-m", "graphopt.targets.tvm.tuning.shapes_worker", path]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    limit = WORKER_TIMEOUT_S + float(job.get("seconds") or 0.0)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        why = f"timed out after {limit:.0f} s"
    else:
        why = ""
    last, result = None, None
    for raw in out.decode("utf-8", "replace").splitlines():
        try:
            ev = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if "running" in ev:
            last = str(ev["running"])
        elif "best" in ev:
            result = ev
    if result is not None and proc.returncode == 0:
        return result, last, ""
    if not why:
        rc = proc.returncode
        try:
            why = f"crashed ({signal.Signals(-rc).name})" if rc < 0 else f"exited {rc}"
        except ValueError:
            why = f"crashed (signal {-rc})"
        tail = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
        if rc > 0 and tail:
            why += f": {tail[-1][:200]}"
    return None, last, why


def _measure_isolated(built: list[tuple[str, Any, Any]], bindings: list[dict[str, int]], deadline: float | None,
                      threads: int) -> _Timed:
    """Time the built candidates at every size in a child process (`shapes_worker`). A crash or a
    hang while a candidate other than the default runs: that candidate is left out and the rest
    timed again once; otherwise the kernel's timing fails (`_Timed.failed`)."""
    from graphopt.runtime import DEFAULT_POOL

    timed = _Timed()
    with tempfile.TemporaryDirectory(prefix="graphopt-tune-shapes-") as work:
        cands: list[dict[str, Any]] = []
        for i, (label, func, lib) in enumerate(built):
            sizes = [_argument_specs(func, b) for b in bindings]
            if any(a is None for a in sizes):
                continue
            so = os.path.join(work, f"c{i}.so")
            try:
                lib.export_library(so)
            except Exception:  # noqa: BLE001 - a candidate that does not link is left out
                continue
            cands.append({"label": label, "lib": so, "sizes": sizes})
        for _attempt in range(2):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            job = {"threads": threads, "pool": DEFAULT_POOL, "rounds": ROUNDS, "min_repeat_ms": MIN_REPEAT_MS,
                   "seconds": left, "candidates": cands}
            result, last, why = _run_worker(job, work)
            if result is not None:
                timed.best = {k: [float(x) for x in v] for k, v in result["best"].items()}
                timed.cut = bool(result.get("cut"))
                timed.failed = None
                return timed
            running = f" running candidate {last}" if last else ""
            timed.failed = f"its timing worker {why}{running}"
            if last is None or last == "default" or not any(c["label"] == last for c in cands):
                return timed
            timed.dropped.append(f"{last}: the timing worker {why} running it")
            cands = [c for c in cands if c["label"] != last]
        return timed


def _geomean_ratio(ms: Sequence[float], base: Sequence[float]) -> float:
    return math.exp(sum(math.log(a / b) for a, b in zip(ms, base)) / len(ms))


# --------------------------------------------------------------------------- database


class _Store(dict[str, Any]):
    """The choices file of a database folder, held under its lock while a compile tunes; each
    choice is written (atomically) as soon as it is made, so an interrupted compile keeps them."""

    def __init__(self, db_dir: str) -> None:
        super().__init__()
        self.path = os.path.join(db_dir, CHOICES_FILE)
        self.db_dir = db_dir
        try:
            with open(self.path, encoding="utf-8") as f:
                self.update(json.load(f))
        except (OSError, json.JSONDecodeError):
            pass

    def put(self, key: str, record: dict[str, Any]) -> None:
        self[key] = record
        tmp_fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.db_dir)
        with os.fdopen(tmp_fd, "w", encoding="utf-8") as f:
            json.dump(dict(self), f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


@contextlib.contextmanager
def _locked(db_dir: str) -> Iterator[_Store]:
    """The choices of `db_dir`, under its lock (one compile tunes with a database at a time)."""
    os.makedirs(db_dir, exist_ok=True)
    fd = os.open(os.path.join(db_dir, _LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield _Store(db_dir)
    finally:
        os.close(fd)


def _key(func: Any, target: Any, args: list[list[Any]]) -> str:
    """The database key of one kernel's choice: its TIR, the target, the knobs, its arguments at the
    sizes. The TIR is taken as `tuner.normalize_for_tuning` leaves it (a compile that applies a
    tuning database normalises every kernel first; one whose database folder does not exist yet
    does not)."""
    import tvm
    import tvm_ffi

    from ..build import target_json
    from ..schedules.knobs import current
    from .tuner import normalize_for_tuning

    norm = normalize_for_tuning(tvm.IRModule({"main": func}))["main"]
    text = json.dumps([str(tvm_ffi.structural_hash(norm)), target_json(target), current().spec(), args], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- entry point


def _say(progress: Any, ev: dict[str, Any]) -> None:
    if callable(progress):
        try:
            progress(ev)
        except Exception:  # noqa: BLE001 - a broken hook must not stop the compile
            pass
    elif progress and ev.get("line"):
        sys.stderr.write(str(ev["line"]) + "\n")
        sys.stderr.flush()


def tune_shapes(
    mod: "tvm.IRModule",
    target: "tvm.target.Target",
    sizes: Sequence[Sequence[Sequence[int] | None]],
    *,
    db_dir: str | None = None,
    minutes: float | None = None,
    progress: Any = None,
    labels: Mapping[str, str] | None = None,
    threads: int | None = None,
    max_candidates: int = MAX_CANDIDATES,
) -> tuple["tvm.IRModule", TuneShapesResult]:
    """Schedule `mod`'s symbolic kernels with the candidate best over `sizes` (each size: the
    concrete shapes of `main`'s inputs in order, None for inputs without symbolic dims). Returns
    the module with those kernels scheduled (marked `tirx.is_scheduled`, so the default schedules
    leave them) and the summary. A size that contradicts the model's symbols (a dim that must be a
    multiple of 8) is a UsageError. `max_candidates`: per kernel, the default included. `progress`: True prints one line per kernel that kept its
    default schedule (and why) and one per winner; a callable gets the events."""
    from tvm import tirx

    from ..build import default_threads, with_functions
    from ..schedules import is_tunable_kernel, vector_lanes
    from ..tir_match import kernel_flops
    from .variants import variant_rules

    t0 = time.monotonic()
    deadline = None if not minutes else t0 + 60.0 * float(minutes)
    result = TuneShapesResult(sizes=[], db=os.path.abspath(db_dir) if db_dir else None)
    main = mod["main"]
    n_in = int(main.attrs["num_input"]) if main.attrs is not None and "num_input" in main.attrs else len(main.params)
    bindings = []
    for size in sizes:
        if len(size) != n_in:
            raise UsageError(f"--tune-shapes: {len(size)} input shapes for {n_in} inputs")
        try:
            bindings.append(size_bindings(main, list(size)))
        except UsageError as e:
            spec = ";".join(f"{p.name}={'x'.join(map(str, s))}" for p, s in zip(main.params, size) if s is not None)
            raise UsageError(f"--tune-shapes {spec}: {str(e).removeprefix('--tune-shapes: ')}") from None
        result.sizes.append({str(p.name): list(s) for p, s in zip(main.params, size) if s is not None})
    sites = call_sites(main)
    lanes = vector_lanes(target)
    names = dict(labels or {})

    def label(k: str) -> str:
        nodes = names.get(k)
        return f"{k} ({nodes})" if nodes else k

    todo = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or gv.name_hint not in sites:
            continue
        attrs = func.attrs if func.attrs is not None else {}
        if int(attrs.get("tirx.is_scheduled", 0)) == 1 or "graphopt.own_kernel" in attrs:
            continue
        if all(getattr(p, "shape", None) is None or all(isinstance(d, tirx.IntImm) for d in p.shape) for p in func.params):
            continue  # static: the tuner's
        if not is_tunable_kernel(func) and variant_rules(func, target, lanes)[0] is None:
            continue  # copies, elementwise, reductions of one tensor: no choice worth a build
        try:
            flops = kernel_flops(func, symbolic_as=64.0)
        except Exception:  # noqa: BLE001
            flops = 0.0
        todo.append((flops, gv, func))
    todo.sort(key=lambda t: -t[0])
    n_threads = int(threads or default_threads())
    updates: dict[Any, Any] = {}
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(_locked(db_dir)) if db_dir else None
        for _flops, gv, func in todo:
            name = gv.name_hint
            rule, cands = candidates(func, target, lanes)
            if len(cands) == 1:
                ch = KernelChoice(name, rule, why=f"its rule ({rule}) has no variants")
                result.kernels[name] = ch
                _say(progress, {"ev": "kept", "kernel": name, "line": f"tune-shapes: {label(name)} keeps its default schedule ({rule}): {ch.why}"})
                continue
            ch = KernelChoice(name, rule)
            result.kernels[name] = ch
            args = [kernel_arguments(sites[name], b) for b in bindings]
            fb = [_func_binding(func, a) if a is not None else None for a in args]
            if any(a is None for a in args) or any(b is None for b in fb):
                ch.why = "some of its dims are computed at run time (not known from the sizes)"
                _say(progress, {"ev": "kept", "kernel": name, "line": f"tune-shapes: {label(name)} keeps its default schedule ({rule}): {ch.why}"})
                continue
            ch.args = [a for a in args if a is not None]
            key = _key(func, target, ch.args)
            stored = store.get(key) if store is not None else None
            # (a choice made among fewer candidates, the time budget cut, is measured again)
            if stored is not None and not stored.get("partial") and any(lbl == stored.get("choice") for lbl, _ in cands):
                make = dict(cands)[stored["choice"]]
                sch = make() if stored["choice"] != "default" else None
                if stored["choice"] == "default" or sch is not None:
                    for k in ("choice", "why", "candidates", "default_ms", "chosen_ms", "ratio", "best_other", "best_other_ratio",
                              "timings"):
                        if k in stored:
                            setattr(ch, k, stored[k])
                    ch.reused = True
                    if sch is not None:
                        updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                    _say(progress, {"ev": "reused", "kernel": name, "choice": ch.choice,
                                    "line": f"tune-shapes: {label(name)}: {ch.choice} (from the database {db_dir})"})
                    continue
            if deadline is not None and time.monotonic() >= deadline:
                ch.why = "the time budget (--tune-minutes) ran out before it"
                result.stopped = "time budget"
                _say(progress, {"ev": "kept", "kernel": name, "line": f"tune-shapes: {label(name)} keeps its default schedule ({rule}): {ch.why}"})
                continue
            built: list[tuple[str, Any, Any]] = []
            schedules: dict[str, Any] = {}
            seen: set[int] = set()
            for lbl, make in cands:
                if len(built) >= max_candidates:
                    break
                if deadline is not None and time.monotonic() >= deadline and len(built) >= 2:
                    ch.partial = True
                    break
                try:
                    sch = make()
                except Exception:  # noqa: BLE001 - a choice the kernel cannot take
                    continue
                if sch is None:
                    continue
                h = _hash(sch.mod["main"])
                if h in seen:
                    continue
                seen.add(h)
                tb = time.monotonic()
                try:
                    bfunc, lib = _build(sch, target)
                except Exception:  # noqa: BLE001 - a candidate that does not build is skipped
                    continue
                _say(progress, {"ev": "built", "kernel": name, "candidate": lbl, "seconds": round(time.monotonic() - tb, 2)})
                built.append((lbl, bfunc, lib))
                schedules[lbl] = sch
            if not built or built[0][0] != "default":
                ch.why = "its default schedule did not build alone"
                _say(progress, {"ev": "kept", "kernel": name, "line": f"tune-shapes: {label(name)} keeps its default schedule ({rule}): {ch.why}"})
                continue
            if len(built) == 1:
                ch.why = "no variant differs from it on this kernel"
                ch.candidates = 1
                _say(progress, {"ev": "kept", "kernel": name, "line": f"tune-shapes: {label(name)} keeps its default schedule ({rule}): {ch.why}"})
                if store is not None:
                    store.put(key, {"choice": "default", "why": ch.why, "candidates": 1, "kernel": name})
                continue
            measured = _measure_isolated(built, [b for b in fb if b is not None], deadline, n_threads)
            for d in measured.dropped:
                _say(progress, {"ev": "dropped", "kernel": name,
                                "line": f"tune-shapes: {label(name)}: candidate {d}; left out"})
            if measured.failed is not None:
                ch.why = measured.failed
                _say(progress, {"ev": "kept", "kernel": name, "line": f"tune-shapes: {label(name)} keeps its default schedule ({rule}): {ch.why}"})
                continue
            timings = measured.best
            ch.partial = ch.partial or measured.cut
            if "default" not in timings:
                ch.why = "its default schedule failed to run alone"
                _say(progress, {"ev": "kept", "kernel": name, "line": f"tune-shapes: {label(name)} keeps its default schedule ({rule}): {ch.why}"})
                continue
            base = timings["default"]
            ratios = {lbl: _geomean_ratio(ms, base) for lbl, ms in timings.items()}
            others = sorted((r, lbl) for lbl, r in ratios.items() if lbl != "default")
            ch.candidates = len(timings)
            ch.timings = {lbl: [round(x, 4) for x in ms] for lbl, ms in timings.items()}
            ch.default_ms = [round(x, 4) for x in base]
            if others:
                ch.best_other, ch.best_other_ratio = others[0][1], round(others[0][0], 4)
            if others and others[0][0] < WIN_RATIO:
                win = others[0][1]
                ch.choice, ch.ratio = win, round(others[0][0], 4)
                ch.chosen_ms = [round(x, 4) for x in timings[win]]
                updates[gv] = schedules[win].mod["main"].with_attr("tirx.is_scheduled", True)
                _say(progress, {"ev": "tuned", "kernel": name, "choice": win, "ratio": ch.ratio,
                                "line": f"tune-shapes: {label(name)}: {win} ({ch.ratio:.2f}x the default's time over "
                                        f"{len(base)} sizes)"})
            else:
                ch.ratio, ch.chosen_ms = 1.0, list(ch.default_ms)
                best = f"best: {ch.best_other} at {ch.best_other_ratio:.2f}x" if ch.best_other else "no variant ran"
                ch.why = f"no candidate was faster over the sizes ({best}; a change needs < {WIN_RATIO}x)"
                _say(progress, {"ev": "kept", "kernel": name, "line": f"tune-shapes: {label(name)} keeps its default schedule ({rule}): {ch.why}"})
            if store is not None:
                store.put(key, {k: v for k, v in ch.as_dict().items() if k not in ("reused", "args")})
    result.seconds = time.monotonic() - t0
    return with_functions(mod, updates), result

"""meta_schedule tuning for CPU kernels with a persistent, shared, resumable database.

    db = tune(mod, target, db_dir="~/.cache/graphopt/tuning", trials=2000, minutes=30)
    mod = apply_database(mod, target, db_dir)    # tuned kernels; the rest keep default schedules

What it adds to TVM's meta_schedule (the TVM traps behind each item are in the project's TVM notes):

- **Persistent, shared database.** `db_dir` holds meta_schedule's JSONDatabase
  (`database_workload.json`, `database_tuning_record.json`), which appends every measured record
  as it comes. Workloads are keyed by structural equality of the normalised PrimFunc (the name is
  not part of it), so an identical kernel of another model, or of a later compile, is found and not
  tuned again. A ledger (`graphopt_ledger.json`) counts the trials each workload has had (failed
  ones included), so `tune` skips every task already tuned to its budget and gives a task that
  was interrupted only what it still lacks.
- **Isolation.** Tuning runs in a child process (the compile never runs meta_schedule itself):
  builder candidates build in worker processes with a long timeout (the local builder's 30 s is too
  short here), runners run in another worker; a crashing or hanging worker only fails its
  candidate (it is skipped). If the tuning child itself dies, it is restarted and resumes from the
  database (`max_restarts`); when restarts are spent `tune` returns what the database has.
- **Budgets.** `trials` (new measurements this call), `max_trials_per_task` (total per workload,
  counting earlier calls) and `minutes` (wall clock; the child stops between batches, a hard kill
  follows a grace period). With `minutes` and no per-task cap, tasks are tuned in rounds (each to
  16 trials, then 32, 64, ...) so the time is spread over them.
- **Never loses.** After tuning a task, its default schedule (`schedules`) is built and run by
  the same builder/runner and committed as a record too: the database's best, which
  `apply_database` uses, is the faster of the two. The two finalists (the best record and the
  best of the other kind) are then run again alternately and the database ranks them as that
  paired comparison says (`_paired_check`: on a shared machine one default measurement against
  the minimum of many tuned trials picked slower tuned kernels). The ledger (`kept`, `paired`)
  and the summary say which.
- **Only conv/matmul kernels by default** (`kernels="anchor"`): they are where tuning pays; the
  rest keep `schedules`' default schedules. Tasks go biggest (FLOPs × uses) first, so a time
  budget is spent where it matters.
- **Cheap start.** The GPU tensor-intrinsic modules are replaced by empty ones in every process
  (TVM-NOTES trap 4, 35-40 s of import each time otherwise).
- A progress bar on stderr: tasks done, trials, best latency so far, time left.

Needs `apache-tvm-ffi==0.1.14.post1` (0.1.15 segfaults when meta_schedule saves IR, trap 1) plus
xgboost, psutil, cloudpickle and tornado.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tvm

__all__ = ["tune", "apply_database", "open_database", "cpu_only_intrinsics", "TuningSummary", "repair_database",
           "kept_schedules", "normalize_for_tuning", "clean_stale_work_dirs", "TuningProgress"]

_GPU_INTRIN = ("cuda", "rocm", "hexagon", "riscv_cpu", "metal")
_WORKLOAD_FILE = "database_workload.json"
_RECORD_FILE = "database_tuning_record.json"
_LEDGER_FILE = "graphopt_ledger.json"
_SUMMARY_FILE = "graphopt_last_tune.json"
_LOG_FILE = "tuning.log"
#: held (flock) by the tuning child that owns `db_dir`: one tuner per database at a time
_DB_LOCK_FILE = ".graphopt-tune.lock"
#: a `tune` call's work folder in the temporary directory, and the lock its owner holds on it
_WORK_PREFIX = "graphopt-tune-"
_WORK_LOCK = "owner.lock"
#: a work folder without a lock file (being created, or left by an older graphopt) is only
#: taken for stale after this long
_UNLOCKED_STALE_S = 3600.0
#: a leftover `.tmp-*` of an atomic write in `db_dir` (its writer was killed) after this long
_TMP_STALE_S = 600.0


def cpu_only_intrinsics(extra: Sequence[str] | None = None) -> None:
    """Stand empty modules in for tensor intrinsics the target cannot use, before meta_schedule
    imports them (TVM-NOTES trap 4: ~35 s of CPU for the GPU ones in every process that imports
    them; measured with -X importtime: ARM's 7.5 s more, x86's 1.1 s). `extra` (default:
    $GRAPHOPT_TVM_STUB_INTRIN, comma-separated, set for the tuning processes) names CPU families
    to stub as well."""
    if extra is None:
        extra = [x for x in os.environ.get("GRAPHOPT_TVM_STUB_INTRIN", "").split(",") if x]
    for name in [*_GPU_INTRIN, *extra]:
        full = f"tvm.s_tir.tensor_intrin.{name}"
        if full not in sys.modules:
            sys.modules[full] = types.ModuleType(full)


def _unused_intrinsics(target: Any) -> list[str]:
    """CPU tensor-intrinsic families meta_schedule cannot use for `target`: ARM's on x86; x86's
    (VNNI/AVX-512 int8 dot products) where the CPU has neither; x86's on ARM."""
    arch = _target_arch(target)
    if arch == "arm":
        return ["x86"]
    if arch != "x86":
        return []
    out = ["arm_cpu"]
    try:
        from tvm.target import codegen

        with target:
            if not (codegen.target_has_features("avx512f") or codegen.target_has_features("avxvnni")):
                out.append("x86")
    except Exception:
        pass
    return out


def _target_arch(target: Any) -> str:
    """"x86", "arm" or "" for an LLVM target (from its triple, else the host's)."""
    triple = ""
    try:
        triple = str(target.attrs.get("mtriple") or "")
    except Exception:
        pass
    if not triple:
        import platform

        triple = platform.machine()
    triple = triple.lower()
    if triple.startswith(("x86_64", "i686", "i386", "amd64")):
        return "x86"
    if triple.startswith(("aarch64", "arm")):
        return "arm"
    return ""


def _worker_init() -> None:
    """Initializer of builder/runner worker processes (sent to them by reference)."""
    cpu_only_intrinsics()


# --------------------------------------------------------------------------- database files


def repair_database(db_dir: str) -> int:
    """Drop lines an interrupted write left unparsable (a killed process can cut the last line),
    so the database always opens. Returns the number of lines dropped."""
    dropped = 0
    for name in (_WORKLOAD_FILE, _RECORD_FILE):
        path = os.path.join(db_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        good = []
        for line in lines:
            if not line.strip():
                continue
            try:
                json.loads(line)
                good.append(line)
            except json.JSONDecodeError:
                dropped += 1
        if dropped:
            if name == _WORKLOAD_FILE:
                # records point at workloads by line number: a dropped workload line would shift
                # them, so only a trailing (last) cut line may go
                pass
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in good))
            os.replace(tmp, path)
    return dropped


def open_database(db_dir: str) -> Any:
    """meta_schedule's JSONDatabase in `db_dir` (created when missing, repaired when cut)."""
    cpu_only_intrinsics()
    from tvm.s_tir import meta_schedule as ms

    os.makedirs(db_dir, exist_ok=True)
    repair_database(db_dir)
    return ms.database.JSONDatabase(work_dir=db_dir, module_equality="structural")


def _read_json(path: str, default: Any) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return default


def _write_json_atomic(path: str, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- work folders and locks
#
# A SIGKILLed `tune` call runs no cleanup: its work folder stays in the temporary directory, and
# its tuning child, left without a parent, would go on measuring and writing the ledger while the
# next (resumed) call tunes the same tasks from a ledger it then overwrites (the budget spent
# twice). So: the child dies with its parent, one child at a time owns a database (a flock the
# kernel drops when its holder dies), and each work folder holds a flock of its live owner, so the
# next call can tell a dead owner's folder and remove it.


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def clean_stale_work_dirs(tmp_dir: str | None = None) -> list[str]:
    """Remove the work folders of `tune` calls that are no longer running (killed: nothing ran
    their cleanup) from `tmp_dir` (default: the temporary directory). A folder is stale when its
    owner's lock can be taken; one without a lock file only when older than an hour. Returns the
    folders removed."""
    tmp_dir = tmp_dir or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(tmp_dir) if n.startswith(_WORK_PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(tmp_dir, name)
        try:
            if not os.path.isdir(path) or os.path.islink(path):
                continue
            fd = os.open(os.path.join(path, _WORK_LOCK), os.O_RDWR)
        except FileNotFoundError:
            try:
                if time.time() - os.stat(path).st_mtime > _UNLOCKED_STALE_S:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            except OSError:
                pass
            continue
        except OSError:  # another user's folder, or gone meanwhile
            continue
        try:
            if _try_flock(fd):  # its owner is dead (the kernel released the lock)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def _work_dir() -> Iterator[str]:
    """A fresh work folder in the temporary directory, locked by this process while it lives
    (so `clean_stale_work_dirs` leaves it alone) and removed after."""
    path = tempfile.mkdtemp(prefix=_WORK_PREFIX)
    fd = os.open(os.path.join(path, _WORK_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def _lock_database(db_dir: str, waiting: Callable[[str], None]) -> int:
    """Take the database's tuner lock (blocking; `waiting` is told the holder's pid first) and
    return its fd, held until this process ends. Then remove what killed writers left."""
    fd = os.open(os.path.join(db_dir, _DB_LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    if not _try_flock(fd):
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        waiting(holder)
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    for name in os.listdir(db_dir):
        path = os.path.join(db_dir, name)
        try:
            if name.startswith(".tmp-") and time.time() - os.stat(path).st_mtime > _TMP_STALE_S:
                os.unlink(path)
        except OSError:
            pass
    return fd


def _kill_own_group() -> None:
    """SIGKILL this tuning child and its workers (its process group, as `_run_child` starts it
    in a session of its own; only itself otherwise)."""
    if os.getpgrp() == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _die_with_parent(parent: int) -> None:
    """Kill this process and its builder/runner workers (its process group) as soon as the
    process that started it is gone."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        _kill_own_group()

    threading.Thread(target=watch, name="graphopt-tune-parent-watch", daemon=True).start()


# --------------------------------------------------------------------------- summary / progress


@dataclass
class TuningSummary:
    """What one `tune` call did (also written to `db_dir/graphopt_last_tune.json`)."""

    tasks_total: int = 0
    tasks_selected: int = 0
    tasks_skipped_done: int = 0
    tasks_dynamic: int = 0  # conv/matmul kernels with symbolic shapes: not tunable (default schedules)
    tasks_tuned: int = 0
    new_trials: int = 0
    failed_trials: int = 0
    restarts: int = 0
    seconds: float = 0.0
    stopped: str = "done"  # "done" | "time budget" | "trial budget" | "child failed" | "interrupted"
    best_ms: dict[str, float | None] = field(default_factory=dict)
    #: per task: which schedule the database keeps ("default" when tuning did not beat the
    #: default schedule, "tuned" otherwise) with both measured times
    kept: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class TuningProgress:
    """Renders the child's JSON events as a one-line progress bar on stderr (or calls a hook), and
    at the end one line: how many kernels kept their default schedule and how many a tuned one.

    Tuning runs in phases: the default schedule and its variants of every task, then the search
    (with a time budget in rounds: every task to 16 trials, then 32...). The bar counts the tasks
    of the current phase against that phase's own total (the child says it in its "round"
    event), so it never passes its totals; `labels` ({kernel: its ONNX nodes}) names the nodes of
    the kernel being tuned."""

    def __init__(self, mode: bool | Callable[[dict[str, Any]], Any] | None, minutes: float | None,
                 labels: Mapping[str, str] | None = None) -> None:
        self.hook = mode if callable(mode) else None
        self.enabled = bool(mode)
        self.tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.minutes = minutes
        self.labels = dict(labels or {})
        self.state: dict[str, Any] = {"tasks": 0, "done": set(), "trials": 0, "budget": 0, "best": {}, "task": "",
                                      "phase": "", "phase_tasks": 0, "skipped": 0}
        self.kept: dict[str, str] = {}  # task → "default" | "tuned" | "variant" | "none"
        self._last_line = 0.0

    def event(self, ev: dict[str, Any]) -> None:
        s = self.state
        kind = ev.get("ev")
        if kind == "start":
            s["tasks"] = ev["selected"]
            s["budget"] = ev["budget"]
            s["skipped"] = ev["skipped"]
            s["dynamic"] = ev.get("dynamic", 0)
            s["trials"] = 0  # (a restarted child counts its own trials against what is left)
            s["phase"], s["phase_tasks"], s["done"] = "", ev["selected"], set()
        elif kind == "task":
            s["task"] = ev["name"]
        elif kind == "batch":
            s["trials"] = ev["total_new"]
            if ev.get("best_ms") is not None:  # the best of every schedule measured for it so far
                s["best"][ev["name"]] = min(ev["best_ms"], s["best"].get(ev["name"], math.inf))
        elif kind in ("task_done", "variants_done"):
            s["done"].add(ev.get("name"))
        elif kind == "round":
            cap = int(ev.get("cap") or 0)
            s["phase"] = "defaults" if cap == 0 else f"search to {cap}"
            s["phase_tasks"] = int(ev.get("tasks", s["tasks"]))
            s["done"] = set()
        elif kind == "kept":
            self.kept[ev["name"]] = str(ev.get("kept"))
        elif kind == "waiting" and self.enabled and self.hook is None:
            sys.stderr.write(f"tune: waiting for the tuning run that holds the database (pid {ev.get('holder') or '?'})\n")
        if self.hook is not None:
            try:
                self.hook(dict(ev, **{"elapsed_s": time.monotonic() - self.t0}))
            except Exception:  # a broken hook must not stop tuning
                pass
        if self.enabled and self.hook is None:
            self._render(final=kind == "end")
            if kind == "end":
                sys.stderr.write(self.kept_line(ev) + "\n")
                sys.stderr.flush()

    def label(self, task: str) -> str:
        """`task` with the ONNX nodes its kernel computes."""
        nodes = self.labels.get(task) or self.labels.get(task.rsplit("_", 1)[0] if task[-1:].isdigit() else task)
        return f"{task} ({nodes})" if nodes else task

    def kept_line(self, end: Mapping[str, Any] | None = None) -> str:
        """How many of the kernels this run measured keep the default schedule / a tuned one."""
        n = {k: sum(1 for v in self.kept.values() if v == k) for k in ("default", "tuned", "variant", "none")}
        if not self.kept:
            skipped = int((end or {}).get("skipped", self.state["skipped"]) or 0)
            dynamic = int(self.state.get("dynamic") or 0)
            if skipped:
                why = f"all {skipped} already tuned in the database"
            elif dynamic:
                why = f"no kernel to tune ({dynamic} with symbolic shapes keep their default schedules)"
            else:
                why = "no kernel was measured"
            return f"tune: done ({(end or {}).get('stopped', 'done')}): {why}"
        parts = [f"{n['default']} kept the default schedule", f"{n['tuned']} a tuned one"]
        if n["variant"]:
            parts.append(f"{n['variant']} a measured variant of the default")
        if n["none"]:
            parts.append(f"{n['none']} could not be measured")
        won = [self.label(t) for t, v in self.kept.items() if v in ("tuned", "variant")]
        tail = f" (tuned: {', '.join(won[:3])}{', ...' if len(won) > 3 else ''})" if won else ""
        return f"tune: {len(self.kept)} kernels: {', '.join(parts)}{tail}"

    def _render(self, final: bool = False) -> None:
        s = self.state
        el = time.monotonic() - self.t0
        trials = min(s["trials"], s["budget"]) if s["budget"] else s["trials"]
        if self.minutes:
            left = max(0.0, self.minutes * 60 - el)
        elif trials:
            left = el / trials * max(0, s["budget"] - trials)
        else:
            left = float("nan")
        width = 20
        total = s["phase_tasks"] or s["tasks"]
        done = min(len(s["done"]), total)
        frac = done / total if total else 1.0
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        best = s["best"].get(s["task"])
        best_txt = f"{best:.3f} ms" if best is not None else "-"
        phase = f"{s['phase']} " if s["phase"] else ""
        task = _short(self.label(s["task"]), 48)
        line = (f"tune [{bar}] {phase}{done}/{total} tasks | trials {trials}/{s['budget']} | "
                f"{task} best {best_txt} | {_fmt_s(el)} elapsed, {_fmt_s(left)} left")
        if self.tty:
            sys.stderr.write("\r" + line[:200].ljust(200) + ("\n" if final else ""))
        elif final or time.monotonic() - self._last_line > 5:
            sys.stderr.write(line + "\n")
            self._last_line = time.monotonic()
        sys.stderr.flush()


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _fmt_s(sec: float) -> str:
    if sec != sec:  # nan
        return "?"
    sec = int(sec)
    return f"{sec // 60}:{sec % 60:02d}"


# --------------------------------------------------------------------------- public API


def _child_target_spec(target: "tvm.target.Target", threads: int) -> dict[str, Any]:
    """The target as the tuning child rebuilds it: the CPU keys only, with the core count
    meta_schedule reads from the target."""
    tspec = dict(target.export())
    tspec["num-cores"] = threads  # meta_schedule reads the core count from the target
    return {k: v for k, v in tspec.items() if k in ("kind", "mtriple", "mcpu", "mattr", "num-cores", "mabi")}


def _summarize_events(summary: "TuningSummary", events: list[dict[str, Any]], attempt: int) -> None:
    """Fold one child run's events (`attempt`: 0 for the first run, then each restart) into
    `summary`."""
    for ev in events:
        if ev.get("ev") == "end":
            summary.tasks_total = ev["tasks_total"]
            summary.tasks_selected = ev["selected"]
            summary.tasks_skipped_done = max(summary.tasks_skipped_done, ev["skipped"]) if attempt == 0 else summary.tasks_skipped_done
            summary.stopped = ev["stopped"]
        elif ev.get("ev") == "start" and attempt == 0:
            summary.tasks_dynamic = ev.get("dynamic", 0)
            summary.tasks_skipped_done = ev["skipped"]
            summary.tasks_total = ev["tasks_total"]
            summary.tasks_selected = ev["selected"]
        elif ev.get("ev") == "batch":
            summary.best_ms[ev["name"]] = ev["best_ms"] if ev.get("best_ms") is not None else summary.best_ms.get(ev["name"])
            summary.failed_trials += ev.get("failed", 0)
        elif ev.get("ev") == "task_done":
            summary.tasks_tuned += 1
        elif ev.get("ev") == "kept":
            summary.kept[ev["name"]] = {k: ev.get(k) for k in ("kept", "default_ms", "tuned_ms")}


def tune(
    mod: "tvm.IRModule",
    target: "tvm.target.Target",
    *,
    db_dir: str,
    trials: int,
    minutes: float | None = None,
    max_trials_per_task: int | None = None,
    progress: bool | Callable[[dict[str, Any]], Any] | None = True,
    threads: int | None = None,
    kernels: str = "anchor",
    trials_per_iter: int | None = None,
    builder_timeout: float = 180.0,
    runner_timeout: float = 60.0,
    max_restarts: int = 3,
    seed: int | None = None,
    task_labels: Mapping[str, str] | None = None,
) -> Any:
    """Tune the PrimFuncs of a Relax module `mod` (after FuseTIR) into the database in `db_dir`.

    `trials`: new measurements this call may make (all tasks together). `max_trials_per_task`:
    the total a workload may have in the database (earlier calls count); by default the budget
    split evenly over the selected tasks (at least one batch each). `minutes`: wall-clock budget.
    `kernels`: "anchor" (conv/matmul kernels only) or "all". `task_labels`: {PrimFunc name: the
    ONNX nodes it computes}, for the progress bar. Returns the JSONDatabase; the summary
    of this call is in `db_dir/graphopt_last_tune.json` and `last_summary(db_dir)`.
    """
    import tvm

    if trials < 0:
        raise ValueError("trials must be >= 0")
    if kernels not in ("anchor", "all"):
        raise ValueError(f"kernels must be 'anchor' or 'all', not {kernels!r}")
    os.makedirs(db_dir, exist_ok=True)
    db_dir = os.path.abspath(db_dir)
    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)
    threads = int(threads or _target_cores(target) or _default_threads())
    tspec = _child_target_spec(target, threads)

    summary = TuningSummary()
    prog = TuningProgress(progress, minutes, task_labels)
    t0 = time.monotonic()
    deadline = None if minutes is None else t0 + minutes * 60.0
    if trials == 0:
        summary.stopped = "trial budget"
        _write_json_atomic(os.path.join(db_dir, _SUMMARY_FILE), summary.as_dict())
        return open_database(db_dir)

    clean_stale_work_dirs()
    with _work_dir() as work:
        mod_path = os.path.join(work, "mod.json")
        with open(mod_path, "w", encoding="utf-8") as f:
            f.write(tvm.ir.save_json(normalize_for_tuning(mod)))
        spec = {
            "mod": mod_path,
            "target": tspec,
            "db_dir": db_dir,
            "trials": int(trials),
            "trials_total": int(trials),
            "max_trials_per_task": max_trials_per_task,
            "kernels": kernels,
            "threads": threads,
            "trials_per_iter": trials_per_iter,
            "builder_timeout": builder_timeout,
            "runner_timeout": runner_timeout,
            "seed": seed,
            "parent_pid": os.getpid(),
        }
        attempt = 0
        new_total = 0
        while True:
            spec["trials"] = int(trials) - new_total
            spec["deadline_s"] = None if deadline is None else max(1.0, deadline - time.monotonic())
            spec_path = os.path.join(work, f"spec{attempt}.json")
            _write_json_atomic(spec_path, spec)
            rc, events = _run_child(spec_path, db_dir, threads, prog, deadline, _unused_intrinsics(target))
            _summarize_events(summary, events, attempt)
            new_total += sum(ev.get("new", 0) for ev in events if ev.get("ev") == "batch")
            if rc == 0:
                break
            if rc == "interrupted":
                summary.stopped = "interrupted"
                break
            if deadline is not None and time.monotonic() >= deadline:
                summary.stopped = "time budget"
                break
            made_progress = any(ev.get("ev") == "batch" for ev in events)
            crashed = isinstance(rc, int) and rc < 0  # killed by a signal (segfault, OOM killer)
            if attempt >= max_restarts or new_total >= trials or not (crashed or made_progress):
                # a deterministic error (rc > 0 before any trial) would only repeat itself
                summary.stopped = "child failed" if new_total < trials else "trial budget"
                summary.error = _log_tail(db_dir)
                break
            attempt += 1
            summary.restarts = attempt
            if prog.enabled and prog.hook is None:
                sys.stderr.write(f"\ntune: tuning process ended with {rc}; resuming from the database "
                                 f"(restart {attempt}/{max_restarts})\n")
    summary.new_trials = new_total
    summary.seconds = time.monotonic() - t0
    summary.best_ms = {k: v for k, v in summary.best_ms.items() if v is not None}
    _write_json_atomic(os.path.join(db_dir, _SUMMARY_FILE), summary.as_dict())
    if summary.stopped == "interrupted":
        raise KeyboardInterrupt
    return open_database(db_dir)


def kept_schedules(db_dir: str) -> dict[str, int]:
    """How many workloads of the database keep their default schedule / a tuned one (from the
    ledger: tuning measures the default schedule of every task it tunes and keeps the faster)."""
    out: dict[str, int] = {}
    for entry in _read_json(os.path.join(db_dir, _LEDGER_FILE), {}).values():
        k = entry.get("kept", "unknown")
        out[k] = out.get(k, 0) + 1
    return out


def last_summary(db_dir: str) -> dict[str, Any]:
    """The summary the last `tune` call on `db_dir` wrote."""
    return _read_json(os.path.join(db_dir, _SUMMARY_FILE), {})


def apply_database(mod: "tvm.IRModule", target: "tvm.target.Target", db_dir: str) -> "tvm.IRModule":
    """Replace every PrimFunc whose workload the database has with its best schedule (marked
    `tirx.is_scheduled`, so `apply_default_schedules` leaves it alone)."""
    import tvm
    from tvm import relax

    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)
    if not os.path.isdir(db_dir):
        return mod
    db = open_database(db_dir)
    with target, db, tvm.transform.PassContext(opt_level=3):
        applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(normalize_for_tuning(mod))
    # where the database's best is the default schedule (tuning did not beat it), leave the
    # kernel to today's default schedules rather than replaying the recorded one
    restore = {}
    for gv, func in applied.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and DEFAULT_MARK in _root_annotations(func):
            restore[gv] = mod[gv.name_hint]
    if restore:
        for gv, func in restore.items():
            applied[gv] = func
    # the replayed schedules' small accumulator buffers on the stack (or their trace's marks off),
    # as the tuning builder lowered them (`stack_tiles.replayed_kernel`)
    from ...machine import machine_model
    from ..schedules import knobs
    from ..stack_tiles import replayed_kernel

    machine, on = machine_model(target), knobs.current().stack_tile
    if on and not knobs.current().stack_tile_replayed:
        return applied
    before = {gv.name_hint: f for gv, f in mod.functions_items()}
    for gv, func in list(applied.functions_items()):
        if (isinstance(func, tvm.tirx.PrimFunc) and gv not in restore and func.attrs is not None
                and int(func.attrs.get("tirx.is_scheduled", 0)) == 1 and not _is_scheduled(before.get(gv.name_hint))):
            applied[gv] = replayed_kernel(func, machine, on)
    return applied


def _is_scheduled(func: Any) -> bool:
    import tvm

    return (isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None
            and int(func.attrs.get("tirx.is_scheduled", 0)) == 1)


def normalize_for_tuning(mod: "tvm.IRModule") -> "tvm.IRModule":
    """Inline the pure copies (a reshape or transpose of a kernel argument: the bias reshaped to
    [1, C, 1, 1], a transposed weight) into their consumers in every unscheduled PrimFunc.
    meta_schedule's design spaces leave such a block outside the anchor's loops and then fail to
    move the epilogue under them ("requires all the producer(s) ... under the target loop": every
    conv task of ResNet-50 failed this way). `tune` and `apply_database` both use it, so the
    workloads they see are the same."""
    import tvm
    from tvm import s_tir, tirx

    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and int(func.attrs.get("tirx.is_scheduled", 0)) == 1:
            continue
        try:
            sch = s_tir.Schedule(func)
            root = sch.get_sblock(func.body.block.name_hint)
        except Exception:  # noqa: BLE001 - no block structure: nothing to do
            continue
        intermediates = {buf.name for buf in func.body.block.alloc_buffers}
        changed = False
        for block in sch.get_child_blocks(root):
            stmt = sch.get(block)
            body = stmt.body
            # a plain copy: one store of one load (0.27 calls it TensorLoad, older TVM BufferLoad)
            if stmt.init is not None or type(body).__name__ != "BufferStore" or \
                    type(body.value).__name__ not in ("TensorLoad", "BufferLoad"):
                continue
            if len(stmt.reads) != 1 or stmt.reads[0].source.name in intermediates:
                continue  # copies of intermediates stay (the schedules handle those)
            try:
                sch.compute_inline(block)
                changed = True
            except Exception:  # noqa: BLE001 - an output block, or not inlinable: keep it
                continue
        if changed:
            updates[gv] = sch.mod["main"]
    if not updates:
        return mod
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in updates.items():
        out[gv] = func
    return out


#: root-block annotation of the default-schedule records tuning commits (see `_measure_default`)
DEFAULT_MARK = "graphopt.default_schedule"
#: rounds of the paired default-vs-tuned re-measurement (each runs both once, alternating)
PAIRED_ROUNDS = 3
#: the runner-up takes the best record's place only when the paired ratio is below this: a
#: difference within the noise of paired rounds on a shared machine leaves the ranking alone
#: (without the margin, two near-equal schedules swapped places at every check)
PAIRED_MARGIN = 0.97


def _root_annotations(func: Any) -> Any:
    try:
        return func.body.block.annotations
    except AttributeError:
        return {}


# --------------------------------------------------------------------------- parent ↔ child


def _target_cores(target: Any) -> int | None:
    try:
        v = target.attrs.get("num-cores")
        return int(v) if v is not None else None
    except Exception:
        return None


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def _run_child(spec_path: str, db_dir: str, threads: int, prog: TuningProgress, deadline: float | None, stub: list[str]):
    """Run one tuning child; returns (exit code or "interrupted", events)."""
    env = dict(os.environ)
    env["TVM_NUM_THREADS"] = str(threads)  # trap 3: runner workers inherit it
    env["GRAPHOPT_TVM_STUB_INTRIN"] = ",".join(stub)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    # the builders' artifacts go inside the work folder, which goes with it even after a kill
    env["TMPDIR"] = os.path.join(os.path.dirname(spec_path), "tmp")
    os.makedirs(env["TMPDIR"], exist_ok=True)
    cmd = [sys.executable, "-c", "from graphopt.targets.tvm.tuning.tuner import _child_main; _child_main()", spec_path]
    events: list[dict[str, Any]] = []
    with open(os.path.join(db_dir, _LOG_FILE), "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True)
        killer = None
        if deadline is not None:
            # hard stop: the child stops itself between batches at the deadline; this is for a
            # child stuck inside one batch
            grace = 120.0
            killer = threading.Timer(max(1.0, deadline - time.monotonic() + grace), _kill_group, (proc,))
            killer.daemon = True
            killer.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                try:
                    ev = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                events.append(ev)
                prog.event(ev)
            rc = proc.wait()
        except KeyboardInterrupt:
            _kill_group(proc)
            proc.wait()
            return "interrupted", events
        finally:
            if killer is not None:
                killer.cancel()
    return rc, events


def _log_tail(db_dir: str) -> str:
    try:
        with open(os.path.join(db_dir, _LOG_FILE), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 2000))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else ""
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its builder/runner workers
    except (ProcessLookupError, PermissionError):
        pass


def _child_main() -> None:
    """Entry point of the tuning child process (see `tune`)."""
    spec_path = sys.argv[-1]
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    # only JSON events go to stdout; TVM's own prints go to the log with stderr
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        _child_tune(spec, real_stdout)
    finally:
        sys.stdout = real_stdout


def _child_tune(spec: dict[str, Any], out: Any) -> None:
    """The tuning child's procedure (see `tune`), step by step in `_ChildTuning.run`."""
    _ChildTuning(spec, out).run()


def _trial_plan(spec: dict[str, Any], n_sel: int, deadline: float | None) -> tuple[int, list[int], int]:
    """(trials per task, the rounds' caps, trials per batch) for `n_sel` selected tasks."""
    per_iter = int(spec.get("trials_per_iter") or 0)
    per_task = spec.get("max_trials_per_task")
    auto_cap = per_task is None
    if per_task is None:
        # the split of the call's whole budget (not of what a restarted child has left); a task
        # gets at least one small batch
        per_task = max(4, math.ceil(int(spec["trials_total"]) / max(n_sel, 1))) if n_sel else 0
    per_task = int(per_task)
    # with a time budget and no per-task cap, tune in rounds (every task to 16 trials, then 32,
    # 64, ...; biggest tasks first in each round) so the time is spread over the tasks instead of
    # the first ones taking it all
    caps = [per_task]
    if auto_cap and deadline is not None:
        caps = [c for c in (16, 32, 64, 128, 256, 512, 1024) if c < per_task] + [per_task]
    if not per_iter:
        per_iter = max(1, min(32, per_task))
    return per_task, caps, per_iter


class _ChildTuning:
    """One run of the tuning child: select the tasks, measure each one's default schedule and its
    variants, search in rounds under the trial and time budgets, keep whichever is fastest per
    task. Progress goes to `out` as one JSON event per line; the ledger in the database folder
    counts the trials per task so a restarted child resumes."""

    def __init__(self, spec: dict[str, Any], out: Any) -> None:
        self.spec = spec
        self.out = out
        self.t_start = time.monotonic()
        self.deadline = None if spec.get("deadline_s") is None else self.t_start + float(spec["deadline_s"])
        self.db_dir = spec["db_dir"]
        self.threads = int(spec["threads"])
        self.ledger_path = os.path.join(self.db_dir, _LEDGER_FILE)
        self.ledger: dict[str, Any] = {}
        self.total_new = 0
        self.state: dict[str, Any] = {"name": "", "key": "", "best": None, "task_trials": 0}

    def emit(self, ev: dict[str, Any]) -> None:
        try:
            self.out.write(json.dumps(ev) + "\n")
            self.out.flush()
        except BrokenPipeError:  # the parent is gone: nobody wants the rest
            _kill_own_group()

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def run(self) -> None:
        _die_with_parent(int(self.spec.get("parent_pid") or os.getppid()))
        cpu_only_intrinsics()
        import tvm

        spec = self.spec
        self.target = tvm.target.Target(spec["target"])
        with open(spec["mod"], encoding="utf-8") as f:
            mod = tvm.ir.load_json(f.read())
        from tvm.s_tir import meta_schedule as ms

        extracted = ms.relax_integration.extract_tasks(mod, self.target)
        # the ledger is read only once this child owns the database: a tuner still running on it
        # (another compile) would otherwise tune the same tasks and overwrite its counts
        _lock_database(self.db_dir, lambda holder: self.emit({"ev": "waiting", "holder": holder}))
        repair_database(self.db_dir)
        self.ledger = _read_json(self.ledger_path, {})

        tasks_info, dynamic = self._select_tasks(extracted)
        n_sel = len(tasks_info)
        budget_new = int(spec["trials"])
        per_task, caps, per_iter = _trial_plan(spec, n_sel, self.deadline)
        pending = []
        skipped = 0
        for d in tasks_info:
            done = int(self.ledger.get(d["key"], {}).get("trials", 0))
            d["done"] = done
            if done >= per_task:
                skipped += 1
            else:
                pending.append(d)
        self.emit({"ev": "start", "tasks_total": len(extracted), "selected": n_sel, "skipped": skipped, "dynamic": dynamic,
                   "budget": min(budget_new, sum(per_task - d["done"] for d in pending)), "per_task": per_task})
        end = {"ev": "end", "stopped": "done", "tasks_total": len(extracted), "selected": n_sel, "skipped": skipped}
        ledger = self.ledger
        if not pending and all("kept" in ledger.get(d["key"], {}) for d in tasks_info if ledger.get(d["key"], {}).get("trials")):
            self.emit(end)
            return

        self._open_measurement()
        self._default_and_variants(pending)
        stopped = self._search(pending, caps, per_task, per_iter, budget_new)
        # tasks tuned by an earlier call (or an older graphopt) that have no default measured yet
        for d in tasks_info:
            entry = self.ledger.get(d["key"], {})
            if entry.get("trials") and "kept" not in entry and not self.out_of_time():
                self.keep_default_if_faster(d)
        self.emit({**end, "stopped": stopped})

    def _select_tasks(self, extracted: Any) -> tuple[list[dict[str, Any]], int]:
        """The tasks to tune, biggest (FLOPs x uses) first, and how many have symbolic shapes
        (meta_schedule tunes static shapes only: its design spaces fail on them)."""
        import tvm
        import tvm_ffi

        from graphopt.targets.tvm.schedules import is_tunable_kernel

        tasks_info = []
        dynamic = 0
        for t in extracted:
            func = t.dispatched[0]["main"]
            if self.spec["kernels"] == "anchor" and not is_tunable_kernel(func):
                continue
            if not _static_shapes(func):
                dynamic += 1
                continue
            key = str(tvm_ffi.structural_hash(t.dispatched[0]))
            try:
                flops = float(tvm.s_tir.analysis.estimate_tir_flops(t.dispatched[0]))
            except Exception:
                flops = 0.0
            tasks_info.append({"task": t, "key": key, "name": t.task_name, "weight": int(t.weight), "flops": flops})
        tasks_info.sort(key=lambda d: -d["flops"] * max(d["weight"], 1))
        return tasks_info, dynamic

    def _open_measurement(self) -> None:
        """The database, the builder and runner (isolated worker processes), the cost model and
        the measure callbacks (the ledger's `_Tracker` last)."""
        from tvm.s_tir import meta_schedule as ms

        spec, threads = self.spec, self.threads
        self.database = ms.database.JSONDatabase(work_dir=self.db_dir, module_equality="structural")
        self.builder = ms.builder.LocalBuilder(
            max_workers=threads, timeout_sec=float(spec["builder_timeout"]),
            initializer=_worker_init, f_build=_build_with_hooks,
        )
        self.runner = ms.runner.LocalRunner(
            timeout_sec=float(spec["runner_timeout"]), initializer=_worker_init,
            evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50,
                                                       enable_cpu_cache_flush=False),
        )
        self.cost_model = ms.cost_model.XGBModel(num_tuning_cores=threads)
        self.callbacks = [ms.measure_callback.AddToDatabase(), ms.measure_callback.RemoveBuildArtifact(),
                          ms.measure_callback.UpdateCostModel(), _tracker(self)]

    def count_batch(self, task_scheduler: Any, task_id: int, measure_candidates: Any, builder_results: Any,
                    runner_results: Any) -> None:
        """After each measured batch: the trials into the ledger, a progress event, the time
        budget enforced (by terminating the task)."""
        state = self.state
        n = len(measure_candidates)
        failed = 0
        for br, rr in zip(builder_results, runner_results):
            if br.error_msg is not None or rr.error_msg is not None or not rr.run_secs:
                failed += 1
                continue
            secs = [float(x) for x in rr.run_secs]
            ms_ = 1e3 * sum(secs) / len(secs)
            if state["best"] is None or ms_ < state["best"]:
                state["best"] = ms_
        self.total_new += n
        state["task_trials"] += n
        entry = self.ledger.setdefault(state["key"], {"name": state["name"], "trials": 0})
        entry["trials"] = int(entry.get("trials", 0)) + n
        entry["name"] = state["name"]
        if state["best"] is not None:
            entry["best_ms"] = min(entry.get("best_ms", state["best"]), state["best"])
        _write_json_atomic(self.ledger_path, self.ledger)
        self.emit({"ev": "batch", "name": state["name"], "new": n, "failed": failed, "total_new": self.total_new,
                   "task_trials": state["task_trials"], "best_ms": state["best"]})
        kill_after = int(os.environ.get("GRAPHOPT_TUNE_TEST_KILL_AFTER", "0") or 0)
        kill_marker = os.path.join(self.db_dir, ".test-killed")
        if kill_after and self.total_new >= kill_after and not os.path.exists(kill_marker):
            open(kill_marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: an interruption mid-tuning
        if self.out_of_time():
            state["timed_out"] = True
            task_scheduler.terminate_task(task_id)

    def keep_default_if_faster(self, d: dict[str, Any]) -> None:
        """Tuning never loses: the task's default schedule is measured with the same builder and
        runner and committed as a record too, so the database's best (what apply_database uses)
        is the faster of the default and the tuned schedules; the ledger says which."""
        target, database, builder, runner = self.target, self.database, self.builder, self.runner
        entry = self.ledger.setdefault(d["key"], {"name": d["name"], "trials": 0})
        if entry.get("default_ms") is None and not entry.get("default_error"):
            ms_, rule, err = _measure_default(d["task"].dispatched[0], target, database, builder, runner)
            if ms_ is None:
                entry["default_error"] = err or "no default schedule"
            else:
                entry["default_ms"], entry["default_rule"] = ms_, rule
        if "variants" not in entry and not self.out_of_time():
            n_var, v_ms, label = _measure_variants(d["task"].dispatched[0], target, database, builder, runner, self.deadline)
            entry["variants"] = n_var
            if v_ms is not None:
                entry["variant_ms"], entry["variant"] = v_ms, label
        tuned = entry.get("best_ms")
        variant = entry.get("variant_ms")
        default = entry.get("default_ms")
        best_other = min((t for t in (tuned, variant) if t is not None), default=None)
        if default is not None and (best_other is None or default <= best_other):
            entry["kept"] = "default"
        elif best_other is None:
            entry["kept"] = "none"
        else:
            entry["kept"] = "variant" if variant is not None and (tuned is None or variant <= tuned) else "tuned"
            tuned = best_other
        if default is not None and best_other is not None and entry.get("paired_for") != [default, best_other]:
            # measured at different moments: decide default vs tuned by a back-to-back comparison
            paired = _paired_check(d["task"].dispatched[0], target, database, builder, runner)
            if paired is not None:
                entry["paired"] = paired
                entry["paired_for"] = [default, best_other]
        paired = entry.get("paired")
        if paired is not None and entry.get("paired_for") == [default, best_other]:
            if paired["winner"] == "default":
                entry["kept"] = "default"
            elif entry["kept"] == "default":
                entry["kept"] = "variant" if variant is not None and (tuned is None or variant <= tuned) else "tuned"
        _write_json_atomic(self.ledger_path, self.ledger)
        self.emit({"ev": "kept", "name": d["name"], "kept": entry["kept"], "default_ms": default, "tuned_ms": tuned})

    def _default_and_variants(self, pending: list[dict[str, Any]]) -> None:
        """First the default schedule and its rule's variants of every task (biggest first): a
        few measured tile choices per kernel are where a short budget pays most."""
        todo = [d for d in pending if "variants" not in self.ledger.get(d["key"], {})]
        if todo:
            self.emit({"ev": "round", "cap": 0, "tasks": len(todo)})
        for d in todo:
            if self.out_of_time():
                break
            print(f"[{time.monotonic() - self.t_start:7.1f}s] task {d['name']}: default schedule and its variants", file=sys.stderr,
                  flush=True)
            self.emit({"ev": "task", "name": d["name"], "want": 0, "done_before": d["done"]})
            self.keep_default_if_faster(d)
            e = self.ledger.get(d["key"], {})
            best = min((e[k] for k in ("default_ms", "variant_ms", "best_ms") if e.get(k) is not None), default=None)
            # (a "batch" of no trials: the progress bar and the restart logic see the phase advance)
            self.emit({"ev": "batch", "name": d["name"], "new": 0, "failed": 0, "total_new": self.total_new, "task_trials": 0,
                       "best_ms": best})
            self.emit({"ev": "variants_done", "name": d["name"], "best_ms": best, "variants": e.get("variants", 0)})

    def _search(self, pending: list[dict[str, Any]], caps: list[int], per_task: int, per_iter: int, budget_new: int) -> str:
        """Then the search, in rounds of rising caps (biggest tasks first in each): why it stopped."""
        state = self.state
        rounds = [(cap, d) for cap in caps for d in pending]
        last_cap = None
        for cap, d in rounds:
            if d["done"] >= cap:
                continue
            if cap != last_cap:  # (the progress bar counts each round's tasks against its own total)
                self.emit({"ev": "round", "cap": cap, "tasks": sum(1 for c, x in rounds if c == cap and x["done"] < cap)})
            last_cap = cap
            print(f"[{time.monotonic() - self.t_start:7.1f}s] task {d['name']} (to {cap} trials)", file=sys.stderr, flush=True)
            if self.out_of_time():
                return "time budget"
            if self.total_new >= budget_new:
                return "trial budget"
            want = min(cap - d["done"], budget_new - self.total_new)
            state.update(name=d["name"], key=d["key"], best=None, task_trials=0)
            state["best"] = self.ledger.get(d["key"], {}).get("best_ms")
            self.emit({"ev": "task", "name": d["name"], "want": want, "done_before": d["done"]})
            error = self._tune_task(d, cap, want, per_iter)
            if error is not None:
                if state.get("timed_out"):
                    self.emit({"ev": "task_done", "name": d["name"], "best_ms": state["best"], "partial": True})
                    return "time budget"
                self.emit({"ev": "task_error", "name": d["name"], "error": error})
                # count it as tuned so a resume does not retry it forever
                entry = self.ledger.setdefault(d["key"], {"name": d["name"], "trials": 0})
                entry["trials"] = max(int(entry.get("trials", 0)), per_task)
                entry["error"] = error
                _write_json_atomic(self.ledger_path, self.ledger)
            d["done"] = int(self.ledger.get(d["key"], {}).get("trials", d["done"] + state["task_trials"]))
            self.keep_default_if_faster(d)  # also for a task cut by the time budget: its records apply
            if state.get("timed_out"):
                self.emit({"ev": "task_done", "name": d["name"], "best_ms": state["best"], "partial": True})
                return "time budget"
            self.emit({"ev": "task_done", "name": d["name"], "best_ms": state["best"]})
        return "done"

    def _tune_task(self, d: dict[str, Any], cap: int, want: int, per_iter: int) -> str | None:
        """meta_schedule's search on one task for `want` trials; the error's last line if it
        failed (one task's failure, a schedule-space bug, must not stop the rest)."""
        from tvm.s_tir import meta_schedule as ms

        spec = self.spec
        ctx = ms.TuneContext(
            mod=d["task"].dispatched[0], target=self.target, space_generator="post-order-apply",
            # a smaller population for small budgets: candidate generation costs 10+ s per batch
            # at the default 512 on this 2-core machine
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=512 if cap >= 128 else 128, init_min_unmeasured=16 if cap < 128 else 50), task_name=d["name"],
            num_threads=self.threads,
            rand_state=int(spec["seed"]) if spec.get("seed") is not None else -1,
            logger=None,
        ).clone()
        try:
            ms.tune.tune_tasks(
                tasks=[ctx], task_weights=[float(d["weight"])], work_dir=self.db_dir,
                max_trials_global=want, max_trials_per_task=want, num_trials_per_iter=min(per_iter, want),
                builder=self.builder, runner=self.runner, database=self.database, cost_model=self.cost_model,
                measure_callbacks=self.callbacks, task_scheduler="round-robin",
            )
        except Exception as exc:
            msg = str(exc).strip().splitlines()
            return msg[-1][:300] if msg else type(exc).__name__
        return None


def _tracker(run: _ChildTuning) -> Any:
    """The measure callback that hands each batch to `run.count_batch` (a meta_schedule
    PyMeasureCallback, defined here because tvm is imported lazily)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class _Tracker(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            run.count_batch(task_scheduler, task_id, measure_candidates, builder_results, runner_results)

    return _Tracker()


def _static_shapes(func: Any) -> bool:
    """True when every buffer parameter of `func` has a constant shape."""
    from tvm import tirx

    for p in func.params:
        shape = getattr(p, "shape", None)
        if shape is not None and not all(isinstance(d, tirx.IntImm) for d in shape):
            return False
    return True


def _measure_default(task_mod: Any, target: Any, database: Any, builder: Any, runner: Any) -> tuple[float | None, str | None, str]:
    """Build and run the default schedule (graphopt.targets.tvm.schedules.base) of one workload with
    the tuning builder/runner and commit it to `database` as a tuning record (its trace replays
    the schedule). Returns (mean ms or None, rule, error)."""
    import shutil

    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.tvm.schedules import default_schedule

    try:
        sch, rule, _notes = default_schedule(task_mod["main"], target)
    except Exception as exc:  # noqa: BLE001 - a default-schedule bug only loses the comparison
        return None, None, str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
    if sch is None:
        return None, None, "no default schedule rule applies"
    try:
        # marked, so apply_database can tell a default record from a tuned one
        sch.annotate(sch.get_sblock(task_mod["main"].body.block.name_hint), DEFAULT_MARK, str(rule))
        args_info = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
        br = builder.build([ms.builder.BuilderInput(sch.mod, target)])[0]
        if br.error_msg is not None:
            return None, rule, "build: " + br.error_msg.strip().splitlines()[-1][:200]
        try:
            dev = "cpu" if str(target.kind.name) == "llvm" else str(target.kind.name)
            rr = runner.run([ms.runner.RunnerInput(br.artifact_path, dev, args_info)])[0].result()
        finally:
            shutil.rmtree(os.path.dirname(br.artifact_path), ignore_errors=True)
        if rr.error_msg is not None or not rr.run_secs:
            return None, rule, "run: " + (rr.error_msg or "no time").strip().splitlines()[-1][:200]
        secs = [float(x) for x in rr.run_secs]
        workload = database.commit_workload(task_mod)
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, run_secs=secs, target=target, args_info=args_info))
        return 1e3 * sum(secs) / len(secs), rule, ""
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).strip().splitlines()
        return None, rule, msg[-1][:200] if msg else type(exc).__name__


def _paired_check(task_mod: Any, target: Any, database: Any, builder: Any, runner: Any,
                  rounds: int = PAIRED_ROUNDS) -> dict[str, Any] | None:
    """Re-measure the database's best record of one workload against its best record of the
    other kind (default schedule vs tuned/variant), alternating in one runner call, and make the
    database rank them as that paired comparison says.

    Why: the default schedule is measured once, the tuned best is the minimum over many trials
    taken at other moments; on a shared machine the load drifts between them (BERT-base, load
    4-6 on 2 cores: k15's default measured 42 ms, the same kernel runs 7 ms quiet; 7 of 9 tasks
    kept a tuned schedule and the tuned model ran 1.42x onnxruntime against 0.92x untuned).
    When the paired median ratio says the runner-up is faster (by PAIRED_MARGIN), it is committed again with its
    time put on the best record's scale (best record's time x the paired ratio), so it becomes
    the best. Returns {"ratio": runner-up / best (paired median), "winner": "default" |
    "tuned", "swapped": bool}, or None when there is nothing to compare or a build/run failed."""
    import shutil
    import statistics

    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.tvm.schedules import default_schedule

    workload = database.commit_workload(task_mod)
    recs = list(database.get_top_k(workload, 64))
    if not recs:
        return None

    def is_default(rec: Any) -> bool:
        return DEFAULT_MARK in str(rec.trace)

    best = recs[0]
    other = next((r for r in recs[1:] if is_default(r) != is_default(best)), None)
    if other is None:
        return None

    def schedule_of(rec: Any) -> Any:
        if is_default(rec):  # today's default schedule (what apply_database gives for a default record)
            sch, _rule, _ = default_schedule(task_mod["main"], target)
            if sch is not None:
                sch.annotate(sch.get_sblock(task_mod["main"].body.block.name_hint), DEFAULT_MARK, "paired")
            return sch
        sch = s_tir.Schedule(task_mod)
        rec.trace.apply_to_schedule(sch, remove_postproc=False)
        return sch

    try:
        schs = [schedule_of(best), schedule_of(other)]
        if any(x is None for x in schs):
            return None
        infos = [ms.arg_info.ArgInfo.from_entry_func(x.mod, remove_preproc=True) for x in schs]
        brs = builder.build([ms.builder.BuilderInput(x.mod, target) for x in schs])
    except Exception:  # noqa: BLE001 - the check is a refinement; without it the ranking stays
        return None
    try:
        if any(br.error_msg is not None for br in brs):
            return None
        dev = "cpu" if str(target.kind.name) == "llvm" else str(target.kind.name)
        inputs = [ms.runner.RunnerInput(brs[i % 2].artifact_path, dev, infos[i % 2]) for i in range(2 * rounds)]
        futures = runner.run(inputs)
        results = [f.result() for f in futures]
    finally:
        for br in brs:
            if br.artifact_path:
                shutil.rmtree(os.path.dirname(br.artifact_path), ignore_errors=True)
    if any(r.error_msg is not None or not r.run_secs for r in results):
        return None
    t = [sum(float(x) for x in r.run_secs) / len(r.run_secs) for r in results]
    ratio = statistics.median(t[2 * i + 1] / t[2 * i] for i in range(rounds))  # runner-up / best
    swapped = ratio < PAIRED_MARGIN
    if swapped:
        best_secs = [float(x) for x in best.run_secs]
        scaled = [x * ratio for x in best_secs]
        rec = other if not is_default(other) else None
        trace = rec.trace if rec is not None else schs[1].trace
        database.commit_tuning_record(ms.database.TuningRecord(trace, workload, run_secs=scaled, target=target,
                                                               args_info=infos[1]))
    winner_default = is_default(other) if swapped else is_default(best)
    return {"ratio": ratio, "winner": "default" if winner_default else "tuned", "swapped": swapped}


def _measure_variants(task_mod: Any, target: Any, database: Any, builder: Any, runner: Any,
                      deadline: float | None) -> tuple[int, float | None, str | None]:
    """Build and run the variants of one workload's default schedule (`variants`: e.g.
    the blocked conv rule's other micro-kernel tiles), committing each as a
    tuning record (unmarked: a faster one replays as a tuned schedule). Returns (variants
    measured, best mean ms or None, its label)."""
    import shutil

    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.tvm.schedules import vector_lanes

    try:
        from graphopt.targets.tvm.tuning.variants import variants

        found = variants(task_mod["main"], target, vector_lanes(target))
    except Exception:  # noqa: BLE001 - a variant bug only loses the variants
        found = []
    if not found:
        return 0, None, None
    best: tuple[float, str] | None = None
    n = 0
    workload = database.commit_workload(task_mod)
    for i in range(0, len(found), 4):  # in small batches, so the time budget is kept
        if deadline is not None and time.monotonic() >= deadline:
            break
        batch = found[i : i + 4]
        try:
            infos = [ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True) for _, sch in batch]
            brs = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in batch])
        except Exception:  # noqa: BLE001
            continue
        dev = "cpu" if str(target.kind.name) == "llvm" else str(target.kind.name)
        for (label, sch), info, br in zip(batch, infos, brs):
            if br.error_msg is not None:
                continue
            try:
                rr = runner.run([ms.runner.RunnerInput(br.artifact_path, dev, info)])[0].result()
            finally:
                shutil.rmtree(os.path.dirname(br.artifact_path), ignore_errors=True)
            if rr.error_msg is not None or not rr.run_secs:
                continue
            secs = [float(x) for x in rr.run_secs]
            n += 1
            database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, run_secs=secs, target=target, args_info=info))
            t = 1e3 * sum(secs) / len(secs)
            if best is None or t < best[0]:
                best = (t, label)
    return n, (best[0] if best else None), (best[1] if best else None)


def _build_with_hooks(mod: Any, target: Any, params: Any) -> Any:
    """The builder's build function (runs in a builder worker): the kernel lowered as the cpu
    build lowers it (`build.build_kernel`: loop marks, the stack tiles' TIR pipeline for the
    target's machine model), with a test hook that crashes the worker the first N times (GRAPHOPT_TUNE_TEST_CRASH_BUILDS)."""
    n = int(os.environ.get("GRAPHOPT_TUNE_TEST_CRASH_BUILDS", "0") or 0)
    if n:
        counter = os.environ.get("GRAPHOPT_TUNE_TEST_CRASH_FILE", "")
        if counter:
            with open(counter, "a+", encoding="utf-8") as f:
                f.seek(0)
                crashed = len(f.read())
                if crashed < n:
                    f.write("x")
                    f.flush()
                    os.kill(os.getpid(), signal.SIGSEGV)
    cpu_only_intrinsics()
    import tvm
    import tvm.s_tir.tensor_intrin  # noqa: F401 - (as meta_schedule's default build does)

    from ...machine import machine_model
    from ..build import build_kernel
    from ..stack_tiles import replayed_kernel

    func = mod["main"]
    root = getattr(func.body, "block", None)  # (a default schedule's root block carries DEFAULT_MARK)
    if root is None or DEFAULT_MARK not in root.annotations:
        # a variant or a meta_schedule candidate: the build replays it from the database, marked
        # (apply_database); the default schedules are rebuilt from today's rules with their own marks
        funcs = {gv.name_hint: f for gv, f in mod.functions_items()}
        funcs["main"] = replayed_kernel(func, machine_model(target), True)
        mod = tvm.IRModule(funcs, attrs=mod.attrs)
    return build_kernel(mod, target)

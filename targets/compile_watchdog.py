"""Time and memory bounds on a compile, so that no input can hang the compiler or exhaust memory.

    activity = Activity()
    with Watchdog(seconds=1200, memory=16 << 30, activity=activity):
        activity.what = "lowering node 'conv1' (Conv)"   # the lowering updates it as it goes
        ...

A thread polls the elapsed time and the process's resident memory. Past a bound it interrupts
the main thread with `CompileLimitError` (a GraphoptError: exit 2), naming what `activity` says
the compile was doing; Python code stuck in a loop (TVM's frontend iterating a Var) stops at
once. Native code (LLVM, a TVM pass) does not see the interrupt: if the main thread has not
stopped `grace` seconds later, the process writes that one line on stderr and exits with code 2
(a clean exit is impossible from inside native code; the compile has written nothing into the
user's output folder at that point: artifacts are staged elsewhere).
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType, TracebackType

from graphopt.errors import GraphoptError

#: a compile (lowering, default schedules, LLVM build; not tuning) that runs longer is stopped
DEFAULT_SECONDS = 1200.0
#: resident memory, as a share of the machine's physical memory, past which a compile is stopped
DEFAULT_MEMORY_SHARE = 0.8


class CompileLimitError(GraphoptError):
    """The compile ran past its time or memory bound."""


@dataclass
class Activity:
    """What the compile is doing now, in words a user can act on (the node being lowered)."""

    what: str = "starting"


def physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError):  # not POSIX: no memory bound
        return 0


def resident_memory() -> int:
    """This process's resident bytes (0 where /proc cannot say)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0


def limits_from(extra: dict, environ: dict | None = None) -> tuple[float, int]:
    """(seconds, bytes) for a compile: CompileOptions.extra's `compile_seconds` /
    `compile_memory_gb`, else $GRAPHOPT_COMPILE_SECONDS / $GRAPHOPT_COMPILE_MEMORY_GB, else the
    defaults (0 turns a bound off)."""
    env = os.environ if environ is None else environ

    def pick(key: str, var: str) -> float | None:
        v = extra.get(key, env.get(var))
        if v in (None, ""):
            return None
        try:
            return float(v)
        except ValueError:
            raise GraphoptError(f"{key if key in extra else '$' + var}={v!r} is not a number") from None

    seconds = pick("compile_seconds", "GRAPHOPT_COMPILE_SECONDS")
    gb = pick("compile_memory_gb", "GRAPHOPT_COMPILE_MEMORY_GB")
    memory = int(gb * (1 << 30)) if gb is not None else int(DEFAULT_MEMORY_SHARE * physical_memory())
    return (DEFAULT_SECONDS if seconds is None else seconds), memory


class Watchdog:
    """A context manager bounding the time and resident memory of the code inside it."""

    def __init__(self, seconds: float, memory: int, activity: Activity, grace: float = 20.0, poll: float = 0.2,
                 hard_exit: bool = False) -> None:
        self.seconds, self.memory, self.activity = seconds, memory, activity
        # the process-ending way out of native code: only for the CLI (graphopt-compile owns its
        # process; a build pipeline that embeds graphopt.compile must never be killed by it)
        self.hard_exit = hard_exit
        self.grace, self.poll = grace, poll
        self.tripped: str | None = None  # the error message once a bound is passed
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_handler: object = None
        self._signum = getattr(signal, "SIGUSR2", None)

    def message(self, why: str) -> str:
        return f"compile stopped while {self.activity.what}: {why}"

    def _check(self, started: float) -> str | None:
        elapsed = time.monotonic() - started
        if self.seconds and elapsed > self.seconds:
            return f"it ran past the {self.seconds:.0f} s time limit (GRAPHOPT_COMPILE_SECONDS)"
        if self.memory:
            rss = resident_memory()
            if rss > self.memory:
                return (f"it held {rss / (1 << 30):.1f} GiB, past the {self.memory / (1 << 30):.1f} GiB memory limit "
                        "(GRAPHOPT_COMPILE_MEMORY_GB)")
        return None

    def _watch(self, soft: bool) -> None:
        started = time.monotonic()
        while not self._done.wait(self.poll):
            why = self._check(started)
            if why is None:
                continue
            self.tripped = self.message(why)
            if soft:
                _thread.interrupt_main(self._signum)
            if self._done.wait(self.grace) or not self.hard_exit:
                return
            # still inside native code: the only way out
            sys.stderr.write(f"graphopt-compile: error: {self.tripped}\n")
            sys.stderr.flush()
            os._exit(2)

    def _raise(self, signum: int, frame: FrameType | None) -> None:
        if self.tripped is not None:
            raise CompileLimitError(self.tripped)

    def __enter__(self) -> Watchdog:
        if not (self.seconds or self.memory):
            return self
        soft = self._signum is not None and threading.current_thread() is threading.main_thread()
        if soft:
            self._old_handler = signal.signal(self._signum, self._raise)
        self._thread = threading.Thread(target=self._watch, args=(soft,), daemon=True,
                                        name="graphopt-compile-watchdog")
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self._old_handler is not None:
            signal.signal(self._signum, self._old_handler)
        if exc is not None and self.tripped is not None and not isinstance(exc, CompileLimitError):
            # the interrupt surfaced inside code that wrapped it (a converter's except clause)
            raise CompileLimitError(self.tripped) from None

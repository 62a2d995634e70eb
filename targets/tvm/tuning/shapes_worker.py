"""The isolated timing worker of `--tune-shapes` (`shapes.tune_shapes`): one child process per
kernel times that kernel's built candidates at every size, so a candidate that crashes or hangs
when run takes down the worker, never the compile.

Protocol. The parent writes a job file (JSON) and runs
`python -m graphopt.targets.tvm.tuning.shapes_worker JOB`:

    {"threads": 2, "pool": "balanced", "rounds": 3, "min_repeat_ms": 15, "seconds": 40.0 | null,
     "candidates": [{"label": "default", "lib": "/tmp/.../c0.so",
                     "sizes": [[{"shape": [1, 16, 40, 16], "dtype": "float32"}, {"int": 40}, ...], ...]}, ...]}

(a candidate's arguments at each size: a tensor's shape and dtype, or a scalar's value). The
worker prints one JSON line before it runs a candidate (`{"running": LABEL}`) and, at the end,
`{"best": {LABEL: [ms per size]}, "cut": bool}` (per size, the best over the rounds of the
interleaved candidates; a candidate whose run raises is dropped; `seconds` bounds the rounds
after the first). The parent reads the last `running` line to name a candidate that crashed.

Test hook: GRAPHOPT_TUNE_SHAPES_TEST_CRASH=LABEL makes the worker crash (SIGSEGV) when it is
about to run candidate LABEL (`first-variant`: the first candidate after the default), once
per job folder (a marker file beside the job), so the parent's retry runs clean.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Any

__all__ = ["run_job", "main", "TEST_CRASH_ENV"]

#: the test hook's environment variable (see the module docstring)
TEST_CRASH_ENV = "GRAPHOPT_TUNE_SHAPES_TEST_CRASH"


def _arguments(specs: list[dict[str, Any]], rng: Any) -> list[Any]:
    import numpy as np
    import tvm

    dev = tvm.cpu()
    out: list[Any] = []
    for s in specs:
        if "int" in s:
            out.append(int(s["int"]))
            continue
        dims, dtype = [int(d) for d in s["shape"]], str(s["dtype"])
        if dtype.startswith("float"):
            a = rng.standard_normal(dims).astype(dtype)
        elif dtype.startswith(("int", "uint")):
            a = rng.integers(0, 8, dims).astype(dtype)
        else:
            a = np.zeros(dims, dtype=dtype)
        out.append(tvm.runtime.tensor(a, dev))
    return out


def run_job(job: dict[str, Any], say: Any, crash_marker: str | None = None) -> dict[str, Any]:
    """Time the job's candidates (see the module docstring); `say(dict)` reports progress;
    `crash_marker`: the test hook's once-only marker file."""
    import numpy as np
    import tvm

    from graphopt.runtime import apply_pool, pool_settings

    apply_pool(pool_settings(str(job.get("pool") or "balanced"), int(job.get("threads") or 1)))
    crash = os.environ.get(TEST_CRASH_ENV)
    if crash and crash_marker is not None and os.path.exists(crash_marker):
        crash = None
    rng = np.random.default_rng(0)
    seconds = job.get("seconds")
    deadline = None if seconds is None else time.monotonic() + float(seconds)
    rounds = int(job.get("rounds") or 1)
    min_ms = int(job.get("min_repeat_ms") or 1)
    runs: dict[str, list[tuple[Any, list[Any]]]] = {}
    for c in job["candidates"]:
        lib = tvm.runtime.load_module(c["lib"])
        f = lib.time_evaluator("main", tvm.cpu(), number=1, repeat=1, min_repeat_ms=min_ms)
        runs[c["label"]] = [(f, _arguments(args, rng)) for args in c["sizes"]]
    n = max((len(v) for v in runs.values()), default=0)
    best: dict[str, list[float]] = {k: [math.inf] * n for k in runs}
    cut = False
    if crash == "first-variant":
        crash = next((c["label"] for c in job["candidates"] if c["label"] != "default"), None)
    for r in range(rounds):
        if r and deadline is not None and time.monotonic() >= deadline:
            cut = True
            break
        for label, per_size in list(runs.items()):
            say({"running": label})
            if crash and crash == label:
                if crash_marker is not None:
                    open(crash_marker, "w").close()
                os.kill(os.getpid(), signal.SIGSEGV)
            for i, (f, args) in enumerate(per_size):
                try:
                    t = 1e3 * float(f(*args).mean)
                except Exception:  # noqa: BLE001 - a candidate that fails to run is dropped
                    runs.pop(label, None)
                    best.pop(label, None)
                    break
                best[label][i] = min(best[label][i], t)
    return {"best": best, "cut": cut}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with open(args[0], encoding="utf-8") as f:
        job = json.load(f)
    out = sys.stdout
    sys.stdout = sys.stderr  # (only the protocol's JSON lines go to stdout)

    def say(ev: dict[str, Any]) -> None:
        out.write(json.dumps(ev) + "\n")
        out.flush()

    say(run_job(job, say, os.path.join(os.path.dirname(os.path.abspath(args[0])), ".test-crashed")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

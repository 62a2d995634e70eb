"""ONNX backend conformance of the cpu target (compiled mode): pass count and failures by reason.

    .venv/bin/python tools/tvm_conformance.py [--jobs 2] [--filter REGEX] [--limit N]
                                              [--json out.json] [--timeout 120] [--memory-gb 8]

Runs every case of `onnx.backend.test.BackendTest` that plain onnxruntime passes (all "_cpu"
cases minus tests/data/ort_backend_exclusions.txt) through
`graphopt.targets.tvm.backend.CpuBackend`: graphopt.compile(model, "cpu", "-O2") → exported
shared library → graphopt.runtime. Cases run in worker processes (`--jobs`), each case
isolated: a worker that crashes (a segfault in TVM), or that the parent kills for running past
--timeout or holding more than --memory-gb, marks that case "crash"/"timeout"/"memory" and a
fresh worker takes the rest.

Prints the pass count as a share of the cases onnxruntime passes, then the failures grouped
by reason (the first line of the error, with node names and numbers masked), largest group
first. `--json` writes every case's outcome.

Two modes. Strict (default, the headline figure): the model is compiled once, before any input
is seen. Inputs that decide shapes or control flow are specialised when the IR knows them as
constants; when they are fed at run time the compiled artifact handles them itself
(targets/tvm/dynamic.py): Reduce* axes, CumSum axes and If conditions select among branches
compiled ahead of time, Loop runs as a recursive function, and Reshape/Expand/Pad/Resize/
OneHot/TopK/Split/... shape inputs become symbolic dims of kernels compiled once. `--specialize`:
the backend compiles at the first run with the small inputs that decide shapes or control flow
bound as constants (integers of at most 64 elements, Resize scales/roi, OneHot depth, If/Loop
conditions, Dropout ratio/training mode, NonMaxSuppression thresholds), recompiling when they
change, like a JIT with a guard; every pass still runs the compiled library, and the artifact's
manifest lists the bound values under "specialized". Cases where nothing is bindable compile
identically in both modes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXCLUSIONS = os.path.join(ROOT, "tests", "data", "ort_backend_exclusions.txt")


def _exclusions() -> set[str]:
    with open(EXCLUSIONS, encoding="utf-8") as f:
        return {ln.strip() for ln in f if ln.strip() and not ln.startswith("#")}


def _suite() -> dict[str, tuple[str, type]]:
    import warnings

    import onnx.backend.test

    from graphopt.targets.tvm.backend import CpuBackend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt = onnx.backend.test.BackendTest(CpuBackend, "tvm_conformance")
    out = {}
    for cls_name, cls in bt.test_cases.items():
        for n in dir(cls):
            if n.startswith("test_") and n.endswith("_cpu"):
                out[n] = (cls_name, cls)
    return out


def _reason(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = ""
    for ln in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|error)\b", ln) or "Error:" in ln or "Mismatch" in ln:
            line = ln
            break
    if not line:
        line = lines[-1] if lines else "?"
    if "Not equal to tolerance" in text or "Mismatched elements" in text:
        line = "AssertionError: outputs differ beyond the test's tolerance"
    elif "shape mismatch" in text.lower() or "(shapes " in text:
        line = "AssertionError: output shape differs"
    line = re.sub(r"node '[^']*'", "node '…'", line)
    line = re.sub(r"'[^']*'", "'…'", line)
    line = re.sub(r"\b\d+(\.\d+)?(e[-+]?\d+)?\b", "N", line)
    line = re.sub(r"\((?:N, ?)*N\)", "(…)", line)
    return line[:220]


def worker(names: list[str], timeout: float = 0.0) -> int:
    """Run `names`; one JSON line per case on stdout ("start" first, so a crash is attributable).
    With `timeout`, a case still running after that many seconds ends the process (faulthandler's
    watchdog thread: it fires even while TVM holds the interpreter in native code)."""
    import faulthandler
    import unittest
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("ONNX_MODELS", tempfile.mkdtemp(prefix="onnx_models_"))
    suite = _suite()
    for name in names:
        print(json.dumps({"start": name}), flush=True)
        if timeout > 0:
            faulthandler.dump_traceback_later(timeout, exit=True, file=sys.stderr)
        t = time.perf_counter()
        entry = suite.get(name)
        if entry is None:
            print(json.dumps({"name": name, "status": "missing", "detail": "not a case of this onnx"}), flush=True)
            continue
        result = unittest.TestResult()
        entry[1](name).run(result)
        dt = time.perf_counter() - t
        faulthandler.cancel_dump_traceback_later()
        if result.failures or result.errors:
            detail = (result.failures + result.errors)[0][1]
            status = "fail"
        elif result.skipped:
            detail, status = result.skipped[0][1], "skip"
        else:
            detail, status = "", "pass"
        print(json.dumps({"name": name, "kind": entry[0], "status": status, "seconds": round(dt, 2),
                          "reason": _reason(detail) if status == "fail" else "", "detail": detail[-1500:]}), flush=True)
    return 0


#: a worker whose resident memory passes this many bytes is killed (the case marked "memory")
DEFAULT_MEMORY_LIMIT = 8 << 30


def _rss(pid: int) -> int:
    """Resident bytes of process `pid` (0 when it is gone or /proc cannot say)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _lines(fd: int, pending: bytearray) -> list[str]:
    """The complete lines readable from `fd` now (the rest kept in `pending`); [""] at EOF.

    Reads the raw descriptor: a buffered text stream can swallow several lines in one read, and
    select() then waits on a descriptor with nothing left while the "start" of the next case
    sits unread in the buffer (no timeout was ever armed for it: the hang of issue 25)."""
    chunk = os.read(fd, 65536)
    if not chunk:
        return [""]
    pending += chunk
    *done, rest = pending.split(b"\n")
    pending[:] = rest
    return [ln.decode("utf-8", "replace") for ln in done]


def run_chunk(names: list[str], timeout: float, results: dict[str, dict], log, memory: int = DEFAULT_MEMORY_LIMIT) -> None:
    """Run names in a worker subprocess; restart after a crash, a timeout or too much memory,
    skipping the culprit. The parent enforces both limits (it kills the worker), whatever the
    worker is stuck in."""
    import selectors

    todo = list(names)
    while todo:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--worker={timeout + 30:.0f}", *todo],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
        current = None
        started = time.perf_counter()
        sel = selectors.DefaultSelector()
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        sel.register(fd, selectors.EVENT_READ)
        pending = bytearray()
        done_here: set[str] = set()
        eof = False
        while not eof:
            over = None
            if current is not None and time.perf_counter() - started > timeout:
                over = f"timeout (> {timeout:.0f} s)"
            elif current is not None and memory and _rss(proc.pid) > memory:
                over = f"memory (> {memory >> 20} MiB resident)"
            if over is not None:
                proc.kill()
                results[current] = {"name": current, "status": "fail", "reason": over, "detail": ""}
                done_here.add(current)
                log(results[current])
                break
            if not sel.select(timeout=0.5):
                if proc.poll() is not None:
                    eof = True  # (read what it left below)
                else:
                    continue
            for line in _lines(fd, pending) if not eof else []:
                if line == "":
                    eof = True
                    break
                try:
                    msg = json.loads(line.strip())
                except ValueError:
                    continue
                if "start" in msg:
                    current = msg["start"]
                    started = time.perf_counter()
                else:
                    results[msg["name"]] = msg
                    done_here.add(msg["name"])
                    log(msg)
                    current = None
        sel.close()
        proc.wait()
        proc.stdout.close()
        if current is not None and current not in done_here:
            results[current] = {"name": current, "status": "fail", "reason": f"crash (worker exit code {proc.returncode})", "detail": ""}
            done_here.add(current)
            log(results[current])
        todo = [n for n in todo if n not in results]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0].startswith("--worker"):
        limit = argv[0].partition("=")[2]
        return worker(argv[1:], float(limit) if limit else 0.0)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--filter", help="only cases matching this regex")
    p.add_argument("--limit", type=int, help="only the first N cases (after --filter)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per case (the parent kills the worker)")
    p.add_argument("--memory-gb", type=float, default=DEFAULT_MEMORY_LIMIT / (1 << 30),
                   help="resident memory per worker; past it the parent kills the worker (0: no limit)")
    p.add_argument("--json", help="write every outcome here")
    p.add_argument("--failed-from", metavar="JSON", help="run only the cases that did not pass in this earlier --json "
                   "(the summary then merges the earlier passes in)")
    p.add_argument("--specialize", action="store_true",
                   help="compile at the first run with small integer inputs bound as constants (a JIT's view)")
    args = p.parse_args(argv)
    if args.specialize:
        os.environ["GRAPHOPT_CPU_BACKEND_SPECIALIZE"] = "1"  # inherited by the workers

    excluded = _exclusions()
    names = sorted(n for n in _suite() if n not in excluded)
    total_ort = len(names)
    earlier: dict[str, dict] = {}
    if args.failed_from:
        with open(args.failed_from) as f:
            earlier = {r["name"]: r for r in json.load(f)["results"]}
        names = [n for n in names if earlier.get(n, {}).get("status") != "pass"]
    if args.filter:
        names = [n for n in names if re.search(args.filter, n)]
    if args.limit:
        names = names[: args.limit]
    print(f"{len(names)} cases (onnxruntime passes {total_ort} of the suite's cpu cases)", flush=True)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    counter = [0]

    stream = open(args.json + "l", "w") if args.json else None  # one line per case, as they finish

    def log(msg: dict) -> None:
        if stream is not None:
            stream.write(json.dumps(msg) + "\n")
            stream.flush()
        counter[0] += 1
        if counter[0] % 50 == 0:
            npass = sum(1 for r in results.values() if r["status"] == "pass")
            print(f"  {counter[0]}/{len(names)} done, {npass} pass, {time.perf_counter() - t0:.0f} s", flush=True)

    memory = int(args.memory_gb * (1 << 30))
    if args.jobs <= 1:
        run_chunk(names, args.timeout, results, log, memory)
    else:
        import threading

        chunks = [names[i :: args.jobs] for i in range(args.jobs)]
        threads = [threading.Thread(target=run_chunk, args=(c, args.timeout, results, log, memory)) for c in chunks]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    if earlier:  # merge: the earlier passes plus this run's outcomes
        merged = {n: r for n, r in earlier.items() if r.get("status") == "pass"}
        merged.update(results)
        results = merged
        names = sorted(set(names) | set(merged))
    status = collections.Counter(r["status"] for r in results.values())
    npass = status.get("pass", 0)
    print(f"\ncpu target: {npass} of {len(names)} cases pass ({npass / max(len(names), 1):.1%}); "
          f"status counts {dict(status)}; {time.perf_counter() - t0:.0f} s")
    reasons = collections.Counter(r.get("reason", "") for r in results.values() if r["status"] == "fail")
    print(f"\nfailures by reason ({sum(reasons.values())}):")
    for reason, count in reasons.most_common():
        cases = sorted(r["name"] for r in results.values() if r.get("reason") == reason)
        shown = ", ".join(cases[:6]) + (" …" if len(cases) > 6 else "")
        print(f"{count:5d}  {reason}\n       {shown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"total_ort_passes": total_ort, "ran": len(names), "pass": npass,
                       "results": sorted(results.values(), key=lambda r: r["name"])}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

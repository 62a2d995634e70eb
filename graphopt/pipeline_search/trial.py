"""One trial of the search: compile a pipeline and measure it, in a child process with a time limit.

    outcome = run_trial(Job(...), timeout=600)     # parent: never raises for the trial's own failures
    outcome.state                                  # "ok" | "failed" | "crashed" | "timeout"

The child (`python -m graphopt.pipeline_search.trial JOB.json`) runs `graphopt-compile --config
CONFIG.toml` (the very command `best.toml` replays), then measures the result against the
original model the way `graphopt-compile --compare` does (graphopt.compare): latency in paired
rounds of alternating order (the median of per-round ratios, so load that changes between rounds
cancels), size on disk, and accuracy on the evaluation batches against the original's outputs
(graphopt.accuracy.output_metrics; top-1 accuracy too where the data has labels). It writes
RESULT.json last, by rename.

The child runs in its own process group: a timeout kills the group (a compile that spawned
workers leaves none behind), and a crash of the compiler or of onnxruntime (a signal, an abort)
is a failed trial with its reason, not a failed search.

Test hook: GRAPHOPT_SEARCH_FAULT="N:crash,M:hang" makes the child of trial N abort and of trial M
hang (the tests' stand-ins for a segfaulting kernel and a compile that never ends).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class Job:
    """What a child needs; written as JSON beside the trial's config."""

    number: int
    config: str  # the trial's graphopt config (TOML)
    output: str  # what the config writes: an .onnx file or an artifact folder
    kind: str  # "onnx" (the result runs on onnxruntime) | "artifact" (a compiled target's folder)
    original: str  # the user's model, run on onnxruntime as deployed
    eval_data: str
    reference: str  # .npz of the original's outputs on the evaluation batches (b{i}_o{j})
    result: str  # where the child writes its measurements
    seconds: float = 4.0  # of paired latency rounds
    batch: int = 1  # samples per latency call where the batch dim is symbolic (1: an online request)
    threads: int | None = None
    compile: bool = True  # False: measure the output that is there (re-measuring a trial)


@dataclass
class Outcome:
    state: str  # ok | failed (graphopt-compile refused: exit 2/3) | crashed (exit 1, a signal) | timeout
    reason: str = ""
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # graphopt-compile's (a pass that changed nothing)


def run_trial(job: Job, *, timeout: float, log: str) -> Outcome:
    """Run `job` in a child process; its stdout/stderr go to `log`."""
    job_path = os.path.splitext(job.result)[0] + ".job.json"
    with open(job_path, "w") as f:
        json.dump(asdict(job), f)
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "graphopt.pipeline_search.trial", job_path], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Outcome("timeout", f"timed out after {timeout:g} s", time.perf_counter() - start)
        except BaseException:  # the search itself is interrupted: leave no child behind
            _kill_group(proc)
            raise
    took = time.perf_counter() - start
    if rc == 0 and os.path.exists(job.result):
        with open(job.result) as f:
            return Outcome("ok", "", took, json.load(f), _warnings(log))
    last = _last_error(log)
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        return Outcome("crashed", f"killed by {name}" + (f" after: {last}" if last else ""), took)
    state = "crashed" if rc == 1 else "failed"
    return Outcome(state, f"exit {rc}: {last or 'no message'}", took)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _warnings(log: str) -> list[str]:
    try:
        with open(log, errors="replace") as f:
            return [ln.strip().partition("warning: ")[2] for ln in f if "warning: " in ln][:5]
    except OSError:
        return []


def _last_error(log: str) -> str:
    """The child's error line (graphopt-compile prints exactly one), else its last line."""
    try:
        with open(log, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if "error:" in ln]
    return (errors or lines or [""])[-1][:300]


# ------------------------------------------------------------------------------------ the child


def _fault(number: int) -> None:
    for item in os.environ.get("GRAPHOPT_SEARCH_FAULT", "").split(","):
        n, _, what = item.partition(":")
        if n.strip() == str(number):
            if what == "crash":
                os.abort()
            if what == "hang":
                time.sleep(1e6)


def measure(job: Job) -> dict[str, Any]:
    """Latency, size and accuracy of the compiled result against the original."""
    import graphopt
    from graphopt.accuracy import output_metrics
    from graphopt.compare import artifact_runner, evaluation_batches, files_bytes, onnxruntime_runner, paired_latency
    from graphopt.accuracy import top1_accuracy

    model = graphopt.load(job.original)
    batches, labels, _ = evaluation_batches(model, job.eval_data)
    with np.load(job.reference) as z:
        ref = [[z[f"b{i}_o{j}"] for j in range(int(z["outputs"]))] for i in range(len(batches))]
    run_a, _ = onnxruntime_runner(job.original, threads=job.threads)
    run_b, _ = (onnxruntime_runner if job.kind == "onnx" else artifact_runner)(job.output, threads=job.threads)
    res = [list(run_b(b)) for b in batches]
    acc: dict[str, Any] = output_metrics(ref, res)
    if labels is not None:
        acc["accuracy"] = top1_accuracy(res, labels)
    lat = paired_latency(run_a, run_b, latency_batch(model, batches, job.batch), seconds=job.seconds)
    return {"latency": lat, "size": {"original": files_bytes(job.original), "result": files_bytes(job.output)},
            "accuracy": acc}


def latency_batch(model: Any, batches: list[dict[str, np.ndarray]], batch: int) -> dict[str, np.ndarray]:
    """The first `batch` evaluation samples for inputs whose batch dim is symbolic (one, like
    graphopt.compare, for batch 1); fixed-shape inputs as the data has them."""
    from graphopt.compare import latency_feeds

    if batch <= 1:
        return latency_feeds(model, batches[0])
    out = dict(batches[0])
    for v in model.graph.inputs:
        dims = v.shape.dims if v.shape is not None else ()
        if v.name in out and dims and not isinstance(dims[0], int):
            whole = np.concatenate([b[v.name] for b in batches], axis=0)
            reps = -(-batch // len(whole))  # fewer samples than asked: repeated
            out[v.name] = np.ascontiguousarray(np.concatenate([whole] * reps, axis=0)[:batch])
    return out


def child(job_path: str) -> int:
    from graphopt.cli import main as compile_main
    from graphopt.onnx_io import atomic_write

    with open(job_path) as f:
        job = Job(**json.load(f))
    _fault(job.number)
    if job.compile:
        rc = compile_main(["--config", job.config, "--quiet"])
        if rc != 0:
            return rc
    try:
        out = measure(job)
    except Exception as e:  # noqa: BLE001 - the trial fails with this line; the search goes on
        print(f"graphopt-search: error: measuring the result: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        return 1
    with atomic_write(job.result) as f:
        f.write(json.dumps(out, allow_nan=True).encode())
    return 0


if __name__ == "__main__":  # pragma: no cover - the child process
    sys.exit(child(sys.argv[1]))

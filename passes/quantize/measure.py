"""Running candidates on onnxruntime: output error against fp32, accuracy budgets, latency.

Quantized models are always run with onnxruntime's default (all) optimizations, because only
then does its QDQ transformer turn node units into int8 kernels — and only then do the int8
kernels' own numerics (e.g. u8s8 saturation on CPUs without VNNI) show up in the error.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

# the accuracy side (session, run, metrics, budgets) lives in graphopt.accuracy, shared with
# prune and cluster-weights; re-exported here for the quantize pass
from graphopt.accuracy import Batch, Budget, output_metrics, run, session  # noqa: F401
from graphopt.errors import GraphoptError
from graphopt.ir import Model
from graphopt.accuracy import sqnr_db  # noqa: F401 - re-exported (graphopt.passes.quantize.sqnr_db); one home


# ------------------------------------------------------------------------------------ latency


def paired_speedups(models: Sequence[Model], feeds: Batch, *, threads: int = 0, budget_s: float = 6.0,
                    min_runs: int = 5, max_runs: int = 200) -> tuple[list[float], list[float]]:
    """(median seconds per run of each model, speedup of each over models[0]). Round-robin, one
    call per model per round, the order alternating forward and backward so no model always
    runs right after another; the speedup is the median over rounds of the paired ratio
    t[0] / t[i] of the same round, so load that changes between rounds cancels in each ratio
    (a ratio of medians does not: on a shared machine it let noise pick a candidate)."""
    sessions = [session(m, threads=threads or 2) for m in models]
    feeds = dict(feeds)
    for s in sessions:  # warm up (first runs allocate and pack weights)
        for _ in range(2):
            s.run(None, feeds)
    t0 = time.perf_counter()
    for s in sessions:
        s.run(None, feeds)
    per_round = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(max_runs, max(min_runs, budget_s / per_round)))
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for r in range(rounds):
        for i in (order if r % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            sessions[i].run(None, feeds)
            times[i].append(time.perf_counter() - t)
    medians = [statistics.median(t) for t in times]
    speedups = [statistics.median(b / x for b, x in zip(times[0], t)) for t in times]
    return medians, speedups


def profile_nodes(model: Model, feeds: Batch, *, threads: int = 0, runs: int = 10) -> dict[str, float]:
    """Microseconds per run of each kernel onnxruntime runs for `model` (its own profiler, all
    optimizations on), keyed by the kernel's node name with onnxruntime's suffixes removed
    (`_token_N` of the QDQ fusions, `_nchwc` of the NCHWc layout pass), so a key is the name of
    the original node or of the output it took its name from. Median over `runs` runs (after
    one warm-up run), summed over kernels that share a key."""
    import json
    import os
    import re
    import tempfile

    from graphopt.check import onnxruntime_session

    with tempfile.TemporaryDirectory(prefix="graphopt-profile-") as d:
        try:
            sess = onnxruntime_session(model, threads=threads or 2, spinning=False, profile_prefix=os.path.join(d, "p"))
            feeds = dict(feeds)
            for _ in range(runs + 1):
                sess.run(None, feeds)
            path = sess.end_profiling()
            with open(path, encoding="utf-8") as f:
                events = json.load(f)
        except Exception as e:
            raise GraphoptError(f"onnxruntime profiling failed: {str(e).splitlines()[0]}") from None
    per: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        key = re.sub(r"(_token_\d+|_nchwc)+$", "", e["name"][: -len("_kernel_time")])
        per.setdefault(key, []).append(float(e.get("dur", 0)))
    # the first run is warm-up: each key appears once per run per kernel
    out: dict[str, float] = {}
    for k, v in per.items():
        n_kernels = max(1, len(v) // (runs + 1))
        v = v[n_kernels:]
        out[k] = statistics.median(v) * n_kernels if v else 0.0
    return out


def has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI dot-product instructions (None: not x86 / unknown)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return None
    words = set(flags.split())
    return bool(words & {"avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8"})

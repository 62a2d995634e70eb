"""`graphopt-compile --compare`: the original model against the compiled result, side by side.

    table = compare_models("model.onnx", "out.onnx", kind="onnx", eval_data="data.npz")
    print(format_table(table))

What a user measures first (latency, size, peak memory, accuracy), measured as the deployed
models run:
- latency: each on its runtime (the original on onnxruntime with all its optimizations; the
  result on onnxruntime for the onnx target, the compiled artifact for cpu), in paired rounds
  whose order alternates, so load that changes between rounds cancels in each round's ratio;
  the speedup is the median of the per-round ratios (trtexec/Olive report medians);
- size: the model file with its external data / the artifact folder;
- peak memory: in a fresh process per model, the growth of the resident set (VmHWM, reset after
  the imports) from loading the model and running it once;
- accuracy: on `--eval-data` (one array per input, samples stacked on the batch axis, optional
  `labels`: top-1 of both) or random inputs (said so): cosine, top-1 agreement and SQNR of the
  result against the original (graphopt.accuracy).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from graphopt.errors import GraphoptError, UsageError
from graphopt.accuracy import output_agreement, top1_accuracy

Feeds = Mapping[str, np.ndarray]
Runner = Callable[[Feeds], Sequence[np.ndarray]]

#: seconds of paired latency rounds (both models together)
LATENCY_SECONDS = 8.0
#: samples of random inputs when no --eval-data is given
RANDOM_SAMPLES = 16
#: fresh processes per model for peak memory
MEMORY_PROBES = 2
#: batch size for inputs whose batch dim is symbolic
EVAL_BATCH = 8


# ------------------------------------------------------------------------------------ runners


def onnxruntime_runner(path: str, *, threads: int | None = None) -> tuple[Runner, str]:
    """An onnxruntime session as deployed: CPU provider, all graph optimizations."""
    import onnxruntime as ort

    from graphopt.check import onnxruntime_session

    try:
        # no spinning: a pool that spins after its run steals the cores of the other model's next
        # run, and paired rounds alternate the two (tiny models measured up to 8x apart otherwise)
        sess = onnxruntime_session(path, threads=threads or 0, spinning=False)
    except Exception as e:  # noqa: BLE001 - its message, one line
        raise GraphoptError(f"--compare: onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
    names = [o.name for o in sess.get_outputs()]

    def run(feeds: Feeds) -> Sequence[np.ndarray]:
        out: Sequence[np.ndarray] = sess.run(names, dict(feeds))
        return out

    return run, f"onnxruntime {ort.__version__} (all optimizations, {threads or 'default'} threads, no spinning)"


def artifact_runner(path: str, *, threads: int | None = None) -> tuple[Runner, str]:
    from graphopt.runtime import load

    r = load(path, threads=threads)
    return r.run, f"compiled artifact ({r.threads} threads)"


# ------------------------------------------------------------------------------------ measures


def paired_latency(a: Runner, b: Runner, feeds: Feeds, *, seconds: float = LATENCY_SECONDS,
                   min_rounds: int = 5, max_rounds: int = 1000) -> dict[str, Any]:
    """Median ms per call of `a` and `b` and the median of per-round ratios t_a / t_b (with
    its 10th-90th percentile): rounds alternate a,b / b,a; a round times `calls` calls of each,
    enough for ~2 ms per model, so the timer's resolution does not matter on tiny models."""
    for _ in range(3):  # warm up: first runs allocate, pack weights, spin up pools
        a(feeds)
        b(feeds)
    pairs = []
    for _ in range(3):
        t0 = time.perf_counter()
        a(feeds)
        b(feeds)
        pairs.append(time.perf_counter() - t0)
    pair = max(min(pairs), 1e-7)
    calls = max(1, math.ceil(4e-3 / pair))
    rounds = int(min(max_rounds, max(min_rounds, seconds / (pair * calls))))
    ta: list[float] = []
    tb: list[float] = []
    for r in range(rounds):
        for fn, out in ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta)):
            t = time.perf_counter()
            for _ in range(calls):
                fn(feeds)
            out.append((time.perf_counter() - t) / calls)
    ratios = sorted(x / y for x, y in zip(ta, tb))
    return {
        "original_ms": statistics.median(ta) * 1e3,
        "result_ms": statistics.median(tb) * 1e3,
        "speedup": statistics.median(ratios),
        "speedup_p10": float(np.percentile(ratios, 10)),
        "speedup_p90": float(np.percentile(ratios, 90)),
        "rounds": rounds,
        "calls_per_round": calls,
    }


_MEMORY_PROBE = r"""
import json, os, resource, sys
import numpy as np
path, kind, feeds_path, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
feeds = dict(np.load(feeds_path, allow_pickle=False))
if kind == "onnx":
    import onnxruntime as ort
else:
    import tvm.runtime, graphopt.runtime  # (imports are not the model's memory)
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
reset = False
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    reset = True
except OSError:
    pass
base = status("VmRSS")
if kind == "onnx":
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    s.run(None, feeds)
else:
    graphopt.runtime.load(path, threads=threads or None).run(feeds)
peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak, "reset": reset}))
"""


def peak_memory(path: str, kind: str, feeds_path: str, *, threads: int | None = None, timeout: float = 600) -> dict[str, Any]:
    """Resident memory a fresh process gains by loading `path` and running it once."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        p = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, path, kind, feeds_path, str(threads or 0)],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"the probe failed (exit {p.returncode}): {tail}"}
    d = json.loads(p.stdout.strip().splitlines()[-1])
    return {"bytes": max(0, d["peak"] - d["base"]), "process_peak": d["peak"]}


def _smallest(probes: Iterable[dict[str, Any]]) -> dict[str, Any]:
    probes = list(probes)
    ok = [p for p in probes if "bytes" in p]
    return min(ok, key=lambda p: p["bytes"]) if ok else probes[0]


def files_bytes(path: str) -> int:
    """An artifact folder's files, or an .onnx file with the external-data files it names."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                   if os.path.isfile(os.path.join(path, f)))
    import onnx

    files = {os.path.abspath(path)}
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - a size is informational; the file itself is what it is
        return os.path.getsize(path)
    base = os.path.dirname(os.path.abspath(path))
    for t in _tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc:
                files.add(os.path.abspath(os.path.join(base, loc)))
    return sum(os.path.getsize(f) for f in files if os.path.isfile(f))


def _tensors(graph: Any) -> Any:
    """Every TensorProto of `graph`: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


# ------------------------------------------------------------------------------------ data


def evaluation_batches(model: Any, eval_data: str | None, *, seed: int = 0) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None, str]:
    """(batches, labels or None, where they came from)."""
    from graphopt.calibration import CalibrationError, load_calibration, synthetic_calibration

    if eval_data is None:
        data = synthetic_calibration(model, num_batches=RANDOM_SAMPLES, seed=seed, batch_size=1)
        return list(data), None, f"random inputs ({RANDOM_SAMPLES} samples, seed {seed}; not real data)"
    if not os.path.exists(eval_data):
        raise UsageError(f"--eval-data {eval_data}: no such file or folder")
    try:
        data = load_calibration(eval_data, model, batch_size=EVAL_BATCH)
        batches = list(data)
    except CalibrationError as e:
        raise UsageError(str(e).replace("calibration", "--eval-data", 1)) from None
    labels: list[np.ndarray] = []
    for f in data.batches or ():
        with np.load(f, allow_pickle=False) as z:
            if "labels" in z.files:
                labels.append(np.asarray(z["labels"]).reshape(-1))
    if labels and len(labels) != len(data.batches or ()):
        raise UsageError(f"--eval-data {eval_data}: some files have a labels array and some do not")
    lab = np.concatenate(labels) if labels else None
    if lab is not None and lab.size != data.num_samples:
        raise UsageError(f"--eval-data {eval_data}: {lab.size} labels for {data.num_samples} samples")
    if lab is not None and lab.dtype.kind not in "iu":
        raise UsageError(f"--eval-data {eval_data}: labels must be integers (class indices), got {lab.dtype}")
    return batches, lab, f"{eval_data} ({data.num_samples} samples{', labelled' if lab is not None else ''})"


def latency_feeds(model: Any, batch: Feeds) -> dict[str, np.ndarray]:
    """One sample for inputs whose batch dim is symbolic (latency as an online request sees
    it, like trtexec's default); fixed shapes as they are."""
    out = dict(batch)
    for v in model.graph.inputs:
        dims = v.shape.dims if v.shape is not None else ()
        if v.name in out and dims and not isinstance(dims[0], int) and np.ndim(out[v.name]):
            out[v.name] = np.ascontiguousarray(out[v.name][:1])
    return out


# ------------------------------------------------------------------------------------ compare


def compare_models(original: str, result: str, *, kind: str, model: Any, eval_data: str | None = None,
                   seed: int = 0, threads: int | None = None, seconds: float | None = None,
                   memory: bool = True) -> dict[str, Any]:
    """The before/after table as a dict (the report's `compare`; format_table prints it).
    `kind`: "onnx" (result is an .onnx file run on onnxruntime) or "artifact" (a cpu artifact
    folder); `model` the original's IR (for its inputs)."""
    batches, labels, source = evaluation_batches(model, eval_data, seed=seed)
    if not batches:
        raise UsageError(f"--eval-data {eval_data}: holds no samples")
    run_a, rt_a = onnxruntime_runner(original, threads=threads)
    run_b, rt_b = onnxruntime_runner(result, threads=threads) if kind == "onnx" else artifact_runner(result, threads=threads)
    feeds = latency_feeds(model, batches[0])
    out: dict[str, Any] = {
        "runtime": {"original": rt_a, "result": rt_b},
        "inputs": {k: [int(d) for d in np.shape(v)] for k, v in feeds.items()},
        "latency": paired_latency(run_a, run_b, feeds, seconds=LATENCY_SECONDS if seconds is None else seconds),
        "size": {"original": files_bytes(original), "result": files_bytes(result)},
    }
    if memory:
        with tempfile.TemporaryDirectory(prefix="graphopt-compare-") as tmp:
            fp = os.path.join(tmp, "feeds.npz")
            arrays: dict[str, Any] = {k: np.asarray(v) for k, v in feeds.items()}
            np.savez(fp, **arrays)
            # two probes each, alternating, the smaller kept: onnxruntime's arena and thread start-up
            # vary by ~5 % between identical runs (ResNet-50: 264 vs 277 MB for the same file)
            probes = [(peak_memory(original, "onnx", fp, threads=threads), peak_memory(result, kind, fp, threads=threads))
                      for _ in range(MEMORY_PROBES)]
            out["peak_memory"] = {"original": _smallest(p[0] for p in probes), "result": _smallest(p[1] for p in probes),
                                  "how": f"resident-set growth of a fresh process loading the model and running it once "
                                         f"(least of {MEMORY_PROBES})"}
    ref = [list(run_a(b)) for b in batches]
    res = [list(run_b(b)) for b in batches]
    acc: dict[str, Any] = {"data": source}
    names = [v.name for v in model.graph.outputs]
    try:
        acc.update(output_agreement(ref, res, names))
        if labels is not None:
            acc["original_top1"] = top1_accuracy(ref, labels)
            acc["result_top1"] = top1_accuracy(res, labels)
    except ValueError as e:
        acc["error"] = str(e)
    out["accuracy"] = acc
    return out


def _mb(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _pct(a: float, b: float) -> str:
    return "" if not a else f"{(b - a) / a * 100:+.1f} %"


def speed_verdict(lat: Mapping[str, Any]) -> str:
    """`1.32x faster (...)`; a ratio whose p10-p90 band holds 1 is no clear difference."""
    s, lo, hi = lat["speedup"], lat["speedup_p10"], lat["speedup_p90"]
    word = "no clear difference" if lo <= 1.0 <= hi else "faster" if s > 1 else "slower"
    return f"{s:.2f}x {word} (paired rounds: p10-p90 {lo:.2f}-{hi:.2f}x, {lat['rounds']} rounds)"


def table_rows(c: Mapping[str, Any], size: Callable[[Any], str], change: Callable[[float, float], str]) -> list[tuple[str, str, str, str]]:
    """(what, original, result, change) rows of the comparison `c` (latency, size, peak memory,
    top-1 accuracy where there were labels): the terminal table's and the HTML report's, each with
    its own byte formatting (`size`) and relative change (`change`)."""
    rows: list[tuple[str, str, str, str]] = []
    lat = c.get("latency")
    if lat:
        rows.append(("latency (median)", f"{lat['original_ms']:.3f} ms", f"{lat['result_ms']:.3f} ms", speed_verdict(lat)))
    sz = c.get("size")
    if sz:
        rows.append(("size", size(sz["original"]), size(sz["result"]), change(sz["original"], sz["result"])))
    mem = c.get("peak_memory")
    if mem:
        a, b = mem["original"], mem["result"]
        err = a.get("error") or b.get("error")
        rows.append(("peak memory", size(a.get("bytes")), size(b.get("bytes")),
                     f"n/a: {err}" if err else change(a["bytes"], b["bytes"])))
    acc = c.get("accuracy") or {}
    if "original_top1" in acc:
        rows.append(("top-1 accuracy", f"{acc['original_top1'] * 100:.2f} %", f"{acc['result_top1'] * 100:.2f} %",
                     f"{(acc['result_top1'] - acc['original_top1']) * 100:+.2f} pt"))
    return rows


def format_table(c: Mapping[str, Any]) -> str:
    """The comparison as terminal lines."""
    rows = table_rows(c, _mb, _pct)
    acc = c.get("accuracy", {})
    w = [max(len(r[i]) for r in rows + [("", "original", "result", "")]) for i in range(3)]
    lines = [f"compare: original vs result (original: {c['runtime']['original']}; result: {c['runtime']['result']})",
             "  inputs " + ", ".join(f"{k}[{'x'.join(map(str, s))}]" for k, s in c.get("inputs", {}).items())]
    lines.append(f"  {'':<{w[0]}}  {'original':>{w[1]}}  {'result':>{w[2]}}  change")
    for r in rows:
        lines.append(f"  {r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]}")
    if "error" in acc:
        lines.append(f"  accuracy: n/a: {acc['error']}")
    elif acc:
        parts = []
        if acc.get("cosine") is not None:
            parts.append(f"cosine {acc['cosine']:.6f}")
        if acc.get("top1-agreement") is not None:
            parts.append(f"top-1 agreement {acc['top1-agreement'] * 100:.2f} %")
        if acc.get("sqnr") is not None:
            sq = acc["sqnr"]
            parts.append(f"SQNR {'inf' if math.isinf(sq) else f'{sq:.1f}'} dB"
                         + (f" (worst output {acc['sqnr-output']})" if acc.get("sqnr-output") else ""))
        lines.append(f"  result vs original on {acc['data']}: {', '.join(parts) or 'no float outputs to compare'}")
    return "\n".join(lines)

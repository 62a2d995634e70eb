"""Latency of compiled cpu artifacts of small real models (the VADs of tools/real_corpus.py) against
onnxruntime in the same process and the same rounds (issue 24: "a model that takes 0.1 ms on
onnxruntime <= 1.2x onnxruntime").

    .venv/bin/python tools/bench_small_models.py [--models vad_if,vad_gru] [--threads 1,2]
        [--rounds 2000] [--artifact [LABEL@]NAME=DIR ...] [--out DIR] [--model-dir DIR]

Each model is compiled with `graphopt-compile MODEL --target cpu -O2` from this tree (into --out,
reused when there), or taken from --artifact NAME=DIR (an artifact another tree built: a
baseline, measured in the same rounds). Feeds: the model's first test chunk (vad_if: sr=16000,
and sr=8000 as vad_if@8k). Printed per model and thread count: median µs per `Runner.run`
(numpy in, numpy out) of each artifact and of onnxruntime's `InferenceSession.run`, and their
ratio (on 1 thread also the calling thread's mean CPU time, which leaves out time other
processes took: a truer ratio on a loaded machine); calls alternate between the runtimes, so load that comes and goes hits all. Outputs are
checked against onnxruntime's first (max abs difference printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import real_corpus as rc  # noqa: E402


def feeds_for(name: str, sr: int = 16000) -> dict[str, np.ndarray]:
    chunk = rc.CHUNK[sr]
    rng = np.random.default_rng(0)
    t = np.arange(chunk) / sr
    x = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(chunk)).astype(np.float32)[None]
    f = {"input": x, "state": np.zeros((2, 1, rc.HIDDEN), np.float32)}
    if name == "vad_if":
        f["sr"] = np.array(sr, np.int64)
    return f


def compile_model(model: Path, out: Path) -> Path:
    if not (out / "manifest.json").exists():
        exe = Path(sys.executable).with_name("graphopt-compile")
        cmd = [str(exe), str(model), "--target", "cpu", "-O2", "-o", str(out), "-q"]
        print("#", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return out


def measure(label: str, model: Path, arts: dict[str, Path], feeds: dict[str, np.ndarray], threads: int,
            rounds: int) -> dict[str, float]:
    import onnxruntime as ort

    import graphopt.runtime

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    ref = s.run(None, feeds)
    calls: dict[str, Any] = {"onnxruntime": lambda: s.run(None, feeds)}
    for k, path in arts.items():
        r = graphopt.runtime.load(str(path), threads=threads or None)
        want = {n: v for n, v in feeds.items() if n in r.input_names}
        got = r.run(want)
        diff = max(float(np.abs(np.asarray(g) - e).max()) for g, e in zip(got, ref))
        print(f"#   {label} {k}: max |diff| vs onnxruntime {diff:.2e}", flush=True)
        calls[k] = (lambda r=r, want=want: r.run(want))
    for f in calls.values():
        for _ in range(100):
            f()
    ts: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            c = time.thread_time()
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
            cpu[k].append(time.thread_time() - c)
    med = {k: statistics.median(v) * 1e6 for k, v in ts.items()}
    o = med["onnxruntime"]
    parts = "  ".join(f"{k} {v:7.1f} µs ({v / o:.2f}x)" for k, v in med.items() if k != "onnxruntime")
    print(f"{label:10s} threads {threads}: onnxruntime {o:7.1f} µs  {parts}", flush=True)
    if threads == 1:  # everything runs on the calling thread: its CPU time leaves out time the load took
        mc = {k: statistics.mean(v) * 1e6 for k, v in cpu.items()}
        oc = mc["onnxruntime"]
        parts = "  ".join(f"{k} {v:7.1f} µs ({v / oc:.2f}x)" for k, v in mc.items() if k != "onnxruntime")
        print(f"{'':10s}   cpu time (mean): onnxruntime {oc:7.1f} µs  {parts}", flush=True)
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vad_if,vad_gru")
    ap.add_argument("--threads", default="1,2", help="0: the runner's own choice (onnxruntime: every core)")
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--artifact", action="append", default=[], help="NAME=DIR: also measure this artifact (LABEL@NAME=DIR)")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_small_models"))
    ap.add_argument("--model-dir", default=None, help="take NAME.onnx from here (default: tools/real_corpus.py's cache)")
    args = ap.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    print(f"# CPU: {cpu_name}; {os.cpu_count()} vCPUs; load average {os.getloadavg()[0]:.1f}", flush=True)
    extra: dict[str, dict[str, Path]] = {}
    for spec in args.artifact:
        key, _, path = spec.partition("=")
        label, _, name = key.rpartition("@") if "@" in key else ("base", "", key)
        extra.setdefault(name, {})[label] = Path(path)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model = Path(args.model_dir) / f"{name}.onnx" if args.model_dir else rc.model_path(name)
        art = compile_model(model, Path(args.out) / name)
        arts = {**extra.get(name, {}), "this": art}
        for t in (int(x) for x in args.threads.split(",")):
            measure(name, model, arts, feeds_for(name), t, args.rounds)
            if name == "vad_if":
                measure("vad_if@8k", model, arts, feeds_for(name, 8000), t, args.rounds)
    print(f"# load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

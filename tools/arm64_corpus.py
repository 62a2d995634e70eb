"""Compile corpus CNNs for arm64, run them under qemu-aarch64 and compare with onnxruntime on x86.

    python tools/arm64_env.py setup                     # once per machine
    python tools/arm64_corpus.py [--models resnet50,mobilenetv2] [--target 'arm64{profile=cortex-a76}'] [--json out.json]

Per model: compile time, artifact size, the emulated run's wall time, max abs / max rel error of
the outputs against onnxruntime (CPUExecutionProvider, the unmodified model) on the same random
input (seed 0, batch 1), and whether they are within the test suite's tolerance (rtol 1e-4,
atol 1e-5 on softmax-free logits; the check uses np.allclose). Timings under qemu are emulation
(about 9x slower than native) and say nothing about ARM speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

import graphopt
import graphopt.runtime
from graphopt.targets.arm64 import toolchain as arm64_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, ".cache", "corpus")


def _input(sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run_model(name: str, target: str) -> dict:
    path = os.path.join(CORPUS, f"{name}.onnx")
    if not os.path.exists(path):
        return {"model": name, "status": f"missing {path} (python tools/make_corpus.py)"}
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = _input(sess)
    t = time.perf_counter()
    ref = sess.run(None, feeds)
    ort_ms = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    art = graphopt.compile(path, target=target)
    compile_s = time.perf_counter() - t
    runner = graphopt.runtime.load(art.path)
    t = time.perf_counter()
    outs = runner.run(feeds)
    run_s = time.perf_counter() - t
    res = {"model": name, "target": target, "compile_s": round(compile_s, 1),
           "library_mb": round(art.manifest["files"]["library"]["bytes"] / 2**20, 2),
           "emulated_run_s": round(run_s, 2), "ort_x86_first_run_ms": round(ort_ms, 1),
           "runner": type(runner).__name__, "outputs": []}
    ok = True
    for r, o in zip(ref, outs):
        diff = np.abs(r.astype(np.float64) - o.astype(np.float64))
        rel = float((diff / np.maximum(np.abs(r), 1e-6)).max())
        close = bool(np.allclose(o, r, rtol=1e-4, atol=1e-5))
        same_top1 = bool((r.reshape(r.shape[0], -1).argmax(-1) == o.reshape(o.shape[0], -1).argmax(-1)).all())
        ok &= close
        res["outputs"].append({"shape": list(r.shape), "max_abs": float(diff.max()), "max_rel": rel,
                               "max_abs_ref": float(np.abs(r).max()), "allclose": close, "same_top1": same_top1})
    res["status"] = "ok" if ok else "outside tolerance"
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,mobilenetv2")
    p.add_argument("--target", default="arm64{profile=cortex-a76}")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    st = arm64_env.status()
    if not (st.can_build and st.can_run):
        print("arm64_corpus: cannot build/run arm64 artifacts here; missing: " + "; ".join(st.missing()), file=sys.stderr)
        return 2
    results = []
    for name in args.models.split(","):
        r = run_model(name.strip(), args.target)
        results.append(r)
        if "outputs" in r:
            o = r["outputs"][0]
            print(f"{r['model']:14s} {r['status']:18s} max_abs {o['max_abs']:.3g} (|ref| max {o['max_abs_ref']:.3g}) "
                  f"max_rel {o['max_rel']:.3g} top1 same: {o['same_top1']}  compile {r['compile_s']} s, "
                  f"qemu run {r['emulated_run_s']} s, lib {r['library_mb']} MB", flush=True)
        else:
            print(f"{r['model']:14s} {r['status']}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r.get("status") == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

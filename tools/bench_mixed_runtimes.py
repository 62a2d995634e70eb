"""A compiled cpu artifact and an onnxruntime session in one process: do their thread pools slow
each other down? (issue 24 item 6: a pipeline that runs some models on onnxruntime.)

    .venv/bin/python tools/bench_mixed_runtimes.py [--models tiny_cnn,vad_gru,vad_if,googlenet]
        [--configs exclusive+ort-default,balanced+ort-shared,shared+ort-shared] [--threads 2]
        [--art-threads T] [--repeats 3] [--seconds 0.6] [--sessions 1] [--cache DIR] [--recompile]

Per model, the artifact (graphopt-compile --target cpu, batch 1; cached in --cache) and
onnxruntime on the same .onnx, both with --threads intra-op threads. Each config runs in a process
of its own (TVM fixes its pool's spin count once per process) and names both sides' settings:

    exclusive / balanced  graphopt.runtime.load(pool=...): "exclusive" is TVM's defaults (a worker
    / shared              pinned per core, ~150 ms of spinning after each task), "balanced" the
                          default (floating workers spinning ~1 ms), "shared" floating workers
                          that sleep when done
    ort-default           an InferenceSession as a user builds it (onnxruntime spins between runs)
    ort-shared            graphopt's OrtRunner(pool="shared"): session.force_spinning_stop
    ort-nospin            session.intra_op.allow_spinning=0

Within a process, in --repeats rounds of interleaved blocks (each ~--seconds of calls): the
artifact alone, onnxruntime alone, the two alternating call by call, and both at once from two
Python threads (each looping until the block's end). Printed: median ms per call alone (and
artifact / onnxruntime), each side's median in the mixed blocks divided by its median alone in
the same process, and the CPU milliseconds the process burns in the 300 ms after one call of each
(threads left spinning). `uptime` before and after: the machine may be shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("exclusive+ort-default", "balanced+ort-shared", "shared+ort-default", "shared+ort-shared", "shared+ort-nospin")

#: model -> (.onnx path, graphopt-compile flags (--input-shape NAME:DIMS bare), feeds of batch 1);
#: an input the compile binds (--bind) is fed to onnxruntime only
MODELS: dict[str, tuple[str, list[str], Callable[[], dict[str, np.ndarray]]]] = {
    "tiny_cnn": ("examples/tiny_cnn.onnx", ["input:1,3,16,16"],
                 lambda: {"input": _normal((1, 3, 16, 16))}),
    "vad_gru": (".cache/real/vad_gru.onnx", ["input:1,512", "state:2,1,64"],
                lambda: {"input": _normal((1, 512)), "state": _normal((2, 1, 64))}),
    "vad_if": (".cache/real/vad_if.onnx", ["input:1,512", "state:2,1,64"],
               lambda: {"input": _normal((1, 512)), "sr": np.array(16000, np.int64), "state": _normal((2, 1, 64))}),
    "vad_if_bound": (".cache/real/vad_if.onnx", ["input:1,512", "state:2,1,64", "--bind", "sr=16000"],
                     lambda: {"input": _normal((1, 512)), "sr": np.array(16000, np.int64), "state": _normal((2, 1, 64))}),
    "googlenet": (".cache/corpus/googlenet.onnx", ["input:1,3,224,224"],
                  lambda: {"input": _normal((1, 3, 224, 224))}),
    "resnet18": (".cache/corpus/resnet18.onnx", ["input:1,3,224,224"],
                 lambda: {"input": _normal((1, 3, 224, 224))}),
}


def _normal(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def artifact(name: str, cache: str, threads: int, recompile: bool) -> str:
    """The model's cpu artifact in `cache` (compiled by graphopt-compile where missing)."""
    path, shapes, _ = MODELS[name]
    out = os.path.join(cache, f"{name}.t{threads}")
    if recompile or not os.path.isfile(os.path.join(out, "manifest.json")):
        t = time.perf_counter()
        cmd = [os.path.join(os.path.dirname(sys.executable), "graphopt-compile"), os.path.join(ROOT, path),
               "--target", "cpu", "--threads", str(threads), "-o", out, "-q"]
        for s in shapes:
            cmd += [s] if s.startswith("-") or cmd[-1] == "--bind" else ["--input-shape", s]
        subprocess.run(cmd, check=True)
        print(f"# compiled {name} in {time.perf_counter() - t:.1f} s -> {out}", flush=True)
    return out


# ---- one config, in a process of its own ----------------------------------------------------

def _session(path: str, threads: int, ort: str) -> Any:
    if ort == "ort-shared":
        from graphopt.runtime import load_onnx

        return load_onnx(path, threads=threads, pool="shared").session
    import onnxruntime

    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if ort == "ort-nospin":
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _timed(f: Callable[[], Any], until: float, out: list[float]) -> None:
    while True:
        t = time.perf_counter()
        f()
        e = time.perf_counter()
        out.append(e - t)
        if e >= until:
            return


def _burn(f: Callable[[], Any]) -> float:
    """CPU ms this process uses in the 300 ms after a call of `f` (threads left spinning), after
    a pause that lets the other runtime's threads settle."""
    time.sleep(0.4)
    f()
    c = time.process_time()
    time.sleep(0.3)
    return (time.process_time() - c) * 1e3


def child(name: str, config: str, art: str, threads: int, repeats: int, seconds: float,
          sessions: int = 1, art_threads: int | None = None) -> dict[str, Any]:
    import graphopt.runtime as R

    pool, ort = config.split("+")
    runner = R.load(art, threads=art_threads or None, pool=pool)  # (0: the policy's count)
    sess = [_session(os.path.join(ROOT, MODELS[name][0]), threads, ort) for _ in range(sessions)]
    feeds = MODELS[name][2]()
    art_feeds = {k: v for k, v in feeds.items() if k in runner.input_names}
    a = lambda: runner.run(art_feeds)  # noqa: E731
    os_ = [lambda s=s: s.run(None, feeds) for s in sess]
    o = os_[0]
    for _ in range(10):
        a()
        for f in os_:
            f()
    t: dict[str, list[float]] = {k: [] for k in ("a", "o", "a_alt", "o_alt", "a_conc", "o_conc")}
    burn: dict[str, list[float]] = {"a": [], "o": []}
    for _ in range(repeats):
        _timed(a, time.perf_counter() + seconds, t["a"])
        _timed(o, time.perf_counter() + seconds, t["o"])
        end = time.perf_counter() + 2 * seconds
        while time.perf_counter() < end:
            for k, f in (("a_alt", a), *(("o_alt", g) for g in os_)):
                s = time.perf_counter()
                f()
                t[k].append(time.perf_counter() - s)
        end = time.perf_counter() + 2 * seconds
        ths = [threading.Thread(target=_timed, args=(g, end, t["o_conc"])) for g in os_]
        for th in ths:
            th.start()
        _timed(a, end, t["a_conc"])
        for th in ths:
            th.join()
        burn["a"].append(_burn(a))
        burn["o"].append(_burn(o))
    med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
    return {"model": name, "config": config, "sessions": sessions, "art_threads": runner.threads, "ms": med, "calls": {k: len(v) for k, v in t.items()},
            "burn_ms": {k: statistics.median(v) for k, v in burn.items()},
            "pool": dataclasses.asdict(runner.pool_settings)}


def _row(r: dict[str, Any]) -> str:
    m, b = r["ms"], r["burn_ms"]
    return (f"{r['model']:12s} {r['config']:22s} {r['art_threads']:2d} {m['a']:8.3f} {m['o']:8.3f} {m['a'] / m['o']:6.2f}x | "
            f"{m['a_alt'] / m['a']:5.2f}x {m['o_alt'] / m['o']:5.2f}x | {m['a_conc'] / m['a']:5.2f}x "
            f"{m['o_conc'] / m['o']:5.2f}x | {b['a']:5.0f} {b['o']:5.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny_cnn,vad_gru,vad_if,googlenet")
    ap.add_argument("--configs", default="exclusive+ort-default,balanced+ort-shared,shared+ort-shared")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime's intra-op threads, the compile's threads")
    ap.add_argument("--art-threads", type=int, default=None,
                    help="the artifact's threads at run time (default --threads; 0: the pool policy's own count)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=0.6, help="length of one block of calls")
    ap.add_argument("--cache", default=os.path.join(ROOT, ".cache", "mixed_runtimes"))
    ap.add_argument("--recompile", action="store_true")
    ap.add_argument("--sessions", type=int, default=1,
                    help="onnxruntime sessions beside the artifact (a pipeline of several models: alternating, "
                         "each session's call follows the artifact's; concurrently, a Python thread each)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "CONFIG", "ARTIFACT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.threads, args.repeats, args.seconds, args.sessions, args.art_threads)))
        return 0
    models, configs = args.models.split(","), args.configs.split(",")
    for x, known in ((models, MODELS), (configs, CONFIGS)):
        bad = [v for v in x if v not in known]
        if bad:
            ap.error(f"unknown {bad[0]!r} (have: {', '.join(known)})")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    print(f"# CPU: {model_name}; {os.cpu_count()} vCPUs; {args.threads} threads each side; "
          f"{args.sessions} onnxruntime session(s) of the same model beside the artifact")
    print(f"# load before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    arts = {m: artifact(m, args.cache, args.threads, args.recompile) for m in models}
    print(f"{'model':12s} {'config':22s} {'t':>2s} {'art ms':>8s} {'ort ms':>8s} {'art/ort':>7s} | alternating    | concurrent     "
          f"| CPU ms burnt")
    print(f"{'':12s} {'':22s} {'':2s} {'alone':>8s} {'alone':>8s} {'':7s} | {'art':>5s}  {'ort':>5s}  | {'art':>5s}  {'ort':>5s}  "
          f"| after art, ort")
    results = []
    for m in models:
        for c in configs:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", m, c, arts[m], "--threads",
                                str(args.threads), "--repeats", str(args.repeats), "--seconds", str(args.seconds),
                                "--sessions", str(args.sessions),
                                "--art-threads", str(args.threads if args.art_threads is None else args.art_threads)],
                               capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{m:12s} {c:22s} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            results.append(r)
            print(_row(r), flush=True)
    print(f"# load after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency of one dynamic-shape cpu artifact at several sizes, against the same model compiled with
fixed shapes (`--input-shape`) and against onnxruntime (ORT_ENABLE_ALL), all in one process.

    .venv/bin/python tools/bench_dynamic.py [--models detector_dyn,encoder_dyn,crnn_dyn] [--threads 2]
        [--repeat 50] [--sizes detector_dyn=1x3x64x64,1x3x160x96] [--buckets]
        [--tune-shapes [--tune-sizes detector_dyn=1x3x96x128,1x3x320x320] [--tune-minutes M] [--tuning-db DIR]]

For each model (tools/dynamic_models.py) the dynamic artifact is compiled once; per size it checks
the outputs against onnxruntime, compiles the fixed-shape artifact, and prints the median
latencies and the ratios dynamic / fixed and dynamic / onnxruntime (issue 21's goals: <= 1.3x
and <= 1.2x). `--buckets` adds the same model compiled with shape buckets at the sizes run
(`cpu{buckets=...}`, targets/shape_buckets.py). Timings interleave the runners per size,
`--rounds` times, and keep each runner's best median (a shared machine's noise hits them alike).
`--tune-shapes` adds the same dynamic model compiled with `tune_shapes=` (the symbolic kernels
scheduled with the candidate fastest over those sizes, targets/tvm/tuning/shapes.py), tuned at
`--tune-sizes` (default: the sizes run), timed in the same rounds: the 'tuned' columns, and the
per-kernel choices after each model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dynamic_models as dm  # noqa: E402

import graphopt  # noqa: E402


#: the clock timings read: wall time, or this process's CPU time (`--cpu-time`)
_CLOCK = time.perf_counter


def _median_ms(fn, repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t = _CLOCK()
        fn()
        ts.append((_CLOCK() - t) * 1e3)
    return float(np.median(ts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="detector_dyn,encoder_dyn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--sizes", action="append", default=[], metavar="MODEL=AxBxC,...",
                    help="sizes to run for MODEL (default: tools/dynamic_models.SIZES)")
    ap.add_argument("--buckets", action="store_true",
                    help="also compile cpu{buckets=...} with the sizes run (every symbolic dim but N) and time it "
                         "(the 'bucket' column: dispatch to the specialised kernels included)")
    ap.add_argument("--tune-shapes", action="store_true",
                    help="also compile the dynamic model with tune_shapes= at --tune-sizes and time it (the 'tuned' columns)")
    ap.add_argument("--tune-sizes", action="append", default=[], metavar="MODEL=AxBxC,...",
                    help="--tune-shapes: the sizes to tune MODEL at (default: the sizes run)")
    ap.add_argument("--tune-minutes", type=float, default=None, help="--tune-shapes: time budget per model")
    ap.add_argument("--tuning-db", default=None, help="--tune-shapes: keep/reuse the choices in this folder")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with this process's CPU time, not wall time: robust on a shared, overloaded machine "
                         "with --threads 1 (with more threads it sums theirs)")
    args = ap.parse_args(argv)
    global _CLOCK
    _CLOCK = time.process_time if args.cpu_time else time.perf_counter
    wanted = {k: [tuple(int(d) for d in s.split("x")) for s in v.split(",")]
              for k, v in (x.split("=", 1) for x in args.sizes)}
    tune_at = {k: [tuple(int(d) for d in s.split("x")) for s in v.split(",")]
               for k, v in (x.split("=", 1) for x in args.tune_sizes)}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = args.threads
    print(f"threads={args.threads} target={args.target} (median {'CPU' if args.cpu_time else 'wall'} ms, "
          f"best of {args.rounds} rounds of {args.repeat})")
    print(f"{'model':14s} {'size':16s} {'dynamic':>9s} {'fixed':>9s} {'ort':>9s} {'dyn/fixed':>9s} {'dyn/ort':>8s}  max|err|"
          + ("   bucket  bkt/ort" if args.buckets else "")
          + ("    tuned tun/dyn tun/fix tun/ort  tuned|err|" if args.tune_shapes else ""))
    for name in args.models.split(","):
        model = dm.MODELS[name]()
        inp, sizes = dm.SIZES[name]
        sizes = wanted.get(name, sizes[:3])
        t = time.perf_counter()
        dyn = graphopt.compile(model, args.target, "-O2", threads=args.threads)
        t_dyn = time.perf_counter() - t
        dyn_run = dyn.runner(threads=args.threads)
        bkt_run = None
        if args.buckets:  # every symbolic dim of the input but the batch, at the sizes run
            dims = [d.dim_param for d in next(i for i in model.graph.input if i.name == inp).type.tensor_type.shape.dim]
            spec = ";".join(f"{d}:{','.join(sorted({str(s[ax]) for s in sizes}, key=int))}"
                            for ax, d in enumerate(dims) if d and d != "N")
            bkt_run = graphopt.compile(model, f"{args.target}{{buckets={spec}}}", "-O2", threads=args.threads).runner(threads=args.threads)
        tun_run = None
        if args.tune_shapes:
            at = tune_at.get(name, sizes)
            spec = ";".join(f"{inp}={'x'.join(map(str, s))}" for s in at)
            t = time.perf_counter()
            tun = graphopt.compile(model, args.target, "-O2", threads=args.threads, tune_shapes=spec,
                                   tune_minutes=args.tune_minutes, tuning_db=args.tuning_db)
            t_tun = time.perf_counter() - t
            tun_run = tun.runner(threads=args.threads)
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for size in sizes:
            x = np.random.default_rng(0).standard_normal(size).astype(np.float32)
            feeds = {inp: x}
            got, want = dyn_run.run(feeds), sess.run(None, feeds)
            err = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
            fixed = graphopt.compile(model, args.target, "-O2", threads=args.threads, input_shapes={inp: size})
            fixed_run = fixed.runner(threads=args.threads)
            best = {"dyn": np.inf, "fixed": np.inf, "ort": np.inf, "bkt": np.inf, "tun": np.inf}
            tun_err = max(float(np.abs(g - w).max()) for g, w in zip(tun_run.run(feeds), want)) if tun_run is not None else 0.0
            for _ in range(args.rounds):
                if tun_run is not None:
                    best["tun"] = min(best["tun"], _median_ms(lambda: tun_run.run(feeds), args.repeat))
                if bkt_run is not None:
                    best["bkt"] = min(best["bkt"], _median_ms(lambda: bkt_run.run(feeds), args.repeat))
                best["dyn"] = min(best["dyn"], _median_ms(lambda: dyn_run.run(feeds), args.repeat))
                best["fixed"] = min(best["fixed"], _median_ms(lambda: fixed_run.run(feeds), args.repeat))
                best["ort"] = min(best["ort"], _median_ms(lambda: sess.run(None, feeds), args.repeat))
            print(f"{name:14s} {'x'.join(map(str, size)):16s} {best['dyn']:9.3f} {best['fixed']:9.3f} {best['ort']:9.3f} "
                  f"{best['dyn'] / best['fixed']:9.2f} {best['dyn'] / best['ort']:8.2f}  {err:.1e}"
                  + (f" {best['bkt']:8.3f} {best['bkt'] / best['ort']:8.2f}" if bkt_run is not None else "")
                  + (f" {best['tun']:8.3f} {best['tun'] / best['dyn']:7.2f} {best['tun'] / best['fixed']:7.2f} "
                     f"{best['tun'] / best['ort']:7.2f}  {tun_err:.1e}" if tun_run is not None else ""))
            if bkt_run is not None:
                assert bkt_run.last_dispatch.startswith("bucket"), bkt_run.last_dispatch
        print(f"{name}: dynamic artifact compiled once in {t_dyn:.1f} s")
        if tun_run is not None:
            shp = tun.manifest["tuning"]["shapes"]
            print(f"{name}: tuned at {'; '.join('x'.join(map(str, s)) for s in tune_at.get(name, sizes))} in {t_tun:.1f} s "
                  f"({shp['tuned']} kernels tuned, {shp['kept_default']} kept the default, {shp['reused']} from the database, "
                  f"stopped: {shp['stopped']})")
            for k, c in shp["kernels"].items():
                how = (f"{c['choice']} {c.get('ratio', 1.0):.2f}x" if c["choice"] != "default"
                       else f"default ({c.get('why', '')})")
                print(f"  {k}: {c.get('rule')}: {how}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

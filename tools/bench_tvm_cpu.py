"""Benchmark the cpu target (TVM) against onnxruntime on the corpus models.

    .venv/bin/python tools/bench_tvm_cpu.py [--models resnet50,mobilenetv2,bert_base_s128]
        [--threads 2] [--budget 20] [--tune N] [--tune-minutes M] [--tuning-db DIR] [--json out.json]

    # before/after a default-schedule change, in the same rounds (the knobs off = the old schedules):
    .venv/bin/python tools/bench_tvm_cpu.py --models bert_base_s128 --budget 30 \
        --schedule-knobs 'INLINE_EPILOGUE:0;MATMUL_WIDE_VT:0;MATMUL_K_BLOCK:0;ROW_REDUCTION:0'

    # a trained model at batch 64 (symbolic batch, as shipped) beside the same model compiled with the
    # batch fixed to 64, and its int8 build (the quantize pass + the cpu target), all against
    # onnxruntime fp32 at N = 64 in the same rounds:
    .venv/bin/python tools/bench_tvm_cpu.py --models .cache/real/mnist_resnet8.onnx --batch 0 --run-batch 64 \
        --compare-batch 64 --threads 2
    .venv/bin/python tools/bench_tvm_cpu.py --models .cache/real/mnist_resnet8.onnx --batch 0 --run-batch 64 \
        --pipeline='-O2,quantize{scheme=int8,speed=off,data=.cache/real/mnist_resnet8.calib.npz}'

    # tune into a database for 25 minutes, benchmark the tuned artifact, then recompile with the
    # warm database (timed) and benchmark that too, all against onnxruntime in the same rounds:
    nice -n 10 .venv/bin/python tools/bench_tvm_cpu.py --models resnet50 --tune-minutes 25 --tuning-db DIR

Per model (.cache/corpus/<name>.onnx, made by tools/make_corpus.py, or a path to an .onnx file; batch 1,
compiled with the symbolic batch fixed to 1 unless --batch 0 (then run at --run-batch)):
- compile: wall seconds of graphopt.compile(model, "cpu", "-O2") and its stages (passes are
  included in the wall figure), kernel groups (and how many were emitted inline), and whether
  the default schedules were applied;
- numerics: max abs difference of the artifact's outputs against onnxruntime on the same
  random inputs;
- latency: the artifact (TVM VM, --threads threads) and onnxruntime with ORT_ENABLE_ALL and the
  same intra-op thread count, run round-robin (one call each per round, after warm-up) and
  compared by their medians; the ratio tvm/ort (< 1: TVM is faster) is from this one run;
- GFLOP/s of both (FLOPs of Conv/ConvTranspose/MatMul/Gemm from the inferred shapes) against
  the machine's measured peak: a 2048×2048 float32 numpy matmul, measured in the same run.

The machine may be shared: absolute times are noisy, the ratios from one run are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import graphopt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, ".cache", "corpus")
DEFAULT_MODELS = ["resnet50", "mobilenetv2", "bert_base_s128"]


def model_flops(path: str) -> float:
    """2·MACs of Conv/ConvTranspose/MatMul/Gemm from graphopt's IR types (symbolic dims as 1)."""
    m = graphopt.load(onnx.shape_inference.infer_shapes(onnx.load(path)))

    def dims(v) -> list[int] | None:
        if v is None or v.shape is None:
            return None
        return [d if isinstance(d, int) else 1 for d in v.shape.dims]

    flops = 0.0
    for n in m.graph.nodes:
        y = dims(n.outputs[0]) if n.outputs else None
        if not y:
            continue
        if n.op_type in ("Conv", "ConvTranspose"):
            w = dims(n.inputs[1])
            if w:
                flops += 2.0 * float(np.prod(y)) * float(np.prod(w[1:]))
        elif n.op_type in ("MatMul", "Gemm"):
            a = dims(n.inputs[0])
            if a:
                k = a[0] if n.op_type == "Gemm" and n.attr("transA", 0) else a[-1]
                flops += 2.0 * float(np.prod(y)) * k
    return flops


def static_batch(path: str, batch: int) -> onnx.ModelProto:
    """The model with every symbolic input/output dimension set to `batch` (the benchmark runs
    batch `batch` on both sides): static shapes let every kernel be tuned (meta_schedule tunes
    static shapes only) and specialised."""
    m = onnx.load(path)
    for vi in list(m.graph.input) + list(m.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") or not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = batch
    return onnx.shape_inference.infer_shapes(m)


def peak_gflops(threads: int) -> float:
    """A large float32 numpy matmul (numpy's BLAS, `threads` threads if it honours the env)."""
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    a @ a
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e9


def with_target_option(spec: str, key: str, value: str) -> str:
    """`cpu{mcpu=znver3}` + schedule-knobs=X -> `cpu{mcpu=znver3,schedule-knobs=X}`."""
    name, brace, rest = spec.partition("{")
    inner = rest.rstrip("}").strip() if brace else ""
    return f"{name}{{{inner + ',' if inner else ''}{key}={value}}}"


def bench(name: str, args: argparse.Namespace, peak: float) -> dict:
    path = name if name.endswith(".onnx") else os.path.join(CORPUS, f"{name}.onnx")
    if not os.path.exists(path):
        print(f"{name}: {path} missing (run tools/make_corpus.py)", file=sys.stderr)
        return {"model": name, "missing": True}
    load_before = os.getloadavg()
    source: str | onnx.ModelProto = path
    if args.batch:
        source = static_batch(path, args.batch)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = graphopt.compile(source, args.target, args.pipeline, threads=args.threads, tune=args.tune,
                               tune_minutes=args.tune_minutes, tuning_db=args.tuning_db, progress=args.tune > 0)
    compile_s = time.perf_counter() - t
    warm = None
    warm_s = None
    if args.tuning_db and args.tune > 0 and not args.no_warm:
        # compile again with the warm database (no tuning): how long, and does it reach the tuned latency
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warm = graphopt.compile(source, args.target, args.pipeline, threads=args.threads, tuning_db=args.tuning_db)
        warm_s = time.perf_counter() - t
        print(f"{name}: warm-database recompile {warm_s:.1f} s", flush=True)
    knob_art = None
    # the compared build applies the same tuning database (tuned by the first compile, if it
    # tuned) without tuning: a tuned artifact against the untuned other build would compare more
    # than the knobs or the target
    compare_db = args.tuning_db if args.tuning_db and os.path.isdir(args.tuning_db) else None
    if args.schedule_knobs:
        # the same compile with default-schedule knobs changed (e.g. the pre-change schedules), benchmarked
        # in the same rounds: a before/after comparison on a shared machine; the knobs travel as a
        # target option (cpu{schedule-knobs=...}), never as module state
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            knob_art = graphopt.compile(source, with_target_option(args.target, "schedule-knobs", args.schedule_knobs),
                                        args.pipeline, threads=args.threads, tuning_db=compare_db)
    if args.compare:  # another target spec (machine model), same rounds
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            knob_art = graphopt.compile(source, args.compare, args.pipeline, threads=args.threads, tuning_db=compare_db)
    if args.compare_batch:  # the same target and pipeline, the symbolic dims fixed to this batch, same rounds
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            knob_art = graphopt.compile(static_batch(path, args.compare_batch), args.target, args.pipeline,
                                        threads=args.threads)
    mm = art.manifest["target"].get("machine", {})
    print(f"{name}: machine model {mm.get('mcpu')} ({mm.get('vector_bits')}-bit, {mm.get('lanes_fp32')} fp32 lanes, "
          f"{mm.get('accumulators')} accumulators, int8 {mm.get('int8_dot')})", flush=True)
    model = graphopt.load(path)
    from graphopt.check import random_inputs

    run_batch = args.run_batch or args.batch or 1
    feeds = random_inputs(model, seed=0, dim_values={d: run_batch for d in ("batch", "N", "batch_size")})
    # integer inputs are token ids / type ids / masks: keep them valid for every vocabulary
    feeds = {k: (v % 2 if v.dtype.kind in "iu" else v) for k, v in feeds.items()}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    ref = sess.run(None, feeds)

    def prepared(a) -> tuple[Callable[[], Any], float]:
        """A call of artifact `a`'s VM function with the feeds and weights bound (no input
        conversion in the timed loop), and its max abs difference from onnxruntime."""
        r = a.runner(threads=args.threads)
        err = max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(ref, r.run(feeds)))
        bound = r._feeds(feeds)
        return (lambda: r._main(*bound, *r._params)), err

    tvm_call, maxabs = prepared(art)

    def ort_call() -> None:
        sess.run(None, feeds)

    calls = [tvm_call, ort_call]
    if warm is not None:
        warm_call, warm_maxabs = prepared(warm)
        calls.append(warm_call)
    knob_idx = None
    if knob_art is not None:
        knob_call, knob_maxabs = prepared(knob_art)
        knob_idx = len(calls)
        calls.append(knob_call)
    for _ in range(3):
        for c in calls:
            c()
    t = time.perf_counter()
    for c in calls:
        c()
    one = time.perf_counter() - t
    rounds = int(min(args.max_runs, max(args.min_runs, args.budget / max(one, 1e-6))))
    times: list[list[float]] = [[] for _ in calls]
    for r in range(rounds):
        order = list(range(len(calls)))
        order = order[r % len(order):] + order[: r % len(order)]  # each goes first in turn
        for i in order:
            if args.gap_ms:  # (TVM's pool workers spin after a call: let them sleep first)
                time.sleep(args.gap_ms / 1e3)
            t = time.perf_counter()
            calls[i]()
            times[i].append(time.perf_counter() - t)
    mt, mo = statistics.median(times[0]), statistics.median(times[1])
    # per round tvm/ort (both ran back to back): load that drifts between rounds cancels in each ratio
    paired = statistics.median(a / b for a, b in zip(times[0], times[1]))
    flops = model_flops(path) * run_batch  # (symbolic dims count 1: the batch run scales them)
    rep = art.report
    row = {
        "model": name,
        "pipeline": args.pipeline,
        "run_batch": run_batch,
        "compile_s": round(compile_s, 2),
        "stages_s": rep.get("seconds", {}),
        "groups": art.manifest["kernels"]["groups"],
        "inline_groups": len(art.manifest["kernels"]["inline"]),
        "default_schedules": art.manifest["schedules"]["default"],
        "tuning": art.manifest.get("tuning", {}),
        "max_abs_vs_ort": maxabs,
        "rounds": rounds,
        "tvm_ms": mt * 1e3,
        "ort_ms": mo * 1e3,
        "ratio_tvm_over_ort": mt / mo,
        "paired_ratio_tvm_over_ort": paired,
        "gflop": flops / 1e9,
        "tvm_gflops": flops / mt / 1e9,
        "ort_gflops": flops / mo / 1e9,
        "peak_gflops": peak,
        "library_bytes": art.manifest["files"]["library"]["bytes"],
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    kept = (row["tuning"] or {}).get("kept") or {}
    if kept:
        if all(isinstance(v, int) for v in kept.values()):  # a compile that only applied the database
            row["kept"] = dict(kept)
        else:  # per task, from the tuning run
            row["kept"] = {k: sum(1 for v in kept.values() if v.get("kept") == k) for k in ("tuned", "variant", "default", "none")}
    if knob_idx is not None:
        row.update({"schedule_knobs": args.compare or args.schedule_knobs or f"batch fixed to {args.compare_batch}", "knobs_ms": statistics.median(times[knob_idx]) * 1e3,
                    "paired_ratio_knobs_over_ort": statistics.median(a / b for a, b in zip(times[knob_idx], times[1])),
                    "knobs_max_abs_vs_ort": knob_maxabs})
    if warm is not None:
        mw = statistics.median(times[2])
        row.update({"warm_compile_s": round(warm_s, 2), "warm_ms": mw * 1e3, "ratio_warm_over_ort": mw / mo,
                    "ratio_warm_over_tuned": mw / mt, "warm_max_abs_vs_ort": warm_maxabs,
                    "warm_stages_s": warm.report.get("seconds", {})})
    print(f"{name}: compile {compile_s:.1f} s ({row['groups']} groups, {row['inline_groups']} inline, schedules "
          f"{row['default_schedules']}); max|tvm-ort| {maxabs:.2e}; median over {rounds} rounds: tvm {mt*1e3:.2f} ms, "
          f"ort {mo*1e3:.2f} ms, tvm/ort {mt/mo:.2f}x (paired {paired:.3f}x); GFLOP/s tvm {row['tvm_gflops']:.1f}, ort {row['ort_gflops']:.1f} "
          f"(peak {peak:.1f}: {row['tvm_gflops']/peak:.0%} / {row['ort_gflops']/peak:.0%})", flush=True)
    if knob_idx is not None:
        label = (f"--compare {args.compare!r}" if args.compare else f"--compare-batch {args.compare_batch}" if args.compare_batch
                 else f"--schedule-knobs {args.schedule_knobs!r}")
        print(f"{name}: with {label}: {row['knobs_ms']:.2f} ms, paired "
              f"{row['paired_ratio_knobs_over_ort']:.3f}x ort (this compile: {paired:.3f}x); "
              f"max|knobs-ort| {knob_maxabs:.2e}", flush=True)
    if kept and row["tuning"].get("status") == "database applied":
        print(f"{name}: tuning database applied; its workloads keep: {row['kept']}", flush=True)
    elif kept:
        print(f"{name}: tuning kept per task: {row['kept']} (stopped: {row['tuning'].get('stopped')}, "
              f"{row['tuning'].get('new_trials')} new trials in {row['tuning'].get('seconds', 0):.0f} s)", flush=True)
    if warm is not None:
        print(f"{name}: warm-database recompile {warm_s:.1f} s; latency {row['warm_ms']:.2f} ms = "
              f"{row['ratio_warm_over_ort']:.2f}x ort, {row['ratio_warm_over_tuned']:.2f}x the tuned artifact; "
              f"max|warm-ort| {warm_maxabs:.2e}", flush=True)
    print(f"{name}: load average before/after {load_before[0]:.1f}/{row['loadavg_after'][0]:.1f} "
          f"(a shared machine: read the ratios)", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--target", default="cpu", help="target spec, e.g. 'cpu{mcpu=haswell}' (an AVX2 build on an "
                   "AVX-512 host) or 'cpu{mcpu=skylake-avx512}'")
    p.add_argument("--compare", default="", help="also compile with this target spec and benchmark it in the same "
                   "rounds (e.g. --target cpu --compare 'cpu{mcpu=haswell}'); with --tuning-db it applies that "
                   "database too (without tuning)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds per model")
    p.add_argument("--min-runs", type=int, default=5)
    p.add_argument("--gap-ms", type=float, default=0.0,
                   help="sleep this long before each timed call, so that a runtime's spinning workers from "
                        "the previous call (TVM's thread pool spins after a job) do not take the cores")
    p.add_argument("--max-runs", type=int, default=200)
    p.add_argument("--tune", type=int, default=0)
    p.add_argument("--tune-minutes", type=float)
    p.add_argument("--tuning-db", help="tuning database folder (with --tune/--tune-minutes: tuned into, then a "
                   "second compile with the warm database is timed and benchmarked too)")
    p.add_argument("--no-warm", action="store_true", help="skip the warm-database recompile after tuning")
    p.add_argument("--batch", type=int, default=1, help="compile with symbolic input dims fixed to this (the "
                   "benchmark's batch; 0: keep them symbolic, which tuning cannot handle)")
    p.add_argument("--run-batch", type=int, default=0, help="the batch both sides run (default: --batch, or 1 "
                   "with --batch 0)")
    p.add_argument("--compare-batch", type=int, default=0, help="also compile with the symbolic dims fixed to this "
                   "batch (with --batch 0: symbolic vs fixed) and benchmark it in the same rounds")
    p.add_argument("--pipeline", default="-O2", help="the pipeline every artifact is compiled with (write --pipeline=SPEC; e.g. "
                   "'-O2,quantize{scheme=int8,speed=off,data=calib.npz}'); onnxruntime runs the original model")
    p.add_argument("--schedule-knobs", default="",
                   help="also compile with these default-schedule knobs ('NAME:INT;...' of tvm/schedules/knobs.py, the target's schedule-knobs option; "
                        "for graphopt.targets.MODULE, e.g. 'MATMUL_K_BLOCK=0;ROW_REDUCTION=0' or "
                        "'tvm.layout.FLAT_MAX_IH=0') and benchmark it in the same rounds")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--in-process", action="store_true", help="all models in this process (default: one process each)")
    args = p.parse_args(argv)
    if args.tune_minutes and args.tune <= 0:
        args.tune = 1_000_000  # a time budget only: the minutes decide
    if sum(map(bool, (args.compare, args.schedule_knobs, args.compare_batch))) > 1:
        p.error("--compare, --compare-batch and --schedule-knobs: one at a time")
    if args.tune > 0 and not args.tuning_db:
        p.error("--tune/--tune-minutes need --tuning-db DIR")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    peak = peak_gflops(args.threads)
    print(f"machine peak (2048² float32 numpy matmul): {peak:.1f} GFLOP/s; threads {args.threads}", flush=True)
    models = [m for m in args.models.split(",") if m]
    if len(models) == 1 or args.in_process:
        rows = [bench(m, args, peak) for m in models]
    else:
        # one process per model: TVM's worker threads and onnxruntime's from an earlier model
        # otherwise stay around and slow the next one down (ORT ResNet-50 ran 1.9x slower after BERT)
        rows = []
        for m in models:
            with tempfile.TemporaryDirectory() as d:
                out = os.path.join(d, "rows.json")
                argv_m = [sys.executable, os.path.abspath(__file__), "--models", m, "--threads", str(args.threads),
                          "--budget", str(args.budget), "--gap-ms", str(args.gap_ms), "--min-runs", str(args.min_runs), "--max-runs", str(args.max_runs),
                          "--tune", str(args.tune), "--json", out, "--batch", str(args.batch),
                          "--run-batch", str(args.run_batch), "--compare-batch", str(args.compare_batch),
                          f"--pipeline={args.pipeline}"]
                argv_m += ["--tune-minutes", str(args.tune_minutes)] if args.tune_minutes else []
                argv_m += ["--tuning-db", args.tuning_db] if args.tuning_db else []
                argv_m += ["--no-warm"] if args.no_warm else []
                argv_m += ["--schedule-knobs", args.schedule_knobs] if args.schedule_knobs else []
                argv_m += ["--target", args.target] + (["--compare", args.compare] if args.compare else [])
                subprocess.run(argv_m, check=False)
                rows += json.load(open(out)) if os.path.exists(out) else [{"model": m, "failed": True}]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

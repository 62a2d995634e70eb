"""int8 vs fp32 compile time of the cpu target, per phase, on the corpus CNNs (issue: "int8 compiles
as fast as fp32", goal ≤ 2x).

    .venv/bin/python tools/bench_int8_compile.py [--models mobilenetv2,resnet50]
        [--targets 'cpu{mcpu=znver4};cpu{mcpu=znver3}'] [--threads 2] [--top 8] [--json out.json]
        [--corpus .cache/real --models digits_cnn]

Per model and target: the fp32 model and its int8 version (`-O2,quantize{speed=off}`, static QDQ
calibrated on synthetic inputs, reduce-range following the target's machine model: the same int8
model `tools/bench_int8_kernels.py` runs) are compiled for the target; the compile report's phase
times (lower-fuse, schedule, pack-weights, build = LLVM optimization, export = LLVM code generation
and link; cpu = the compile's CPU seconds, this process and the linker, steadier than the wall
times on a shared machine) are printed side by side with the int8/fp32 ratio of each, and the
verdict against the 2x goal (on the wall total). `--top N` also lists the N largest kernels of each int8 build by LLVM IR lines (the
over-unrolled ones, if any: LLVM's time grows with a function's size; parallel bodies counted in
their kernel, `build.llvm_ir_lines`) and the IR total of both.

Quantized models are cached under `--cache` (default .cache/int8_compile) keyed by model and
machine model (the quantize pass is not what is measured). The machine may be shared: compare the
ratios of one run, not absolute times, and name the CPU the figures come from.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import warnings
from typing import Any

import onnx

import graphopt
from graphopt.target import get_target
from graphopt.targets.tvm import build as B
from graphopt.transform import PassContext, optimize, parse_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, ".cache", "corpus")
CNNS = ("mobilenetv2", "resnet50", "resnet18", "efficientnet_b0", "googlenet", "densenet121")
PHASES = ("lower-fuse", "schedule", "pack-weights", "build", "export", "total", "cpu")
GOAL = 2.0


def quantized(name: str, machine: Any, cache: str, corpus: str = CORPUS) -> onnx.ModelProto:
    """The int8 (static QDQ) version of corpus model `name` for `machine` (cached)."""
    key = f"{name}.{machine.int8_dot or 'none'}.int8.onnx"
    path = os.path.join(cache, key)
    if os.path.exists(path):
        return onnx.load(path)
    m = graphopt.load(os.path.join(corpus, f"{name}.onnx"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = graphopt.to_onnx(optimize(m, parse_pipeline("-O2,quantize{speed=off}"), ctx=PassContext(machine=machine)))
    os.makedirs(cache, exist_ok=True)
    onnx.save(out, path + ".tmp")
    os.replace(path + ".tmp", path)
    return out


def compile_one(model: onnx.ModelProto, spec: str, threads: int, want_ir: bool) -> tuple[dict[str, float], collections.Counter | None]:
    """Phase seconds of one cpu-target compile (and the IR sizes of its library when asked); "cpu":
    the CPU seconds the compile took (this process and the linker it runs), steadier than the wall
    times on a shared machine."""
    target = get_target(spec)
    captured: dict[str, Any] = {}
    if want_ir:
        build = type(target).build

        def capture(self: Any, mod: Any, tgt: Any) -> Any:
            ex = build(self, mod, tgt)
            captured["ex"] = ex
            return ex

        target.build = capture.__get__(target)  # this instance only
    t0 = os.times()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = graphopt.compile(model, target, "-O2", threads=threads)
    t1 = os.times()
    secs = {k: float(v) for k, v in art.report.get("seconds", {}).items()}
    secs["cpu"] = sum(b - a for a, b in zip(t0[:4], t1[:4]))  # user + system, self + children
    sizes = collections.Counter(B.llvm_ir_lines(captured["ex"])) if "ex" in captured else None
    return secs, sizes


def bench(name: str, spec: str, args: argparse.Namespace) -> dict:
    path = os.path.join(args.corpus, f"{name}.onnx")
    if not os.path.exists(path):
        return {"model": name, "target": spec, "skipped": f"{path} missing (tools/make_corpus.py, tools/real_corpus.py)"}
    machine = get_target(spec).machine_model(args.threads)
    q = quantized(name, machine, args.cache, args.corpus)
    fp = onnx.load(path)
    want_ir = args.top > 0
    fp_s, fp_ir = compile_one(fp, spec, args.threads, want_ir)
    q_s, q_ir = compile_one(q, spec, args.threads, want_ir)
    row: dict = {"model": name, "target": spec, "mcpu": machine.to_json().get("mcpu"), "int8_dot": machine.int8_dot,
                 "fp32_s": {k: round(fp_s.get(k, 0.0), 2) for k in PHASES},
                 "int8_s": {k: round(q_s.get(k, 0.0), 2) for k in PHASES}}
    row["ratio"] = {k: round(q_s.get(k, 0.0) / max(fp_s.get(k, 0.0), 1e-9), 2) for k in PHASES}
    row["meets_goal"] = row["ratio"]["total"] <= GOAL
    if want_ir and fp_ir is not None and q_ir is not None:
        row["ir_lines"] = {"fp32": sum(fp_ir.values()), "int8": sum(q_ir.values()),
                           "fp32_largest": max(fp_ir.values(), default=0), "int8_largest": max(q_ir.values(), default=0)}
        row["int8_largest_kernels"] = q_ir.most_common(args.top)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(CNNS), help=f"comma-separated corpus models (default: {','.join(CNNS)})")
    ap.add_argument("--targets", default="cpu{mcpu=znver4};cpu{mcpu=znver3}", help="';'-separated cpu target specs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=0, help="list the N largest int8 kernels by LLVM IR lines")
    ap.add_argument("--corpus", default=CORPUS, help="folder of the models (default .cache/corpus; the real-model "
                    "corpus: .cache/real)")
    ap.add_argument("--cache", default=os.path.join(ROOT, ".cache", "int8_compile"))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    for spec in [s.strip() for s in args.targets.split(";") if s.strip()]:
        for name in [n.strip() for n in args.models.split(",") if n.strip()]:
            row = bench(name, spec, args)
            rows.append(row)
            if "skipped" in row:
                print(f"{spec} {name}: skipped: {row['skipped']}", flush=True)
                continue
            cols = "  ".join(f"{k} {row['fp32_s'][k]:.1f}/{row['int8_s'][k]:.1f} ({row['ratio'][k]:.2f}x)" for k in PHASES)
            verdict = "ok" if row["meets_goal"] else f"OVER the {GOAL:.0f}x goal"
            print(f"{spec} {name} [fp32 s / int8 s (int8/fp32)]: {cols}  -> {verdict}", flush=True)
            if "ir_lines" in row:
                ir = row["ir_lines"]
                top = ", ".join(f"{k} {v}" for k, v in row["int8_largest_kernels"])
                print(f"    LLVM IR lines fp32 {ir['fp32']} (largest fn {ir['fp32_largest']}), int8 {ir['int8']} "
                      f"(largest fn {ir['int8_largest']}); int8 largest: {top}", flush=True)
    if args.json:
        with open(args.json + ".tmp", "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    worst = max((r["ratio"]["total"] for r in rows if "ratio" in r), default=0.0)
    worst_cpu = max((r["ratio"]["cpu"] for r in rows if "ratio" in r), default=0.0)
    print(f"worst int8/fp32 total compile time: {worst:.2f}x wall, {worst_cpu:.2f}x CPU (goal ≤ {GOAL:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

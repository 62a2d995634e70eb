"""Benchmark `low-rank` on MiniLM (tools/real_models.py): plain vs data-aware SVD at equal rank,
and the FLOPs / latency / cosine curve over the energy.

    nice -n 10 .venv/bin/python tools/bench_lowrank.py [--ranks 64,128] [--energies 0.8,0.85,0.9,0.95,0.99]
        [--curve aware|plain] [--refit] [--threads 2] [--budget 8] [--skip-ranks] [--skip-curve]

Build MiniLM first (see tools/real_models.py). The pass factorizes the 36 weight MatMuls of
MiniLM's 6 layers (attention Q/K/V/output, FFN in/out); the 12 attention MatMuls of two
activations are not candidates. Calibration: the 128 calibration sentences (never the test
split). Printed per row: the model's FLOPs after/before (graphopt's count: MatMul/Gemm/Conv),
layers factorized, mean per-layer output SQNR on the calibration tokens (dB; plain: for white
inputs), the mean and min cosine of the 256 test-sentence embeddings to the fp32 torch ones,
and (curve) the onnxruntime latency ratio against the unfactorized model, 8 test sentences per
run, `--threads` threads, median of paired per-round ratios measured in the same rounds
(>1: faster). The machine may be shared: compare ratios, not milliseconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import graphopt
from graphopt.passes.quantize import measure
from graphopt.transform import PassContext, get_pass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import real_models as rm  # noqa: E402


def factorize(model: graphopt.Model, **opts: object) -> tuple[graphopt.Model, dict, float]:
    out = model.clone()
    t = time.perf_counter()
    res = get_pass("low-rank")(**opts).run(out, PassContext())
    return out, res.stats, time.perf_counter() - t


def row(label: str, stats: dict, secs: float, ev: dict, extra: str = "") -> str:
    sq = [v for k, v in stats.items() if k.endswith("/sqnr-db")]
    ratio = stats["flops-after"] / max(stats["flops-before"], 1)
    return (f"| {label} | {ratio:.3f} | {stats['layers-factorized']} | {np.mean(sq) if sq else float('nan'):.1f} | "
            f"{ev['mean_cosine']:.4f} | {ev['min_cosine']:.4f} |{extra} {secs:.0f} s |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="64,128")
    ap.add_argument("--energies", default="0.8,0.85,0.9,0.95,0.99")
    ap.add_argument("--curve", default="aware", choices=("aware", "plain"))
    ap.add_argument("--refit", action="store_true", help="also the least-squares refit in graph order (slow: a model run per wave)")
    ap.add_argument("--samples", type=int, default=128, help="calibration sentences the pass reads")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=8.0, help="seconds of paired latency rounds")
    ap.add_argument("--skip-ranks", action="store_true")
    ap.add_argument("--skip-curve", action="store_true")
    a = ap.parse_args()
    base = graphopt.load(str(rm.model_path("minilm")))
    cal = str(rm.calibration_path("minilm"))
    ref = rm.evaluate("minilm", base)
    print(f"MiniLM fp32 (onnxruntime vs torch): mean cosine {ref['mean_cosine']:.6f}")
    if not a.skip_ranks:
        print("\n| rank (every layer) / method | FLOPs ratio | layers | mean layer SQNR dB | mean cos | min cos | pass |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in (int(x) for x in a.ranks.split(",") if x):
            variants = [("plain SVD", dict(rank=r)), ("data-aware", dict(rank=r, calibration=cal, refit="false", samples=a.samples))]
            if a.refit:
                variants.append(("data-aware + refit", dict(rank=r, calibration=cal, refit="true", samples=a.samples)))
            for label, opts in variants:
                m, st, secs = factorize(base, **opts)
                print(row(f"{r} / {label}", st, secs, rm.evaluate("minilm", m)), flush=True)
    if not a.skip_curve:
        print(f"\n| energy ({a.curve}) | FLOPs ratio | layers | mean layer SQNR dB | mean cos | min cos | ort speedup | pass |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        models, lines = [], []
        for e in (float(x) for x in a.energies.split(",") if x):
            opts = dict(energy=e) if a.curve == "plain" else dict(energy=e, calibration=cal, refit="true" if a.refit else "false",
                                                                    samples=a.samples)
            m, st, secs = factorize(base, **opts)
            models.append(m)
            lines.append((f"{e:g}", st, secs, rm.evaluate("minilm", m)))
        inputs, _ = rm.test_data("minilm", limit=8)
        _, sp = measure.paired_speedups([base] + models, inputs, threads=a.threads, budget_s=a.budget)
        for (label, st, secs, ev), s in zip(lines, sp[1:]):
            print(row(label, st, secs, ev, f" {s:.2f}x |"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SmoothQuant (`quantize{smooth=ALPHA}`) on a trained model of tools/real_models.py (MiniLM).

    nice -n 10 .venv/bin/python tools/bench_smooth.py minilm [--alphas 0,0.5,0.75]
        [--methods minmax,percentile,entropy] [--kinds] [--activations] [--seconds 20]

Variants: `-O2,quantize{scheme=int8,speed=rules,data=CALIB,calibration=M,smooth=A}` for every
alpha A (0: off) with M=minmax, and the other methods M with the non-zero alphas (in dynamic mode
(transformers) the method only changes smoothing's channel statistic: percentile takes that
percentile of |x| per channel, the others the max). Per variant: how many inputs/layers were
smoothed, the mean and min cosine of the embeddings to the fp32 torch ones on the whole test
split (real_models.evaluate, 256 sentences), and the latency on onnxruntime (2 threads, batch 1,
the first test sentence) paired against the fp32 original in the same rounds (median of the
per-round ratios, the order alternating); also the -O2 fp32 model with and without smoothing alone
(the same kernels, unless onnxruntime's fusions stop matching the changed constants).

--activations: also smooth-activations=true (the GELU's scalar 0.5 takes 1/s too: the FFN output
projections are smoothed, and onnxruntime no longer fuses those GELUs into BiasGelu).

--kinds: which layers carry the int8 error: int8 on one kind of layer only (BERT names: q/k/v,
attention output, FFN in, FFN out), with and without smoothing, cosine on the test split.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import real_models as rm  # noqa: E402

KINDS = {  # BERT layer names (HF export): which weight layers belong to each kind
    "qkv": ("attention/self/query", "attention/self/key", "attention/self/value"),
    "attn-out": ("attention/output/dense",),
    "ffn-in": ("intermediate/dense",),
    "ffn-out": ("/output/dense",),
}


def _kind(name: str) -> str | None:
    for k, keys in KINDS.items():
        if any(key in name for key in keys) and not (k == "ffn-out" and "attention" in name):
            return k
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="minilm")
    ap.add_argument("--alphas", default="0,0.5,0.75")
    ap.add_argument("--methods", default="minmax,percentile,entropy")
    ap.add_argument("--kinds", action="store_true", help="int8 on one kind of layer at a time")
    ap.add_argument("--activations", action="store_true", help="also the variants with smooth-activations=true")
    ap.add_argument("--seconds", type=float, default=20.0, help="paired latency rounds in all")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import graphopt
    from graphopt.passes.quantize import measure
    from graphopt.transform import PassContext, parse_pipeline

    cal = str(rm.calibration_path(args.model))
    model = graphopt.load(str(rm.model_path(args.model)))
    base = graphopt.optimize(model, "-O2")
    alphas = [float(a) for a in args.alphas.split(",")]
    methods = args.methods.split(",")
    variants: list[tuple[str, str]] = [(f"minmax a={a:g}", f"calibration=minmax,smooth={a:g}") for a in alphas]
    variants += [(f"{m} a={a:g}", f"calibration={m},smooth={a:g}") for m in methods if m != "minmax" for a in alphas if a > 0]
    layer_names = [n.name for n in base.graph if n.op_type in ("MatMul", "Gemm") and n.inputs[1] is not None
                   and n.inputs[1].const_value is not None]
    if args.activations:
        variants += [(f"minmax a={a:g} +gelu", f"calibration=minmax,smooth={a:g},smooth-activations=true") for a in alphas if a > 0]
    if args.kinds:
        for k in KINDS:
            off = [n for n in layer_names if _kind(n) != k]
            for a in (0.0, 0.5):
                variants.append((f"only {k} a={a:g}", f"calibration=minmax,smooth={a:g},exclude=" + ":".join(off)))

    print(f"# {args.model}: {len(layer_names)} weight layers; load before: {os.getloadavg()[0]:.2f}", flush=True)
    built: list[tuple[str, Any, dict[str, Any]]] = []
    for label, opts in variants:
        (p,) = parse_pipeline(f"quantize{{scheme=int8,speed=rules,data={cal},{opts}}}")
        m = base.clone()
        ctx = PassContext()
        t0 = time.perf_counter()
        res = p.run(m, ctx)
        took = time.perf_counter() - t0
        sm = ctx.data["quantize"].get("smooth", {})
        cos = rm.evaluate(args.model, m, threads=args.threads)
        c64 = rm.evaluate(args.model, m, threads=args.threads, limit=64)["mean_cosine"]  # the search's eval sentences
        row = {"smoothed-inputs": res.stats.get("smoothed-inputs", 0), "smoothed-layers": res.stats.get("smoothed-layers", 0),
               "int8": res.stats.get("units-int8", 0), "mean_cosine": cos["mean_cosine"], "min_cosine": cos["min_cosine"], "cos64": c64,
               "max-scale": max((e["max-scale"] for e in sm.get("smoothed", [])), default=None), "quantize-s": round(took, 1)}
        print(f"{label:26s} int8 {row['int8']:2d}  smoothed {row['smoothed-layers']:2d} layers / {row['smoothed-inputs']:2d} inputs"
              f"  cosine mean {row['mean_cosine']:.5f} min {row['min_cosine']:.5f} first-64 {c64:.5f}  max scale {row['max-scale']}  ({took:.0f} s)", flush=True)
        if sm.get("not-smoothed") and label == variants[1][0]:
            for why, xs in sm["not-smoothed"].items():
                print(f"    not smoothed: {len(xs)} x {why}")
        if sm.get("smoothed") and label == variants[1][0]:
            for e in sm["smoothed"]:
                print(f"    {e['input'][-60:]:60s} {e['producer'][:60]:60s} scale max {e['max-scale']:.3g}"
                      f" outlier ratio {e['x-outlier-ratio']} -> {e['x-outlier-ratio-after']}")
        built.append((label, m, row))

    timed = [(label, m) for label, m, _ in built if not label.startswith("only")]
    # smoothing alone (float): the same kernels, unless onnxruntime's fusions see other constants
    from graphopt.calibration import load_calibration
    from graphopt.passes.quantize import smooth_quant

    fs = base.clone()
    smooth_quant(fs, load_calibration(cal, fs), max(alphas))
    timed += [("fp32 -O2", base), (f"fp32 -O2 smoothed a={max(alphas):g}", fs)]
    x, _ = rm.test_data(args.model, limit=1)
    feeds = {i.name: x[i.name] for i in model.graph.inputs}
    load0 = os.getloadavg()[0]
    t, sp = measure.paired_speedups([model] + [m for _, m in timed], feeds, threads=args.threads, budget_s=args.seconds)
    print(f"\n# latency: onnxruntime {args.threads} threads, batch 1, paired rounds against fp32 ({t[0] * 1e3:.2f} ms); "
          f"load {load0:.2f} before, {os.getloadavg()[0]:.2f} after")
    for (label, _), ti, s in zip(timed, t[1:], sp[1:]):
        print(f"{label:26s} {ti * 1e3:7.2f} ms  {s:.2f}x fp32")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())

"""The pipeline search (graphopt-compile --search) on trained models of tools/real_models.py.

    .venv/bin/python tools/bench_search.py mnist_resnet8 --trials 40 --budget top1:1
    .venv/bin/python tools/bench_search.py minilm --trials 16 --budget cosine:0.99 --eval 64

Per model: the evaluation data is the model's test split (--eval samples; classifiers with their
labels), calibration the model's calibration file (training split), both as real_models gives
them. The search measures int8-alone (`quantize` holding the budget itself, speed=measure) and
prune-alone (`prune{ratio=0.5}` backing off until the budget holds) as references in the same
run, each trial's latency paired against the fp32 original in the same rounds (onnxruntime, its
default threads: 2 on this machine). Prints the front, the best speedup, and whether the front
dominates both references; the study stays in .cache/search/<model>/ (rerun to resume it).
Also scores the best pipeline with real_models.evaluate on the whole test split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import real_models as rm  # noqa: E402

from graphopt.pipeline_search import reference_standing  # noqa: E402


def _fmt(m: dict[str, float]) -> str:
    return f"accuracy {100 * m['accuracy']:.2f} %" if "accuracy" in m else f"mean cosine {m['mean_cosine']:.5f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=rm.list_models(all_known=True))
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--budget", default=None, help="default: top1:1 for classifiers, cosine:0.99 for minilm")
    ap.add_argument("--eval", type=int, default=1000, help="test samples the search evaluates on")
    ap.add_argument("--latency-batch", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=4.0, help="paired latency rounds per trial")
    ap.add_argument("--dir", default=None, help="default .cache/search/<model>")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--target", default="onnx", help="what each trial compiles for (onnx: onnxruntime; cpu: the "
                    "compiled artifact), timed against the fp32 original on onnxruntime")
    args = ap.parse_args(argv)

    import graphopt

    spec = rm.SPECS[args.model]
    budget = args.budget or ("top1:1" if spec.kind == "classifier" else "cosine:0.99")
    d = Path(args.dir or ROOT / ".cache" / "search" / (args.model if args.target == "onnx" else f"{args.model}-{args.target}"))
    d.mkdir(parents=True, exist_ok=True)
    x, y = rm.test_data(args.model, limit=args.eval)
    val = d / "val.npz"
    np.savez(val, **x, **({"labels": y} if spec.kind == "classifier" else {}))
    t0 = time.perf_counter()
    res = graphopt.search(str(rm.model_path(args.model)), str(val), directory=str(d), budget=budget, trials=args.trials,
                          calibration=str(rm.calibration_path(args.model)), references=True,
                          latency_seconds=args.seconds, latency_batch=args.latency_batch, trial_timeout=args.timeout,
                          target=args.target)
    took = time.perf_counter() - t0
    summary: dict[str, object] = {"model": args.model, "budget": budget, "trials": len(res.trials), "seconds": round(took),
                                  "latency_batch": args.latency_batch, "front": [t.number for t in res.front]}
    print(f"\n{args.model}: {len(res.trials)} trials in {took / 60:.1f} min, budget {budget}, latency batch {args.latency_batch}")
    if res.best is not None:
        b = res.best
        again = f" (re-measured with 3x longer rounds: {b.confirmed_speedup:.2f}x)" if b.confirmed_speedup else ""
        print(f"best: trial {b.number} {b.label}: {b.speedup:.2f}x the fp32 original's speed{again}, "
              f"{b.size / max(1, b.original_size or 1):.2f}x its size")
        # (the whole test split through onnxruntime: an .onnx result; a compiled target's folder is
        # scored by the search itself, on the eval data)
        full = rm.evaluate(args.model, res.best_output) if res.best_output and str(res.best_output).endswith(".onnx") else None
        ref = rm.reference_metrics(args.model)["fp32"]
        if full:
            print(f"best on the whole test split: {_fmt(full)} (fp32: {_fmt(ref)})")
        summary.update(best=b.number, best_label=b.label, best_speedup=b.speedup, best_confirmed_speedup=b.confirmed_speedup, best_size_ratio=b.size / max(1, b.original_size or 1),
                       best_test=full, fp32_test=ref)
    for name, r in res.references.items():
        st = reference_standing(r, res.front, "latency")
        again = f" (re-measured {r.confirmed_speedup:.2f}x)" if r.confirmed_speedup else ""
        line = (f"{r.speedup:.2f}x speed{again}, accuracy objective {r.objectives[1]:.4g}, within budget: {r.feasible}"
                if r.state == "ok" and r.objectives else f"{r.state}: {r.reason}")
        print(f"{name}: {line}; dominated by front trials {st['dominated_by'] or 'none'}"
              + (f"; the same model as front trials {st['matched_by']}" if st["matched_by"] else ""))
        summary[name] = {"speedup": r.speedup, "confirmed_speedup": r.confirmed_speedup, "objectives": r.objectives,
                         "feasible": r.feasible, **st}
    (d / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"summary: {d / 'summary.json'}; front and every trial: {d / 'pareto.json'}; plot: {d / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())

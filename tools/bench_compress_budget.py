"""Accuracy-guarded compression end to end: does the default budget hold on held-out data?

For each model, `prune{ratio=R}` and `cluster-weights{bits=B}` at the default budget (cosine
0.99), with random inputs and with calibration data where the model has some, then the result
scored end to end on data the pass never saw (the held-out split of tools/compress_models.py;
for corpus models without data: other random inputs). Prints the achieved ratio / bits, what the
pass measured and what held-out data says.

    .venv/bin/python tools/bench_compress_budget.py                     # shapes_cnn, blobs_mlp
    .venv/bin/python tools/bench_compress_budget.py --corpus resnet18   # + .cache/corpus/resnet18.onnx (minutes)
    .venv/bin/python tools/bench_compress_budget.py --ratio 0.5 --bits 3
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _cm():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("compress_models", ROOT / "tools" / "compress_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def run_one(base, spec: str):  # type: ignore[no-untyped-def]
    from graphopt.transform import PassContext, parse_pipeline

    m = base.clone()
    ctx = PassContext()
    t = time.perf_counter()
    stats = parse_pipeline(spec)[0].run(m, ctx).stats
    return m, dict(stats), ctx, time.perf_counter() - t


def main(argv: list[str]) -> int:
    import graphopt
    from graphopt.accuracy import Reference, describe
    from graphopt.check import random_inputs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--bits", type=int, default=5)
    ap.add_argument("--budget", default="cosine:0.99")
    ap.add_argument("--corpus", default="", help="comma-separated .cache/corpus model names to add (random inputs only)")
    a = ap.parse_args(argv)
    cm = _cm()
    cases = []  # (name, base model, held-out feeds, labels or None, calibration path or "")
    tmp = Path(tempfile.mkdtemp(prefix="bench-budget-"))
    for name, make in (("shapes_cnn", cm.shapes_cnn), ("blobs_mlp", cm.blobs_mlp)):
        proto, data = make()
        calib = tmp / f"{name}.npz"
        np.savez(calib, x=data.x_train[:256])
        cases.append((name, graphopt.load(proto.SerializeToString()), [{"x": data.x_test}], data.y_test, str(calib)))
    for name in filter(None, a.corpus.split(",")):
        base = graphopt.optimize(graphopt.load(str(ROOT / ".cache" / "corpus" / f"{name}.onnx")), "-O1")
        feeds = [random_inputs(base, seed=1000 + i, dim_values={}) for i in range(4)]
        cases.append((name, base, feeds, None, ""))
    print(f"budget {a.budget}; held-out = data the pass never saw (test split, or other random inputs)")
    print(f"{'model':<12} {'pass':<66} {'achieved':>9} {'pass-measured':>14} {'held-out cosine':>16} {'accuracy':>15} {'s':>6}")
    for name, base, held, labels, calib in cases:
        ref = Reference(base, held)
        specs = [f"prune{{ratio={a.ratio},accuracy-budget={a.budget}}}", f"cluster-weights{{bits={a.bits},accuracy-budget={a.budget}}}"]
        if calib:
            specs += [f"prune{{ratio={a.ratio},accuracy-budget={a.budget},calibration={calib}}}",
                      f"cluster-weights{{bits={a.bits},accuracy-budget={a.budget},calibration={calib}}}"]
        for spec in specs:
            m, st, ctx, dt = run_one(base, spec)
            score = ref.score(m)
            if spec.startswith("prune"):
                achieved = f"{st.get('achieved-ratio', 0.0):.3f}"
            else:
                n = max(1, st.get("params-clustered", 0))
                bits = sum(st[k] * st[k[:-5] + "/params"] for k in st if k.endswith("/bits")) / n if st.get("params-clustered") else 0
                achieved = f"{bits:.2f}b" if bits else "float"
            measured = st.get("output-cosine", 1.0)
            acc = ""
            if labels is not None:
                import onnxruntime as ort

                def top1(model) -> float:  # type: ignore[no-untyped-def]
                    s = ort.InferenceSession(graphopt.to_onnx(model).SerializeToString(), providers=["CPUExecutionProvider"])
                    return float((s.run(None, held[0])[0].argmax(1) == labels).mean())
                acc = f"{100 * top1(base):.1f}->{100 * top1(m):.1f}%"
            short = spec.replace(f",calibration={calib}", ",calibration=…") if calib else spec
            print(f"{name:<12} {short:<66} {achieved:>9} {measured:>14.4f} {score['cosine']:>16.4f} {acc:>15} {dt:>6.1f}")
            for line in ctx.log:
                if "WARNING" in line:
                    print("   ", line)
        print(f"{'':<12} (held-out metrics of the last: {describe(score)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

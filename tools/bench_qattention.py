"""Dynamic int8 with and without contrib ops on a trained transformer of tools/real_models.py (MiniLM).

    nice -n 10 .venv/bin/python tools/bench_qattention.py [minilm] [--seconds 20] [--limit 64]

Variants, each quantized with `quantize{scheme=int8,speed=rules,data=CALIB}` (dynamic mode):
  -O2 + int8                 the Q/K/V projections as three MatMulInteger (DynamicQuantizeMatMul)
  -O2 contrib + int8         com.microsoft Attention → QAttention, the Where mask as its mask_index
  -O2 contrib + int8, attention float   the same with the Attention layers excluded (the slow path
                             before QAttention: int8 projections elsewhere, fp32 Attention)
plus the fp32 -O2 and -O2 contrib models. Per variant: the mean / min cosine of the embeddings to
the fp32 torch ones on the first `--limit` test sentences (real_models.evaluate), and the latency
on onnxruntime (2 threads, batch 1, the first test sentence) paired against the fp32 original in
the same rounds (median of per-round ratios, order alternating), with the load before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import real_models as rm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="minilm")
    ap.add_argument("--seconds", type=float, default=20.0, help="paired latency rounds in all")
    ap.add_argument("--limit", type=int, default=64, help="test sentences for the cosine")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import graphopt
    from graphopt.passes.quantize import measure
    from graphopt.transform import PassContext, parse_pipeline

    cal = str(rm.calibration_path(args.model))
    model = graphopt.load(str(rm.model_path(args.model)))
    plain = graphopt.optimize(model, "-O2")
    contrib = graphopt.optimize(model, "-O2", contrib_ops=True)
    attn = [n.name or n.outputs[0].name for n in contrib.graph if n.op_type == "Attention" and n.domain == "com.microsoft"]

    def q(base: Any, extra: str = "") -> tuple[Any, dict[str, Any]]:
        (p,) = parse_pipeline(f"quantize{{scheme=int8,speed=rules,data={cal}{extra}}}")
        m = base.clone()
        res = p.run(m, PassContext())
        return m, res.stats

    variants: list[tuple[str, Any, dict[str, Any]]] = [("fp32 -O2", plain, {}), ("fp32 -O2 contrib", contrib, {})]
    variants.append(("-O2 + int8", *q(plain)))
    variants.append(("-O2 contrib + int8", *q(contrib)))
    if attn:
        variants.append(("-O2 contrib + int8, attention float", *q(contrib, ",exclude=" + ":".join(attn))))
    print(f"# {args.model}: {len(attn)} com.microsoft Attention in -O2 contrib; load {os.getloadavg()[0]:.2f}", flush=True)
    for label, m, st in variants:
        ops: dict[str, int] = {}
        for n in m.graph:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        cos = rm.evaluate(args.model, m, threads=args.threads, limit=args.limit)
        kinds = {k: ops[k] for k in ("MatMulInteger", "QAttention", "Attention", "MatMul") if k in ops}
        print(f"{label:38s} cosine mean {cos['mean_cosine']:.5f} min {cos['min_cosine']:.5f} (n={cos['n']})  {kinds}"
              + (f"  int8 units {st.get('units-int8')}" if st else ""), flush=True)

    x, _ = rm.test_data(args.model, limit=1)
    feeds = {i.name: x[i.name] for i in model.graph.inputs}
    load0 = os.getloadavg()[0]
    t, sp = measure.paired_speedups([model] + [m for _, m, _ in variants], feeds, threads=args.threads, budget_s=args.seconds)
    print(f"\n# latency: onnxruntime {args.threads} threads, batch 1, paired rounds against fp32 ({t[0] * 1e3:.2f} ms); "
          f"load {load0:.2f} before, {os.getloadavg()[0]:.2f} after")
    for (label, _, _), ti, s in zip(variants, t[1:], sp[1:]):
        print(f"{label:38s} {ti * 1e3:7.2f} ms  {s:.2f}x fp32")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())

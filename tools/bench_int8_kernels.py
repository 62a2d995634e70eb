"""Compiled int8 (the cpu target's x86 int8 kernels: VNNI or AVX2) vs compiled fp32 vs onnxruntime, same run.

    .venv/bin/python tools/bench_int8_kernels.py [--models mlp,bert_base_s128] [--threads 2]
        [--rounds 30] [--target 'cpu{mcpu=znver3}'] [--json out.json]

Per model: the fp32 model and its int8 version (`-O2,quantize{speed=off}`: transformers get
DynamicQuantizeLinear → MatMulInteger, conv nets static QDQ (synthetic calibration); 7-bit
weights on CPUs without VNNI) are compiled for the cpu target (which turns QDQ convs into
ConvInteger and both into its x86 int8 kernels); onnxruntime runs both ONNX files. Reported:

- which kernels the int8 artifact got (`x86 int8 kernels: N (int8-u8s8-blocked, int8-small, ...)`);
- exactness: the int8 artifact's int32 accumulators are checked against numpy's integer matmul
  on the first MatMulInteger of the model (a copy of the model that also outputs them; conv
  kernels are checked against onnxruntime's ConvInteger in tests/targets/tvm/schedules/test_x86_int8.py);
  whole-model outputs are compared with onnxruntime's int8 (max |diff| relative to max |y|) and
  with fp32 (cosine);
- latency: the four variants run round-robin (one call each per round, `--rounds` rounds after
  warm-up), medians compared as ratios against compiled fp32 and onnxruntime fp32 of this run.

Models: `mlp` (built here: 128 tokens × 768 → 3072 → 768, 4 blocks, GELU, MatMul-heavy) and
the corpus models in .cache/corpus (tools/make_corpus.py). The machine may be shared: read the
ratios of one run, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

import graphopt
import graphopt.runtime as RT
from graphopt.target import get_target
from graphopt.transform import PassContext, optimize, parse_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, ".cache", "corpus")


def mlp_model(tokens: int = 128, d: int = 768, hidden: int = 3072, blocks: int = 4, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(blocks):
        w1 = (rng.standard_normal((d, hidden)) / np.sqrt(d)).astype(np.float32)
        w2 = (rng.standard_normal((hidden, d)) / np.sqrt(hidden)).astype(np.float32)
        inits += [nh.from_array(w1, f"w1_{i}"), nh.from_array(w2, f"w2_{i}"),
                  nh.from_array(np.zeros(hidden, np.float32), f"b1_{i}")]
        nodes += [h.make_node("MatMul", [x, f"w1_{i}"], [f"h{i}"]), h.make_node("Add", [f"h{i}", f"b1_{i}"], [f"hb{i}"]),
                  h.make_node("Relu", [f"hb{i}"], [f"a{i}"]), h.make_node("MatMul", [f"a{i}", f"w2_{i}"], [f"o{i}"]),
                  h.make_node("Add", [f"o{i}", x], [f"r{i}"])]
        x = f"r{i}"
    g = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", TP.FLOAT, [tokens, d])],
                     [h.make_tensor_value_info(x, TP.FLOAT, [tokens, d])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def quantize_int8(model: onnx.ModelProto, machine=None) -> onnx.ModelProto:
    """graphopt's quantize pass, speed check off (every layer it supports int8): transformers get
    dynamic MatMuls, conv nets static QDQ calibrated on synthetic inputs (labelled so in the pass
    log; the figures here are about speed and exactness, not accuracy)."""
    m = graphopt.load(model)
    # (reduce-range=auto follows `machine`: 8-bit weights for VNNI, 7-bit for AVX2's vpmaddubsw)
    out = optimize(m, parse_pipeline("-O2,quantize{speed=off}"), ctx=PassContext(machine=machine))
    return graphopt.to_onnx(out)


def feeds_for(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs; integer inputs as a transformer expects them (token ids in [100, 20000),
    attention mask 1, token types 0)."""
    from graphopt.check import random_inputs

    feeds = random_inputs(graphopt.load(model), seed=seed, dim_values={"batch": 1})
    rng = np.random.default_rng(seed)
    for k, a in feeds.items():
        if a.dtype.kind in "iu":
            if "mask" in k:
                feeds[k] = np.ones_like(a)
            elif "type" in k:
                feeds[k] = np.zeros_like(a)
            else:
                feeds[k] = rng.integers(100, 20000, a.shape).astype(a.dtype)
    return feeds


def accumulator_check(qmodel: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int, target: str = "cpu") -> dict:
    """Compile a copy of the int8 model that also outputs the first MatMulInteger's int32
    accumulators and its uint8 input; compare them with numpy's integer matmul."""
    m = onnx.ModelProto()
    m.CopyFrom(qmodel)
    node = next(n for n in m.graph.node if n.op_type == "MatMulInteger")
    w = next(i for i in m.graph.initializer if i.name == node.input[1])
    m.graph.output.extend([h.make_tensor_value_info(node.output[0], TP.INT32, None),
                           h.make_tensor_value_info(node.input[0], TP.UINT8, None),
                           h.make_tensor_value_info(node.input[2], TP.UINT8, None)])
    art = graphopt.compile(m, target, "-O2", threads=threads)
    r = RT.load(art.path)
    outs = r.run(feeds)
    acc, xq, xz = outs[-3], outs[-2], outs[-1]
    ref = (xq.astype(np.int64) - np.int64(xz)) @ nh.to_array(w).astype(np.int64)
    return {"node": node.name or node.output[0], "exact": bool(np.array_equal(acc.astype(np.int64), ref)),
            "max_abs_diff": int(np.abs(acc.astype(np.int64) - ref).max()),
            "weight_absmax": int(np.abs(nh.to_array(w).astype(np.int64)).max())}


def bench(name: str, args: argparse.Namespace) -> dict:
    if name == "mlp":
        fp = mlp_model()
    else:
        path = os.path.join(CORPUS, f"{name}.onnx")
        if not os.path.exists(path):
            return {"model": name, "skipped": f"{path} missing (tools/make_corpus.py)"}
        fp = onnx.load(path)
    t = time.perf_counter()
    machine = get_target(args.target).machine_model(args.threads)
    q = quantize_int8(fp, machine)
    t_q = time.perf_counter() - t
    feeds = feeds_for(fp)
    row: dict = {"model": name, "target": args.target, "machine": {k: machine.to_json()[k] for k in ("mcpu", "lanes_fp32", "int8_dot")},
                 "quantize_s": round(t_q, 1)}
    t = time.perf_counter()
    art_fp = graphopt.compile(fp, args.target, "-O2", threads=args.threads)
    art_q = graphopt.compile(q, args.target, "-O2", threads=args.threads)
    row["compile_s"] = round(time.perf_counter() - t, 1)
    row["int8_schedules"] = art_q.report.get("schedules", {}).get("default")
    if not args.no_exact and any(n.op_type == "MatMulInteger" for n in q.graph.node):
        row["accumulators"] = accumulator_check(q, feeds, args.threads, args.target)
    r_fp, r_q = RT.load(art_fp.path), RT.load(art_q.path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's workers spin after a run by default: on a 2-core machine they then steal the
    # cores from whatever runs next (the compiled fp32 artifact, after onnxruntime's int8: 2x)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as d:
        onnx.save(q, os.path.join(d, "q.onnx"))
        s_q = ort.InferenceSession(os.path.join(d, "q.onnx"), so, providers=["CPUExecutionProvider"])
        s_fp = ort.InferenceSession(fp.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y_ort_fp = s_fp.run(None, feeds)[0]
    y_ort_q = s_q.run(None, feeds)[0]
    y_q = r_q.run(feeds)[0]
    y_fp = r_fp.run(feeds)[0]

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))

    row["outputs"] = {
        "compiled_int8_vs_ort_int8_rel": float(np.abs(y_q - y_ort_q).max() / (np.abs(y_ort_q).max() + 1e-30)),
        "compiled_int8_vs_fp32_cosine": cos(y_q, y_ort_fp),
        "ort_int8_vs_fp32_cosine": cos(y_ort_q, y_ort_fp),
        "compiled_fp32_vs_ort_fp32_rel": float(np.abs(y_fp - y_ort_fp).max() / (np.abs(y_ort_fp).max() + 1e-30)),
    }
    calls = {
        "compiled_fp32": lambda: r_fp.run(feeds),
        "compiled_int8": lambda: r_q.run(feeds),
        "ort_fp32": lambda: s_fp.run(None, feeds),
        "ort_int8": lambda: s_q.run(None, feeds),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(3):
        for f in calls.values():
            f()
    names = list(calls)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:  # each goes first in turn
            time.sleep(args.gap_ms / 1e3)  # (TVM's pool workers spin after a call: let them sleep first)
            t = time.perf_counter()
            calls[k]()
            times[k].append((time.perf_counter() - t) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    row["median_ms"] = {k: round(v, 3) for k, v in med.items()}
    row["speedup"] = {
        "compiled_int8_over_compiled_fp32": round(med["compiled_fp32"] / med["compiled_int8"], 2),
        "compiled_int8_over_ort_fp32": round(med["ort_fp32"] / med["compiled_int8"], 2),
        "compiled_int8_over_ort_int8": round(med["ort_int8"] / med["compiled_int8"], 2),
        "ort_int8_over_ort_fp32": round(med["ort_fp32"] / med["ort_int8"], 2),
    }
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,bert_base_s128")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", default="cpu", help="cpu target spec, e.g. 'cpu{mcpu=znver3}' (AVX2 kernels)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--gap-ms", type=float, default=30.0, help="sleep before each timed call (spinning workers)")
    ap.add_argument("--no-exact", action="store_true", help="skip the accumulator check (one compile less)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    rows = []
    for name in args.models.split(","):
        row = bench(name.strip(), args)
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

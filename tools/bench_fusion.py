"""Benchmark graphopt -O2 on real-world-shaped models against onnxruntime's own optimizer.

    .venv/bin/python tools/bench_fusion.py [--models resnet50,bert_base_s128] [--budget 30]
                                           [--threads 2] [--save-dir DIR]

Reads the corpus .cache/corpus/<name>.onnx written by tools/make_corpus.py (which needs the
separate torch venv; see its docstring). Per model it prints:

- node counts: the input (and without its Constant nodes, which every optimizer here turns
  into initializers), graphopt -O2, onnxruntime's extended level on the input (the graph
  onnxruntime dumps via SessionOptions.optimized_model_filepath with ORT_ENABLE_EXTENDED), and
  onnxruntime's extended level applied to the -O2 output; graphopt's -O2 time (and its slowest
  pass); the top op types of the input, -O2 and ort-extended graphs;
- numerics on random inputs: max abs error of -O2 against the input, both run by onnxruntime with
  its optimizations disabled (graphopt's own error), next to onnxruntime's own error (all
  optimizations vs none on the input) for scale, and the largest output magnitude;
- latency on onnxruntime's CPU provider with --threads intra-op threads (sequential executor,
  batch 1): (a) the input with onnxruntime's optimizations disabled, (b) the input with its
  default (all) optimizations, (c) the -O2 output with its default optimizations, (d) the -O2
  output with onnxruntime's optimizations disabled. The three
  sessions run round-robin (one call each per round, after warm-up; intra-op thread spinning
  off, so that one session's idle threads do not steal cores from the next) and the median of each is
  reported; (a) and (c) are printed as ratios to (b) from the same run (< 1 = faster than (b)).
  The number of rounds is picked from the measured warm-up time to fit --budget seconds per
  model (clamped to [--min-runs, --max-runs]).
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

import graphopt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, ".cache", "corpus")
DEFAULT_MODELS = ["resnet50", "mobilenetv2", "efficientnet_b0", "vit_b16", "bert_base_s128", "bert_base_s128_op20"]


# ----------------------------------------------------------------------------- graph stats


def _walk(g: onnx.GraphProto):
    for node in g.node:
        yield node
        for a in node.attribute:
            if a.HasField("g"):
                yield from _walk(a.g)
            for sg in a.graphs:
                yield from _walk(sg)


def op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain.split('.')[-1]}.{node.op_type}"


def histogram(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(op_key(n) for n in _walk(proto.graph))


def top_ops(h: collections.Counter, k: int) -> str:
    items = h.most_common()
    shown = ", ".join(f"{op} {n}" for op, n in items[:k])
    rest = sum(n for _, n in items[k:])
    return shown + (f", +{len(items) - k} more op types ({rest} nodes)" if len(items) > k else "")


# ----------------------------------------------------------------------------- onnxruntime


def session(model_bytes: bytes, level: str, threads: int, dump: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    # Without this, a session's intra-op threads keep spinning after its run returns and steal
    # cores from the next session in the round-robin (on a 2-core machine that alone moved a
    # model's ratio by 30%).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if dump:
        so.optimized_model_filepath = dump
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def ort_extended(model_bytes: bytes) -> onnx.ModelProto | str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "opt.onnx")
        try:
            session(model_bytes, "extended", 1, dump=path)
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
            return f"error: {str(e).splitlines()[0][:60]}"
        return onnx.load(path, load_external_data=False)


_NP = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
}


def random_inputs(proto: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """Batch 1 (every symbolic dim is 1). Integer inputs: `*mask*` all ones, `*type*` zeros,
    others uniform in [0, 1000) (valid token ids for BERT's 30522-word vocabulary)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in proto.graph.initializer}
    feeds = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        dtype = _NP[tt.elem_type]
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = np.ones(shape, dtype)
        elif "mask" in vi.name:
            feeds[vi.name] = np.ones(shape, dtype)
        elif "type" in vi.name:
            feeds[vi.name] = np.zeros(shape, dtype)
        else:
            feeds[vi.name] = rng.integers(0, 1000, shape).astype(dtype)
    return feeds


def max_err(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(xs, ys))


# ----------------------------------------------------------------------------- one model


def bench(name: str, args: argparse.Namespace) -> dict:
    path = os.path.join(CORPUS, name + ".onnx")
    row: dict = {"name": name}
    proto = onnx.load(path)
    orig_bytes = proto.SerializeToString()
    h_in = histogram(proto)
    row["input"] = sum(h_in.values())
    row["input_nc"] = row["input"] - h_in.get("Constant", 0)

    # graphopt -O2
    model = graphopt.load(proto)
    gc.collect()
    t = time.perf_counter()
    out = graphopt.optimize(model, "-O2")
    row["o2_time"] = time.perf_counter() - t
    timings = out.meta.get("pass_timings") or []
    if timings:
        slow = max(timings, key=lambda r: r.seconds)
        row["slowest"] = f"{slow.spec} {slow.seconds:.2f}s"
    else:
        row["slowest"] = "?"
    o2_proto = graphopt.to_onnx(out)
    if args.save_dir:
        os.makedirs(args.save_dir, exist_ok=True)
        graphopt.save(out, os.path.join(args.save_dir, name + ".O2.onnx"))
    del model, out
    o2_bytes = o2_proto.SerializeToString()
    h_o2 = histogram(o2_proto)
    row["o2"] = sum(h_o2.values())

    ext = ort_extended(orig_bytes)
    h_ext = histogram(ext) if isinstance(ext, onnx.ModelProto) else collections.Counter()
    row["ort_ext"] = sum(h_ext.values()) if isinstance(ext, onnx.ModelProto) else ext
    ext2 = ort_extended(o2_bytes)
    row["o2_ort_ext"] = sum(histogram(ext2).values()) if isinstance(ext2, onnx.ModelProto) else ext2
    del ext, ext2

    k = args.top
    print(f"\n== {name}  ({os.path.getsize(path) / 2**20:.0f} MiB, opset {max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx'))})")
    print(f"   input   {row['input']:5}  {top_ops(h_in, k)}")
    print(f"   -O2     {row['o2']:5}  {top_ops(h_o2, k)}")
    if h_ext:
        print(f"   ort-ext {row['ort_ext']:5}  {top_ops(h_ext, k)}")
    else:
        print(f"   ort-ext {row['ort_ext']}")
    gone = {op: n for op, n in (h_in - h_o2).items()}
    new = {op: n for op, n in (h_o2 - h_in).items()}
    print(f"   -O2 removed: {', '.join(f'{o} {n}' for o, n in sorted(gone.items(), key=lambda x: -x[1])) or '-'}")
    print(f"   -O2 added:   {', '.join(f'{o} {n}' for o, n in sorted(new.items(), key=lambda x: -x[1])) or '-'}")
    print(f"   -O2 time {row['o2_time']:.2f}s (slowest pass: {row['slowest']})", flush=True)
    feeds = random_inputs(proto, args.seed)
    del proto, o2_proto

    # numerics and latency
    sa = session(orig_bytes, "none", args.threads)
    sb = session(orig_bytes, "all", args.threads)
    try:
        sc = session(o2_bytes, "all", args.threads)
        so2 = session(o2_bytes, "none", args.threads)
    except Exception as e:  # noqa: BLE001
        print(f"   onnxruntime refused the -O2 model: {str(e).splitlines()[0][:200]}")
        row.update(err_o2="refused", err_ort=float("nan"), ref=float("nan"), lat=None)
        return row
    ra, rb, rc, ro2 = (s.run(None, feeds) for s in (sa, sb, sc, so2))
    row["err_o2"] = max_err(ro2, ra)
    row["err_o2_all"] = max_err(rc, ra)
    row["err_ort"] = max_err(rb, ra)
    row["ref"] = max(float(np.max(np.abs(x))) for x in ra)
    print(f"   max abs err: -O2 {row['err_o2']:.2e} (with ort-all {row['err_o2_all']:.2e}), ort-all alone {row['err_ort']:.2e}; max |output| {row['ref']:.3g}", flush=True)

    # "d": the -O2 output with onnxruntime's optimizer off -- how much of onnxruntime's own work
    # graphopt's passes recover
    sessions = {"a": sa, "b": sb, "c": sc, "d": so2}
    for _ in range(args.warmup):
        for s in sessions.values():
            s.run(None, feeds)
    # time one round to size the run count
    t0 = time.perf_counter()
    for s in sessions.values():
        s.run(None, feeds)
    per_round = time.perf_counter() - t0
    runs = int(min(args.max_runs, max(args.min_runs, args.budget // max(per_round, 1e-6))))
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(runs):
        for key, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[key].append(time.perf_counter() - t)
    med = {key: statistics.median(v) for key, v in times.items()}
    row["lat"] = med
    row["runs"] = runs
    print(
        f"   latency (median of {runs}): (b) ort-all {med['b'] * 1e3:.1f} ms; "
        f"(a) ort-none {med['a'] / med['b']:.2f}x, (c) -O2+ort-all {med['c'] / med['b']:.2f}x, "
        f"(d) -O2+ort-none {med['d'] / med['b']:.2f}x",
        flush=True,
    )
    del sa, sb, sc, so2, sessions
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help=f"comma-separated subset (default: those of {','.join(DEFAULT_MODELS)} in the corpus)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of timed runs per model (default 30)")
    ap.add_argument("--min-runs", type=int, default=5)
    ap.add_argument("--max-runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=8, help="op types shown per histogram (default 8)")
    ap.add_argument("--save-dir", default=None, help="also write each -O2 model here")
    args = ap.parse_args(argv)

    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        missing = [n for n in names if not os.path.exists(os.path.join(CORPUS, n + ".onnx"))]
        if missing:
            ap.error(f"not in {CORPUS}: {', '.join(missing)} (run tools/make_corpus.py with the tools venv)")
    else:
        names = [n for n in DEFAULT_MODELS if os.path.exists(os.path.join(CORPUS, n + ".onnx"))]
        names += sorted(
            f[:-5] for f in os.listdir(CORPUS) if f.endswith(".onnx") and f[:-5] not in DEFAULT_MODELS
        ) if os.path.isdir(CORPUS) else []
        if not names:
            print(f"no corpus in {CORPUS}: run tools/make_corpus.py with the tools venv first", file=sys.stderr)
            return 2
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, {args.threads} intra-op threads, batch 1")
    t_all = time.perf_counter()
    rows = []
    for name in names:
        try:
            rows.append(bench(name, args))
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
            print(f"\n== {name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", flush=True)
            rows.append({"name": name, "failed": True})
        gc.collect()

    print("\nnode counts, -O2 time, numerics (max abs error vs the input, both on onnxruntime with optimizations off)")
    head = f"{'model':20} {'input':>6} {'-Const':>7} {'-O2':>6} {'ort-ext':>8} {'-O2+ext':>8} {'-O2 time':>9} {'err -O2':>9} {'err ort':>9} {'|out|max':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("failed"):
            print(f"{r['name']:20} FAILED")
            continue
        err = r["err_o2"] if isinstance(r["err_o2"], str) else f"{r['err_o2']:.1e}"
        print(
            f"{r['name']:20} {r['input']:6} {r['input_nc']:7} {r['o2']:6} {r['ort_ext']!s:>8} {r['o2_ort_ext']!s:>8} "
            f"{r['o2_time']:8.2f}s {err:>9} {r['err_ort']:9.1e} {r['ref']:9.3g}"
        )
    print(f"\nlatency, onnxruntime CPU, {args.threads} threads, batch 1: median; (a), (c), (d) as ratios to (b) (< 1 = faster)")
    head = f"{'model':20} {'runs':>5} {'(b) ort-all':>12} {'(a) ort-none':>13} {'(c) -O2+all':>12} {'(d) -O2+none':>13}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("failed") or not r.get("lat"):
            print(f"{r['name']:20} {'-':>5}")
            continue
        m = r["lat"]
        print(f"{r['name']:20} {r['runs']:5} {m['b'] * 1e3:9.1f} ms {m['a'] / m['b']:12.2f}x {m['c'] / m['b']:11.2f}x {m['d'] / m['b']:12.2f}x")
    print(f"\ntotal {time.perf_counter() - t_all:.0f}s")
    return 1 if any(r.get("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

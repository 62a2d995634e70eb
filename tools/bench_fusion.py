"""Benchmark graphopt -O2 on real-world-shaped models against onnxruntime's own optimizer.

    .venv/bin/python tools/bench_fusion.py [--models resnet50,bert_base_s128] [--budget 30]
                                           [--threads 2] [--save-dir DIR]

Reads the corpus .cache/corpus/<name>.onnx written by tools/make_corpus.py (which needs the
separate torch venv; see its docstring). Per model it prints:

- node counts: the input (and without its Constant nodes, which every optimizer here turns
  into initializers), graphopt -O2, -O2 --contrib-ops ("+c": onnxruntime's com.microsoft ops
  allowed), and onnxruntime's extended level on the input (the graph it dumps via
  SessionOptions.optimized_model_filepath with ORT_ENABLE_EXTENDED); graphopt's times (and the
  slowest pass); the top op types of each graph;
- on BERT, the fused-op counts of onnxruntime's transformers optimizer (Attention, LayerNorm,
  Gelu, SkipLayerNorm...; it needs sympy) next to -O2 --contrib-ops;
- numerics on random inputs: max abs error of every variant against the input run with
  onnxruntime's optimizations disabled, and the largest output magnitude;
- latency on onnxruntime's CPU provider with --threads intra-op threads (sequential executor,
  batch 1), as the issue names the columns: (a) the input with ENABLE_ALL (the baseline),
  (b) the -O2 output with ENABLE_ALL (goal: never slower than (a)), (c) the -O2 output with
  onnxruntime's optimizer off (goal: within 10% of (a)); (b+)/(c+) the same for -O2
  --contrib-ops; (n) the input with the optimizer off; for a *_noisy export (BatchNorm and
  exporter clutter kept) also (clean), the clean export of the same model with ENABLE_ALL
  (goal (d): (b) as fast as (clean)). The sessions run round-robin (one call each per round,
  after warm-up; intra-op thread spinning off, so that one session's idle threads do not steal
  cores from the next) and the median of each is reported as a ratio to (a) from the same run.
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
DEFAULT_MODELS = ["resnet50", "mobilenetv2", "efficientnet_b0", "vit_b16", "bert_base_s128", "bert_base_s128_op20",
                  "resnet18", "resnet18_noisy", "mobilenetv2_noisy"]


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

    # graphopt -O2, plain (standard ONNX ops only) and with --contrib-ops (onnxruntime's ops)
    model = graphopt.load(proto)
    variants: dict[str, bytes] = {}
    for key, contrib in (("o2", False), ("o2c", True)):
        gc.collect()
        t = time.perf_counter()
        out = graphopt.optimize(model, "-O2", contrib_ops=contrib)
        row[f"{key}_time"] = time.perf_counter() - t
        timings = out.meta.get("pass_timings") or []
        slow = max(timings, key=lambda r: r.seconds) if timings else None
        row[f"{key}_slowest"] = f"{slow.spec} {slow.seconds:.2f}s" if slow else "?"
        out_proto = graphopt.to_onnx(out)
        if args.save_dir:
            os.makedirs(args.save_dir, exist_ok=True)
            graphopt.save(out, os.path.join(args.save_dir, f"{name}.{key}.onnx"))
        variants[key] = out_proto.SerializeToString()
        row[f"h_{key}"] = histogram(out_proto)
        row[key] = sum(row[f"h_{key}"].values())
        del out, out_proto
    del model
    h_o2, h_o2c = row["h_o2"], row["h_o2c"]

    ext = ort_extended(orig_bytes)
    h_ext = histogram(ext) if isinstance(ext, onnx.ModelProto) else collections.Counter()
    row["ort_ext"] = sum(h_ext.values()) if isinstance(ext, onnx.ModelProto) else ext
    del ext

    k = args.top
    print(f"\n== {name}  ({os.path.getsize(path) / 2**20:.0f} MiB, opset {max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx'))})")
    print(f"   input    {row['input']:5}  {top_ops(h_in, k)}")
    print(f"   -O2      {row['o2']:5}  {top_ops(h_o2, k)}")
    print(f"   -O2 +c   {row['o2c']:5}  {top_ops(h_o2c, k)}")
    if h_ext:
        print(f"   ort-ext  {row['ort_ext']:5}  {top_ops(h_ext, k)}")
    else:
        print(f"   ort-ext  {row['ort_ext']}")
    gone = {op: n for op, n in (h_in - h_o2).items()}
    new = {op: n for op, n in (h_o2 - h_in).items()}
    print(f"   -O2 removed: {', '.join(f'{o} {n}' for o, n in sorted(gone.items(), key=lambda x: -x[1])) or '-'}")
    print(f"   -O2 added:   {', '.join(f'{o} {n}' for o, n in sorted(new.items(), key=lambda x: -x[1])) or '-'}")
    print(f"   -O2 time {row['o2_time']:.2f}s (slowest pass: {row['o2_slowest']}); --contrib-ops {row['o2c_time']:.2f}s", flush=True)
    if args.ort_transformers and name.startswith("bert"):
        row["fusions"] = transformer_fusions(path, h_o2c)
    feeds = random_inputs(proto, args.seed)
    del proto

    # the columns: (a) the input with ENABLE_ALL (the baseline), (b) -O2 with ENABLE_ALL,
    # (c) -O2 with onnxruntime's optimizer off; (c+) the same with --contrib-ops, (b+) its
    # ENABLE_ALL twin, (n) the input with the optimizer off (how much optimizing matters at all);
    # for a *_noisy export also (clean) the clean export of the same model with ENABLE_ALL
    specs = {"a": (orig_bytes, "all"), "b": (variants["o2"], "all"), "c": (variants["o2"], "none"),
             "b+": (variants["o2c"], "all"), "c+": (variants["o2c"], "none"), "n": (orig_bytes, "none")}
    clean = os.path.join(CORPUS, name[: -len("_noisy")] + ".onnx") if name.endswith("_noisy") else None
    if clean and os.path.exists(clean):
        with open(clean, "rb") as f:
            specs["clean"] = (f.read(), "all")
    sessions: dict[str, ort.InferenceSession] = {}
    for key, (data, level) in specs.items():
        try:
            sessions[key] = session(data, level, args.threads)
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
            print(f"   onnxruntime refused variant ({key}): {str(e).splitlines()[0][:200]}")
    if "a" not in sessions or "n" not in sessions:
        row.update(lat=None)
        return row
    results = {key: s.run(None, feeds) for key, s in sessions.items()}
    ref = results["n"]
    row["err"] = {key: max_err(r, ref) for key, r in results.items() if key != "clean"}
    row["ref"] = max(float(np.max(np.abs(x))) for x in ref)
    print("   max abs err vs the input (optimizer off): " + ", ".join(f"({k}) {v:.1e}" for k, v in row["err"].items())
          + f"; max |output| {row['ref']:.3g}", flush=True)

    for _ in range(args.warmup):
        for s in sessions.values():
            s.run(None, feeds)
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
    print(f"   latency (median of {runs}): (a) {med['a'] * 1e3:.1f} ms; "
          + ", ".join(f"({k}) {med[k] / med['a']:.2f}x" for k in med if k != "a"), flush=True)
    del sessions
    gc.collect()
    return row


FUSED = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "Gelu", "FastGelu", "BiasGelu", "EmbedLayerNormalization")


def transformer_fusions(path: str, ours: collections.Counter) -> dict[str, tuple[int, int]]:
    """Fused-op counts of onnxruntime's transformers optimizer (model_type bert) next to ours."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as e:  # it needs sympy
        print(f"   (onnxruntime.transformers unavailable: {e})")
        return {}
    import logging

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    opt = optimize_model(path, model_type="bert", num_heads=12, hidden_size=768, opt_level=0)
    theirs = histogram(opt.model)
    counts: dict[str, tuple[int, int]] = {}
    for op in FUSED:
        t = theirs.get(f"microsoft.{op}", 0) + theirs.get(op, 0)
        o = ours.get(f"microsoft.{op}", 0) + ours.get(op, 0)
        if t or o:
            counts[op] = (t, o)
    print("   fused ops, onnxruntime transformers optimizer vs -O2 --contrib-ops: "
          + ", ".join(f"{op} {t}/{o}" for op, (t, o) in counts.items())
          + f"; nodes {sum(theirs.values())}/{sum(ours.values())}")
    return counts


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
    ap.add_argument("--no-ort-transformers", dest="ort_transformers", action="store_false",
                    help="skip the fused-op comparison with onnxruntime's transformers optimizer on BERT")
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

    print("\nnode counts and -O2 time")
    head = f"{'model':20} {'input':>6} {'-Const':>7} {'-O2':>6} {'-O2 +c':>7} {'ort-ext':>8} {'-O2 time':>9} {'+c time':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("failed"):
            print(f"{r['name']:20} FAILED")
            continue
        print(f"{r['name']:20} {r['input']:6} {r['input_nc']:7} {r['o2']:6} {r['o2c']:7} {r['ort_ext']!s:>8} {r['o2_time']:8.2f}s {r['o2c_time']:7.2f}s")
    keys = ["b", "c", "b+", "c+", "n", "clean"]
    print(f"\nlatency, onnxruntime CPU, {args.threads} threads, batch 1: median; ratios to (a) = the input with ENABLE_ALL (< 1 = faster)")
    print("(a) input+ALL  (b) -O2+ALL  (c) -O2+none  (b+)/(c+) -O2 --contrib-ops +ALL/+none  (n) input+none  (clean) clean export+ALL")
    head = f"{'model':20} {'runs':>5} {'(a) ms':>8} " + " ".join(f"{'(' + k + ')':>7}" for k in keys) + f" {'max err':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("failed") or not r.get("lat"):
            print(f"{r['name']:20} {'-':>5}")
            continue
        m = r["lat"]
        cells = " ".join(f"{m[k] / m['a']:6.2f}x" if k in m else f"{'-':>7}" for k in keys)
        err = max(v for k, v in r["err"].items() if k in ("b", "c", "b+", "c+"))
        print(f"{r['name']:20} {r['runs']:5} {m['a'] * 1e3:8.1f} {cells} {err:9.1e}")
    print(f"\ntotal {time.perf_counter() - t_all:.0f}s")
    return 1 if any(r.get("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

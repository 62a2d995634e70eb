"""Benchmark weight sharing: share-weights + cluster-weights on trained models and a 100M run.

    nice -n 10 .venv/bin/python tools/bench_sharing.py [--models digits_mlp,...] [--bits 3,4,5,6]
        [--min-size 256] [--init linear] [--per-channel] [--big bert_base_s128|synthetic|none]
        [--threads 2] [--budget 3]

Part 1, trained models from tools/real_models.py (.cache/real/; build them first, see there):
each model is run through `-O2` (the fp32 baseline: BatchNorm folded into the convolutions
first, so the folded weights are what gets clustered) and through
`-O2,share-weights,cluster-weights{bits=B,...}` for each B. Printed per row: file bytes and the
ratio fp32/compressed (both files as graphopt saves them), bits per clustered weight, mean
relative L2 error of the clustered weights, the task metric before/after (accuracy on the test
split, or MiniLM's mean cosine to the fp32 torch embeddings), the pass time, and onnxruntime
(ORT_ENABLE_ALL) session-creation and latency ratios compressed / fp32 measured in the same run
(1.00 = unchanged; the decode is folded when the session is created).

Part 2, a 100M-parameter timing run: cluster-weights{bits=5} on BERT-base (110M parameters,
.cache/corpus/bert_base_s128.onnx from tools/make_corpus.py) or, with --big synthetic, a stack
of 24 MatMuls 1024x4096 built in memory; prints seconds of share-weights and cluster-weights,
file sizes and the onnxruntime latency ratio.

The machine may be shared: compare ratios, not absolute milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

import graphopt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
CORPUS = os.path.join(ROOT, ".cache", "corpus")


def session(data: bytes | str, threads: int) -> tuple[ort.InferenceSession, float]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    t = time.perf_counter()
    s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return s, time.perf_counter() - t


def latency_ratio(a: ort.InferenceSession, b: ort.InferenceSession, feeds: dict, budget: float) -> float:
    """median(b) / median(a): rounds of `reps` calls each, the order alternating per round, for
    `budget` seconds (tiny models run in microseconds: one call is too short to time)."""
    for s in (a, b):
        s.run(None, feeds)
    t = time.perf_counter()
    a.run(None, feeds)
    reps = max(1, min(50, int(0.01 / max(time.perf_counter() - t, 1e-6))))
    ta: list[float] = []
    tb: list[float] = []
    end = time.perf_counter() + budget
    i = 0
    while time.perf_counter() < end or len(ta) < 5:
        pair = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for s, acc in pair:
            t = time.perf_counter()
            for _ in range(reps):
                s.run(None, feeds)
            acc.append((time.perf_counter() - t) / reps)
        i += 1
    return statistics.median(tb) / statistics.median(ta)


def saved_bytes(model: graphopt.Model, folder: str, name: str) -> tuple[str, int]:
    path = os.path.join(folder, name)
    graphopt.save(model, path)
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.startswith(name))
    return path, total


def cluster_spec(bits: int, args: argparse.Namespace, name: str = "", layer_bits: str = "") -> str:
    opts = [f"bits={bits}", f"min-size={args.min_size}", f"init={args.init}"]
    if args.per_channel:
        opts.append("per-channel=true")
    if args.channel_overhead:
        opts.append(f"channel-overhead={args.channel_overhead}")
    if args.refit != "none" and name:
        import real_models as rm

        opts += [f"refit={args.refit}", f"calibration={rm.calibration_path(name)}"]
    if layer_bits:
        opts.append(f"layer-bits={layer_bits}")
    # the table is accuracy per requested bits: no budget back-off (tools/bench_compress_budget.py has that)
    return "share-weights,cluster-weights{" + ",".join(["accuracy-budget=none"] + opts) + "}"


def _loss(ref: np.ndarray, out: np.ndarray) -> float:
    """1 - mean cosine of each sample's output to the fp32 output (embeddings and logits alike)."""
    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = out.reshape(len(out), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(1.0 - cos.mean())


def sensitivity_bits(name: str, base: graphopt.Model, bits: int, args: argparse.Namespace) -> str:
    """layer-bits giving `bits + 1` to the tensors that cost most, from CALIBRATION data only:
    each tensor is clustered alone at `bits` and its loss (1 - mean cosine of the outputs to the
    fp32 model's, on `--sens-samples` calibration samples) measured; losses of single tensors
    add up closely (MiniLM: the 39 single losses sum to 0.0135, all clustered at once cost
    0.0137), and one more bit divides a tensor's error power by ~4, so the most costly tensors
    are promoted until the predicted total is under `--sens-target`."""
    import real_models as rm

    feeds = rm.calibration_data(name, n=args.sens_samples)
    ref = rm.run_batched(rm.session(base, args.threads), feeds)
    st = graphopt.optimize(base, cluster_spec(bits, args)).meta["pass_timings"][-1].stats
    names = [k[: -len("/bits")] for k in st if k.endswith("/bits")]
    loss = {}
    for nm in names:
        one = graphopt.optimize(base, "cluster-weights{" + f"accuracy-budget=none,bits={bits},min-size={args.min_size},init={args.init},"
                                f"channel-overhead={args.channel_overhead},layer-bits={nm}:{bits};*:0" + "}")
        loss[nm] = _loss(ref, rm.run_batched(rm.session(one, args.threads), feeds))
    total = sum(loss.values())
    promoted: list[str] = []
    for nm in sorted(loss, key=loss.get, reverse=True):
        if total <= args.sens_target:
            break
        total -= loss[nm] * 0.75
        promoted.append(nm)
    print(f"{name}: sensitivity on {args.sens_samples} calibration samples at {bits} bits: sum of single-tensor "
          f"losses {sum(loss.values()):.5f}; {len(promoted)} tensors to {bits + 1} bits, predicted loss {total:.5f}")
    for nm in promoted:
        print(f"    {nm:50} loss alone {loss[nm]:.5f}")
    return ";".join(f"{nm}:{bits + 1}" for nm in promoted)


def bench_real(args: argparse.Namespace, tmp: str) -> None:
    try:
        import real_models as rm
    except ImportError:
        print("tools/real_models.py is missing: skipping the trained models")
        return
    names = args.models.split(",") if args.models else rm.list_models()
    names = [n for n in names if n in rm.list_models()]
    if not names:
        print("no trained models built (.venv-tools/bin/python tools/real_models.py build): skipping")
        return
    print(f"{'model':14} {'bits':>4} {'bytes':>10} {'ratio':>6} {'b/w':>5} {'rel-l2':>7} {'metric fp32':>12} {'after':>9} "
          f"{'delta':>8} {'pass s':>7} {'create':>7} {'latency':>7}")
    for name in names:
        src = graphopt.load(str(rm.model_path(name)))
        base = graphopt.optimize(src, "-O2")
        bpath, bbytes = saved_bytes(base, tmp, f"{name}.fp32.onnx")
        m0 = rm.evaluate(name, bpath, threads=args.threads)
        key = "accuracy" if "accuracy" in m0 else "mean_cosine"
        inputs, _ = rm.test_data(name, limit=8 if key == "mean_cosine" else 64)
        s0, c0 = session(bpath, args.threads)
        noise = latency_ratio(s0, session(bpath, args.threads)[0], inputs, args.budget)
        print(f"{name:14} fp32 vs a second fp32 session: latency ratio {noise:.2f} (the noise floor of this run)")
        for bits in args.bits:
            layer_bits = sensitivity_bits(name, base, bits, args) if args.sens_target > 0 else ""
            t = time.perf_counter()
            out = graphopt.optimize(base, cluster_spec(bits, args, name, layer_bits))
            secs = time.perf_counter() - t
            st = out.meta["pass_timings"][-1].stats
            path, nbytes = saved_bytes(out, tmp, f"{name}.b{bits}.onnx")
            m1 = rm.evaluate(name, path, threads=args.threads)
            s1, c1 = session(path, args.threads)
            lat = latency_ratio(s0, s1, inputs, args.budget)
            if key == "accuracy":
                before, after = f"{100 * m0[key]:.2f}%", f"{100 * m1[key]:.2f}%"
                delta = f"{100 * (m1[key] - m0[key]):+.2f}pt"
            else:
                before, after = f"{m0[key]:.5f}", f"{m1[key]:.5f}"
                delta = f"{m1[key] - m0[key]:+.5f}"
            print(f"{name:14} {bits:>4} {nbytes:>10} {bbytes / nbytes:>6.2f} {st.get('bits-per-weight', 0):>5.2f} "
                  f"{st.get('mean-rel-l2', 0):>7.4f} {before:>12} {after:>9} {delta:>8} {secs:>7.2f} {c1 / c0:>7.2f} {lat:>7.2f}")
            if args.layers:
                for k, v in st.items():
                    if k.endswith("/rel-l2"):
                        layer = k[: -len("/rel-l2")]
                        print(f"    {layer:40} bits {st[layer + '/bits']}  params {st[layer + '/params']:>9}  "
                              f"rel-l2 {v:.4f}  SQNR {st[layer + '/sqnr-db']:.1f} dB")
        print(f"{name:14} fp32 {bbytes:>10} (-O2 output; source file {os.path.getsize(rm.model_path(name))})")


def _dir_bytes(path: str) -> dict[str, int]:
    return {f: os.path.getsize(os.path.join(path, f)) for f in sorted(os.listdir(path))}


def bench_compile(args: argparse.Namespace, tmp: str) -> None:
    """cpu-target artifacts of the fp32 and the clustered model: bytes per file, the artifact
    ratio next to the ONNX file ratio, load time, and the clustered artifact's outputs against
    onnxruntime on the clustered ONNX model (what it must reproduce exactly)."""
    import real_models as rm

    from graphopt import runtime

    bits = args.bits[0]
    for name in args.compile.split(","):
        src = graphopt.load(str(rm.model_path(name)))
        base = graphopt.optimize(src, "-O2")
        out = graphopt.optimize(base, cluster_spec(bits, args, name))
        _, b0 = saved_bytes(base, tmp, f"{name}.c.fp32.onnx")
        p1, b1 = saved_bytes(out, tmp, f"{name}.c.b{bits}.onnx")
        inputs, _ = rm.test_data(name, limit=4)
        ref = rm.session(p1, args.threads).run(None, inputs)[0]
        sizes, loads, runners = [], [], []
        for label, model in (("fp32", base), (f"{bits}-bit", out)):
            t = time.perf_counter()
            art = graphopt.compile(model, "cpu", "-O2", threads=args.threads)
            secs = time.perf_counter() - t
            files = _dir_bytes(art.path)
            t = time.perf_counter()
            runner = runtime.load(art.path, threads=args.threads)
            loads.append(time.perf_counter() - t)
            y = runner.run(inputs)[0]
            runners.append(runner)
            sizes.append(sum(files.values()))
            print(f"{name:14} {label:7} artifact {sizes[-1]:>10} bytes {files} compile {secs:.0f} s, load {loads[-1]:.2f} s, "
                  f"codebook params {len(art.manifest['runtime'].get('codebooks', {}))}")
            if label != "fp32":
                err = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))
                print(f"{name:14} {label:7} vs onnxruntime on the clustered ONNX: max |diff| / max |y| = {err:.2e}")
        p50 = [[], []]
        for i in range(6):  # alternating rounds: the shared machine's drift hits both alike
            for j in (i % 2, 1 - i % 2):
                p50[j].append(runners[j].benchmark(inputs, warmup=1, repeat=10, seconds=args.budget / 6)["p50_ms"])
        print(f"{name:14} artifact ratio {sizes[0] / sizes[1]:.2f} (ONNX file ratio {b0 / b1:.2f}); "
              f"load time ratio {loads[1] / loads[0]:.2f}; latency ratio clustered / fp32 "
              f"{statistics.median(p50[1]) / statistics.median(p50[0]):.2f}")


def synthetic_100m() -> graphopt.Model:
    from graphopt.ir import Builder, DataType, Graph, Model, Shape, TensorType, Value

    rng = np.random.default_rng(0)
    x = Value("x", TensorType(DataType.FLOAT, Shape((1, 1024))))
    g = Graph([x], [], name="big")
    b = Builder(g)
    h = x
    for i in range(24):  # 24 x (1024x4096 + 4096x1024 / 2 ...) ~ 100.7M parameters
        w = b.initializer((rng.standard_normal((1024, 2048), dtype=np.float32) * 0.02), f"up{i}")
        d = b.initializer((rng.standard_normal((2048, 1024), dtype=np.float32) * 0.02), f"down{i}")
        h = b.op.MatMul(b.op.Relu(b.op.MatMul(h, w)), d)
    h.type = TensorType(DataType.FLOAT, Shape((1, 1024)))
    h.name = "y"
    g.outputs.append(h)
    return Model(g, ir_version=8, opset_imports={"": 17})


def bench_big(args: argparse.Namespace, tmp: str) -> None:
    if args.big == "none":
        return
    if args.big == "synthetic":
        model, label = synthetic_100m(), "synthetic 24x(1024x2048+2048x1024)"
    else:
        path = os.path.join(CORPUS, args.big + ".onnx")
        if not os.path.exists(path):
            print(f"{path} missing (tools/make_corpus.py): skipping the 100M run")
            return
        model, label = graphopt.load(path), args.big
    params = sum(v.const_value.size for g in model.graphs() for v in g.initializers.values() if v.const_value is not None)
    print(f"\n100M run: {label}, {params / 1e6:.1f}M parameters in initializers")
    t = time.perf_counter()
    out = graphopt.optimize(model, "share-weights,cluster-weights{accuracy-budget=none,bits=5}")
    total = time.perf_counter() - t
    recs = {r.spec.split("{")[0]: r for r in out.meta["pass_timings"]}
    st = recs["cluster-weights"].stats
    print(f"share-weights {recs['share-weights'].seconds:.2f} s ({recs['share-weights'].stats['tensors-merged']} merged), "
          f"cluster-weights {recs['cluster-weights'].seconds:.2f} s for {st['tensors-clustered']} tensors / "
          f"{st['params-clustered'] / 1e6:.1f}M params (whole optimize incl. model copy {total:.2f} s)")
    print(f"weights {st['bytes-before']} -> {st['bytes-after']} bytes ({st['compression']:.2f}x), "
          f"mean rel-l2 {st['mean-rel-l2']:.4f}, min SQNR {st['min-sqnr-db']:.1f} dB")
    if args.no_ort:
        return
    p0, n0 = saved_bytes(model, tmp, "big.fp32.onnx")
    p1, n1 = saved_bytes(out, tmp, "big.b5.onnx")
    from graphopt.check import random_inputs

    feeds = random_inputs(model, dim_values={"batch": 1})
    for k, v in feeds.items():  # token ids / types / masks: keep them in range
        if v.dtype.kind in "iu":
            feeds[k] = np.ones_like(v) if "mask" in k else (np.arange(v.size).reshape(v.shape) % 2 if "type" in k else
                                                            np.arange(v.size).reshape(v.shape) % 1000).astype(v.dtype)
    s0, c0 = session(p0, args.threads)
    s1, c1 = session(p1, args.threads)
    lat = latency_ratio(s0, s1, feeds, args.budget)
    y0, y1 = s0.run(None, feeds)[0], s1.run(None, feeds)[0]
    rel = float(np.linalg.norm(y1.astype(np.float64) - y0) / max(np.linalg.norm(y0), 1e-30))
    print(f"file {n0} -> {n1} bytes ({n0 / n1:.2f}x); onnxruntime session creation x{c1 / c0:.2f} "
          f"({c0:.2f} s -> {c1:.2f} s), latency ratio {lat:.2f}; output rel-l2 {rel:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated real_models names (default: all built)")
    ap.add_argument("--bits", default="3,4,5,6", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--min-size", type=int, default=256)
    ap.add_argument("--init", default="auto", help="auto | linear | density")
    ap.add_argument("--per-channel", action="store_true")
    ap.add_argument("--channel-overhead", type=float, default=0.0, help="cluster-weights channel-overhead")
    ap.add_argument("--refit", default="none", help="cluster-weights refit= (none | activations), on the model's calibration data")
    ap.add_argument("--sens-target", type=float, default=0.0,
                    help="> 0: give one more bit to the most costly tensors (measured on calibration data) "
                         "until the predicted 1 - cosine is below this")
    ap.add_argument("--sens-samples", type=int, default=48)
    ap.add_argument("--layers", action="store_true", help="print per-layer bits and error")
    ap.add_argument("--compile", default="", help="comma-separated real_models names: compare cpu-target artifacts "
                                                  "(fp32 vs the first --bits) instead of parts 1 and 2")
    ap.add_argument("--big", default="bert_base_s128", help="corpus model name, 'synthetic' or 'none'")
    ap.add_argument("--no-ort", action="store_true", help="100M run: time the passes only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of latency timing per row")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.compile:
            bench_compile(args, tmp)
            return
        bench_real(args, tmp)
        bench_big(args, tmp)


if __name__ == "__main__":
    main()

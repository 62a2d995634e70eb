"""Benchmark graphopt's int8 quantization against fp32 and onnxruntime's own quantize_static.

    nice -n 10 .venv/bin/python tools/bench_quantize.py [--models resnet50,mobilenetv2,... | all]
        [--threads 2] [--calib 16] [--budget 20] [--ort] [--save-dir DIR] [--method minmax]
        [--real [--real-models digits_cnn,mnist_resnet8,minilm]]

Per model (corpus models from tools/make_corpus.py in .cache/corpus/):

- fp32: the input model on onnxruntime (all its optimizations), batch 1, --threads intra-op threads;
- graphopt: `-O2` then `quantize` with default settings (speed=measure, mode=auto), calibrated
  on --calib samples (the same samples for every tool);
- ort: onnxruntime.quantization.quantize_static, QDQ format, per-channel int8 weights, uint8
  activations, MinMax calibration, other options at their defaults (with --ort; CNNs only,
  transformers get ort's quantize_dynamic instead, which is what onnxruntime recommends there).

Latency: round-robin runs (one call per session per round, the order alternating forward and
backward, spinning off), in --blocks blocks. speedup = the median over rounds of the paired
ratio fp32 / model of the same round (> 1 = faster; load that changes between rounds cancels),
printed with the range of the per-block ratios of medians (how stable the figure is on a
shared machine).
Error is measured on separate held-out inputs: output SQNR (dB) and relative L2 error against
fp32, and for classifier-shaped outputs the percent of top-1 predictions that change.

With --real, the trained models of tools/real_models.py are quantized with default settings on
their calibration .npz and scored on their test split (accuracy drop; MiniLM: mean cosine of the
embeddings to fp32), classifiers also with 8-bit weights to show the saturation trap.

Corpus inputs are synthetic (N(0, 1) images; token ids in [100, 20000) with the last quarter
of the attention mask 0); the corpus models carry random weights from their makers, so these figures are about
speed and numerical fidelity, not task accuracy. The machine may be shared: compare ratios,
not absolute milliseconds.
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
from graphopt.calibration import calibration_from_arrays
from graphopt.check import random_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, ".cache", "corpus")
DEFAULT_MODELS = ["resnet50", "mobilenetv2", "efficientnet_b0", "vit_b16", "bert_base_s128"]
# every corpus model of tools/make_corpus.py (--models all); the issue's "no model in the corpus
# gets slower" goal is measured over these
CORPUS_MODELS = DEFAULT_MODELS + ["resnet18", "densenet121", "googlenet", "shufflenetv2", "squeezenet11"]


def session(path_or_bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def time_round_robin(sessions: dict[str, ort.InferenceSession], feeds: dict, budget: float) -> dict[str, float]:
    return time_paired(sessions, feeds, budget)["median_s"]


def time_paired(sessions: dict[str, ort.InferenceSession], feeds: dict, budget: float, blocks: int = 5,
                base: str = "fp32") -> dict[str, dict[str, float]]:
    """Latency of each session, and its speedup over `base`, robust to a shared machine.

    The runs are interleaved (one call per session per round; the order alternates forward and
    backward between rounds, so no session always runs right after another) and grouped in
    `blocks` blocks of equal length. speedup[k] is the median over rounds of the paired ratio
    base/k of the same round (load that changes between rounds cancels in each ratio);
    block_speedups[k] are the per-block ratios of medians (their spread shows how stable the
    figure is: min/max are reported). median_s[k] is the median over all rounds."""
    names = list(sessions)
    for s in sessions.values():
        for _ in range(2):
            s.run(None, feeds)
    t0 = time.perf_counter()
    for s in sessions.values():
        s.run(None, feeds)
    per_round = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(400, max(blocks * 4, budget / per_round)))
    rounds -= rounds % blocks
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            sessions[k].run(None, feeds)
            times[k].append(time.perf_counter() - t)
    out: dict[str, dict[str, float]] = {"median_s": {k: statistics.median(v) for k, v in times.items()},
                                        "speedup": {}, "block_min": {}, "block_max": {}, "rounds": {"n": rounds}}
    if base in times:
        per = rounds // blocks
        for k in names:
            pairs = [b / t for b, t in zip(times[base], times[k])]
            out["speedup"][k] = statistics.median(pairs)
            blk = [statistics.median(times[base][i * per:(i + 1) * per]) / statistics.median(times[k][i * per:(i + 1) * per])
                   for i in range(blocks)]
            out["block_min"][k], out["block_max"][k] = min(blk), max(blk)
    return out


def errors(ref: list[list[np.ndarray]], test: list[list[np.ndarray]]) -> dict[str, float]:
    from graphopt.passes.quantize import output_metrics

    return output_metrics(ref, test)


def make_samples(model: graphopt.Model, n: int, seed: int) -> dict[str, np.ndarray]:
    """n samples stacked on the batch axis (what a calibration .npz holds)."""
    per = [random_inputs(model, seed=seed + i, dim_values={"batch": 1}) for i in range(n)]
    out = {}
    for k in per[0]:
        a = per[0][k]
        if a.dtype.kind in "iu":  # token ids / masks: keep masks 1, ids in a plausible vocab range
            rng = np.random.default_rng(seed)
            if "mask" in k:
                arr = np.ones((n,) + a.shape[1:], a.dtype)
                arr[:, a.shape[-1] * 3 // 4 :] = 0  # padded tail: the additive mask path sees -inf/-3.4e38
            elif "type" in k:
                arr = np.zeros((n,) + a.shape[1:], a.dtype)
            else:
                arr = rng.integers(100, 20000, size=(n,) + a.shape[1:]).astype(a.dtype)
            out[k] = arr
        else:
            out[k] = np.concatenate([p[k] for p in per], axis=0)
    return out


def ort_quantize(src: str, dst: str, samples: dict[str, np.ndarray], transformer: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if transformer:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)
        return

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            n = len(next(iter(samples.values())))
            self.it = iter([{k: v[i : i + 1] for k, v in samples.items()} for i in range(n)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.it, None)

    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def bench(name: str, args: argparse.Namespace) -> dict:
    from graphopt.passes.quantize import Quantize

    src = os.path.join(CORPUS, name + ".onnx")
    if not os.path.exists(src):
        print(f"{name}: {src} missing (tools/make_corpus.py makes it); skipped")
        return {}
    model = graphopt.load(src)
    transformer = any(n.op_type in ("Softmax", "LayerNormalization") for n in model.graph)
    calib = make_samples(model, args.calib, seed=1)
    held = make_samples(model, args.held, seed=1000)
    tmp = args.save_dir or tempfile.mkdtemp(prefix="bench_quantize_")
    os.makedirs(tmp, exist_ok=True)

    t0 = time.perf_counter()
    opt = graphopt.optimize(graphopt.load(src), "-O2")
    ctx = graphopt.PassContext()
    ctx.data["calibration"] = calibration_from_arrays(opt, calib, source=f"{args.calib} synthetic samples")
    q = Quantize(calibration=args.method, threads=args.threads)
    res = q.run(opt, ctx)
    ours_s = time.perf_counter() - t0
    rep = ctx.data["quantize"]
    ours_path = os.path.join(tmp, f"{name}.graphopt_int8.onnx")
    graphopt.save(opt, ours_path)

    sessions = {"fp32": session(src, args.threads), "graphopt": session(ours_path, args.threads)}
    if args.ort:
        ort_path = os.path.join(tmp, f"{name}.ort_int8.onnx")
        t1 = time.perf_counter()
        ort_quantize(src, ort_path, calib, transformer)
        ort_s = time.perf_counter() - t1
        sessions["ort"] = session(ort_path, args.threads)
    nheld = len(next(iter(held.values())))
    batches = [{k: v[i : i + 1] for k, v in held.items()} for i in range(nheld)]
    outs = {k: [s.run(None, b) for b in batches] for k, s in sessions.items()}
    timing = time_paired(sessions, batches[0], args.budget, blocks=args.blocks)
    lat = timing["median_s"]

    print(f"\n== {name} ({'transformer: dynamic MatMuls' if transformer else 'static QDQ'}) threads={args.threads}")
    print(f"   graphopt: {rep.get('result')}; {res.stats}; quantize took {ours_s:.1f}s")
    if "speed" in rep:
        print(f"   graphopt speed check: fp32 {rep['speed']['fp32-ms']} ms; "
              + "; ".join(f"{c['candidate']}: {c['speedup']}x" for c in rep["speed"]["candidates"])
              + f" -> {rep['speed']['decision']}")
    floats = [layer for layer in rep.get("layers", []) if layer["status"] == "float"]
    reasons: dict[str, int] = {}
    for layer in floats:
        key = (layer.get("reason") or "")[:70]
        reasons[key] = reasons.get(key, 0) + 1
    for r, c in sorted(reasons.items(), key=lambda kv: -kv[1])[:6]:
        print(f"   float x{c}: {r}")
    row = {"model": name}
    for k in sessions:
        e = errors(outs["fp32"], outs[k]) if k != "fp32" else None
        sp = timing["speedup"][k]
        spread = f" (blocks {timing['block_min'][k]:.2f}-{timing['block_max'][k]:.2f}x)" if k != "fp32" else ""
        extra = "" if e is None else (f"  sqnr {e['sqnr']:6.2f} dB  rel {e['rel']:.4f}  cosine {e['cosine']:.5f}"
                                      f"  top1-changed {e['top1']:.1f}%")
        took = f"  (quantize {ours_s:.0f}s)" if k == "graphopt" else (f"  (quantize {ort_s:.0f}s)" if k == "ort" else "")
        print(f"   {k:9s} {lat[k] * 1e3:8.2f} ms  speedup {sp:5.2f}x{spread}{extra}{took}")
        row[k] = {"speedup": sp, "block_min": timing["block_min"][k], "block_max": timing["block_max"][k], **(e or {})}
    return row


def bench_real(args: argparse.Namespace) -> list[dict]:
    """Trained models from tools/real_models.py: accuracy (or MiniLM cosine) fp32 vs int8 with
    default settings, and for classifiers also with full 8-bit weights (reduce-range=false) to
    show the u8s8 saturation trap on CPUs without VNNI; latency at batch --real-batch."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import real_models as rm

    from graphopt.passes.quantize import Quantize, has_vnni

    rows = []
    names = [n for n in rm.list_models() if not args.real_models or n in args.real_models.split(",")]
    print(f"\n== trained models (tools/real_models.py); CPU VNNI: {has_vnni()}; threads={args.threads}")
    for name in names:
        fp32_path = str(rm.model_path(name))
        variants = {"default": {}}
        if rm._spec(name).kind == "classifier":
            variants["8-bit weights (reduce-range=false)"] = {"reduce_range": "false"}
        ref = rm.evaluate(name, fp32_path, threads=args.threads)
        key = "accuracy" if "accuracy" in ref else "mean_cosine"
        row = {"model": name, "fp32": ref[key]}
        for label, extra in variants.items():
            t0 = time.perf_counter()
            model = graphopt.optimize(graphopt.load(fp32_path), "-O2")
            ctx = graphopt.PassContext()
            ctx.data["calibration"] = str(rm.calibration_path(name))
            res = Quantize(threads=args.threads, batch_size=args.real_calib_batch, **extra).run(model, ctx)
            took = time.perf_counter() - t0
            rep = ctx.data["quantize"]
            got = rm.evaluate(name, model, threads=args.threads)
            feeds = {k: v[: args.real_batch] for k, v in rm.calibration_data(name, n=args.real_batch).items()}
            sessions = {"fp32": session(fp32_path, args.threads),
                        "int8": session(graphopt.to_onnx(model).SerializeToString(), args.threads)}
            lat = time_round_robin(sessions, feeds, args.budget / 2)
            sp = lat["fp32"] / lat["int8"]
            if key == "accuracy":
                fig = f"accuracy fp32 {ref[key] * 100:.2f}% int8 {got[key] * 100:.2f}% (drop {(ref[key] - got[key]) * 100:+.2f} pt)"
            else:
                fig = f"mean cosine to fp32 {got[key]:.4f} (min {got['min_cosine']:.4f})"
            print(f"   {name:14s} [{label}] {fig}; speedup {sp:.2f}x at batch {args.real_batch}; "
                  f"{rep.get('result')} ({rep.get('mode')}); {rep.get('speed', {}).get('decision', '')}; quantize {took:.0f}s")
            row[label] = {key: got[key], "speedup": sp, "stats": res.stats}
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated, or 'all' (the whole corpus)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=int, default=16, help="calibration samples")
    ap.add_argument("--held", type=int, default=8, help="held-out samples for the error figures")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timing per model")
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--blocks", type=int, default=5, help="timing blocks: the speedup's spread over blocks is reported")
    ap.add_argument("--ort", action="store_true", help="also run onnxruntime's quantize_static / quantize_dynamic")
    ap.add_argument("--save-dir")
    ap.add_argument("--real", action="store_true", help="also the trained models of tools/real_models.py")
    ap.add_argument("--real-models", default="", help="only these real models (comma-separated)")
    ap.add_argument("--real-batch", type=int, default=32, help="batch for the real models' latency")
    ap.add_argument("--real-calib-batch", type=int, default=8, help="calibration batch for the real models")
    args = ap.parse_args()
    names = CORPUS_MODELS if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    rows = [bench(m, args) for m in names]
    if args.real:
        bench_real(args)
    rows = [r for r in rows if r]
    print("\nsummary (speedup = fp32 / int8 on onnxruntime, same run; error vs fp32 on held-out inputs)")
    for r in rows:
        parts = [f"{r['model']:16s}"]
        for k in ("graphopt", "ort"):
            if k in r:
                parts.append(f"{k} {r[k]['speedup']:.2f}x [{r[k]['block_min']:.2f}-{r[k]['block_max']:.2f}] sqnr {r[k]['sqnr']:.1f} dB")
        print("  " + " | ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

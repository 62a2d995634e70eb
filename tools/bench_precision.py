"""convert-precision on the corpus: output cosine vs fp32, latency vs fp32, model size.

    .venv/bin/python tools/bench_precision.py [--models resnet18,bert_base_s128] [--runs 10] [--threads 2]
    .venv/bin/python tools/bench_precision.py --cpu-bf16 [--models resnet18]   # bf16 on the cpu target

onnxruntime part: for each model in .cache/corpus, the fp32 model, `convert-precision{kernels=any}`
(every op the schema allows in fp16: what a runtime with fp16 kernels runs) and
`convert-precision` (kernels=auto: only ops the installed onnxruntime's CPU EP runs natively in
fp16) all run on onnxruntime's CPU EP (all graph optimisations on, `--threads` intra-op
threads), timed in interleaved rounds (median of `--runs` each, ratios against fp32 measured in
the same rounds). Cosine: the worst over the model's outputs, on one input (images ~ N(0, 1);
BERT: random token ids, the last 28 positions masked). onnxruntime's CPU EP has few fp16
kernels on x86-64: it wraps fp16 ops in Casts to float and, with its optimisations on, removes
the Cast pairs between them -- so "cosine" (as deployed) mostly measures fp16 weights, and
"strict" (optimisations off: every op boundary rounds to fp16) what a runtime with fp16 kernels
and fp32 accumulation gives.

--cpu-bf16: the same models compiled with `--target cpu` as fp32 and with
`convert-precision{dtype=bf16}` first, run through graphopt's artifact runner, cosine against
onnxruntime fp32 and latency ratio (TVM_NUM_THREADS=`--threads`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, ".cache", "corpus")
ALL = ["resnet50", "mobilenetv2", "efficientnet_b0", "resnet18", "densenet121", "googlenet", "bert_base_s128", "vit_b16"]


def inputs_for(name: str, model) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    if name.startswith("bert"):
        mask = np.ones((1, 128), np.int64)
        mask[:, 100:] = 0
        return {"input_ids": rng.integers(1000, 30000, (1, 128)), "attention_mask": mask,
                "token_type_ids": np.zeros((1, 128), np.int64)}
    from graphopt.check import random_inputs

    return random_inputs(model, dim_values={"batch": 1})


def cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    worst = 1.0
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
        worst = min(worst, float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-30)))
    return worst


def session(proto_bytes: bytes, threads: int, strict: bool = False):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    so = ort.SessionOptions()
    if strict:  # no graph optimisation: the Casts onnxruntime wraps fp16 ops in stay, so every
        # op boundary rounds to fp16 (as a runtime with fp16 kernels would store activations)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(proto_bytes, so, providers=["CPUExecutionProvider"])


def timed(sessions: list, feeds: dict[str, np.ndarray], runs: int) -> list[float]:  # type: ignore[type-arg]
    """Median ms per session, run in interleaved rounds (one run each per round, after a warm-up)."""
    for s in sessions:
        s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for k, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t)
    return [1e3 * float(np.median(t)) for t in times]


def bench_onnxruntime(names: list[str], runs: int, threads: int) -> None:
    import graphopt
    import graphopt.passes  # noqa: F401
    from graphopt.transform import PassContext, get_pass

    print(f"onnxruntime CPU EP, {threads} threads; cosine vs fp32; latency median of {runs} interleaved runs")
    print(f"{'model':16s} {'variant':10s} {'fp16 ops':>8s} {'kept':>5s} {'casts':>5s} {'MB':>7s} {'1-cos':>9s} {'1-cos strict':>12s} {'ms':>8s} {'vs fp32':>8s}")
    for name in names:
        path = os.path.join(CORPUS, name + ".onnx")
        base = graphopt.load(path)
        feeds = inputs_for(name, base)
        variants = [("fp32", None)]
        for label, opts in (("fp16-any", {"kernels": "any"}), ("fp16-auto", {})):
            m = graphopt.load(path)
            t0 = time.perf_counter()
            r = get_pass("convert-precision")(**opts).run(m, PassContext())
            dt = time.perf_counter() - t0
            m.verify()
            variants.append((label, (m, r, dt)))
        protos = [graphopt.to_onnx(base).SerializeToString()] + [graphopt.to_onnx(v[1][0]).SerializeToString() for v in variants[1:]]
        sessions = [session(p, threads) for p in protos]
        outs = [s.run(None, feeds) for s in sessions]
        strict = [session(p, threads, strict=True).run(None, feeds) for p in protos]
        ms = timed(sessions, feeds, runs)
        for k, (label, info) in enumerate(variants):
            cos = cosine(outs[0], outs[k])
            st = info[1].stats if info else {}
            print(f"{name:16s} {label:10s} {st.get('converted', 0):8d} {st.get('kept-fp32', 0):5d} {st.get('casts-added', 0):5d} "
                  f"{len(protos[k]) / 2**20:7.1f} {1 - cos:9.1e} {1 - cosine(strict[0], strict[k]):12.1e} {ms[k]:8.2f} {ms[0] / ms[k]:7.2f}x"
                  + (f"  (pass {info[2]:.1f} s)" if info else ""))
        sys.stdout.flush()


def bench_cpu_bf16(names: list[str], runs: int, threads: int) -> None:
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    import graphopt
    import graphopt.passes  # noqa: F401

    print(f"cpu target (TVM, untuned default schedules), TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}; "
          f"cosine vs onnxruntime fp32; median of {runs} interleaved runs")
    for name in names:
        path = os.path.join(CORPUS, name + ".onnx")
        base = graphopt.load(path)
        feeds = inputs_for(name, base)
        ref = session(graphopt.to_onnx(base).SerializeToString(), threads).run(None, feeds)
        arts = []
        for label, pipeline in (("fp32", "-O2"), ("bf16", "-O2,convert-precision{dtype=bf16}")):
            t0 = time.perf_counter()
            art = graphopt.compile(path, target="cpu", pipeline=pipeline)
            arts.append((label, art, time.perf_counter() - t0))
        outs = [list(a.run(feeds)) for _, a, _ in arts]
        ms: list[list[float]] = [[] for _ in arts]
        for _ in range(runs):
            for k, (_, a, _) in enumerate(arts):
                t = time.perf_counter()
                a.run(feeds)
                ms[k].append(time.perf_counter() - t)
        med = [1e3 * float(np.median(x)) for x in ms]
        for k, (label, _, ct) in enumerate(arts):
            print(f"{name:16s} {label:5s} 1-cos {1 - cosine(ref, outs[k]):9.1e}  {med[k]:8.2f} ms  {med[0] / med[k]:5.2f}x  (compile {ct:.0f} s)")
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ALL))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-bf16", action="store_true")
    a = ap.parse_args()
    names = [n for n in a.models.split(",") if n]
    if a.cpu_bf16:
        bench_cpu_bf16(names, a.runs, a.threads)
    else:
        bench_onnxruntime(names, a.runs, a.threads)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Per-kernel CPU speed of TVM code: naive vs default-scheduled vs tuned, against onnxruntime.

Each case is one ONNX operator (plus its fused epilogue) built in memory; TVM's Relax ONNX
frontend turns it into one fused PrimFunc (this tool measures schedules, not graphopt's
lowering). Every figure is a ratio against onnxruntime (ORT_ENABLE_ALL, same thread count)
measured in the same run, plus GFLOP/s against the machine's measured peak (a large numpy
matmul, same run).

    TVM_NUM_THREADS=2 .venv/bin/python tools/bench_tvm_kernels.py --threads 2
    .venv/bin/python tools/bench_tvm_kernels.py --cases conv3x3_64 --tune 16 --tuning-db /tmp/db
    .venv/bin/python tools/bench_tvm_kernels.py --threads 2 --profile-model resnet50   # graphopt.profiler, by schedule
    .venv/bin/python tools/bench_tvm_kernels.py --threads 1 --cpu-time --profile-model bert_base_s128
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper



@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    flops: float


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "k", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def conv_case(
    name: str, n: int, c: int, h: int, w: int, oc: int, k: int, stride: int = 1, group: int = 1,
    relu: bool = True, residual: bool = False, seed: int = 0,
) -> Case:
    rng = np.random.default_rng(seed)
    pad = k // 2
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    W = (rng.standard_normal((oc, c // group, k, k)) / np.sqrt(c * k * k / group)).astype(np.float32)
    B = rng.standard_normal(oc).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y0"], kernel_shape=[k, k], pads=[pad] * 4,
                              strides=[stride] * 2, group=group)]
    last = "y0"
    inputs = [_vi("x", (n, c, h, w))]
    feeds = {"x": rng.standard_normal((n, c, h, w)).astype(np.float32)}
    if residual:
        nodes.append(helper.make_node("Add", [last, "r"], ["y1"]))
        inputs.append(_vi("r", (n, oc, oh, ow)))
        feeds["r"] = rng.standard_normal((n, oc, oh, ow)).astype(np.float32)
        last = "y1"
    if relu:
        nodes.append(helper.make_node("Relu", [last], ["y"]))
        last = "y"
    m = _model(nodes, inputs, [_vi(last, (n, oc, oh, ow))],
               [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])
    flops = 2.0 * n * oc * oh * ow * (c // group) * k * k
    return Case(name, m, feeds, flops)


def matmul_case(name: str, m_: int, k: int, n: int, gelu: bool = False, transb: bool = False,
                batch: int = 0, seed: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    nodes = []
    inits = []
    if batch:
        a_shape, b_shape, o_shape = (batch, m_, k), (batch, k, n), (batch, m_, n)
        inputs = [_vi("a", a_shape), _vi("b", b_shape)]
        feeds = {"a": rng.standard_normal(a_shape).astype(np.float32),
                 "b": rng.standard_normal(b_shape).astype(np.float32)}
        nodes.append(helper.make_node("MatMul", ["a", "b"], ["y"]))
        last = "y"
    else:
        W = (rng.standard_normal((n, k) if transb else (k, n)) / np.sqrt(k)).astype(np.float32)
        B = rng.standard_normal(n).astype(np.float32)
        inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")]
        inputs = [_vi("a", (m_, k))]
        feeds = {"a": rng.standard_normal((m_, k)).astype(np.float32)}
        o_shape = (m_, n)
        nodes.append(helper.make_node("Gemm", ["a", "W", "B"], ["y0"], transB=int(transb)))
        last = "y0"
        if gelu:
            nodes.append(helper.make_node("Gelu", [last], ["y"]))
            last = "y"
    opset = 20 if gelu else 17
    return Case(name, _model(nodes, inputs, [_vi(last, o_shape)], inits, opset=opset), feeds,
                2.0 * max(batch, 1) * m_ * k * n)


def eltwise_case(name: str, shape, seed: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Add", ["a", "b"], ["t"]), helper.make_node("Sigmoid", ["t"], ["s"]),
             helper.make_node("Mul", ["t", "s"], ["y"])]
    feeds = {k: rng.standard_normal(shape).astype(np.float32) for k in ("a", "b")}
    return Case(name, _model(nodes, [_vi("a", shape), _vi("b", shape)], [_vi("y", shape)], []),
                feeds, 4.0 * float(np.prod(shape)))


def pool_case(name: str, shape, k: int = 3, stride: int = 2) -> Case:
    rng = np.random.default_rng(0)
    n, c, h, w = shape
    oh, ow = (h + 2 - k) // stride + 1, (w + 2 - k) // stride + 1
    nodes = [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[stride] * 2, pads=[1] * 4)]
    return Case(name, _model(nodes, [_vi("x", shape)], [_vi("y", (n, c, oh, ow))], []),
                {"x": rng.standard_normal(shape).astype(np.float32)}, float(n * c * oh * ow * k * k))


def softmax_case(name: str, shape) -> Case:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=-1)]
    return Case(name, _model(nodes, [_vi("x", shape)], [_vi("y", shape)], []),
                {"x": rng.standard_normal(shape).astype(np.float32)}, 5.0 * float(np.prod(shape)))


def layernorm_case(name: str, shape) -> Case:
    rng = np.random.default_rng(0)
    c = shape[-1]
    inits = [numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-12)]
    return Case(name, _model(nodes, [_vi("x", shape)], [_vi("y", shape)], inits),
                {"x": rng.standard_normal(shape).astype(np.float32)}, 8.0 * float(np.prod(shape)))


def all_cases() -> list[Case]:
    return [
        conv_case("conv3x3_64_56", 1, 64, 56, 56, 64, 3),
        conv_case("conv3x3_256_14_res", 1, 256, 14, 14, 256, 3, residual=True),
        conv_case("conv3x3_512_7", 1, 512, 7, 7, 512, 3),
        conv_case("conv1x1_256_64_56", 1, 256, 56, 56, 64, 1),
        conv_case("conv1x1_1024_256_14", 1, 1024, 14, 14, 256, 1),
        conv_case("conv3x3_s2_128_28", 1, 128, 56, 56, 128, 3, stride=2),
        conv_case("conv7x7_s2_stem", 1, 3, 224, 224, 64, 7, stride=2),
        conv_case("dwconv3x3_144_56", 1, 144, 56, 56, 144, 3, group=144),
        conv_case("dwconv3x3_s2_96_112", 1, 96, 112, 112, 96, 3, stride=2, group=96),
        matmul_case("dense_128x768x768", 128, 768, 768),
        matmul_case("dense_gelu_128x768x3072", 128, 768, 3072, gelu=True),
        matmul_case("dense_128x768x3072", 128, 768, 3072),
        matmul_case("dense_128x3072x768", 128, 3072, 768),
        matmul_case("dense_nt_128x3072x768", 128, 3072, 768, transb=True),
        matmul_case("batch_matmul_12x128x64x128", 128, 64, 128, batch=12),
        matmul_case("gemv_1x2048x1000", 1, 2048, 1000, transb=True),
        eltwise_case("add_silu_1x256x56x56", (1, 256, 56, 56)),
        pool_case("maxpool3x3_s2_64_112", (1, 64, 112, 112)),
        softmax_case("softmax_12x128x128", (12, 128, 128)),
        layernorm_case("layernorm_128x768", (1, 128, 768)),
    ]


# --------------------------------------------------------------------------- TVM side


def relax_kernels(model: onnx.ModelProto):
    """ONNX → Relax (TVM's frontend) → legalized, fused: one PrimFunc per fused group."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, keep_params_in_input=False)
    seq = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    for p in seq:
        mod = p(mod)
    return mod


def prepack_weights(mod):
    """Hoist the schedules' in-kernel weight packing out of the kernels (as the cpu target does
    for weights at load time): split it into its own function, which FoldConstant then runs at
    compile time on the constant weights."""
    from tvm import relax

    mod = relax.transform.SplitLayoutRewritePreproc()(mod)
    return relax.transform.FoldConstant()(mod)


def build_vm(mod, target) -> Callable:
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cp

    seq = tvm.transform.Sequential(cp.dataflow_lower_passes(target) + cp.finalize_passes(target))
    ex = tvm.compile(mod, target=target, relax_pipeline=seq)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm


def time_tvm(vm, feeds: dict[str, np.ndarray], names: list[str], repeat: int, number: int) -> tuple[float, np.ndarray]:
    import tvm

    args = [tvm.runtime.tensor(feeds[n]) for n in names]
    out = vm["main"](*args)
    out_np = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    te = vm.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat, min_repeat_ms=50)
    res = te(*args)
    return float(np.median(res.results)), out_np


def time_ort(model: onnx.ModelProto, feeds, threads: int, repeat: int, number: int) -> tuple[float, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, feeds)[0]
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            sess.run(None, feeds)
        ts.append((time.perf_counter() - t0) / number)
    return float(np.median(ts)), out


def numpy_peak(threads: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """GFLOP/s of a large fp32 numpy matmul (BLAS), the machine's practical peak (`clock`:
    time.process_time gives CPU seconds, summed over BLAS's threads)."""
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    a @ a
    best = 0.0
    for _ in range(5):
        t0 = clock()
        a @ a
        best = max(best, 2 * 2048**3 / max(clock() - t0, 1e-9) / 1e9)
    return best


def _number_for(seconds: float) -> int:
    return max(1, min(200, int(0.05 / max(seconds, 1e-6))))


def profile_model(name: str, threads: int, top: int = 20, cpu_time: bool = False, cold: bool = False) -> int:
    """Per-kernel time of a corpus model compiled by the cpu target (-O2; symbolic dims fixed to
    1), profiled by the library (graphopt.profiler: each kernel call timed on its real arguments),
    grouped by how each kernel was scheduled (which kernels eat the time?)."""
    import collections
    import tempfile

    import graphopt
    import graphopt.runtime
    from graphopt import profiler as P

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    om = onnx.load(os.path.join(root, ".cache", "corpus", f"{name}.onnx"))
    for vi in list(om.graph.input) + list(om.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") or not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
    with tempfile.TemporaryDirectory(prefix="graphopt-profile-") as tmp:
        graphopt.compile(onnx.shape_inference.infer_shapes(om), "cpu", "-O2", threads=threads).save(os.path.join(tmp, "a"))
        runner = graphopt.runtime.load(os.path.join(tmp, "a"), threads=threads)
        rng = np.random.default_rng(0)
        feeds = {i["name"]: rng.standard_normal(i["shape"]).astype(i["dtype"]) if np.dtype(i["dtype"]).kind == "f"
                 else rng.integers(0, 8, i["shape"]).astype(i["dtype"]) for i in runner.inputs}
        prof = P.profile_artifact(runner, feeds, cold=cold, cpu_time=cpu_time)
    flops = sum(r.flops or 0 for r in prof.rows)
    print(f"# {name}: {len(prof.rows)} kernel calls, sum {prof.total_ms:.2f} ms (threads={threads}, {prof.timing}); "
          f"matmul/conv {flops / 1e9:.2f} GFLOP, {flops / prof.total_ms / 1e6:.1f} GFLOP/s overall")
    by_rule: dict[str, float] = collections.defaultdict(float)
    for r in prof.rows:
        by_rule[r.schedule] += r.ms
    for rule, t in sorted(by_rule.items(), key=lambda kv: -kv[1]):
        print(f"schedule {rule:44} {t:9.2f} ms {100 * t / prof.total_ms:5.1f}%")
    print(P.format_profile(prof, sort="time", top=top))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive (unscheduled) build")
    ap.add_argument("--tune", type=int, default=0, help="trials per case for the tuned column (0: skip)")
    ap.add_argument("--tuning-db", default=None, help="tuning database directory (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-prepack", action="store_true",
                    help="keep the weight packing inside the kernels (default: hoisted and folded)")
    ap.add_argument("--profile-model", default="",
                    help="instead: per-kernel time shares of a corpus model (e.g. resnet50), by schedule rule")
    ap.add_argument("--cpu-time", action="store_true",
                    help="--profile-model: time kernels in CPU seconds of this process instead of wall seconds "
                         "(robust on a shared machine with --threads 1; with more threads it counts every thread)")
    ap.add_argument("--cold", action="store_true",
                    help="--profile-model: time each kernel with its arguments but the first (weights, residual, "
                         "output) flushed from the caches")
    args = ap.parse_args(argv)

    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    if args.profile_model:
        return profile_model(args.profile_model, args.threads, cpu_time=args.cpu_time, cold=args.cold)
    import tvm

    from graphopt.targets.tvm.schedules import ScheduleStats, apply_default_schedules

    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                                "num-cores": args.threads})
    cases = all_cases()
    if args.cases:
        want = set(args.cases.split(","))
        cases = [c for c in cases if c.name in want]
    peak = numpy_peak(args.threads)
    print(f"# numpy matmul peak {peak:.1f} GFLOP/s; threads={args.threads}; target={target}; "
          f"weight packing {'in the kernels' if args.no_prepack else 'hoisted (folded at compile time)'}", flush=True)
    if args.tune:
        import tempfile

        from graphopt.targets.tvm.tuning.tuner import apply_database, tune

        db_dir = args.tuning_db or tempfile.mkdtemp(prefix="graphopt-bench-db-")
    hdr = f"{'case':32} {'ort ms':>8} {'default':>8} {'x ort':>6} {'GF/s':>6} {'%peak':>5} {'rule':>16}"
    if not args.no_naive:
        hdr += f" {'naive':>8} {'x ort':>6}"
    if args.tune:
        hdr += f" {'tuned':>8} {'x ort':>6}"
    hdr += "  maxerr"
    print(hdr, flush=True)
    for case in cases:
        t_ort, ref = time_ort(case.model, case.feeds, args.threads, args.repeat, 1)
        t_ort, ref = time_ort(case.model, case.feeds, args.threads, args.repeat, _number_for(t_ort))
        mod = relax_kernels(case.model)
        names = [i.name for i in case.model.graph.input]
        stats = ScheduleStats()
        smod = apply_default_schedules(mod, target, stats=stats)
        if not args.no_prepack:
            smod = prepack_weights(smod)
        rules = ",".join(sorted(set(stats.by_func.values())))
        t_def, out = time_tvm(build_vm(smod, target), case.feeds, names, args.repeat, 1)
        err = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-6))
        line = (f"{case.name:32} {t_ort*1e3:8.3f} {t_def*1e3:8.3f} {t_def/t_ort:6.2f} "
                f"{case.flops/t_def/1e9:6.1f} {100*case.flops/t_def/1e9/peak:5.0f} {rules:>16}")
        if not args.no_naive:
            t_nv, out_nv = time_tvm(build_vm(mod, target), case.feeds, names, 1, 1)
            line += f" {t_nv*1e3:8.2f} {t_nv/t_ort:6.1f}"
        if args.tune:
            tune(mod, target, db_dir=db_dir, trials=args.tune, max_trials_per_task=args.tune,
                 progress=True, threads=args.threads)
            tmod = apply_database(mod, target, db_dir)
            t_tu, out_tu = time_tvm(build_vm(tmod, target), case.feeds, names, args.repeat, 1)
            line += f" {t_tu*1e3:8.3f} {t_tu/t_ort:6.2f}"
        line += f"  {err:.1e}"
        if stats.failures:
            line += "  [" + "; ".join(f"{k}: {v}" for k, v in stats.failures.items()) + "]"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

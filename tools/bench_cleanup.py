"""Benchmark the cleanup passes (-O1) against onnxruntime's graph optimizer and onnxsim.

    python tools/bench_cleanup.py [--quick]

Prints, per model: node counts of the input, graphopt -O1, onnxruntime's basic and extended
levels (the optimized graph onnxruntime dumps via SessionOptions.optimized_model_filepath),
onnxsim (when installed), and graphopt's pass time. Then times -O1/-O2 on ResNet-50 (the
onnx package's light_resnet50 with its weights materialised as random initializers) and on
synthetic graphs of ~10k and ~100k nodes, printed as time per node relative to the smallest.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.ir import Builder, DataType, Graph, Model, Shape, TensorType, Value

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light")


def count(proto: onnx.ModelProto) -> int:
    def walk(g: onnx.GraphProto) -> int:
        n = 0
        for node in g.node:
            n += 1
            for a in node.attribute:
                if a.HasField("g"):
                    n += walk(a.g)
                for sg in a.graphs:
                    n += walk(sg)
        return n

    return walk(proto.graph)


def ort_count(proto: onnx.ModelProto, level: str) -> int | str:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        try:
            ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
            return f"error: {str(e).splitlines()[0][:40]}"
        return count(onnx.load(so.optimized_model_filepath, load_external_data=False))


def onnxsim_count(proto: onnx.ModelProto) -> int | str:
    try:
        import onnxsim
    except ImportError:
        return "n/a"
    try:
        simplified, _ = onnxsim.simplify(proto)
    except Exception as e:  # noqa: BLE001
        return f"error: {str(e).splitlines()[0][:40]}"
    return count(simplified)


def torch_clutter(blocks: int = 12) -> onnx.ModelProto:
    """A torch-export-like model: per block, x.view(x.size(0), C, -1) via Shape/Gather/
    Unsqueeze/Concat, Identity and Dropout clutter, a duplicated Relu, constant arithmetic."""
    nodes, inits = [], []
    cur = "x"
    for b in range(blocks):
        p = f"b{b}_"
        inits += [
            numpy_helper.from_array(np.array(0, np.int64), p + "i0"),
            numpy_helper.from_array(np.array(1, np.int64), p + "i1"),
            numpy_helper.from_array(np.array([0], np.int64), p + "ax"),
            numpy_helper.from_array(np.array([-1], np.int64), p + "m1"),
            numpy_helper.from_array(np.ones((1,), np.float32), p + "one"),
            numpy_helper.from_array(np.full((4,), 0.5, np.float32), p + "h"),
        ]
        nodes += [
            helper.make_node("Shape", [cur], [p + "s"]),
            helper.make_node("Gather", [p + "s", p + "i0"], [p + "n"]),
            helper.make_node("Gather", [p + "s", p + "i1"], [p + "c"]),
            helper.make_node("Unsqueeze", [p + "n", p + "ax"], [p + "nu"]),
            helper.make_node("Unsqueeze", [p + "c", p + "ax"], [p + "cu"]),
            helper.make_node("Concat", [p + "nu", p + "cu", p + "m1"], [p + "shape"], axis=0),
            helper.make_node("Reshape", [cur, p + "shape"], [p + "r"]),
            helper.make_node("Identity", [p + "r"], [p + "id"]),
            helper.make_node("Dropout", [p + "id"], [p + "do"]),
            helper.make_node("Relu", [p + "do"], [p + "a1"]),
            helper.make_node("Relu", [p + "do"], [p + "a2"]),
            helper.make_node("Add", [p + "a1", p + "a2"], [p + "sum"]),
            helper.make_node("Mul", [p + "sum", p + "one"], [p + "m"]),
            helper.make_node("Exp", [p + "h"], [p + "eh"]),
            helper.make_node("Concat", [p + "nu", p + "cu"], [p + "s2"], axis=0),
            helper.make_node("Constant", [], [p + "tail"], value=numpy_helper.from_array(np.array([4, 4], np.int64))),
            helper.make_node("Concat", [p + "s2", p + "tail"], [p + "shape4"], axis=0),
            helper.make_node("Reshape", [p + "m", p + "shape4"], [p + "r4"]),
            helper.make_node("Add", [p + "r4", p + "eh"], [p + "out"]),
        ]
        cur = p + "out"
    g = helper.make_graph(
        nodes,
        "torch_jit",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 4, 4])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["batch", 8, 4, 4])],
        initializer=inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def with_random_weights(path: str) -> onnx.ModelProto:
    """A light model with every ConstantOfShape weight replaced by a random initializer: the
    light models build their weights in the graph only to keep the files small."""
    m = onnx.load(path)
    rng = np.random.default_rng(0)
    inits = {t.name: t for t in m.graph.initializer}
    shape_inputs = {n.input[0] for n in m.graph.node if n.op_type == "ConstantOfShape" and n.input[0] in inits}
    keep_nodes = []
    new_inits = [t for name, t in inits.items() if name not in shape_inputs]
    for n in m.graph.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in shape_inputs:
            shape = tuple(int(d) for d in numpy_helper.to_array(inits[n.input[0]]))
            new_inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np.float32), n.output[0]))
        else:
            keep_nodes.append(n)
    data_inputs = [i for i in m.graph.input if i.name not in inits]
    g = helper.make_graph(keep_nodes, m.graph.name, data_inputs, list(m.graph.output), initializer=new_inits)
    return helper.make_model(g, opset_imports=list(m.opset_import), ir_version=8)


def resnet50_with_weights() -> onnx.ModelProto:
    return with_random_weights(os.path.join(LIGHT, "light_resnet50.onnx"))


def synthetic(n_nodes: int) -> Model:
    """A long float graph with clutter every few nodes (Identity, duplicate ops, constant
    subexpressions, Transpose pairs), built straight in the IR."""
    x = Value("x", TensorType(DataType.FLOAT, Shape(("N", 16))))
    g = Graph([x], name="synthetic")
    b = Builder(g)
    one = b.initializer(np.ones((16,), np.float32), "one")
    cur = x
    made = 0
    i = 0
    while made < n_nodes:
        k = i % 6
        if k == 0:
            cur = b.op.Identity(b.op.Relu(cur))
            made += 2
        elif k == 1:
            a, c = b.op.Sigmoid(cur), b.op.Sigmoid(cur)
            cur = b.op.Add(a, c)
            made += 3
        elif k == 2:
            cur = b.op.Mul(cur, one)
            made += 1
        elif k == 3:
            c = b.initializer(np.full((16,), i % 7, np.float32), "c")
            cur = b.op.Add(cur, b.op.Neg(c))
            made += 2
        elif k == 4:
            cur = b.op.Transpose(b.op.Transpose(cur, perm=[1, 0]), perm=[1, 0])
            made += 2
        else:
            cur = b.op.Tanh(cur)
            made += 1
        i += 1
    y = b.op.Identity(cur)
    y.name = "y"
    y.type = TensorType(DataType.FLOAT, Shape(("N", 16)))
    g.outputs = [y]
    return Model(g, ir_version=8, opset_imports={"": 17})


def time_pipeline(model: Model, spec: str, repeat: int = 1) -> tuple[float, int]:
    best = float("inf")
    nodes = 0
    for _ in range(repeat):
        t = time.perf_counter()
        out = graphopt.optimize(model, spec)
        best = min(best, time.perf_counter() - t)
        nodes = sum(1 for _ in out.all_nodes())
    return best, nodes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the 100k-node graph")
    args = ap.parse_args(argv)

    cases: list[tuple[str, onnx.ModelProto]] = []
    for p in sorted(glob.glob(os.path.join(LIGHT, "*.onnx"))):
        # as shipped (weights built by ConstantOfShape, left unfolded by -O1's size bound), and
        # with those weights materialised as random initializers, as a real model has them
        cases.append((os.path.basename(p)[6:-5], onnx.load(p)))
        cases.append((os.path.basename(p)[6:-5] + "+w", with_random_weights(p)))
    cases.append(("torch_clutter", torch_clutter()))
    head = f"{'model':18} {'input':>6} {'-O1':>6} {'ort-basic':>10} {'ort-ext':>8} {'onnxsim':>8} {'-O1 time':>9}"
    print(head)
    print("-" * len(head))
    worse: list[str] = []
    for name, proto in cases:
        m = graphopt.load(proto)
        t = time.perf_counter()
        out = graphopt.optimize(m, "-O1")
        dt = time.perf_counter() - t
        ours = sum(1 for _ in out.all_nodes())
        basic, ext, sim = ort_count(proto, "basic"), ort_count(proto, "extended"), onnxsim_count(proto)
        print(f"{name:18} {count(proto):6} {ours:6} {basic!s:>10} {ext!s:>8} {sim!s:>8} {dt * 1000:7.0f}ms")
        if ours > count(proto):
            worse.append(f"{name}: -O1 grew the graph")
        for label, other in (("ort-basic", basic), ("onnxsim", sim)):
            if isinstance(other, int) and ours > other:
                worse.append(f"{name}: -O1 {ours} > {label} {other}")
    if worse:
        print("\nwhere -O1 ends with more nodes (rows without +w keep ConstantOfShape weights unfolded):\n  " + "\n  ".join(worse))

    print("\nscaling (best of 3 for small graphs, 1 for 100k):")
    rows = []
    rn = graphopt.load(resnet50_with_weights())
    for spec in ("-O1", "-O2"):
        t, n = time_pipeline(rn, spec, repeat=3)
        rows.append((f"resnet50 {spec}", sum(1 for _ in rn.all_nodes()), n, t))
    sizes = [1_000, 10_000] + ([] if args.quick else [100_000])
    for size in sizes:
        m = synthetic(size)
        for spec in ("-O1", "-O2"):
            t, n = time_pipeline(m, spec, repeat=3 if size <= 10_000 else 1)
            rows.append((f"synthetic {size // 1000}k {spec}", sum(1 for _ in m.all_nodes()), n, t))
    base = min(r[3] / r[1] for r in rows)
    print(f"{'case':20} {'nodes in':>9} {'out':>7} {'time':>9} {'µs/node':>8} {'ratio':>6}")
    for label, nin, nout, t in rows:
        per = t / nin
        print(f"{label:20} {nin:9} {nout:7} {t:8.3f}s {per * 1e6:8.1f} {per / base:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

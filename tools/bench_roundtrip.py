"""Benchmark: import + export of ResNet-50 with graphopt, against a pure protobuf round trip.

The onnx package ships `light_resnet50.onnx`, whose weights are ConstantOfShape nodes; they are
materialised here as random float32 initializers (the full ~100 MB), so the benchmark sees a
real-size model. Timed, each over several repetitions (median printed):

  graphopt   graphopt.load(bytes) -> graphopt.to_onnx -> SerializeToString
  baseline   onnx.load_from_string -> SerializeToString (parse + serialize, nothing else)

Usage: python tools/bench_roundtrip.py [--reps N] [--model PATH]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

import graphopt

LIGHT_RESNET50 = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "light_resnet50.onnx")


def materialise(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace every ConstantOfShape whose shape is an initializer by a random initializer."""
    rng = np.random.default_rng(seed)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    keep, used_shapes, new = [], set(), []
    for n in g.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in inits:
            shape = [int(d) for d in numpy_helper.to_array(inits[n.input[0]])]
            arr = (rng.standard_normal(shape) * 0.05).astype(np.float32)
            new.append(numpy_helper.from_array(arr, n.output[0]))
            used_shapes.add(n.input[0])
        else:
            keep.append(n)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    remaining = [t for t in out.graph.initializer if t.name not in used_shapes]
    del out.graph.initializer[:]
    out.graph.initializer.extend(remaining + new)
    if out.ir_version < 4:  # before IR 4 every initializer must also be a graph input
        declared = {i.name for i in out.graph.input}
        for t in new:
            if t.name not in declared:
                out.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        inputs = [i for i in out.graph.input if i.name not in used_shapes]
        del out.graph.input[:]
        out.graph.input.extend(inputs)
    return out


def median_time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up (imports, caches)
    times = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--model", default=None, help="an .onnx file to time instead of materialised ResNet-50")
    args = ap.parse_args()

    if args.model:
        data = open(args.model, "rb").read()
        label = os.path.basename(args.model)
    else:
        proto = materialise(onnx.load(LIGHT_RESNET50))
        data = proto.SerializeToString()
        label = "ResNet-50 (light_resnet50, weights materialised)"
    proto = onnx.load_from_string(data)
    n_nodes = len(proto.graph.node)
    weights = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    del proto
    print(f"{label}: {len(data) / 2**20:.1f} MiB, {n_nodes} nodes, {weights / 1e6:.1f} M weights, {args.reps} reps")

    state: dict[str, object] = {}

    def gl() -> None:
        state["m"] = graphopt.load(data)

    def ge() -> None:
        state["p"] = graphopt.to_onnx(state["m"])  # type: ignore[arg-type]

    def gs() -> None:
        state["b"] = state["p"].SerializeToString()  # type: ignore[attr-defined]

    def g_all() -> None:
        graphopt.to_onnx(graphopt.load(data)).SerializeToString()

    def base_parse() -> None:
        state["bp"] = onnx.load_from_string(data)

    def base_ser() -> None:
        state["bp"].SerializeToString()  # type: ignore[attr-defined]

    def base_all() -> None:
        onnx.load_from_string(data).SerializeToString()

    t_load, t_export, t_ser = median_time(gl, args.reps), median_time(ge, args.reps), median_time(gs, args.reps)
    t_total = median_time(g_all, args.reps)
    b_parse, b_ser, b_total = median_time(base_parse, args.reps), median_time(base_ser, args.reps), median_time(base_all, args.reps)

    print(f"  graphopt.load(bytes)      {t_load * 1e3:8.1f} ms")
    print(f"  graphopt.to_onnx          {t_export * 1e3:8.1f} ms")
    print(f"  SerializeToString         {t_ser * 1e3:8.1f} ms")
    print(f"  graphopt round trip       {t_total * 1e3:8.1f} ms   (load + to_onnx + serialize)")
    print(f"  baseline parse            {b_parse * 1e3:8.1f} ms   (onnx.load_from_string)")
    print(f"  baseline serialize        {b_ser * 1e3:8.1f} ms")
    print(f"  baseline round trip       {b_total * 1e3:8.1f} ms")
    print(f"  ratio graphopt / baseline {t_total / b_total:8.2f} x")
    print(f"  graphopt overhead         {(t_total - b_total) * 1e3:8.1f} ms over pure protobuf")
    print(f"  export == input bytes     {state['b'] == data}")


if __name__ == "__main__":
    main()

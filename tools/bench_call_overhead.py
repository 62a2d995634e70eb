"""Per-call overhead of a compiled cpu artifact on small models, against onnxruntime in the same
process and the same rounds (issue: small-model calls 5-9x slower than onnxruntime's).

    .venv/bin/python tools/bench_call_overhead.py [--threads 1,2] [--rounds 3000]

Models: the bundled example (examples/tiny_cnn.onnx, batch 1) and a recurrent step built here
(x [1, 128] and state [1, 128] in; three 128x128 matmuls, tanh; y and the new state out).
Printed per model and thread count: median µs per call of `Runner.run` (numpy in, numpy out),
of the library's entry alone (inputs already on the device), and of onnxruntime's
`InferenceSession.run`; the overhead is run - onnxruntime. Calls alternate between the two
runtimes, so load that comes and goes hits both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recurrent_step(width: int = 128) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = [nh.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [h.make_node("MatMul", ["x", "w0"], ["a"]), h.make_node("MatMul", ["state", "w1"], ["b"]),
             h.make_node("Add", ["a", "b"], ["c"]), h.make_node("Tanh", ["c"], ["new_state"]),
             h.make_node("MatMul", ["new_state", "w2"], ["y"])]
    g = h.make_graph(nodes, "step", [h.make_tensor_value_info("x", TP.FLOAT, [1, width]),
                                     h.make_tensor_value_info("state", TP.FLOAT, [1, width])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [1, width]),
                      h.make_tensor_value_info("new_state", TP.FLOAT, [1, width])], w)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def fixed_batch(m: onnx.ModelProto) -> onnx.ModelProto:
    for vi in list(m.graph.input) + list(m.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
    return m


def measure(name: str, m: onnx.ModelProto, threads: int, rounds: int) -> dict[str, float]:
    import onnxruntime as ort

    import graphopt
    import graphopt.runtime

    art = graphopt.compile(m, "cpu", "-O2", threads=threads)
    r = graphopt.runtime.load(art.path, threads=threads)
    rng = np.random.default_rng(1)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in m.graph.input}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    staged = r._feeds(feeds)
    calls = {"run": lambda: r.run(feeds), "entry": lambda: r._main(*staged, *r._params),
             "onnxruntime": lambda: s.run(None, feeds)}
    for f in calls.values():
        for _ in range(50):
            f()
    ts: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e6 for k, v in ts.items()}
    print(f"{name:16s} threads {threads}: run {med['run']:7.1f} µs  entry {med['entry']:7.1f} µs  "
          f"onnxruntime {med['onnxruntime']:7.1f} µs  overhead {med['run'] - med['onnxruntime']:+7.1f} µs "
          f"({med['run'] / med['onnxruntime']:.2f}x)", flush=True)
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3000)
    args = ap.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    print(f"# CPU: {model}; {os.cpu_count()} vCPUs")
    models = {"tiny_cnn": fixed_batch(onnx.load(os.path.join(ROOT, "examples", "tiny_cnn.onnx"))),
              "recurrent_step": recurrent_step()}
    for t in (int(x) for x in args.threads.split(",")):
        for name, m in models.items():
            measure(name, m, t, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Control-flow models (a VAD-like detector, a streaming Loop) and -O2 node counts vs onnxruntime.

    .venv/bin/python tools/control_flow_models.py [--save DIR] [--corpus]

Builds small models with onnx.helper that look like a streaming voice-activity detector: a
sample-rate input `sr` picks one of two If branches (16 kHz / 8 kHz), each a conv "STFT", a conv
encoder, an LSTM whose state `[2, batch, 128]` comes in and goes out, a conv head; plus the shape
arithmetic and leftovers exporters write (rank checks in Ifs, Identity, constant subexpressions,
duplicated Shape/Gather chains, an If output nothing reads). Variants:

    vad_lstm       the If model with ONNX LSTM nodes in both branches
    vad_unrolled   the same with the LSTM step written out as MatMul/Add/Sigmoid/Tanh (one step)
    loop_stream    a Loop over time with a carried state, an unused carried counter and an
                   unused scan output

For each variant it prints the node count (every graph, bodies included) of the original, of
graphopt -O2 (and -O2 with `--bind sr=16000`), and of onnxruntime's optimizer at
ORT_ENABLE_EXTENDED and ORT_ENABLE_ALL (SessionOptions.optimized_model_filepath, CPU EP), and
checks that -O2 outputs equal the original's on onnxruntime. tests/passes/cleanup/test_control_flow.py imports
the builders from here. `--corpus` adds the trained models of tools/real_corpus.py that are built
(ocr_crnn, vad_gru, vad_if: GRU/LSTM nodes, an If with the network in its branches).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

H = 128  # LSTM width (the VAD's state is [2, batch, 128])


class _Body:
    """A small graph writer: unique names, initializers as Constant nodes (bodies keep them inside)."""

    def __init__(self, prefix: str, rng: np.random.Generator) -> None:
        self.prefix, self.rng, self.nodes, self.n = prefix, rng, [], 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{self.prefix}{base}_{self.n}"

    def op(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:  # type: ignore[no-untyped-def]
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, arr: np.ndarray, base: str = "c") -> str:
        return self.op("Constant", [], value=numpy_helper.from_array(np.asarray(arr), self.name(base)))  # type: ignore[return-value]

    def weight(self, *shape: int, scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        s = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        return self.const((self.rng.standard_normal(shape) * s).astype(np.float32), "w")


def _lstm_weights(b: _Body) -> tuple[str, str, str]:
    return b.weight(1, 4 * H, H), b.weight(1, 4 * H, H), b.const((b.rng.standard_normal((1, 8 * H)) * 0.1).astype(np.float32))


def _branch(name: str, rng: np.random.Generator, win: int, hop: int, chans: list[int], unrolled: bool) -> onnx.GraphProto:
    """One sample-rate branch: reads outer `x` [B, S] and `state` [2, B, 128]; out [B, 1], stateN, feats."""
    b = _Body(name + "/", rng)
    x3 = b.op("Unsqueeze", ["x", b.const(np.array([1], np.int64))])
    pad = b.op("Pad", [x3, b.const(np.array([0, 0, win // 2, 0, 0, win // 2], np.int64))], mode="reflect")
    nf = win // 2 + 1
    basis = np.concatenate([np.cos(2 * np.pi * np.outer(np.arange(nf), np.arange(win)) / win),
                            -np.sin(2 * np.pi * np.outer(np.arange(nf), np.arange(win)) / win)]).astype(np.float32)
    stft = b.op("Conv", [pad, b.const(basis[:, None, :])], strides=[hop])
    # real/imag halves through Slice with constants an exporter computed as arithmetic
    half = b.op("Mul", [b.const(np.array([nf // 2], np.int64)), b.const(np.array([2], np.int64))])
    half = b.op("Add", [half, b.const(np.array([nf % 2], np.int64))])
    axes = b.const(np.array([1], np.int64))
    re = b.op("Slice", [stft, b.const(np.array([0], np.int64)), half, axes])
    im = b.op("Slice", [stft, half, b.const(np.array([2 * nf], np.int64)), axes])
    mag = b.op("Sqrt", [b.op("Add", [b.op("Mul", [re, re]), b.op("Mul", [im, im])])])
    h = b.op("Identity", [mag])
    cin = nf
    for i, c in enumerate(chans):
        h = b.op("Conv", [h, b.weight(c, cin, 3), b.const(np.zeros(c, np.float32))], pads=[1, 1], strides=[2 if i == 1 else 1])
        h = b.op("Relu", [h])
        cin = c
    # the LSTM runs over time: [B, C, T] -> [T, B, C]
    seq = b.op("Transpose", [h], perm=[2, 0, 1])
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    h0 = b.op("Unsqueeze", [b.op("Gather", ["state", zero], axis=0), b.const(np.array([0], np.int64))])
    c0 = b.op("Unsqueeze", [b.op("Gather", ["state", one], axis=0), b.const(np.array([0], np.int64))])
    if not unrolled:
        w, r, bias = _lstm_weights(b)
        _, yh, yc = b.op("LSTM", [seq, w, r, bias, "", h0, c0], n_out=3, hidden_size=H)
        last = b.op("Squeeze", [yh, b.const(np.array([0], np.int64))])
    else:  # one LSTM step on the time-mean, written out as exporters do for LSTMCell
        xt = b.op("ReduceMean", [seq], axes=[0], keepdims=0)
        hp = b.op("Squeeze", [h0, b.const(np.array([0], np.int64))])
        cp = b.op("Squeeze", [c0, b.const(np.array([0], np.int64))])
        g = b.op("Add", [b.op("MatMul", [xt, b.weight(H, 4 * H)]), b.op("MatMul", [hp, b.weight(H, 4 * H)])])
        g = b.op("Add", [g, b.const((rng.standard_normal(4 * H) * 0.1).astype(np.float32))])
        gi, gf, gg, go = b.op("Split", [g, b.const(np.array([H] * 4, np.int64))], n_out=4, axis=1)
        c1 = b.op("Add", [b.op("Mul", [b.op("Sigmoid", [gf]), cp]), b.op("Mul", [b.op("Sigmoid", [gi]), b.op("Tanh", [gg])])])
        last = b.op("Mul", [b.op("Sigmoid", [go]), b.op("Tanh", [c1])])
        yh = b.op("Unsqueeze", [last, b.const(np.array([0], np.int64))])
        yc = b.op("Unsqueeze", [c1, b.const(np.array([0], np.int64))])
    state_n = b.op("Concat", [yh, yc], axis=0)
    # head: Relu -> Conv1d(128 -> 1) -> Sigmoid -> reshape to [B, 1] by shape arithmetic
    y = b.op("Unsqueeze", [b.op("Relu", [last]), b.const(np.array([2], np.int64))])
    y = b.op("Sigmoid", [b.op("Conv", [y, b.weight(1, H, 1), b.const(np.zeros(1, np.float32))])])
    bs1 = b.op("Gather", [b.op("Shape", ["x"]), b.const(np.array(0, np.int64))], axis=0)
    bs2 = b.op("Gather", [b.op("Shape", ["x"]), b.const(np.array(0, np.int64))], axis=0)  # a duplicate chain
    shape = b.op("Concat", [b.op("Unsqueeze", [bs1, b.const(np.array([0], np.int64))]), b.const(np.array([1], np.int64))], axis=0)
    out = b.op("Reshape", [y, shape])
    scale = b.op("Div", [b.const(np.array(1.0, np.float32)), b.const(np.array(1.0, np.float32))])
    out = b.op("Mul", [out, scale])
    feats = b.op("Cast", [bs2], to=TensorProto.INT64)  # an output nothing outside reads
    outs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, None),
            helper.make_tensor_value_info(state_n, TensorProto.FLOAT, None),
            helper.make_tensor_value_info(feats, TensorProto.INT64, None)]
    return helper.make_graph(b.nodes, name, [], outs)


def vad_model(*, unrolled: bool = False, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """The If model: `sr` (int64 scalar) == 16000 picks the 16 kHz branch, else the 8 kHz one."""
    rng = np.random.default_rng(seed)
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "samples"]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, []),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", H])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
               helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", H])]
    m = _Body("", rng)
    # an exporter's rank check: a 1-D input gets a batch axis (never true for a rank-2 input)
    rank = m.op("Size", [m.op("Shape", ["input"])])
    is1d = m.op("Equal", [rank, m.const(np.array(1, np.int64))])
    then_b = helper.make_graph([helper.make_node("Unsqueeze", ["input", "ax0"], ["x_t"]),
                                helper.make_node("Constant", [], ["ax0"], value=numpy_helper.from_array(np.array([0], np.int64)))][::-1],
                               "rank1", [], [helper.make_tensor_value_info("x_t", TensorProto.FLOAT, None)])
    else_b = helper.make_graph([helper.make_node("Identity", ["input"], ["x_e"])], "rank2", [],
                               [helper.make_tensor_value_info("x_e", TensorProto.FLOAT, None)])
    m.nodes.append(helper.make_node("If", [is1d], ["x"], then_branch=then_b, else_branch=else_b, name="rank_check"))
    is16 = m.op("Equal", ["sr", m.const(np.array(16000, np.int64))])
    g16 = _branch("sr16k", rng, 256, 128, [128, 64, 64, H], unrolled)
    g8 = _branch("sr8k", rng, 128, 64, [64, 64, H], unrolled)
    m.nodes.append(helper.make_node("If", [is16], ["output", "stateN", "feats"], then_branch=g16, else_branch=g8, name="sr_select"))
    graph = helper.make_graph(m.nodes, "vad", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="control_flow_models")
    onnx.checker.check_model(model, full_check=True)
    return model


def loop_model(*, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """A Loop over time: state carried, a counter carried but never read after, an unused scan output."""
    rng = np.random.default_rng(seed)
    d = 32
    b = _Body("body/", rng)
    xt = b.op("Gather", ["xs", "i"], axis=0)  # xs is the outer [T, B, d] input
    w, r = b.weight(d, H), b.weight(H, H)
    h = b.op("Tanh", [b.op("Add", [b.op("MatMul", [xt, w]), b.op("MatMul", [b.op("Identity", ["h_in"]), r])])])
    cnt = b.op("Add", ["cnt_in", b.const(np.array(1, np.int64))])
    cond = b.op("Identity", ["cond_in"])
    y = b.op("Relu", [h])
    dbg = b.op("Neg", [h])  # a scan output nothing reads
    body = helper.make_graph(
        b.nodes, "step",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, None), helper.make_tensor_value_info("cnt_in", TensorProto.INT64, [])],
        [helper.make_tensor_value_info(cond, TensorProto.BOOL, []), helper.make_tensor_value_info(h, TensorProto.FLOAT, None),
         helper.make_tensor_value_info(cnt, TensorProto.INT64, []), helper.make_tensor_value_info(y, TensorProto.FLOAT, None),
         helper.make_tensor_value_info(dbg, TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Shape", ["xs"], ["xs_shape"]),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array([0], np.int64))),
             helper.make_node("Slice", ["xs_shape", "zero", "one"], ["t1"]),
             helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array([1], np.int64))),
             helper.make_node("Squeeze", ["t1", "zero"], ["T"]),
             helper.make_node("Constant", [], ["true"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("Constant", [], ["c0"], value=numpy_helper.from_array(np.array(0, np.int64))),
             helper.make_node("Loop", ["T", "true", "h0", "c0"], ["hT", "cntT", "ys", "dbgs"], body=body, name="time_loop")]
    nodes = [nodes[1], nodes[3], nodes[5], nodes[6], nodes[0], nodes[2], nodes[4], nodes[7]]
    graph = helper.make_graph(
        nodes, "stream",
        [helper.make_tensor_value_info("xs", TensorProto.FLOAT, ["T", "batch", d]),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", H])],
        [helper.make_tensor_value_info("ys", TensorProto.FLOAT, ["T", "batch", H]),
         helper.make_tensor_value_info("hT", TensorProto.FLOAT, ["batch", H])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="control_flow_models")
    onnx.checker.check_model(model, full_check=True)
    return model


VARIANTS: dict[str, Callable[[], onnx.ModelProto]] = {
    "vad_lstm": lambda: vad_model(unrolled=False),
    "vad_unrolled": lambda: vad_model(unrolled=True),
    "loop_stream": loop_model,
}


def vad_feeds(batch: int = 2, samples: int = 512, sr: int = 16000, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((batch, samples)).astype(np.float32), "sr": np.array(sr, np.int64),
            "state": (rng.standard_normal((2, batch, H)) * 0.1).astype(np.float32)}


def loop_feeds(steps: int = 5, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"xs": rng.standard_normal((steps, batch, 32)).astype(np.float32),
            "h0": (rng.standard_normal((batch, H)) * 0.1).astype(np.float32)}


def count_nodes(g: onnx.GraphProto) -> int:
    """Nodes of a graph and of every If/Loop/Scan body in it."""
    n = 0
    for node in g.node:
        n += 1
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                n += count_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                n += sum(count_nodes(x) for x in a.graphs)
    return n


def ort_optimized(model: onnx.ModelProto, level: str, path: str) -> onnx.ModelProto:
    """onnxruntime's optimized graph (CPU EP) at `level` (EXTENDED | ALL), as it saves it."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    so.optimized_model_filepath = path
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return onnx.load(path)


def graphopt_o2(model: onnx.ModelProto, bind: dict[str, np.ndarray] | None = None, contrib: bool = False) -> onnx.ModelProto:
    import graphopt
    from graphopt.target import bind_inputs
    from graphopt.transform import with_contrib_ops, parse_pipeline

    m = graphopt.load(model.SerializeToString())
    if bind:
        bind_inputs(m, bind)
    passes = parse_pipeline("-O2")
    if contrib:
        passes = with_contrib_ops(passes)
    return graphopt.to_onnx(graphopt.optimize(m, passes))


def corpus_cases() -> list[tuple[str, Callable[[], onnx.ModelProto], Callable[[], dict[str, np.ndarray]]]]:
    """The built models of tools/real_corpus.py, each with a test input (a VAD chunk from the
    middle of a test stream with a state the model reached there; an OCR text line)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import real_corpus as rc

    def feeds(name: str) -> dict[str, np.ndarray]:
        z = rc.test_data(name)
        if name == "ocr_crnn":
            return {"x": rc.ocr_input(z["images"][:, :, : int(z["widths"][0])])}
        sess = rc.session(rc.model_path(name), 1)
        state = np.zeros((2, 1, rc.HIDDEN), np.float32)
        for c in z["chunks_16000"][0][:40]:  # 40 chunks in: a state the model really reaches
            f = {"input": c[None], "state": state} | ({"sr": np.array(16000, np.int64)} if name == "vad_if" else {})
            state = sess.run(None, f)[1]
        return {"input": z["chunks_16000"][0][40][None], "state": state, "sr": np.array(16000, np.int64)}

    return [(n, (lambda n=n: onnx.load(str(rc.model_path(n)))), (lambda n=n: feeds(n))) for n in rc.list_models()]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", metavar="DIR", help="also write the original models here")
    ap.add_argument("--corpus", action="store_true", help="also the trained models of tools/real_corpus.py that are built")
    args = ap.parse_args(argv)
    rows = []
    cases: list[tuple[str, Callable[[], onnx.ModelProto], Callable[[], dict[str, np.ndarray]]]] = [
        (name, make, loop_feeds if name.startswith("loop") else vad_feeds) for name, make in VARIANTS.items()]
    if args.corpus:
        cases += corpus_cases()
    with tempfile.TemporaryDirectory() as tmp:
        for name, make, make_feeds in cases:
            model = make()
            if args.save:
                os.makedirs(args.save, exist_ok=True)
                onnx.save(model, os.path.join(args.save, name + ".onnx"))
            feeds = make_feeds()
            ref = _run(model, feeds)
            o2 = graphopt_o2(model)
            o2c = graphopt_o2(model, contrib=True)
            worst = max(float(np.max(np.abs(a - b))) for a, b in zip(ref, _run(o2, feeds)))
            row = {"model": name, "original": count_nodes(model.graph), "graphopt -O2": count_nodes(o2.graph),
                   "-O2 contrib-ops": count_nodes(o2c.graph),
                   "ort EXTENDED": count_nodes(ort_optimized(model, "EXTENDED", os.path.join(tmp, "e.onnx")).graph),
                   "ort ALL": count_nodes(ort_optimized(model, "ALL", os.path.join(tmp, "a.onnx")).graph),
                   "max |diff|": f"{worst:.1e}"}
            if any(i.name == "sr" for i in model.graph.input):
                bound = graphopt_o2(model, bind={"sr": np.array(16000, np.int64)})
                diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ref, _run(bound, feeds)))
                row["-O2 --bind sr=16000"] = f"{count_nodes(bound.graph)} ({diff:.1e})"
            rows.append(row)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    width = {k: max(len(k), *(len(str(r.get(k, ''))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(width[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r.get(k, "")).ljust(width[k]) for k in keys))
    print("node counts include If/Loop bodies; max |diff|: -O2 vs the original on onnxruntime (optimizations off)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

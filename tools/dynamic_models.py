"""Models with symbolic dims beyond the batch, built with onnx.helper (no torch): the test corpus
of the cpu target's dynamic shapes (issue 21). tests/targets/tvm/test_tvm_dynamic_shapes.py and
tools/bench_dynamic.py import the builders from here; `make_corpus.py` style export:

    .venv/bin/python tools/dynamic_models.py [--out .cache/corpus]

    detector_dyn   a detector-like conv net on [N, 3, H, W]: a stride-2 stem, conv/BN/Relu blocks,
                   MaxPool, a stride-2 conv, two Resize x2 (nearest, then linear) upsamplings, each
                   concatenated with a skip connection (so H and W must be multiples of 8), a
                   sigmoid probability map [N, 1, H/2, W/2] and a GlobalAveragePool -> Gemm class
                   head [N, 10]
    encoder_dyn    a 2-layer pre-LN transformer encoder on [N, S, 64] with a symbolic sequence
                   length S: attention written as MatMul/Softmax with the head split done by
                   Shape/Gather/Concat/Reshape arithmetic (as exporters write it), GELU (Erf)
    crnn_dyn       a recognizer-like CRNN on [N, 3, 32, W]: convs, pools that halve H only, the
                   map reshaped to a [N, W/4, C*H'] sequence, a bidirectional LSTM, a classifier

Weights: numpy Generator(0); BatchNorm statistics random (folding is checked numerically).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh


class _G:
    """A small graph writer: unique names, initializers from numpy."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, p: str) -> str:
        self.n += 1
        return f"{p}{self.n}"

    def const(self, arr: np.ndarray, p: str = "c") -> str:
        nm = self.name(p)
        self.inits.append(nh.from_array(np.asarray(arr), nm))
        return nm

    def op(self, op: str, ins: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(h.make_node(op, ins, outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, bn: bool = True, relu: bool = True,
             group: int = 1) -> str:
        w = self.const((self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / (cin // group * k * k)))
                       .astype(np.float32), "w")
        ins = [x, w]
        if not bn:
            ins.append(self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b"))
        y = self.op("Conv", ins, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group)
        if bn:
            sc = self.const(self.rng.uniform(0.5, 1.5, cout).astype(np.float32), "bn_s")
            bi = self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "bn_b")
            mu = self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "bn_m")
            var = self.const(self.rng.uniform(0.5, 1.5, cout).astype(np.float32), "bn_v")
            y = self.op("BatchNormalization", [y, sc, bi, mu, var], epsilon=1e-5)
        return self.op("Relu", [y]) if relu else y

    def up2(self, x: str, mode: str) -> str:
        scales = self.const(np.array([1, 1, 2, 2], np.float32), "scales")
        kw = {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"} if mode == "nearest" else \
            {"coordinate_transformation_mode": "half_pixel"}
        return self.op("Resize", [x, "", scales], mode=mode, **kw)

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], opset: int = 17) -> onnx.ModelProto:
        g = h.make_graph(self.nodes, "g", inputs, outputs, self.inits)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)], producer_name="graphopt-tools")
        m.ir_version = 8
        onnx.checker.check_model(m)
        return onnx.shape_inference.infer_shapes(m)


def detector(width: int = 16, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """detector_dyn (see the module docstring); input "image" [N, 3, H, W], H and W multiples of 8."""
    g = _G(seed)
    c = width
    s = g.conv("image", 3, c, stride=2)  # H/2
    c1 = g.conv(s, c, 2 * c)  # H/2, 2c
    p = g.op("MaxPool", [c1], kernel_shape=[2, 2], strides=[2, 2])  # H/4
    c2 = g.conv(p, 2 * c, 2 * c)  # H/4, 2c
    c3 = g.conv(c2, 2 * c, 4 * c, stride=2)  # H/8, 4c
    c4 = g.conv(c3, 4 * c, 4 * c)
    c4 = g.conv(c4, 4 * c, 4 * c, k=3, group=4 * c)  # depthwise
    u1 = g.up2(c4, "nearest")  # H/4, 4c
    m1 = g.op("Concat", [u1, c2], axis=1)  # 6c
    d1 = g.conv(m1, 6 * c, 2 * c, k=1)
    u2 = g.up2(d1, "linear")  # H/2, 2c
    m2 = g.op("Concat", [u2, c1], axis=1)  # 4c
    d2 = g.conv(m2, 4 * c, 2 * c)
    logit = g.conv(d2, 2 * c, 1, k=1, bn=False, relu=False)
    prob = g.op("Sigmoid", [logit])
    gp = g.op("GlobalAveragePool", [c4])
    fl = g.op("Flatten", [gp], axis=1)
    fw = g.const((g.rng.standard_normal((classes, 4 * c)) * 0.1).astype(np.float32), "fc_w")
    fb = g.const(np.zeros(classes, np.float32), "fc_b")
    cls = g.op("Gemm", [fl, fw, fb], transB=1)
    g.nodes.append(h.make_node("Identity", [prob], ["prob"]))
    g.nodes.append(h.make_node("Identity", [cls], ["cls"]))
    return g.model([h.make_tensor_value_info("image", TP.FLOAT, ["N", 3, "H", "W"])],
                   [h.make_tensor_value_info("prob", TP.FLOAT, ["N", 1, "H2", "W2"]), h.make_tensor_value_info("cls", TP.FLOAT, ["N", classes])])


def encoder(dim: int = 64, heads: int = 4, layers: int = 2, seed: int = 0) -> onnx.ModelProto:
    """encoder_dyn (see the module docstring); input "x" [N, S, dim]."""
    g = _G(seed)
    dh = dim // heads
    x = "x"

    def ln(v: str) -> str:
        return g.op("LayerNormalization", [v, g.const(g.rng.uniform(0.5, 1.5, dim).astype(np.float32), "ln_s"),
                                           g.const((g.rng.standard_normal(dim) * 0.1).astype(np.float32), "ln_b")],
                    axis=-1, epsilon=1e-5)

    def lin(v: str, i: int, o: int) -> str:
        w = g.const((g.rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32), "w")
        b = g.const((g.rng.standard_normal(o) * 0.1).astype(np.float32), "b")
        return g.op("Add", [g.op("MatMul", [v, w]), b])

    i0, i1 = g.const(np.array([0], np.int64), "i"), g.const(np.array([1], np.int64), "i")
    for _ in range(layers):
        y = ln(x)
        shp = g.op("Shape", [y])
        nb = g.op("Gather", [shp, i0], axis=0)
        sq = g.op("Gather", [shp, i1], axis=0)
        split = g.op("Concat", [nb, sq, g.const(np.array([heads, dh], np.int64), "hs")], axis=0)

        def heads_of(v: str, perm: list[int]) -> str:
            return g.op("Transpose", [g.op("Reshape", [v, split])], perm=perm)

        q = heads_of(lin(y, dim, dim), [0, 2, 1, 3])
        k = heads_of(lin(y, dim, dim), [0, 2, 3, 1])
        v = heads_of(lin(y, dim, dim), [0, 2, 1, 3])
        att = g.op("Softmax", [g.op("Div", [g.op("MatMul", [q, k]), g.const(np.array(np.sqrt(dh), np.float32), "sc")])], axis=-1)
        o = g.op("Transpose", [g.op("MatMul", [att, v])], perm=[0, 2, 1, 3])
        merge = g.op("Concat", [nb, sq, g.const(np.array([dim], np.int64), "d")], axis=0)
        o = g.op("Reshape", [o, merge])
        x = g.op("Add", [x, lin(o, dim, dim)])
        y = ln(x)
        f = lin(y, dim, 4 * dim)
        gelu = g.op("Mul", [g.op("Mul", [f, g.op("Add", [g.op("Erf", [g.op("Div", [f, g.const(np.array(np.sqrt(2), np.float32), "r2")])]),
                                                           g.const(np.array(1, np.float32), "one")])]),
                            g.const(np.array(0.5, np.float32), "half")])
        x = g.op("Add", [x, lin(gelu, 4 * dim, dim)])
    g.nodes.append(h.make_node("Identity", [ln(x)], ["y"]))
    return g.model([h.make_tensor_value_info("x", TP.FLOAT, ["N", "S", dim])], [h.make_tensor_value_info("y", TP.FLOAT, ["N", "S", dim])])


def crnn(width: int = 16, hidden: int = 32, classes: int = 20, seed: int = 0) -> onnx.ModelProto:
    """crnn_dyn (see the module docstring); input "line" [N, 3, 32, W], W a multiple of 4."""
    g = _G(seed)
    c = width
    x = g.conv("line", 3, c)
    x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])  # 16 x W/2
    x = g.conv(x, c, 2 * c)
    x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])  # 8 x W/4
    x = g.conv(x, 2 * c, 2 * c)
    x = g.op("MaxPool", [x], kernel_shape=[8, 1], strides=[8, 1])  # 1 x W/4
    x = g.op("Squeeze", [x, g.const(np.array([2], np.int64), "ax")])  # [N, 2c, W/4]
    x = g.op("Transpose", [x], perm=[2, 0, 1])  # [T, N, 2c]
    w = g.const((g.rng.standard_normal((2, 4 * hidden, 2 * c)) * 0.2).astype(np.float32), "lstm_w")
    r = g.const((g.rng.standard_normal((2, 4 * hidden, hidden)) * 0.2).astype(np.float32), "lstm_r")
    b = g.const((g.rng.standard_normal((2, 8 * hidden)) * 0.1).astype(np.float32), "lstm_b")
    y = g.op("LSTM", [x, w, r, b], n_out=1, hidden_size=hidden, direction="bidirectional")  # [T, 2, N, hidden]
    y = g.op("Transpose", [y], perm=[0, 2, 1, 3])  # [T, N, 2, hidden]
    y = g.op("Reshape", [y, g.const(np.array([0, 0, 2 * hidden], np.int64), "shp")])
    fw = g.const((g.rng.standard_normal((2 * hidden, classes)) * 0.2).astype(np.float32), "fc_w")
    y = g.op("MatMul", [y, fw])
    g.nodes.append(h.make_node("Softmax", [y], ["probs"], axis=-1))
    return g.model([h.make_tensor_value_info("line", TP.FLOAT, ["N", 3, 32, "W"])],
                   [h.make_tensor_value_info("probs", TP.FLOAT, ["T", "N", classes])])


MODELS = {"detector_dyn": detector, "encoder_dyn": encoder, "crnn_dyn": crnn}
#: (name, input name, the sizes tools/bench_dynamic.py and the tests run)
SIZES = {
    "detector_dyn": ("image", [(1, 3, 64, 64), (1, 3, 96, 128), (1, 3, 160, 96), (1, 3, 320, 320)]),
    "encoder_dyn": ("x", [(1, 16, 64), (1, 77, 64), (2, 128, 64), (1, 384, 64)]),
    "crnn_dyn": ("line", [(1, 3, 32, 64), (1, 3, 32, 160), (1, 3, 32, 320)]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "corpus"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, fn in MODELS.items():
        path = os.path.join(args.out, f"{name}.onnx")
        onnx.save(fn(), path)
        print(path)


if __name__ == "__main__":
    main()

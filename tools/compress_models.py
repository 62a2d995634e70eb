"""Small trained models for compression checks, built with numpy alone in seconds.

Random weights make pruning and clustering sensitivity meaningless (every channel matters
alike); these nets are trained (Adam, cross-entropy, a little weight decay) on data generated
here, so their weights have the structure a real model has: some channels carry the signal,
others little.

    import importlib.util; spec = importlib.util.spec_from_file_location("cm", "tools/compress_models.py")
    cm = importlib.util.module_from_spec(spec); spec.loader.exec_module(cm)
    proto, data = cm.shapes_cnn()        # onnx.ModelProto, Data(x_train, y_train, x_test, y_test)
    cm.accuracy(proto_or_bytes_or_path, data)   # top-1 on the held-out split (onnxruntime)

Models (opset 13, input batch axis symbolic "N", or `-1` as dim_value with batch_dim=-1, the
way paddle2onnx writes it):

    shapes_cnn   1x16x16 images of 4 rendered shapes (bar, column, diagonal, ring) at random
                 places with noise: Conv3x3(16)-Relu-Conv3x3/2(32)-Relu-GlobalAveragePool-Flatten-Gemm(4)
    blobs_mlp    32-d features from 8 Gaussian clusters on a 6-d subspace plus noise:
                 Gemm(64)-Relu-Gemm(64)-Relu-Gemm(8)

    .venv/bin/python tools/compress_models.py [OUT_DIR]   # writes both .onnx + calibration .npz
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def calibration(self, n: int = 64) -> dict[str, np.ndarray]:
        return {"x": self.x_train[:n]}


# --- data ---------------------------------------------------------------------------------------
def shapes_data(n_train: int = 2048, n_test: int = 512, seed: int = 0, size: int = 16) -> Data:
    rng = np.random.default_rng(seed)

    def render(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(0.0, 0.3, (n, 1, size, size)).astype(np.float32)
        y = rng.integers(0, 4, n)
        for i in range(n):
            r, c = rng.integers(3, size - 3, 2)
            ln = rng.integers(3, 6)
            v = 1.0 + 0.5 * rng.random()
            if y[i] == 0:
                x[i, 0, r, max(0, c - ln):c + ln] += v
            elif y[i] == 1:
                x[i, 0, max(0, r - ln):r + ln, c] += v
            elif y[i] == 2:
                for k in range(-ln, ln):
                    if 0 <= r + k < size and 0 <= c + k < size:
                        x[i, 0, r + k, c + k] += v
            else:
                x[i, 0, r - 2:r + 3, c - 2:c + 3] += v
                x[i, 0, r - 1:r + 2, c - 1:c + 2] -= v
        return x, y.astype(np.int64)

    xa, ya = render(n_train)
    xb, yb = render(n_test)
    return Data(xa, ya, xb, yb)


def blobs_data(n_train: int = 4096, n_test: int = 1024, seed: int = 0, dim: int = 32, classes: int = 8) -> Data:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, 6)))[0]  # (dim, 6)
    centers = rng.normal(0, 1.6, (classes, 6))

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        z = centers[y] + rng.normal(0, 0.8, (n, 6))
        x = z @ basis.T + rng.normal(0, 0.3, (n, dim))
        return x.astype(np.float32), y.astype(np.int64)

    xa, ya = make(n_train)
    xb, yb = make(n_test)
    return Data(xa, ya, xb, yb)


# --- numpy training -----------------------------------------------------------------------------
def _im2col(x: np.ndarray, k: int, s: int, p: int) -> tuple[np.ndarray, int, int]:
    b, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    cols = np.empty((b, c, k, k, ho, wo), x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = xp[:, :, i:i + s * ho:s, j:j + s * wo:s]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(b * ho * wo, c * k * k), ho, wo


def _col2im(d: np.ndarray, shape: tuple[int, ...], k: int, s: int, p: int, ho: int, wo: int) -> np.ndarray:
    b, c, h, w = shape
    d6 = d.reshape(b, ho, wo, c, k, k).transpose(0, 3, 4, 5, 1, 2)
    dxp = np.zeros((b, c, h + 2 * p, w + 2 * p), d.dtype)
    for i in range(k):
        for j in range(k):
            dxp[:, :, i:i + s * ho:s, j:j + s * wo:s] += d6[:, :, i, j]
    return dxp[:, :, p:p + h, p:p + w]


class _Adam:
    def __init__(self, params: dict[str, np.ndarray], lr: float = 3e-3, wd: float = 1e-4) -> None:
        self.p, self.lr, self.wd, self.t = params, lr, wd, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        for k, g in grads.items():
            if self.p[k].ndim > 1:
                g = g + self.wd * self.p[k]
            self.m[k] = 0.9 * self.m[k] + 0.1 * g
            self.v[k] = 0.999 * self.v[k] + 0.001 * g * g
            mh = self.m[k] / (1 - 0.9 ** self.t)
            vh = self.v[k] / (1 - 0.999 ** self.t)
            self.p[k] -= self.lr * mh / (np.sqrt(vh) + 1e-8)


def _softmax_ce(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return p / len(y)


def train_cnn(data: Data, *, c1: int = 16, c2: int = 32, epochs: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = int(data.y_train.max()) + 1
    P = {
        "w1": rng.normal(0, np.sqrt(2 / 9), (c1, 1, 3, 3)), "b1": np.zeros(c1),
        "w2": rng.normal(0, np.sqrt(2 / (9 * c1)), (c2, c1, 3, 3)), "b2": np.zeros(c2),
        "w3": rng.normal(0, np.sqrt(1 / c2), (c2, k)), "b3": np.zeros(k),
    }
    opt = _Adam(P)
    x_all = data.x_train.astype(np.float64)
    for _ in range(epochs):
        order = rng.permutation(len(x_all))
        for s in range(0, len(order), 64):
            idx = order[s:s + 64]
            x, y = x_all[idx], data.y_train[idx]
            b = len(idx)
            c1m, h1, w1o = _im2col(x, 3, 1, 1)
            a1 = c1m @ P["w1"].reshape(c1, -1).T + P["b1"]
            r1 = np.maximum(a1, 0).reshape(b, h1, w1o, c1).transpose(0, 3, 1, 2)
            c2m, h2, w2o = _im2col(r1, 3, 2, 1)
            a2 = c2m @ P["w2"].reshape(c2, -1).T + P["b2"]
            r2 = np.maximum(a2, 0)
            g = r2.reshape(b, h2 * w2o, c2).mean(axis=1)
            logits = g @ P["w3"] + P["b3"]
            dl = _softmax_ce(logits, y)
            grads = {"w3": g.T @ dl, "b3": dl.sum(0)}
            dg = dl @ P["w3"].T
            da2 = np.repeat(dg[:, None, :] / (h2 * w2o), h2 * w2o, axis=1).reshape(-1, c2) * (a2 > 0)
            grads["w2"] = (da2.T @ c2m).reshape(P["w2"].shape)
            grads["b2"] = da2.sum(0)
            dr1 = _col2im(da2 @ P["w2"].reshape(c2, -1), r1.shape, 3, 2, 1, h2, w2o)
            da1 = dr1.transpose(0, 2, 3, 1).reshape(-1, c1) * (a1 > 0)
            grads["w1"] = (da1.T @ c1m).reshape(P["w1"].shape)
            grads["b1"] = da1.sum(0)
            opt.step(grads)
    return P


def train_mlp(data: Data, *, hidden: int = 64, epochs: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, k = data.x_train.shape[1], int(data.y_train.max()) + 1
    P = {"w1": rng.normal(0, np.sqrt(2 / d), (d, hidden)), "b1": np.zeros(hidden),
         "w2": rng.normal(0, np.sqrt(2 / hidden), (hidden, hidden)), "b2": np.zeros(hidden),
         "w3": rng.normal(0, np.sqrt(1 / hidden), (hidden, k)), "b3": np.zeros(k)}
    opt = _Adam(P)
    x_all = data.x_train.astype(np.float64)
    for _ in range(epochs):
        order = rng.permutation(len(x_all))
        for s in range(0, len(order), 64):
            idx = order[s:s + 64]
            x, y = x_all[idx], data.y_train[idx]
            a1 = x @ P["w1"] + P["b1"]
            h1 = np.maximum(a1, 0)
            a2 = h1 @ P["w2"] + P["b2"]
            h2 = np.maximum(a2, 0)
            dl = _softmax_ce(h2 @ P["w3"] + P["b3"], y)
            d2 = (dl @ P["w3"].T) * (a2 > 0)
            d1 = (d2 @ P["w2"].T) * (a1 > 0)
            opt.step({"w3": h2.T @ dl, "b3": dl.sum(0), "w2": h1.T @ d2, "b2": d2.sum(0),
                      "w1": x.T @ d1, "b1": d1.sum(0)})
    return P


# --- ONNX -------------------------------------------------------------------------------------
def _model(nodes, inits, x_shape, out_dim: int, batch_dim):  # type: ignore[no-untyped-def]
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, *x_shape])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch_dim, out_dim])
    g = helper.make_graph(nodes, "trained", [x], [y],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="compress_models")
    m.ir_version = 8
    if batch_dim == -1:  # written as dim_value -1, as paddle2onnx does
        for vi in (m.graph.input[0], m.graph.output[0]):
            vi.type.tensor_type.shape.dim[0].Clear()
            vi.type.tensor_type.shape.dim[0].dim_value = -1
    return m


def cnn_proto(P: dict[str, np.ndarray], batch_dim="N"):  # type: ignore[no-untyped-def]
    from onnx import helper

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc"),
    ]
    return _model(nodes, P, [1, 16, 16], P["b3"].shape[0], batch_dim)


def mlp_proto(P: dict[str, np.ndarray], batch_dim="N"):  # type: ignore[no-untyped-def]
    from onnx import helper

    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"], name="fc3"),
    ]
    return _model(nodes, P, [P["w1"].shape[0]], P["b3"].shape[0], batch_dim)


def shapes_cnn(seed: int = 0, batch_dim="N", epochs: int = 6):  # type: ignore[no-untyped-def]
    data = shapes_data(seed=seed)
    return cnn_proto(train_cnn(data, seed=seed, epochs=epochs), batch_dim), data


def blobs_mlp(seed: int = 0, batch_dim="N", epochs: int = 8):  # type: ignore[no-untyped-def]
    data = blobs_data(seed=seed)
    return mlp_proto(train_mlp(data, seed=seed, epochs=epochs), batch_dim), data


def accuracy(model, data: Data) -> float:  # type: ignore[no-untyped-def]
    """Top-1 accuracy on the held-out split (onnxruntime); `model` an onnx proto, bytes, path or graphopt Model."""
    import onnxruntime as ort

    if hasattr(model, "graph") and hasattr(model.graph, "nodes") and not hasattr(model, "SerializeToString"):
        from graphopt import to_onnx

        model = to_onnx(model)
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    sess = ort.InferenceSession(str(src) if isinstance(src, Path) else src, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"x": data.x_test})[0]
    return float((logits.argmax(axis=1) == data.y_test).mean())


def main(argv: list[str]) -> int:
    import onnx

    out = Path(argv[0] if argv else ".cache/compress")
    out.mkdir(parents=True, exist_ok=True)
    for name, make in (("shapes_cnn", shapes_cnn), ("blobs_mlp", blobs_mlp)):
        proto, data = make()
        onnx.save(proto, out / f"{name}.onnx")
        np.savez(out / f"{name}_calib.npz", **data.calibration(256))
        print(f"{name}: test accuracy {accuracy(proto, data):.4f} -> {out / (name + '.onnx')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

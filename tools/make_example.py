"""Build examples/tiny_cnn.onnx: a small CNN with the clutter exporters typically leave behind.

    .venv/bin/python tools/make_example.py [OUT.onnx]

Conv → BatchNormalization → Relu → Identity → Conv → BatchNormalization → Relu → MaxPool, a
Shape → Gather → Unsqueeze → Concat → Reshape flatten (the way torch exports `x.view(N, -1)`),
then Gemm → Relu → Identity → Gemm. The batch dim is symbolic ("N"); ~50 KB of float32 weights
drawn from a fixed seed, and the file is serialized deterministically, so re-running this script
gives byte-identical output.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 20240601
OPSET = 17


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    inits: list[onnx.TensorProto] = []

    def weight(name: str, *shape: int, scale: float = 0.2) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def bn_params(prefix: str, c: int) -> list[str]:
        arrays = {
            "scale": 1.0 + 0.1 * rng.standard_normal(c),
            "bias": 0.1 * rng.standard_normal(c),
            "mean": 0.1 * rng.standard_normal(c),
            "var": 1.0 + 0.1 * np.abs(rng.standard_normal(c)),
        }
        names = []
        for key, arr in arrays.items():
            inits.append(numpy_helper.from_array(arr.astype(np.float32), f"{prefix}.{key}"))
            names.append(f"{prefix}.{key}")
        return names

    nodes = [
        helper.make_node("Conv", ["input", weight("conv1.w", 8, 3, 3, 3), weight("conv1.b", 8)], ["c1"],
                         name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", *bn_params("bn1", 8)], ["b1"], name="bn1", epsilon=1e-5),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Identity", ["r1"], ["r1_id"], name="identity1"),
        helper.make_node("Conv", ["r1_id", weight("conv2.w", 16, 8, 3, 3), weight("conv2.b", 16)], ["c2"],
                         name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c2", *bn_params("bn2", 16)], ["b2"], name="bn2", epsilon=1e-5),
        helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        # flatten the way exporters spell x.view(x.size(0), -1)
        helper.make_node("Shape", ["p2"], ["p2_shape"], name="shape"),
        helper.make_node("Constant", [], ["zero"], name="const_zero",
                         value=numpy_helper.from_array(np.array(0, dtype=np.int64))),
        helper.make_node("Gather", ["p2_shape", "zero"], ["batch"], name="gather_batch", axis=0),
        helper.make_node("Constant", [], ["axes0"], name="const_axes0",
                         value=numpy_helper.from_array(np.array([0], dtype=np.int64))),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch_1d"], name="unsqueeze_batch"),
        helper.make_node("Constant", [], ["minus_one"], name="const_minus_one",
                         value=numpy_helper.from_array(np.array([-1], dtype=np.int64))),
        helper.make_node("Concat", ["batch_1d", "minus_one"], ["flat_shape"], name="concat_shape", axis=0),
        helper.make_node("Reshape", ["p2", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", weight("fc1.w", 40, 256, scale=0.06), weight("fc1.b", 40)], ["f1"],
                         name="fc1", transB=1),
        helper.make_node("Relu", ["f1"], ["r3"], name="relu3"),
        helper.make_node("Identity", ["r3"], ["r3_id"], name="identity2"),
        helper.make_node("Gemm", ["r3_id", weight("fc2.w", 10, 40), weight("fc2.b", 10)], ["logits"],
                         name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="graphopt-tools-make_example")
    model.ir_version = 8  # readable by every onnxruntime this project supports
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = args[0] if args else os.path.join(root, "examples", "tiny_cnn.onnx")
    data = build().SerializeToString(deterministic=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "wb") as f:
        f.write(data)
    print(f"wrote {out} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

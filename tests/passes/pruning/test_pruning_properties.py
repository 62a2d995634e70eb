"""Hypothesis: random conv nets (residual Adds, Concats, depthwise and grouped convs, BatchNorm,
SE-style gates, Flatten into Gemm) stay valid after prune at any ratio/criterion/scope/rounding:
verify(), the onnx checker, strict shape inference, onnxruntime runs with unchanged output shapes;
ratio 0 changes nothing."""

from __future__ import annotations

import os

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.check import random_inputs, run_onnxruntime
from graphopt.transform import PassContext, parse_pipeline

SETTINGS = settings(
    max_examples=int(os.environ.get("GRAPHOPT_PROP_EXAMPLES", 25)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def conv_nets(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    nodes, inits = [], []
    count = [0]

    def name(base):
        count[0] += 1
        return f"{base}{count[0]}"

    def const(arr):
        n = name("c")
        inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def op(op_type, ins, **attrs):
        out = name(op_type.lower())
        nodes.append(helper.make_node(op_type, ins, [out], name=out, **attrs))
        return out

    def conv(x, cin, cout, k=3, group=1):
        w = (rng.standard_normal((cout, cin // group, k, k)) * 0.3).astype(np.float32)
        return op("Conv", [x, const(w), const((rng.standard_normal(cout) * 0.1).astype(np.float32))],
                  pads=[k // 2] * 4, group=group)

    c0 = draw(st.sampled_from([4, 6, 8]))
    tensors = [(conv("x", 3, c0), c0)]
    for _ in range(draw(st.integers(1, 7))):
        x, c = tensors[draw(st.integers(0, len(tensors) - 1))]
        kind = draw(st.sampled_from(["conv", "relu", "residual", "concat", "depthwise", "grouped", "bn", "se"]))
        if kind == "conv":
            cout = draw(st.sampled_from([2, 4, 6, 8, 12]))
            tensors.append((conv(x, c, cout, k=draw(st.sampled_from([1, 3]))), cout))
        elif kind == "relu":
            tensors.append((op("Relu", [x]), c))
        elif kind == "residual":
            y = conv(op("Relu", [conv(x, c, c)]), c, c)
            tensors.append((op("Add", [x, y]), c))
        elif kind == "concat":
            y, cy = tensors[draw(st.integers(0, len(tensors) - 1))]
            tensors.append((op("Concat", [x, y], axis=1), c + cy))
        elif kind == "depthwise":
            tensors.append((conv(x, c, c, group=c), c))
        elif kind == "grouped" and c % 2 == 0:
            tensors.append((conv(x, c, c, group=2), c))
        elif kind == "bn":
            p = [const(rng.uniform(0.5, 1.5, c).astype(np.float32)), const(rng.standard_normal(c).astype(np.float32)),
                 const(rng.standard_normal(c).astype(np.float32)), const(rng.uniform(0.5, 2, c).astype(np.float32))]
            tensors.append((op("BatchNormalization", [x] + p), c))
        elif kind == "se":
            s = op("Relu", [conv(op("GlobalAveragePool", [x]), c, 2, k=1)])
            tensors.append((op("Mul", [x, op("Sigmoid", [conv(s, 2, c, k=1)])]), c))
    x, c = tensors[-1]
    head = draw(st.sampled_from(["conv", "gemm"]))
    if head == "conv":
        y = conv(x, c, 3)
    else:
        f = op("Flatten", [op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])], axis=1)
        y = op("Gemm", [f, const(rng.standard_normal((5, c * 9)).astype(np.float32)), const(np.zeros(5, np.float32))], transB=1)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], initializer=inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return graphopt.load(onnx.shape_inference.infer_shapes(proto))


@given(
    model=conv_nets(),
    ratio=st.sampled_from([0.0, 0.2, 0.5, 0.8]),
    criterion=st.sampled_from(["l1", "l2", "bn-scale"]),
    scope=st.sampled_from(["uniform", "global"]),
    round_to=st.sampled_from([1, 2, 4]),
)
@SETTINGS
def test_random_conv_nets_stay_valid(model, ratio, criterion, scope, round_to):
    out = model.clone()
    spec = f"prune{{ratio={ratio},criterion={criterion},scope={scope},round-to={round_to},accuracy-budget=none}}"
    stats = parse_pipeline(spec)[0].run(out, PassContext()).stats
    out.verify()
    proto = graphopt.to_onnx(out)
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    feeds = random_inputs(model, dim_values={"N": 2})
    before, after = run_onnxruntime(model, feeds), run_onnxruntime(out, feeds)
    assert [a.shape for a in before] == [b.shape for b in after]
    assert all(np.isfinite(b).all() for b in after)
    if ratio == 0.0:
        assert stats["channels-removed"] == 0
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)
    else:
        assert stats["params-after"] <= stats["params-before"]

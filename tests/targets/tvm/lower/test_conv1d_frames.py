"""A 1-D convolution of symbolic output width (a stride, or a kernel wider than its padding) lowers
as a matmul over its frames (`converters.convolution`): the outer-product schedule takes it in
matmul layout, where the conv layout fell to the generic fallback (a VAD's STFT: a strided conv
with a 256-wide fixed basis and 258 filters) -- and where the conv layout's one-row tiles over a
width like `L - 2` wrote past their buffers (`outer_product._bare_symbolic_rows`; test_tvm_schedules has the rule's own test)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.check import run_onnxruntime  # noqa: E402


def _conv_model(o: int, c: int, k: int, stride: int = 1, pads: tuple[int, int] = (0, 0), bias: bool = False,
                x_shape: list = None, group: int = 1, dilation: int = 1, weight_input: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((o, c // group, k)) / np.sqrt(c * k / group)).astype(np.float32)
    inits = [] if weight_input else [nh.from_array(w, "w")]
    inputs = [h.make_tensor_value_info("x", TP.FLOAT, x_shape or ["N", c, "L"])]
    if weight_input:
        inputs.append(h.make_tensor_value_info("w", TP.FLOAT, list(w.shape)))
    names = ["x", "w"]
    if bias:
        inits.append(nh.from_array(rng.standard_normal(o).astype(np.float32), "b"))
        names.append("b")
    node = h.make_node("Conv", names, ["y"], strides=[stride], kernel_shape=[k], pads=list(pads), group=group,
                       dilations=[dilation])
    g = h.make_graph([node], "g", inputs, [h.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def _feeds(m: onnx.ModelProto, n: int, length: int, seed: int = 1) -> dict[str, np.ndarray]:
    c = m.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    f = {"x": np.random.default_rng(seed).standard_normal((n, c, length)).astype(np.float32)}
    if len(m.graph.input) > 1:  # the weight as an input
        shape = [d.dim_value for d in m.graph.input[1].type.tensor_type.shape.dim]
        f["w"] = (np.random.default_rng(2).standard_normal(shape) / 8).astype(np.float32)
    return f


def _fires(m: onnx.ModelProto) -> bool:
    from graphopt.targets.tvm.lower.lowerer import lower

    mod = lower(graphopt.load(m)).mod
    return any(gv.name_hint.startswith("conv1d_frames") for gv in mod.get_global_vars())


def _equal_to_onnxruntime(m: onnx.ModelProto, shapes: list[tuple[int, int]]) -> graphopt.Artifact:
    art = graphopt.compile(m, "cpu", "-O2", threads=2)
    ir = graphopt.load(m)
    for n, length in shapes:
        feeds = _feeds(m, n, length)
        np.testing.assert_allclose(art.run(feeds)[0], run_onnxruntime(ir, feeds)[0], rtol=1e-4, atol=1e-4)
    return art


STFT = dict(o=258, c=1, k=256, stride=128)


def test_strided_wide_conv1d_of_symbolic_length_fires_and_matches_onnxruntime():
    """The VAD's STFT conv (258 filters of 256 taps, stride 128) on [N, 1, L]: frames x matmul,
    scheduled by the outer product (no generic fallback), equal to onnxruntime for several
    batches and lengths."""
    m = _conv_model(**STFT)
    assert _fires(m)
    art = _equal_to_onnxruntime(m, [(1, 640), (3, 640), (2, 1024), (1, 256)])
    # one frame needs 256 samples: the least length the artifact takes (257 was asked before)
    assert art.manifest["dims"]["symbolic"]["L"]["min"] == 256
    sched = art.manifest["schedules"]
    assert sched["fallback"]["kernels"] == [], sched
    # the basis padded to 272 filters and packed [C, K, O_pad] once, at compile time: a weight of
    # params.npz (not a library constant, not a copy made at every call)
    shapes = [list(a["shape"]) for a in art.manifest["files"]["params"]["arrays"].values()]
    assert [1, 256, 272] in shapes and [258, 1, 256] not in shapes, shapes
    assert sched["rules"].get("outer-product", 0) >= 1, sched


def test_strided_conv1d_with_pads_and_bias_matches_onnxruntime():
    m = _conv_model(40, 24, 5, stride=2, pads=(2, 1), bias=True)
    assert _fires(m)
    _equal_to_onnxruntime(m, [(1, 33), (2, 64)])


def test_unpadded_conv1d_of_symbolic_length_matches_onnxruntime():
    """k3 without padding: width L - 2, an expression (the conv layout wrote past its buffers)."""
    m = _conv_model(64, 64, 3)
    assert _fires(m)
    art = _equal_to_onnxruntime(m, [(2, 40), (1, 3)])
    # 64 filters need no padding: the weight stays a parameter (params.npz), not a library constant
    arrays = art.manifest["files"]["params"]["arrays"].values()
    assert sum(int(np.prod(a["shape"])) for a in arrays) == 64 * 64 * 3, list(arrays)


@pytest.mark.parametrize("case", ["static_width", "bare_symbolic_width", "group", "dilation", "runtime_weight"])
def test_near_misses_keep_the_conv_form(case):
    """Static width (batch 1, fixed length), a padded k3 conv (width L: a bare dim), groups,
    dilation and a weight given at run time: the frontend's conv, outputs still equal."""
    kw: dict = {
        "static_width": dict(**STFT, x_shape=[1, 1, 640]),
        "bare_symbolic_width": dict(o=32, c=16, k=3, pads=(1, 1)),
        "group": dict(o=32, c=16, k=4, stride=2, group=2),
        "dilation": dict(o=32, c=16, k=3, stride=2, dilation=2),
        "runtime_weight": dict(o=32, c=16, k=4, stride=2, weight_input=True),
    }[case]
    m = _conv_model(**kw)
    assert not _fires(m)
    length = 640 if case == "static_width" else 37
    _equal_to_onnxruntime(m, [(1, length)] if case == "static_width" else [(1, length), (2, length)])


def test_clustered_weight_of_a_padded_conv1d_loads_and_matches():
    """cluster-weights stores the basis as a codebook: the artifact's main still takes every
    parameter the manifest lists (a padded library constant had dropped one: the runner refused
    the artifact) and equals the clustered model on onnxruntime."""
    m = _conv_model(**STFT)
    pipeline = "-O2,cluster-weights{bits=5}"
    art = graphopt.compile(m, "cpu", pipeline, threads=2)
    clustered = graphopt.optimize(graphopt.load(m), pipeline)
    feeds = _feeds(m, 2, 640)
    np.testing.assert_allclose(art.run(feeds)[0], run_onnxruntime(clustered, feeds)[0], rtol=1e-4, atol=1e-4)

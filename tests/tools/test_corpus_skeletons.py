"""tools/corpus_skeletons.py: the shipped skeletons of the corpus keep the exported graphs, and
refilled they pass onnx's checker and run on onnxruntime with finite outputs."""

from __future__ import annotations

import gzip

import numpy as np
import onnx
import pytest

from tool_modules import load_tool  # noqa: E402

cs = load_tool("corpus_skeletons.py", "corpus_skeletons_under_test")

import graphopt  # noqa: E402
from graphopt.check import run_onnxruntime  # noqa: E402


def _skeleton(name: str) -> onnx.ModelProto:
    with gzip.open(cs.path_of(name), "rb") as f:
        return onnx.ModelProto.FromString(f.read())


@pytest.mark.parametrize("name", cs.MODELS)
def test_skeleton_is_shipped_and_small(name):
    path = cs.path_of(name)
    assert path.exists(), f"{path}: run tools/corpus_skeletons.py save"
    assert path.stat().st_size < 200 * 1024
    sk = _skeleton(name)
    stripped = [t for t in sk.graph.initializer if t.doc_string.startswith("skeleton:")]
    assert stripped and all(not t.raw_data and not t.float_data for t in stripped)


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet18", pytest.param("bert_base_s128", marks=pytest.mark.slow)])
def test_refilled_skeleton_is_valid_and_runs(name):
    m = cs.refill(_skeleton(name))
    onnx.checker.check_model(m)
    feeds = {}
    for i in m.graph.input:
        shape = [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]
        if i.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            feeds[i.name] = np.ones(shape, np.int64) if "mask" in i.name else np.zeros(shape, np.int64)
        else:
            feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    outs = run_onnxruntime(graphopt.load(m), feeds)
    assert all(np.isfinite(o).all() for o in outs)
    # seeded: the same weights every time
    again = cs.refill(_skeleton(name))
    assert again.graph.initializer[-1] == m.graph.initializer[-1]


def test_strip_then_refill_keeps_the_graph_and_small_initializers():
    """Against the full export where it is built (the skeleton's nodes are the export's)."""
    full_path = cs.ROOT / ".cache" / "corpus" / "mobilenetv2.onnx"
    if not full_path.exists():
        pytest.skip("mobilenetv2 not built (tools/make_corpus.py)")
    full = onnx.load(str(full_path))
    sk = _skeleton("mobilenetv2")
    assert [(n.op_type, list(n.input), list(n.output)) for n in sk.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in full.graph.node]
    kept = {t.name: t for t in sk.graph.initializer if not t.doc_string}
    for t in full.graph.initializer:
        if t.name in kept:
            assert kept[t.name] == t
    refilled = {t.name: t for t in cs.refill(sk).graph.initializer}
    for t in full.graph.initializer:
        a, b = onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(refilled[t.name])
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.size > cs.KEEP_ELEMENTS and a.dtype == np.float32:
            assert abs(float(b.std()) - float(a.std())) <= 0.1 * float(a.std()) + 1e-6

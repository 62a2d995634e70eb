"""The corpus architectures (full exports, or the shipped skeletons with seeded weights: see
tools/corpus_skeletons.py) through -O2 and through the cpu target, against onnxruntime on the
unmodified model: the exporters' real op patterns, in CI without torch."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt.check import run_onnxruntime

from tool_modules import load_tool

corpus_skeletons = load_tool("corpus_skeletons.py", "corpus_skeletons_under_test")

FAST = {"mobilenetv2", "resnet18", "efficientnet_b0", "googlenet", "densenet121"}


def _feeds(model: graphopt.ir.Model) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for v in model.graph.inputs:
        shape = [d if isinstance(d, int) else 1 for d in v.type.shape.dims]
        if v.type.dtype.numpy().kind in "iu":  # (BERT: token ids, an attention mask of ones, token types 0)
            feeds[v.name] = np.ones(shape, np.int64) if "mask" in v.name else np.zeros(shape, np.int64) \
                if "type" in v.name else rng.integers(0, 1000, shape).astype(np.int64)
        else:
            feeds[v.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _load(name: str) -> graphopt.ir.Model:
    if not corpus_skeletons.available(name):
        pytest.skip(f"{name}: not in .cache/corpus nor tests/data/corpus")
    return graphopt.load(corpus_skeletons.load(name))


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in corpus_skeletons.MODELS])
def test_o2_equals_the_original_on_onnxruntime(name):
    m = _load(name)
    feeds = _feeds(m)
    want = run_onnxruntime(m, feeds)
    opt = graphopt.optimize(m.clone(), "-O2")
    opt.verify()
    assert len(list(opt.graph)) <= len(list(m.graph))
    got = run_onnxruntime(opt, feeds)
    for g, w in zip(got, want):
        scale = float(np.abs(w).max()) or 1.0
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv2"])
def test_cpu_target_equals_onnxruntime(name):
    pytest.importorskip("tvm")
    m = _load(name)
    feeds = _feeds(m)
    want = run_onnxruntime(m, feeds)
    art = graphopt.compile(m, "cpu", "-O2", threads=2)
    got = art.run(feeds)
    for g, w in zip(got, want):
        scale = float(np.abs(w).max()) or 1.0
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3 * scale)

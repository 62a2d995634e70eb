"""prune on the real architectures of the corpus: at several ratios the result passes verify(), the
onnx checker and runs on onnxruntime with the original output shapes, and really shrinks.

The models are .cache/corpus's exports (tools/make_corpus.py) where they are built, else the
exported graphs shipped as skeletons in tests/data/corpus with seeded weights
(tools/corpus_skeletons.py): CI runs these tests without torch. A model with neither skips."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.check import random_inputs, run_onnxruntime
from graphopt.transform import PassContext, parse_pipeline

from tool_modules import load_tool

corpus_skeletons = load_tool("corpus_skeletons.py", "corpus_skeletons_under_test")

FAST = {"mobilenetv2", "squeezenet11"}
MODELS = ["mobilenetv2", "squeezenet11", "resnet50", "efficientnet_b0", "densenet121", "shufflenetv2", "googlenet",
          "vit_b16", "bert_base_s128"]
# groups that must be found prunable (heads and MLP units in transformers, convs elsewhere)
# (ShuffleNetV2: every shuffle's channel count static after -O1's simplify-shapes, only the classifier stays)
MIN_PRUNED_GROUPS = {"vit_b16": 24, "bert_base_s128": 24, "resnet50": 30, "densenet121": 100, "googlenet": 50,
                     "shufflenetv2": 21}


def feeds_for(name: str, model):
    if name.startswith("bert"):
        rng = np.random.default_rng(0)
        return {"input_ids": rng.integers(0, 30000, (1, 128)), "attention_mask": np.ones((1, 128), np.int64),
                "token_type_ids": np.zeros((1, 128), np.int64)}
    return random_inputs(model, dim_values={"batch": 1})


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in MODELS])
def test_corpus_model_prunes_validly(name):
    if not corpus_skeletons.available(name):
        pytest.skip(f"{name}: not in .cache/corpus (tools/make_corpus.py) nor tests/data/corpus")
    base = graphopt.optimize(graphopt.load(corpus_skeletons.load(name)), "-O1")
    feeds = feeds_for(name, base)
    ref = run_onnxruntime(base, feeds)
    specs = ["prune{ratio=0.3,accuracy-budget=none}", "prune{ratio=0.5,criterion=l2,round-to=8,accuracy-budget=none}"]
    if name in FAST:
        specs.append("prune{ratio=0.5,scope=global,accuracy-budget=none}")
    for spec in specs:
        m = base.clone()
        stats = parse_pipeline(spec)[0].run(m, PassContext()).stats
        m.verify()
        proto = graphopt.to_onnx(m)
        onnx.checker.check_model(proto)
        out = run_onnxruntime(m, feeds)
        assert [o.shape for o in out] == [r.shape for r in ref] and all(np.isfinite(o).all() for o in out)
        assert stats["channels-removed"] > 0 and stats["params-after"] < stats["params-before"]
        assert stats["flops-after"] < stats["flops-before"]
        assert stats["groups-pruned"] >= MIN_PRUNED_GROUPS.get(name, 1), stats


@pytest.mark.slow
def test_bert_after_contrib_attention_fusion_prunes_heads():
    """Pruning after fuse-attention{contrib-ops=1}: the com.microsoft MultiHeadAttention nodes lose
    whole heads (num_heads shrinks) exactly as when the fusion runs after pruning."""
    if not corpus_skeletons.available("bert_base_s128"):
        pytest.skip("bert_base_s128: not in .cache/corpus nor tests/data/corpus")
    raw = graphopt.load(corpus_skeletons.load("bert_base_s128"))
    fuse = "fuse-attention{contrib-ops=1},-O2"
    m = graphopt.optimize(raw.clone(), f"-O2,{fuse}")
    assert sum(n.op_type == "MultiHeadAttention" for n in m.graph) == 12
    stats = parse_pipeline("prune{ratio=0.5,accuracy-budget=none}")[0].run(m, PassContext()).stats
    assert stats["groups-pruned"] >= 24, stats
    assert [n.attr("num_heads") for n in m.graph if n.op_type == "MultiHeadAttention"] == [6] * 12
    m.verify()
    onnx.checker.check_model(graphopt.to_onnx(m))
    other = graphopt.optimize(raw.clone(), f"-O1,prune{{ratio=0.5,accuracy-budget=none}},-O2,{fuse}")
    feeds = feeds_for("bert_base_s128", m)
    for a, b in zip(run_onnxruntime(m, feeds), run_onnxruntime(other, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

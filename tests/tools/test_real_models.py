"""tools/real_models.py's evaluation API on tiny hand-built models and synthetic data in a temporary
cache (the real cache and torch are not needed)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from tool_modules import load_tool
from onnx import TensorProto, helper, numpy_helper


@pytest.fixture()
def rm(tmp_path, monkeypatch):
    mod = load_tool("real_models.py", "real_models_under_test")
    assert not hasattr(mod, "torch")  # evaluation must not need torch
    monkeypatch.setattr(mod, "CACHE", tmp_path)
    monkeypatch.setattr(mod, "DATA", tmp_path / "data")
    monkeypatch.setattr(mod, "MANIFEST", tmp_path / "manifest.json")
    (tmp_path / "data").mkdir()
    return mod


def _linear_classifier(w: np.ndarray, batch: int | str) -> onnx.ModelProto:
    """input (batch,1,8,8) → Flatten → MatMul(w) → logits."""
    g = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "lin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _digits_like(rm, w: np.ndarray, n_test: int, flip: np.ndarray) -> np.ndarray:
    """Synthetic digits data (0..16 pixels) whose test labels are the linear model's argmax, except
    at the indices `flip` (label shifted by one): accuracy must be 1 - len(flip)/n_test."""
    rng = np.random.default_rng(1)
    x_te = rng.integers(0, 17, size=(n_test, 8, 8)).astype(np.float32)
    y_te = ((x_te.reshape(n_test, 64) / 16.0) @ w).argmax(1)
    y_te[flip] = (y_te[flip] + 1) % 10
    x_tr = rng.integers(0, 17, size=(50, 8, 8)).astype(np.float32)
    np.savez(rm.DATA / "digits.npz", x_train=x_tr, y_train=np.zeros(50, np.int64), x_test=x_te, y_test=y_te)
    return x_tr


def test_classifier_accuracy_any_model_form_and_batch(rm, tmp_path):
    w = np.random.default_rng(0).standard_normal((64, 10))
    n, flip = 300, np.array([3, 10, 299])
    x_tr = _digits_like(rm, w, n, flip)
    dyn = _linear_classifier(w, "batch")
    path = tmp_path / "digits_mlp.onnx"
    onnx.save(dyn, path)
    want = {"accuracy": (n - len(flip)) / n, "correct": n - len(flip), "n": n}
    assert rm.evaluate("digits_mlp") == want  # the cached fp32 model by default
    assert rm.evaluate("digits_mlp", path) == want
    assert rm.evaluate("digits_mlp", str(path)) == want
    assert rm.evaluate("digits_mlp", dyn.SerializeToString(), batch_size=7) == want
    # a static batch of 1 and of 8 (300 = 37*8 + 4: the last chunk is padded) score the same
    assert rm.evaluate("digits_mlp", _linear_classifier(w, 1)) == want
    assert rm.evaluate("digits_mlp", _linear_classifier(w, 8)) == want
    # a different model scores differently
    assert rm.evaluate("digits_mlp", _linear_classifier(-w, "batch"))["accuracy"] < 0.5
    assert rm.evaluate("digits_mlp", dyn, limit=10)["n"] == 10
    fixed = rm.model_proto("digits_mlp", batch=3)  # the cached model with its batch axis fixed
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [3, 1, 8, 8]
    assert rm.evaluate("digits_mlp", fixed) == want

    calib = rm.calibration_data("digits_mlp", n=20)
    assert list(calib) == ["input"] and calib["input"].shape == (20, 1, 8, 8) and calib["input"].dtype == np.float32
    assert calib["input"].max() <= 1.0
    # drawn from the training split, reproducibly
    rows = {r.tobytes() for r in (x_tr / 16.0).astype(np.float32)}
    assert all(r.reshape(8, 8).tobytes() in rows for r in calib["input"][:, 0])
    np.testing.assert_array_equal(calib["input"], rm.calibration_data("digits_mlp", n=20)["input"])
    assert rm.calibration_data("digits_mlp", n=1000)["input"].shape[0] == 50


def test_graphopt_model_is_scored(rm, tmp_path):
    import graphopt

    w = np.random.default_rng(0).standard_normal((64, 10))
    _digits_like(rm, w, 40, np.array([0]))
    got = rm.evaluate("digits_mlp", graphopt.load(_linear_classifier(w, "batch")))
    assert got["correct"] == 39


def test_embedding_cosines(rm, tmp_path):
    """MiniLM-shaped: int64 inputs, the 'embedding' here is input_ids[:, :4] as float."""
    n, seq = 6, 16
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, size=(n, seq)).astype(np.int64)
    arrays = {}
    for split in ("calib", "test"):
        arrays[f"{split}_input_ids"] = ids
        arrays[f"{split}_attention_mask"] = np.ones_like(ids)
        arrays[f"{split}_token_type_ids"] = np.zeros_like(ids)
        arrays[f"{split}_text"] = np.array([f"s{i}" for i in range(n)])
    np.savez(rm.DATA / "sentences.npz", **arrays)
    ref = ids[:, :4].astype(np.float32)
    ref[2] *= -3.0  # opposite direction: cosine -1
    ref[4] *= 2.0  # same direction, other length: cosine 1
    np.savez(tmp_path / "minilm.reference.npz", embedding=ref)
    nodes = [
        helper.make_node("Slice", ["input_ids", "starts", "ends", "axes"], ["cut"]),
        helper.make_node("Cast", ["cut"], ["embedding"], to=TensorProto.FLOAT),
    ]
    inits = [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in (("starts", 0), ("ends", 4), ("axes", 1))]
    ins = [helper.make_tensor_value_info(k, TensorProto.INT64, ["batch", seq]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    g = helper.make_graph(nodes, "emb", ins, [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    got = rm.evaluate("minilm", m, batch_size=4)
    assert got["n"] == n and got["min_cosine"] == pytest.approx(-1.0)
    assert got["mean_cosine"] == pytest.approx((n - 2) / n)
    calib = rm.calibration_data("minilm", n=3)
    assert sorted(calib) == ["attention_mask", "input_ids", "token_type_ids"]
    assert all(v.shape == (3, seq) and v.dtype == np.int64 for v in calib.values())
    assert rm.sentences("test") == [f"s{i}" for i in range(n)]


def test_missing_cache_and_unknown_names_say_how_to_build(rm):
    with pytest.raises(rm.RealModelsError, match="real_models.py build"):
        rm.model_path("mnist_resnet8")
    with pytest.raises(rm.RealModelsError, match="unknown real model"):
        rm.evaluate("resnet9000")
    assert rm.list_models() == []
    assert "mnist_resnet8" in rm.list_models(all_known=True)
    assert "not built" in rm.report()

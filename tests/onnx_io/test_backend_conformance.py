"""ONNX backend conformance of graphopt's import → export round trip.

`onnx.backend.test.BackendTest` drives `graphopt.backend.GraphoptBackend` (graphopt.load →
graphopt.to_onnx → onnxruntime, no passes) over the suites the onnx package ships or generates:
node tests (generated in memory), simple, pytorch-converted, pytorch-operator, and "real",
which in onnx ≥ 1.16 are the light models of onnx/backend/test/data/light (no download).

Excluded are exactly the cases that plain onnxruntime fails on the unmodified model, listed
one by one in tests/data/ort_backend_exclusions.txt (written by tools/ort_backend_baseline.py);
each is excluded by an anchored exact pattern. Everything else must pass.

The light models are also checked directly: the round-tripped model's output against the output
shipped with onnx and against onnxruntime on the unmodified model.
"""

from __future__ import annotations

import glob
import json
import os
import re
import unittest
import warnings

import numpy as np
import onnx
import onnx.backend.test
import onnxruntime.backend
import pytest
from onnx import numpy_helper

import graphopt
from graphopt.backend import GraphoptBackend
from paths import DATA

EXCLUSIONS_FILE = str(DATA / "ort_backend_exclusions.txt")
ONNX_TEST_DATA = os.path.join(os.path.dirname(onnx.backend.test.__file__), "data")
LIGHT_MODELS = sorted(glob.glob(os.path.join(ONNX_TEST_DATA, "light", "light_*.onnx")))


def read_exclusions(path: str = EXCLUSIONS_FILE) -> list[str]:
    names = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                names.append(line)
    return names


EXCLUDED = read_exclusions()

with warnings.catch_warnings():
    # onnx computes the node tests' expected outputs with numpy on import (log(0) and the like)
    warnings.simplefilter("ignore", RuntimeWarning)
    backend_test = onnx.backend.test.BackendTest(GraphoptBackend, __name__)
for _name in EXCLUDED:
    backend_test.exclude(f"^{re.escape(_name)}$")

# OnnxBackendNodeModelTest, OnnxBackendSimpleModelTest, OnnxBackendPyTorchConvertedModelTest,
# OnnxBackendPyTorchOperatorModelTest, OnnxBackendRealModelTest (unittest classes pytest collects)
globals().update(backend_test.test_cases)


@pytest.fixture(scope="module", autouse=True)
def _onnx_models_dir(tmp_path_factory):
    """BackendTest writes the light models' generated test data under $ONNX_MODELS (default
    ~/.onnx/models/light); keep it in pytest's temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONNX_MODELS", str(tmp_path_factory.mktemp("onnx_models")))
        yield


def _all_case_names(backend) -> dict[str, type[unittest.TestCase]]:
    """Every test name of an unfiltered BackendTest, with the class that holds it."""
    cases = onnx.backend.test.BackendTest(backend, __name__ + "_all").test_cases
    return {n: cls for cls in cases.values() for n in dir(cls) if n.startswith("test_")}


def test_exclusions_name_existing_cases():
    """A stale entry (a case renamed or dropped by onnx) fails here; so does a duplicate."""
    assert EXCLUDED, "the exclusions file is empty"
    dupes = sorted({n for n in EXCLUDED if EXCLUDED.count(n) > 1})
    assert not dupes, f"listed twice in {EXCLUSIONS_FILE}: {dupes}"
    known = _all_case_names(GraphoptBackend)
    stale = [n for n in EXCLUDED if n not in known]
    assert not stale, (
        f"{len(stale)} names in {os.path.relpath(EXCLUSIONS_FILE)} are not cases of this onnx's BackendTest "
        f"(regenerate it with tools/ort_backend_baseline.py): {stale[:20]}"
    )


def test_excluded_cases_still_fail_on_plain_onnxruntime(tmp_path, monkeypatch):
    """An excluded case that onnxruntime now passes hides coverage: regenerate the list."""
    monkeypatch.setenv("ONNX_MODELS", str(tmp_path))
    known = _all_case_names(onnxruntime.backend)
    suite = unittest.TestSuite(known[n](n) for n in EXCLUDED if n in known)
    result = unittest.TestResult()
    suite.run(result)
    not_passing = {t._testMethodName for t, _ in result.failures + result.errors + result.skipped + result.expectedFailures}
    now_passing = sorted(n for n in EXCLUDED if n in known and n not in not_passing)
    assert not now_passing, (
        f"onnxruntime {onnxruntime.__version__} now passes {len(now_passing)} excluded cases; regenerate "
        f"{os.path.relpath(EXCLUSIONS_FILE)} with tools/ort_backend_baseline.py: {now_passing[:20]}"
    )


# --- the light models, checked directly --------------------------------------------------------


def _light_feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The inputs BackendTest feeds a light model (its shipped output was computed from them):
    every graph input that has no initializer, filled with arange(n)/n."""
    inits = {i.name for i in model.graph.initializer}
    name = model.graph.name
    return {
        x.name: onnx.backend.test.BackendTest.generate_dummy_data(x, name=name, random=False)
        for x in model.graph.input
        if x.name not in inits
    }


def _light_tolerance(path: str) -> tuple[float, float]:
    model_name = os.path.basename(path)[len("light_") : -len(".onnx")]
    data = os.path.join(ONNX_TEST_DATA, "real", f"test_{model_name}", "data.json")
    if os.path.exists(data):
        with open(data) as f:
            d = json.load(f)
        return float(d.get("rtol", 1e-3)), float(d.get("atol", 1e-7))
    return 1e-3, 1e-7


def test_light_models_are_shipped():
    assert len(LIGHT_MODELS) >= 9, f"expected the onnx package's light models in {ONNX_TEST_DATA}/light"


@pytest.mark.parametrize("path", LIGHT_MODELS, ids=lambda p: os.path.basename(p)[: -len(".onnx")])
def test_light_model_round_trip(path):
    model = onnx.load(path)
    # the weights are generated in the graph (ConstantOfShape), so the files stay small
    assert any(n.op_type == "ConstantOfShape" for n in model.graph.node)
    feeds = _light_feeds(model)
    names = [i.name for i in model.graph.input if i.name in feeds]
    inputs = [feeds[n] for n in names]
    expected = [
        numpy_helper.to_array(onnx.load_tensor(f"{path[: -len('.onnx')]}_output_{i}.pb")) for i in range(len(model.graph.output))
    ]

    reference = onnxruntime.backend.prepare(model, "CPU").run(inputs)
    rep = GraphoptBackend.prepare(path, "CPU")
    assert isinstance(rep.model, graphopt.Model)
    actual = rep.run(inputs)

    rtol, atol = _light_tolerance(path)
    assert len(actual) == len(expected) == len(reference)
    for got, want, ort in zip(actual, expected, reference):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg="round trip vs the shipped output")
        # the same graph on the same runtime: no numerical slack needed
        np.testing.assert_allclose(got, ort, rtol=1e-6, atol=0, err_msg="round trip vs onnxruntime on the unmodified model")


# --- the backend's own API ---------------------------------------------------------------------


def test_backend_api_run_node_and_pipeline():
    assert GraphoptBackend.supports_device("CPU")
    assert GraphoptBackend.is_compatible(None, "CPU")
    node = onnx.helper.make_node("Add", ["a", "b"], ["c"])
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.ones((2, 3), np.float32)
    (c,) = GraphoptBackend.run_node(node, [a, b])
    np.testing.assert_array_equal(c, a + b)

    seen = []

    def pipeline(m: graphopt.Model) -> graphopt.Model:
        seen.append(m)
        return m

    (c,) = GraphoptBackend.run_node(node, [a, b], outputs_info=[(np.float32, (2, 3))], pipeline=pipeline)
    np.testing.assert_array_equal(c, a + b)
    assert len(seen) == 1 and isinstance(seen[0], graphopt.Model)

    with pytest.raises(TypeError, match="pipeline must return"):
        GraphoptBackend.prepare(onnx.load(LIGHT_MODELS[0]), pipeline=lambda m: None)

"""ONNX backend conformance with -O2: every case that passes with no passes passes after -O2.

Same suites and the same explicit exclusion list as test_backend_conformance.py (the cases
plain onnxruntime fails on the unmodified model); the model goes through
graphopt.optimize(-O2, with verify after each pass) between import and export.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import onnx.backend.test
import pytest

import graphopt
from graphopt.backend import GraphoptBackend
from paths import DATA

EXCLUSIONS_FILE = str(DATA / "ort_backend_exclusions.txt")


def _o2(model: graphopt.Model) -> graphopt.Model:
    return graphopt.optimize(model, "-O2", inplace=True, verify_each=True)


class GraphoptO2Backend(GraphoptBackend):
    """GraphoptBackend with the -O2 pipeline between import and export."""

    @classmethod
    def prepare(cls, model: Any, device: str = "CPU", **kwargs: Any) -> Any:
        if kwargs.get("pipeline") is None:
            kwargs["pipeline"] = _o2
        return super().prepare(model, device, **kwargs)


with open(EXCLUSIONS_FILE, encoding="utf-8") as f:
    EXCLUDED = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    backend_test = onnx.backend.test.BackendTest(GraphoptO2Backend, __name__)
for _name in EXCLUDED:
    backend_test.exclude(f"^{re.escape(_name)}$")

globals().update(backend_test.test_cases)


@pytest.fixture(scope="module", autouse=True)
def _onnx_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONNX_MODELS", str(tmp_path_factory.mktemp("onnx_models")))
        yield

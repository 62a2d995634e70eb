"""ONNX backend conformance of the cpu target (compiled mode), a representative subset.

Each case is compiled by graphopt.compile(model, "cpu", "-O2") into a shared library and run by
graphopt.runtime (graphopt.targets.tvm.backend.CpuBackend). The full suite (~1700 cases that
onnxruntime passes, about 20 minutes here) is tools/tvm_conformance.py; its slow-marked run
below checks the share of passing cases.
"""

from __future__ import annotations

import re
import warnings

import pytest

pytest.importorskip("tvm")

import onnx.backend.test  # noqa: E402

from graphopt.targets.tvm.backend import CpuBackend  # noqa: E402

#: one or two cases per family: elementwise, broadcast, conv/pool, matmul, reductions,
#: normalization, shape ops with constant inputs, casts, attention, losses
SUBSET = [
    "test_add_bcast_cpu", "test_relu_cpu", "test_clip_cpu", "test_conv_with_strides_padding_cpu",
    "test_maxpool_2d_pads_cpu", "test_gemm_default_matrix_bias_cpu", "test_matmul_3d_cpu",
    "test_softmax_axis_1_cpu", "test_operator_reduced_mean_keepdim_cpu",
    "test_layer_normalization_2d_axis0_cpu", "test_concat_2d_axis_1_cpu", "test_slice_cpu",
    "test_gather_1_cpu", "test_cast_FLOAT_to_DOUBLE_cpu", "test_batchnorm_example_cpu",
    "test_attention_4d_gqa_cpu",
    "test_nllloss_NCd1d2_with_weight_reduction_mean_cpu", "test_nllloss_NCd1_mean_weight_negative_ii_cpu",
    "test_sce_mean_weight_ii_3d_log_prob_cpu",
]

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    backend_test = onnx.backend.test.BackendTest(CpuBackend, __name__)
for _name in SUBSET:
    backend_test.include(f"^{re.escape(_name)}$")

globals().update(backend_test.enable_report().test_cases)


@pytest.fixture(scope="module", autouse=True)
def _onnx_models_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONNX_MODELS", str(tmp_path_factory.mktemp("onnx_models")))
        yield


def test_subset_names_exist():
    known = {n for cls in onnx.backend.test.BackendTest(CpuBackend, __name__ + "_all").test_cases.values()
             for n in dir(cls) if n.startswith("test_")}
    missing = [n for n in SUBSET if n not in known]
    assert not missing, missing


@pytest.mark.slow
def test_full_suite_pass_share():
    """≥ 90% of the cases onnxruntime passes also pass through the cpu target."""
    import os
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "tvm_conformance.py")
    out = subprocess.run([sys.executable, tool, "--jobs", "2"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"cpu target: (\d+) of (\d+) cases pass", out)
    assert m, out[-2000:]
    passed, total = int(m.group(1)), int(m.group(2))
    assert passed >= 0.9 * total, out[-4000:]

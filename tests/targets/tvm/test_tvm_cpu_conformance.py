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

from graphopt.targets.tvm.backend import CpuBackend, SpecializingCpuBackend  # noqa: E402

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
    # graphopt's own converters (targets/tvm/converters.py) and control flow, one per family
    "test_shape_cpu", "test_lstm_defaults_cpu", "test_gru_with_initial_bias_cpu",
    "test_linear_attention_gated_delta_cpu", "test_causal_conv_with_state_silu_cpu", "test_rotary_embedding_cpu",
    "test_lpnormalization_default_cpu", "test_qlinearmatmul_2D_uint8_float32_cpu", "test_det_nd_cpu",
    "test_scan9_sum_cpu", "test_attention_4d_gqa_causal_nonpad_decode_cpu",
]

#: cases whose shape-deciding inputs (scales, sizes, axes, k, depth, conditions, trip counts) are
#: fed at run time, compiled ahead of time all the same (strict mode, targets/tvm/dynamic.py): one
#: per family; Reduce*/If/Resize/Reshape/Expand/Pad/Split/TopK/CumSum are also in test_tvm_dynamic.py
RUNTIME_INPUT_SUBSET = [
    "test_loop11_cpu", "test_nonmaxsuppression_two_batches_cpu", "test_col2im_pads_cpu",
    "test_center_crop_pad_crop_and_pad_cpu", "test_onehot_with_axis_cpu", "test_triu_neg_cpu", "test_affine_grid_2d_cpu",
    "test_hannwindow_cpu", "test_reversesequence_time_cpu", "test_upsample_nearest_cpu",
    "test_training_dropout_zero_ratio_mask_cpu", "test_constantofshape_int_zeros_cpu",
]

#: the same kind of cases through SpecializingCpuBackend (compiled at the first run with them
#: bound; the manifest records them): the specialised mode keeps working
SPECIALIZED_SUBSET = [
    "test_resize_downsample_scales_cubic_antialias_cpu", "test_if_cpu",
]

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    backend_test = onnx.backend.test.BackendTest(CpuBackend, __name__)
for _name in SUBSET + RUNTIME_INPUT_SUBSET:
    backend_test.include(f"^{re.escape(_name)}$")

globals().update(backend_test.enable_report().test_cases)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    specialized_test = onnx.backend.test.BackendTest(SpecializingCpuBackend, __name__ + "_specialized")
for _name in SPECIALIZED_SUBSET:
    specialized_test.include(f"^{re.escape(_name)}$")
globals().update({f"{k}Specialized": v for k, v in specialized_test.test_cases.items()})


@pytest.fixture(scope="module", autouse=True)
def _onnx_models_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONNX_MODELS", str(tmp_path_factory.mktemp("onnx_models")))
        yield


def test_subset_names_exist():
    known = {n for cls in onnx.backend.test.BackendTest(CpuBackend, __name__ + "_all").test_cases.values()
             for n in dir(cls) if n.startswith("test_")}
    missing = [n for n in SUBSET + RUNTIME_INPUT_SUBSET + SPECIALIZED_SUBSET if n not in known]
    assert not missing, missing


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["strict", "specialize"])
def test_full_suite_pass_share(mode):
    """≥ 90% of the cases onnxruntime passes also pass through the cpu target: strict (compiled
    before any input is seen) and specialising run-time shape inputs at the first run (as
    tools/tvm_conformance.py [--specialize])."""
    import subprocess
    import sys

    from paths import TOOLS

    tool = str(TOOLS / "tvm_conformance.py")
    flags = ["--specialize"] if mode == "specialize" else []
    out = subprocess.run([sys.executable, tool, "--jobs", "2", *flags], capture_output=True, text=True, check=True).stdout
    m = re.search(r"cpu target: (\d+) of (\d+) cases pass", out)
    assert m, out[-2000:]
    passed, total = int(m.group(1)), int(m.group(2))
    assert passed >= 0.9 * total, out[-4000:]

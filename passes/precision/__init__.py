"""Reduced float precision: `convert-precision{dtype=fp16|bf16, keep=GLOB:..., keep-io-types=true}`.

convert.py plans which ops compute in fp16/bf16 (sensitive ops, calibrated overflow and missing
runtime kernels keep fp32) and inserts the Casts; kernels.py asks the installed onnxruntime
which fp16/bf16 kernels its CPU provider really has.
"""

from graphopt.passes.precision.convert import BLOCKED_OPS, SENSITIVE_OPS, ConvertPrecision
from graphopt.passes.precision.kernels import onnxruntime_kernel, probe_compute_ops

__all__ = ["BLOCKED_OPS", "ConvertPrecision", "SENSITIVE_OPS", "onnxruntime_kernel", "probe_compute_ops"]

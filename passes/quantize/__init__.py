"""int8 quantization: `quantize{scheme=int8,calibration=minmax,data=calib.npz}`.

qdq.py plans which ops become int8 (and records why others stay float) and writes the QDQ form
onnxruntime runs with int8 kernels; measure.py runs candidates on onnxruntime (output error,
accuracy budgets, latency); pass_.py is the pass that ties calibration
(graphopt.calibration), the accuracy budget and the speed check together; integer.py (`split-zero-points`) puts a quantized
model's MatMulInteger in the form compiled targets run with integer dot-product kernels; smooth.py
(`quantize{smooth=ALPHA}`) is SmoothQuant, per-channel activation scales moved into the weights.
"""

from graphopt.passes.quantize.integer import QdqToInteger, SplitZeroPoints
from graphopt.passes.quantize.measure import Budget, has_vnni, output_metrics, sqnr_db
from graphopt.passes.quantize.pass_ import Quantize, quantize
from graphopt.passes.quantize.smooth import smooth_quant
from graphopt.passes.quantize.qdq import QParams, QuantOptions, Unit, activation_params, apply, dequantize_array, plan_units, quantize_array, quantize_weight

__all__ = [
    "Budget", "QParams", "QuantOptions", "Quantize", "Unit", "activation_params", "apply", "dequantize_array",
    "QdqToInteger", "SplitZeroPoints", "has_vnni", "output_metrics", "plan_units", "quantize", "quantize_array", "quantize_weight", "smooth_quant", "sqnr_db",
]

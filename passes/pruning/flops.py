"""Counting FLOPs and parameters of a model from its inferred shapes (for stats and benchmarks).

FLOPs are 2 x multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul (the layers pruning
shrinks; elementwise work is ignored). Symbolic dims (the batch) count as 1.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import Model, TensorType, Value


def _dims(v: Value | None) -> list[int] | None:
    if v is None or not isinstance(v.type, TensorType) or v.type.shape is None:
        return None
    return [d if isinstance(d, int) else 1 for d in v.type.shape.dims]


def _numel(d: list[int] | None) -> int:
    return int(np.prod(d)) if d else (1 if d == [] else 0)


def count_flops(model: Model) -> int:
    total = 0
    for n in model.graph:
        op = n.op_type
        if n.domain not in ("", "ai.onnx"):
            continue
        if op in ("Conv", "ConvTranspose") and len(n.inputs) > 1:
            w = _dims(n.inputs[1])
            out = _dims(n.outputs[0])
            x = _dims(n.inputs[0])
            if w is None or out is None or x is None:
                continue
            if op == "Conv":
                total += 2 * _numel(out) * _numel(w[1:])
            else:  # every input element is scattered through a (Cout/g, k...) kernel
                total += 2 * _numel(x) * _numel(w[1:])
        elif op in ("Gemm", "MatMul"):
            a, out = _dims(n.inputs[0]), _dims(n.outputs[0])
            if a is None or out is None or not a:
                continue
            k = a[0] if op == "Gemm" and int(n.attr("transA", 0)) else a[-1]
            total += 2 * _numel(out) * k
    return total


def count_params(model: Model) -> int:
    return sum(int(np.prod(v.const_value.shape)) for v in model.graph.initializers.values() if v.const_value is not None)

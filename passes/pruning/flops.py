"""Counting FLOPs and parameters of a model from its inferred shapes (for stats and benchmarks).

FLOPs are 2 x multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul (the layers pruning
shrinks, attention's batched Q·Kᵀ and P·V MatMuls included; elementwise work is ignored).
Symbolic dims (the batch) and negative ones (`-1` written as a dim value) count as 1. `uncounted_layers` names the layers whose count is a
guess: a shape unknown, or a symbolic dim beyond the leading (batch) axis, e.g. a channel count
that shape inference lost; then the total is an undercount, and it says so instead of silently.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import Model, TensorType, Value


def _dims(v: Value | None) -> list[int] | None:
    if v is None or not isinstance(v.type, TensorType) or v.type.shape is None:
        return None
    # a negative dim is "unknown" written as an int (paddle2onnx writes dim_value -1): counting
    # it made a classifier's FLOPs come out as -248144
    return [d if isinstance(d, int) and d >= 0 else 1 for d in v.type.shape.dims]


def _numel(d: list[int] | None) -> int:
    return int(np.prod(d)) if d else (1 if d == [] else 0)


def layer_flops(n) -> int | None:
    """FLOPs of one Conv/ConvTranspose/Gemm/MatMul; None when its shapes are unknown; 0 for other ops."""
    op = n.op_type
    if n.domain not in ("", "ai.onnx"):
        return 0
    if op in ("Conv", "ConvTranspose") and len(n.inputs) > 1:
        w, out, x = _dims(n.inputs[1]), _dims(n.outputs[0]), _dims(n.inputs[0])
        if w is None or out is None or x is None:
            return None
        if op == "Conv":
            return 2 * _numel(out) * _numel(w[1:])
        return 2 * _numel(x) * _numel(w[1:])  # every input element is scattered through a (Cout/g, k...) kernel
    if op in ("Gemm", "MatMul"):
        a, out = _dims(n.inputs[0]), _dims(n.outputs[0])
        if a is None or out is None or not a:
            return None
        k = a[0] if op == "Gemm" and int(n.attr("transA", 0)) else a[-1]
        return 2 * _numel(out) * k
    return 0


def _symbolic_beyond_batch(v: Value | None) -> bool:
    if v is None or not isinstance(v.type, TensorType) or v.type.shape is None:
        return True
    return any(not isinstance(d, int) or d < 0 for d in v.type.shape.dims[1:])


def uncounted_layers(model: Model) -> list[str]:
    """Names of the Conv/ConvTranspose/Gemm/MatMul nodes count_flops skipped or counted with a
    symbolic dim (other than the leading batch axis) taken as 1."""
    out = []
    for n in model.graph:
        f = layer_flops(n)
        if f is None or f and any(_symbolic_beyond_batch(v) for v in (n.inputs[0], n.outputs[0])):
            out.append(n.name or n.outputs[0].name)
    return out


def count_flops(model: Model) -> int:
    return sum(f for n in model.graph if (f := layer_flops(n)))


def count_params(model: Model) -> int:
    return sum(int(np.prod(v.const_value.shape)) for v in model.graph.initializers.values() if v.const_value is not None)

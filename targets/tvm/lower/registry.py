"""The converter registry of the TVM lowering: graphopt's own ONNX-node converters by op type, and
the small queries and constructors on Relax expressions that the lowerer and the converters share
(the bottom of lower/: it imports nothing of the package)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tvm
from tvm import relax

from graphopt import GraphoptError
from graphopt.ir import Node

__all__ = ["LoweringError", "Converter", "CONVERTERS", "converter", "const_value", "dims_of", "contiguous_array", "relax_constant"]


class LoweringError(GraphoptError):
    """The model uses something the TVM lowering cannot express."""


#: graphopt's own converters: (block builder, node, relax inputs (None for omitted), opset) → expr
Converter = Callable[[relax.BlockBuilder, Node, list[Any], int], Any]
CONVERTERS: dict[str, Converter] = {}


def converter(*ops: str) -> Callable[[Converter], Converter]:
    """Register the decorated function as the converter of `ops` (the last registration wins)."""

    def deco(fn: Converter) -> Converter:
        for op in ops:
            CONVERTERS[op] = fn
        return fn

    return deco


def const_value(e: Any) -> np.ndarray | None:
    """The value of a Relax constant, else None."""
    return e.value.numpy() if isinstance(e, tvm.ir.GenericConst) else None


def dims_of(e: Any) -> list[Any]:
    """The dims of a Relax tensor expression: ints where static, TIR expressions where symbolic."""
    shape = e.ty.shape
    if shape is None or not isinstance(shape, relax.ShapeExpr):
        raise LoweringError("a tensor of unknown shape")
    return [int(v) if isinstance(v, tvm.tirx.IntImm) else v for v in shape.values]



def contiguous_array(a: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    return np.require(a, requirements="C")


def relax_constant(arr: np.ndarray) -> tvm.ir.GenericConst:
    arr = contiguous_array(arr)
    if arr.dtype == np.bool_:
        return relax.const(arr, "bool")
    # the dtype explicitly: relax.const narrows int64 → int32 and float64 → float32 without it
    return relax.const(arr, str(arr.dtype))

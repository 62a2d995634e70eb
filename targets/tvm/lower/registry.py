"""The converter registry of the TVM lowering: graphopt's own ONNX-node converters by op type, and
the small queries on Relax expressions that converters share (`lower` and `converters` both
import this module; neither imports the other's privates)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tvm
from tvm import relax

from graphopt import GraphoptError
from graphopt.ir import Node

__all__ = ["LoweringError", "Converter", "CONVERTERS", "converter", "const_value", "dims_of"]


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

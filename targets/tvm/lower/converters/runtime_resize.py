"""Resize with run-time roi / scales / sizes (chained in front of `resize`'s).
"""

from __future__ import annotations

from typing import Any

from tvm import relax

from graphopt.ir import Node

from .common import chained, is_runtime
from .resize import resize_runtime_core


@chained("Resize")
def _resize_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Resize whose roi, scales or sizes are run-time inputs: output sizes computed at run time
    (floor(n * scale), or the sizes; keep_aspect_ratio_policy with round-half-up) and taken as
    symbolic dims, then one kernel per resized axis (`_resize_axis_kernel`) in float64 as the
    reference, cast back once at the end."""
    if opset < 11:
        return NotImplemented
    roi, scales, sizes = (list(ins) + [None] * 4)[1:4]
    if not any(is_runtime(e) for e in (roi, scales, sizes)):
        return NotImplemented
    return resize_runtime_core(bb, node, ins[0], roi, scales, sizes, node.attr)

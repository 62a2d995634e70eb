"""Losses: NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax

from graphopt.ir import Node

from ..registry import LoweringError, converter, dims_of


def _nll(bb: relax.BlockBuilder, node: Node, logp: Any, target: Any, weight: Any) -> Any:
    """The ONNX NLL loss of log-probabilities `logp` [N, C, d...] at int `target` [N, d...]:
    loss = -logp[n, t, d...] · w (w = weight[t], 0 where t == ignore_index); reduction "none"
    keeps the [N, d...] losses, "sum" adds them, "mean" divides that sum by sum(w) (by the count
    of losses when there is neither weight nor ignore_index)."""
    R = relax.op
    emit = bb.emit
    dtype = str(logp.ty.dtype)
    tdt = str(target.ty.dtype)
    reduction = node.attr("reduction", "mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if reduction not in ("none", "sum", "mean"):
        raise LoweringError(f"node {node.label()}: reduction {reduction!r} is not one of none, sum, mean")
    ignore = node.attr("ignore_index")
    c = dims_of(logp)[1]
    if not isinstance(c, int):
        raise LoweringError(f"node {node.label()}: {node.op_type} needs a static class count on the cpu target")
    # clipped targets: an ignored (or out-of-range) index must not read outside the tensor
    t = emit(R.clip(target, 0, c - 1))
    picked = emit(R.squeeze(R.gather_elements(logp, R.expand_dims(t, [1]), axis=1), [1]))
    loss = emit(R.negative(picked))
    w = None
    if weight is not None:
        w = emit(R.take(weight, t, axis=0, mode="clip"))
    zero = relax.const(np.array(0, dtype=dtype), dtype)
    if ignore is not None:
        keep = emit(R.not_equal(target, relax.const(np.array(int(ignore), dtype=tdt), tdt)))
        w = emit(R.where(keep, w, zero)) if w is not None else emit(R.astype(keep, dtype))
    if w is not None:
        loss = emit(R.multiply(loss, w))
    if reduction == "none":
        return loss
    total = emit(R.sum(loss))
    if reduction == "sum":
        return total
    if w is None:
        return emit(R.mean(loss))
    return emit(R.divide(total, R.sum(w)))


@converter("NegativeLogLikelihoodLoss")
def _nll_loss(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """NegativeLogLikelihoodLoss(input [N, C, d...], target [N, d...], weight [C]?)."""
    return _nll(bb, node, ins[0], ins[1], ins[2] if len(ins) > 2 else None)


@converter("SoftmaxCrossEntropyLoss")
def _sce_loss(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """SoftmaxCrossEntropyLoss = NLL loss of log_softmax(scores, axis=1); the optional second
    output is that log_softmax."""
    logp = bb.emit(relax.op.nn.log_softmax(ins[0], axis=1))
    loss = _nll(bb, node, logp, ins[1], ins[2] if len(ins) > 2 else None)
    return [loss, logp] if len(node.outputs) > 1 else loss

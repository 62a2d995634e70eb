"""`remove-noops`: drop nodes that return their input unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from graphopt.ir import Attr, AttrType, Model, Node, Value
from graphopt.transform import Pass, PassContext, PassResult, register_pass

from graphopt.ir import (
    STANDARD_DOMAINS,
    alias,
    const_array,
    const_ints,
    const_numel,
    constant_semantics,
    dims_of,
    dtype_of,
    is_constant,
    opset_version,
    remove_if_dead,
    slice_params,
)
from graphopt.passes.cleanup.infer import infer_types

_BIG = 2**31 - 1  # Slice ends at or beyond this mean "to the end" whatever the dim


@register_pass
@dataclass(frozen=True)
class RemoveNoops(Pass):
    """Remove nodes that compute their input unchanged (readers then read the input).

    Before → after (x unchanged in shape and dtype in each case):
      Identity(x); Dropout(x) in inference (no training_mode or a constant false one, mask
      unused); Cast(x, to=dtype(x)); Reshape(x, s) when s (0 = copy, one -1) gives x's shape;
      Transpose(x, identity perm); Transpose(Transpose(x, p), q) when q∘p is the identity (and
      when it is not, the two merge into one Transpose if the inner has no other reader);
      Slice with steps 1 covering every dim; Pad with all-zero pads; Expand(x, s) when s
      broadcasts to x's shape; Concat of one input; Mul/Div by ones, Add/Sub of zeros when the
      constant broadcasts to x's shape and has x's dtype; Squeeze(Unsqueeze(x, a), a) and
      Unsqueeze(Squeeze(x, a), a)  →  x.

    Does not fire when the shape or dtype of x is unknown where it matters, when the
    constant would broadcast x to a bigger shape or another dtype, or when the node's output
    is a graph output and its input is a graph input, an initializer, an outer-scope value or
    another graph output (graph outputs keep their names; the node then stays).
    With `infer` (default) onnx shape inference runs first to learn shapes and dtypes.
    """

    name: ClassVar[str] = "remove-noops"
    idle_reason: ClassVar[str] = "no no-op nodes (Identity, x+0, x*1, same-shape Reshape...)"
    infer: bool = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        with constant_semantics(model):
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        # simplify-shapes usually ran just before and left types on every value
        if self.infer and any(v.type is None for n in model.graph for v in n.outputs):
            infer_types(model)
        stats: dict[str, int] = {}
        for g in list(model.graphs()):
            if isinstance(g.parent, Node) and g.parent.graph is None:
                continue
            opset = opset_version(model, g, default=1)
            for n in g:
                if n.domain not in STANDARD_DOMAINS or len(n.outputs) == 0:
                    continue
                rule = _RULES.get(n.op_type)
                if rule is None:
                    continue
                try:
                    what = rule(n, opset)
                except (ValueError, TypeError, IndexError):
                    what = None
                if what:
                    stats[what] = stats.get(what, 0) + 1
        total = sum(stats.values())
        return PassResult(total > 0, {"removed": total, **stats})


# --- rules: each returns a stat name when it changed the graph ---------------------------------
def _bypass(n: Node, src: Value | None, what: str) -> str | None:
    if src is None:
        return None
    return what if alias(n, n.outputs[0], src) else None


def _identity(n: Node, opset: int) -> str | None:
    return _bypass(n, n.inputs[0], "identity")


def _dropout(n: Node, opset: int) -> str | None:
    if opset < 7 and n.attr("is_test", 0) != 1:
        return None
    if len(n.outputs) > 1 and (n.outputs[1].uses() or n.outputs[1].is_graph_output()):
        return None
    if len(n.inputs) > 2 and n.inputs[2] is not None:
        mode = const_array(n.inputs[2])
        if mode is None or bool(mode.reshape(-1)[0]):
            return None
    return _bypass(n, n.inputs[0], "dropout")


def _cast(n: Node, opset: int) -> str | None:
    dt = dtype_of(n.inputs[0])
    if dt is None or int(dt) != n.attr("to"):
        return None
    return _bypass(n, n.inputs[0], "cast")


def _reshape(n: Node, opset: int) -> str | None:
    x = n.inputs[0]
    dims = dims_of(x)
    if opset < 5:
        target = n.attr("shape")
    else:
        target = const_ints(n.inputs[1]) if len(n.inputs) > 1 else None
    if dims is None or target is None or len(target) != len(dims):
        return None
    allowzero = n.attr("allowzero", 0)
    minus_one = 0
    for t, d in zip(target, dims):
        if t == 0 and not allowzero:
            continue
        if t == -1:
            minus_one += 1
            continue
        if not (isinstance(d, int) and d == t):
            return None
    if minus_one > 1:
        return None
    return _bypass(n, x, "reshape")


def _perm(n: Node, rank: int | None) -> list[int] | None:
    p = n.attr("perm")
    if p is None:
        return None if rank is None else list(range(rank - 1, -1, -1))
    return list(p)


def _transpose(n: Node, opset: int) -> str | None:
    x = n.inputs[0]
    d = dims_of(x)
    p = _perm(n, None if d is None else len(d))
    if p is None:
        return None
    if p == list(range(len(p))):
        return _bypass(n, x, "transpose")
    inner = x.producer() if x is not None else None
    if inner is None or inner.op_type != "Transpose" or inner.domain not in STANDARD_DOMAINS:
        return None
    q = _perm(inner, len(p))
    if q is None or len(q) != len(p):
        return None
    composed = [q[i] for i in p]  # out dim j reads inner-input dim q[p[j]]
    src = inner.inputs[0]
    if composed == list(range(len(p))):
        what = _bypass(n, src, "transpose-pair")
        if what:
            remove_if_dead(inner)
        return what
    if len(x.uses()) == 1 and not x.is_graph_output():
        n.replace_input_with(0, src)
        n.set_attr(Attr("perm", AttrType.INTS, composed))
        remove_if_dead(inner)
        return "transpose-merged"
    return None


def _slice(n: Node, opset: int) -> str | None:
    x = n.inputs[0]
    dims = dims_of(x)
    if dims is None:
        return None
    params = slice_params(n, opset)
    if params is None:
        return None
    starts, ends, axes, steps = params
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = list(steps) if steps is not None else [1] * len(starts)
    rank = len(dims)
    for s, e, a, st in zip(starts, ends, axes, steps):
        d = dims[a % rank]
        if st != 1:
            return None
        if s != 0 and not (isinstance(d, int) and s <= -d):
            return None
        if not (e >= _BIG or (isinstance(d, int) and e >= d)):
            return None
    return _bypass(n, x, "slice")


def _pad(n: Node, opset: int) -> str | None:
    pads = n.attr("pads") if opset < 11 else (const_ints(n.inputs[1]) if len(n.inputs) > 1 else None)
    if pads is None or any(pads):
        return None
    return _bypass(n, n.inputs[0], "pad")


def _expand(n: Node, opset: int) -> str | None:
    x = n.inputs[0]
    dims = dims_of(x)
    target = const_ints(n.inputs[1])
    if dims is None or target is None or len(target) > len(dims):
        return None
    for t, d in zip(reversed(target), reversed(dims)):
        if t != 1 and not (isinstance(d, int) and d == t):
            return None
    return _bypass(n, x, "expand")


def _concat(n: Node, opset: int) -> str | None:
    if len(n.inputs) != 1:
        return None
    return _bypass(n, n.inputs[0], "concat")


def _neutral(n: Node, opset: int) -> str | None:
    op = n.op_type
    neutral = 1 if op in ("Mul", "Div") else 0
    sides = (0, 1) if op in ("Mul", "Add") else (0,)  # x*1, 1*x, x+0, 0+x, x-0, x/1
    for keep in sides:
        x, c = n.inputs[keep], n.inputs[1 - keep]
        if c is None or x is None or not is_constant(c) or (const_numel(c) or 0) > 1 << 16:
            continue
        arr = const_array(c)
        xd, xt = dims_of(x), dtype_of(x)
        if arr is None or xd is None or xt is None or arr.dtype != xt.numpy():
            continue
        if arr.ndim > len(xd) or not np.all(arr == neutral):
            continue
        ok = all(cd == 1 or (isinstance(d, int) and d == cd) for cd, d in zip(reversed(arr.shape), reversed(xd)))
        if ok:
            return _bypass(n, x, f"{op.lower()}-neutral")
    return None


def _axes(n: Node, opset: int) -> list[int] | None:
    if opset < 13:
        a = n.attr("axes")
        return None if a is None else list(a)
    return const_ints(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] is not None else None


def _squeeze_pair(n: Node, opset: int) -> str | None:
    """Squeeze(Unsqueeze(x, a), a) or Unsqueeze(Squeeze(x, a), a) -> x."""
    inner = n.inputs[0].producer() if n.inputs[0] is not None else None
    pair = {"Squeeze": "Unsqueeze", "Unsqueeze": "Squeeze"}[n.op_type]
    if inner is None or inner.op_type != pair or inner.domain not in STANDARD_DOMAINS:
        return None
    a_out, a_in = _axes(n, opset), _axes(inner, opset)
    if a_out is None or a_in is None:
        return None
    x = inner.inputs[0]
    # the rank the axes refer to: Unsqueeze's output rank == Squeeze's input rank
    big = dims_of(x) if inner.op_type == "Squeeze" else dims_of(n.inputs[0])
    if big is None:
        if any(a < 0 for a in a_out + a_in):
            return None
        norm_out, norm_in = sorted(a_out), sorted(a_in)
    else:
        r = len(big)
        norm_out, norm_in = sorted(a % r for a in a_out), sorted(a % r for a in a_in)
    if norm_out != norm_in:
        return None
    what = _bypass(n, x, "squeeze-pair")
    if what:
        remove_if_dead(inner)
    return what


_RULES = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Slice": _slice,
    "Pad": _pad,
    "Expand": _expand,
    "Concat": _concat,
    "Mul": _neutral,
    "Add": _neutral,
    "Sub": _neutral,
    "Div": _neutral,
    "Squeeze": _squeeze_pair,
    "Unsqueeze": _squeeze_pair,
}

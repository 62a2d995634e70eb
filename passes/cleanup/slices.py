"""`slices-to-split`: Slices that cut one tensor into consecutive pieces  →  one Split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from graphopt.ir import Attr, AttrType, Graph, Model, Node, Value
from graphopt.transform import Pass, PassContext, PassResult, register_pass

from graphopt.ir import STANDARD_DOMAINS, alias, constant_semantics, dims_of, make_constant, opset_version, slice_params
from graphopt.passes.cleanup.infer import infer_types


@register_pass
@dataclass(frozen=True)
class SlicesToSplit(Pass):
    """Replace Slices of one tensor that together tile an axis by one Split.

    Before → after (x: [N, 258, T]; exporters write a STFT's real/imaginary halves, and the two
    layers of an RNN state `[2, N, H]`, this way):
        a = Slice(x, starts=[0], ends=[129], axes=[1]); b = Slice(x, [129], [INT64_MAX], [1])
        →  a, b = Split(x, axis=1, split=[129, 129])
    One node instead of several, and one pass over x at run time (onnxruntime's optimizer does
    the same). Ranges are taken as Slice does (negative indices count from the end, ends past
    the dim clamp), in any order; the Split's outputs come in the order of their starts.

    Fires when at least two Slices read the same x in one graph, each cuts only one axis and all
    the same one, with constant starts/ends/axes, steps 1 (or none), x's size on that axis known,
    and their ranges are non-empty, do not overlap and together cover the whole axis.
    Must not fire: an unknown size on the axis, non-constant starts/ends/axes/steps, steps other
    than 1, Slices over several axes or different axes, ranges that overlap (two equal ones:
    cse merges them first), leave a gap or miss an end, an empty range, Slices of x in another
    graph (an If branch slicing an outer value), opset < 2 (no Split with sizes). Graph outputs
    keep their names (the Split's output takes it).
    """

    name: ClassVar[str] = "slices-to-split"
    idle_reason: ClassVar[str] = "no Slices of one tensor that tile an axis"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        with constant_semantics(model):
            # simplify-shapes usually ran just before and left types on every value
            if any(v.type is None for n in model.graph for v in n.outputs):
                infer_types(model)
            merged = slices = 0
            for g in list(model.graphs()):
                if isinstance(g.parent, Node) and g.parent.graph is None:
                    continue
                opset = opset_version(model, g, default=1)
                if opset < 2:
                    continue
                for x in _sliced_values(g):
                    k = _merge(g, x, opset)
                    if k:
                        merged, slices = merged + 1, slices + k
        return PassResult(bool(merged), {"splits": merged, "slices-replaced": slices} if merged else {})


def _sliced_values(g: Graph) -> list[Value]:
    """Values read by at least two Slices of `g` as their data input (in node order)."""
    count: dict[int, tuple[Value, int]] = {}
    for n in g:
        if n.op_type == "Slice" and n.domain in STANDARD_DOMAINS and n.inputs and n.inputs[0] is not None:
            x = n.inputs[0]
            count[id(x)] = (x, count.get(id(x), (x, 0))[1] + 1)
    return [x for x, c in count.values() if c >= 2]


def _range(n: Node, opset: int, dims: tuple[int | str | None, ...]) -> tuple[int, int, int] | None:
    """(axis, start, end) of a one-axis, step-1 Slice with constant bounds, clamped to the dim."""
    params = slice_params(n, opset)
    if params is None:
        return None
    starts, ends, axes, steps = params
    if len(starts) != 1 or len(ends) != 1:
        return None
    axis = int(list(axes)[0]) if axes else 0
    if steps is not None and list(steps) != [1]:
        return None
    rank = len(dims)
    if not -rank <= axis < rank:
        return None
    axis %= rank
    d = dims[axis]
    if not isinstance(d, int) or d <= 0:
        return None
    s, e = int(starts[0]), int(ends[0])
    s = min(max(s + d if s < 0 else s, 0), d)
    e = min(max(e + d if e < 0 else e, 0), d)
    return axis, s, e


def _merge(g: Graph, x: Value, opset: int) -> int:
    """Replace the Slices of `x` in `g` by one Split when they tile one axis; Slices replaced."""
    dims = dims_of(x)
    if dims is None:
        return 0
    slices = [n for n, i in x.uses() if i == 0 and n.op_type == "Slice" and n.domain in STANDARD_DOMAINS and n.graph is g]
    ranges = [_range(n, opset, dims) for n in slices]
    if len(slices) < 2 or any(r is None for r in ranges):
        return 0
    axes = {r[0] for r in ranges if r is not None}
    if len(axes) != 1:
        return 0
    axis = axes.pop()
    order = sorted(range(len(slices)), key=lambda i: ranges[i][1:])  # type: ignore[index]
    pos = 0
    for i in order:
        _, s, e = ranges[i]  # type: ignore[misc]
        if s != pos or e <= s:
            return 0  # a gap, an overlap or an empty range
        pos = e
    if pos != dims[axis]:
        return 0
    sizes = [ranges[i][2] - ranges[i][1] for i in order]  # type: ignore[index]
    first = next(n for n in g if any(n is s for s in slices))
    outs = [Value(slices[i].outputs[0].name + "_split", slices[i].outputs[0].type) for i in order]
    attrs = [Attr("axis", AttrType.INT, axis)]
    inputs: list[Value | None] = [x]
    if opset >= 13:
        inputs.append(make_constant(g, np.array(sizes, dtype=np.int64), x, before=first))
    else:
        attrs.append(Attr("split", AttrType.INTS, sizes))
    split = Node("", "Split", inputs, attrs, outputs=outs, name=(first.name or "slice") + "_split")
    g.insert_before(first, split)
    for i, out in zip(order, outs):
        n = slices[i]
        alias(n, n.outputs[0], out)  # a graph output's name moves to the Split's output
    return len(slices)

"""`simplify-shapes`: fold the Shape/Gather/Concat/Unsqueeze/Slice clutter of torch exports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

import numpy as np

from graphopt.ir import Model, Node, Value
from graphopt.transform import Pass, PassContext, PassResult, register_pass

from graphopt.passes.cleanup._util import (
    constant_semantics,
    STANDARD_DOMAINS,
    const_ints,
    dims_of,
    graphs_preorder,
    is_constant,
    make_constant,
    opset_of,
    replace_with_constant,
)
from graphopt.passes.cleanup.fold import try_fold
from graphopt.passes.cleanup.infer import infer_types

#: One element of a shape tensor: a known int, or an opaque token for an unknown one. Two
#: equal tokens denote the same runtime value: ("sym", name) for a named symbolic dim, or
#: ("dim", value, axis) for an unnamed dim of one value.
Elem = Union[int, tuple]

_MAX_ELEMS = 64  # shape tensors are short; longer int tensors are not tracked


@register_pass
@dataclass(frozen=True)
class SimplifyShapes(Pass):
    """Fold shape computations using inferred (symbolic) shapes.

    Before → after (x: float[N,3,4,4], N symbolic):
      `Shape(x)`  stays (N is dynamic);  `Gather(Shape(x), 1)`  →  constant 3;
      `Shape(y)` with y of static shape  →  constant;  `Slice(Shape(x), 1, 4)`  →  [3,4,4];
      then Unsqueeze/Concat/Cast/... of constants fold (as in fold-constants, size-bounded);
      `Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1]))`  →  `Reshape(x, [0, -1])`
      (the element that reads x's own dim i at position i becomes 0 = "copy", and a single
      remaining unknown becomes -1 when all other elements are positive constants).

    Keeps dynamic dims dynamic: an element equal to a symbolic dim is never made a constant.
    Does not fire when shapes are unknown (inference failed, custom ops), on Reshape with
    allowzero=1, or inside function bodies beyond plain constant folding (no types there).
    Shape inference (onnx, data propagation on) runs first; the inferred types stay on values.
    """

    name: ClassVar[str] = "simplify-shapes"
    max_size: int = 1 << 20
    max_expand: int = 1024

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        with constant_semantics(model):
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        infer_types(model)
        stats = {"shape-folded": 0, "gather-folded": 0, "folded": 0, "reshape-simplified": 0}
        for g in graphs_preorder(model):
            if isinstance(g.parent, Node) and g.parent.graph is None:
                continue
            opset = opset_of(model, g)
            memo: dict[Value, list[Elem] | None] = {}
            for n in g:
                if n.domain not in STANDARD_DOMAINS:
                    continue
                op = n.op_type
                if op in ("Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast") and not all(
                    is_constant(v) for v in n.inputs if v is not None
                ):
                    elems = _elements(n.outputs[0], memo)
                    shape = _out_shape(n, elems)
                    if elems is not None and shape is not None and all(isinstance(e, int) for e in elems):
                        out = n.outputs[0]
                        arr = np.array(elems, dtype=np.int64).reshape(shape)
                        if out.dtype is not None and out.dtype.numpy() != arr.dtype:
                            arr = arr.astype(out.dtype.numpy())
                        replace_with_constant(n, [arr])
                        stats["shape-folded" if op == "Shape" else "gather-folded"] += 1
                        continue
                if op == "Reshape" and opset >= 5 and len(n.inputs) > 1 and not is_constant(n.inputs[1]):
                    if _simplify_reshape(n, memo):
                        stats["reshape-simplified"] += 1
                    continue
                if try_fold(n, model, max_size=self.max_size, max_expand=self.max_expand):
                    stats["folded"] += 1
        return PassResult(any(stats.values()), stats)


def _elements(v: Value | None, memo: dict[Value, list[Elem] | None], depth: int = 0) -> list[Elem] | None:
    """The elements of a small integer tensor (flattened), as ints or unknown tokens."""
    if v is None or depth > 64:
        return None
    key = v
    if key in memo:
        return memo[key]
    memo[key] = None  # guards cycles; overwritten below
    memo[key] = r = _compute(v, memo, depth)
    return r


def _compute(v: Value, memo: dict[Value, list[Elem] | None], depth: int) -> list[Elem] | None:
    ints = const_ints(v) if is_constant(v) else None
    if ints is not None:
        return ints if len(ints) <= _MAX_ELEMS else None
    n = v.producer()
    if n is None or n.domain not in STANDARD_DOMAINS or v.index() != 0:
        return None
    op = n.op_type
    if op == "Shape":
        x = n.inputs[0]
        dims = dims_of(x)
        if dims is None:
            return None
        elems: list[Elem] = [
            d if isinstance(d, int) else ("sym", d) if isinstance(d, str) else ("dim", x, i) for i, d in enumerate(dims)
        ]
        r = len(elems)
        start, end = n.attr("start", 0), n.attr("end", None)
        return elems[_clamp(start, r) : r if end is None else _clamp(end, r)]
    if op == "Identity" or (op == "Cast" and _int_dtype(n.attr("to"))):
        return _elements(n.inputs[0], memo, depth + 1)
    if op in ("Unsqueeze", "Squeeze", "Reshape", "Flatten"):
        # element order is unchanged; the rank comes from the output's type when needed
        return _elements(n.inputs[0], memo, depth + 1)
    if op == "Concat":
        out: list[Elem] = []
        for x in n.inputs:
            e = _elements(x, memo, depth + 1)
            if e is None:
                return None
            out.extend(e)
        return out if len(out) <= _MAX_ELEMS else None
    if op == "Gather":
        data = _elements(n.inputs[0], memo, depth + 1)
        idx = const_ints(n.inputs[1])
        data_dims = dims_of(n.inputs[0])
        if data is None or idx is None or n.attr("axis", 0) not in (0, -1) or (data_dims is not None and len(data_dims) != 1):
            return None
        r = len(data)
        if any(i < -r or i >= r for i in idx):
            return None
        return [data[i] for i in idx]
    if op == "Slice" and len(n.inputs) >= 3:
        data = _elements(n.inputs[0], memo, depth + 1)
        starts, ends = const_ints(n.inputs[1]), const_ints(n.inputs[2])
        axes = const_ints(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3] is not None else [0]
        steps = const_ints(n.inputs[4]) if len(n.inputs) > 4 and n.inputs[4] is not None else [1]
        if data is None or not starts or not ends or axes not in ([0], [-1]) or steps is None or len(steps) != 1:
            return None
        return data[slice(starts[0], ends[0], steps[0])] if steps[0] != 0 else None
    return None


def _out_shape(n: Node, elems: list[Elem] | None) -> tuple[int, ...] | None:
    """The shape of a node's (fully known) int output, or None when it is not certain."""
    if elems is None:
        return None
    out = n.outputs[0]
    if out.shape is not None and out.shape.is_static():
        shape = tuple(int(d) for d in out.shape.dims)  # type: ignore[arg-type]
        return shape if int(np.prod(shape, dtype=np.int64)) == len(elems) else None
    if n.op_type in ("Shape", "Concat", "Slice"):
        return (len(elems),)
    if n.op_type == "Gather":
        idx = n.inputs[1]
        st = dims_of(idx)
        return tuple(st) if st is not None and all(isinstance(d, int) for d in st) else None  # type: ignore[return-value]
    return None


def _clamp(i: int, r: int) -> int:
    i = i + r if i < 0 else i
    return min(max(i, 0), r)


def _int_dtype(to: int | None) -> bool:
    return to in (6, 7)  # int32, int64: exact for any dim


def _simplify_reshape(n: Node, memo: dict[Value, list[Elem] | None]) -> bool:
    """Reshape(x, computed shape) -> Reshape(x, constant) using 0 (copy) and -1 (the rest)."""
    if n.attr("allowzero", 0):
        return False
    x, shape = n.inputs[0], n.inputs[1]
    elems = _elements(shape, memo)
    dims = dims_of(x)
    if elems is None:
        return False
    target: list[int | None] = []
    for i, e in enumerate(elems):
        if isinstance(e, int):
            target.append(e)
        elif dims is not None and i < len(dims) and _same_dim(e, x, i, dims[i]):
            target.append(0)
        else:
            target.append(None)
    unknown = [i for i, t in enumerate(target) if t is None]
    if len(unknown) > 1:
        return False
    if unknown:
        if not all(t is not None and t > 0 for i, t in enumerate(target) if i != unknown[0]):
            return False
        target[unknown[0]] = -1
    if sum(1 for t in target if t == -1) > 1:
        return False
    g = n.graph
    assert g is not None
    const = make_constant(g, np.array(target, dtype=np.int64), shape, before=n)
    n.replace_input_with(1, const)
    return True


def _same_dim(e: Elem, x: Value | None, i: int, d: int | str | None) -> bool:
    if isinstance(e, tuple):
        if e[0] == "sym":
            return isinstance(d, str) and d == e[1]
        return e[1] is x and e[2] == i
    return False

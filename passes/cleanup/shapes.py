"""`simplify-shapes`: fold the Shape/Gather/Concat/Unsqueeze/Slice clutter of torch exports."""

from __future__ import annotations

import collections
import math

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Union

import numpy as np

from graphopt.ir import Model, Node, Shape, TensorType, Value
from graphopt.transform import Pass, PassContext, PassResult, register_pass

from graphopt.ir import (
    STANDARD_DOMAINS,
    const_array,
    const_ints,
    constant_semantics,
    dims_of,
    is_constant,
    make_constant,
    opset_version,
    replace_with_constant,
)
from graphopt.passes.cleanup.fold import try_fold
from graphopt.passes.cleanup.infer import infer_types, merge_type

#: One element of a shape tensor: a known int, or an opaque token for an unknown one. Two
#: equal tokens denote the same runtime value: ("sym", name) for a named symbolic dim, or
#: ("dim", value, axis) for an unnamed dim of one value.
Elem = Union[int, tuple]

INT64_MAX = 2**63 - 1
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
    idle_reason: ClassVar[str] = "no shape computation that known shapes decide"
    max_size: int = 1 << 20
    max_expand: int = 1024

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        with constant_semantics(model):
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        infer_types(model)
        stats = {"shape-folded": 0, "gather-folded": 0, "folded": 0, "reshape-simplified": 0, "shape-refined": 0}
        # a dim made known (a -1 resolved, a 0 copied, an Expand or Reshape typed) can make the
        # next shape computation foldable: repeat, re-inferring types, while that happens
        for _ in range(_MAX_ROUNDS):
            before = stats["reshape-simplified"] + stats["shape-refined"]
            self._round(model, stats)
            if stats["reshape-simplified"] + stats["shape-refined"] == before:
                break
            infer_types(model)
        return PassResult(any(stats.values()), stats)

    def _round(self, model: Model, stats: dict[str, int]) -> None:
        for g in list(model.graphs()):
            if isinstance(g.parent, Node) and g.parent.graph is None:
                continue
            opset = opset_version(model, g, default=1)
            memo: dict[Value, list[Elem] | None] = {}
            for n in g:
                if n.domain not in STANDARD_DOMAINS:
                    continue
                op = n.op_type
                if op in ("Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Size") and not all(
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
                if op == "Range" and _type_range(n, memo):
                    stats["shape-refined"] += 1
                    continue
                if op == "Expand" and not is_constant(n.inputs[1]) and _type_from_shape(n, memo):
                    stats["shape-refined"] += 1
                    continue
                if op == "Reshape" and opset >= 5 and len(n.inputs) > 1:
                    if not is_constant(n.inputs[1]) and _simplify_reshape(n, memo):
                        stats["reshape-simplified"] += 1
                    elif not is_constant(n.inputs[1]) and not n.attr("allowzero", 0) and _type_from_shape(n, memo):
                        stats["shape-refined"] += 1
                    if is_constant(n.inputs[1]) and _resolve_minus_one(n):
                        stats["reshape-simplified"] += 1
                    continue
                if try_fold(n, model, max_size=self.max_size, max_expand=self.max_expand):
                    stats["folded"] += 1


# rounds stop as soon as one makes no progress; the cap only bounds pathological graphs. A chain
# of computed Reshapes resolves one link per round: torch's ShuffleNetV2 has 16 channel shuffles
# in a row (a cap of 10 left the last stages' channel counts unknown, and prune could not follow them)
_MAX_ROUNDS = 100


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
    if op == "Size":  # the element count is known when every dim is (Size(Shape(x)) = rank of x)
        dims = dims_of(n.inputs[0])
        return [math.prod(dims)] if dims is not None and all(isinstance(d, int) for d in dims) else None  # type: ignore[arg-type]
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
    if op in ("Equal", "Where"):
        # torch's expand(): Where(Equal(shape, -1), 1, shape); elementwise on ≤1-D tensors
        if any(len(dims_of(x) or (0, 0)) > 1 for x in n.inputs):
            return None
        args = [_elements(x, memo, depth + 1) for x in n.inputs]
        if any(a is None for a in args):
            return None
        size = max(len(a) for a in args)  # type: ignore[arg-type]
        if any(len(a) not in (1, size) for a in args):  # type: ignore[arg-type]
            return None
        cols = [[a[i if len(a) > 1 else 0] for a in args] for i in range(size)]  # type: ignore[index]
        return _equal(cols) if op == "Equal" else _where(cols)
    if op == "Slice" and len(n.inputs) >= 3:
        data = _elements(n.inputs[0], memo, depth + 1)
        starts, ends = const_ints(n.inputs[1]), const_ints(n.inputs[2])
        axes = const_ints(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3] is not None else [0]
        steps = const_ints(n.inputs[4]) if len(n.inputs) > 4 and n.inputs[4] is not None else [1]
        if data is None or not starts or not ends or axes not in ([0], [-1]) or steps is None or len(steps) != 1:
            return None
        return data[slice(starts[0], ends[0], steps[0])] if steps[0] != 0 else None
    return None


def _equal(cols: list[list[Elem]]) -> list[Elem] | None:
    out: list[Elem] = []
    for a, b in cols:
        if isinstance(a, int) and isinstance(b, int):
            out.append(int(a == b))
        elif a == b:  # the same dim token
            out.append(1)
        elif (isinstance(a, int) and a < 0) or (isinstance(b, int) and b < 0):
            out.append(0)  # a dim is never negative
        else:
            return None
    return out


def _where(cols: list[list[Elem]]) -> list[Elem] | None:
    out: list[Elem] = []
    for c, a, b in cols:
        if not isinstance(c, int):
            return None
        out.append(a if c else b)
    return out


def _dim_of(e: Elem) -> int | str | None:
    """A shape element as a dim: an int, a symbol, or None when not known."""
    if isinstance(e, int):
        return e
    if e[0] == "sym":
        return e[1]
    dims = dims_of(e[1])
    d = dims[e[2]] if dims is not None else None
    return d if isinstance(d, (int, str)) else None


def _refine(out: Value, dims: Sequence[int | str | None]) -> bool:
    """Give `out` (whose dtype is known) the dims where they are more precise than its type's."""
    assert out.dtype is not None
    merged = merge_type(out.type, TensorType(out.dtype, Shape(tuple(dims))))
    if merged is out.type:
        return False
    out.type = merged
    return True


def _type_range(n: Node, memo: dict[Value, list[Elem] | None]) -> bool:
    """Range(0, d, 1) with d a dim read from a Shape: its length is that dim (torch's arange(N))."""
    start, limit, delta = (_elements(x, memo) for x in n.inputs[:3])
    out = n.outputs[0]
    if start != [0] or delta != [1] or limit is None or len(limit) != 1 or out.dtype is None:
        return False
    d = _dim_of(limit[0])
    if not isinstance(d, str):
        return False
    return _refine(out, (d,))


def _type_from_shape(n: Node, memo: dict[Value, list[Elem] | None]) -> bool:
    """Give Expand(x, computed shape) and Reshape(x, computed shape) output dims where onnx's
    inference could not (it does not see through Where/Equal, nor name a dim it reads from
    another tensor's Shape): Expand broadcasts x's dims against the shape's elements; Reshape
    takes the elements (0 copies x's dim, -1 stays unknown)."""
    out, x = n.outputs[0], n.inputs[0]
    elems = _elements(n.inputs[1], memo)
    xd = dims_of(x)
    if elems is None or xd is None or out.dtype is None:
        return False
    dims: list[int | str | None] = []
    if n.op_type == "Reshape":
        for i, e in enumerate(elems):
            d = _dim_of(e)
            dims.append(None if d == -1 else (xd[i] if i < len(xd) else None) if d == 0 else d)
    else:
        rank = max(len(elems), len(xd))
        xs = [1] * (rank - len(xd)) + list(xd)
        es = [1] * (rank - len(elems)) + [_dim_of(e) for e in elems]
        for a, b in zip(xs, es):
            dims.append(b if a == 1 else a if b == 1 or a == b else None)
    return _refine(out, dims)


def _out_shape(n: Node, elems: list[Elem] | None) -> tuple[int, ...] | None:
    """The shape of a node's (fully known) int output, or None when it is not certain."""
    if elems is None:
        return None
    out = n.outputs[0]
    if out.shape is not None and out.shape.is_static():
        shape = tuple(int(d) for d in out.shape.dims)  # type: ignore[arg-type]
        return shape if math.prod(shape) == len(elems) else None  # exact: np.prod would wrap at 2**63
    if n.op_type in ("Shape", "Concat", "Slice"):
        return (len(elems),)
    if n.op_type == "Gather":
        idx = n.inputs[1]
        st = dims_of(idx)
        return tuple(st) if st is not None and all(isinstance(d, int) for d in st) else None
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
        d = _dim_of(e)
        if isinstance(d, int):
            target.append(d)  # a constant, or a dim that is static where it is read
        elif dims is not None and i < len(dims) and (
            _same_dim(e, x, i, dims[i]) or (isinstance(d, str) and not d.startswith("unk__") and d == dims[i])
        ):
            target.append(0)  # x's own dim i, or a dim with the same (inferred, named) symbol
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


Mono = tuple[int, collections.Counter]  # coefficient × product of symbols


def _mono(d: int | str) -> Mono:
    """A dim as a monomial; "128*batch" (a product this pass named before) is parsed back."""
    if isinstance(d, int):
        return d, collections.Counter()
    coeff, syms = 1, collections.Counter()
    for part in d.split("*"):
        if part.isdigit():
            coeff *= int(part)
        else:
            syms[part] += 1
    return coeff, syms


def _dim_text(coeff: int, syms: collections.Counter) -> int | str:
    if not syms:
        return coeff
    names = sorted(s for s, k in syms.items() for _ in range(k))
    return "*".join(([str(coeff)] if coeff != 1 else []) + names)


def _resolve_minus_one(n: Node) -> bool:
    """Size the -1 of Reshape(x, constant target) by cancelling symbols.

    x: [N, 128, 768], target [0, 128, -1, 64]  →  Reshape(x, [0, 128, 12, 64]) (a static result
    is written into the graph). x: [N, 128], target [-1]  →  output typed ["128*N"], and a later
    Reshape of that to [-1, 1, 1, 128] gets [N, 1, 1, 128]: onnx's inference cannot size a -1
    next to a symbolic dim, so everything downstream would get made-up dims. Not when x has an
    unknown dim, the division leaves a remainder or a negative power, or allowzero=1."""
    if n.attr("allowzero", 0):
        return False
    target = const_array(n.inputs[1])
    dims = dims_of(n.inputs[0])
    if target is None or dims is None or target.ndim != 1 or np.count_nonzero(target == -1) != 1:
        return False
    if any(d is None for d in dims) or any(isinstance(d, str) and d.startswith("unk__") for d in dims):
        return False
    coeff, syms = 1, collections.Counter()
    for d in dims:
        c, s = _mono(d)  # type: ignore[arg-type]
        coeff, syms = coeff * c, syms + s
    out_dims: list[int | str | None] = []
    for i, t in enumerate(target.tolist()):
        d = (dims[i] if i < len(dims) else None) if t == 0 else t
        if d is None or (isinstance(d, int) and d < -1):
            return False
        out_dims.append(d)
        if d == -1:
            continue
        c, s = _mono(d)
        if c == 0 or coeff % c or any(syms[k] < v for k, v in s.items()):
            return False
        coeff, syms = coeff // c, syms - s
    rest = _dim_text(coeff, syms)
    g = n.graph
    assert g is not None
    if isinstance(rest, int):
        if rest > INT64_MAX:
            return False  # a size no int64 shape tensor can hold (onnx's inference refuses it too)
        resolved = np.where(target == -1, rest, target).astype(np.int64)
        n.replace_input_with(1, make_constant(g, resolved, n.inputs[1], before=n))
        return True
    out = n.outputs[0]
    if out.dtype is None:
        return False
    return _refine(out, [rest if d == -1 else d for d in out_dims])


def _same_dim(e: Elem, x: Value | None, i: int, d: int | str | None) -> bool:
    if isinstance(e, tuple):
        if e[0] == "sym":
            return isinstance(d, str) and d == e[1]
        return e[1] is x and e[2] == i
    return False

"""`fuse-normalization`: layer / RMS normalization spelled in primitive ops  →  one op.

Rules (each registered, so `graphopt-compile --explain layer-norm` shows why one did not fire):

- `layer-norm`: the decomposition torch exports below opset 17,
  ReduceMean → Sub → Pow 2 (or Mul self) → ReduceMean → Add eps → Sqrt → Div → Mul gamma →
  Add beta, over the last axes  →  LayerNormalization(x, gamma, beta, axis, epsilon) (opset ≥ 17;
  a missing gamma/beta becomes a ones/zeros constant).
- `rms-norm`: x / Sqrt(ReduceMean(x²) + eps) · gamma (also x · Reciprocal(Sqrt(...)),
  x · (1 / Sqrt(...)), x · Pow(... + eps, -0.5))  →  RMSNormalization(x, gamma, axis, epsilon)
  (opset ≥ 23 only; older models are left as they are).
- `skip-layer-norm` (only with `contrib-ops=1`): LayerNormalization(Add(a, b), gamma, beta) over
  the last axis  →  com.microsoft SkipLayerNormalization(a, b, gamma, beta); when the sum is also
  read elsewhere, those readers take SkipLayerNormalization's sum output.

A gamma (beta) is folded into the op only when it is a constant that broadcasts over the
normalized dims alone; a Mul/Add by anything else stays after the fused op (the normalization
itself is still fused, with ones/zeros). ReduceMean axes are read from the attribute
(opset < 18) or the constant second input (opset ≥ 18).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from graphopt.ir import DataType, Node, Value
from graphopt.pattern import Fail, Match, P, Pattern, PlanRule, RewriteBuilder, RewritePass, Rule, const_array, register_rule
from graphopt.passes.fusion.activations import (
    MS_DOMAIN,
    contrib_allowed,
    float_dtype,
    standard_op,
    import_contrib,
    scalar_consts,
)
from graphopt.transform import register_pass


def _mul(a: Pattern, b: Pattern) -> Pattern:
    return P.op("Mul", a, b, commutative=True)


def _reduce_axes(node: Node, rank: int) -> list[int] | Fail:
    """The sorted, non-negative axes a ReduceMean (keepdims=1) reduces over."""
    if int(node.attr("keepdims", 1)) != 1:
        return Fail(f"{node.label()} has keepdims=0")
    axes = None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        if arr is None:
            return Fail(f"{node.label()}: axes are not a constant")
        axes = [int(a) for a in np.asarray(arr).reshape(-1)]
    elif node.attr("axes") is not None:
        axes = [int(a) for a in node.attr("axes")]
    if not axes:
        if int(node.attr("noop_with_empty_axes", 0)):
            return Fail(f"{node.label()} reduces nothing (noop_with_empty_axes=1)")
        return list(range(rank))
    norm = sorted({a + rank if a < 0 else a for a in axes})
    if any(not 0 <= a < rank for a in norm):
        return Fail(f"{node.label()}: axes {axes} out of range for rank {rank}")
    return norm


def _same_shape(m: Match, patterns: tuple[Pattern, ...], affine: tuple[Pattern, ...]) -> list[Value]:
    """Matched values of x's shape: `patterns`' values, and the root's output when the matched
    gamma/beta constants have rank <= 1 (they cannot raise the rank then)."""
    vals = [m.value(p) for p in patterns if p in m]
    consts = [const_array(m.get(p)) for p in affine if m.get(p) is not None]
    if all(c is not None and c.ndim <= 1 for c in consts):
        vals.append(m.root.outputs[0])
    return [v for v in vals if v is not None]


def _last_axes(m: Match, x: Value, reduces: list[Node], same_shape: list[Value]) -> tuple[int, tuple[int, ...]] | Fail:
    """(axis, normalized static dims) when every ReduceMean reduces the same trailing axes of x.
    x's shape is x's type, else that of a matched value of x's shape (`same_shape`)."""
    shape = x.shape
    for v in same_shape:
        if shape is not None:
            break
        shape = v.shape
    if shape is None:
        return Fail("shape of x is unknown (run shape inference, e.g. simplify-shapes, first)")
    rank = len(shape)
    found = None
    for r in reduces:
        axes = _reduce_axes(r, rank)
        if isinstance(axes, Fail):
            return axes
        if found is not None and axes != found:
            return Fail(f"the ReduceMeans reduce different axes ({found} and {axes})")
        found = axes
    assert found is not None
    axis = rank - len(found)
    if found != list(range(axis, rank)):
        return Fail(f"reduction over axes {found} of a rank-{rank} x, not the last axes")
    dims = shape.dims[axis:]
    if not all(isinstance(d, int) for d in dims):
        return Fail(f"normalized dims {list(dims)} are not static")
    return axis, tuple(int(d) for d in dims)  # type: ignore[arg-type]


def _affine(v: Value | None, dims: tuple[int, ...], dtype: DataType, what: str, rank: int | None = None) -> np.ndarray | Fail:
    """A gamma/beta constant broadcast to the normalized dims, or Fail when it is not one.
    `rank` is x's rank: a constant of higher rank broadcasts x up (a new leading axis), which the
    fused op would not do (unknown rank: only constants no longer than the normalized dims)."""
    arr = const_array(v)
    if arr is None:
        return Fail(f"{what} is not a constant")
    arr = np.asarray(arr)
    if arr.ndim > (rank if rank is not None else len(dims)):
        return Fail(f"{what} of shape {list(arr.shape)} has more dims than x: it broadcasts x to a higher rank")
    try:
        if DataType.from_numpy(arr.dtype) != dtype:
            return Fail(f"{what} dtype {arr.dtype} differs from x's {dtype.text}")
    except (ValueError, KeyError, TypeError):  # no ONNX element type for it
        return Fail(f"{what} dtype {arr.dtype} is not supported")
    shape = tuple(arr.shape)
    while len(shape) > len(dims) and shape[0] == 1:
        shape = shape[1:]
    if len(shape) > len(dims) or any(s not in (1, d) for s, d in zip(shape[::-1], dims[::-1])):
        return Fail(f"{what} shape {list(arr.shape)} does not broadcast over the normalized dims {list(dims)} only")
    return np.broadcast_to(arr.reshape(shape), dims).copy()


def _defer(out: Value, dims: tuple[int, ...], dtype: DataType, ops: tuple[str, ...], rank: int | None) -> Fail | None:
    """Fail when `out`'s only reader is a Mul/Add (in `ops`) by a foldable constant: the match
    rooted at that reader takes it in."""
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output():
        return None
    user, i = uses[0]
    if user.op_type not in ops or user.domain not in ("", "ai.onnx") or len(user.inputs) != 2:
        return None
    other = user.inputs[1 - i]
    if other is None or isinstance(_affine(other, dims, dtype, "operand", rank), Fail):
        return None
    return Fail(f"its reader {user.label()} is a constant {user.op_type}: the match rooted there fuses it")


class LayerNorm(PlanRule):
    """ReduceMean/Sub/Pow/ReduceMean/Add eps/Sqrt/Div [· gamma] [+ beta] →
    LayerNormalization(x, gamma, beta, axis, epsilon) (opset ≥ 17).

    The square is Pow(d, 2) or Mul(d, d), the division Div(d, std) or Mul(d, Reciprocal(std));
    gamma/beta absent: ones/zeros. Must not fire: reductions over axes that are not the last
    ones (or differ between the two ReduceMeans), keepdims=0, eps added after the Sqrt (or not a
    single-element constant), an intermediate used elsewhere, non-constant gamma/beta (they stay
    as Mul/Add after the fused op), normalized dims not static, x not float, opset < 17.
    """

    name = "layer-norm"
    x = P.any()
    mean = P.op("ReduceMean", x, P.optional(P.const()))
    d = P.op("Sub", x, mean)
    var = P.op("ReduceMean", P.alt(P.op("Pow", d, P.const(2.0)), P.op("Mul", d, d)), P.optional(P.const()))
    eps = P.const()
    std = P.op("Sqrt", P.op("Add", var, eps, commutative=True))
    norm = P.alt(P.op("Div", d, std), _mul(d, P.op("Reciprocal", std)))
    gamma, beta, beta_only = P.const(), P.const(), P.const()
    scaled = _mul(norm, gamma)
    full = P.op("Add", scaled, beta, commutative=True)
    shifted = P.op("Add", norm, beta_only, commutative=True)
    pattern = P.alt(full, scaled, shifted, norm)

    def plan(self, m: Match) -> tuple[int, float, np.ndarray, np.ndarray] | Fail:
        x = m[self.x]
        std = standard_op(m, "LayerNormalization", 17, x, num_inputs=3)
        if not std:
            return std
        dt = float_dtype(x, m=m, consts=(self.eps,))
        if isinstance(dt, Fail):
            return dt
        ok = scalar_consts(m, x, (self.eps,))
        if not ok:
            return ok
        same = _same_shape(m, (self.d, self.norm), (self.gamma, self.beta, self.beta_only))
        ax = _last_axes(m, x, [m[self.mean], m[self.var]], same)
        if isinstance(ax, Fail):
            return ax
        axis, dims = ax
        gv = m.get(self.gamma)
        bv = m.get(self.beta) if m.get(self.beta) is not None else m.get(self.beta_only)
        rank = len(x.shape) if x.shape is not None else (axis + len(dims) if axis >= 0 else None)
        gamma = _affine(gv, dims, dt, "gamma", rank) if gv is not None else np.ones(dims, dt.numpy())
        beta = _affine(bv, dims, dt, "beta", rank) if bv is not None else np.zeros(dims, dt.numpy())
        for a in (gamma, beta):
            if isinstance(a, Fail):
                return a
        root_out = m.root.outputs[0]
        if gv is None and bv is None:
            why = _defer(root_out, dims, dt, ("Mul", "Add"), rank)
        elif bv is None:
            why = _defer(root_out, dims, dt, ("Add",), rank)
        else:
            why = None
        if why is not None:
            return why
        eps = float(np.asarray(m.const(self.eps)).reshape(-1)[0])
        return axis, eps, gamma, beta  # type: ignore[return-value]

    def build(self, m: Match, b: RewriteBuilder, plan: Any) -> Value:
        axis, eps, gamma, beta = plan
        x = m[self.x]
        gv = m.get(self.gamma)
        g = gv if gv is not None and const_array(gv).shape == gamma.shape else b.initializer(gamma, "ln_scale")  # type: ignore[union-attr]
        bv = m.get(self.beta) if m.get(self.beta) is not None else m.get(self.beta_only)
        bb = bv if bv is not None and const_array(bv).shape == beta.shape else b.initializer(beta, "ln_bias")  # type: ignore[union-attr]
        return b.op.LayerNormalization(x, g, bb, axis=axis, epsilon=eps)


class RmsNorm(PlanRule):
    """x / Sqrt(ReduceMean(x²) + eps) [· gamma] → RMSNormalization(x, gamma, axis, epsilon)
    (opset ≥ 23 only; gamma absent: ones).

    x² is Pow(x, 2) or Mul(x, x); the division Div(x, s), x · Reciprocal(s), x · Div(1, s) or
    x · Pow(ms + eps, -0.5). Must not fire: opset < 23 (no standard op: left as it is),
    reductions not over the last axes, eps added after the Sqrt, an intermediate used elsewhere,
    non-constant gamma (it stays as a Mul after the fused op), x centred by its own mean (that is
    a LayerNormalization: layer-norm takes it), normalized dims not static, x not float.
    """

    name = "rms-norm"
    x = P.any()
    ms = P.op("ReduceMean", P.alt(P.op("Pow", x, P.const(2.0)), P.op("Mul", x, x)), P.optional(P.const()))
    eps = P.const()
    ve = P.op("Add", ms, eps, commutative=True)
    s = P.op("Sqrt", ve)
    one = P.const(1.0)
    inv = P.alt(P.op("Reciprocal", s), P.op("Div", one, s), P.op("Pow", ve, P.const(-0.5)))
    norm = P.alt(P.op("Div", x, s), _mul(x, inv))
    gamma = P.const()
    pattern = P.alt(_mul(norm, gamma), norm)

    def plan(self, m: Match) -> tuple[int, float, np.ndarray] | Fail:
        x = m[self.x]
        std = standard_op(m, "RMSNormalization", 23, x, num_inputs=2)
        if not std:
            return std
        dt = float_dtype(x, m=m, consts=(self.eps,))
        if isinstance(dt, Fail):
            return dt
        prod = x.producer()
        if prod is not None and prod.op_type == "Sub" and len(prod.inputs) == 2:
            r = prod.inputs[1].producer() if prod.inputs[1] is not None else None
            if r is not None and r.op_type == "ReduceMean" and r.inputs and r.inputs[0] is prod.inputs[0]:
                return Fail("x is centred by its own mean: a LayerNormalization (layer-norm)")
        ok = scalar_consts(m, x, (self.eps, self.one))
        if not ok:
            return ok
        ax = _last_axes(m, x, [m[self.ms]], _same_shape(m, (self.norm,), (self.gamma,)))
        if isinstance(ax, Fail):
            return ax
        axis, dims = ax
        gv = m.get(self.gamma)
        rank = len(x.shape) if x.shape is not None else (axis + len(dims) if axis >= 0 else None)
        gamma = _affine(gv, dims, dt, "gamma", rank) if gv is not None else np.ones(dims, dt.numpy())
        if isinstance(gamma, Fail):
            return gamma
        if gv is None:
            why = _defer(m.root.outputs[0], dims, dt, ("Mul",), rank)
            if why is not None:
                return why
        eps = float(np.asarray(m.const(self.eps)).reshape(-1)[0])
        return axis, eps, gamma

    def build(self, m: Match, b: RewriteBuilder, plan: Any) -> Value:
        axis, eps, gamma = plan
        gv = m.get(self.gamma)
        g = gv if gv is not None and const_array(gv).shape == gamma.shape else b.initializer(gamma, "rms_scale")  # type: ignore[union-attr]
        return b.op.RMSNormalization(m[self.x], g, axis=axis, epsilon=eps)


class SkipLayerNorm(Rule):
    """LayerNormalization(Add(a, b), gamma[, beta]) over the last axis →
    com.microsoft SkipLayerNormalization(a, b, gamma[, beta], epsilon). Only with contrib-ops=1.

    When the sum is read elsewhere too (a pre-LN residual stream), those readers take
    SkipLayerNormalization's output 3 (the sum). Must not fire: contrib-ops off, a and b not of
    the same known rank-3 shape (onnxruntime takes [batch, seq, hidden]), gamma/beta not 1-D of
    the hidden size, LayerNormalization not over the last axis, its Mean/InvStdDev outputs used,
    stash_type not 1, the sum a graph output or read before the LayerNormalization (or in another
    graph), dtype not float/float16.
    """

    name = "skip-layer-norm"
    allow_shared = True
    a, b = P.any(), P.any()
    add = P.op("Add", a, b)
    gamma, beta = P.any(), P.optional()
    pattern = P.op("LayerNormalization", add, gamma, beta)

    def check(self, m: Match) -> bool | Fail:
        ok = contrib_allowed(m)
        if not ok:
            return ok
        ln = m.root
        a, b = m[self.a], m[self.b]
        dt = float_dtype(a, frozenset({DataType.FLOAT16, DataType.FLOAT}))
        if isinstance(dt, Fail):
            return dt
        if a.shape is None or b.shape is None or a.shape.dims != b.shape.dims or len(a.shape) != 3:
            return Fail(f"the Add's operands are not of one known rank-3 shape ({a.shape}, {b.shape})")
        hidden = a.shape.dims[-1]
        if int(ln.attr("axis", -1)) not in (-1, 2):
            return Fail(f"LayerNormalization axis={ln.attr('axis')} is not the last axis")
        if int(ln.attr("stash_type", 1)) != 1:
            return Fail("LayerNormalization stash_type is not 1")
        if any(o.uses() or o.is_graph_output() for o in ln.outputs[1:]):
            return Fail("LayerNormalization's Mean/InvStdDev outputs are used")
        for what, v in (("gamma", m[self.gamma]), ("beta", m.get(self.beta))):
            if v is None:
                continue
            if v.shape is None or v.shape.dims != (hidden,):
                return Fail(f"{what} shape {v.shape} is not [{hidden}]")
        s = m.value(self.add)
        if s.is_graph_output():
            return Fail(f"the sum {s.name!r} is a graph output")
        others = [u for u, _ in s.uses() if u is not ln]
        if others:
            g = m.graph
            if any(u.graph is not g for u in others):
                return Fail("the sum is read inside a subgraph")
            after = False
            pending = set(others)
            for n in g:
                if n is ln:
                    after = True
                elif n in pending and not after:
                    return Fail(f"the sum is read by {n.label()} before the LayerNormalization")
        return True

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value:
        import_contrib(m)
        ln = m.root
        s = m.value(self.add)
        others = [(u, i) for u, i in s.uses() if u is not ln]
        inputs = [m[self.a], m[self.b], m[self.gamma], m.get(self.beta)]
        while inputs[-1] is None:
            inputs.pop()
        eps = float(ln.attr("epsilon", 1e-5))
        names = [ln.outputs[0].name + "_sln"] + (["", "", s.name + "_sum"] if others else [])
        node = b.node("SkipLayerNormalization", inputs, {"epsilon": eps}, domain=MS_DOMAIN, output_names=names)
        if others:
            total = node.outputs[3]
            total.type = s.type
            for u, i in others:
                u.replace_input_with(i, total)
        return node.outputs[0]


_PLAIN_RULES = (LayerNorm(), RmsNorm())
_CONTRIB_RULES = _PLAIN_RULES + (SkipLayerNorm(),)
for _r in _CONTRIB_RULES:
    register_rule(_r)


@register_pass
@dataclass(frozen=True)
class FuseNormalization(RewritePass):
    """Fuse LayerNormalization and RMSNormalization spelled in primitive ops into one op.

    Rules: layer-norm (opset ≥ 17), rms-norm (opset ≥ 23), and with contrib-ops=1 skip-layer-norm
    (residual Add + LayerNormalization → com.microsoft SkipLayerNormalization). Stats: rewrites
    per rule.
    """

    name: ClassVar[str] = "fuse-normalization"
    contrib_ops: bool = False

    def get_rules(self):
        return _CONTRIB_RULES if self.contrib_ops else _PLAIN_RULES

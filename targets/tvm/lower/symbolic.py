"""Symbolic shape values at lowering time: `Sym` (a shape-deciding int tensor whose elements are
ints or TIR expressions of the model's symbolic dims), evaluating shape ops on them, `materialise`
(a Sym as a constant, a ShapeExpr or a run-time tensor) and the unification of symbolic dims that
joining ops (Concat, Add, ...) prove equal (`check_unified`, `ShapeUnificationError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import tvm
import tvm.sym  # the Analyzer (0.27 moved tvm.arith to tvm.sym)
from tvm import relax

from graphopt.ir import Node

from .registry import LoweringError, const_value, relax_constant


class ShapeUnificationError(LoweringError):
    """A node needs dims of its inputs equal that are different expressions of the symbolic input
    dims (a Concat of an upsampled map with a skip connection: `((H - 3) // 8 + 1) * 2` and
    `(H - 3) // 4 + 1`); `divisors` maps each symbolic dim to the multiple that makes them equal
    expressions (the product of the floor divisions it goes through)."""

    def __init__(self, msg: str, divisors: dict[str, int]) -> None:
        super().__init__(msg)
        self.divisors = divisors


def _floordiv_multiple(e: Any, out: dict[str, int]) -> None:
    """For each var of dim expression `e`, the product of the constant floor divisors above it
    (lcm over the paths): `(H - 3) // 8 + 1` → {"H": 8}."""
    import math

    def walk(x: Any, factor: int) -> None:
        if isinstance(x, tvm.tirx.Var):
            out[x.name] = math.lcm(out.get(x.name, 1), factor)
            return
        if isinstance(x, (tvm.tirx.FloorDiv, tvm.tirx.FloorMod, tvm.tirx.Div, tvm.tirx.Mod)):
            d = x.b
            walk(x.a, factor * int(d.value) if isinstance(d, tvm.tirx.IntImm) and int(d.value) > 0 else factor)
            walk(x.b, factor)
            return
        for k in ("a", "b", "value", "condition", "true_value", "false_value"):
            sub = getattr(x, k, None)
            if isinstance(sub, tvm.ir.expr.Expr) and not isinstance(x, tvm.tirx.IntImm):
                walk(sub, factor)

    walk(e, 1)


#: ops whose output shape joins their inputs' dims (equal, or broadcast): where a strided map meets
#: an unstrided one, `check_unified` asks for multiples
JOINING_OPS = frozenset("""Concat Add Sub Mul Div Pow Max Min Sum Mean Where And Or Xor Equal Less Greater
    LessOrEqual GreaterOrEqual PRelu BitShift Mod MatMul Gemm Conv ConvInteger BatchNormalization""".split())


def check_unified(node: Node, ins: list[Any], outs: list[Any]) -> None:
    """Raise ShapeUnificationError when `node` lost its output shape (rank only) although every
    tensor input had one: Relax could not prove dims equal that the op needs equal."""
    def shaped(e: Any) -> bool:
        ty = getattr(e, "ty", None) if isinstance(e, relax.Expr) else None
        return not isinstance(ty, relax.TensorType) or isinstance(ty.shape, relax.ShapeExpr)

    if node.op_type not in JOINING_OPS or all(shaped(o) for o in outs) or not all(shaped(e) for e in ins if e is not None):
        return
    divisors: dict[str, int] = {}
    shown = []
    for e in ins:
        ty = getattr(e, "ty", None) if isinstance(e, relax.Expr) else None
        if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
            for d in ty.shape.values:
                if not isinstance(d, tvm.tirx.IntImm):
                    _floordiv_multiple(d, divisors)
            shown.append("[" + ", ".join(str(d) for d in ty.shape.values) + "]")
    if not any(m > 1 for m in divisors.values()):
        return  # (no strided map among them: not what multiples fix)
    raise ShapeUnificationError(f"node {node.label()}: {node.op_type} of inputs of shapes {', '.join(shown)} "
                                "that are not equal for every size of the symbolic dims", divisors)




@dataclass
class Sym:
    """An integer tensor of rank 0 or 1 whose elements are known expressions of the symbolic
    dims (Shape → Gather → Unsqueeze → Concat chains): evaluated here instead of computed at run
    time, so Reshape/Expand/... get a static or symbolic shape and stay kernels."""

    vals: list[Any]  # ints or tirx PrimExprs (int64)
    scalar: bool = False
    dtype: str = "int64"

    def static(self) -> np.ndarray | None:
        out: list[bool | int] = []
        for v in self.vals:
            if isinstance(v, (bool, np.bool_)):
                out.append(bool(v))
            elif isinstance(v, (int, np.integer)):
                out.append(int(v))
            elif isinstance(v, tvm.tirx.IntImm):
                out.append(int(v.value))
            else:
                return None
        arr = np.asarray(out, dtype=bool if self.dtype == "bool" else self.dtype)
        return arr.reshape(()) if self.scalar else arr


_SHAPE_CONSUMERS = {"Reshape", "Expand", "ConstantOfShape"}


def _as_sym(e: Any) -> Sym | None:
    if isinstance(e, Sym):
        return e
    v = const_value(e)
    if v is not None and v.dtype.kind in "iu" and v.ndim <= 1 and v.size <= 64:
        return Sym([int(x) for x in v.reshape(-1)], scalar=v.ndim == 0, dtype=str(v.dtype))
    return None


def sym_eval(node: Node, ins: list[Any]) -> list[Sym] | None:
    """Outputs of `node` as Syms when its inputs allow (at least one a Sym); None otherwise."""
    op = node.op_type
    if op == "Shape":
        x = ins[0]
        ty = getattr(x, "ty", None)
        if not isinstance(ty, relax.TensorType) or ty.shape is None or not isinstance(ty.shape, relax.ShapeExpr):
            return None
        dims = list(ty.shape.values)
        start, end = node.attr("start", 0), node.attr("end", None)
        return [Sym(dims[start:end])]
    if not any(isinstance(e, Sym) for e in ins):
        return None
    syms = [_as_sym(e) if e is not None else None for e in ins]
    if any(e is not None and s is None for e, s in zip(ins, syms)):
        return None
    a = syms[0]
    assert a is not None
    if op in ("Identity",):
        return [a]
    if op == "Cast":
        to = onnx.helper.tensor_dtype_to_np_dtype(node.attr("to"))
        if to.kind not in "iu":
            return None
        return [Sym(a.vals, a.scalar, str(to))]
    if op == "Gather":
        idx = syms[1]
        if idx is None or idx.static() is None or a.scalar or node.attr("axis", 0) != 0:
            return None
        n = len(a.vals)
        picked = [a.vals[int(i) + n if int(i) < 0 else int(i)] for i in idx.vals]
        return [Sym(picked, idx.scalar, a.dtype)]
    if op == "Unsqueeze":
        if not a.scalar:
            return None
        return [Sym(a.vals, False, a.dtype)]
    if op == "Squeeze":
        if a.scalar or len(a.vals) != 1:
            return None
        return [Sym(a.vals, True, a.dtype)]
    if op == "Concat":
        if any(s is None or s.scalar for s in syms):
            return None
        return [Sym([v for s in syms for v in s.vals], False, a.dtype)]
    if op == "Reshape":
        if a.scalar:
            return None
        shape = syms[1].static() if syms[1] is not None else None
        if shape is None or shape.size > 1:
            return None
        return [Sym(a.vals, shape.size == 0, a.dtype)]
    if op == "Slice" and not a.scalar:
        rest = [s.static() if s is not None else None for s in syms[1:]]
        if any(r is None for r in rest[:2]):
            return None
        if len(rest) > 2 and rest[2] is not None and list(rest[2]) not in ([0], [-1]):
            return None
        step = int(rest[3][0]) if len(rest) > 3 and rest[3] is not None else 1
        return [Sym(a.vals[slice(int(rest[0][0]), int(rest[1][0]), step)], False, a.dtype)]
    if op == "Equal" and len(syms) == 2 and syms[1] is not None:
        b = syms[1]
        la, lb = len(a.vals), len(b.vals)
        if la != lb and la != 1 and lb != 1:
            return None
        n = max(la, lb)
        pairs = zip(a.vals * n if la == 1 else a.vals, b.vals * n if lb == 1 else b.vals)
        res = [_decide_equal(_prim(x), _prim(y)) for x, y in pairs]
        if any(r is None for r in res):
            return None
        return [Sym(res, a.scalar and b.scalar, "bool")]
    if op == "Where" and len(syms) == 3 and all(x is not None for x in syms):
        c, x, y = syms
        cond = c.static()
        if cond is None:
            return None
        n = max(len(c.vals), len(x.vals), len(y.vals))
        cv = list(cond.reshape(-1)) * (n if cond.size == 1 else 1)
        xv = x.vals * n if len(x.vals) == 1 else x.vals
        yv = y.vals * n if len(y.vals) == 1 else y.vals
        if not (len(cv) == len(xv) == len(yv) == n):
            return None
        return [Sym([xi if ci else yi for ci, xi, yi in zip(cv, xv, yv)], c.scalar and x.scalar and y.scalar, x.dtype)]
    if op in ("Add", "Sub", "Mul", "Div") and len(syms) == 2 and syms[1] is not None:
        b = syms[1]
        la, lb = len(a.vals), len(b.vals)
        if la != lb and la != 1 and lb != 1:
            return None
        n = max(la, lb)
        av = a.vals * n if la == 1 else a.vals
        bv = b.vals * n if lb == 1 else b.vals
        fn = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y, "Mul": lambda x, y: x * y,
              "Div": lambda x, y: x // y if isinstance(x, int) and isinstance(y, int) else tvm.tirx.floordiv(x, y)}[op]
        vals = [_simplify(fn(_prim(x), _prim(y))) for x, y in zip(av, bv)]
        return [Sym(vals, a.scalar and b.scalar, a.dtype)]
    return None


_ANALYZER: Any = None


def _decide_equal(x: Any, y: Any) -> bool | None:
    """x == y for ints or dim expressions; None when it cannot be decided at compile time.
    Dims are never negative, so a dim never equals a negative constant (Reshape's -1)."""
    if isinstance(x, int) and isinstance(y, int):
        return x == y
    if isinstance(x, int) and x < 0 or isinstance(y, int) and y < 0:
        return False
    global _ANALYZER
    if _ANALYZER is None:
        _ANALYZER = tvm.sym.Analyzer()
    d = _ANALYZER.simplify(x - y)
    if isinstance(d, tvm.tirx.IntImm):
        return int(d.value) == 0
    return None


def _prim(v: Any) -> Any:
    return int(v) if isinstance(v, (int, np.integer)) else v


def _simplify(v: Any) -> Any:
    global _ANALYZER
    if isinstance(v, int):
        return v
    if _ANALYZER is None:
        _ANALYZER = tvm.sym.Analyzer()
    r = _ANALYZER.simplify(v)
    return int(r.value) if isinstance(r, tvm.tirx.IntImm) else r


def materialise(bb: relax.BlockBuilder, s: Sym, consumer: str) -> Any:
    """A Sym as what a converter can take: a constant when static, a ShapeExpr for shape
    consumers, else a runtime tensor."""
    arr = s.static()
    if arr is not None:
        return relax_constant(arr)
    if consumer in _SHAPE_CONSUMERS and not s.scalar:
        return relax.ShapeExpr([tvm.tirx.IntImm("int64", v) if isinstance(v, int) else v for v in s.vals])
    t = bb.emit(relax.op.shape_to_tensor(relax.ShapeExpr([tvm.tirx.IntImm("int64", v) if isinstance(v, int) else v for v in s.vals])))
    if s.dtype != "int64":
        t = bb.emit(relax.op.astype(t, s.dtype))
    if s.scalar:
        t = bb.emit(relax.op.reshape(t, []))
    return t

"""Run-time values that decide shapes or control flow, compiled ahead of time (no binding).

Two mechanisms, both compiled into the artifact before any input is seen:

- **branches**: `switch(bb, conds, branches, args)` compiles each branch as a Relax function of
  its own and emits one call of a selector function that runs `If(c0, b0, If(c1, b1, ... bN))`
  on the host at run time: only the taken branch runs. Its result is cast to fresh symbolic dims
  (`R.match_cast`), so what follows is compiled once for any of the branches' shapes. Used for
  the axes of Reduce* given as an input (one two-way branch per axis: reduce it or not) and for
  If with a run-time condition.
- **data-dependent shapes**: `shape_of_tensor(bb, t, n)` turns an int64 tensor of static length n
  computed at run time into a ShapeExpr of fresh symbolic vars (`R.tensor_to_shape` +
  `match_cast`), which ops taking a shape (reshape, broadcast_to, full, ...) use; their kernels
  get symbolic extents.

Functions made here are plain (non-primitive) Relax functions: the group holding such a node is
emitted inline into `main` (match_cast keeps it out of primitive form), and the branches' own
kernels are legalized like any other.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax

from .registry import LoweringError
from .symbolic import Sym, materialise

R = relax.op

_COUNTER = itertools.count()


def _uid(prefix: str) -> str:
    return f"{prefix}{next(_COUNTER)}"


@contextlib.contextmanager
def function_scope(bb: relax.BlockBuilder, name: str, params: Sequence[Any], attrs: dict[str, Any] | None = None,
                   private: bool = False) -> Iterator[None]:
    """`bb.function(...)` that leaves the builder closed when the body raises: TVM's scope then
    leaves its binding block and variable scope open, and the builder prints "BlockBuilder
    destroyed with remaining blocks!" on stderr when it is collected (a second line after the
    error graphopt reports)."""
    try:
        with bb.function(name, list(params), attrs, private=private):
            yield
    except BaseException:
        for close in (bb._end_block, bb.end_scope):  # whichever is still open (TVM keeps no count we can read)
            try:
                close()
            except Exception:  # noqa: BLE001 - already closed
                pass
        raise


def fresh_dims(ty: relax.TensorType, prefix: str = "dyn") -> list[Any]:
    """The dims of `ty` with every non-constant one replaced by a new symbolic var (a function
    may not share symbolic vars with another)."""
    if not isinstance(ty.shape, relax.ShapeExpr):
        return [tvm.tirx.Var(_uid(prefix), "int64") for _ in range(ty.ndim)]
    return [int(d) if isinstance(d, tvm.tirx.IntImm) else tvm.tirx.Var(_uid(prefix), "int64") for d in ty.shape.values]


def _fresh_type(ty: Any, prefix: str) -> Any:
    if isinstance(ty, relax.TensorType):
        if ty.ndim < 0:
            raise ValueError("a tensor of unknown rank")
        return relax.TensorType(fresh_dims(ty, prefix), ty.dtype)
    if isinstance(ty, relax.TupleType):
        return relax.TupleType([_fresh_type(f, prefix) for f in ty.fields])
    raise ValueError(f"a {type(ty).__name__} value")


def add_function(bb: relax.BlockBuilder, args: Sequence[Any], body: Callable[[relax.BlockBuilder, list[relax.Var]], Any],
                 name: str) -> tvm.ir.GlobalVar:
    """Build `body(fbb, params)` as a private Relax function taking values typed like `args`
    (fresh symbolic dims) and add it to `bb`'s module."""
    fbb = relax.BlockBuilder()
    params = [relax.Var(f"a{i}", _fresh_type(a.ty, "s")) for i, a in enumerate(args)]
    with function_scope(fbb, name, params, private=True):
        with fbb.dataflow():
            out = body(fbb, params)
            if isinstance(out, (list, tuple)):
                out = relax.Tuple(list(out))
            out = fbb.emit_output(out)
        fbb.emit_func_output(out)
    return carry_over(bb, fbb.get(), name)


def carry_over(bb: relax.BlockBuilder, sub: tvm.IRModule, name: str) -> tvm.ir.GlobalVar:
    """Add function `name` of `sub` to `bb`'s module with every other function of `sub` it may
    call (emit_te PrimFuncs, nested branch functions), calls pointed at their new GlobalVars."""
    table: dict[Any, Any] = {}
    for gv in sub.get_global_vars():
        if gv.name_hint != name:
            table[gv] = bb.add_func(sub[gv], gv.name_hint)

    @relax.expr_functor.mutator
    class _M(relax.PyExprMutator):
        def visit_global_var_(self, op: tvm.ir.GlobalVar) -> relax.Expr:  # noqa: N802
            return table.get(op, op)

    for gv, new_gv in table.items():
        f = sub[gv]
        if isinstance(f, relax.Function):
            bb.update_func(new_gv, _M().visit_expr(f))
    func = sub[name]
    return bb.add_func(_M().visit_expr(func) if table else func, name)


def _join(types: list[Any]) -> Any:
    """The most precise type covering every branch's: equal static dims kept, others fresh."""
    t0 = types[0]
    if isinstance(t0, relax.TensorType):
        if any(not isinstance(t, relax.TensorType) or t.ndim != t0.ndim or t.dtype != t0.dtype for t in types):
            raise ValueError("branches give tensors of different rank or element type")
        dims: list[Any] = []
        for i in range(t0.ndim):
            vals = set()
            for t in types:
                d = t.shape.values[i] if isinstance(t.shape, relax.ShapeExpr) else None
                vals.add(int(d) if isinstance(d, tvm.tirx.IntImm) else None)
            v = vals.pop() if len(vals) == 1 else None
            dims.append(v if v is not None else tvm.tirx.Var(_uid("j"), "int64"))
        return relax.TensorType(dims, t0.dtype)
    if isinstance(t0, relax.TupleType):
        if any(not isinstance(t, relax.TupleType) or len(t.fields) != len(t0.fields) for t in types):
            raise ValueError("branches give tuples of different length")
        return relax.TupleType([_join([t.fields[i] for t in types]) for i in range(len(t0.fields))])
    raise ValueError(f"a branch gives a {type(t0).__name__}")


def _bool_scalar(bb: relax.BlockBuilder, c: Any) -> Any:
    if str(c.ty.dtype) != "bool":
        c = bb.emit(R.not_equal(c, relax.const(np.array(0, dtype=str(c.ty.dtype)), str(c.ty.dtype))))
    if c.ty.ndim != 0:
        c = bb.emit(R.reshape(c, []))
    return c


def switch(bb: relax.BlockBuilder, conds: Sequence[Any], branches: Sequence[Callable[[relax.BlockBuilder, list[relax.Var]], Any]],
           args: Sequence[Any], name: str = "switch") -> Any:
    """Run branches[i] for the first true conds[i] (the last branch when none is: len(conds) ==
    len(branches) - 1), chosen at run time; each branch is `fn(fbb, params)` over `args`. Returns
    the result in `bb`, cast to the join of the branches' types (symbolic where they differ)."""
    assert len(conds) == len(branches) - 1
    base = _uid(name)
    gvs = [add_function(bb, args, fn, f"{base}_b{i}") for i, fn in enumerate(branches)]
    mod = bb.get()
    joined = _join([mod[gv].ret_ty for gv in gvs])
    if len(gvs) == 1:
        out = bb.emit(relax.Call(gvs[0], list(args)))
    else:
        cparams = [relax.Var(f"c{i}", relax.TensorType([], "bool")) for i in range(len(conds))]
        aparams = [relax.Var(f"a{i}", _fresh_type(a.ty, "s")) for i, a in enumerate(args)]
        sbb = relax.BlockBuilder()
        with function_scope(sbb, f"{base}_select", cparams + aparams, private=True):
            expr: Any = relax.Call(gvs[-1], aparams)
            for i in range(len(conds) - 1, -1, -1):
                expr = relax.If(cparams[i], relax.Call(gvs[i], aparams), expr)
            res = sbb.emit(expr)
            sbb.emit_func_output(res)
        sgv = carry_over(bb, sbb.get(), f"{base}_select")
        out = bb.emit(relax.Call(sgv, [_bool_scalar(bb, c) for c in conds] + list(args)))
    if isinstance(joined, relax.TupleType):
        out = bb.match_cast(out, joined)
        return [bb.emit(relax.TupleGetItem(out, i)) for i in range(len(joined.fields))]
    return bb.match_cast(out, joined)


def shape_of_tensor(bb: relax.BlockBuilder, t: Any, n: int, prefix: str = "d") -> relax.ShapeExpr:
    """A run-time int tensor of static length n as a ShapeExpr of fresh symbolic vars."""
    if str(t.ty.dtype) != "int64":
        t = bb.emit(R.astype(t, "int64"))
    if t.ty.ndim != 1:
        t = bb.emit(R.reshape(t, [n]))
    if not (isinstance(t.ty.shape, relax.ShapeExpr) and all(isinstance(d, tvm.tirx.IntImm) for d in t.ty.shape.values)):
        t = bb.match_cast(t, relax.TensorType([n], "int64"))
    s = bb.emit(R.tensor_to_shape(t))
    dims = [tvm.tirx.Var(_uid(prefix), "int64") for _ in range(n)]
    bb.match_cast(s, relax.ShapeType(dims))
    return relax.ShapeExpr(dims)


def shape_tensor(bb: relax.BlockBuilder, x: Any) -> Any:
    """x's shape as a run-time int64 tensor [rank]."""
    return bb.emit(R.shape_to_tensor(R.shape_of(x)))


def int_consts(values: Sequence[int]) -> Any:
    return relax.const(np.asarray(values, dtype=np.int64), "int64")


def _captured(g: Any) -> list[Any]:
    """Values a subgraph (and the subgraphs inside it) reads from enclosing scopes, in order."""
    out: list[Any] = []
    seen: set[int] = set()

    def walk(graph: Any, local: set[int]) -> None:
        local = local | {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
        for n in graph.nodes:
            for v in n.inputs:
                if v is not None and id(v) not in local and id(v) not in seen:
                    seen.add(id(v))
                    out.append(v)
            for sg in n.subgraphs():
                walk(sg, local)
            local = local | {id(v) for v in n.outputs}
        for v in graph.outputs:
            if id(v) not in local and id(v) not in seen:
                seen.add(id(v))
                out.append(v)

    walk(g, set())
    return out


def runtime_if(lowerer: Any, bb: relax.BlockBuilder, node: Any, cond: Any, env: dict[Any, Any]) -> list[Any]:
    """If whose condition is computed at run time: both branches compiled (each a function over
    the outer values it reads), one run, chosen on the host (`switch`)."""

    then_g, else_g = node.attr("then_branch"), node.attr("else_branch")
    captured: list[Any] = []
    for g in (then_g, else_g):
        for v in _captured(g):
            if all(v is not c for c in captured):
                captured.append(v)
    passed: list[Any] = []  # values handed to the branches as arguments
    fixed: dict[Any, Any] = {}  # constants the branches may specialise on
    for v in captured:
        e = env.get(id(v))
        if e is None:
            continue  # an outer value no branch computes before use: _body reports it
        if isinstance(e, Sym) and e.static() is None:
            e = materialise(bb, e, "")
        if isinstance(e, Sym) or isinstance(e, tvm.ir.GenericConst):
            fixed[id(v)] = e
        elif (w := _small_weight(v)) is not None:
            # a weight the branches read: a constant of theirs, so what they do to it alone
            # (LSTM gate reorders, transposes) folds at compile time instead of running per call
            fixed[id(v)] = relax.const(w)
        else:
            passed.append((v, e))
    if isinstance(cond, Sym):
        cond = materialise(bb, cond, "")

    def branch(g: Any) -> Callable[[relax.BlockBuilder, list[relax.Var]], Any]:
        def fn(fbb: relax.BlockBuilder, params: list[relax.Var]) -> Any:
            # main's own expressions (and its symbolic dims) must not leak into another function
            sub = {k: val for k, val in env.items()
                   if isinstance(val, tvm.ir.GenericConst) or isinstance(val, Sym) and val.static() is not None}
            sub.update(fixed)
            for (v, _), p in zip(passed, params):
                sub[id(v)] = p
            outs = lowerer._body(fbb, g, [], sub)
            if len(outs) == 1:
                return outs[0]
            return [o if not isinstance(o, tvm.ir.GenericConst) else fbb.emit(o) for o in outs]

        return fn

    try:
        out = switch(bb, [cond], [branch(then_g), branch(else_g)], [e for _, e in passed], name="if_")
    except ValueError as e:
        raise LoweringError(f"node {node.label()}: If with a run-time condition: {e}") from None
    return out if isinstance(out, list) else [out]


#: captured initializers up to this size become constants of the branches that read them
BRANCH_CONST_BYTES = 1 << 20


def _small_weight(v: Any) -> np.ndarray | None:
    from graphopt.ir.query import const_array, is_constant

    if not is_constant(v):
        return None
    a = const_array(v)
    return a if a is not None and a.nbytes <= BRANCH_CONST_BYTES and a.dtype.kind in "fiub" else None


def _rank_only(ty: Any) -> Any:
    """`ty` with its dims forgotten (rank and element type kept): the type of loop state, whose
    dims may change from one iteration to the next."""
    if isinstance(ty, relax.TensorType):
        return relax.TensorType(ndim=ty.ndim, dtype=ty.dtype)
    raise ValueError(f"loop state of type {type(ty).__name__}")


def runtime_loop(lowerer: Any, bb: relax.BlockBuilder, node: Any, ins: list[Any], env: dict[Any, Any]) -> list[Any]:
    """Loop whose trip count or condition is known only at run time: a recursive Relax function
    `L(i, M, cond, v..., scans..., captured...)` = If(i < M and cond, T(...), (v..., scans...)),
    where T runs the body once (its own compiled function) and calls L again with i + 1, the
    body's condition and values, and each scan output appended to its accumulator. The loop
    state is typed by rank only (dims may change between iterations); what L returns is cast to
    fresh symbolic dims in `bb`."""

    body = node.attr("body")
    ins = [materialise(bb, e, "") if isinstance(e, Sym) else e for e in ins]
    trip = ins[0] if ins else None
    cond = ins[1] if len(ins) > 1 else None
    carried = list(ins[2:])
    n_car = len(carried)
    n_scan = len(body.outputs) - 1 - n_car
    captured, passed, fixed = [], [], {}
    for v in _captured(body):
        e = env.get(id(v))
        if e is None:
            continue
        if isinstance(e, Sym) and e.static() is None:
            e = materialise(bb, e, "")
        if isinstance(e, (Sym, tvm.ir.GenericConst)):
            fixed[id(v)] = e
        else:
            captured.append(v)
            passed.append(e)
    i64, b = "int64", "bool"
    i0 = relax.const(np.array(0, dtype=np.int64), i64)
    m = bb.emit(R.reshape(R.astype(trip, i64), [])) if trip is not None else relax.const(np.array(np.iinfo(np.int64).max), i64)
    c0 = bb.emit(R.reshape(R.astype(cond, b), [])) if cond is not None else relax.const(np.array(True), b)

    def const_env() -> dict[Any, Any]:
        sub = {k: val for k, val in env.items()
               if isinstance(val, tvm.ir.GenericConst) or isinstance(val, Sym) and val.static() is not None}
        sub.update(fixed)
        return sub

    # the body once, as a function of (i, cond, v..., captured...)
    def body_fn(fbb: relax.BlockBuilder, params: list[relax.Var]) -> Any:
        sub = const_env()
        for v, p in zip(captured, params[2 + n_car:]):
            sub[id(v)] = p
        outs = lowerer._body(fbb, body, params[: 2 + n_car], sub)
        return [o if not isinstance(o, tvm.ir.GenericConst) else fbb.emit(o) for o in outs]

    base = _uid("loop_")
    try:
        probe = [i0, c0] + carried + passed
        b_gv = add_function(bb, probe, body_fn, f"{base}_body")
    except ValueError as e:
        raise LoweringError(f"node {node.label()}: Loop with a run-time trip count or condition: {e}") from None
    ret = bb.get()[b_gv].ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    scan_tys = fields[1 + n_car:]
    acc0, lazy = [], []  # lazy: dims unknown until the first iteration, which starts the accumulator
    for t in scan_tys:
        dims = t.shape.values if isinstance(t.shape, relax.ShapeExpr) else None
        static = dims is not None and all(isinstance(d, tvm.tirx.IntImm) for d in dims)
        lazy.append(not static)
        shape = [0] + ([int(d) for d in dims] if static else [0] * t.ndim)
        acc0.append(relax.const(np.zeros(shape, dtype=str(t.dtype)), str(t.dtype)))
    state_tys = [_rank_only(f) for f in fields[1 : 1 + n_car]] + [relax.TensorType(ndim=t.ndim + 1, dtype=t.dtype) for t in scan_tys]
    cap_tys = [_rank_only(e.ty) for e in passed]
    scalar = [relax.TensorType([], i64), relax.TensorType([], i64), relax.TensorType([], b)]
    ret_ty = relax.TupleType(state_tys)

    def params() -> list[relax.Var]:
        return [relax.Var(f"p{i}", t) for i, t in enumerate(scalar + state_tys + cap_tys)]

    # L declared first (a placeholder body of its return type), so T can call it
    lp = params()
    pbb = relax.BlockBuilder()
    with function_scope(pbb, f"{base}_L", lp, private=True):
        pbb.emit_func_output(pbb.emit(relax.Tuple(lp[3 : 3 + len(state_tys)])))
    l_gv = bb.add_func(pbb.get()[f"{base}_L"], f"{base}_L")

    # T: one iteration, then L again
    tp = params()
    tbb = relax.BlockBuilder()
    with function_scope(tbb, f"{base}_T", tp, private=True):
        i, mm, c = tp[0], tp[1], tp[2]
        state = tp[3 : 3 + len(state_tys)]
        caps = tp[3 + len(state_tys):]
        # dims known again for the kernels inside the body
        typed = [tbb.match_cast(s, relax.TensorType(fresh_dims(s.ty), s.ty.dtype)) for s in list(state[:n_car]) + list(caps)]
        r = tbb.emit(relax.Call(b_gv, [i, c] + typed[:n_car] + typed[n_car:]))
        outs = [tbb.emit(relax.TupleGetItem(r, j)) for j in range(1 + n_car + n_scan)] if isinstance(r.ty, relax.TupleType) else [r]
        c2 = tbb.emit(R.reshape(R.astype(outs[0], b), []))
        new_state = list(outs[1 : 1 + n_car])
        for j in range(n_scan):
            item = outs[1 + n_car + j]
            if not lazy[j]:  # the accumulator's trailing dims are the item's (static) ones
                acc = tbb.match_cast(state[n_car + j], relax.TensorType([tvm.tirx.Var(_uid("n"), "int64")] + list(item.ty.shape.values),
                                                                        item.ty.dtype))
                new_state.append(tbb.emit(R.concat([acc, R.expand_dims(item, [0])], axis=0)))
                continue
            acc = tbb.match_cast(state[n_car + j], relax.TensorType(fresh_dims(state[n_car + j].ty), state[n_car + j].ty.dtype))
            item = tbb.match_cast(item, relax.TensorType(fresh_dims(item.ty), item.ty.dtype))
            first = tbb.emit(R.equal(i, relax.const(np.array(0, dtype=np.int64), i64)))
            grown = switch(tbb, [first], [lambda fb, p: fb.emit(R.expand_dims(p[1], [0])),
                                          lambda fb, p: fb.emit(R.concat([p[0], R.expand_dims(
                                              fb.match_cast(p[1], relax.TensorType(list(p[0].ty.shape.values[1:]), p[1].ty.dtype)),
                                              [0])], axis=0))],
                           [acc, item], name=f"{base}_scan{j}_")
            new_state.append(grown)
        i2 = tbb.emit(R.add(i, relax.const(np.array(1, dtype=np.int64), i64)))
        res = tbb.emit(relax.Call(l_gv, [i2, mm, c2] + new_state + list(caps)))
        tbb.emit_func_output(res)
    t_gv = carry_over(bb, tbb.get(), f"{base}_T")

    # L: If(i < M and cond, T(...), state)
    lp = params()
    lbb = relax.BlockBuilder()
    with function_scope(lbb, f"{base}_L", lp, private=True):
        go = lbb.emit(R.logical_and(R.less(lp[0], lp[1]), lp[2]))
        out = lbb.emit(relax.If(go, relax.Call(t_gv, list(lp)), relax.Tuple(lp[3 : 3 + len(state_tys)])))
        lbb.emit_func_output(out)
    func = lbb.get()[f"{base}_L"]
    bb.update_func(l_gv, relax.Function(func.params, func.body, ret_ty, func.is_pure, func.attrs))

    res = bb.emit(relax.Call(l_gv, [i0, m, c0] + carried + acc0 + passed))
    res = bb.match_cast(res, relax.TupleType([relax.TensorType(fresh_dims(t), t.dtype) for t in state_tys]))
    return [bb.emit(relax.TupleGetItem(res, j)) for j in range(len(state_tys))]

"""RNN, GRU and LSTM: one kernel looping over the (possibly symbolic) sequence length
(`kernels.recurrent`); the unrolled form for sequences up to UNROLL_STEPS (0 now: crnn_dyn's
40-step BiLSTM unrolled into one kernel of generic schedule and a 230 s compile on a loaded
2-core box).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax

from graphopt.ir import Node

from .common import R, dtype_of, scalar_const, slice_axis, static_dims, str_attr
from ..registry import LoweringError, const_value, converter, dims_of


_ACTS = {"sigmoid", "tanh", "relu", "affine", "leakyrelu", "thresholdedrelu", "scaledtanh", "hardsigmoid", "elu", "softsign", "softplus"}


def _act(name: str, x: Any, alpha: float | None, beta: float | None, dtype: str) -> Any:
    n = name.lower()
    if n == "sigmoid":
        return R.sigmoid(x)
    if n == "tanh":
        return R.tanh(x)
    if n == "relu":
        return R.nn.relu(x)
    if n == "affine":
        return R.add(R.multiply(x, scalar_const(alpha if alpha is not None else 1.0, dtype)), scalar_const(beta or 0.0, dtype))
    if n == "leakyrelu":
        return R.nn.leakyrelu(x, alpha if alpha is not None else 0.01)
    if n == "thresholdedrelu":
        return R.where(R.greater(x, scalar_const(alpha if alpha is not None else 1.0, dtype)), x, scalar_const(0, dtype))
    if n == "scaledtanh":
        return R.multiply(R.tanh(R.multiply(x, scalar_const(beta if beta is not None else 1.0, dtype))), scalar_const(alpha if alpha is not None else 1.0, dtype))
    if n == "hardsigmoid":
        y = R.add(R.multiply(x, scalar_const(alpha if alpha is not None else 0.2, dtype)), scalar_const(beta if beta is not None else 0.5, dtype))
        return R.clip(y, 0.0, 1.0)
    if n == "elu":
        a = alpha if alpha is not None else 1.0
        return R.where(R.greater(x, scalar_const(0, dtype)), x, R.multiply(scalar_const(a, dtype), R.subtract(R.exp(x), scalar_const(1, dtype))))
    if n == "softsign":
        return R.divide(x, R.add(scalar_const(1, dtype), R.abs(x)))
    if n == "softplus":
        return R.log(R.add(scalar_const(1, dtype), R.exp(x)))
    raise LoweringError(f"activation {name!r} is not supported by the cpu target")


def _rnn_common(bb: relax.BlockBuilder, node: Node, ins: list[Any], gates: int, default_acts: list[str]) -> dict[str, Any]:
    """What LSTM, GRU and RNN share: layout, sizes, directions, per-direction activations,
    bias split, initial states, checks on sequence_lens (static full lengths only)."""
    x, w, r = ins[0], ins[1], ins[2]
    b = ins[3] if len(ins) > 3 else None
    seq_lens = ins[4] if len(ins) > 4 else None
    layout = node.attr("layout", 0)
    if layout:
        x = bb.emit(R.permute_dims(x, [1, 0, 2]))
    t, batch, _ = dims_of(x)  # (T and B may be symbolic: `kernels.recurrent` loops over T inside one kernel)
    dirs, gh, _ = static_dims(node, w, "weight")
    hidden = node.attr("hidden_size") or gh // gates
    direction = str_attr(node, "direction", "forward")
    lens = None  # per-batch lengths other than the full one: steps at or past a length keep the state
    if seq_lens is not None:
        v = const_value(seq_lens)
        if v is None or not isinstance(t, int) or not np.all(v == t):
            lens = bb.emit(R.reshape(R.astype(seq_lens, "int64"), [batch, 1]))
    acts = [a.decode() if isinstance(a, bytes) else a for a in (node.attr("activations") or [])] or default_acts * dirs
    alphas = list(node.attr("activation_alpha") or [])
    betas = list(node.attr("activation_beta") or [])
    per = len(default_acts)
    for a in acts:
        if a.lower() not in _ACTS:
            raise LoweringError(f"node {node.label()}: activation {a!r} is not supported by the cpu target")
    return {"x": x, "w": w, "r": r, "b": b, "t": t, "batch": batch, "dirs": dirs, "hidden": hidden,
            "direction": direction, "acts": acts, "alphas": alphas, "betas": betas, "per": per, "layout": layout,
            "clip": node.attr("clip"), "lens": lens}


def _dir_slice(bb: relax.BlockBuilder, e: Any, d: int) -> Any:
    return bb.emit(R.squeeze(slice_axis(bb, e, 0, d, d + 1), [0]))


def _act_specs(c: dict[str, Any], d: int) -> list[tuple[str, float | None, float | None]]:
    """Direction d's activations as (name, alpha, beta); activation_alpha/beta are consumed in
    order by the activations that take them (as onnxruntime reads them)."""
    takes_alpha = {"affine", "leakyrelu", "thresholdedrelu", "scaledtanh", "hardsigmoid", "elu"}
    takes_beta = {"affine", "scaledtanh", "hardsigmoid"}
    per, specs, ai, bi = c["per"], [], 0, 0
    for k, name in enumerate(c["acts"]):
        a = bt = None
        if name.lower() in takes_alpha and ai < len(c["alphas"]):
            a, ai = c["alphas"][ai], ai + 1
        if name.lower() in takes_beta and bi < len(c["betas"]):
            bt, bi = c["betas"][bi], bi + 1
        if d * per <= k < (d + 1) * per:
            specs.append((name, a, bt))
    return specs


def _acts_of(c: dict[str, Any], d: int, dtype: str) -> list[Any]:
    """Direction d's activation functions (Relax)."""
    return [lambda e, n=n, a=a, bt=bt: _act(n, e, a, bt, dtype) for n, a, bt in _act_specs(c, d)]


def _clip(c: dict[str, Any], e: Any, dtype: str) -> Any:
    if c["clip"] is None:
        return e
    v = float(c["clip"])
    return R.clip(e, -v, v)


def _rnn_outputs(bb: relax.BlockBuilder, c: dict[str, Any], ys: list[list[Any]], finals: list[list[Any]]) -> list[Any]:
    """Y [T, dirs, B, H] (layout 0) or [B, T, dirs, H] (layout 1) and the final states
    [dirs, B, H] (layout 0) or [B, dirs, H]."""
    per_dir = [bb.emit(R.stack(y, axis=0)) for y in ys]  # [T, B, H] each
    y = bb.emit(R.stack(per_dir, axis=1))  # [T, dirs, B, H]
    if c["layout"]:
        y = bb.emit(R.permute_dims(y, [2, 0, 1, 3]))
    outs = [y]
    for states in finals:
        s = bb.emit(R.stack(states, axis=0))  # [dirs, B, H]
        if c["layout"]:
            s = bb.emit(R.permute_dims(s, [1, 0, 2]))
        outs.append(s)
    return outs


def _initial(bb: relax.BlockBuilder, c: dict[str, Any], e: Any, d: int, dtype: str) -> Any:
    if e is None:
        return bb.emit(R.zeros((c["batch"], c["hidden"]), dtype))
    if c["layout"]:
        e = bb.emit(R.permute_dims(e, [1, 0, 2]))
    return _dir_slice(bb, e, d)


def _directions(c: dict[str, Any]) -> list[bool]:
    """Per direction index: whether it runs backwards in time."""
    if c["direction"] == "bidirectional":
        return [False, True]
    return [c["direction"] == "reverse"]


#: sequences up to this many steps are unrolled (one kernel per step and op, which fuse with their
#: neighbours); longer or symbolic ones run as one looping kernel (`kernels.recurrent`)
UNROLL_STEPS = 0


def _input_projection(bb: relax.BlockBuilder, x: Any, wt: Any, t: Any, batch: Any, n_in: int, cols: int, dtype: str) -> Any:
    """X [T, B, I] x Wᵀ [I, cols] -> [T, B, cols]. With knob `flat_recurrent_rows`: the matmul on
    X viewed as [T*B, I] (reshapes are views), the row count a fresh symbolic var where T or B is
    symbolic (match_cast): one symbolic row axis, so the matmul schedule tiles the T*B rows with its
    register tiles (shifted at the end). As [T, B, I] it had two symbolic row axes and took one-row
    tiles over B (crnn_dyn at B = 1: 1 row x 2 vectors per tile, 32 dependent FMAs each). Off, or
    a rank other than 3: the [T, B, I] matmul, as before."""
    from tvm import tirx

    from ...schedules import knobs

    if not knobs.current().flat_recurrent_rows or len(dims_of(x)) != 3:
        return bb.emit(R.matmul(x, wt))
    if isinstance(t, int) and isinstance(batch, int):
        return bb.emit(R.reshape(bb.emit(R.matmul(bb.emit(R.reshape(x, [t * batch, n_in])), wt)), [t, batch, cols]))
    rows = tirx.Var("rec_rows", "int64")
    x2 = bb.match_cast(_view(bb, x, [t * batch, n_in], dtype), relax.TensorType([rows, n_in], dtype))
    return _view(bb, bb.emit(R.matmul(x2, wt)), [t, batch, cols], dtype)


def _view(bb: relax.BlockBuilder, x: Any, shape: list[Any], dtype: str) -> Any:
    """`x` (contiguous) seen with `shape` (as many elements): the VM's zero-copy reshape. A Relax
    reshape between symbolic shapes whose sizes TVM cannot prove equal ([rec_rows, C] -> [T, N, C])
    legalizes to a copy kernel (RewriteDataflowReshape turns only provable ones into views)."""
    ty = relax.TensorType(shape, dtype)
    return bb.emit(relax.op.call_pure_packed("vm.builtin.reshape", x, relax.ShapeExpr(shape), ty_args=[ty]))


def _recurrent_loop(bb: relax.BlockBuilder, node: Node, ins: list[Any], c: dict[str, Any], gates: int) -> list[Any]:
    """RNN / GRU / LSTM as the input projection of every step and direction (one matmul) and
    one kernel that loops over the (possibly symbolic) sequence length (`kernels.recurrent`)."""
    from ...kernels import recurrent as RO

    op, x, dtype, hsz, dirs = node.op_type, c["x"], dtype_of(c["x"]), c["hidden"], c["dirs"]
    gh = gates * hsz
    n_in = static_dims(node, c["w"], "weight")[2]
    wt = bb.emit(R.permute_dims(R.reshape(c["w"], [dirs * gh, n_in]), [1, 0]))  # [I, D*G*H]
    xw = _input_projection(bb, x, wt, c["t"], c["batch"], n_in, dirs * gh, dtype)  # [T, B, D*G*H]
    rt = bb.emit(R.permute_dims(c["r"], [0, 2, 1]))  # [D, H, G*H]
    bias = c["b"] if c["b"] is not None else relax.const(np.zeros((dirs, 2 * gh), dtype), dtype)

    def state(i: int) -> Any:
        e = ins[i] if len(ins) > i else None
        if e is not None and c["layout"]:
            e = bb.emit(R.permute_dims(e, [1, 0, 2]))
        return e

    h0 = state(5)
    c0 = state(6) if op == "LSTM" else None
    peep = ins[7] if op == "LSTM" and len(ins) > 7 else None
    lens = bb.emit(R.astype(ins[4], "int64")) if c["lens"] is not None else None
    acts = [_act_specs(c, d) for d in range(dirs)]
    clip = float(c["clip"]) if c["clip"] is not None else None
    res = bb.emit_te(RO.recurrence, op, xw, rt, bias, h0, c0, peep, lens, hidden=hsz, backwards=_directions(c),
                     acts=acts, clip=clip, input_forget=bool(node.attr("input_forget", 0)),
                     linear_before_reset=bool(node.attr("linear_before_reset", 0)), primfunc_name_hint=f"{op.lower()}_recurrence")
    call = bb.lookup_binding(res)
    gv = call.args[0]
    bb.update_func(gv, bb.get()[gv].with_attrs({"tirx.is_scheduled": True, RO.OWN_KERNEL_ATTR: f"{op} over time"}))
    outs = [bb.emit(relax.TupleGetItem(res, i)) for i in range(3 if op == "LSTM" else 2)]
    if c["layout"]:
        outs = [bb.emit(R.permute_dims(outs[0], [2, 0, 1, 3]))] + [bb.emit(R.permute_dims(o, [1, 0, 2])) for o in outs[1:]]
    return outs[: len(node.outputs)]


@converter("RNN", "GRU", "LSTM")
def _recurrent(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """RNN / GRU / LSTM unrolled over the static sequence length: the input projection of all
    steps as one matmul per direction, then per step the recurrent matmul and the gates."""
    op = node.op_type
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    default = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}[op]
    c = _rnn_common(bb, node, ins, gates, default)
    x, dtype, hsz = c["x"], dtype_of(c["x"]), c["hidden"]
    t = c["t"]
    if not isinstance(t, int) or t > UNROLL_STEPS:
        return _recurrent_loop(bb, node, ins, c, gates)
    init_h = ins[5] if len(ins) > 5 else None
    init_c = ins[6] if op == "LSTM" and len(ins) > 6 else None
    peep = ins[7] if op == "LSTM" and len(ins) > 7 else None
    ys: list[list[Any]] = []
    hs, cs = [], []
    for d, backwards in enumerate(_directions(c)):
        f = _acts_of(c, d, dtype)
        w = _dir_slice(bb, c["w"], d)  # [G*H, I]
        r = _dir_slice(bb, c["r"], d)  # [G*H, H]
        wb = rb = None
        if c["b"] is not None:
            bd = _dir_slice(bb, c["b"], d)  # [2*G*H]
            wb = slice_axis(bb, bd, 0, 0, gates * hsz)
            rb = slice_axis(bb, bd, 0, gates * hsz, 2 * gates * hsz)
        # X · Wᵀ (+ Wb) for every step at once: [T, B, G*H]
        xw = bb.emit(R.matmul(x, R.permute_dims(w, [1, 0])))
        if wb is not None:
            xw = bb.emit(R.add(xw, wb))
        rt = bb.emit(R.permute_dims(r, [1, 0]))  # [H, G*H]
        h = _initial(bb, c, init_h, d, dtype)
        cell = _initial(bb, c, init_c, d, dtype) if op == "LSTM" else None
        p = _dir_slice(bb, peep, d) if peep is not None else None
        steps = range(t - 1, -1, -1) if backwards else range(t)
        out: dict[int, Any] = {}

        def gate(a: Any, k: int) -> Any:
            return slice_axis(bb, a, 1, k * hsz, (k + 1) * hsz)

        for i in steps:
            h_prev, cell_prev = h, cell
            xt = bb.emit(R.squeeze(slice_axis(bb, xw, 0, i, i + 1), [0]))  # [B, G*H]
            if op == "GRU":
                # gates z, r, h; Rb's h part is inside the reset product with linear_before_reset
                hr = bb.emit(R.matmul(h, rt))
                if rb is not None:
                    hr_b = bb.emit(R.add(hr, rb))
                else:
                    hr_b = hr
                z = bb.emit(f[0](_clip(c, R.add(gate(xt, 0), gate(hr_b, 0)), dtype)))
                rg = bb.emit(f[0](_clip(c, R.add(gate(xt, 1), gate(hr_b, 1)), dtype)))
                if node.attr("linear_before_reset", 0):
                    hh = R.add(gate(xt, 2), R.multiply(rg, gate(hr_b, 2)))
                else:
                    rh = bb.emit(R.matmul(R.multiply(rg, h), gate(rt, 2)))
                    hh = R.add(gate(xt, 2), rh)
                    if rb is not None:
                        hh = R.add(hh, slice_axis(bb, rb, 0, 2 * hsz, 3 * hsz))
                hh = bb.emit(f[1](_clip(c, hh, dtype)))
                one = scalar_const(1, dtype)
                h = bb.emit(R.add(R.multiply(R.subtract(one, z), hh), R.multiply(z, h)))
            else:
                pre = bb.emit(R.add(xt, R.matmul(h, rt)))
                if rb is not None:
                    pre = bb.emit(R.add(pre, rb))
                if op == "RNN":
                    h = bb.emit(f[0](_clip(c, pre, dtype)))
                else:  # LSTM gates i, o, f, c; peepholes P = [Pi, Po, Pf]
                    gi, go, gf, gc = (gate(pre, k) for k in range(4))
                    if p is not None:
                        gi = R.add(gi, R.multiply(slice_axis(bb, p, 0, 0, hsz), cell))
                        gf = R.add(gf, R.multiply(slice_axis(bb, p, 0, 2 * hsz, 3 * hsz), cell))
                    ig = bb.emit(f[0](_clip(c, gi, dtype)))
                    if node.attr("input_forget", 0):
                        fg = bb.emit(R.subtract(scalar_const(1, dtype), ig))
                    else:
                        fg = bb.emit(f[0](_clip(c, gf, dtype)))
                    cc = bb.emit(f[1](_clip(c, gc, dtype)))
                    cell = bb.emit(R.add(R.multiply(fg, cell), R.multiply(ig, cc)))
                    if p is not None:
                        go = R.add(go, R.multiply(slice_axis(bb, p, 0, hsz, 2 * hsz), cell))
                    og = bb.emit(f[0](_clip(c, go, dtype)))
                    h = bb.emit(R.multiply(og, f[2](cell)))
            if c["lens"] is not None:  # a batch entry past its length: state kept, output zero
                live = bb.emit(R.less(scalar_const(i, "int64"), c["lens"]))
                out[i] = bb.emit(R.where(live, h, scalar_const(0, dtype)))
                h = bb.emit(R.where(live, h, h_prev))
                if cell is not None:
                    cell = bb.emit(R.where(live, cell, cell_prev))
                continue
            out[i] = h
        ys.append([out[i] for i in range(t)])
        hs.append(h)
        cs.append(cell)
    finals = [hs] + ([cs] if op == "LSTM" else [])
    return _rnn_outputs(bb, c, ys, finals)[: len(node.outputs)]

"""More of graphopt's own Relax converters (ops Relax's ONNX frontend lacks or gets wrong).

Registered into `converter_registry.CONVERTERS` on import (lower.py imports this module at its end). Each
converter takes (block builder, node, relax inputs (None for omitted ones), opset) and returns a
Relax expression or a list of them (one per node output), or NotImplemented to fall back to the
frontend's converter. RNN/GRU/LSTM run as one kernel looping over their sequence length, which
may be symbolic (`recurrent_ops`; the unrolled form is kept for sequences up to UNROLL_STEPS, 0
now: crnn_dyn's 40-step BiLSTM unrolled into one kernel of generic schedule and a 230 s compile of
the whole model on a loaded 2-core box); LinearAttention is unrolled over its static length.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import tvm
from tvm import relax

from graphopt.ir import Node

from .registry import CONVERTERS, LoweringError, const_value, converter, dims_of

R = relax.op


def _c(value: float | int, dtype: str) -> relax.Expr:
    return relax.const(np.array(value, dtype=dtype), dtype)


def _dt(e: Any) -> str:
    return str(e.ty.dtype)


def _static(node: Node, e: Any, what: str) -> list[int]:
    dims = dims_of(e)
    if not all(isinstance(d, int) for d in dims):
        raise LoweringError(f"node {node.label()}: {node.op_type} needs a static {what} shape on the cpu target")
    return dims


def _slice(bb: relax.BlockBuilder, x: Any, axis: int, begin: int, end: int, step: int = 1) -> Any:
    return bb.emit(R.strided_slice(x, axes=[axis], begin=[begin], end=[end], strides=[step]))


def _int_const(node: Node, e: Any, what: str) -> np.ndarray:
    v = const_value(e) if e is not None else None
    if v is None:
        raise LoweringError(f"node {node.label()}: {node.op_type} needs a constant {what} on the cpu target")
    return v


def _str_attr(node: Node, name: str, default: str) -> str:
    v = node.attr(name, default)
    return v.decode() if isinstance(v, bytes) else str(v)


# --- sequence models ------------------------------------------------------------------------------


@converter("CausalConvWithState")
def _causal_conv(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Depthwise causal conv1d over [past_state | input] (zeros when no state), optional SiLU
    (computed in float32), present_state = the last k-1 steps of the padded input."""
    x, w = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    past = ins[3] if len(ins) > 3 else None
    b, c, _ = _static(node, x, "input")
    k = _static(node, w, "weight")[2]
    dtype = _dt(x)
    act = _str_attr(node, "activation", "none")
    if past is None:
        past = bb.emit(R.zeros((b, c, k - 1), dtype))
    padded = bb.emit(R.concat([past, x], axis=2)) if k > 1 else x
    # accumulated in float32 and rounded once to the input's type (as the reference's conv)
    y = bb.emit(R.nn.conv1d(padded, w, groups=c, out_dtype="float32" if dtype == "float16" else None))
    if bias is not None:
        y = bb.emit(R.add(y, R.astype(R.reshape(bias, (1, c, 1)), _dt(y))))
    if _dt(y) != dtype:
        y = bb.emit(R.astype(y, dtype))
    if act in ("silu", "swish"):
        yf = bb.emit(R.astype(y, "float32")) if dtype != "float32" else y
        yf = bb.emit(R.multiply(yf, R.sigmoid(yf)))
        y = bb.emit(R.astype(yf, dtype)) if dtype != "float32" else yf
    elif act != "none":
        raise LoweringError(f"node {node.label()}: activation {act!r} is not one of none, silu, swish")
    total = dims_of(padded)[2]
    present = _slice(bb, padded, 2, total - (k - 1), total)
    return [y, present]


def _heads(bb: relax.BlockBuilder, x: Any, h: int) -> Any:
    """(B, T, H*D) → (B, H, T, D)."""
    b, t, hd = dims_of(x)
    return bb.emit(R.permute_dims(R.reshape(x, (b, t, h, hd // h)), [0, 2, 1, 3]))


@converter("LinearAttention")
def _linear_attention(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """LinearAttention (linear / gated / delta / gated_delta update rules), the recurrence
    unrolled over the (static) sequence length in float32, GQA by repeating the state at read."""
    q, k, v = ins[0], ins[1], ins[2]
    past = ins[3] if len(ins) > 3 else None
    decay = ins[4] if len(ins) > 4 else None
    beta = ins[5] if len(ins) > 5 else None
    rule = _str_attr(node, "update_rule", "gated_delta")
    hq, hkv = node.attr("q_num_heads"), node.attr("kv_num_heads")
    if hq is None or hkv is None:
        raise LoweringError(f"node {node.label()}: LinearAttention needs q_num_heads and kv_num_heads")
    gating, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    b, t, _ = _static(node, q, "query")
    dtype = _dt(q)
    f32 = "float32"
    dk = dims_of(q)[2] // hq
    dv = dims_of(v)[2] // hkv
    group = hq // hkv
    q4 = bb.emit(R.astype(_heads(bb, q, hq), f32))
    k4 = bb.emit(R.astype(_heads(bb, k, hkv), f32))
    v4 = bb.emit(R.astype(_heads(bb, v, hkv), f32))
    d4 = b4 = None
    if gating:
        last = dims_of(decay)[2]
        if last == hkv:
            d4 = bb.emit(R.permute_dims(R.reshape(decay, (b, t, hkv, 1)), [0, 2, 1, 3]))
        else:
            d4 = _heads(bb, decay, hkv)
        d4 = bb.emit(R.exp(R.astype(d4, f32)))
    if delta:
        last = dims_of(beta)[2]
        b4 = bb.emit(R.astype(R.permute_dims(R.reshape(beta, (b, t, last, 1)), [0, 2, 1, 3]), f32))
    state_dtype = _dt(past) if past is not None else dtype
    state = bb.emit(R.astype(past, f32)) if past is not None else bb.emit(R.zeros((b, hkv, dk, dv), f32))
    scale = node.attr("scale")
    scale = 1.0 / np.sqrt(dk) if scale is None or float(scale) == 0.0 else float(scale)
    outs = []
    for i in range(t):
        q_t, k_t, v_t = (_slice(bb, a, 2, i, i + 1) for a in (q4, k4, v4))  # (B, H, 1, D)
        if d4 is not None:
            state = bb.emit(R.multiply(state, R.permute_dims(_slice(bb, d4, 2, i, i + 1), [0, 1, 3, 2])))
        if b4 is not None:
            retrieved = bb.emit(R.matmul(k_t, state))  # (B, H, 1, dv)
            v_t = bb.emit(R.multiply(_slice(bb, b4, 2, i, i + 1), R.subtract(v_t, retrieved)))
        state = bb.emit(R.add(state, R.matmul(R.permute_dims(k_t, [0, 1, 3, 2]), v_t)))
        read = bb.emit(R.repeat(state, group, axis=1)) if group > 1 else state
        outs.append(bb.emit(R.multiply(R.matmul(q_t, read), _c(scale, f32))))
    o = bb.emit(R.concat(outs, axis=2)) if len(outs) > 1 else outs[0]
    o = bb.emit(R.reshape(R.permute_dims(o, [0, 2, 1, 3]), (b, t, hq * dv)))
    if dtype != f32:
        o = bb.emit(R.astype(o, dtype))
    present = bb.emit(R.astype(state, state_dtype)) if state_dtype != f32 else state
    return [o, present]


@converter("RotaryEmbedding")
def _rotary(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """RotaryEmbedding: rotate the first rotary_embedding_dim features of each head by the
    (position-gathered) cos/sin caches, halves or interleaved pairs."""
    x, cos, sin = ins[0], ins[1], ins[2]
    pos = ins[3] if len(ins) > 3 else None
    shape = _static(node, x, "input")
    if len(shape) == 4:
        xs = bb.emit(R.permute_dims(x, [0, 2, 1, 3]))
    else:
        nh = node.attr("num_heads")
        if not nh:
            raise LoweringError(f"node {node.label()}: RotaryEmbedding of a 3-D input needs num_heads")
        xs = bb.emit(R.reshape(x, (shape[0], shape[1], nh, shape[2] // nh)))
    head = dims_of(xs)[3]
    rd = node.attr("rotary_embedding_dim", 0) or head
    if pos is not None:
        cos = bb.emit(R.take(cos, pos, axis=0, mode="clip"))
        sin = bb.emit(R.take(sin, pos, axis=0, mode="clip"))
    cos = bb.emit(R.expand_dims(cos, 2))
    sin = bb.emit(R.expand_dims(sin, 2))
    rot = _slice(bb, xs, 3, 0, rd) if rd < head else xs
    if node.attr("interleaved", 0):
        x1, x2 = _slice(bb, rot, 3, 0, rd, 2), _slice(bb, rot, 3, 1, rd, 2)
    else:
        x1, x2 = _slice(bb, rot, 3, 0, rd // 2), _slice(bb, rot, 3, rd // 2, rd)
    real = bb.emit(R.subtract(R.multiply(cos, x1), R.multiply(sin, x2)))
    imag = bb.emit(R.add(R.multiply(sin, x1), R.multiply(cos, x2)))
    if node.attr("interleaved", 0):
        rot = bb.emit(R.reshape(R.stack([real, imag], axis=-1), dims_of(rot)))
    else:
        rot = bb.emit(R.concat([real, imag], axis=-1))
    out = bb.emit(R.concat([rot, _slice(bb, xs, 3, rd, head)], axis=-1)) if rd < head else rot
    if len(shape) == 4:
        return bb.emit(R.permute_dims(out, [0, 2, 1, 3]))
    return bb.emit(R.reshape(out, shape))


# --- simple math ------------------------------------------------------------------------------------


@converter("CumProd")
def _cumprod(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """CumProd along a constant axis; reverse by flipping around it, exclusive natively."""
    x = ins[0]
    axis = int(_int_const(node, ins[1], "axis").reshape(-1)[0])
    axis = axis + x.ty.ndim if axis < 0 else axis
    rev = bool(node.attr("reverse", 0))
    if rev:
        x = bb.emit(R.flip(x, axis))
    y = bb.emit(R.cumprod(x, axis=axis, exclusive=bool(node.attr("exclusive", 0))))
    if rev:
        y = bb.emit(R.flip(y, axis))
    return y


@converter("LpNormalization")
def _lp_norm(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """x / ||x||_p along axis (p 1 or 2)."""
    x = ins[0]
    axis = node.attr("axis", -1)
    p = node.attr("p", 2)
    if p == 1:
        n = bb.emit(R.sum(R.abs(x), axis=[axis], keepdims=True))
    elif p == 2:
        n = bb.emit(R.sqrt(R.sum(R.multiply(x, x), axis=[axis], keepdims=True)))
    else:
        raise LoweringError(f"node {node.label()}: LpNormalization with p={p} (only 1 and 2 exist)")
    return bb.emit(R.divide(x, n))


_PAIRWISE = {"Sum": R.add, "Mean": R.add, "Max": R.maximum, "Min": R.minimum}


@converter("Sum", "Mean", "Max", "Min")
def _variadic(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Sum / Mean / Max / Min(x1, ..., xn) → a chain of binary add / maximum / minimum (Mean: then
    divided by n), each broadcasting as ONNX's multidirectional broadcast does. TVM's frontend
    stacks the inputs and reduces the stack: a conv + Sum + Relu group then ran as a generic
    reduction at ~2 % of peak (ResNet-50 with Sum residuals: 1179 ms vs 186 ms with Add)."""
    xs = [x for x in ins if x is not None]
    if not xs:
        raise LoweringError(f"{node.op_type} {node.label()}: no inputs")
    op = _PAIRWISE[node.op_type]
    out = xs[0]
    for x in xs[1:]:
        if node.op_type in ("Max", "Min") and _float(x):  # NaN from either side, as onnxruntime
            out = bb.emit(R.where(R.isnan(out), out, op(out, x)))
        else:
            out = bb.emit(op(out, x))
    if node.op_type == "Mean" and len(xs) > 1:
        out = bb.emit(R.divide(out, _c(float(len(xs)), _dt(xs[0]))))
    elif len(xs) == 1:  # (a value of its own: x * 1 is exact, -0.0 and NaN included)
        out = bb.emit(R.multiply(out, _c(1, _dt(out))))
    return out


@converter("Sinh", "Cosh")
def _sinh_cosh(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """(exp(x) ∓ exp(-x)) / 2 (LLVM codegen has no sinh/cosh intrinsic)."""
    x = ins[0]
    dtype = _dt(x)
    e, ne = R.exp(x), R.exp(R.negative(x))
    s = R.subtract(e, ne) if node.op_type == "Sinh" else R.add(e, ne)
    return bb.emit(R.multiply(s, _c(0.5, dtype)))


@converter("Mish")
def _mish(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """x · tanh(softplus(x)) = x · n / (n + 2) with n = e^x (e^x + 2) (tanh(log(1 + e^x))
    written without tanh, whose fast approximation loses the relative accuracy of the small
    negative tail); x itself where e^2x would overflow (x > 20: the ratio is 1 in float32)."""
    x = ins[0]
    dtype = _dt(x)
    e = R.exp(R.minimum(x, _c(20, dtype)))
    n = R.multiply(e, R.add(e, _c(2, dtype)))
    y = R.multiply(x, R.divide(n, R.add(n, _c(2, dtype))))
    return bb.emit(R.where(R.greater(x, _c(20, dtype)), x, y))


@converter("IsInf")
def _isinf(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """IsInf with detect_positive / detect_negative."""
    x = ins[0]
    dtype = _dt(x)
    pos, neg = node.attr("detect_positive", 1), node.attr("detect_negative", 1)
    outs = []
    if pos:
        outs.append(R.equal(x, _c(np.inf, dtype)))
    if neg:
        outs.append(R.equal(x, _c(-np.inf, dtype)))
    if not outs:
        return bb.emit(R.zeros(dims_of(x), "bool"))
    return bb.emit(outs[0] if len(outs) == 1 else R.logical_or(outs[0], outs[1]))


@converter("SpaceToDepth")
def _space_to_depth(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """SpaceToDepth as reshape/transpose/reshape, DCR or CRD (opset 25's mode)."""
    x = ins[0]
    b, c, h, w = _static(node, x, "input")
    s = int(node.attr("blocksize"))
    y = R.reshape(x, (b, c, h // s, s, w // s, s))
    dcr = _str_attr(node, "mode", "DCR") == "DCR"
    y = R.permute_dims(y, [0, 3, 5, 1, 2, 4] if dcr else [0, 1, 3, 5, 2, 4])
    return bb.emit(R.reshape(y, (b, c * s * s, h // s, w // s)))


@converter("Elu")
def _elu(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """x if x > 0 else alpha · (exp(x) - 1), in the input's dtype."""
    x = ins[0]
    dtype = _dt(x)
    a = _c(float(node.attr("alpha", 1.0)), dtype)
    return bb.emit(R.where(R.greater(x, _c(0, dtype)), x, R.multiply(a, R.subtract(R.exp(x), _c(1, dtype)))))


@converter("Pow")
def _pow(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Integer bases: computed in float64 and cast back (Relax's power is float-only); float
    bases with an exponent of another type: the exponent cast to the base's type."""
    x, y = ins[0], ins[1]
    dx, dy = _dt(x), _dt(y)
    if dx.startswith("float") and dx == dy:
        return NotImplemented
    if dx.startswith("float"):
        return bb.emit(R.power(x, R.astype(y, dx)))
    out = R.power(R.astype(x, "float64"), R.astype(y, "float64"))
    return bb.emit(R.astype(R.round(out), dx))


@converter("DepthToSpace")
def _depth_to_space(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """DepthToSpace DCR / CRD as reshape/transpose/reshape."""
    x = ins[0]
    b, c, h, w = _static(node, x, "input")
    s = int(node.attr("blocksize"))
    if _str_attr(node, "mode", "DCR") == "DCR":
        y = R.permute_dims(R.reshape(x, (b, s, s, c // (s * s), h, w)), [0, 3, 4, 1, 5, 2])
    else:
        y = R.permute_dims(R.reshape(x, (b, c // (s * s), s, s, h, w)), [0, 1, 4, 2, 5, 3])
    return bb.emit(R.reshape(y, (b, c // (s * s), h * s, w * s)))


def _onnx_dtype(code: int) -> str:
    dt = onnx.helper.tensor_dtype_to_np_dtype(code)
    return "bool" if dt == np.bool_ else str(dt)


# --- recurrent layers, unrolled -------------------------------------------------------------------

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
        return R.add(R.multiply(x, _c(alpha if alpha is not None else 1.0, dtype)), _c(beta or 0.0, dtype))
    if n == "leakyrelu":
        return R.nn.leakyrelu(x, alpha if alpha is not None else 0.01)
    if n == "thresholdedrelu":
        return R.where(R.greater(x, _c(alpha if alpha is not None else 1.0, dtype)), x, _c(0, dtype))
    if n == "scaledtanh":
        return R.multiply(R.tanh(R.multiply(x, _c(beta if beta is not None else 1.0, dtype))), _c(alpha if alpha is not None else 1.0, dtype))
    if n == "hardsigmoid":
        y = R.add(R.multiply(x, _c(alpha if alpha is not None else 0.2, dtype)), _c(beta if beta is not None else 0.5, dtype))
        return R.clip(y, 0.0, 1.0)
    if n == "elu":
        a = alpha if alpha is not None else 1.0
        return R.where(R.greater(x, _c(0, dtype)), x, R.multiply(_c(a, dtype), R.subtract(R.exp(x), _c(1, dtype))))
    if n == "softsign":
        return R.divide(x, R.add(_c(1, dtype), R.abs(x)))
    if n == "softplus":
        return R.log(R.add(_c(1, dtype), R.exp(x)))
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
    t, batch, _ = dims_of(x)  # (T and B may be symbolic: `recurrent_ops` loops over T inside one kernel)
    dirs, gh, _ = _static(node, w, "weight")
    hidden = node.attr("hidden_size") or gh // gates
    direction = _str_attr(node, "direction", "forward")
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
    return bb.emit(R.squeeze(_slice(bb, e, 0, d, d + 1), [0]))


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
#: neighbours); longer or symbolic ones run as one looping kernel (`recurrent_ops`)
UNROLL_STEPS = 0


def _recurrent_loop(bb: relax.BlockBuilder, node: Node, ins: list[Any], c: dict[str, Any], gates: int) -> list[Any]:
    """RNN / GRU / LSTM as the input projection of every step and direction (one matmul) and
    one kernel that loops over the (possibly symbolic) sequence length (`recurrent_ops`)."""
    from ..kernels import recurrent as RO

    op, x, dtype, hsz, dirs = node.op_type, c["x"], _dt(c["x"]), c["hidden"], c["dirs"]
    gh = gates * hsz
    n_in = _static(node, c["w"], "weight")[2]
    wt = bb.emit(R.permute_dims(R.reshape(c["w"], [dirs * gh, n_in]), [1, 0]))  # [I, D*G*H]
    xw = bb.emit(R.matmul(x, wt))  # [T, B, D*G*H]
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
    x, dtype, hsz = c["x"], _dt(c["x"]), c["hidden"]
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
            wb = _slice(bb, bd, 0, 0, gates * hsz)
            rb = _slice(bb, bd, 0, gates * hsz, 2 * gates * hsz)
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
            return _slice(bb, a, 1, k * hsz, (k + 1) * hsz)

        for i in steps:
            h_prev, cell_prev = h, cell
            xt = bb.emit(R.squeeze(_slice(bb, xw, 0, i, i + 1), [0]))  # [B, G*H]
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
                        hh = R.add(hh, _slice(bb, rb, 0, 2 * hsz, 3 * hsz))
                hh = bb.emit(f[1](_clip(c, hh, dtype)))
                one = _c(1, dtype)
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
                        gi = R.add(gi, R.multiply(_slice(bb, p, 0, 0, hsz), cell))
                        gf = R.add(gf, R.multiply(_slice(bb, p, 0, 2 * hsz, 3 * hsz), cell))
                    ig = bb.emit(f[0](_clip(c, gi, dtype)))
                    if node.attr("input_forget", 0):
                        fg = bb.emit(R.subtract(_c(1, dtype), ig))
                    else:
                        fg = bb.emit(f[0](_clip(c, gf, dtype)))
                    cc = bb.emit(f[1](_clip(c, gc, dtype)))
                    cell = bb.emit(R.add(R.multiply(fg, cell), R.multiply(ig, cc)))
                    if p is not None:
                        go = R.add(go, R.multiply(_slice(bb, p, 0, hsz, 2 * hsz), cell))
                    og = bb.emit(f[0](_clip(c, go, dtype)))
                    h = bb.emit(R.multiply(og, f[2](cell)))
            if c["lens"] is not None:  # a batch entry past its length: state kept, output zero
                live = bb.emit(R.less(_c(i, "int64"), c["lens"]))
                out[i] = bb.emit(R.where(live, h, _c(0, dtype)))
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


# --- Resize -------------------------------------------------------------------------------------------


def _resize_plan(node: Node, shape: list[int], roi: np.ndarray | None, scales: np.ndarray | None,
                 sizes: np.ndarray | None, overrides: dict[str, Any] | None = None) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
    """Per resized axis: (axis, weights [out, in] in float64, extrapolated rows mask or None).

    The weights are onnx's reference interpolation (separable, one axis at a time) applied to an
    identity matrix at compile time, so every mode, coordinate transformation, nearest rounding,
    cubic coefficient, exclude_outside, antialias and keep_aspect_ratio policy means exactly what
    the reference says; the data itself is resized by the compiled kernels."""
    from onnx.reference.ops import op_resize as ref

    over = overrides or {}

    def attr(name: str, default: Any = None) -> Any:
        return over[name] if name in over else node.attr(name, default)

    def sattr(name: str, default: str) -> str:
        v = attr(name, default)
        return v.decode() if isinstance(v, bytes) else str(v)

    r = len(shape)
    axes = [a + r if a < 0 else a for a in (attr("axes") or range(r))]
    mode = sattr("mode", "nearest")
    antialias = bool(attr("antialias", 0))
    a_coef = float(attr("cubic_coeff_a", -0.75))
    if mode == "nearest":
        nmode = sattr("nearest_mode", "round_prefer_floor")

        def fct(x: float, scale: float) -> np.ndarray:
            return ref._nearest_coeffs(x, mode=nmode)
    elif mode == "cubic":
        cub = ref._cubic_coeffs_antialias if antialias else ref._cubic_coeffs

        def fct(x: float, scale: float) -> np.ndarray:
            return cub(x, scale, A=a_coef)
    else:
        fct = ref._linear_coeffs_antialias if antialias else ref._linear_coeffs
    full_scale = [1.0] * r
    full_size = list(shape)
    if sizes is not None and sizes.size:
        for i, d in enumerate(axes):
            full_size[d] = int(sizes[i])
        full_scale = [full_size[i] / shape[i] for i in range(r)]
        policy = sattr("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            s = (min if policy == "not_larger" else max)(full_scale[d] for d in axes)
            full_scale = [s if i in axes else 1.0 for i in range(r)]
            full_size = [int(s * shape[i] + 0.5) if i in axes else shape[i] for i in range(r)]
    elif scales is not None and scales.size:
        for i, d in enumerate(axes):
            full_scale[d] = float(scales[i])
        full_size = [int(full_scale[i] * shape[i]) for i in range(r)]
    else:
        raise LoweringError(f"node {node.label()}: Resize needs scales or sizes")
    full_roi = None
    if roi is not None and roi.size:
        full_roi = [0.0] * r + [1.0] * r
        n = len(axes)
        for i, d in enumerate(axes):
            full_roi[d], full_roi[r + d] = float(roi[i]), float(roi[n + i])
    ctm = sattr("coordinate_transformation_mode", "half_pixel")
    plan = []
    for d in range(r):
        same_roi = full_roi is None or (full_roi[d] == 0.0 and full_roi[d + r] == 1.0)
        if abs(full_scale[d] - 1.0) < 1e-9 and full_size[d] == shape[d] and same_roi:
            continue
        eye = np.eye(shape[d], dtype=np.float64)
        w = ref._interpolate_1d_along_axis(
            eye, 0, float(full_scale[d]), int(full_size[d]), fct,
            roi=None if full_roi is None else [full_roi[d], full_roi[d + r]],
            extrapolation_value=np.nan, coordinate_transformation_mode=ctm, exclude_outside=bool(attr("exclude_outside", 0)))
        rows = np.isnan(w).any(axis=1)
        plan.append((d, np.nan_to_num(w, nan=0.0), rows if rows.any() else None))
    return plan


def _along(bb: relax.BlockBuilder, x: Any, axis: int, fn: Any) -> Any:
    """Apply fn (acting on the last axis) to `axis` of x."""
    r = x.ty.ndim
    if axis == r - 1:
        return fn(x)
    perm = [i for i in range(r) if i != axis] + [axis]
    inv = [perm.index(i) for i in range(r)]
    y = fn(bb.emit(R.permute_dims(x, perm)))
    return bb.emit(R.permute_dims(y, inv))


@converter("Resize")
def _resize(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Resize with constant roi/scales/sizes: per resized axis a gather (nearest) or a matmul
    with the interpolation weights (linear, cubic, antialias), then the extrapolation value
    where tf_crop_and_resize samples outside the input."""
    if opset < 11:
        return NotImplemented
    x = ins[0]
    consts = []
    for e in ins[1:4]:
        if e is None:
            consts.append(None)
            continue
        v = const_value(e)
        if v is None:
            raise LoweringError(f"node {node.label()}: Resize with run-time roi/scales/sizes is not supported by the cpu target (they decide the output shape)")
        consts.append(np.asarray(v))
    while len(consts) < 3:
        consts.append(None)
    if not all(isinstance(d, int) for d in dims_of(x)) or (
            _str_attr(node, "mode", "nearest") == "linear" and _resize_direct(node, consts[0]) and _dt(x).startswith("float")):
        # (static linear too: the weight-matrix form below runs as a reduction, a generic
        # schedule: the detector's 2x upsampling of 32 x 16 x 16, 15 ms vs 0.75 ms)
        return _resize_symbolic(bb, node, x, *consts)
    shape = _static(node, x, "input")
    try:
        plan = _resize_plan(node, shape, *consts)
    except (ImportError, AttributeError):  # onnx's reference moved: the frontend's converter
        return NotImplemented
    return _apply_resize(bb, node, x, shape, plan, _str_attr(node, "mode", "nearest"), float(node.attr("extrapolation_value", 0.0)))


def _resize_direct(node: Node, roi: np.ndarray | None) -> bool:
    """Resize that `_resize_symbolic` computes in one kernel: nearest or linear, no antialias, no
    roi, a plain coordinate transformation, the stretch policy."""
    return (_str_attr(node, "mode", "nearest") in ("nearest", "linear") and not node.attr("antialias", 0)
            and (roi is None or not roi.size)
            and _str_attr(node, "coordinate_transformation_mode", "half_pixel") in (
                "asymmetric", "half_pixel", "pytorch_half_pixel", "align_corners")
            and _str_attr(node, "keep_aspect_ratio_policy", "stretch") == "stretch")


def _resize_symbolic(bb: relax.BlockBuilder, node: Node, x: Any, roi: np.ndarray | None, scales: np.ndarray | None,
                     sizes: np.ndarray | None) -> Any:
    """Resize with constant scales or sizes of an input with symbolic dims (a detector's x2
    upsampling of an H x W map): a resized axis of symbolic length n gets the exact output length
    floor(n * scale) = (n * p) // q for the scale's fraction p / q (scales; the float scale is
    exactly p / q for the power-of-two and small-ratio scales exporters write), or the constant
    size. nearest and linear (no antialias, no roi) are one kernel in the data's type over all
    resized axes, source coordinates computed in float64 as the reference; the other modes take the
    run-time kernels (`_resize_runtime_core`, float64)."""
    from fractions import Fraction

    from tvm import te, tirx

    dims = dims_of(x)
    r = len(dims)
    axes = [a + r if a < 0 else a for a in (node.attr("axes", None) or range(r))]
    mode = _str_attr(node, "mode", "nearest")
    ctm = _str_attr(node, "coordinate_transformation_mode", "half_pixel")
    if not _resize_direct(node, roi) or mode == "linear" and not _dt(x).startswith("float"):
        def c(a: np.ndarray | None) -> Any:
            return None if a is None or not a.size else relax.const(a, str(a.dtype))
        return _resize_runtime_core(bb, node, x, c(roi), c(scales), c(sizes), node.attr)
    scale: dict[int, Any] = {}  # axis → its scale (a python float, or an f64 expression of the dims)
    out = list(dims)
    for i, a in enumerate(axes):
        n = dims[a]
        if sizes is not None and sizes.size:
            out[a] = int(sizes[i])
            scale[a] = float(out[a]) / n if isinstance(n, int) else None
        elif scales is not None and scales.size:
            sc = float(scales[i])
            scale[a] = sc
            if isinstance(n, int):
                out[a] = int(sc * n)
            else:
                f = Fraction(sc).limit_denominator(1 << 16)
                if float(f) != sc:
                    raise LoweringError(f"node {node.label()}: Resize scale {sc} of a symbolic dim is not a ratio of small "
                                        "integers; the cpu target cannot size its output at compile time")
                out[a] = n * f.numerator if f.denominator == 1 else tirx.floordiv(n * f.numerator, f.denominator)
        else:
            raise LoweringError(f"node {node.label()}: Resize needs scales or sizes")
    resized = [a for a in axes if not (scale.get(a) == 1.0 and isinstance(out[a], type(dims[a])) and out[a] is dims[a])]
    nmode = _str_attr(node, "nearest_mode", "round_prefer_floor")
    f64 = "float64"

    def compute(data: Any) -> Any:
        shp = list(data.shape)
        osh = [out[d] if d in resized else shp[d] for d in range(r)]

        def coord(a: int, o: Any) -> Any:
            n_f = tirx.Cast(f64, shp[a])
            m_f = tirx.Cast(f64, osh[a])
            s = tirx.const(scale[a], f64) if scale.get(a) is not None else m_f / n_f
            o_f = tirx.Cast(f64, o)
            if ctm == "asymmetric":
                return o_f / s
            if ctm == "align_corners":
                return tirx.Select(m_f == tirx.const(1.0, f64), tirx.const(0.0, f64),
                                   o_f * (n_f - 1.0) / (m_f * 1.0 - 1.0))
            if ctm == "pytorch_half_pixel":
                return tirx.Select(m_f == tirx.const(1.0, f64), tirx.const(-0.5, f64), (o_f + 0.5) / s - 0.5)
            return (o_f + 0.5) / s - 0.5

        def clamp(i: Any, n: Any) -> Any:
            return tirx.max(tirx.min(i, n - 1), tirx.const(0, "int64"))

        if mode == "nearest":
            def nearest(a: int, o: Any) -> Any:
                xc = coord(a, o)
                if nmode == "floor":
                    i = tirx.floor(xc)
                elif nmode == "ceil":
                    i = tirx.ceil(xc)
                elif nmode == "round_prefer_ceil":
                    i = tirx.floor(xc + 0.5)
                else:  # round_prefer_floor
                    i = tirx.ceil(xc - 0.5)
                return clamp(tirx.Cast("int64", i), shp[a])

            return te.compute(osh, lambda *o: data[tuple(nearest(d, o[d]) if d in resized else o[d] for d in range(r))],
                              name="resize_nearest")

        def body(*o: Any) -> Any:
            taps = []  # per resized axis: (index0, index1, weight of index1)
            for a in resized:
                xc = coord(a, o[a])
                if ctm != "align_corners":
                    xc = tirx.max(xc, tirx.const(0.0, f64))  # (the reference clamps below 0 to the edge)
                x0 = tirx.floor(xc)
                w1 = tirx.Cast(data.dtype, xc - x0)
                i0 = tirx.Cast("int64", x0)
                taps.append((clamp(i0, shp[a]), clamp(i0 + 1, shp[a]), w1))
            acc = None
            for corner in range(1 << len(resized)):
                w = None
                idx = list(o)
                for j, a in enumerate(resized):
                    hi = (corner >> j) & 1
                    idx[a] = taps[j][1] if hi else taps[j][0]
                    wj = taps[j][2] if hi else tirx.const(1.0, data.dtype) - taps[j][2]
                    w = wj if w is None else w * wj
                term = w * data[tuple(idx)]
                acc = term if acc is None else acc + term
            return acc

        return te.compute(osh, body, name="resize_linear")

    return bb.emit_te(compute, x, primfunc_name_hint=f"resize_{mode}")


def _apply_resize(bb: relax.BlockBuilder, node: Node, x: Any, shape: list[int], plan: list[Any], mode: str, ev: float) -> Any:
    dtype = _dt(x)
    y = x
    masks = []
    for axis, w, rows in plan:
        if mode == "nearest" and np.all((w == 0) | (w == 1)):
            idx = relax.const(w.argmax(axis=1).astype("int64"), "int64")
            y = bb.emit(R.take(y, idx, axis=axis, mode="clip"))
        else:
            if not dtype.startswith("float"):
                raise LoweringError(f"node {node.label()}: Resize {mode} of {dtype} data is not supported by the cpu target")
            wt = relax.const(np.ascontiguousarray(w.T).astype(dtype), dtype)  # [in, out]
            y = _along(bb, y, axis, lambda t, wt=wt: bb.emit(R.matmul(t, wt)))
        if rows is not None:
            mshape = [1] * len(shape)
            mshape[axis] = rows.size
            masks.append(rows.reshape(mshape))
    if masks:
        m = masks[0]
        for extra in masks[1:]:
            m = m | extra
        y = bb.emit(R.where(relax.const(m, "bool"), _c(ev, dtype), y))
    if y is x:
        y = bb.emit(R.add(x, _c(0, dtype))) if dtype.startswith("float") else bb.emit(R.astype(x, dtype))
    return y


# --- more ops the frontend lacks -----------------------------------------------------------------------


@converter("CenterCropPad")
def _center_crop_pad(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Centre crop (a slice) and/or centre pad with zeros per axis to the constant shape."""
    x = ins[0]
    dims = _static(node, x, "input")
    r = len(dims)
    shape = [int(s) for s in _int_const(node, ins[1], "shape").reshape(-1)]
    axes = [a + r if a < 0 else a for a in (node.attr("axes") or range(r))]
    y = x
    pads = [0] * (2 * r)
    for a, sh in zip(axes, shape):
        dim = dims[a]
        if sh < dim:
            d = (dim - sh) // 2
            y = _slice(bb, y, a, d, d + sh)
        elif sh > dim:
            d = (sh - dim) // 2
            pads[a], pads[r + a] = d, sh - dim - d
    if any(pads):
        y = bb.emit(R.nn.pad(y, [p for a in range(r) for p in (pads[a], pads[r + a])], pad_value=0.0))
    if y is x:
        y = bb.emit(R.astype(x, _dt(x)))
    return y


@converter("OneHot")
def _one_hot(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """values[1] where index (negative counted from depth) equals the position on `axis`,
    values[0] elsewhere (out-of-range indices give a row of values[0])."""
    idx, depth_e, values = ins[0], ins[1], ins[2]
    depth = int(np.asarray(_int_const(node, depth_e, "depth")).reshape(-1)[0])
    r = idx.ty.ndim
    axis = node.attr("axis", -1)
    axis = axis + r + 1 if axis < 0 else axis
    idt = _dt(idx)
    i64 = bb.emit(R.astype(idx, "int64")) if idt != "int64" else idx
    i64 = bb.emit(R.where(R.less(i64, _c(0, "int64")), R.add(i64, _c(depth, "int64")), i64))
    i64 = bb.emit(R.expand_dims(i64, [axis]))
    pos_shape = [1] * (r + 1)
    pos_shape[axis] = depth
    pos = relax.const(np.arange(depth, dtype=np.int64).reshape(pos_shape), "int64")
    off = bb.emit(R.take(values, relax.const(np.array(0, np.int64), "int64"), axis=0))
    on = bb.emit(R.take(values, relax.const(np.array(1, np.int64), "int64"), axis=0))
    return bb.emit(R.where(R.equal(i64, pos), on, off))


@converter("Col2Im")
def _col2im(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Col2Im as one matmul with a 0/1 scatter matrix built at compile time:
    [N, C, K·L] @ [K·L, prod(image)] → [N, C, *image] (overlaps add up)."""
    x = ins[0]
    n, ckb, num_l = _static(node, x, "input")
    image = [int(v) for v in _int_const(node, ins[1], "image_shape").reshape(-1)]
    block = [int(v) for v in _int_const(node, ins[2], "block_shape").reshape(-1)]
    nd = len(image)
    dil = list(node.attr("dilations") or [1] * nd)
    pads = list(node.attr("pads") or [0] * (2 * nd))
    strides = list(node.attr("strides") or [1] * nd)
    kprod = int(np.prod(block))
    c = ckb // kprod
    nblocks = [(image[d] + pads[d] + pads[nd + d] - (dil[d] * (block[d] - 1) + 1)) // strides[d] + 1 for d in range(nd)]
    if int(np.prod(nblocks)) != num_l:
        raise LoweringError(f"node {node.label()}: Col2Im block count {num_l} does not match the image")
    m = np.zeros((kprod, num_l, int(np.prod(image))), dtype=_dt(x))
    for k, koff in enumerate(np.ndindex(*block)):
        for l_, boff in enumerate(np.ndindex(*nblocks)):
            pos = [boff[d] * strides[d] + koff[d] * dil[d] - pads[d] for d in range(nd)]
            if all(0 <= pos[d] < image[d] for d in range(nd)):
                m[k, l_, int(np.ravel_multi_index(pos, image))] += 1
    mat = relax.const(m.reshape(kprod * num_l, -1), _dt(x))
    y = bb.emit(R.matmul(R.reshape(x, (n, c, kprod * num_l)), mat))
    return bb.emit(R.reshape(y, (n, c, *image)))


@converter("BitCast")
def _bitcast(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Reinterpret the bits as another type of the same width (a TIR reinterpret kernel)."""
    from tvm import topi

    x = ins[0]
    to = _onnx_dtype(node.attr("to"))
    if np.dtype(to).itemsize != np.dtype(_dt(x)).itemsize:
        raise LoweringError(f"node {node.label()}: BitCast between types of different widths")
    return bb.emit_te(topi.reinterpret, x, to)


def _zp(e: Any, like_dtype: str) -> Any:
    return e if e is not None else _c(0, like_dtype)


def _requantize(bb: relax.BlockBuilder, acc: Any, scale: Any, y_zp: Any, out_dtype: str) -> Any:
    """round_half_even(acc · scale) + zero point, clipped to the output type (in float64)."""
    info = np.iinfo(out_dtype)
    d = bb.emit(R.multiply(R.astype(acc, "float64"), scale))
    if y_zp is not None:
        d = bb.emit(R.add(d, R.astype(y_zp, "float64")))
    d = bb.emit(R.clip(R.round(d), float(info.min), float(info.max)))
    return bb.emit(R.astype(d, out_dtype))


def _clipped_bounds(node: Node) -> tuple[float, float] | None:
    """(lo, hi) of a Clip with constant bounds (both given) producing `node`'s first input."""
    from graphopt.pattern import const_array

    clip = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if clip is None or clip.op_type != "Clip" or clip.domain not in ("", "ai.onnx"):
        return None
    if clip.attr("min") is not None and clip.attr("max") is not None:
        return float(clip.attr("min")), float(clip.attr("max"))
    ins = list(clip.inputs) + [None] * 3
    bounds = [const_array(v) if v is not None else None for v in ins[1:3]]
    if any(b is None or b.size != 1 for b in bounds):
        return None
    return float(bounds[0].reshape(())), float(bounds[1].reshape(()))  # type: ignore[union-attr]


@converter("Cast")
def _cast_in_range(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """float → 8/16/32-bit integer Cast of a Clip to within the integer type's range (a requantize:
    Cast(Clip(Round(x / s) + z, 0, 255), uint8)) → a plain conversion. The frontend's Cast emulates
    C's wrap-around for out-of-range and non-finite values with selects and masks that stay in
    every fused int8 epilogue (the conversion of each output element then costs dozens of
    instructions); here the values are in range by construction. Otherwise (and for NaN, which
    Clip lets through: a C cast's value is unspecified there too) the frontend's Cast."""
    x = ins[0]
    to = _onnx_dtype(node.attr("to"))
    src = str(getattr(getattr(x, "ty", None), "dtype", ""))
    if not src.startswith(("float", "bfloat")) or not to.startswith(("int", "uint")) or to.endswith("64"):
        return NotImplemented
    bounds = _clipped_bounds(node)
    info = np.iinfo(to)
    if bounds is None or not (info.min <= bounds[0] <= bounds[1] <= info.max):
        return NotImplemented
    return bb.emit(R.astype(x, to))


def _qscale(bb: relax.BlockBuilder, a_s: Any, b_s: Any, y_s: Any) -> Any:
    f = lambda e: R.astype(e, "float64")  # noqa: E731
    return bb.emit(R.divide(R.multiply(f(a_s), f(b_s)), f(y_s)))


@converter("QLinearMatMul")
def _qlinear_matmul(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """(a - a_zp)(b - b_zp) accumulated in int32, scaled by a_scale·b_scale/y_scale, rounded,
    shifted by y_zp and saturated."""
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = (ins + [None] * 8)[:8]
    ai = bb.emit(R.subtract(R.astype(a, "int32"), R.astype(_zp(a_zp, _dt(a)), "int32")))
    bi = bb.emit(R.subtract(R.astype(b, "int32"), R.astype(_zp(b_zp, _dt(b)), "int32")))
    acc = bb.emit(R.matmul(ai, bi, out_dtype="int32"))
    out = _dt(y_zp) if y_zp is not None else _dt(a)
    return _requantize(bb, acc, _qscale(bb, a_s, b_s, y_s), y_zp, out)


@converter("QLinearConv")
def _qlinear_conv(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Conv of the zero-point-shifted int32 tensors (+ int32 bias), requantized per output
    channel (w_scale scalar or per channel)."""
    x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp = ins[:8]
    bias = ins[8] if len(ins) > 8 else None
    nd = w.ty.ndim - 2
    if nd != 2:
        return NotImplemented
    xi = bb.emit(R.subtract(R.astype(x, "int32"), R.astype(_zp(x_zp, _dt(x)), "int32")))
    wz = R.astype(_zp(w_zp, _dt(w)), "int32")
    if w_zp is not None and w_zp.ty.ndim == 1 and dims_of(w_zp)[0] != 1:
        wz = R.reshape(wz, (-1, 1, 1, 1))
    wi = bb.emit(R.subtract(R.astype(w, "int32"), wz))
    pads = list(node.attr("pads") or [0] * 4)
    if _str_attr(node, "auto_pad", "NOTSET") not in ("NOTSET",):
        return NotImplemented
    acc = bb.emit(R.nn.conv2d(xi, wi, strides=tuple(node.attr("strides") or (1, 1)), padding=(pads[0], pads[1], pads[2], pads[3]),
                              dilation=tuple(node.attr("dilations") or (1, 1)), groups=node.attr("group", 1), out_dtype="int32"))
    if bias is not None:
        acc = bb.emit(R.add(acc, R.reshape(bias, (1, -1, 1, 1))))
    scale = _qscale(bb, x_s, w_s, y_s)
    if scale.ty.ndim == 1:
        scale = bb.emit(R.reshape(scale, (1, -1, 1, 1)))
    out = _dt(y_zp) if y_zp is not None else _dt(x)
    return _requantize(bb, acc, scale, y_zp, out)


@converter("Det")
def _det(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Determinant of [..., n, n] by the Leibniz formula (static n ≤ 4)."""
    import itertools

    x = ins[0]
    dims = _static(node, x, "input")
    n = dims[-1]
    if n > 4:
        raise LoweringError(f"node {node.label()}: Det of {n}x{n} matrices is not supported by the cpu target (n ≤ 4)")
    r = len(dims)

    def el(i: int, j: int) -> Any:
        return bb.emit(R.squeeze(_slice(bb, _slice(bb, x, r - 2, i, i + 1), r - 1, j, j + 1), [r - 2, r - 1]))

    cells = {(i, j): el(i, j) for i in range(n) for j in range(n)}
    total = None
    for perm in itertools.permutations(range(n)):
        inv = sum(1 for a in range(n) for b in range(a + 1, n) if perm[a] > perm[b])
        term = cells[(0, perm[0])]
        for i in range(1, n):
            term = R.multiply(term, cells[(i, perm[i])])
        if total is None:
            total = term if inv % 2 == 0 else R.negative(term)
        else:
            total = R.add(total, term) if inv % 2 == 0 else R.subtract(total, term)
        total = bb.emit(total)
    return total


@converter("Upsample")
def _upsample(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Upsample (scales attribute, or a constant scales input from opset 9) = Resize with the
    asymmetric coordinate transformation and floor rounding for nearest."""
    x = ins[0]
    shape = _static(node, x, "input")
    if len(ins) > 1 and ins[1] is not None:
        scales = np.asarray(_int_const(node, ins[1], "scales"), dtype=np.float64)
    else:
        scales = np.asarray(node.attr("scales"), dtype=np.float64)
    mode = _str_attr(node, "mode", "nearest")
    over = {"mode": mode, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor", "axes": None,
            "antialias": 0, "exclude_outside": 0, "keep_aspect_ratio_policy": "stretch"}
    plan = _resize_plan(node, shape, None, scales, None, over)
    return _apply_resize(bb, node, x, shape, plan, mode, 0.0)


@converter("Dropout")
def _dropout(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Inference Dropout (or training with ratio 0): the input unchanged and an all-true mask.
    Training with a nonzero ratio draws random numbers: refused."""
    x = ins[0]
    training = ins[2] if len(ins) > 2 else None
    if training is not None:
        t = const_value(training)
        if t is None:
            raise LoweringError(f"node {node.label()}: Dropout with a run-time training_mode is not supported by the cpu target")
        if bool(np.asarray(t).reshape(-1)[0]):
            r = const_value(ins[1]) if len(ins) > 1 and ins[1] is not None else np.array(0.5)
            if r is None or float(np.asarray(r).reshape(-1)[0]) != 0.0:
                raise LoweringError(f"node {node.label()}: training-mode Dropout (random) is not supported by the cpu target")
    y = bb.emit(R.astype(x, _dt(x)))
    if len(node.outputs) > 1:
        return [y, bb.emit(R.ones(dims_of(x), "bool"))]
    return y


@converter("Swish")
def _swish(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """x · sigmoid(alpha · x)."""
    x = ins[0]
    a = float(node.attr("alpha", 1.0))
    return bb.emit(R.multiply(x, R.sigmoid(R.multiply(x, _c(a, _dt(x))))))


@converter("ReduceMax", "ReduceMin")
def _reduce_bool(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """ReduceMax/Min of bool tensors through uint8 (TIR has no min/max value for bool)."""
    x = ins[0]
    if _dt(x) != "bool":
        return NotImplemented
    axes = node.attr("axes")
    if len(ins) > 1 and ins[1] is not None:
        axes = [int(a) for a in _int_const(node, ins[1], "axes").reshape(-1)]
    keep = bool(node.attr("keepdims", 1))
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return bb.emit(R.astype(x, "bool"))
        axes = None
    fn = R.max if node.op_type == "ReduceMax" else R.min
    return bb.emit(R.astype(fn(R.astype(x, "uint8"), axes, keep), "bool"))


@converter("ReverseSequence")
def _reverse_sequence(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Reverse the first sequence_lens[b] steps of each batch entry: one gather_elements with a
    compile-time index tensor (sequence_lens must be constant)."""
    x = ins[0]
    shape = _static(node, x, "input")
    lens = [int(v) for v in _int_const(node, ins[1], "sequence_lens").reshape(-1)]
    tax, bax = node.attr("time_axis", 0), node.attr("batch_axis", 1)
    idx = np.indices(shape)[tax].copy()
    for b, n in enumerate(lens):
        sel = [slice(None)] * len(shape)
        sel[bax] = b
        t = idx[tuple(sel)]
        pos = np.indices(t.shape)[tax if tax < bax else tax - 1]
        idx[tuple(sel)] = np.where(pos < n, n - 1 - pos, pos)
    return bb.emit(R.gather_elements(x, relax.const(idx.astype(np.int64), "int64"), axis=tax))


@converter("Pad")
def _pad(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Constant Pad whose pad value is a run-time scalar: pad with zeros, then the value where a
    compile-time mask marks the padding (the frontend takes only a constant value)."""
    if opset < 11 or len(ins) < 3 or ins[2] is None or const_value(ins[2]) is not None:
        return NotImplemented
    if _str_attr(node, "mode", "constant") != "constant":
        return NotImplemented
    x = ins[0]
    shape = _static(node, x, "input")
    r = len(shape)
    pads = [int(v) for v in _int_const(node, ins[1], "pads").reshape(-1)]
    axes = list(range(r))
    if len(ins) > 3 and ins[3] is not None:
        axes = [int(a) + r if int(a) < 0 else int(a) for a in _int_const(node, ins[3], "axes").reshape(-1)]
    full = [0] * (2 * r)
    for i, a in enumerate(axes):
        full[a], full[r + a] = pads[i], pads[len(axes) + i]
    if any(p < 0 for p in full):
        return NotImplemented
    width = [p for a in range(r) for p in (full[a], full[r + a])]
    y = bb.emit(R.nn.pad(x, width, pad_value=0.0))
    inside = np.pad(np.ones(shape, dtype=bool), [(full[a], full[r + a]) for a in range(r)], constant_values=False)
    cv = bb.emit(R.astype(R.reshape(ins[2], []), _dt(x)))
    return bb.emit(R.where(relax.const(inside, "bool"), y, cv))


@converter("NonMaxSuppression")
def _nms_guard(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """The frontend's NonMaxSuppression reads max_output_boxes_per_class / iou_threshold /
    score_threshold only when they are constants (it silently uses defaults otherwise): refuse
    run-time ones instead of computing something else."""
    for i, what in ((2, "max_output_boxes_per_class"), (3, "iou_threshold"), (4, "score_threshold")):
        if len(ins) > i and ins[i] is not None and const_value(ins[i]) is None:
            raise LoweringError(f"node {node.label()}: NonMaxSuppression with a run-time {what} is not supported by the cpu target")
    return NotImplemented


@converter("TensorScatter")
def _tensor_scatter(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """KV-cache write: cache position p of batch b takes update[p - write_indices[b]] (mod the
    cache length when circular) where that lies in the update, else keeps the cache; one
    gather_elements with a run-time index and a select."""
    cache, upd = ins[0], ins[1]
    widx = ins[2] if len(ins) > 2 else None
    shape = _static(node, cache, "past_cache")
    r = len(shape)
    axis = node.attr("axis", -2) % r
    length, s = shape[axis], _static(node, upd, "update")[axis]
    pos_shape = [1] * r
    pos_shape[axis] = length
    pos = relax.const(np.arange(length, dtype=np.int64).reshape(pos_shape), "int64")
    if widx is None:
        j = pos
    else:
        w_shape = [1] * r
        w_shape[0] = shape[0]
        w = bb.emit(R.reshape(bb.emit(R.astype(widx, "int64")), w_shape))
        j = bb.emit(R.subtract(pos, w))
    if _str_attr(node, "mode", "linear") == "circular":
        j = bb.emit(R.floor_mod(j, _c(length, "int64")))
    valid = bb.emit(R.logical_and(R.greater_equal(j, _c(0, "int64")), R.less(j, _c(s, "int64"))))
    jc = bb.emit(R.broadcast_to(R.clip(j, 0, s - 1), shape))
    gathered = bb.emit(R.gather_elements(upd, jc, axis=axis))
    return bb.emit(R.where(valid, gathered, cache))



# --- run-time shape-deciding inputs, compiled ahead of time (targets/tvm/dynamic.py) ---------------

from . import dynamic as D  # noqa: E402


def _chained(*ops: str) -> Any:
    """Register a converter that runs before the one already registered for each op (which it
    falls back to by returning NotImplemented)."""
    def deco(fn: Any) -> Any:
        for op in ops:
            prev = CONVERTERS.get(op)

            def conv(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int, _prev: Any = prev) -> Any:
                out = fn(bb, node, ins, opset)
                if out is NotImplemented and _prev is not None:
                    return _prev(bb, node, ins, opset)
                return out

            CONVERTERS[op] = conv
        return fn

    return deco


def _runtime(e: Any) -> bool:
    """`e` is a tensor computed at run time (not a constant the IR knows, nor a shape value)."""
    return e is not None and const_value(e) is None and isinstance(getattr(e, "ty", None), relax.TensorType)


def _static_len(e: Any) -> int | None:
    s = e.ty.shape
    if e.ty.ndim == 0:
        return 1
    if e.ty.ndim != 1 or not isinstance(s, relax.ShapeExpr) or not isinstance(s.values[0], tvm.tirx.IntImm):
        return None
    return int(s.values[0])


def _lse(y: Any, axis: int) -> Any:
    m = R.max(y, [axis], keepdims=True)
    return R.add(R.log(R.sum(R.exp(R.subtract(y, m)), [axis], keepdims=True)), m)


#: op → (map before, reduction along one axis keeping it, map after)
_REDUCE_PARTS: dict[str, tuple[Any, Any, Any]] = {
    "ReduceSum": (None, lambda y, a: R.sum(y, [a], keepdims=True), None),
    "ReduceMean": (None, lambda y, a: R.mean(y, [a], keepdims=True), None),
    "ReduceMax": (None, lambda y, a: R.max(y, [a], keepdims=True), None),
    "ReduceMin": (None, lambda y, a: R.min(y, [a], keepdims=True), None),
    "ReduceProd": (None, lambda y, a: R.prod(y, [a], keepdims=True), None),
    "ReduceSumSquare": (lambda y: R.multiply(y, y), lambda y, a: R.sum(y, [a], keepdims=True), None),
    "ReduceL1": (R.abs, lambda y, a: R.sum(y, [a], keepdims=True), None),
    "ReduceL2": (lambda y: R.multiply(y, y), lambda y, a: R.sum(y, [a], keepdims=True), R.sqrt),
    "ReduceLogSum": (None, lambda y, a: R.sum(y, [a], keepdims=True), R.log),
    "ReduceLogSumExp": (None, _lse, None),
}


def _reduce_empty_set(bb: relax.BlockBuilder, node: Node, ins: list[Any]) -> Any:
    """ReduceMax/Min (float) over constant axes that include a dim of static size 0: -inf/+inf
    (the TIR reduction's init is the finite extreme); NotImplemented otherwise."""
    if node.op_type not in ("ReduceMax", "ReduceMin") or not _dt(ins[0]).startswith("float"):
        return NotImplemented
    x = ins[0]
    dims = dims_of(x)
    axes = node.attr("axes")
    if len(ins) > 1 and ins[1] is not None:
        v = const_value(ins[1])
        axes = None if v is None else [int(a) for a in np.asarray(v).reshape(-1)]
    axes = list(range(len(dims))) if not axes else [a % len(dims) for a in axes]
    if not any(dims[a] == 0 for a in axes):
        return NotImplemented
    keep = bool(node.attr("keepdims", 1))
    fn = R.max if node.op_type == "ReduceMax" else R.min
    inf = -np.inf if node.op_type == "ReduceMax" else np.inf
    y = bb.emit(fn(x, axes, keep))
    return bb.emit(R.add(R.multiply(y, _c(0, _dt(x))), _c(inf, _dt(x))))


@_chained(*_REDUCE_PARTS)
def _reduce_runtime_axes(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Reduce* whose axes are a run-time input (opset 18; ReduceSum 13): the axes tensor's length
    k is static, so the output rank is too (r or r - k). One two-way run-time branch per axis of
    the input (reduce it, keeping the dim, or not; static size-1 dims need none), chained; a
    reduction over a set of axes is the same reductions one axis after another (LogSumExp per
    axis stable by its max). keepdims=0 then drops the reduced dims with a reshape to the kept
    dims, computed at run time. Empty axes: all axes, or the input (noop_with_empty_axes)."""
    if len(ins) < 2 or not _runtime(ins[1]):
        return _reduce_empty_set(bb, node, ins)
    x, axes = ins[0], ins[1]
    k = _static_len(axes)
    if k is None:
        raise LoweringError(f"node {node.label()}: {node.op_type} needs axes of a static length on the cpu target")
    pre, along, post = _REDUCE_PARTS[node.op_type]
    keep = bool(node.attr("keepdims", 1))
    dtype = _dt(x)
    as_u8 = dtype == "bool"  # TIR has no min/max value for bool
    y = bb.emit(R.astype(x, "uint8")) if as_u8 else x
    if pre is not None:
        y = bb.emit(pre(y))
    if k == 0:
        if node.attr("noop_with_empty_axes", 0):
            return x
        r = y.ty.ndim
        for a in range(r):
            y = bb.emit(along(y, a))
        if not keep:
            y = bb.emit(R.reshape(y, []))
    else:
        dims = dims_of(x)
        r = len(dims)
        a64 = bb.emit(R.astype(axes, "int64")) if _dt(axes) != "int64" else axes
        if a64.ty.ndim == 0:
            a64 = bb.emit(R.reshape(a64, [1]))
        an = bb.emit(R.where(R.less(a64, _c(0, "int64")), R.add(a64, _c(r, "int64")), a64))
        hit = bb.emit(R.equal(R.reshape(an, [k, 1]), D.int_consts(list(range(r)))))
        mask = bb.emit(R.max(R.astype(hit, "int64"), [0]))  # [r]: 1 where reduced
        for a in range(r):
            if dims[a] == 1:
                continue
            cond = bb.emit(R.greater(R.take(mask, relax.const(a, "int64"), axis=0), _c(0, "int64")))
            if dims[a] == 0 and node.op_type in ("ReduceMax", "ReduceMin") and dtype.startswith("float"):
                # max/min of an empty set: -inf/+inf (the reduction's init is the finite extreme)
                inf = -np.inf if node.op_type == "ReduceMax" else np.inf
                reduce_a = lambda fbb, p, a=a, inf=inf: fbb.emit(R.add(R.multiply(fbb.emit(along(p[0], a)), _c(0, dtype)), _c(inf, dtype)))  # noqa: E731
            else:
                reduce_a = lambda fbb, p, a=a: fbb.emit(along(p[0], a))  # noqa: E731
            y = D.switch(bb, [cond], [reduce_a, lambda fbb, p: p[0]], [y], name=f"reduce_axis{a}_")
        if not keep:
            if r - k == 0:
                y = bb.emit(R.reshape(y, []))
            else:
                # the kept dims in order: kept[j] = shape[d] for the j-th d with mask[d] == 0
                sh = D.shape_tensor(bb, y)
                kept = bb.emit(R.subtract(_c(1, "int64"), mask))
                tri = np.tril(np.ones((r, r), dtype=np.int64), -1)  # e < d
                pos = bb.emit(R.sum(R.multiply(relax.const(tri, "int64"), R.reshape(kept, [1, r])), [1]))
                sel = bb.emit(R.multiply(R.astype(R.equal(R.reshape(pos, [1, r]), D.int_consts([[j] for j in range(r - k)])), "int64"),
                                         R.reshape(kept, [1, r])))
                out_shape = bb.emit(R.sum(R.multiply(sel, R.reshape(sh, [1, r])), [1]))
                y = bb.emit(R.reshape(y, D.shape_of_tensor(bb, out_shape, r - k)))
    if post is not None:
        y = bb.emit(post(y))
    if as_u8:
        y = bb.emit(R.astype(y, "bool"))
    return y


def _value_switch(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int, pos: int, values: list[int],
                  normalise: Any = None) -> Any:
    """Convert `node` once per possible value of its run-time scalar input `pos` (as a constant:
    the existing converters specialise on it) and pick the branch at run time. `normalise` maps
    the run-time value to one of `values` first (negative axes)."""
    from .lowerer import convert_node

    v = ins[pos]
    dt = _dt(v)
    s = bb.emit(R.reshape(v, [])) if v.ty.ndim else v
    if normalise is not None:
        s = bb.emit(normalise(s))
    runtime = [i for i, e in enumerate(ins) if i != pos and _runtime(e)]

    def branch(val: int) -> Any:
        def fn(fbb: relax.BlockBuilder, params: list[relax.Var]) -> Any:
            new = list(ins)
            for i, p in zip(runtime, params):
                new[i] = p
            new[pos] = relax.const(np.array(val, dtype=dt).reshape([1] * v.ty.ndim), dt)  # scalar or [1], as given
            out = convert_node(fbb, node, new, opset)
            return list(out.fields) if isinstance(out, relax.Tuple) else out

        return fn

    conds = [bb.emit(R.equal(s, _c(val, dt))) for val in values[:-1]]
    return D.switch(bb, conds, [branch(val) for val in values], [ins[i] for i in runtime], name=f"{node.op_type.lower()}_")


@_chained("CumSum", "CumProd")
def _cum_runtime_axis(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """CumSum/CumProd along a run-time axis: one kernel per axis of the input, chosen at run time."""
    if len(ins) < 2 or not _runtime(ins[1]):
        return NotImplemented
    r = ins[0].ty.ndim
    dt = _dt(ins[1])
    return _value_switch(bb, node, ins, opset, 1, list(range(r)),
                         lambda s: R.where(R.less(s, _c(0, dt)), R.add(s, _c(r, dt)), s))


@_chained("Pad")
def _pad_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Pad with run-time pads: the pad amounts become symbolic vars (tensor_to_shape +
    match_cast) and one TE kernel with output dims n + before + after reads the input at
    i - before (constant: the value outside; edge: clamped; reflect: mirrored; wrap: modulo).
    axes, when given, must be constant; the pad value may be a run-time scalar."""
    from tvm import te, tirx

    if opset < 11 or len(ins) < 2 or not _runtime(ins[1]):
        return NotImplemented
    x = ins[0]
    r = x.ty.ndim
    n_p = _static_len(ins[1])
    axes = list(range(r))
    pads = ins[1]
    if len(ins) > 3 and _runtime(ins[3]):  # run-time axes: the full-rank pads computed at run time
        k = _static_len(ins[3])
        if k is None or n_p != 2 * k:
            raise LoweringError(f"node {node.label()}: Pad needs pads of length 2 x the padded axes on the cpu target")
        a64 = bb.emit(R.reshape(R.astype(ins[3], "int64"), [k, 1]))
        a64 = bb.emit(R.where(R.less(a64, _c(0, "int64")), R.add(a64, _c(r, "int64")), a64))
        onehot = bb.emit(R.astype(R.equal(a64, D.int_consts([list(range(r))])), "int64"))  # [k, r]
        p2 = bb.emit(R.reshape(R.astype(pads, "int64"), [2, k, 1]))
        pads = bb.emit(R.reshape(R.sum(R.multiply(p2, R.reshape(onehot, [1, k, r])), [1]), [2 * r]))
        n_p = 2 * r
    elif len(ins) > 3 and ins[3] is not None:
        axes = [int(a) + r if int(a) < 0 else int(a) for a in _int_const(node, ins[3], "axes").reshape(-1)]
    if n_p != 2 * len(axes):
        raise LoweringError(f"node {node.label()}: Pad needs pads of length 2 x the padded axes on the cpu target")
    amounts = D.shape_of_tensor(bb, pads, n_p, "pad").values
    before, after = [0] * r, [0] * r
    for i, a in enumerate(axes):
        before[a], after[a] = amounts[i], amounts[len(axes) + i]
    mode = _str_attr(node, "mode", "constant")
    dtype = _dt(x)
    value = ins[2] if len(ins) > 2 else None
    cv = const_value(value) if value is not None else None

    def compute(data: Any, *rest: Any) -> Any:
        dims = list(data.shape)
        out_shape = [dims[d] + before[d] + after[d] for d in range(r)]

        def body(*idx: Any) -> Any:
            src = [idx[d] - before[d] for d in range(r)]
            if mode == "constant":
                inside = tirx.const(True, "bool")
                for d in range(r):
                    inside = tirx.all(inside, src[d] >= 0, src[d] < dims[d])
                safe = [tirx.max(tirx.min(s, dims[d] - 1), 0) for d, s in enumerate(src)]
                if rest:
                    fill = rest[0][()] if len(rest[0].shape) == 0 else rest[0][0]
                else:
                    fill = tirx.const(float(cv.reshape(-1)[0]) if cv is not None and cv.size else 0, dtype)
                return tirx.Select(inside, data[tuple(safe)], fill.astype(dtype))
            if mode == "edge":
                return data[tuple(tirx.max(tirx.min(s, dims[d] - 1), 0) for d, s in enumerate(src))]
            if mode == "reflect":
                out = []
                for d, s in enumerate(src):
                    m = dims[d] - 1
                    s = tirx.abs(s)
                    s = tirx.Select(s > m, 2 * m - s, s)
                    out.append(tirx.max(tirx.min(s, m), 0))
                return data[tuple(out)]
            if mode == "wrap":
                return data[tuple(tirx.floormod(s, dims[d]) for d, s in enumerate(src))]
            raise LoweringError(f"node {node.label()}: Pad mode {mode!r} is not supported by the cpu target")

        return te.compute(out_shape, body, name="pad_runtime")

    args = [x]
    if mode == "constant" and value is not None and cv is None:
        args.append(value)
    return bb.emit_te(compute, *args, primfunc_name_hint="pad_runtime")


# --- Resize with run-time roi / scales / sizes ----------------------------------------------------------


def _resize_axis_kernel(node: Node, axis: int, m: Any, mode: str, ctm: str, nmode: str, a_coef: float, antialias: bool,
                        exclude: bool, ev: float) -> Any:
    """TE compute resizing `axis` of a float64 tensor to length m (a symbolic var) with the
    run-time full-rank scales [r] (float64) and roi [2r] (float64): onnx's reference
    (_interpolate_1d_along_axis) per output position: the source coordinate x by the coordinate
    transformation, left = the pixel left of x (ratio in (0, 1]), taps at left + offset + k with
    edge clamping, their coefficients by mode (antialias: a kernel widened by 1/scale, its tap
    count bounded by 2n + 2 / 4n + 2 for linear / cubic since an output needs scale >= 1/n),
    normalised when antialiased or excluding outside taps; tf_crop_and_resize outside the input
    gives the extrapolation value."""
    from tvm import te, tirx

    f64 = "float64"

    def c(v: float) -> Any:
        return tirx.const(v, f64)

    def compute(data: Any, scales: Any, roi: Any) -> Any:
        dims = list(data.shape)
        r = len(dims)
        n = dims[axis]
        n_f = tirx.Cast(f64, n)
        s = scales[axis]
        ow = s * n_f  # output_width (float) as the reference
        m_f = tirx.Cast(f64, m)
        out_shape = [m if d == axis else dims[d] for d in range(r)]

        def x_of(o: Any) -> Any:
            o_f = tirx.Cast(f64, o)
            if ctm == "align_corners":
                return tirx.Select(ow == c(1.0), c(0.0), o_f * (n_f - c(1.0)) / (ow - c(1.0)))
            if ctm == "asymmetric":
                return o_f / s
            if ctm == "tf_crop_and_resize":
                b, e = roi[axis], roi[axis + r]
                x = tirx.Select(ow == c(1.0), (e - b) * (n_f - c(1.0)) / c(2.0), o_f * (e - b) * (n_f - c(1.0)) / (ow - c(1.0)))
                return x + b * (n_f - c(1.0))
            if ctm == "pytorch_half_pixel":
                return tirx.Select(ow == c(1.0), c(-0.5), (o_f + c(0.5)) / s - c(0.5))
            if ctm == "half_pixel":
                return (o_f + c(0.5)) / s - c(0.5)
            if ctm == "half_pixel_symmetric":
                offset = n_f / c(2.0) * (c(1.0) - m_f / ow)
                return offset + (o_f + c(0.5)) / s - c(0.5)
            raise LoweringError(f"node {node.label()}: coordinate_transformation_mode {ctm!r} is not supported")

        def cubic(t: Any) -> Any:  # the antialias cubic kernel at |t|
            t = tirx.abs(t)
            a = c(a_coef)
            near = (a + c(2.0)) * t * t * t - (a + c(3.0)) * t * t + c(1.0)
            far = a * t * t * t - c(5.0) * a * t * t + c(8.0) * a * t - c(4.0) * a
            return tirx.Select(t <= c(1.0), near, tirx.Select(t < c(2.0), far, c(0.0)))

        def taps(o: Any) -> tuple[Any, Any, Any, Any]:
            """(ratio, the pixel left of x, offset of the first tap from it, tap count) at o."""
            x = x_of(o)
            xi = tirx.floor(x)
            is_int = x == xi
            ratio = tirx.Select(is_int, c(1.0), x - xi)
            left = tirx.Cast("int64", xi) - tirx.Cast("int64", is_int)
            if antialias:
                sa = tirx.min(s, c(1.0))
                half = c(1.0) if mode == "linear" else c(2.0)
                start = tirx.Cast("int64", tirx.floor(-half / sa)) + 1
                return ratio, left, start, 2 - 2 * start
            if mode == "cubic":
                return ratio, left, tirx.const(-1, "int64"), tirx.const(4, "int64")
            return ratio, left, tirx.const(0, "int64"), tirx.const(2, "int64")

        def coeff(o: Any, k: Any) -> Any:
            ratio, left, start, count = taps(o)
            first = left + start
            if antialias:
                sa = tirx.min(s, c(1.0))
                arg = (tirx.Cast(f64, start + k) - ratio) * sa
                w = tirx.max(tirx.min(c(1.0) - tirx.abs(arg), c(1.0)), c(0.0)) if mode == "linear" else cubic(arg)
            elif mode == "cubic":
                a = c(a_coef)
                t = ratio
                u = c(1.0) - ratio
                cs = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                      ((a + 2) * t - (a + 3)) * t * t + 1,
                      ((a + 2) * u - (a + 3)) * u * u + 1,
                      ((a * (u + 1) - 5 * a) * (u + 1) + 8 * a) * (u + 1) - 4 * a]
                w = tirx.Select(k == 0, cs[0], tirx.Select(k == 1, cs[1], tirx.Select(k == 2, cs[2], cs[3])))
            elif mode == "linear":
                w = tirx.Select(k == 0, c(1.0) - ratio, ratio)
            else:  # nearest: [0, 1] at an integer ratio, else by nearest_mode
                take1 = {"round_prefer_floor": ratio > c(0.5), "round_prefer_ceil": ratio >= c(0.5),
                         "floor": ratio == c(1.0), "ceil": tirx.const(True, "bool")}[nmode]
                take1 = tirx.Or(take1, ratio == c(1.0))
                w = tirx.Select(k == 0, tirx.Select(take1, c(0.0), c(1.0)), tirx.Select(take1, c(1.0), c(0.0)))
            idx = first + k
            ok = k < count
            if exclude:
                ok = tirx.all(ok, idx >= 0, idx < n)
            return tirx.Select(ok, w, c(0.0)), tirx.max(tirx.min(idx, n - 1), 0)

        bound = (2 * n + 2 if mode == "linear" else 4 * n + 2) if antialias else (4 if mode == "cubic" else 2)
        normalise = antialias or exclude

        if normalise:
            kw = te.reduce_axis((0, bound), name="kw")
            wsum = te.compute([m], lambda o: te.sum(coeff(o, kw)[0], axis=kw), name="resize_wsum")
        kr = te.reduce_axis((0, bound), name="k")

        def body(*idx: Any) -> Any:
            o = idx[axis]
            w, src = coeff(o, kr)
            at = [src if d == axis else idx[d] for d in range(r)]
            return te.sum(w * data[tuple(at)], axis=kr)

        acc = te.compute(out_shape, body, name="resize_acc")

        def finish(*idx: Any) -> Any:
            o = idx[axis]
            v = acc[idx]
            if normalise:
                ws = wsum[o]
                v = v / tirx.Select(ws == c(0.0), c(1.0), ws)
            if ctm == "tf_crop_and_resize":
                x = x_of(o)
                v = tirx.Select(tirx.Or(x < c(0.0), x > n_f - c(1.0)), c(ev), v)
            return v

        return te.compute(out_shape, finish, name="resize_out")

    return compute


@_chained("Resize")
def _resize_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Resize whose roi, scales or sizes are run-time inputs: output sizes computed at run time
    (floor(n * scale), or the sizes; keep_aspect_ratio_policy with round-half-up) and taken as
    symbolic dims, then one kernel per resized axis (`_resize_axis_kernel`) in float64 as the
    reference, cast back once at the end."""
    if opset < 11:
        return NotImplemented
    roi, scales, sizes = (list(ins) + [None] * 4)[1:4]
    if not any(_runtime(e) for e in (roi, scales, sizes)):
        return NotImplemented
    return _resize_runtime_core(bb, node, ins[0], roi, scales, sizes, node.attr)


def _resize_runtime_core(bb: relax.BlockBuilder, node: Node, x: Any, roi: Any, scales: Any, sizes: Any, attr: Any) -> Any:
    """_resize_runtime's body; `attr(name, default)` gives the Resize attributes."""

    def sattr(name: str, default: str) -> str:
        v = attr(name, default)
        return v.decode() if isinstance(v, bytes) else str(v)

    dtype = _dt(x)
    r = x.ty.ndim
    axes = [a + r if a < 0 else a for a in (attr("axes", None) or range(r))]
    k = len(axes)
    mode = sattr("mode", "nearest")
    if mode != "nearest" and not dtype.startswith("float"):
        raise LoweringError(f"node {node.label()}: Resize {mode} of {dtype} data is not supported by the cpu target")
    f64 = "float64"
    shape = D.shape_tensor(bb, x)  # [r] int64
    n_f = bb.emit(R.astype(shape, f64))

    def pick(t: Any, i: int) -> Any:
        return bb.emit(R.reshape(R.take(t, relax.const(i, "int64"), axis=0), [1]))

    def full(t: Any, default: Any) -> Any:
        """[k] values on `axes` → [r], `default(d)` ([1] exprs) elsewhere."""
        return bb.emit(R.concat([pick(t, axes.index(d)) if d in axes else default(d) for d in range(r)], axis=0))

    use_sizes = sizes is not None and (_static_len(sizes) or 0) > 0
    if use_sizes:
        sz = bb.emit(R.astype(sizes, "int64"))
        out = full(sz, lambda d: pick(shape, d))
        scale = bb.emit(R.divide(R.astype(out, f64), n_f))
        policy = sattr("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            sel = bb.emit(R.concat([pick(scale, d) for d in axes], axis=0))
            s1 = bb.emit(R.min(sel) if policy == "not_larger" else R.max(sel))
            ones = relax.const(np.ones(1), f64)
            scale = bb.emit(R.concat([bb.emit(R.reshape(s1, [1])) if d in axes else ones for d in range(r)], axis=0))
            rounded = bb.emit(R.astype(R.floor(R.add(R.multiply(scale, n_f), _c(0.5, f64))), "int64"))
            out = bb.emit(R.concat([pick(rounded, d) if d in axes else pick(shape, d) for d in range(r)], axis=0))
    else:
        if scales is None or (_static_len(scales) or 0) == 0:
            raise LoweringError(f"node {node.label()}: Resize needs scales or sizes")
        sc = bb.emit(R.astype(scales, f64))
        scale = full(sc, lambda d: relax.const(np.ones(1), f64))
        out = bb.emit(R.astype(R.multiply(scale, n_f), "int64"))  # truncation, as the reference
    if roi is not None and (_static_len(roi) or 0) > 0:
        rf = bb.emit(R.astype(roi, f64))
        lo = full(bb.emit(R.strided_slice(rf, [0], [0], [k])), lambda d: relax.const(np.zeros(1), f64))
        hi = full(bb.emit(R.strided_slice(rf, [0], [k], [2 * k])), lambda d: relax.const(np.ones(1), f64))
        roi_full = bb.emit(R.concat([lo, hi], axis=0))
    else:
        roi_full = relax.const(np.array([0.0] * r + [1.0] * r), f64)
    dims = D.shape_of_tensor(bb, out, r, "rs").values
    ctm = sattr("coordinate_transformation_mode", "half_pixel")
    nmode = sattr("nearest_mode", "round_prefer_floor")
    antialias = bool(attr("antialias", 0)) and mode != "nearest"
    exclude = bool(attr("exclude_outside", 0))
    ev = float(attr("extrapolation_value", 0.0))
    y = bb.emit(R.astype(x, f64)) if dtype != f64 else x
    for a in axes:
        fn = _resize_axis_kernel(node, a, dims[a], mode, ctm, nmode, float(attr("cubic_coeff_a", -0.75)), antialias, exclude, ev)
        y = bb.emit_te(fn, y, scale, roi_full, primfunc_name_hint=f"resize_axis{a}")
    if dtype != f64:
        if not dtype.startswith("float"):
            info = np.iinfo(dtype) if dtype != "bool" else None
            if info is not None:
                y = bb.emit(R.clip(y, float(info.min), float(info.max)))
        y = bb.emit(R.astype(y, dtype))
    return y


# --- shapes given as run-time tensors -----------------------------------------------------------------


def _dims_k(bb: relax.BlockBuilder, x: Any, k: int) -> Any:
    """x's dims as an int64 tensor of length k (cut, or padded with ones)."""
    r = x.ty.ndim
    sh = D.shape_tensor(bb, x)
    if k <= r:
        return bb.emit(R.strided_slice(sh, [0], [0], [k])) if k < r else sh
    return bb.emit(R.concat([sh, D.int_consts([1] * (k - r))], axis=0))


@_chained("Reshape")
def _reshape_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Reshape to a run-time shape tensor (static length k): 0 copies the input's dim (unless
    allowzero), -1 takes what is left, both resolved at run time; the result has k symbolic dims."""
    if len(ins) < 2 or not _runtime(ins[1]) or not isinstance(ins[0], relax.Expr) or isinstance(ins[0], relax.ShapeExpr):
        return NotImplemented
    x = ins[0]
    k = _static_len(ins[1])
    if k is None:
        raise LoweringError(f"node {node.label()}: Reshape needs a shape of static length on the cpu target")
    t = bb.emit(R.astype(ins[1], "int64")) if _dt(ins[1]) != "int64" else ins[1]
    zero, neg1, one = _c(0, "int64"), _c(-1, "int64"), _c(1, "int64")
    if not node.attr("allowzero", 0):
        t = bb.emit(R.where(R.equal(t, zero), _dims_k(bb, x, k), t))
    total = bb.emit(R.prod(D.shape_tensor(bb, x)))
    known = bb.emit(R.prod(R.where(R.equal(t, neg1), one, t)))
    rest = bb.emit(R.floor_divide(total, R.maximum(known, one)))
    t = bb.emit(R.where(R.equal(t, neg1), rest, t))
    return bb.emit(R.reshape(x, D.shape_of_tensor(bb, t, k, "rh")))


@_chained("Expand")
def _expand_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Expand to a run-time shape tensor (static length k): the output dims are the
    multidirectional broadcast of the input's dims and the shape, computed at run time."""
    if len(ins) < 2 or not _runtime(ins[1]) or isinstance(ins[0], relax.ShapeExpr):
        return NotImplemented
    x = ins[0]
    k = _static_len(ins[1])
    if k is None:
        raise LoweringError(f"node {node.label()}: Expand needs a shape of static length on the cpu target")
    r = x.ty.ndim
    n = max(r, k)
    t = bb.emit(R.astype(R.reshape(ins[1], [k]), "int64"))
    if k < n:
        t = bb.emit(R.concat([D.int_consts([1] * (n - k)), t], axis=0))
    dims = D.shape_tensor(bb, x)
    if r < n:
        dims = bb.emit(R.concat([D.int_consts([1] * (n - r)), dims], axis=0))
    out = bb.emit(R.where(R.equal(t, _c(1, "int64")), dims, t))
    return bb.emit(R.broadcast_to(x, D.shape_of_tensor(bb, out, n, "ex")))


def _scalar_dim(bb: relax.BlockBuilder, e: Any, prefix: str) -> Any:
    """A run-time scalar (any numeric type, shape [] or [1]) as a symbolic int64 dim."""
    return D.shape_of_tensor(bb, bb.emit(R.astype(R.reshape(e, [1]), "int64")), 1, prefix).values[0]


@_chained("OneHot")
def _one_hot_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """OneHot with a run-time depth: the depth becomes a symbolic dim of the output and one TE
    kernel compares each index (negative ones counted from depth) with its position."""
    from tvm import te, tirx

    if len(ins) < 3 or not _runtime(ins[1]):
        return NotImplemented
    idx, values = ins[0], ins[2]
    depth = _scalar_dim(bb, ins[1], "depth")
    r = idx.ty.ndim
    axis = node.attr("axis", -1)
    axis = axis + r + 1 if axis < 0 else axis

    def compute(ix: Any, vals: Any) -> Any:
        dims = list(ix.shape)
        out_shape = dims[:axis] + [depth] + dims[axis:]

        def body(*o: Any) -> Any:
            j = o[axis]
            src = ix[tuple(o[:axis] + o[axis + 1:])]
            v = tirx.Cast("int64", src)
            v = tirx.Select(v < 0, v + depth, v)
            return tirx.Select(v == j, vals[1], vals[0])

        return te.compute(out_shape, body, name="one_hot")

    return bb.emit_te(compute, idx, values, primfunc_name_hint="one_hot_runtime")


@_chained("CenterCropPad")
def _center_crop_pad_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """CenterCropPad to a run-time shape: the target dims become symbolic and one TE kernel reads
    the input at o + (dim - target) // 2 when cropping, o - (target - dim) // 2 when padding
    (zeros outside)."""
    from tvm import te, tirx

    if len(ins) < 2 or not _runtime(ins[1]):
        return NotImplemented
    x = ins[0]
    r = x.ty.ndim
    axes = [a + r if a < 0 else a for a in (node.attr("axes") or range(r))]
    k = _static_len(ins[1])
    if k != len(axes):
        raise LoweringError(f"node {node.label()}: CenterCropPad needs one target per axis")
    target = D.shape_of_tensor(bb, ins[1], k, "ccp").values

    def compute(data: Any) -> Any:
        dims = list(data.shape)
        out = list(dims)
        for a, t in zip(axes, target):
            out[a] = t

        def body(*o: Any) -> Any:
            src, ok = [], tirx.const(True, "bool")
            for d in range(r):
                if d in axes:
                    t, n = out[d], dims[d]
                    s = tirx.Select(t < n, o[d] + tirx.floordiv(n - t, 2), o[d] - tirx.floordiv(t - n, 2))
                    ok = tirx.all(ok, s >= 0, s < n)
                    src.append(tirx.max(tirx.min(s, n - 1), 0))
                else:
                    src.append(o[d])
            return tirx.Select(ok, data[tuple(src)], tirx.const(0, data.dtype))

        return te.compute(out, body, name="center_crop_pad")

    return bb.emit_te(compute, x, primfunc_name_hint="center_crop_pad_runtime")


@_chained("Trilu")
def _trilu_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Trilu with a run-time k: keep x where col - row >= k (upper) or <= k (lower), the
    col - row grid a constant when the matrix dims are static."""
    if len(ins) < 2 or not _runtime(ins[1]):
        return NotImplemented
    x = ins[0]
    m, n = dims_of(x)[-2:]
    if isinstance(m, int) and isinstance(n, int):
        diff = relax.const(np.arange(n)[None, :] - np.arange(m)[:, None], "int64")
    else:
        diff = bb.emit(R.subtract(R.reshape(R.arange(0, n, dtype="int64"), [1, n]), R.reshape(R.arange(0, m, dtype="int64"), [m, 1])))
    k = bb.emit(R.reshape(R.astype(ins[1], "int64"), []))
    mask = bb.emit(R.greater_equal(diff, k) if node.attr("upper", 1) else R.less_equal(diff, k))
    return bb.emit(R.where(mask, x, _c(0, _dt(x))))


@_chained("TopK")
def _topk_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """TopK with a run-time k: a full argsort along the axis (equal values keep the lower index
    first), the first k positions (k a symbolic dim) gathered by one TE kernel."""
    from tvm import te

    if len(ins) < 2 or not _runtime(ins[1]):
        return NotImplemented
    x = ins[0]
    r = x.ty.ndim
    axis = node.attr("axis", -1)
    axis = axis + r if axis < 0 else axis
    largest = bool(node.attr("largest", 1))
    k = _scalar_dim(bb, ins[1], "topk")
    order = bb.emit(R.argsort(x, axis=axis, descending=largest, dtype="int64"))

    def first_k(data: Any, idx: Any) -> Any:
        out = list(idx.shape)
        out[axis] = k
        ind = te.compute(out, lambda *o: idx[o], name="topk_indices")

        def val(*o: Any) -> Any:
            src = list(o)
            src[axis] = ind[o]
            return data[tuple(src)]

        return [te.compute(out, val, name="topk_values"), ind]

    res = bb.emit_te(first_k, x, order, primfunc_name_hint="topk_runtime")
    return [bb.emit(relax.TupleGetItem(res, 0)), bb.emit(relax.TupleGetItem(res, 1))]


@_chained("Split")
def _split_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Split with run-time split sizes (one per output): the sizes become symbolic dims and each
    output one TE copy from the running offset."""
    from tvm import te

    if opset < 13 or len(ins) < 2 or ins[1] is None:
        return NotImplemented
    const = const_value(ins[1])
    if const is not None and (const.size == 0 or np.all(np.asarray(const) > 0)):
        return NotImplemented  # the frontend's split (it refuses zero-size pieces)
    x = ins[0]
    r = x.ty.ndim
    axis = node.attr("axis", 0)
    axis = axis + r if axis < 0 else axis
    n_out = len(node.outputs)
    if _static_len(ins[1]) != n_out:
        raise LoweringError(f"node {node.label()}: Split needs one size per output")
    if const is not None:
        sizes = [tvm.tirx.const(int(v), "int64") for v in np.asarray(const).reshape(-1)]
    else:
        sizes = D.shape_of_tensor(bb, ins[1], n_out, "split").values
    outs: list[Any] = []
    off: Any = tvm.tirx.const(0, "int64")
    for i, sz in enumerate(sizes):
        def piece(data: Any, start: Any, sz: Any = sz) -> Any:  # start: passed, so the kernel takes it
            shape = list(data.shape)
            shape[axis] = sz
            return te.compute(shape, lambda *o: data[tuple(o[d] + start if d == axis else o[d] for d in range(r))], name="split")

        outs.append(bb.emit_te(piece, x, off, primfunc_name_hint=f"split_runtime{i}"))
        off = off + sz
    return outs


@_chained("ReverseSequence")
def _reverse_sequence_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """ReverseSequence with run-time sequence_lens: the gather index (n - 1 - t below n, t
    above) computed at run time, one gather_elements."""
    if len(ins) < 2 or not _runtime(ins[1]):
        return NotImplemented
    x = ins[0]
    shape = _static(node, x, "input")
    r = len(shape)
    tax, bax = node.attr("time_axis", 0), node.attr("batch_axis", 1)
    t_shape, b_shape = [1] * r, [1] * r
    t_shape[tax], b_shape[bax] = shape[tax], shape[bax]
    pos = relax.const(np.arange(shape[tax], dtype=np.int64).reshape(t_shape), "int64")
    n = bb.emit(R.reshape(R.astype(ins[1], "int64"), b_shape))
    idx = bb.emit(R.where(R.less(pos, n), R.subtract(R.subtract(n, _c(1, "int64")), pos), pos))
    return bb.emit(R.gather_elements(x, R.broadcast_to(idx, shape), axis=tax))


@_chained("Col2Im")
def _col2im_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Col2Im with a run-time image_shape / block_shape: both become symbolic dims and one TE
    kernel sums, for each image position, the block entries k (unravelled over the block) whose
    block position b = (p + pad - k·dilation) / stride is whole and inside the block grid."""
    from tvm import te, tirx

    if len(ins) < 3 or not (_runtime(ins[1]) or _runtime(ins[2])):
        return NotImplemented
    x = ins[0]
    nd = _static_len(ins[1])
    if nd is None or _static_len(ins[2]) != nd:
        raise LoweringError(f"node {node.label()}: Col2Im needs image_shape and block_shape of one static length")

    def dims_of(e: Any, prefix: str) -> list[Any]:
        v = const_value(e)
        if v is not None:
            return [tvm.tirx.const(int(a), "int64") for a in v.reshape(-1)]
        return list(D.shape_of_tensor(bb, e, nd, prefix).values)

    image, block = dims_of(ins[1], "img"), dims_of(ins[2], "blk")
    dil = list(node.attr("dilations") or [1] * nd)
    pads = list(node.attr("pads") or [0] * (2 * nd))
    strides = list(node.attr("strides") or [1] * nd)

    def compute(data: Any) -> Any:
        n, ck, num_l = data.shape
        kprod = block[0]
        for b_ in block[1:]:
            kprod = kprod * b_
        c = tirx.floordiv(ck, kprod)
        nb = [tirx.floordiv(image[d] + pads[d] + pads[nd + d] - (dil[d] * (block[d] - 1) + 1), strides[d]) + 1 for d in range(nd)]
        k = te.reduce_axis((0, kprod), name="k")

        def body(i: Any, ch: Any, *p: Any) -> Any:
            rest = k
            koff = [None] * nd
            for d in range(nd - 1, -1, -1):
                koff[d] = tirx.floormod(rest, block[d])
                rest = tirx.floordiv(rest, block[d])
            ok = tirx.const(True, "bool")
            lin = tirx.const(0, "int64")
            for d in range(nd):
                t = p[d] + pads[d] - koff[d] * dil[d]
                bd = tirx.floordiv(t, strides[d])
                ok = tirx.all(ok, tirx.floormod(t, strides[d]) == 0, bd >= 0, bd < nb[d])
                lin = lin * nb[d] + tirx.max(tirx.min(bd, nb[d] - 1), 0)
            v = data[i, ch * kprod + k, tirx.min(lin, num_l - 1)]
            return te.sum(tirx.Select(ok, v, tirx.const(0, data.dtype)), axis=k)

        return te.compute([n, c, *image], body, name="col2im")

    return bb.emit_te(compute, x, primfunc_name_hint="col2im_runtime")


@_chained("Upsample")
def _upsample_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Upsample with run-time scales: Resize's run-time kernels with Upsample's semantics
    (asymmetric coordinates, floor rounding for nearest)."""
    if len(ins) < 2 or not _runtime(ins[1]):
        return NotImplemented
    over = {"mode": _str_attr(node, "mode", "nearest"), "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    return _resize_runtime_core(bb, node, ins[0], None, ins[1], None, lambda name, default=None: over.get(name, default))


@_chained("Dropout")
def _dropout_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Dropout with a run-time training_mode (or ratio): the input unchanged and an all-true
    mask, with a run-time assertion that it is not training with a nonzero ratio (random draws
    are not supported)."""
    training = ins[2] if len(ins) > 2 else None
    ratio = ins[1] if len(ins) > 1 else None
    if not (_runtime(training) or training is not None and _runtime(ratio)):
        return NotImplemented
    x = ins[0]
    t = bb.emit(R.reshape(R.astype(training, "bool"), []))
    rv = bb.emit(R.reshape(R.astype(ratio, "float32"), [])) if ratio is not None else _c(0.5, "float32")
    ok = bb.emit(R.logical_or(R.logical_not(t), R.equal(rv, _c(0.0, "float32"))))
    bb.emit(R.assert_op(ok, format="training-mode Dropout with a nonzero ratio is not supported by the cpu target"))
    y = bb.emit(R.astype(x, _dt(x)))
    if len(node.outputs) > 1:
        return [y, bb.emit(R.ones(dims_of(x), "bool"))]
    return y


@_chained("ConstantOfShape")
def _constant_of_shape_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """ConstantOfShape of a run-time shape tensor: the dims become symbolic, one fill kernel."""
    if not ins or not _runtime(ins[0]) or isinstance(ins[0], relax.ShapeExpr):
        return NotImplemented
    n = _static_len(ins[0])
    if n is None:
        raise LoweringError(f"node {node.label()}: ConstantOfShape needs a shape of static length on the cpu target")
    value = node.attr("value")
    arr = np.asarray(value.numpy()).reshape(-1) if value is not None else np.zeros(1, np.float32)
    dtype = "bool" if arr.dtype == np.bool_ else str(arr.dtype)
    shape = D.shape_of_tensor(bb, ins[0], n, "cos") if n else relax.ShapeExpr([])
    return bb.emit(R.full(shape, relax.const(arr[0], dtype), dtype))


@_chained("NonMaxSuppression")
def _nms_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """NonMaxSuppression: TOPI's all-class NMS with max_output_boxes_per_class / iou_threshold /
    score_threshold as tensors (run-time or constant; Relax's legalization of the op keeps only
    constants), then the rows cut to the detection count at run time. TOPI suppresses when
    IoU >= threshold, ONNX when IoU > threshold: the threshold is moved to the next float32 up."""
    from tvm import te, tirx, topi

    extra = [ins[i] if len(ins) > i else None for i in (2, 3, 4)]
    boxes, scores = ins[0], ins[1]
    if node.attr("center_point_box", 0):
        xc, yc, w, h = (bb.emit(R.strided_slice(boxes, [2], [i], [i + 1])) for i in range(4))
        two = _c(2.0, _dt(boxes))
        hw, hh = bb.emit(R.divide(w, two)), bb.emit(R.divide(h, two))
        boxes = bb.emit(R.concat([R.subtract(yc, hh), R.subtract(xc, hw), R.add(yc, hh), R.add(xc, hw)], axis=2))
    # (max boxes as [1], thresholds as scalars: the forms TOPI's tensor paths read)
    defaults = [("int64", 0, [1]), ("float32", 0.0, []), ("float32", -np.inf, [])]
    args = []
    for e, (dt, dv, shape) in zip(extra, defaults):
        if e is None:
            e = relax.const(np.array(dv, dtype=dt), dt)
        args.append(bb.emit(R.reshape(R.astype(e, dt), shape)))
    def next_up(t: Any) -> Any:  # the next float32 above t >= 0 (its bits + 1); t < 0 suppresses alike
        return te.compute((), lambda: tirx.Select(t[()] >= 0.0, tirx.reinterpret("float32", tirx.reinterpret("int32", t[()]) + 1), t[()]),
                          name="iou_next_up")

    args[1] = bb.emit_te(next_up, args[1], primfunc_name_hint="nms_iou")
    out = bb.emit_te(lambda b, s, m, iou, st: topi.vision.all_class_non_max_suppression(b, s, m, iou, st, "onnx"),
                     boxes, scores, *args, primfunc_name_hint="nms")
    sel = bb.emit(relax.TupleGetItem(out, 0))
    count = bb.emit(relax.TupleGetItem(out, 1))
    end = bb.emit_te(lambda c: te.compute((2,), lambda i: tirx.if_then_else(i == 0, tirx.Cast("int64", c[0]), tirx.const(3, "int64"))),
                     count, primfunc_name_hint="nms_end")
    return bb.emit(R.dynamic_strided_slice(sel, D.int_consts([0, 0]), end, D.int_consts([1, 1])))


@_chained("HannWindow", "HammingWindow", "BlackmanWindow")
def _window(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Hann / Hamming / Blackman windows of a run-time (or constant) size: the length becomes a
    symbolic dim, the values one TE kernel in float64 (N = size, or size - 1 when symmetric)."""
    from tvm import te, tirx

    size = ins[0]
    sv = const_value(size)
    n = int(np.asarray(sv).reshape(-1)[0]) if sv is not None else _scalar_dim(bb, size, "win")
    dtype = _onnx_dtype(int(node.attr("output_datatype", 1)))
    periodic = bool(node.attr("periodic", 1))
    op = node.op_type

    def compute() -> Any:
        n_1 = tirx.Cast("float64", n if periodic else n - 1)

        def w(i: Any) -> Any:
            a = tirx.Cast("float64", i) * tirx.const(np.pi, "float64") / n_1
            if op == "HannWindow":
                v = tirx.sin(a) * tirx.sin(a)
            elif op == "HammingWindow":
                v = tirx.const(25.0 / 46.0, "float64") - tirx.cos(a * 2.0) * tirx.const(1 - 25.0 / 46.0, "float64")
            else:
                v = tirx.const(0.42, "float64") - tirx.cos(a * 2.0) * 0.5 + tirx.cos(a * 4.0) * 0.08
            return tirx.Cast(dtype, v)

        return te.compute([n], w, name=op.lower())

    return bb.emit_te(compute, primfunc_name_hint=op.lower())


@_chained("AffineGrid")
def _affine_grid_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """AffineGrid with a run-time size: the spatial dims (size[2:]) become symbolic and one TE
    kernel applies theta to the normalised base grid (x, y[, z], 1) as the reference builds it."""
    from tvm import te, tirx

    if len(ins) < 2 or not _runtime(ins[1]):
        return NotImplemented
    theta = ins[0]
    nd = _static_len(ins[1])
    if nd not in (4, 5):
        raise LoweringError(f"node {node.label()}: AffineGrid needs a size of length 4 or 5")
    k = nd - 2
    sz = bb.emit(R.strided_slice(R.astype(ins[1], "int64"), [0], [2], [nd]))
    dims = list(D.shape_of_tensor(bb, sz, k, "ag").values)
    align = bool(node.attr("align_corners", 0))
    dtype = _dt(theta)

    def compute(th: Any) -> Any:
        n = th.shape[0]
        kk = te.reduce_axis((0, k + 1), name="k")

        def base(d: Any, i: Any) -> Any:  # coordinate of index i along spatial dim d
            L = tirx.Cast("float64", dims[d])
            fi = tirx.Cast("float64", i)
            return (fi * 2.0 / (L - 1.0) - 1.0) if align else ((fi * 2.0 + 1.0) / L - 1.0)

        def body(b: Any, *rest: Any) -> Any:
            pos, j = rest[:k], rest[k]
            # homogeneous base point: x (last spatial dim), y, (z), then 1
            coords = [base(k - 1 - t, pos[k - 1 - t]) for t in range(k)] + [tirx.const(1.0, "float64")]

            def pick(idx: Any) -> Any:
                out = coords[-1]
                for t in range(k - 1, -1, -1):
                    out = tirx.Select(idx == t, coords[t], out)
                return out

            return te.sum(tirx.Cast("float64", th[b, j, kk]) * pick(kk), axis=kk)

        acc = te.compute([n, *dims, k], body, name="affine_grid_acc")
        return te.compute([n, *dims, k], lambda *i: tirx.Cast(dtype, acc[i]), name="affine_grid")

    return bb.emit_te(compute, theta, primfunc_name_hint="affine_grid")


@_chained("ConvInteger")
def _conv_integer_runtime(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """ConvInteger with run-time zero points: (x - x_zp) and (w - w_zp) widened to int32, then an
    int32 convolution padding with zeros (= padding x with its zero point)."""
    zps = [ins[i] if len(ins) > i else None for i in (2, 3)]
    if not any(_runtime(z) for z in zps):
        return NotImplemented
    x, w = ins[0], ins[1]
    nd = x.ty.ndim - 2
    if _str_attr(node, "auto_pad", "NOTSET") != "NOTSET":
        raise LoweringError(f"node {node.label()}: ConvInteger with auto_pad is not supported by the cpu target")
    xi = bb.emit(R.astype(x, "int32"))
    wi = bb.emit(R.astype(w, "int32"))
    if zps[0] is not None:
        xi = bb.emit(R.subtract(xi, R.astype(zps[0], "int32")))
    if zps[1] is not None:
        z = bb.emit(R.astype(zps[1], "int32"))
        if z.ty.ndim == 1:  # per output channel
            z = bb.emit(R.reshape(z, [-1] + [1] * (nd + 1)))
        wi = bb.emit(R.subtract(wi, z))
    pads = list(node.attr("pads") or [0] * (2 * nd))
    conv = {1: R.nn.conv1d, 2: R.nn.conv2d, 3: R.nn.conv3d}.get(nd)
    if conv is None:
        raise LoweringError(f"node {node.label()}: {nd}-D ConvInteger is not supported by the cpu target")
    return bb.emit(conv(xi, wi, strides=list(node.attr("strides") or [1] * nd), padding=pads,
                        dilation=list(node.attr("dilations") or [1] * nd), groups=int(node.attr("group", 1)), out_dtype="int32"))


@converter("EyeLike")
def _eye_like(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """EyeLike of a 2-D input of static shape: ones on the k-th diagonal, in `dtype` (default
    the input's); the values do not depend on the input's, only its shape."""
    dims = _static(node, ins[0], "input")
    if len(dims) != 2:
        raise LoweringError(f"node {node.label()}: EyeLike needs a 2-D input")
    code = node.attr("dtype")
    dtype = _onnx_dtype(int(code)) if code is not None else _dt(ins[0])
    eye = np.eye(dims[0], dims[1], int(node.attr("k", 0)), dtype=np.bool_ if dtype == "bool" else dtype)
    return bb.emit(R.astype(relax.const(eye, dtype), dtype))


# --- NaN kept as onnxruntime keeps it ------------------------------------------------------------
# TVM's max/min lower to `a > b ? a : b` (an ordered compare: false on NaN), so max(x, 0) turns
# NaN into 0. Written as a select whose compare is false on NaN and whose false arm is x, NaN
# passes through; on x86 the select is still one vmaxps/vminps with x as its second operand (the
# one MAXPS returns when either is NaN), so conv epilogues stay as fast.


def _float(x: Any) -> bool:
    return _dt(x).startswith(("float", "bfloat"))


def _bound(bb: relax.BlockBuilder, x: Any, value: float, lower: bool) -> Any:
    """max(x, value) (`lower`) or min(x, value) keeping a NaN x, as one elementwise TE block
    `value > x ? value : x` (`<` for min): the compare is false on NaN, so x passes; -0.0 stays
    -0.0 for value 0, as onnxruntime. One block, so the schedules inline it into a conv/matmul
    epilogue as they did max/min (relax where(less(...)) left a bool mask buffer in the kernel)."""
    from tvm import te, tirx

    dtype = _dt(x)

    def f(t: te.Tensor) -> te.Tensor:
        c = tirx.const(value, dtype)
        return te.compute(t.shape, lambda *i: tirx.Select(c > t(*i) if lower else c < t(*i), c, t(*i)),
                          name="clamp_nan", tag="elemwise")

    return bb.emit_te(f, x, primfunc_name_hint="clamp_nan")


def lower_bound(bb: relax.BlockBuilder, x: Any, lo: float) -> Any:
    return _bound(bb, x, lo, True)


def upper_bound(bb: relax.BlockBuilder, x: Any, hi: float) -> Any:
    return _bound(bb, x, hi, False)


@converter("Relu")
def _relu(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    x = ins[0]
    if not _float(x):
        return NotImplemented
    return lower_bound(bb, x, 0.0)


def _only_cast_to_int(node: Node) -> bool:
    """Every reader of `node`'s output is a Cast to an integer type."""
    uses = node.outputs[0].consumers() if node.outputs else []
    return bool(uses) and not node.outputs[0].is_graph_output() and all(
        u.op_type == "Cast" and u.attr("to") is not None and _onnx_dtype(int(u.attr("to"))).startswith(("int", "uint"))
        for u in uses)


@converter("Clip")
def _clip_op(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Clip with constant bounds → one elementwise block per bound (the frontend's NaN handling
    of the bounds emits TE kernels that FuseTIR cannot merge into a group); floats keep NaN."""
    x = ins[0]
    if opset < 11:
        bounds = [node.attr("min"), node.attr("max")]
    else:
        bounds = []
        for e in (ins[1] if len(ins) > 1 else None, ins[2] if len(ins) > 2 else None):
            if e is None:
                bounds.append(None)
                continue
            v = const_value(e)
            if v is None or v.size != 1:
                return NotImplemented
            f = float(v.reshape(()))
            bounds.append(None if np.isnan(f) else f)
    dtype = _dt(x)
    if not _float(x) or _only_cast_to_int(node):
        # (a requantize's Clip before its Cast to uint8/int8: NaN has no integer value to keep,
        # and plain max/min let LLVM fuse the clamp with the conversion: int8 ResNet-50 23.6 ms
        # vs 26.9 ms with the NaN-keeping selects, 1 thread)
        out = x
        if bounds[0] is not None:
            out = bb.emit(R.maximum(out, _c(bounds[0], dtype)))
        if bounds[1] is not None:
            out = bb.emit(R.minimum(out, _c(bounds[1], dtype)))
        return out
    if dtype != "bfloat16" and (bounds[0] is None) != (bounds[1] is None):
        # the missing bound is the type's largest / lowest finite value (ONNX; onnxruntime clips
        # Inf to it)
        fi = np.finfo(dtype)
        bounds = [float(fi.min) if bounds[0] is None else bounds[0], float(fi.max) if bounds[1] is None else bounds[1]]
    out = x
    if bounds[0] is not None:
        out = lower_bound(bb, out, float(np.array(bounds[0]).astype(dtype)))
    if bounds[1] is not None:
        out = upper_bound(bb, out, float(np.array(bounds[1]).astype(dtype)))
    return out


# --- NaN where onnxruntime keeps it (or drops it) in the remaining elementwise activations -------------------
# (found by tools/fuzz.py's valid-cpu family: the frontend's forms give 0 for NaN in Sign,
# HardSigmoid and Selu, and NaN in ThresholdedRelu, the opposite of onnxruntime)


@converter("Sign")
def _sign(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """sign(x), NaN for NaN (onnxruntime's value; the compare-based form gave 0)."""
    x = ins[0]
    if not _float(x):
        return NotImplemented
    return bb.emit(R.where(R.isnan(x), x, R.sign(x)))


@converter("HardSigmoid")
def _hard_sigmoid(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """max(0, min(1, alpha·x + beta)) keeping NaN (the NaN-keeping bounds of Clip)."""
    x = ins[0]
    if not _float(x):
        return NotImplemented
    dtype = _dt(x)
    y = bb.emit(R.add(R.multiply(x, _c(float(node.attr("alpha", 0.2)), dtype)), _c(float(node.attr("beta", 0.5)), dtype)))
    return upper_bound(bb, lower_bound(bb, y, 0.0), 1.0)


@converter("Selu")
def _selu(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """gamma · (x > 0 ? x : alpha·(exp(x) − 1)): NaN stays NaN (the else branch computes it)."""
    x = ins[0]
    if not _float(x):
        return NotImplemented
    dtype = _dt(x)
    alpha, gamma = float(node.attr("alpha", 1.67326319217681884765625)), float(node.attr("gamma", 1.05070102214813232421875))
    neg = R.multiply(_c(alpha, dtype), R.subtract(R.exp(x), _c(1.0, dtype)))
    return bb.emit(R.multiply(_c(gamma, dtype), R.where(R.greater(x, _c(0.0, dtype)), x, neg)))


@converter("ThresholdedRelu")
def _thresholded_relu(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """x > alpha ? x : 0: NaN gives 0, as onnxruntime."""
    x = ins[0]
    if not _float(x):
        return NotImplemented
    dtype = _dt(x)
    return bb.emit(R.where(R.greater(x, _c(float(node.attr("alpha", 1.0)), dtype)), x, _c(0.0, dtype)))

"""`fuse-conv-bn`: fold per-output-channel affine ops into the weights of the op before them.

Rules (each registered, so `graphopt-compile --explain conv-bn` shows why one did not fire):

- `conv-bn`: Conv / ConvTranspose / Gemm / MatMul with constant weights, then an inference-mode
  BatchNormalization  →  one Conv / ConvTranspose / Gemm with rescaled weights and a new bias.
- `conv-add-bias`: Conv / ConvTranspose + a per-channel (or scalar) constant  →  Conv with bias.
- `conv-mul-scale`: Conv / ConvTranspose * a per-channel (or scalar) constant  →  Conv with
  rescaled weights and bias.

Folded constants are computed in float64 and cast back to the weight's dtype. Constants are
read with the ONNX IR's rules: an initializer that is also a graph input can be overridden by
the user, so it is not a constant, except in models with IR version < 4 where initializers had
to be listed as inputs (onnxruntime treats those as constants too).

Shared weights: the rules never change an existing initializer; they create new ones. When the
weight or bias is also read by another node, folding would keep the old tensor alive for that
reader and add a rescaled copy (the model grows), so by default the rules refuse;
`fuse-conv-bn{copy-shared=1}` folds anyway and keeps the original for the other readers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from graphopt.ir import Node, Value
from graphopt.pattern import Fail, Match, P, Pattern, RewriteBuilder, RewritePass, Rule, const_array, register_rule
from graphopt.transform import register_pass

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

def _k(name: str) -> Pattern:
    """A constant (P.const: an initializer a user cannot override -- in IR < 4 models those listed
    as graph inputs too -- or a Constant node)."""
    return P.const(name=name)


def _array(v: Value | None) -> np.ndarray | None:
    if v is None:
        return None
    arr = const_array(v)
    return None if arr is None else np.asarray(arr)


# --- the producer (Conv / ConvTranspose / Gemm / MatMul) ---------------------------------------
@dataclass
class _Producer:
    node: Node
    w: np.ndarray
    bias: np.ndarray | None  # the effective bias in float64 (Gemm: beta * C), or None
    channels: int  # number of output channels (the axis the affine op must act on)


def _producer(node: Node, w_val: Value, b_val: Value | None, copy_shared: bool, opset: int | None) -> _Producer | Fail:
    """Read the producer's weight and bias; Fail when folding into it is not safe."""
    w = _array(w_val)
    b = _array(b_val)
    if w is None or (b_val is not None and b is None):
        return Fail("weight or bias is not a constant")
    if w.dtype not in _FLOATS:
        return Fail(f"weight dtype {w.dtype} is not float16/float32/float64")
    if b is not None and b.dtype != w.dtype:
        return Fail(f"bias dtype {b.dtype} differs from weight dtype {w.dtype}")
    if not copy_shared:
        for what, v in (("weight", w_val), ("bias", b_val)):
            if v is None:
                continue
            others = [u.label() for u in v.consumers() if u is not node]
            if others or len(v.uses()) > 1:
                return Fail(
                    f"{what} {v.name!r} is also read by {', '.join(others) or 'another input'}: folding would need a copy "
                    "(fuse-conv-bn{copy-shared=1})"
                )
            if v.is_graph_output():
                return Fail(f"{what} {v.name!r} is a graph output")
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        if w.ndim < 3:
            return Fail(f"{op} weight has rank {w.ndim}, expected >= 3")
        if op == "Conv":
            channels = w.shape[0]
        else:
            group = int(node.attr("group", 1))
            if group < 1 or w.shape[0] % group:
                return Fail(f"ConvTranspose weight dim 0 ({w.shape[0]}) is not a multiple of group={group}")
            channels = w.shape[1] * group
        if b is not None and b.shape != (channels,):
            return Fail(f"bias shape {list(b.shape)} is not [{channels}]")
        return _Producer(node, w, None if b is None else b.astype(np.float64), channels)
    if opset is not None and opset < 7:
        return Fail(f"opset {opset} < 7: Gemm's bias does not broadcast there")
    if w.ndim != 2:
        return Fail(f"{op} weight has rank {w.ndim}, expected 2")
    if op == "MatMul":
        x = node.inputs[0]
        rank = len(x.shape) if x is not None and x.shape is not None else None
        if rank != 2:
            return Fail(f"MatMul input rank is {'unknown' if rank is None else rank}, need 2 (the BN channel axis is then the weight's columns)")
        return _Producer(node, w, None, w.shape[1])
    # Gemm
    channels = w.shape[0] if node.attr("transB", 0) else w.shape[1]
    bias = None
    if b is not None:
        if b.ndim > 2 or (b.ndim >= 1 and b.shape[-1] not in (1, channels)):
            return Fail(f"Gemm C shape {list(b.shape)} does not broadcast to [M, {channels}]")
        bias = float(node.attr("beta", 1.0)) * b.astype(np.float64)
    return _Producer(node, w, bias, channels)


def _scale_weight(p: _Producer, s: np.ndarray) -> np.ndarray:
    """The weight with output channel c multiplied by s[c], in float64."""
    w = p.w.astype(np.float64)
    op = p.node.op_type
    if op == "Conv":
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    if op == "ConvTranspose":  # W: [C_in, C_out/group, k...]; output channel g*C_out/group + j
        group = int(p.node.attr("group", 1))
        cin, cog = w.shape[0], w.shape[1]
        grouped = w.reshape((group, cin // group, cog) + w.shape[2:])
        return (grouped * s.reshape((group, 1, cog) + (1,) * (w.ndim - 2))).reshape(w.shape)
    if op == "Gemm" and p.node.attr("transB", 0):
        return w * s[:, None]
    return w * s[None, :]  # Gemm transB=0, MatMul: output channels are the weight's columns


def _rebuild(b: RewriteBuilder, p: _Producer, x: Value, w_name: str, w: np.ndarray, bias: np.ndarray | None, b_name: str) -> Value:
    """The producer again, with weight `w` and bias `bias` (float64, cast to the weight dtype)."""
    dtype = p.w.dtype
    w_v = b.initializer(w.astype(dtype), w_name + "_fused")
    b_v = None if bias is None else b.initializer(np.asarray(bias).astype(dtype), b_name + "_fused")
    node = p.node
    if node.op_type == "MatMul":
        assert b_v is not None
        return b.op.Gemm(x, w_v, b_v)
    attrs = [a for k, a in node.attributes.items() if not (node.op_type == "Gemm" and k == "beta")]
    inputs = [x, w_v] + ([b_v] if b_v is not None else [])
    return b.node(node.op_type, inputs, attrs, domain=node.domain).outputs[0]


def _channel_vector(c: np.ndarray, rank: int, channels: int) -> np.ndarray | Fail:
    """`c` (which an Add/Mul broadcasts against a [N, C, ...] tensor of rank `rank`) as a [C]
    float64 vector, or Fail when it also varies along another axis or changes the shape."""
    if c.ndim > rank:
        return Fail(f"constant of rank {c.ndim} would broadcast the rank-{rank} output to a higher rank")
    dims = (1,) * (rank - c.ndim) + tuple(c.shape)
    if any(d != 1 for i, d in enumerate(dims) if i != 1) or dims[1] not in (1, channels):
        return Fail(f"constant shape {list(c.shape)} does not broadcast along the {channels} channels only")
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,)).copy()


# --- rules ---------------------------------------------------------------------------------------
class _FoldRule(Rule):
    copy_shared: bool = False

    def __init__(self, *, copy_shared: bool = False) -> None:
        super().__init__()
        self.copy_shared = copy_shared

    def _plan(self, m: Match, compute: bool = True) -> object:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, m: Match) -> bool | Fail:
        # the check is the plan without the (costly) weight arithmetic
        plan = self._plan(m, compute=False)
        return plan if isinstance(plan, Fail) else True


class ConvBatchNormalization(_FoldRule):
    """BatchNormalization(Conv(x, W[, b]), scale, B, mean, var) → Conv(x, W*s, (b-mean)*s+B).

    s = scale / sqrt(var + epsilon), per output channel. Also for ConvTranspose (W is
    [C_in, C_out/group, k...]: output channel g*C_out/group + j scales W[g-block, j]), Gemm with a
    constant B (transB-aware; C becomes (beta*C - mean)*s + B, beta 1) and MatMul(x, W) with a
    2-D x (becomes Gemm(x, W*s, -mean*s + B)); BN acts on a 2-D [N, C] tensor there.

    Must not fire: weights, bias or BN parameters not constant (graph inputs, or initializers a
    user can override); the producer's output used elsewhere; the weight or bias read by
    another node (unless copy-shared); BN in training mode (training_mode=1, its mean/var
    outputs used, spatial=0); dtypes that differ or are not float16/32/64; parameter shapes
    other than [C].
    """

    name = "conv-bn"
    x = P.any()
    w = _k("W")
    bias = P.optional(_k("b"))
    prod = P.op(("Conv", "ConvTranspose", "Gemm", "MatMul"), x, w, bias)
    scale, shift, mean, var = _k("scale"), _k("B"), _k("mean"), _k("var")
    pattern = P.op("BatchNormalization", prod, scale, shift, mean, var)

    def _plan(self, m: Match, compute: bool = True) -> tuple[_Producer, np.ndarray, np.ndarray] | Fail | None:
        bn = m.root
        if bn.attr("training_mode", 0):
            return Fail("BatchNormalization is in training mode (training_mode=1)")
        if not bn.attr("spatial", 1):
            return Fail("BatchNormalization has spatial=0 (per-activation statistics)")
        extra = [o.name for o in bn.outputs[1:] if o.uses() or o.is_graph_output()]
        if extra:
            return Fail(f"BatchNormalization's training outputs are used: {', '.join(extra)}")
        p = _producer(m[self.prod], m.value(self.w), m.value(self.bias), self.copy_shared, m.opset())
        if isinstance(p, Fail):
            return p
        params = [_array(m.value(q)) for q in (self.scale, self.shift, self.mean, self.var)]
        for name, a in zip(("scale", "B", "mean", "var"), params):
            if a is None:
                return Fail(f"BN {name} is not a constant")
            if a.dtype != p.w.dtype:
                return Fail(f"BN {name} dtype {a.dtype} differs from the weight dtype {p.w.dtype}")
            if a.shape != (p.channels,):
                return Fail(f"BN {name} shape {list(a.shape)} is not [{p.channels}]")
        if not compute:
            return None
        scale, shift, mean, var = (a.astype(np.float64) for a in params)  # type: ignore[union-attr]
        eps = float(bn.attr("epsilon", 1e-5))
        with np.errstate(invalid="ignore", divide="ignore"):  # var + eps <= 0: NaN/inf, as BN itself gives
            s = scale / np.sqrt(var + eps)
        bias = p.bias if p.bias is not None else np.zeros(p.channels)
        return p, _scale_weight(p, s), (bias - mean) * s + shift

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value | Fail:
        plan = self._plan(m)
        if isinstance(plan, Fail):
            return plan
        assert plan is not None
        p, w, bias = plan
        bname = m.value(self.bias).name if m.value(self.bias) is not None else m.value(self.w).name + "_bias"
        return _rebuild(b, p, m[self.x], m.value(self.w).name, w, bias, bname)


class _ConvElementwise(_FoldRule):
    op_type: ClassVar[str] = ""

    def _plan(self, m: Match, compute: bool = True) -> tuple[_Producer, np.ndarray, np.ndarray | None] | Fail | None:
        p = _producer(m[self.prod], m.value(self.w), m.value(self.bias), self.copy_shared, m.opset())  # type: ignore[attr-defined]
        if isinstance(p, Fail):
            return p
        c = _array(m.value(self.c))  # type: ignore[attr-defined]
        if c is None:
            return Fail("the other operand is not a constant")
        if c.dtype != p.w.dtype:
            return Fail(f"constant dtype {c.dtype} differs from the weight dtype {p.w.dtype}")
        vec = _channel_vector(c, p.w.ndim, p.channels)
        if isinstance(vec, Fail) or not compute:
            return vec if isinstance(vec, Fail) else None
        return self._fold(p, vec)

    def _fold(self, p: _Producer, vec: np.ndarray) -> tuple[_Producer, np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value | Fail:
        plan = self._plan(m)
        if isinstance(plan, Fail):
            return plan
        assert plan is not None
        p, w, bias = plan
        wv, bv = m.value(self.w), m.value(self.bias)  # type: ignore[attr-defined]
        return _rebuild(b, p, m[self.x], wv.name, w, bias, bv.name if bv is not None else wv.name + "_bias")  # type: ignore[attr-defined]


class ConvAddBias(_ConvElementwise):
    """Conv(x, W[, b]) + c → Conv(x, W, b + c), c constant per output channel.

    c may be a scalar or have shape [C, 1, ...] / [1, C, 1, ...] (it broadcasts along the channel
    axis only). Also for ConvTranspose. Must not fire: c varies along a non-channel axis or has
    a higher rank than the output (the Add would change the shape); c, W or b not constant;
    dtypes differ or are not float; the Conv output used elsewhere; W or b shared (unless
    copy-shared).
    """

    name = "conv-add-bias"
    x = P.any()
    w = _k("W")
    bias = P.optional(_k("b"))
    prod = P.op(("Conv", "ConvTranspose"), x, w, bias)
    c = _k("c")
    pattern = P.op("Add", prod, c, commutative=True)

    def _fold(self, p: _Producer, vec: np.ndarray) -> tuple[_Producer, np.ndarray, np.ndarray | None]:
        bias = p.bias if p.bias is not None else np.zeros(p.channels)
        return p, p.w.astype(np.float64), bias + vec


class ConvMulScale(_ConvElementwise):
    """Conv(x, W[, b]) * s → Conv(x, W*s, b*s), s constant per output channel.

    s may be a scalar or have shape [C, 1, ...] / [1, C, 1, ...]. Also for ConvTranspose
    (group-aware). Must not fire: s varies along a non-channel axis or has a higher rank than
    the output; s, W or b not constant; dtypes differ or are not float; the Conv output used
    elsewhere; W or b shared (unless copy-shared).
    """

    name = "conv-mul-scale"
    x = P.any()
    w = _k("W")
    bias = P.optional(_k("b"))
    prod = P.op(("Conv", "ConvTranspose"), x, w, bias)
    c = _k("s")
    pattern = P.op("Mul", prod, c, commutative=True)

    def _fold(self, p: _Producer, vec: np.ndarray) -> tuple[_Producer, np.ndarray, np.ndarray | None]:
        return p, _scale_weight(p, vec), None if p.bias is None else p.bias * vec


ConvBatchNorm = ConvBatchNormalization

_DEFAULT_RULES = (ConvBatchNormalization(), ConvAddBias(), ConvMulScale())
_COPY_RULES = tuple(type(r)(copy_shared=True) for r in _DEFAULT_RULES)
for _r in _DEFAULT_RULES:
    register_rule(_r)


@register_pass
@dataclass(frozen=True)
class FuseConvBn(RewritePass):
    """Fold BatchNormalization, per-channel Add and Mul into Conv/ConvTranspose (and BN into Gemm/MatMul) weights.

    Rules: conv-bn, conv-add-bias, conv-mul-scale (stats: rewrites per rule, and
    initializers-removed: the old weights, biases and parameters left unused). `copy-shared=1`
    also folds when the weight or bias is read by another node (a rescaled copy is made).
    """

    name: ClassVar[str] = "fuse-conv-bn"
    copy_shared: bool = False

    def get_rules(self):
        return _COPY_RULES if self.copy_shared else _DEFAULT_RULES

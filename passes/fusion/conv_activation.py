"""`fuse-conv-activation`: Conv / Gemm followed by an activation  →  onnxruntime's com.microsoft
FusedConv / FusedGemm.

Rule `conv-activation` (registered, so `graphopt-compile --explain conv-activation` shows why it
did not fire): Conv(x, W[, b]) then Relu / LeakyRelu / Clip / Sigmoid / Tanh / HardSigmoid  →
com.microsoft FusedConv(x, W[, b], activation=..., activation_params=[...]) with the Conv's own
attributes. FusedConv is not standard ONNX (onnxruntime's CPU provider runs it, for float32
only), so the pass changes nothing unless `fuse-conv-activation{contrib-ops=1}` asks for it; it
never fires inside a model-local function body, and adds the `com.microsoft` opset import only
when it creates a FusedConv.

Rule `gemm-activation`: Gemm(a, b[, c]) then Relu / LeakyRelu / Sigmoid / Tanh / HardSigmoid  →
com.microsoft FusedGemm(a, b[, c], the Gemm's attributes, activation=..., activation_alpha/beta),
as onnxruntime's own GemmActivationFusion does (a classifier or detector head: Gemm + Sigmoid).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from graphopt.check import onnxruntime_has_kernel
from graphopt.ir import Attr, DataType, Model, Value
from graphopt.passes.fusion.activations import MS_DOMAIN, contrib_allowed, import_contrib
from graphopt.pattern import Fail, Match, P, Pattern, RewriteBuilder, RewritePass, Rule, const_array, register_rule
from graphopt.transform import PassContext, PassResult, register_pass

_F32_MAX = float(np.finfo(np.float32).max)
_SIMPLE = ("Relu", "Sigmoid", "Tanh")


@functools.lru_cache(maxsize=None)
def _fused_conv_kernel(opset: int, dtype: DataType, with_bias: bool) -> bool:
    """Whether the installed onnxruntime loads a 4-D com.microsoft FusedConv of `dtype` under
    default-domain `opset` and runs it (a 4-D one-node probe: Conv's shape inference needs the
    ranks)."""
    shapes = ((1, 2, 4, 4), (3, 2, 3, 3)) + (((3,),) if with_bias else ())
    return onnxruntime_has_kernel("FusedConv", max(opset, 7), dtype, MS_DOMAIN, shapes=shapes,
                                  attributes=(("activation", "Relu"), ("kernel_shape", (3, 3))), run=True)


def _scalar(v: Value | None) -> float | None | Fail:
    """A Clip bound: None when absent, its value when a single-element constant."""
    if v is None:
        return None
    arr = const_array(v)
    if arr is None:
        return Fail(f"Clip bound {v.name!r} is not a constant")
    arr = np.asarray(arr)
    if arr.size != 1:
        return Fail(f"Clip bound {v.name!r} has {arr.size} elements, not one")
    return float(arr.reshape(-1)[0])


def _float_producer(m: Match, producer: Pattern, first: Value, weight: Value, fused: str) -> bool | Fail:
    """The checks a Conv and a Gemm share before their fused contrib op: contrib ops allowed,
    float32 (the element type of the data input; when not inferred yet, the producer's output,
    the activation's or the weight's), no attribute referring to a function attribute."""
    ok = contrib_allowed(m)
    if not ok:
        return ok
    node = m.node(producer)
    op = node.op_type
    dt = first.dtype or node.outputs[0].dtype or m.root.outputs[0].dtype or weight.dtype
    if dt is None:
        return Fail(f"element type of the {op} is unknown")
    if dt != DataType.FLOAT:
        return Fail(f"{op} element type {dt.text} is not float32 ({fused} runs float only)")
    for a in node.attributes.values():
        if getattr(a, "ref_attr_name", None):
            return Fail(f"{op} attribute {a.name!r} refers to a function attribute")
    return True


class ConvActivation(Rule):
    """Conv(x, W[, b]) then Relu / LeakyRelu(alpha) / Clip(min, max) / Sigmoid / Tanh /
    HardSigmoid(alpha, beta) → com.microsoft FusedConv(x, W[, b], activation=..., activation_params=[...],
    the Conv's attributes).

    activation_params: LeakyRelu [alpha], Clip [min, max] (an absent bound is ±float32 max),
    HardSigmoid [alpha, beta]. Must not fire: contrib-ops off, inside a function body, the Conv
    not float32 (onnxruntime has FusedConv for float only), the Conv output also read elsewhere or
    a graph output, Clip bounds that are not single-element constants.
    """

    name = "conv-activation"
    x, w = P.any(), P.any()
    bias = P.optional()
    conv = P.op("Conv", x, w, bias)
    lo, hi = P.optional(P.const()), P.optional(P.const())
    pattern = P.alt(
        P.op(_SIMPLE + ("LeakyRelu", "HardSigmoid"), conv),
        P.op("Clip", conv, lo, hi),
    )

    def _params(self, m: Match) -> tuple[str, list[float]] | Fail:
        act = m.root
        op = act.op_type
        if op in _SIMPLE:
            return op, []
        if op == "LeakyRelu":
            return op, [float(act.attr("alpha", 0.01))]
        if op == "HardSigmoid":
            return op, [float(act.attr("alpha", 0.2)), float(act.attr("beta", 0.5))]
        # Clip: bounds as inputs (opset >= 11) or attributes (opset < 11)
        lo, hi = _scalar(m.get(self.lo)), _scalar(m.get(self.hi))
        if isinstance(lo, Fail):
            return lo
        if isinstance(hi, Fail):
            return hi
        if lo is None:
            lo = float(act.attr("min", -_F32_MAX))
        if hi is None:
            hi = float(act.attr("max", _F32_MAX))
        return "Clip", [lo, hi]

    def check(self, m: Match) -> bool | Fail:
        ok = _float_producer(m, self.conv, m[self.x], m[self.w], "FusedConv")
        if ok is not True:
            return ok
        params = self._params(m)
        if isinstance(params, Fail):
            return params
        opset = m.opset() or 17
        if not _fused_conv_kernel(opset, DataType.FLOAT, m.get(self.bias) is not None):
            return Fail(f"onnxruntime has no com.microsoft FusedConv kernel for float under opset {opset}")
        return True

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value:
        activation, params = self._params(m)  # type: ignore[misc]
        conv = m.node(self.conv)
        import_contrib(m)
        attrs = [a for k, a in conv.attributes.items() if k not in ("activation", "activation_params")]
        attrs.append(Attr.infer("activation", activation))
        if params:
            attrs.append(Attr.infer("activation_params", [float(p) for p in params]))
        inputs = [m[self.x], m[self.w]] + ([m[self.bias]] if m.get(self.bias) is not None else [])
        return b.node("FusedConv", inputs, attrs, domain=MS_DOMAIN).outputs[0]


@functools.lru_cache(maxsize=None)
def _fused_gemm_kernel(opset: int, with_c: bool) -> bool:
    """Whether the installed onnxruntime loads and runs a float com.microsoft FusedGemm under
    default-domain `opset`."""
    shapes = ((2, 3), (3, 4)) + (((4,),) if with_c else ())
    return onnxruntime_has_kernel("FusedGemm", max(opset, 7), DataType.FLOAT, MS_DOMAIN, shapes=shapes,
                                  attributes=(("activation", "Sigmoid"),), run=True)


class GemmActivation(Rule):
    """Gemm(a, b[, c]) then Relu / LeakyRelu(alpha) / Sigmoid / Tanh / HardSigmoid(alpha, beta)
    → com.microsoft FusedGemm(a, b[, c], alpha, beta, transA, transB, activation=...,
    activation_alpha=..., activation_beta=...).

    Must not fire: contrib-ops off, inside a function body, the Gemm not float32 (onnxruntime
    has FusedGemm for float only), the Gemm output also read elsewhere or a graph output (the
    pattern's single-use rule), Clip (FusedGemm takes no bounds), an installed onnxruntime
    without the kernel.
    """

    name = "gemm-activation"
    a, bm = P.any(), P.any()
    c = P.optional()
    gemm = P.op("Gemm", a, bm, c)
    pattern = P.op(_SIMPLE + ("LeakyRelu", "HardSigmoid"), gemm)

    def check(self, m: Match) -> bool | Fail:
        ok = _float_producer(m, self.gemm, m[self.a], m[self.bm], "FusedGemm")
        if ok is not True:
            return ok
        opset = m.opset() or 17
        if not _fused_gemm_kernel(opset, m.get(self.c) is not None):
            return Fail(f"onnxruntime has no com.microsoft FusedGemm kernel for float under opset {opset}")
        return True

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value:
        act, gemm = m.root, m.node(self.gemm)
        import_contrib(m)
        attrs = [a for k, a in gemm.attributes.items() if k in ("alpha", "beta", "transA", "transB")]
        attrs.append(Attr.infer("activation", act.op_type))
        if act.op_type == "LeakyRelu":
            attrs.append(Attr.infer("activation_alpha", float(act.attr("alpha", 0.01))))
        elif act.op_type == "HardSigmoid":
            attrs.append(Attr.infer("activation_alpha", float(act.attr("alpha", 0.2))))
            attrs.append(Attr.infer("activation_beta", float(act.attr("beta", 0.5))))
        inputs = [m[self.a], m[self.bm]] + ([m[self.c]] if m.get(self.c) is not None else [])
        return b.node("FusedGemm", inputs, attrs, domain=MS_DOMAIN).outputs[0]


_RULES = (ConvActivation(), GemmActivation())
for _r in _RULES:
    register_rule(_r)


@register_pass
@dataclass(frozen=True)
class FuseConvActivation(RewritePass):
    """Fuse Conv + Relu / LeakyRelu / Clip / Sigmoid / Tanh / HardSigmoid into onnxruntime's
    com.microsoft FusedConv (rule conv-activation) and Gemm + Relu / LeakyRelu / Sigmoid / Tanh /
    HardSigmoid into FusedGemm (rule gemm-activation; stats: rewrites per rule). Only with
    contrib-ops=1: without it the pass changes nothing (neither is standard ONNX)."""

    name: ClassVar[str] = "fuse-conv-activation"
    contrib_ops: bool = False

    def get_rules(self):
        return _RULES

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not self.contrib_ops:
            return PassResult(changed=False, note="off: FusedConv is an onnxruntime contrib op (so is FusedGemm; --contrib-ops turns them on)")
        return super().run(model, ctx)

"""`fuse-activations`: activation functions spelled out in primitive ops  →  one activation op.

Rules (each registered, so `graphopt-compile --explain gelu-erf` shows why one did not fire):

- `gelu-erf`: 0.5·x·(1 + Erf(x/√2))  →  Gelu(x) (opset ≥ 20), else com.microsoft Gelu with
  `contrib-ops=1`.
- `gelu-tanh`: 0.5·x·(1 + Tanh(√(2/π)·(x + 0.044715·x³)))  →  Gelu(x, approximate="tanh")
  (opset ≥ 20), else com.microsoft FastGelu with `contrib-ops=1`.
- `bias-gelu` (only with `contrib-ops=1`): Gelu(Add(x, b)), b a constant 1-D bias  →
  com.microsoft BiasGelu(x, b) (erf) / FastGelu(x, b) (tanh).
- `silu`: x·Sigmoid(α·x)  →  Swish(x, alpha=α) (opset ≥ 24), else com.microsoft QuickGelu
  with `contrib-ops=1`.
- `hard-swish`: x·HardSigmoid(x, alpha=1/6, beta=0.5) and x·Clip(x+3, 0, 6)/6  →  HardSwish(x)
  (opset ≥ 14).

Constants (0.5, √2, 1/√2, 0.044715, √(2/π), 3, 6, 1/6) are compared with a relative tolerance
of 1e-4, and must be single-element (they must not broadcast x to a bigger shape). A standard
op is used only where the model's default-domain opset has it; the com.microsoft ops (run by
onnxruntime) only when `fuse-activations{contrib-ops=1}` asks for them, never inside a model-local
function body, and the model then gets the `com.microsoft` opset import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from graphopt.ir import DataType, Value
from graphopt.check import onnxruntime_has_kernel
from graphopt.pattern import Fail, Match, P, Pattern, RewriteBuilder, RewritePass, Rule, const_array, register_rule
from graphopt.transform import register_pass

RTOL = 1e-4
MS_DOMAIN = "com.microsoft"

_STD_FLOATS = frozenset({DataType.FLOAT16, DataType.FLOAT, DataType.DOUBLE, DataType.BFLOAT16})
_CONTRIB_FLOATS = frozenset({DataType.FLOAT16, DataType.FLOAT})


def has_opset(m: Match, since: int) -> bool:
    v = m.opset()
    return v is None or v >= since


def standard_op(m: Match, op: str, since: int, x: Value, num_inputs: int = 1) -> bool | Fail:
    """The model's opset has the standard `op` and the installed onnxruntime runs it there for
    x's dtype (its registrations do not always follow the spec: Swish runs only under opset 24)."""
    if not has_opset(m, since):
        return Fail(f"opset {m.opset()} < {since} has no {op}")
    v = m.opset()
    dt = x.dtype or DataType.FLOAT
    if v is not None and not onnxruntime_has_kernel(op, v, dt, num_inputs=num_inputs):
        return Fail(f"onnxruntime has no {op} kernel for {dt.text} under opset {v}")
    return True


def contrib_allowed(m: Match) -> bool | Fail:
    # the applying pass's option, or the options `--explain RULE --contrib-ops` explains with
    if not m.options.get("contrib_ops"):
        return Fail("contrib ops are off (contrib-ops=1 allows com.microsoft ops)")
    if m.function is not None:
        return Fail("inside a function body: no com.microsoft ops there")
    return True


def import_contrib(m: Match) -> None:
    """Give the model the com.microsoft opset import (before a com.microsoft node is built)."""
    model = m.model
    if model is not None:
        model.opset_imports.setdefault(MS_DOMAIN, 1)


def float_dtype(
    v: Value | None, allowed: frozenset[DataType] = _STD_FLOATS, m: Match | None = None, consts: tuple[Pattern, ...] = ()
) -> DataType | Fail:
    """x's element type; when x has no type yet, the root output's, else a matched constant's
    (an elementwise op's operands share one type)."""
    dt = v.dtype if v is not None else None
    if dt is None and m is not None:
        dt = m.root.outputs[0].dtype
        for p in consts:
            if dt is not None:
                break
            c = m.get(p)
            arr = const_array(c) if isinstance(c, Value) else None
            if arr is not None:
                try:
                    dt = DataType.from_numpy(arr.dtype)
                except (ValueError, KeyError, TypeError):  # no ONNX element type for it
                    dt = None
    if dt is None:
        return Fail("element type of x is unknown")
    if dt not in allowed:
        return Fail(f"element type {dt.text} is not one of {', '.join(sorted(d.text for d in allowed))}")
    return dt


def scalar_consts(m: Match, x: Value, patterns: tuple[Pattern, ...]) -> bool | Fail:
    """Every matched constant among `patterns` has one element and does not raise x's rank."""
    rank = len(x.shape) if x.shape is not None else None
    for p in patterns:
        v = m.get(p)
        if not isinstance(v, Value):
            continue
        arr = const_array(v)
        if arr is None:
            continue
        if arr.size != 1:
            return Fail(f"constant {v.name!r} has shape {list(arr.shape)}, not a single element")
        if arr.ndim and (rank is None or arr.ndim > rank):
            return Fail(f"constant {v.name!r} of rank {arr.ndim} may broadcast x (rank {'unknown' if rank is None else rank})")
    return True


def _k(value: float) -> Pattern:
    return P.const(value, rtol=RTOL)


def _mul(a: Pattern, b: Pattern) -> Pattern:
    return P.op("Mul", a, b, commutative=True)


def _half_x_times(x: Pattern, inner: Pattern) -> tuple[Pattern, tuple[Pattern, ...]]:
    """0.5·x·inner in the association orders exporters emit; returns (root, the 0.5 constants)."""
    h1, h2, h3 = _k(0.5), _k(0.5), _k(0.5)
    root = P.alt(
        _mul(_mul(x, inner), h1),  # torch: Mul(Mul(x, 1 + erf), 0.5)
        _mul(_mul(x, h2), inner),  # 0.5 * x * (1 + erf): Mul(Mul(0.5, x), ...)
        _mul(x, _mul(inner, h3)),  # TF: x * (0.5 * (1 + erf))
    )
    return root, (h1, h2, h3)


# --- GELU -----------------------------------------------------------------------------------------
class GeluErf(Rule):
    """0.5·x·(1 + Erf(x/√2)) → Gelu(x) (opset ≥ 20) or com.microsoft Gelu(x) (contrib-ops=1).

    Matches Mul(Mul(x, Add(Erf(Div(x, √2)), 1)), 0.5), Mul(Mul(x, 0.5), ...), Mul(x, Mul(..., 0.5)),
    with Div(x, √2) or Mul(x, 1/√2), in either operand order. Must not fire: a constant off by
    more than 1e-4 (relative) or with more than one element, the Erf argument not x, an
    intermediate used elsewhere, x not float, opset < 20 without contrib-ops.
    """

    name = "gelu-erf"
    x = P.any()
    sqrt2, inv_sqrt2, one = _k(math.sqrt(2.0)), _k(1.0 / math.sqrt(2.0)), _k(1.0)
    erf = P.op("Erf", P.alt(P.op("Div", x, sqrt2), _mul(x, inv_sqrt2)))
    inner = P.op("Add", erf, one, commutative=True)
    pattern, halves = _half_x_times(x, inner)

    def _target(self, m: Match) -> str | Fail:
        std = standard_op(m, "Gelu", 20, m[self.x])
        if std:
            return "std"
        ok = contrib_allowed(m)
        if not ok:
            return Fail(f"{std}, and {ok}")
        return "contrib"

    def check(self, m: Match) -> bool | Fail:
        x = m[self.x]
        target = self._target(m)
        if isinstance(target, Fail):
            return target
        consts = (self.sqrt2, self.inv_sqrt2, self.one) + self.halves
        dt = float_dtype(x, _STD_FLOATS if target == "std" else _CONTRIB_FLOATS, m, consts)
        if isinstance(dt, Fail):
            return dt
        return scalar_consts(m, x, consts)

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value:
        if self._target(m) == "std":
            return b.op.Gelu(m[self.x])
        import_contrib(m)
        return b.op[MS_DOMAIN].Gelu(m[self.x])


class GeluTanh(Rule):
    """0.5·x·(1 + Tanh(√(2/π)·(x + 0.044715·x³))) → Gelu(x, approximate="tanh") (opset ≥ 20) or
    com.microsoft FastGelu(x) (contrib-ops=1).

    x³ is Pow(x, 3) or x·x·x; the 0.5·x·(...) product in any of the orders torch and TF emit.
    Must not fire: a constant off by more than 1e-4 (relative) or with more than one element,
    the cube or the sum not of x, an intermediate used elsewhere, x not float, opset < 20
    without contrib-ops.
    """

    name = "gelu-tanh"
    x = P.any()
    three, kappa, beta, one = _k(3.0), _k(0.044715), _k(math.sqrt(2.0 / math.pi)), _k(1.0)
    cube = P.alt(P.op("Pow", x, three), _mul(x, _mul(x, x)))
    arg = _mul(P.op("Add", x, _mul(cube, kappa), commutative=True), beta)
    inner = P.op("Add", P.op("Tanh", arg), one, commutative=True)
    pattern, halves = _half_x_times(x, inner)

    _target = GeluErf._target

    def check(self, m: Match) -> bool | Fail:
        x = m[self.x]
        target = self._target(m)
        if isinstance(target, Fail):
            return target
        consts = (self.three, self.kappa, self.beta, self.one) + self.halves
        dt = float_dtype(x, _STD_FLOATS if target == "std" else _CONTRIB_FLOATS, m, consts)
        if isinstance(dt, Fail):
            return dt
        return scalar_consts(m, x, consts)

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value:
        if self._target(m) == "std":
            return b.op.Gelu(m[self.x], approximate="tanh")
        import_contrib(m)
        return b.op[MS_DOMAIN].FastGelu(m[self.x])


class BiasGelu(Rule):
    """Gelu(Add(x, b)) → com.microsoft BiasGelu(x, b); tanh GELU (Gelu approximate="tanh" or
    FastGelu) → com.microsoft FastGelu(x, b). Only with contrib-ops=1.

    Must not fire: contrib-ops off; b not a constant, not 1-D, or not of x's last dim (the Add
    would broadcast x); x's shape unknown; the Add used elsewhere; dtype not float/float16.
    """

    name = "bias-gelu"
    x = P.any()
    bias = P.const()
    add = P.op("Add", x, bias, commutative=True)
    std = P.op("Gelu", add)
    ms_erf = P.op("Gelu", add, domain=MS_DOMAIN)
    ms_tanh = P.op("FastGelu", add, domain=MS_DOMAIN)
    pattern = P.alt(std, ms_erf, ms_tanh)

    def check(self, m: Match) -> bool | Fail:
        ok = contrib_allowed(m)
        if not ok:
            return ok
        x = m[self.x]
        dt = float_dtype(x, _CONTRIB_FLOATS, m, (self.bias,))
        if isinstance(dt, Fail):
            return dt
        arr = m.const(self.bias)
        if arr.ndim != 1:
            return Fail(f"bias has shape {list(arr.shape)}, not 1-D")
        if x.shape is None or len(x.shape) < 1 or x.shape.dims[-1] != arr.shape[0]:
            return Fail(f"x's last dim is not the bias length {arr.shape[0]} (shape {x.shape})")
        if _approximate(m.root) not in ("none", "tanh"):
            return Fail(f"Gelu approximate={_approximate(m.root)!r} is unknown")
        return True

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value:
        import_contrib(m)
        root = m.root
        tanh = root.op_type == "FastGelu" or (root.domain in ("", "ai.onnx") and _approximate(root) == "tanh")
        if tanh:
            return b.op[MS_DOMAIN].FastGelu(m[self.x], m.value(self.bias))
        return b.op[MS_DOMAIN].BiasGelu(m[self.x], m.value(self.bias))


def _approximate(node) -> str:
    a = node.attr("approximate", "none")
    return a.decode() if isinstance(a, bytes) else str(a)


# --- SiLU / Swish -------------------------------------------------------------------------------
class Silu(Rule):
    """x·Sigmoid(x) → Swish(x) (opset ≥ 24); x·Sigmoid(α·x) → Swish(x, alpha=α). Without opset
    24, with contrib-ops=1: com.microsoft QuickGelu(x, alpha=α).

    Must not fire: the Sigmoid's argument not x (or α·x with a single-element constant α), the
    Sigmoid used elsewhere, x not float, opset < 24 without contrib-ops (no standard op exists
    there: the subgraph is left as it is).
    """

    name = "silu"
    x = P.any()
    alpha = P.const()
    sig = P.op("Sigmoid", P.alt(x, _mul(x, alpha)))
    pattern = _mul(x, sig)

    def _target(self, m: Match) -> str | Fail:
        std = standard_op(m, "Swish", 24, m[self.x])
        if std:
            return "std"
        ok = contrib_allowed(m)
        if not ok:
            return Fail(f"{std}, and {ok}")
        return "contrib"

    def _alpha(self, m: Match) -> float:
        v = m.get(self.alpha)
        return 1.0 if v is None else float(np.asarray(const_array(v)).reshape(-1)[0])

    def check(self, m: Match) -> bool | Fail:
        x = m[self.x]
        target = self._target(m)
        if isinstance(target, Fail):
            return target
        dt = float_dtype(x, _STD_FLOATS if target == "std" else _CONTRIB_FLOATS, m, (self.alpha,))
        if isinstance(dt, Fail):
            return dt
        return scalar_consts(m, x, (self.alpha,))

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value:
        alpha = self._alpha(m)
        if self._target(m) == "std":
            return b.op.Swish(m[self.x], alpha=None if alpha == 1.0 else alpha)
        import_contrib(m)
        return b.op[MS_DOMAIN].QuickGelu(m[self.x], alpha=alpha)


# --- HardSwish ----------------------------------------------------------------------------------
def _near(value: float):
    def ok(a: object) -> bool:
        return isinstance(a, (int, float)) and abs(float(a) - value) <= RTOL * abs(value)

    ok.__name__ = f"≈{value:.6g}"
    return ok


class HardSwishRule(Rule):
    """x·HardSigmoid(x, alpha=1/6, beta=0.5) → HardSwish(x); x·Clip(x+3, 0, 6)/6 → HardSwish(x)
    (opset ≥ 14).

    The Clip form also as x·(Clip(...)/6), (x·Clip(...))·(1/6) and x·(Clip(...)·(1/6)). Must
    not fire: HardSigmoid's alpha/beta not 1/6 and 0.5 (its defaults are 0.2 and 0.5), Clip
    bounds other than 0 and 6 or absent, a constant with more than one element, the argument
    not x, an intermediate used elsewhere, opset < 14, x not float.
    """

    name = "hard-swish"
    x = P.any()
    hsig = P.op("HardSigmoid", x, attrs={"alpha": _near(1.0 / 6.0), "beta": _near(0.5)})
    three, zero, six = _k(3.0), P.const(0.0), _k(6.0)
    clip = P.op("Clip", P.op("Add", x, three, commutative=True), zero, six)
    six2, sixth1, sixth2 = _k(6.0), _k(1.0 / 6.0), _k(1.0 / 6.0)
    pattern = P.alt(
        _mul(x, hsig),
        P.op("Div", _mul(x, clip), six2),
        _mul(x, P.op("Div", clip, six2)),
        _mul(_mul(x, clip), sixth1),
        _mul(x, _mul(clip, sixth2)),
    )

    def check(self, m: Match) -> bool | Fail:
        x = m[self.x]
        std = standard_op(m, "HardSwish", 14, x)
        if not std:
            return std
        consts = (self.three, self.zero, self.six, self.six2, self.sixth1, self.sixth2)
        dt = float_dtype(x, frozenset({DataType.FLOAT16, DataType.FLOAT, DataType.DOUBLE}), m, consts)
        if isinstance(dt, Fail):
            return dt
        return scalar_consts(m, x, consts)

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value:
        return b.op.HardSwish(m[self.x])


_PLAIN_RULES = (GeluErf(), GeluTanh(), Silu(), HardSwishRule())
_CONTRIB_RULES = _PLAIN_RULES + (BiasGelu(),)
for _r in _CONTRIB_RULES:
    register_rule(_r)


@register_pass
@dataclass(frozen=True)
class FuseActivations(RewritePass):
    """Fuse GELU (erf and tanh forms), SiLU/Swish and HardSwish spelled in primitive ops into one op.

    Rules: gelu-erf, gelu-tanh, silu, hard-swish, and with contrib-ops=1 bias-gelu (stats:
    rewrites per rule). A standard op is used only where the model's opset has it (Gelu: 20,
    Swish: 24, HardSwish: 14); `contrib-ops=1` uses onnxruntime's com.microsoft Gelu, FastGelu,
    BiasGelu and QuickGelu where the opset has no standard op.
    """

    name: ClassVar[str] = "fuse-activations"
    contrib_ops: bool = False

    def get_rules(self):
        return _CONTRIB_RULES if self.contrib_ops else _PLAIN_RULES

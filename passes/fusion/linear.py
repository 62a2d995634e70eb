"""`fuse-linear`: fewer nodes around linear ops (MatMul/Gemm, Conv/pools, Reshape chains).

Rules (each registered, so `graphopt-compile --explain pad-into-conv` shows why one did not fire):

- `matmul-add-to-gemm`: MatMul(a, W) + c  →  Gemm(a, W, c) for a 2-D `a`, constant 2-D W and a
  constant c that broadcasts to [M, N]. A rank > 2 `a` is left alone: Reshape → Gemm → Reshape
  is not worth it (onnxruntime fuses MatMul+Add itself).
- `transpose-into-gemm`: Gemm(Transpose(x, [1, 0]), B)  →  Gemm(x, B, transA=1) (and for B).
- `transpose-into-matmul`: MatMul(Transpose(K), B) with K constant  →  MatMul(Kᵀ, B) (the
  transposed weight is stored); with a non-constant x only when `contrib-ops=true`:
  MatMul(Transpose(x), B)  →  com.microsoft FusedMatMul(x, B, transA=1) (onnxruntime runs it).
  The Transpose must swap the last two axes only.
- `pad-into-conv`: Conv(Pad(x, pads, 0)) → Conv(x, pads += Pad's spatial pads).
- `pad-into-pool`: AveragePool(count_include_pad=1) after a zero Pad, MaxPool after a -inf Pad
  → the pool with the pads merged.
- `reshape-chain`: Reshape(Reshape|Flatten(x), s) → Reshape(x, s); Flatten(Reshape(x, s), axis)
  → Reshape(x, [A, B]).

Not here: Transpose(Transpose(x)) is composed by `remove-noops` (cancelling pairs dropped,
others merged into one Transpose), and Squeeze/Unsqueeze pairs are `remove-noops`'s too.

Constants left unused by the rewrites (a transposed weight's original, Pad's pads, an inner
Reshape's shape) are removed at the end of the pass (stat `initializers-removed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from graphopt.ir import Attr, AttrType, Model, Node, Value, in_function
from graphopt.pattern import Fail, Match, P, Pattern, RewriteBuilder, PlanRule, RewritePass, Rule, const_array, register_rule
from graphopt.transform import PassContext, PassResult, register_pass

MS_DOMAIN = "com.microsoft"
_GEMM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

def _rank(v: Value | None) -> int | None:
    if v is None:
        return None
    shape = v.shape
    if shape is not None:
        return len(shape)
    arr = const_array(v)
    return None if arr is None else arr.ndim


def _dims(v: Value | None) -> tuple[Any, ...] | None:
    if v is None or v.shape is None:
        return None
    return tuple(v.shape.dims)


def _np_dtype(v: Value | None) -> np.dtype | None:
    if v is None:
        return None
    dt = v.dtype
    if dt is not None:
        try:
            return np.dtype(dt.numpy())
        except (KeyError, ValueError, TypeError):  # an element type numpy cannot hold
            return None
    arr = const_array(v)
    return None if arr is None else arr.dtype


def _str_attr(node: Node, name: str, default: str) -> str:
    val = node.attr(name, default)
    return val.decode() if isinstance(val, bytes) else str(val)


def _in_function(node: Node) -> bool:
    return node.graph is not None and in_function(node.graph)


def _attrs_except(node: Node, *names: str) -> list[Attr]:
    return [a for k, a in node.attributes.items() if k not in names]


def _perm(node: Node) -> list[int] | None:
    """The Transpose's perm (the default reverses the axes: needs the input's rank)."""
    p = node.attr("perm")
    if p is not None:
        return [int(i) for i in p]
    r = _rank(node.inputs[0])
    return None if r is None else list(range(r - 1, -1, -1))


def _swaps_last_two(node: Node) -> bool:
    p = _perm(node)
    return p is not None and len(p) >= 2 and p == list(range(len(p) - 2)) + [len(p) - 1, len(p) - 2]


# --- matmul-add-to-gemm ---------------------------------------------------------------------------
class MatMulAddToGemm(Rule):
    """MatMul(a, W) + c → Gemm(a, W, c): a 2-D (known rank), W a constant 2-D, c a constant.

    c must broadcast unidirectionally to [M, N]: a scalar, [N], [1], [1, N], [M, 1], [M, N]
    (M must be known when c's first dim is not 1). float32/float64 only (onnxruntime's Gemm).
    Must not fire: `a` of rank other than 2 or unknown (Reshape → Gemm → Reshape around a
    rank > 2 input is not worth it: onnxruntime fuses MatMul+Add itself); W or c not constant;
    c of rank > 2 or not broadcastable to [M, N] (the Add would grow the output); dtypes that
    differ; the MatMul result also read elsewhere; opset < 7 (Gemm's C did not broadcast).
    """

    name = "matmul-add-to-gemm"
    benefit = 2
    a = P.any("a")
    w = P.const(name="W")
    mm = P.op("MatMul", a, w)
    c = P.const(name="c")
    pattern = P.op("Add", mm, c, commutative=True)

    def check(self, m: Match) -> bool | Fail:
        opset = m.opset()
        if opset is not None and opset < 7:
            return Fail(f"opset {opset} < 7: Gemm's C does not broadcast there")
        rank = _rank(m[self.a])
        if rank != 2:
            if rank is not None and rank > 2:
                return Fail(f"a has rank {rank}, need 2 (Reshape → Gemm → Reshape around it is not worth it)")
            return Fail(f"a has rank {'unknown' if rank is None else rank}, need 2")
        w, c = m.const(self.w), m.const(self.c)
        if w.ndim != 2:
            return Fail(f"W has rank {w.ndim}, need 2")
        if w.dtype not in _GEMM_DTYPES:
            return Fail(f"W dtype {w.dtype} is not float32/float64")
        a_dt = _np_dtype(m[self.a])
        if c.dtype != w.dtype or (a_dt is not None and a_dt != w.dtype):
            return Fail(f"dtypes differ (a {a_dt}, W {w.dtype}, c {c.dtype})")
        n = w.shape[1]
        dims = _dims(m[self.a])
        mdim = dims[0] if dims is not None else None
        if c.ndim > 2:
            return Fail(f"c has rank {c.ndim}: the Add broadcasts the [M, N] product to a higher rank")
        if c.ndim >= 1 and c.shape[-1] not in (1, n):
            return Fail(f"c shape {list(c.shape)} does not broadcast to [M, {n}]")
        if c.ndim == 2 and c.shape[0] != 1 and not (isinstance(mdim, int) and c.shape[0] == mdim):
            return Fail(f"c shape {list(c.shape)} does not broadcast to [{mdim}, {n}] (M unknown or different)")
        return True

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value:
        return b.op.Gemm(m[self.a], m.value(self.w), m.value(self.c))


# --- transpose-into-gemm --------------------------------------------------------------------------
def _is_2d_swap(node: Node) -> bool:
    p = _perm(node)
    return p == [1, 0]


class TransposeIntoGemm(Rule):
    """Gemm(Transpose(x, perm=[1, 0]), B, C) → Gemm(x, B, C, transA=1-transA); the same for B
    (transB flipped).

    Must not fire: a perm other than [1, 0] (or no perm on an input of unknown rank); the
    Transpose's output also read elsewhere (it would stay: no node saved).
    """

    name = "transpose-into-gemm"
    ta = P.op("Transpose", P.any("x")).where(_is_2d_swap, "perm is not [1, 0]")
    tb = P.op("Transpose", P.any("x")).where(_is_2d_swap, "perm is not [1, 0]")
    gemm_a = P.op("Gemm", ta, P.any("B"), P.optional(P.any("C")))
    gemm_b = P.op("Gemm", P.any("A"), tb, P.optional(P.any("C")))
    pattern = P.alt(gemm_a, gemm_b)

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value:
        gemm = m.root
        which = m.which(self.pattern)
        t, idx, flag = (m[self.ta], 0, "transA") if which == 0 else (m[self.tb], 1, "transB")
        inputs = list(gemm.inputs)
        inputs[idx] = t.inputs[0]
        flipped = 0 if gemm.attr(flag, 0) else 1
        attrs = _attrs_except(gemm, flag) + ([Attr(flag, AttrType.INT, 1)] if flipped else [])
        return b.node("Gemm", inputs, attrs, domain=gemm.domain).outputs[0]


# --- transpose-into-matmul ------------------------------------------------------------------------
def _tpat() -> Pattern:
    return P.op("Transpose", P.any("x")).where(_swaps_last_two, "perm does not swap the last two axes only")


class TransposeIntoMatMul(Rule):
    """MatMul(Transpose(K), B) → MatMul(Kᵀ, B) for a constant K (the transposed tensor is
    stored); with `contrib-ops=true` also MatMul(Transpose(x), B) → com.microsoft
    FusedMatMul(x, B, transA=1) (and for B: transB). A Transpose feeding an existing
    FusedMatMul flips its transA/transB.

    The Transpose must swap the last two axes and keep the others. Must not fire: another perm;
    the Transpose's output also read elsewhere; a constant K also read by another node (the
    model would hold both K and Kᵀ); a non-constant x without contrib-ops (standard MatMul has
    no transpose flags); FusedMatMul only for float32, operands of rank >= 2, outside function
    bodies, and not when the MatMul feeds an Add that matmul-add-to-gemm turns into a Gemm
    (Gemm's trans flags take the Transpose then); a FusedMatMul with transBatchA/B set.
    """

    name = "transpose-into-matmul"
    contrib: bool = False

    ta, tb, fta, ftb = _tpat(), _tpat(), _tpat(), _tpat()
    mm_a = P.op("MatMul", ta, P.any("B"))
    mm_b = P.op("MatMul", P.any("A"), tb)
    fm_a = P.op("FusedMatMul", fta, P.any("B"), domain=MS_DOMAIN)
    fm_b = P.op("FusedMatMul", P.any("A"), ftb, domain=MS_DOMAIN)
    pattern = P.alt(mm_a, mm_b, fm_a, fm_b)

    def __init__(self, *, contrib: bool = False) -> None:
        super().__init__()
        self.contrib = contrib

    def _which(self, m: Match) -> tuple[Node, int]:
        which = m.which(self.pattern)
        t = m[(self.ta, self.tb, self.fta, self.ftb)[which]]
        return t, which % 2

    def check(self, m: Match) -> bool | Fail:
        t, idx = self._which(m)
        x = t.inputs[0]
        k = const_array(x)
        if k is not None:
            others = [u.label() for u in x.consumers() if u is not t]
            if others or len(x.uses()) > 1 or x.is_graph_output():
                return Fail(f"constant {x.name!r} is also read by {', '.join(others) or 'a graph output'}: folding would keep both")
            return True
        root = m.root
        fused = root.op_type == "FusedMatMul"
        if not fused and not self.contrib:
            return Fail("x is not constant and standard MatMul has no transpose flags (fuse-linear{contrib-ops=true})")
        flag = "transA" if idx == 0 else "transB"
        if fused and root.attr("transBatch" + flag[-1], 0):
            return Fail(f"FusedMatMul has transBatch{flag[-1]} set")
        if not fused:
            if _in_function(root):
                return Fail("a function body: cannot add the com.microsoft opset import there")
            dt = _np_dtype(x)
            if dt != np.dtype(np.float32):
                return Fail(f"FusedMatMul is float32 only here, x is {dt}")
            other = root.inputs[1 - idx]
            r = _rank(other)
            if r is None or r < 2:
                return Fail(f"the other operand has rank {'unknown' if r is None else r}, need >= 2")
            users = root.outputs[0].consumers()
            if len(users) == 1 and users[0].op_type == "Add" and _GEMM_RULE.match(users[0]) is not None:
                return Fail("left to matmul-add-to-gemm: Gemm's transA/transB take the Transpose")
        return True

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value:
        t, idx = self._which(m)
        root = m.root
        x = t.inputs[0]
        inputs = list(root.inputs)
        k = const_array(x)
        if k is not None:
            inputs[idx] = b.initializer(np.ascontiguousarray(np.swapaxes(k, -1, -2)), (x.name or "w") + "_T")
            return b.node(root.op_type, inputs, list(root.attributes.values()), domain=root.domain).outputs[0]
        flag = "transA" if idx == 0 else "transB"
        inputs[idx] = x
        if root.op_type == "FusedMatMul":
            flipped = 0 if root.attr(flag, 0) else 1
            attrs = _attrs_except(root, flag) + [Attr(flag, AttrType.INT, flipped)]
            return b.node("FusedMatMul", inputs, attrs, domain=MS_DOMAIN).outputs[0]
        attrs = [Attr("alpha", AttrType.FLOAT, 1.0), Attr(flag, AttrType.INT, 1)]
        return b.node("FusedMatMul", inputs, attrs, domain=MS_DOMAIN).outputs[0]


# --- pad-into-conv / pad-into-pool -----------------------------------------------------------------
def _pad_plan(pad: Node, consumer: Node, rank: int | None) -> tuple[list[int], float] | Fail:
    """(pads over every axis [begins..., ends...], pad value) of a constant-mode Pad, or Fail."""
    mode = _str_attr(pad, "mode", "constant")
    if mode != "constant":
        return Fail(f"Pad mode is {mode!r}, not 'constant'")
    ins = list(pad.inputs) + [None] * (4 - len(pad.inputs))
    if pad.attr("pads") is not None or pad.attr("paddings") is not None:  # opset < 11
        pads = [int(p) for p in (pad.attr("pads") if pad.attr("pads") is not None else pad.attr("paddings"))]
        value = float(pad.attr("value", 0.0))
        axes = None
    else:
        pa = const_array(ins[1])
        if pa is None:
            return Fail("Pad's pads are not a constant")
        pads = [int(p) for p in pa.reshape(-1)]
        if ins[2] is None:
            value = 0.0
        else:
            cv = const_array(ins[2])
            if cv is None or cv.size != 1:
                return Fail("Pad's constant_value is not a constant scalar")
            value = float(cv.reshape(-1)[0])
        if ins[3] is None:
            axes = None
        else:
            ax = const_array(ins[3])
            if ax is None:
                return Fail("Pad's axes are not a constant")
            axes = [int(a) for a in ax.reshape(-1)]
    if axes is None:
        if rank is not None and len(pads) != 2 * rank:
            return Fail(f"Pad has {len(pads)} pads for rank {rank}")
        rank = len(pads) // 2
        full = pads
    else:
        if rank is None:
            return Fail("Pad has axes and the input rank is unknown")
        if len(pads) != 2 * len(axes):
            return Fail(f"Pad has {len(pads)} pads for {len(axes)} axes")
        full = [0] * (2 * rank)
        norm = [a + rank if a < 0 else a for a in axes]
        if any(not 0 <= a < rank for a in norm) or len(set(norm)) != len(norm):
            return Fail(f"Pad axes {axes} are out of range or repeated")
        for i, a in enumerate(norm):
            full[a] = pads[i]
            full[a + rank] = pads[i + len(axes)]
    if any(p < 0 for p in full):
        return Fail(f"Pad has negative pads {full} (a crop)")
    if rank < 3:
        return Fail(f"Pad rank {rank} < 3: no spatial axes")
    if full[0] or full[1] or full[rank] or full[rank + 1]:
        return Fail(f"Pad pads the batch or channel axis ({full})")
    if consumer.attr("pads") is not None and len(consumer.attr("pads")) != 2 * (rank - 2):
        return Fail(f"{consumer.op_type} pads have the wrong length for rank {rank}")
    return full, value


def _merged_pads(consumer: Node, full: list[int]) -> list[int]:
    rank = len(full) // 2
    s = rank - 2
    old = [int(p) for p in consumer.attr("pads", [0] * (2 * s))]
    return [old[i] + full[2 + i] for i in range(s)] + [old[s + i] + full[rank + 2 + i] for i in range(s)]


def _pad_rank(pad: Node, consumer: Node) -> int | None:
    r = _rank(pad.inputs[0]) or _rank(pad.outputs[0])
    if r is None and len(consumer.inputs) > 1:
        r = _rank(consumer.inputs[1])  # Conv's weight
    if r is None and consumer.attr("kernel_shape") is not None:
        r = len(consumer.attr("kernel_shape")) + 2
    return r


def _pad_pattern() -> Pattern:
    return P.op("Pad", P.any("x"), P.optional(), P.optional(), P.optional())


def _rewrite_with_pads(m: Match, b: RewriteBuilder, pad: Node, full: list[int]) -> Value:
    node = m.root
    inputs = [pad.inputs[0]] + list(node.inputs[1:])
    attrs = _attrs_except(node, "pads", "auto_pad") + [Attr("pads", AttrType.INTS, _merged_pads(node, full))]
    return b.node(node.op_type, inputs, attrs, domain=node.domain).outputs[0]


class PadIntoConv(PlanRule):
    """Conv(Pad(x, pads, 0), W, b) → Conv(x, W, b, pads = Conv's pads + Pad's spatial pads).

    Pad in constant mode with value 0 (attribute form, opset < 11, or inputs pads /
    constant_value / axes, opset >= 11 / 18). Must not fire: auto_pad other than NOTSET;
    another mode (reflect, edge, wrap); a non-zero pad value; negative pads (a crop); pads on the
    batch or channel axis; pads, value or axes not constant; the Pad's output also read
    elsewhere.
    """

    name = "pad-into-conv"
    pad = _pad_pattern()
    pattern = P.op("Conv", pad, P.any("W"), P.optional(P.any("b")))

    def plan(self, m: Match) -> list[int] | Fail:
        conv, pad = m.root, m[self.pad]
        if _str_attr(conv, "auto_pad", "NOTSET") != "NOTSET":
            return Fail(f"Conv auto_pad is {_str_attr(conv, 'auto_pad', '')}, not NOTSET")
        plan = _pad_plan(pad, conv, _pad_rank(pad, conv))
        if isinstance(plan, Fail):
            return plan
        full, value = plan
        if value != 0.0:
            return Fail(f"Pad value is {value}, not 0")
        return full

    def build(self, m: Match, b: RewriteBuilder, plan: Any) -> Value:
        return _rewrite_with_pads(m, b, m[self.pad], plan)


class PadIntoPool(PlanRule):
    """AveragePool(Pad(x, pads, 0), count_include_pad=1) → AveragePool(x, pads merged);
    MaxPool(Pad(x, pads, -inf)) → MaxPool(x, pads merged).

    Must not fire: auto_pad other than NOTSET; ceil_mode=1; AveragePool with
    count_include_pad=0 (padding would leave the divisor) or a non-zero value; MaxPool with a
    value other than -inf (a zero pad can win the max) or with its Indices output used; merged
    pads not smaller than the kernel (onnxruntime refuses those); Pad in a non-constant mode,
    negative pads, pads on the batch/channel axis, non-constant pads/value/axes; the Pad's
    output also read elsewhere.
    """

    name = "pad-into-pool"
    pad = _pad_pattern()
    pattern = P.op(("AveragePool", "MaxPool"), pad)

    def plan(self, m: Match) -> list[int] | Fail:
        pool, pad = m.root, m[self.pad]
        op = pool.op_type
        if _str_attr(pool, "auto_pad", "NOTSET") != "NOTSET":
            return Fail(f"{op} auto_pad is {_str_attr(pool, 'auto_pad', '')}, not NOTSET")
        if pool.attr("ceil_mode", 0):
            return Fail(f"{op} has ceil_mode=1")
        plan = _pad_plan(pad, pool, _pad_rank(pad, pool))
        if isinstance(plan, Fail):
            return plan
        full, value = plan
        if op == "AveragePool":
            if not pool.attr("count_include_pad", 0):
                return Fail("AveragePool has count_include_pad=0: padded zeros would leave the average")
            if value != 0.0:
                return Fail(f"Pad value is {value}, not 0")
        else:
            if not (np.isinf(value) and value < 0):
                return Fail(f"Pad value is {value}, not -inf (MaxPool pads are ignored, a padded value can win)")
            if len(pool.outputs) > 1 and (pool.outputs[1].uses() or pool.outputs[1].is_graph_output()):
                return Fail("MaxPool's Indices output is used (indices would shift)")
        kernel = pool.attr("kernel_shape")
        merged = _merged_pads(pool, full)
        s = len(merged) // 2
        if kernel is None or len(kernel) != s:
            return Fail("kernel_shape is missing or of the wrong length")
        if any(merged[i] >= kernel[i] or merged[s + i] >= kernel[i] for i in range(s)):
            return Fail(f"merged pads {merged} are not smaller than kernel {list(kernel)}")
        return full

    def build(self, m: Match, b: RewriteBuilder, plan: Any) -> Value | list[Value | None]:
        pool = m.root
        node_out = _rewrite_with_pads(m, b, m[self.pad], plan)
        if len(pool.outputs) > 1:
            return [node_out, None]
        return node_out


# --- reshape-chain -------------------------------------------------------------------------------
class ReshapeChain(PlanRule):
    """Reshape(Reshape(x, s1), s2) → Reshape(x, s2); Reshape(Flatten(x), s2) → Reshape(x, s2);
    Flatten(Reshape(x, s1), axis) → Reshape(x, [prod(s1[:axis]), -1]) (or [-1, prod(s1[axis:])]
    when the -1 is in the head).

    Must not fire: s2 not constant; s2 with a 0 (copy this dim from the input, which changes when
    the inner node goes) unless the outer Reshape has allowzero=1 or the inner one is a Reshape
    that copies the same dim of x (a 0 at that position too, without allowzero); for Flatten(Reshape): s1 not
    constant or with a 0; the inner node's output also read elsewhere; the opset < 5 Reshape
    (shape attribute) as the outer node.
    """

    name = "reshape-chain"
    x1, x2 = P.any("x"), P.any("x")
    s2 = P.const(name="s2")
    inner1 = P.op(("Reshape", "Flatten"), x1, P.optional())
    outer_reshape = P.op("Reshape", inner1, s2)
    s1 = P.const(name="s1")
    inner2 = P.op("Reshape", x2, s1)
    outer_flatten = P.op("Flatten", inner2)
    pattern = P.alt(outer_reshape, outer_flatten)

    def plan(self, m: Match) -> np.ndarray | Fail:
        if m.which(self.pattern) == 0:
            s2 = m.const(self.s2)
            if s2.ndim != 1 or s2.dtype != np.int64:
                return Fail(f"s2 is not a 1-D int64 tensor ({s2.dtype}, rank {s2.ndim})")
            if (s2 == 0).any() and not m.root.attr("allowzero", 0) and not self._copies_same_dims(m, s2):
                return Fail(f"s2 {s2.tolist()} has a 0: that dim is copied from the inner node's output")
            return s2
        s1 = m.const(self.s1)
        if s1.ndim != 1 or s1.dtype != np.int64:
            return Fail(f"s1 is not a 1-D int64 tensor ({s1.dtype}, rank {s1.ndim})")
        s = [int(v) for v in s1]
        if 0 in s:
            return Fail(f"s1 {s} has a 0")
        axis = int(m.root.attr("axis", 1))
        r = len(s)
        if axis < 0:
            axis += r
        if not 0 <= axis <= r:
            return Fail(f"Flatten axis {axis} out of range for rank {r}")
        head, tail = s[:axis], s[axis:]
        if -1 not in head:
            return np.array([int(np.prod(head, dtype=np.int64)), -1], np.int64)
        return np.array([-1, int(np.prod(tail, dtype=np.int64))], np.int64)

    def _copies_same_dims(self, m: Match, s2: np.ndarray) -> bool:
        """Every 0 of s2 sits where the inner Reshape copies x's dim too: the copy then reads x."""
        inner = m[self.inner1]
        if inner.op_type != "Reshape" or len(inner.inputs) < 2 or inner.attr("allowzero", 0):
            return False
        s1 = const_array(inner.inputs[1])
        if s1 is None or s1.ndim != 1:
            return False
        return all(i < len(s1) and s1[i] == 0 for i in np.flatnonzero(s2 == 0))

    def build(self, m: Match, b: RewriteBuilder, plan: Any) -> Value:
        if m.which(self.pattern) == 0:
            return b.node("Reshape", [m[self.x1], m.value(self.s2)], list(m.root.attributes.values())).outputs[0]
        shape = b.constant(plan, "flatten_shape")
        return b.op.Reshape(m[self.x2], shape)


# --- transpose-into-gather -----------------------------------------------------------------------
class TransposeIntoGather(PlanRule):
    """Gather(Transpose(x, perm), i, axis=a) with a constant scalar index → Gather(x, i,
    axis=perm[a]) when the axes left after the gather keep their order (perm without a is
    increasing): an exporter's `y.transpose(0, 1)[:, -1]` (the last step of an RNN's output).

    Must not fire: a non-scalar index (its dims would land at a, in the permuted order); the
    remaining axes reordered (a Transpose would still be needed); perm unknown (default perm
    and unknown rank); the Transpose's output read elsewhere.
    """

    name = "transpose-into-gather"
    x = P.any("x")
    t = P.op("Transpose", x)
    idx = P.const(name="idx")
    pattern = P.op("Gather", t, idx)

    def plan(self, m: Match) -> int | Fail:
        perm = _perm(m[self.t])
        if perm is None:
            return Fail("the Transpose has no perm and its input's rank is unknown")
        if m.const(self.idx).ndim != 0:
            return Fail("the index is not a scalar: its dims would land in the permuted order")
        r = len(perm)
        a = int(m.root.attr("axis", 0))
        a = a + r if a < 0 else a
        if not 0 <= a < r:
            return Fail(f"Gather axis {a} out of range for rank {r}")
        rest = [p for k, p in enumerate(perm) if k != a]
        if rest != sorted(rest):
            return Fail(f"perm {perm} without axis {a} reorders the remaining axes")
        return perm[a]

    def build(self, m: Match, b: RewriteBuilder, plan: Any) -> Value:
        return b.op.Gather(m[self.x], m.value(self.idx), axis=int(plan))


# --- the pass --------------------------------------------------------------------------------------
_GEMM_RULE = MatMulAddToGemm()
_DEFAULT_RULES: tuple[Rule, ...] = (
    _GEMM_RULE,
    TransposeIntoGemm(),
    TransposeIntoMatMul(),
    PadIntoConv(),
    PadIntoPool(),
    ReshapeChain(),
    TransposeIntoGather(),
)
_CONTRIB_RULES: tuple[Rule, ...] = tuple(TransposeIntoMatMul(contrib=True) if isinstance(r, TransposeIntoMatMul) else r for r in _DEFAULT_RULES)
for _r in _DEFAULT_RULES:
    register_rule(_r)


def _uses_domain(model: Model, domain: str) -> bool:
    return any(n.domain == domain for n in model.all_nodes())


@register_pass
@dataclass(frozen=True)
class FuseLinear(RewritePass):
    """Fuse around linear ops: MatMul+Add → Gemm, Transposes into Gemm/MatMul/Gather, Pad into Conv/pools, Reshape chains.

    Rules: matmul-add-to-gemm, transpose-into-gemm, transpose-into-matmul, pad-into-conv,
    pad-into-pool, reshape-chain, transpose-into-gather (stats: rewrites per rule, and
    initializers-removed).
    `contrib-ops=true` lets transpose-into-matmul emit com.microsoft FusedMatMul (onnxruntime
    only) for a Transpose of a non-constant operand.
    """

    name: ClassVar[str] = "fuse-linear"
    contrib_ops: bool = False

    def get_rules(self):
        return _CONTRIB_RULES if self.contrib_ops else _DEFAULT_RULES

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        added_ms = self.contrib_ops and MS_DOMAIN not in model.opset_imports
        if added_ms:
            model.opset_imports[MS_DOMAIN] = 1
        try:
            return super().run(model, ctx)
        finally:
            if added_ms and not _uses_domain(model, MS_DOMAIN):
                del model.opset_imports[MS_DOMAIN]

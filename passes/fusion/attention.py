"""`fuse-attention`: scaled-dot-product attention spelled as MatMul-Softmax-MatMul  →  one
ONNX `Attention` (opset ≥ 23), or onnxruntime's com.microsoft `MultiHeadAttention` below opset 23
with `contrib-ops=1`.

Rules (registered, so `graphopt-compile --explain sdpa-attention` shows why one did not fire):

- `sdpa-attention`: Softmax(scale·Q·Kᵀ [+ mask], axis=-1)·V, as torch and HF transformers
  export it  →  Attention(Q, K, V[, attn_mask], scale=scale).
- `packed-qkv-attention` (contrib-ops only): com.microsoft MultiHeadAttention of three
  projections x·W [+ b] of one x  →  com.microsoft Attention with packed QKV weights.

What is recognized:

- Kᵀ: Transpose(K, perm=[0,1,3,2]), or a value that is already transposed ([B, H, d, S_kv]; the
  rewrite then transposes it back for Attention, a Transpose pair later passes fold).
- scale: any single-element constant, as Mul(·, c) or Div(·, c) on the scores (after the
  MatMul), on Q, on Kᵀ (or on K before its Transpose), or on both Q and K (torch SDPA's √√d
  each). The factors multiply into the `scale` attribute (1.0 when there is none: Attention's
  default is 1/√d).
- mask (optional, after the scale): Add(scores, mask) with a mask of the scores' type that
  broadcasts to [B, H, S_q, S_kv] without enlarging it; or Where(cond, fill, scores) /
  Where(cond, scores, fill) with a boolean cond and a constant fill that is -inf or at most half
  the type's lowest value (torch `masked_fill(.., -inf)`, HF `finfo.min`), which becomes the
  additive mask Where(cond, fill, 0) (Where(cond, 0, fill)). onnxruntime wants the mask's last
  two dims to be exactly [S_q, S_kv] (it rejects HF's [B, 1, 1, S]); such a mask is Expanded.
- between Softmax and ·V: a Dropout in inference mode (no training_mode, or a constant false),
  whose mask output is unused.

Must not fire: a Softmax over another axis; Q, K, V not of known rank 4 or with batch / head
counts that differ (the MatMuls would broadcast them, Attention does not); a non-constant or
multi-element scale; a scale applied after the mask; a mask that would broadcast the scores to
a bigger shape, has an unknown shape or rank > 4; a Where fill that is not a large negative
constant; an intermediate (scores, probabilities...) used elsewhere, e.g. the attention
probabilities returned as a graph output; a Dropout in training mode (or with a non-constant
training_mode); an opset < 23, or an onnxruntime without the Attention kernel for the type.

Below opset 23, with `contrib-ops=1` (deployments on onnxruntime only): com.microsoft
MultiHeadAttention(Q', K, V, attention_bias=mask, num_heads=H, scale=s), where Q' is Q
[B, H, S_q, d] transposed and reshaped to [B, S_q, H·d] (the query must be 3-D; K and V go in
as they are, [B, H, S, d] is MultiHeadAttention's BNSH layout) and the result is reshaped and
transposed back to [B, H, S_q, d]; the Transpose/Reshape pairs this creates around the torch /
transformers head split and merge cancel in fuse-linear and remove-noops. The mask is made 4-D
(Unsqueeze) with last two dims [S_q, S_kv] (Expand). Must not fire there also when the head
count H or the head size d is not static, or the type is not float16/float.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from graphopt.check import onnxruntime_has_kernel
from graphopt.ir import DataType, Shape, TensorType, Value
from graphopt.pattern import Fail, Match, P, Pattern, PlanRule, RewriteBuilder, RewritePass, Rule, const_array, register_rule
from graphopt.passes.fusion.activations import MS_DOMAIN, contrib_allowed, has_opset, import_contrib
from graphopt.transform import register_pass

ATTENTION_OPSET = 23
_FLOATS = frozenset({DataType.FLOAT16, DataType.FLOAT, DataType.DOUBLE, DataType.BFLOAT16})
_T_PERM = [0, 1, 3, 2]


@functools.lru_cache(maxsize=None)
def _ort_runs_attention(opset: int, dtype: DataType) -> bool:
    """Whether the installed onnxruntime (CPU) loads a 4-D Attention under `opset` for `dtype`.

    Attention's shape inference rejects rank-1 inputs: the probe uses [1, 2, 3, 4] q, k, v and a
    [3, 3] mask."""
    return onnxruntime_has_kernel("Attention", opset, dtype, shapes=((1, 2, 3, 4),) * 3 + ((3, 3),),
                                  attributes=(("scale", 0.5),))


def _scaled(x: Pattern, *consts: Pattern) -> Pattern:
    """x, Mul(x, c) (either order) or Div(x, c); consts: (mul const, div const)."""
    mul_c, div_c = consts
    return P.alt(P.op("Mul", x, mul_c, commutative=True), P.op("Div", x, div_c), x)


def _dims(v: Value | None) -> tuple | None:
    if v is None or v.shape is None:
        return None
    return tuple(v.shape.dims)


def _same(a: object, b: object) -> bool:
    return a is not None and a == b


class SdpaAttention(Rule):
    """Softmax(s·Q·Kᵀ [+ mask], axis=-1)·V → Attention(Q, K, V[, mask], scale=s) (opset ≥ 23).

    Kᵀ is Transpose(K, perm=[0,1,3,2]) or already transposed; the scale a single-element
    constant (Mul or Div) on the scores, on Q, on K, or on both; the mask an Add of a
    broadcastable tensor or a Where with a -inf / lowest-value fill; an inference-mode Dropout may
    sit before ·V. Must not fire: softmax on another axis, rank not 4, batch/head counts that
    broadcast, a non-constant or non-scalar scale, a mask that enlarges the scores or has an
    unknown shape, intermediates used elsewhere (probabilities as an output), Dropout in
    training mode, opset < 23 or no onnxruntime kernel.
    """

    name = "sdpa-attention"

    q, k, kt_any, v = P.any(), P.any(), P.any(), P.any()
    q_mul, q_div = P.const(), P.const()
    k_mul, k_div = P.const(), P.const()  # on K, before its Transpose
    kt_mul, kt_div = P.const(), P.const()  # on Kᵀ
    s_mul, s_div = P.const(), P.const()  # on the scores
    mask, cond, fill_a, fill_b = P.any(), P.any(), P.const(), P.const()
    ratio, training = P.any(), P.const()

    transpose = P.op("Transpose", _scaled(k, k_mul, k_div), attrs={"perm": _T_PERM})
    kt = _scaled(P.alt(transpose, kt_any), kt_mul, kt_div)
    qk = P.op("MatMul", _scaled(q, q_mul, q_div), kt)
    scores = _scaled(qk, s_mul, s_div)
    add_mask = P.op("Add", scores, mask, commutative=True)
    where_fill_first = P.op("Where", cond, fill_a, scores)
    where_fill_last = P.op("Where", cond, scores, fill_b)
    softmax = P.op("Softmax", P.alt(add_mask, where_fill_first, where_fill_last, scores))
    dropout = P.op("Dropout", softmax, P.optional(ratio), P.optional(training))
    pattern = P.op("MatMul", P.alt(dropout, softmax), v)

    _SCALES = ("q_mul", "q_div", "k_mul", "k_div", "kt_mul", "kt_div", "s_mul", "s_div")

    # --- helpers ------------------------------------------------------------------------------
    def _scale(self, m: Match) -> float | Fail:
        s = 1.0
        for attr in self._SCALES:
            p = getattr(self, attr)
            val = m.get(p)
            if val is None:
                continue
            arr = const_array(val)
            if arr is None or arr.size != 1 or arr.ndim > 4:
                return Fail(f"scale constant {val.name!r} is not a single element of rank ≤ 4")
            c = float(np.asarray(arr, np.float64).reshape(-1)[0])
            if attr.endswith("_div"):
                if c == 0.0:
                    return Fail("scale divisor is 0")
                c = 1.0 / c
            s *= c
        if not math.isfinite(s) or s == 0.0:
            return Fail(f"scale {s} is not finite and nonzero")
        return s

    def _target_kt_shape(self, m: Match) -> tuple | None:
        """Kᵀ's shape [B, H, d, S_kv]."""
        if self.transpose in m:
            kd = _dims(m[self.k])
            return None if kd is None or len(kd) != 4 else (kd[0], kd[1], kd[3], kd[2])
        return _dims(m[self.kt_any])

    def _mask_ok(self, mv: Value | None, want: tuple) -> bool | Fail:
        md = _dims(mv)
        if md is None:
            return Fail("mask shape unknown")
        if len(md) > 4:
            return Fail(f"mask rank {len(md)} > 4")
        for got, full in zip(reversed(md), reversed(want)):
            if got != 1 and not _same(got, full):
                return Fail(f"mask shape {list(md)} does not broadcast to the scores' {list(want)} without enlarging them")
        return True

    # --- rule ---------------------------------------------------------------------------------
    def _target(self, m: Match) -> str | Fail:
        """"std" (ONNX Attention) or "contrib" (com.microsoft MultiHeadAttention)."""
        if has_opset(m, ATTENTION_OPSET):
            return "std"
        ok = contrib_allowed(m)
        if not ok:
            return Fail(f"opset {m.opset()} < {ATTENTION_OPSET} has no Attention, and {ok}")
        return "contrib"

    def check(self, m: Match) -> bool | Fail:
        target = self._target(m)
        if isinstance(target, Fail):
            return target
        axis = m[self.softmax].attr("axis", -1)
        if axis not in (-1, 3):
            return Fail(f"Softmax axis={axis}, not the last axis")
        q, v = m[self.q], m[self.v]
        dt = q.dtype or m.root.outputs[0].dtype
        if dt is None or dt not in _FLOATS:
            return Fail(f"element type {dt.text if dt else 'unknown'} is not a float type")
        ver = m.opset()
        if target == "contrib":
            if dt not in (DataType.FLOAT, DataType.FLOAT16):
                return Fail(f"element type {dt.text} has no com.microsoft MultiHeadAttention kernel")
        elif ver is not None and not _ort_runs_attention(ver, dt):
            return Fail(f"onnxruntime has no Attention kernel for {dt.text} under opset {ver}")
        qd, ktd, vd = _dims(q), self._target_kt_shape(m), _dims(v)
        if qd is None or ktd is None or vd is None or not (len(qd) == len(ktd) == len(vd) == 4):
            return Fail("Q, K and V are not all of known rank 4")
        for i, what in ((0, "batch"), (1, "head")):
            if not (_same(qd[i], ktd[i]) and _same(qd[i], vd[i])):
                return Fail(f"{what} dims of Q {qd[i]!r}, K {ktd[i]!r}, V {vd[i]!r} are not known to be equal")
        if not _same(ktd[3], vd[2]):
            return Fail(f"K's and V's sequence dims ({ktd[3]!r}, {vd[2]!r}) are not known to be equal")
        if target == "contrib":
            if not (isinstance(qd[1], int) and isinstance(qd[3], int) and qd[3] > 0):
                return Fail(f"head count {qd[1]!r} or head size {qd[3]!r} is not static (MultiHeadAttention needs num_heads)")
            if not (_same(qd[3], ktd[2]) and _same(qd[3], vd[3])):
                return Fail(f"head sizes of Q {qd[3]!r}, K {ktd[2]!r}, V {vd[3]!r} differ (MultiHeadAttention needs one)")
        scale = self._scale(m)
        if isinstance(scale, Fail):
            return scale
        want = (qd[0], qd[1], qd[2], ktd[3])
        if self.add_mask in m:
            mv = m[self.mask]
            if mv.dtype is not None and mv.dtype != dt:
                return Fail(f"mask type {mv.dtype.text} is not {dt.text}")
            ok = self._mask_ok(mv, want)
            if not ok:
                return ok
        elif self.where_fill_first in m or self.where_fill_last in m:
            cv = m[self.cond]
            if cv.dtype is not None and cv.dtype != DataType.BOOL:
                return Fail("Where condition is not bool")
            fill = m.const(self.fill_a if self.where_fill_first in m else self.fill_b)
            if fill.size != 1 or fill.ndim > 4:
                return Fail("Where fill is not a single element")
            f = float(np.asarray(fill, np.float64).reshape(-1)[0])
            lowest = float(np.finfo(np.float16 if dt == DataType.FLOAT16 else np.float32).min) if dt != DataType.DOUBLE else float(np.finfo(np.float64).min)
            if dt == DataType.BFLOAT16:
                lowest = -3.38e38
            if not (f == -math.inf or f <= 0.5 * lowest):
                return Fail(f"Where fill {f} is not -inf or a lowest-value constant (a masked row could differ)")
            ok = self._mask_ok(cv, want)
            if not ok:
                return ok
        if self.dropout in m:
            d = m[self.dropout]
            if len(d.outputs) > 1 and d.outputs[1] is not None and (d.outputs[1].uses() or d.outputs[1].is_graph_output()):
                return Fail("Dropout's mask output is used")
            tm = m.get(self.training)
            if tm is not None and bool(np.any(m.const(self.training))):
                return Fail("Dropout is in training mode")
        return True

    def rewrite(self, m: Match, b: RewriteBuilder) -> Value:
        scale = self._scale(m)
        assert not isinstance(scale, Fail)
        q, v = m[self.q], m[self.v]
        qd, vd = _dims(q), _dims(v)
        mask: Value | None = None
        mask_rank = 0
        if self.add_mask in m:
            mask = m[self.mask]
        elif self.where_fill_first in m or self.where_fill_last in m:
            fill = m.const(self.fill_a if self.where_fill_first in m else self.fill_b)
            zero = b.constant(np.zeros((), fill.dtype), "attn_zero")
            if self.where_fill_first in m:
                mask = b.op.Where(m[self.cond], m.value(self.fill_a), zero)
            else:
                mask = b.op.Where(m[self.cond], zero, m.value(self.fill_b))
            mask_dims = _dims(m[self.cond])
        if mask is not None:
            md = _dims(m[self.mask]) if self.add_mask in m else mask_dims
            assert md is not None and qd is not None and vd is not None
            mask_rank = max(len(md), 2)
            sq, skv = qd[2], vd[2]
            if len(md) < 2 or not (_same(md[-2], sq) and _same(md[-1], skv)):
                # onnxruntime wants the mask's last two dims to be [S_q, S_kv] exactly
                if isinstance(sq, int) and isinstance(skv, int):
                    target = b.constant(np.array([sq, skv], np.int64), "attn_mask_shape")
                else:
                    target = b.op.Concat(b.op.Shape(q, start=2, end=3), b.op.Shape(v, start=2, end=3), axis=0)
                mask = b.op.Expand(mask, target)
        if self._target(m) == "std":
            k = m[self.k] if self.transpose in m else b.op.Transpose(m[self.kt_any], perm=_T_PERM)
            inputs = [q, k, v] + ([mask] if mask is not None else [])
            return b.op.Attention(*inputs, scale=float(scale))
        # K [B, H, S, d] → [B, S, H, d] is perm [0, 2, 1, 3]; from Kᵀ [B, H, d, S] it is [0, 3, 1, 2]
        k, k_perm = (m[self.k], [0, 2, 1, 3]) if self.transpose in m else (m[self.kt_any], [0, 3, 1, 2])
        return self._multi_head(b, q, (k, k_perm), v, mask, mask_rank, float(scale))

    @staticmethod
    def _multi_head(
        b: RewriteBuilder, q: Value, k: tuple[Value, list[int]], v: Value, mask: Value | None, mask_rank: int, scale: float
    ) -> Value:
        """com.microsoft MultiHeadAttention on [B, S, H·d] queries, keys and values (k: the key
        tensor and the perm that makes it [B, S, H, d]). The 3-D layout (rather than BNSH
        keys/values, which it also takes) lets the Transpose/Reshape pairs of an exporter's head
        split cancel completely: Q, K and V become the projections themselves."""
        qd, vd = _dims(q), _dims(v)
        assert qd is not None and vd is not None
        heads, size = int(qd[1]), int(qd[3])
        import_contrib(b.match)

        def static(d: object) -> int:
            return d if isinstance(d, int) else 0  # 0: Reshape copies the dim

        def to_bsd(x: Value, perm: list[int], seq: object, what: str) -> Value:
            shape = np.array([static(qd[0]), static(seq), heads * size], np.int64)
            return b.op.Reshape(b.op.Transpose(x, perm=perm), b.constant(shape, f"mha_{what}_shape"))

        q3 = to_bsd(q, [0, 2, 1, 3], qd[2], "q")
        k3 = to_bsd(k[0], k[1], vd[2], "k")
        v3 = to_bsd(v, [0, 2, 1, 3], vd[2], "v")
        inputs: list[Value | None] = [q3, k3, v3]
        if mask is not None:
            if mask_rank < 4:  # attention_bias must be [B|1, H|1, S_q, S_kv]
                mask = b.op.Unsqueeze(mask, b.constant(np.arange(4 - mask_rank, dtype=np.int64), "mha_mask_axes"))
            inputs += [None, None, mask]
        y = b.op[MS_DOMAIN].MultiHeadAttention(*inputs, num_heads=heads, scale=scale)
        if q.dtype is not None:  # no shape inference for com.microsoft ops: state it
            y.type = TensorType(q.dtype, Shape((qd[0], qd[2], heads * size)))
        y4 = b.op.Reshape(y, b.constant(np.array([static(qd[0]), static(qd[2]), heads, size], np.int64), "mha_y_shape"))
        return b.op.Transpose(y4, perm=[0, 2, 1, 3])


class PackedQkvAttention(PlanRule):
    """com.microsoft MultiHeadAttention(x·Wq [+ bq], x·Wk [+ bk], x·Wv [+ bv][, attention_bias])
    → com.microsoft Attention(x, [Wq|Wk|Wv], [bq|bk|bv][, attention_bias]): one GEMM for the
    three projections, as onnxruntime's transformers optimizer emits for BERT. Only with
    contrib-ops (the MultiHeadAttention it starts from exists only then).

    Must not fire: the three projections not of one x; a weight or bias that is not a constant,
    not [D, D] / [D] with D the (static) last dim of x; x not 3-D; a projection also read
    elsewhere; MultiHeadAttention with its own bias or key padding mask, or with past inputs.
    """

    name = "packed-qkv-attention"
    xq, xk, xv = P.any(), P.any(), P.any()
    wq, wk, wv = P.const(), P.const(), P.const()
    bq, bk, bv = P.const(), P.const(), P.const()
    mqk = P.op("MatMul", xq, wq)
    mk = P.op("MatMul", xk, wk)
    mv = P.op("MatMul", xv, wv)
    q = P.alt(P.op("Add", mqk, bq, commutative=True), mqk)
    k = P.alt(P.op("Add", mk, bk, commutative=True), mk)
    v = P.alt(P.op("Add", mv, bv, commutative=True), mv)
    bias_in, padding, mask = P.optional(), P.optional(), P.optional()
    pattern = P.op("MultiHeadAttention", q, k, v, bias_in, padding, mask, domain=MS_DOMAIN)

    def plan(self, m: Match) -> tuple[np.ndarray, np.ndarray | None] | Fail:
        ok = contrib_allowed(m)
        if not ok:
            return ok
        x = m[self.xq]
        if m[self.xk] is not x or m[self.xv] is not x:
            return Fail("Q, K and V are projections of different tensors")
        if m.get(self.bias_in) is not None or m.get(self.padding) is not None:
            return Fail("MultiHeadAttention has its own bias or a key padding mask")
        xd = _dims(x)
        if xd is None or len(xd) != 3 or not isinstance(xd[2], int):
            return Fail(f"x's shape {xd} is not 3-D with a static hidden size")
        hidden = xd[2]
        ws = [m.const(w) for w in (self.wq, self.wk, self.wv)]
        if any(w.shape != (hidden, hidden) for w in ws):
            return Fail(f"projection weights {[list(w.shape) for w in ws]} are not [{hidden}, {hidden}]")
        if len({w.dtype for w in ws}) != 1 or ws[0].dtype not in (np.float32, np.float16):
            return Fail("projection weights are not of one float type")
        bs = [m.const(b) if m.get(b) is not None else None for b in (self.bq, self.bk, self.bv)]
        if any(b is not None and (b.shape != (hidden,) or b.dtype != ws[0].dtype) for b in bs):
            return Fail(f"a projection bias is not [{hidden}] of the weights' type")
        for p in (self.mqk, self.mk, self.mv):
            node = m[p]
            out = node.outputs[0]
            if len(out.uses()) != 1 or out.is_graph_output():
                return Fail(f"projection {node.name or out.name!r} is also read elsewhere")
        bias = None
        if any(b is not None for b in bs):
            bias = np.concatenate([b if b is not None else np.zeros(hidden, ws[0].dtype) for b in bs])
        return np.concatenate(ws, axis=1), bias

    def build(self, m: Match, b: RewriteBuilder, plan: tuple[np.ndarray, np.ndarray | None]) -> Value:
        weights, bias = plan
        mha = m.root
        w = b.constant(weights, "qkv_weight")
        bv = b.constant(bias, "qkv_bias") if bias is not None else None
        y = b.op[MS_DOMAIN].Attention(m[self.xq], w, bv, None, None, m.get(self.mask), num_heads=mha.attr("num_heads"),
                                      scale=mha.attr("scale", 1.0 / math.sqrt(weights.shape[0] // mha.attr("num_heads"))))
        y.type = mha.outputs[0].type
        return y


_RULES = (SdpaAttention(),)
_CONTRIB_RULES = (SdpaAttention(), PackedQkvAttention())
for _r in _CONTRIB_RULES:
    register_rule(_r)


@register_pass
@dataclass(frozen=True)
class FuseAttention(RewritePass):
    """Fuse scaled-dot-product attention (MatMul-Softmax-MatMul) into one Attention op (opset ≥ 23;
    com.microsoft MultiHeadAttention below that with `contrib-ops=1`, and then a
    MultiHeadAttention of three projections of one x into com.microsoft Attention with packed
    QKV weights: rule packed-qkv-attention; -O2 runs the pass again after the head split/merge
    Reshapes and Transposes have cancelled, so that the projections are its direct inputs).

    Rule: sdpa-attention (stats: rewrites per rule). Q·Kᵀ with any constant scale (on the
    scores, on Q and/or K), an optional additive or Where mask, Softmax over the last axis and
    an inference-mode Dropout; Attention's `scale` attribute carries the product of the scales.
    """

    name: ClassVar[str] = "fuse-attention"
    contrib_ops: bool = False

    def get_rules(self):
        return _CONTRIB_RULES if self.contrib_ops else _RULES

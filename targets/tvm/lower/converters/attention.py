"""Attention and sequence-model ops: Attention, CausalConvWithState, LinearAttention (unrolled over
its static length), RotaryEmbedding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from tvm import relax

from graphopt.ir import Node

from .common import R, dtype_of, scalar_const, slice_axis, static_dims, str_attr
from ..registry import LoweringError, converter, dims_of


@converter("CausalConvWithState")
def _causal_conv(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Depthwise causal conv1d over [past_state | input] (zeros when no state), optional SiLU
    (computed in float32), present_state = the last k-1 steps of the padded input."""
    x, w = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    past = ins[3] if len(ins) > 3 else None
    b, c, _ = static_dims(node, x, "input")
    k = static_dims(node, w, "weight")[2]
    dtype = dtype_of(x)
    act = str_attr(node, "activation", "none")
    if past is None:
        past = bb.emit(R.zeros((b, c, k - 1), dtype))
    padded = bb.emit(R.concat([past, x], axis=2)) if k > 1 else x
    # accumulated in float32 and rounded once to the input's type (as the reference's conv)
    y = bb.emit(R.nn.conv1d(padded, w, groups=c, out_dtype="float32" if dtype == "float16" else None))
    if bias is not None:
        y = bb.emit(R.add(y, R.astype(R.reshape(bias, (1, c, 1)), dtype_of(y))))
    if dtype_of(y) != dtype:
        y = bb.emit(R.astype(y, dtype))
    if act in ("silu", "swish"):
        yf = bb.emit(R.astype(y, "float32")) if dtype != "float32" else y
        yf = bb.emit(R.multiply(yf, R.sigmoid(yf)))
        y = bb.emit(R.astype(yf, dtype)) if dtype != "float32" else yf
    elif act != "none":
        raise LoweringError(f"node {node.label()}: activation {act!r} is not one of none, silu, swish")
    total = dims_of(padded)[2]
    present = slice_axis(bb, padded, 2, total - (k - 1), total)
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
    rule = str_attr(node, "update_rule", "gated_delta")
    hq, hkv = node.attr("q_num_heads"), node.attr("kv_num_heads")
    if hq is None or hkv is None:
        raise LoweringError(f"node {node.label()}: LinearAttention needs q_num_heads and kv_num_heads")
    gating, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    b, t, _ = static_dims(node, q, "query")
    dtype = dtype_of(q)
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
    state_dtype = dtype_of(past) if past is not None else dtype
    state = bb.emit(R.astype(past, f32)) if past is not None else bb.emit(R.zeros((b, hkv, dk, dv), f32))
    scale = node.attr("scale")
    scale = 1.0 / np.sqrt(dk) if scale is None or float(scale) == 0.0 else float(scale)
    outs = []
    for i in range(t):
        q_t, k_t, v_t = (slice_axis(bb, a, 2, i, i + 1) for a in (q4, k4, v4))  # (B, H, 1, D)
        if d4 is not None:
            state = bb.emit(R.multiply(state, R.permute_dims(slice_axis(bb, d4, 2, i, i + 1), [0, 1, 3, 2])))
        if b4 is not None:
            retrieved = bb.emit(R.matmul(k_t, state))  # (B, H, 1, dv)
            v_t = bb.emit(R.multiply(slice_axis(bb, b4, 2, i, i + 1), R.subtract(v_t, retrieved)))
        state = bb.emit(R.add(state, R.matmul(R.permute_dims(k_t, [0, 1, 3, 2]), v_t)))
        read = bb.emit(R.repeat(state, group, axis=1)) if group > 1 else state
        outs.append(bb.emit(R.multiply(R.matmul(q_t, read), scalar_const(scale, f32))))
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
    shape = static_dims(node, x, "input")
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
    rot = slice_axis(bb, xs, 3, 0, rd) if rd < head else xs
    if node.attr("interleaved", 0):
        x1, x2 = slice_axis(bb, rot, 3, 0, rd, 2), slice_axis(bb, rot, 3, 1, rd, 2)
    else:
        x1, x2 = slice_axis(bb, rot, 3, 0, rd // 2), slice_axis(bb, rot, 3, rd // 2, rd)
    real = bb.emit(R.subtract(R.multiply(cos, x1), R.multiply(sin, x2)))
    imag = bb.emit(R.add(R.multiply(sin, x1), R.multiply(cos, x2)))
    if node.attr("interleaved", 0):
        rot = bb.emit(R.reshape(R.stack([real, imag], axis=-1), dims_of(rot)))
    else:
        rot = bb.emit(R.concat([real, imag], axis=-1))
    out = bb.emit(R.concat([rot, slice_axis(bb, xs, 3, rd, head)], axis=-1)) if rd < head else rot
    if len(shape) == 4:
        return bb.emit(R.permute_dims(out, [0, 2, 1, 3]))
    return bb.emit(R.reshape(out, shape))


@converter("Attention")
def _attention(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """ONNX Attention (opset 23): 3-D or 4-D Q/K/V, attn_mask (bool or additive, padded to the
    key length), past key/value, is_causal (offset by the past length), GQA, scale, softcap,
    softmax_precision, qk_matmul_output_mode; fully masked rows give zeros (as the reference)."""
    nonpad = ins[6] if len(ins) > 6 else None
    q, k, v = ins[0], ins[1], ins[2]
    mask = ins[3] if len(ins) > 3 else None
    past_k = ins[4] if len(ins) > 4 else None
    past_v = ins[5] if len(ins) > 5 else None
    dtype = str(q.ty.dtype)
    emit = bb.emit
    R = relax.op
    rank3 = q.ty.ndim == 3
    out_dtype = dtype
    if dtype == "float16":  # computed in float32 (as onnxruntime's CPU kernels), rounded once at the end
        dtype = "float32"
        q, k, v, past_k, past_v = (emit(R.astype(e, dtype)) if e is not None else None for e in (q, k, v, past_k, past_v))
        if mask is not None and str(mask.ty.dtype) == "float16":
            mask = emit(R.astype(mask, dtype))
    qh, kvh = node.attr("q_num_heads"), node.attr("kv_num_heads")
    if rank3:
        def heads(x: Any, h: int) -> Any:
            b, sq, hid = dims_of(x)
            x = emit(R.reshape(x, [b, sq, h, hid // h]))
            return emit(R.permute_dims(x, [0, 2, 1, 3]))

        q, k, v = heads(q, qh), heads(k, kvh), heads(v, kvh)
    dq = dims_of(q)[3]
    scale = node.attr("scale")
    scale = 1.0 / np.sqrt(dq) if scale is None else float(scale)
    sq_scale = relax.const(np.array(np.sqrt(scale), dtype=dtype), dtype)
    present_k = emit(R.concat([past_k, k], axis=2)) if past_k is not None else k
    present_v = emit(R.concat([past_v, v], axis=2)) if past_v is not None else v
    qlen, kvlen = dims_of(q)[2], dims_of(present_k)[2]
    neg_inf = relax.const(np.array(-np.inf, dtype=dtype), dtype)
    zero = relax.const(np.array(0, dtype=dtype), dtype)
    bias = None
    if mask is not None:
        mdims = dims_of(mask)
        pad = kvlen - mdims[-1] if isinstance(kvlen, int) and isinstance(mdims[-1], int) else 0
        if pad > 0:
            fill = np.zeros(mdims[:-1] + [pad], dtype=bool) if str(mask.ty.dtype) == "bool" else np.full(mdims[:-1] + [pad], -np.inf, dtype=str(mask.ty.dtype))
            mask = emit(R.concat([mask, relax.const(fill, str(fill.dtype))], axis=-1))
        if str(mask.ty.dtype) == "bool":
            mask = emit(R.where(mask, zero, neg_inf))
        bias = mask
    left, right = node.attr("left_window_size", -1), node.attr("right_window_size", -1)
    windowed = left is not None and left >= 0 or right is not None and right >= 0
    if node.attr("is_causal", 0) or windowed or nonpad is not None:
        if not (isinstance(qlen, int) and isinstance(kvlen, int)):
            raise LoweringError(f"node {node.label()}: causal/windowed/padded Attention needs static sequence lengths on the cpu target")
        # diff[i, j] = (query i's absolute position) - j; the offset is the past length, or per
        # batch nonpad_kv_seqlen - q_len (external cache) as a run-time [B, 1, 1, 1] tensor
        rel = np.arange(qlen)[:, None] - np.arange(kvlen)[None, :]
        npd = emit(R.reshape(emit(R.astype(nonpad, "int64")), (-1, 1, 1, 1))) if nonpad is not None else None
        if npd is not None and past_k is None:
            diff = emit(R.add(relax.const(rel.astype(np.int64), "int64"), R.subtract(npd, relax.const(np.array(qlen, np.int64), "int64"))))
        else:
            offset = dims_of(past_k)[2] if past_k is not None else 0
            diff = relax.const((rel + offset).astype(np.int64), "int64")
        allowed = None
        zero64 = relax.const(np.array(0, np.int64), "int64")
        conds = []
        if node.attr("is_causal", 0):
            conds.append(R.greater_equal(diff, zero64))
        if left is not None and left >= 0:
            conds.append(R.less_equal(diff, relax.const(np.array(left, np.int64), "int64")))
        if right is not None and right >= 0:
            conds.append(R.less_equal(R.negative(diff), relax.const(np.array(right, np.int64), "int64")))
        if nonpad is not None:
            conds.append(R.less(relax.const(np.arange(kvlen, dtype=np.int64), "int64"), npd))
        for c in conds:
            c = emit(c)
            allowed = c if allowed is None else emit(R.logical_and(allowed, c))
        if allowed is not None:
            extra = emit(R.where(allowed, zero, neg_inf))
            bias = emit(R.add(bias, extra)) if bias is not None else extra
    nq, nk = dims_of(q)[1], dims_of(present_k)[1]
    kk, vv = present_k, present_v
    if isinstance(nq, int) and isinstance(nk, int) and nq != nk and nq % nk == 0:
        kk = emit(R.repeat(kk, nq // nk, axis=1))
        vv = emit(R.repeat(vv, nq // nk, axis=1))
    qk = emit(R.matmul(emit(R.multiply(q, sq_scale)), emit(R.permute_dims(emit(R.multiply(kk, sq_scale)), [0, 1, 3, 2]))))
    softcap = node.attr("softcap")
    if softcap is not None and float(softcap) > 0:
        c = relax.const(np.array(float(softcap), dtype=dtype), dtype)
        qk = emit(R.multiply(R.tanh(R.divide(qk, c)), c))
    mode = node.attr("qk_matmul_output_mode", 0)
    out_qk = qk
    scores = emit(R.add(qk, bias)) if bias is not None else qk
    if mode == 2:
        out_qk = scores
    sdtype = dtype
    prec = node.attr("softmax_precision")
    if prec is not None:
        sdtype = str(onnx.helper.tensor_dtype_to_np_dtype(prec))
        if sdtype != dtype:
            scores = emit(R.astype(scores, sdtype))
    if bias is None:
        probs = emit(R.nn.softmax(scores, axis=-1))
    else:
        s_zero = relax.const(np.array(0, dtype=sdtype), sdtype)
        s_ninf = relax.const(np.array(-np.inf, dtype=sdtype), sdtype)
        mx = emit(R.max(scores, axis=[-1], keepdims=True))
        mx = emit(R.where(R.equal(mx, s_ninf), s_zero, mx))
        e = emit(R.exp(R.subtract(scores, mx)))
        tot = emit(R.sum(e, axis=[-1], keepdims=True))
        tot = emit(R.where(R.equal(tot, s_zero), relax.const(np.array(1, dtype=sdtype), sdtype), tot))
        probs = emit(R.divide(e, tot))
        masked = emit(R.equal(R.max(bias, axis=[-1], keepdims=True), neg_inf))
        probs = emit(R.where(masked, s_zero, probs))
    if mode == 3:
        out_qk = probs
    if str(out_qk.ty.dtype) != out_dtype:
        out_qk = emit(R.astype(out_qk, out_dtype))
    if sdtype != dtype:
        probs = emit(R.astype(probs, dtype))
    y = emit(R.matmul(probs, vv))
    if rank3:
        y = emit(R.permute_dims(y, [0, 2, 1, 3]))
        b, sq, h, d = dims_of(y)
        y = emit(R.reshape(y, [b, sq, h * d]))
    if out_dtype != dtype:
        y, present_k, present_v = (emit(R.astype(e, out_dtype)) for e in (y, present_k, present_v))
    return [y, present_k, present_v, out_qk]

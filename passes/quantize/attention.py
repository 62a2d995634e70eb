"""Dynamic int8 for onnxruntime's packed attention: com.microsoft Attention → com.microsoft QAttention.

`-O2 --contrib-ops` packs a transformer's Q/K/V projections into one com.microsoft Attention
(fuse-attention, rule packed-qkv-attention), so the quantize pass's dynamic MatMul rewrite no
longer sees them. Here (dynamic mode, the transformers' default):

    Attention(x, W[D, 3D], b[3D], [mask_index], -, [attention_bias = Where(cond, 0, fill)→Unsqueeze/Expand],
              num_heads=N, scale=s)
      →  xq, s_x, z_x = DynamicQuantizeLinear(x)                  (shared with other readers of x)
         QAttention(xq, Wq int8 [D, 3D], b, s_x, s_w[3D] (per column), mask, z_x,
                    num_heads=N, scale=s, mask_filter_value=fill)

Weights are int8 symmetric per output column (no weight zero point: 0), within [-64, 64] with
reduce_range like the MatMul path; onnxruntime's CPU kernel takes uint8 inputs only, which is what
DynamicQuantizeLinear gives. A missing bias becomes zeros (QAttention requires one).

The mask: QAttention has no additive `attention_bias`, only `mask_index`, whose raw 0/1 forms are
[B, T] (key padding) and [B, S, T]; onnxruntime adds `mask_filter_value` where the mask is 0 and
0 where it is 1, exactly what Where(cond, 0, fill) adds (checked against onnxruntime's fp32
Attention: identical outputs). So an attention_bias that is Where(cond, 0, fill) (or
Where(cond, fill, 0): mask = Not(cond)) with a bool cond and one negative constant fill, possibly
through Unsqueeze/Expand, becomes Cast(cond, int32) through the same Unsqueeze (and Expand, but
for trailing Expands, which only broadcast), squeezed to [B, T] when its query dim is 1 or else to
[B, S, T], and Expanded to x's batch/sequence where the dims are not known to be equal;
mask_filter_value = fill. Broadcasts are looked through for the narrowest [B|1, 1, S|1, T]
source: trailing Expands of the bias (fuse-attention expands HF's [B, 1, 1, T] mask to
[B, 1, S, T]) and, when there are only those, an Expand of the condition or its And with an
all-true constant (HF's vmap'ed padding mask, MiniLM's export): a key padding mask then becomes
the [B, T] form. One such mask is shared by every layer that reads the same bias; the float
Where and what computed it are removed when nothing else reads them.

Must not fire (the layer stays float, the report says why): static mode; x not float32 of rank
3; a weight that is not a float32 constant [D, 3·H] (H divisible by num_heads), a bias that is not
a float32 constant [3·H]; qkv_hidden_sizes of unequal sizes; unidirectional, do_rotary,
past_present_share_buffer or rotary_embedding_dim set, or another attribute QAttention lacks; past
or past_sequence_length inputs, or the present output read; both mask_index and attention_bias;
an attention_bias that is not a Where of a bool condition between 0 and a single negative constant
(an arbitrary additive bias, e.g. (1 − m)·−10000 of a float mask, is not provably a 0/1 mask), or
one that differs per head; excluded units and layers the accuracy budget keeps float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from graphopt.ir import Builder, DataType, Graph, Node, Shape, TensorType, Value
from graphopt.pattern import const_array

MS_DOMAIN = "com.microsoft"
# Attention attributes QAttention also has, and those it has but that are not carried here
_CARRIED = frozenset({"num_heads", "scale", "mask_filter_value", "qkv_hidden_sizes"})
_REFUSED = ("unidirectional", "do_rotary", "past_present_share_buffer", "rotary_embedding_dim")


def is_contrib_attention(node: Node) -> bool:
    return node.op_type == "Attention" and node.domain == MS_DOMAIN


@dataclass
class MaskPlan:
    """How an additive attention_bias becomes QAttention's 0/1 mask_index."""

    where: Node
    source: Value  # the bool tensor cast to the mask: the Where's condition or what it broadcasts
    negate: bool  # the fill is where cond is true: mask = Not(cond)
    fill: float
    dims: tuple  # [B|1, 1, S|1, T|1]: the mask's dims after `replay`
    replay: list[Node] = field(default_factory=list)  # Unsqueeze/Expand to apply to the mask, in order


def _ins(node: Node, n: int) -> list[Value | None]:
    return list(node.inputs) + [None] * (n - len(node.inputs))


def _used(v: Value | None) -> bool:
    return v is not None and (bool(v.uses()) or v.is_graph_output())


def _dims(v: Value | None) -> tuple | None:
    return None if v is None or v.shape is None else tuple(v.shape.dims)


def _scalar(v: Value | None) -> float | None:
    c = const_array(v) if v is not None else None
    if c is None or c.size != 1 or c.dtype.kind != "f":
        return None
    return float(np.asarray(c, np.float64).reshape(-1)[0])


def mask_plan(bias: Value) -> MaskPlan | str:
    """The Where(cond, 0, fill) behind an attention_bias (see the module docstring), or why not."""
    d = _dims(bias)
    if d is None or len(d) != 4:
        return f"attention_bias {bias.name!r} is not of known rank 4"
    if d[1] != 1:
        return f"attention_bias {bias.name!r} has {d[1]!r} heads (per-head bias): QAttention's mask_index has no head dim"
    chain: list[Node] = []
    v = bias
    while True:
        p = v.producer()
        if p is None:
            what = "a constant" if const_array(v) is not None else "a graph input"
            return (f"attention_bias {bias.name!r} is {what}, an arbitrary additive bias: not expressible as "
                    "QAttention's 0/1 mask_index")
        if p.domain in ("", "ai.onnx") and p.op_type in ("Unsqueeze", "Expand") and p.inputs and p.inputs[0] is not None:
            chain.append(p)
            v = p.inputs[0]
            continue
        break
    if p.op_type != "Where" or p.domain not in ("", "ai.onnx") or len(p.inputs) != 3:
        return (f"attention_bias {bias.name!r} comes from {p.op_type}, not Where(mask, 0, fill): an additive bias "
                "that is not provably a 0/1 mask is not expressible as QAttention's mask_index")
    cond, a, c = p.inputs
    if cond is None or cond.dtype != DataType.BOOL:
        return "attention_bias Where's condition is not bool"
    av, cv = _scalar(a), _scalar(c)
    cd = _dims(cond)
    if av is None or cv is None or cd is None:
        return "attention_bias Where's branches are not single float constants (or its condition's shape is unknown)"
    for val in (a, c):
        vd = _dims(val)
        if vd is not None and len(vd) > len(cd):
            return "attention_bias Where's constant branch has a higher rank than its condition"
    if av == 0.0 and cv != 0.0:
        negate, fill = False, cv
    elif cv == 0.0 and av != 0.0:
        negate, fill = True, av
    else:
        return f"attention_bias is Where(cond, {av:g}, {cv:g}): not one 0 branch and one fill"
    if not fill < 0 or math.isnan(fill):
        return f"attention_bias fill {fill:g} is not negative: not a mask"
    chain.reverse()
    # trailing Expands only broadcast, and so do an Expand of the condition and an And with an all-true
    # constant (HF's vmap'ed padding mask): the mask is expanded to x's batch/sequence at the end
    # anyway, so the narrowest [B|1, 1, S|1, T] source is cast (a [B, 1, 1, T] one is a key padding mask)
    k = len(chain)
    while k and chain[k - 1].op_type == "Expand":
        k -= 1
    source, dims = cond, (_dims(chain[k - 1].outputs[0]) if k else cd)
    if k == 0:
        while True:
            q = source.producer()
            nxt: Value | None = None
            if q is not None and q.domain in ("", "ai.onnx") and q.op_type == "Expand":
                nxt = q.inputs[0]
            elif q is not None and q.domain in ("", "ai.onnx") and q.op_type == "And" and len(q.inputs) == 2:
                for i in (0, 1):
                    cst = const_array(q.inputs[i])
                    if cst is not None and cst.dtype == np.bool_ and bool(cst.all()):
                        nxt = q.inputs[1 - i]
            nd = _dims(nxt)
            if nxt is None or nd is None or len(nd) != 4 or nd[1] != 1:
                break
            source, dims = nxt, nd
    if dims is None or len(dims) != 4 or dims[1] != 1:
        source, k, dims = cond, len(chain), d
    return MaskPlan(p, source, negate, fill, dims, chain[:k])


def float_reason(node: Node) -> str | None:
    """Why this com.microsoft Attention cannot become QAttention (None: it can)."""
    ins = _ins(node, 7)
    x, w, b, mask_index, past, bias, past_len = ins[:7]
    xd = _dims(x)
    if xd is None or len(xd) != 3:
        return f"Attention input of rank {len(xd) if xd else 'unknown'}: QAttention needs [B, S, D]"
    for a in _REFUSED:
        if node.attr(a, 0):
            return f"Attention attribute {a}={node.attr(a)!r}: not carried to QAttention here"
    extra = sorted(set(node.attributes) - _CARRIED - set(_REFUSED))
    if extra:
        return f"Attention attribute(s) {', '.join(extra)} that QAttention lacks"
    if past is not None or past_len is not None or any(_used(o) for o in node.outputs[1:]):
        return "Attention with past/present state: not carried to QAttention here"
    wv = const_array(w)
    if wv is None or wv.dtype != np.float32 or wv.ndim != 2:
        return "Attention weight is not a float32 constant matrix"
    heads = int(node.attr("num_heads", 0) or 0)
    sizes = node.attr("qkv_hidden_sizes")
    if sizes is not None and len(set(int(s) for s in sizes)) != 1:
        return f"Attention qkv_hidden_sizes {list(sizes)} differ: QAttention packs three equal parts"
    hidden = wv.shape[1] // 3
    if wv.shape[1] != 3 * hidden or heads <= 0 or hidden % heads:
        return f"Attention weight {list(wv.shape)} is not [D, 3·H] with H divisible by num_heads={heads}"
    if isinstance(xd[2], int) and xd[2] != wv.shape[0]:
        return f"Attention weight rows {wv.shape[0]} != input hidden size {xd[2]}"
    if b is not None:
        bv = const_array(b)
        if bv is None or bv.dtype != np.float32 or bv.shape != (wv.shape[1],):
            return "Attention bias is not a float32 constant [3·H]"
    if mask_index is not None and bias is not None:
        return "Attention with both mask_index and attention_bias: QAttention takes one mask"
    if mask_index is not None and mask_index.dtype != DataType.INT32:
        return "Attention mask_index is not int32"
    if bias is not None:
        plan = mask_plan(bias)
        if isinstance(plan, str):
            return plan
    return None


def macs(node: Node) -> int:
    """Multiply-accumulates of the packed projection per sample (0 when the shape is not static)."""
    w = const_array(node.inputs[1])
    xd = _dims(node.inputs[0])
    if w is None or xd is None or not isinstance(xd[1], int):
        return 0
    return int(w.size) * int(xd[1])


def _type(v: Value, dt: DataType, dims: tuple | list | None) -> None:
    v.type = TensorType(dt, Shape(tuple(dims)) if dims is not None else None)


def _mask_index(g: Graph, b: Builder, plan: MaskPlan, x: Value, bias: Value) -> Value:
    """QAttention's int32 mask_index for an attention_bias (see the module docstring)."""
    cd = _dims(plan.source)
    m = b.op.Not(plan.source) if plan.negate else plan.source
    if plan.negate:
        _type(m, DataType.BOOL, cd)
    m = b.op.Cast(m, to=int(DataType.INT32))
    _type(m, DataType.INT32, cd)
    d = plan.dims
    for p in plan.replay:  # the same Unsqueeze/Expand, on the 0/1 mask
        attrs = {a: p.attr(a) for a in p.attributes}
        m = getattr(b.op, p.op_type)(m, *p.inputs[1:], **attrs)
        _type(m, DataType.INT32, _dims(p.outputs[0]))
    xd = _dims(x)
    assert xd is not None
    key_padding = d[2] == 1
    axes = [1, 2] if key_padding else [1]
    m = b.op.Squeeze(m, b.initializer(np.array(axes, np.int64), f"{bias.name}_mask_axes"))
    have = (d[0], d[3]) if key_padding else (d[0], d[2], d[3])
    want = (xd[0], xd[1]) if key_padding else (xd[0], xd[1], xd[1])
    _type(m, DataType.INT32, have)
    if have != want:  # broadcast dims (or dims not known to be equal): expand to x's batch and sequence
        xs = b.op.Shape(x)
        _type(xs, DataType.INT64, (len(xd),))
        shape = b.op.Gather(xs, b.initializer(np.array([0, 1] if key_padding else [0, 1, 1], np.int64), f"{bias.name}_mask_dims"), axis=0)
        _type(shape, DataType.INT64, (len(want),))
        m = b.op.Expand(m, shape)
        _type(m, DataType.INT32, want)
    return m


def rewrite(g: Graph, b: Builder, node: Node, qmax: int, shared: dict[Value, tuple[Value, Value, Value]],
            masks: dict[Value, Value], quantize_weight) -> tuple[Value, Value]:
    """`node` (a com.microsoft Attention that float_reason accepts) → QAttention; returns (old
    output, new output). The caller replaces the uses and removes `node`."""
    ins = _ins(node, 7)
    x, wv, bv, mask_index, _, bias = ins[:6]
    assert x is not None and wv is not None
    w = const_array(wv)
    assert w is not None
    wq, ws = quantize_weight(w, 1, qmax)  # per output column
    name = node.name or node.outputs[0].name
    with g.inserting_before(node):
        if x not in shared:
            xq, xs, xz = b.op.DynamicQuantizeLinear(x, _outputs=3)
            _type(xq, DataType.UINT8, _dims(x))
            _type(xs, DataType.FLOAT, ())
            _type(xz, DataType.UINT8, ())
            shared[x] = (xq, xs, xz)
        xq, xs, xz = shared[x]
        wq_v = b.initializer(wq, f"{wv.name}_q")
        ws_v = b.initializer(ws, f"{wv.name}_scale")
        if bv is None:
            bv = b.initializer(np.zeros(w.shape[1], np.float32), f"{name}_qkv_bias")
        attrs: dict = {"num_heads": int(node.attr("num_heads"))}
        if node.attr("scale") is not None:
            attrs["scale"] = float(node.attr("scale"))
        mask: Value | None = mask_index
        if mask_index is not None and node.attr("mask_filter_value") is not None:
            attrs["mask_filter_value"] = float(node.attr("mask_filter_value"))
        if bias is not None:
            plan = mask_plan(bias)
            assert not isinstance(plan, str)
            if bias not in masks:
                masks[bias] = _mask_index(g, b, plan, x, bias)
            mask = masks[bias]
            attrs["mask_filter_value"] = float(plan.fill)
        y = b.op[MS_DOMAIN].QAttention(xq, wq_v, bv, xs, ws_v, mask, xz, **attrs)
    out = node.outputs[0]
    y.type = out.type
    qa = y.producer()
    if qa is not None:
        qa.name = name  # the unit's name (node or output name), so per-layer profiles find the int8 kernel
    return out, y


def drop_dead_masks(g: Graph, biases: list[Value]) -> list[Value]:
    """Remove what computed the float attention biases (the Where, its Unsqueeze/Expand, the
    condition's broadcasts) where nothing reads it any more; returns the constants those nodes
    read (for drop_unused_initializers)."""
    touched: list[Value] = []
    work = list(biases)
    while work:
        v = work.pop()
        p = v.producer()
        if p is None or p.graph is not g or p.subgraphs() or any(_used(o) for o in p.outputs):
            continue
        ins = [i for i in p.inputs if i is not None]
        g.remove(p)
        touched += ins
        work += ins
    return touched

"""Planning and writing int8 QDQ: which ops become int8 (and why not), and the QDQ graph itself.

The layout is the one onnxruntime's QDQ transformer turns into int8 kernels (a "node unit" is
DequantizeLinear on every quantized input → the op → QuantizeLinear on its output):

    static conv:  x ─Q─DQ─┐                       Conv → QLinearConv
                  Wq(int8, per-channel) ─DQ─ Conv ─Q─DQ─▶
                  bq(int32, scale s_x·s_w) ─DQ─┘
    Relu/Clip(0, M) after a unit: removed, its output range (lower end 0 = the zero point) is the Q range
    Add/Mul (two activations) → QLinearAdd/QLinearMul; Concat → QLinearConcat;
    AveragePool/GlobalAveragePool → QLinear pools; MaxPool/Reshape/Flatten/Transpose/Squeeze/
    Unsqueeze/Resize: the output reuses the input's scale and zero point, so onnxruntime drops the
    Q/DQ around them and runs them on int8 data
    dynamic MatMul (transformers):  x → DynamicQuantizeLinear → MatMulInteger(·, Wq) → Cast → Mul(s_x·s_w)
                  (onnxruntime fuses this into DynamicQuantizeMatMul)
    dynamic com.microsoft Attention (packed Q/K/V of -O2 --contrib-ops):  x → DynamicQuantizeLinear →
                  com.microsoft QAttention(·, Wq per column, b, s_x, s_w, mask_index, z_x)
                  (see attention.py: an additive Where mask becomes the 0/1 mask_index)

Every activation tensor is quantized once (one Q, one DQ that all readers share); weights are
int8 symmetric per output channel, within [-64, 64] when `reduce_range` (CPUs without VNNI,
whose u8s8 kernels add pairs of u8·s8 products in saturating int16).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from graphopt.calibration import TensorStats
from graphopt.ir import Builder, DataType, Model, Node, Shape, TensorType, Value, opset_version
from graphopt.pattern import const_array, drop_unused_initializers
from graphopt.passes.quantize import attention as qattention

COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
BINARY = ("Add", "Mul")
POOLS = ("AveragePool", "GlobalAveragePool")
UNARY = ("Sigmoid", "LeakyRelu")  # onnxruntime has QLinearSigmoid / QLinearLeakyRelu (lookup tables)
PASSTHROUGH = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Resize")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
           "QLinearConv", "QLinearMatMul", "QAttention")


@dataclass
class QuantOptions:
    activations: str = "uint8"  # "uint8" (asymmetric) or "int8" (symmetric)
    reduce_range: bool = False  # 7-bit weights ([-64, 64])
    per_channel: bool = True
    matmul: str = "static"  # how MatMul/Gemm with constant weights are done: static | dynamic | float
    exclude: frozenset[str] = frozenset()  # unit names (node name or output name) kept float
    op_types: frozenset[str] | None = None  # only these op types (None: all supported)


@dataclass
class Unit:
    """One op the quantizer considered."""

    node: Node
    name: str
    kind: str  # conv | gemm | matmul | attention | binary | concat | pool | unary | passthrough
    acts: list[int]  # input indices that carry activations to quantize
    weight: int | None = None
    bias: int | None = None
    folded: Node | None = None  # Relu/Clip removed into the output range
    mode: str = "static"  # static | dynamic
    float_reason: str | None = None  # why it stays float (None: quantized)
    tags: set[str] = field(default_factory=set)  # depthwise, tiny, ...
    macs: int = 0

    @property
    def quantized(self) -> bool:
        return self.float_reason is None

    @property
    def out(self) -> Value:
        """The tensor whose range the output Q uses (the folded activation's output if any)."""
        return (self.folded or self.node).outputs[0]

    def act_values(self) -> list[Value]:
        return [self.node.inputs[i] for i in self.acts]  # type: ignore[misc]

    @property
    def op(self) -> str:
        return self.node.op_type + ("+" + self.folded.op_type if self.folded is not None else "")


def unit_name(node: Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op_type)


def _is_float32(v: Value | None) -> bool:
    # types come from shape inference (the pass runs it first); unknown counts as not float
    return v is not None and v.dtype == DataType.FLOAT


def _const(v: Value | None) -> np.ndarray | None:
    return None if v is None else const_array(v)


def _foldable_activation(node: Node) -> Node | None:
    """The Relu / Clip(0, M) that alone reads `node`'s output, if any."""
    out = node.outputs[0]
    users = out.consumers()
    if len(users) != 1 or out.is_graph_output():
        return None
    act = users[0]
    if act.domain not in ("", "ai.onnx") or act.inputs[0] is not out:
        return None
    if act.op_type == "Relu":
        return act
    if act.op_type == "Clip":
        lo = _const(act.inputs[1]) if len(act.inputs) > 1 and act.inputs[1] is not None else act.attr("min", None)
        if lo is None:
            return None
        if np.asarray(lo).size == 1 and float(np.asarray(lo).reshape(-1)[0]) == 0.0:
            hi = act.inputs[2] if len(act.inputs) > 2 else None
            if hi is not None and _const(hi) is None:
                return None
            return act
    return None


def _macs(node: Node, w: np.ndarray) -> int:
    """Multiply-accumulates per sample (needs the output's static shape; 0 when unknown)."""
    shape = node.outputs[0].shape
    if shape is None or not all(isinstance(d, int) for d in shape.dims[1:]):
        return 0
    spatial = int(np.prod([d for d in shape.dims[2:]])) if node.op_type.startswith("Conv") else 1
    if node.op_type == "ConvTranspose":
        # every input pixel is scattered through the whole kernel: MACs follow the input's size
        ishape = node.inputs[0].shape
        if ishape is None or not all(isinstance(d, int) for d in ishape.dims[2:]):
            return 0
        spatial = int(np.prod([d for d in ishape.dims[2:]]))
    if node.op_type in ("Gemm", "MatMul"):
        rows = int(np.prod([d for d in shape.dims[:-1] if isinstance(d, int)] or [1]))
        return int(w.size) * rows
    return int(w.size) * spatial


def plan_units(model: Model, opts: QuantOptions) -> list[Unit]:
    """Every supported op of the main graph, with the decision whether it can be int8 and why not
    (ops inside If/Loop/Scan bodies and function bodies stay float: see float_subgraphs)."""
    g = model.graph
    units: list[Unit] = []
    opset = opset_version(model, default=0)
    softmax_inputs = {n.inputs[0] for n in g if n.op_type == "Softmax" and n.inputs}
    u: Unit | None
    for node in g:
        if qattention.is_contrib_attention(node):
            u = Unit(node, unit_name(node), "attention", [0], weight=1,
                     bias=2 if len(node.inputs) > 2 and node.inputs[2] is not None else None)
            units.append(u)
            u.float_reason = _why_float(u, opts, opset, softmax_inputs)
            continue
        if node.domain not in ("", "ai.onnx"):
            continue
        op = node.op_type
        name = unit_name(node)
        u = None
        if op in ("Conv", "ConvTranspose"):
            u = Unit(node, name, "conv", [0], weight=1, bias=2 if len(node.inputs) > 2 and node.inputs[2] is not None else None)
        elif op == "Gemm":
            u = Unit(node, name, "gemm", [0], weight=1, bias=2 if len(node.inputs) > 2 and node.inputs[2] is not None else None)
        elif op == "MatMul":
            u = Unit(node, name, "matmul", [0], weight=1)
        elif op in BINARY:
            u = Unit(node, name, "binary", [0, 1])
        elif op == "Concat":
            u = Unit(node, name, "concat", list(range(len(node.inputs))))
        elif op in POOLS:
            u = Unit(node, name, "pool", [0])
        elif op in UNARY:
            u = Unit(node, name, "unary", [0])
        elif op in PASSTHROUGH and len(node.outputs) == 1:
            u = Unit(node, name, "passthrough", [0])
        if u is None:
            continue
        units.append(u)
        u.float_reason = _why_float(u, opts, opset, softmax_inputs)
        if u.float_reason is None and u.kind in ("conv", "gemm", "matmul", "binary") and u.mode == "static":
            u.folded = _foldable_activation(node)
    return units


QUANTIZABLE = COMPUTE + BINARY + POOLS + UNARY + ("Concat",)

SUBGRAPH_REASON = (
    "stays float: calibration sees main-graph tensors only (onnxruntime cannot return a body's "
    "intermediate values as outputs, and a Loop/Scan body sees different values every iteration), "
    "so its activations have no calibrated range")
FUNCTION_REASON = (
    "stays float: a model-local function body is shared by every call site, whose tensors have "
    "different ranges, and onnxruntime inlines it only at load time")


def float_subgraphs(model: Model) -> list[dict[str, object]]:
    """The If/Loop/Scan bodies and model-local function bodies that hold ops the quantizer
    handles in the main graph (plan_units only plans the main graph): where, which ops, why float."""
    out: list[dict[str, object]] = []

    def count(g) -> dict[str, int]:
        ops: dict[str, int] = {}
        for n in g.all_nodes():
            if n.domain in ("", "ai.onnx") and n.op_type in QUANTIZABLE:
                ops[n.op_type] = ops.get(n.op_type, 0) + 1
        return ops

    def walk(g, where: str) -> None:
        for n in g:
            for key, a in n.attributes.items():
                gs = [a.value] if a.type == 5 else list(a.value or []) if a.type == 10 else []
                for sub in gs:
                    if sub is None:
                        continue
                    here = f"{where}{n.op_type} {unit_name(n)!r} {key}"
                    ops = count(sub)
                    if ops:
                        out.append({"where": here, "ops": ops, "reason": SUBGRAPH_REASON})
                    walk(sub, here + " > ")

    walk(model.graph, "")
    for (domain, fname, _), f in model.functions.items():
        ops = count(f.graph)
        if ops:
            out.append({"where": f"function {domain + '.' if domain else ''}{fname}", "ops": ops, "reason": FUNCTION_REASON})
    return out


def _why_float(u: Unit, opts: QuantOptions, opset: int, softmax_inputs: set[Value]) -> str | None:
    node = u.node
    if u.name in opts.exclude or node.outputs[0].name in opts.exclude:
        return "excluded by the user"
    if opts.op_types is not None and node.op_type not in opts.op_types:
        return f"op type {node.op_type} not selected"
    if opset < 13:
        return f"opset {opset} < 13 has no per-channel QuantizeLinear"
    ins = node.inputs
    for v in node.inputs:
        if v is not None and v.producer() is not None and v.producer().op_type in QDQ_OPS:  # type: ignore[union-attr]
            return "already quantized"
    for v in node.outputs:
        if any(c.op_type in QDQ_OPS for c in v.consumers()):
            return "already quantized"
    if not _is_float32(node.outputs[0]) or any(not _is_float32(ins[i]) for i in u.acts if i < len(ins)):
        return "not float32"
    if any(ins[i] is None for i in u.acts):
        return "missing input"
    if node.outputs[0] in softmax_inputs:
        return "feeds Softmax (attention scores and masks stay float)"
    if u.kind == "attention":
        if opts.matmul != "dynamic":
            return "com.microsoft Attention: its int8 form QAttention quantizes the input at run time (dynamic mode only)"
        why = qattention.float_reason(node)
        if why is not None:
            return why
        u.macs = qattention.macs(node)
        u.mode = "dynamic"
        return None
    if u.kind in ("conv", "gemm", "matmul"):
        w = _const(ins[1])
        if w is None or w.dtype != np.float32:
            if u.kind == "matmul":
                return "activation × activation MatMul (attention) stays float"
            return "weight is not a float32 constant"
        if u.bias is not None:
            b = _const(ins[u.bias])
            if b is None or b.dtype != np.float32:
                return "bias is not a float32 constant"
        if u.kind == "conv":
            group = int(node.attr("group", 1))
            if w.ndim < 3:
                return "weight rank < 3"
            if node.op_type == "ConvTranspose":
                # weight [C_in, C_out/group, k...]: per-channel scales run along axis 1 and are
                # shared by the groups (DequantizeLinear has one axis); onnxruntime's CPU EP has
                # no int8 ConvTranspose, so its QDQ form runs as float there (speed check decides)
                u.tags.add("no-ort-int8-kernel")
                if w.shape[0] % group:
                    return f"ConvTranspose weight has {w.shape[0]} input channels, not a multiple of group={group}"
                if group > 1 and w.shape[0] == group and w.shape[1] == 1:
                    u.tags.add("depthwise")
            elif group > 1 and w.shape[1] == 1:
                u.tags.add("depthwise")
        if u.kind == "gemm":
            if float(node.attr("alpha", 1.0)) != 1.0 or float(node.attr("beta", 1.0)) != 1.0 or int(node.attr("transA", 0)):
                return "Gemm with alpha/beta != 1 or transA"
            if u.bias is not None and _const(ins[u.bias]).size not in (1, w.shape[0] if int(node.attr("transB", 0)) else w.shape[1]):  # type: ignore[union-attr]
                return "Gemm bias is not per output column"
        if u.kind == "matmul" and w.ndim != 2:
            return "MatMul weight is not 2-D"
        u.macs = _macs(node, w)
        if u.kind in ("gemm", "matmul"):
            if opts.matmul == "float":
                return "MatMul/Gemm kept float (matmul=float)"
            u.mode = opts.matmul
    else:
        for i in u.acts:
            if _const(ins[i]) is not None:
                return "an input is a constant (only activation inputs are quantized here)"
    return None


# ------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int
    dtype: DataType


def activation_params(lo: float, hi: float, activations: str) -> QParams:
    """Scale and zero point for range [lo, hi] (lo <= 0 <= hi): uint8 asymmetric, or int8
    symmetric (zero point -128 when the range starts at 0, so a folded Relu stays exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if activations == "uint8":
        s = (hi - lo) / 255.0
        if s <= 0 or not np.isfinite(s):
            return QParams(1.0, 0, DataType.UINT8)
        zp = int(np.clip(np.round(-lo / s), 0, 255))
        return QParams(float(np.float32(s)), zp, DataType.UINT8)
    if lo == 0.0:
        s = hi / 255.0
        return QParams(float(np.float32(s)) if s > 0 else 1.0, -128, DataType.INT8)
    m = max(-lo, hi)
    return QParams(float(np.float32(m / 127.0)) if m > 0 else 1.0, 0, DataType.INT8)


def quantize_weight(w: np.ndarray, axis: int | None, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights, per channel along `axis` (None: per tensor): (wq, scale)."""
    if axis is None:
        amax = np.array(np.abs(w).max(), np.float64)
    else:
        other = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=other).astype(np.float64)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    wq = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return wq, scale


def quantize_array(x: np.ndarray, p: QParams) -> np.ndarray:
    """What QuantizeLinear computes (round half to even, saturate)."""
    info = np.iinfo(p.dtype.numpy())
    return np.clip(np.rint(x / np.float32(p.scale)) + p.zero_point, info.min, info.max).astype(p.dtype.numpy())


def dequantize_array(q: np.ndarray, p: QParams) -> np.ndarray:
    return ((q.astype(np.int32) - p.zero_point) * np.float32(p.scale)).astype(np.float32)


# ------------------------------------------------------------------------------------- apply


@dataclass
class Applied:
    """What apply() wrote: tensor name -> its DQ output name (for per-layer error), counts."""

    dq_of: dict[str, str] = field(default_factory=dict)
    out_of: dict[str, str] = field(default_factory=dict)  # unit name -> its fp32 output's name (before renames)
    params: dict[str, QParams] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    bias_clipped: int = 0


def weight_axis(node: Node, w: np.ndarray) -> int:
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if int(node.attr("transB", 0)) else 1
    if node.op_type == "MatMul":
        return w.ndim - 1
    return 0


def apply(model: Model, units: Iterable[Unit], stats: dict[str, TensorStats], opts: QuantOptions) -> Applied:
    """Rewrite `model` in place: every quantized unit in QDQ form (see the module docstring)."""
    g = model.graph
    b = Builder(g)
    res = Applied()
    quant = [u for u in units if u.quantized]
    static = [u for u in quant if u.mode == "static"]
    dynamic = [u for u in quant if u.mode == "dynamic"]
    qmax = 64 if opts.reduce_range else 127
    # constants the rewrite may leave unread (float weights, Clip bounds): dropped at the end
    touched: list[Value] = [v for u in quant for v in u.node.inputs[1:] if v is not None]
    touched += [v for u in quant if u.folded is not None for v in u.folded.inputs[1:] if v is not None]

    res.out_of = {u.name: u.out.name for u in static}
    # 1. activation parameters; pass-through ops inherit their input's (topological order)
    params: dict[Value, QParams] = {}
    for u in static:
        if u.kind == "passthrough":
            src = u.node.inputs[0]
            if src in params:
                params[u.node.outputs[0]] = params[src]
            continue
        for v in u.act_values():
            if v not in params:
                st = stats[v.name]
                params[v] = activation_params(st.lo, st.hi, opts.activations)
        st = stats[u.out.name]
        params[u.out] = activation_params(st.lo, st.hi, opts.activations)
    # a pass-through whose input is not quantized stays float
    static = [u for u in static if u.kind != "passthrough" or u.node.outputs[0] in params]

    in_scale = {u.node: params[u.node.inputs[0]].scale for u in static if u.kind in ("conv", "gemm", "matmul")}  # type: ignore[index]
    # the fp32 tensor each quantized value stands for (a folded activation: its output)
    fp32_name: dict[Value, str] = {v: v.name for v in params}
    # 2. fold Relu/Clip: readers of the activation read the compute output, the Q range does the clipping
    for u in static:
        act = u.folded
        if act is None:
            continue
        raw, out = u.node.outputs[0], act.outputs[0]
        p = params.pop(out)
        out.replace_all_uses_with(raw)
        if out.is_graph_output():
            g.outputs[:] = [raw if o is out else o for o in g.outputs]
            raw.name, out.name = out.name, raw.name
        g.remove(act)
        params[raw] = p
        fp32_name[raw] = fp32_name.pop(out)
        res.counts["activations-folded"] = res.counts.get("activations-folded", 0) + 1

    # 3. one Q/DQ pair per quantized activation tensor
    for v, p in params.items():
        res.dq_of[fp32_name[v]] = _insert_qdq(model, b, v, p, res)
        res.params[fp32_name[v]] = p

    # 4. weights and biases of the static compute units
    for u in static:
        if u.kind not in ("conv", "gemm", "matmul"):
            res.counts[f"int8-{u.node.op_type}"] = res.counts.get(f"int8-{u.node.op_type}", 0) + 1
            continue
        node = u.node
        wv = node.inputs[1]
        w = _const(wv)
        assert w is not None
        axis = weight_axis(node, w) if opts.per_channel else None
        wq, ws = quantize_weight(w, axis, qmax)
        with g.inserting_before(node):
            wq_v = b.initializer(wq, f"{wv.name}_q")  # type: ignore[union-attr]
            ws_v = b.initializer(ws if axis is not None else ws.reshape(()), f"{wv.name}_scale")  # type: ignore[union-attr]
            wz_v = b.initializer(np.zeros(ws.shape, np.int8), f"{wv.name}_zp")  # type: ignore[union-attr]
            kw = {"axis": axis} if axis is not None else {}
            wdq = b.op.DequantizeLinear(wq_v, ws_v, wz_v, **kw)
        _type(wdq, DataType.FLOAT, w.shape)
        node.replace_input_with(1, wdq)
        if u.bias is not None:
            bv = node.inputs[u.bias]
            bias = _const(bv).astype(np.float64).reshape(-1)  # type: ignore[union-attr]
            sx = in_scale[node]
            nout = ws.size
            bias_scale = (np.float32(sx) * ws.reshape(-1)).astype(np.float32)
            if bias.size == 1 and nout > 1:
                bias = np.repeat(bias, nout)
            if bias_scale.size == 1 and bias.size > 1:
                bias_scale = np.repeat(bias_scale, bias.size)
            elif bias_scale.size != bias.size and bias.size % bias_scale.size == 0:
                # grouped ConvTranspose: output channel g·(C_out/group) + j has weight scale ws[j]
                bias_scale = np.tile(bias_scale, bias.size // bias_scale.size)
            raw_q = np.round(bias / np.maximum(bias_scale.astype(np.float64), 1e-30))
            res.bias_clipped += int((np.abs(raw_q) > 2**31 - 1).sum())
            bq = np.clip(raw_q, -(2**31 - 1), 2**31 - 1).astype(np.int32)
            with g.inserting_before(node):
                bq_v = b.initializer(bq, f"{bv.name}_q")  # type: ignore[union-attr]
                bs_v = b.initializer(bias_scale, f"{bv.name}_scale")  # type: ignore[union-attr]
                bdq = b.op.DequantizeLinear(bq_v, bs_v, axis=0)
            _type(bdq, DataType.FLOAT, (bias.size,))
            node.replace_input_with(u.bias, bdq)
        res.counts[f"int8-{node.op_type}"] = res.counts.get(f"int8-{node.op_type}", 0) + 1

    # 5. dynamic MatMul/Gemm: DynamicQuantizeLinear (shared per input) → MatMulInteger → Cast → Mul
    dq_dyn: dict[Value, tuple[Value, Value, Value]] = {}
    masks: dict[Value, Value] = {}
    for u in dynamic:
        if u.kind == "attention":
            _attention(model, b, u, qmax, dq_dyn, masks, res)
        else:
            _dynamic(model, b, u, qmax, dq_dyn, res)
    if masks:
        touched += qattention.drop_dead_masks(g, list(masks))
    for v in touched:  # Constant nodes nothing reads any more
        p = v.producer()
        if p is not None and p.op_type == "Constant" and p.graph is g and not v.uses() and not v.is_graph_output():
            g.remove(p)
    drop_unused_initializers(touched)
    g.sort()
    return res


def _type(v: Value, dt: DataType, shape: Iterable[int | str | None] | None) -> None:
    v.type = TensorType(dt, Shape(tuple(shape)) if shape is not None else None)


def _insert_qdq(model: Model, b: Builder, v: Value, p: QParams, res: Applied) -> str:
    """Q/DQ after `v`; every reader of `v` reads the DQ output (which takes over a graph
    output's name). Returns the DQ output's name."""
    g = model.graph
    readers = v.uses()
    prod = v.producer()
    base = v.name or "t"
    ctx = g.inserting_after(prod) if prod is not None else (g.inserting_before(g.nodes[0]) if len(g) else None)
    assert ctx is not None
    with ctx:
        s = b.initializer(np.array(p.scale, np.float32), f"{base}_scale")
        z = b.initializer(np.array(p.zero_point, p.dtype.numpy()), f"{base}_zp")
        q = b.op.QuantizeLinear(v, s, z)
        dq = b.op.DequantizeLinear(q, s, z)
    shape = v.shape.dims if v.shape is not None else None
    _type(q, p.dtype, shape)
    _type(dq, DataType.FLOAT, shape)
    for node, i in readers:
        node.replace_input_with(i, dq)
    if v.is_graph_output():
        g.outputs[:] = [dq if o is v else o for o in g.outputs]
        v.name, dq.name = dq.name, v.name
    res.counts["qdq-pairs"] = res.counts.get("qdq-pairs", 0) + 1
    return dq.name


def _dynamic(model: Model, b: Builder, u: Unit, qmax: int, shared: dict[Value, tuple[Value, Value, Value]], res: Applied) -> None:
    g = model.graph
    node = u.node
    x, wv = node.inputs[0], node.inputs[1]
    w = _const(wv)
    assert x is not None and w is not None
    if node.op_type == "Gemm" and int(node.attr("transB", 0)):
        w = np.ascontiguousarray(w.T)
    wq, ws = quantize_weight(w, 1, qmax)  # per output column
    out = node.outputs[0]
    orig = out.name
    with g.inserting_before(node):
        if x not in shared:
            xq, xs, xz = b.op.DynamicQuantizeLinear(x, _outputs=3)
            _type(xq, DataType.UINT8, x.shape.dims if x.shape is not None else None)
            _type(xs, DataType.FLOAT, ())
            _type(xz, DataType.UINT8, ())
            shared[x] = (xq, xs, xz)
        xq, xs, xz = shared[x]
        wq_v = b.initializer(wq, f"{wv.name}_q")  # type: ignore[union-attr]
        wz_v = b.initializer(np.zeros(ws.shape, np.int8), f"{wv.name}_zp")  # type: ignore[union-attr]
        ws_v = b.initializer(ws, f"{wv.name}_scale")  # type: ignore[union-attr]
        acc = b.op.MatMulInteger(xq, wq_v, xz, wz_v)
        accf = b.op.Cast(acc, to=int(DataType.FLOAT))
        scale = b.op.Mul(xs, ws_v)
        y = b.op.Mul(accf, scale)
        if node.op_type == "Gemm" and u.bias is not None:
            y = b.op.Add(y, node.inputs[u.bias])
    oshape = out.shape.dims if out.shape is not None else None
    _type(acc, DataType.INT32, oshape)
    _type(accf, DataType.FLOAT, oshape)
    _type(scale, DataType.FLOAT, ws.shape)
    _type(y, DataType.FLOAT, oshape)
    out.replace_all_uses_with(y, replace_graph_outputs=True)
    if any(o is y for o in g.outputs):
        y.name, out.name = out.name, y.name
    res.dq_of[orig] = y.name
    g.remove(node)
    mmi = acc.producer()
    if node.name and mmi is not None:
        mmi.name = node.name  # the unit's name, so per-layer profiles find the int8 kernel
    res.counts[f"dynamic-{node.op_type}"] = res.counts.get(f"dynamic-{node.op_type}", 0) + 1


def _attention(model: Model, b: Builder, u: Unit, qmax: int, shared: dict[Value, tuple[Value, Value, Value]],
               masks: dict[Value, Value], res: Applied) -> None:
    """com.microsoft Attention → DynamicQuantizeLinear → QAttention (attention.py)."""
    g = model.graph
    node = u.node
    out, y = qattention.rewrite(g, b, node, qmax, shared, masks, quantize_weight)
    orig = out.name
    out.replace_all_uses_with(y, replace_graph_outputs=True)
    if any(o is y for o in g.outputs):
        y.name, out.name = out.name, y.name
    res.dq_of[orig] = y.name
    g.remove(node)
    res.counts["dynamic-Attention"] = res.counts.get("dynamic-Attention", 0) + 1

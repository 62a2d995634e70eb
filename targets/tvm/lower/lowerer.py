"""Lower graphopt IR to a Relax IRModule: one private primitive Relax function per kernel group.

    main(inputs..., params...)            # attribute num_input = number of model inputs
        lv0 = k0(x, w0, b0)                # each group a private function with Primitive=True
        lv1 = k1(lv0, w1)
        ...

Groups come from `plan-kernels` (node metadata `graphopt.kernel`); TVM's FuseOps never runs, so
the kernels are exactly graphopt's groups. `legalize_and_fuse` then runs LegalizeOps →
AnnotateTIROpPattern → FuseTIR, giving one TIR PrimFunc per group, named after it.

Per node, Relax expressions come from Relax's ONNX frontend converters where one exists (they
are called one node at a time, with the block builder, the node's inputs and its parsed
attributes; this relies on private helpers of apache-tvm 0.27, so the version is pinned) and
from graphopt's own converters (`CONVERTERS` below) for ops it lacks or gets wrong.

Constants: large initializers (weights) become parameters of `main` (bound at load time from
the artifact's params file, so the library stays small) and reach a group as arguments (FuseTIR
rejects a constant captured inside a primitive function). Small constants (integer tensors up
to 4096 elements, any tensor of at most 16 elements) are inlined, so converters specialise
shapes, axes, pads, sizes and k from them; any that are still data after conversion are lifted
out of the group into arguments again.

A group that cannot be a primitive function (an op that does not legalize into a TIR kernel,
shape computations, data-dependent output shapes) is emitted inline into `main` instead, node
by node; `LoweredModule.inline_groups` lists them with the reason.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import onnx
import tvm
import tvm.sym  # the Analyzer (0.27 moved tvm.arith to tvm.sym)
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _fe

from graphopt import GraphoptError
from graphopt.ir import Model, Node, Value
from graphopt.ir.core import AttrType
from graphopt.ir.types import TensorType
from graphopt.targets.machine import MachineModel, machine_model

from ..kernels.blocked import max_pool_nchw
from .registry import CONVERTERS, LoweringError, const_value, converter, dims_of
from ..kernels.minmax import arg_max_min, reduce_max_min

KERNEL_KEY = "graphopt.kernel"

#: int32/int64/bool constants up to this many elements are inlined (shape-deciding inputs, indices;
#: not 8-bit weights: a depthwise int8 conv's inlined weight was repacked inside its kernel, 3.5x slower)
INLINE_INT_ELEMS = 4096
#: any constant up to this many elements is inlined
INLINE_ANY_ELEMS = 16
#: elements per tensor: TVM folds shapes and flat indices into int32 literals in places
#: (RewriteDataflowReshape rejected a 2**42-element Tile), and a schedule's loops over a dim of
#: 2**40 ran for minutes before building anything
MAX_ELEMENTS = 2**31 - 1


def _contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    return np.require(a, requirements="C")


class ShapeUnificationError(LoweringError):
    """A node needs dims of its inputs equal that are different expressions of the symbolic input
    dims (a Concat of an upsampled map with a skip connection: `((H - 3) // 8 + 1) * 2` and
    `(H - 3) // 4 + 1`); `divisors` maps each symbolic dim to the multiple that makes them equal
    expressions (the product of the floor divisions it goes through)."""

    def __init__(self, msg: str, divisors: dict[str, int]) -> None:
        super().__init__(msg)
        self.divisors = divisors


def _floordiv_multiple(e: Any, out: dict[str, int]) -> None:
    """For each var of dim expression `e`, the product of the constant floor divisors above it
    (lcm over the paths): `(H - 3) // 8 + 1` → {"H": 8}."""
    import math

    def walk(x: Any, factor: int) -> None:
        if isinstance(x, tvm.tirx.Var):
            out[x.name] = math.lcm(out.get(x.name, 1), factor)
            return
        if isinstance(x, (tvm.tirx.FloorDiv, tvm.tirx.FloorMod, tvm.tirx.Div, tvm.tirx.Mod)):
            d = x.b
            walk(x.a, factor * int(d.value) if isinstance(d, tvm.tirx.IntImm) and int(d.value) > 0 else factor)
            walk(x.b, factor)
            return
        for k in ("a", "b", "value", "condition", "true_value", "false_value"):
            sub = getattr(x, k, None)
            if isinstance(sub, tvm.ir.expr.Expr) and not isinstance(x, tvm.tirx.IntImm):
                walk(sub, factor)

    walk(e, 1)


#: ops whose output shape joins their inputs' dims (equal, or broadcast): where a strided map meets
#: an unstrided one, `_check_unified` asks for multiples
JOINING_OPS = frozenset("""Concat Add Sub Mul Div Pow Max Min Sum Mean Where And Or Xor Equal Less Greater
    LessOrEqual GreaterOrEqual PRelu BitShift Mod MatMul Gemm Conv ConvInteger BatchNormalization""".split())


def _check_unified(node: Node, ins: list[Any], outs: list[Any]) -> None:
    """Raise ShapeUnificationError when `node` lost its output shape (rank only) although every
    tensor input had one: Relax could not prove dims equal that the op needs equal."""
    def shaped(e: Any) -> bool:
        ty = getattr(e, "ty", None) if isinstance(e, relax.Expr) else None
        return not isinstance(ty, relax.TensorType) or isinstance(ty.shape, relax.ShapeExpr)

    if node.op_type not in JOINING_OPS or all(shaped(o) for o in outs) or not all(shaped(e) for e in ins if e is not None):
        return
    divisors: dict[str, int] = {}
    shown = []
    for e in ins:
        ty = getattr(e, "ty", None) if isinstance(e, relax.Expr) else None
        if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
            for d in ty.shape.values:
                if not isinstance(d, tvm.tirx.IntImm):
                    _floordiv_multiple(d, divisors)
            shown.append("[" + ", ".join(str(d) for d in ty.shape.values) + "]")
    if not any(m > 1 for m in divisors.values()):
        return  # (no strided map among them: not what multiples fix)
    raise ShapeUnificationError(f"node {node.label()}: {node.op_type} of inputs of shapes {', '.join(shown)} "
                                "that are not equal for every size of the symbolic dims", divisors)


@dataclass
class LoweredModule:
    mod: tvm.IRModule
    input_names: list[str]
    output_names: list[str]
    params: dict[str, np.ndarray]  # main's parameters after the inputs, in order
    groups: list[str] = field(default_factory=list)  # group functions emitted as primitives
    inline_groups: dict[str, str] = field(default_factory=dict)  # group → why it was inlined
    symbolic_groups: list[str] = field(default_factory=list)  # shape arithmetic, no kernel
    blocked_groups: list[str] = field(default_factory=list)  # groups on channel-blocked activations
    winograd_convs: dict[str, int] = field(default_factory=dict)  # conv node → m of its F(m x m, 3 x 3)
    block: int | None = None  # channel block of the blocked groups (None: NCHW throughout)
    # main's binding (var name) → the group whose node it computes: kernels not named after a
    # group (an inline group's ops, layout changes) are traced back to ONNX nodes through it
    bindings: dict[str, str] = field(default_factory=dict)
    group_nodes: dict[str, list[Node]] = field(default_factory=dict)  # group name → its nodes
    # symbolic input dims: name → {"input", "axis", "multiple"} (multiple > 1: the dim is
    # re-expressed as multiple x a new var, checked at run time; see `lower_and_fuse`)
    symbolic_dims: dict[str, dict[str, Any]] = field(default_factory=dict)
    winograd_symbolic: list[str] = field(default_factory=list)  # convs kept direct: symbolic maps


# --- attributes -----------------------------------------------------------------------------------


def onnx_attrs(node: Node) -> dict[str, Any]:
    """The attribute dict Relax's ONNX frontend passes its converters (ONNXGraphImporter._parse_attr)."""
    out: dict[str, Any] = {}
    for a in node.attributes.values():
        v = a.value
        t = a.type
        if t == AttrType.INT or t == AttrType.FLOAT:
            out[a.name] = v
        elif t == AttrType.STRING:
            out[a.name] = v.encode() if isinstance(v, str) else v
        elif t in (AttrType.INTS, AttrType.FLOATS):
            if list(v):
                out[a.name] = tuple(v)
        elif t == AttrType.STRINGS:
            if list(v):
                out[a.name] = tuple(s.encode() if isinstance(s, str) else s for s in v)
        elif t == AttrType.TENSOR:
            out[a.name] = onnx.numpy_helper.from_array(np.asarray(v.numpy()))
        else:
            raise LoweringError(f"node {node.label()}: attribute {a.name!r} of kind {AttrType(t).name} is not supported by the cpu target")
    return out


def _attr(node: Node, name: str, default: Any = None) -> Any:
    return node.attr(name, default)


# --- converters ---------------------------------------------------------------------------------

@converter("ConvInteger")
def _conv_integer(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """2-D ConvInteger (the frontend has none; grouped too) with constant zero points, weight zero point 0:
    Pad(x, value x_zp) → conv2d accumulating in int32 → − x_zp·ΣW[oc] (the filter sums from the
    weight's value), so the reduction is a plain int8 product the int8 kernels tensorize."""
    from graphopt.pattern import const_array

    zx, zw = (const_array(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else np.zeros(())
              for i in (2, 3))
    if zx is None or zw is None or zx.size != 1 or np.any(zw != 0):
        raise LoweringError(f"node {node.label()}: ConvInteger needs a constant scalar x_zero_point and a zero "
                            "w_zero_point on the cpu target")
    if len(ins[1].ty.shape) != 4 or str(_attr(node, "auto_pad", "NOTSET")) != "NOTSET":
        raise LoweringError(f"node {node.label()}: only 2-D ConvInteger with explicit pads is supported by the cpu target")
    top, left, bottom, right = (list(_attr(node, "pads", [0, 0, 0, 0])) + [0, 0, 0, 0])[:4]
    z = int(zx.reshape(()))
    x = ins[0]
    if top or left or bottom or right:
        x = bb.normalize(relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(z)))
    y = bb.normalize(relax.op.nn.conv2d(x, ins[1], strides=list(_attr(node, "strides", [1, 1])), padding=[0, 0, 0, 0],
                                        dilation=list(_attr(node, "dilations", [1, 1])),
                                        groups=int(_attr(node, "group", 1)), out_dtype="int32"))
    if z:
        w = const_array(node.inputs[1])
        if w is None:
            raise LoweringError(f"node {node.label()}: ConvInteger with a zero point needs constant weights on the cpu target")
        corr = (z * w.reshape(w.shape[0], -1).astype(np.int64).sum(axis=1)).astype(np.int32).reshape(1, -1, 1, 1)
        y = relax.op.subtract(y, relax.const(corr, "int32"))
    return y


# --- shape arithmetic, evaluated while lowering ----------------------------------------------------


@dataclass
class Sym:
    """An integer tensor of rank 0 or 1 whose elements are known expressions of the symbolic
    dims (Shape → Gather → Unsqueeze → Concat chains): evaluated here instead of computed at run
    time, so Reshape/Expand/... get a static or symbolic shape and stay kernels."""

    vals: list[Any]  # ints or tirx PrimExprs (int64)
    scalar: bool = False
    dtype: str = "int64"

    def static(self) -> np.ndarray | None:
        out = []
        for v in self.vals:
            if isinstance(v, (bool, np.bool_)):
                out.append(bool(v))
            elif isinstance(v, (int, np.integer)):
                out.append(int(v))
            elif isinstance(v, tvm.tirx.IntImm):
                out.append(int(v.value))
            else:
                return None
        arr = np.asarray(out, dtype=bool if self.dtype == "bool" else self.dtype)
        return arr.reshape(()) if self.scalar else arr


_SHAPE_CONSUMERS = {"Reshape", "Expand", "ConstantOfShape"}


def _as_sym(e: Any) -> Sym | None:
    if isinstance(e, Sym):
        return e
    v = const_value(e)
    if v is not None and v.dtype.kind in "iu" and v.ndim <= 1 and v.size <= 64:
        return Sym([int(x) for x in v.reshape(-1)], scalar=v.ndim == 0, dtype=str(v.dtype))
    return None


def _sym_eval(node: Node, ins: list[Any]) -> list[Sym] | None:
    """Outputs of `node` as Syms when its inputs allow (at least one a Sym); None otherwise."""
    op = node.op_type
    if op == "Shape":
        x = ins[0]
        ty = getattr(x, "ty", None)
        if not isinstance(ty, relax.TensorType) or ty.shape is None or not isinstance(ty.shape, relax.ShapeExpr):
            return None
        dims = list(ty.shape.values)
        start, end = node.attr("start", 0), node.attr("end", None)
        return [Sym(dims[start:end])]
    if not any(isinstance(e, Sym) for e in ins):
        return None
    syms = [_as_sym(e) if e is not None else None for e in ins]
    if any(e is not None and s is None for e, s in zip(ins, syms)):
        return None
    a = syms[0]
    assert a is not None
    if op in ("Identity",):
        return [a]
    if op == "Cast":
        to = onnx.helper.tensor_dtype_to_np_dtype(node.attr("to"))
        if to.kind not in "iu":
            return None
        return [Sym(a.vals, a.scalar, str(to))]
    if op == "Gather":
        idx = syms[1]
        if idx is None or idx.static() is None or a.scalar or node.attr("axis", 0) != 0:
            return None
        n = len(a.vals)
        picked = [a.vals[int(i) + n if int(i) < 0 else int(i)] for i in idx.vals]
        return [Sym(picked, idx.scalar, a.dtype)]
    if op == "Unsqueeze":
        if not a.scalar:
            return None
        return [Sym(a.vals, False, a.dtype)]
    if op == "Squeeze":
        if a.scalar or len(a.vals) != 1:
            return None
        return [Sym(a.vals, True, a.dtype)]
    if op == "Concat":
        if any(s is None or s.scalar for s in syms):
            return None
        return [Sym([v for s in syms for v in s.vals], False, a.dtype)]  # type: ignore[union-attr]
    if op == "Reshape":
        if a.scalar:
            return None
        shape = syms[1].static() if syms[1] is not None else None
        if shape is None or shape.size > 1:
            return None
        return [Sym(a.vals, shape.size == 0, a.dtype)]
    if op == "Slice" and not a.scalar:
        rest = [s.static() if s is not None else None for s in syms[1:]]
        if any(r is None for r in rest[:2]):
            return None
        if len(rest) > 2 and rest[2] is not None and list(rest[2]) not in ([0], [-1]):
            return None
        step = int(rest[3][0]) if len(rest) > 3 and rest[3] is not None else 1
        return [Sym(a.vals[slice(int(rest[0][0]), int(rest[1][0]), step)], False, a.dtype)]
    if op == "Equal" and len(syms) == 2 and syms[1] is not None:
        b = syms[1]
        la, lb = len(a.vals), len(b.vals)
        if la != lb and la != 1 and lb != 1:
            return None
        n = max(la, lb)
        pairs = zip(a.vals * n if la == 1 else a.vals, b.vals * n if lb == 1 else b.vals)
        res = [_decide_equal(_prim(x), _prim(y)) for x, y in pairs]
        if any(r is None for r in res):
            return None
        return [Sym(res, a.scalar and b.scalar, "bool")]
    if op == "Where" and len(syms) == 3 and all(x is not None for x in syms):
        c, x, y = syms
        cond = c.static()
        if cond is None:
            return None
        n = max(len(c.vals), len(x.vals), len(y.vals))
        cv = list(cond.reshape(-1)) * (n if cond.size == 1 else 1)
        xv = x.vals * n if len(x.vals) == 1 else x.vals
        yv = y.vals * n if len(y.vals) == 1 else y.vals
        if not (len(cv) == len(xv) == len(yv) == n):
            return None
        return [Sym([xi if ci else yi for ci, xi, yi in zip(cv, xv, yv)], c.scalar and x.scalar and y.scalar, x.dtype)]
    if op in ("Add", "Sub", "Mul", "Div") and len(syms) == 2 and syms[1] is not None:
        b = syms[1]
        la, lb = len(a.vals), len(b.vals)
        if la != lb and la != 1 and lb != 1:
            return None
        n = max(la, lb)
        av = a.vals * n if la == 1 else a.vals
        bv = b.vals * n if lb == 1 else b.vals
        fn = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y, "Mul": lambda x, y: x * y,
              "Div": lambda x, y: x // y if isinstance(x, int) and isinstance(y, int) else tvm.tirx.floordiv(x, y)}[op]
        vals = [_simplify(fn(_prim(x), _prim(y))) for x, y in zip(av, bv)]
        return [Sym(vals, a.scalar and b.scalar, a.dtype)]
    return None


_ANALYZER: Any = None


def _decide_equal(x: Any, y: Any) -> bool | None:
    """x == y for ints or dim expressions; None when it cannot be decided at compile time.
    Dims are never negative, so a dim never equals a negative constant (Reshape's -1)."""
    if isinstance(x, int) and isinstance(y, int):
        return x == y
    if isinstance(x, int) and x < 0 or isinstance(y, int) and y < 0:
        return False
    global _ANALYZER
    if _ANALYZER is None:
        _ANALYZER = tvm.sym.Analyzer()
    d = _ANALYZER.simplify(x - y)
    if isinstance(d, tvm.tirx.IntImm):
        return int(d.value) == 0
    return None


def _prim(v: Any) -> Any:
    return int(v) if isinstance(v, (int, np.integer)) else v


def _simplify(v: Any) -> Any:
    global _ANALYZER
    if isinstance(v, int):
        return v
    if _ANALYZER is None:
        _ANALYZER = tvm.sym.Analyzer()
    r = _ANALYZER.simplify(v)
    return int(r.value) if isinstance(r, tvm.tirx.IntImm) else r


def materialise(bb: relax.BlockBuilder, s: Sym, consumer: str) -> Any:
    """A Sym as what a converter can take: a constant when static, a ShapeExpr for shape
    consumers, else a runtime tensor."""
    arr = s.static()
    if arr is not None:
        return _const(arr)
    if consumer in _SHAPE_CONSUMERS and not s.scalar:
        return relax.ShapeExpr([tvm.tirx.IntImm("int64", v) if isinstance(v, int) else v for v in s.vals])
    t = bb.emit(relax.op.shape_to_tensor(relax.ShapeExpr([tvm.tirx.IntImm("int64", v) if isinstance(v, int) else v for v in s.vals])))
    if s.dtype != "int64":
        t = bb.emit(relax.op.astype(t, s.dtype))
    if s.scalar:
        t = bb.emit(relax.op.reshape(t, []))
    return t


@converter("LayerNormalization")
def _layer_norm(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """LayerNormalization with its optional Mean and InvStdDev outputs computed (the frontend
    returns zeros for them); with only Y used, Relax's layer_norm."""
    x, scale, bias = ins[0], ins[1], ins[2] if len(ins) > 2 else None
    ndim = x.ty.ndim
    axis = node.attr("axis", -1)
    axis = axis + ndim if axis < 0 else axis
    axes = list(range(axis, ndim))
    eps = float(node.attr("epsilon", 1e-5))
    dtype = str(x.ty.dtype)
    extra_used = any(v.uses() or v.is_graph_output() for v in node.outputs[1:])
    if not extra_used and bias is not None and _same_shape(scale, x, axes) and _same_shape(bias, x, axes):
        return NotImplemented  # the frontend's layer_norm
    stash = "float32" if dtype in ("float16", "bfloat16") else dtype
    xs = bb.emit(relax.op.astype(x, stash)) if stash != dtype else x
    mean = bb.emit(relax.op.mean(xs, axes, keepdims=True))
    d = bb.emit(relax.op.subtract(xs, mean))
    var = bb.emit(relax.op.mean(relax.op.multiply(d, d), axes, keepdims=True))
    inv = bb.emit(relax.op.rsqrt(relax.op.add(var, relax.const(eps, stash))))
    y = bb.emit(relax.op.multiply(d, inv))
    if stash != dtype:
        y = bb.emit(relax.op.astype(y, dtype))
    y = bb.emit(relax.op.multiply(y, scale))
    if bias is not None:
        y = bb.emit(relax.op.add(y, bias))
    return [y, mean, inv]


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


@converter("Celu")
def _celu(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Celu(x) = max(0, x) + min(0, alpha * (exp(x / alpha) - 1))."""
    x = ins[0]
    dtype = str(x.ty.dtype)
    a = relax.const(np.array(float(node.attr("alpha", 1.0)), dtype=dtype), dtype)
    zero = relax.const(np.array(0, dtype=dtype), dtype)
    one = relax.const(np.array(1, dtype=dtype), dtype)
    neg = relax.op.minimum(zero, relax.op.multiply(a, relax.op.subtract(relax.op.exp(relax.op.divide(x, a)), one)))
    return bb.emit(relax.op.add(relax.op.maximum(zero, x), neg))


@converter("RMSNormalization")
def _rms_norm(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """RMSNormalization: x / sqrt(mean(x², axes from `axis` on) + epsilon) · scale, in stash_type."""
    x, scale = ins[0], ins[1]
    ndim = x.ty.ndim
    axis = node.attr("axis", -1)
    axis = axis + ndim if axis < 0 else axis
    axes = list(range(axis, ndim))
    dtype = str(x.ty.dtype)
    stash = str(onnx.helper.tensor_dtype_to_np_dtype(node.attr("stash_type", 1)))
    xs = bb.emit(relax.op.astype(x, stash)) if stash != dtype else x
    ms = bb.emit(relax.op.mean(relax.op.multiply(xs, xs), axes, keepdims=True))
    inv = bb.emit(relax.op.rsqrt(relax.op.add(ms, relax.const(np.array(float(node.attr("epsilon", 1e-5)), dtype=stash), stash))))
    y = bb.emit(relax.op.multiply(xs, inv))
    if stash != dtype:
        y = bb.emit(relax.op.astype(y, dtype))
    return bb.emit(relax.op.multiply(y, scale))


def _nll(bb: relax.BlockBuilder, node: Node, logp: Any, target: Any, weight: Any) -> Any:
    """The ONNX NLL loss of log-probabilities `logp` [N, C, d...] at int `target` [N, d...]:
    loss = -logp[n, t, d...] · w (w = weight[t], 0 where t == ignore_index); reduction "none"
    keeps the [N, d...] losses, "sum" adds them, "mean" divides that sum by sum(w) (by the count
    of losses when there is neither weight nor ignore_index)."""
    R = relax.op
    emit = bb.emit
    dtype = str(logp.ty.dtype)
    tdt = str(target.ty.dtype)
    reduction = node.attr("reduction", "mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if reduction not in ("none", "sum", "mean"):
        raise LoweringError(f"node {node.label()}: reduction {reduction!r} is not one of none, sum, mean")
    ignore = node.attr("ignore_index")
    c = dims_of(logp)[1]
    if not isinstance(c, int):
        raise LoweringError(f"node {node.label()}: {node.op_type} needs a static class count on the cpu target")
    # clipped targets: an ignored (or out-of-range) index must not read outside the tensor
    t = emit(R.clip(target, 0, c - 1))
    picked = emit(R.squeeze(R.gather_elements(logp, R.expand_dims(t, [1]), axis=1), [1]))
    loss = emit(R.negative(picked))
    w = None
    if weight is not None:
        w = emit(R.take(weight, t, axis=0, mode="clip"))
    zero = relax.const(np.array(0, dtype=dtype), dtype)
    if ignore is not None:
        keep = emit(R.not_equal(target, relax.const(np.array(int(ignore), dtype=tdt), tdt)))
        w = emit(R.where(keep, w, zero)) if w is not None else emit(R.astype(keep, dtype))
    if w is not None:
        loss = emit(R.multiply(loss, w))
    if reduction == "none":
        return loss
    total = emit(R.sum(loss))
    if reduction == "sum":
        return total
    if w is None:
        return emit(R.mean(loss))
    return emit(R.divide(total, R.sum(w)))


@converter("NegativeLogLikelihoodLoss")
def _nll_loss(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """NegativeLogLikelihoodLoss(input [N, C, d...], target [N, d...], weight [C]?)."""
    return _nll(bb, node, ins[0], ins[1], ins[2] if len(ins) > 2 else None)


@converter("SoftmaxCrossEntropyLoss")
def _sce_loss(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """SoftmaxCrossEntropyLoss = NLL loss of log_softmax(scores, axis=1); the optional second
    output is that log_softmax."""
    logp = bb.emit(relax.op.nn.log_softmax(ins[0], axis=1))
    loss = _nll(bb, node, logp, ins[1], ins[2] if len(ins) > 2 else None)
    return [loss, logp] if len(node.outputs) > 1 else loss


def _same_shape(p: Any, x: Any, axes: list[int]) -> bool:
    """`p` has exactly the normalized dims of `x` (what Relax's layer_norm takes)."""
    ps, xs = p.ty.shape, x.ty.shape
    if ps is None or xs is None or not isinstance(ps, relax.ShapeExpr) or not isinstance(xs, relax.ShapeExpr):
        return False
    want = [xs.values[a] for a in axes]
    if len(ps.values) != len(want):
        return False
    return all(isinstance(a, tvm.tirx.IntImm) and isinstance(b, tvm.tirx.IntImm) and int(a) == int(b) for a, b in zip(ps.values, want))


def frontend_ops() -> set[str]:
    return set(_fe._get_convert_map())


def supported_ops() -> set[str]:
    return frontend_ops() | set(CONVERTERS)


def check_schema(node: Node, opset: int) -> None:
    """Refuse a node of the standard domain that its ONNX schema rejects (input or output count,
    an attribute of the wrong kind, a required one missing): TVM's frontend would fail on it with
    an internal error, or silently ignore the extra inputs. An op the schema registry does not
    know at this opset is left to the converters."""
    if node.domain not in ("", "ai.onnx"):
        return
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return
    n_in, n_out = len(node.inputs), len(node.outputs)
    if not schema.min_input <= n_in <= schema.max_input:
        raise LoweringError(f"node {node.label()}: {node.op_type} takes {_arity(schema.min_input, schema.max_input)} inputs, "
                            f"this one has {n_in}")
    if not schema.min_output <= n_out <= schema.max_output:
        raise LoweringError(f"node {node.label()}: {node.op_type} has {_arity(schema.min_output, schema.max_output)} outputs, "
                            f"this one has {n_out}")
    for name, a in node.attributes.items():
        spec = schema.attributes.get(name)
        if spec is None or a.ref_attr_name is not None:
            continue  # unknown attributes: the converters ignore them (as onnxruntime does)
        want = int(spec.type)
        if int(a.type) != want and not (want == AttrType.FLOAT and a.type == AttrType.INT):
            raise LoweringError(f"node {node.label()}: attribute {name!r} is of kind {AttrType(a.type).name}, "
                                f"{node.op_type} takes {AttrType(want).name}")
    for name, spec in schema.attributes.items():
        if spec.required and name not in node.attributes:
            raise LoweringError(f"node {node.label()}: {node.op_type} needs attribute {name!r}")


def _arity(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo} or more" if hi > 1000 else f"{lo} to {hi}"


#: ops whose TVM kernels divide by the element count of a window or axis (or build no shape
#: for an empty one): fed an empty tensor, legalization fails with "Divide by zero"
EMPTY_REFUSED = {"ReduceMean", "AveragePool", "GlobalAveragePool", "LpPool", "GlobalLpPool",
                 "Conv", "ConvTranspose", "ConvInteger", "InstanceNormalization", "LayerNormalization",
                 "GroupNormalization", "MeanVarianceNormalization", "BatchNormalization", "RMSNormalization",
                 "MaxPool", "GlobalMaxPool", "LRN", "Resize", "Upsample"}


def check_size(what: str, dims: list[Any], dtype: str) -> None:
    """Refuse a tensor (`what` names it) of static shape `dims` with a negative dim or more than
    MAX_ELEMENTS elements; symbolic dims are the run time's business."""
    static = [d for d in dims if isinstance(d, (int, np.integer))]
    shown = "[" + ", ".join(str(d) for d in dims) + "]"
    for i, d in enumerate(dims):
        if isinstance(d, (int, np.integer)) and d < 0:
            raise LoweringError(f"{what} has shape {shown}: dim {i} is {d}")
        if isinstance(d, (int, np.integer)) and d > MAX_ELEMENTS:
            raise LoweringError(f"{what} has shape {shown}: dim {i} is {d}, above the cpu target's limit of "
                                f"{MAX_ELEMENTS} (2**31 - 1) elements per tensor")
    total = int(np.prod(static, dtype=object)) if static else 1
    if total > MAX_ELEMENTS:
        raise LoweringError(f"{what} has shape {shown}: {total} elements, above the cpu target's limit of "
                            f"{MAX_ELEMENTS} (2**31 - 1) per tensor")


def _check_outputs(node: Node, outs: list[Any]) -> None:
    """check_size on what `node` computes (constants and shape arithmetic are not kernels)."""
    for v, e in zip(node.outputs, outs):
        if isinstance(e, (Sym, tvm.ir.GenericConst)) or not isinstance(e, relax.Expr):
            continue
        ty = e.ty
        if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
            check_size(f"node {node.label()}: output {v.name!r}", _static_dims(ty.shape), str(ty.dtype))


def _check_not_empty(node: Node, inputs: list[Any]) -> None:
    """Refuse an empty tensor fed to an op of EMPTY_REFUSED (naming the node and the input)."""
    if node.op_type not in EMPTY_REFUSED or node.domain not in ("", "ai.onnx"):
        return
    for v, e in zip(node.inputs, inputs):
        ty = getattr(e, "ty", None) if isinstance(e, relax.Expr) else None
        if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr) and str(ty.dtype).startswith(("float", "bfloat")):
            dims = _static_dims(ty.shape)  # (data, not axes or sizes: an empty axes list is fine)
            if any(isinstance(d, int) and d == 0 for d in dims):
                raise LoweringError(f"node {node.label()}: input {v.name!r} is empty (shape [{', '.join(str(d) for d in dims)}]); "
                                    f"the cpu target does not compile {node.op_type} of an empty tensor")


def _static_dims(shape: relax.ShapeExpr) -> list[Any]:
    return [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in shape.values]


#: ops whose spatial output dims must be at least 1 (a window that fits the input)
WINDOW_OPS = {"Conv", "ConvInteger", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"}

#: what a formal input or output of a schema holds
SEQ, TENSOR, EITHER = "sequence", "tensor", "either"


def sequence_io(node: Node, opset: int) -> tuple[list[str], list[str]]:
    """SEQ / TENSOR / EITHER for each input and output of `node`, from its ONNX schema (all
    EITHER when the schema is unknown); a variadic last parameter covers the rest."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "") if node.domain in ("", "ai.onnx") else None
    except onnx.defs.SchemaError:
        schema = None
    if schema is None:
        return [EITHER] * len(node.inputs), [EITHER] * len(node.outputs)
    allowed = {t.type_param_str: list(t.allowed_type_strs) for t in schema.type_constraints}

    def kinds(formals: Any, n: int) -> list[str]:
        out = []
        for f in formals:
            types = allowed.get(f.type_str, [f.type_str])
            seq = [t.startswith("seq(") for t in types]
            out.append(SEQ if all(seq) else EITHER if any(seq) else TENSOR)
        return (out + [out[-1] if out else EITHER] * n)[:n]

    return kinds(schema.inputs, len(node.inputs)), kinds(schema.outputs, len(node.outputs))


def _sequence_inputs(bb: relax.BlockBuilder, node: Node, inputs: list[Any], kinds: list[str]) -> list[Any]:
    """Sequence inputs as explicit relax.Tuples, everything else checked against the schema.

    Why: the frontend's sequence converters iterate their input, and iterating a Relax Var
    (`Expr.__getitem__` builds a TupleGetItem for any index and never stops) loops forever,
    growing memory: a ConcatFromSequence fed a tensor did that."""
    out = []
    for i, (e, kind) in enumerate(zip(inputs, kinds)):
        ty = getattr(e, "ty", None) if isinstance(e, relax.Expr) else None
        is_seq = isinstance(ty, relax.TupleType)
        if e is None or not is_seq and kind != SEQ:
            out.append(e)
        elif kind == SEQ and not is_seq:
            raise LoweringError(f"node {node.label()}: input {i} of {node.op_type} must be a sequence, it is a "
                                f"{type(ty).__name__ if ty is not None else type(e).__name__}")
        elif kind == TENSOR and is_seq:
            raise LoweringError(f"node {node.label()}: input {i} of {node.op_type} must be a tensor, it is a sequence")
        elif isinstance(e, relax.Tuple):
            out.append(e)
        else:  # a Var (or call) of tuple type: its fields, finitely many
            out.append(relax.Tuple([bb.emit(relax.TupleGetItem(e, j)) for j in range(len(ty.fields))]))
    return out + list(inputs[len(out):])


def convert_node(bb: relax.BlockBuilder, node: Node, inputs: list[Any], opset: int) -> Any:
    """Relax expression (or tuple of them) for one node."""
    if node.domain not in ("", "ai.onnx"):
        raise LoweringError(f"node {node.label()}: domain {node.domain!r} is not supported by the cpu target")
    if node.subgraphs():
        raise LoweringError(f"node {node.label()}: {node.op_type} with subgraphs is not supported by the cpu target")
    inputs = _sequence_inputs(bb, node, inputs, sequence_io(node, opset)[0])
    own = CONVERTERS.get(node.op_type)
    if own is not None:
        out = own(bb, node, inputs, opset)
        if out is not NotImplemented:
            return out
    conv = _fe._get_convert_map().get(node.op_type)
    if conv is None:
        raise LoweringError(f"node {node.label()}: operator {node.op_type} is not supported by the cpu target")
    attrs = onnx_attrs(node)
    attrs["tvm_custom"] = {"name": node.name, "num_outputs": len(node.outputs)}
    fn = conv.get_converter(opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(bb, _fe.onnx_input(inputs), attrs, [{}, {}])
    if isinstance(out, relax.Call) and isinstance(out.op, tvm.ir.Op) and out.op.name == "relax.take":
        # the frontend's take uses mode "fast", which reads out of bounds (or segfaults) on a bad
        # index; "clip" keeps a wrong input from touching memory outside the tensor
        out = relax.op.take(out.args[0], out.args[1], out.attrs.axis, mode="clip")
    if isinstance(out, relax.Expr):
        out = bb.normalize(out)
    return out


def _split_outputs(bb: relax.BlockBuilder, node: Node, out: Any, opset: int) -> list[Any]:
    """One relax expression per node output (a sequence output: the whole tuple)."""
    n = len(node.outputs)
    if n == 1 and isinstance(getattr(out, "ty", None), relax.TupleType) and sequence_io(node, opset)[1][0] != TENSOR:
        return [out]
    if isinstance(out, (list, tuple)):
        items = list(out)
    elif isinstance(out, relax.Tuple):
        items = list(out.fields)
    elif isinstance(out, relax.Expr) and isinstance(out.ty, relax.TupleType) and (n > 1 or node.op_type == "Dropout"):
        # (Dropout's converter gives (output, mask) even when the node has only the output)
        items = [bb.emit(relax.TupleGetItem(out, i)) for i in range(len(out.ty.fields))]
    else:
        items = [out]
    if len(items) < n:
        raise LoweringError(f"node {node.label()}: converter gave {len(items)} outputs, the node has {n}")
    return items[:n]


# --- the lowering -------------------------------------------------------------------------------


def _dtype(v: Value) -> str:
    if v.dtype is None:
        raise LoweringError(f"value {v.name!r} has no known element type")
    dt = v.dtype.numpy()
    if dt.kind not in "biuf" and dt.name not in ("bfloat16",):
        raise LoweringError(f"value {v.name!r} has element type {v.dtype.name.lower()}, which the cpu target does not support")
    if dt == np.dtype(bool):
        return "bool"
    return str(dt)


def _is_inline(arr: np.ndarray) -> bool:
    wide_int = arr.dtype.kind == "b" or (arr.dtype.kind in "iu" and arr.dtype.itemsize >= 4)
    return arr.size <= INLINE_ANY_ELEMS or (wide_int and arr.size <= INLINE_INT_ELEMS)


def _const(arr: np.ndarray) -> tvm.ir.GenericConst:
    arr = _contiguous(arr)
    if arr.dtype == np.bool_:
        return relax.const(arr, "bool")
    # the dtype explicitly: relax.const narrows int64 → int32 and float64 → float32 without it
    return relax.const(arr, str(arr.dtype))


@relax.expr_functor.mutator
class _LiftConstants(relax.PyExprMutator):  # type: ignore[misc]
    """Replace tensor constants in a function body with new parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.lifted: list[tuple[relax.Var, tvm.ir.GenericConst]] = []

    def visit_generic_const_(self, op: tvm.ir.GenericConst) -> relax.Expr:  # noqa: N802
        v = relax.Var(f"c{len(self.lifted)}", op.ty)
        self.lifted.append((v, op))
        return v


def _lift_constants(func: relax.Function) -> tuple[relax.Function, list[tvm.ir.GenericConst]]:
    m = _LiftConstants()
    body = m.visit_expr(func.body)
    if not m.lifted and not any(str(p.name) == "dims" for p in func.params):
        return func, []
    shapes = [p for p in func.params if str(p.name) == "dims"]  # (kept last: see _primitive)
    params = shapes + [p for p in func.params if str(p.name) != "dims"] + [v for v, _ in m.lifted]
    new = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
    return new, [c for _, c in m.lifted]


#: ops that legalize into one TIR kernel each; anything else keeps a group out of primitive form
_NOT_PRIMITIVE = {
    "relax.shape_of", "relax.tensor_to_shape", "relax.shape_to_tensor", "relax.call_dps_packed",
    "relax.call_pure_packed", "relax.call_builtin_with_ctx", "relax.nonzero", "relax.unique",
    "relax.null_value", "relax.print", "relax.assert_op", "relax.hint_on_device", "relax.to_vdevice",
    "relax.builtin.alloc_tensor", "relax.memory.alloc_storage", "relax.memory.alloc_tensor",
    "relax.sort", "relax.argsort", "relax.topk", "relax.cumsum", "relax.cumprod", "relax.scatter_elements",
    "relax.scatter_nd", "relax.multinomial_from_uniform", "relax.nn.attention", "relax.nn.attention_bias",
    "relax.nn.attention_var_len", "relax.call_inplace_packed", "relax.wrap_param", "relax.dequantize",
    "relax.quantize", "relax.vision.all_class_non_max_suppression",
}


def _primitive_refusal(func: relax.Function) -> str | None:
    """Why `func` cannot be a primitive function FuseTIR turns into one kernel; None when it can."""
    why: list[str] = []

    def visit(e: relax.Expr) -> None:
        if why:
            return
        if isinstance(e, relax.Call):
            op = e.op
            if isinstance(op, tvm.ir.Op):
                if op.name in _NOT_PRIMITIVE:
                    why.append(f"{op.name} is not a TIR kernel")
                elif op.name != "relax.call_tir" and op.get_attr("FLegalize") is None:
                    why.append(f"{op.name} has no legalization")
            elif not isinstance(op, tvm.ir.GlobalVar):
                why.append("calls a non-operator")
        elif isinstance(e, (relax.If, relax.MatchCast)):
            why.append(f"{type(e).__name__} inside")
        if isinstance(e, relax.Var) or isinstance(e, relax.Call):
            ty = e.ty
            if isinstance(ty, (relax.ShapeType, relax.ObjectType)) or (isinstance(ty, relax.TensorType) and ty.ndim < 0):
                why.append(f"a {type(ty).__name__} value (not a tensor of known rank)")

    relax.analysis.post_order_visit(func.body, visit)
    if why:
        return why[0]
    for blk in func.body.blocks:
        for b in blk.bindings:
            if isinstance(b, relax.MatchCast):
                return "match_cast inside (data-dependent shape)"
            ty = b.var.ty
            if isinstance(ty, relax.TensorType) and (ty.ndim < 0 or ty.shape is None):
                return "a tensor of unknown shape inside"
            if not isinstance(ty, (relax.TensorType, relax.TupleType)):
                return f"a {type(ty).__name__} binding inside"
    return None


def _topo_groups(model: Model) -> list[tuple[str, list[Node]]]:
    """Kernel groups of the main graph in an order that respects data flow."""
    groups: dict[str, list[Node]] = {}
    order: dict[str, int] = {}
    anon = 0
    for i, n in enumerate(model.graph.nodes):
        k = n.metadata_props.get(KERNEL_KEY)
        if k is None:  # Constant nodes (data), or a model planned without plan-kernels
            k = f"_n{anon}"
            anon += 1
        groups.setdefault(k, []).append(n)
        order.setdefault(k, i)
    owner = {id(n): k for k, ns in groups.items() for n in ns}
    dag = nx.DiGraph()
    dag.add_nodes_from(groups)
    for k, ns in groups.items():
        for n in ns:
            for v in n.inputs:
                p = v.producer() if v is not None else None
                if p is not None and owner.get(id(p), k) != k:
                    dag.add_edge(owner[id(p)], k)
    if not nx.is_directed_acyclic_graph(dag):
        raise LoweringError("kernel groups form a cycle; run plan-kernels again")
    ordered = list(nx.lexicographical_topological_sort(dag, key=lambda k: order[k]))
    return [(k, groups[k]) for k in ordered]


def _group_name(k: str) -> str:
    return k if k.isidentifier() else "g_" + "".join(c if c.isalnum() else "_" for c in k)


class _Lowerer:
    def __init__(self, model: Model, force_inline: dict[str, str] | None = None, block: int | None = None,
                 winograd: str | None = None, machine: MachineModel | None = None, activity: Any = None,
                 multiples: dict[str, int] | None = None) -> None:
        self.model = model
        self.multiples = dict(multiples or {})  # symbolic input dim → the multiple it is re-expressed in
        self.definers: list[Any] = []  # main's tensors whose plain dims define symbolic vars (see _primitive)
        self.windows: list[Any] = []  # symbolic output dims of convs and pools (see _note_window)
        self.dim_shapes: dict[tuple[str, ...], Any] = {}  # `_dim_shape`'s match_casts
        self.activity = activity  # told the node being lowered (the compile watchdog names it)
        self.machine = machine  # the target's machine model (blocked convs' tiles)
        self.force_inline = dict(force_inline or {})
        self.block = block  # channel block of activations between convs (None: NCHW throughout)
        self.winograd = winograd  # layout.plan_layout's Winograd mode (None: auto)
        self.plan: _layout.LayoutPlan | None = None
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.bb = relax.BlockBuilder()
        self.sym: dict[str, tvm.tirx.Var] = {}
        self.env: dict[int, Any] = {}  # id(Value) → relax expr in main
        self.params: list[tuple[relax.Var, np.ndarray]] = []
        self.groups: list[str] = []
        self.inline: dict[str, str] = {}
        self.symbolic: list[str] = []  # groups evaluated at compile time (shape arithmetic)
        self.bindings: dict[str, str] = {}  # LoweredModule.bindings

    # shapes
    def _shape(self, v: Value) -> list[Any] | None:
        s = v.shape
        if s is None:
            return None
        dims: list[Any] = []
        for i, d in enumerate(s.dims):
            if isinstance(d, int):
                dims.append(d)
            else:
                name = d if isinstance(d, str) and d.isidentifier() else f"{_group_name(v.name or 'v')}_d{i}"
                dims.append(self.sym.setdefault(name, tvm.tirx.Var(name, "int64")))
        return dims

    def _var(self, v: Value, name: str) -> relax.Var:
        if not isinstance(v.type, TensorType):
            raise LoweringError(f"input {v.name!r} is a {type(v.type).__name__}; the cpu target takes tensors only")
        dims = self._shape(v)
        if dims is not None:
            check_size(f"input {v.name!r}", dims, _dtype(v))
        return relax.Var(name, relax.TensorType(dims, _dtype(v)))

    def lower(self) -> LoweredModule:
        g = self.model.graph
        inputs = [v for v in g.inputs if not (v.is_initializer() and v.const_value is not None)]
        in_vars = []
        for i, v in enumerate(inputs):
            rv = self._var(v, _group_name(v.name) if v.name else f"input{i}")
            self.env[id(v)] = rv
            in_vars.append(rv)
        # initializers: inline or parameter
        for name, v in g.initializers.items():
            if v.const_value is None or not v.uses() and not v.is_graph_output():
                continue
            self._constant(v, v.const_value.numpy())
        param_vars = [p for p, _ in self.params]
        groups = _topo_groups(self.model)
        if self.block:
            if self.machine is None:
                raise ValueError("a blocked layout needs the target's machine model (lower(..., machine=...))")
            self.plan = _layout.choose_plan(self.model, groups, self.block, self.machine, self.winograd)
        # parameters must be known before the function opens: collect Constant-node weights too
        for _, nodes in groups:
            for n in nodes:
                if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                    self._constant_node(n)
        param_vars = [p for p, _ in self.params]
        sym_dims: dict[str, dict[str, Any]] = {}
        for v, rv in zip(inputs, in_vars):
            if isinstance(rv.ty.shape, relax.ShapeExpr):
                for ax, d in enumerate(rv.ty.shape.values):
                    if isinstance(d, tvm.tirx.Var) and d.name not in sym_dims:
                        sym_dims[d.name] = {"input": v.name, "axis": ax, "multiple": int(self.multiples.get(d.name, 1))}
        self.symbolic_dims = sym_dims
        with function_scope(self.bb, "main", in_vars + param_vars, {"num_input": len(in_vars)}):
            with self.bb.dataflow():
                self._reexpress_dims(inputs, in_vars)
                for k, nodes in groups:
                    nodes = [n for n in nodes if id(n.outputs[0]) not in self.env] if nodes else nodes
                    if not nodes:
                        continue
                    self._group(k, nodes)
                    for n in nodes:  # (the values it computes: see `bindings`)
                        for v in n.outputs:
                            e = self.env.get(id(v))
                            if isinstance(e, relax.Var):
                                self.bindings.setdefault(str(e.name), _group_name(k))
                outs = []
                for v in g.outputs:
                    e = self._in_form(self.bb, self.env, v, _layout.PLAIN)
                    if e is None:
                        raise LoweringError(f"graph output {v.name!r} is not computed")
                    if isinstance(e, Sym):  # (shape arithmetic as an output: Shape -> Gather of a symbolic dim)
                        e = materialise(self.bb, e, "")
                    outs.append(e)
                res = self.bb.emit_output(relax.Tuple(outs) if len(outs) != 1 else outs[0])
            self.bb.emit_func_output(res)
        mod = self.bb.get()
        self._min_sizes()
        return LoweredModule(
            mod=mod,
            input_names=[v.name for v in inputs],
            output_names=[v.name for v in g.outputs],
            params={str(p.name): arr for p, arr in self.params},
            groups=self.groups,
            inline_groups=self.inline,
            symbolic_groups=self.symbolic,
            blocked_groups=[_group_name(k) for k in self.plan.groups] if self.plan is not None else [],
            winograd_convs=self._winograd_convs(),
            block=self.plan.block if self.plan is not None and self.plan.groups else None,
            bindings=self.bindings,
            group_nodes={_group_name(k): list(ns) for k, ns in groups},
            symbolic_dims=self.symbolic_dims,
            winograd_symbolic=list(self.plan.winograd_symbolic) if self.plan is not None else [],
        )

    def _reexpress_dims(self, inputs: list[Value], in_vars: list[relax.Var]) -> None:
        """Each symbolic input dim D with a multiple m > 1 becomes m * D_m (D_m = D // m, a new
        var defined by a match_cast of a shape, the input then match_cast to the new dims: the VM
        checks D == m * D_m when it runs). Strided convs and pools then give exact dims (a 3x3
        stride-2 conv of 8 * H_8 rows has 4 * H_8), equal where the upsampled maps meet their skip
        connections, so Concat and Add keep their shapes."""
        self.definers = [rv for rv in in_vars if isinstance(rv.ty.shape, relax.ShapeExpr)]
        new: dict[str, Any] = {}
        for name, m in self.multiples.items():
            if m > 1 and name in self.sym:
                new[name] = tvm.tirx.Var(f"{name}_{m}", "int64")
        if not new:
            return
        names = sorted(new)
        # (through a run-time tensor: a D_m defined by the ShapeExpr D // m directly is resolved
        # back to that expression by FuseTIR's RemoveUnusedParameters, which FuseTIR then rejects:
        # "All shape inputs are expected to be single tirx var")
        R = relax.op
        t = self.bb.emit(R.shape_to_tensor(relax.ShapeExpr([self.sym[n] for n in names])))
        t = self.bb.emit(R.floor_divide(t, relax.const(np.array([self.multiples[n] for n in names], np.int64), "int64")))
        sh = self.bb.emit(R.tensor_to_shape(t))
        self.definers.insert(0, self.bb.match_cast(sh, relax.ShapeType([new[n] for n in names])))
        for v, rv in zip(inputs, in_vars):
            if not isinstance(rv.ty.shape, relax.ShapeExpr):
                continue
            dims = [new[d.name] * self.multiples[d.name] if isinstance(d, tvm.tirx.Var) and d.name in new else d
                    for d in rv.ty.shape.values]
            if any(not a.same_as(b) for a, b in zip(dims, rv.ty.shape.values)):
                self.env[id(v)] = self.bb.match_cast(rv, relax.TensorType(dims, rv.ty.dtype))

    def _constant(self, v: Value, arr: np.ndarray) -> None:
        if arr.dtype == object or arr.dtype.kind in "SUO":
            raise LoweringError(f"constant {v.name!r} of dtype {arr.dtype} is not supported by the cpu target")
        if _is_inline(arr):
            self.env[id(v)] = _const(arr)
        else:
            p = relax.Var(f"p{len(self.params)}", relax.TensorType(list(arr.shape), "bool" if arr.dtype == np.bool_ else str(arr.dtype)))
            self.params.append((p, _contiguous(arr)))
            self.env[id(v)] = p

    def _constant_node(self, n: Node) -> None:
        # Constant's value attributes: value, value_float(s), value_int(s)
        for key, a in n.attributes.items():
            if key == "value":
                arr = np.asarray(a.value.numpy())
            elif key == "value_float":
                arr = np.asarray(a.value, np.float32)
            elif key == "value_floats":
                arr = np.asarray(a.value, np.float32)
            elif key == "value_int":
                arr = np.asarray(a.value, np.int64)
            elif key == "value_ints":
                arr = np.asarray(a.value, np.int64)
            else:
                raise LoweringError(f"node {n.label()}: Constant attribute {key!r} is not supported by the cpu target")
            self._constant(n.outputs[0], arr)
            return
        raise LoweringError(f"node {n.label()}: Constant without a value")

    def _in_form(self, bb: relax.BlockBuilder, env: dict[Any, Any], v: Value, want: str) -> Any:
        """`v`'s expression in `env`, in form `want` (converted once per scope, see layout.py)."""
        if self.plan is None:
            return env.get(id(v))
        have = self.plan.native(v)
        if want == have:
            return env.get(id(v))
        e = env.get((id(v), want))
        if e is None:
            src = env.get(id(v))
            if src is None:
                return None
            if isinstance(src, Sym):
                src = materialise(bb, src, "")
            e = env[(id(v), want)] = _layout.convert_form(bb, src, v, have, want, self.plan.block)
        return e

    def _winograd_convs(self) -> dict[str, int]:
        if self.plan is None:
            return {}
        return {n.label(): self.plan.winograd[id(n)] for n in self.model.graph.nodes if id(n) in self.plan.winograd}

    def _wants(self, n: Node, i: int) -> str:
        return self.plan.wants(n, i) if self.plan is not None else _layout.PLAIN

    def _convert_into(self, bb: relax.BlockBuilder, nodes: list[Node], env: dict[Any, Any]) -> None:
        for n in nodes:
            if self.activity is not None:
                self.activity.what = f"lowering node {n.label()}"
            check_schema(n, self.opset)
            ins = []
            for i, v in enumerate(n.inputs):
                if v is None or (not v.name and v.producer() is None and not v.is_graph_input()):
                    ins.append(None)
                    continue
                e = self._in_form(bb, env, v, self._wants(n, i))
                if e is None:
                    raise LoweringError(f"node {n.label()}: input {v.name!r} is not computed before it")
                ins.append(e)
            _check_not_empty(n, ins)
            role = self.plan.role(n) if self.plan is not None else None
            if role is not None:
                out = _layout.convert_blocked(bb, n, role, ins, self.plan,
                                              lambda b_, n_, i_: convert_node(b_, n_, i_, self.opset),
                                              self.plan.winograd.get(id(n), 0))
                _check_unified(n, ins, [out])
                self._note_window(n, [out])
                env[id(n.outputs[0])] = out
                continue
            sym = _sym_eval(n, ins) if n.domain in ("", "ai.onnx") else None
            if sym is not None:
                for v, e in zip(n.outputs, sym):
                    env[id(v)] = e
                continue
            if n.op_type in ("If", "Scan", "Loop") and n.domain in ("", "ai.onnx") and n.subgraphs():
                _check_body_arity(n, len(ins))
                outs = self._control_flow(bb, n, ins, env)
                if len(outs) < len(n.outputs):
                    raise LoweringError(f"node {n.label()}: {n.op_type} computes {len(outs)} outputs, the node has {len(n.outputs)}")
                _check_outputs(n, outs)
                for v, e in zip(n.outputs, outs):
                    env[id(v)] = e
                continue
            ins = [materialise(bb, e, n.op_type) if isinstance(e, Sym) else e for e in ins]
            try:
                out = convert_node(bb, n, ins, self.opset)
            except GraphoptError:
                raise
            except Exception as e:  # the frontend raises anything from asserts to TVMError
                msg = str(e).strip().splitlines()
                detail = msg[-1] if msg else type(e).__name__
                raise LoweringError(f"node {n.label()}: {n.op_type} cannot be lowered: {type(e).__name__}: {detail[:300]}") from None
            outs = _split_outputs(bb, n, out, self.opset)
            _check_unified(n, ins, outs)
            self._note_window(n, outs)
            _check_outputs(n, outs)
            for v, e in zip(n.outputs, outs):
                env[id(v)] = e

    # control flow: If with a constant condition, Scan and Loop with static trip counts are
    # unrolled at compile time (their bodies converted once per iteration)
    MAX_UNROLL = 256

    def _body(self, bb: relax.BlockBuilder, g: Any, args: list[Any], env: dict[int, Any]) -> list[Any]:
        """Convert subgraph `g` with its inputs bound to `args`; its outputs' expressions."""
        sub = dict(env)
        for v, a in zip(g.inputs, args):
            sub[id(v)] = a
        for v in g.initializers.values():
            if v.const_value is not None:
                sub[id(v)] = _const(np.asarray(v.const_value.numpy()))
        self._convert_into(bb, list(g.nodes), sub)
        outs = []
        for v in g.outputs:
            if id(v) not in sub:
                raise LoweringError(f"subgraph output {v.name!r} is not computed")
            e = sub[id(v)]
            outs.append(materialise(bb, e, "") if isinstance(e, Sym) else e)
        return outs

    def _control_flow(self, bb: relax.BlockBuilder, n: Node, ins: list[Any], env: dict[int, Any]) -> list[Any]:
        R = relax.op
        if n.op_type == "If":
            c = ins[0].static() if isinstance(ins[0], Sym) else const_value(ins[0])
            if c is None:  # both branches compiled, one chosen at run time
                from . import dynamic

                return dynamic.runtime_if(self, bb, n, ins[0], env)
            branch = n.attr("then_branch") if bool(np.asarray(c).reshape(-1)[0]) else n.attr("else_branch")
            return self._body(bb, branch, [], env)
        ins = [materialise(bb, e, "") if isinstance(e, Sym) else e for e in ins]
        if n.op_type == "Scan":
            if self.opset < 9:
                raise LoweringError(f"node {n.label()}: Scan-8 (batched, sequence_lens) is not supported by the cpu target")
            body = n.attr("body")
            m = int(n.attr("num_scan_inputs"))
            nstate = len(ins) - m
            states, xs = list(ins[:nstate]), ins[nstate:]
            in_axes = list(n.attr("scan_input_axes") or [0] * m)
            in_dirs = list(n.attr("scan_input_directions") or [0] * m)
            k = len(body.outputs) - nstate
            out_axes = list(n.attr("scan_output_axes") or [0] * k)
            out_dirs = list(n.attr("scan_output_directions") or [0] * k)
            if not xs:
                raise LoweringError(f"node {n.label()}: Scan without scan inputs")
            in_axes = [a + xs[i].ty.ndim if a < 0 else a for i, a in enumerate(in_axes)]
            t = dims_of(xs[0])[in_axes[0]]
            if not isinstance(t, int) or t > self.MAX_UNROLL:
                raise LoweringError(f"node {n.label()}: Scan needs a static sequence length ≤ {self.MAX_UNROLL} on the cpu target")
            per: list[list[Any]] = [[] for _ in range(k)]
            for it in range(t):
                sl = []
                for i, x in enumerate(xs):
                    j = t - 1 - it if in_dirs[i] else it
                    sl.append(bb.emit(R.squeeze(R.strided_slice(x, axes=[in_axes[i]], begin=[j], end=[j + 1]), [in_axes[i]])))
                outs = self._body(bb, body, states + sl, env)
                states = outs[:nstate]
                for i in range(k):
                    per[i].append(outs[nstate + i])
            results = list(states)
            for i in range(k):
                seq = per[i][::-1] if out_dirs[i] else per[i]
                r = seq[0].ty.ndim + 1
                ax = out_axes[i] + r if out_axes[i] < 0 else out_axes[i]
                results.append(bb.emit(R.stack(seq, axis=ax)))
            return results
        # Loop(M, cond, v...): body(i, cond, v...) → (cond, v..., scan outputs...)
        body = n.attr("body")
        trip = ins[0] if ins else None
        cond = ins[1] if len(ins) > 1 else None
        carried = list(ins[2:])
        tv = const_value(trip) if trip is not None else None
        max_trip = int(np.asarray(tv).reshape(-1)[0]) if tv is not None else None
        cv = const_value(cond) if cond is not None else None
        if trip is not None and tv is None or cond is not None and cv is None:  # a recursive function, run on the host
            from . import dynamic

            return dynamic.runtime_loop(self, bb, n, ins, env)
        go = True if cv is None else bool(np.asarray(cv).reshape(-1)[0])
        if max_trip is None and cond is None:
            raise LoweringError(f"node {n.label()}: Loop without a trip count or condition")
        k = len(body.outputs) - 1 - len(carried)
        per = [[] for _ in range(k)]
        it = 0
        while go and (max_trip is None or it < max_trip):
            if it >= self.MAX_UNROLL:
                raise LoweringError(f"node {n.label()}: Loop runs more than {self.MAX_UNROLL} iterations; the cpu target unrolls loops")
            i_e = _const(np.array(it, dtype=np.int64))
            c_e = _const(np.array(True))
            outs = self._body(bb, body, [i_e, c_e] + carried, env)
            c_out = const_value(outs[0]) if isinstance(outs[0], relax.Expr) else None
            if c_out is None:
                raise LoweringError(f"node {n.label()}: Loop whose condition is computed at run time is not supported by the cpu target")
            go = bool(np.asarray(c_out).reshape(-1)[0])
            carried = outs[1 : 1 + len(carried)]
            for i in range(k):
                per[i].append(outs[1 + len(carried) + i])
            it += 1
        results = list(carried)
        for i in range(k):
            if not per[i]:
                raise LoweringError(f"node {n.label()}: Loop with zero iterations and scan outputs")
            results.append(bb.emit(R.stack(per[i], axis=0)))
        return results

    def _group(self, k: str, nodes: list[Node]) -> None:
        if len(nodes) == 1 and nodes[0].op_type == "Constant":
            return
        gname = _group_name(k)
        inside = {id(v) for n in nodes for v in n.outputs}
        ext: list[tuple[Value, str]] = []  # (value, the form the group reads it in)
        seen: set[tuple[int, str]] = set()
        for n in nodes:
            for i, v in enumerate(n.inputs):
                if v is None or id(v) in inside:
                    continue
                form = self._wants(n, i) if not self._is_inline_const(v) else _layout.PLAIN
                if (id(v), form) in seen:
                    continue
                seen.add((id(v), form))
                ext.append((v, form))
        members = {id(n) for n in nodes}
        outs = [v for n in nodes for v in n.outputs if v.is_graph_output() or any(id(u) not in members for u in v.consumers())]
        if not outs:  # nothing outside reads the group
            return
        if self._try_symbolic(nodes):
            self.symbolic.append(gname)
            return
        why = self.force_inline.get(gname)
        func = None
        if why is None:
            try:
                func, consts, dim_args = self._primitive(gname, nodes, ext, outs)
            except LoweringError as e:
                why = str(e)
        if func is not None:
            why = _primitive_refusal(func)
        if why is None and func is not None:
            gv = self.bb.add_func(func, gname)
            dim_args = [self._dim_shape(a) if isinstance(a, relax.ShapeExpr) else a for a in dim_args]
            args = [self._in_form(self.bb, self.env, v, form) for v, form in ext if not self._is_inline_const(v)] + consts
            args = dim_args + args  # (the vars' definer first: FuseTIR maps the kernel's vars from it)
            call = self.bb.emit(relax.Call(gv, args))
            if len(outs) == 1:
                self.env[id(outs[0])] = call
            else:
                for i, v in enumerate(outs):
                    self.env[id(v)] = self.bb.emit(relax.TupleGetItem(call, i))
            self.groups.append(gname)
            return
        # inline into main, node by node
        self.inline[gname] = why or "not a primitive function"
        self._convert_into(self.bb, nodes, self.env)

    def _note_window(self, n: Node, outs: list[Any]) -> None:
        """Keep the symbolic spatial output dims of a convolution or pooling window: each must be
        at least 1, which sets the smallest input size (`_min_sizes`)."""
        if n.op_type not in WINDOW_OPS:
            return
        for o in outs:
            ty = getattr(o, "ty", None) if isinstance(o, relax.Expr) else None
            if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr) and ty.ndim >= 3:
                self.windows.extend(d for d in list(ty.shape.values)[2:] if not isinstance(d, tvm.tirx.IntImm))

    def _min_sizes(self) -> None:
        """symbolic_dims[D]["min"]: the smallest size of D (a multiple of its "multiple") for which
        every window output that depends on D alone is at least 1 (searched up to 2**16)."""
        by_var: dict[str, list[Any]] = {}
        for e in self.windows:
            names = {v.name for v in tvm.tirx.analysis.undefined_vars(e)}
            if len(names) == 1:
                by_var.setdefault(names.pop(), []).append(e)
        for name, info in self.symbolic_dims.items():
            m = int(info["multiple"])
            var_name = f"{name}_{m}" if m > 1 else name
            exprs = by_var.get(var_name, [])
            if not exprs:
                info["min"] = m
                continue
            var = next(v for v in tvm.tirx.analysis.undefined_vars(exprs[0]) if v.name == var_name)

            def ok(k: int) -> bool:  # (k: the var's value)
                a = tvm.sym.Analyzer()
                a.bind(var, tvm.tirx.IntImm("int64", k))
                vals = [a.simplify(e) for e in exprs]
                return all(isinstance(v, tvm.tirx.IntImm) and int(v.value) >= 1 for v in vals)

            k = 1
            while k < (1 << 16) and not ok(k):
                k += 1 if k < 64 else k // 8
            info["min"] = k * m if m > 1 else k

    def _dim_shape(self, shape: relax.ShapeExpr) -> relax.Expr:
        """A group's shape argument as a match_cast var in main (FuseTIR rejects a ShapeExpr,
        bound or not: "All shape inputs are expected to be single tirx var"), one per var list."""
        key = tuple(str(v) for v in shape.values)
        cache = self.dim_shapes
        if key not in cache:
            cache[key] = self.bb.match_cast(self.bb.emit(shape), relax.ShapeType(list(shape.values)))
        return cache[key]

    def _try_symbolic(self, nodes: list[Node]) -> bool:
        """Evaluate a group of shape arithmetic at compile time (no kernel); False if it is not one."""
        local: dict[int, Any] = {}
        for n in nodes:
            if n.domain not in ("", "ai.onnx"):
                return False
            if self.plan is not None and any(v is not None and self.plan.native(v) != _layout.PLAIN for v in n.inputs):
                return False
            ins = [None if v is None else local.get(id(v), self.env.get(id(v))) for v in n.inputs]
            sym = _sym_eval(n, ins)
            if sym is None:
                return False
            for v, e in zip(n.outputs, sym):
                local[id(v)] = e
        self.env.update(local)
        return True

    def _is_inline_const(self, v: Value) -> bool:
        return isinstance(self.env.get(id(v)), (tvm.ir.GenericConst, Sym))

    def _primitive(self, gname: str, nodes: list[Node], ext: list[tuple[Value, str]], outs: list[Value]
                   ) -> tuple[relax.Function, list[tvm.ir.GenericConst], list[relax.Expr]]:
        gbb = relax.BlockBuilder()
        env: dict[Any, Any] = {}
        params = []
        for i, (v, form) in enumerate(ext):
            e = self.env.get(id(v))
            if e is None:
                raise LoweringError(f"value {v.name!r} is read before it is computed")
            if isinstance(e, (tvm.ir.GenericConst, Sym)):
                env[id(v)] = e  # inlined: converters specialise on it; lifted below if still data
                continue
            e = self._in_form(self.bb, self.env, v, form)  # a layout change: a kernel of its own, in main
            ty = e.ty
            if not isinstance(ty, relax.TensorType):
                raise LoweringError(f"input {v.name!r} is a {type(ty).__name__}")
            p = relax.Var(f"a{i}", ty)
            params.append(p)
            native = self.plan is None or self.plan.native(v) == form
            env[id(v) if native else (id(v), form)] = p
        # a param dim that is an expression of symbolic dims (`(H - 1) // 2 + 1` after a stride-2
        # conv) defines no var: its vars come in as a shape argument, else the function's shapes
        # are erased to rank-only ones (and blocked TE computes, pooling, Resize cannot take those)
        defined = {v for p in params for v in relax.analysis.definable_tir_vars_in_type(p.ty)}
        missing = sorted({v for p in params for v in relax.analysis.tir_vars_in_type(p.ty) if v not in defined}, key=lambda v: v.name)
        dim_args: list[relax.Expr] = []
        if missing:
            # a tensor of main whose dims include those vars as plain dims (an input, or the
            # zero-copy view of one that `_reexpress_dims` makes), passed along unread: a Shape
            # argument defines them too, but FuseTIR rejects it in some modules ("All shape
            # inputs are expected to be single tirx var")
            definer = next((d for d in self.definers
                            if set(missing) <= set(relax.analysis.definable_tir_vars_in_type(d.ty))), None)
            if definer is not None:
                params.append(relax.Var("dims", definer.ty))
                dim_args.append(definer)
            else:
                params.append(relax.Var("dims", relax.ShapeType(missing)))
                dim_args.append(relax.ShapeExpr(missing))
        with function_scope(gbb, gname, params, {"Primitive": True}, private=True):
            with gbb.dataflow():
                self._convert_into(gbb, nodes, env)
                missing = [v.name for v in outs if id(v) not in env]
                if missing:
                    raise LoweringError(f"value {missing[0]!r} is not computed")
                res = [env[id(v)] for v in outs]
                for r in res:
                    if not isinstance(r, relax.Expr) or not isinstance(r.ty, relax.TensorType):
                        raise LoweringError("a group output is not a tensor")
                    if isinstance(r, (tvm.ir.GenericConst, relax.Tuple)) or any(r.same_as(p) for p in params):
                        raise LoweringError("a group output is not computed inside the group")
                out = gbb.emit_output(res[0] if len(res) == 1 else relax.Tuple(res))
            gbb.emit_func_output(out)
        func = gbb.get()[gname]
        sub = gbb.get()
        extra = [gv for gv in sub.get_global_vars() if gv.name_hint != gname]
        if extra:  # emit_te created PrimFuncs: carry them over as call_tir targets
            # (add_func renames a clash, e.g. two groups' `conv_blocked` of different shapes, and
            # returns an equal function's GlobalVar: map each by what it returned, not by name)
            own = [sub[gv].attrs[_OWN_KERNEL] for gv in extra
                   if isinstance(sub[gv], tvm.tirx.PrimFunc) and sub[gv].attrs is not None and _OWN_KERNEL in sub[gv].attrs]
            if own:  # a hand-written kernel (a recurrence looping over time) stays a kernel of its own
                raise LoweringError(f"a hand-written kernel ({own[0]}) runs on its own")
            table = {gv: self.bb.add_func(sub[gv], gv.name_hint) for gv in extra}
            func = _rebind_globals(func, table)
        func, consts = _lift_constants(func)
        return func, consts, dim_args


def _check_body_arity(n: Node, n_in: int) -> None:
    """Refuse If/Loop/Scan whose bodies do not take and give what the node passes and expects
    (ONNX: If's branches give the node's outputs; Loop's body takes (i, cond, v...) and gives
    (cond, v..., scans...); Scan's takes (states..., scan items...) and gives (states..., scans...))."""
    bodies = [(k, g) for k, g in ((k, n.attr(k)) for k in ("then_branch", "else_branch", "body")) if g is not None]
    n_out = len(n.outputs)
    for key, g in bodies:
        gi, go = len(g.inputs), len(g.outputs)
        if n.op_type == "If":
            want_in, ok_out, said = 0, go == n_out, f"{n_out}"
        elif n.op_type == "Loop":
            carried = max(n_in - 2, 0)
            want_in, ok_out, said = 2 + carried, go == 1 + n_out and n_out >= carried, f"{1 + n_out} (cond, {carried} carried, the scans)"
        else:
            want_in, ok_out, said = n_in, go == n_out, f"{n_out}"
        if gi != want_in:
            raise LoweringError(f"node {n.label()}: {n.op_type}'s {key} takes {gi} inputs, the node passes {want_in}")
        if not ok_out:
            raise LoweringError(f"node {n.label()}: {n.op_type}'s {key} gives {go} outputs, the node needs {said}")


def _rebind_globals(func: relax.Function, table: dict[tvm.ir.GlobalVar, tvm.ir.GlobalVar]) -> relax.Function:
    """`func` with its GlobalVars replaced per `table`."""
    if not table:
        return func

    @relax.expr_functor.mutator
    class _M(relax.PyExprMutator):  # type: ignore[misc]
        def visit_global_var_(self, op: tvm.ir.GlobalVar) -> relax.Expr:  # noqa: N802
            return table.get(op, op)

    return _M().visit_expr(func)


def lower(model: Model, force_inline: dict[str, str] | None = None, block: int | None = None,
          winograd: str | None = None, machine: MachineModel | None = None, activity: Any = None,
          multiples: dict[str, int] | None = None) -> LoweredModule:
    """Lower `model` (planned with `plan-kernels`). Groups named in `force_inline` are emitted
    inline into main (with that reason). With `block`, convolution groups run on channel-blocked
    activations where they can (see layout.py), 3x3 convs in Winograd form per `winograd` (a
    `layout.plan_layout` mode), tiled for `machine` (the target's machine model; needed with `block`).
    `activity` (a compile_watchdog.Activity) is told which node is being lowered."""
    return _Lowerer(model, force_inline, block, winograd, machine, activity, multiples).lower()


#: a PrimFunc attribute (recurrent_ops.OWN_KERNEL_ATTR): the group holding it is emitted inline into main
_OWN_KERNEL = "graphopt.own_kernel"

#: how many times `lower_unified` re-lowers with larger multiples before it gives up
UNIFY_ROUNDS = 4


def lower_unified(model: Model, **kw: Any) -> LoweredModule:
    """`lower`, re-expressing symbolic input dims as multiples where a node needs dims equal that
    are not for every size (see ShapeUnificationError): each round raises the multiples to what
    the failing node's dim expressions divide by; a node still failing after UNIFY_ROUNDS, or one
    that names no divisor, is reported."""
    import math

    multiples: dict[str, int] = {}
    why: dict[str, str] = {}
    for _ in range(UNIFY_ROUNDS + 1):
        try:
            lowered = lower(model, multiples=multiples, **kw)
        except ShapeUnificationError as e:
            grown = {k: math.lcm(multiples.get(k, 1), m) for k, m in e.divisors.items() if m > 1}
            if not grown or all(multiples.get(k, 1) == m for k, m in grown.items()):
                raise LoweringError(f"{e}; fix those dims with --dim NAME=N or --input-shape") from None
            multiples.update(grown)
            node = str(e).split(": ", 1)[0].removeprefix("node ")
            for k in grown:
                why.setdefault(k, f"{node} joins maps of different strides")
            continue
        for k, info in lowered.symbolic_dims.items():
            if k in why and info["multiple"] > 1:
                info["why"] = why[k]
        return lowered
    raise LoweringError(f"symbolic dims still not unified with multiples {multiples}")


def lower_and_fuse(model: Model, target: tvm.target.Target, block: int | None = None,
                   winograd: str | None = None, activity: Any = None) -> tuple[LoweredModule, tvm.IRModule]:
    """`lower` then `legalize_and_fuse`. When FuseTIR refuses the module, each primitive group is
    tried on its own, the ones it refuses are emitted inline instead, and the model is lowered again."""
    machine = machine_model(target)
    lowered = lower_unified(model, block=block, winograd=winograd, machine=machine, activity=activity)
    multiples = {k: d["multiple"] for k, d in lowered.symbolic_dims.items() if d["multiple"] > 1}
    if activity is not None:
        activity.what = "legalizing and fusing the kernels (LegalizeOps, FuseTIR)"
    try:
        return lowered, legalize_and_fuse(lowered.mod, target)
    except Exception as first:  # TVMError / InternalError from FuseTIR
        bad = failing_groups(lowered.mod, target)
        if not bad:
            raise LoweringError(f"LegalizeOps/FuseTIR failed: {_last_line(first)}") from None
    lowered = lower(model, force_inline=bad, block=block, winograd=winograd, machine=machine, activity=activity,
                    multiples=multiples)
    if activity is not None:
        activity.what = "legalizing and fusing the kernels (LegalizeOps, FuseTIR)"
    try:
        return lowered, legalize_and_fuse(lowered.mod, target)
    except Exception as again:  # inline, the same nodes fail again: name them
        groups = {_group_name(k): ns for k, ns in _topo_groups(model)}
        named = "; ".join(f"{g} ({', '.join(n.label() for n in groups.get(g, []))})" for g in bad)
        raise LoweringError(f"kernel groups the cpu target cannot compile: {named}: {_last_line(again)}") from None


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def failing_groups(mod: tvm.IRModule, target: tvm.target.Target) -> dict[str, str]:
    """Primitive group functions that LegalizeOps/FuseTIR cannot turn into one kernel (each
    tried in a module of its own, called once from a stub main), with the reason."""
    prims = {gv: mod[gv] for gv in mod.get_global_vars() if isinstance(mod[gv], tvm.tirx.PrimFunc)}
    bad: dict[str, str] = {}
    for gv in mod.get_global_vars():
        f = mod[gv]
        if not (isinstance(f, relax.Function) and f.attrs is not None and "Primitive" in f.attrs):
            continue
        params = [relax.Var(f"x{i}", p.ty) for i, p in enumerate(f.params)]
        stub = relax.Function(params, relax.Call(gv, params), f.ret_ty)
        sub = tvm.IRModule({gv: f, tvm.ir.GlobalVar("main"): stub, **prims})
        try:
            legalize_and_fuse(sub, target)
        except Exception as e:
            bad[gv.name_hint] = f"FuseTIR: {_last_line(e)}"
    return bad


def _float_subtract(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """relax.subtract of floats as a - b with b's bits passed through a reinterpret pair: TVM's
    arithmetic simplifier cancels a float `x - x` (also `select(c, x, y) - x`) to 0 once the
    fused kernel's expressions meet, which turns NaN and Inf into 0 (apache/tvm#11373); it
    cannot prove the pair equal to x, LLVM drops the pair, and without fast-math LLVM keeps
    x - x as IEEE says (NaN - NaN = NaN, Inf - Inf = NaN)."""
    from tvm import te, tirx, topi

    a, b = call.args
    dtype = str(b.ty.dtype)
    if not dtype.startswith("float") or dtype not in ("float16", "float32", "float64"):
        return bb.call_te(topi.subtract, a, b)
    bits = {"float16": "int16", "float32": "int32", "float64": "int64"}[dtype]

    def f(x: te.Tensor, y: te.Tensor) -> te.Tensor:
        opaque = te.compute(y.shape, lambda *i: tirx.reinterpret(dtype, tirx.reinterpret(bits, y(*i))), name="ieee_guard")
        return topi.subtract(x, opaque)

    return bb.call_te(f, a, b, primfunc_name_hint="subtract")


def _float(dtype: str) -> bool:
    return dtype in ("float16", "float32", "float64", "bfloat16")


def _tvm_legalization(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """`call` legalized by TVM's own FLegalize (where graphopt's leaves a dtype or layout to it)."""
    return _registered_legalizations(len(tvm.ir.Op.list_op_names()))[call.op.name](bb, call)


def _nan_max_min(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """relax.max / relax.min (ReduceMax/Min, GlobalMaxPool in NCHW) of floats with NaN skipped
    (maxNum, `minmax_ops`: NaN only where every element is); other dtypes as TVM legalizes them."""
    x = call.args[0]
    if not _float(str(x.ty.dtype)):
        return _tvm_legalization(bb, call)
    axes = None if call.attrs.axis is None else [int(a) for a in call.attrs.axis]
    kind = "max" if call.op.name == "relax.max" else "min"
    return bb.call_te(reduce_max_min, x, kind, axes, bool(call.attrs.keepdims), primfunc_name_hint=kind)


def _nan_max_pool2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """relax.nn.max_pool2d of a float NCHW tensor with NaN skipped (`blocked_ops.max_pool_nchw`);
    other layouts and dtypes as TVM legalizes them."""
    a, x = call.attrs, call.args[0]
    if not _float(str(x.ty.dtype)) or str(a.layout) != "NCHW" or str(a.out_layout) != "NCHW":
        return _tvm_legalization(bb, call)
    return bb.call_te(max_pool_nchw, x, [int(k) for k in a.pool_size], [int(s) for s in a.strides],
                      [int(p) for p in a.padding], [int(d) for d in a.dilation], bool(a.ceil_mode),
                      primfunc_name_hint="max_pool2d")


def _nan_arg_max_min(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """relax.argmax / relax.argmin of floats with NaN skipped, as numpy's nanargmax
    (`minmax_ops.arg_max_min`); other dtypes as TVM legalizes them."""
    x = call.args[0]
    if not _float(str(x.ty.dtype)):
        return _tvm_legalization(bb, call)
    axis = None if call.attrs.axis is None else int(call.attrs.axis)
    kind = "max" if call.op.name == "relax.argmax" else "min"
    return bb.call_te(arg_max_min, x, kind, axis, bool(call.attrs.keepdims), str(call.ty.dtype),
                      primfunc_name_hint=f"arg{kind}")


#: graphopt's legalizations in place of TVM's (IEEE-correct float results)
LEGALIZATIONS = {"relax.subtract": _float_subtract, "relax.max": _nan_max_min, "relax.min": _nan_max_min,
                 "relax.nn.max_pool2d": _nan_max_pool2d, "relax.argmax": _nan_arg_max_min,
                 "relax.argmin": _nan_arg_max_min}
#: ... on GPUs: dlight's cross-thread reductions know only TIR's own reducers (its rfactor finds
#: no "matched reducer" for the maxNum ones), so max/min/pools stay TVM's there
GPU_LEGALIZATIONS = {"relax.subtract": _float_subtract}


def legalize_and_fuse(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """LegalizeOps → AnnotateTIROpPattern → FuseTIR: one PrimFunc per primitive group function.
    A legalization that raises is raised after LegalizeOps, not through it (guarded_legalizations)."""
    failures: list[tuple[str, BaseException]] = []
    with target:
        mod = tvm.transform.Sequential([relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()])(mod)
        custom = LEGALIZATIONS if str(target.kind.name) == "llvm" else GPU_LEGALIZATIONS
        mod = relax.transform.LegalizeOps(guarded_legalizations(custom, failures))(mod)
        if failures:
            raise failures[0][1]
        seq = tvm.transform.Sequential(
            [
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
            ]
        )
        return seq(mod)


def guarded_legalizations(custom: dict[str, Any], failures: list[tuple[str, BaseException]]) -> dict[str, Any]:
    """LegalizeOps' map for every operator that has a legalization (`custom` first), each wrapped
    so that an exception does not unwind through LegalizeOps' C++ mutator: that leaves its
    BlockBuilder with open blocks, and TVM prints "BlockBuilder destroyed with remaining blocks!"
    on stderr when it is destroyed (an extra line after graphopt's own error, or on a compile that
    then succeeds by emitting the group inline). The wrapper records (op, exception) in
    `failures`, leaves the call as it is, and the caller raises the first failure after the pass."""

    def guard(name: str, f: Any) -> Any:
        def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
            if failures:  # (the pass is lost anyway: leave the rest alone)
                return call
            try:
                return f(bb, call)
            except Exception as e:  # noqa: BLE001 - raised by the caller, after the pass
                failures.append((name, e))
                return call

        return legalize

    registered = _registered_legalizations(len(tvm.ir.Op.list_op_names()))
    return {name: guard(name, custom.get(name) or f) for name, f in {**registered, **custom}.items()}


@functools.lru_cache(maxsize=4)
def _registered_legalizations(n_ops: int) -> dict[str, Any]:
    """{operator name: its FLegalize} of every registered operator (~0.1 s to read: cached, and
    read again when `n_ops`, the number of registered operators, grows)."""
    out = {}
    for name in tvm.ir.Op.list_op_names():
        f = tvm.ir.Op.get(name).get_attr("FLegalize")
        if f is not None:
            out[str(name)] = f
    return out


from . import converters as _converters  # noqa: E402,F401  (registers more of CONVERTERS)
from .dynamic import function_scope  # noqa: E402
from .. import layout as _layout  # noqa: E402

"""`fold-constants`: evaluate nodes whose inputs are all constants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from graphopt.ir import Graph, Model, Node, Shape, TensorType, Value, opset_version
from graphopt.transform import Pass, PassContext, PassResult, register_pass

from graphopt.ir import (
    NONDETERMINISTIC_OPS,
    STANDARD_DOMAINS,
    const_array,
    const_numel,
    constant_semantics,
    in_function,
    is_constant,
    make_constant,
    replace_with_constant,
)

#: dtypes numpy and the reference evaluator handle exactly (no ml_dtypes float8/int4 games).
_FOLDABLE_KINDS = "biuf"

#: Ops whose output size is set by the *values* of their inputs: their size is predicted
#: before evaluating, so a tiny ConstantOfShape([10**9]) is never materialised.
_VALUE_SIZED = frozenset(
    {"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot", "MaxUnpool", "Col2Im", "EyeLike"}
)

#: Ops never folded even when their inputs are constant: sequence/optional plumbing, I/O-ish
#: ops and ops whose reference implementation is slow or not bit-exact with onnxruntime.
_NEVER_FOLD = NONDETERMINISTIC_OPS | {
    "Constant",  # handled separately: becomes an initializer
    "If", "Loop", "Scan",
    "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt", "SplitToSequence",
    "ConcatFromSequence", "SequenceLength", "SequenceMap", "Optional", "OptionalGetElement", "OptionalHasElement",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",  # rounding modes differ across runtimes
    "StringNormalizer", "TfIdfVectorizer", "RegexFullMatch", "StringConcat", "StringSplit",
    "ImageDecoder",
}


def _predicted_size(node: Node, arrays: list[np.ndarray | None]) -> int | None:
    """Output element count of a value-sized op, computed from its constant inputs."""
    op = node.op_type
    out = node.outputs[0]
    if out.shape is not None and out.shape.is_static():
        return out.shape.numel()
    try:
        if op == "ConstantOfShape":
            return int(np.prod(arrays[0], dtype=np.int64)) if arrays[0] is not None else 1
        if op == "Expand":
            return int(np.prod(np.broadcast_shapes(arrays[0].shape, tuple(int(x) for x in arrays[1])), dtype=np.int64))
        if op == "Tile":
            return int(arrays[0].size * np.prod(arrays[1], dtype=np.int64))
        if op == "Range":
            start, limit, delta = (float(a) for a in arrays[:3])
            return max(int(np.ceil((limit - start) / delta)), 0) if delta else None
        if op == "EyeLike":
            return int(arrays[0].size)
    except Exception:  # noqa: BLE001 - inputs the size formula cannot take: size unknown, not folded
        return None
    return None  # Resize, Pad, OneHot...: only with a static output type


_EXACT_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Max": np.maximum, "Min": np.minimum}
_EXACT_UNARY = {"Neg": np.negative, "Abs": np.abs, "Relu": lambda x: np.maximum(x, np.zeros((), x.dtype)), "Sqrt": np.sqrt}


def _eval_numpy(node: Node, arrays: list[np.ndarray | None]) -> list[np.ndarray] | None:
    """Fast paths for the small integer/shape ops that dominate folding; None: not handled."""
    op = node.op_type
    a = arrays
    if op == "Identity":
        return [a[0]]
    if op == "Shape":
        shape = np.array(a[0].shape, dtype=np.int64)
        start, end = node.attr("start", 0), node.attr("end", None)
        return [shape[start:end]]
    if op == "ConstantOfShape":
        value = node.attributes.get("value")
        fill = value.value.numpy().reshape(-1) if value is not None else np.zeros(1, np.float32)
        return [np.full(tuple(int(d) for d in a[0]), fill[0], dtype=fill.dtype)]
    if op == "Size":
        return [np.array(a[0].size, dtype=np.int64)]
    if op == "Concat" and all(x is not None and x.ndim > 0 for x in a):
        return [np.concatenate(a, axis=node.attr("axis", 0))]
    if op == "Unsqueeze" and (len(a) == 2 and a[1] is not None or len(a) == 1 and node.attr("axes") is not None):
        raw = [int(x) for x in a[1].reshape(-1)] if len(a) == 2 else list(node.attr("axes"))
        axes = sorted(x % (a[0].ndim + len(raw)) for x in raw)
        r = a[0]
        for ax in axes:
            r = np.expand_dims(r, ax)
        return [r]
    if op == "Gather" and a[1] is not None and a[1].dtype.kind in "iu":
        axis = node.attr("axis", 0)
        dim = a[0].shape[axis]
        idx = a[1].astype(np.int64)
        if ((idx < -dim) | (idx >= dim)).any():
            return None
        return [np.take(a[0], idx, axis=axis)]
    if op in _EXACT_BINARY and len(a) == 2 and a[0] is not None and a[1] is not None and a[0].dtype == a[1].dtype:
        # IEEE-exact for floats, wrapping for ints: what onnxruntime computes too (integer Div
        # truncates toward zero in ONNX, numpy floors: left to the reference evaluator)
        if op == "Div" and a[0].dtype.kind != "f":
            return None
        with np.errstate(all="ignore"):
            return [np.asarray(_EXACT_BINARY[op](a[0], a[1])).astype(a[0].dtype)]
    if op in _EXACT_UNARY and len(a) == 1 and a[0].dtype.kind in "if":
        with np.errstate(all="ignore"):
            return [np.asarray(_EXACT_UNARY[op](a[0])).astype(a[0].dtype)]
    if op == "Transpose":
        perm = node.attr("perm")
        return [np.array(np.transpose(a[0], None if perm is None else list(perm)), order="C")]
    if op == "Cast" and a[0].dtype.kind in "iub":
        from graphopt.ir import DataType

        to = DataType(node.attr("to"))
        if to.numpy().kind in "iub":
            return [a[0].astype(to.numpy())]
    if op == "Reshape" and len(a) == 2:
        shape = [int(x) for x in a[1]]
        if node.attr("allowzero", 0) == 0:
            shape = [a[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [a[0].reshape(shape)]
    return None


def _eval_reference(node: Node, arrays: list[np.ndarray | None], model: Model) -> list[np.ndarray] | None:
    """Run onnx's reference evaluator on a one-node model made of this node."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    from graphopt import to_onnx
    from graphopt.ir import Graph as IRGraph
    from graphopt.ir import Model as IRModel
    from graphopt.ir import Node as IRNode

    ins: list[Value | None] = []
    feeds: dict[str, np.ndarray] = {}
    for i, arr in enumerate(arrays):
        if arr is None:
            ins.append(None)
            continue
        v = Value(f"in{i}", TensorType(_dtype(arr), Shape(arr.shape)))
        ins.append(v)
        feeds[v.name] = arr
    outs = [Value(f"out{i}") for i in range(len(node.outputs))]
    copy = IRNode(node.domain, node.op_type, ins, list(node.attributes.values()), outputs=outs)
    g = IRGraph([v for v in ins if v is not None], outs, [copy])
    opsets = {"": opset_version(model, default=21)}
    m = IRModel(g, ir_version=max(model.ir_version, 7), opset_imports=opsets)
    try:
        proto: onnx.ModelProto = to_onnx(m)
        results = ReferenceEvaluator(proto).run(None, feeds)
    except Exception:  # noqa: BLE001 - the reference evaluator refuses (its errors vary by op): not folded
        return None
    return list(results)


_PACKED_4BIT = frozenset({"int4", "uint4", "float4_e2m1fn"})


def _stored_bytes(arr: np.ndarray) -> int:
    """Bytes a tensor takes in the file: 4-bit types are packed two to a byte."""
    return (int(arr.size) + 1) // 2 if arr.dtype.name in _PACKED_4BIT else int(arr.nbytes)


def _dtype(arr: np.ndarray):
    from graphopt.ir import DataType

    return DataType.from_numpy(arr.dtype)


def try_fold(node: Node, model: Model, *, max_size: int, max_expand: int) -> bool:
    """Fold `node` when every input is a constant and the result is small enough. True if done.

    A Range left unfolded gets scalar constants for its constant 1-element inputs (see
    `_scalar_range_inputs`)."""
    if _fold(node, model, max_size=max_size, max_expand=max_expand):
        return True
    if node.op_type == "Range" and node.domain in STANDARD_DOMAINS:
        _scalar_range_inputs(node)
    return False


def _one_element_as_scalar(node: Node, arrays: list[np.ndarray | None]) -> list[np.ndarray | None]:
    """Range's inputs as the scalars onnxruntime's kernel reads (it takes 1-element tensors too)."""
    if node.op_type != "Range":
        return arrays
    return [a.reshape(()) if a is not None and a.ndim > 0 and a.size == 1 else a for a in arrays]


def _scalar_range_inputs(node: Node) -> int:
    """`Range(0, L, 1)` with L a constant of shape [1]  →  `Range(0, L', 1)`, L' the same value as
    a scalar. ONNX wants scalars; onnxruntime's kernel also takes 1-element tensors, so models
    rely on it (AffineGrid's expanded function feeds Range a dim split off `size`), but its
    load-time inference rejects the model once such an input is a constant: inlining an If or
    folding its producer makes one out of a value that was computed before. Returns the count."""
    g = node.graph
    if g is None:
        return 0
    changed = 0
    for i, v in enumerate(node.inputs[:3]):
        if v is None or not is_constant(v):
            continue
        arr = const_array(v)
        if arr is None or arr.ndim == 0 or arr.size != 1:
            continue
        node.replace_input_with(i, make_constant(g, arr.reshape(()), v, before=node))
        changed += 1
    return changed


def _fold(node: Node, model: Model, *, max_size: int, max_expand: int) -> bool:
    if node.domain not in STANDARD_DOMAINS or node.op_type in _NEVER_FOLD or node.subgraphs():
        return False
    present = [v for v in node.inputs if v is not None]
    if not present or not all(is_constant(v) for v in present):
        return False
    if any(v.is_graph_output() for v in node.outputs) and all(not v.uses() for v in node.outputs):
        pass  # still folded: the output keeps its name as a Constant node
    sizes = [const_numel(v) or 0 for v in present]
    if sum(sizes) > max_size * 4:  # inputs this big: evaluation costs more than it saves
        return False
    arrays = _one_element_as_scalar(node, [None if v is None else const_array(v) for v in node.inputs])
    # elements (and stored bytes) that disappear with the node: constant inputs read by nothing else
    freed = freed_bytes = 0
    seen: set[int] = set()
    for v, s in zip(present, sizes):
        if id(v) not in seen and not v.is_graph_output() and all(u is node for u, _ in v.uses()):
            freed += s
            arr = arrays[node.inputs.index(v)]
            freed_bytes += _stored_bytes(arr) if arr is not None else 0
        seen.add(id(v))
    if any(a is not None and (a.dtype.kind not in _FOLDABLE_KINDS or a.dtype.names) for a in arrays):
        return False
    if node.op_type in _VALUE_SIZED:
        predicted = _predicted_size(node, arrays)
        if predicted is None or predicted > max_size or predicted > freed + max_expand:
            return False
    results = None
    try:
        results = _eval_numpy(node, arrays)
    except Exception:  # noqa: BLE001 - the numpy shortcut does not cover it: the reference evaluator below
        results = None
    if results is None:
        results = _eval_reference(node, arrays, model)
    if results is None or len(results) != len(node.outputs):
        return False
    fixed: list[np.ndarray] = []
    total = total_bytes = 0
    for out, r in zip(node.outputs, results):
        if not isinstance(r, np.ndarray):
            r = np.asarray(r) if np.isscalar(r) else None
        if r is None or r.dtype.kind not in _FOLDABLE_KINDS:
            return False
        want = out.dtype
        if want is not None:
            try:
                if r.dtype != want.numpy():
                    r = r.astype(want.numpy())  # the reference evaluator sometimes widens
            except (KeyError, ValueError, TypeError):  # no numpy cast to the declared type: not folded
                return False
        if out.shape is not None and out.shape.is_static() and tuple(out.shape.dims) != r.shape:
            return False  # disagrees with the declared type: better not touch it
        if out.uses() or out.is_graph_output():
            total += int(r.size)
            total_bytes += _stored_bytes(r)
        fixed.append(np.array(r, order="C", copy=not r.flags.c_contiguous))  # ascontiguousarray would make 0-d arrays 1-d
    # the model must not grow, in elements nor in stored bytes: Cast(uint4 indices) → int32 keeps
    # the element count but takes 8× the file (a weight-sharing codebook decode stays a decode)
    if total > max_size or total > freed + max_expand or total_bytes > freed_bytes + 8 * max_expand:
        return False
    replace_with_constant(node, fixed)
    return True


def constant_to_initializer(node: Node) -> bool:
    """Constant node -> initializer with the same name (not in function bodies, not for graph
    outputs, not for sparse or attribute-referencing constants)."""
    g = node.graph
    if g is None or in_function(g) or not is_constant(node.outputs[0]) or node.outputs[0].is_graph_output():
        return False
    arr = const_array(node.outputs[0])
    if arr is None:
        return False
    replace_with_constant(node, [arr])
    return True


@register_pass
@dataclass(frozen=True)
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constants and replace them by initializers.

    Before → after:  `c = Add(Shape(W), [1])` with W an initializer  →  `c` an initializer;
    `k = Constant(value=...)`  →  `k` an initializer (a Constant node in function bodies, which
    cannot hold initializers, and for graph outputs, which keep their names).

    Does not fire on: nodes with subgraphs, random ops, ops outside the standard ONNX domain
    (custom ops, model-local functions), sequence/optional ops, Quantize/DequantizeLinear,
    inputs that are graph inputs (an initializer that is also an input can be overridden),
    non-numeric dtypes, and results that would grow the model: a result may hold at most
    `max_size` elements and at most `max_expand` more elements (8·`max_expand` more stored
    bytes) than the constant inputs that die with the node (so ConstantOfShape/Tile/Expand/Range
    of big shapes, widening Casts of big tensors and weight-sharing decodes stay unfolded).
    """

    name: ClassVar[str] = "fold-constants"
    idle_reason: ClassVar[str] = "no node whose inputs are all constant"
    max_size: int = 1 << 20
    max_expand: int = 1024

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        with constant_semantics(model):
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        folded = converted = 0
        for g in list(model.graphs()):
            f, c = fold_graph(g, model, self.max_size, self.max_expand)
            folded += f
            converted += c
        return PassResult(bool(folded or converted), {"folded": folded, "constants-to-initializers": converted})


def fold_graph(g: Graph, model: Model, max_size: int, max_expand: int) -> tuple[int, int]:
    """One topological sweep: folding a node makes its readers' inputs constant in time."""
    folded = converted = 0
    for node in g:
        if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
            converted += constant_to_initializer(node)
        elif try_fold(node, model, max_size=max_size, max_expand=max_expand):
            folded += 1
    return folded, converted

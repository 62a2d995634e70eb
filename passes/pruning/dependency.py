"""Channel-dependency analysis: which channels of which tensors must be removed together.

Every channel that a layer *produces* gets a global integer id: the output channels of a Conv /
ConvTranspose, the output features of a Gemm or of a MatMul with a constant weight. Walking the
graph in topological order, each tensor gets a `ChannelInfo`: the axis that carries channels and,
for every position along it, the id of the channel that lives there. Ops move ids around:

- activations, Cast, BatchNorm/InstanceNorm (their per-channel parameters are sliced), pools,
  Pad/Resize that leave the channel axis alone: the ids pass through;
- elementwise ops with broadcasting (residual Add, SE's Mul, Where...): the ids of operands that
  meet on one axis are *unified* (union-find): removing channel i of one operand means removing
  channel i of the other; constant operands on that axis are sliced;
- Concat on the channel axis concatenates id lists (offsets); Split/Slice/Gather take ranges;
- Transpose/Squeeze/Unsqueeze/Flatten/Reshape move the axis; a merge (C,H,W → C·H·W into a
  Gemm) repeats each id over its block of features; a split (768 → 12 heads × 64) unifies each
  block so that whole heads go (the second-to-last new axis is kept: heads in (3, heads, dim));
  a channel shuffle (Reshape to (g, C/g), swap, merge back) keeps the C/g axis and unifies the
  g channels of each column, so the shuffle stays a shuffle;
- depthwise convs pass ids through (each input channel owns its block of outputs; `group`
  shrinks); grouped convs unify position j of every group, so groups stay equal;
- batched MatMul (attention) unifies the head axes of Q, K and V, and the output projection
  consumes the merged heads; ONNX Attention and onnxruntime's com.microsoft MultiHeadAttention
  (fuse-attention{contrib-ops=1}) unify the heads of Q, K and V too (`num_heads` shrinks, a
  packed bias and a constant per-head attention_bias are sliced).

An op the analysis does not know, a LayerNorm/GroupNorm/Softmax/Reduce over the channel axis, a
channel tensor that is a graph output or read inside a subgraph... *blocks* the ids it touches,
with a reason. Union-find classes are the units of pruning: removing a class removes every
position in every tensor whose id is in it, and the analysis guarantees the pruned graph is
consistent. Groups (reported) are connected sets of producer spaces.

The analysis records `Edit`s per node (slice a constant along an axis, new `group`, new Split
sizes, new Slice starts/ends, new Reshape/Expand target entries, new Gather indices); `surgery`
applies them for a chosen set of pruned classes.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.ir import Graph, Model, Node, TensorType, Value, opset_version, constant_semantics
from graphopt.pattern import const_array

# ops that keep every tensor element in place (ids pass through on every axis)
UNARY = frozenset(
    """Relu LeakyRelu PRelu Clip Sigmoid HardSigmoid Tanh Erf Gelu Elu Selu Celu Softplus Softsign HardSwish Mish
    ThresholdedRelu Swish Neg Abs Exp Log Sqrt Reciprocal Identity Cast CastLike Floor Ceil Round Sign Sin Cos Tan
    Asin Acos Atan Sinh Cosh Asinh Acosh Atanh Not IsNaN IsInf Dropout""".split()
)
ELEMENTWISE = frozenset(
    """Add Sub Mul Div Pow Max Min Sum Mean Where PRelu Equal Greater Less GreaterOrEqual LessOrEqual And Or Xor
    Mod BitShift""".split()
)
POOLS = frozenset("MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split())
REDUCES = frozenset(
    "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceSumSquare".split()
)


class UnionFind:
    """Union-find over channel ids, grown as spaces are created."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            if x != y:
                self.union(x, y)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


@dataclass
class ChannelInfo:
    """The channel axis of a tensor and the id at each position along it."""

    axis: int
    ids: np.ndarray


@dataclass
class Space:
    """The channels one layer produces (ids start..start+size)."""

    index: int
    node: Node
    start: int
    size: int
    kind: str  # "conv", "gemm", "matmul", "untracked"

    @property
    def ids(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size, dtype=np.int64)


@dataclass
class Edit:
    """One change surgery makes to a node when channels go. `kind`:
    - "slice": constant input `index` is sliced along `axis` by `ids`;
    - "group": attribute `group` (or the one named in `extra`, e.g. num_heads) becomes the
      number of kept `ids`;
    - "split": Split sizes from segments `segments` (list of id arrays);
    - "slice-range": Slice `index`-th axis entry over input ids `ids` (start, end in `extra`);
    - "reshape": output dim `axis` of a Reshape/Expand target becomes the kept count of `ids`;
    - "gather": Gather indices remapped over input ids `ids`."""

    kind: str
    node: Node
    index: int = 0
    axis: int = 0
    ids: np.ndarray | None = None
    extra: Any = None


@dataclass
class Consumer:
    """A layer that reads channels through its weights (for importance and reconstruction)."""

    node: Node
    kind: str  # "conv", "convT", "gemm", "matmul"
    x: Value
    w_index: int  # which input is the weight
    w_axis: int  # the weight axis that matches input channels
    ids: np.ndarray  # ids of the input channels along the weight axis
    grouped: bool = False


@dataclass
class Producer:
    node: Node
    w_index: int
    w_axis: int  # weight axis of output channels
    ids: np.ndarray
    out: Value


@dataclass
class Group:
    """A connected set of producer spaces: what a pruning ratio applies to."""

    index: int
    spaces: list[Space]
    classes: np.ndarray  # root ids
    blocked: dict[int, str]  # root -> reason
    unit: int = 1  # channels of the main space per class

    @property
    def names(self) -> list[str]:
        return [s.node.name or s.node.outputs[0].name for s in self.spaces]

    @property
    def prunable(self) -> np.ndarray:
        return np.array([c for c in self.classes.tolist() if c not in self.blocked], dtype=np.int64)

    def matches(self, pattern: str) -> bool:
        return any(fnmatch.fnmatchcase(n, pattern) for s in self.spaces for n in (s.node.name, s.node.outputs[0].name))


@dataclass
class Analysis:
    model: Model
    uf: UnionFind
    info: dict[Value, ChannelInfo]
    spaces: list[Space]
    edits: list[Edit]
    consumers: list[Consumer]
    producers: list[Producer]
    bns: list[tuple[Node, np.ndarray]]
    blocks: list[tuple[np.ndarray, str]]
    groups: list[Group] = field(default_factory=list)
    root: np.ndarray | None = None

    def keep_mask(self, ids: np.ndarray, pruned: np.ndarray) -> np.ndarray:
        """True where the channel survives; `pruned` is a bool array indexed by root id."""
        assert self.root is not None
        return ~pruned[self.root[ids]]

    def unprunable_report(self) -> list[str]:
        out = []
        for g in self.groups:
            if len(g.blocked) == len(g.classes):
                reasons = list(dict.fromkeys(g.blocked.values()))
                out.append(f"{', '.join(g.names[:3])}{' ...' if len(g.names) > 3 else ''}: {'; '.join(reasons[:2])}")
        return out


def _shape(v: Value | None) -> tuple[Any, ...] | None:
    if v is None:
        return None
    t = v.type
    if isinstance(t, TensorType) and t.shape is not None:
        return tuple(t.shape.dims)
    arr = const_array(v)
    return None if arr is None else tuple(arr.shape)


def _rank(v: Value | None) -> int | None:
    s = _shape(v)
    return None if s is None else len(s)


def _ints(v: Value | None) -> list[int] | None:
    arr = const_array(v)
    return None if arr is None else [int(x) for x in np.asarray(arr).reshape(-1)]


def static_value(v: Value | None, depth: int = 0) -> np.ndarray | None:
    """The value of a small integer tensor computed from constants and *static* shapes
    (Shape → Gather/Slice/Concat/Unsqueeze/arithmetic), as exporters write chunk bounds and
    Reshape targets; None when it depends on a dynamic dim or on data."""
    arr = const_array(v)
    if arr is not None:
        return np.asarray(arr)
    if v is None or depth > 24:
        return None
    n = v.producer()
    if n is None or n.domain not in ("", "ai.onnx"):
        return None
    op = n.op_type
    if op == "Shape":
        shp = _shape(n.inputs[0])
        if shp is None:
            return None
        start, end = n.attr("start", 0), n.attr("end", None)
        dims = list(shp)[slice(start, end)]
        return np.array(dims, np.int64) if all(isinstance(d, int) for d in dims) else None
    ins = [static_value(i, depth + 1) if i is not None else None for i in n.inputs]
    if any(x is None for x, i in zip(ins, n.inputs) if i is not None):
        return None
    try:
        if op in ("Identity", "Cast"):
            return ins[0] if op == "Identity" else ins[0].astype(np.int64)
        if op == "Gather":
            return np.take(ins[0], ins[1], axis=int(n.attr("axis", 0)))
        if op == "Concat":
            return np.concatenate([np.atleast_1d(x) for x in ins], axis=int(n.attr("axis", 0)))
        if op == "Unsqueeze":
            axes = n.attr("axes") if n.attr("axes") is not None else list(ins[1])
            out = ins[0]
            for a in sorted(int(a) % (out.ndim + len(axes)) for a in axes):
                out = np.expand_dims(out, a)
            return out
        if op == "Squeeze":
            return np.squeeze(ins[0])
        if op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
            a, b = ins[0], ins[1]
            f = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Max": np.maximum, "Min": np.minimum}.get(op)
            if f is not None:
                return f(a, b)
            return (a // b) if a.dtype.kind in "iu" else a / b
        if op == "Slice" and len(ins) >= 3:
            axes = list(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(ins[1])))
            steps = list(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(axes)
            sl = [slice(None)] * ins[0].ndim
            for a, st, en, sp in zip(axes, ins[1], ins[2], steps):
                sl[int(a)] = slice(int(st), int(en), int(sp))
            return ins[0][tuple(sl)]
    except Exception:  # noqa: BLE001 - anything odd: not a static value
        return None
    return None


def _label(n: Node) -> str:
    return n.name or f"{n.op_type}->{n.outputs[0].name if n.outputs else ''}"


class _Analyzer:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.uf = UnionFind()
        self.info: dict[Value, ChannelInfo] = {}
        self.spaces: list[Space] = []
        self.edits: list[Edit] = []
        self.consumers: list[Consumer] = []
        self.producers: list[Producer] = []
        self.bns: list[tuple[Node, np.ndarray]] = []
        self.blocks: list[tuple[np.ndarray, str]] = []
        # Reshape nodes that open a channel shuffle: keep the C/g axis
        self.shuffle_split: set[Node] = set()

    # --- helpers --------------------------------------------------------------------------------
    def new_space(self, node: Node, size: int, kind: str) -> Space:
        start = self.uf.add(size)
        s = Space(len(self.spaces), node, start, size, kind)
        self.spaces.append(s)
        return s

    def block(self, ids: np.ndarray, reason: str) -> None:
        if len(ids):
            self.blocks.append((np.asarray(ids, dtype=np.int64), reason))

    def block_inputs(self, node: Node, reason: str) -> None:
        for v in node.inputs:
            inf = self.info.get(v) if v is not None else None
            if inf is not None:
                self.block(inf.ids, f"{reason} ({_label(node)})")

    def set(self, v: Value, axis: int, ids: np.ndarray) -> None:
        self.info[v] = ChannelInfo(axis, np.asarray(ids, dtype=np.int64))

    def slice_const(self, node: Node, index: int, axis: int, ids: np.ndarray) -> bool:
        """Record slicing constant input `index` along `axis` (False if it is not a constant of
        matching size; a size-1 axis broadcasts and needs nothing)."""
        v = node.inputs[index] if index < len(node.inputs) else None
        if v is None:
            return True
        arr = const_array(v)
        if arr is None:
            return False
        if axis < 0:
            axis += arr.ndim
        if axis < 0 or axis >= arr.ndim or arr.shape[axis] == 1 and len(ids) != 1:
            return True
        if arr.shape[axis] != len(ids):
            return False
        self.edits.append(Edit("slice", node, index=index, axis=axis, ids=ids))
        return True

    # --- the walk ---------------------------------------------------------------------------------
    def run(self) -> None:
        g = self.model.graph
        self._find_shuffles(g)
        for node in g:
            self.visit(node)
            # a tracked value read from inside a subgraph cannot be followed there
            for sub in node.subgraphs():
                for inner in sub.all_nodes():
                    for v in inner.inputs:
                        inf = self.info.get(v) if v is not None else None
                        if inf is not None:
                            self.block(inf.ids, f"read inside a subgraph of {_label(node)}")
        for v in g.outputs:
            inf = self.info.get(v)
            if inf is not None:
                self.block(inf.ids, f"reaches graph output {v.name!r}")

    def _find_shuffles(self, g: Graph) -> None:
        for n in g.find_nodes("Reshape"):
            outs = n.outputs[0].consumers()
            if len(outs) != 1 or outs[0].op_type != "Transpose":
                continue
            t = outs[0]
            nxt = t.outputs[0].consumers()
            if len(nxt) != 1 or nxt[0].op_type != "Reshape":
                continue
            si, so = _shape(n.inputs[0]), _shape(n.outputs[0])
            if si is None or so is None or len(so) != len(si) + 1:
                continue
            perm = t.attr("perm")
            # (.., C, ..) -> (.., g, C/g, ..) at axis a, then swap a and a+1
            for a in range(len(si)):
                if si[:a] == so[:a] and si[a + 1:] == so[a + 2:] and perm is not None:
                    p = list(perm)
                    swapped = list(range(len(so)))
                    swapped[a], swapped[a + 1] = a + 1, a
                    if p == swapped:
                        self.shuffle_split.add(n)
                    break

    def visit(self, node: Node) -> None:
        ins = [self.info.get(v) if v is not None else None for v in node.inputs]
        op = node.op_type
        producer_op = node.domain in ("", "ai.onnx") and op in ("Conv", "ConvTranspose", "Gemm", "MatMul")
        if not any(ins) and not producer_op:
            return
        if node.domain not in ("", "ai.onnx"):
            if node.domain == "com.microsoft" and op == "MultiHeadAttention":
                self.ms_MultiHeadAttention(node, ins)
                return
            self.block_inputs(node, f"unsupported op {node.domain}::{op}")
            return
        handler = getattr(self, "op_" + op, None)
        if handler is None:
            if op in UNARY:
                handler = self.unary
            elif op in ELEMENTWISE:
                handler = self.elementwise
            elif op in POOLS:
                handler = self.pool
            elif op in REDUCES:
                handler = self.reduce
            else:
                self.block_inputs(node, f"unsupported op {op}")
                return
        handler(node, ins)

    # --- producers / consumers --------------------------------------------------------------------
    def op_Conv(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x, w = ins[0], node.inputs[1]
        warr = const_array(w)
        if warr is None or warr.ndim < 3:
            self.block_inputs(node, "Conv with a non-constant weight")
            return
        if any(ins[1:]):
            self.block_inputs(node, "Conv weight/bias carries channels")
            return
        if x is not None and x.axis != 1:
            self.block(x.ids, f"Conv input channels not on axis 1 ({_label(node)})")
            x = None
        g = int(node.attr("group", 1))
        m, cg = warr.shape[0], warr.shape[1]
        cin = cg * g
        if x is not None and len(x.ids) != cin:
            self.block(x.ids, f"Conv input has {len(x.ids)} channels, weight expects {cin} ({_label(node)})")
            x = None
        out = node.outputs[0]
        if g > 1 and cg == 1:  # depthwise (channel multiplier m/g): ids pass through
            mult = m // g
            if x is None:
                s = self.new_space(node, g, "untracked")
                self.block(s.ids, f"depthwise conv on an untracked input ({_label(node)})")
                xids = s.ids
            else:
                xids = x.ids
            out_ids = np.repeat(xids, mult)
            self.edits.append(Edit("slice", node, index=1, axis=0, ids=out_ids))
            self.slice_const(node, 2, 0, out_ids)
            self.edits.append(Edit("group", node, ids=xids))
            self.producers.append(Producer(node, 1, 0, out_ids, out))
            self.set(out, 1, out_ids)
            return
        if x is not None:
            if g == 1:
                self.edits.append(Edit("slice", node, index=1, axis=1, ids=x.ids))
                self.consumers.append(Consumer(node, "conv", node.inputs[0], 1, 1, x.ids))
            else:  # grouped: position j of every group goes together, groups stay equal
                pos = x.ids.reshape(g, cg)
                for k in range(1, g):
                    self.uf.union_arrays(pos[0], pos[k])
                self.edits.append(Edit("slice", node, index=1, axis=1, ids=pos[0]))
                self.consumers.append(Consumer(node, "conv", node.inputs[0], 1, 1, pos[0], grouped=True))
        s = self.new_space(node, m, "conv")
        ids = s.ids
        if g > 1:
            pos = ids.reshape(g, m // g)
            for k in range(1, g):
                self.uf.union_arrays(pos[0], pos[k])
        self.edits.append(Edit("slice", node, index=1, axis=0, ids=ids))
        if not self.slice_const(node, 2, 0, ids):
            self.block(ids, f"Conv bias is not a constant ({_label(node)})")
        self.producers.append(Producer(node, 1, 0, ids, out))
        self.set(out, 1, ids)

    def op_ConvTranspose(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x, w = ins[0], node.inputs[1]
        warr = const_array(w)
        g = int(node.attr("group", 1))
        if warr is None or warr.ndim < 3 or g != 1 or any(ins[1:]) or node.attr("output_shape") is not None and False:
            self.block_inputs(node, "ConvTranspose with a non-constant weight or groups")
            return
        if x is not None:
            if x.axis != 1 or len(x.ids) != warr.shape[0]:
                self.block(x.ids, f"ConvTranspose input channels do not match ({_label(node)})")
            else:
                self.edits.append(Edit("slice", node, index=1, axis=0, ids=x.ids))
                self.consumers.append(Consumer(node, "convT", node.inputs[0], 1, 0, x.ids))
        s = self.new_space(node, warr.shape[1], "conv")
        self.edits.append(Edit("slice", node, index=1, axis=1, ids=s.ids))
        if not self.slice_const(node, 2, 0, s.ids):
            self.block(s.ids, f"ConvTranspose bias is not a constant ({_label(node)})")
        self.producers.append(Producer(node, 1, 1, s.ids, node.outputs[0]))
        self.set(node.outputs[0], 1, s.ids)

    def op_Gemm(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        a = ins[0]
        warr = const_array(node.inputs[1])
        if warr is None or warr.ndim != 2 or int(node.attr("transA", 0)) or any(ins[1:]):
            self.block_inputs(node, "Gemm with a non-constant weight or transA")
            return
        tb = int(node.attr("transB", 0))
        k_axis, n_axis = (1, 0) if tb else (0, 1)
        if a is not None:
            if a.axis != 1 or len(a.ids) != warr.shape[k_axis]:
                self.block(a.ids, f"Gemm input features do not match the weight ({_label(node)})")
            else:
                self.edits.append(Edit("slice", node, index=1, axis=k_axis, ids=a.ids))
                self.consumers.append(Consumer(node, "gemm", node.inputs[0], 1, k_axis, a.ids))
        s = self.new_space(node, warr.shape[n_axis], "gemm")
        self.edits.append(Edit("slice", node, index=1, axis=n_axis, ids=s.ids))
        if len(node.inputs) > 2 and node.inputs[2] is not None and not self.slice_const(node, 2, -1, s.ids):
            self.block(s.ids, f"Gemm bias is not a constant ({_label(node)})")
        self.producers.append(Producer(node, 1, n_axis, s.ids, node.outputs[0]))
        self.set(node.outputs[0], 1, s.ids)

    def op_MatMul(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        a, b = ins
        A, B = node.inputs
        barr = const_array(B)
        out = node.outputs[0]
        ra, rb = _rank(A), _rank(B)
        if barr is not None and barr.ndim == 2 and ra is not None and ra >= 2:
            if a is not None and a.axis != ra - 1:
                # channels ride on a batch/row axis: they pass through, the columns stay
                self.set(out, a.axis, a.ids)
                return
            if a is not None:
                if len(a.ids) != barr.shape[0]:
                    self.block(a.ids, f"MatMul input features do not match the weight ({_label(node)})")
                else:
                    self.edits.append(Edit("slice", node, index=1, axis=0, ids=a.ids))
                    self.consumers.append(Consumer(node, "matmul", A, 1, 0, a.ids))
            s = self.new_space(node, barr.shape[1], "matmul")
            self.edits.append(Edit("slice", node, index=1, axis=1, ids=s.ids))
            self.producers.append(Producer(node, 1, 1, s.ids, out))
            self.set(out, ra - 1, s.ids)
            return
        if a is None and b is None:
            return
        if ra is None or rb is None or ra < 2 or rb < 2:
            self.block_inputs(node, "MatMul of unknown or 1-D rank")
            return
        r = max(ra, rb)
        sa, sb = _shape(A), _shape(B)
        placed: list[tuple[int, np.ndarray]] = []
        # contracted axes: A's last with B's second-to-last
        ka = a is not None and a.axis == ra - 1
        kb = b is not None and b.axis == rb - 2
        if ka or kb:
            if ka and kb and len(a.ids) == len(b.ids):  # type: ignore[union-attr]
                self.uf.union_arrays(a.ids, b.ids)  # type: ignore[union-attr]
            else:
                self.block_inputs(node, "MatMul contracts channels against an untracked operand")
                return
        for inf, rk, _shp, other_rank, other_shape, other in ((a, ra, sa, rb, sb, b), (b, rb, sb, ra, sa, a)):
            if inf is None or (inf is a and ka) or (inf is b and kb):
                continue
            if inf is a and inf.axis == ra - 2:
                placed.append((r - 2, inf.ids))
            elif inf is b and inf.axis == rb - 1:
                placed.append((r - 1, inf.ids))
            else:  # batch axis: the other operand must broadcast there or carry the same ids
                oax = inf.axis + (r - rk)
                local = oax - (r - other_rank)
                if other is None and other_shape is not None and 0 <= local < other_rank - 2 and other_shape[local] != 1:
                    self.block_inputs(node, "batched MatMul with an untracked operand along the channel axis")
                    return
                placed.append((oax, inf.ids))
        if not placed:
            return
        axes = {ax for ax, _ in placed}
        if len(axes) > 1:
            self.block_inputs(node, "two channel axes meet in a MatMul")
            return
        ax = placed[0][0]
        if len(placed) == 2:
            if len(placed[0][1]) != len(placed[1][1]):
                self.block_inputs(node, "MatMul operands disagree on the channel count")
                return
            self.uf.union_arrays(placed[0][1], placed[1][1])
        self.set(out, ax, placed[0][1])

    # --- channel-preserving ops -------------------------------------------------------------------
    def unary(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        if x is None or any(ins[1:]) and node.op_type not in ("PRelu",):
            self.block_inputs(node, f"{node.op_type} with channels on a parameter input")
            return
        if node.op_type == "PRelu":
            self.elementwise(node, ins)
            return
        self.set(node.outputs[0], x.axis, x.ids)
        if node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
            self.set(node.outputs[1], x.axis, x.ids)

    def elementwise(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        ranks = [_rank(v) for v in node.inputs]
        if any(r is None for r in ranks):
            self.block_inputs(node, f"{node.op_type} operand of unknown rank")
            return
        r = max(ranks)  # type: ignore[type-var]
        placed = [(inf.axis + (r - rk), inf) for inf, rk in zip(ins, ranks) if inf is not None]  # type: ignore[operator]
        ax = placed[0][0]
        if any(a != ax or len(i.ids) != len(placed[0][1].ids) for a, i in placed):
            self.block_inputs(node, f"{node.op_type} operands carry channels on different axes")
            return
        ids = placed[0][1].ids
        for _, inf in placed[1:]:
            self.uf.union_arrays(ids, inf.ids)
        for i, (v, inf, rk) in enumerate(zip(node.inputs, ins, ranks)):
            if inf is not None or v is None:
                continue
            local = ax - (r - rk)
            if local < 0:
                continue
            d = _shape(v)[local]
            if d == 1:
                continue
            if not self.slice_const(node, i, local, ids):
                self.block(ids, f"{node.op_type} with untracked operand {v.name!r} along the channel axis ({_label(node)})")
        self.set(node.outputs[0], ax, ids)

    def pool(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        if x.axis >= 2:  # type: ignore[union-attr]
            self.block_inputs(node, f"{node.op_type} over the channel axis")
            return
        for o in node.outputs:
            if o.uses() or o.is_graph_output():
                self.set(o, x.axis, x.ids)  # type: ignore[union-attr]

    op_LRN = None  # cross-channel: falls through to "unsupported"

    def op_BatchNormalization(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        if x is None or x.axis != 1 or any(ins[1:]) or len([o for o in node.outputs if o.uses()]) > 1:
            self.block_inputs(node, "BatchNormalization in training mode or channels not on axis 1")
            return
        for i in range(1, 5):
            if not self.slice_const(node, i, 0, x.ids):
                self.block(x.ids, f"BatchNormalization parameter {i} is not a constant ({_label(node)})")
        self.bns.append((node, x.ids))
        self.set(node.outputs[0], 1, x.ids)

    def op_InstanceNormalization(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        if x is None or x.axis != 1 or any(ins[1:]):
            self.block_inputs(node, "InstanceNormalization with channels not on axis 1")
            return
        for i in (1, 2):
            if not self.slice_const(node, i, 0, x.ids):
                self.block(x.ids, f"InstanceNormalization parameter is not a constant ({_label(node)})")
        self.set(node.outputs[0], 1, x.ids)

    def _norm_over(self, node: Node, ins: list[ChannelInfo | None], first_axis: int, what: str) -> None:
        x = ins[0]
        r = _rank(node.inputs[0])
        if x is None or r is None or any(ins[1:]):
            self.block_inputs(node, f"{what} with channels on a parameter")
            return
        a = first_axis + r if first_axis < 0 else first_axis
        if x.axis >= a:
            self.block(x.ids, f"{what} normalizes over the channel axis: every channel changes every other ({_label(node)})")
            # the output keeps the (blocked) ids, so residual Adds downstream report this reason
        self.set(node.outputs[0], x.axis, x.ids)

    def op_LayerNormalization(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        self._norm_over(node, ins, int(node.attr("axis", -1)), "LayerNormalization")

    def op_RMSNormalization(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        self._norm_over(node, ins, int(node.attr("axis", -1)), "RMSNormalization")

    def op_GroupNormalization(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        self.block_inputs(node, "GroupNormalization normalizes over the channels of each group: removing one changes the others")

    def _axis_op(self, node: Node, ins: list[ChannelInfo | None], axis: int, what: str) -> None:
        x = ins[0]
        r = _rank(node.inputs[0])
        if r is None:
            self.block_inputs(node, f"{what} of unknown rank")
            return
        if axis < 0:
            axis += r
        if x.axis == axis:  # type: ignore[union-attr]
            self.block(x.ids, f"{what} along the channel axis ({_label(node)})")  # type: ignore[union-attr]
            return
        self.set(node.outputs[0], x.axis, x.ids)  # type: ignore[union-attr]

    def op_Softmax(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        self._softmax(node, ins)

    def op_LogSoftmax(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        self._softmax(node, ins)

    def op_Hardmax(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        self._softmax(node, ins)

    def _softmax(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        opset = opset_version(self.model, node.graph, default=13)
        axis = int(node.attr("axis", -1 if opset >= 13 else 1))
        x, r = ins[0], _rank(node.inputs[0])
        if r is not None and opset < 13 and x is not None and x.axis >= (axis + r if axis < 0 else axis):
            self.block(x.ids, f"{node.op_type} (opset < 13) flattens the channel axis ({_label(node)})")
            return
        self._axis_op(node, ins, axis, node.op_type)

    def op_CumSum(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        ax = _ints(node.inputs[1])
        if ax is None or ins[1] is not None:
            self.block_inputs(node, "CumSum with a non-constant axis")
            return
        self._axis_op(node, ins, ax[0], "CumSum")

    def op_ArgMax(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        self._reduce_axes(node, ins, [int(node.attr("axis", 0))], bool(node.attr("keepdims", 1)), "ArgMax")

    def op_ArgMin(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        self._reduce_axes(node, ins, [int(node.attr("axis", 0))], bool(node.attr("keepdims", 1)), "ArgMin")

    def reduce(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        axes = node.attr("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = _ints(node.inputs[1])
            if axes is None:
                self.block_inputs(node, f"{node.op_type} with non-constant axes")
                return
        r = _rank(node.inputs[0])
        if r is None:
            self.block_inputs(node, f"{node.op_type} of unknown rank")
            return
        if not axes:
            if int(node.attr("noop_with_empty_axes", 0)):
                self.set(node.outputs[0], ins[0].axis, ins[0].ids)  # type: ignore[union-attr]
                return
            axes = list(range(r))
        self._reduce_axes(node, ins, list(axes), bool(node.attr("keepdims", 1)), node.op_type)

    def _reduce_axes(self, node: Node, ins: list[ChannelInfo | None], axes: list[int], keep: bool, what: str) -> None:
        x = ins[0]
        r = _rank(node.inputs[0])
        if r is None or x is None:
            self.block_inputs(node, f"{what} of unknown rank")
            return
        axes = [a + r if a < 0 else a for a in axes]
        if x.axis in axes:
            self.block(x.ids, f"{what} over the channel axis ({_label(node)})")
            return
        ax = x.axis if keep else x.axis - sum(1 for a in axes if a < x.axis)
        self.set(node.outputs[0], ax, x.ids)

    # --- layout ops ---------------------------------------------------------------------------------
    def op_Transpose(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        r = _rank(node.inputs[0])
        perm = node.attr("perm")
        if perm is None:
            if r is None:
                self.block_inputs(node, "Transpose of unknown rank")
                return
            perm = list(reversed(range(r)))
        self.set(node.outputs[0], list(perm).index(x.axis), x.ids)  # type: ignore[union-attr]

    def op_Unsqueeze(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        axes = node.attr("axes")
        if axes is None:
            axes = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
        r = _rank(node.inputs[0])
        if x is None or axes is None or r is None:
            self.block_inputs(node, "Unsqueeze with unknown axes")
            return
        ro = r + len(axes)
        axes = sorted(a + ro if a < 0 else a for a in axes)
        kept = [i for i in range(ro) if i not in axes]
        self.set(node.outputs[0], kept[x.axis], x.ids)

    def op_Squeeze(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        axes = node.attr("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = _ints(node.inputs[1])
        shp = _shape(node.inputs[0])
        if x is None or shp is None:
            self.block_inputs(node, "Squeeze of unknown shape")
            return
        r = len(shp)
        if axes is None:
            if any(not isinstance(d, int) for d in shp):
                self.block_inputs(node, "Squeeze without axes on a dynamic shape")
                return
            axes = [i for i, d in enumerate(shp) if d == 1]
        axes = [a + r if a < 0 else a for a in axes]
        if x.axis in axes:
            self.block(x.ids, f"Squeeze removes the channel axis ({_label(node)})")
            return
        self.set(node.outputs[0], x.axis - sum(1 for a in axes if a < x.axis), x.ids)

    def op_Flatten(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        shp = _shape(node.inputs[0])
        if x is None or shp is None:
            self.block_inputs(node, "Flatten of unknown shape")
            return
        r = len(shp)
        a = int(node.attr("axis", 1))
        a = a + r if a < 0 else a
        lo, hi = (0, a) if x.axis < a else (a, r)
        ids = self._merge(shp[lo:hi], x.axis - lo, x.ids)
        if ids is None:
            self.block(x.ids, f"Flatten merges the channel axis with dynamic dims ({_label(node)})")
            return
        self.set(node.outputs[0], 0 if x.axis < a else 1, ids)

    @staticmethod
    def _merge(dims: Sequence[Any], c: int, ids: np.ndarray) -> np.ndarray | None:
        outer_d, inner_d = dims[:c], dims[c + 1:]
        if any(not isinstance(d, int) for d in list(outer_d) + list(inner_d)):
            return None
        outer = int(np.prod(outer_d)) if outer_d else 1
        inner = int(np.prod(inner_d)) if inner_d else 1
        return np.tile(np.repeat(ids, inner), outer)

    def op_Reshape(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        si, so = _shape(node.inputs[0]), _shape(node.outputs[0])
        if x is None or ins[1] is not None:
            self.block_inputs(node, "Reshape target carries channels")
            return
        if si is None or so is None:
            self.block(x.ids, f"Reshape of unknown shape ({_label(node)})")
            return
        rin, rout = len(si), len(so)
        p = 0
        while p < x.axis and p < rout and si[p] == so[p] and si[p] is not None:
            p += 1
        s = 0
        while s < rin - x.axis - 1 and s < rout - p and si[rin - 1 - s] == so[rout - 1 - s] and si[rin - 1 - s] is not None:
            s += 1
        mid_in, mid_out = list(si[p:rin - s]), list(so[p:rout - s])
        unknown = [j for j, d in enumerate(mid_out) if not isinstance(d, int)]
        if len(unknown) == 1 and all(isinstance(d, int) for d in mid_in):
            # one symbolic dim (a computed target): the element count fixes it
            known = int(np.prod([d for d in mid_out if isinstance(d, int)]))
            if known and int(np.prod(mid_in)) % known == 0:
                mid_out[unknown[0]] = int(np.prod(mid_in)) // known
        if not mid_out or any(not isinstance(d, int) for d in mid_in + mid_out):
            self.block(x.ids, f"Reshape moves the channel axis among dynamic dims ({_label(node)})")
            return
        full = self._merge(mid_in, x.axis - p, x.ids)
        assert full is not None
        if len(full) != int(np.prod(mid_out)):
            self.block(x.ids, f"Reshape sizes disagree ({_label(node)})")
            return
        grid = full.reshape(mid_out)
        k = len(mid_out)
        if k == 1:
            t = 0
        elif node in self.shuffle_split and k == 2:
            t = 1
        else:
            # a dim that holds exactly the channels, in order: a plain relabel
            t = -1
            for j, d in enumerate(mid_out):
                if d == len(x.ids) and int(np.prod(mid_out[:j])) == int(np.prod(mid_in[: x.axis - p])):
                    t = j
                    break
            if t < 0:
                t = k - 2  # split: heads in (.., heads, head_dim), (3, heads, head_dim)
        moved = np.moveaxis(grid, t, 0).reshape(grid.shape[t], -1)
        for j in range(moved.shape[1]):
            if j:
                self.uf.union_arrays(moved[:, 0], moved[:, j])
        ids = moved[:, 0].copy()
        self.set(node.outputs[0], p + t, ids)
        self.edits.append(Edit("reshape", node, index=1, axis=p + t, ids=ids, extra=(x.axis, list(si))))

    def op_Concat(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        r = _rank(node.outputs[0]) or max((_rank(v) or 0) for v in node.inputs)
        axis = int(node.attr("axis", 0))
        axis = axis + r if axis < 0 else axis
        tracked = [i for i in ins if i is not None]
        if all(i.axis == axis for i in tracked):
            parts = []
            for v, inf in zip(node.inputs, ins):
                if inf is not None:
                    parts.append(inf.ids)
                    continue
                shp = _shape(v)
                d = shp[axis] if shp is not None and len(shp) > axis else None
                if not isinstance(d, int):
                    self.block_inputs(node, "Concat of a channel tensor with an input of unknown size")
                    return
                sp = self.new_space(node, d, "untracked")
                self.block(sp.ids, f"Concat input {v.name!r} has untracked channels ({_label(node)})")
                parts.append(sp.ids)
            self.set(node.outputs[0], axis, np.concatenate(parts))
            return
        ax = tracked[0].axis
        if any(i.axis != ax or len(i.ids) != len(tracked[0].ids) for i in tracked):
            self.block_inputs(node, "Concat inputs carry channels on different axes")
            return
        ids = tracked[0].ids
        for i in tracked[1:]:
            self.uf.union_arrays(ids, i.ids)
        for k, (v, inf) in enumerate(zip(node.inputs, ins)):
            if inf is None and not self.slice_const(node, k, ax, ids):
                self.block(ids, f"Concat with untracked operand {v.name!r} along the channel axis ({_label(node)})")  # type: ignore[union-attr]
        self.set(node.outputs[0], ax, ids)

    def op_Split(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        r = _rank(node.inputs[0])
        if x is None or r is None or any(ins[1:]):
            self.block_inputs(node, "Split of unknown rank")
            return
        axis = int(node.attr("axis", 0))
        axis = axis + r if axis < 0 else axis
        if axis != x.axis:
            for o in node.outputs:
                self.set(o, x.axis, x.ids)
            return
        sizes = node.attr("split")
        from_input = False
        if sizes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            sizes = _ints(node.inputs[1])
            from_input = True
            if sizes is None:
                self.block(x.ids, f"Split sizes are not constant ({_label(node)})")
                return
        n = len(node.outputs)
        if sizes is None:  # equal parts: position j of every part goes together
            if len(x.ids) % n:
                self.block(x.ids, f"Split into unequal parts without sizes ({_label(node)})")
                return
            pos = x.ids.reshape(n, -1)
            for k in range(1, n):
                self.uf.union_arrays(pos[0], pos[k])
            for k, o in enumerate(node.outputs):
                self.set(o, axis, pos[k])
            return
        segs, start = [], 0
        for k, o in enumerate(node.outputs):
            seg = x.ids[start:start + int(sizes[k])]
            start += int(sizes[k])
            segs.append(seg)
            self.set(o, axis, seg)
        self.edits.append(Edit("split", node, index=1 if from_input else -1, ids=x.ids, extra=segs))

    def op_Slice(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        r = _rank(node.inputs[0])
        if x is None or r is None or any(ins[1:]):
            self.block_inputs(node, "Slice with channels in its parameters")
            return
        if len(node.inputs) < 3:  # opset < 10: attributes
            starts, ends, axes, steps = node.attr("starts"), node.attr("ends"), node.attr("axes"), None
        else:
            # computed bounds (torch's chunk: Shape → Gather → Div) are fine when the shapes they
            # read are static: surgery writes the new bounds as constants
            def val(k: int) -> list[int] | None:
                if len(node.inputs) <= k or node.inputs[k] is None:
                    return None
                a = static_value(node.inputs[k])
                return None if a is None else [int(t) for t in np.asarray(a).reshape(-1)]

            starts, ends, axes, steps = val(1), val(2), val(3), val(4)
        has_axes = len(node.inputs) > 3 and node.inputs[3] is not None
        if has_axes and axes is None:
            self.block(x.ids, f"Slice with non-constant axes ({_label(node)})")
            return
        if axes is not None and x.axis not in [a + r if a < 0 else a for a in axes]:
            self.set(node.outputs[0], x.axis, x.ids)
            return
        if starts is None or ends is None:
            self.block(x.ids, f"Slice with non-constant parameters ({_label(node)})")
            return
        axes = list(axes) if axes is not None else list(range(len(starts)))
        axes = [a + r if a < 0 else a for a in axes]
        if x.axis not in axes:
            self.set(node.outputs[0], x.axis, x.ids)
            return
        j = axes.index(x.axis)
        step = steps[j] if steps else 1
        if step != 1 or len(node.inputs) < 3:
            self.block(x.ids, f"Slice of the channel axis with a step or in opset < 10 ({_label(node)})")
            return
        c = len(x.ids)
        st, en = slice(int(starts[j]), int(ends[j])).indices(c)[:2]
        en = max(en, st)
        self.set(node.outputs[0], x.axis, x.ids[st:en])
        self.edits.append(Edit("slice-range", node, index=j, ids=x.ids, extra=(st, en, starts, ends)))

    def op_Gather(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        r = _rank(node.inputs[0])
        idx = const_array(node.inputs[1])
        if x is None or r is None or ins[1] is not None:
            self.block_inputs(node, "Gather of unknown rank")
            return
        axis = int(node.attr("axis", 0))
        axis = axis + r if axis < 0 else axis
        q = _rank(node.inputs[1])
        if q is None:
            self.block(x.ids, f"Gather with indices of unknown rank ({_label(node)})")
            return
        if axis != x.axis:
            ax = x.axis if x.axis < axis else x.axis - 1 + q
            self.set(node.outputs[0], ax, x.ids)
            return
        if idx is None or idx.ndim != 1:
            self.block(x.ids, f"Gather picks channels with non-constant or scalar indices ({_label(node)})")
            return
        c = len(x.ids)
        idx = np.where(idx < 0, idx + c, idx).astype(np.int64)
        self.set(node.outputs[0], axis, x.ids[idx])
        self.edits.append(Edit("gather", node, ids=x.ids, extra=idx))

    def op_Expand(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        r = _rank(node.inputs[0])
        target = _ints(node.inputs[1])
        if x is None or r is None or target is None or ins[1] is not None:
            self.block_inputs(node, "Expand with a non-constant shape")
            return
        ro = max(r, len(target))
        ax = x.axis + (ro - r)
        local = ax - (ro - len(target))
        if local >= 0 and target[local] not in (1, len(x.ids)):
            self.block(x.ids, f"Expand to another channel count ({_label(node)})")
            return
        if local >= 0 and target[local] == len(x.ids) and len(x.ids) != 1:
            self.edits.append(Edit("reshape", node, index=1, axis=local, ids=x.ids, extra=None))
        self.set(node.outputs[0], ax, x.ids)

    def op_Tile(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        reps = _ints(node.inputs[1])
        if x is None or reps is None or reps[x.axis] != 1:
            self.block_inputs(node, "Tile along the channel axis")
            return
        self.set(node.outputs[0], x.axis, x.ids)

    def op_Pad(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        r = _rank(node.inputs[0])
        pads = node.attr("pads")
        if pads is None and len(node.inputs) > 1:
            pads = _ints(node.inputs[1])
        axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if x is None or r is None or pads is None or any(ins[1:]):
            self.block_inputs(node, "Pad with non-constant pads")
            return
        axes = list(range(r)) if axes is None else [a + r if a < 0 else a for a in axes]
        n = len(axes)
        if x.axis in axes:
            j = axes.index(x.axis)
            if pads[j] or pads[j + n]:
                self.block(x.ids, f"Pad along the channel axis ({_label(node)})")
                return
        self.set(node.outputs[0], x.axis, x.ids)

    def op_Resize(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        x = ins[0]
        if x is None or any(ins[1:]):
            self.block_inputs(node, "Resize with channels in its parameters")
            return
        scales = _ints(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        sarr = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        sizes = node.inputs[3] if len(node.inputs) > 3 else None
        if sizes is not None:
            sz = _ints(sizes)
            if sz is None or node.attr("axes") is not None:
                self.block(x.ids, f"Resize with non-constant sizes ({_label(node)})")
                return
            self.edits.append(Edit("reshape", node, index=3, axis=x.axis, ids=x.ids, extra=None))
        elif sarr is not None and sarr.size and (node.attr("axes") is not None or float(sarr.reshape(-1)[x.axis]) != 1.0):
            self.block(x.ids, f"Resize scales the channel axis ({_label(node)})")
            return
        elif sarr is None and scales is None and len(node.inputs) > 2 and node.inputs[2] is not None:
            self.block(x.ids, f"Resize with non-constant scales ({_label(node)})")
            return
        self.set(node.outputs[0], x.axis, x.ids)

    def op_Upsample(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        self.block_inputs(node, "unsupported op Upsample")

    def op_Shape(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        pass  # reads only the shape; its consumers see the new sizes

    def op_Size(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        pass

    def op_Attention(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        q, k, v = (ins + [None, None, None])[:3]
        ranks = [_rank(x) for x in node.inputs[:3]]
        tracked = [i for i in (q, k, v) if i is not None]
        if ranks != [4, 4, 4] or any(i.axis != 1 for i in tracked) or len(tracked) != 3 or any(ins[3:]):
            self.block_inputs(node, "Attention without 4-D (batch, heads, seq, dim) inputs carrying heads")
            return
        self.uf.union_arrays(q.ids, k.ids)  # type: ignore[union-attr]
        self.uf.union_arrays(q.ids, v.ids)  # type: ignore[union-attr]
        self.set(node.outputs[0], 1, q.ids)  # type: ignore[union-attr]

    def ms_MultiHeadAttention(self, node: Node, ins: list[ChannelInfo | None]) -> None:
        """onnxruntime's com.microsoft MultiHeadAttention (what fuse-attention{contrib-ops=1}
        makes): Q [B, S, H·d], K/V [B, S, H·d] or BNSH [B, H, S, d]; whole heads go and
        `num_heads` shrinks. Packed QKV (no K/V), past/present state, a bias over K/V in BNSH,
        or a per-head attention_bias that is not a constant are left alone."""
        n_in = len(node.inputs)
        heads = int(node.attr("num_heads", 0) or 0)
        q, k, v = (ins + [None, None, None])[:3]
        ranks = [_rank(x) for x in node.inputs[:3]]
        def extra(i: int) -> Value | None:
            return node.inputs[i] if i < n_in else None
        if (heads < 1 or q is None or k is None or v is None or ranks[0] != 3 or q.axis != 2
                or any(extra(i) is not None for i in range(6, n_in))
                or any(o.uses() for o in node.outputs[1:]) or any(ins[3:])):
            self.block_inputs(node, "MultiHeadAttention without separate 3-D Q and K/V carrying heads, or with past state")
            return

        def per_head(inf: ChannelInfo, rank: int | None) -> np.ndarray | None:
            if rank == 3 and inf.axis == 2 and len(inf.ids) % heads == 0:
                blocks = inf.ids.reshape(heads, -1)
                for j in range(1, blocks.shape[1]):
                    self.uf.union_arrays(blocks[:, 0], blocks[:, j])
                return blocks[:, 0]
            if rank == 4 and inf.axis == 1 and len(inf.ids) == heads:
                return inf.ids
            return None

        hq, hk, hv = per_head(q, ranks[0]), per_head(k, ranks[1]), per_head(v, ranks[2])
        if hq is None or hk is None or hv is None:
            self.block_inputs(node, f"MultiHeadAttention inputs do not split into num_heads={heads} heads ({_label(node)})")
            return
        self.uf.union_arrays(hq, hk)
        self.uf.union_arrays(hq, hv)
        bias = extra(3)
        if bias is not None and (ranks[1] != 3 or ranks[2] != 3
                                 or not self.slice_const(node, 3, 0, np.concatenate([q.ids, k.ids, v.ids]))):
            self.block(hq, f"MultiHeadAttention bias is not a constant over 3-D Q/K/V ({_label(node)})")
        mask = _shape(extra(5))
        if mask is not None and len(mask) == 4 and mask[1] != 1 and not self.slice_const(node, 5, 1, hq):
            self.block(hq, f"MultiHeadAttention per-head attention_bias is not a constant ({_label(node)})")
        self.edits.append(Edit("group", node, ids=hq, extra="num_heads"))
        dv = None
        if ranks[2] == 4:
            sv = _shape(node.inputs[2])
            dv = sv[3] if sv is not None and isinstance(sv[3], int) else None
            if dv is None:
                self.block(hq, f"MultiHeadAttention value head size unknown ({_label(node)})")
                return
        self.set(node.outputs[0], 2, v.ids if dv is None else np.repeat(hv, dv))


def analyze(model: Model) -> Analysis:
    """Run the channel-dependency analysis on `model`'s main graph (shapes must be inferred)."""
    with constant_semantics(model):
        a = _Analyzer(model)
        a.run()
    an = Analysis(model, a.uf, a.info, a.spaces, a.edits, a.consumers, a.producers, a.bns, a.blocks)
    root = a.uf.roots()
    an.root = root
    blocked: dict[int, str] = {}
    for ids, reason in a.blocks:
        for r in np.unique(root[ids]).tolist():
            blocked.setdefault(r, reason)
    # groups: spaces connected through shared classes
    sp_uf = UnionFind()
    sp_uf.add(len(a.spaces))
    first_space_of_root: dict[int, int] = {}
    for s in a.spaces:
        for r in np.unique(root[s.ids]).tolist():
            other = first_space_of_root.setdefault(r, s.index)
            if other != s.index:
                sp_uf.union(other, s.index)
    members: dict[int, list[Space]] = defaultdict(list)
    for s in a.spaces:
        members[sp_uf.find(s.index)].append(s)
    for k, (_, spaces) in enumerate(sorted(members.items())):
        real = [s for s in spaces if s.kind != "untracked"] or spaces
        allids = np.concatenate([s.ids for s in spaces])
        classes = np.unique(root[allids])
        main = max(real, key=lambda s: s.size)
        per_class = np.bincount(np.searchsorted(classes, root[main.ids]), minlength=len(classes))
        nz = per_class[per_class > 0]
        unit = int(np.gcd.reduce(nz)) if len(nz) else 1
        gb = {int(c): blocked[int(c)] for c in classes.tolist() if int(c) in blocked}
        an.groups.append(Group(k, real, classes, gb, unit))
    return an

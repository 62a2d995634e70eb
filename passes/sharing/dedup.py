"""`share-weights`: store identical constant tensors once, across the whole model."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from graphopt.errors import UsageError
from graphopt.ir import Attr, AttrType, DataType, Function, Graph, Model, Node, NumpyTensor, Shape, Tensor, TensorType, Value, unique_name
from graphopt.transform import Pass, PassContext, PassResult, register_pass

from graphopt.ir import STANDARD_DOMAINS, const_array, constant_semantics, in_function, is_constant


@dataclass
class _Member:
    value: Value
    graph: Graph
    node: Node | None  # the Constant node, or None for an initializer
    array: np.ndarray
    dtype: DataType
    nbytes: int
    tensor: Tensor | None  # the initializer's tensor (kept as is when it becomes the shared copy)


def _raw(a: np.ndarray) -> np.ndarray:
    """The bytes of an array, as uint8 (so -0.0 != 0.0 and NaN payloads count)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _same_bytes(a: _Member, b: _Member) -> bool:
    if a.array.dtype == object or b.array.dtype == object:
        return a.array.shape == b.array.shape and [bytes(str(x), "utf8") if not isinstance(x, bytes) else x for x in a.array.ravel()] == [
            bytes(str(x), "utf8") if not isinstance(x, bytes) else x for x in b.array.ravel()
        ]
    return np.array_equal(_raw(a.array), _raw(b.array))


def _digest(m: _Member) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if m.array.dtype == object:
        for x in m.array.ravel():
            s = x if isinstance(x, bytes) else str(x).encode()
            h.update(len(s).to_bytes(8, "little") + s)
    else:
        h.update(memoryview(_raw(m.array)))
    return h.digest()


def _ancestors(g: Graph) -> list[Graph]:
    """g's enclosing graphs, outermost first, ending with g."""
    chain = [g]
    while isinstance(g.parent, Node) and g.parent.graph is not None:
        g = g.parent.graph
        chain.append(g)
    return chain[::-1]


def _scope(g: Graph) -> Graph:
    return _ancestors(g)[0]


def _near(a: np.ndarray, b: np.ndarray, tol: float) -> float | None:
    """max |a - b| when within tol and the non-finite entries agree bit for bit, else None."""
    fa, fb = np.isfinite(a), np.isfinite(b)
    if not np.array_equal(fa, fb):
        return None
    if not fa.all() and not np.array_equal(_raw(a[~fa]), _raw(b[~fb])):
        return None
    d = float(np.abs(a[fa].astype(np.float64) - b[fb].astype(np.float64)).max()) if fa.any() else 0.0
    return d if d <= tol else None


@register_pass
@dataclass(frozen=True)
class ShareWeights(Pass):
    """Store identical constant tensors once: every reader reads one shared value.

    Before → after: initializers / Constant nodes A and B with the same dtype, shape and bytes
    (found by hashing, confirmed byte by byte, in the main graph, its If/Loop/Scan bodies and
    function bodies) → one value read by all readers of A and B; B is dropped. The shared copy is
    a member defined in the innermost graph that encloses all of them (a Constant node there is
    moved to the head of its graph) or, when none is, a new initializer of that graph (a
    Constant node in a function body), so subgraphs read it as an outer-scope value. Values
    already shared (tied weights) stay shared.

    `tolerance=T` (opt-in) also merges float tensors of the same dtype and shape whose values
    differ by at most T (absolute), with NaN/Inf in the same places and bit-identical there; the
    first one in model order is kept.

    Does not fire on: tensors differing in any bit (-0.0 vs 0.0, NaN payloads), dtype or shape;
    initializers that a caller may override (graph inputs from IR 4 on); graph outputs (their
    names are the interface); tensors named in quantization annotations; sparse tensors;
    Constant nodes whose value refers to a function attribute; across function boundaries (a
    function body cannot see the main graph).
    """

    name: ClassVar[str] = "share-weights"
    idle_reason: ClassVar[str] = "no two initializers hold the same values"
    tolerance: float = 0.0
    min_size: int = 1  # elements; smaller constants are left alone

    def __post_init__(self) -> None:
        if not self.tolerance >= 0.0:
            raise UsageError(f"share-weights: tolerance={self.tolerance} must be >= 0")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        with constant_semantics(model):
            return self._run(model, ctx)

    def _members(self, model: Model) -> list[_Member]:
        annotated = {name for g in model.graphs() for name, _ in g.quantization_annotation}
        out: list[_Member] = []
        for g in model.graphs():
            fn = in_function(g)
            if not fn:
                for v in list(g.initializers.values()):
                    t = v.const_value
                    if not isinstance(t, Tensor) or not is_constant(v) or v.is_graph_output() or v.name in annotated:
                        continue
                    if t.size < self.min_size:
                        continue
                    out.append(_Member(v, g, None, t.numpy(), t.dtype, t.nbytes, t))
            for node in g:
                if node.op_type != "Constant" or node.domain not in STANDARD_DOMAINS:
                    continue
                v = node.outputs[0]
                if v.is_graph_output() or v.name in annotated or not is_constant(v):
                    continue
                arr = const_array(v)
                if arr is None or arr.size < self.min_size:
                    continue
                attr = node.attributes.get("value")
                if attr is not None and isinstance(attr.value, Tensor):
                    dt, nb = attr.value.dtype, attr.value.nbytes
                else:
                    dt = DataType.STRING if arr.dtype == object else DataType.from_numpy(arr.dtype)
                    nb = arr.nbytes
                out.append(_Member(v, g, node, np.asarray(arr), dt, nb, None))
        return out

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        buckets: dict[tuple, list[_Member]] = defaultdict(list)
        for m in self._members(model):
            buckets[(id(_scope(m.graph)), int(m.dtype), tuple(m.array.shape))].append(m)
        groups: list[list[_Member]] = []
        near_merged, near_max = 0, 0.0
        for members in buckets.values():
            if len(members) < 2:
                continue
            by_hash: dict[bytes, list[list[_Member]]] = defaultdict(list)
            for m in members:  # hash, then confirm byte by byte (a collision is not a match)
                lists = by_hash[_digest(m)]
                for grp in lists:
                    if _same_bytes(grp[0], m):
                        grp.append(m)
                        break
                else:
                    lists.append([m])
            exact = [grp for lists in by_hash.values() for grp in lists]
            if self.tolerance > 0 and members[0].dtype.is_floating:
                merged: list[list[_Member]] = []
                stats_of: list[tuple[float, np.ndarray]] = []
                for grp in exact:
                    a = grp[0].array
                    fin = np.isfinite(a)
                    mean = float(a[fin].astype(np.float64).mean()) if fin.any() else 0.0
                    for i, (mu, ref) in enumerate(stats_of):
                        if abs(mu - mean) > self.tolerance:  # |mean(a-b)| <= max|a-b|: cheap reject
                            continue
                        d = _near(ref, a, self.tolerance)
                        if d is not None:
                            merged[i].extend(grp)
                            near_merged += len(grp)
                            near_max = max(near_max, d)
                            break
                    else:
                        merged.append(list(grp))
                        stats_of.append((mean, a))
                exact = merged
            groups.extend(grp for grp in exact if len(grp) > 1)
        merged_count, saved = 0, 0
        order = {id(g): i for i, g in enumerate(model.graphs())}
        for grp in sorted(groups, key=lambda gr: (order[id(gr[0].graph)], gr[0].value.name)):
            keep, removed = self._merge(grp)
            merged_count += len(grp) - 1  # copies gone (a group moved to a new home loses all, gains one)
            saved += sum(m.nbytes for m in removed) - (keep.nbytes if keep.value not in {m.value for m in grp} else 0)
        stats: dict[str, int | float] = {"tensors-merged": merged_count, "bytes-saved": saved, "groups": len(groups)}
        if self.tolerance > 0:
            stats["near-duplicates-merged"] = near_merged
            stats["max-near-diff"] = near_max
        if merged_count:
            ctx.info(f"share-weights: {merged_count} tensors merged into {len(groups)}, {saved} bytes saved")
        return PassResult(merged_count > 0, stats)

    def _merge(self, grp: list[_Member]) -> tuple[_Member, list[_Member]]:
        """Rewire every member's readers to one shared value; returns (kept, removed)."""
        chains = [_ancestors(m.graph) for m in grp]
        common = chains[0]
        for ch in chains[1:]:
            i = 0
            while i < min(len(common), len(ch)) and common[i] is ch[i]:
                i += 1
            common = common[:i]
        home = common[-1]  # innermost graph enclosing every member (and so every reader)
        local = [m for m in grp if m.graph is home]
        inits = [m for m in local if m.node is None]
        if inits:
            keep = inits[0]
        elif local:
            keep = local[0]
            head = next(iter(home))
            if keep.node is not head:  # a Constant read by an earlier node: move it up front
                home.remove(keep.node, safe=False)
                home.insert_before(head, keep.node)
        else:
            keep = self._new_home(home, grp[0])
        removed = []
        for m in grp:
            if m is keep:
                continue
            m.value.replace_all_uses_with(keep.value)
            if m.node is not None:
                m.graph.remove(m.node)
            else:
                m.graph.remove_initializer(m.value.name)
                if m.value.is_graph_input():  # IR < 4: initializers are listed as inputs too
                    m.graph.set_inputs([v for v in m.graph.inputs if v is not m.value])
            removed.append(m)
        return keep, removed

    def _new_home(self, home: Graph, like: _Member) -> _Member:
        """A new copy of `like`'s tensor defined in `home`, where every member is visible."""
        tensor = like.tensor if like.tensor is not None else NumpyTensor(like.array, dtype=like.dtype)
        vtype = TensorType(like.dtype, Shape(tuple(like.array.shape)))
        name = unique_name(home, like.value.name or "shared")
        if in_function(home) or isinstance(home.parent, Function):
            v = Value(name, vtype)
            node = Node("", "Constant", [], [Attr("value", AttrType.TENSOR, tensor)], outputs=[v])
            head = next(iter(home), None)
            if head is None:
                home.append(node)
            else:
                home.insert_before(head, node)
            return _Member(v, home, node, like.array, like.dtype, like.nbytes, None)
        if like.tensor is not None:
            like.graph.remove_initializer(like.value.name)  # its tensor moves to the new value
            if like.value.is_graph_input():
                like.graph.set_inputs([x for x in like.graph.inputs if x is not like.value])
            like.value.replace_all_uses_with(v := Value(name, vtype, const_value=tensor))
            tensor.name = name
            home.register_initializer(v)
            like.value = v  # the member now is the shared copy; it is not removed again
            like.graph = home
            return like
        tensor.name = name
        v = Value(name, vtype, const_value=tensor)
        home.register_initializer(v)
        return _Member(v, home, None, like.array, like.dtype, like.nbytes, tensor)

"""Apply a pruning decision: slice constants, fix attributes and shape constants, update types.

Constants are never changed in place (another node may share them): each sliced tensor is a new
initializer, cached per (source, axis, kept positions) so that shared weights stay shared. The
old initializers nothing reads any more are dropped.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import Attr, AttrType, Builder, DataType, Node, Shape, TensorType, Value, constant_semantics
from graphopt.pattern import const_array, drop_unused_initializers

from graphopt.passes.pruning.dependency import Analysis, Edit


class _Surgeon:
    def __init__(self, an: Analysis, pruned: np.ndarray) -> None:
        self.an = an
        self.pruned = pruned
        self.model = an.model
        self.graph = an.model.graph
        self.b = Builder(self.graph)
        self.cache: dict[tuple[int, int, bytes], Value] = {}
        self.replaced: list[Value] = []

    def keep(self, ids: np.ndarray) -> np.ndarray:
        return self.an.keep_mask(ids, self.pruned)

    def new_const(self, arr: np.ndarray, like: Value) -> Value:
        base = (like.name or "pruned") + "_pruned"
        return self.b.initializer(np.ascontiguousarray(arr), base)

    def set_input(self, node: Node, index: int, value: Value) -> None:
        old = node.inputs[index]
        if old is not None:
            self.replaced.append(old)
        node.replace_input_with(index, value)

    def apply(self, e: Edit) -> None:
        getattr(self, "e_" + e.kind.replace("-", "_"))(e)

    def e_slice(self, e: Edit) -> None:
        v = e.node.inputs[e.index]
        assert v is not None and e.ids is not None
        mask = self.keep(e.ids)
        if mask.all():
            return
        # cache on the value currently there (a previous edit may have sliced another axis)
        key = (id(v), e.axis, np.packbits(mask).tobytes() + len(mask).to_bytes(4, "little"))
        hit = self.cache.get(key)
        if hit is None:
            arr = const_array(v)
            assert arr is not None and arr.shape[e.axis] == len(mask), (v.name, arr.shape if arr is not None else None, e.axis, len(mask))
            hit = self.new_const(np.compress(mask, arr, axis=e.axis), v)
            self.cache[key] = hit
        self.set_input(e.node, e.index, hit)

    def e_group(self, e: Edit) -> None:
        n = int(self.keep(e.ids).sum())
        e.node.set_attr(Attr(e.extra or "group", AttrType.INT, n))

    def e_split(self, e: Edit) -> None:
        sizes = [int(self.keep(s).sum()) for s in e.extra]
        if e.index < 0:
            e.node.set_attr(Attr("split", AttrType.INTS, sizes))
        else:
            v = e.node.inputs[e.index]
            self.set_input(e.node, e.index, self.new_const(np.array(sizes, np.int64), v))

    def e_slice_range(self, e: Edit) -> None:
        mask = self.keep(e.ids)
        st, en, starts, ends = e.extra
        before = np.concatenate([[0], np.cumsum(mask)])
        nst, nen = int(before[st]), int(before[en])
        for inp, val, full in ((1, nst, starts), (2, nen, ends)):
            v = e.node.inputs[inp]
            arr = const_array(v)
            dtype = np.asarray(arr).dtype if arr is not None else np.dtype(np.int64)
            new = np.array(full, dtype=np.int64).copy()
            # an end past the old size stays "to the end" (INT_MAX and friends)
            if inp == 2 and int(new[e.index]) >= len(mask) and arr is not None:
                continue
            new[e.index] = val
            if arr is not None and np.array_equal(np.asarray(arr).reshape(-1), new):
                continue
            self.set_input(e.node, inp, self.new_const(new.astype(dtype), v))

    def e_gather(self, e: Edit) -> None:
        mask = self.keep(e.ids)
        newpos = np.cumsum(mask) - 1
        idx = e.extra[mask[e.extra]]
        v = e.node.inputs[1]
        dtype = const_array(v).dtype  # type: ignore[union-attr]
        self.set_input(e.node, 1, self.new_const(newpos[idx].astype(dtype), v))

    def e_reshape(self, e: Edit) -> None:
        """Output dim `axis` of a Reshape (or entry `axis` of an Expand/Resize shape) becomes the
        kept count."""
        n = int(self.keep(e.ids).sum())
        node = e.node
        v = node.inputs[e.index]
        arr = const_array(v)
        if node.op_type == "Reshape" and arr is not None:
            arr = np.array(arr, dtype=np.int64).reshape(-1).copy()
            entry = int(arr[e.axis])
            if entry == -1:
                return
            if entry == 0 and not int(node.attr("allowzero", 0)):
                in_axis, _ = e.extra
                if in_axis == e.axis:  # copies the input's (already pruned) dim
                    return
            if entry == n:
                return
            arr[e.axis] = n
            self.set_input(node, e.index, self.new_const(arr, v))
            return
        if arr is not None:
            arr = np.array(arr, dtype=np.int64).reshape(-1).copy()
            if int(arr[e.axis]) == n:
                return
            arr[e.axis] = n
            self.set_input(node, e.index, self.new_const(arr, v))
            return
        src = v.producer() if v is not None else None
        if node.op_type == "Reshape" and src is not None and src.op_type == "Concat":
            # a computed target: an explicit -1 (or a copied 0 on the same axis) needs nothing
            pos = 0
            for piece in src.inputs:
                pa = const_array(piece)
                ps = piece.shape if piece is not None else None
                size = pa.size if pa is not None else (ps.dims[0] if ps is not None and len(ps.dims) == 1 else None)
                if not isinstance(size, int):
                    break
                if pos <= e.axis < pos + size:
                    if pa is not None:
                        entry = int(np.asarray(pa).reshape(-1)[e.axis - pos])
                        if entry == -1 or entry == n or (entry == 0 and e.extra[0] == e.axis):
                            return
                    break
                pos += size
        # a computed target: splice a constant in with Slice/Concat
        with self.graph.inserting_before(node):
            big = np.iinfo(np.int64).max
            c = lambda a: self.b.initializer(np.array(a, np.int64), "prune_shape")  # noqa: E731
            head = self.b.op.Slice(v, c([0]), c([e.axis]), c([0]))
            tail = self.b.op.Slice(v, c([e.axis + 1]), c([big]), c([0]))
            new = self.b.op.Concat(head, c([n]), tail, axis=0)
        for out in (head, tail, new):
            out.type = TensorType(DataType.INT64, None)
        node.replace_input_with(e.index, new)


def apply_pruning(an: Analysis, pruned: np.ndarray) -> int:
    """Rewrite `an.model` so that every class marked in `pruned` (bool, by root id) is gone.
    Returns how many channel positions were removed from producer outputs."""
    s = _Surgeon(an, pruned)
    with constant_semantics(an.model):
        # Reshape/Expand edits read the *current* target constants, slices the current weights
        for e in an.edits:
            s.apply(e)
    # types: every tracked value's channel dim shrinks
    for v, inf in an.info.items():
        t = v.type
        if not isinstance(t, TensorType) or t.shape is None or inf.axis >= t.shape.rank:
            continue
        n = int(s.keep(inf.ids).sum())
        dims = list(t.shape.dims)
        if dims[inf.axis] == n:
            continue
        dims[inf.axis] = n
        v.type = TensorType(t.dtype, Shape(tuple(dims), t.shape.denotations), t.denotation)
    drop_unused_initializers(dict.fromkeys(s.replaced))
    removed = 0
    for p in an.producers:
        removed += int((~s.keep(p.ids)).sum())
    return removed


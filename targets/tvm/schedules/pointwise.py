"""`PointwisePlain`: the default schedule of `kernels.blocked.pointwise_to_plain` (a 1x1 conv with
fewer output channels than a block, reading a channel-blocked input, writing NCHW: the layout role
`pointwise-plain`), with its elementwise epilogue (Sigmoid, ...).

    pointwise_acc [N, OC, H, W, b] (Σ over the channel blocks) → pointwise_sum{b/2} ... pointwise_sum1
    (lane halves added) → pointwise_out [N, OC, H, W] (+ bias) → epilogue

is placed as: N serial (symbolic batch), (OC, H) parallel, W serial inside; per pixel every stage
computed at the pixel into a local buffer of one vector or less (registers): the accumulator's
block loop unrolled around a vectorised lane loop, each halving a vector add. No index is divided
by a symbolic extent. It declines every other kernel (None)."""

from __future__ import annotations

import re

from ..tir_match import static_int
from .base import ScheduleRule, fuse_parallel, inline_consumers, root_block

__all__ = ["PointwisePlain"]

_NAME = re.compile(r"pointwise_(acc|out|sum(\d+))(_\d+)?")


class PointwisePlain(ScheduleRule):
    """kernels.blocked.pointwise_to_plain + epilogue (see module docstring)."""

    name = "pointwise-plain"

    def apply(self, func, target, lanes):
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        acc, out, sums = None, None, []
        for b in sch.get_child_blocks(root_block(sch)):
            m = _NAME.fullmatch(sch.get(b).name_hint)
            if m is None:
                continue
            if m.group(1) == "acc":
                if acc is not None:
                    return None
                acc = b
            elif m.group(1) == "out":
                if out is not None:
                    return None
                out = b
            else:
                sums.append((int(m.group(2)), b))
        if acc is None or out is None or not sums:
            return None
        inline_consumers(sch, out)  # the epilogue (Sigmoid, ...)
        loops = sch.get_loops(out)
        if len(loops) != 4:
            return None
        i, o, y, xx = loops
        fuse_parallel(sch, [i, o, y])
        for _, blk in sorted(sums, key=lambda t: t[0]):  # (the consumer first: sum1, sum2, ...)
            sch.compute_at(blk, xx, preserve_unit_loops=True)
            sch.set_scope(blk, 0, "local")
            inner = sch.get_loops(blk)[-1]
            if (static_int(sch.get(inner).extent) or 0) > 1:
                sch.vectorize(inner)
        sch.compute_at(acc, xx, preserve_unit_loops=True)
        sch.set_scope(acc, 0, "local")
        ci, cb = sch.get_loops(acc)[-2:]
        sch.reorder(cb, ci)
        sch.vectorize(ci)
        if static_int(sch.get(cb).extent) is not None:
            sch.unroll(cb)
        init = sch.decompose_reduction(acc, cb)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch

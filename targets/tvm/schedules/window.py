"""`WindowReduction` (depthwise conv, max/avg pooling, any reduction whose innermost output axis
is also the innermost axis of its input): the innermost output axis vectorised with the reduction
loops outside it, a tile of output rows x one vector row in accumulators."""

from __future__ import annotations

from ..tir_match import static_int
from . import knobs
from .base import ScheduleRule, divisors_of, fuse_parallel, inline_consumers, inline_copies, one_reduction, region_vars, schedule_rest

__all__ = ["WindowReduction"]


class WindowReduction(ScheduleRule):
    """Reductions whose innermost output axis stays innermost in an input (depthwise conv,
    pooling): out tile of `lanes` along that axis in a local accumulator, reduction loops
    outside the vector loop, parallel over the other spatial loops."""

    name = "window-reduction"

    def apply(self, func, target, lanes):
        from tvm.tirx import IterVar

        opened = one_reduction(func)
        if opened is None:
            return None
        sch, anchor = opened
        stmt = sch.get(anchor)
        ivs = list(stmt.iter_vars)
        loops = sch.get_loops(anchor)
        if len(loops) != len(ivs):
            return None
        s_idx = [i for i, iv in enumerate(ivs) if iv.iter_type == IterVar.DataPar]
        r_idx = [i for i, iv in enumerate(ivs) if iv.iter_type == IterVar.CommReduce]
        if not s_idx or not r_idx or s_idx != list(range(len(s_idx))):
            return None
        inner_var = ivs[s_idx[-1]].var
        inner_ext = static_int(ivs[s_idx[-1]].dom.extent)
        if inner_ext is None or inner_ext < 4:
            return None  # global pooling and the like: leave to dlight / injective rules
        block_vars = {iv.var for iv in ivs}
        # the innermost output axis must index the last dimension of some input
        ok = False
        for reg in stmt.reads:
            dims = region_vars(reg, block_vars)
            if dims and inner_var in dims[-1]:
                ok = True
        if not ok:
            return None
        if knobs.current().decompose_padding:
            inline_copies(sch, anchor)
            loops = sch.get_loops(anchor)
        sl = [loops[i] for i in s_idx]
        rl = [loops[i] for i in r_idx]
        vt = lanes if inner_ext % lanes == 0 else (inner_ext if inner_ext <= 2 * lanes else None)
        if vt is None:
            # split by lanes with a tail (predicate); still vectorisable per tile
            vt = lanes
        # rows: a tile of `yt` output rows (the next output axis) as well, so the tile has
        # several independent accumulator vectors (one vector's chain of 9 dependent FMAs is
        # latency-bound: measured 1-2.5 GFLOP/s on MobileNetV2's depthwise convs)
        yt = 1
        if knobs.current().window_row_tile and len(sl) >= 2 and inner_ext % vt == 0:
            y_ext = static_int(sch.get(sl[-2]).extent)
            n_vec = -(-vt // lanes)
            if y_ext:
                yt = max(d for d in divisors_of(y_ext) if d * n_vec <= knobs.current().window_acc_vectors)
        x_o, x_i = sch.split(sl[-1], factors=[None, vt])
        if yt > 1:
            y_o, y_i = sch.split(sl[-2], factors=[None, yt])
            sch.reorder(*sl[:-2], y_o, x_o, *rl, y_i, x_i)
            outer = [*sl[:-2], y_o, x_o]
        else:
            sch.reorder(*sl[:-1], x_o, *rl, x_i)
            outer = [*sl[:-1], x_o]
        fused = fuse_parallel(sch, outer)
        wb = sch.cache_write(anchor, 0, "local")
        sch.reverse_compute_at(wb, fused, preserve_unit_loops=True)
        inline_consumers(sch, wb)
        if inner_ext % vt == 0:
            sch.vectorize(x_i)
            if yt > 1:
                sch.unroll(y_i)
            for r in rl:  # the window (3x3): unrolled, so the row chains interleave
                if (static_int(sch.get(r).extent) or 99) <= 7:
                    sch.unroll(r)
            init = sch.decompose_reduction(anchor, rl[0])
            sch.vectorize(sch.get_loops(init)[-1])
            wl = sch.get_loops(wb)
            if static_int(sch.get(wl[-1]).extent) == vt:
                sch.vectorize(wl[-1])
        else:
            sch.decompose_reduction(anchor, rl[0])
        schedule_rest(sch, {sch.get(anchor).name_hint, sch.get(wb).name_hint}, lanes)
        return sch

"""`SymbolicColumns`: a reduction whose innermost output axis is symbolic (a sequence length):
parallel over the static outer axes, the symbolic one serial inside."""

from __future__ import annotations

from ..tir_match import static_int
from .base import ScheduleRule, fuse_parallel, one_reduction, region_vars, schedule_rest

__all__ = ["SymbolicColumns"]


class SymbolicColumns(ScheduleRule):
    """A matmul-like reduction whose output's innermost axis is symbolic (the S x S attention
    scores of a sequence of any length: [.., S, d] x [.., d, S]) and innermost in one input too:
    parallel over the other spatial loops, the reduction outside the column loop, which stays a
    plain loop of symbolic trip count that LLVM's loop vectorizer vectorises (with its scalar
    tail); the epilogue under the row. Declines static columns (OuterProduct's) and the rest."""

    name = "symbolic-columns"

    def apply(self, func, target, lanes):
        opened = one_reduction(func)
        if opened is None:
            return None
        sch, anchor = opened
        stmt = sch.get(anchor)
        loops = sch.get_loops(anchor)
        ivs = list(stmt.iter_vars)
        if len(loops) != len(ivs) or len(stmt.writes) != 1:
            return None
        from tvm.tirx import IterVar

        sp = [lp for lp, iv in zip(loops, ivs) if iv.iter_type == IterVar.DataPar]
        red = [lp for lp, iv in zip(loops, ivs) if iv.iter_type == IterVar.CommReduce]
        if len(sp) < 2 or not red or len(sp) + len(red) != len(loops) or loops[: len(sp)] != sp:
            return None
        col = ivs[len(sp) - 1].var
        if static_int(ivs[len(sp) - 1].dom.extent) is not None:
            return None
        block_vars = {iv.var for iv in ivs}
        out = region_vars(stmt.writes[0], block_vars)
        reads = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
        if not out or out[-1] != {col} or not any(region_vars(r, block_vars)[-1:] == [{col}] for r in reads):
            return None
        sch.reorder(*sp[:-1], *red, sp[-1])
        fused = fuse_parallel(sch, sp[:-1])
        sch.decompose_reduction(anchor, red[0])
        for c in sch.get_consumers(anchor):
            try:
                sch.reverse_compute_at(c, fused, preserve_unit_loops=True)
            except Exception:  # noqa: BLE001 - left at the root: scheduled on its own below
                pass
        schedule_rest(sch, {sch.get(anchor).name_hint}, lanes)
        return sch

"""The rules of last resort: dlight's CPU `GEMV` and `Reduction` (`DlightRule`: tried only after
graphopt's conv rules, dlight's Reduction makes convolutions slower) and `Fallback` (parallel
outer loops, no vectorisation). A kernel they schedule counts as generic (`GENERIC_RULES`)."""

from __future__ import annotations

from typing import Any

from .base import ScheduleRule, is_reduction, root_block, schedule_injective_block

__all__ = ["DlightRule", "Fallback"]


class DlightRule(ScheduleRule):
    def __init__(self, rule: Any, name: str) -> None:
        self.rule = rule
        self.name = name

    def apply(self, func, target, lanes):
        with target:
            return self.rule.apply(func, target, False)


class Fallback(ScheduleRule):
    """Anything else: parallelise each root block's outermost loops (no vectorisation)."""

    name = "fallback-parallel"

    def apply(self, func, target, lanes):
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        for block in sch.get_child_blocks(root_block(sch)):
            stmt = sch.get(block)
            loops = sch.get_loops(block)
            if not loops:
                continue
            if is_reduction(stmt):
                # parallel only over leading spatial loops
                from tvm.tirx import IterVar

                n_s = 0
                for iv in stmt.iter_vars:
                    if iv.iter_type != IterVar.DataPar:
                        break
                    n_s += 1
                n_s = min(n_s, len(loops))
                if n_s == 0:
                    continue
                lead = loops[:n_s]
                fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
                sch.parallel(fused)
            else:
                schedule_injective_block(sch, block, 1)
        return sch

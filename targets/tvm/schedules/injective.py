"""`Injective`: kernels without a reduction (elementwise, broadcasts, copies, transposes): every
block inlined into its consumer where possible, the rest with parallel outer loops and a
vectorised inner loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...machine import machine_model
from .base import ScheduleRule, is_reduction, root_block, schedule_injective_block

if TYPE_CHECKING:  # tvm is an optional dependency: import it lazily
    import tvm

__all__ = ["Injective"]


def _try_inline_all(sch: "tvm.s_tir.Schedule", keep: Sequence[Any] = ()) -> None:
    """compute_inline every block that can be inlined (fixed point), except `keep`."""
    keep_names = {sch.get(b).name_hint for b in keep}
    changed = True
    while changed:
        changed = False
        for block in sch.get_child_blocks(root_block(sch)):
            stmt = sch.get(block)
            if stmt.name_hint in keep_names or is_reduction(stmt):
                continue
            try:
                sch.compute_inline(block)
                changed = True
                break
            except Exception:
                continue


class Injective(ScheduleRule):
    """Inline what can be inlined; parallel + vectorise every remaining block."""

    name = "injective"

    def apply(self, func, target, lanes):
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(root_block(sch))
        if any(is_reduction(sch.get(b)) for b in blocks):
            return None
        _try_inline_all(sch)
        machine = machine_model(target)
        for block in sch.get_child_blocks(root_block(sch)):
            schedule_injective_block(sch, block, lanes, machine=machine)
        return sch

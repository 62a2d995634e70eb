"""Default CPU schedule of the Winograd convolutions of `targets/tvm/kernels/winograd.py`.

The fused PrimFunc is

    winograd_in_rows → winograd_in → winograd_gemm (the one reduction) → winograd_out_cols →
    winograd_out → epilogue (bias, Relu, residual Add, ...)

and `WinogradConv` places it as three parallel passes:

- input transform: parallel over (batch, input block, tile); per tile the row pass
  (`winograd_in_rows`) into a local (m+2) x (m+2) x b buffer, then the column pass writing the
  (m+2)^2 positions of `V`; both with their position loops unrolled (the chain of Selects over
  the position folds to one expression each) and the block's channels as one vector;
- the GEMM: BlockedConv's register-tiled micro-kernel (the GEMM is a 1x1 conv whose weights are
  indexed by the batch axis too: `nchwc.match_blocked_conv` takes it), parallel over
  (position, output block tiles);
- output transform: parallel over (batch, output block, tile row); per tile the column pass into
  a local buffer, the row pass writing the m x m output pixels through the inlined epilogue.

It declines every other kernel (None), so the rules after it see them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ...machine import machine_model
from ..tir_match import static_int
from .base import ScheduleRule, fuse_parallel, inline_consumers, one_reduction, root_block
from .nchwc import BlockedConv, kernel_block, loops_below, write_back_loops
from .tiles import ConvTile

if TYPE_CHECKING:
    import tvm

__all__ = ["WinogradConv"]


def _is(name_hint: str, name: str) -> bool:
    """A block named `name` (or `name_1`...: a name FuseTIR made unique)."""
    return re.fullmatch(re.escape(name) + r"(_\d+)?", name_hint) is not None


def _named(sch: "tvm.s_tir.Schedule", name: str) -> list[Any]:
    return [b for b in sch.get_child_blocks(root_block(sch)) if _is(sch.get(b).name_hint, name)]


class WinogradConv(ScheduleRule):
    """kernels.winograd's transforms + GEMM + epilogue (see module docstring); `tile` forces the
    GEMM's micro-kernel (as `BlockedConv(tile)`)."""

    name = "winograd-conv"

    def __init__(self, tile: ConvTile | None = None) -> None:
        self.tile = tile

    def apply(self, func, target, lanes):
        lanes = kernel_block(func, lanes)
        opened = one_reduction(func)
        if opened is None:
            return None
        sch, gemm = opened
        if not _is(sch.get(gemm).name_hint, "winograd_gemm"):
            return None
        blocks = {k: _named(sch, "winograd_" + k) for k in ("in_rows", "in", "out_cols", "out")}
        if any(len(v) != 1 for v in blocks.values()):
            return None
        a = static_int(sch.get(blocks["in_rows"][0]).iter_vars[3].dom.extent)  # m + 2
        if a is None:
            return None
        machine = machine_model(target)
        self._input(sch, blocks["in_rows"][0], blocks["in"][0], a, lanes, machine)
        self._output(sch, blocks["out_cols"][0], blocks["out"][0], lanes, machine)
        return BlockedConv(self.tile).schedule_conv(sch, gemm, target, lanes)

    @staticmethod
    def _input(sch: "tvm.s_tir.Schedule", rows: Any, v: Any, a: int, lanes: int, machine: Any = None) -> None:
        pi, cb, z, t, ii = sch.get_loops(v)
        n, pos = sch.split(pi, factors=[None, a * a])
        a1, a2 = sch.split(pos, factors=[a, a])
        sch.reorder(n, cb, z, t, a1, a2, ii)
        fused = fuse_parallel(sch, [n, cb, z, t], machine)
        sch.compute_at(rows, fused, preserve_unit_loops=True)
        write_back_loops(sch, loops_below(sch, rows, fused), lanes)
        write_back_loops(sch, [a1, a2, ii], lanes)

    @staticmethod
    def _output(sch: "tvm.s_tir.Schedule", cols: Any, out: Any, lanes: int, machine: Any = None) -> None:
        inline_consumers(sch, out)  # the epilogue: bias, activation, residual add
        m = static_int(sch.get(cols).iter_vars[4].dom.extent)
        n, ob, y, x, oi = sch.get_loops(out)
        yo, yi = sch.split(y, factors=[None, m])
        xo, xi = sch.split(x, factors=[None, m])
        sch.reorder(n, ob, yo, xo, yi, xi, oi)
        fuse_parallel(sch, [n, ob, yo], machine)
        sch.compute_at(cols, xo, preserve_unit_loops=True)
        write_back_loops(sch, loops_below(sch, cols, xo), lanes)
        write_back_loops(sch, [yi, xi, oi], lanes)

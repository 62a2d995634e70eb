"""Variants of the default schedules that tuning measures before its search.

A default rule picks one micro-kernel per shape from a cost rule; the best tile of a given conv on
a given machine is often a neighbour of that pick. `variants(func, target, lanes)` gives, for a
kernel one of graphopt's own rules schedules, the other choices of that rule (for the blocked
convolutions: pixels x output blocks per tile, loop order, padded rows per row, reduction chunks,
row passes; for the Winograd convolutions: the GEMM's tile and reduction chunks; for the blocked
depthwise convs and pooling: pixels per tile, rows per tile, how the pad is read). Tuning builds
and runs them like its own candidates and keeps the fastest as a record (`tuner`), so a
short budget spends its first minutes on a dozen good candidates per kernel instead of on random
points of meta_schedule's design space. Kernels no rule here matches get no variants.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tvm

    from ..schedules.base import ScheduleRule

__all__ = ["variants", "variant_rules"]

# (pixels, output channel blocks) per micro-kernel besides the machine model's exact ones
# (`MachineModel.conv_tiles`): 8-14 accumulator vectors, and 16-24 with 32 registers
_MORE_TILES = ((4, 2), (2, 4), (8, 1), (7, 2), (7, 1), (12, 1))
_MORE_TILES_32_REGS = ((8, 2), (4, 4), (16, 1), (14, 1), (7, 3), (12, 2))
_CONV_ORDERS = (("ob", False), ("row", True), ("pix", False))
_WINDOW = tuple((rt, pad, ry) for rt in (2, 4, 7, 8) for pad in ("inline", "at") for ry in (1, 2))


def _hash(sch: Any) -> int:
    import tvm_ffi

    return int(tvm_ffi.structural_hash(sch.mod["main"]))


def variant_rules(func: "tvm.tirx.PrimFunc", target: "tvm.target.Target", lanes: int) -> tuple[Any, list[tuple[str, "ScheduleRule"]]]:
    """(`func`'s default schedule by these rules or None, [(label, rule)] of its other choices):
    the rules before they are applied, so a caller can apply one again by its label (the
    `--tune-shapes` choices, targets/tvm/tuning/shapes.py). Empty when no rule here matches."""
    from ...machine import machine_model
    from ..schedules.nchwc import BlockedConv, BlockedWindow
    from ..schedules.tiles import ConvTile, exact_tiles
    from ..schedules.winograd import WinogradConv

    machine = machine_model(target)
    exact = exact_tiles(machine)
    tiles = tuple(dict.fromkeys((*exact, *(_MORE_TILES_32_REGS if machine.vector_registers >= 32 else ()), *_MORE_TILES)))

    try:  # the default schedule (WinogradConv, else BlockedConv.apply: the conv schedule, else the window one)
        default = WinogradConv().apply(func, target, lanes)
        winograd = default is not None
        conv = False
        if not winograd:
            default = BlockedConv()._conv(func, target, lanes)
            conv = default is not None
        if default is None:
            default = BlockedWindow().apply(func, target, lanes)
    except Exception:  # noqa: BLE001 - not a kernel of these rules
        return None, []
    if default is None:
        return None, []
    cands: list[tuple[str, ScheduleRule]]
    if winograd:  # the transforms have one schedule; the GEMM's micro-kernel varies
        cands = [(f"winograd gemm tile {rt}x{obt}{f' k-chunk {c}' if c else ''}",
                  WinogradConv(ConvTile(rt, obt, "ob", tail=True, k_chunk=c)))
                 for rt, obt in tiles for c in (0, 16)]
    elif conv:
        # (a tile that does not divide the row takes a ragged last tile; exact tiles ignore `tail`)
        cands = [(f"tile {rt}x{obt} {order}{' pad-row' if pad_row else ''}",
                  BlockedConv(tile=ConvTile(rt, obt, order, pad_row=pad_row, tail=True)))
                 for rt, obt in tiles for order, pad_row in _CONV_ORDERS]
        # the reduction in chunks of 16 input blocks (declined by kernels with fewer)
        cands += [(f"tile {rt}x{obt} ob k-chunk 16", BlockedConv(tile=ConvTile(rt, obt, "ob", k_chunk=16, tail=True)))
                  for rt, obt in tiles]
        # flat convs with padded rows: passes per kernel row over chunks of 2-8 input blocks
        cands += [(f"tile {rt}x{obt} ob row-passes k-chunk {c}",
                   BlockedConv(tile=ConvTile(rt, obt, "ob", row_passes=True, k_chunk=c)))
                  for rt, obt in exact for c in (2, 4, 8)]
    else:
        cands = [(f"window {rt} px x {ry} rows pad {pad}", BlockedConv(window=BlockedWindow(rt=rt, pad=pad, ry=ry)))
                 for rt, pad, ry in _WINDOW]
    return default, cands


def variants(func: "tvm.tirx.PrimFunc", target: "tvm.target.Target", lanes: int) -> list[tuple[str, Any]]:
    """(label, traced Schedule) for each variant of `func`'s default schedule that differs from it."""
    out: list[tuple[str, Any]] = []
    default, cands = variant_rules(func, target, lanes)
    if default is None:
        return out
    seen = {_hash(default)}
    for label, rule in cands:
        try:
            sch = rule.apply(func, target, lanes)
        except Exception:  # noqa: BLE001 - a tile the kernel cannot take
            continue
        if sch is None:
            continue
        h = _hash(sch)
        if h in seen:
            continue
        seen.add(h)
        out.append((label, sch))
    return out

"""The micro-kernel of a channel-blocked conv (`conv_tile`): how many output pixels x output
channel blocks stay in registers, the loop order and the reduction chunks, from the conv's shape
(`ConvShape`) and the machine model's registers and caches. `nchwc.BlockedConv` schedules the
`ConvTile` it returns; tuning's variants (`tuning.variants`) try its neighbours."""

from __future__ import annotations

from dataclasses import dataclass

from ...machine import MachineModel
from . import knobs
from .base import divisors_of

__all__ = ["ConvShape", "ConvTile", "conv_tile", "exact_tiles", "odd_tile", "row_tile_ranges", "L2_WEIGHT_SHARE"]

# cache budgets, as shares of the machine model's caches (measured on a 32 KiB L1 / 512 KiB L2
# core, where they were 12 KiB / 256 KiB / 160 KiB):
# weights of one chunk of output blocks (order "blk"): half of L2
L2_WEIGHT_SHARE = 1 / 2
# weights of one reduction chunk (`ConvTile.k_chunk` by default): 16 of 64 input blocks of a 3x3
# 512-channel conv x 4 output blocks (147 KiB) measured 0.94x onnxruntime's time, 8 (74 KiB) 0.96x
CHUNK_WEIGHT_SHARE = 5 / 16
# weights of one row pass (`ConvTile.row_passes`: a kernel row x a chunk of input blocks x the
# tile's output blocks): 3x3 convs on 7/14/28-wide maps, single thread, chunks of 4 input blocks
# (12 KiB of 32) 2.37-2.41 ms, of 1-2 blocks 2.41-2.47 ms, 8 blocks 2.60 ms, 16 2.77 ms (3x3 512 on 7x7)
PASS_WEIGHT_SHARE = 3 / 8


def exact_tiles(machine: MachineModel) -> tuple[tuple[int, int], ...]:
    """The (pixels, output blocks) tiles a blocked conv tries first, in order: the machine model's
    `conv_tiles` (which fill its accumulators), each with at most `knobs.conv_tile_pixels` pixels
    (6, MLAS's NCHWc kernels' outputs). AVX2's 12 accumulators are unchanged (2x6, 3x4, 4x3, 6x2);
    AVX-512's 24 give 4x6, 6x4, 6x3, 6x2 instead of 8x3 and 12x2: a tile of more pixels spilled
    in LLVM's schedule of the unrolled reduction step (a broadcast per pixel beside the
    accumulators and the blocks' weights). Zen 4, single thread, against onnxruntime
    (tools/bench_nchwc_kernels.py --models densenet121): DenseNet-121's 3x3 128 -> 32 (2 output
    blocks) on 56/28/14/7-wide maps 12 x 2 ran 2.4x / 1.4x / 1.6x / 2.9x its time, 6 x 2 0.9-1.15x
    (4 x 2 about the same, 7 x 2, 8 x 2 and 14 x 2 1.4-2.4x); 3x3 96 -> 96 (6 blocks) on 28x28
    8 x 3 1.18x, 6 x 3 0.93x; 1x1 128 -> 32 on 28x28 12 x 2 1.44x, 6 x 2 1.04x."""
    cap = knobs.current().conv_tile_pixels
    return tuple((min(rt, cap) if cap > 0 else rt, ob) for rt, ob in machine.conv_tiles)


def odd_tile(machine: MachineModel, ob: int) -> tuple[int, int]:
    """The tile for `ob` output blocks that no `exact_tiles` tile divides: the machine model's
    `odd_tile` (its largest divisor up to 6 blocks, pixels filling the accumulators), a one-block
    tile (ob 1, 7, 11, ...) with at most 2 x `knobs.conv_tile_pixels` pixels: AVX-512's 24 x 1
    becomes 12 x 1, AVX2's 12 x 1 stays. Zen 4, single thread, 16 output channels, two runs,
    time against the generic OuterProduct schedule's in the same rounds: 1x1 128 -> 16 on 56x56
    24 x 1 1.46x / 1.34x, 12 x 1 0.86x / 0.86x; 3x3 64 -> 16 on 28x28 1.37x / 1.33x vs 1.06x / 0.95x;
    1x1 256 -> 16 on 14x14 1.19x / 1.16x vs 0.99x / 0.97x."""
    rt, d = machine.odd_tile(ob)
    cap = knobs.current().conv_tile_pixels
    return (min(rt, cap * (2 if d == 1 else 1)) if cap > 0 else rt, d)


@dataclass(frozen=True)
class ConvShape:
    """What the tile choice looks at (per batch item)."""

    kind: str  # "conv" | "stem"
    ob: int  # output channel blocks
    oh: int
    ow: int
    red: int  # reduction length (C * KH * KW)
    kh: int
    kw: int
    stride: int  # 1 when both strides are 1, else the larger one
    pad_rows: tuple[int, ...] = ()  # (flat convs with padded rows) annotations.FLAT_ROWS: OW, OH,
    # H, stride, dilation and top pad of the rows


@dataclass(frozen=True)
class ConvTile:
    """One micro-kernel choice."""

    rt: int  # output pixels per tile
    obt: int  # adjacent output channel blocks per tile
    # outer loop order: "ob" (n, ob, y, x), "row" (n, y, ob, x), "pix" (n, y, x, ob), "blk" (n, ob
    # chunk, y, ob in chunk, x: a chunk's weights fit in L2)
    order: str = "ob"
    ob_inner: bool = False  # in the unrolled tile, output blocks inside pixels
    pad_row: bool = False  # (order "row") the padded input rows of each output row computed
    # under the row loop, instead of a fill + copy of the whole padded input before the conv
    partition_pad: bool = False  # ... with the pad's column loop split into borders and interior
    unroll_kw: bool = False  # unroll kw too (LLVM then keeps the broadcasts that neighbouring
    # kw taps share in registers, and spills the accumulators for them)
    k_chunk: int = 0  # (1x1 convs, order "ob") input channel blocks per reduction chunk: a row's
    # accumulators live in a local buffer between chunks, so a chunk of the weight panel stays in
    # L1 across the row's tiles instead of streaming the whole panel from L2 for every tile
    tail: bool = False  # rows that `rt` does not divide: whole tiles plus one ragged tile, the
    # tile loop's last iteration peeled into code of its own (`apply_loop_marks`)
    row_passes: bool = False  # (flat convs with padded rows, order "ob", with `k_chunk`) one
    # reduction pass per (chunk of input blocks, kernel row) over only the pixel tiles whose window
    # row lies inside the input (the FMAs on padded rows skipped; accumulators in a local buffer
    # between passes; `row_tile_ranges`)
    serial_tiles: bool | None = None  # the innermost outer loop (pixel tiles; output blocks for
    # "pix") left out of the parallel loop, so a tile's indices are increments rather than
    # divisions of one fused index; None: where the fused rest has enough iterations


def conv_tile(s: ConvShape, machine: MachineModel, row_passes: bool = True, block: int | None = None) -> ConvTile:
    """The micro-kernel for shape `s` on `machine` (see module docstring) with channel blocks of
    `block` (default: the machine's fp32 lanes); `row_passes=False`: none (where the pixel tiles
    are split among the cores)."""
    lanes = block or machine.lanes(32)
    tiles = exact_tiles(machine)
    l2_weights = int(machine.l2_bytes * L2_WEIGHT_SHARE)
    # padded convs with enough rows for the threads: rows outermost, each row's padded input
    # rows computed under the row loop (3x3 stride 2 on 56x56: 1.22x -> 1.07x onnxruntime's time)
    row = s.kh > 1 and s.oh >= 14
    # strided 1x1 convs (ResNet's downsampling): chunks of output blocks whose weights fit in L2
    # ("blk"); with output blocks outermost the whole (4x larger) input streams from L3 once per
    # block pair (1024->2048 on 14x14 s2, single thread vs onnxruntime: 1.76x "ob", 1.21x "blk")
    order = "row" if row else "blk" if (s.kh == 1 and s.kw == 1 and s.stride > 1) else "ob"
    chunk = 0
    icb = s.red // (s.kh * s.kw * lanes)  # input channel blocks (conv)
    if s.kind == "conv" and order == "ob":
        # a weight panel (the reduction x the tile's output blocks) larger than L2 streams from
        # L3 for every pixel tile: the reduction in chunks whose panel stays in L2, the block's
        # accumulators in a local buffer between chunks (3x3 512->512 on 7x7: 1.08x -> 0.94x)
        per_icb = s.kh * s.kw * lanes * lanes * 4
        for rt, obt in tiles:
            if s.ob % obt == 0 and icb * per_icb * obt > l2_weights:
                chunk = max([d for d in divisors_of(icb) if d < icb
                             and d * per_icb * obt <= machine.l2_bytes * CHUNK_WEIGHT_SHARE] or [0])
                break
    for rt, obt in tiles:  # the accumulators, exact
        if s.ow % rt == 0 and s.ob % obt == 0:
            if row_passes and knobs.current().row_passes and s.pad_rows and s.pad_rows[3] == 1 and order == "ob" and s.kind == "conv":
                # a flat conv with padded rows: passes per kernel row over the pixel tiles its
                # input rows reach, in chunks of input blocks whose weights for the kernel row stay
                # in L1 (single thread vs onnxruntime, 3x3 512 on 7x7: 1.05x -> 0.95x)
                per_icb = s.kw * lanes * lanes * 4 * obt
                chunk = max([d for d in divisors_of(icb) if d * per_icb <= machine.l1d_bytes * PASS_WEIGHT_SHARE] or [1])
                return ConvTile(rt, obt, order, row_passes=True, k_chunk=chunk)
            return ConvTile(rt, obt, order, pad_row=row, k_chunk=chunk)
    if order in ("ob", "row") and s.kind == "conv":  # (the 7x7 stem: 1.05x ragged, 0.98x 4 x 2)
        for rt, obt in tiles:  # the accumulators, whole tiles + a ragged one (3x3 on 56/28/14
            # rows: 0.96-0.98x the time of rows rounded up to 57/30/15, which waste 2-7 %)
            if s.ob % obt == 0 and s.ow > rt:
                return ConvTile(rt, obt, order, pad_row=row, k_chunk=chunk, tail=True)
    if not any(s.ob % obt == 0 for _, obt in tiles):
        rt, obt = odd_tile(machine, s.ob)  # (SqueezeNet's 125 blocks: 2 x 5; 8-accumulator tiles would take 1 block: 1 x 1 on 13-wide rows)
        if s.ow % rt == 0:
            return ConvTile(rt, obt, order, pad_row=row)
        if order in ("ob", "row") and s.kind == "conv" and s.ow > rt:
            return ConvTile(rt, obt, order, pad_row=row, tail=True)
    # two thirds of the accumulators, in tiles that divide the row (AVX2: 4x2, 2x4, 8x1)
    wide = ((8, 2), (4, 4), (16, 1), (14, 1), (7, 2)) if machine.accumulators >= 24 else ()
    for rt, obt in (*wide, (4, 2), (2, 4), (8, 1), (7, 1), (2, 2), (1, 4), (2, 1), (1, 2), (1, 1)):
        if s.ow % rt == 0 and s.ob % obt == 0:
            return ConvTile(rt, obt, order, pad_row=row, k_chunk=chunk)
    return ConvTile(1, 1)


def row_tile_ranges(rows: tuple[int, ...], kh_n: int, rt: int, tiles: int) -> list[tuple[int, int]]:
    """Per kernel row of a flat conv (`rows`: FLAT_ROWS), the range [lo, hi) of the `tiles`
    pixel tiles (`rt` pixels each) whose window row lies inside the input for some pixel of the
    tile: the others read only padding for that kernel row. The rounded-up pixels past the map
    read the last pixel's window (they belong to the last row)."""
    ow, oh, h, sh, dh, top = rows
    out = []
    for kh in range(kh_n):
        off = kh * dh - top  # output row r reads input row r * sh + off
        r_lo, r_hi = max(0, -(off // sh)), min(oh - 1, (h - 1 - off) // sh)
        if r_lo > r_hi:
            out.append((0, 0))
            continue
        hi = tiles if r_hi == oh - 1 else -(-((r_hi + 1) * ow) // rt)
        out.append((r_lo * ow // rt, hi))
    return out

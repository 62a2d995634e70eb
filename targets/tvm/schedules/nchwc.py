"""Default CPU schedules for the channel-blocked (NCHW[b]c) kernels of `targets/tvm/kernels/blocked.py`.

`BlockedConv` (one entry in `default.default_rules`, in front of OuterProduct) schedules the
fused PrimFuncs of the blocked layout:

    pad → conv2d_blocked | conv2d_stem reduction → epilogue (bias, Relu/Clip, residual Add, ...)
    pad → depthwise_blocked | pool_blocked reduction → epilogue     (through `BlockedWindow`)

Convolutions (`conv2d_blocked`, `conv2d_stem`) become a register-tiled micro-kernel, the form
onnxruntime's MLAS NCHWc kernels take:

- the output tile is `rt` pixels along the output row x `obt` adjacent output channel blocks x the
  `b` channels of a block (one vector): `rt * obt` accumulator vectors stay in registers for the
  whole reduction. The machine model's accumulators (`MachineModel.conv_tiles`: 12 of AVX2's 16
  registers as 2x6, 3x4, 4x3, 6x2; 24 of AVX-512's 32 as 4x6, 6x4, and for 3 or 2 blocks 6x3, 6x2
  rather than 8x3, 12x2: at most 6 pixels, `tiles.exact_tiles`) wherever the block count
  allows: a row the pixel count does not divide (ResNet-50's 56/28/14 with 3-pixel tiles) gets
  whole tiles plus a ragged last one (`ConvTile.tail`): the tile loop is marked and the build
  peels its last iteration into code of its own (`apply_loop_marks`), so neither copy keeps a
  condition per FMA (a predicated tile kept its accumulators in memory: 1.5-2x slower). Else 8
  accumulators (4x2, 2x4, 8x1) that divide the row. Block counts none of the 12-accumulator tiles
  divides take their largest divisor up to 6 blocks (`MachineModel.odd_tile`: 125 blocks → 2 x 5). Convs that
  kernels.blocked computes on their flattened output pixels (`conv2d_blocked_flat`: unpadded 1x1 convs, maps of at most 28 input
  rows) are one row of OH*OW pixels rounded up to the tile, written back through
  `out[.., p // W, p % W, ..]`; where their (batch, output block) loop does not divide among the
  cores, the pixel tiles join the parallel loop (in parts: `_flat_parts`);
- the reduction runs `icb, kh, kw, ii` outside the tile (`ic, kh, kw` for the stem), `ii` (the
  `b` input channels of a block) unrolled, `kw` not (unrolled, LLVM keeps the broadcasts that
  neighbouring taps share and spills accumulators for them): per step `obt` weight vectors
  (contiguous in the packed `[OC/b, C/b, KH, KW, b(in), b(out)]` weights) and `rt` broadcast
  input values feed `rt * obt` FMAs. Where a tile column's weights (the reduction x `obt` blocks)
  exceed half of L2 the reduction runs in chunks of input blocks (`ConvTile.k_chunk`), all the
  block's accumulators in a local buffer between chunks, so a chunk's weights stay in L2 across
  every pixel tile instead of streaming from L3 for each (3x3 512->512 on 7x7). Flat stride-1
  convs with padded rows (`ConvTile.row_passes`) instead run a pass per (chunk of input blocks,
  kernel row) over only the pixel tiles whose window row for that kernel row lies inside the
  input: the FMAs on padding rows are skipped (a 3x3 conv on 7x7 computes 19 of 21 kernel rows'
  worth; onnxruntime skips padded taps too), the pass's weights stay in L1;
- outer loops: output blocks, rows fused into one parallel loop, the pixel tiles a serial loop
  inside it (fused into it as well, each tile recovered its indices by divisions that cost up to a
  third of a short-reduction tile); padded convs with at least 14 output rows run rows outermost
  (parallel over batch x rows) with each row's padded input rows computed under the row loop, instead of a
  fill + copy of the whole padded input;
- the accumulator tile is written back through the inlined epilogue (bias add, activation,
  residual add), vectorised along the block's channels;
- an input the kernel computes itself (DenseNet's Concat -> BatchNorm -> Relu before each 1x1
  conv) is one parallel pass before the conv, a concat's channel loop split at its inputs
  (`fuse_prologue`; DenseNet-121, 2 threads, paired against onnxruntime: 1.144x -> 1.081x).

Depthwise convs and pooling (`BlockedWindow`): a tile of 4 pixels x 2 rows x the block's channels
in registers around the unrolled window, the padded input rows of each tile row computed under
the row loop (interior copy without conditions), the epilogue (bias, Clip, the average's division)
in the write-back. The generic WindowReduction materialised the whole padded input first (max
pool 7-8x onnxruntime's time).

`ConvTile` / `BlockedWindow(rt=, ry=, pad=)` force other choices, for experiments
(tools/bench_nchwc_kernels.py measures them against onnxruntime). The rule declines every other
kernel (it returns None), so the generic rules still schedule them.

Like the other default rules the schedule is built with traced primitives only, so its trace
replays on the same workload: tuning (targets/tvm_tuning.py) stores it as the task's default
record and keeps it where tuning does not beat it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...machine import machine_model
from ..kernels.annotations import FLAT_ROWS
from ..tir_match import static_int
from . import knobs
from .base import (
    ScheduleRule,
    divisors_of,
    fuse_parallel,
    inline_consumers,
    inline_copies,
    is_reduction,
    one_reduction,
    region_vars,
    root_block,
    schedule_rest,
)
from ..stack_tiles import STACK_ALLOCA_BYTES, STACK_TILE, stack_tile_bytes
from .loop_marks import PEEL_BOUND, PEEL_LAST, ROW_PASS
from .tiles import L2_WEIGHT_SHARE, ConvShape, ConvTile, conv_tile, row_tile_ranges

if TYPE_CHECKING:
    import tvm

__all__ = ["BlockedConv", "BlockedWindow", "kernel_block", "match_blocked_conv", "match_blocked_window", "is_blocked_window", "loops_below",
           "write_back_loops"]


def kernel_block(func: "tvm.tirx.PrimFunc", lanes: int) -> int:
    """The vector width a blocked-layout kernel is scheduled with: its channel block (the last dim
    of its 5-D output) where that is a smaller power of two than the machine's `lanes` (a model
    blocked by 8 on AVX-512, `layout.choose_plan`: 8-lane ymm vectors, still 32 registers),
    else `lanes`."""
    try:
        shape = func.params[-1].shape  # (0.27: a buffer parameter is the Var, with its shape)
        b = static_int(shape[-1]) if shape is not None and len(shape) == 5 else None
    except Exception:  # noqa: BLE001 - not a kernel of this layout
        return lanes
    return b if b is not None and 4 <= b < lanes and lanes % b == 0 else lanes


@dataclass
class _Match:
    kind: str
    loops: dict[str, Any]  # role -> loop
    ext: dict[str, int]
    shape: ConvShape
    symbolic: bool = False  # the output map's rows or columns are symbolic (ext holds SYMBOLIC_MAP)
    x_extent: Any = None  # (symbolic columns) the column loop's extent


#: the output rows and columns a conv with a symbolic map is tiled for: this prime times the
#: multiple the symbolic size is known to be (4 * W_8 columns: 4 * 1009), so a tile dividing that
#: multiple is chosen when the machine has one (whole tiles, no predicates), else a ragged tail
SYMBOLIC_MAP = 1009


def _multiple_of(extent: Any) -> int:
    """The largest power of two up to 64 that symbolic `extent` is provably a multiple of."""
    import tvm

    analyzer = tvm.sym.Analyzer()
    for c in (64, 32, 16, 8, 4, 2):
        if analyzer.can_prove(tvm.tirx.floormod(extent, c) == 0):
            return c
    return 1


def match_blocked_conv(sch: "tvm.s_tir.Schedule", anchor: Any, lanes: int) -> _Match | None:
    """Roles of the anchor's loops when it is a conv2d_blocked or conv2d_stem reduction:
    out[n, ob, y, x, oi] += in[n, icb, y*s+kh*d, x*s+kw*d, ii] * w[ob, icb, kh, kw, ii, oi]
    (blocked) or in[n, ic, y*s+kh*d, x*s+kw*d] * w[ob, ic, kh, kw, oi] (stem); None otherwise."""
    from tvm.tirx import IterVar

    stmt = sch.get(anchor)
    if len(stmt.writes) != 1:
        return None
    ivs = list(stmt.iter_vars)
    loops = sch.get_loops(anchor)
    if len(loops) != len(ivs):
        return None
    block_vars = {iv.var for iv in ivs}
    out_buf = stmt.writes[0].source
    ins = [r for r in stmt.reads if not r.source.same_as(out_buf)]
    if len(ins) != 2:
        return None
    od = region_vars(stmt.writes[0], block_vars)
    if len(od) != 5 or any(len(d) != 1 for d in od):
        return None
    n, ob, y, x, oi = (next(iter(d)) for d in od)
    kinds = {iv.var: iv.iter_type for iv in ivs}
    if any(kinds[v] != IterVar.DataPar for v in (n, ob, y, x, oi)):
        return None
    # the weight: its first dim is ob, its last oi; or (a batched conv: kernels.winograd's GEMM, a
    # weight per batch item) its first dim the batch, then ob
    dims = [region_vars(r, block_vars) for r in ins]
    wi = next((k for k, d in enumerate(dims) if d and d[0] == {ob} and d[-1] == {oi}), None)
    batched = wi is None
    if batched:
        wi = next((k for k, d in enumerate(dims) if len(d) == 7 and d[0] == {n} and d[1] == {ob} and d[-1] == {oi}),
                  None)
    if wi is None:
        return None
    wd, xd = dims[wi][int(batched):], dims[1 - wi]
    if any(len(d) != 1 for d in wd) or any(kinds[next(iter(d))] != IterVar.CommReduce for d in wd[1:-1]):
        return None
    if len(wd) == 6 and len(xd) == 5:
        kind = "conv"
        icb, kh, kw, ii = (next(iter(d)) for d in wd[1:5])
        if xd[0] != {n} or xd[1] != {icb} or xd[4] != {ii}:
            return None
        # (conv2d_blocked_flat: a one-row output whose pixel index is split into the input's row
        # and column, x // W and x % W)
        flat_read = xd[2] <= {x, kh} and xd[3] <= {x, kw} and x in xd[3]
        if not ((xd[2] == {y, kh} and xd[3] == {x, kw}) or flat_read):
            return None
        red = {"icb": icb, "kh": kh, "kw": kw, "ii": ii}
    elif len(wd) == 5 and len(xd) == 4:
        kind = "stem"
        ic, kh, kw = (next(iter(d)) for d in wd[1:4])
        if xd[0] != {n} or xd[1] != {ic} or xd[2] != {y, kh} or xd[3] != {x, kw}:
            return None
        red = {"ic": ic, "kh": kh, "kw": kw}
    else:
        return None
    roles = {"n": n, "ob": ob, "y": y, "x": x, "oi": oi, **red}
    if len(roles) != len(ivs) or set(roles.values()) != block_vars:
        return None
    loop_of = {iv.var: lp for iv, lp in zip(ivs, loops)}
    ext = {iv.var: static_int(iv.dom.extent) for iv in ivs}
    e = {k: ext[v] for k, v in roles.items()}
    symbolic = e["y"] is None or e["x"] is None
    if symbolic:  # (a detector's H x W): tiled for SYMBOLIC_MAP times what the size is a multiple of
        if kind == "conv" and flat_read:
            return None
        dom = {iv.var: iv.dom.extent for iv in ivs}
        e["y"] = SYMBOLIC_MAP * _multiple_of(dom[y]) if e["y"] is None else e["y"]
        e["x"] = SYMBOLIC_MAP * _multiple_of(dom[x]) if e["x"] is None else e["x"]
    if any(v is None for k, v in e.items() if k != "n"):
        return None
    if e["oi"] % lanes or (kind == "conv" and flat_read and e["y"] != 1):
        return None
    # stride from the input index: y*s + kh*d → the coefficient of y
    stride = _stride_of(ins[1 - wi], y) or 1
    stride = max(stride, _stride_of(ins[1 - wi], x) or 1)
    red_len = e.get("icb", 1) * e.get("ii", 1) * e.get("ic", 1) * e["kh"] * e["kw"]
    rows = stmt.annotations.get(FLAT_ROWS) if kind == "conv" and e["y"] == 1 else None
    pad_rows = tuple(int(v) for v in rows) if rows is not None and len(rows) == 6 else ()
    shape = ConvShape(kind, e["ob"], e["y"], e["x"], red_len, e["kh"], e["kw"], stride, pad_rows)
    x_extent = dom[x] if symbolic and ext[x] is None else None
    return _Match(kind, {k: loop_of[v] for k, v in roles.items()}, e, shape, symbolic, x_extent)


def _stride_of(region: Any, var: Any) -> int | None:
    """The coefficient of `var` in the dimension of `region` that uses it (linear indices)."""
    from tvm.sym.pattern import detect_linear_equation

    for r in region.region:
        try:
            coeffs = detect_linear_equation(r.min, [var])
        except Exception:
            continue
        if len(coeffs) == 2:
            c = static_int(coeffs[0])
            if c:
                return c
    return None


#: parallel iterations the loops outside a serial tile loop must give (else the tiles join them)
_SERIAL_TILES_MIN_PARALLEL = 16


def _serial_tiles(sch: "tvm.s_tir.Schedule", tile: ConvTile, parallel: list[Any]) -> bool:
    """Whether the tile loop stays serial under a parallel loop over `parallel` (see ConvTile).
    Measured single thread, 1x1 64->256 on 14x14 (3 px x 4 blocks): the tile loop fused into the
    parallel loop 66 GFLOP/s, serial 77 (onnxruntime 86): with a short reduction the division
    chain that recovers a tile's indices from the fused index costs as much as a third of it."""
    if tile.serial_tiles is not None:
        return tile.serial_tiles
    n = 1
    for lp in parallel:
        e = static_int(sch.get(lp).extent)
        n *= e if e is not None else _SERIAL_TILES_MIN_PARALLEL
    return n >= _SERIAL_TILES_MIN_PARALLEL


def _cores(target: Any) -> int:
    v = static_int(target.attrs.get("num-cores", 1)) if hasattr(target, "attrs") else None
    return max(1, v or 1)


def _flat_parts(width: int, tiles: int, cores: int) -> int:
    """Parts of a flat conv's `tiles` pixel tiles that join its parallel loop of `width`
    iterations: 1 where `width` already divides among the `cores`, else the fewest parts (a
    divisor of `tiles`) that make it divide, 0 where none does (the tiles then join it whole)."""
    if width % cores == 0:
        return 1
    return next((d for d in range(2, tiles + 1) if tiles % d == 0 and (width * d) % cores == 0), 0)


def _partition_pad_cols(sch: "tvm.s_tir.Schedule", pad: Any, col_loop: Any) -> None:
    """Split the column loop of a pad block computed under a row loop into the left border, the
    interior and the right border: in the interior the column half of the pad's condition is
    provably true and drops out, so the copy has no per-pixel branch (the row half is uniform
    over the row). Left alone where the split does not apply."""
    from tvm.sym.pattern import detect_linear_equation

    stmt = sch.get(pad)
    if len(stmt.reads) != 1:
        return
    region = stmt.reads[0].region
    src_shape = stmt.reads[0].source.shape
    loop = sch.get(col_loop)
    ext = static_int(loop.extent)
    dim = 3  # [n, c, rows, cols, (b)]
    if ext is None or len(region) <= dim or len(stmt.iter_vars) <= dim:
        return
    coeffs = detect_linear_equation(region[dim].min, [stmt.iter_vars[dim].var])
    width = static_int(src_shape[dim])
    if len(coeffs) != 2 or static_int(coeffs[0]) != 1 or static_int(coeffs[1]) is None or width is None:
        return
    left = -static_int(coeffs[1])  # the pad column c reads input column c - left
    mid = min(width, ext - left)
    if left < 0 or mid <= 0:
        return
    factors = [f for f in (left, mid, ext - left - mid) if f > 0]
    if len(factors) > 1:
        sch.loop_partition(col_loop, [*factors[:-1], None])  # (the last part: what remains)


def loops_below(sch: "tvm.s_tir.Schedule", block: Any, loop: Any) -> list[Any]:
    """The loops of `block` inside `loop` (a symbolic batch adds a serial loop outside it, so
    counting from the outermost loop is off by one: it unrolled the tile loop, or a small
    parallel loop, of every blocked conv / depthwise of a model with a symbolic batch)."""
    loops = sch.get_loops(block)
    at = next(k for k, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(loop)))
    return loops[at + 1 :]


#: calls that make an epilogue long per element (dozens of instructions per vector)
_TRANSCENDENTAL = ("T.sigmoid(", "T.exp(", "T.tanh(", "T.erf(", "T.log(")


def _heavy_int8_epilogue(sch: "tvm.s_tir.Schedule", wb: Any) -> bool:
    """Whether the write-back `wb` of int32 sums (an int8 kernel) carries a transcendental in its
    inlined epilogue (a quantized SiLU: requantize, dequantize, sigmoid, requantize, multiply,
    requantize). Unrolled over the tile's 8 pixels, such a write-back made each int8 depthwise
    kernel of EfficientNet-B0 ~5.8k lines of LLVM IR; it stays a loop (one vector per pixel is
    plenty of work per iteration). fp32 kernels keep their unrolled write-backs."""
    stmt = sch.get(wb)
    if not stmt.reads or not any(str(r.source.dtype) == "int32" for r in stmt.reads):
        return False
    text = stmt.body.script() if hasattr(stmt.body, "script") else str(stmt.body)
    return any(t in text for t in _TRANSCENDENTAL)


def write_back_loops(sch: "tvm.s_tir.Schedule", loops: list[Any], lanes: int) -> None:
    """The write-back's loops below its tile loop (and a Winograd transform's loops below its
    parallel one): the innermost vectorised when it spans one vector (the block's channels), the
    others unrolled up to 64 iterations (the tile's pixels and output blocks; the transform's
    positions)."""
    inner = list(loops)
    if inner and static_int(sch.get(inner[-1]).extent) == lanes:
        sch.vectorize(inner[-1])
        inner = inner[:-1]
    for lp in inner:
        e = static_int(sch.get(lp).extent)
        if e is not None and 1 < e <= 64:
            sch.unroll(lp)


def fuse_prologue(sch: "tvm.s_tir.Schedule", anchor: Any, lanes: int, machine: Any = None) -> Any:
    """Fuse the elementwise chain that computes blocked conv `anchor`'s input inside the kernel
    into one pass, and schedule it; returns the fused block, or None where it does not apply.

    DenseNet is BN-ReLU-Conv: its 1x1 convs' groups read Concat -> BatchNorm (x * s + t) ->
    Relu, whose BN folds into no conv. The prologue stays materialised (inlined into the conv's
    reads it is recomputed per output block tile, inside the reduction), but as one block rather
    than one parallel pass per op (four passes and four thread-pool launches per conv, 11 of a
    14x14 dense layer's 36 input blocks written and read back three times). A concat's select
    chain (`if c >= 34: a10[c - 34] elif c >= 32: a9 ...`, one compare per input, up to 32 of
    them per vector) is resolved at compile time: the channel-block loop runs innermost under
    a parallel loop over the pixels and is split at the inputs' boundaries, so each part reads
    one input without conditions.

    A materialised pad (flat 3x3 convs on small maps) takes the chain into its one pass too, its
    loops scheduled as before. Must not fire: where the pad is computed under the conv's row loop
    (`ConvTile.pad_row`: the chain would be recomputed per kernel row; the caller does not call
    it then), on a reduction, where a chain block feeds other blocks too (an output of the group),
    or on blocks of another shape than the input's (broadcasts computed once stay separate)."""
    from tvm.sym.pattern import detect_linear_equation

    prods = [p for p in sch.get_producers(anchor) if not is_reduction(sch.get(p))]
    if len(prods) != 1:
        return None
    last = prods[0]
    stmt = sch.get(last)
    if len(stmt.writes) != 1 or len(stmt.writes[0].region) != 5:
        return None
    padded = "if_then_else" in str(stmt.body)  # (a pad: the chain inlined into it, scheduled as it was)
    shape = None if padded else [static_int(d) for d in stmt.writes[0].source.shape]
    changed = True
    while changed:
        changed = False
        for q in sch.get_producers(last):
            qs = sch.get(q)
            if is_reduction(qs) or len(qs.writes) != 1 or len(sch.get_consumers(q)) != 1:
                continue
            if shape is not None and [static_int(d) for d in qs.writes[0].source.shape] != shape:
                continue
            if padded and len(qs.writes[0].region) != 5:
                continue
            try:
                sch.compute_inline(q)
                changed = True
            except Exception:  # noqa: BLE001 - not inlinable (an opaque block): it stays its own pass
                continue
    if padded:
        return None
    stmt = sch.get(last)
    ivs = list(stmt.iter_vars)
    loops = sch.get_loops(last)
    if len(loops) != 5 or len(ivs) != 5 or any(sch.get(lp).kind != 0 for lp in loops):
        return None
    dims = region_vars(stmt.writes[0], {iv.var for iv in ivs})
    if [len(d) for d in dims] != [1] * 5 or [next(iter(d)) for d in dims] != [iv.var for iv in ivs]:
        return None
    n, c, h, w, b = loops
    ext_c = static_int(sch.get(c).extent)
    cvar = ivs[1].var
    bounds = {0, ext_c} if ext_c is not None else set()
    for r in stmt.reads:
        if len(r.region) != 5 or ext_c is None:
            continue
        src_c = static_int(r.source.shape[1])
        coeffs = detect_linear_equation(r.region[1].min, [cvar])
        if src_c is None or src_c >= ext_c or len(coeffs) != 2 or static_int(coeffs[0]) != 1:
            continue
        off = static_int(coeffs[1])
        if off is not None and off <= 0 and -off + src_c <= ext_c:
            bounds |= {-off, -off + src_c}  # (a concat input read at c - k: channel blocks [k, k + its count))
    cuts = sorted(bounds)
    sch.reorder(n, h, w, c, b)
    fuse_parallel(sch, [n, h, w], machine)  # (the machine model: a small pass takes a symbolic batch in)
    parts = [c]
    if len(cuts) > 2:
        sizes = [hi - lo for lo, hi in zip(cuts, cuts[1:])]
        parts = sch.loop_partition(c, [*sizes[:-1], None])  # (the last part: what remains)
    for part in parts:
        for blk in sch.get_child_blocks(part) if len(parts) > 1 else [last]:
            inner = sch.get_loops(blk)[-1]
            if static_int(sch.get(inner).extent) == lanes:
                sch.vectorize(inner)
    return last


class BlockedConv(ScheduleRule):
    """conv2d_blocked / conv2d_stem + epilogue (see module docstring); depthwise_blocked and
    pool_blocked kernels go to `BlockedWindow` (so one entry in the default rules covers the
    blocked layout's kernels)."""

    name = "blocked-conv"

    def __init__(self, tile: ConvTile | None = None, window: "BlockedWindow | None" = None) -> None:
        self.tile = tile
        self.window = window

    def apply(self, func, target, lanes):
        sch = self._conv(func, target, lanes)
        if sch is None:
            sch = (self.window or BlockedWindow()).apply(func, target, lanes)
        return sch

    def _conv(self, func, target, lanes):
        lanes = kernel_block(func, lanes)
        opened = one_reduction(func)
        if opened is None:
            return None
        return self.schedule_conv(*opened, target, lanes)

    def schedule_conv(self, sch, anchor, target, lanes):
        """Schedule the conv reduction `anchor` of `sch` and its epilogue (the root-level blocks
        left unscheduled get an injective schedule; those with a parallel or vector loop already
        are left as they are); None where it does not apply (`sch` may be half scheduled then)."""
        m = match_blocked_conv(sch, anchor, lanes)
        if m is None:
            return None
        machine = machine_model(target)
        tile = self.tile or conv_tile(m.shape, machine, block=lanes)
        pad = None
        if tile.pad_row and tile.order == "row":
            pads = [p for p in sch.get_producers(anchor) if "if_then_else" in str(sch.get(p).body)]
            pad = pads[0] if len(pads) == 1 else None
        if pad is None:
            inline_copies(sch, anchor, moves_only=knobs.current().materialise_prologue)
            if knobs.current().fuse_prologue and knobs.current().materialise_prologue:
                fuse_prologue(sch, anchor, lanes, machine)
        m = match_blocked_conv(sch, anchor, lanes)  # loops are the same, refetch the handles
        if m is None:
            return None
        # conv2d_blocked_flat: pixel tiles of a one-row conv whose write-back (crop, unflatten
        # and epilogue inlined) writes out[.., p // W, p % W, ..]; the tile loop stays serial
        flat = m.ext["y"] == 1 and any(sch.get(b).name_hint.startswith("unflatten") for b in sch.get_child_blocks(root_block(sch)))
        L = m.loops
        rt, obt = tile.rt, tile.obt
        if m.ext["ob"] % obt:
            return None
        ob_o, ob_i = sch.split(L["ob"], factors=[None, obt])
        ragged = m.ext["x"] % rt != 0  # (symbolic: SYMBOLIC_MAP x the known multiple)
        if ragged and (not tile.tail or tile.order not in ("ob", "row") or tile.serial_tiles is False):
            # (a predicated tail tile keeps its accumulators in memory, and tiles of the fused
            # row*column axis that cross rows are written back wrongly: the write-back's region
            # is the bounding box of the tile)
            return None
        # a flat conv's parallel loop is (batch, output block tiles): where that does not divide
        # among the cores (DenseNet's 4 blocks, one tile: one core of two busy) its pixel tiles
        # join it in parts, or whole where their count has no fitting divisor (`_flat_parts`)
        parts = 1
        if flat and tile.order in ("ob", "blk"):
            parts = _flat_parts((m.ext["n"] or 1) * (m.ext["ob"] // obt), -(-m.ext["x"] // rt), _cores(target))
        if parts != 1 and tile.row_passes:
            if self.tile is not None:
                return None
            tile = conv_tile(m.shape, machine, row_passes=False, block=lanes)  # (the same pixels x blocks)
        p_o, p_i = sch.split(L["x"], factors=[None, rt])
        part = []
        if parts > 1:
            p_part, p_o = sch.split(p_o, factors=[parts, None])
            part = [p_part]
        chunked = (tile.k_chunk and m.kind == "conv" and tile.order == "ob" and pad is None
                   and m.ext["icb"] > tile.k_chunk and m.ext["icb"] % tile.k_chunk == 0)
        # (row passes need chunks of input blocks: with the kernel row outermost alone the weights
        # stream with gaps, 64-71 GFLOP/s on 3x3 512 on 7x7)
        passes = (tile.row_passes and flat and m.shape.pad_rows and m.kind == "conv" and tile.order == "ob"
                  and pad is None and tile.k_chunk and m.ext["icb"] % tile.k_chunk == 0)
        if tile.row_passes and not passes:
            return None
        if tile.order == "blk":
            # chunks of output blocks whose weights fit in L2: rows inside a chunk, the chunk's
            # blocks inside a row (weights read once, the input once per chunk)
            n_o = m.ext["ob"] // obt
            per_block = m.shape.red * lanes * obt * 4  # bytes of weights per tile column
            chunk = max([d for d in divisors_of(n_o) if d * per_block <= machine.l2_bytes * L2_WEIGHT_SHARE] or [1])
            ob_oo, ob_oi = sch.split(ob_o, factors=[None, chunk])
            outer = [L["n"], ob_oo, L["y"], *part, ob_oi, p_o]
        else:
            outer = {"ob": [L["n"], ob_o, L["y"], *part, p_o], "row": [L["n"], L["y"], ob_o, p_o],
                     "pix": [L["n"], L["y"], p_o, ob_o]}[tile.order]
        oi_o, oi_i = sch.split(L["oi"], factors=[None, lanes])
        if m.kind == "conv":
            red = [L["icb"], L["kh"], L["kw"], L["ii"]]
        else:
            red = [L["ic"], L["kh"], L["kw"]]
        inner_tile = (p_i, ob_i) if tile.ob_inner else (ob_i, p_i)
        s = _ConvSplit(L, ob_o, ob_i, p_o, p_i, oi_o, oi_i, part, red, inner_tile)
        if chunked or passes:
            return _schedule_chunked(sch, anchor, m, tile, s, lanes, bool(passes), ragged, machine)
        return _schedule_tiles(sch, anchor, m, tile, s, outer, lanes, pad, bool(flat and parts), ragged, machine)


@dataclass
class _ConvSplit:
    """A blocked conv's loops after the tile splits (`BlockedConv.schedule_conv`)."""

    L: dict[str, Any]  # role -> loop, as matched
    ob_o: Any
    ob_i: Any  # output blocks of the tile
    p_o: Any
    p_i: Any  # pixels of the tile
    oi_o: Any
    oi_i: Any  # the block's channels (one vector)
    part: list[Any]  # (flat convs) the pixel tiles' part loop joining the parallel loop
    red: list[Any]  # the reduction loops
    inner_tile: tuple[Any, Any]  # the unrolled tile, outer first


def _mark_ragged(sch: Any, p_o: Any, m: _Match, rt: int, shift: bool = True) -> None:
    """Mark the pixel-tile loop `p_o` of a ragged row for `apply_loop_marks` (its last iteration
    peeled); on symbolic columns with the tile's pixel count and the split extent too, so the
    tiles run without split predicates, the last one shifted back (`loop_marks.PEEL_BOUND`).
    Static rows, and (`shift=False`) tiles that do not start their accumulators afresh (a
    reduction in chunks: the overlap would be added twice), keep the plain mark."""
    if m.x_extent is None or not shift:
        sch.annotate(p_o, PEEL_LAST, 1)
        return
    sch.annotate(p_o, PEEL_LAST, rt)
    sch.annotate(p_o, PEEL_BOUND, str(m.x_extent))


def _schedule_chunked(sch: Any, anchor: Any, m: _Match, tile: ConvTile, s: _ConvSplit, lanes: int, passes: bool,
                      ragged: bool, machine: Any = None) -> Any:
    """The reduction in chunks of input blocks (`ConvTile.k_chunk`) or in row passes
    (`ConvTile.row_passes`), the accumulators of all the block's pixels in a local buffer."""
    L, ob_o, ob_i, p_o, p_i, oi_o, oi_i = s.L, s.ob_o, s.ob_i, s.p_o, s.p_i, s.oi_o, s.oi_i
    part, inner_tile, rt = s.part, s.inner_tile, tile.rt
    # n, ob | icb chunk | row, pixel tile | icb in chunk, kh, kw, ii | tile ; the
    # accumulators of all the block's pixels in a local buffer, written back (with the
    # epilogue) after the last chunk: a chunk's weights stay in L2 across every tile.
    # Row passes: n, ob | icb chunk, kh | pixel tiles in the kernel row's range | icb in
    # chunk, kw, ii | tile (the pass's weights stay in L1)
    chunk_loop, icb_i = sch.split(L["icb"], factors=[None, tile.k_chunk])
    red_in = [icb_i, L["kw"], L["ii"]] if passes else [icb_i, L["kh"], L["kw"], L["ii"]]
    chunk_loops = [chunk_loop, L["kh"]] if passes else [chunk_loop]
    sch.reorder(L["n"], ob_o, *part, *chunk_loops, L["y"], p_o, oi_o, *red_in, *inner_tile, oi_i)
    per_item = all(static_int(sch.get(lp).extent) == 1 for lp in [ob_o, *part])
    fused = fuse_parallel(sch, [L["n"], ob_o, *part], machine)
    wb = sch.cache_write(anchor, 0, "local")
    sch.reverse_compute_at(wb, fused, preserve_unit_loops=True)
    inline_consumers(sch, wb)
    if per_item and knobs.current().pad_per_item:
        _pad_per_item(sch, anchor, fused, lanes)
    sch.vectorize(oi_i)
    sch.unroll(p_i)
    sch.unroll(ob_i)
    sch.unroll(L["ii"])
    init = sch.decompose_reduction(anchor, chunk_loop)
    sch.vectorize(sch.get_loops(init)[-1])
    wl = sch.get_loops(wb)
    if static_int(sch.get(wl[-1]).extent) == lanes:
        sch.vectorize(wl[-1])
    schedule_rest(sch, {sch.get(b).name_hint for b in (anchor, wb, init)}, lanes, machine)
    if ragged:
        _mark_ragged(sch, p_o, m, tile.rt, shift=False)
    if passes:
        ranges = row_tile_ranges(m.shape.pad_rows, m.ext["kh"], rt, m.ext["x"] // rt)
        sch.annotate(L["kh"], ROW_PASS, "kh")
        sch.annotate(p_o, ROW_PASS, ";".join(f"{lo},{hi}" for lo, hi in ranges))
    return sch


def _pad_per_item(sch: Any, anchor: Any, fused: Any, lanes: int) -> bool:
    """A materialised pad (its own parallel pass over the whole batch: a flat conv's padded
    input) computed under the conv's parallel loop `fused` instead, where each of its iterations
    is one batch item (the caller checks: the batch fused with loops of extent 1 only): the
    item's padded input is written and then read by the same thread while in L2, not written
    for the whole batch and read back from L3 or memory. mnist_resnet8 at batch 64: the 16-channel
    28x28 pad is 3.7 MB per call. Returns whether it moved. Must not fire where an iteration is
    part of an item (output block tiles or pixel parts in the parallel loop: each would pad the
    whole item again), or the pad is decomposed into a fill and a copy (two blocks)."""
    pads = [p for p in sch.get_producers(anchor)
            if not is_reduction(sch.get(p)) and "if_then_else" in str(sch.get(p).body)]
    if len(pads) != 1:
        return False
    pad_block = pads[0]
    try:
        sch.compute_at(pad_block, fused, preserve_unit_loops=True)
    except Exception:  # noqa: BLE001 - a region compute_at cannot cover: the pad stays a pass of its own
        return False
    pl = loops_below(sch, pad_block, fused)
    if pl and static_int(sch.get(pl[-1]).extent) == lanes:
        sch.vectorize(pl[-1])
    return True




def stack_tile_fires(machine: Any, tile_bytes: int) -> bool:
    """Whether a conv's register tile of `tile_bytes` is marked `STACK_TILE` (its "local"
    buffer a stack array rather than a workspace with a memset and a store + reload per tile,
    `targets.tvm.stack_tiles`): tiles of at least STACK_ALLOCA_BYTES (AVX-512's 24 zmm
    accumulators, 1536 bytes) that fit the machine model's register file. Not AVX2's 12 ymm
    (384 bytes): no gain measured there, its kernels stay as they were. Off with the
    `stack_tile` knob. ResNet-50's 1x1 convs on 56x56, Zen 4, 2 threads, paired rounds at load
    ~7 (tools/bench_stack_tiles.py): 64 -> 64 0.91x, 64 -> 256 0.94x / 0.90x (+ Add, Relu),
    256 -> 64 0.95x, 1024 -> 256 on 14x14 0.96x the workspace tile's time."""
    if machine is None or not knobs.current().stack_tile:
        return False
    return STACK_ALLOCA_BYTES <= tile_bytes <= stack_tile_bytes(machine)


def _schedule_tiles(sch: Any, anchor: Any, m: _Match, tile: ConvTile, s: _ConvSplit, outer: list[Any], lanes: int,
                    pad: Any, serial_flat: bool, ragged: bool, machine: Any = None) -> Any:
    """The register tile under the outer loops (the usual case): the accumulators in
    registers for the whole reduction, written back through the epilogue; a pad computed under
    the row loop where the tile asks for it."""
    L, ob_i, p_o, p_i, oi_o, oi_i = s.L, s.ob_i, s.p_o, s.p_i, s.oi_o, s.oi_i
    red, inner_tile = s.red, s.inner_tile
    sch.reorder(*outer, oi_o, *red, *inner_tile, oi_i)
    outer = outer + [oi_o]
    serial = pad is None and (serial_flat or ragged or _serial_tiles(sch, tile, outer[:-2]))
    # (each iteration of the parallel loop one whole batch item: the loops fused with the batch
    # are of extent 1)
    per_item = serial and len(outer) > 2 and all(static_int(sch.get(lp).extent) == 1 for lp in outer[1:-2])
    if pad is not None:
        fused = fuse_parallel(sch, outer[:2], machine)  # (n, y)
        tile_loop = outer[-1]
    elif serial:
        fused = fuse_parallel(sch, outer[:-2], machine)
        tile_loop = outer[-1]
    else:
        fused = tile_loop = fuse_parallel(sch, outer, machine)

    wb = sch.cache_write(anchor, 0, "local")
    sch.reverse_compute_at(wb, tile_loop, preserve_unit_loops=True)
    inline_consumers(sch, wb)
    if stack_tile_fires(machine, tile.rt * tile.obt * lanes * 4):
        sch.annotate(wb, STACK_TILE, 1)
    if pad is None and per_item and knobs.current().pad_per_item:
        _pad_per_item(sch, anchor, fused, lanes)
    if pad is not None:
        sch.compute_at(pad, fused, preserve_unit_loops=True)
        pl = sch.get_loops(pad)
        if static_int(sch.get(pl[-1]).extent) == lanes:
            sch.vectorize(pl[-1])
            if tile.partition_pad:
                _partition_pad_cols(sch, pad, pl[-2])

    sch.vectorize(oi_i)
    sch.unroll(p_i)
    sch.unroll(ob_i)
    if m.kind == "conv" and not (m.symbolic and knobs.current().symbolic_conv_ii_loop):
        sch.unroll(L["ii"])
    if tile.unroll_kw or m.kind == "stem":
        sch.unroll(L["kw"])
    init = sch.decompose_reduction(anchor, red[0])
    sch.vectorize(sch.get_loops(init)[-1])

    write_back_loops(sch, loops_below(sch, wb, tile_loop), lanes)
    done = {sch.get(b).name_hint for b in (anchor, wb, init)}  # (a pad under the row loop is no root block)
    schedule_rest(sch, done, lanes, machine)
    if ragged:
        _mark_ragged(sch, p_o, m, tile.rt)
    return sch


@dataclass
class _WindowMatch:
    kind: str  # "depthwise" | "pool"
    loops: dict[str, Any]
    ext: dict[str, int]
    pad: Any  # the pad block (or None)
    mult: dict[str, int] | None = None  # symbolic map: what its rows / columns are provably a multiple of
    x_extent: Any = None  # (symbolic columns) the column loop's extent


def is_blocked_window(func: "tvm.tirx.PrimFunc", lanes: int) -> bool:
    """Whether `func` (unscheduled) is a depthwise_blocked or pool_blocked kernel: what
    `BlockedConv` hands to `BlockedWindow` (both report the rule name "blocked-conv")."""
    try:
        opened = one_reduction(func)
        return opened is not None and match_blocked_window(*opened, kernel_block(func, lanes)) is not None
    except Exception:  # noqa: BLE001 - a kernel the matcher does not understand: not a window
        return False


def match_blocked_window(sch: "tvm.s_tir.Schedule", anchor: Any, lanes: int) -> _WindowMatch | None:
    """Roles of the anchor's loops when it is a depthwise_blocked or pool_blocked reduction:
    out[n, cb, y, x, ci] (+)= in[n, cb, y*s+kh*d, x*s+kw*d, ci] (* w[cb, kh, kw, ci]); None
    otherwise."""
    from tvm.tirx import IterVar

    stmt = sch.get(anchor)
    if len(stmt.writes) != 1:
        return None
    ivs = list(stmt.iter_vars)
    loops = sch.get_loops(anchor)
    if len(loops) != len(ivs) or len(ivs) != 7:
        return None
    block_vars = {iv.var for iv in ivs}
    out_buf = stmt.writes[0].source
    ins = [r for r in stmt.reads if not r.source.same_as(out_buf)]
    od = region_vars(stmt.writes[0], block_vars)
    if len(od) != 5 or any(len(d) != 1 for d in od):
        return None
    n, cb, y, x, ci = (next(iter(d)) for d in od)
    kinds = {iv.var: iv.iter_type for iv in ivs}
    reds = [iv.var for iv in ivs if iv.iter_type == IterVar.CommReduce]
    if any(kinds[v] != IterVar.DataPar for v in (n, cb, y, x, ci)) or len(reds) != 2:
        return None
    xs = [r for r in ins if len(r.region) == 5]
    ws = [r for r in ins if len(r.region) == 4]
    if len(xs) != 1 or len(xs) + len(ws) != len(ins) or len(ws) > 1:
        return None
    xd = region_vars(xs[0], block_vars)
    if xd[0] != {n} or xd[1] != {cb} or xd[4] != {ci} or len(xd[2]) != 2 or len(xd[3]) != 2:
        return None
    (kh,) = xd[2] - {y}
    (kw,) = xd[3] - {x}
    if {kh, kw} != set(reds) or y not in xd[2] or x not in xd[3]:
        return None
    if ws and region_vars(ws[0], block_vars) != [{cb}, {kh}, {kw}, {ci}]:
        return None
    roles = {"n": n, "cb": cb, "y": y, "x": x, "ci": ci, "kh": kh, "kw": kw}
    loop_of = {iv.var: lp for iv, lp in zip(ivs, loops)}
    ext = {iv.var: static_int(iv.dom.extent) for iv in ivs}
    e = {k: ext[v] for k, v in roles.items()}
    if any(v is None for k, v in e.items() if k not in ("n", "y", "x")) or e["ci"] % lanes:
        return None
    dom = {iv.var: iv.dom.extent for iv in ivs}
    # a symbolic map (a detector's or recognizer's H x W): tiles dividing what its size is a multiple of
    mult = {k: _multiple_of(dom[roles[k]]) for k in ("y", "x") if e[k] is None} or None
    pad = None
    for prod in sch.get_producers(anchor):
        if sch.get(prod).writes[0].source.same_as(xs[0].source) and not is_reduction(sch.get(prod)):
            pad = prod
    x_extent = dom[x] if e["x"] is None else None
    return _WindowMatch("depthwise" if ws else "pool", {k: loop_of[v] for k, v in roles.items()}, e, pad, mult, x_extent)


class BlockedWindow(ScheduleRule):
    """depthwise_blocked / pool_blocked (+ epilogue: bias, Clip, the average's division): a tile
    of `rt` output pixels x `ry` output rows x the `b` channels of a block (one vector each)
    accumulated in registers, the window (kh, kw) unrolled around it.

    The pad block is not materialised whole (the generic rule fills and copies the whole padded
    input: ResNet-50's max pool ran 7-8x onnxruntime's time):
    - `pad="row"` (default for rows wider than 7): parallel over (batch, block, row tiles), the
      padded input rows of a row tile computed under that loop, their column loop split into
      borders and interior (`partition_pad`) so the interior copy has no condition;
    - `pad="inline"` (default for 7-wide rows): the pad's select inlined into the window loop;
    - `pad="at"`: the pad computed per pixel tile."""

    name = "blocked-window"

    def __init__(self, rt: int | None = None, pad: str | None = None, ry: int | None = None,
                 partition_pad: bool = True) -> None:
        self.rt = rt
        self.pad = pad
        self.ry = ry
        self.partition_pad = partition_pad

    def apply(self, func, target, lanes):
        lanes = kernel_block(func, lanes)
        opened = one_reduction(func)
        if opened is None:
            return None
        sch, anchor = opened
        m = match_blocked_window(sch, anchor, lanes)
        if m is None:
            return None
        L = m.loops
        ow, oh = m.ext["x"], m.ext["y"]
        mult = m.mult or {}
        machine = machine_model(target)
        if mult and self.pad not in (None, "inline"):
            return None  # (the row-wise pad's column partition needs static columns)
        pad_mode = self.pad or ("row" if m.pad is not None and not mult and ow > 7 else "inline")
        if m.pad is not None and pad_mode == "inline":
            sch.compute_inline(m.pad)
        # two output rows per tile share their input rows (4 x 2 pixels measured best); a symbolic
        # extent takes tiles dividing its known multiple (whole tiles, no predicate); symbolic
        # columns whose multiple gives a tile of fewer than 8 // ry pixels (a recognizer's W: 1 x 2)
        # take the static rule's tile at a wide row instead, its last tile shifted back to end at
        # the row's end (`_symbolic_tail`)
        oh_k, ow_k = mult.get("y", oh), mult.get("x", ow)
        ry = self.ry or (2 if oh_k % 2 == 0 else 1)
        rt = self.rt or max(d for d in divisors_of(ow_k) if d * ry <= 8)
        tail = "x" in mult and self.rt is None and rt * ry < 8
        if tail:
            rt = 8 // ry
        if (ow_k % rt and not tail) or oh_k % ry:
            return None
        ci_o, ci_i = sch.split(L["ci"], factors=[None, lanes])
        x_o, x_i = sch.split(L["x"], factors=[None, rt])
        y_o, y_i = sch.split(L["y"], factors=[None, ry])
        sch.reorder(L["n"], L["cb"], y_o, x_o, ci_o, L["kh"], L["kw"], y_i, x_i, ci_i)
        row_pad = m.pad is not None and pad_mode == "row"
        if row_pad:
            # the padded input rows of `ry` output rows, computed under the (batch, block, rows)
            # loop: the window loop reads them without conditions (decompose_padding refuses a
            # pad block under compute_at, so the copy keeps its condition per pixel)
            fused = fuse_parallel(sch, [L["n"], L["cb"], y_o], machine)
            tile_loop = x_o
        elif "x" in mult:
            # symbolic columns: the column tiles a serial loop under (batch, block, rows, the
            # block's vector), whose indices are then increments (fused in, each tile recovered its
            # indices by divisions by the symbolic row length: the recognizer's 2x2 pools ran
            # 1.7-2x the static kernel's time)
            sch.reorder(y_o, ci_o, x_o)
            fused = fuse_parallel(sch, [L["n"], L["cb"], y_o, ci_o], machine)
            tile_loop = x_o
        else:
            fused = fuse_parallel(sch, [L["n"], L["cb"], y_o, x_o, ci_o], machine)
            tile_loop = fused
        wb = sch.cache_write(anchor, 0, "local")
        sch.reverse_compute_at(wb, tile_loop, preserve_unit_loops=True)
        inline_consumers(sch, wb)  # (an int8 depthwise's quantized SiLU included)
        if m.pad is not None and pad_mode in ("at", "row"):
            sch.compute_at(m.pad, fused, preserve_unit_loops=True)
            pl = sch.get_loops(m.pad)
            if static_int(sch.get(pl[-1]).extent) == lanes:
                sch.vectorize(pl[-1])
            if row_pad and self.partition_pad:
                _partition_pad_cols(sch, m.pad, pl[-2])
        sch.vectorize(ci_i)
        sch.unroll(x_i)
        sch.unroll(y_i)
        sch.unroll(L["kh"])
        sch.unroll(L["kw"])
        init = sch.decompose_reduction(anchor, L["kh"])
        sch.vectorize(sch.get_loops(init)[-1])
        below = loops_below(sch, wb, tile_loop)
        if _heavy_int8_epilogue(sch, wb):
            below = below[-1:]  # (the lanes vectorized; the pixels stay a loop)
        write_back_loops(sch, below, lanes)
        done = {sch.get(b).name_hint for b in (anchor, wb, init)}  # (a pad under the row loop is no root block)
        schedule_rest(sch, done, lanes, machine)
        if tail:
            sch.annotate(x_o, PEEL_LAST, rt)
            sch.annotate(x_o, PEEL_BOUND, str(m.x_extent))
        return sch

"""Switches of the default schedules' refinements, each on by default: turning one off gives the
schedule from before that refinement, for before/after comparisons in the same run and for tests.

They travel with the target's options, never as module state: `cpu{schedule-knobs=INLINE_EPILOGUE:0;
MATMUL_K_BLOCK:0}` (or `tools/bench_tvm_cpu.py --schedule-knobs ...`) gives the build a
`ScheduleKnobs`, and the build schedules inside `using(knobs)`; the rules read `current()`. A
scoped value rather than a rule argument because dlight's rule interface (`apply(func, target,
...)`) has no options channel, the way TVM's own passes read `PassContext.current().config`."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from graphopt.errors import UsageError

__all__ = ["ScheduleKnobs", "DEFAULTS", "current", "using"]


@dataclass(frozen=True)
class ScheduleKnobs:
    #: window reductions (depthwise conv, pooling): a tile of output rows x one vector row, up to
    #: `window_acc_vectors` accumulator vectors
    window_row_tile: bool = True
    window_acc_vectors: int = 8
    #: pack [K, N] weights of dense/matmul kernels into [N/vt, K, vt] panels too
    pack_kn_weights: bool = True
    #: inline argument copies (bias reshapes) first so the epilogue inlines into the write-back
    inline_arg_copies: bool = True
    #: erf lowered to a vectorisable polynomial on LLVM targets (see fast_math.use_fast_erf)
    fast_erf: bool = True
    #: `tirx.isnan` vectorisable on LLVM targets (fast_math.use_vector_isnan): NaN-skipping max/min
    #: reductions (max pooling, ReduceMax) vectorised (off: their loops scalarised, as before)
    vector_isnan: bool = True
    #: symbolic (dynamic batch) outer loops stay serial, outside the fused parallel loop
    serial_symbolic_outer: bool = True
    #: injective kernels: the symbolic loops after the first symbolic one inside the fused
    #: parallel loop stay serial inside it (base.fuse_parallel; off: all fused, a division by a
    #: symbolic extent per vector, as before)
    serial_symbolic_inner: bool = True
    #: ... except where one launch of the static loops inside is little work (given the machine
    #: model): the symbolic loops then join the parallel loop (base.fuse_parallel; off: serial
    #: symbolic loops around every such launch, as before)
    symbolic_small_launch: bool = True
    #: materialised pads: decompose into a fill and an interior copy (both vectorisable)
    decompose_padding: bool = True
    #: the elementwise blocks after a matmul/conv inlined into one (GELU reads the matmul twice)
    inline_epilogue: bool = True
    #: matmul-like kernels whose row count leaves accumulators unused (4 rows x 2 vectors) widen
    #: the vector tile
    matmul_wide_vt: bool = True
    #: softmax / layer norm: vectorised row reductions (RowReduction) instead of dlight's serial ones
    row_reduction: bool = True
    #: a vector axis that is no multiple of the lanes padded to one (pad_einsum) instead of declined
    pad_vector_axis: bool = True
    #: matmuls whose row axis is symbolic (a sequence length) take OuterProduct with one-row tiles
    #: (off: WindowReduction's generic tiles, as before)
    symbolic_rows: bool = True
    #: ... and those rows padded (pad_einsum) to a multiple of the row tile a large static row
    #: count gets, a symbolic column axis to two vectors, so the symbolic kernel runs the static
    #: micro-kernel (off: one-row tiles; SymbolicColumns for symbolic columns)
    pad_symbolic_rows: bool = True
    #: matmul-like kernels whose row axis (and column axis) is a symbolic length: whole register
    #: tiles over the unpadded operands, the last tile shifted back to end at the length
    #: (outer_product, loop_marks.PEEL_BOUND; off, or SYMBOLIC_ROWS off: padded rows/columns or
    #: one-row tiles, as before)
    shift_symbolic_tiles: bool = True
    #: matmul-like kernels: reduction blocked by this many (0: off)
    matmul_k_block: int = 128
    #: channel-blocked convs (nchwc): the prologue (pad) materialised before the conv (off: inlined
    #: into the conv's reads, as before)
    materialise_prologue: bool = True
    #: flat convs with padded rows: one reduction pass per kernel row over the tiles it reaches
    #: (tiles.conv_tile)
    row_passes: bool = True
    #: channel-blocked convs (nchwc): the elementwise chain computing the conv's input inside the
    #: kernel (DenseNet's Concat -> BatchNorm -> Relu) fused into one pass, a concat's channel loop
    #: split at its inputs' boundaries (off: one parallel pass per op, the concat's select chain)
    fuse_prologue: bool = True
    #: outer-product kernels: an elementwise prologue chain (a log-magnitude before a conv) is
    #: folded into its last block, one pass instead of one per op (off: a pass per op, as before)
    fold_prologue: bool = True
    #: channel-blocked convs: pixels of a micro-kernel tile at most, twice that for one output
    #: block (`tiles.exact_tiles`, `tiles.odd_tile`; 0: the machine model's tiles as they are,
    #: which fill the accumulators: AVX-512's 8x3, 12x2 and 24x1).
    #: Read by the layout plan too (a flat conv's pixel multiple), so the lowering runs inside it
    conv_tile_pixels: int = 6
    #: kernels with symbolic shapes: each parallel loop nest also compiled serial, the serial one
    #: run where the call's work is small (default.serial_if_small; off: always parallel, as before)
    serial_small_symbolic: bool = True
    #: ... and channel-blocked window kernels (pooling, depthwise) on symbolic maps too: small
    #: unrolled windows, cheap to compile twice (default._NO_SERIAL_BRANCH keeps the convs out;
    #: off: window kernels always parallel, as before)
    serial_small_windows: bool = True
    #: row reductions over [.., h, S, ..] rows: h parallel, the symbolic rows serial inside, not
    #: one fused parallel loop whose divisions by S lose the per-row buffers' bound (row_reduction)
    symbolic_row_loops: bool = True
    #: ... and a symbolic row length S compiled twice, vectorised where S is a multiple of the
    #: lanes (a run-time branch; off: scalar rows at every S, as before)
    vector_symbolic_rows: bool = True
    #: row reductions over a static row length that is no multiple of the lanes (softmax over 77
    #: scores): whole vectors plus a predicated last vector, peeled (loop_marks.PEEL_LAST), for the
    #: reductions' partial results and the elementwise steps (off: scalar rows, as before)
    ragged_rows: bool = True
    #: ... and a symbolic row length S that is no multiple of the lanes (the `else` of
    #: VECTOR_SYMBOLIC_ROWS' branch): whole vectors up to S // lanes, then the guarded tail
    #: (row_reduction._symbolic_tails; off: scalar rows there, as before)
    ragged_symbolic_rows: bool = True
    #: matmuls with two symbolic row axes [N, S, K]: also compiled for N = 1 (one symbolic row
    #: axis, padded to the row tile), chosen at the call (off: one-row tiles at every N)
    batch_one_branch: bool = True
    #: channel-blocked convs on symbolic maps (nchwc._schedule_tiles): the reduction's `ii` loop
    #: (the input block's channels) stays a loop around the register tile, not unrolled: unrolled,
    #: LLVM hoisted the tile's broadcasts ahead of their FMAs and spilled them (crnn_dyn's 16->32
    #: and Winograd 32->32 convs: 25-29 zmm spill/reload ops, none as a loop). Fixed shapes keep it
    #: unrolled (off: unrolled on symbolic maps too, as before)
    symbolic_conv_ii_loop: bool = True
    #: RNN/GRU/LSTM input projection X [T, B, I] x Wᵀ lowered as one [T*B, I] x [I, D*G*H] matmul
    #: (reshape views; where T*B is symbolic one fresh row var, so the matmul has one symbolic row
    #: axis and takes the shifted register tiles) instead of [T, B, I] with two symbolic row axes,
    #: whose one-row tiles run at B = 1 (lower/converters/recurrent.py; off: [T, B, I], as before)
    flat_recurrent_rows: bool = True
    #: channel-blocked convs parallel over whole batch items (flat convs on small maps): their
    #: materialised pad computed per item under that loop, not as a pass over the whole batch
    #: (nchwc._pad_per_item; off: a parallel pad pass first, as before)
    pad_per_item: bool = True
    #: LLVM targets: nearbyint (Round, QuantizeLinear) as llvm.roundeven, which TVM vectorises
    #: (fast_math.vectorisable_rounding; off: nearbyint, its lanes scalar)
    vector_rounding: bool = True
    #: an epilogue op whose other operand is a constant copied by a block of its own (a float
    #: Subtract's ieee_guard): that block inlined first, so the epilogue joins the write-back
    #: (base._inline_constant_producers; off: the rest of the epilogue as passes of their own)
    inline_guard_constants: bool = True
    #: channel-blocked convs: the register tile's "local" buffer a stack array, not a heap
    #: workspace with a memset and a store + reload of the accumulators per pixel tile
    #: (nchwc._schedule_tiles marks the write-back, stack_tiles lowers it; off: workspace, as before)
    stack_tile: bool = True
    #: ... and kernels replayed from a tuning database (variants, meta_schedule's schedules) with
    #: every small "local" buffer on the stack, as the tuner's builder timed them
    #: (stack_tiles.replayed_kernel; off: only the tiles their trace marked, as before)
    stack_tile_replayed: bool = True

    @classmethod
    def parse(cls, text: str) -> ScheduleKnobs:
        """`INLINE_EPILOGUE:0;MATMUL_K_BLOCK:64` (`=` for `:` too; names in any case, `-` or `_`)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        changes: dict[str, bool | int] = {}
        for item in filter(None, (p.strip() for p in text.replace(",", ";").split(";"))):
            name, sep, value = item.replace("=", ":", 1).partition(":")
            key = name.strip().lower().replace("-", "_")
            if key not in fields or not sep:
                raise UsageError(f"schedule knob {item!r}: expected NAME:VALUE with NAME one of "
                                 f"{', '.join(n.upper() for n in fields)}")
            v = value.strip().lower()
            if fields[key].type in ("bool", bool):
                if v not in ("0", "1", "true", "false", "on", "off"):
                    raise UsageError(f"schedule knob {item!r}: {name.strip()} is on or off (1/0)")
                changes[key] = v in ("1", "true", "on")
            else:
                try:
                    changes[key] = int(v)
                except ValueError:
                    raise UsageError(f"schedule knob {item!r}: {name.strip()} takes an integer") from None
        return cls(**changes)  # type: ignore[arg-type]

    def changed(self) -> dict[str, bool | int]:
        """The knobs that differ from the defaults (what a manifest records)."""
        default = DEFAULTS
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    def spec(self) -> str:
        return ";".join(f"{k.upper()}:{int(v)}" for k, v in self.changed().items())


DEFAULTS = ScheduleKnobs()  # (frozen: safe to share)
_CURRENT: ContextVar[ScheduleKnobs] = ContextVar("graphopt_schedule_knobs", default=DEFAULTS)


def current() -> ScheduleKnobs:
    """The knobs of the schedules being built now (the defaults outside `using`)."""
    return _CURRENT.get()


@contextlib.contextmanager
def using(knobs: ScheduleKnobs | None) -> Iterator[ScheduleKnobs]:
    """Schedule with `knobs` inside the block (None: keep the current ones)."""
    token = _CURRENT.set(knobs if knobs is not None else _CURRENT.get())
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)

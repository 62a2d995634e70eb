"""Switches of the default schedules' refinements, each on by default: turning one off gives the
schedule from before that refinement, for before/after comparisons in the same run
(`tools/bench_tvm_cpu.py --schedule-knobs 'INLINE_EPILOGUE=0;MATMUL_K_BLOCK=0'`) and for tests.
The rules read them when they run (`knobs.NAME`), so setting one takes effect at the next compile."""


# window reductions (depthwise conv, pooling): a tile of output rows x one vector row, up to
# this many accumulator vectors
WINDOW_ROW_TILE = True
# pack [K, N] weights of dense/matmul kernels into [N/vt, K, vt] panels too
PACK_KN_WEIGHTS = True
# inline argument copies (bias reshapes) first so the epilogue inlines into the write-back
INLINE_ARG_COPIES = True
# erf lowered to a vectorisable polynomial on LLVM targets (see use_fast_erf)
FAST_ERF = True
# symbolic (dynamic batch) outer loops stay serial, outside the fused parallel loop
SERIAL_SYMBOLIC_OUTER = True
# materialised pads: decompose into a fill and an interior copy (both vectorisable)
DECOMPOSE_PADDING = True
WINDOW_ACC_VECTORS = 8
# the elementwise blocks after a matmul/conv inlined into one (GELU reads the matmul twice)
INLINE_EPILOGUE = True
# matmul-like kernels whose row count leaves accumulators unused (4 rows x 2 vectors) widen the vector tile
MATMUL_WIDE_VT = True
# softmax / layer norm: vectorised row reductions (RowReduction) instead of dlight's serial ones
ROW_REDUCTION = True
# a vector axis that is no multiple of the lanes padded to one (pad_einsum) instead of declined
PAD_VECTOR_AXIS = True
# matmuls whose row axis is symbolic (a sequence length) take OuterProduct with one-row tiles
# (off: WindowReduction's generic tiles, as before)
SYMBOLIC_ROWS = True
# matmul-like kernels: reduction blocked by this many (0: off)
MATMUL_K_BLOCK = 128

# channel-blocked convs (nchwc): the prologue (pad) materialised before the conv
MATERIALISE_PROLOGUE = True  # (off: inlined into the conv's reads, as before)
# flat convs with padded rows: one reduction pass per kernel row over the tiles it reaches (tiles.conv_tile)
ROW_PASSES = True

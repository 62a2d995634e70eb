"""Default (untuned) CPU schedules for the TIR kernels graphopt lowers to TVM.

Without a schedule TVM's CPU kernels are naive scalar loop nests, 86-106x slower than
onnxruntime (measured on ResNet-50 before these rules). `apply_default_schedules` gives every PrimFunc of an
IRModule a reasonable schedule so untuned code is usable:

- `OuterProduct` (conv2d NCHW incl. 1x1/strided/grouped-as-dense, dense, matmul,
  batch_matmul, with fused elementwise epilogues): the anchor reduction C[..] += A[..] * B[..]
  becomes a register-tiled outer product. The vector axis is a spatial axis that only B indexes
  (the output channel of a conv, the column of a matmul); the register axis one that only A
  indexes (the output column of a conv, the row of a matmul). B is packed inside the kernel so
  the vector axis is contiguous ([oc/16, ic, kh, kw, 16]); the pack block is annotated as a
  layout-rewrite preprocess so `relax.transform.SplitLayoutRewritePreproc` + `LiftTransformParams`
  can hoist it to load time where weights are parameters. Accumulators live in a small local
  tile (cache_write) and the epilogue (bias, relu, residual add, GELU, ...) is inlined into
  the write-back of that tile.
- `WindowReduction` (depthwise conv, max/avg pooling, any reduction whose innermost output axis
  is also the innermost axis of its input): the innermost output axis is vectorised with the
  reduction loops outside it.
  Matmul-like kernels (the output's last axis is the vector axis) widen the vector tile when the
  row count leaves accumulators unused (M = 128: 4 rows x 3 vectors) and block the reduction by
  128 so a [128, vt] block of the B panel stays in L1 while every row tile uses it. Elementwise
  blocks after the anchor are first inlined into one another (GELU reads the matmul twice), so
  the whole epilogue goes into the write-back.
- `RowReduction` (softmax, layer norm, mean over the last axis): one parallel loop over rows,
  every step computed inside it, reductions rfactored into a vector of partial results.
- dlight's CPU `GEMV` and `Reduction` (the remaining reductions). dlight's Reduction is only
  tried after our conv rules: it makes convolutions slower.
- `Injective`: every remaining block gets parallel outer loops and a vectorised inner loop.

Each rule is tried in order per PrimFunc; a rule that raises is skipped (the next one is tried),
so a surprising kernel falls back to a simpler schedule instead of failing the compile.

Where each piece lives: `base` (the public `ScheduleRule` base, `ScheduleStats` and the helpers
rules share), `knobs` (the refinements' off-switches), one module per rule (`injective`,
`winograd`, `nchwc`, `blocked_window`, `outer_product`, `symbolic_columns`, `window`,
`row_reduction`, `fallback`), `default` (the rule order and the entry points), `tiles` (the blocked
conv's micro-kernel choice), `loop_marks` (the TIR rewrites a blocked schedule asks for after
lowering), `fast_math` (erf/exp), and the int8 rules per ISA: `int8_x86` (AVX-512 VNNI / AVX2) and
`int8_arm64` (sdot/smmla), applied by their targets before these.
"""

from __future__ import annotations

from .base import GENERIC_RULES, LAYOUT_REWRITE_ANN, ScheduleRule, ScheduleStats, vector_lanes
from .default import apply_default_schedules, default_rules, default_schedule, is_tunable_kernel, schedule_prim_func

__all__ = ["apply_default_schedules", "default_rules", "default_schedule", "schedule_prim_func", "is_tunable_kernel",
           "ScheduleRule", "ScheduleStats", "GENERIC_RULES", "LAYOUT_REWRITE_ANN", "vector_lanes"]

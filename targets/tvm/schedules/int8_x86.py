"""int8 matmul and conv kernels for x86 CPUs with AVX2 (no VNNI needed): the cpu target's integer kernels.

    mod, done = schedule_int8_kernels(mod, target, params)   # before the default CPU schedules

A kernel C[.., m, n] = Σ_k int32(A[.., m, k]) · int32(B[k, n]) (MatMulInteger with zero zero
points, batched A allowed, B 2-D in either orientation; see `split-zero-points` for how a
quantized model's MatMulInteger gets there) is tiled so each step is one AVX2 micro-kernel on
eight int32 accumulators, B packed to [N/8, K/s, 8, s] (s = 4 or 2 bytes of k per lane):

    u8s8   A uint8, B int8 with |B| ≤ 64:   vpmaddubsw (u8·s8 pairs → s16) then vpmaddwd with ones
           (s16 pairs → s32): 32 multiply-adds per pair of instructions. Exact only while
           |a0·b0 + a1·b1| ≤ 32767, i.e. |b| ≤ 64 (255·64·2 = 32640): the quantize pass writes 7-bit
           weights on CPUs without VNNI, so its weights qualify; the bound is checked on the weight
           values (kernel arguments bound to `main`'s parameters or constants), never assumed.
    s16    every other int8/uint8 pairing, or weights not known to be narrow: both operands widened
           to int16 (vpmovzxbw / vpmovsxbw) and multiplied by vpmaddwd: exact for full 8-bit values.

The accumulator tile (up to 4 rows × 16 columns: 8 ymm registers) is written back once, with the
kernel's epilogue (int32 → float cast, scales, bias, zero-point correction, requantize) inlined
into the write-back: int8 × int8 → int32 accumulate, requantize in the epilogue. The packing of a
weight is annotated as a layout rewrite, so the cpu target runs it once at compile time.

2-D int8 convs (ConvInteger, which `qdq-to-integer` writes for static QDQ convs) run on the
channel blocks the layout plan gives them (`schedule_int8_conv_blocked`: uint8 [N, C/b, H, W, b]
activations, weights packed at compile time, no relayout of inputs, requantize vectorized over
the block, an elementwise prologue inlined into the pass that writes the conv's input): AVX-512
VNNI on blocks of 16 (or 8, ymm), AVX2 on blocks of 8 with the u8s8 kernel (weights within ±64,
4 bytes a lane) or the s16 one (2 bytes a lane). Convs the plan leaves NCHW use the same
micro-kernels with the input laid out NHWC inside the kernel and the weights
[OC/8, KH, KW, IC/s, 8, s] (`schedule_int8_conv`); small int32 kernels no rule takes
(squeeze-excite convs, narrow classifiers) become one loop nest with their epilogue inlined
(`schedule_int8_small`).

The rule does not fire (the default schedules take the kernel) when the target has no AVX2, N is
not a multiple of 8 or K of the step, the reduction is not a plain product of two 8-bit casts (a
non-zero zero point subtracting inside it), or the kernel has more than one reduction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from graphopt.targets.machine import U8S8_WEIGHT_BOUND
from graphopt.targets.tvm.tir_match import int8_dot_desc, int8_matmul_operands
from graphopt.targets.tvm.tir_match import static_int as _static
from graphopt.targets.tvm.schedules.base import merge_epilogue_branches

LAYOUT_REWRITE_ANN = "meta_schedule.layout_rewrite_preproc"
_REGISTERED: set[str] = set()
LANES = 8  # int32 lanes of a ymm register (the AVX2 kernels; VNNI on zmm: 16)
#: TVM's LowerTVMBuiltin leaves a "global" allocation of fewer bytes than this (its kMaxStackAlloca)
#: as a stack array, which LLVM promotes to registers; larger ones and every "local" one come from
#: TVMBackendAllocWorkspace, a call to allocate and one to free (per register tile, inside a kernel)
STACK_ALLOCA_BYTES = 1024


def _intrin_name(base: str, scope: str) -> str:
    return base if scope == "local" else f"{base}_{scope}"


def _register_u8s8(scope: str = "local") -> str:
    """C[8] += Σ_k4 u8 A[k] · s8 B[i, k] via vpmaddubsw + vpmaddwd(ones); C in `scope` (the
    accumulator tile's: see `_tile_scope`)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name = _intrin_name("graphopt_x86_avx2_u8s8_8x4", scope)
    if name in _REGISTERED:
        return name

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (8, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (8,), "int32", offset_factor=1, scope=scope)
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            # A's four bytes in every 32-bit lane; lane i of B holds B[i, 0:4]
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 8), dtype="uint8x32"),
                B.vload([0, 0], "int8x32"),
                dtype="int16x16",
            )
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], "int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                pairs,
                T.broadcast(T.int16(1), 16),
                dtype="int32x8",
            )

    TensorIntrin.register(name, int8_dot_desc("uint8", "int8", 8, 4, scope), impl, override=True)
    _REGISTERED.add(name)
    return name


def _register_s16(a_dt: str, b_dt: str, scope: str = "local") -> str:
    """C[8] += Σ_k2 A[k] · B[i, k], both widened to int16, via vpmaddwd (exact for 8-bit values)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name = _intrin_name(f"graphopt_x86_avx2_s16_{a_dt}_{b_dt}_8x2", scope)
    if name in _REGISTERED:
        return name

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), a_dt, offset_factor=1)
        B = T.match_buffer(b, (8, 2), b_dt, offset_factor=1)
        C = T.match_buffer(c, (8,), "int32", offset_factor=1, scope=scope)
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], "int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(T.reinterpret(T.Cast("int16x2", A.vload([0], f"{a_dt}x2")), dtype="int32"), 8),
                              dtype="int16x16"),
                T.Cast("int16x16", B.vload([0, 0], f"{b_dt}x16")),
                dtype="int32x8",
            )

    TensorIntrin.register(name, int8_dot_desc(a_dt, b_dt, 8, 2, scope), impl, override=True)
    _REGISTERED.add(name)
    return name


def _register_vnni(lanes: int, scope: str = "local") -> str:
    """C[lanes] += Σ_k4 u8 A[k] · s8 B[i, k] via vpdpbusd (AVX-512-VNNI on zmm for 16 lanes,
    AVX-VNNI / AVX-512-VNNI+VL on ymm for 8): four u8 x s8 products summed straight into int32,
    exact for every 8-bit value (no int16 intermediate to saturate)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name = _intrin_name(f"graphopt_x86_vnni_u8s8_{lanes}x4", scope)
    if name in _REGISTERED:
        return name
    intrin = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope=scope)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            # A's four bytes in every 32-bit lane; lane i of B holds B[i, 0:4]
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrin),
                C.vload([0], f"int32x{lanes}"),
                # (LLVM 22 takes the byte operands as <4*lanes x i8>)
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes),
                              dtype=f"uint8x{4 * lanes}"),
                B.vload([0, 0], f"int8x{4 * lanes}"),
                dtype=f"int32x{lanes}",
            )

    TensorIntrin.register(name, int8_dot_desc("uint8", "int8", lanes, 4, scope), impl, override=True)
    _REGISTERED.add(name)
    return name


def _kernel_choice(a_dt: str, b_dt: str, bound: int | None, target: Any, n: int | None = None) -> tuple[str, int, int, str]:
    """(variant, k step, int32 lanes, tensor intrinsic) for A/B of these dtypes on `target`'s
    machine model: vpdpbusd where it has VNNI and the operands are u8 x s8 (the quantize pass's
    form; zmm, or ymm where the `n` output columns are a multiple of 8 but not 16: a 1000-class
    classifier), AVX2's vpmaddubsw pair for u8 x s8 with weights known to be narrow, else s16."""
    from ...machine import machine_model

    dot = machine_model(target).int8_dot
    if dot in ("avx512-vnni", "avx-vnni") and a_dt == "uint8" and b_dt == "int8":
        lanes = 16 if dot == "avx512-vnni" and (n is None or n % 16 == 0) else 8
        return "vnni", 4, lanes, _register_vnni(lanes)
    if a_dt == "uint8" and b_dt == "int8" and bound is not None and bound <= U8S8_WEIGHT_BOUND:
        return "u8s8", 4, LANES, _register_u8s8()
    return "s16", 2, LANES, _register_s16(a_dt, b_dt)


def has_avx2(target: Any) -> bool:
    """True for an x86 LLVM target with AVX2 (False for other ISAs and non-LLVM targets)."""
    from tvm.target import codegen

    if str(target.kind.name) != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple and not triple.startswith(("x86_64", "i686", "i386")):
        return False
    try:
        return bool(codegen.target_has_features("avx2", target))
    except Exception:  # not an x86 target
        return False


def _root(sch: Any) -> Any | None:
    try:
        return sch.get_sblock("root")
    except Exception:
        return None


def _is_reduction(stmt: Any) -> bool:
    from tvm import tirx

    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in stmt.iter_vars)


def schedule_int8_matmul(func: Any, target: Any, weight_absmax: Mapping[int, int] | None = None) -> tuple[Any, str] | None:  # noqa: C901
    """(scheduled PrimFunc, variant "u8s8" | "s16"), or None when the rule does not apply.

    `weight_absmax` maps a parameter index of `func` to the largest |value| the argument bound
    to it holds (known weights); the u8s8 kernel is chosen only when B's bound is known and ≤ 64."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    root = _root(sch)
    if root is None:
        return None
    blocks = sch.get_child_blocks(root)
    reductions = [b for b in blocks if _is_reduction(sch.get(b))]
    if len(reductions) != 1:
        return None
    mm = reductions[0]
    if sum(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(mm).iter_vars) != 1:
        return None  # (not a matmul: a conv or window; decided before the costly inlining below)
    mm_name = sch.get(mm).name_hint
    # producers (casts, transposes of the operands, small scale vectors) inline into their readers;
    # what stays besides the reduction must be its elementwise epilogue chain. A quantize of a float
    # operand (a QDQ classifier's Div → Round → Clip → Cast to uint8 of the pooled features) stays
    # its own pass writing the 8-bit operand, its float chain inlined into it: inlined into the
    # reduction, the operand would no longer be an 8-bit load, and the kernel fell to the generic
    # float schedules (MobileNetV2's 1280 → 1000 classifier 0.45 ms, onnxruntime's QGemm 0.09)
    keep = {sch.get(b).name_hint for b in sch.get_child_blocks(root) if _is_quantize(sch.get(b))}
    changed = True
    while changed:
        changed = False
        for b in sch.get_child_blocks(root):
            if sch.get(b).name_hint == mm_name or sch.get(b).name_hint in keep:
                continue
            try:
                sch.compute_inline(b)
                changed = True
                break
            except Exception:
                continue
    mm = sch.get_sblock(mm_name)
    stmt = sch.get(mm)
    ops = int8_matmul_operands(stmt)
    if ops is None:
        return None
    k, a_buf, b_buf, n_var, b_k_first = ops
    a_dt, b_dt = str(a_buf.dtype), str(b_buf.dtype)
    if a_dt not in ("int8", "uint8") or b_dt not in ("int8", "uint8"):
        return None
    # the body must be exactly C + int32(A) * int32(B) (the intrinsic's description)
    body = stmt.body
    if not (hasattr(body, "indices") and isinstance(body.value, tirx.Add)
            and isinstance(body.value.b, tirx.Mul)
            and all(isinstance(x, tirx.Cast) and hasattr(x.value, "indices")
                    for x in (body.value.b.a, body.value.b.b))):
        return None
    # which kernel argument B is, and what is known about its values
    b_param = next((i for i, p in enumerate(func.params) if p.same_as(b_buf)), None)  # 0.27: a buffer parameter is the Var
    bound = (weight_absmax or {}).get(b_param) if b_param is not None else None
    ivs = {iv.var: iv for iv in stmt.iter_vars}
    n_ext, k_ext = _static(ivs[n_var].dom.extent), _static(ivs[k].dom.extent)
    variant, step, lanes, intrin = _kernel_choice(a_dt, b_dt, bound, target, n_ext)
    if n_ext is None or k_ext is None or n_ext % lanes or k_ext % step:
        return None

    # pack B to [N/8, K/step, 8(n), step(k)]; a kernel argument's packing runs once at compile time
    b_index = next(i for i, r in enumerate(stmt.reads) if r.source.same_as(b_buf))
    pack = sch.cache_read(mm, b_index, "global")
    if b_k_first:
        sch.transform_layout(mm, ("read", b_index), lambda kk, nn: (nn // lanes, kk // step, nn % lanes, kk % step))
    else:
        sch.transform_layout(mm, ("read", b_index), lambda nn, kk: (nn // lanes, kk // step, nn % lanes, kk % step))
    if b_param is not None:
        sch.annotate(pack, LAYOUT_REWRITE_ANN, True)

    loops = sch.get_loops(mm)
    if len(loops) != len(stmt.iter_vars):
        return None
    by_var = {}
    for lp, iv in zip(loops, stmt.iter_vars):
        if _static(sch.get(lp).extent) != _static(iv.dom.extent):
            return None
        by_var[iv.var] = lp
    n_loop, k_loop = by_var[n_var], by_var[k]
    others = [lp for lp in loops if not (lp.same_as(n_loop) or lp.same_as(k_loop))]
    if not others:
        return None  # a matrix-vector product: nothing to reuse B across
    m_loop, batch = others[-1], others[:-1]
    # (a symbolic row count: the batch of a classifier's [batch, features] input: one row a tile)
    m_ext = _static(sch.get(m_loop).extent) or 1
    # rows x 2 vectors of accumulators: 8 of 16 ymm (AVX2), up to 12 of 32 zmm
    mt = next(d for d in ((6, 4, 3, 2, 1) if lanes == 16 else (4, 3, 2, 1)) if m_ext % d == 0)
    n_blocks = n_ext // lanes
    nt = 2 if n_blocks % 2 == 0 else 1
    sch.reorder(*batch, m_loop, n_loop, k_loop)
    m_o, m_i = sch.split(m_loop, [None, mt])
    n_o, n_i = sch.split(n_loop, [None, lanes])
    n_oo, n_oi = sch.split(n_o, [None, nt])
    k_o, k_i = sch.split(k_loop, [None, step])
    # a B panel (16 columns × K) stays in cache while the row tiles pass over it
    sch.reorder(*batch, n_oo, m_o, k_o, m_i, n_oi, n_i, k_i)
    outer = sch.fuse(*batch, n_oo, m_o)
    cores = _static(target.attrs.get("num-cores", 1)) or 1
    if cores > 1:
        sch.parallel(outer)
    # accumulators: a local [mt, 16] tile, the epilogue inlined into its write-back
    wb = sch.cache_write(mm, 0, "local")
    sch.reverse_compute_at(wb, outer, preserve_unit_loops=True)
    if not _inline_epilogue(sch, wb):
        return None  # an epilogue that is not elementwise: leave the kernel to the default rules
    sch.decompose_reduction(mm, k_o)
    sch.tensorize(n_i, intrin)
    sch.unroll(m_i)
    sch.unroll(n_oi)
    wl = sch.get_loops(wb)[1:]  # [outer, (batch 1s), rows, columns]
    if wl and _static(sch.get(wl[-1]).extent) == nt * lanes:
        sch.vectorize(wl[-1])
        wl = wl[:-1]
    for lp in wl:
        if (_static(sch.get(lp).extent) or 0) > 1:
            sch.unroll(lp)
    # the packing (when it stays in the kernel, activations as B): parallel over its outer axis
    try:
        pl = sch.get_loops(pack)
        if pl:
            sch.parallel(pl[0]) if cores > 1 else None
    except Exception:
        pass
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), variant


def _is_quantize(stmt: Any) -> bool:
    """Whether block `stmt` writes an 8-bit buffer with a cast of a float value (a quantize), not a
    copy or relayout of 8-bit data."""
    from tvm import tirx

    body = stmt.body
    return (len(stmt.writes) == 1 and str(stmt.writes[0].source.dtype) in ("int8", "uint8")
            and isinstance(body, tirx.BufferStore) and isinstance(body.value, tirx.Cast)
            and str(body.value.value.ty).startswith("float"))


def _inline_epilogue(sch: Any, wb: Any) -> bool:
    """Inline the elementwise chain after the accumulators' write-back block `wb` into it (the
    epilogue runs on the tile while it is in registers); False when something else is left
    reading it (an epilogue that is not elementwise).

    Where the chain branches and meets again (a quantized SiLU: y = x · sigmoid(x), x the
    requantized sum read by both), the blocks of the branches are inlined forward into their
    readers until one block reads the write-back's value, which then joins it (the cheap part of
    x is computed twice; before, the whole conv fell back to the default schedules: 45 of int8
    EfficientNet-B0's convs)."""
    while True:
        consumers = sch.get_consumers(wb)
        if not consumers:
            break
        if len(consumers) == 1:
            try:
                sch.reverse_compute_inline(consumers[0])
                continue
            except Exception:  # noqa: BLE001 - (an output block reading more than wb: forward inlining may help)
                pass
        if not merge_epilogue_branches(sch, wb):
            break
    return not sch.get_consumers(wb)


def _tile_scope(tile_bytes: int) -> str:
    """Storage scope of an int32 accumulator tile of `tile_bytes`: "global" below
    STACK_ALLOCA_BYTES (a stack array per tile that LLVM keeps in registers), else "local" (a
    workspace buffer per tile: two runtime calls, paid back by the long reductions of wide
    tiles). The scope is only where TVM puts the buffer, never what the kernel computes.
    MobileNetV2's VNNI 1x1 convs on 8-channel blocks (24 ymm accumulators, 768 bytes),
    1 thread, znver4: 16 -> 96 @112 0.244 -> 0.203 ms, 32 -> 192 @28 0.045 -> 0.035."""
    return "global" if tile_bytes < STACK_ALLOCA_BYTES else "local"


def _widest_tile(ow: int, n_blocks: int, max_acc: int, max_xt: int) -> tuple[int, int]:
    """(output columns ≤ max_xt dividing `ow`, channel vectors ≤ 4 dividing `n_blocks`) with the
    most accumulators within `max_acc`, more channel vectors first (each broadcast of 4 input
    bytes then feeds more vpdpbusd)."""
    cands = [(xt * nt, nt, xt) for nt in (4, 3, 2, 1) if n_blocks % nt == 0
             for xt in range(1, min(ow, max_xt) + 1) if ow % xt == 0 and xt * nt <= max_acc]
    _, nt, xt = max(cands)
    return xt, nt


def _tile_conv(ow: int, n_blocks: int, max_acc: int = 8) -> tuple[int, int]:
    """(output columns, channel vectors) per register tile: at most `max_acc` int32 accumulators
    (8 of AVX2's 16 ymm; with 32 zmm up to `max_acc`: the tile of most accumulators, more channel
    vectors first — each broadcast of 4 input bytes then feeds more vpdpbusd)."""
    if max_acc > 8:
        return _widest_tile(ow, n_blocks, max_acc, 12)
    if n_blocks % 2 == 0:
        for xt in (4, 3, 2):
            if ow % xt == 0:
                return xt, 2
    for xt in (7, 6, 5, 4, 3, 2, 1):
        if ow % xt == 0:
            return xt, 1
    return 1, 1


def schedule_int8_conv(func: Any, target: Any, weight_absmax: Mapping[int, int] | None = None) -> tuple[Any, str] | None:  # noqa: C901
    """A 2-D NCHW int8 conv kernel (conv2d_nchw of int8/uint8 data and weights accumulating in
    int32, its padding materialised, elementwise epilogue) with the same micro-kernels: the
    (padded) input is laid out NHWC and the weights [OC/8, KH, KW, IC/s, 8, s], so each step is
    8 output channels × s input channels; the tile is up to 4 output columns × 16 channels.
    (scheduled PrimFunc, variant) or None when it does not apply (IC not a multiple of s, OC of 8,
    grouped convs, other layouts)."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    root = _root(sch)
    if root is None:
        return None
    blocks = sch.get_child_blocks(root)
    reductions = [b for b in blocks if _is_reduction(sch.get(b))]
    if len(reductions) != 1:
        return None
    if [iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(reductions[0]).iter_vars] != [False] * 4 + [True] * 3:
        return None  # (not an NCHW conv: decided before the costly inlining below)
    mm_name = sch.get(reductions[0]).name_hint
    # copies and casts inline into their readers; a real pad (if_then_else) stays materialised
    changed = True
    while changed:
        changed = False
        for b in sch.get_child_blocks(root):
            st = sch.get(b)
            if st.name_hint == mm_name or "if_then_else" in str(st.body):
                continue
            try:
                sch.compute_inline(b)
                changed = True
                break
            except Exception:
                continue
    mm = sch.get_sblock(mm_name)
    stmt = sch.get(mm)
    ivs = list(stmt.iter_vars)
    if len(ivs) != 7 or len(stmt.writes) != 1 or str(stmt.writes[0].source.dtype) != "int32":
        return None
    kinds = [iv.iter_type == tirx.IterVar.CommReduce for iv in ivs]
    if kinds != [False] * 4 + [True] * 3:
        return None
    nn, ff, yy, xx, rc, ry, rx = (iv.var for iv in ivs)
    out = stmt.writes[0].source
    reads = [r for r in stmt.reads if not r.source.same_as(out)]
    if len(reads) != 2:
        return None
    data = next((r for r in reads if len(r.region) == 4 and r.region[1].min.same_as(rc)), None)
    wgt = next((r for r in reads if r is not data and all(rg.min.same_as(v) for rg, v in zip(r.region, (ff, rc, ry, rx)))), None)
    if data is None or wgt is None or not data.region[0].min.same_as(nn):
        return None
    a_buf, b_buf = data.source, wgt.source
    a_dt, b_dt = str(a_buf.dtype), str(b_buf.dtype)
    if a_dt not in ("int8", "uint8") or b_dt not in ("int8", "uint8"):
        return None
    body = stmt.body
    if not (hasattr(body, "indices") and isinstance(body.value, tirx.Add) and isinstance(body.value.b, tirx.Mul)
            and all(isinstance(x, tirx.Cast) and hasattr(x.value, "indices") for x in (body.value.b.a, body.value.b.b))):
        return None
    ext = {iv.var: _static(iv.dom.extent) for iv in ivs}
    if any(ext[v] is None for v in (ff, yy, xx, rc, ry, rx)):
        return None  # the batch may be symbolic (it is only part of the parallel loop)
    b_param = next((i for i, p in enumerate(func.params) if p.same_as(b_buf)), None)
    bound = (weight_absmax or {}).get(b_param) if b_param is not None else None
    variant, step, lanes, intrin = _kernel_choice(a_dt, b_dt, bound, target, ext[ff])
    if ext[ff] % lanes or ext[rc] % step:
        return None
    cores = _static(target.attrs.get("num-cores", 1)) or 1

    # input NHWC: the pad block writes it so (or a copy of a kernel argument does)
    a_index = next(i for i, r in enumerate(stmt.reads) if r.source.same_as(a_buf))
    producer = next((b for b in sch.get_producers(mm) if any(w.source.same_as(a_buf) for w in sch.get(b).writes)), None)
    if producer is None:
        producer = sch.cache_read(mm, a_index, "global")
    sch.transform_layout(producer, ("write", 0), lambda n, c, h, w: (n, h, w, c))
    pl = sch.get_loops(producer)
    if len(pl) == 4:
        sch.reorder(pl[0], pl[2], pl[3], pl[1])  # write NHWC rows contiguously
        if cores > 1:
            sch.parallel(sch.fuse(pl[0], pl[2]))
    # weights [OC/8, KH, KW, IC/step, 8, step]: packed once at compile time when an argument
    b_index = next(i for i, r in enumerate(sch.get(mm).reads) if r.source.same_as(b_buf))
    pack = sch.cache_read(mm, b_index, "global")
    sch.transform_layout(mm, ("read", b_index),
                         lambda f, c, kh, kw: (f // lanes, kh, kw, c // step, f % lanes, c % step))
    if b_param is not None:
        sch.annotate(pack, LAYOUT_REWRITE_ANN, True)

    loops = sch.get_loops(mm)
    if len(loops) != 7:
        return None
    ln, lf, ly, lx, lc, lky, lkx = loops
    xt, nt = _tile_conv(ext[xx], ext[ff] // lanes, 12 if lanes == 16 else 8)
    f_o, f_i = sch.split(lf, [None, lanes])
    f_oo, f_oi = sch.split(f_o, [None, nt])
    x_o, x_i = sch.split(lx, [None, xt])
    c_o, c_i = sch.split(lc, [None, step])
    sch.reorder(ln, f_oo, ly, x_o, lky, lkx, c_o, x_i, f_oi, f_i, c_i)
    outer = sch.fuse(ln, f_oo, ly, x_o)
    if cores > 1:
        sch.parallel(outer)
    wb = sch.cache_write(mm, 0, "local")
    sch.transform_layout(mm, ("write", 0), lambda n, f, h, w: (n, h, w, f))
    sch.reverse_compute_at(wb, outer, preserve_unit_loops=True)
    if not _inline_epilogue(sch, wb):
        return None
    sch.decompose_reduction(mm, lky)
    sch.tensorize(f_i, intrin)
    sch.unroll(x_i)
    sch.unroll(f_oi)
    # the write-back (with its epilogue: requantize, residual adds) stays a loop: unrolled, LLVM
    # took minutes per kernel on ResNet-50's requantizing epilogues
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), variant


def schedule_int8_conv_blocked(func: Any, target: Any, weight_absmax: Mapping[int, int] | None = None) -> tuple[Any, str] | None:  # noqa: C901
    """A blocked int8 conv kernel (`kernels.blocked.conv2d_int8_blocked`: uint8 [N, C/16, H, W, 16]
    activations, int8 weights packed [OC/16, KH, KW, C/16, 4, 16, 4], int32 sums, its padding
    materialised, elementwise epilogue) as vpdpbusd micro-kernels: a register tile of `xt` output
    pixels of a row × `nt` output blocks (up to the machine's accumulator budget: 24 of 32 zmm),
    each step one broadcast of 4 input channels of a pixel against 16 × 4 weights. The
    accumulators are written back once per tile with the epilogue (requantize, residual adds)
    inlined and vectorized across the 16 channels of a block, into a blocked output (16 contiguous
    bytes) — no relayout of the input or the output.

    None (the rule does not apply) unless the kernel is that computation with static map sizes on
    a machine whose int8 dot is AVX-512 VNNI, with uint8 activations and int8 weights."""
    from tvm import s_tir, tirx

    from ...machine import machine_model

    machine = machine_model(target)
    if machine.int8_dot not in ("avx512-vnni", "avx2"):
        return None
    sch = s_tir.Schedule(func)
    root = _root(sch)
    if root is None:
        return None
    reductions = [b for b in sch.get_child_blocks(root) if _is_reduction(sch.get(b))]
    if len(reductions) != 1:
        return None
    conv = reductions[0]
    stmt = sch.get(conv)
    ivs = list(stmt.iter_vars)
    # spatial n, ob, oh, ow, oi; reductions (blocked: icb, kh, kw, ic4, ici; stem: ic, kh, kw4, kwi),
    # the last one the 4 bytes a vpdpbusd lane sums
    if len(ivs) not in (9, 10) or len(stmt.writes) != 1 or str(stmt.writes[0].source.dtype) != "int32":
        return None
    if [iv.iter_type == tirx.IterVar.CommReduce for iv in ivs] != [False] * 5 + [True] * (len(ivs) - 5):
        return None
    ext = [_static(iv.dom.extent) for iv in ivs]
    reads = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
    if len(reads) != 2 or sorted(str(r.source.dtype) for r in reads) != ["int8", "uint8"]:
        return None
    if any(e is None for e in ext[1:]):
        return None
    _, ob_n, _, ow_n, _ = ext[:5]
    # register tile: most accumulators within the budget, more output blocks first (each
    # broadcast of 4 input bytes then feeds more vpdpbusd)
    xt, nt = _widest_tile(ow_n, ob_n, machine.accumulators, 14)
    scope = _tile_scope(xt * nt * ext[4] * 4)
    blocked = _blocked_int8_kernel(machine, func, reads, ext[4], ext[-1], weight_absmax, scope)
    if blocked is None:
        return None
    variant, intrin = blocked
    # constants' relayouts (a per-channel scale made blocked) inline into their readers
    conv_name = stmt.name_hint
    operands = [r.source for r in reads]
    for blk in list(sch.get_child_blocks(root)):
        st = sch.get(blk)
        if (st.name_hint != conv_name and not sch.get_producers(blk) and "if_then_else" not in str(st.body)
                and not any(w.source.same_as(o) for w in st.writes for o in operands)):  # (not the weight packing)
            try:
                sch.compute_inline(blk)
            except Exception:  # (an output block)
                pass
    conv = sch.get_sblock(conv_name)
    cores = _static(target.attrs.get("num-cores", 1)) or 1
    n_l, ob_l, oh_l, ow_l, oi_l, *red = sch.get_loops(conv)
    ob_o, ob_i = sch.split(ob_l, [None, nt])
    ow_o, ow_i = sch.split(ow_l, [None, xt])
    sch.reorder(n_l, ob_o, oh_l, ow_o, *red[:-1], ow_i, ob_i, oi_l, red[-1])
    outer = sch.fuse(n_l, ob_o, oh_l, ow_o)
    if cores > 1:
        sch.parallel(outer)
    wb = sch.cache_write(conv, 0, scope)
    sch.reverse_compute_at(wb, outer, preserve_unit_loops=True)
    if not _inline_epilogue(sch, wb):
        return None
    # the padded input (a real pad: if_then_else), or the input an elementwise prologue computes,
    # is written by its own parallel loop with the prologue inlined into it (DenseNet: the Concat
    # of the earlier layers, BatchNorm, ReLU and the requantize to uint8 in front of each conv,
    # each one a scalar loop nest of its own before: 14k LLVM IR lines a kernel at znver3)
    data = next(r.source for r in reads if str(r.source.dtype) == "uint8")
    writer = next((b for b in sch.get_child_blocks(root) if sch.get(b).name_hint == "pad"
                   or any(w.source.same_as(data) for w in sch.get(b).writes)), None)
    if writer is not None and not _is_reduction(sch.get(writer)):
        for b in [writer, *_inline_prologue(sch, writer)]:
            pl = sch.get_loops(b)
            if len(pl) < 4 or _is_reduction(sch.get(b)):
                continue
            sch.parallel(sch.fuse(*pl[:3]))
            if len(pl) == 5:  # (blocked: the 16 channels; a stem's NCHW rows stay scalar copies)
                sch.vectorize(pl[-1])
    sch.decompose_reduction(conv, red[0])
    sch.tensorize(oi_l, intrin)
    sch.unroll(ow_i)
    sch.unroll(ob_i)
    wl = sch.get_loops(wb)
    sch.vectorize(wl[-1])  # the 16 (8) channels of a block
    # the write-back unrolled over the tile: each accumulator vector goes from its register through
    # the epilogue to the output, and the [xt, nt, b] int32 tile never exists in memory (as a loop,
    # LLVM kept the tile in a buffer from TVMBackendAllocWorkspace, allocated and freed per tile,
    # stored the registers into it, and re-vectorized the epilogue across pixels with permutes:
    # MobileNetV2's 16 -> 96 expand conv at 112x112 0.47 -> 0.23 ms, 1 thread, znver4)
    for lp in wl[1:-1]:
        if (_static(sch.get(lp).extent) or 0) > 1:
            sch.unroll(lp)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), variant


def _inline_prologue(sch: Any, blk: Any) -> list[Any]:
    """Inline the elementwise producers of block `blk` (transitively) into it and return the
    producers left (transitively): those that cannot be inlined (a reduction, one read by other
    blocks too) and selections (a Concat's if_then_else chain over its inputs: inlined, a ReLU's
    Select after it copied the chain, 24 inputs deep in DenseNet)."""
    tried: set[str] = set()
    kept: list[Any] = []
    frontier = [blk]
    while frontier:
        b = frontier.pop()
        while True:
            for p in sch.get_producers(b):
                name = sch.get(p).name_hint
                if name in tried:
                    continue
                tried.add(name)
                if "if_then_else" in str(sch.get(p).body):
                    kept.append(p)
                    frontier.append(p)
                    continue
                try:
                    sch.compute_inline(p)
                    break
                except Exception:  # noqa: BLE001 - (left materialised)
                    kept.append(p)
                    frontier.append(p)
                    continue
            else:
                break
    return kept


def _blocked_int8_kernel(machine: Any, func: Any, reads: Any, lanes: int | None, step: int | None,
                         weight_absmax: Mapping[int, int] | None, scope: str = "local") -> tuple[str, str] | None:
    """(variant, tensor intrinsic) of a blocked int8 conv whose blocks are `lanes` channels and
    whose innermost reduction sums `step` bytes per int32 lane, on `machine`; None where none fits.
    AVX-512 VNNI: vpdpbusd on 16 lanes x 4 bytes. AVX2: vpmaddubsw + vpmaddwd on 8 lanes x 4 bytes
    when the packed weight's values are known to be within ±U8S8_WEIGHT_BOUND (`weight_bounds`
    sees through the packing), else vpmaddwd on int16 on 8 lanes x 2 bytes (the layout plan packs
    such weights 2 bytes a lane: `layout.INT8_WEIGHT_S16`)."""
    if machine.int8_dot == "avx512-vnni":  # (16 lanes on zmm; 8 on ymm: `layout.INT8_HALF_BLOCK_DOTS`)
        return ("vnni-blocked", _register_vnni(lanes, scope)) if lanes in (16, 8) and step == 4 else None
    if machine.int8_dot != "avx2" or lanes != LANES:
        return None
    w_buf = next(r.source for r in reads if str(r.source.dtype) == "int8")
    if str(next(r.source for r in reads if not r.source.same_as(w_buf)).dtype) != "uint8":
        return None
    w_param = next((i for i, p in enumerate(func.params) if p.same_as(w_buf)), None)
    bound = (weight_absmax or {}).get(w_param) if w_param is not None else None
    if step == 4 and bound is not None and bound <= U8S8_WEIGHT_BOUND:
        return "u8s8-blocked", _register_u8s8(scope)
    if step == 2:
        return "s16-blocked", _register_s16("uint8", "int8", scope)
    return None


#: multiply-adds up to which an int32 conv/matmul kernel that no int8 rule takes runs as one
#: serial loop nest with its prologue and epilogue inlined (`schedule_int8_small`)
SMALL_INT8_MACS = 1 << 16


def schedule_int8_small(func: Any, target: Any, weight_absmax: Mapping[int, int] | None = None) -> tuple[Any, str] | None:
    """A small int32-accumulating conv/matmul the other rules decline (EfficientNet's
    squeeze-excite convs: 480 → 20 channels on a 1x1 map, channel counts no vector block divides,
    or 6 → 144 whose epilogue multiplies the 56x56 activation by the excitation) with static sizes
    and at most SMALL_INT8_MACS multiply-adds: its elementwise prologue inlined into the reduction
    (a serial loop nest), its elementwise epilogue (requantize, SiLU, sigmoid, the broadcast
    multiply: ~30 ops) inlined into the kernel's output block, one loop nest parallel over its
    rows (when it is large) and vectorized across a channel block. The default schedules gave each
    epilogue op a parallel loop of its own (30 parallel regions, ~7k LLVM IR lines a kernel)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    root = _root(sch)
    if root is None:
        return None
    reds = [b for b in sch.get_child_blocks(root) if _is_reduction(sch.get(b))]
    if len(reds) != 1:
        return None
    red = reds[0]
    red_name = sch.get(red).name_hint
    if red_name.startswith("depthwise"):
        return None  # (`kernels.blocked.depthwise_blocked`: the window schedule vectorizes it across a block)
    exts = [_static(iv.dom.extent) for iv in sch.get(red).iter_vars]
    if any(e is None for e in exts[1:]) or int(np.prod([e for e in exts[1:]])) > SMALL_INT8_MACS:
        return None  # (the batch may be symbolic: the outer loop)
    _inline_prologue(sch, sch.get_sblock(red_name))
    changed = True
    while changed:  # every other elementwise block into its readers (the output blocks stay)
        changed = False
        for b in sch.get_child_blocks(root):
            st = sch.get(b)
            if st.name_hint == red_name or _is_reduction(st):
                continue
            try:
                sch.compute_inline(b)
                changed = True
                break
            except Exception:  # noqa: BLE001 - (an output block, or one the reduction reads)
                continue
    cores = _static(target.attrs.get("num-cores", 1)) or 1
    for b in sch.get_child_blocks(root):
        if sch.get(b).name_hint == red_name:
            continue
        pl = sch.get_loops(b)
        ext = [_static(sch.get(lp).extent) for lp in pl]
        if len(pl) == 5 and ext[-1] in (8, 16):
            sch.vectorize(pl[-1])
        if len(pl) >= 4 and cores > 1 and all(e is not None for e in ext[1:]) and int(np.prod(ext[1:])) >= 4096:
            sch.parallel(sch.fuse(*pl[:3]))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), "small"


def weight_bounds(mod: Any, params: Mapping[str, np.ndarray] | list[np.ndarray] | None) -> dict[str, dict[int, int]]:
    """{PrimFunc name: {parameter index: max |value|}} for kernel arguments that `main` binds to
    a weight (one of its parameters after `num_input`, values in `params` in order) or to a
    constant; a kernel called from several places gets the largest bound of its calls, and an
    argument that is not known at some call is left out."""
    from tvm import ir, relax

    if "main" not in {gv.name_hint for gv in mod.get_global_vars()}:
        return {}
    main = mod["main"]
    n_in = int(main.attrs["num_input"]) if main.attrs is not None and "num_input" in main.attrs else len(main.params)
    arrays = list(params.values()) if isinstance(params, Mapping) else list(params or [])
    weight_of = {p: arrays[i - n_in] for i, p in enumerate(main.params) if i >= n_in and i - n_in < len(arrays)}
    calls = []

    def visit(e: Any) -> None:
        if isinstance(e, relax.Call) and str(e.op.name if hasattr(e.op, "name") else "") == "relax.call_tir":
            calls.append(e)

    relax.analysis.post_order_visit(main.body, visit)
    # an int8 weight packed for the blocked convs (`kernels.blocked.pack_int8_*`: a relayout, zeros
    # added at most) holds its weight's values: the packed argument's bound is the weight's
    packed: dict[Any, Any] = {}
    for blk in getattr(main.body, "blocks", []):
        for bnd in blk.bindings:
            v = getattr(bnd, "value", None)
            if (isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.call_tir"
                    and v.args[0].name_hint.startswith("pack_int8")
                    and isinstance(v.args[1], relax.Tuple) and len(v.args[1].fields) == 1):
                packed[bnd.var] = v.args[1].fields[0]
    bounds: dict[str, dict[int, int]] = {}
    unknown: dict[str, set[int]] = {}
    for c in calls:
        gv, args = c.args[0], c.args[1]
        fields = list(args.fields) if isinstance(args, relax.Tuple) else [args]
        name = gv.name_hint
        for i, a in enumerate(fields):
            arr = None
            a = packed.get(a, a)
            if isinstance(a, ir.expr.Constant):  # a tensor constant, or a by-value scalar (lower.scalar_args)
                arr = a.value.numpy() if hasattr(a.value, "numpy") else np.asarray(a.value)
            elif isinstance(a, relax.Var) and a in weight_of:
                arr = weight_of[a]
            if arr is None or arr.dtype.kind not in "iu" or arr.size == 0:
                unknown.setdefault(name, set()).add(i)
                continue
            m = int(np.abs(arr.astype(np.int64)).max())
            d = bounds.setdefault(name, {})
            d[i] = max(d.get(i, 0), m)
    for name, idx in unknown.items():
        for i in idx:
            bounds.get(name, {}).pop(i, None)
    return bounds


def _one_int32_reduction(func: Any) -> bool:
    """Whether `func` has exactly one reduction block (among the root's children) and it sums into
    int32: what each int8 rule requires before anything else. Checked once per kernel, so the float
    kernels of a quantized model (its SiLU/sigmoid epilogues, float depthwise convs, pooling) do not
    pay for three rules that each open a schedule and inline its blocks before declining (int8
    EfficientNet-B0: 76 s of 130 s of scheduling on a loaded 2-core Zen 4)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    root = _root(sch)
    if root is None:
        return False
    reds = [sch.get(b) for b in sch.get_child_blocks(root) if _is_reduction(sch.get(b))]
    return len(reds) == 1 and len(reds[0].writes) == 1 and str(reds[0].writes[0].source.dtype) == "int32"


def schedule_int8_kernels(mod: Any, target: Any, params: Mapping[str, np.ndarray] | list[np.ndarray] | None = None) -> tuple[Any, dict[str, str]]:
    """Apply the int8 rules (blocked conv, matmul, NCHW conv, small) to every unscheduled PrimFunc
    they fit (x86 AVX2 targets only). Returns the module and {function: "int8-<variant>"} for the
    ones scheduled ("int8-u8s8", "int8-s16", "int8-vnni", "int8-u8s8-blocked", "int8-s16-blocked",
    "int8-vnni-blocked", "int8-small")."""
    import tvm
    from tvm import tirx

    if not has_avx2(target):
        return mod, {}
    bounds = weight_bounds(mod, params)
    done: dict[str, str] = {}
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and int(func.attrs.get("tirx.is_scheduled", 0)) == 1):
            continue
        res = None
        try:
            if not _one_int32_reduction(func):
                continue
        except Exception:  # (a kernel the schedule cannot open: the default schedules take it)
            continue
        for rule in (schedule_int8_conv_blocked, schedule_int8_matmul, schedule_int8_conv, schedule_int8_small):
            try:
                res = rule(func, target, bounds.get(gv.name_hint))
            except Exception:  # a surprising kernel: the next rule, or the default schedules, take it
                res = None
            if res is not None:
                break
        if res is not None:
            updates[gv] = res[0]
            done[gv.name_hint] = f"int8-{res[1]}"
    if updates:
        mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in updates.items():
            mod[gv] = func
    return mod, done

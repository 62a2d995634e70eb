"""Blocked-conv micro-kernel tiles of at most 6 pixels (schedules.tiles.exact_tiles, schedule knob
CONV_TILE_PIXELS): on AVX-512 (24 accumulators) convs with 2 or 3 output blocks take 6x2 / 6x3
tiles instead of 12x2 / 8x3 (DenseNet-121's 3x3 128 -> 32 convs, direct and as Winograd's GEMM);
AVX2's tiles (12 accumulators, at most 6 pixels already) and AVX-512's 4- and 6-block tiles stay
as they were; numbers against onnxruntime through the whole cpu target, under whichever machine
model the run uses (the host's, or GRAPHOPT_CPU_MCPU) and AVX-512's where the host runs it."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper as nh

tvm = pytest.importorskip("tvm")
relax = pytest.importorskip("tvm.relax")
pytest.importorskip("onnxruntime")

import graphopt  # noqa: E402
from graphopt.check import run_onnxruntime  # noqa: E402
from graphopt.targets.machine import machine_model  # noqa: E402
from graphopt.targets.tvm import layout as TL  # noqa: E402
from graphopt.targets.tvm.kernels import blocked as BO  # noqa: E402
from graphopt.targets.tvm.kernels import winograd as WO  # noqa: E402
from graphopt.targets.tvm.schedules import knobs as K  # noqa: E402
from graphopt.targets.tvm.schedules import tiles as TI  # noqa: E402
from graphopt.targets.tvm.schedules.nchwc import BlockedConv  # noqa: E402
from graphopt.targets.tvm.schedules.winograd import WinogradConv  # noqa: E402
from tvm_kernels import AVX2_MCPU, AVX512_MCPU, host_runs, isa_target, primitive_kernel  # noqa: E402

TT = relax.TensorType
AVX2 = isa_target(AVX2_MCPU)
AVX512 = isa_target(AVX512_MCPU)
M2, M5 = machine_model(AVX2), machine_model(AVX512)
OLD = K.ScheduleKnobs(conv_tile_pixels=0)  # the machine model's tiles as they are (before)


def test_exact_tiles_cap_the_pixels_on_avx512_only():
    assert TI.exact_tiles(M5) == ((4, 6), (6, 4), (6, 3), (6, 2))
    assert TI.exact_tiles(M2) == M2.conv_tiles == ((2, 6), (3, 4), (4, 3), (6, 2))  # AVX2: unchanged
    with K.using(OLD):
        assert TI.exact_tiles(M5) == M5.conv_tiles == ((4, 6), (6, 4), (8, 3), (12, 2))
    assert K.ScheduleKnobs.parse("CONV_TILE_PIXELS:0") == OLD


def test_tile_choice_fires_on_few_output_blocks_and_not_on_four():
    # DenseNet's 3x3 128 -> 32 on 56x56 (rows): 2 blocks of 16 -> 6 x 2 with a ragged tile (was 12 x 2)
    s = TI.ConvShape("conv", 2, 56, 56, 128 * 9, 3, 3, 1)
    assert (lambda t: (t.rt, t.obt, t.tail))(TI.conv_tile(s, M5)) == (6, 2, True)
    with K.using(OLD):
        assert (lambda t: (t.rt, t.obt))(TI.conv_tile(s, M5)) == (12, 2)
    # 3 blocks: 6 x 3 (was 8 x 3)
    s3 = TI.ConvShape("conv", 3, 24, 24, 48 * 9, 3, 3, 1)
    assert (lambda t: (t.rt, t.obt))(TI.conv_tile(s3, M5)) == (6, 3)
    # near-misses: ResNet's 4 blocks (6 x 4), the same conv at 8-channel blocks on AVX2 (4 blocks: 3 x 4)
    s4 = TI.ConvShape("conv", 4, 56, 56, 64 * 9, 3, 3, 1)
    assert (lambda t: (t.rt, t.obt))(TI.conv_tile(s4, M5)) == (6, 4)
    assert (lambda t: (t.rt, t.obt))(TI.conv_tile(TI.ConvShape("conv", 4, 56, 56, 128 * 9, 3, 3, 1), M2)) == (3, 4)


def test_one_block_tiles_take_at_most_12_pixels():
    """16 output channels on AVX-512 (one block, no exact tile): 12 x 1 (was the machine model's
    24 x 1); AVX2's 12 x 1 and the multi-block odd tiles (125 blocks: 4 x 5) stay."""
    assert (TI.odd_tile(M5, 1), TI.odd_tile(M5, 7), TI.odd_tile(M5, 125)) == ((12, 1), (12, 1), (4, 5))
    assert (TI.odd_tile(M2, 1), TI.odd_tile(M2, 125)) == (M2.odd_tile(1), M2.odd_tile(125)) == ((12, 1), (2, 5))
    with K.using(OLD):
        assert TI.odd_tile(M5, 1) == M5.odd_tile(1) == (24, 1)
    # a flat 1x1 conv on 56x56 (3136 pixels rounded up to 3144): whole 12 x 1 tiles
    t = TI.conv_tile(TI.ConvShape("conv", 1, 1, 3144, 128, 1, 1, 1), M5)
    assert (t.rt, t.obt, t.tail) == (12, 1, False)
    assert TL.flat_px_multiple((1, 1), [0] * 4, [1, 1], 16, 56, 16, 56, M5) == 12
    assert TL.flat_px_multiple((1, 1), [0] * 4, [1, 1], 8, 56, 8, 56, M2) == 12  # AVX2: as before


@pytest.mark.parametrize("oc, b, m, pixels", [(32, 16, M5, 6), (64, 16, M5, 6), (32, 8, M2, 3), (48, 16, M5, 6)])
def test_flat_conv_pixel_multiple_follows_the_tile(oc, b, m, pixels):
    """A flat conv (map of at most 28 input rows) is padded to the tile's pixels: 6 for 2 or 3
    blocks on AVX-512 (was 12 and 8), 6 for 4 (unchanged), AVX2's 3 for 4 blocks (unchanged)."""
    assert TL.flat_px_multiple((3, 3), [1] * 4, [1, 1], oc, 28, b, 28, m) == pixels
    with K.using(OLD):
        old = TL.flat_px_multiple((3, 3), [1] * 4, [1, 1], oc, 28, b, 28, m)
    assert old == {(32, 16): 12, (48, 16): 8}.get((oc, b), pixels)


def _conv_kernel(c: int, h: int, oc: int, b: int, target) -> tvm.tirx.PrimFunc:
    """The blocked 3x3 conv kernel (pad 1, no bias) the lowering makes of a `c` -> `oc` conv on
    `h` x `h` in `b`-channel blocks (flat where `layout.flat_px_multiple` says so)."""
    flat = TL.flat_px_multiple((3, 3), [1] * 4, [1, 1], oc, h, b, h, machine_model(target))
    params = [relax.Var("x", TT((1, c // b, h, h, b), "float32")), relax.Var("w", TT((oc // b, c // b, 3, 3, b, b), "float32"))]

    def body(bb, x, w):
        if flat:
            return bb.emit_te(BO.conv2d_blocked_flat, x, w, [1, 1], [1] * 4, [1, 1], flat, primfunc_name_hint="conv")
        return bb.emit_te(BO.conv2d_blocked, x, w, [1, 1], [1] * 4, [1, 1], primfunc_name_hint="conv")

    return primitive_kernel(params, body)


def _unrolled(func) -> set[int]:
    return {int(n) for n in re.findall(r"T\.unroll\(T\.int64\((\d+)\)\)", func.script())}


@pytest.mark.parametrize("h", [56, 14])
def test_blocked_conv_schedule_unrolls_the_6x2_tile(h):
    """BlockedConv on DenseNet's 3x3 128 -> 32 for AVX-512 unrolls 6 pixels x 2 blocks (plus the
    16 input channels of a block), the old knob 12 x 2; AVX2's 4 blocks of 8 keep 3 x 4."""
    sch = BlockedConv().apply(_conv_kernel(128, h, 32, 16, AVX512), AVX512, 16)
    assert sch is not None and _unrolled(sch.mod["main"]) >= {6, 2, 16} and 12 not in _unrolled(sch.mod["main"])
    with K.using(OLD):
        old = BlockedConv().apply(_conv_kernel(128, h, 32, 16, AVX512), AVX512, 16)
    assert 12 in _unrolled(old.mod["main"])
    avx2 = BlockedConv().apply(_conv_kernel(128, h, 32, 8, AVX2), AVX2, 8)
    assert {3, 4, 8} <= _unrolled(avx2.mod["main"]) and 6 not in _unrolled(avx2.mod["main"])


def _winograd_kernel(c: int, h: int, oc: int, b: int) -> tvm.tirx.PrimFunc:
    """The F(2x2, 3x3) kernel (kernels.winograd) of a `c` -> `oc` 3x3 conv on `h` x `h`."""
    params = [relax.Var("x", TT((1, c // b, h, h, b), "float32")),
              relax.Var("w", TT((16, oc // b, c // b, 1, 1, b, b), "float32"))]
    return primitive_kernel(params, lambda bb, x, w: bb.emit_te(WO.conv2d_winograd, x, w, [1] * 4, 2,
                                                                 primfunc_name_hint="conv_winograd"))


def test_winograd_gemm_takes_the_6x2_tile():
    """DenseNet's 3x3 128 -> 32 in Winograd form (the default for it): the GEMM's micro-kernel
    is 6 tile pixels x 2 blocks on AVX-512 (was 12 x 2); AVX2 (4 blocks of 8) keeps 3 x 4."""
    new = WinogradConv().apply(_winograd_kernel(128, 28, 32, 16), AVX512, 16)
    assert new is not None and {6, 2} <= _unrolled(new.mod["main"]) and 12 not in _unrolled(new.mod["main"])
    with K.using(OLD):
        old = WinogradConv().apply(_winograd_kernel(128, 28, 32, 16), AVX512, 16)
    assert 12 in _unrolled(old.mod["main"])
    avx2 = WinogradConv().apply(_winograd_kernel(128, 28, 32, 8), AVX2, 8)
    assert {3, 4} <= _unrolled(avx2.mod["main"]) and 6 not in _unrolled(avx2.mod["main"])


def _dense_layer(h: int, seed: int = 0) -> onnx.ModelProto:
    """One DenseNet layer on 64 channels: BN -> Relu -> 1x1 conv 128 -> BN -> Relu -> 3x3 conv 32
    (no bias) -> Concat with the input."""
    m = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 64, {h}, {h}] x) => (float[1, 96, {h}, {h}] y) {{
    a = BatchNormalization <epsilon = 1e-5> (x, g1, b1, m1, v1)
    r = Relu (a)
    c = Conv <kernel_shape = [1, 1]> (r, w1)
    d = BatchNormalization <epsilon = 1e-5> (c, g2, b2, m2, v2)
    s = Relu (d)
    e = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (s, w2)
    y = Concat <axis = 1> (x, e)
}}
""")
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((128, 64, 1, 1)) / 8, "w2": rng.standard_normal((32, 128, 3, 3)) / 34}
    for i, c in ((1, 64), (2, 128)):
        inits.update({f"g{i}": rng.uniform(0.5, 1.5, c), f"b{i}": rng.standard_normal(c) * 0.1,
                      f"m{i}": rng.standard_normal(c) * 0.1, f"v{i}": rng.uniform(0.5, 2, c)})
    m.graph.initializer.extend(nh.from_array(np.asarray(v, np.float32), k) for k, v in inits.items())
    return m


_TARGETS = [pytest.param("cpu", id="default-machine"),
            pytest.param(f"cpu{{mcpu={AVX512_MCPU}}}", id="avx512",
                         marks=pytest.mark.skipif(not host_runs(AVX512), reason="this host cannot execute AVX-512 code"))]


@pytest.mark.parametrize("h, winograd", [(56, "auto"), (14, "auto"), (28, "off"), (7, "off")])
@pytest.mark.parametrize("spec", _TARGETS)
def test_dense_layer_numbers_equal_onnxruntime(spec, h, winograd):
    """The layer compiled whole (its 3x3 conv in Winograd form or direct) equals onnxruntime."""
    m = _dense_layer(h)
    target = spec.replace("}", f",winograd={winograd}}}") if "{" in spec else f"cpu{{winograd={winograd}}}"
    x = np.random.default_rng(1).standard_normal((1, 64, h, h)).astype(np.float32)
    art = graphopt.compile(m, target, "-O2", threads=2)
    assert art.manifest["kernels"]["blocked"] >= 2
    ref = run_onnxruntime(graphopt.load(m), {"x": x})[0]
    np.testing.assert_allclose(art.run({"x": x})[0], ref, rtol=1e-4, atol=1e-4)

"""TE computes for convolutions and pooling on channel-blocked activations (NCHW[b]c).

A blocked activation is the NCHW tensor with its channels cut into blocks of `b` that are moved
innermost: `[N, C, H, W]` is held as `[N, C/b, H, W, b]` (`x5[n, cb, y, x, ci] = x4[n, cb*b + ci,
y, x]`). A convolution then reads, at one pixel, `b` contiguous input channels, and writes `b`
contiguous output channels: its micro-kernel (a tile of output pixels x one or two channel blocks,
accumulated in vector registers) loads whole vectors where the NCHW form reads one float from each
of many channel planes. Measured here (2 threads, AVX2, default schedules, same run): ResNet-50's
convs moved from 75-100 to 120-175 GFLOP/s, onnxruntime's MLAS runs them in the same form.

Weights are packed once (a weight-only computation, hoisted out of the model by
LiftTransformParams) into

- `conv`: `[OC/b, C/b, KH, KW, b(in), b(out)]` (group 1, input blocked),
- `stem`: `[OC/b, C, KH, KW, b(out)]` (group 1, input in NCHW: the first conv of a CNN, C=3),
- `depthwise`: `[C/b, KH, KW, b]` (group = C = OC; int8 weights of a depthwise ConvInteger too).

Every compute takes explicit pads `(top, left, bottom, right)`; padded values are a separate
`pad` block (0 for convolutions, -inf for max pooling) that the schedules decompose.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tvm import te, tirx

from .annotations import FLAT_ROWS
from .minmax import nan_max

__all__ = [
    "to_blocked",
    "from_blocked",
    "pack_conv_weight",
    "pack_stem_weight",
    "pack_depthwise_weight",
    "block_bias",
    "block_channel_const",
    "add_blocked_bias",
    "conv2d_blocked",
    "conv2d_blocked_flat",
    "conv2d_stem",
    "pack_int8_conv_weight",
    "conv2d_int8_blocked",
    "pack_int8_stem_weight",
    "conv2d_int8_stem",
    "depthwise_blocked",
    "pool_blocked",
    "max_pool_nchw",
    "global_pool_blocked",
    "pointwise_to_plain",
]


def _out(size: Any, k: int, stride: int, dilation: int, pad_a: int, pad_b: int, ceil: bool = False) -> Any:
    span = (k - 1) * dilation + 1
    if ceil:
        # ONNX (and onnxruntime): the last window must start inside the input or its left padding
        if isinstance(size, (int, tirx.IntImm)):
            sz = int(size)
            out = (sz + pad_a + pad_b - span + stride - 1) // stride + 1
            return out - 1 if (out - 1) * stride >= sz + pad_a else out
        out = (size + pad_a + pad_b - span + stride - 1) // stride + 1
        return tirx.Select((out - 1) * stride >= size + pad_a, out - 1, out)
    return (size + pad_a + pad_b - span) // stride + 1


def _window(h: Any, wd: Any, kh: Any, kw: Any, strides: Sequence[int], pads: Sequence[int],
            dilations: Sequence[int], ceil: bool = False) -> tuple[int, int, int, int, Any, Any]:
    """(sh, sw, dh, dw, OH, OW) of a 2-D window of `kh` x `kw` taps over an `h` x `wd` input."""
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilations)
    top, left, bottom, right = (int(p) for p in pads)
    return (sh, sw, dh, dw, _out(h, int(kh), sh, dh, top, bottom, ceil), _out(wd, int(kw), sw, dw, left, right, ceil))


def to_blocked(x: te.Tensor, b: int) -> te.Tensor:
    """[N, C, H, W] → [N, C/b, H, W, b] (C a multiple of b)."""
    n, c, h, w = x.shape
    return te.compute((n, c // b, h, w, b), lambda i, cb, y, xx, ci: x[i, cb * b + ci, y, xx], name="to_blocked")


def from_blocked(x: te.Tensor, channels: int) -> te.Tensor:
    """[N, C/b, H, W, b] → [N, C, H, W]."""
    n, _, h, w, b = x.shape
    return te.compute((n, channels, h, w), lambda i, c, y, xx: x[i, c // b, y, xx, c % b], name="from_blocked")


def pack_conv_weight(w: te.Tensor, b: int) -> te.Tensor:
    """[OC, C, KH, KW] → [OC/b, C/b, KH, KW, b(in), b(out)]."""
    oc, c, kh, kw = w.shape
    return te.compute(
        (oc // b, c // b, kh, kw, b, b),
        lambda ob, cb, y, x, ci, oi: w[ob * b + oi, cb * b + ci, y, x],
        name="pack_conv_weight",
    )


def pack_stem_weight(w: te.Tensor, b: int) -> te.Tensor:
    """[OC, C, KH, KW] → [OC/b, C, KH, KW, b(out)]."""
    oc, c, kh, kw = w.shape
    return te.compute((oc // b, c, kh, kw, b), lambda ob, ci, y, x, oi: w[ob * b + oi, ci, y, x], name="pack_stem_weight")


def pack_depthwise_weight(w: te.Tensor, b: int) -> te.Tensor:
    """[C, 1, KH, KW] → [C/b, KH, KW, b]."""
    c, _, kh, kw = w.shape
    return te.compute((c // b, kh, kw, b), lambda cb, y, x, ci: w[cb * b + ci, 0, y, x], name="pack_depthwise_weight")


def block_bias(bias: te.Tensor, b: int) -> te.Tensor:
    """[OC] → [OC/b, b]."""
    return te.compute((bias.shape[0] // b, b), lambda ob, oi: bias[ob * b + oi], name="block_bias")


def block_channel_const(c: te.Tensor, b: int) -> te.Tensor:
    """A per-channel constant [C, 1, 1] or [1, C, 1, 1] → [1, C/b, 1, 1, b] (broadcasts over a
    blocked activation [N, C/b, H, W, b] as the original does over NCHW)."""
    n = c.shape[-3]
    lead = len(c.shape) - 3
    return te.compute((1, n // b, 1, 1, b), lambda i, cb, y, x, ci: c[(0,) * lead + (cb * b + ci, 0, 0)],
                      name="block_channel_const")


def add_blocked_bias(y: te.Tensor, bias: te.Tensor) -> te.Tensor:
    """y [N, OC/b, H, W, b] + bias [OC/b, b] (the conv's epilogue)."""
    return te.compute(y.shape, lambda i, ob, yy, xx, oi: y[i, ob, yy, xx, oi] + bias[ob, oi], name="add_bias")


def _pad_spatial(x: te.Tensor, h_axis: int, pads: Sequence[int], value: float, extra: Sequence[int] = (0, 0)) -> te.Tensor:
    """Pad axes h_axis, h_axis+1 by (top, left, bottom, right) (+ `extra` zeros at the bottom/right
    for ceil-mode windows); the input itself when there is nothing to pad."""
    top, left, bottom, right = (int(p) for p in pads)
    bottom += int(extra[0])
    right += int(extra[1])
    if not (top or left or bottom or right):
        return x
    shape = list(x.shape)
    h, w = shape[h_axis], shape[h_axis + 1]
    shape[h_axis] = h + top + bottom
    shape[h_axis + 1] = w + left + right
    fill = tirx.const(value, x.dtype)

    def body(*idx: Any) -> Any:
        y, xx = idx[h_axis], idx[h_axis + 1]
        src = list(idx)
        src[h_axis] = y - top
        src[h_axis + 1] = xx - left
        inside = tirx.all(y >= top, y < h + top, xx >= left, xx < w + left)
        return tirx.if_then_else(inside, x[tuple(src)], fill)

    return te.compute(shape, body, name="pad")


def conv2d_blocked(
    x: te.Tensor, w: te.Tensor, strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int]
) -> te.Tensor:
    """x [N, C/b, H, W, b] * w [OC/b, C/b, KH, KW, b, b] → [N, OC/b, OH, OW, b]."""
    n, _, h, wd, b = x.shape
    ob_n, _, kh_n, kw_n, _, _ = w.shape
    sh, sw, dh, dw, oh, ow = _window(h, wd, kh_n, kw_n, strides, pads, dilations)
    p = _pad_spatial(x, 2, pads, 0.0)
    return _conv_sum(p, w, (n, ob_n, oh, ow, b), lambda y, xx: (y * sh, xx * sw), dh, dw)


def _conv_sum(p: te.Tensor, w: te.Tensor, shape: Sequence[Any], origin: Any, dh: int, dw: int,
              attrs: dict[str, Any] | None = None) -> te.Tensor:
    """out[i, ob, y, xx, oi] (of `shape`) = sum over icb, kh, kw, ii of p[i, icb, r + kh*dh,
    c + kw*dw, ii] * w[ob, icb, kh, kw, ii, oi], where (r, c) = origin(y, xx) is the top-left of
    the output pixel's window in the padded input `p`."""
    _, cb_n, kh_n, kw_n, b, _ = w.shape
    icb = te.reduce_axis((0, cb_n), "icb")
    kh = te.reduce_axis((0, kh_n), "kh")
    kw = te.reduce_axis((0, kw_n), "kw")
    ii = te.reduce_axis((0, b), "ii")

    def body(i: Any, ob: Any, y: Any, xx: Any, oi: Any) -> Any:
        r, c = origin(y, xx)
        return te.sum(p[i, icb, r + kh * dh, c + kw * dw, ii] * w[ob, icb, kh, kw, ii, oi], axis=[icb, kh, kw, ii])

    return te.compute(tuple(shape), body, name="conv2d_blocked", attrs=attrs)


def conv2d_blocked_flat(
    x: te.Tensor, w: te.Tensor, strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int], px_multiple: int,
) -> te.Tensor:
    """`conv2d_blocked` on the flattened output pixels: the conv computes one row of OH*OW pixels
    rounded up to `px_multiple` (pixel p reads the window of output pixel (p // OW, p % OW); the
    extra ones read the last pixel's window again and are dropped by `crop`), `unflatten` gives
    back [N, OC/b, OH, OW, b]. A micro-kernel of `px_multiple` pixels then divides the work
    whatever the row width: 7x7 maps take 3-pixel tiles over 51 pixels where 7-wide rows took
    7 x 1 tiles (7 accumulators); 56/28/14-wide rows had to be rounded up to 57/30/15."""
    n, _, h, wd, b = x.shape
    ob_n, _, kh_n, kw_n, _, _ = w.shape
    sh, sw, dh, dw, oh, ow = _window(h, wd, kh_n, kw_n, strides, pads, dilations)
    oh, ow = int(oh), int(ow)
    last = oh * ow - 1
    npx = -(-(oh * ow) // px_multiple) * px_multiple
    p = _pad_spatial(x, 2, pads, 0.0)

    def origin(z: Any, q: Any) -> tuple[Any, Any]:
        q = tirx.min(q, last) if npx != oh * ow else q
        return q // ow * sh, q % ow * sw

    top, _, bottom, _ = (int(v) for v in pads)
    attrs = {FLAT_ROWS: [ow, oh, int(h), sh, dh, top]} if int(kh_n) > 1 and (top or bottom) else None
    conv = _conv_sum(p, w, (n, ob_n, 1, npx, b), origin, dh, dw, attrs)
    if npx != oh * ow:
        conv = te.compute((n, ob_n, 1, oh * ow, b), lambda i, o, z, q, oi: conv[i, o, z, q, oi], name="crop")
    return te.compute((n, ob_n, oh, ow, b), lambda i, o, yy, xx, oi: conv[i, o, 0, yy * ow + xx, oi], name="unflatten")


def conv2d_stem(
    x: te.Tensor, w: te.Tensor, strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int]
) -> te.Tensor:
    """x [N, C, H, W] (not blocked) * w [OC/b, C, KH, KW, b] → [N, OC/b, OH, OW, b]."""
    n, c_n, h, wd = x.shape
    ob_n, _, kh_n, kw_n, b = w.shape
    sh, sw, dh, dw, oh, ow = _window(h, wd, kh_n, kw_n, strides, pads, dilations)
    p = _pad_spatial(x, 2, pads, 0.0)
    ic = te.reduce_axis((0, c_n), "ic")
    kh = te.reduce_axis((0, kh_n), "kh")
    kw = te.reduce_axis((0, kw_n), "kw")
    return te.compute(
        (n, ob_n, oh, ow, b),
        lambda i, ob, y, xx, oi: te.sum(
            p[i, ic, y * sh + kh * dh, xx * sw + kw * dw] * w[ob, ic, kh, kw, oi], axis=[ic, kh, kw]
        ),
        name="conv2d_stem",
    )


def pack_int8_conv_weight(w: te.Tensor, b: int, step: int = 4) -> te.Tensor:
    """int8 [OC, C, KH, KW] → [OC/b, KH, KW, C/b, b/step, b(out), step]: at one tap, `step`
    consecutive input channels of `b` output channels are one vector (vpdpbusd's operand)."""
    oc, c, kh, kw = w.shape
    return te.compute(
        (oc // b, kh, kw, c // b, b // step, b, step),
        lambda ob, y, x, cb, c4, oi, ci: w[ob * b + oi, cb * b + c4 * step + ci, y, x],
        name="pack_int8_conv_weight",
    )


def conv2d_int8_blocked(x: te.Tensor, w: te.Tensor, strides: Sequence[int], pads: Sequence[int],
                        dilations: Sequence[int], pad_value: int) -> te.Tensor:
    """uint8 x [N, C/b, H, W, b] * int8 w [OC/b, KH, KW, C/b, b/s, b, s] (`pack_int8_conv_weight`)
    → int32 [N, OC/b, OH, OW, b], the input padded with `pad_value` (the input's zero point: the
    quantized 0.0). Reduction order: channel block, taps, groups of `s` channels, then the `s`
    channels that one vpdpbusd lane sums (the x86 int8 kernels tensorize the last two)."""
    n, _, h, wd, b = x.shape
    ob_n, kh_n, kw_n, cb_n, c4_n, _, s = w.shape
    sh, sw, dh, dw, oh, ow = _window(h, wd, kh_n, kw_n, strides, pads, dilations)
    p = _pad_spatial(x, 2, pads, pad_value)
    cb = te.reduce_axis((0, cb_n), "icb")
    kh = te.reduce_axis((0, kh_n), "kh")
    kw = te.reduce_axis((0, kw_n), "kw")
    c4 = te.reduce_axis((0, c4_n), "ic4")
    ci = te.reduce_axis((0, s), "ici")
    return te.compute(
        (n, ob_n, oh, ow, b),
        lambda i, ob, y, xx, oi: te.sum(
            p[i, cb, y * sh + kh * dh, xx * sw + kw * dw, c4 * s + ci].astype("int32") * w[ob, kh, kw, cb, c4, oi, ci].astype("int32"),
            axis=[cb, kh, kw, c4, ci],
        ),
        name="conv2d_int8_blocked",
    )


def pack_int8_stem_weight(w: te.Tensor, b: int, step: int = 4) -> te.Tensor:
    """int8 [OC, C, KH, KW] → [OC/b, C, KH, ceil(KW/step), b(out), step], zero past KW: the
    `step` bytes one vpdpbusd lane sums are `step` taps of a row (a stem has too few channels)."""
    oc, c, kh, kw = w.shape
    kw4 = (int(kw) + step - 1) // step
    return te.compute(
        (oc // b, c, kh, kw4, b, step),
        lambda ob, ci, y, x4, oi, xi: tirx.if_then_else(x4 * step + xi < kw, w[ob * b + oi, ci, y, tirx.min(x4 * step + xi, kw - 1)],
                                                        tirx.const(0, w.dtype)),
        name="pack_int8_stem_weight",
    )


def conv2d_int8_stem(x: te.Tensor, w: te.Tensor, kernel_w: int, strides: Sequence[int], pads: Sequence[int],
                     pad_value: int) -> te.Tensor:
    """uint8 x [N, C, H, W] (not blocked: a stem's 3 channels) * int8 w (`pack_int8_stem_weight`
    of a `kernel_w`-wide kernel) → int32 [N, OC/b, OH, OW, b], no dilation. The input is padded
    with `pad_value` (its zero point), on the right also as far as the last group of taps reaches
    (those taps' weights are 0)."""
    n, _, h, wd = x.shape
    ob_n, c_n, kh_n, kw4_n, b, s = w.shape
    sh, sw, _, _, oh, ow = _window(h, wd, kh_n, kernel_w, strides, pads, (1, 1))
    top, left, bottom, right = (int(v) for v in pads)
    reach = (int(ow) - 1) * sw + int(kw4_n) * int(s)  # columns the last window's taps read
    extra = max(0, reach - (int(wd) + left + right))
    p = _pad_spatial(x, 2, pads, pad_value, (0, extra))
    c = te.reduce_axis((0, c_n), "ic")
    kh = te.reduce_axis((0, kh_n), "kh")
    k4 = te.reduce_axis((0, kw4_n), "kw4")
    ki = te.reduce_axis((0, s), "kwi")
    return te.compute(
        (n, ob_n, oh, ow, b),
        lambda i, ob, y, xx, oi: te.sum(
            p[i, c, y * sh + kh, xx * sw + k4 * s + ki].astype("int32") * w[ob, c, kh, k4, oi, ki].astype("int32"),
            axis=[c, kh, k4, ki],
        ),
        name="conv2d_int8_stem",
    )


def depthwise_blocked(
    x: te.Tensor, w: te.Tensor, strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int],
    pad_value: float = 0.0, acc_dtype: str | None = None,
) -> te.Tensor:
    """x [N, C/b, H, W, b] (*) w [C/b, KH, KW, b] per channel → [N, C/b, OH, OW, b], the input
    padded with `pad_value`. `acc_dtype` "int32": uint8 x and int8 w (a depthwise ConvInteger,
    `pad_value` its zero point) widened and summed in int32 (exact: 9 taps of 255·128)."""
    n, cb_n, h, wd, b = x.shape
    _, kh_n, kw_n, _ = w.shape
    sh, sw, dh, dw, oh, ow = _window(h, wd, kh_n, kw_n, strides, pads, dilations)
    p = _pad_spatial(x, 2, pads, pad_value)
    kh = te.reduce_axis((0, kh_n), "kh")
    kw = te.reduce_axis((0, kw_n), "kw")

    def tap(i: Any, cb: Any, y: Any, xx: Any, ci: Any) -> Any:
        a, c = p[i, cb, y * sh + kh * dh, xx * sw + kw * dw, ci], w[cb, kh, kw, ci]
        return a * c if acc_dtype is None else a.astype(acc_dtype) * c.astype(acc_dtype)

    return te.compute(
        (n, cb_n, oh, ow, b),
        lambda i, cb, y, xx, ci: te.sum(tap(i, cb, y, xx, ci), axis=[kh, kw]),
        name="depthwise_blocked",
    )


def pool_blocked(
    x: te.Tensor,
    kind: str,
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int] = (1, 1),
    count_include_pad: bool = False,
    ceil_mode: bool = False,
) -> te.Tensor:
    """Max or average pooling over H, W of a blocked [N, C/b, H, W, b] tensor (ONNX semantics:
    max ignores padding and skips NaN (maxNum, `minmax_ops`); average divides by the window's count of real elements unless
    `count_include_pad`, and never counts the extra cells a ceil-mode window reaches past the
    padded input)."""
    n, cb_n, h, wd, b = x.shape
    kh_n, kw_n = (int(k) for k in kernel)
    top, left, bottom, right = (int(p) for p in pads)
    sh, sw, dh, dw, oh, ow = _window(h, wd, kh_n, kw_n, strides, pads, dilations, ceil_mode)
    # ceil mode: the last window may reach past the padded input
    extra = (0, 0)
    if ceil_mode:
        ih, iw = int(h), int(wd)
        extra = (max(0, (int(oh) - 1) * sh + (kh_n - 1) * dh + 1 - (ih + top + bottom)),
                 max(0, (int(ow) - 1) * sw + (kw_n - 1) * dw + 1 - (iw + left + right)))
    kh = te.reduce_axis((0, kh_n), "kh")
    kw = te.reduce_axis((0, kw_n), "kw")
    if kind == "max":
        # (padding never wins: -inf, or the type's least value for an 8-bit quantized MaxPool)
        low = float("-inf") if str(x.dtype).startswith(("float", "bfloat")) else int(tirx.min_value(x.dtype).value)
        p = _pad_spatial(x, 2, pads, low, extra)
        return te.compute(
            (n, cb_n, oh, ow, b),
            lambda i, cb, y, xx, ci: nan_max(p[i, cb, y * sh + kh * dh, xx * sw + kw * dw, ci], axis=[kh, kw]),
            name="maxpool_blocked",
        )
    if kind != "avg":
        raise ValueError(f"pool kind {kind!r}")
    p = _pad_spatial(x, 2, pads, 0.0, extra)
    s = te.compute(
        (n, cb_n, oh, ow, b),
        lambda i, cb, y, xx, ci: te.sum(p[i, cb, y * sh + kh * dh, xx * sw + kw * dw, ci], axis=[kh, kw]),
        name="avgpool_sum",
    )

    def count(o: Any, stride: int, k: int, d: int, pad_a: int, size: Any, pad_b: int) -> Any:
        lo = o * stride - pad_a
        hi = lo + (k - 1) * d + 1
        if count_include_pad:  # the padded input's cells, not those past it
            return tirx.min(hi, size + pad_b) - tirx.max(lo, -pad_a)
        first = tirx.max(lo, 0)
        first = lo + (first - lo + d - 1) // d * d  # first tap inside the input
        last = tirx.min(hi, size)
        return tirx.max((last - first + d - 1) // d, 1) if d > 1 else tirx.max(last - first, 1)

    def avg(i: Any, cb: Any, y: Any, xx: Any, ci: Any) -> Any:
        cnt = count(y, sh, kh_n, dh, top, h, bottom) * count(xx, sw, kw_n, dw, left, wd, right)
        return s[i, cb, y, xx, ci] / tirx.Cast(x.dtype, cnt)

    return te.compute((n, cb_n, oh, ow, b), avg, name="avgpool_blocked")


def max_pool_nchw(x: te.Tensor, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
                  dilations: Sequence[int] = (1, 1), ceil_mode: bool = False) -> te.Tensor:
    """MaxPool of a plain [N, C, H, W] tensor (NaN skipped, as by `pool_blocked`): the blocked
    kernel on the tensor seen as blocks of one channel (views the schedule inlines)."""
    n, c, h, w = x.shape
    x5 = te.compute((n, c, h, w, 1), lambda i, ch, y, xx, _b: x[i, ch, y, xx], name="as_blocks")
    y5 = pool_blocked(x5, "max", kernel, strides, pads, dilations, ceil_mode=ceil_mode)
    return te.compute(tuple(y5.shape[:4]), lambda i, ch, y, xx: y5[i, ch, y, xx, 0], name="maxpool")


def global_pool_blocked(x: te.Tensor, kind: str) -> te.Tensor:
    """GlobalAveragePool / GlobalMaxPool of [N, C/b, H, W, b] → [N, C/b, 1, 1, b]."""
    n, cb_n, h, wd, b = x.shape
    ry = te.reduce_axis((0, h), "ry")
    rx = te.reduce_axis((0, wd), "rx")
    if kind == "max":
        return te.compute((n, cb_n, 1, 1, b), lambda i, cb, _y, _x, ci: nan_max(x[i, cb, ry, rx, ci], axis=[ry, rx]),
                          name="global_maxpool_blocked")
    s = te.compute((n, cb_n, 1, 1, b), lambda i, cb, _y, _x, ci: te.sum(x[i, cb, ry, rx, ci], axis=[ry, rx]),
                   name="global_avgpool_sum")
    return te.compute(s.shape, lambda i, cb, y, xx, ci: s[i, cb, y, xx, ci] / tirx.Cast(x.dtype, h * wd),
                      name="global_avgpool_blocked")



def pointwise_to_plain(x: te.Tensor, w: te.Tensor, bias: te.Tensor | None = None) -> te.Tensor:
    """A 1x1 conv with fewer output channels than a block (a detector's 1-channel logit map) of a
    blocked input: x [N, C/b, H, W, b], w [OC, C, 1, 1] (plain), bias [OC] → NCHW [N, OC, H, W]
    (layout role `pointwise-plain`). Per pixel and output channel, the b-lane partial sums over
    the channel blocks (`pointwise_acc`, one vector FMA per block), then halved lane by lane
    (`pointwise_sum{b/2}` ... `pointwise_sum1`: a tree of vector adds) and the bias added
    (`pointwise_out`); `schedules.pointwise.PointwisePlain` keeps all of it per pixel in
    registers. In NCHW the input went through a layout change first and the conv's only vector
    axis was its one output channel (scalar code)."""
    n, cbn, h, wd, b = x.shape
    oc = w.shape[0]
    bb = int(b)
    cb = te.reduce_axis((0, cbn), "cb")
    acc = te.compute((n, oc, h, wd, b), lambda i, o, y, xx, ci: te.sum(x[i, cb, y, xx, ci] * w[o, cb * bb + ci, 0, 0], axis=[cb]),
                     name="pointwise_acc")

    def halve(prev: te.Tensor, half: int) -> Any:
        return lambda i, o, y, xx, k: prev[i, o, y, xx, k] + prev[i, o, y, xx, k + half]

    prev, width = acc, bb
    while width > 1:
        width //= 2
        prev = te.compute((n, oc, h, wd, width), halve(prev, width), name=f"pointwise_sum{width}")
    last = prev
    if bias is None:
        return te.compute((n, oc, h, wd), lambda i, o, y, xx: last[i, o, y, xx, 0], name="pointwise_out")
    return te.compute((n, oc, h, wd), lambda i, o, y, xx: last[i, o, y, xx, 0] + bias[o], name="pointwise_out")

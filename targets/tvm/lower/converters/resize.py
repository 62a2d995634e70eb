"""Resize and Upsample with constant scales/sizes: onnx's reference interpolation as per-axis
weight matrices (`resize_plan`, `apply_resize`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax

from graphopt.ir import Node

from .. import dynamic as D
from .common import R, const_input, dtype_of, scalar_const, static_dims, static_len, str_attr
from ..registry import LoweringError, const_value, converter, dims_of


def resize_plan(node: Node, shape: list[int], roi: np.ndarray | None, scales: np.ndarray | None,
                 sizes: np.ndarray | None, overrides: dict[str, Any] | None = None) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
    """Per resized axis: (axis, weights [out, in] in float64, extrapolated rows mask or None).

    The weights are onnx's reference interpolation (separable, one axis at a time) applied to an
    identity matrix at compile time, so every mode, coordinate transformation, nearest rounding,
    cubic coefficient, exclude_outside, antialias and keep_aspect_ratio policy means exactly what
    the reference says; the data itself is resized by the compiled kernels."""
    from onnx.reference.ops import op_resize as ref

    over = overrides or {}

    def attr(name: str, default: Any = None) -> Any:
        return over[name] if name in over else node.attr(name, default)

    def sattr(name: str, default: str) -> str:
        v = attr(name, default)
        return v.decode() if isinstance(v, bytes) else str(v)

    r = len(shape)
    axes = [a + r if a < 0 else a for a in (attr("axes") or range(r))]
    mode = sattr("mode", "nearest")
    antialias = bool(attr("antialias", 0))
    a_coef = float(attr("cubic_coeff_a", -0.75))
    if mode == "nearest":
        nmode = sattr("nearest_mode", "round_prefer_floor")

        def fct(x: float, scale: float) -> np.ndarray:
            return ref._nearest_coeffs(x, mode=nmode)
    elif mode == "cubic":
        cub = ref._cubic_coeffs_antialias if antialias else ref._cubic_coeffs

        def fct(x: float, scale: float) -> np.ndarray:
            return cub(x, scale, A=a_coef)
    else:
        fct = ref._linear_coeffs_antialias if antialias else ref._linear_coeffs
    full_scale = [1.0] * r
    full_size = list(shape)
    if sizes is not None and sizes.size:
        for i, d in enumerate(axes):
            full_size[d] = int(sizes[i])
        full_scale = [full_size[i] / shape[i] for i in range(r)]
        policy = sattr("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            s = (min if policy == "not_larger" else max)(full_scale[d] for d in axes)
            full_scale = [s if i in axes else 1.0 for i in range(r)]
            full_size = [int(s * shape[i] + 0.5) if i in axes else shape[i] for i in range(r)]
    elif scales is not None and scales.size:
        for i, d in enumerate(axes):
            full_scale[d] = float(scales[i])
        full_size = [int(full_scale[i] * shape[i]) for i in range(r)]
    else:
        raise LoweringError(f"node {node.label()}: Resize needs scales or sizes")
    full_roi = None
    if roi is not None and roi.size:
        full_roi = [0.0] * r + [1.0] * r
        n = len(axes)
        for i, d in enumerate(axes):
            full_roi[d], full_roi[r + d] = float(roi[i]), float(roi[n + i])
    ctm = sattr("coordinate_transformation_mode", "half_pixel")
    plan = []
    for d in range(r):
        same_roi = full_roi is None or (full_roi[d] == 0.0 and full_roi[d + r] == 1.0)
        if abs(full_scale[d] - 1.0) < 1e-9 and full_size[d] == shape[d] and same_roi:
            continue
        eye = np.eye(shape[d], dtype=np.float64)
        w = ref._interpolate_1d_along_axis(
            eye, 0, float(full_scale[d]), int(full_size[d]), fct,
            roi=None if full_roi is None else [full_roi[d], full_roi[d + r]],
            extrapolation_value=np.nan, coordinate_transformation_mode=ctm, exclude_outside=bool(attr("exclude_outside", 0)))
        rows = np.isnan(w).any(axis=1)
        plan.append((d, np.nan_to_num(w, nan=0.0), rows if rows.any() else None))
    return plan


def _along(bb: relax.BlockBuilder, x: Any, axis: int, fn: Any) -> Any:
    """Apply fn (acting on the last axis) to `axis` of x."""
    r = x.ty.ndim
    if axis == r - 1:
        return fn(x)
    perm = [i for i in range(r) if i != axis] + [axis]
    inv = [perm.index(i) for i in range(r)]
    y = fn(bb.emit(R.permute_dims(x, perm)))
    return bb.emit(R.permute_dims(y, inv))


@converter("Resize")
def _resize(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Resize with constant roi/scales/sizes: per resized axis a gather (nearest) or a matmul
    with the interpolation weights (linear, cubic, antialias), then the extrapolation value
    where tf_crop_and_resize samples outside the input."""
    if opset < 11:
        return NotImplemented
    x = ins[0]
    consts: list[np.ndarray | None] = []
    for e in ins[1:4]:
        if e is None:
            consts.append(None)
            continue
        v = const_value(e)
        if v is None:
            raise LoweringError(f"node {node.label()}: Resize with run-time roi/scales/sizes is not supported by the cpu target (they decide the output shape)")
        consts.append(np.asarray(v))
    while len(consts) < 3:
        consts.append(None)
    if not all(isinstance(d, int) for d in dims_of(x)) or (
            str_attr(node, "mode", "nearest") == "linear" and _resize_direct(node, consts[0]) and dtype_of(x).startswith("float")):
        # (static linear too: the weight-matrix form below runs as a reduction, a generic
        # schedule: the detector's 2x upsampling of 32 x 16 x 16, 15 ms vs 0.75 ms)
        return _resize_symbolic(bb, node, x, *consts)
    shape = static_dims(node, x, "input")
    try:
        plan = resize_plan(node, shape, *consts)
    except (ImportError, AttributeError):  # onnx's reference moved: the frontend's converter
        return NotImplemented
    return apply_resize(bb, node, x, shape, plan, str_attr(node, "mode", "nearest"), float(node.attr("extrapolation_value", 0.0)))


def _resize_direct(node: Node, roi: np.ndarray | None) -> bool:
    """Resize that `_resize_symbolic` computes in one kernel: nearest or linear, no antialias, no
    roi, a plain coordinate transformation, the stretch policy."""
    return (str_attr(node, "mode", "nearest") in ("nearest", "linear") and not node.attr("antialias", 0)
            and (roi is None or not roi.size)
            and str_attr(node, "coordinate_transformation_mode", "half_pixel") in (
                "asymmetric", "half_pixel", "pytorch_half_pixel", "align_corners")
            and str_attr(node, "keep_aspect_ratio_policy", "stretch") == "stretch")


def resize_blocked(bb: relax.BlockBuilder, node: Node, x: Any, roi: np.ndarray | None, scales: np.ndarray | None,
                   sizes: np.ndarray | None) -> Any:
    """Resize (nearest or linear, `resize_blocked_ok`) of a channel-blocked activation
    [N, C/b, H, W, b] (layout role `resize`): H and W resized as `_resize_symbolic` resizes them
    in NCHW, the channel-block axes untouched; the innermost axis is the block, so the source
    coordinates are computed once per output pixel and the taps are whole vectors (in NCHW the
    vector axis is the output column, whose taps are a gather)."""
    if not resize_blocked_ok(node, x_rank=4, roi=roi, scales=scales, sizes=sizes):
        raise LoweringError(f"node {node.label()}: Resize cannot run on channel blocks")
    return _resize_symbolic(bb, node, x, roi, scales, sizes, blocked=True)


def resize_blocked_ok(node: Node, x_rank: int, roi: np.ndarray | None, scales: np.ndarray | None,
                      sizes: np.ndarray | None) -> bool:
    """Whether Resize `node` (opset 11 or later: inputs X, roi, scales, sizes) of a rank-4 NCHW
    input resizes only H and W in one direct kernel (`_resize_direct`: nearest or linear, no roi,
    a plain coordinate transformation but align_corners), with constant scales whose N and C
    factors are 1 (not sizes: they would pin N and C), so it can run on channel blocks. Not for: opset 10's
    Resize(X, scales) (its attributes mean other things), an `axes` attribute, cubic/antialias,
    tf_crop_and_resize, run-time scales."""
    if x_rank != 4 or len(node.inputs) < 3 or node.attr("axes", None) is not None:
        return False
    if not _resize_direct(node, roi) or (sizes is not None and sizes.size):
        return False
    if str_attr(node, "coordinate_transformation_mode", "half_pixel") == "align_corners":
        # its coordinate scale (n - 1) / (m - 1) of symbolic dims: TVM 0.27's LLVM codegen failed
        # on the blocked kernel ("IntImm supports only int ... float64"): it stays NCHW
        return False
    return scales is not None and scales.shape == (4,) and float(scales[0]) == 1.0 and float(scales[1]) == 1.0 \
        and all(float(s) > 0 for s in scales)


def _resize_symbolic(bb: relax.BlockBuilder, node: Node, x: Any, roi: np.ndarray | None, scales: np.ndarray | None,
                     sizes: np.ndarray | None, blocked: bool = False) -> Any:
    """Resize with constant scales or sizes of an input with symbolic dims (a detector's x2
    upsampling of an H x W map): a resized axis of symbolic length n gets the exact output length
    floor(n * scale) = (n * p) // q for the scale's fraction p / q (scales; the float scale is
    exactly p / q for the power-of-two and small-ratio scales exporters write), or the constant
    size. nearest and linear (no antialias, no roi) are one kernel in the data's type over all
    resized axes, source coordinates computed in float64 as the reference; the other modes take the
    run-time kernels (`resize_runtime_core`, float64). Axes of scale 1 are copied, not
    interpolated (a symbolic batch's 2 taps doubled the loads of a linear x2 upsampling).
    `blocked`: x is [N, C/b, H, W, b] and the node's scales are those of its NCHW form
    (`resize_blocked`)."""
    from fractions import Fraction

    from tvm import te, tirx

    dims = dims_of(x)
    r = len(dims) - 1 if blocked else len(dims)
    axes = [a + r if a < 0 else a for a in (node.attr("axes", None) or range(r))]
    mode = str_attr(node, "mode", "nearest")
    ctm = str_attr(node, "coordinate_transformation_mode", "half_pixel")
    if not _resize_direct(node, roi) or mode == "linear" and not dtype_of(x).startswith("float"):
        def c(a: np.ndarray | None) -> Any:
            return None if a is None or not a.size else relax.const(a, str(a.dtype))
        return resize_runtime_core(bb, node, x, c(roi), c(scales), c(sizes), node.attr)
    scale: dict[int, Any] = {}  # axis → its scale (a python float, or an f64 expression of the dims)
    out = list(dims)
    for i, a in enumerate(axes):
        n = dims[a]
        if sizes is not None and sizes.size:
            out[a] = int(sizes[i])
            scale[a] = float(out[a]) / n if isinstance(n, int) else None
        elif scales is not None and scales.size:
            sc = float(scales[i])
            scale[a] = sc
            if sc == 1.0:
                out[a] = n
            elif isinstance(n, int):
                out[a] = int(sc * n)
            else:
                f = Fraction(sc).limit_denominator(1 << 16)
                if float(f) != sc:
                    raise LoweringError(f"node {node.label()}: Resize scale {sc} of a symbolic dim is not a ratio of small "
                                        "integers; the cpu target cannot size its output at compile time")
                out[a] = n * f.numerator if f.denominator == 1 else tirx.floordiv(n * f.numerator, f.denominator)
        else:
            raise LoweringError(f"node {node.label()}: Resize needs scales or sizes")
    resized = [a for a in axes if not (scale.get(a) == 1.0 and isinstance(out[a], type(dims[a])) and out[a] is dims[a])]
    if blocked:
        out.append(dims[r])  # (the channel block)
        r += 1
    nmode = str_attr(node, "nearest_mode", "round_prefer_floor")
    f64 = "float64"

    def compute(data: Any) -> Any:
        shp = list(data.shape)
        osh = [out[d] if d in resized else shp[d] for d in range(r)]

        def coord(a: int, o: Any) -> Any:
            n_f = tirx.Cast(f64, shp[a])
            m_f = tirx.Cast(f64, osh[a])
            s = tirx.const(scale[a], f64) if scale.get(a) is not None else m_f / n_f
            o_f = tirx.Cast(f64, o)
            if ctm == "asymmetric":
                return o_f / s
            if ctm == "align_corners":
                return tirx.Select(m_f == tirx.const(1.0, f64), tirx.const(0.0, f64),
                                   o_f * (n_f - 1.0) / (m_f * 1.0 - 1.0))
            if ctm == "pytorch_half_pixel":
                return tirx.Select(m_f == tirx.const(1.0, f64), tirx.const(-0.5, f64), (o_f + 0.5) / s - 0.5)
            return (o_f + 0.5) / s - 0.5

        def clamp(i: Any, n: Any) -> Any:
            return tirx.max(tirx.min(i, n - 1), tirx.const(0, "int64"))

        if mode == "nearest":
            def nearest(a: int, o: Any) -> Any:
                xc = coord(a, o)
                if nmode == "floor":
                    i = tirx.floor(xc)
                elif nmode == "ceil":
                    i = tirx.ceil(xc)
                elif nmode == "round_prefer_ceil":
                    i = tirx.floor(xc + 0.5)
                else:  # round_prefer_floor
                    i = tirx.ceil(xc - 0.5)
                return clamp(tirx.Cast("int64", i), shp[a])

            return te.compute(osh, lambda *o: data[tuple(nearest(d, o[d]) if d in resized else o[d] for d in range(r))],
                              name="resize_nearest")

        def body(*o: Any) -> Any:
            taps = []  # per resized axis: (index0, index1, weight of index1)
            for a in resized:
                xc = coord(a, o[a])
                if ctm != "align_corners":
                    xc = tirx.max(xc, tirx.const(0.0, f64))  # (the reference clamps below 0 to the edge)
                x0 = tirx.floor(xc)
                w1 = tirx.Cast(data.dtype, xc - x0)
                i0 = tirx.Cast("int64", x0)
                taps.append((clamp(i0, shp[a]), clamp(i0 + 1, shp[a]), w1))
            acc = None
            for corner in range(1 << len(resized)):
                w = None
                idx = list(o)
                for j, a in enumerate(resized):
                    hi = (corner >> j) & 1
                    idx[a] = taps[j][1] if hi else taps[j][0]
                    wj = taps[j][2] if hi else tirx.const(1.0, data.dtype) - taps[j][2]
                    w = wj if w is None else w * wj
                term = w * data[tuple(idx)]
                acc = term if acc is None else acc + term
            return acc

        return te.compute(osh, body, name="resize_linear")

    return bb.emit_te(compute, x, primfunc_name_hint=f"resize_{mode}{'_blocked' if blocked else ''}")


def apply_resize(bb: relax.BlockBuilder, node: Node, x: Any, shape: list[int], plan: list[Any], mode: str, ev: float) -> Any:
    dtype = dtype_of(x)
    y = x
    masks = []
    for axis, w, rows in plan:
        if mode == "nearest" and np.all((w == 0) | (w == 1)):
            idx = relax.const(w.argmax(axis=1).astype("int64"), "int64")
            y = bb.emit(R.take(y, idx, axis=axis, mode="clip"))
        else:
            if not dtype.startswith("float"):
                raise LoweringError(f"node {node.label()}: Resize {mode} of {dtype} data is not supported by the cpu target")
            wt = relax.const(np.ascontiguousarray(w.T).astype(dtype), dtype)  # [in, out]
            y = _along(bb, y, axis, lambda t, wt=wt: bb.emit(R.matmul(t, wt)))
        if rows is not None:
            mshape = [1] * len(shape)
            mshape[axis] = rows.size
            masks.append(rows.reshape(mshape))
    if masks:
        m = masks[0]
        for extra in masks[1:]:
            m = m | extra
        y = bb.emit(R.where(relax.const(m, "bool"), scalar_const(ev, dtype), y))
    if y is x:
        y = bb.emit(R.add(x, scalar_const(0, dtype))) if dtype.startswith("float") else bb.emit(R.astype(x, dtype))
    return y


@converter("Upsample")
def _upsample(bb: relax.BlockBuilder, node: Node, ins: list[Any], opset: int) -> Any:
    """Upsample (scales attribute, or a constant scales input from opset 9) = Resize with the
    asymmetric coordinate transformation and floor rounding for nearest."""
    x = ins[0]
    shape = static_dims(node, x, "input")
    if len(ins) > 1 and ins[1] is not None:
        scales = np.asarray(const_input(node, ins[1], "scales"), dtype=np.float64)
    else:
        scales = np.asarray(node.attr("scales"), dtype=np.float64)
    mode = str_attr(node, "mode", "nearest")
    over = {"mode": mode, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor", "axes": None,
            "antialias": 0, "exclude_outside": 0, "keep_aspect_ratio_policy": "stretch"}
    plan = resize_plan(node, shape, None, scales, None, over)
    return apply_resize(bb, node, x, shape, plan, mode, 0.0)



def _resize_axis_kernel(node: Node, axis: int, m: Any, mode: str, ctm: str, nmode: str, a_coef: float, antialias: bool,
                        exclude: bool, ev: float) -> Any:
    """TE compute resizing `axis` of a float64 tensor to length m (a symbolic var) with the
    run-time full-rank scales [r] (float64) and roi [2r] (float64): onnx's reference
    (_interpolate_1d_along_axis) per output position: the source coordinate x by the coordinate
    transformation, left = the pixel left of x (ratio in (0, 1]), taps at left + offset + k with
    edge clamping, their coefficients by mode (antialias: a kernel widened by 1/scale, its tap
    count bounded by 2n + 2 / 4n + 2 for linear / cubic since an output needs scale >= 1/n),
    normalised when antialiased or excluding outside taps; tf_crop_and_resize outside the input
    gives the extrapolation value."""
    from tvm import te, tirx

    f64 = "float64"

    def c(v: float) -> Any:
        return tirx.const(v, f64)

    def compute(data: Any, scales: Any, roi: Any) -> Any:
        dims = list(data.shape)
        r = len(dims)
        n = dims[axis]
        n_f = tirx.Cast(f64, n)
        s = scales[axis]
        ow = s * n_f  # output_width (float) as the reference
        m_f = tirx.Cast(f64, m)
        out_shape = [m if d == axis else dims[d] for d in range(r)]

        def x_of(o: Any) -> Any:
            o_f = tirx.Cast(f64, o)
            if ctm == "align_corners":
                return tirx.Select(ow == c(1.0), c(0.0), o_f * (n_f - c(1.0)) / (ow - c(1.0)))
            if ctm == "asymmetric":
                return o_f / s
            if ctm == "tf_crop_and_resize":
                b, e = roi[axis], roi[axis + r]
                x = tirx.Select(ow == c(1.0), (e - b) * (n_f - c(1.0)) / c(2.0), o_f * (e - b) * (n_f - c(1.0)) / (ow - c(1.0)))
                return x + b * (n_f - c(1.0))
            if ctm == "pytorch_half_pixel":
                return tirx.Select(ow == c(1.0), c(-0.5), (o_f + c(0.5)) / s - c(0.5))
            if ctm == "half_pixel":
                return (o_f + c(0.5)) / s - c(0.5)
            if ctm == "half_pixel_symmetric":
                offset = n_f / c(2.0) * (c(1.0) - m_f / ow)
                return offset + (o_f + c(0.5)) / s - c(0.5)
            raise LoweringError(f"node {node.label()}: coordinate_transformation_mode {ctm!r} is not supported")

        def cubic(t: Any) -> Any:  # the antialias cubic kernel at |t|
            t = tirx.abs(t)
            a = c(a_coef)
            near = (a + c(2.0)) * t * t * t - (a + c(3.0)) * t * t + c(1.0)
            far = a * t * t * t - c(5.0) * a * t * t + c(8.0) * a * t - c(4.0) * a
            return tirx.Select(t <= c(1.0), near, tirx.Select(t < c(2.0), far, c(0.0)))

        def taps(o: Any) -> tuple[Any, Any, Any, Any]:
            """(ratio, the pixel left of x, offset of the first tap from it, tap count) at o."""
            x = x_of(o)
            xi = tirx.floor(x)
            is_int = x == xi
            ratio = tirx.Select(is_int, c(1.0), x - xi)
            left = tirx.Cast("int64", xi) - tirx.Cast("int64", is_int)
            if antialias:
                sa = tirx.min(s, c(1.0))
                half = c(1.0) if mode == "linear" else c(2.0)
                start = tirx.Cast("int64", tirx.floor(-half / sa)) + 1
                return ratio, left, start, 2 - 2 * start
            if mode == "cubic":
                return ratio, left, tirx.const(-1, "int64"), tirx.const(4, "int64")
            return ratio, left, tirx.const(0, "int64"), tirx.const(2, "int64")

        def coeff(o: Any, k: Any) -> Any:
            ratio, left, start, count = taps(o)
            first = left + start
            if antialias:
                sa = tirx.min(s, c(1.0))
                arg = (tirx.Cast(f64, start + k) - ratio) * sa
                w = tirx.max(tirx.min(c(1.0) - tirx.abs(arg), c(1.0)), c(0.0)) if mode == "linear" else cubic(arg)
            elif mode == "cubic":
                a = c(a_coef)
                t = ratio
                u = c(1.0) - ratio
                cs = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                      ((a + 2) * t - (a + 3)) * t * t + 1,
                      ((a + 2) * u - (a + 3)) * u * u + 1,
                      ((a * (u + 1) - 5 * a) * (u + 1) + 8 * a) * (u + 1) - 4 * a]
                w = tirx.Select(k == 0, cs[0], tirx.Select(k == 1, cs[1], tirx.Select(k == 2, cs[2], cs[3])))
            elif mode == "linear":
                w = tirx.Select(k == 0, c(1.0) - ratio, ratio)
            else:  # nearest: [0, 1] at an integer ratio, else by nearest_mode
                take1 = {"round_prefer_floor": ratio > c(0.5), "round_prefer_ceil": ratio >= c(0.5),
                         "floor": ratio == c(1.0), "ceil": tirx.const(True, "bool")}[nmode]
                take1 = tirx.Or(take1, ratio == c(1.0))
                w = tirx.Select(k == 0, tirx.Select(take1, c(0.0), c(1.0)), tirx.Select(take1, c(1.0), c(0.0)))
            idx = first + k
            ok = k < count
            if exclude:
                ok = tirx.all(ok, idx >= 0, idx < n)
            return tirx.Select(ok, w, c(0.0)), tirx.max(tirx.min(idx, n - 1), 0)

        bound = (2 * n + 2 if mode == "linear" else 4 * n + 2) if antialias else (4 if mode == "cubic" else 2)
        normalise = antialias or exclude

        if normalise:
            kw = te.reduce_axis((0, bound), name="kw")
            wsum = te.compute([m], lambda o: te.sum(coeff(o, kw)[0], axis=kw), name="resize_wsum")
        kr = te.reduce_axis((0, bound), name="k")

        def body(*idx: Any) -> Any:
            o = idx[axis]
            w, src = coeff(o, kr)
            at = [src if d == axis else idx[d] for d in range(r)]
            return te.sum(w * data[tuple(at)], axis=kr)

        acc = te.compute(out_shape, body, name="resize_acc")

        def finish(*idx: Any) -> Any:
            o = idx[axis]
            v = acc[idx]
            if normalise:
                ws = wsum[o]
                v = v / tirx.Select(ws == c(0.0), c(1.0), ws)
            if ctm == "tf_crop_and_resize":
                x = x_of(o)
                v = tirx.Select(tirx.Or(x < c(0.0), x > n_f - c(1.0)), c(ev), v)
            return v

        return te.compute(out_shape, finish, name="resize_out")

    return compute


def resize_runtime_core(bb: relax.BlockBuilder, node: Node, x: Any, roi: Any, scales: Any, sizes: Any, attr: Any) -> Any:
    """_resize_runtime's body; `attr(name, default)` gives the Resize attributes."""

    def sattr(name: str, default: str) -> str:
        v = attr(name, default)
        return v.decode() if isinstance(v, bytes) else str(v)

    dtype = dtype_of(x)
    r = x.ty.ndim
    axes = [a + r if a < 0 else a for a in (attr("axes", None) or range(r))]
    k = len(axes)
    mode = sattr("mode", "nearest")
    if mode != "nearest" and not dtype.startswith("float"):
        raise LoweringError(f"node {node.label()}: Resize {mode} of {dtype} data is not supported by the cpu target")
    f64 = "float64"
    shape = D.shape_tensor(bb, x)  # [r] int64
    n_f = bb.emit(R.astype(shape, f64))

    def pick(t: Any, i: int) -> Any:
        return bb.emit(R.reshape(R.take(t, relax.const(i, "int64"), axis=0), [1]))

    def full(t: Any, default: Any) -> Any:
        """[k] values on `axes` → [r], `default(d)` ([1] exprs) elsewhere."""
        return bb.emit(R.concat([pick(t, axes.index(d)) if d in axes else default(d) for d in range(r)], axis=0))

    use_sizes = sizes is not None and (static_len(sizes) or 0) > 0
    if use_sizes:
        sz = bb.emit(R.astype(sizes, "int64"))
        out = full(sz, lambda d: pick(shape, d))
        scale = bb.emit(R.divide(R.astype(out, f64), n_f))
        policy = sattr("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            sel = bb.emit(R.concat([pick(scale, d) for d in axes], axis=0))
            s1 = bb.emit(R.min(sel) if policy == "not_larger" else R.max(sel))
            ones = relax.const(np.ones(1), f64)
            scale = bb.emit(R.concat([bb.emit(R.reshape(s1, [1])) if d in axes else ones for d in range(r)], axis=0))
            rounded = bb.emit(R.astype(R.floor(R.add(R.multiply(scale, n_f), scalar_const(0.5, f64))), "int64"))
            out = bb.emit(R.concat([pick(rounded, d) if d in axes else pick(shape, d) for d in range(r)], axis=0))
    else:
        if scales is None or (static_len(scales) or 0) == 0:
            raise LoweringError(f"node {node.label()}: Resize needs scales or sizes")
        sc = bb.emit(R.astype(scales, f64))
        scale = full(sc, lambda d: relax.const(np.ones(1), f64))
        out = bb.emit(R.astype(R.multiply(scale, n_f), "int64"))  # truncation, as the reference
    if roi is not None and (static_len(roi) or 0) > 0:
        rf = bb.emit(R.astype(roi, f64))
        lo = full(bb.emit(R.strided_slice(rf, [0], [0], [k])), lambda d: relax.const(np.zeros(1), f64))
        hi = full(bb.emit(R.strided_slice(rf, [0], [k], [2 * k])), lambda d: relax.const(np.ones(1), f64))
        roi_full = bb.emit(R.concat([lo, hi], axis=0))
    else:
        roi_full = relax.const(np.array([0.0] * r + [1.0] * r), f64)
    dims = D.shape_of_tensor(bb, out, r, "rs").values
    ctm = sattr("coordinate_transformation_mode", "half_pixel")
    nmode = sattr("nearest_mode", "round_prefer_floor")
    antialias = bool(attr("antialias", 0)) and mode != "nearest"
    exclude = bool(attr("exclude_outside", 0))
    ev = float(attr("extrapolation_value", 0.0))
    y = bb.emit(R.astype(x, f64)) if dtype != f64 else x
    for a in axes:
        fn = _resize_axis_kernel(node, a, dims[a], mode, ctm, nmode, float(attr("cubic_coeff_a", -0.75)), antialias, exclude, ev)
        y = bb.emit_te(fn, y, scale, roi_full, primfunc_name_hint=f"resize_axis{a}")
    if dtype != f64:
        if not dtype.startswith("float"):
            info = np.iinfo(dtype) if dtype != "bool" else None
            if info is not None:
                y = bb.emit(R.clip(y, float(info.min), float(info.max)))
        y = bb.emit(R.astype(y, dtype))
    return y

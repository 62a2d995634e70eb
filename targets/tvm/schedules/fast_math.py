"""Vectorisable erf and exp for LLVM targets (`use_fast_erf`): without them TVM calls libm per
lane, and GELU, softmax and sigmoid do not vectorise. Vectorisable `isnan` (`use_vector_isnan`):
without it every loop that tests for NaN (max pooling, ReduceMax/Min, Max/Min, Sign) stays scalar."""

from __future__ import annotations

from typing import Any

__all__ = ["use_fast_erf", "use_vector_isnan", "vectorisable_rounding"]


# Eigen's float32 erf (the rational approximation TVM's topi.fast_erf and onnxruntime's MLAS
# use): max abs error 4.2e-7 against math.erf over [-6, 6]
_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
              -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
             -1.42647390514189e-02)
_FAST_ERF_REGISTERED = False


def _libm_per_lane(dtype: str, name: str, x: Any) -> Any:
    """libm's scalar `name` (double) applied to `x`: one call per lane for a vector (a vectorised
    loop's float64 exp/erf reaches this lowering as a vector; one extern call with a vector
    argument gave garbage lanes: ReduceLogSumExp on float64 returned nan / -inf)."""
    from tvm import tirx

    if "x" not in dtype:
        return tirx.call_pure_extern(dtype, name, x)
    scalar, lanes = dtype.split("x")[0], int(dtype.split("x")[1])
    parts = [tirx.call_pure_extern(scalar, name, tirx.Shuffle([x], [tirx.const(i, "int32")])) for i in range(lanes)]
    return tirx.Shuffle(parts, [tirx.const(i, "int32") for i in range(lanes)])


def _fast_erf(call: Any) -> Any:
    """LLVM lowering of `tirx.erf`: the polynomial for float32 (scalar or vector); libm's erf
    for other types. LLVM's default is a call to libm's erff per element, which the vectoriser
    cannot vectorise: the GELU epilogue of a 128x768x3072 dense ran 2.4x onnxruntime's time."""
    from tvm import tirx

    x = call.args[0]
    dtype = str(x.ty)
    if not dtype.startswith("float32"):
        if dtype.startswith("float64"):
            return _libm_per_lane(dtype, "erf", x)
        return tirx.Cast(dtype, _fast_erf(tirx.Call(dtype.replace(dtype.split("x")[0], "float32", 1),
                                                     call.op, [tirx.Cast(dtype.replace(dtype.split("x")[0], "float32", 1), x)])))
    xc = tirx.max(tirx.min(x, 4.0), -4.0)
    x2 = xc * xc
    p = x2 * _ERF_ALPHA[0] + _ERF_ALPHA[1]
    for c in _ERF_ALPHA[2:]:
        p = x2 * p + c
    p = xc * p
    q = x2 * _ERF_BETA[0] + _ERF_BETA[1]
    for c in _ERF_BETA[2:]:
        q = x2 * q + c
    out = tirx.max(tirx.min(p / q, 1.0), -1.0)  # (the polynomial overshoots 1 by an ulp at 4)
    return tirx.Select(tirx.isnan(x), x, out)


# Cephes expf: exp(x) = 2^n * p(r), r = x - n ln2, |r| <= ln2/2 (1-2 ulp)
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _fast_exp(call: Any) -> Any:
    """LLVM lowering of `tirx.exp` for float32 (scalar or vector): range reduction and a
    polynomial, vectorisable, instead of a libm expf call per element (softmax ran 3.9x and
    x*sigmoid(x) 2x onnxruntime's time with them). NaN stays NaN; overflow saturates at the
    largest finite value's neighbourhood (exp(88.37)); underflow gives 0. Other types: libm."""
    from tvm import tirx

    x = call.args[0]
    dtype = str(x.ty)
    if not dtype.startswith("float32"):
        if dtype.split("x")[0] == "float64":
            return _libm_per_lane(dtype, "exp", x)
        # float16 / bfloat16: the float32 polynomial on the widened value (tirx has no Call
        # constructor in 0.27 to build a float32 exp call from)
        f32 = dtype.replace(dtype.split("x")[0], "float32", 1)
        return tirx.Cast(dtype, _exp_f32(tirx.Cast(f32, x), f32))
    return _exp_f32(x, dtype)


def _exp_f32(x: Any, dtype: str) -> Any:
    """The float32 (scalar or vector) exp polynomial of `_fast_exp`."""
    from tvm import tirx

    itype = dtype.replace("float32", "int32", 1)
    xc = tirx.max(tirx.min(x, 88.3762626647949), -88.3762626647949)
    n = tirx.floor(xc * 1.44269504088896341 + 0.5)
    r = xc - n * 0.693359375 - n * -2.12194440e-4  # ln2 in two parts (Cephes C1, C2)
    z = r * r
    y = r * _EXP_P[0] + _EXP_P[1]
    for c in _EXP_P[2:]:
        y = y * r + c
    y = y * z + r + 1.0
    scale = tirx.reinterpret(dtype, (tirx.Cast(itype, n) + 127) << 23)
    out = y * scale
    inf = tirx.const(float("inf"), "float32")
    if "x" in dtype:
        inf = tirx.Broadcast(inf, int(dtype.split("x")[1]))
    out = tirx.Select(x > 88.72283905206835, inf, out)  # overflow: inf, as expf gives
    return tirx.Select(tirx.isnan(x), x, out)  # NaN in, NaN out (min/max would have dropped it)


def _fast_tanh(call: Any) -> Any:
    """LLVM lowering of `tirx.tanh` for float32: sign(x)·(1 − e)/(1 + e) with e = exp(−2|x|) (the
    vectorised exp above), and below |x| = 0.05 the odd series x − x³/3 + 2x⁵/15 − 17x⁷/315
    (relative error < 1e-13 there). TVM's own form (1 − exp(−2x))/(1 + exp(−2x)) cancels to 0
    for |x| below ~3e-8: tanh(1e-30) was 0 where onnxruntime gives 1e-30, so Tanh(x)/Tanh(x)
    made NaN from tiny inputs (fuzz case valid-cpu:6:16)."""
    from tvm import tirx

    x = call.args[0]
    dtype = str(x.ty)
    if not dtype.startswith("float32"):
        if dtype.startswith("float64"):
            return _libm_per_lane(dtype, "tanh", x)
        f32 = dtype.replace(dtype.split("x")[0], "float32", 1)
        return tirx.Cast(dtype, _fast_tanh(tirx.Call(f32, call.op, [tirx.Cast(f32, x)])))
    a = tirx.abs(x)
    e = tirx.exp(a * -2.0)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    out = tirx.Select(a < 0.05, small, tirx.Select(x < 0.0, -big, big))
    return tirx.Select(tirx.isnan(x), x, out)


_FAST_MATH = {"tirx.erf": _fast_erf, "tirx.exp": _fast_exp, "tirx.tanh": _fast_tanh}


def use_fast_erf() -> None:
    """Lower `tirx.erf`, `tirx.exp` and `tirx.tanh` on LLVM targets with `_fast_erf` /
    `_fast_exp` / `_fast_tanh` from now on in this process (the default schedules call it: it is what makes GELU, softmax and
    sigmoid vectorise)."""
    global _FAST_ERF_REGISTERED
    if _FAST_ERF_REGISTERED:
        return
    from tvm.tirx.op import register_intrin_lowering

    for op, f in _FAST_MATH.items():
        register_intrin_lowering(op, "llvm", f=f, level=99)
    _FAST_ERF_REGISTERED = True


def vectorisable_rounding(func: Any) -> Any:
    """`func` with every `tirx.nearbyint(x)` (ONNX Round, QuantizeLinear's round half to even) as
    `llvm.roundeven(x)`: the same values in the default rounding mode (round half to even, NaN and
    infinities kept), but TVM's vectoriser widens an LLVM intrinsic call and not `tirx.nearbyint`
    (registered without TVectorizable), which it took apart lane by lane: every requantize
    epilogue (int8 kernels, a float conv writing uint8) ran a scalar multiply, rounding, clamp and
    conversion per lane (int8 mnist_resnet8's first int8 conv at N = 64: 224 scalar conversions
    per tile of 14 pixels). For LLVM targets only (the caller checks). Returned as it is where it
    has no nearbyint, where its calls differ in type, or where the rewritten TVMScript does not
    parse back (said in one warning line)."""
    import warnings

    import tvm
    import tvm_ffi

    op = tvm.ir.Op.get("tirx.nearbyint")
    calls: list[Any] = []
    tvm_ffi.structural_walk(func.body, (tvm.ir.expr.Call, calls.append), order="post")
    types = {str(c.ty) for c in calls if c.op.same_as(op)}  # (tvm.ir.expr.Call: 0.27 keeps it there)
    if len(types) != 1:
        return func
    text = func.script()
    new = text.replace("T.nearbyint(", f'T.call_llvm_pure_intrin("{types.pop()}", "llvm.roundeven", ')
    try:
        out = tvm.script.from_source(new)
    except Exception as e:  # noqa: BLE001 - keep the scalarised rounding, say so
        warnings.warn(f"nearbyint kept (its lanes run scalar): the rewritten kernel did not parse: {e}", stacklevel=2)
        return func
    return out


def use_vector_isnan(on: bool) -> None:
    """Mark `tirx.isnan` vectorisable (`on`) or not (TVM's own registration: off) for the builds
    that follow in this process (the default schedules call it with the `vector_isnan` knob on LLVM
    targets, off on others).

    TVM 0.27 registers no `TVectorizable` for `tirx.isnan`, so `VectorizeLoop` scalarises every
    loop whose body tests for NaN: the NaN-skipping max/min combiner of `kernels.minmax`
    (`select(isnan(acc) || x > acc, x, acc)`: every max pooling, GlobalMaxPool, ReduceMax/Min) and
    the NaN-propagating Max/Min/Sign. Before -> after, for a blocked 2x2 max pool: a scalar loop
    over the block's 16 lanes per tap, the accumulator tile in memory (LLVM's SLP vectoriser
    half-recovering it with masked loads) -> one vector compare-unordered, compare, or and blend
    per tap, the tile's accumulators in registers. LLVM lowers a vector isnan as one `fcmp uno`
    (x86 `vcmpunordps`, AArch64 `fcmuo`); the C/CUDA code generators get the scalar op as before,
    since the mark is taken off for non-LLVM targets. Must not be on for a build whose code
    generator cannot emit a vector `isnan`."""
    import tvm

    op = tvm.ir.Op.get("tirx.isnan")
    marked = bool(op.get_attr("TVectorizable"))
    if on and not marked:
        op.set_attr("TVectorizable", True, plevel=20)
    elif not on and marked:
        op.reset_attr("TVectorizable")

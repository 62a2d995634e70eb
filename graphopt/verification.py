"""`--verify`: the compiled result against the original, with tolerances that know the
reference's own noise, or (`--verify-metric`) with accuracy metrics for lossy pipelines.

    ref = reference_outputs(model, feeds)            # onnxruntime, optimizations off and on
    v = verify_outputs(ref, actual, rtol=1e-4, atol=1e-5, feeds=feeds, inputs="random(seed=0)")
    v.ok, v.summary()

The floor: onnxruntime itself, run with all graph optimizations and without, differs by some
rounding (fused kernels, reordered sums): on a text detector by 1.2e-4, more than the default
atol. An error of that size is no fault of the compiled model, so per output the absolute
tolerance is at least that difference, and the verdict line says when it was raised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from graphopt.check import compare_outputs, run_onnxruntime
from graphopt.ir.core import Model
from graphopt.accuracy import Budget, output_agreement
from graphopt.report import VerifyResult


@dataclass
class Reference:
    """The original model's outputs (optimizations off: what it computes) and how far
    onnxruntime's optimized run strays from them, per output."""

    outputs: list[np.ndarray]
    names: list[str]
    noise: dict[str, float]


def reference_outputs(model: Model, feeds: Mapping[str, np.ndarray]) -> Reference:
    plain = run_onnxruntime(model, feeds)
    try:
        optimized = run_onnxruntime(model, feeds, optimize=True)
    except Exception:  # noqa: BLE001 - an optimizer onnxruntime cannot run gives no floor, not a failure
        optimized = None
    names = [v.name for v in model.graph.outputs]
    noise = {}
    if optimized is not None:
        for name, a, b in zip(names, plain, optimized):
            noise[name] = max_abs_difference(a, b)
    return Reference(plain, names, noise)


def max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| over the elements finite in both (0 for non-float or empty outputs)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype.kind not in "fc" or a.size == 0:
        return 0.0
    fa, fb = a.astype(np.float64), b.astype(np.float64)
    ok = np.isfinite(fa) & np.isfinite(fb)
    return float(np.abs(fa[ok] - fb[ok]).max()) if ok.any() else 0.0


def input_shapes(feeds: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    return {k: [int(d) for d in np.shape(v)] for k, v in feeds.items()}


def verify_outputs(ref: Reference, actual: Sequence[np.ndarray], *, rtol: float, atol: float,
                   feeds: Mapping[str, np.ndarray], inputs: str,
                   thresholds: Sequence[Budget] = ()) -> VerifyResult:
    """Elementwise per output |a - e| <= max(atol, noise) + rtol·|e|; or, with `thresholds`,
    the metrics (cosine, top-1 agreement, SQNR against the original) instead."""
    whole = compare_outputs(ref.outputs, list(actual), rtol=math.inf, atol=math.inf)  # the error, whatever it is
    max_abs, max_rel = whole.max_abs, whole.max_rel
    if thresholds:
        if not whole.ok:  # a shape/dtype/count mismatch no metric excuses
            ok, detail, metrics = False, whole.detail, None
        else:
            metrics = output_agreement([ref.outputs], [list(actual)], ref.names)
            failed = [t for t in thresholds if not t.holds(metrics)]
            ok = not failed
            detail = "; ".join(f"{t.metric} {_metric(metrics.get(t.metric), t.metric)}, needs {t}" for t in failed) \
                or ", ".join(f"{t.metric} {_metric(metrics.get(t.metric), t.metric)}" for t in thresholds)
        return VerifyResult(ok, max_abs, max_rel, rtol, atol, inputs, detail, input_shapes(feeds), dict(ref.noise),
                            metrics, [str(t) for t in thresholds])
    ok, detail = True, whole.detail
    if not whole.ok:
        ok, detail = False, whole.detail
    else:
        for i, (name, e, a) in enumerate(zip(ref.names, ref.outputs, actual)):
            floor = max(atol, ref.noise.get(name, 0.0))
            cmp = compare_outputs([e], [a], rtol=rtol, atol=floor)
            if not cmp.ok:
                raised = f", atol raised to onnxruntime's own noise {floor:.3g}" if floor > atol else ""
                ok, detail = False, (f"output {i} ({name}): max abs error {cmp.max_abs:.3g}, max rel error "
                                     f"{cmp.max_rel:.3g} (rtol={rtol}, atol={atol}{raised})")
                break
    return VerifyResult(ok, max_abs, max_rel, rtol, atol, inputs, detail, input_shapes(feeds), dict(ref.noise))


def _metric(v: object, key: str) -> str:
    if not isinstance(v, (int, float)):
        return "n/a"
    return f"{v:.2f} dB" if key == "sqnr" else f"{v:.6f}" if key == "cosine" else f"{v:.2f} pt" if key == "top1" else f"{v:.4f}"


def summary_line(v: VerifyResult) -> str:
    """`verify: ok: ...` with the inputs' shapes and, when it mattered, the noise floor."""
    verdict = "ok" if v.ok else "FAILED"
    shapes = ", ".join(f"{k}[{'x'.join(map(str, s))}]" for k, s in v.shapes.items())
    where = f"inputs {v.inputs}" + (f": {shapes}" if shapes else "")
    if v.thresholds:
        m = v.metrics or {}
        got = ", ".join(f"{k} {_metric(m.get(k), k)}" for k in ("cosine", "top1-agreement", "sqnr") if k in m)
        return (f"verify: {verdict}: {got or v.detail} (--verify-metric {', '.join(v.thresholds)}; max abs error "
                f"{v.max_abs:.3g}; {where})")
    line = f"verify: {verdict}: max abs error {v.max_abs:.3g}, max rel error {v.max_rel:.3g} (rtol={v.rtol}, atol={v.atol}"
    if v.noise:
        worst = max(v.noise, key=lambda k: v.noise[k])
        n = v.noise[worst]
        if n > v.atol:
            line += f", raised to {n:.3g} on {sum(1 for x in v.noise.values() if x > v.atol)} output(s): " \
                    f"onnxruntime's own noise, optimizations on vs off"
        else:
            line += f"; onnxruntime's own noise {n:.3g}, below atol"
    return line + f"; {where})"

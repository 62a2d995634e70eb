"""`--verify`: the compiled result against the original, with tolerances that know the
reference's own noise, or (`--verify-metric`) with accuracy metrics for lossy pipelines.

    ref = reference_outputs(model, feeds)            # onnxruntime, optimizations off and on
    v = verify_outputs(ref, actual, rtol=1e-4, atol=1e-5, feeds=feeds, inputs="random(seed=0)")
    v.ok, v.summary()

The floor: onnxruntime itself, run with all graph optimizations and without, differs by some
rounding (fused kernels, reordered sums): on a text detector by 1.2e-4, more than the default
atol. An error of that size is no fault of the compiled model, so per output the absolute
tolerance is at least that difference, and the verdict line says when it was raised.

NaN fed to a max or min: ONNX does not say what MaxPool, GlobalMaxPool, ReduceMax/Min or
ArgMax/Min give when a NaN is among the elements they compare. graphopt's cpu target skips it
(IEEE 754 maxNum, numpy's `fmax`: NaN only where every element is); onnxruntime keeps or drops
it by the order its vector loops read the elements, so its answer is neither rule (a 2x2
window [a, NaN, b, c] can give max(b, c)). When such a node reads a NaN on the verification
inputs, the reference is onnxruntime running that node with NaN skipped (the model rewritten:
NaN -> -inf before a max, +inf before a min, NaN put back where a window held nothing else),
and the verdict line names the node. Everything else is compared as usual, NaN positions too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field

import numpy as np
import onnx

from graphopt.check import compare_outputs, onnxruntime_session, run_onnxruntime
from graphopt.ir.core import Model, Node
from graphopt.onnx_io import to_onnx
from graphopt.ir.query import const_array
from graphopt.accuracy import Budget, output_agreement
from graphopt.report import VerifyResult


@dataclass
class Reference:
    """The original model's outputs (optimizations off: what it computes) and how far
    onnxruntime's optimized run strays from them, per output."""

    outputs: list[np.ndarray]
    names: list[str]
    noise: dict[str, float]
    #: the max/min-type nodes that read a NaN on these inputs, and the outputs with NaN skipped
    #: there (compared instead of `outputs`)
    nan_skipped: list[str] = field(default_factory=list)
    skip_nan_outputs: list[np.ndarray] | None = None


#: ops whose result ONNX leaves open when a NaN is among the elements they compare
NAN_ORDER_OPS = frozenset({"MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin", "ArgMax", "ArgMin"})
_MAX_LIKE = frozenset({"MaxPool", "GlobalMaxPool", "ReduceMax", "ArgMax"})


@dataclass(frozen=True)
class NanFedNode:
    op_type: str
    key: str  # the node's name, or its first output's name when it has none
    dtype: np.dtype[Any]  # of the data input

    def __str__(self) -> str:
        return f"{self.op_type} '{self.key}'"


def _nan_probes(model: Model, feeds: Mapping[str, np.ndarray]) -> tuple[list[Node], dict[str, np.ndarray], list[str]]:
    """The main graph's NAN_ORDER_OPS nodes, their data inputs already known (feeds, constants),
    and the names of those onnxruntime must compute."""
    nodes = [n for n in model.graph.nodes if n.op_type in NAN_ORDER_OPS and n.domain in ("", "ai.onnx")
             and n.inputs and n.inputs[0] is not None and n.outputs]
    known: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in feeds.items()} if nodes else {}
    wanted: list[str] = []
    for n in nodes:
        v = n.inputs[0]
        assert v is not None
        c = const_array(v)
        if c is not None:
            known[v.name] = c
        elif v.name not in known and v.name not in wanted:
            wanted.append(v.name)
    return nodes, known, wanted


def _nan_fed(nodes: Sequence[Node], known: Mapping[str, np.ndarray]) -> list[NanFedNode]:
    fed = []
    for n in nodes:
        v = n.inputs[0]
        assert v is not None
        a = known.get(v.name)
        if a is not None and a.dtype.kind == "f" and bool(np.isnan(a).any()):
            fed.append(NanFedNode(n.op_type, n.name or n.outputs[0].name, a.dtype))
    return fed


def nan_fed_nodes(model: Model, feeds: Mapping[str, np.ndarray]) -> list[NanFedNode]:
    """The main graph's NAN_ORDER_OPS nodes whose data input holds a NaN on `feeds` (run on
    onnxruntime, optimizations off; If/Loop bodies are not looked into)."""
    nodes, known, wanted = _nan_probes(model, feeds)
    if wanted:
        try:
            sess = onnxruntime_session(model, threads=1, optimize=False, log_severity=4, outputs=wanted)
            known.update(zip(wanted, sess.run(None, dict(feeds))))
        except Exception:  # noqa: BLE001 - no answer means no second reference: the strict one stands
            return []
    return _nan_fed(nodes, known)


def skip_nan_model(model: Model, fed: Sequence[NanFedNode]) -> onnx.ModelProto:
    """The model with each `fed` node skipping NaN: its data input's NaN become -inf (a max) or
    +inf (a min), and a pool/reduce result is NaN again where its window held only NaN (the
    same op over a not-NaN indicator gives 0 there; a pool's padding never counts)."""
    proto = to_onnx(model)
    by_key = {f.key: f for f in fed}
    nodes: list[onnx.NodeProto] = []
    for node in proto.graph.node:
        f = by_key.get(node.name or (node.output[0] if node.output else ""))
        if f is None or node.op_type != f.op_type:
            nodes.append(node)
            continue
        u = f"graphopt_skip_nan_{len(nodes)}_"
        elem = onnx.helper.np_dtype_to_tensor_dtype(f.dtype)
        fill = -np.inf if node.op_type in _MAX_LIKE else np.inf
        x = node.input[0]
        nodes += [
            onnx.helper.make_node("IsNaN", [x], [u + "isnan"]),
            onnx.helper.make_node("Constant", [], [u + "fill"],
                                  value=onnx.numpy_helper.from_array(np.array(fill, f.dtype))),
            onnx.helper.make_node("Where", [u + "isnan", u + "fill", x], [u + "x"]),
        ]
        skipped = onnx.NodeProto()
        skipped.CopyFrom(node)
        skipped.input[0] = u + "x"
        if node.op_type in ("ArgMax", "ArgMin"):
            nodes.append(skipped)
            continue
        y = node.output[0]
        skipped.output[0] = u + "y"
        del skipped.output[1:]  # (MaxPool's Indices: not rebuilt)
        count = onnx.NodeProto()
        count.CopyFrom(skipped)
        count.name = u + "count"
        if count.op_type == "ReduceMin":
            count.op_type = "ReduceMax"  # (the indicator's max: 0 only where all were NaN)
        count.input[0] = u + "some"
        count.output[0] = u + "count"
        nodes += [
            skipped,
            onnx.helper.make_node("Not", [u + "isnan"], [u + "notnan"]),
            onnx.helper.make_node("Cast", [u + "notnan"], [u + "some"], to=elem),
            count,
            onnx.helper.make_node("Constant", [], [u + "zero"], value=onnx.numpy_helper.from_array(np.array(0, f.dtype))),
            onnx.helper.make_node("Equal", [u + "count", u + "zero"], [u + "none"]),
            onnx.helper.make_node("Constant", [], [u + "nan"], value=onnx.numpy_helper.from_array(np.array(np.nan, f.dtype))),
            onnx.helper.make_node("Where", [u + "none", u + "nan", u + "y"], [y]),
        ]
        if len(node.output) > 1 and node.output[1]:
            nodes.append(node)  # the original still makes the Indices output
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def reference_outputs(model: Model, feeds: Mapping[str, np.ndarray]) -> Reference:
    names = [v.name for v in model.graph.outputs]
    nodes, known, wanted = _nan_probes(model, feeds)
    plain: list[np.ndarray] | None = None
    if wanted:
        # one run gives the reference and the max/min nodes' data inputs
        try:
            sess = onnxruntime_session(model, threads=1, optimize=False, log_severity=4,
                                       extra_outputs=[w for w in wanted if w not in names])
            got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, dict(feeds))))
            plain = [got[n] for n in names]
            known.update((w, got[w]) for w in wanted)
        except Exception:  # noqa: BLE001 - the plain run below says what is wrong, in one line
            plain, nodes = None, []
    if plain is None:
        plain = run_onnxruntime(model, feeds)
    try:
        optimized = run_onnxruntime(model, feeds, optimize=True)
    except Exception:  # noqa: BLE001 - an optimizer onnxruntime cannot run gives no floor, not a failure
        optimized = None
    noise = {}
    if optimized is not None:
        for name, a, b in zip(names, plain, optimized):
            noise[name] = max_abs_difference(a, b)
    ref = Reference(plain, names, noise)
    fed = _nan_fed(nodes, known)
    if fed:
        try:
            sess = onnxruntime_session(skip_nan_model(model, fed), threads=1, optimize=False, log_severity=4)
            ref.skip_nan_outputs = list(sess.run(None, dict(feeds)))
            ref.nan_skipped = [str(f) for f in fed]
        except Exception:  # noqa: BLE001 - the rewrite does not run: the strict reference stands
            pass
    return ref


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
    expected = ref.skip_nan_outputs if ref.skip_nan_outputs is not None else ref.outputs
    whole = compare_outputs(expected, list(actual), rtol=math.inf, atol=math.inf)  # the error, whatever it is
    max_abs, max_rel = whole.max_abs, whole.max_rel
    if thresholds:
        if not whole.ok:  # a shape/dtype/count mismatch no metric excuses
            ok, detail, metrics = False, whole.detail, None
        else:
            metrics = output_agreement([expected], [list(actual)], ref.names)
            failed = [t for t in thresholds if not t.holds(metrics)]
            ok = not failed
            detail = "; ".join(f"{t.metric} {_metric(metrics.get(t.metric), t.metric)}, needs {t}" for t in failed) \
                or ", ".join(f"{t.metric} {_metric(metrics.get(t.metric), t.metric)}" for t in thresholds)
        return VerifyResult(ok, max_abs, max_rel, rtol, atol, inputs, detail, input_shapes(feeds), dict(ref.noise),
                            metrics, [str(t) for t in thresholds], list(ref.nan_skipped))
    ok, detail = True, whole.detail
    if not whole.ok:
        ok, detail = False, whole.detail
    else:
        for i, (name, e, a) in enumerate(zip(ref.names, expected, actual)):
            floor = max(atol, ref.noise.get(name, 0.0))
            cmp = compare_outputs([e], [a], rtol=rtol, atol=floor)
            if not cmp.ok:
                raised = f", atol raised to onnxruntime's own noise {floor:.3g}" if floor > atol else ""
                ok, detail = False, (f"output {i} ({name}): max abs error {cmp.max_abs:.3g}, max rel error "
                                     f"{cmp.max_rel:.3g} (rtol={rtol}, atol={atol}{raised})")
                break
    return VerifyResult(ok, max_abs, max_rel, rtol, atol, inputs, detail, input_shapes(feeds), dict(ref.noise),
                        nan_skipped=list(ref.nan_skipped))


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
    if v.nan_skipped:
        line += (f"; reference: onnxruntime with {', '.join(v.nan_skipped)} skipping the NaN it reads, as graphopt "
                 "does (ONNX leaves a max/min over NaN open; onnxruntime's own answer follows its loop order)")
    return line + f"; {where})"

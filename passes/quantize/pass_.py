"""The `quantize` pass: calibrate, write int8 QDQ, keep float what is too inaccurate or not faster."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from graphopt.calibration import (
    METHODS,
    CalibrationData,
    CalibrationError,
    as_calibration,
    parse_batch_axes,
    TensorStats,
    collect_ranges,
    load_calibration,
    synthetic_calibration,
)
from graphopt.accuracy import parse_budget
from graphopt.errors import GraphoptError, UsageError
from graphopt.ir import Model, Node, opset_version
from graphopt.passes.cleanup.infer import infer_types
from graphopt.passes.quantize import measure
from graphopt.passes.quantize.smooth import smooth_quant, smoothable_layers
from graphopt.passes.quantize.qdq import QDQ_OPS, Applied, QuantOptions, Unit, apply, float_subgraphs, plan_units
from graphopt.transform import Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """int8 quantization (QDQ for onnxruntime): calibrated, within an accuracy budget, float where int8 does not pay.

    Rewrite, static (conv nets): Conv(x, W, b) [→ Relu/Clip(0, M)]  →
    DQ(Q(x)), DQ(W int8 per-channel), DQ(b int32, scale s_x·s_w) → Conv → Q → DQ, the activation
    folded into the Q range; ConvTranspose likewise (weight [C_in, C_out/group, k...]: per-channel
    scales along axis 1, shared by the groups; bias scale s_x·s_w tiled over the groups — its QDQ
    form runs as float on onnxruntime's CPU EP, which has no int8 ConvTranspose, so speed=rules keeps
    it float and speed=measure tries it float); likewise Gemm/MatMul, Add/Mul, Concat, pools, and Q/DQ-transparent
    MaxPool/Reshape/Flatten/Transpose/Resize. Dynamic (transformers: `mode=auto` when MatMul/Gemm
    hold more FLOPs than Conv and the model has Softmax/LayerNormalization; a conv net ending in
    Softmax is static): MatMul/Gemm with constant weights → DynamicQuantizeLinear →
    MatMulInteger → Cast → Mul; com.microsoft Attention (packed Q/K/V, -O2 --contrib-ops) →
    DynamicQuantizeLinear → com.microsoft QAttention, its additive Where mask as QAttention's 0/1
    mask_index (passes/quantize/attention.py, which also says when it stays float). See
    passes/quantize/qdq.py for the exact layout.

    Stays float (each named in the report with its reason): ops inside If/Loop/Scan bodies and
    model-local function bodies (listed under "float-subgraphs": calibration only sees main-graph
    tensors, and a function body serves call sites with different ranges), ops already in QDQ form (so a second
    run changes nothing), non-float32 tensors, non-constant weights, Softmax inputs,
    tensors whose calibration values hold sentinels (|x| >= 1e9, e.g. an additive attention mask
    of -3.4e38), excluded units, depthwise/tiny convs where int8 measured slower, and the most
    sensitive layers when `accuracy-budget` needs them float. With `speed=measure` (default) the
    whole model is timed on onnxruntime against fp32; if no int8 variant is `min-speedup` faster,
    the model is left unchanged. A model below opset 13 is upgraded with onnx's version converter
    first (said in the log); when the converter cannot, the pass refuses with its reason.

    `smooth=ALPHA` (0 < alpha <= 1; 0: off): SmoothQuant before quantizing (passes/quantize/smooth.py):
    X -> MatMul/Gemm(X, W) with X / s folded into X's producer (LayerNormalization, MatMul/Gemm
    [+ bias Add], Mul/Div by a constant, also through Transpose/Reshape/attention's probs·V) and
    diag(s)·W, s_k = max|X_k|^alpha / max|W_k,:|^(1-alpha) from the calibration data; exact in
    float, no node added. Inputs whose producer cannot absorb 1/s (a residual Add, an activation, a
    graph input) or that another op also reads (a residual, a float layer) are left alone, one log
    line per reason; so is the scalar 0.5 ending a GELU, whose per-channel version stops onnxruntime
    fusing the GELU (`smooth-activations=true` folds it anyway). The int8 model is still scored and
    timed against the original fp32 model.
    """

    name: ClassVar[str] = "quantize"
    scheme: str = "int8"
    calibration: str = "minmax"  # minmax | percentile | entropy | mse
    data: str = ""  # .npz or folder of .npz; empty: ctx.data["calibration"], else synthetic (labelled)
    batch_size: int = 0  # for a symbolic batch dim (0: 1)
    max_samples: int = 0  # read at most this many calibration samples (0: all)
    calibration_batch_axis: tuple[str, ...] = ()  # NAME:AXIS pairs (state:1); default: from the model's symbolic dims
    percentile: float = 99.999
    mode: str = "auto"  # auto | static | dynamic
    activations: str = "uint8"  # uint8 (asymmetric) | int8 (symmetric)
    reduce_range: str = "auto"  # auto (7-bit weights on x86 without VNNI) | true | false
    per_channel: bool = True
    accuracy_budget: str = ""  # top1:P | cosine:C | sqnr:DB | rel:E | none (see accuracy.parse_budget)
    eval_batches: int = 8
    speed: str = "measure"  # measure (time variants on onnxruntime) | rules (depthwise, tiny layers float) | off
    min_speedup: float = 1.03
    speed_budget: float = 8.0  # seconds of timing for the speed check
    profile_runs: int = 10  # runs of onnxruntime's per-layer profile (fp32 and int8) under speed=measure
    depthwise: str = "auto"  # auto (measured; float under speed=rules; int8 under speed=off) | int8 | float
    tiny_macs: int = 200_000  # convs/matmuls with fewer MACs per sample: float under speed=rules, a group speed=measure tries (0: none)
    threads: int = 0  # onnxruntime intra-op threads for timing and evaluation (0: its default / 2 for timing)
    exclude: tuple[str, ...] = ()  # unit names (node name or output tensor name) kept float
    smooth: float = 0.0  # SmoothQuant migration strength alpha in (0, 1] for MatMul/Gemm inputs (0: off); see smooth.py
    smooth_activations: bool = False  # smooth also into the scalar 0.5 ending a GELU (onnxruntime then no longer fuses it)
    report: str = ""  # also write the report as JSON here

    def __post_init__(self) -> None:
        if self.scheme != "int8":
            raise ValueError(f"scheme {self.scheme!r} is not supported (have: int8)")
        checks = [("calibration", self.calibration, METHODS), ("mode", self.mode, ("auto", "static", "dynamic")),
                  ("activations", self.activations, ("uint8", "int8")),
                  ("reduce-range", str(self.reduce_range).lower(), ("auto", "true", "false", "1", "0")),
                  ("speed", self.speed, ("measure", "rules", "off")), ("depthwise", self.depthwise, ("auto", "int8", "float"))]
        for key, val, allowed in checks:
            if val not in allowed:
                raise ValueError(f"{key}={val!r} is not one of {', '.join(allowed)}")
        if self.accuracy_budget:
            parse_budget(self.accuracy_budget)
        if not 0.0 <= float(self.smooth) <= 1.0:
            raise ValueError(f"smooth={self.smooth!r}: the SmoothQuant alpha is in (0, 1] (0: off)")

    # -------------------------------------------------------------------------------- run
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        base = model.clone()
        infer_types(base)
        if any(n.op_type in QDQ_OPS for n in base.graph):
            ctx.info("quantize: the model is already quantized (has QuantizeLinear/MatMulInteger...); nothing to do")
            ctx.data["quantize"] = {"result": "already quantized: nothing to do", "layers": []}
            return PassResult(False, {}, note="already quantized: nothing to do")  # a second run reports nothing
        opset = opset_version(base, default=0)
        if 0 < opset < 13:  # per-channel QuantizeLinear needs opset 13: upgrade with onnx's converter
            try:
                base = _upgraded(base, 13)
                infer_types(base)
            except Exception as e:  # noqa: BLE001 - the converter's failures are many and all mean "cannot"
                why = f"opset {opset} < 13 (no per-channel QuantizeLinear) and onnx's version converter cannot " \
                      f"upgrade the model: {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
                ctx.info(f"quantize: refused: {why}")
                ctx.data["quantize"] = {"result": f"refused: {why}", "layers": []}
                return PassResult(False, {}, note=f"refused: {why}")
            ctx.info(f"quantize: upgraded the model from opset {opset} to 13 with onnx's version converter "
                     "(per-channel QuantizeLinear needs 13)")
        mode, mode_reason = self._mode(base)
        # reduce-range=auto: 7-bit weights where the int8 kernels multiply u8 x s8 pairs into
        # saturating int16 (AVX2's vpmaddubsw), full 8-bit where they are exact (VNNI, dotprod): for
        # the CPU the pipeline compiles for (its machine model), else this CPU (onnxruntime here)
        machine = ctx.machine
        if machine is not None and getattr(machine, "arch", None) == "x86_64":
            vnni: bool | None = bool(machine.int8_exact_u8s8)
            cpu = f"target mcpu={machine.mcpu}"
        elif machine is not None:
            vnni, cpu = None, f"target {machine.arch}"
        else:
            vnni, cpu = measure.has_vnni(), "this CPU"
        rr = str(self.reduce_range).lower()
        reduce_range = (vnni is False) if rr == "auto" else rr in ("true", "1")
        opts = QuantOptions(self.activations, reduce_range, self.per_channel, "dynamic" if mode == "dynamic" else "static",
                            frozenset(self.exclude), frozenset({"MatMul", "Gemm", "Attention"}) if mode == "dynamic" else None)
        data = self._data(base, ctx)
        rep: dict[str, Any] = {
            "scheme": "int8", "mode": mode, "mode-reason": mode_reason,
            "calibration": {"source": data.source, "synthetic": data.synthetic, "method": self.calibration},
            "activations": f"{self.activations} {'asymmetric' if self.activations == 'uint8' else 'symmetric'} per-tensor",
            "weights": "int8 symmetric " + ("per-channel" if self.per_channel else "per-tensor")
                       + (", 7-bit range [-64, 64]" if reduce_range else ", full range [-127, 127]")
                       + (f" (reduce-range=auto: {cpu} {'has' if vnni else 'has no'} VNNI)" if rr == "auto" and vnni is not None else ""),
        }
        subs = float_subgraphs(base)
        if subs:
            rep["float-subgraphs"] = subs
        if data.synthetic:
            ctx.info(f"quantize: WARNING calibrating on synthetic data ({data.source}); give data= or --calibration")
        units = plan_units(base, opts)
        if not any(u.quantized for u in units):
            rep["result"] = "nothing to quantize"
            rep["layers"] = [self._layer(u, None) for u in units]
            return self._finish(model, None, rep, ctx, {"units-int8": 0, "units-float": len(units)})
        orig = base  # the fp32 model the int8 one is scored and timed against
        if self.smooth > 0:
            base, units = self._smooth(base, units, data, opts, rep, ctx)

        # 1. calibration: ranges of every activation tensor a static unit reads or writes
        need = []
        for u in units:
            if u.quantized and u.mode == "static" and u.kind != "passthrough":
                need.extend(v.name for v in u.act_values())
                need.append(u.out.name)
        stats: dict[str, TensorStats] = {}
        if need:
            stats = collect_ranges(base, data, need, method=self.calibration, percentile=self.percentile,
                                   threads=self.threads)
        rep["calibration"]["tensors"] = len(stats)

        # 2. decisions by rule: sentinels, tiny layers, depthwise (unless measured)
        forced: dict[str, str] = {}
        for u in units:
            if not u.quantized or u.mode != "static" or u.kind == "passthrough":
                continue
            for t in [v.name for v in u.act_values()] + [u.out.name]:
                st = stats.get(t)
                if st is not None and st.has_sentinels:
                    forced[u.name] = (f"tensor {t!r} holds {st.sentinels} sentinel values (|x| >= 1e9 or non-finite, "
                                      "e.g. an additive attention mask): kept out of int8")
                    break
            if u.name in forced:
                continue
            if self.tiny_macs and u.kind in ("conv", "gemm", "matmul") and 0 < u.macs < self.tiny_macs:
                u.tags.add("tiny")
                if self.speed == "rules":
                    forced[u.name] = f"tiny layer ({u.macs} MACs/sample < tiny-macs={self.tiny_macs}): Q/DQ would cost more than int8 saves"
            if "no-ort-int8-kernel" in u.tags and self.speed == "rules":
                forced[u.name] = (f"{u.node.op_type}: onnxruntime's CPU EP has no int8 kernel for it, so its QDQ form "
                                  "would run as float plus quantize/dequantize")
                continue
            if "depthwise" in u.tags and (self.depthwise == "float" or (self.depthwise == "auto" and self.speed == "rules")):
                forced[u.name] = "depthwise conv: memory-bound, onnxruntime's int8 depthwise kernel is not faster than float"

        tags = {u.name: set(u.tags) for u in units}
        evals = data.take(max(1, self.eval_batches))
        if not evals:
            raise CalibrationError(f"quantize: the calibration data holds no batches ({data.source})")
        ref = measure.run(orig, evals, threads=self.threads)

        def build(extra: dict[str, str]) -> tuple[Model, list[Unit], Applied]:
            m = base.clone()
            us = plan_units(m, opts)
            reasons = {**forced, **extra}
            for u in us:
                u.tags |= tags.get(u.name, set())
                if u.quantized and u.name in reasons:
                    u.float_reason = reasons[u.name]
            return m, us, apply(m, us, stats, opts)

        def score(m: Model) -> dict[str, float]:
            return measure.output_metrics(ref, measure.run(m, evals, threads=self.threads))

        extra: dict[str, str] = {}
        sensitivity: dict[str, float] = {}
        # 3. accuracy budget: leave the most sensitive layers float until it holds
        budget = parse_budget(self.accuracy_budget) if self.accuracy_budget else None  # (none/off: no budget)
        qm, qunits, applied = build(extra)
        metrics = score(qm)
        if budget is not None:
            acc: dict[str, Any] = {"budget": str(budget), "all-int8": metrics, "evaluated-on": f"{len(evals)} batches of the calibration data"}
            if not budget.holds(metrics):
                cands = [u for u in qunits if u.quantized and u.kind != "passthrough"]
                everyone = {u.name: "sensitivity run" for u in cands}
                for u in cands:  # quantize one layer at a time
                    m1, _, _ = build({k: v for k, v in everyone.items() if k != u.name})
                    sensitivity[u.name] = score(m1)["sqnr"]
                order = sorted(cands, key=lambda u: sensitivity[u.name])
                k, found = self._search(order, budget, sensitivity, build, score, extra)
                acc["reverted"] = k
                if not found:
                    acc["note"] = "the budget does not hold even with every layer float"
                qm, qunits, applied = build(extra)
                metrics = score(qm)
            acc["final"] = metrics
            acc["holds"] = budget.holds(metrics)
            rep["accuracy"] = acc

        # 4. speed: the whole model against fp32; try groups of layers back in float
        layer_timing: dict[str, dict[str, float]] | None = None
        if self.speed == "measure":
            qm, qunits, applied, keep = self._speed(orig, qm, qunits, applied, extra, build, evals[0], rep)
            layer_timing = rep.pop("_layer-timing", None)
            if not keep:
                rep["layers"] = [self._layer(u, stats, sensitivity, None, layer_timing) for u in qunits]
                rep["result"] = "kept float: " + rep["speed"]["decision"]
                ctx.info(f"quantize: {rep['result']}")
                return self._finish(model, None, rep, ctx, {"units-int8": 0, "units-float": len(qunits), "kept-float-slower": 1})
            metrics = score(qm)
        if not any(u.quantized and u.kind != "passthrough" for u in qunits):
            # every layer stayed float (rules, budget): the model is left as it was
            rep["layers"] = [self._layer(u, stats, sensitivity, None, layer_timing) for u in qunits]
            rep["result"] = "nothing quantized: every layer stayed float"
            return self._finish(model, None, rep, ctx, {"units-int8": 0, "units-float": sum(1 for u in qunits if u.kind != "passthrough")})
        rep["metrics"] = metrics
        sq = self._layer_sqnr(base, qm, applied, evals[:2])
        rep["layers"] = [self._layer(u, stats, sensitivity, sq, layer_timing, applied.out_of) for u in qunits]
        nq = sum(1 for u in qunits if u.quantized and u.kind != "passthrough")
        rep["result"] = f"quantized {nq} of {sum(1 for u in qunits if u.kind != 'passthrough')} layers"
        st: dict[str, int | float] = {"units-int8": nq, "units-float": sum(1 for u in qunits if not u.quantized and u.kind != "passthrough")}
        st.update(applied.counts)
        if rep.get("smooth", {}).get("smoothed"):
            st["smoothed-layers"] = len(rep["smooth"]["layers"])
            st["smoothed-inputs"] = len(rep["smooth"]["smoothed"])
        if applied.bias_clipped:
            st["bias-clipped"] = applied.bias_clipped
        st["output-sqnr-db"] = round(metrics["sqnr"], 2) if math.isfinite(metrics["sqnr"]) else 999.0
        if data.synthetic:
            st["synthetic-calibration"] = 1
        return self._finish(model, qm, rep, ctx, st)

    @staticmethod
    def smoothable_layers(model: Model) -> list[str]:
        """The MatMul/Gemm layers of `model` whose input `smooth=` could fold (structure only; the
        search offers smoothing where there are any)."""
        return smoothable_layers(model.clone())

    # ----------------------------------------------------------------------------- helpers
    def _smooth(self, base: Model, units: list[Unit], data: CalibrationData, opts: QuantOptions,
                rep: dict[str, Any], ctx: PassContext) -> tuple[Model, list[Unit]]:
        """SmoothQuant (smooth.py) on a copy of `base` for the MatMul/Gemm layers the plan makes
        int8; returns (the smoothed copy, its units), or `base` unchanged when nothing was smoothed
        or the smoothed float model does not match the original on a calibration batch."""
        m = base.clone()
        us = plan_units(m, opts)
        reasons: dict[Node, str | None] = {}
        for u in us:
            if u.kind not in ("gemm", "matmul"):
                continue
            why = u.float_reason
            if why is None and self.speed == "rules" and self.tiny_macs and 0 < u.macs < self.tiny_macs:
                why = f"tiny layer ({u.macs} MACs/sample < tiny-macs={self.tiny_macs}), float under speed=rules"
            reasons[u.node] = why
        srep = smooth_quant(m, data, float(self.smooth), float_reason=reasons, activation_tails=bool(self.smooth_activations),
                            method=self.calibration,
                            percentile=self.percentile, threads=self.threads)
        rep["smooth"] = srep
        done = srep["smoothed"]
        for why, xs in srep["not-smoothed"].items():
            ctx.info(f"quantize: smooth: {len(xs)} input(s) not smoothed: {why} (e.g. {xs[0]!r})")
        if not done:
            ctx.info(f"quantize: smooth={self.smooth:g}: no MatMul/Gemm input could be smoothed")
            return base, units
        # smoothing is exact in float: check it on one batch before trusting it
        batch = data.take(1)
        if batch:
            got = measure.output_metrics(measure.run(base, batch, threads=self.threads), measure.run(m, batch, threads=self.threads))
            srep["float-check-sqnr-db"] = round(got["sqnr"], 1) if math.isfinite(got["sqnr"]) else 999.0
            if got["sqnr"] < 60.0:
                srep["result"] = f"left out: the smoothed float model differs from the original ({got['sqnr']:.1f} dB SQNR < 60)"
                ctx.info(f"quantize: smooth: {srep['result']}")
                srep["smoothed"], srep["layers"] = [], {}
                return base, units
        nl = sum(len(e["layers"]) for e in done)
        srep["result"] = f"smoothed {len(done)} inputs of {nl} MatMul/Gemm layers (alpha {self.smooth:g})"
        ctx.info(f"quantize: smooth: {srep['result']}; largest scale {max(e['max-scale'] for e in done):.3g}")
        return m, us

    def _mode(self, model: Model) -> tuple[str, str]:
        """mode=auto decides by where the FLOPs are: conv-dominated models are static (even with a
        final Softmax: SqueezeNet, classifiers); MatMul-dominated ones with Softmax/LayerNormalization
        (transformers) are dynamic; others static. Returns (mode, why)."""
        if self.mode != "auto":
            return self.mode, "mode=" + self.mode
        from graphopt.passes.pruning.flops import layer_flops

        conv = mm = 0
        for n in model.graph:
            if n.op_type in ("Conv", "ConvTranspose"):
                conv += layer_flops(n) or 0
            elif n.op_type in ("MatMul", "Gemm"):
                mm += layer_flops(n) or 0
        attn = sorted({n.op_type for n in model.graph} & {"Softmax", "LayerNormalization", "Attention"})
        share = (f"{100 * conv / (conv + mm):.0f} % of the Conv/MatMul/Gemm FLOPs in Conv") if conv + mm else "no FLOPs counted"
        if conv > mm:
            return "static", f"auto: conv-dominated, {share}" + (f" (its {'/'.join(attn)} stays float)" if attn else "")
        if attn:
            return "dynamic", f"auto: {share}, with {'/'.join(attn)} (a transformer)"
        return "static", f"auto: {share}, no Softmax/LayerNormalization"

    def _data(self, model: Model, ctx: PassContext) -> CalibrationData:
        limit = self.max_samples or None
        bs = self.batch_size or None
        axes = parse_batch_axes(self.calibration_batch_axis) or ctx.data.get("calibration-batch-axis") or None
        if self.data:
            return load_calibration(self.data, model, batch_size=bs, limit=limit, batch_axis=axes)
        given = ctx.data.get("calibration")
        if given is not None and not (isinstance(given, str) and not given):
            # a path, CalibrationData, a dict of stacked arrays, an iterable of feed dicts, a reader
            return as_calibration(given, model, batch_size=bs, limit=limit, batch_axis=axes)
        return synthetic_calibration(model, num_batches=8, batch_size=bs)

    def _search(self, order: list[Unit], budget: measure.Budget, sens: dict[str, float], build, score, extra: dict[str, str]) -> tuple[int, bool]:
        """Smallest k such that the k most sensitive layers in float meet the budget (doubling, then bisection)."""
        def revert(k: int) -> dict[str, str]:
            return {u.name: f"accuracy budget ({budget}): sensitive layer, {sens[u.name]:.1f} dB output SQNR "
                            f"when it alone is int8 (rank {i + 1})" for i, u in enumerate(order[:k])}

        def ok(k: int) -> bool:
            m, _, _ = build(revert(k))
            return budget.holds(score(m))

        lo, hi = 0, 1
        while hi < len(order) and not ok(hi):
            lo, hi = hi, min(2 * hi, len(order))
        if hi >= len(order) and not ok(len(order)):
            extra.update(revert(len(order)))
            return len(order), False
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid
        extra.update(revert(hi))
        return hi, True

    def _speed(self, base: Model, qm: Model, qunits: list[Unit], applied: Applied, extra: dict[str, str], build, feeds, rep):
        cands: list[tuple[str, Model, list[Unit], Applied, dict[str, str]]] = [("all selected layers int8", qm, qunits, applied, dict(extra))]
        groups: dict[str, dict[str, str]] = {}
        if self.depthwise == "auto":
            groups["depthwise convs"] = {u.name: "depthwise conv: the model measured faster with depthwise convs float (speed=measure)"
                                         for u in qunits if u.quantized and "depthwise" in u.tags}
        groups["tiny layers"] = {u.name: f"tiny layer ({u.macs} MACs/sample): the model measured faster with tiny layers float (speed=measure)"
                                 for u in qunits if u.quantized and "tiny" in u.tags}
        groups["ops without an onnxruntime int8 kernel"] = {
            u.name: f"{u.node.op_type}: onnxruntime's CPU EP has no int8 kernel for it; the model measured faster with it float (speed=measure)"
            for u in qunits if u.quantized and "no-ort-int8-kernel" in u.tags}
        groups["element-wise/pool/concat"] = {u.name: "element-wise/pool/concat: the model measured faster with them float (speed=measure)"
                                              for u in qunits if u.quantized and u.kind in ("binary", "concat", "pool", "unary")}
        # per layer: onnxruntime's profile of fp32 and of all-int8; layers whose int8 kernels (with
        # their own quantize/dequantize) take longer than the float ones are a group to try float
        timing = self._layer_timing(base, qm, qunits, feeds)
        rep["per-layer-timing"] = timing["summary"]
        rep["_layer-timing"] = timing["layers"]  # popped by run() into the layer entries
        slower = {name: (f"int8 slower than float in onnxruntime's per-layer profile ({t['int8_us']:.0f} vs "
                         f"{t['fp32_us']:.0f} us): the model measured faster with it float (speed=measure)")
                  for name, t in timing["layers"].items() if t.get("int8_us", 0) > t.get("fp32_us", math.inf)}
        if slower:
            groups["layers slower in int8 (per-layer profile)"] = slower
        groups = {k: v for k, v in groups.items() if v}
        import itertools

        sizes = range(1, len(groups) + 1) if len(groups) <= 3 else (1, len(groups))  # at most 15 candidates
        for r in sizes:
            for combo in itertools.combinations(groups, r):
                e = dict(extra)
                for k in combo:
                    e.update(groups[k])
                cands.append((" + ".join(combo) + " float", *build(e), e))
        # speedup = median over rounds of the paired ratio fp32 / candidate (robust to load that drifts)
        times, sp = measure.paired_speedups([base] + [c[1] for c in cands], feeds, threads=self.threads, budget_s=self.speed_budget)
        fp32 = times[0]
        info = [{"candidate": c[0], "ms": round(t * 1e3, 3), "speedup": round(x, 3)} for c, t, x in zip(cands, times[1:], sp[1:])]
        best = int(np.argmax(sp[1:]))
        speed: dict[str, Any] = {"fp32-ms": round(fp32 * 1e3, 3), "threads": self.threads or 2, "candidates": info,
                                 "min-speedup": self.min_speedup, "speedup": "median of paired per-round ratios"}
        rep["speed"] = speed
        if sp[1 + best] < self.min_speedup:
            speed["decision"] = (f"no int8 variant is {self.min_speedup}x faster than fp32 on onnxruntime here "
                                 f"(best {sp[1 + best]:.2f}x: {cands[best][0]})")
            return qm, qunits, applied, False
        speed["decision"] = f"{cands[best][0]}: {sp[1 + best]:.2f}x faster than fp32"
        extra.clear()
        extra.update(cands[best][4])
        _, m, us, ap, _ = cands[best]
        return m, us, ap, True

    def _layer_timing(self, base: Model, qm: Model, units: list[Unit], feeds) -> dict[str, Any]:
        """Per quantized layer: microseconds of its kernels in fp32 and in int8 (onnxruntime's
        profiler; kernels matched by node name or output name, so a layer fused into its
        neighbour in one of the two is only counted where it has a kernel of its own)."""
        try:
            fp = measure.profile_nodes(base, feeds, threads=self.threads, runs=self.profile_runs)
            q8 = measure.profile_nodes(qm, feeds, threads=self.threads, runs=self.profile_runs)
        except Exception as e:  # profiling is advice; the whole-model timing still decides
            return {"summary": {"status": f"unavailable: {e}"}, "layers": {}}
        layers: dict[str, dict[str, float]] = {}
        used: set[str] = set()
        for u in units:
            if not u.quantized or u.kind == "passthrough":
                continue
            keys = {u.node.name, *(o.name for o in u.node.outputs), u.out.name} - {""}
            t: dict[str, float] = {}
            f = [fp[k] for k in keys if k in fp]
            i = [q8[k] for k in keys if k in q8]
            if f:
                t["fp32_us"] = round(sum(f), 1)
            if i:
                t["int8_us"] = round(sum(i), 1)
                used |= keys & set(q8)
            if t:
                layers[u.name] = t
        both = [t for t in layers.values() if "fp32_us" in t and "int8_us" in t]
        summary = {
            "status": "measured", "runs": self.profile_runs,
            "fp32-total-us": round(sum(fp.values()), 1), "int8-total-us": round(sum(q8.values()), 1),
            "layers-matched": len(both),
            "layers-slower-in-int8": sum(1 for t in both if t["int8_us"] > t["fp32_us"]),
            # what the int8 model runs besides its layers: quantize/dequantize, layout transposes
            "int8-other-us": round(sum(v for k, v in q8.items() if k not in used), 1),
        }
        return {"summary": summary, "layers": layers}

    def _layer_sqnr(self, base: Model, qm: Model, applied: Applied, batches: list) -> dict[str, float]:
        """SQNR (dB) of every quantized tensor in the int8 model against the same tensor in fp32."""
        pairs = [(k, v) for k, v in applied.dq_of.items()][:400]
        out: dict[str, float] = {}
        for i in range(0, len(pairs), 100):
            chunk = pairs[i : i + 100]
            try:
                fs = measure.session(base, threads=self.threads, extra_outputs=[k for k, _ in chunk])
                qs = measure.session(qm, threads=self.threads, extra_outputs=[v for _, v in chunk])
            except GraphoptError:  # onnxruntime cannot expose these tensors: the report has the layers so far
                return out
            nf, nq = len(fs.get_outputs()) - len(chunk), len(qs.get_outputs()) - len(chunk)
            acc: dict[str, list[float]] = {}
            for b in batches:
                fo = fs.run(None, dict(b))[nf:]
                qo = qs.run(None, dict(b))[nq:]
                for (k, _), f, q in zip(chunk, fo, qo):
                    r = np.asarray(f, np.float64).ravel()
                    e = r - np.asarray(q, np.float64).ravel()
                    a = acc.setdefault(k, [0.0, 0.0])
                    a[0] += float(r @ r)
                    a[1] += float(e @ e)
            for k, (num, den) in acc.items():
                out[k] = math.inf if den == 0 else (10 * math.log10(num / den) if num > 0 else -math.inf)
        return out

    @staticmethod
    def _layer(u: Unit, stats: dict[str, TensorStats] | None, sens: dict[str, float] | None = None,
               sq: dict[str, float] | None = None, timing: dict[str, dict[str, float]] | None = None,
               out_of: dict[str, str] | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"name": u.name, "op": u.op,
                             "status": ("int8" if u.mode == "static" else "int8-dynamic") if u.quantized else "float"}
        if not u.quantized:
            d["reason"] = u.float_reason
        if u.tags:
            d["tags"] = sorted(u.tags)
        if u.macs:
            d["macs"] = u.macs
        st = (stats or {}).get((out_of or {}).get(u.name, u.out.name), (stats or {}).get(u.out.name))
        if st is not None:
            d["range"] = [round(st.lo, 6), round(st.hi, 6)]
        if sq is not None and u.quantized:
            # by the fp32 name apply() recorded (a folded graph output swaps names with its input)
            v = sq.get((out_of or {}).get(u.name, u.out.name), sq.get(u.out.name, sq.get(u.node.outputs[0].name)))
            if v is not None:
                d["sqnr_db"] = round(v, 2) if math.isfinite(v) else None
        if timing and u.name in timing:
            d.update(timing[u.name])
        if sens and u.name in sens:
            d["alone_int8_output_sqnr_db"] = round(sens[u.name], 2) if math.isfinite(sens[u.name]) else None
        return d

    def _finish(self, model: Model, qm: Model | None, rep: dict[str, Any], ctx: PassContext, stats: dict[str, int | float]) -> PassResult:
        if qm is not None:
            model.graph = qm.graph
            model.opset_imports = dict(qm.opset_imports)
        if "smooth" in rep:
            sm = rep["smooth"]
            if qm is None and sm.get("smoothed"):
                sm["result"] = "not applied: the model is left unchanged"
            for layer in rep.get("layers", []):
                if qm is not None and layer["name"] in sm.get("layers", {}):
                    layer["smooth"] = {k: v for k, v in sm["layers"][layer["name"]].items() if k != "input"}
        ctx.data["quantize"] = rep
        floats = [layer for layer in rep.get("layers", []) if layer["status"] == "float" and layer.get("reason")]
        ctx.info(f"quantize: {rep.get('result', '')}; calibration {rep['calibration']['source']} ({rep['calibration']['method']})")
        for layer in floats[:50]:
            ctx.info(f"quantize: {layer['name']} ({layer['op']}) float: {layer['reason']}")
        for sub in rep.get("float-subgraphs", [])[:20]:
            ops = ", ".join(f"{k} x{v}" for k, v in sub["ops"].items())
            ctx.info(f"quantize: {sub['where']} ({ops}) {sub['reason']}")
        if "speed" in rep:
            ctx.info(f"quantize: speed: {rep['speed']['decision']}")
        if "accuracy" in rep:
            ctx.info(f"quantize: accuracy: budget {rep['accuracy']['budget']}, holds={rep['accuracy']['holds']}")
        if self.report:
            from graphopt.onnx_io import atomic_write

            with atomic_write(self.report) as f:
                f.write(json.dumps(rep, indent=1, default=_json_default).encode())
        return PassResult(qm is not None, stats, note=self._note(rep, floats))

    @staticmethod
    def _note(rep: dict[str, Any], floats: list[dict[str, Any]]) -> str:
        """The terminal's one line: the result, the mode and why it chose it, and (when layers
        stayed float) the most common reason."""
        note = f"{rep.get('result', '')} (mode {rep['mode']}{': ' + rep['mode-reason'] if rep.get('mode-reason') else ''})"
        if floats:
            from collections import Counter

            reason, n = Counter(str(f["reason"]) for f in floats).most_common(1)[0]
            note += f"; float: {n} x {reason}"
        if rep["calibration"].get("synthetic"):
            note += "; calibrated on SYNTHETIC data (give --calibration)"
        return note


def _upgraded(model: Model, opset: int) -> Model:
    """`model` converted to `opset` of the default domain by onnx's version converter."""
    import onnx.version_converter

    from graphopt import load, to_onnx

    return load(onnx.version_converter.convert_version(to_onnx(model), opset))


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def quantize(model: Model, calibration: CalibrationData | str | None = None, **options: Any) -> tuple[Model, dict[str, Any]]:
    """Quantize `model` in place (see Quantize for the options); returns it and the report."""
    ctx = PassContext()
    if calibration is not None:
        ctx.data["calibration"] = calibration
    try:
        p = Quantize(**options)
    except (TypeError, ValueError) as e:
        raise UsageError(f"quantize: {e}") from None
    p.run(model, ctx)
    return model, ctx.data["quantize"]

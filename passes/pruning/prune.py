"""`prune`: structured channel pruning of the deployed graph, with recovery without retraining."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from graphopt.accuracy import AUTO_BUDGET, DEFAULT_BUDGET, EVAL_SAMPLES_MAX, Budget, Budgets, Reference, describe, parse_budget, resolve_budget
from graphopt.errors import GraphoptError, UsageError
from graphopt.ir import Model
from graphopt.passes.cleanup.control_flow import bodies_holding
from graphopt.transform import Pass, PassContext, PassResult, register_pass

from graphopt.passes.pruning.dependency import Analysis, Group, analyze
from graphopt.passes.pruning.flops import count_flops, count_params, uncounted_layers
from graphopt.passes.pruning.importance import CRITERIA, activation, bn_scale, magnitude
from graphopt.passes.pruning.surgery import apply_pruning

SCOPES = ("uniform", "global")
#: parts of its ratio a backed-off group tries, largest first (then it is kept whole)
BACKOFF = (0.75, 0.5, 0.25)
#: backed-off groups that try a lower ratio (least sensitive first); the rest stay whole
MAX_REFINE = 16
#: samples the per-group sensitivity (a ranking) is measured on
SENSITIVITY_SAMPLES = 8


def ensure_shapes(model: Model) -> None:
    """Give intermediate values their inferred types (the analysis needs ranks and sizes)."""
    from graphopt.passes.cleanup.infer import infer_types

    infer_types(model)


@register_pass
@dataclass(frozen=True)
class Prune(Pass):
    """Structured pruning: remove whole channels / features / attention heads, coupled groups together.

    Before → after: `Conv(x, W[64,C,3,3]) → BN → Relu → Conv(., V[128,64,3,3])` with ratio 0.25
    → `Conv(x, W[48,C,3,3]) → BN[48] → Relu → Conv(., V'[128,48,3,3])`: the producer loses its
    least important output channels and every tensor, parameter and consumer that carries them
    follows (residual Adds, Concats, depthwise/grouped convs, Reshape into Gemm/MatMul, channel
    shuffles, SE blocks, attention heads, MLP hidden units). See `dependency.py` for the rules.

    Options: `ratio` (fraction of each group's channels to remove), `criterion` (l1, l2,
    bn-scale, activation; auto, the default: activation with calibration data where a layer's
    output reaches a LayerNorm (transformer sublayers: importance.activation), else l1), `scope` (uniform: the ratio per group; global: one ranking over all
    groups, at most `max-ratio` of any group), `round-to` (kept channel counts are multiples of
    it; with the default 1, layers that leave a multiple of 8 are counted in `layers-unaligned`
    and logged: onnxruntime's NCHWc convs need multiples of 8), `protect` (':'-separated globs of node/output names whose groups stay whole),
    `layer-ratios` (GLOB@R entries, e.g. `/layer4/*@0.5`), `calibration` (.npz with one array
    per input, samples stacked on the batch axis; empty: synthetic random inputs, reported as
    such), `samples` (at most this many calibration samples), `batch`, `reconstruct` (least-squares
    refit of the layers that read removed channels; auto: only with a calibration file; the ridge
    per output column chosen on held-out batches, rows weighted by a following LayerNorm's 1/σ²:
    recovery.py), `token-mask` (auto: a transformer's padding tokens, from its `attention_mask`
    input, are left out of the statistics; none; or an input's name) and
    `bn-reestimate` (re-estimate BatchNorm statistics; auto: with a calibration file and no refit).

    Accuracy: `accuracy-budget` (auto | cosine:C | sqnr:DB | top1:P | rel:E; none: no back-off;
    auto, the default: cosine:0.99, plus top1:1 where the first output holds decisions and there
    is calibration data: graphopt.accuracy.resolve_budget) is measured on `eval-samples`
    held-out calibration samples (0: what remains beyond `samples`, at least half, at most 512;
    32 random inputs when none are given, and the log says so) against the original, and must
    hold one standard error on the safe side of the measure (graphopt.accuracy). When the requested ratio breaks
    it, every pruned group's sensitivity is measured (output SQNR with that group alone pruned),
    the fewest most sensitive groups are kept whole until it holds, and those then take the
    largest part of their ratio (3/4, 1/2, 1/4) that still holds; each choice is logged and
    reported (`ctx.data["prune"][-1]["accuracy"]`). With or without a budget the final output
    deviation is printed, with a WARNING when it is outside cosine 0.99.

    Must not fire (the group is kept whole and reported with the reason): channels that reach a
    graph output, meet an op the analysis does not know, a LayerNorm/GroupNorm/Softmax/Reduce
    over the channel axis, a non-constant weight, an elementwise operand that is neither tracked
    nor constant... A group always keeps at least one unit; every tensor keeps at least one
    channel. ratio=0 changes nothing.
    """

    name: ClassVar[str] = "prune"
    ratio: float = 0.3
    criterion: str = "auto"
    scope: str = "uniform"
    round_to: int = 1
    max_ratio: float = 0.9
    protect: tuple[str, ...] = ()
    layer_ratios: tuple[str, ...] = ()
    calibration: str = ""
    samples: int = 256
    batch: int = 8
    reconstruct: str = "auto"
    bn_reestimate: str = "auto"
    seed: int = 0
    accuracy_budget: str = AUTO_BUDGET  # auto | cosine:C | sqnr:DB | top1:P | rel:E | none
    eval_samples: int = 0  # 0: auto (_Data)
    token_mask: str = "auto"  # auto | none | a graph input's name (recovery.token_rows)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.round_to < 1:
            raise ValueError(f"round-to must be >= 1, got {self.round_to}")
        for flag in (self.reconstruct, self.bn_reestimate):
            if flag not in ("auto", "true", "false", "1", "0"):
                raise ValueError(f"reconstruct/bn-reestimate must be auto, true or false, got {flag!r}")
        self.parsed_layer_ratios()
        parse_budget(self.accuracy_budget)
        if self.eval_samples < 0:
            raise ValueError(f"eval-samples must be >= 0 (0: auto), got {self.eval_samples}")

    def parsed_layer_ratios(self) -> list[tuple[str, float]]:
        out = []
        for item in self.layer_ratios:
            pat, at, r = item.rpartition("@")
            try:
                val = float(r)
            except ValueError:
                val = -1.0
            if not at or not pat or not 0.0 <= val < 1.0:
                raise ValueError(f"layer-ratios entry {item!r} is not GLOB@RATIO with 0 <= RATIO < 1")
            out.append((pat, val))
        return out

    @staticmethod
    def _flag(value: str, auto: bool) -> bool:
        if value in ("true", "1"):
            return True
        if value in ("false", "0"):
            return False
        return auto

    # ------------------------------------------------------------------------------------------
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        t0 = time.perf_counter()
        ensure_shapes(model)
        an = analyze(model)
        data = _Data(self, model, ctx)
        budget = resolve_budget(self.accuracy_budget, model, real_data=data.real)
        reconstruct = self._flag(self.reconstruct, data.real)
        # a refit already matches the original layer outputs; re-estimating BN statistics on
        # top of it measured worse (mnist_resnet8), so `auto` re-estimates only without a refit
        reestimate = bool(an.bns) and (self._flag(self.bn_reestimate, data.real) if self.bn_reestimate != "auto"
                                       else data.real and not reconstruct)
        crit = self.criterion
        if crit == "auto":
            # transformer sublayers (a MatMul whose output reaches a LayerNorm) rank by their
            # contribution to the normalised stream on real data: MiniLM prune 0.1 global without
            # refit, embedding cosine 0.957 against 0.902 with l1
            from graphopt.passes.pruning.recovery import norm_after

            crit = "activation" if data.real and any(
                c.kind in ("matmul", "gemm") and not c.grouped and norm_after(c.node.outputs[0]) is not None
                for c in an.consumers) else "l1"
            ctx.info(f"prune: criterion auto -> {crit}"
                     + (" (calibration data and layers that feed a LayerNorm)" if crit == "activation" else ""))
        if (crit == "activation" or reconstruct or reestimate) and not data.real:
            ctx.info(f"prune: calibration is SYNTHETIC ({data.source})")
        scores, rms_note = self._scores(an, crit, data.fit() if crit == "activation" else None)
        pruned, plan = self.choose(an, scores)
        flops0, params0 = count_flops(model), count_params(model)
        report: dict[str, Any] = {
            "groups": [
                {"layers": g.names, "channels": int(len(g.classes) * g.unit), "units": int(len(g.classes)),
                 "unit": g.unit, "pruned-units": plan.get(g.index, 0),
                 "blocked": list(dict.fromkeys(g.blocked.values()))[:3]}
                for g in an.groups
            ],
            "calibration": data.source if (reconstruct or reestimate or crit == "activation") else None,
            "criterion": crit,
        }
        ctx.data.setdefault("prune", []).append(report)
        unprunable = [g for g in an.groups if len(g.blocked) == len(g.classes)]
        for line in an.unprunable_report():
            ctx.info(f"prune: unprunable group {line}")
        bodies = bodies_holding(model, {"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN"})
        for body in bodies:
            ctx.info(f"prune: {body} not pruned: channel pruning follows the main graph only "
                     "(--bind the input that decides an If to inline its branch)")
        uncounted = uncounted_layers(model)
        if uncounted:
            ctx.info(f"prune: {len(uncounted)} layers have unknown or symbolic dims beyond the batch axis "
                     f"({', '.join(uncounted[:3])}{' ...' if len(uncounted) > 3 else ''}): FLOPs count those dims "
                     "as 1; where they are channel counts shape inference lost, simplify-shapes (in -O1) may fix them")
        stats: dict[str, int | float] = {
            "groups": len(an.groups),
            "groups-unprunable": len(unprunable),
            "flops-uncounted-layers": len(uncounted),
        }
        if not pruned.any():
            stats.update({"groups-pruned": 0, "layers-unaligned": 0, "channels-removed": 0, "flops-before": flops0,
                          "flops-after": flops0, "params-before": params0, "params-after": params0,
                          "seconds": round(time.perf_counter() - t0, 3)})
            why = (f"the layers sit in {len(bodies)} If/Loop bodies ({bodies[0]}{', ...' if len(bodies) > 1 else ''}), "
                   "which channel pruning does not enter: --bind the input that decides an If to inline its branch"
                   if not an.groups and bodies else
                   "no channel group to prune (no Conv/Gemm whose output channels can shrink)" if not an.groups else
                   f"all {len(an.groups)} channel groups are unprunable (reasons in the log)" if len(unprunable) == len(an.groups)
                   else f"ratio {self.ratio:g} removes no whole unit from any of the {len(an.groups) - len(unprunable)} prunable groups")
            return PassResult(False, stats, note=f"nothing pruned: {why}")

        # accuracy: the original's outputs on evaluation data; with a budget, the most sensitive
        # groups back off (a lower ratio, or kept whole) until it holds
        original = model.clone()
        ref: Reference | None = None
        try:
            ref = Reference(original, data.evaluation(), source=data.eval_source)
        except GraphoptError as e:
            ctx.info(f"prune: WARNING cannot measure the output deviation ({e}): the accuracy budget is not checked")
            stats["accuracy-unmeasured"] = 1
        counts = dict(plan)
        acc: dict[str, Any] = {}
        if ref is not None and budget is not None:
            counts, acc = self._fit_budget(an, scores, pruned, plan, original, data, ref, budget,
                                           reconstruct, reestimate, ctx)
            report["accuracy"] = acc
            for g, rg in zip(an.groups, report["groups"]):  # built in this order above
                rg["pruned-units"] = counts.get(g.index, 0)
                rg.update(acc.get("choices", {}).get(g.index, {}))
            acc["choices"] = list(acc.get("choices", {}).values())
        pruned = self._mask(an, scores, pruned, plan, counts)
        # onnxruntime's CPU convs use its blocked NCHWc layout only for channel counts that are
        # multiples of 8 (AVX2 block); others fall back to plain convs plus layout reorders:
        # MobileNetV2 at ratio 0.3 ran 1.13x SLOWER than unpruned without round-to=8
        unaligned = 0 if self.round_to % 8 == 0 else sum(
            1 for p in an.producers
            if len(p.ids) % 8 == 0 and (k := int(an.keep_mask(p.ids, pruned).sum())) < len(p.ids) and k % 8
        )
        if unaligned:
            ctx.info(f"prune: {unaligned} layers had channel counts that were multiples of 8 and are not after pruning; "
                     "CPU kernels (onnxruntime's NCHWc convs) run such counts much slower: consider round-to=8")
        stats["groups-pruned"] = sum(1 for v in counts.values() if v)
        stats["layers-unaligned"] = unaligned
        if not pruned.any():
            ctx.info("prune: nothing pruned: " + str(acc.get("result", "no channel to remove")))
            stats.update({"channels-removed": 0, "flops-before": flops0, "flops-after": flops0,
                          "params-before": params0, "params-after": params0,
                          "seconds": round(time.perf_counter() - t0, 3)})
            return PassResult(False, stats, note="nothing pruned: " + str(acc.get("result", "no channel to remove")))
        stats.update(self._apply(original, model, an, pruned, data, reconstruct, reestimate, ctx.info))
        if not an.bns and self.bn_reestimate in ("true", "1"):
            ctx.info("prune: no BatchNormalization in the model (or folded into the conv weights): no statistics to re-estimate")
        if not reconstruct and data.real is False and self.reconstruct == "auto":
            ctx.info("prune: no refit (reconstruct=auto refits only with calibration data: calibration= or --calibration)")
        ensure_shapes(model)
        flops1, params1 = count_flops(model), count_params(model)
        stats.update({
            "flops-before": flops0, "flops-after": flops1, "params-before": params0, "params-after": params1,
            "achieved-ratio": round(_ratio(an, counts), 4),
        })
        if ref is not None:
            final = ref.score(model)
            report["deviation"] = dict(final, evaluated_on=ref.source)
            stats.update({f"output-{k}": round(v, 6) if math.isfinite(v) else 999.0 for k, v in final.items()})
            line = (f"prune: output vs the original on {ref.source}: {describe(final)}; removed {_ratio(an, counts):.3f} of "
                    f"prunable channels, FLOPs {flops0} -> {flops1} ({100 * (1 - flops1 / max(flops0, 1)):.1f} % less)")
            warn = parse_budget(DEFAULT_BUDGET)
            if budget is None and warn is not None and not warn.holds(final):
                line = f"prune: WARNING large output deviation (outside {warn}; accuracy-budget=none): " + line[len("prune: "):]
            ctx.info(line)
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        if rms_note:
            ctx.info(rms_note)
        return PassResult(True, stats)

    # ------------------------------------------------------------------------------------------
    def _apply(self, original: Model, model: Model, an: Analysis, pruned: np.ndarray, data: _Data,
               reconstruct: bool, reestimate: bool, log: Callable[[str], None]) -> dict[str, int | float]:
        """Remove the marked classes from `model` (analysed as `an`), then refit / re-estimate."""
        stats: dict[str, int | float] = {"channels-removed": apply_pruning(an, pruned)}
        if reconstruct or reestimate:
            from graphopt.passes.pruning.recovery import recover

            stats.update(recover(original, model, an, pruned, data.fit(), refit=reconstruct, bn=reestimate,
                                 seed=self.seed, mask_spec=self.token_mask, log=log))
        return stats

    def _mask(self, an: Analysis, scores: np.ndarray, pruned: np.ndarray, plan: dict[int, int],
              counts: dict[int, int]) -> np.ndarray:
        """`pruned` with the groups whose count differs from `plan` re-taken at `counts`."""
        out = pruned.copy()
        changed = False
        for g in an.groups:
            n = counts.get(g.index, 0)
            if n != plan.get(g.index, 0):
                out[g.classes] = False
                self._take(g, n, scores, out)
                changed = True
        if changed:
            self._keep_every_tensor(an, scores, out)
        return out

    def _fit_budget(self, an: Analysis, scores: np.ndarray, pruned: np.ndarray, plan: dict[int, int], original: Model,
                    data: _Data, ref: Reference, budget: Budget | Budgets, reconstruct: bool, reestimate: bool,
                    ctx: PassContext) -> tuple[dict[int, int], dict[str, Any]]:
        """The pruning counts per group that meet `budget`: the plan if it holds; else each pruned
        group's sensitivity (its SQNR when it alone is pruned), then the fewest most sensitive
        groups kept whole (bisection), then each of those, least sensitive first, at the largest
        part of its ratio (3/4, 1/2, 1/4) that still holds."""
        t0 = time.perf_counter()
        cache: dict[tuple[tuple[int, int], ...], dict[str, float]] = {}

        rank_ref = ref.subset(SENSITIVITY_SAMPLES)  # sensitivity only ranks: fewer samples do

        def score(counts: dict[int, int], recover: bool = True) -> dict[str, float]:
            key = tuple(sorted((k, v) for k, v in counts.items() if v)) + ((-1, int(recover)),)
            if key not in cache:
                m = original.clone()
                a = analyze(m)
                if a.root is None or an.root is None or len(a.root) != len(an.root):
                    raise GraphoptError("prune: the channel analysis of a copy of the model differs from the original's")
                mask = self._mask(an, scores, pruned, plan, counts)
                if mask.any():
                    self._apply(original, m, a, mask, data, reconstruct and recover, reestimate and recover, lambda s: None)
                    cache[key] = (ref if recover else rank_ref).score(m)
                else:
                    cache[key] = {"cosine": 1.0, "sqnr": math.inf, "rel": 0.0, "top1": 0.0}
            return cache[key]

        active = [g for g in an.groups if plan.get(g.index, 0)]
        names = {g.index: ", ".join(g.names[:2]) + (" ..." if len(g.names) > 2 else "") for g in active}
        requested = score(plan)
        acc: dict[str, Any] = {"budget": str(budget), "evaluated-on": ref.source, "requested": requested,
                               "requested-ratio": round(_ratio(an, plan), 4)}
        if isinstance(budget, Budgets) and budget.why:
            acc["budget-why"] = budget.why
            ctx.info(f"prune: accuracy budget {budget} ({budget.why}), checked one standard error below what {ref.source} measure")
        if budget.holds(requested):
            acc.update(holds=True, result=f"the requested ratio meets the budget ({describe(requested)})",
                       evaluations=len(cache), seconds=round(time.perf_counter() - t0, 2))
            ctx.info(f"prune: accuracy budget {budget} holds at the requested ratio on {ref.source}")
            return dict(plan), acc
        # sensitivity: each group pruned alone (without recovery: it ranks, the search decides)
        sens = {g.index: score({g.index: plan[g.index]}, recover=False)["sqnr"] for g in active}
        order = sorted(active, key=lambda g: sens[g.index])  # lowest SQNR first: most sensitive

        def whole(k: int) -> dict[int, int]:
            c = dict(plan)
            for g in order[:k]:
                c[g.index] = 0
            return c

        # 1. the fewest most sensitive groups kept whole (bisection; all whole prunes nothing and holds)
        lo, hi = 0, len(order)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if budget.holds(score(whole(mid))):
                hi = mid
            else:
                lo = mid
        k = hi
        counts = whole(k)
        # 2. each of them, least sensitive first, takes the largest part of its ratio that still holds
        refine = order[:k][::-1][:MAX_REFINE]
        for g in refine:
            opts = sorted({n for f in BACKOFF for n in [self._count(g, plan[g.index] / len(g.classes) * f)]
                           if 0 < n < plan[g.index]}, reverse=True)
            lo, hi = -1, len(opts)  # hi == len(opts): none of them (whole) holds
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if budget.holds(score({**counts, g.index: opts[mid]})):
                    hi = mid
                else:
                    lo = mid
            if hi < len(opts):
                counts[g.index] = opts[hi]
        final = score(counts)
        choices: dict[int, dict[str, Any]] = {}
        for rank, g in enumerate(order):
            n, total = counts.get(g.index, 0), len(g.classes)
            choice = ("requested ratio" if n == plan[g.index] else "kept whole" if n == 0
                      else f"ratio {n / total:.3f} instead of {plan[g.index] / total:.3f}")
            choices[g.index] = {"layers": g.names, "choice": choice, "pruned-units": n, "planned-units": plan[g.index],
                                "sensitivity-rank": rank + 1,
                                "sensitivity-sqnr-db": round(sens[g.index], 2) if math.isfinite(sens[g.index]) else 999.0}
            if n != plan[g.index]:
                ctx.info(f"prune: {choice} for group {names[g.index]} ({total * g.unit} channels): accuracy budget {budget}; "
                         f"alone at the requested ratio it gives SQNR {sens[g.index]:.1f} dB{' before the refit' if reconstruct else ''} "
                         f"(sensitivity rank {rank + 1} of {len(order)})")
        if k > len(refine):
            ctx.info(f"prune: {k - len(refine)} more sensitive groups kept whole without trying a lower ratio (at most {MAX_REFINE} are tried)")
        ratio = _ratio(an, counts)
        n_whole = sum(1 for c in choices.values() if c["choice"] == "kept whole")
        n_lower = sum(1 for c in choices.values() if c["choice"].startswith("ratio "))
        acc.update(holds=budget.holds(final), final=final, choices=choices, **{"groups-kept-whole": n_whole,
                   "groups-lower-ratio": n_lower, "achieved-ratio": round(ratio, 4), "evaluations": len(cache),
                   "seconds": round(time.perf_counter() - t0, 2)})
        acc["result"] = (f"the accuracy budget {budget} does not hold at any ratio tried: ratio {_ratio(an, plan):.3f} gave "
                         f"{describe(requested)}; {n_whole} of {len(order)} groups kept whole"
                         + ("" if reconstruct else " (calibration data would enable the least-squares refit, which often recovers it)"))
        ctx.info(f"prune: accuracy budget {budget} on {ref.source}: the requested ratio {_ratio(an, plan):.3f} gave "
                 f"{budget.show(requested)}; backed off {n_whole + n_lower} of {len(order)} groups "
                 f"({n_whole} kept whole, {n_lower} at a lower ratio): best ratio meeting it {ratio:.3f} "
                 f"({budget.show(final)}; {len(cache)} evaluations, {time.perf_counter() - t0:.1f} s)")
        return counts, acc

    def _scores(self, an: Analysis, crit: str, calib: Any) -> tuple[np.ndarray, str]:
        if crit in ("l1", "l2"):
            return magnitude(an, crit), ""
        if crit == "bn-scale":
            return bn_scale(an), "" if an.bns else "prune: no BatchNormalization in the model: bn-scale fell back to l2"
        from graphopt.passes.pruning.recovery import channel_rms, contributions

        return activation(an, channel_rms(an, calib, self.token_mask), contributions(an, calib, self.token_mask)), ""

    def choose(self, an: Analysis, scores: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
        """Which classes go: bool by root id, and units pruned per group index."""
        assert an.root is not None
        pruned = np.zeros(len(an.root), dtype=bool)
        plan: dict[int, int] = {}
        ratios = self.parsed_layer_ratios()
        uniform: list[tuple[Group, float]] = []
        pool: list[Group] = []
        for g in an.groups:
            if any(g.matches(p) for p in self.protect):
                for c in g.classes.tolist():
                    g.blocked.setdefault(int(c), "protected by the protect option")
                continue
            r = next((val for pat, val in ratios if g.matches(pat)), None)
            if r is not None:
                uniform.append((g, r))
            elif self.scope == "global":
                pool.append(g)
            else:
                uniform.append((g, self.ratio))
        for g, r in uniform:
            n = self._count(g, r)
            plan[g.index] = self._take(g, n, scores, pruned)
        if pool:
            plan.update(self._global(pool, scores, pruned))
        self._keep_every_tensor(an, scores, pruned)
        return pruned, plan

    def _kept_multiple(self, g: Group) -> int:
        return self.round_to // math.gcd(self.round_to, g.unit)

    def _count(self, g: Group, ratio: float) -> int:
        total = len(g.classes)
        want = int(round(ratio * total))
        kept = total - want
        m = self._kept_multiple(g)
        kept = min(total, max(m, math.ceil(kept / m) * m)) if total >= m else total
        return max(0, min(total - max(kept, 1), len(g.prunable)))

    @staticmethod
    def _take(g: Group, n: int, scores: np.ndarray, pruned: np.ndarray) -> int:
        if n <= 0:
            return 0
        cand = g.prunable
        s = np.nan_to_num(scores[cand], nan=np.inf)
        order = np.argsort(s, kind="stable")
        pruned[cand[order[:n]]] = True
        return n

    def _global(self, pool: list[Group], scores: np.ndarray, pruned: np.ndarray) -> dict[int, int]:
        entries = []
        total = 0
        for g in pool:
            if len(g.prunable):
                total += len(g.classes) * g.unit
            for c in g.prunable.tolist():
                entries.append((float(np.nan_to_num(scores[c], nan=np.inf)), g.index, c))
        entries.sort()
        budget = self.ratio * total
        by_index = {g.index: g for g in pool}
        taken: dict[int, list[int]] = {g.index: [] for g in pool}
        removed = 0.0
        for _, gi, c in entries:
            if removed >= budget:
                break
            g = by_index[gi]
            if len(taken[gi]) + 1 > min(len(g.prunable), int(self.max_ratio * len(g.classes)), len(g.classes) - 1):
                continue
            taken[gi].append(c)
            removed += g.unit
        plan = {}
        for gi, cs in taken.items():  # each list is in increasing score order
            g = by_index[gi]
            total, m = len(g.classes), self._kept_multiple(g)
            kept = min(total, math.ceil((total - len(cs)) / m) * m) if total >= m else total
            n = max(0, min(len(cs), total - kept))
            if n:
                pruned[np.array(cs[:n], dtype=np.int64)] = True
            plan[gi] = n
        return plan

    @staticmethod
    def _keep_every_tensor(an: Analysis, scores: np.ndarray, pruned: np.ndarray) -> None:
        """A tensor that would lose every channel (a Split part, a Slice range) gets its most
        important class back."""
        assert an.root is not None
        changed = True
        while changed:
            changed = False
            for inf in an.info.values():
                roots = an.root[inf.ids]
                if len(roots) and pruned[roots].all():
                    uniq = np.unique(roots)
                    best = uniq[np.argmax(np.nan_to_num(scores[uniq], nan=-np.inf))]
                    pruned[best] = False
                    changed = True


def _ratio(an: Analysis, counts: dict[int, int]) -> float:
    """Channels removed / channels of the groups that have any prunable channel."""
    total = sum(len(g.classes) * g.unit for g in an.groups if len(g.prunable))
    return sum(counts.get(g.index, 0) * g.unit for g in an.groups) / total if total else 0.0


def _samples(batch: dict[str, np.ndarray]) -> int:
    return max((len(v) for v in batch.values() if np.ndim(v)), default=1)


class _Data:
    """Prune's data: `fit()` for importance and recovery, `evaluation()` for the accuracy check.

    Calibration data (`calibration=`, else the context's `--calibration`) is split: the last
    `eval-samples` (0: what remains beyond `samples`, at least half, at most EVAL_SAMPLES_MAX)
    go to the evaluation when at least as many remain for fitting, else both use
    all of it (and the log says so). Without any, both are random inputs (different seeds)."""

    def __init__(self, p: Prune, model: Model, ctx: PassContext) -> None:
        from graphopt.calibration import CalibrationData, load_calibration

        self.p, self.model = p, model
        given = p.calibration or ctx.data.get("calibration")
        self._batches: list[dict[str, np.ndarray]] | None = None
        self._given: CalibrationData | None = None
        if isinstance(given, CalibrationData):
            self._given = given
        elif isinstance(given, str) and given:
            self._given = load_calibration(given, model, batch_size=p.batch, limit=p.samples + (p.eval_samples or EVAL_SAMPLES_MAX),
                                           batch_axis=ctx.data.get("calibration-batch-axis"))
        self.real = self._given is not None and not self._given.synthetic
        self.source = self._given.source if self._given is not None else "synthetic random inputs (no calibration data)"
        self.eval_source = ""
        self._fit: list[dict[str, np.ndarray]] | None = None
        self._eval: list[dict[str, np.ndarray]] | None = None

    def _split(self) -> None:
        assert self._given is not None
        batches = [dict(b) for b in self._given]
        if not batches:
            raise UsageError(f"prune: the calibration data holds no batches ({self._given.source})")
        n = [_samples(b) for b in batches]
        # eval-samples=0: what remains after `samples` for fitting, at least half, at most
        # EVAL_SAMPLES_MAX (a budget measured on few samples is not what holds end to end)
        want = self.p.eval_samples or min(EVAL_SAMPLES_MAX, max(sum(n) - self.p.samples, sum(n) // 2, 1))
        k, seen = len(batches), 0
        while k > 0 and seen < want:
            k -= 1
            seen += n[k]
        # eval-samples=0 left at least half for fitting by construction (up to one batch's rounding);
        # an explicit one is held out only when as many remain for fitting (up to `samples`)
        if k > 0 and (not self.p.eval_samples or sum(n[:k]) >= min(seen, self.p.samples)):
            self._fit, self._eval = batches[:k], batches[k:]
            self.eval_source = f"{seen} held-out calibration samples"
        else:
            self._fit, self._eval = batches, batches[-max(1, len(batches) - k):]
            self.eval_source = f"{sum(_samples(b) for b in self._eval)} calibration samples (also used for fitting: too few to hold some out)"

    def fit(self) -> list[dict[str, np.ndarray]]:
        if self._fit is None:
            if self._given is not None:
                self._split()
            else:
                from graphopt.calibration import synthetic_calibration

                self._fit = list(synthetic_calibration(self.model, num_batches=max(1, math.ceil(self.p.samples / self.p.batch)),
                                                       seed=self.p.seed, batch_size=self.p.batch))
        assert self._fit is not None
        return self._fit

    def evaluation(self) -> list[dict[str, np.ndarray]]:
        if self._eval is None:
            if self._given is not None:
                self._split()
            else:
                from graphopt.calibration import synthetic_calibration

                # other seeds than the fitting data's: a refit is not scored on what it fitted
                self._eval = list(synthetic_calibration(self.model, num_batches=max(1, math.ceil((self.p.eval_samples or 32) / self.p.batch)),
                                                        seed=self.p.seed + 7919, batch_size=self.p.batch))
                self.eval_source = f"{sum(_samples(b) for b in self._eval)} RANDOM-input samples (no calibration data given)"
        assert self._eval is not None
        return self._eval


def parse_ratio(value: str) -> float:
    """The CLI's `--prune RATIO`."""
    try:
        r = float(value)
    except ValueError:
        raise UsageError(f"--prune {value!r}: expected a ratio in [0, 1)") from None
    if not 0.0 <= r < 1.0:
        raise UsageError(f"--prune {value}: the ratio must be in [0, 1)")
    return r


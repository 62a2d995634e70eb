"""`prune`: structured channel pruning of the deployed graph, with recovery without retraining."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from graphopt.errors import UsageError
from graphopt.ir import Model
from graphopt.passes.cleanup.control_flow import bodies_holding
from graphopt.transform import Pass, PassContext, PassResult, register_pass

from graphopt.passes.pruning.dependency import Analysis, Group, analyze
from graphopt.passes.pruning.flops import count_flops, count_params, uncounted_layers
from graphopt.passes.pruning.importance import CRITERIA, activation, bn_scale, magnitude
from graphopt.passes.pruning.surgery import apply_pruning

SCOPES = ("uniform", "global")


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
    bn-scale, activation), `scope` (uniform: the ratio per group; global: one ranking over all
    groups, at most `max-ratio` of any group), `round-to` (kept channel counts are multiples of
    it; with the default 1, layers that leave a multiple of 8 are counted in `layers-unaligned`
    and logged: onnxruntime's NCHWc convs need multiples of 8), `protect` (':'-separated globs of node/output names whose groups stay whole),
    `layer-ratios` (GLOB@R entries, e.g. `/layer4/*@0.5`), `calibration` (.npz with one array
    per input, samples stacked on the batch axis; empty: synthetic random inputs, reported as
    such), `samples` (at most this many calibration samples), `batch`, `reconstruct` (least-squares
    refit of the layers that read removed channels; auto: only with a calibration file) and
    `bn-reestimate` (re-estimate BatchNorm statistics; auto: with a calibration file and no refit).

    Must not fire (the group is kept whole and reported with the reason): channels that reach a
    graph output, meet an op the analysis does not know, a LayerNorm/GroupNorm/Softmax/Reduce
    over the channel axis, a non-constant weight, an elementwise operand that is neither tracked
    nor constant... A group always keeps at least one unit; every tensor keeps at least one
    channel. ratio=0 changes nothing.
    """

    name: ClassVar[str] = "prune"
    ratio: float = 0.3
    criterion: str = "l1"
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

    def _flag(self, value: str) -> bool:
        if value in ("true", "1"):
            return True
        if value in ("false", "0"):
            return False
        return bool(self.calibration)

    # ------------------------------------------------------------------------------------------
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        t0 = time.perf_counter()
        ensure_shapes(model)
        an = analyze(model)
        reconstruct = self._flag(self.reconstruct)
        # a refit already matches the original layer outputs; re-estimating BN statistics on
        # top of it measured worse (mnist_resnet8), so `auto` re-estimates only without a refit
        reestimate = bool(an.bns) and (self._flag(self.bn_reestimate) if self.bn_reestimate != "auto"
                                       else bool(self.calibration) and not reconstruct)
        calib = None
        if self.criterion == "activation" or reconstruct or reestimate:
            calib = self._calibration(model)
            if calib.synthetic:
                ctx.info(f"prune: calibration is SYNTHETIC ({calib.source})")
        scores, rms_note = self._scores(an, calib)
        pruned, plan = self.choose(an, scores)
        flops0, params0 = count_flops(model), count_params(model)
        report: dict[str, Any] = {
            "groups": [
                {"layers": g.names, "channels": int(len(g.classes) * g.unit), "units": int(len(g.classes)),
                 "unit": g.unit, "pruned-units": plan.get(g.index, 0),
                 "blocked": list(dict.fromkeys(g.blocked.values()))[:3]}
                for g in an.groups
            ],
            "calibration": None if calib is None else calib.source,
        }
        ctx.data.setdefault("prune", []).append(report)
        unprunable = [g for g in an.groups if len(g.blocked) == len(g.classes)]
        for line in an.unprunable_report():
            ctx.info(f"prune: unprunable group {line}")
        for body in bodies_holding(model, {"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN"}):
            ctx.info(f"prune: {body} not pruned: channel pruning follows the main graph only "
                     "(--bind the input that decides an If to inline its branch)")
        uncounted = uncounted_layers(model)
        if uncounted:
            ctx.info(f"prune: {len(uncounted)} layers have unknown or symbolic dims beyond the batch axis "
                     f"({', '.join(uncounted[:3])}{' ...' if len(uncounted) > 3 else ''}): FLOPs count those dims "
                     "as 1; where they are channel counts shape inference lost, simplify-shapes (in -O1) may fix them")
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
        stats: dict[str, int | float] = {
            "groups": len(an.groups),
            "groups-unprunable": len(unprunable),
            "groups-pruned": sum(1 for v in plan.values() if v),
            "flops-uncounted-layers": len(uncounted),
            "layers-unaligned": unaligned,
        }
        if not pruned.any():
            stats.update({"channels-removed": 0, "flops-before": flops0, "flops-after": flops0,
                          "params-before": params0, "params-after": params0,
                          "seconds": round(time.perf_counter() - t0, 3)})
            why = ("no channel group to prune (no Conv/Gemm whose output channels can shrink)" if not an.groups else
                   f"all {len(an.groups)} channel groups are unprunable (reasons in the log)" if len(unprunable) == len(an.groups)
                   else f"ratio {self.ratio:g} removes no whole unit from any of the {len(an.groups) - len(unprunable)} prunable groups")
            return PassResult(False, stats, note=f"nothing pruned: {why}")
        original = model.clone() if (reconstruct or reestimate) else None
        stats["channels-removed"] = apply_pruning(an, pruned)
        if original is not None and calib is not None:
            from graphopt.passes.pruning.recovery import recover

            rs = recover(original, model, an, pruned, calib, refit=reconstruct, bn=reestimate, seed=self.seed, log=ctx.info)
            stats.update(rs)
        if not an.bns and (reconstruct or self.bn_reestimate in ("true", "1")):
            ctx.info("prune: no BatchNormalization left (folded into the conv weights): no statistics to re-estimate")
        ensure_shapes(model)
        flops1, params1 = count_flops(model), count_params(model)
        stats.update({
            "flops-before": flops0, "flops-after": flops1, "params-before": params0, "params-after": params1,
            "seconds": round(time.perf_counter() - t0, 3),
        })
        if rms_note:
            ctx.info(rms_note)
        return PassResult(True, stats)

    # ------------------------------------------------------------------------------------------
    def _calibration(self, model: Model):  # type: ignore[no-untyped-def]
        from graphopt.calibration import load_calibration, synthetic_calibration

        if self.calibration:
            return load_calibration(self.calibration, model, batch_size=self.batch, limit=self.samples)
        return synthetic_calibration(model, num_batches=max(1, math.ceil(self.samples / self.batch)), seed=self.seed,
                                     batch_size=self.batch)

    def _scores(self, an: Analysis, calib: Any) -> tuple[np.ndarray, str]:
        if self.criterion in ("l1", "l2"):
            return magnitude(an, self.criterion), ""
        if self.criterion == "bn-scale":
            return bn_scale(an), "" if an.bns else "prune: no BatchNormalization in the model: bn-scale fell back to l2"
        from graphopt.passes.pruning.recovery import channel_rms

        return activation(an, channel_rms(an, calib)), ""

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


def parse_ratio(value: str) -> float:
    """The CLI's `--prune RATIO`."""
    try:
        r = float(value)
    except ValueError:
        raise UsageError(f"--prune {value!r}: expected a ratio in [0, 1)") from None
    if not 0.0 <= r < 1.0:
        raise UsageError(f"--prune {value}: the ratio must be in [0, 1)")
    return r


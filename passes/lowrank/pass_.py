"""`low-rank`: factorize weight matrices into two thinner ones where that saves FLOPs."""

from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from graphopt.errors import GraphoptError, UsageError
from graphopt.ir import Model, independent_waves, constant_semantics
from graphopt.pattern import const_array
from graphopt.transform import Pass, PassContext, PassResult, register_pass

from graphopt.passes.cleanup.infer import infer_types
from graphopt.passes.pruning import count_flops, count_params
from graphopt.passes.quantize import measure

from graphopt.passes.lowrank import factor as fa
from graphopt.passes.lowrank import moments as mo
from graphopt.passes.lowrank.layers import Layer, apply, find_layers

#: energies the error-budget search tries (bisection over this list)
ENERGY_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


@dataclass
class _Plan:
    layer: Layer
    rank: int
    factors: fa.Factors
    sqnr: float
    basis: str  # what the SQNR was measured on


@register_pass
@dataclass(frozen=True)
class LowRank(Pass):
    """Low-rank factorization: a weight matrix W becomes two thinner ones (W ≈ A·B) where that saves FLOPs.

    Before → after (r the layer's rank; the original node becomes the second factor and keeps
    its name and output):

        MatMul(x, W[K,N])          →  MatMul(MatMul(x, A[K,r]), B[r,N])
        Gemm(x, W, C)  (transA 0)  →  Gemm(MatMul(x, A[K,r]), B[r,N], C')
        Conv(x, W[Co,Ci,k,k], b)   →  Conv(Conv(x, A[r,Ci,k,k], strides, pads), B[Co,r,1,1], b')

    A 1x1 conv is the k = 1 case; a k×k conv is decomposed along its channels (a k×k conv to r
    channels, then a 1x1 conv). Rank per layer: `rank=R` for every layer, else the smallest
    rank holding `energy` of the spectrum, or with `error-budget` (`rel:E`, `cosine:C`,
    `sqnr:DB`, `top1:P`; a bare number is rel) the lowest energy of a grid whose factorized model
    still meets the budget on the calibration data (outputs against the original's).

    With calibration data (`calibration=FILE.npz`, or `--calibration`) the factorization is
    data-aware (ASVD / SVD-LLM): the SVD of Σ^½·W with Σ the covariance of the layer's inputs on
    that data, so the energy is the share of the layer's *output* kept. `refit=true` then refits
    the layers by least squares in graph order, each on the inputs of the already-factorized
    model against the original model's outputs (reduced-rank regression; upstream error is
    compensated). Off by default: on MiniLM it was slower (a model run per wave) and worse on
    the test sentences (it fits the calibration tokens; see the README). Without data: plain SVD of W (said so in the log).
    See graphopt/passes/lowrank/factor.py for the arithmetic.

    Must not fire (counted in `layers-skipped-*`, reasons in the log): weights that are not
    constants (attention's Q·Kᵀ, graph inputs, weights already quantized by `quantize` or
    clustered by `cluster-weights`: run low-rank before those), weights shared by several
    readers, grouped/depthwise convs, ConvTranspose, Gemm with transA, batched (3-D) MatMul
    weights, layers with fewer than `min-size` weight elements, layers whose rank would not cut
    their FLOPs (r·(K+N) ≥ K·N: the break-even rank), with `speed=measure` layers whose factored
    form is not `min-speedup` faster on onnxruntime (each layer timed alone, paired rounds), the
    factors of an earlier run (a second run changes nothing), and If/Loop bodies.

    Stats per layer (`LAYER/rank`, `LAYER/max-rank` (break-even), `LAYER/flops-before`,
    `LAYER/flops-after`, `LAYER/sqnr-db`: output SQNR on the calibration data, or for white
    inputs = the weight's without data) and in total.
    """

    name: ClassVar[str] = "low-rank"
    energy: float = 0.95
    rank: int = 0
    error_budget: str = ""
    calibration: str = ""
    samples: int = 128
    batch: int = 8
    min_size: int = 4096
    refit: str = "false"
    speed: str = "flops"
    min_speedup: float = 1.05
    layers: tuple[str, ...] = ()
    token_mask: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.rank < 0 or self.min_size < 0 or self.samples < 1 or self.batch < 1:
            raise ValueError("rank and min-size must be >= 0, samples and batch >= 1")
        if self.refit not in ("true", "false", "1", "0"):
            raise ValueError(f"refit must be true or false, got {self.refit!r}")
        if self.speed not in ("flops", "measure"):
            raise ValueError(f"speed must be flops or measure, got {self.speed!r}")
        if self._budget() is not None and self.rank:
            raise ValueError("give rank or error-budget, not both")

    def _budget(self) -> measure.Budget | None:
        if self.error_budget in ("", "0", "0.0"):
            return None
        return measure.Budget.parse(self.error_budget)

    # ------------------------------------------------------------------------------------------
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        t0 = time.perf_counter()
        infer_types(model)
        flops0, params0 = count_flops(model), count_params(model)
        layers, skipped = find_layers(model, self.min_size)
        if self.layers:
            keep = [la for la in layers if any(fnmatch.fnmatchcase(la.name, p) for p in self.layers)]
            if len(keep) < len(layers):
                skipped["not matched by the layers option"] = [la.name for la in layers if la not in keep]
            layers = keep
        for body in (n for n in model.all_nodes() if n.graph is not model.graph and n.op_type in ("MatMul", "Gemm", "Conv")):
            skipped.setdefault("inside an If/Loop body (calibration reads the main graph only)", []).append(body.name or body.outputs[0].name)
        stats: dict[str, int | float] = {"layers-candidates": len(layers), "layers-factorized": 0}
        for why, names in skipped.items():
            key = "layers-skipped-" + _slug(why)
            stats[key] = stats.get(key, 0) + len(names)
            if why != "already factorized":
                ctx.info(f"low-rank: {len(names)} layers not considered: {why} ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})")
        if not layers:
            why = ("every Conv/Gemm/MatMul is already factorized" if skipped.get("already factorized") and len(skipped) == 1
                   else "no Conv/Gemm/MatMul with a constant 2-D weight of >= min-size elements"
                   + (f" ({'; '.join(f'{len(v)} {k}' for k, v in skipped.items())})" if skipped else ""))
            return PassResult(False, stats, note=f"nothing factorized: {why}")

        budget = self._budget()
        batches, source = self._batches(model, ctx, need=budget is not None)
        refit = bool(batches) and self.refit in ("true", "1")
        if batches:
            ctx.info(f"low-rank: data-aware factorization on {source}" + (", least-squares refit in graph order" if refit else ""))
        else:
            ctx.info("low-rank: no calibration data: plain SVD of the weights (give calibration=FILE.npz for a data-aware factorization)")
        original = model.clone() if batches else None
        energy = self.energy
        if budget is not None:
            assert original is not None
            energy = self._search(original, layers, batches, budget, ctx, stats)
            stats["energy"] = energy

        plans: list[_Plan] = []
        reasons: dict[str, list[str]] = {}
        if refit:
            assert original is not None
            # the layers' inputs are read in `model` as it is rewritten wave by wave, the
            # targets in the untouched `original`
            for wave in independent_waves(model.graph, [la.node for la in layers]):
                ms = mo.collect(model, layers, wave, batches, original=original, mask_spec=self.token_mask, seed=self.seed)
                for i in wave:
                    la = layers[i]
                    p = self._plan(la, ms.get(i), energy, refit=True, reasons=reasons)
                    if p is not None and self._fast_enough(model, p, ctx, reasons):
                        apply(model, la, p.factors, p.rank)
                        plans.append(p)
        else:
            ms = mo.collect(model, layers, range(len(layers)), batches, mask_spec=self.token_mask, seed=self.seed) if batches else {}
            todo = [self._plan(la, ms.get(i), energy, refit=False, reasons=reasons) for i, la in enumerate(layers)]
            for p in todo:
                if p is not None and self._fast_enough(model, p, ctx, reasons):
                    apply(model, p.layer, p.factors, p.rank)
                    plans.append(p)
        for why, names in reasons.items():
            stats["layers-skipped-" + _slug(why)] = len(names)
            ctx.info(f"low-rank: {len(names)} layers kept whole: {why} ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})")
        return self._finish(model, ctx, plans, stats, flops0, params0, t0, bool(batches))

    # ------------------------------------------------------------------------------------------
    def _batches(self, model: Model, ctx: PassContext, need: bool) -> tuple[list[dict[str, np.ndarray]], str]:
        from graphopt.calibration import as_calibration, load_calibration, synthetic_calibration

        axes = ctx.data.get("calibration-batch-axis") or None
        given: Any = self.calibration or ctx.data.get("calibration")
        if isinstance(given, str) and given:
            data = load_calibration(given, model, batch_size=self.batch, limit=self.samples, batch_axis=axes)
        elif given is not None and not isinstance(given, str):
            data = as_calibration(given, model, batch_size=self.batch, limit=self.samples, batch_axis=axes)
        elif need:
            data = synthetic_calibration(model, num_batches=max(1, math.ceil(self.samples / self.batch)),
                                         seed=self.seed, batch_size=self.batch)
            ctx.info(f"low-rank: WARNING error-budget measured on synthetic data ({data.source}); give calibration=FILE.npz")
        else:
            return [], ""
        out: list[dict[str, np.ndarray]] = []
        seen = 0
        for b in data:
            if seen >= self.samples:
                break
            out.append({k: np.asarray(v) for k, v in b.items()})
            seen += max((len(v) for v in b.values() if np.ndim(v)), default=1)
        if not out:
            raise UsageError(f"low-rank: the calibration data holds no samples ({data.source})")
        return out, data.source

    def _rank(self, sigma: np.ndarray, energy: float) -> int:
        full = int(np.sum(sigma > sigma[0] * 1e-12)) if len(sigma) and sigma[0] > 0 else 1
        r = self.rank if self.rank else fa.energy_rank(sigma, energy)
        return max(1, min(r, max(full, 1), len(sigma)))

    def _plan(self, la: Layer, m: fa.Moments | None, energy: float, *, refit: bool, reasons: dict[str, list[str]]) -> _Plan | None:
        rmax = fa.flops_ratio_limit(la.k, la.n)
        if rmax < 1:
            reasons.setdefault("too narrow: no rank cuts its FLOPs", []).append(la.name)
            return None
        w0, b0 = la.w, la.bias  # the original weights: `la` is rewritten only after its plan
        if m is not None and m.n > 0:
            wh = fa.whiten(m, w0, b0, centered=la.centered, refit=refit and m.xy is not None)
            r = self._rank(wh.s, energy)
            if r > rmax:
                reasons.setdefault("the rank the energy needs does not cut FLOPs (rank > break-even)", []).append(la.name)
                return None
            f = fa.truncate(wh, r)
            bias = f.bias if f.bias is not None else la.bias
            theta = np.concatenate([f.a @ f.b, (np.zeros(la.n) if bias is None else bias)[None, :]])
            err, ref = fa.output_error(m, theta, w=None if m.xy is not None else w0, bias=None if m.xy is not None else b0)
            return _Plan(la, r, f, fa.sqnr_db(err, ref), "calibration")
        svd = fa.plain(la.w)
        r = self._rank(svd[1], energy)
        if r > rmax:
            reasons.setdefault("the rank the energy needs does not cut FLOPs (rank > break-even)", []).append(la.name)
            return None
        f = fa.truncate_plain(svd, r)
        s2 = svd[1] ** 2
        return _Plan(la, r, f, fa.sqnr_db(float(s2[r:].sum()), float(s2.sum())), "white inputs")

    def _fast_enough(self, model: Model, p: _Plan, ctx: PassContext, reasons: dict[str, list[str]]) -> bool:
        if self.speed != "measure":
            return True
        sp = layer_speedup(model, p)
        if sp is None:
            ctx.info(f"low-rank: {p.layer.name}: input shape unknown, not timed (FLOPs decide)")
            return True
        p.layer.node.meta["low-rank-speedup"] = sp
        if sp < self.min_speedup:
            reasons.setdefault(f"measured not {self.min_speedup:g}x faster on onnxruntime (speed=measure)", []).append(
                f"{p.layer.name} {sp:.2f}x")
            return False
        return True

    def _search(self, original: Model, layers: list[Layer], batches: list[dict[str, np.ndarray]], budget: measure.Budget,
                ctx: PassContext, stats: dict[str, int | float]) -> float:
        """The lowest energy of ENERGY_GRID whose factorized model (no refit) meets `budget` on
        the calibration batches (bisection: a higher energy keeps more of every layer)."""
        evals = batches[: max(1, min(len(batches), 4))]
        ref = measure.run(original, evals)
        work = original.clone()
        wl, _ = find_layers(work, self.min_size)
        names = {la.name for la in layers}
        wl = [la for la in wl if la.name in names]
        ms = mo.collect(work, wl, range(len(wl)), batches, mask_spec=self.token_mask, seed=self.seed)
        whs = {i: fa.whiten(ms[i], la.w, la.bias, centered=la.centered, refit=False) for i, la in enumerate(wl) if i in ms}
        svds = {i: fa.plain(la.w) for i, la in enumerate(wl) if i not in whs}

        def score(e: float) -> dict[str, float]:
            m = original.clone()
            cand, _ = find_layers(m, self.min_size)
            by = {la.name: la for la in cand}
            for i, la in enumerate(wl):
                sig = whs[i].s if i in whs else svds[i][1]
                r = self._rank(sig, e)
                if r > fa.flops_ratio_limit(la.k, la.n):
                    continue
                f = fa.truncate(whs[i], r) if i in whs else fa.truncate_plain(svds[i], r)
                apply(m, by[la.name], f, r)
            return measure.output_metrics(ref, measure.run(m, evals))

        lo, hi = 0, len(ENERGY_GRID) - 1
        best = None
        tried = 0
        while lo <= hi:
            mid = (lo + hi) // 2
            e = ENERGY_GRID[mid]
            met = score(e)
            tried += 1
            ok = budget.holds(met)
            ctx.info(f"low-rank: error-budget: energy {e:g}: {budget.metric} {met[budget.metric]:.5g} ({'meets' if ok else 'misses'} {budget})")
            if ok:
                best, hi = mid, mid - 1
            else:
                lo = mid + 1
        stats["budget-trials"] = tried
        if best is None:
            ctx.info(f"low-rank: error-budget {budget}: not met even at energy {ENERGY_GRID[-1]}: factorizing at energy 1 (nothing)")
            return 1.0
        return ENERGY_GRID[best]

    def _finish(self, model: Model, ctx: PassContext, plans: list[_Plan], stats: dict[str, int | float],
                flops0: int, params0: int, t0: float, data: bool) -> PassResult:
        infer_types(model)
        report: list[dict[str, Any]] = []
        fb = fa_ = 0
        for p in plans:
            la = p.layer
            after = la.flops_at(p.rank)
            fb += la.flops
            fa_ += after
            key = la.name
            stats[f"{key}/rank"] = p.rank
            stats[f"{key}/max-rank"] = fa.flops_ratio_limit(la.k, la.n)
            stats[f"{key}/flops-before"] = la.flops
            stats[f"{key}/flops-after"] = after
            stats[f"{key}/sqnr-db"] = round(p.sqnr, 2) if math.isfinite(p.sqnr) else p.sqnr
            sp = la.node.meta.pop("low-rank-speedup", None)
            if sp is not None:
                stats[f"{key}/speedup"] = round(sp, 3)
            report.append({"layer": key, "op": la.node.op_type, "shape": [la.k, la.n], "rank": p.rank,
                           "flops-before": la.flops, "flops-after": after, "sqnr-db": p.sqnr, "sqnr-on": p.basis})
        ctx.data.setdefault("low-rank", []).append({"layers": report, "data-aware": data})
        stats["layers-factorized"] = len(plans)
        stats["flops-before"], stats["flops-after"] = flops0, count_flops(model)
        stats["params-before"], stats["params-after"] = params0, count_params(model)
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        if plans:
            sq = [p.sqnr for p in plans]
            stats["min-sqnr-db"] = round(min(sq), 2)
            ctx.info(f"low-rank: {len(plans)} layers factorized: their FLOPs {fb} -> {fa_} ({fa_ / max(fb, 1):.3f}x), "
                     f"model {flops0} -> {stats['flops-after']}; output SQNR per layer >= {min(sq):.1f} dB "
                     f"({'calibration data' if data else 'for white inputs (no calibration)'})")
            return PassResult(True, stats)
        return PassResult(False, stats, note=f"nothing factorized: none of the {stats['layers-candidates']} candidate layers "
                          "cuts its FLOPs at the rank its energy needs (reasons in the log)")


def _slug(text: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return "-".join(words[:4])


def layer_speedup(model: Model, p: _Plan, budget_s: float = 0.6) -> float | None:
    """The factored layer's speedup over the original one, each alone on onnxruntime (the input
    shape inferred, symbolic dims 1), as the median of paired per-round ratios."""
    import onnx
    from onnx import helper

    import graphopt

    la = p.layer
    shape = la.x.shape
    if shape is None:
        return None
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape.dims]
    node = la.node
    inits = [la.w_val] + ([la.bias_val] if la.bias_val is not None and la.kind != "matmul" else [])
    with constant_semantics(model):
        arrays = [const_array(v) for v in inits]
    if any(a is None for a in arrays):
        return None
    attrs = {k: a.value for k, a in node.attributes.items()}
    ins = ["x"] + [f"w{i}" for i in range(len(arrays))]
    nodes = [helper.make_node(node.op_type, ins, ["y0"], **attrs)]
    out = "y0"
    if la.bias_add is not None and la.bias is not None:
        arrays.append(la.bias.astype(la.dtype))
        ins.append("badd")
        nodes.append(helper.make_node("Add", ["y0", "badd"], ["y"]))
        out = "y"
    g = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(la.dtype), dims)],
                          [helper.make_tensor_value_info(out, helper.np_dtype_to_tensor_dtype(la.dtype), None)],
                          initializer=[onnx.numpy_helper.from_array(a, n) for a, n in zip(arrays, ins[1:])])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    try:
        base = graphopt.load(proto)
        fact = base.clone()
        cand, _ = find_layers(fact, 0)
        if len(cand) != 1:
            return None
        apply(fact, cand[0], p.factors, p.rank)
        feeds = {"x": np.random.default_rng(0).standard_normal(dims).astype(la.dtype)}
        _, sp = measure.paired_speedups([base, fact], feeds, budget_s=budget_s, min_runs=10)
    except GraphoptError:
        return None
    return sp[1]


__all__ = ["LowRank", "layer_speedup"]

"""The search space: which compression pipelines a trial may build, and the pipeline of a choice.

A point of the space is a dict of plain values (what Optuna stores as the trial's params):

    prune          fraction of channels removed (0: no pruning)
    prune-scope    uniform (the ratio in every group) | global (one ranking, at most 0.9 of a group)
                   | per-group (with 2+ layer groups: a ratio per layer group, `prune-gN`)
    prune-gN       fraction removed in layer group N's layers (per-group scope; early layers
                   usually take less than late ones)
    low-rank       energy kept by the factorization (0: no low-rank)
    int8-gN        int8 on for layer group N (the quantizable layers in graph order, cut into
                   `groups` runs of equal size: early/middle/late layers differ most in sensitivity)
    int8-calib     minmax | percentile | entropy | mse (when any group is int8)
    int8-smooth    SmoothQuant alpha of quantize (0: off; when any group is int8 and some layer's
                   input can be smoothed: MatMul/Gemm after LayerNorm, a projection, a constant Mul)
    cluster        codebook bits of cluster-weights (0: off; only where no layer is int8)
    precision      fp32 | fp16 | bf16 (convert-precision; only where no layer is int8)
    contrib-ops    the base's fusions again with onnxruntime's com.microsoft ops, after prune and
                   low-rank and before quantize (onnx target, where some layer is int8 and the
                   fusions find something: Attention, SkipLayerNormalization, BiasGelu), so
                   quantize sees the fused layers (Attention -> QAttention)

`pipeline(point)` turns a point into graphopt's pipeline syntax, in the order the passes compose
(structure first, then numerics): base, prune, low-rank, [contrib fusions,] then quantize |
cluster-weights | convert-precision. Every pass runs with its own accuracy budget off (the search holds the budget
on the whole pipeline) and with options whose output is reproducible (quantize speed=rules, not
timing), so a chosen pipeline replays to the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

#: characters the pipeline syntax reserves; a layer name holding one cannot be listed in exclude
_RESERVED = set(",{}:=@ ")

PRUNE_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
LOW_RANK_ENERGIES = (0.0, 0.8, 0.9, 0.95, 0.98, 0.99)
CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")
SMOOTH_ALPHAS = (0.0, 0.5, 0.75)
CLUSTER_BITS = (0, 4, 5, 6, 8)
PRECISIONS = ("fp32", "fp16", "bf16")

#: the layers quantize considers and that own a weight
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Attention")  # (Attention: com.microsoft's packed qkv weight)


class Suggester(Protocol):
    """What `Space.suggest` needs of an optuna.Trial (kept structural: optuna is optional)."""

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


@dataclass(frozen=True)
class LayerGroup:
    """A run of consecutive quantizable layers; `names` are what quantize's exclude matches."""

    index: int
    names: tuple[str, ...]
    first: str
    last: str
    layers: tuple[str, ...] = ()  # one name per layer (what prune's layer-ratios match)
    smoothable: int = -1  # layers whose input quantize's smooth= can fold (-1: not known)


@dataclass(frozen=True)
class Space:
    """The choices of one search, fixed for its study (every worker must build the same space)."""

    base: str = "-O2"
    groups: tuple[LayerGroup, ...] = ()
    calibration: str | None = None  # .npz (or folder) the calibrating passes read; absolute
    prune_ratios: tuple[float, ...] = PRUNE_RATIOS
    low_rank_energies: tuple[float, ...] = LOW_RANK_ENERGIES
    calibration_methods: tuple[str, ...] = CALIBRATION_METHODS
    smooth_alphas: tuple[float, ...] = SMOOTH_ALPHAS
    cluster_bits: tuple[int, ...] = CLUSTER_BITS
    precisions: tuple[str, ...] = PRECISIONS
    #: kept channel counts of pruned layers are multiples of this: 8 for onnxruntime's NCHWc convs;
    #: a compiled cpu target's channel block (16 on AVX-512), else one odd layer makes the
    #: layout planner block the whole model by 8 and the pruned model gains nothing
    round_to: int = 8
    #: the contrib-ops stage (`contrib_stage`): its pipeline, and the layer groups quantize sees
    #: after it (as many as `groups`, the same early/middle/late thirds); "" where not offered
    contrib: str = ""
    contrib_groups: tuple[LayerGroup, ...] = ()
    notes: tuple[str, ...] = field(default=())

    # ------------------------------------------------------------------ sampling

    def suggest(self, trial: Suggester) -> dict[str, Any]:
        """Sample a point (conditional choices only where they matter, so TPE learns them)."""
        p: dict[str, Any] = {"prune": trial.suggest_categorical("prune", list(self.prune_ratios))}
        if p["prune"] > 0:
            scopes = ["uniform", "global"] + (["per-group"] if self.per_group_prune() else [])
            p["prune-scope"] = trial.suggest_categorical("prune-scope", scopes)
            if p["prune-scope"] == "per-group":
                for g in self.groups:
                    p[f"prune-g{g.index}"] = trial.suggest_categorical(f"prune-g{g.index}", list(self.prune_ratios))
        p["low-rank"] = trial.suggest_categorical("low-rank", list(self.low_rank_energies))
        for g in self.groups:
            p[f"int8-g{g.index}"] = trial.suggest_categorical(f"int8-g{g.index}", [False, True])
        if self.int8_groups(p):
            p["int8-calib"] = trial.suggest_categorical("int8-calib", list(self.calibration_methods))
            if self.smoothable():
                p["int8-smooth"] = trial.suggest_categorical("int8-smooth", list(self.smooth_alphas))
            if self.contrib:
                p["contrib-ops"] = trial.suggest_categorical("contrib-ops", [False, True])
        else:
            p["cluster"] = trial.suggest_categorical("cluster", list(self.cluster_bits))
            p["precision"] = trial.suggest_categorical("precision", list(self.precisions))
        return p

    def per_group_prune(self) -> bool:
        return len(self.groups) >= 2 and all(g.layers for g in self.groups)

    def smoothable(self) -> bool:
        """Whether int8-smooth is a choice: alphas besides 0, and a layer whose input SmoothQuant
        can fold (groups that do not know count as having one)."""
        alphas = [a for a in self.smooth_alphas if a > 0]
        return bool(alphas) and any(g.smoothable != 0 for g in self.groups)

    def int8_groups(self, p: Mapping[str, Any]) -> list[LayerGroup]:
        return [g for g in self.groups if p.get(f"int8-g{g.index}")]

    # ------------------------------------------------------------------ points of interest

    def baseline(self) -> dict[str, Any]:
        """The base pipeline alone (no compression): the fp32 point of the front."""
        p: dict[str, Any] = {"prune": 0.0, "low-rank": 0.0}
        p.update({f"int8-g{g.index}": False for g in self.groups})
        p.update({"cluster": 0, "precision": "fp32"})
        return p

    def int8_everywhere(self) -> dict[str, Any]:
        p = {k: v for k, v in self.baseline().items() if k not in ("cluster", "precision")}
        p.update({f"int8-g{g.index}": True for g in self.groups})
        p["int8-calib"] = self.calibration_methods[0]
        if self.smoothable():
            p["int8-smooth"] = 0.0
        if self.contrib:
            p["contrib-ops"] = False
        return p

    def int8_contrib(self) -> dict[str, Any] | None:
        """int8 everywhere after the contrib-op fusions, where the space offers them."""
        return {**self.int8_everywhere(), "contrib-ops": True} if self.contrib else None

    def int8_smoothed(self) -> dict[str, Any] | None:
        """int8 everywhere with SmoothQuant (the middle alpha), where the space offers it."""
        if not self.smoothable():  # (which needs an alpha above 0)
            return None
        return {**self.int8_everywhere(), "int8-smooth": next(a for a in self.smooth_alphas if a > 0)}

    # ------------------------------------------------------------------ pipeline

    def pipeline(self, p: Mapping[str, Any]) -> str:
        """The pipeline spec of point `p` (graphopt's pipeline syntax)."""
        parts = [self.base] if self.base else []
        cal = self.calibration
        if p.get("prune", 0) > 0:
            # round-to: kept channel counts in multiples of what the target's convs block by (the
            # prune pass logs unaligned layers otherwise)
            scope = p.get("prune-scope", "uniform")
            opts = [f"ratio={p['prune']:g}", f"scope={'uniform' if scope == 'per-group' else scope}"]
            if scope == "per-group":  # (`ratio` is left for layers in no group: names the syntax cannot carry)
                opts.append("layer-ratios=" + ":".join(f"{name}@{p.get(f'prune-g{g.index}', 0.0):g}"
                                                       for g in self.groups for name in g.layers))
            opts += [f"round-to={self.round_to}", "accuracy-budget=none"]
            parts.append("prune{" + ",".join(opts + ([f"calibration={cal}"] if cal else [])) + "}")
        if p.get("low-rank", 0) > 0:
            parts.append("low-rank{" + ",".join([f"energy={p['low-rank']:g}"] + ([f"calibration={cal}"] if cal else [])) + "}")
        on = self.int8_groups(p)
        if on:
            groups = self.groups
            if p.get("contrib-ops") and self.contrib:
                parts.append(self.contrib)
                groups = self.contrib_groups
            on_index = {g.index for g in on}
            off = [n for g in groups if g.index not in on_index for n in g.names]
            opts = ["scheme=int8", f"calibration={p.get('int8-calib', 'minmax')}", "speed=rules"]
            opts += [f"data={cal}"] if cal else []
            opts += ["exclude=" + ":".join(off)] if off else []
            opts += [f"smooth={p['int8-smooth']:g}"] if p.get("int8-smooth", 0) else []
            parts.append("quantize{" + ",".join(opts) + "}")
        else:
            if p.get("cluster", 0):
                parts.append("cluster-weights{" + ",".join([f"bits={p['cluster']}", "accuracy-budget=none"]
                                                           + ([f"calibration={cal}"] if cal else [])) + "}")
            if p.get("precision", "fp32") != "fp32":
                parts.append("convert-precision{" + ",".join([f"dtype={p['precision']}"] + ([f"data={cal}"] if cal else [])) + "}")
        return ",".join(parts)


def describe(p: Mapping[str, Any], space: Space) -> str:
    """A short human label of a point: `prune 0.3 + int8 g0,g2 (entropy) + low-rank 0.95`."""
    out = []
    if p.get("prune", 0) > 0:
        if p.get("prune-scope") == "per-group":
            out.append("prune " + "/".join(f"g{g.index} {p.get(f'prune-g{g.index}', 0.0):g}" for g in space.groups))
        else:
            out.append(f"prune {p['prune']:g}" + (" global" if p.get("prune-scope") == "global" else ""))
    if p.get("low-rank", 0) > 0:
        out.append(f"low-rank {p['low-rank']:g}")
    on = space.int8_groups(p)
    if on:
        which = "all" if len(on) == len(space.groups) else ",".join(f"g{g.index}" for g in on)
        smooth = f", smooth {p['int8-smooth']:g}" if p.get("int8-smooth", 0) else ""
        out.append(("contrib ops + " if p.get("contrib-ops") and space.contrib else "")
                   + f"int8 {which} ({p.get('int8-calib', 'minmax')}{smooth})")
    if p.get("cluster", 0):
        out.append(f"cluster {p['cluster']} bits")
    if p.get("precision", "fp32") != "fp32":
        out.append(str(p["precision"]))
    return " + ".join(out) or "fp32 (base pipeline only)"


def layer_groups(model: Any, base: str, count: int = 3) -> tuple[tuple[LayerGroup, ...], list[str]]:
    """The quantizable layers of `model` after the base pipeline (those quantize sees), in graph
    order, cut into `count` groups; returns (groups, notes). A layer whose name the pipeline
    syntax cannot carry is left out of the groups (it follows quantize's own choice) and noted."""
    from graphopt.transform import optimize

    m = optimize(model, base) if base else model  # (on a copy)
    layers: list[tuple[str, ...]] = []
    smooth = _smoothable(m)
    skipped = 0
    for node in m.graph:
        if node.op_type not in WEIGHT_OPS or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        if node.inputs[1].const_value is None:  # activations x activations (attention): not a weight layer
            continue
        names = tuple(n for n in (node.name, node.outputs[0].name, node.name and node.name + "_lowrank_a")
                      if n and not (set(n) & _RESERVED))
        if not names:
            skipped += 1
            continue
        layers.append(names)
    notes = [f"{skipped} weight layers have names the pipeline syntax cannot list; int8 groups leave them to quantize"] if skipped else []
    count = max(0, min(count, len(layers)))
    groups = []
    for i in range(count):
        lo, hi = i * len(layers) // count, (i + 1) * len(layers) // count
        chunk = layers[lo:hi]
        groups.append(LayerGroup(i, tuple(n for names in chunk for n in names), chunk[0][0], chunk[-1][0],
                                 tuple(names[0] for names in chunk),
                                 -1 if smooth is None else sum(1 for names in chunk if set(names) & smooth)))
    return tuple(groups), notes


def contrib_stage(based: Any, base: str, count: int) -> tuple[str, tuple[LayerGroup, ...]]:
    """The contrib-ops choice of an onnx-target search: the base's passes again with their
    `contrib-ops` option on (a pipeline that runs after prune and low-rank), and the layer groups
    quantize sees after it. `based` is the model after `base`; `count` how many layer groups
    the base's graph has. Offered where it fuses attention into com.microsoft Attention (which
    quantize makes QAttention); ("", ()) elsewhere, or where its groups do not line up with the
    base's. fuse-conv-activation is left out: FusedConv/FusedGemm would hide those layers from
    quantize, and onnxruntime fuses Conv+Relu itself."""
    from graphopt.transform import format_pipeline, optimize, parse_pipeline, with_contrib_ops

    if not base:
        return "", ()
    passes = [p for p in with_contrib_ops(parse_pipeline(base)) if p.name != "fuse-conv-activation"]
    stage = format_pipeline(passes)
    fused = optimize(based, stage)
    if not any(n.domain == "com.microsoft" and n.op_type == "Attention" for n in fused.graph):
        return "", ()
    groups, _ = layer_groups(fused, "", count)
    if len(groups) != count:
        return "", ()
    return stage, groups


def _smoothable(model: Any) -> set[str] | None:
    """Names of the weight layers whose input quantize's `smooth=` can fold (None: quantize does not
    say: a pass registry without it)."""
    from graphopt.transform import get_pass

    try:
        q = get_pass("quantize")
    except Exception:  # noqa: BLE001 - any registry failure means "not known"
        return None
    fn = getattr(q, "smoothable_layers", None)
    return set(fn(model)) if fn is not None else None

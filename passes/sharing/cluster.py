"""`cluster-weights`: Deep-Compression-style codebook clustering of weight tensors."""

from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from graphopt.accuracy import AUTO_BUDGET, DEFAULT_BUDGET, EVAL_SAMPLES_MAX, Budget, Budgets, Reference, describe, parse_budget, resolve_budget
from graphopt.errors import GraphoptError, UsageError
from graphopt.ir import DataType, Graph, Model, NumpyTensor, Value
from graphopt.transform import Pass, PassContext, PassResult, register_pass

from graphopt.ir import constant_semantics, in_function, is_constant, opset_version
from graphopt.passes.sharing import codebook as cbk
from graphopt.passes.sharing import refit as rf
from graphopt.passes.sharing.kmeans import cluster_rows

_FLOATS = (DataType.FLOAT, DataType.FLOAT16, DataType.BFLOAT16, DataType.DOUBLE)

#: ctx.data keys: calibration inputs (graph input name -> array), and explicit importances
#: (weight name -> array broadcastable to the weight) for `weighting`
CALIBRATION_KEY = "calibration-inputs"
IMPORTANCE_KEY = "weight-importance"


def parse_layer_bits(spec: str) -> list[tuple[str, int]]:
    """`conv1:8;fc*:4;head:0` → [(glob, bits)]; 0 keeps the layer float."""
    rules: list[tuple[str, int]] = []
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        pat, sep, bits = part.rpartition(":")
        if not sep or not pat:
            raise UsageError(f"cluster-weights: layer-bits entry {part!r} is not NAME:BITS")
        try:
            b = int(bits)
        except ValueError:
            raise UsageError(f"cluster-weights: layer-bits entry {part!r}: {bits!r} is not a number") from None
        if b != 0 and not 2 <= b <= 8:
            raise UsageError(f"cluster-weights: layer-bits entry {part!r}: bits must be 2..8 (0: keep float)")
        rules.append((pat, b))
    return rules


def _channel_axis(w: Value) -> int | None:
    """The output-channel axis of a weight from how its readers use it; None when they do not
    agree or are not Conv/ConvTranspose/Gemm/MatMul."""
    ndim = len(w.const_value.shape)  # type: ignore[union-attr]
    axes = set()
    for node, i in w.uses():
        op = node.op_type if node.domain in ("", "ai.onnx") else None
        if op == "Conv" and i == 1:
            axes.add(0)
        elif op == "ConvTranspose" and i == 1:
            axes.add(1)
        elif op == "Gemm" and i == 1:
            axes.add(0 if node.attr("transB", 0) else 1)
        elif op == "MatMul" and i == 1:
            axes.add(ndim - 1)
        elif op == "Gather" and i == 0 and ndim == 2 and node.attr("axis", 0) == 0:
            axes.add(1)  # an embedding table: one codebook per feature column
        else:
            return None
    return axes.pop() if len(axes) == 1 else None


def _input_channel(w: Value) -> list[tuple[Value, int, int]]:
    """(activation, its channel axis, the weight's matching axis) per reader, for weighting by
    calibration data; empty when a reader is not a plain Conv(group 1)/Gemm/MatMul."""
    ndim = len(w.const_value.shape)  # type: ignore[union-attr]
    out = []
    for node, i in w.uses():
        x = node.inputs[0]
        op = node.op_type if node.domain in ("", "ai.onnx") else None
        if x is None or i != 1:
            return []
        if op == "Conv" and node.attr("group", 1) == 1:
            out.append((x, 1, 1))
        elif op == "Gemm":
            out.append((x, 0 if node.attr("transA", 0) else 1, 1 if node.attr("transB", 0) else 0))
        elif op == "MatMul" and ndim >= 2:
            out.append((x, -1, ndim - 2))
        else:
            return []
    return out


def _calibration_importance(model: Model, weights: list[Value], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-weight importance E[x_c^2] of the input channel each weight element multiplies,
    measured by running the model on onnxruntime with the activations as extra outputs."""
    from graphopt.check import onnxruntime_session

    wanted: dict[str, list[tuple[Value, int, int]]] = {}
    names: dict[str, None] = {}
    for w in weights:
        readers = _input_channel(w)
        if readers and all(x.graph is model.graph for x, _, _ in readers):
            wanted[w.name] = readers
            names.update({x.name: None for x, _, _ in readers})
    if not names:
        return {}
    try:
        sess = onnxruntime_session(model, optimize=False, extra_outputs=list(names))
        order = [o.name for o in sess.get_outputs()]
        acts = dict(zip(order, sess.run(None, feeds)))
    except Exception as e:
        raise GraphoptError(f"cluster-weights: cannot run the calibration inputs: {str(e).splitlines()[0]}") from None
    out: dict[str, np.ndarray] = {}
    for wname, readers in wanted.items():
        w = next(v for v in weights if v.name == wname)
        shape = tuple(w.const_value.shape)  # type: ignore[union-attr]
        total = np.zeros(shape, dtype=np.float64)
        ok = True
        for x, xaxis, waxis in readers:
            a = np.asarray(acts[x.name], dtype=np.float64)
            a = np.moveaxis(a, xaxis, 0).reshape(a.shape[xaxis], -1)
            energy = (a * a).mean(axis=1)
            if energy.size != shape[waxis]:
                ok = False
                break
            view = [1] * len(shape)
            view[waxis] = shape[waxis]
            total = total + energy.reshape(view)
        if ok:
            out[wname] = total
    return out


def _error(x: np.ndarray, axis: int | None, cb: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    """(relative L2 error, SQNR in dB) of the decoded weight against x, accumulated in float64
    over cache-sized chunks."""
    rows = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1) if axis is not None else x.reshape(1, -1)
    cb64 = cb.astype(np.float64)
    sse = ref = 0.0
    step = 1 << 16
    for r in range(rows.shape[0]):
        xr, ir, table = rows[r], idx[r], cb64[r]
        for c0 in range(0, xr.size, step):
            xc = xr[c0 : c0 + step].astype(np.float64)
            d = table.take(ir[c0 : c0 + step]) - xc
            # no BLAS dot: on a busy machine its threads cost more than the arithmetic
            sse += float(np.square(d, out=d).sum())
            ref += float(np.square(xc, out=xc).sum())
    if ref == 0.0 or sse == 0.0:
        return 0.0, float("inf")
    return math.sqrt(sse / ref), 10.0 * math.log10(ref / sse)


@register_pass
@dataclass(frozen=True)
class ClusterWeights(Pass):
    """Replace each float weight by a 2^bits-entry codebook and per-weight indices (k-means).

    Before → after (`W` a float initializer read by any ops):
        `W`                                    →  `W = Gather(W.codebook, Cast(W.idx))`
    with W.idx in the smallest storage that holds `bits` (uint4 at opset >= 21 for 4 bits,
    8-per-`bits`-bytes packing for 2/3/5/6/7 bits, uint8 for 8 bits: see
    graphopt.passes.sharing.codebook) and one codebook per tensor, or per output channel with
    `per-channel=true`. onnxruntime folds the decode when it creates the session, so inference
    speed is unchanged while the file shrinks. The Gather outputs the original value, so every
    reader (and weights tied by sharing one value) reads the same decoded tensor.

    Options: `bits` (2..8), `layer-bits=glob:bits;...` (matched against the weight's name and
    its readers' node names, first match wins, 0 keeps it float), `init=auto|linear|density`
    (k-means start: evenly spaced from min to max as in Deep Compression, at the quantiles, or
    both and the better fit per codebook),
    `weighting=none|calibration|importance` (calibration: weights each value by the mean
    square of the activation it multiplies; importance: ctx.data["weight-importance"][name]),
    `refit=none|activations` (activations: after k-means (weighted as `weighting` says), each
    codebook of a weight read by MatMul/Gemm refitted by least squares so the layer's *output*
    on the calibration data moves least, re-assigned and refitted again, `refit-iters` rounds,
    keeping the best: see graphopt.passes.sharing.refit; starting from a k-means weighted by
    diag(H) instead of a plain one was measured worse on MiniLM: mean cosine 0.9906 vs 0.9926), `calibration` (.npz or folder of .npz, one array per graph
    input as for quantize/prune; else ctx.data["calibration"] (path or CalibrationData, what
    `--calibration` sets) or ctx.data["calibration-inputs"] (a dict of graph inputs)),
    `channel-overhead=F` (without per-channel: per-channel codebooks for the tensors whose
    extra codebooks cost at most F times their index bytes, e.g. 0.02: an embedding table's
    feature columns, read by Gather, but not ordinary layers), `calibration-samples` (at most
    this many samples read), `token-mask=auto|none|INPUT`
    (rows of padding tokens do not count in the refit: auto takes the graph input named like
    attention_mask), `min-size` (elements),
    `sample` (values used to fit each tensor's codebook), `storage=auto|uint8|uint4|packed`.

    Accuracy: `accuracy-budget` (auto | cosine:C | sqnr:DB | top1:P | rel:E | none; auto, the
    default: cosine:0.99, plus top1:1 where the first output holds decisions and there is
    calibration data) on `eval-samples` calibration samples (0: all, at most 512; 32 random
    inputs without data), held one standard error on the safe side of the measure: when the
    requested bits break it, the most sensitive weights back off (kept float, or more bits).

    Does not fire on: tensors with fewer than `min-size` elements or fewer than 2 dims (biases,
    norm scales), non-float tensors (integer, shape and index tensors), initializers a caller
    can override (graph inputs from IR 4 on), graph outputs, tensors with NaN/Inf (unless they
    hold at most 2^bits distinct values: then the codebook is exact), initializers inside
    function bodies (none exist), and values already decoded from a codebook (a second run
    changes nothing). Run it after the -O pipeline, whose fusions fold into float weights; a
    later fold-constants keeps the decode (folding it would grow the stored bytes).
    """

    name: ClassVar[str] = "cluster-weights"
    bits: int = 5
    layer_bits: str = ""
    per_channel: bool = False
    init: str = "auto"
    weighting: str = "none"
    min_size: int = 1024
    sample: int = 1 << 18
    storage: str = "auto"
    seed: int = 0
    refit: str = "none"
    refit_iters: int = 2
    calibration: str = ""
    calibration_samples: int = 128
    token_mask: str = "auto"
    channel_overhead: float = 0.0
    accuracy_budget: str = AUTO_BUDGET  # auto | cosine:C | sqnr:DB | top1:P | rel:E | none
    eval_samples: int = 0  # 0: all calibration samples up to EVAL_SAMPLES_MAX (32 random ones without data)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise UsageError(f"cluster-weights: bits={self.bits} is not in 2..8")
        if self.init not in ("auto", "linear", "density"):
            raise UsageError(f"cluster-weights: init={self.init!r} is not auto, linear or density")
        if self.weighting not in ("none", "calibration", "importance"):
            raise UsageError(f"cluster-weights: weighting={self.weighting!r} is not none, calibration or importance")
        if self.storage not in ("auto", *cbk.STORAGES):
            raise UsageError(f"cluster-weights: storage={self.storage!r} is not auto, uint8, uint4 or packed")
        if self.min_size < 1 or self.sample < 1:
            raise UsageError("cluster-weights: min-size and sample must be positive")
        if self.refit not in ("none", "activations"):
            raise UsageError(f"cluster-weights: refit={self.refit!r} is not none or activations")
        if not 0.0 <= self.channel_overhead < 1.0:
            raise UsageError(f"cluster-weights: channel-overhead={self.channel_overhead} is not in [0, 1)")
        if self.refit_iters < 0 or self.calibration_samples < 1:
            raise UsageError("cluster-weights: refit-iters must be >= 0 and calibration-samples positive")
        parse_layer_bits(self.layer_bits)
        parse_budget(self.accuracy_budget)
        if self.eval_samples < 0:
            raise UsageError("cluster-weights: eval-samples must be >= 0 (0: all calibration samples, up to 512)")

    # --- which tensors ----------------------------------------------------------------------
    def _bits_for(self, w: Value, rules: list[tuple[str, int]]) -> int:
        names = [w.name] + [n.name for n in w.consumers() if n.name]
        for pat, b in rules:
            if any(fnmatch.fnmatchcase(nm, pat) for nm in names):
                return b
        return self.bits

    def _storage(self, model: Model, graph: Graph, bits: int) -> str:
        opset = opset_version(model, graph, default=1)
        uint4_ok = opset >= 21 and model.ir_version >= 10
        if self.storage == "uint4":
            if not uint4_ok or bits > 4:
                raise UsageError(
                    f"cluster-weights: storage=uint4 needs bits <= 4, opset >= 21 and IR >= 10 "
                    f"(model: bits {bits}, opset {opset}, IR {model.ir_version})"
                )
            return "uint4"
        if self.storage == "packed" and opset < 10:
            raise UsageError(f"cluster-weights: storage=packed needs opset >= 10 (model: {opset})")
        if self.storage != "auto":
            return self.storage
        if bits == 8:
            return "uint8"
        if bits == 4 and uint4_ok:
            return "uint4"
        return "packed" if opset >= 10 else ("uint4" if uint4_ok and bits < 4 else "uint8")

    def _candidates(self, model: Model) -> list[tuple[Graph, Value]]:
        out = []
        for g in model.graphs():
            if in_function(g):
                continue
            for v in list(g.initializers.values()):
                t = v.const_value
                if t is None or not hasattr(t, "numpy") or t.dtype not in _FLOATS or len(t.shape) < 2:
                    continue
                if not is_constant(v) or v.is_graph_output() or v.is_graph_input() or not v.uses():
                    continue
                out.append((g, v))
        return out

    # --- the pass -----------------------------------------------------------------------------
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        with constant_semantics(model):
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext) -> PassResult:
        t0 = time.perf_counter()
        rules = parse_layer_bits(self.layer_bits)
        stats: dict[str, int | float] = {
            "tensors-clustered": 0, "params-clustered": 0, "tensors-small": 0, "tensors-kept-float": 0,
            "tensors-nonfinite": 0, "bytes-before": 0, "bytes-after": 0,
        }
        errors: list[tuple[float, float, int]] = []  # (rel-l2, sqnr, n) per tensor
        todo: list[tuple[Graph, Value, int]] = []
        for g, w in self._candidates(model):
            if math.prod(w.const_value.shape) < self.min_size:  # type: ignore[union-attr]
                stats["tensors-small"] += 1
                continue
            bits = self._bits_for(w, rules)
            if bits == 0:
                stats["tensors-kept-float"] += 1
                continue
            todo.append((g, w, bits))
        importance: dict[str, np.ndarray] = {}
        if self.weighting == "calibration" and todo:
            feeds = ctx.data.get(CALIBRATION_KEY)
            if not isinstance(feeds, dict) or not feeds:
                feeds = _concat(self._batches(model, ctx, "weighting=calibration"))
            importance = _calibration_importance(model, [w for _, w, _ in todo], feeds)
        elif self.weighting == "importance":
            given = ctx.data.get(IMPORTANCE_KEY)
            if not isinstance(given, dict):
                raise UsageError(f"cluster-weights: weighting=importance needs ctx.data[{IMPORTANCE_KEY!r}] (weight name -> array)")
            importance = {k: np.asarray(v, dtype=np.float64) for k, v in given.items()}
        moments: dict[str, tuple[np.ndarray, bool]] = {}
        if self.refit != "none" and todo:
            moments = self._moments(model, ctx, [w for _, w, _ in todo])
            stats["tensors-refit"] = 0
        fits: dict[tuple[int, int], _Fit | None] = {}
        gindex = {id(g): i for i, g in enumerate(model.graphs())}

        def fit(i: int, bits: int) -> _Fit | None:
            g, w, _ = todo[i]
            if (i, bits) not in fits:
                fits[(i, bits)] = self._fit(w, bits, importance.get(w.name), moments.get(w.name))
            return fits[(i, bits)]

        chosen = {i: b for i, (_, _, b) in enumerate(todo)}
        for i in chosen:
            fit(i, chosen[i])
        ref = self._reference(model, ctx, stats) if todo else None
        budget = resolve_budget(self.accuracy_budget, model, real_data=ref is not None and "RANDOM" not in ref.source)
        if ref is not None and budget is not None:
            chosen = self._fit_budget(model, todo, gindex, chosen, fit, ref, budget, ctx, stats)
        shared = cbk.SharedConstants()
        for i, (g, w, _) in enumerate(todo):
            bits = chosen[i]
            if bits == 0:
                stats["tensors-kept-float"] += 1
                continue
            f = fit(i, bits)
            if f is None:
                stats["tensors-nonfinite"] += 1
                continue
            n, before, after, storage = self._emit(model, g, w, f, bits, shared)
            rel, sqnr, axis = f.rel, f.sqnr, f.axis
            for key, val in f.stats.items():
                stats[key] = stats.get(key, 0) + val if key == "tensors-refit" else val
            stats["tensors-clustered"] += 1
            stats["params-clustered"] += n
            stats["bytes-before"] += before
            stats["bytes-after"] += after
            errors.append((rel, sqnr, n))
            stats[f"{w.name}/bits"] = bits
            stats[f"{w.name}/params"] = n
            stats[f"{w.name}/rel-l2"] = rel
            stats[f"{w.name}/sqnr-db"] = sqnr
            stats[f"{w.name}/bytes-before"] = before
            stats[f"{w.name}/bytes-after"] = after
            stats[f"{w.name}/per-channel"] = int(axis is not None)
            ctx.info(
                f"cluster-weights: {w.name} {bits} bits ({storage}{', per channel' if axis is not None else ''}): "
                f"rel-l2 {rel:.4f}, SQNR {sqnr:.1f} dB, {before} -> {after} bytes"
            )
        if ref is not None and errors:
            final = ref.score(model)
            stats.update({f"output-{k}": round(v, 6) if math.isfinite(v) else 999.0 for k, v in final.items()})
            line = f"cluster-weights: output vs the original on {ref.source}: {describe(final)}"
            warn = parse_budget(DEFAULT_BUDGET)
            if budget is None and warn is not None and not warn.holds(final):
                line = (f"cluster-weights: WARNING large output deviation (outside {warn}; accuracy-budget=none): "
                        + line[len("cluster-weights: "):])
            ctx.info(line)
        if errors:
            stats["compression"] = stats["bytes-before"] / max(stats["bytes-after"], 1)
            stats["bits-per-weight"] = 8.0 * stats["bytes-after"] / max(stats["params-clustered"], 1)
            stats["max-rel-l2"] = max(e[0] for e in errors)
            stats["mean-rel-l2"] = sum(e[0] * e[2] for e in errors) / max(stats["params-clustered"], 1)
            stats["min-sqnr-db"] = min(e[1] for e in errors)
        stats["seconds"] = time.perf_counter() - t0
        note = "" if errors else (f"nothing clustered: {stats['tensors-small']} weights below min-size={self.min_size}, "
                                  f"{stats['tensors-kept-float']} kept float by layer-bits, {stats['tensors-nonfinite']} "
                                  f"non-finite, of {len(self._candidates(model))} float weights of rank >= 2")
        return PassResult(bool(errors), stats, note=note)

    def _batches(self, model: Model, ctx: PassContext, why: str, limit: int = 0) -> list[dict[str, np.ndarray]]:
        """The calibration batches: `calibration=`, else ctx.data["calibration"] (a path or
        CalibrationData), else ctx.data["calibration-inputs"] (one batch); at most `limit`
        (default calibration-samples) samples."""
        from graphopt.calibration import CalibrationData, load_calibration

        limit = limit or self.calibration_samples
        given = self.calibration or ctx.data.get("calibration")
        if isinstance(given, str) and given:
            data = load_calibration(given, model, batch_size=8, limit=limit,
                                    batch_axis=ctx.data.get("calibration-batch-axis"))
        elif isinstance(given, CalibrationData):
            data = given
        else:
            feeds = ctx.data.get(CALIBRATION_KEY)
            if isinstance(feeds, dict) and feeds:
                return [{k: np.asarray(v) for k, v in feeds.items()}]
            raise UsageError(f"cluster-weights: {why} needs calibration data (calibration=FILE.npz, --calibration, "
                             f"or ctx.data[{CALIBRATION_KEY!r}])")
        out: list[dict[str, np.ndarray]] = []
        seen = 0
        for b in data:
            if seen >= limit:
                break
            out.append(b)
            seen += max((len(v) for v in b.values() if np.ndim(v)), default=1)
        if not out:
            raise UsageError(f"cluster-weights: {why}: the calibration data holds no samples")
        return out

    def _moments(self, model: Model, ctx: PassContext, weights: list[Value]) -> dict[str, tuple[np.ndarray, bool]]:
        """Per refittable weight: (E[x^T x] over its readers' activations, W_eff = W^T?)."""
        wanted = {}
        for w in weights:
            r = rf.readers(w)
            if r is not None and w.graph is model.graph:
                wanted[w.name] = r
        if not wanted:
            return {}
        names = [x.name for xs, _ in wanted.values() for x in xs]
        try:
            sums = rf.second_moments(model, names, self._batches(model, ctx, f"refit={self.refit}"), self.token_mask)
        except GraphoptError:
            raise
        except Exception as e:  # onnxruntime refusing the feeds
            raise GraphoptError(f"cluster-weights: cannot run the calibration inputs: {str(e).splitlines()[0]}") from None
        out = {}
        for wname, (xs, trans) in wanted.items():
            h = sum(sums[x.name][0] / max(sums[x.name][1], 1) for x in xs)
            out[wname] = (h, trans)
        return out

    def _fit(self, w: Value, bits: int, importance: np.ndarray | None, moment: tuple[np.ndarray, bool] | None = None) -> _Fit | None:
        """The codebook(s) and indices of one weight at `bits` (None: non-finite values)."""
        t = w.const_value
        assert t is not None
        arr = t.numpy()
        shape = tuple(arr.shape)
        n = arr.size
        k = 1 << bits
        work_dtype = np.float64 if arr.dtype == np.float64 else np.float32
        x = np.asarray(arr, dtype=work_dtype)
        finite = bool(np.isfinite(x).all())
        axis = _channel_axis(w) if self.per_channel or self.channel_overhead > 0 else None
        if axis is not None and not self.per_channel:
            # per channel only where the extra codebooks are cheap (an embedding table's columns)
            if shape[axis] * k * arr.itemsize > self.channel_overhead * n * bits / 8:
                axis = None
        if axis is not None and shape[axis] * k * 2 > n:
            axis = None  # a codebook per channel would hold as many entries as the weight
        # at most k distinct values: the codebook is exact (masks, already-clustered weights)
        probe = np.random.default_rng(self.seed).integers(0, n, size=min(n, 4 * k + 1))
        uniq = np.unique(x.reshape(-1)[probe])
        exact = None
        refit_stats: dict[str, int | float] = {}
        if uniq.size <= k:
            full = np.unique(x)
            if full.size <= k:
                exact = full
        if exact is None and not finite:
            return None
        if exact is not None:
            axis = None
            codebook = np.full((1, k), exact[-1], dtype=np.float64)
            codebook[0, : exact.size] = exact
            idx = np.searchsorted(exact, x.reshape(1, -1)).astype(np.uint8)
            if np.isnan(exact).any():  # NaN sorts last; searchsorted of NaN lands past the end
                idx[np.isnan(x.reshape(1, -1))] = int(np.flatnonzero(np.isnan(exact))[0])
        else:
            rows = np.moveaxis(x, axis, 0).reshape(shape[axis], -1) if axis is not None else x.reshape(1, -1)
            wts = None
            if importance is not None:
                try:
                    full_w = np.broadcast_to(importance, shape)
                except ValueError:
                    raise UsageError(f"cluster-weights: importance of {w.name!r} does not broadcast to {list(shape)}") from None
                wts = np.moveaxis(full_w, axis, 0).reshape(shape[axis], -1) if axis is not None else full_w.reshape(1, -1)
                wts = np.maximum(wts, 1e-12 * max(float(wts.max()), 1e-30))  # no zero-weight cluster collapse
            codebook, idx = cluster_rows(rows, k, weights=wts, init=self.init, sample=self.sample, seed=self.seed)
            if moment is not None and finite and (axis is None or len(shape) == 2):
                codebook, idx = self._refit(w, x, codebook, idx, axis, moment, refit_stats)
        cb = codebook.astype(arr.dtype)
        if exact is not None:
            rel, sqnr = 0.0, float("inf")
        else:
            rel, sqnr = _error(x, axis, cb, idx)
        return _Fit(cb, idx, axis, rel, sqnr, refit_stats)

    def _emit(self, model: Model, g: Graph, w: Value, f: _Fit, bits: int, shared: cbk.SharedConstants) -> tuple[int, int, int, str]:
        """Replace `w` by its codebook decode: (elements, bytes before, bytes after, storage)."""
        t = w.const_value
        assert t is not None
        shape = tuple(t.shape)
        n = math.prod(shape)
        storage = self._storage(model, g, bits)
        cbk.build_decode(g, w, f.codebook, f.idx, bits=bits, storage=storage, axis=f.axis, shared=shared, opset=opset_version(model, g, default=1))
        before = int(t.nbytes)
        after = cbk.storage_bytes(n, bits, storage) + f.codebook.nbytes + (shape[f.axis] * 4 if f.axis is not None else 0)
        return n, before, after, storage

    # --- accuracy budget ----------------------------------------------------------------------
    def _reference(self, model: Model, ctx: PassContext, stats: dict) -> Reference | None:
        """The original's outputs on `eval-samples` calibration samples (random inputs when
        there is no calibration data, said in the log); None when onnxruntime cannot run it."""
        try:
            if self.calibration or ctx.data.get("calibration") or ctx.data.get(CALIBRATION_KEY):
                batches = self._batches(model, ctx, "the accuracy check", limit=self.eval_samples or EVAL_SAMPLES_MAX)
                src = f"{sum(_samples(b) for b in batches)} calibration samples"
            else:
                from graphopt.calibration import synthetic_calibration

                data = synthetic_calibration(model, num_batches=max(1, math.ceil((self.eval_samples or 32) / 8)), seed=self.seed, batch_size=8)
                batches = list(data)
                src = f"{sum(_samples(b) for b in batches)} RANDOM-input samples (no calibration data given)"
            return Reference(model, batches, source=src)
        except GraphoptError as e:
            ctx.info(f"cluster-weights: WARNING cannot measure the output deviation ({e}): the accuracy budget is not checked")
            stats["accuracy-unmeasured"] = 1
            return None

    def _fit_budget(self, model: Model, todo: list[tuple[Graph, Value, int]], gindex: dict[int, int], chosen: dict[int, int],
                    fit, ref: Reference, budget: Budget | Budgets, ctx: PassContext, stats: dict) -> dict[int, int]:
        """Bits per weight that meet `budget`: the requested ones if they hold; else each weight's
        sensitivity (output SQNR with it alone clustered), the fewest most sensitive kept float
        (bisection), then each of those, least sensitive first, at the fewest bits above the
        requested that still hold."""
        t0 = time.perf_counter()
        cache: dict[tuple[tuple[int, int], ...], dict[str, float]] = {}

        rank_ref = ref.subset(SENSITIVITY_SAMPLES)  # sensitivity only ranks: fewer samples do

        def score(assign: dict[int, int], reference: Reference = ref) -> dict[str, float]:
            key = tuple(sorted((i, b) for i, b in assign.items() if b)) + ((-1, int(reference is ref)),)
            if key not in cache:
                if len(key) == 1:
                    cache[key] = {"cosine": 1.0, "sqnr": math.inf, "rel": 0.0, "top1": 0.0}
                else:
                    m = model.clone()
                    graphs = list(m.graphs())
                    for i, b in key[:-1]:
                        f = fit(i, b)
                        g, w, _ = todo[i]
                        if f is not None:
                            v = graphs[gindex[id(g)]].initializers[w.name]
                            v.const_value = NumpyTensor(f.decode(tuple(w.const_value.shape)))  # type: ignore[union-attr]
                    cache[key] = reference.score(m)
            return cache[key]

        requested = score(chosen)
        stats["accuracy-requested-" + budget.metric] = round(requested[budget.metric], 6)
        if isinstance(budget, Budgets) and budget.why:
            ctx.info(f"cluster-weights: accuracy budget {budget} ({budget.why}), checked one standard error below what "
                     f"{ref.source} measure")
        if budget.holds(requested):
            ctx.info(f"cluster-weights: accuracy budget {budget} holds at the requested bits on {ref.source} ({describe(requested)})")
            return chosen
        live = [i for i, b in chosen.items() if b and fit(i, b) is not None]
        sens = {i: score({i: chosen[i]}, rank_ref)["sqnr"] for i in live}
        order = sorted(live, key=lambda i: sens[i])  # lowest SQNR first: most sensitive

        def floats(k: int) -> dict[int, int]:
            return {**chosen, **{i: 0 for i in order[:k]}}

        lo, hi = 0, len(order)  # all float is the original: holds
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if budget.holds(score(floats(mid))):
                hi = mid
            else:
                lo = mid
        out = floats(hi)
        refine = order[:hi][::-1][:MAX_REFINE]
        for i in refine:
            g, w, _ = todo[i]
            t = w.const_value
            assert t is not None
            n = math.prod(t.shape)
            # only bit widths that still store fewer bytes than the float weight (a small tensor's
            # codebook can outgrow it)
            opts = [b for b in range(chosen[i] + 1, 9)
                    if cbk.storage_bytes(n, b, self._storage(model, g, b)) + (1 << b) * t.dtype.numpy().itemsize < t.nbytes]
            lo2, hi2 = -1, len(opts)  # hi2 == len(opts): kept float
            while hi2 - lo2 > 1:
                mid = (lo2 + hi2) // 2
                if budget.holds(score({**out, i: opts[mid]})):
                    hi2 = mid
                else:
                    lo2 = mid
            if hi2 < len(opts):
                out[i] = opts[hi2]
        final = score(out)
        for rank, i in enumerate(order):
            if out[i] != chosen[i]:
                w = todo[i][1]
                what = "kept float" if out[i] == 0 else f"{out[i]} bits instead of {chosen[i]}"
                stats[f"{w.name}/budget-choice"] = out[i]
                ctx.info(f"cluster-weights: {what} for {w.name}: accuracy budget {budget}; alone at {chosen[i]} bits it gives "
                         f"SQNR {sens[i]:.1f} dB (sensitivity rank {rank + 1} of {len(order)})")
        n_float = sum(1 for i in order if out[i] == 0)
        n_more = sum(1 for i in order if 0 < out[i] != chosen[i])
        if hi > len(refine):
            ctx.info(f"cluster-weights: {hi - len(refine)} more sensitive tensors kept float without trying more bits "
                     f"(at most {MAX_REFINE} are tried)")
        params = {i: math.prod(todo[i][1].const_value.shape) for i in live}  # type: ignore[union-attr]
        mean_bits = sum(out[i] * params[i] for i in live if out[i]) / max(1, sum(params[i] for i in live if out[i]))
        stats.update({"tensors-backed-off": n_float + n_more, "tensors-kept-float-for-budget": n_float,
                      "tensors-more-bits": n_more, "budget-evaluations": len(cache)})
        ctx.info(f"cluster-weights: accuracy budget {budget} on {ref.source}: the requested bits gave {budget.show(requested)}"
                 f"; backed off {n_float + n_more} of {len(order)} tensors ({n_float} kept float, "
                 f"{n_more} at more bits): {budget.show(final)}, mean {mean_bits:.2f} bits over the "
                 f"clustered ones ({len(cache)} evaluations, {time.perf_counter() - t0:.1f} s)")
        return out

    def _refit(self, w: Value, x: np.ndarray, codebook: np.ndarray, idx: np.ndarray, axis: int | None,
               moment: tuple[np.ndarray, bool], stats: dict | None) -> tuple[np.ndarray, np.ndarray]:
        """Activation-aware refit of one 2-D weight's codebook(s) (see graphopt.passes.sharing.refit)."""
        h, trans = moment
        shape = x.shape
        w_eff = x.T if trans else x
        if axis is None:
            i2 = idx.reshape(shape)
            idx_eff = i2.T if trans else i2
        else:  # rows were the output channels: [out, in]
            idx_eff = idx.T
        if h.shape != (w_eff.shape[0], w_eff.shape[0]):
            return codebook, idx
        cb, ie, e0, e1 = rf.refit(w_eff.astype(np.float64), h, codebook, idx_eff, iters=self.refit_iters)
        if axis is None:
            new_idx = (ie.T if trans else ie).reshape(1, -1)
        else:
            new_idx = np.ascontiguousarray(ie.T)
        if stats is not None:
            ref = float(np.einsum("io,io->", w_eff, h @ w_eff.astype(np.float64)))
            stats["tensors-refit"] = stats.get("tensors-refit", 0) + 1
            stats[f"{w.name}/output-rel-l2-kmeans"] = math.sqrt(e0 / ref) if ref > 0 else 0.0
            stats[f"{w.name}/output-rel-l2"] = math.sqrt(e1 / ref) if ref > 0 else 0.0
        return cb, np.ascontiguousarray(new_idx, dtype=np.uint8)


#: backed-off weights that try more bits (least sensitive first); the rest stay float
MAX_REFINE = 16
#: samples the per-weight sensitivity (a ranking) is measured on
SENSITIVITY_SAMPLES = 8


@dataclass
class _Fit:
    codebook: np.ndarray  # [R, 2^bits] in the weight's dtype
    idx: np.ndarray  # [R, n/R] uint8, rows along `axis` when per channel
    axis: int | None
    rel: float
    sqnr: float
    stats: dict[str, int | float]  # the refit's, merged into the pass's for the bits chosen

    def decode(self, shape: tuple[int, ...]) -> np.ndarray:
        """The weight the decode graph computes."""
        vals = np.take_along_axis(self.codebook, self.idx.astype(np.int64), axis=1)
        if self.axis is None:
            return vals.reshape(shape)
        moved = list(shape)
        moved.insert(0, moved.pop(self.axis))
        return np.moveaxis(vals.reshape(moved), 0, self.axis)


def _samples(batch: dict[str, np.ndarray]) -> int:
    return max((len(v) for v in batch.values() if np.ndim(v)), default=1)


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One feed of all batches stacked on the batch axis (weighting=calibration runs once)."""
    if len(batches) == 1:
        return batches[0]
    return {k: np.concatenate([np.asarray(b[k]) for b in batches]) if np.ndim(batches[0][k]) else batches[0][k]
            for k in batches[0]}

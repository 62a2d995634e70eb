"""Accuracy of a changed model against its original: output metrics and budgets (the one home
of both, for compression passes, `--verify-metric`, `--compare` and the search).

What compression passes (quantize, prune, cluster-weights) measure, on onnxruntime:

    ref = Reference(original, batches)            # runs the original once
    m = ref.score(candidate)                      # {"cosine", "sqnr", "rel", "top1"}
    budget = parse_budget("cosine:0.99")          # None for "none"
    budget.holds(m), describe(m)

Metrics (over all float outputs of all batches): `sqnr` (dB), `rel` (‖Δ‖/‖ref‖), `cosine` (mean
over samples of the first output, flattened per sample) and `top1` (percent of argmaxes over the
last axis of the first output that changed; for one value per sample, [N, 1]: the cosine over all
samples and the percent of decisions at 0.5 / 0 that changed). Budgets: `cosine:C` (>= C), `sqnr:DB` (>= DB),
`top1:P` (<= P percent), `rel:E` or a bare number (<= E).

The compression passes' default budget is `auto` (`resolve_budget`): `cosine:0.99`, and for a
model whose first output holds decisions (one probability per sample, [N, 1] or [N]; class
scores from Softmax/LogSoftmax/Sigmoid; a 2-D classifier head Gemm/MatMul [N, C]) also `top1:1`:
at most 1 % of the decisions change, what a user of a detector or classifier loses. Against
sampling error (a budget measured on 32 samples held there and missed end to end), `score`
adds the one-standard-error bounds and a budget must hold at them: cosine at its mean minus one
standard error of the per-sample cosines, top1 at the Wilson upper bound (z = 1) of the flips (at
the measure itself where too few decisions could not show even 0 flips within the limit: fewer
than 99 for top1:1);
the passes also measure on all held-out calibration data they have (up to `EVAL_SAMPLES_MAX`).

What `--compare` and `--verify-metric` report (`output_agreement`; conventions of polygraphy /
Olive's accuracy metrics): outputs are compared per output over all batches; cosine is the mean
over samples (each sample flattened) and top-1 agreement the share of samples whose argmax over
the last axis is the same, both on the first float output (the one a classifier's logits sit
in); SQNR (dB) is the worst over all float outputs:

    m = output_agreement(reference_batches, result_batches)   # {"cosine": .., "top1-agreement": .., "sqnr": ..}
    budgets = parse_budgets("cosine:0.99,sqnr:30")
    failed = [b for b in budgets if not b.holds(m)]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from graphopt.check import onnxruntime_session
from graphopt.errors import GraphoptError, UsageError
from graphopt.ir.core import Model

Batch = Mapping[str, np.ndarray]

#: the budget compression passes hold by default (the issue's goal: never lose more end to end)
DEFAULT_BUDGET = "cosine:0.99"
#: the passes' default `accuracy-budget`: DEFAULT_BUDGET, plus DECISION_BUDGET where the first
#: output holds decisions (resolve_budget)
AUTO_BUDGET = "auto"
DECISION_BUDGET = "top1:1"
#: standard errors between a measured metric and the bound a budget is checked at (one-sided,
#: ~84 %): 32 samples measured cosine 0.9904 where 10000 gave 0.9899 (mnist_resnet8, prune 0.3)
MARGIN_Z = 1.0
#: most held-out samples a pass scores a candidate on (`eval-samples=0`: all it has, up to this)
EVAL_SAMPLES_MAX = 512


def session(model: Model, *, threads: int = 0, optimize: bool = True, extra_outputs: Sequence[str] = ()):  # type: ignore[no-untyped-def]
    """An onnxruntime CPU session for `model` (optionally with intermediate values as outputs);
    a fixed thread count also stops the pool spinning (graphopt.check.onnxruntime_session)."""
    try:
        return onnxruntime_session(model, threads=threads, spinning=not threads, optimize=optimize, extra_outputs=extra_outputs)
    except Exception as e:
        raise GraphoptError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from None


def run(model: Model, batches: Sequence[Batch], *, threads: int = 0, feedback: Mapping[str, str] | None = None) -> list[list[np.ndarray]]:
    """Outputs of `model` on every batch (onnxruntime, all optimizations). With `feedback`
    ({state input: output}), the batches are one sequence: from the second on, each state input
    takes the model's own output of the step before (where the shapes agree), so the error a
    compressed model carries in its state adds up as it does in a stream."""
    sess = session(model, threads=threads)
    names = [o.name for o in sess.get_outputs()]
    state: dict[str, np.ndarray] = {}
    outs: list[list[np.ndarray]] = []
    try:
        for b in batches:
            feed = dict(b)
            for i, v in state.items():
                if i in feed and np.shape(v) == np.shape(feed[i]):
                    feed[i] = v
            res = list(sess.run(None, feed))
            state = {i: res[names.index(o)] for i, o in (feedback or {}).items() if o in names}
            outs.append(res)
    except Exception as e:
        raise GraphoptError(f"onnxruntime failed on an evaluation batch: {str(e).splitlines()[0]}") from None
    return outs



def _open_dim(dim: int | str | None) -> bool:
    """A symbolic or unknown (-1, 0) dim of a model input."""
    return not isinstance(dim, int) or dim <= 0

def _single_steps(model: Model, batches: Sequence[Batch], feedback: Mapping[str, str]) -> list[dict[str, np.ndarray]]:
    """Batches cut into one-sample steps (each input along its batch axis), in order. The batch
    size comes from the inputs that are not states; a state whose detected axis does not hold it
    (`[2, m, 4]` beside `x [N, 8]`) is cut on its one open dim of that size, else kept whole."""
    from graphopt.calibration import batch_axes

    axes = batch_axes(model)
    dims = {v.name: (v.shape.dims if v.shape is not None else None) for v in model.graph.inputs}
    steps: list[dict[str, np.ndarray]] = []
    for b in batches:
        sizes = [np.shape(v)[axes[k]] for k, v in b.items()  # type: ignore[index]
                 if k not in feedback and axes.get(k) is not None and np.ndim(v) > (axes.get(k) or 0)]
        n = int(sizes[0]) if sizes else max((len(v) for v in b.values() if np.ndim(v)), default=1)
        cut: dict[str, int] = {}
        for k, v in b.items():
            ax = axes.get(k)
            if ax is not None and np.ndim(v) > ax and np.shape(v)[ax] == n:
                cut[k] = ax
                continue
            d = dims.get(k)
            open_n = [i for i in range(np.ndim(v)) if np.shape(v)[i] == n and d is not None and i < len(d)
                      and _open_dim(d[i])]
            if ax is not None and len(open_n) == 1:
                cut[k] = open_n[0]
        for j in range(n):
            steps.append({k: (np.take(v, [j], axis=cut[k]) if k in cut else v) for k, v in b.items()})
    return steps


# ------------------------------------------------------------------------------------ metrics

#: metric -> unit for budgets; cosine, top1-agreement and sqnr must be >= the limit, top1
#: (percent of argmax predictions that changed) and rel (relative L2 error) <= it; `top1:1`
#: means the same in `--accuracy-budget` and `--verify-metric`
METRICS = {"cosine": "", "top1-agreement": "", "sqnr": " dB", "top1": " pt", "rel": "", "accuracy-drop": " pt"}
_AT_MOST = ("top1", "rel", "accuracy-drop")


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """10·log10(‖ref‖² / ‖ref − test‖²); inf when equal, -inf when ref is all zeros and test not."""
    r = np.asarray(ref, np.float64).ravel()
    e = r - np.asarray(test, np.float64).ravel()
    num, den = float(r @ r), float(e @ e)
    if den == 0.0:
        return math.inf
    if num == 0.0:
        return -math.inf
    return 10.0 * math.log10(num / den)


def _rows(a: np.ndarray) -> np.ndarray:
    """Samples as rows: axis 0 is the batch (a 0-d or 1-d output is one sample)."""
    a = np.asarray(a, np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def output_agreement(reference: Sequence[Sequence[np.ndarray]], result: Sequence[Sequence[np.ndarray]],
                     names: Sequence[str] | None = None) -> dict[str, float | int | str | None]:
    """How closely `result` follows `reference` (per batch, a list of outputs): cosine and
    top1-agreement (a fraction in [0, 1]) of the first float output, sqnr (dB) of the worst
    float output (named in `sqnr-output`), samples counted. Non-finite values count as errors
    only through the metrics (NaN in either side gives NaN cosine / SQNR)."""
    first = None
    num: dict[int, float] = {}
    den: dict[int, float] = {}
    cos: list[float] = []
    same = total = 0
    for rb, tb in zip(reference, result):
        if len(rb) != len(tb):
            raise ValueError(f"{len(tb)} outputs, expected {len(rb)}")
        for i, (r, t) in enumerate(zip(rb, tb)):
            if not _is_float(r):
                continue
            r64, t64 = np.asarray(r, np.float64), np.asarray(t, np.float64)
            if r64.shape != t64.shape:
                raise ValueError(f"output {i}: shape {t64.shape}, expected {r64.shape}")
            num[i] = num.get(i, 0.0) + float(np.sum(r64 ** 2))
            den[i] = den.get(i, 0.0) + float(np.sum((r64 - t64) ** 2))
            first = i if first is None else first
            if i != first:
                continue
            rs, ts = _rows(r64), _rows(t64)
            nr, nt = np.linalg.norm(rs, axis=1), np.linalg.norm(ts, axis=1)
            with np.errstate(invalid="ignore"):
                c = np.sum(rs * ts, axis=1) / np.maximum(nr * nt, 1e-300)
            cos.extend(np.where((nr == 0) & (nt == 0), 1.0, c).tolist())
            if r64.ndim >= 1 and r64.shape[-1] > 1:
                ra, ta = r64.argmax(axis=-1), t64.argmax(axis=-1)
                same += int(np.sum(ra == ta))
                total += int(ra.size)
    sq = {i: (math.inf if den[i] == 0 else (10 * math.log10(num[i] / den[i]) if num[i] > 0 else -math.inf))
          for i in num}
    n_all, d_all = sum(num.values()), sum(den.values())
    rel = (0.0 if d_all == 0 else math.sqrt(d_all / n_all) if n_all > 0 else math.inf) if num else None
    worst = min(sq, key=lambda i: sq[i]) if sq else None
    def label(i: int) -> str:
        return names[i] if names is not None and i < len(names) else f"output {i}"

    return {
        "cosine": float(np.mean(cos)) if cos else None,
        "top1-agreement": same / total if total else None,
        "top1": 100.0 * (total - same) / total if total else None,  # percent changed (--accuracy-budget's top1)
        "rel": rel,
        "sqnr": sq[worst] if worst is not None else None,
        "sqnr-output": label(worst) if worst is not None else None,
        "metric-output": label(first) if first is not None else None,
        "samples": len(cos),
    }


def top1_accuracy(outputs: Sequence[Sequence[np.ndarray]], labels: np.ndarray) -> float:
    """Share of samples whose argmax over the last axis of the first output equals its label
    (samples in batch order; one label per sample)."""
    preds = np.concatenate([np.asarray(b[0]).reshape(len(np.asarray(b[0])), -1).argmax(axis=-1)
                            if np.asarray(b[0]).ndim > 1 else np.asarray(b[0]).reshape(1, -1).argmax(axis=-1)
                            for b in outputs])
    labels = np.asarray(labels).reshape(-1)
    if preds.size != labels.size:
        raise ValueError(f"{preds.size} predictions for {labels.size} labels")
    return float(np.mean(preds == labels)) if labels.size else math.nan



def output_metrics(ref: Sequence[Sequence[np.ndarray]], test: Sequence[Sequence[np.ndarray]]) -> dict[str, float]:
    """Error of `test` against `ref` (per batch, a list of outputs) over all float outputs:
    sqnr (dB), rel (‖Δ‖/‖ref‖), cosine (mean over samples of the first output, flattened per
    sample) and top1 (percent of samples whose argmax over the last axis of the first output
    differs). A first output with one value per sample ([N] with N = 1, [N, 1]: a VAD's speech
    probability) gets the cosine of all its values over all batches as one vector, and top1
    counts changed decisions (value > 0.5 for values in [0, 1], else > 0)."""
    num = den = 0.0
    cos: list[float] = []
    flips = total = 0
    # one value per sample ([N], [N, 1]: a probability, a score): the cosine of a 1-element
    # vector is always 1 and an argmax over one class never changes, so these values are
    # gathered over all batches into one vector (its cosine) and compared as decisions
    scal_r: list[np.ndarray] = []
    scal_t: list[np.ndarray] = []
    for rb, tb in zip(ref, test):
        for i, (r, t) in enumerate(zip(rb, tb)):
            if not np.issubdtype(np.asarray(r).dtype, np.floating):
                continue
            r64, t64 = np.asarray(r, np.float64), np.asarray(t, np.float64)
            # non-finite values (a -inf mask passed through) count as equal where both agree, as
            # an infinite error where they do not
            fin = np.isfinite(r64) & np.isfinite(t64)
            if not fin.all():
                same = (r64 == t64) | (np.isnan(r64) & np.isnan(t64))
                if (~fin & ~same).any():
                    den = math.inf
                r64, t64 = np.where(fin, r64, 0.0), np.where(fin, t64, 0.0)
            num += float(np.sum(r64 ** 2))
            den += float(np.sum((r64 - t64) ** 2))
            if i == 0 and r64.ndim >= 1 and r64.size == r64.shape[0] and (r64.ndim > 1 or r64.size == 1):
                scal_r.append(r64.reshape(-1))
                scal_t.append(t64.reshape(-1))
            elif i == 0 and r64.ndim >= 1:
                rs = r64.reshape(r64.shape[0], -1) if r64.ndim > 1 else r64.reshape(1, -1)
                ts = t64.reshape(rs.shape)
                nr, nt = np.linalg.norm(rs, axis=1), np.linalg.norm(ts, axis=1)
                c = np.sum(rs * ts, axis=1) / np.maximum(nr * nt, 1e-30)
                cos.extend(np.where((nr == 0) & (nt == 0), 1.0, c).tolist())
                ra, ta = r64.argmax(axis=-1), t64.argmax(axis=-1)
                flips += int(np.sum(ra != ta))
                total += int(ra.size)
    cos_se = float(np.std(cos, ddof=1) / math.sqrt(len(cos))) if len(cos) > 1 else 0.0
    if scal_r:
        rs, ts = np.concatenate(scal_r), np.concatenate(scal_t)
        nr, nt = float(np.linalg.norm(rs)), float(np.linalg.norm(ts))
        cos.append(1.0 if nr == 0 and nt == 0 else float(rs @ ts) / max(nr * nt, 1e-30))
        # decisions: at 0.5 for values in [0, 1] (a sigmoid probability), else at 0 (a logit)
        thr = 0.5 if rs.min() >= 0.0 and rs.max() <= 1.0 else 0.0
        flips += int(np.sum((rs > thr) != (ts > thr)))
        total += int(rs.size)
    return {
        "sqnr": math.inf if den == 0 else (10 * math.log10(num / den) if num > 0 and den < math.inf else -math.inf),
        "rel": 0.0 if num == 0 and den == 0 else math.sqrt(den / num) if num > 0 else math.inf,
        "cosine": float(np.mean(cos)) if cos else 1.0,
        "top1": 100.0 * flips / total if total else 0.0,
        # the bounds budgets are checked at (MARGIN_Z standard errors; Budget.holds)
        "cosine-low": (float(np.mean(cos)) - MARGIN_Z * cos_se) if cos else 1.0,
        "top1-high": 100.0 * wilson_upper(flips, total, MARGIN_Z) if total else 0.0,
        "decisions": total,
    }


def wilson_upper(k: int, n: int, z: float = MARGIN_Z) -> float:
    """Upper Wilson score bound of a proportion k/n (0 flips of 256 -> 0.0039 at z = 1)."""
    if n <= 0:
        return 0.0
    p, z2 = k / n, z * z
    centre = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return min(1.0, (centre + half) / (1 + z2 / n))


def describe(m: Mapping[str, float]) -> str:
    """One line: `cosine 0.99871, SQNR 23.4 dB, rel 0.0676, top1 changed 0.0 %`."""
    n = m.get("decisions")
    return (f"cosine {m['cosine']:.5f}, SQNR {m['sqnr']:.1f} dB, rel {m['rel']:.4f}, "
            f"top1 changed {m['top1']:.1f} %" + (f" of {int(n)} decisions" if n else ""))


@dataclass(frozen=True)
class Budget:
    """An accuracy budget, `METRIC:LIMIT`: `top1:P` (at most P percent of argmax predictions
    change), `cosine:C` (mean cosine to the reference >= C), `top1-agreement:A` (share of
    unchanged argmaxes >= A), `sqnr:D` (output SQNR >= D dB), `rel:E` or a bare number (relative
    L2 output error <= E), `accuracy-drop:P` (top-1 accuracy on the data's labels at most P
    points below the original's: only where labels are measured, `labels=True`). A metric that
    is absent or NaN in the measurements does not hold."""

    metric: str
    limit: float

    @staticmethod
    def parse(text: str, *, labels: bool = False) -> Budget:
        t = text.strip().lower()
        key, sep, val = t.partition(":")
        if not sep:
            key, val = "rel", t
        if key == "accuracy-drop" and not labels:
            raise UsageError(f"accuracy budget {text!r}: accuracy-drop needs labelled evaluation data, which only "
                             "--search measures; a pass compares with the original (top1:P bounds the drop too)")
        if key not in ("top1", "cosine", "sqnr", "rel", "accuracy-drop"):
            raise UsageError(f"accuracy budget {text!r}: unknown metric {key!r} (have top1:P, cosine:C, sqnr:DB, rel:E, none; accuracy-drop:P in --search)")
        try:
            limit = float(val)
        except ValueError:
            raise UsageError(f"accuracy budget {text!r}: {val!r} is not a number") from None
        return Budget(key, limit)

    def holds(self, m: Mapping[str, float | int | str | None]) -> bool:
        """At the metric's sampling bound where `m` has one (`cosine-low`, `top1-high`: what
        Reference.score measures), else at the metric."""
        v = m.get(_BOUND.get(self.metric, ""), m.get(self.metric))
        n = m.get("decisions")
        if self.metric == "top1" and isinstance(n, int) and n and 100.0 * wilson_upper(0, n) > self.limit:
            v = m.get("top1")  # too few decisions to show even 0 flips within the limit: the measure
        if not isinstance(v, (int, float)) or math.isnan(v):
            return False
        return v <= self.limit if self.metric in _AT_MOST else v >= self.limit

    def show(self, m: Mapping[str, float | int | str | None]) -> str:
        """`cosine 0.9904 (bound 0.9886)`: the measured value and the bound it is checked at."""
        v, b = m.get(self.metric), m.get(_BOUND.get(self.metric, ""))
        if not isinstance(v, (int, float)):
            return f"{self.metric} unmeasured"
        bound = f" (bound {b:.4g})" if isinstance(b, (int, float)) and b != v else ""
        return f"{self.metric} {v:.4g}{bound}"

    def __str__(self) -> str:
        return f"{self.metric} {'<=' if self.metric in _AT_MOST else '>='} {self.limit:g}{METRICS[self.metric]}"


#: metric -> the key of its sampling bound in Reference.score's metrics
_BOUND = {"cosine": "cosine-low", "top1": "top1-high"}


@dataclass(frozen=True)
class Budgets:
    """Budgets that must all hold (`auto` resolved: `cosine >= 0.99 and top1 <= 1 pt`); `why`
    says how they were chosen. `metric` is the first one's (stats keys, the search)."""

    items: tuple[Budget, ...]
    why: str = ""

    @property
    def metric(self) -> str:
        return self.items[0].metric

    @property
    def limit(self) -> float:
        return self.items[0].limit

    def holds(self, m: Mapping[str, float | int | str | None]) -> bool:
        return all(b.holds(m) for b in self.items)

    def show(self, m: Mapping[str, float | int | str | None]) -> str:
        return ", ".join(b.show(m) for b in self.items)

    def __str__(self) -> str:
        return " and ".join(str(b) for b in self.items)


def decision_output(model: Model) -> str:
    """Why the first output of `model` holds decisions ('' when it does not seem to): a value
    per sample ([N, 1] / [N]), a Softmax/LogSoftmax/Sigmoid (through shape ops), or a
    classifier head (Gemm, or MatMul(+Add), of rank 2 with 2..1000 classes)."""
    outs = model.graph.outputs
    if not outs:
        return ""
    out = outs[0]
    dims = out.shape.dims if out.shape is not None else None
    if dims is not None and (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)):
        return f"{out.name!r} holds one value per sample"
    node = out.producer()
    while node is not None and node.op_type in ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose") and node.inputs:
        src = node.inputs[0]
        node = src.producer() if src is not None else None
    if node is None:
        return ""
    if node.op_type in ("Softmax", "LogSoftmax", "Sigmoid"):
        return f"{out.name!r} comes from a {node.op_type} (class scores: their argmax is the decision)"
    if node.op_type == "Add" and any(i is not None and i.producer() is not None and i.producer().op_type == "MatMul"  # type: ignore[union-attr]
                                     for i in node.inputs):
        node = next(i.producer() for i in node.inputs if i is not None and i.producer() is not None and i.producer().op_type == "MatMul")  # type: ignore[union-attr]
    if node is not None and node.op_type in ("Gemm", "MatMul") and dims is not None and len(dims) == 2 \
            and isinstance(dims[1], int) and 2 <= dims[1] <= 1000:
        return f"{out.name!r} is a {dims[1]}-class classifier head ({node.op_type} [N, {dims[1]}]: its argmax is the decision)"
    return ""


def resolve_budget(text: str, model: Model, *, real_data: bool = True) -> Budget | Budgets | None:
    """The budget `text` means for `model`: `auto` is DEFAULT_BUDGET, plus DECISION_BUDGET where
    the first output holds decisions (decision_output) and the evaluation runs on real data
    (decisions on random inputs say nothing); anything else is parse_budget's."""
    if text.strip().lower() != AUTO_BUDGET:
        return parse_budget(text)
    base = Budget.parse(DEFAULT_BUDGET)
    why = decision_output(model)
    if why and not real_data:
        return Budgets((base,), why=f"auto: {why}, but random inputs are no data to count decisions on")
    if not why:
        return Budgets((base,), why="auto: the first output does not look like decisions")
    return Budgets((base, Budget.parse(DECISION_BUDGET)), why=f"auto: {why}")


def parse_budget(text: str, *, labels: bool = False) -> Budget | None:
    """`Budget.parse`, with `none` (or empty) meaning no budget and `auto` DEFAULT_BUDGET (what
    it means without a model; resolve_budget adds the model's decisions)."""
    t = text.strip().lower()
    if t == AUTO_BUDGET:
        return Budget.parse(DEFAULT_BUDGET)
    return None if t in ("", "none", "off") else Budget.parse(text, labels=labels)


def parse_budgets(text: str) -> list[Budget]:
    """`--verify-metric`: `cosine:0.99,top1-agreement:0.99,sqnr:30` (comma-separated; each metric
    at most once; cosine and top1-agreement as fractions, or percentages over 1)."""
    out: dict[str, Budget] = {}
    for item in (t.strip() for t in str(text).split(",")):
        key, sep, val = item.partition(":")
        key = key.strip().lower().replace("_", "-")
        if key == "top-1-agreement":
            key = "top1-agreement"
        if not sep or key not in METRICS:
            raise UsageError(f"--verify-metric {text!r}: expected METRIC:LIMIT with METRIC one of "
                             f"{', '.join(METRICS)} (e.g. cosine:0.99, top1-agreement:0.99, sqnr:30, top1:1 "
                             "= at most 1 % of predictions changed, as --accuracy-budget)")
        try:
            limit = float(val)
        except ValueError:
            raise UsageError(f"--verify-metric {text!r}: {val.strip()!r} is not a number") from None
        if key in ("cosine", "top1-agreement") and limit > 1:
            limit /= 100.0  # top1-agreement:99 means 99 %
        if key in ("cosine", "top1-agreement") and not 0 <= limit <= 1:
            raise UsageError(f"--verify-metric {text!r}: {key} is a fraction in [0, 1]")
        out[key] = Budget(key, limit)
    return list(out.values())


class Reference:
    """The original model's outputs on evaluation batches, to score candidates against.

    `source` says where the batches came from (repeat it in logs: random inputs are not data)."""

    def __init__(self, original: Model, batches: Iterable[Batch], *, source: str = "", threads: int = 0,
                 feedback: Mapping[str, str] | None = None) -> None:
        from graphopt.calibration import state_feedback

        self.batches = [dict(b) for b in batches]
        if not self.batches:
            raise GraphoptError("no evaluation batches to measure accuracy on")
        # a streaming model (state in, next state out: `state` -> `stateN`) is scored as one
        # sequence of single samples with its own state fed back: one step with the original's
        # state hides the error that builds up over a stream
        self.feedback = dict(state_feedback(original) if feedback is None else feedback)
        if self.feedback:
            self.batches = _single_steps(original, self.batches, self.feedback)
            fb = ", ".join(f"{i} <- {o}" for i, o in self.feedback.items())
            source = f"{source}, run as one sequence with the state fed back ({fb})" if source else f"one sequence ({fb})"
        self.source = source
        self.threads = threads
        self.outputs = run(original, self.batches, threads=threads, feedback=self.feedback)
        self.evaluations = 0

    @property
    def samples(self) -> int:
        return sum(self._count(b) for b in self.batches)

    def _count(self, b: Batch) -> int:
        # a sequence's steps hold one sample each (a state [2, 1, 64] has its batch on axis 1)
        return 1 if self.feedback else max((len(v) for v in b.values() if np.ndim(v)), default=1)

    def subset(self, samples: int) -> Reference:
        """The first batches holding at least `samples` samples, sharing this one's outputs (a
        cheaper reference for ranking, e.g. per-layer sensitivity)."""
        k, seen = 0, 0
        while k < len(self.batches) and seen < samples:
            seen += self._count(self.batches[k])
            k += 1
        sub = object.__new__(Reference)
        sub.batches, sub.outputs = self.batches[:k], self.outputs[:k]
        sub.source, sub.threads, sub.evaluations = f"{seen} of {self.source}", self.threads, 0
        sub.feedback = self.feedback
        return sub

    def score(self, model: Model) -> dict[str, float]:
        self.evaluations += 1
        return output_metrics(self.outputs, run(model, self.batches, threads=self.threads, feedback=self.feedback))

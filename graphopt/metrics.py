"""Accuracy metrics of a result's outputs against the original's: cosine similarity, top-1
agreement, SQNR, top-1 accuracy against labels; and `--verify-metric` thresholds over them.

    m = output_agreement(reference_batches, result_batches)   # {"cosine": .., "top1-agreement": .., "sqnr": ..}
    checks = parse_thresholds("cosine:0.99,sqnr:30")
    failed = [c for c in checks if not c.holds(m)]

Conventions (those of polygraphy / Olive's accuracy metrics): outputs are compared per output
over all batches; cosine is the mean over samples (each sample flattened) and top-1 agreement
the share of samples whose argmax over the last axis is the same, both on the first float
output (the one a classifier's logits sit in); SQNR (dB) is the worst over all float outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from graphopt.errors import UsageError

#: metric -> unit for thresholds; cosine, top1-agreement and sqnr must be >= the limit, top1
#: (percent of argmax predictions that changed) and rel (relative L2 error) <= it: the forms
#: `--accuracy-budget` takes (graphopt.accuracy.Budget), so `top1:1` means the same in both
METRICS = {"cosine": "", "top1-agreement": "", "sqnr": " dB", "top1": " pt", "rel": ""}
_AT_MOST = ("top1", "rel")


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


@dataclass(frozen=True)
class Threshold:
    """`METRIC:LIMIT`: the result passes when its metric is >= LIMIT (cosine, top1-agreement in
    [0, 1] or as a percentage over 1; sqnr in dB)."""

    metric: str
    limit: float

    def holds(self, m: dict[str, float | int | str | None]) -> bool:
        v = m.get(self.metric)
        if not isinstance(v, (int, float)) or math.isnan(v):
            return False
        return v <= self.limit if self.metric in _AT_MOST else v >= self.limit

    def __str__(self) -> str:
        return f"{self.metric} {'<=' if self.metric in _AT_MOST else '>='} {self.limit:g}{METRICS[self.metric]}"


def parse_thresholds(text: str) -> list[Threshold]:
    """`cosine:0.99,top1-agreement:0.99,sqnr:30` (comma-separated; each metric at most once)."""
    out: dict[str, Threshold] = {}
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
        out[key] = Threshold(key, limit)
    return list(out.values())

"""The compile report: what graphopt-compile did, as JSON (--report) and as a terminal table.

Holds pass timings, node counts per op type before/after, file sizes before/after and, with
--verify, the numeric deltas between the original and the compiled model.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from graphopt.ir.core import Model
from graphopt.transform.instruments import PassRecord

#: kernels of --profile the terminal summary shows (the report has them all)
PROFILE_ROWS = 10

#: bump when a key changes meaning, so build pipelines can check what they read
SCHEMA_VERSION = 1


def op_counts(model: Model) -> dict[str, int]:
    """Nodes per op type over the whole model (subgraphs and functions included), sorted by
    name; non-default domains are spelled `domain::Op`."""
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.all_nodes())
    return dict(sorted(counts.items()))


@dataclass
class VerifyResult:
    ok: bool
    max_abs: float
    max_rel: float
    rtol: float
    atol: float
    inputs: str  # where the inputs came from: a .npz path or "random(seed=N)"
    detail: str
    shapes: dict[str, list[int]] = field(default_factory=dict)  # the input shapes it ran
    # onnxruntime's own noise: max |optimizations on - off| per output; atol is at least that
    noise: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None  # --verify-metric: the measured metrics
    thresholds: list[str] = field(default_factory=list)  # --verify-metric: what had to hold
    # max/min-type nodes that read a NaN: the reference ran them skipping NaN (verification.py)
    nan_skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The terminal line (both targets print it)."""
        from graphopt.verification import summary_line

        return summary_line(self)


@dataclass
class Report:
    graphopt_version: str
    model: str
    output: str | None
    target: str
    pipeline: str
    status: str = "ok"  # "ok" or "verify-failed"
    disabled: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    nodes_before: dict[str, int] = field(default_factory=dict)
    nodes_after: dict[str, int] = field(default_factory=dict)
    size_before: int = 0
    size_after: int | None = None
    verify: VerifyResult | None = None
    verify_each: list[tuple[str, float]] | None = None
    seconds: float = 0.0
    # an option the user asked for that changed nothing (--quantize, --prune, cluster-weights,
    # --tune), one line each with the reason; printed even with --quiet
    warnings: list[str] = field(default_factory=list)
    # the compiled targets' own sections (kernels, schedules, tuning, compile_seconds...), after
    # the common keys; the terminal shows their kernel line
    target_report: dict[str, Any] = field(default_factory=dict)
    # log lines from before the pipeline (fixed input shapes...), shown in the terminal summary
    notes: list[str] = field(default_factory=list)
    compare: dict[str, Any] | None = None  # --compare: graphopt.compare's before/after table
    details: dict[str, Any] = field(default_factory=dict)  # passes' own reports (pass_details)
    profile: dict[str, Any] | None = None  # --profile: graphopt.profiler's JSON of the result

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "graphopt_version": self.graphopt_version,
            "status": self.status,
            "model": self.model,
            "output": self.output,
            "target": self.target,
            "pipeline": self.pipeline,
            "disabled": list(self.disabled),
            "log": list(self.log),
            "passes": [
                {
                    "pass": r.spec,
                    "seconds": r.seconds,
                    "changed": r.changed,
                    "nodes_before": r.nodes_before,
                    "nodes_after": r.nodes_after,
                    "note": r.note,
                    "stats": dict(r.stats),
                }
                for r in self.passes
            ],
            "nodes": {
                "before": dict(self.nodes_before),
                "after": dict(self.nodes_after),
                "total_before": sum(self.nodes_before.values()),
                "total_after": sum(self.nodes_after.values()),
            },
            "size": {"before": self.size_before, "after": self.size_after},
            "verify": None if self.verify is None else asdict(self.verify),
            "verify_each": None
            if self.verify_each is None
            else [{"pass": spec, "max_abs": _finite(err)} for spec, err in self.verify_each],
            "seconds": self.seconds,
            "warnings": list(self.warnings),
            **({"compare": self.compare} if self.compare is not None else {}),
            **({"profile": self.profile} if self.profile is not None else {}),
            **self.details,
        } | {k: v for k, v in self.target_report.items() if k not in _COMMON_KEYS}

    def to_json(self) -> str:
        # allow_nan=False: strict JSON readers choke on NaN/Infinity; _finite maps them to None
        return json.dumps(_sanitize(self.to_dict()), indent=2, sort_keys=False, allow_nan=False) + "\n"

    def format_table(self) -> str:
        """A readable summary for the terminal."""
        lines = [f"graphopt-compile {self.model} -> {self.output or '(no output)'}  [target {self.target}]"]
        lines.append(f"pipeline: {self.pipeline or '(empty)'}")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.passes:
            w = max(len("pass"), *(len(r.spec) for r in self.passes))
            lines.append(f"  {'pass':<{w}}  {'ms':>9}  {'nodes':>13}  changed  what it did")
            for r in self.passes:
                nodes = f"{r.nodes_before}->{r.nodes_after}"
                lines.append(f"  {r.spec:<{w}}  {r.seconds * 1e3:>9.2f}  {nodes:>13}  {'yes' if r.changed else 'no ':<7}  {r.note}".rstrip())
            for r in self.passes:
                lines.extend(_per_item_table(r))
        ops = sorted(set(self.nodes_before) | set(self.nodes_after))
        if ops:
            w = max(len("op"), *(len(o) for o in ops))
            lines.append(f"  {'op':<{w}}  {'before':>7}  {'after':>7}")
            for op in ops:
                b, a = self.nodes_before.get(op, 0), self.nodes_after.get(op, 0)
                lines.append(f"  {op:<{w}}  {b:>7}  {a:>7}{'' if a == b else f'  ({a - b:+d})'}")
            tb, ta = sum(self.nodes_before.values()), sum(self.nodes_after.values())
            lines.append(f"  {'total':<{w}}  {tb:>7}  {ta:>7}{'' if ta == tb else f'  ({ta - tb:+d})'}")
        # what compression passes measured (accuracy budgets, output deviation) and every warning
        lines.extend(f"  {m}" for m in self.log if any(k in m for k in _TERMINAL_LOG))
        size_after = "-" if self.size_after is None else f"{self.size_after} bytes"
        grew = self.size_after is not None and self.size_after > self.size_before > 0
        lines.append(f"size: {self.size_before} bytes -> {size_after}"
                     + (f"  (grew {self.size_after / self.size_before:.2f}x)" if grew else ""))  # type: ignore[operator]
        k = self.target_report.get("kernels")
        if isinstance(k, dict):
            lines.append(f"kernels: {k.get('groups', '?')} groups ({len(k.get('inline', {}))} inline, "
                         f"{k.get('primfuncs', '?')} TIR functions)")
        tuning = self.target_report.get("tuning")
        if isinstance(tuning, dict) and tuning.get("status"):
            lines.append(tuning_line(tuning))
        if self.verify is not None:
            lines.append(self.verify.summary())
        if self.compare is not None:
            from graphopt.compare import format_table

            lines.append(format_table(self.compare))
        if self.profile is not None:  # the slowest kernels; graphopt-run --profile lists every one
            from graphopt.profiler import Profile, format_profile

            lines.append("profile (slowest first; every kernel: graphopt-run OUT --profile):")
            lines.append(format_profile(Profile.from_json(self.profile), sort="time", top=PROFILE_ROWS))
        lines.append(f"time: {self.seconds:.3f} s")
        return "\n".join(lines)


def tuning_line(t: dict[str, Any]) -> str:
    """The compiled targets' tuning in one line: what ran, and how many kernels keep their default
    schedule / a tuned one (`kept`: per task after tuning, counts per kind from a database)."""
    kept = t.get("kept") or {}
    kinds = [v.get("kept") for v in kept.values() if isinstance(v, dict)] if any(isinstance(v, dict) for v in kept.values()) \
        else [k for k, n in kept.items() if isinstance(n, int) for _ in range(n)]
    counts = Counter(kinds)
    parts = [f"{counts[k]} {label}" for k, label in (("default", "kept the default schedule"), ("tuned", "a tuned one"),
                                                      ("variant", "a measured variant of the default")) if counts[k]]
    what = str(t["status"])
    if "new_trials" in t:
        what += f" ({t['new_trials']} new trials, stopped: {t.get('stopped', '?')})"
    tail = f": {len(kinds)} kernels: {', '.join(parts)}" if parts else ""
    return f"tuning: {what}{tail}" + (f"; database {t['db']}" if t.get("db") else "")


#: the keys every report has; a target's own section may not override them
_COMMON_KEYS = frozenset({"schema", "graphopt_version", "status", "model", "output", "target", "pipeline", "disabled",
                          "log", "passes", "nodes", "size", "verify", "verify_each", "seconds", "warnings", "profile"})


#: PassContext.data keys whose content the report carries (quantize's per-layer table, prune's groups)
DETAIL_KEYS = ("quantize", "prune")


def pass_details(data: Any) -> dict[str, Any]:
    """The passes' own reports from PassContext.data, as plain JSON values."""
    out = {k: data[k] for k in DETAIL_KEYS if k in data}
    return json.loads(json.dumps(out, default=_json_value)) if out else {}


def _json_value(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _fmt(v: int | float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


#: pass log lines (ctx.info) the terminal summary repeats: warnings and measured accuracy
_TERMINAL_LOG = ("WARNING", "accuracy budget", "output vs the original")


def _per_item_table(r: PassRecord) -> list[str]:
    """A pass's per-item statistics (keys `ITEM/metric`, e.g. cluster-weights' per-tensor bits
    and error) as a table, after a line with its other statistics; nothing when it has none."""
    items: dict[str, dict[str, int | float]] = {}
    for key, v in r.stats.items():
        item, sep, metric = key.rpartition("/")
        if sep and item:
            items.setdefault(item, {})[metric] = v
    if not items:
        return []
    summary = ", ".join(f"{k}={_fmt(v)}" for k, v in r.stats.items() if "/" not in k)
    cols = list(dict.fromkeys(m for row in items.values() for m in row))
    w = max(len(r.spec), *(len(i) for i in items))
    out = [f"  {r.spec}: {summary}", f"  {'':<{w}}  " + "  ".join(f"{c:>12}" for c in cols)]
    for item, row in items.items():
        out.append(f"  {item:<{w}}  " + "  ".join(f"{_fmt(row[c]) if c in row else '-':>12}" for c in cols))
    return out


def _finite(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None


def _sanitize(obj: Any) -> Any:
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj

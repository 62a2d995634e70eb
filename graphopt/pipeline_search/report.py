"""What a search leaves behind: the Pareto front as a table and a plot, pareto.json, best.toml.

    DIR/pareto.json   every trial (params, pipeline, state and reason, latency, size, accuracy,
                      feasibility, objectives), the front's trial numbers, the best, the references
    DIR/best.toml     a graphopt config: `graphopt-compile --config DIR/best.toml` compiles the
                      best pipeline again, to the same bytes
    DIR/best.onnx     (or DIR/best/ for a compiled target) the best trial's output, or -o's path
    DIR/pareto.png    objective vs accuracy, every trial, the front joined (needs matplotlib:
                      pip install 'graphopt[report]'; without it one line says so)

Everything is written by rename, so a search killed mid-write leaves the previous files whole.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from typing import Any

from graphopt.onnx_io import atomic_write
from graphopt.pipeline_search.study import Search, SearchResult, TrialRecord, line_of, reference_standing

NO_PLOT = "no plot: matplotlib is not installed (pip install 'graphopt[report]')"


def write_outputs(search: Search, res: SearchResult) -> None:
    d = res.directory
    best = res.best
    if best is not None:
        src = os.path.join(d, "trials", f"{best.number:04d}", "model.onnx" if search.kind == "onnx" else "model")
        out = search.s.output or os.path.join(d, "best.onnx" if search.kind == "onnx" else "best")
        rel = os.path.relpath(os.path.abspath(out), d)
        header = (f"graphopt-search: trial {best.number} of {search.model_path}: {best.label}\n"
                  f"{line_of(best, res.budget)}\n"
                  f"replay: graphopt-compile --config {os.path.join(d, 'best.toml')}")
        res.best_config = os.path.join(d, "best.toml")
        with atomic_write(res.best_config) as f:
            f.write(search.config_text(best.pipeline, rel, header).encode())
        if os.path.exists(src):
            _copy(src, out)
            res.best_output = out
    else:
        res.notes.append(f"no trial within the budget ({res.budget}) yet: no best.toml")
    doc = {
        "model": search.model_path,
        "eval_data": search.data_source,
        "target": search.s.target,
        "objective": res.objective,
        "budget": str(res.budget) if res.budget else None,
        "storage": search.s.storage or os.path.join(d, "study.db"),
        "space": {"base": search.space.base, "calibration": search.space.calibration,
                  "int8_groups": [{"index": g.index, "first": g.first, "last": g.last, "layers": list(g.names)}
                                  for g in search.space.groups]},
        "front": [t.number for t in res.front],
        "best": best.number if best else None,
        "references": {k: reference_standing(v, res.front, res.objective) | v.to_json() for k, v in res.references.items()},
        "trials": [t.to_json() for t in res.trials],
    }
    with atomic_write(os.path.join(d, "pareto.json")) as f:
        f.write(json.dumps(doc, indent=1).encode())
    plot = plot_front(res, os.path.join(d, "pareto.png"))
    if plot is None:
        res.notes.append(NO_PLOT)
    if not search.s.quiet:
        print(format_front(res), file=sys.stderr, flush=True)
    for n in res.notes[len(search.notes):]:
        search.say(n)


def _copy(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + ".tmp-graphopt"
    if os.path.isdir(src):
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    else:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _acc_text(t: TrialRecord, metric: str) -> str:
    v = t.accuracy.get(metric)
    if v is None:
        return "-"
    if metric == "cosine":
        return f"{v:.5f}"
    if metric == "sqnr":
        return "inf" if math.isinf(v) else f"{v:.1f} dB"
    return f"{v:.2f} %" if metric == "top1" else f"{v:.2f} pt" if metric == "accuracy-drop" else f"{v:.4f}"


def format_front(res: SearchResult) -> str:
    """The terminal table: the front (best first), then the references and a count of the rest."""
    metric = res.budget.metric if res.budget else "cosine"
    labelled = any("accuracy" in t.accuracy for t in res.trials)
    head = ["trial", "speed", "latency", "size", metric + (" changed" if metric == "top1" else "")]
    head += ["top-1 acc"] if labelled else []
    head += ["pipeline"]
    rows: list[list[str]] = []

    def row(name: str, t: TrialRecord) -> list[str]:
        speed = f"{t.speedup:.2f}x" + (f" ({t.confirmed_speedup:.2f}x)" if t.confirmed_speedup is not None else "")
        r = [name, speed, f"{t.latency_ms:.3f} ms", f"{(t.size or 0) / 1e6:.3f} MB ({(t.size or 0) / max(1, t.original_size or 1):.2f}x)",
             _acc_text(t, metric)]
        r += [f"{t.accuracy['accuracy'] * 100:.2f} %" if "accuracy" in t.accuracy else "-"] if labelled else []
        return r + [t.label]

    for t in res.front:
        rows.append(row(("* " if res.best is t else "  ") + str(t.number), t))
    for name, ref in res.references.items():
        if ref.state == "ok":
            st = reference_standing(ref, res.front, res.objective)
            dom, same = st["dominated_by"], st["matched_by"]
            verdict = (f"dominated by trial {', '.join(map(str, dom[:3]))}" if dom else
                       f"matched by trial {', '.join(map(str, same[:3]))} (the same model: equal size and accuracy)" if same
                       else "not dominated by the front")
            r = row("  " + name, ref)
            r[-1] = f"{ref.label}: {verdict}" + ("" if ref.feasible else "; over budget")
            rows.append(r)
        else:
            rows.append(["  " + name] + ["-"] * (len(head) - 2) + [f"{ref.state}: {ref.reason}"])
    states: dict[str, int] = {}
    for t in res.trials:
        states[t.state] = states.get(t.state, 0) + 1
    infeasible = sum(1 for t in res.trials if t.state == "ok" and not t.feasible)
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head) - 1)]
    title = (f"Pareto front: {res.objective} vs accuracy ({res.budget or 'no budget'}), {len(res.trials)} trials: "
             + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
             + (f" ({infeasible} over budget)" if infeasible else ""))
    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[-1]

    lines = [title, fmt(head)]
    lines.extend(fmt(r) for r in rows)
    if not res.front:
        lines.append("  (no trial within the budget yet)")
    if any(t.confirmed_speedup is not None for t in res.front):
        lines.append("  (in brackets: re-measured at the end with longer paired rounds; the best is the fastest of those)")
    if res.best is not None:
        lines.append(f"best (*): trial {res.best.number}; replay: graphopt-compile --config {res.best_config}"
                     + (f"; model: {res.best_output}" if res.best_output else ""))
    return "\n".join(lines)


def plot_front(res: SearchResult, path: str) -> str | None:
    """objective x accuracy loss, every measured trial, feasible ones filled, the front joined;
    None when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax: Any = fig.add_subplot()  # (matplotlib's Axes methods are untyped)
    ok = [t for t in res.trials if t.state == "ok" and t.objectives]
    def xs(ts: list[TrialRecord]) -> list[float]:
        return [(t.speedup or 0.0) if res.objective == "latency" else (t.size or 0) / 1e6 for t in ts]

    def ys(ts: list[TrialRecord]) -> list[float]:
        return [(t.objectives or [0.0, 0.0])[1] for t in ts]

    feas = [t for t in ok if t.feasible]
    bad = [t for t in ok if not t.feasible]
    ax.scatter(xs(bad), ys(bad), facecolors="none", edgecolors="tab:gray", label="over budget")
    ax.scatter(xs(feas), ys(feas), color="tab:blue", label="within budget")
    if res.front:
        ax.plot(xs(res.front), ys(res.front), "-o", color="tab:red", label="Pareto front")
    for name, ref in res.references.items():
        if ref.state == "ok" and ref.objectives:
            ax.scatter(xs([ref]), ys([ref]), marker="x", s=80, label=name)
    metric = res.budget.metric if res.budget else "cosine"
    ax.set_xlabel("speedup over the original (x)" if res.objective == "latency" else "size (MB)")
    ax.set_ylabel({"cosine": "1 - cosine", "top1": "top-1 predictions changed (%)", "sqnr": "-SQNR (dB)",
                   "rel": "relative error", "accuracy-drop": "top-1 accuracy drop (points)"}[metric])
    if metric == "cosine" and ok and all(y > 0 for y in ys(ok)):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{len(ok)} measured trials, budget {res.budget or 'none'}", fontsize=9)
    fig.tight_layout()
    ext = os.path.splitext(path)[1].lstrip(".") or "png"
    with atomic_write(path) as f:
        fig.savefig(f, format=ext, dpi=110)
    return path

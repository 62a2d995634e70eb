"""`--report out.html`: the compile report as one self-contained HTML file.

    html = render_html(report_dict)     # Report.to_dict() of the onnx target, or a cpu artifact's report

Sections, each present when the report carries its data: summary, before/after comparison
(--compare), pipeline with pass timings, node counts by op before/after, sizes, the per-layer
quantization table (status, reason, SQNR), pruning per group, clustering per weight, the kernel
profile (graphopt.profiler's JSON under `profile`, or rows {kernel, nodes, ms, share}) with its
time by schedule, the kernels against onnxruntime by ONNX node (`profile_compare`, from
graphopt-run --compare), verification and the log.

Charts are drawn by matplotlib (an optional extra: pip install 'graphopt[report]') as inline
SVG: no script, no network, the file opens anywhere. Without matplotlib the report has the
same tables and one line saying the charts are missing and why.
"""

from __future__ import annotations

import functools
import html
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

#: the bar colours (the browser test looks for these pixels to know a chart was drawn)
BLUE, ORANGE, GREY = "#1f77b4", "#ff7f0e", "#9a9a9a"
MAX_BARS = 30  # bars per chart; the tables below hold every row
NO_CHARTS = "charts need matplotlib, which is not installed: pip install 'graphopt[report]' (tables only)"


def is_html(path: str) -> bool:
    return path.lower().endswith((".html", ".htm"))


def charts_note() -> str | None:
    """One line when charts cannot be drawn here, else None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return NO_CHARTS
    return None


# ------------------------------------------------------------------------------------ charts


def _svg(draw: Callable[[Any], None], height: float, *, panels: int = 0) -> str:
    """A matplotlib figure 8 inches wide drawn by `draw(ax)` (with `panels`: `draw(axes)`, one
    row of that many), as an inline <svg> element. (matplotlib.figure.Figure, not pyplot: no
    global state, no GUI backend.)"""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, max(1.6, height)), dpi=96)
    axes = fig.subplots(1, panels, squeeze=False)[0] if panels else [fig.add_subplot()]
    draw(axes if panels else axes[0])
    for ax in axes:
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})  # (no timestamp: same report, same bytes)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    # scale with the page: drop the fixed size, keep the viewBox
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 width="100%"', svg, count=1)


def _hbar(labels: Sequence[str], series: Sequence[tuple[str, Sequence[float], str]], xlabel: str,
          annotate: Sequence[str] | None = None) -> str:
    """Horizontal bars, one group per label (top to bottom in the given order)."""
    import numpy as np

    n, k = len(labels), len(series)
    h = 0.8 / k

    def draw(ax: Any) -> None:
        y = np.arange(n)
        for j, (name, values, color) in enumerate(series):
            ax.barh(y + (j - (k - 1) / 2) * h, values, height=h, color=color, label=name)
        ax.set_yticks(y, [_short(s, 48) for s in labels], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        if k > 1:
            ax.legend(fontsize=8, loc="lower right")
        if annotate:
            top = max((max(v) for _, v, _ in series if len(v)), default=0) or 1
            for i, text in enumerate(annotate):
                ax.text(max(series[0][1][i], 0) + top * 0.01, i, text, va="center", fontsize=7)
            ax.set_xlim(0, top * 1.15)

    return _svg(draw, 0.6 + 0.22 * n * (1 if k == 1 else 1.4))


def _chart(name: str, make: Callable[[], str]) -> str:
    try:
        svg = make()
    except ImportError:
        return ""
    return f'<figure class="chart" data-chart="{_e(name)}">{svg}</figure>'


# ------------------------------------------------------------------------------------ html bits


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _short(s: str, n: int) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n // 2 - 1] + "…" + s[-(n - n // 2):]


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return f"{v:.{digits}g}"
    return str(v)


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]], *, num_cols: Iterable[int] = (),
           cls: str = "") -> str:
    nums = set(num_cols)
    out = [f'<table{f" class={cls}" if cls else ""}><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f'<td{" class=n" if i in nums else ""}>{c if isinstance(c, _Raw) else _e(c)}</td>'
                                     for i, c in enumerate(r)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _long(table: str, rows: int, what: str, limit: int = 40) -> str:
    """Long tables fold away (the chart above shows their gist)."""
    if rows <= limit:
        return table
    return f"<details><summary>{rows} {_e(what)}</summary>{table}</details>"


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


# ------------------------------------------------------------------------------------ sections


def _summary(r: Mapping[str, Any]) -> str:
    nodes = r.get("nodes") or {}
    size = r.get("size") or {}
    cards = []
    if nodes:
        cards.append(("nodes", f"{nodes.get('total_before', '–')} → {nodes.get('total_after', '–')}"))
    if size:
        cards.append(("size", f"{_bytes(size.get('before'))} → {_bytes(size.get('after'))}"))
    cmp = r.get("compare") or {}
    lat = cmp.get("latency")
    if lat:
        s = lat["speedup"]
        cards.append(("latency", f"{lat['original_ms']:.3g} → {lat['result_ms']:.3g} ms ({s:.2f}x)"))
    prof = r.get("profile")
    if isinstance(prof, Mapping) and isinstance(prof.get("latency_ms"), (int, float)):
        rows = profile_rows(r)
        cards.append(("profiled run", f"{prof['latency_ms']:.3g} ms end to end, {len(rows)} kernels"))
    bench = r.get("latency")
    if isinstance(bench, Mapping) and isinstance(bench.get("p50_ms"), (int, float)):
        cards.append(("latency (benchmark)", f"p50 {bench['p50_ms']:.3g} ms, p90 {bench.get('p90_ms', 0):.3g} ms"))
    v = r.get("verify")
    if isinstance(v, Mapping):
        cards.append(("verify", ("ok" if v.get("ok") else "FAILED") + f" (max abs {_num(v.get('max_abs'), 3)})"))
    secs = r.get("seconds")
    total = secs if isinstance(secs, (int, float)) else (secs or {}).get("wall")
    if total is not None:
        cards.append(("compile time", f"{total:.2f} s"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div></div>' for k, v in cards) + "</div>"


def _compare(c: Mapping[str, Any]) -> str:
    from graphopt.compare import table_rows

    rows: list[Sequence[Any]] = list(table_rows(c, _bytes, _change))
    lat, size, mem = c.get("latency"), c.get("size"), c.get("peak_memory")
    acc = c.get("accuracy") or {}
    metrics: tuple[tuple[str, str, Callable[[float], str]], ...] = (
        ("cosine", "cosine similarity", lambda x: f"{x:.6f}"),
        ("top1-agreement", "top-1 agreement", lambda x: f"{x * 100:.2f} %"),
        ("sqnr", "SQNR", lambda x: "∞" if math.isinf(x) else f"{x:.1f} dB"))
    for key, label, fmt in metrics:
        if acc.get(key) is not None:
            rows.append((label, "(reference)", fmt(acc[key]), "result vs original"))
    rt = c.get("runtime") or {}
    ins = ", ".join(f"{k}[{'×'.join(map(str, s))}]" for k, s in (c.get("inputs") or {}).items())
    body = (f'<p class="note">original on {_e(rt.get("original", "?"))}; result on {_e(rt.get("result", "?"))}; '
            f'inputs {_e(ins)}; accuracy on {_e(acc.get("data", "?"))}</p>')
    body += _table(("", "original", "result", "change"), rows, num_cols=(1, 2))
    panels: list[tuple[str, float, float]] = []
    if lat:
        panels.append(("latency (ms)", lat["original_ms"], lat["result_ms"]))
    if size:
        panels.append(("size (MB)", size["original"] / 1e6, size["result"] / 1e6))
    if mem and mem["original"].get("bytes") is not None and mem["result"].get("bytes") is not None:
        panels.append(("peak memory (MB)", mem["original"]["bytes"] / 1e6, mem["result"]["bytes"] / 1e6))
    if panels:
        def draw(axes: Any) -> None:
            for ax, (title, a, b) in zip(axes, panels):
                ax.bar(["original", "result"], [a, b], color=[GREY, BLUE], width=0.6)
                ax.set_title(title, fontsize=9)
                ax.tick_params(labelsize=8)
                for x, v in enumerate((a, b)):
                    ax.text(x, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
                ax.set_ylim(0, max(a, b) * 1.18 or 1)
        body += _chart("compare", lambda: _svg(draw, 2.4, panels=len(panels)))
    return body


def _change(a: float, b: float) -> str:
    return "–" if not a else f"{(b - a) / a * 100:+.1f} %"


def _passes(r: Mapping[str, Any]) -> str:
    passes = [p for p in r.get("passes") or [] if isinstance(p, Mapping)]
    body = f'<p class="pipeline"><code>{_e(r.get("pipeline") or "(empty)")}</code></p>'
    if passes:
        body += _chart("passes", lambda: _hbar(
            [f"{i + 1}. {p['pass']}" for i, p in enumerate(passes)],
            [("ms", [p.get("seconds", 0) * 1e3 for p in passes], BLUE)], "milliseconds",
            annotate=[f"{p.get('nodes_before')}→{p.get('nodes_after')}" + ("" if p.get("changed") else " (no change)")
                      for p in passes]))
        rows = []
        for p in passes:
            stats = ", ".join(f"{k}={_num(v)}" for k, v in (p.get("stats") or {}).items() if "/" not in k)
            rows.append((p["pass"], f"{p.get('seconds', 0) * 1e3:.2f}", f"{p.get('nodes_before')}→{p.get('nodes_after')}",
                         "yes" if p.get("changed") else "no", stats))
        body += _long(_table(("pass", "ms", "nodes", "changed", "statistics"), rows, num_cols=(1,)), len(rows),
                      "passes with their statistics", limit=12)
    stages = r.get("seconds")
    if isinstance(stages, Mapping) and stages:  # a compiled target: its stages
        body += _table(("stage", "seconds"), [(k, _num(v)) for k, v in stages.items()], num_cols=(1,))
    return body


def _nodes(r: Mapping[str, Any]) -> str:
    nodes = r.get("nodes") or {}
    before, after = nodes.get("before") or {}, nodes.get("after") or {}
    ops = sorted(set(before) | set(after), key=lambda o: (-max(before.get(o, 0), after.get(o, 0)), o))
    if not ops:
        return ""
    shown = ops[:MAX_BARS]
    body = _chart("nodes", lambda: _hbar(shown, [("before", [before.get(o, 0) for o in shown], GREY),
                                                 ("after", [after.get(o, 0) for o in shown], BLUE)], "nodes"))
    rows = [(o, before.get(o, 0), after.get(o, 0), "" if before.get(o, 0) == after.get(o, 0)
             else f"{after.get(o, 0) - before.get(o, 0):+d}") for o in sorted(ops)]
    rows.append((_Raw("<b>total</b>"), sum(before.values()), sum(after.values()), ""))
    return body + _long(_table(("op", "before", "after", "change"), rows, num_cols=(1, 2, 3)), len(rows), "op types",
                        limit=12)


def _quantize(q: Mapping[str, Any]) -> str:
    layers = [x for x in q.get("layers") or [] if isinstance(x, Mapping)]
    facts = [(k, q[k]) for k in ("result", "mode", "activations", "weights") if q.get(k)]
    cal = q.get("calibration")
    if isinstance(cal, Mapping):
        facts.append(("calibration", f"{cal.get('source')} ({cal.get('method')})"
                                     + (" — SYNTHETIC, not real data" if cal.get("synthetic") else "")))
    for k in ("speed", "accuracy"):
        if isinstance(q.get(k), Mapping):
            facts.append((k, ", ".join(f"{a}: {_num(b)}" for a, b in q[k].items() if not isinstance(b, (list, dict)))))
    body = _table(("", ""), facts, cls="kv")
    counts: dict[str, int] = {}
    for x in layers:
        counts[x.get("status", "?")] = counts.get(x.get("status", "?"), 0) + 1
    if counts:
        body += f'<p class="note">{len(layers)} units: {_e(", ".join(f"{v} {k}" for k, v in counts.items()))}</p>'
    sq = [x for x in layers if isinstance(x.get("sqnr_db"), (int, float))]
    if sq:
        top = sorted(sq, key=lambda x: x["sqnr_db"])[:MAX_BARS]  # the worst layers first: what a user checks
        body += _chart("quantize", lambda: _hbar([f"{x['name']} ({x['op']})" for x in top],
                                                 [("SQNR", [x["sqnr_db"] for x in top], ORANGE)],
                                                 "output SQNR of the layer in int8 (dB, higher is better; worst first)"))
    if layers:
        rows = [(x.get("name"), x.get("op"), x.get("status"), _num(x.get("sqnr_db")), _num(x.get("macs")),
                 x.get("reason", "")) for x in layers]
        body += _long(_table(("layer", "op", "status", "SQNR dB", "MACs", "reason"), rows, num_cols=(3, 4)),
                      len(rows), "layers")
    return body


def _prune_bars(top: Sequence[Mapping[str, Any]]) -> str:
    return _hbar([_group_label(g.get("layers") or []) for g in top],
                 [("removed %", [100 * g["pruned-units"] / max(1, g.get("units") or 1) for g in top], BLUE)],
                 "channels removed (%)")


def _prune(runs: Sequence[Mapping[str, Any]], passes: Sequence[Mapping[str, Any]]) -> str:
    body = ""
    stats = next((p.get("stats") for p in passes if str(p.get("pass", "")).startswith("prune")), None) or {}
    if stats:
        body += _table(("", ""), [(k, _num(v)) for k, v in stats.items()], cls="kv")
    for run in runs:
        groups = [g for g in run.get("groups") or [] if isinstance(g, Mapping)]
        pruned = [g for g in groups if g.get("pruned-units")]
        if pruned:
            top = sorted(pruned, key=lambda g: -g["pruned-units"] / max(1, g.get("units") or 1))[:MAX_BARS]
            body += _chart("prune", functools.partial(_prune_bars, top))
        rows = [(", ".join(g.get("layers") or []), g.get("channels"), g.get("units"),
                 g.get("pruned-units", 0) * (g.get("unit") or 1), "; ".join(map(str, g.get("blocked") or []))) for g in groups]
        body += _long(_table(("group (layers)", "channels", "units", "channels removed", "kept whole because"), rows,
                             num_cols=(1, 2, 3)), len(rows), "groups")
    return body


def _group_label(layers: Sequence[str]) -> str:
    return "?" if not layers else layers[0] + (f" (+{len(layers) - 1} more)" if len(layers) > 1 else "")


def _cluster(p: Mapping[str, Any]) -> str:
    items: dict[str, dict[str, Any]] = {}
    for key, v in (p.get("stats") or {}).items():
        item, sep, metric = key.rpartition("/")
        if sep and item:
            items.setdefault(item, {})[metric] = v
    summary = [(k, _num(v)) for k, v in (p.get("stats") or {}).items() if "/" not in k]
    body = _table(("", ""), summary, cls="kv")
    if not items:
        return body
    withsq = [(k, v) for k, v in items.items() if isinstance(v.get("sqnr-db"), (int, float)) and math.isfinite(v["sqnr-db"])]
    if withsq:
        top = sorted(withsq, key=lambda kv: kv[1]["sqnr-db"])[:MAX_BARS]
        body += _chart("cluster", lambda: _hbar([k for k, _ in top], [("SQNR", [v["sqnr-db"] for _, v in top], ORANGE)],
                                                "weight SQNR after clustering (dB, worst first)",
                                                annotate=[f"{_num(v.get('bits'))} bits" for _, v in top]))
    cols = list(dict.fromkeys(m for row in items.values() for m in row))
    rows = [(k, *(_num(v.get(c)) for c in cols)) for k, v in items.items()]
    return body + _long(_table(("weight", *cols), rows, num_cols=range(1, len(cols) + 1)), len(rows), "weights")


def profile_rows(r: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The kernel profile's rows: `profile` as a list, or a dict holding `rows` / `kernels`."""
    prof = r.get("profile")
    if isinstance(prof, Mapping):
        prof = prof.get("rows") or prof.get("kernels")
    return [x for x in prof if isinstance(x, Mapping) and "ms" in x] if isinstance(prof, list) else []


def _profile(rows: Sequence[Mapping[str, Any]], meta: Any = None) -> str:
    """graphopt.profiler's rows (graphopt-run --profile, graphopt-compile --profile): what was
    measured, the slowest kernels as bars (labelled by their ONNX nodes), the time by schedule
    (where a generic fallback shows), and every row."""
    meta = meta if isinstance(meta, Mapping) else {}
    total = sum(float(x["ms"]) for x in rows) or 1.0
    def share(x: Mapping[str, Any]) -> float:
        return float(x["share"]) if isinstance(x.get("share"), (int, float)) else 100 * float(x["ms"]) / total

    body = ""
    if meta:
        peak = meta.get("peak") if isinstance(meta.get("peak"), Mapping) else {}
        lat = meta.get("latency_ms")
        body += (f'<p class="note">{_e(meta.get("runtime", ""))}: {_e(meta.get("source", ""))}, {_e(meta.get("threads", "?"))} '
                 f'threads · {len(rows)} kernels, sum {total:.3f} ms'
                 + (f"; end-to-end {lat:.3f} ms (median)" if isinstance(lat, (int, float)) else "")
                 + f' · {_e(meta.get("timing", ""))}' + (f' · peak: {_e(peak.get("how"))}' if peak else "") + "</p>")
        body += "".join(f'<p class="note">note: {_e(n)}</p>' for n in meta.get("notes") or [])

    def label(x: Mapping[str, Any]) -> str:
        nodes = x.get("nodes") if isinstance(x.get("nodes"), list) else []
        first = _short(str(nodes[0]), 30) + (f" +{len(nodes) - 1}" if len(nodes) > 1 else "") if nodes else ""
        return f"{x.get('kernel')}  {first}".rstrip()

    def note(x: Mapping[str, Any]) -> str:
        rate = f" · {x['gflops']:.0f} GFLOP/s" if isinstance(x.get("gflops"), (int, float)) else ""
        return f"{share(x):.1f} %{rate}"

    top = sorted(rows, key=lambda x: -float(x["ms"]))[:MAX_BARS]
    body += _chart("profile", lambda: _hbar([label(x) for x in top], [("ms", [float(x["ms"]) for x in top], BLUE)],
                                            f"median milliseconds per run (the {len(top)} slowest of {len(rows)} kernels)",
                                            annotate=[note(x) for x in top]))
    by_sched: dict[str, list[float]] = {}
    for x in rows:
        if x.get("schedule"):
            by_sched.setdefault(str(x["schedule"]), []).append(float(x["ms"]))
    if len(by_sched) > 1:  # where the time goes by how kernels were scheduled (a generic fallback stands out)
        kinds = sorted(by_sched, key=lambda k: -sum(by_sched[k]))[:MAX_BARS]
        body += _chart("profile-schedules", lambda: _hbar(
            kinds, [("ms", [sum(by_sched[k]) for k in kinds], ORANGE)], "milliseconds per run, by schedule",
            annotate=[f"{100 * sum(by_sched[k]) / total:.1f} % · {len(by_sched[k])} kernels" for k in kinds]))
    known = ("index", "kernel", "nodes", "ops", "flops", "ms", "share", "gflops", "peak_pct", "schedule", "role", "int8")
    extra = [k for k in dict.fromkeys(k for x in rows for k in x) if k not in known]
    cols = [c for c in ("ops", "flops") if any(x.get(c) for x in rows)]
    tail = [c for c in ("gflops", "peak_pct", "schedule") if any(x.get(c) not in (None, "") for x in rows)]
    names = {"ops": "ops", "flops": "FLOPs", "gflops": "GFLOP/s", "peak_pct": "% peak", "schedule": "schedule"}

    def cell(x: Mapping[str, Any], c: str) -> Any:
        v = x.get(c)
        if c == "ops":
            return ",".join(v) if isinstance(v, list) else (v or "")
        if c in ("gflops", "peak_pct"):
            return f"{v:.1f}" if isinstance(v, (int, float)) else "–"
        if c == "flops":
            return f"{v / 1e6:.1f} M" if isinstance(v, (int, float)) and v else "–"
        return _num(v) if v is not None else ""

    table_rows = [(x.get("kernel"), _short(", ".join(x["nodes"]) if isinstance(x.get("nodes"), list) else x.get("nodes", ""), 120),
                   *(cell(x, c) for c in cols), f"{float(x['ms']):.3f}", f"{share(x):.1f}",
                   *(cell(x, c) for c in tail), *(_num(x.get(k)) for k in extra)) for x in rows]
    head = ("kernel", "ONNX nodes", *(names[c] for c in cols), "ms", "%", *(names[c] for c in tail), *extra)
    first_num = 2 + len(cols) - (1 if "flops" in cols else 0)
    nums = [i for i in range(first_num, len(head)) if head[i] not in ("schedule", *extra)]
    return body + _long(_table(head, table_rows, num_cols=nums), len(rows), "kernels")


def _profile_compare(c: Mapping[str, Any]) -> str:
    """graphopt-run ARTIFACT --compare MODEL.onnx: kernel time against onnxruntime's, by ONNX node."""
    t = c.get("totals") or {}
    rows = [r for r in c.get("rows") or [] if isinstance(r, Mapping)]
    body = (f'<p class="note">kernels: {_num(t.get("graphopt_ms"))} ms (graphopt) vs {_num(t.get("onnxruntime_ms"))} ms '
            f'(onnxruntime), {_num(t.get("ratio"), 3)}x; end-to-end {_num(t.get("graphopt_latency_ms"))} vs '
            f'{_num(t.get("onnxruntime_latency_ms"))} ms</p>')
    top = sorted(rows, key=lambda r: -max(r.get("graphopt_ms") or 0.0, r.get("onnxruntime_ms") or 0.0))[:MAX_BARS]

    def label(r: Mapping[str, Any]) -> str:
        nodes = list(r.get("nodes") or [])
        return (_short(str(nodes[0]), 36) + (f" +{len(nodes) - 1}" if len(nodes) > 1 else "")) if nodes else "(layout)"

    body += _chart("profile-compare", lambda: _hbar(
        [label(r) for r in top], [("graphopt", [r.get("graphopt_ms") or 0.0 for r in top], BLUE),
                                  ("onnxruntime", [r.get("onnxruntime_ms") or 0.0 for r in top], GREY)],
        "milliseconds per run, by ONNX node"))
    table_rows = [(_short(", ".join(r.get("nodes") or []), 100), ",".join(r.get("ops") or []), _num(r.get("graphopt_ms")),
                   _num(r.get("onnxruntime_ms")), _num(r.get("ratio"), 3), ", ".join(r.get("kernels") or []))
                  for r in rows]
    return body + _long(_table(("ONNX nodes", "ops", "graphopt ms", "onnxruntime ms", "ratio", "kernels"), table_rows,
                               num_cols=(2, 3, 4)), len(rows), "rows")


def _verify(v: Mapping[str, Any]) -> str:
    rows = [(k, _num(v.get(k))) for k in ("ok", "max_abs", "max_rel", "rtol", "atol", "inputs", "detail") if k in v]
    if v.get("shapes"):
        rows.append(("input shapes", ", ".join(f"{k}[{'×'.join(map(str, s))}]" for k, s in v["shapes"].items())))
    if v.get("noise"):
        rows.append(("onnxruntime's own noise (optimizations on vs off)", ", ".join(f"{k}: {_num(x, 3)}" for k, x in v["noise"].items())))
    if v.get("thresholds"):
        rows.append(("--verify-metric", ", ".join(v["thresholds"])))
        rows.extend((k, _num(x)) for k, x in (v.get("metrics") or {}).items())
    return _table(("", ""), rows, cls="kv")


def _kv(d: Mapping[str, Any]) -> str:
    rows = [(k, _num(v) if not isinstance(v, (dict, list)) else _short(str(v), 200)) for k, v in d.items()]
    return _table(("", ""), rows, cls="kv")


# ------------------------------------------------------------------------------------ page

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9}
header{background:#fff;border-bottom:1px solid #ddd;padding:16px 28px}
header h1{font-size:20px;margin:0 0 4px}header .sub{color:#555;font-size:13px}
main{padding:8px 28px 40px;max-width:1100px}
section{background:#fff;border:1px solid #e1e3e6;border-radius:8px;padding:12px 18px;margin:14px 0}
h2{font-size:16px;margin:4px 0 10px}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0;width:100%}
th,td{border-bottom:1px solid #eee;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#fafafa;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.kv td:first-child{color:#555;width:28%}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #e1e3e6;border-radius:8px;padding:8px 14px;min-width:150px}
.card .k{color:#666;font-size:12px}.card .v{font-size:16px;font-weight:600}
.note{color:#555;font-size:12.5px}.warn{color:#a33;font-weight:600}
figure.chart{margin:6px 0 10px}figure.chart svg{max-width:100%;height:auto}
code{font-size:12px;word-break:break-all}ul.log{font-size:12.5px;font-family:ui-monospace,monospace;padding-left:18px}
nav a{margin-right:12px;font-size:13px}
"""


def render_html(r: Mapping[str, Any]) -> str:
    """The report dict (either target's) as one HTML page."""
    passes = [p for p in r.get("passes") or [] if isinstance(p, Mapping)]
    sections: list[tuple[str, str, str]] = []  # (anchor, title, body)
    if r.get("compare"):
        sections.append(("compare", "Before / after", _compare(r["compare"])))
    # the profile early: it is what "why is my model slow" looks for
    rows = profile_rows(r)
    if rows:
        sections.append(("profile", "Kernel profile", _profile(rows, r.get("profile"))))
    if isinstance(r.get("profile_compare"), Mapping):
        sections.append(("profile-compare", "Kernels vs onnxruntime, by ONNX node", _profile_compare(r["profile_compare"])))
    sections.append(("pipeline", "Pipeline and timings", _passes(r)))
    nodes = _nodes(r)
    if nodes:
        sections.append(("nodes", "Nodes by op type", nodes))
    size = r.get("size")
    if isinstance(size, Mapping) and size:
        sections.append(("size", "Size", _table(("", "bytes", ""), [
            ("before", size.get("before"), _bytes(size.get("before"))),
            ("after", size.get("after"), _bytes(size.get("after")))], num_cols=(1, 2), cls="kv")))
    if isinstance(r.get("quantize"), Mapping):
        sections.append(("quantize", "Quantization per layer", _quantize(r["quantize"])))
    if isinstance(r.get("prune"), list) and r["prune"]:
        sections.append(("prune", "Pruning per group", _prune(r["prune"], passes)))
    for p in passes:
        if str(p.get("pass", "")).startswith("cluster-weights"):
            sections.append(("cluster", "Clustering per weight", _cluster(p)))
    for key, title in (("kernels", "Kernels"), ("schedules", "Schedules"), ("tuning", "Tuning")):
        if isinstance(r.get(key), Mapping) and r[key]:
            sections.append((key, title, _kv(r[key])))
    if isinstance(r.get("verify"), Mapping):
        sections.append(("verify", "Verification", _verify(r["verify"])))
    log = [str(x) for x in r.get("log") or []] + [f"warning: {w}" for w in r.get("warnings") or []]
    if log:
        sections.append(("log", "Log", '<ul class="log">' + "".join(f"<li>{_e(x)}</li>" for x in log) + "</ul>"))
    note = charts_note()
    status = r.get("status", "ok")
    head = (f'<header><h1>graphopt: {_e(r.get("model", "?"))} → {_e(r.get("output") or "(no output)")}</h1>'
            f'<div class="sub">target {_e(r.get("target", "?"))} · status '
            f'<span class="{"" if status == "ok" else "warn"}">{_e(status)}</span>'
            f' · graphopt {_e(r.get("graphopt_version", "?"))}</div></header>')
    nav = "<nav>" + "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections) + "</nav>"
    body = _section("Summary", _summary(r) + (f'<p class="warn">{_e(note)}</p>' if note else "") + nav, "summary")
    body += "".join(_section(t, b, a) for a, t, b in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>graphopt report: '
            f'{_e(r.get("model", ""))}</title><style>{_CSS}</style></head><body>{head}<main>{body}</main></body></html>\n')

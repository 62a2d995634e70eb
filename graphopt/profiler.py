"""Per-kernel profiles of a compiled artifact and of an .onnx model on onnxruntime, and the two
lined up by ONNX node (`graphopt-run ARTIFACT --profile`, `graphopt-run MODEL.onnx --profile`,
`graphopt-run ARTIFACT --compare MODEL.onnx`).

    runner = graphopt.runtime.load("out/")
    prof = profile_artifact(runner, feeds)        # Profile: one row per kernel call, in call order
    ref = profile_onnx("model.onnx", feeds, threads=2)
    print(format_profile(prof), format_compare(compare(prof, ref)))

Artifact rows: each kernel call of `main` timed alone on its real arguments by TVM's
time_evaluator (`Runner.profile_kernels`), joined with the manifest's `kernel_map` (the ONNX
nodes, op types, multiply-add FLOPs and schedule that the compiler recorded). onnxruntime rows:
its own profiler (`SessionOptions.enable_profiling`: the `*_kernel_time` of every node, median
over the profiled runs); its fused nodes (FusedConv, NCHWc convs...) are traced back to the
original ONNX nodes through the optimized graph it saves (`optimized_model_filepath`).

Peak: threads x FMA units x fp32 lanes x 2 FLOPs per cycle x clock (the machine model the
manifest records, the clock read from cpufreq's maximum or /proc/cpuinfo's "cpu MHz"); int8
kernels against the int8 dot-product rate (4x fp32 with VNNI/dotprod, 2x with AVX2's
vpmaddubsw). A clock the OS under-reports (a VM's nominal one, turbo) can give over 100 %.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np

from graphopt.errors import UsageError

__all__ = ["Peak", "Row", "Profile", "machine_peak", "profile_artifact", "profile_onnx", "compare",
           "format_profile", "format_compare", "onnx_node_flops"]

#: int8 multiply-adds per fp32 FMA lane, by the machine model's int8 instruction
INT8_RATE = {"avx512-vnni": 4, "avx-vnni": 4, "dotprod": 4, "i8mm": 8, "avx2": 2, "neon": 2}


@dataclass
class Peak:
    gflops: float  # fp32
    int8_gops: float | None
    how: str  # how it was derived, one line


@dataclass
class Row:
    index: int  # call order (0 first)
    kernel: str
    nodes: list[str]
    ops: list[str]
    flops: int | None  # multiply-add FLOPs (None: unknown)
    ms: float  # median
    share: float = 0.0  # % of the profile's total
    gflops: float | None = None
    peak_pct: float | None = None
    schedule: str = ""
    role: str = "kernel"  # kernel | inline | layout | branch (cpu target) | node (onnxruntime)
    int8: bool = False


@dataclass
class Profile:
    source: str
    runtime: str
    threads: int
    timing: str  # what each row's time is, one line
    rows: list[Row]
    latency_ms: float | None  # end-to-end median of whole runs
    peak: Peak | None
    notes: list[str] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        return sum(r.ms for r in self.rows)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Profile":
        """The inverse of `to_json` (a report's `profile` section back into a Profile)."""
        peak = d.get("peak")
        return cls(source=str(d.get("source", "")), runtime=str(d.get("runtime", "")), threads=int(d.get("threads") or 0),
                   timing=str(d.get("timing", "")), rows=[Row(**r) for r in d.get("rows") or []],
                   latency_ms=d.get("latency_ms"), peak=Peak(**peak) if isinstance(peak, Mapping) else None,
                   notes=list(d.get("notes") or []))

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "runtime": self.runtime, "threads": self.threads, "timing": self.timing,
                "latency_ms": self.latency_ms, "kernel_total_ms": self.total_ms,
                "peak": asdict(self.peak) if self.peak else None, "notes": self.notes,
                "rows": [asdict(r) for r in self.rows]}


# --------------------------------------------------------------------------- peak


def cpu_clock_ghz() -> tuple[float | None, str]:
    """This machine's CPU clock in GHz and where it was read (cpufreq's maximum, else the highest
    'cpu MHz' of /proc/cpuinfo), or (None, why)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", encoding="ascii") as f:
            return int(f.read().strip()) / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.lower().startswith("cpu mhz")]
        if mhz:
            return max(mhz) / 1e3, "/proc/cpuinfo cpu MHz"
    except (OSError, ValueError, IndexError):
        pass
    return None, "no clock reported by the OS"


def machine_peak(machine: Mapping[str, Any] | None, threads: int, *, peak_gflops: float | None = None) -> Peak | None:
    """The fp32 (and int8) peak of `threads` cores of `machine` (a MachineModel's JSON, as the
    manifest records it) at this machine's clock; `peak_gflops` overrides the fp32 figure."""
    lanes = int(machine.get("lanes_fp32") or 0) if machine else 0
    fma = int(machine.get("fma_units") or 0) if machine else 0
    rate = INT8_RATE.get(str(machine.get("int8_dot"))) if machine else None
    if peak_gflops is not None:
        return Peak(float(peak_gflops), float(peak_gflops) * rate if rate else None, "given (--peak-gflops)")
    if not lanes or not fma or not machine:
        return None
    ghz, src = cpu_clock_ghz()
    if ghz is None:
        return None
    cores = max(1, min(threads, os.cpu_count() or threads))
    per_cycle = fma * lanes * 2
    gflops = cores * per_cycle * ghz
    how = (f"{cores} core{'s' if cores > 1 else ''} x {fma} FMA unit{'s' if fma > 1 else ''} x {lanes} fp32 lanes x 2 x "
           f"{ghz:.2f} GHz ({src}) = {gflops:.0f} GFLOP/s "
           f"fp32 [{machine.get('mcpu')}]")
    if rate:
        how += f"; int8 x{rate} ({machine.get('int8_dot')})"
    return Peak(gflops, gflops * rate if rate else None, how)


def host_machine() -> dict[str, Any] | None:
    """The machine model of this host's CPU as JSON (None without TVM: it says what LLVM knows)."""
    try:
        import tvm

        from graphopt.targets.machine import machine_model
    except ImportError:
        return None
    spec = {"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()),
            "mtriple": str(tvm.target.codegen.llvm_get_system_triple())}
    model: dict[str, Any] = machine_model(spec).to_json()
    return model


def _rate(row: Row, peak: Peak | None) -> None:
    if row.flops and row.ms > 0:
        row.gflops = row.flops / row.ms / 1e6
        top = (peak.int8_gops if row.int8 else peak.gflops) if peak else None
        if top:
            row.peak_pct = 100 * row.gflops / top


def _shares(rows: list[Row]) -> None:
    total = sum(r.ms for r in rows)
    for r in rows:
        r.share = 100 * r.ms / total if total else 0.0


# --------------------------------------------------------------------------- artifact


def _eval_flops(expr: Any, dims: Mapping[str, Sequence[int]], shapes: Sequence[Any]) -> int | None:
    """A kernel_map FLOPs entry on one call's argument shapes (an int, or arithmetic over shape
    variables that `dims` locates as [argument, dim])."""
    if isinstance(expr, int):
        return expr
    if not isinstance(expr, str):
        return None
    env = {}
    for name, (arg, dim) in dims.items():
        try:
            env[name] = int(shapes[arg][dim])
        except (IndexError, TypeError, ValueError):
            return None
    from graphopt.runtime import eval_dim_expr

    try:
        return eval_dim_expr(expr, env)
    except (ValueError, ZeroDivisionError):
        return None


def profile_artifact(runner: Any, feeds: Mapping[str, Any], *, repeat: int = 5, cold: bool = False,
                     cpu_time: bool = False, peak_gflops: float | None = None, latency_runs: int = 20) -> Profile:
    """Profile of a loaded artifact (graphopt.runtime.load) on `feeds`: one row per kernel call of
    `main`, in call order (see the module docstring)."""
    m = runner.manifest
    where = getattr(getattr(runner, "artifact", None), "path", "artifact")
    if not hasattr(runner, "profile_kernels"):
        raise UsageError(f"{where}: per-kernel profiling needs the artifact's Relax VM in this process; a "
                         f"{m['target']['name']} artifact runs here under emulation (its timings would be "
                         "emulated code's): profile it on its own hardware")
    latency = runner.benchmark(feeds, warmup=3, repeat=latency_runs)["p50_ms"]
    calls = runner.profile_kernels(feeds, repeat=repeat, cold=cold, cpu_time=cpu_time)
    kmap = [e for e in m.get("kernel_map") or [] if isinstance(e, dict)]
    notes = [] if kmap else ["the manifest has no kernel_map (compiled by an older graphopt): no ONNX nodes, "
                             "FLOPs or schedules; recompile to get them"]
    queue: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in kmap:
        queue[str(e.get("kernel"))].append(e)
    last: dict[str, dict[str, Any]] = {}
    target = m.get("target", {})
    peak = machine_peak(target.get("machine"), runner.threads, peak_gflops=peak_gflops)
    if peak is None:
        notes.append(f"no peak for target {target.get('name')} (no CPU machine model or clock): give --peak-gflops")
    rows = []
    for i, c in enumerate(calls):
        k = c["kernel"]
        e = queue[k].pop(0) if queue[k] else last.get(k, {})  # (a kernel called more often than mapped)
        last[k] = e
        flops = _eval_flops(e.get("flops"), e.get("dims") or {}, c["shapes"]) if e else None
        row = Row(index=i, kernel=k, nodes=list(e.get("nodes", [])), ops=list(e.get("ops", [])), flops=flops or None,
                  ms=statistics.median(c["seconds"]) * 1e3, schedule=str(e.get("schedule", "")),
                  role=str(e.get("role", "kernel")), int8=bool(e.get("int8", False)))
        _rate(row, peak)
        rows.append(row)
    _shares(rows)
    idle = [e for q in queue.values() for e in q if e.get("role") != "branch"]
    untaken = sum(1 for q in queue.values() for e in q if e.get("role") == "branch")
    if untaken:
        notes.append(f"{untaken} kernel call{'s' if untaken > 1 else ''} of run-time If branches not taken on these inputs")
    if idle:  # (a reshape kernel the build turned into a view, for one)
        names = ", ".join(f"{e.get('kernel')} ({_names(e.get('nodes') or [], 40)})" for e in idle[:4])
        notes.append(f"{len(idle)} kernel{'s' if len(idle) > 1 else ''} of the kernel_map did not run (the build made "
                     f"them views or dropped them): {names}{', ...' if len(idle) > 4 else ''}")
    if cpu_time:
        timing = f"CPU seconds of this process per kernel call (median of {repeat})"
    elif cold:
        timing = f"TVM time_evaluator per kernel call, caches flushed but the first argument (median of {repeat})"
    else:
        timing = f"TVM time_evaluator per kernel call on its real arguments, warm caches (median of {repeat})"
    dev = "cuda" if target.get("name") == "cuda" else "cpu"
    return Profile(source=str(where), runtime=f"graphopt {target.get('name')} artifact (TVM Relax VM, {dev})",
                   threads=runner.threads, timing=timing, rows=rows, latency_ms=latency, peak=peak, notes=notes)


# --------------------------------------------------------------------------- onnxruntime


def onnx_node_flops(model: Any, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Multiply-add FLOPs (2 x MACs) of the Conv, ConvTranspose, MatMul, Gemm nodes of an ONNX
    model, by node name, with the inputs fixed to `shapes` (onnx shape inference)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name in shapes and vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            for d, n in zip(dims, shapes[vi.name]):
                d.Clear()
                d.dim_value = int(n)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # noqa: BLE001 - a model shape inference refuses: no FLOPs, still a profile
        return {}
    known: dict[str, list[int]] = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            known[vi.name] = [d.dim_value for d in t.shape.dim]
    for init in m.graph.initializer:
        known[init.name] = list(init.dims)
    out: dict[str, int] = {}
    for n in m.graph.node:
        ins = [known.get(x) for x in n.input]
        o = known.get(n.output[0]) if n.output else None
        try:
            if n.op_type in ("Conv", "ConvTranspose") and ins[1] and o and ins[0]:
                w = ins[1]
                if n.op_type == "Conv":  # each output element: C/group x kernel MACs
                    out[_key(n)] = 2 * int(np.prod(o)) * int(np.prod(w[1:]))
                else:  # each input element: Cout/group x kernel MACs
                    out[_key(n)] = 2 * int(np.prod(ins[0])) * int(np.prod(w[1:]))
            elif n.op_type == "MatMul" and ins[0] and o:
                out[_key(n)] = 2 * int(np.prod(o)) * int(ins[0][-1])
            elif n.op_type == "Gemm" and ins[0] and o:
                trans_a = next((a.i for a in n.attribute if a.name == "transA"), 0)
                out[_key(n)] = 2 * int(np.prod(o)) * int(ins[0][0] if trans_a else ins[0][-1])
        except (IndexError, TypeError):
            continue
    return out


def _key(n: Any) -> str:
    """How a profile names an ONNX node: its name, else as graphopt labels an unnamed node."""
    return n.name or (f"{n.op_type} -> {n.output[0]!r}" if n.output else n.op_type)


def _ort_cover(original: Any, optimized: Any) -> dict[str, list[str]]:
    """The original ONNX nodes each node of onnxruntime's optimized graph computes: the producers
    of the original values it outputs, and upstream of them every original node whose output the
    optimized graph no longer holds (fused into it). ORT's NCHWc nodes output values of their own
    (`reorder_token_N`) and are named after the original value they compute (`<value>_nchwc`);
    the ReorderOutput that converts it back then claims nothing (a layout change, like ours)."""
    producer = {o: n for n in original.graph.node for o in n.output if o}
    claims: dict[int, list[str]] = {}
    by_name: set[str] = set()
    for k, n in enumerate(optimized.graph.node):
        hint = n.name.removesuffix("_nchwc") if n.name.endswith("_nchwc") else None
        if hint is not None and hint in producer:
            claims[k] = [hint]
            by_name.add(hint)
    for k, n in enumerate(optimized.graph.node):
        if k not in claims:
            claims[k] = [o for o in (x.removesuffix("_nchwc") for x in n.output) if o in producer and o not in by_name]
    avail = {v for c in claims.values() for v in c} | {i.name for i in optimized.graph.initializer} \
        | {i.name for i in original.graph.input}
    owner: dict[str, int] = {_key(producer[v]): k for k, c in claims.items() for v in c}
    for n in original.graph.node:  # an elementwise epilogue goes with its producer (Conv+Add+Relu)
        if _key(n) not in owner and n.op_type in _EPILOGUE and not any(o in avail for o in n.output):
            p = next((producer[i] for i in n.input if i in producer), None)
            if p is not None and _key(p) in owner:
                owner[_key(n)] = owner[_key(p)]
    for k in claims:  # the rest with the node that reads it (Conv→BatchNormalization→Relu)
        stack = [producer[v] for v in claims[k]]
        while stack:
            p = stack.pop()
            for i in p.input:
                q = producer.get(i)
                if q is not None and i not in avail and _key(q) not in owner:
                    owner[_key(q)] = k
                    stack.append(q)
    cover: dict[str, list[str]] = {n.name: [] for n in optimized.graph.node}
    for n in original.graph.node:
        if _key(n) in owner:
            cover[optimized.graph.node[owner[_key(n)]].name].append(_key(n))
    return cover


#: ops onnxruntime fuses into the kernel before them (the epilogue of a Conv, Gemm, MatMul)
_EPILOGUE = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid",
                       "HardSwish", "Erf", "Gelu", "FastGelu", "Elu", "Selu", "Softplus", "PRelu", "Identity",
                       "BatchNormalization", "Cast"})


def profile_onnx(path: str, feeds: Mapping[str, Any], *, threads: int | None = None, repeat: int = 20,
                 peak_gflops: float | None = None) -> Profile:
    """onnxruntime's per-node profile of .onnx file `path` on `feeds` (CPUExecutionProvider, all
    graph optimizations): one row per node it runs, in run order, median over `repeat` runs."""
    import onnx

    from graphopt.runtime import load_onnx

    with tempfile.TemporaryDirectory(prefix="graphopt-ort-profile-") as tmp:
        runner = load_onnx(path, threads=threads, profile_dir=tmp)
        for _ in range(2 + repeat):  # (two warm-up runs: their events are dropped)
            runner.run(feeds)
        trace = runner.session.end_profiling()
        with open(trace, encoding="utf-8") as f:
            events = json.load(f)
        optimized = onnx.load(os.path.join(tmp, "optimized.onnx"), load_external_data=False)
    original = onnx.load(path, load_external_data=False)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    runs = runs[-repeat:]
    per: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(runs))
    first: dict[str, int] = {}
    kind: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        ts = e["ts"]
        for r, (a, b) in enumerate(runs):
            if a <= ts <= b:
                name = e["name"][: -len("_kernel_time")]
                per[name][r] += e["dur"] / 1e3
                first.setdefault(name, ts - a)
                args = e.get("args", {})
                kind[name] = f"{args.get('op_name', '?')} ({str(args.get('provider', '')).replace('ExecutionProvider', '')})"
                break
    cover = _ort_cover(original, optimized)
    op_of = {_key(n): n.op_type for n in original.graph.node}
    node_flops = onnx_node_flops(original, {k: np.asarray(v).shape for k, v in feeds.items()})
    peak = machine_peak(host_machine(), runner.threads, peak_gflops=peak_gflops)
    rows = []
    for i, name in enumerate(sorted(per, key=lambda n: first[n])):
        nodes = cover.get(name, [])
        flops = sum(node_flops.get(n, 0) for n in nodes) or None
        ops = list(dict.fromkeys(op_of.get(n, "?") for n in nodes))
        row = Row(index=i, kernel=name, nodes=nodes, ops=ops, flops=flops, ms=statistics.median(per[name]),
                  schedule=kind.get(name, ""), role="node")
        _rate(row, peak)
        rows.append(row)
    _shares(rows)
    lat = statistics.median(b - a for a, b in runs) / 1e3 if runs else None
    notes = [] if peak else ["no peak (no machine model without TVM, or no clock): give --peak-gflops"]
    return Profile(source=path, runtime="onnxruntime (CPUExecutionProvider, ORT_ENABLE_ALL)", threads=runner.threads,
                   timing=f"onnxruntime's profiler, node kernel time in whole runs (median of {len(runs)})",
                   rows=rows, latency_ms=lat, peak=peak, notes=notes)


# --------------------------------------------------------------------------- comparison


def compare(ours: Profile, ref: Profile) -> dict[str, Any]:
    """Both profiles lined up by ONNX node: the kernels and onnxruntime nodes that share ONNX nodes
    form one row (usually one kernel against one fused onnxruntime node), in our call order; rows
    of one side only list what the other side has none of (layout changes, ORT's reorders)."""
    import networkx as nx

    g = nx.Graph()
    for r in ours.rows:
        g.add_node(("g", r.index))
        for n in r.nodes:
            g.add_edge(("g", r.index), ("n", n))
    for r in ref.rows:
        g.add_node(("o", r.index))
        for n in r.nodes:
            g.add_edge(("o", r.index), ("n", n))
    by_g = {r.index: r for r in ours.rows}
    by_o = {r.index: r for r in ref.rows}
    rows = []
    for comp in nx.connected_components(g):
        gs = sorted((by_g[i] for k, i in comp if k == "g"), key=lambda r: r.index)
        os_ = sorted((by_o[i] for k, i in comp if k == "o"), key=lambda r: r.index)
        nodes = [n for _, n in sorted((k, n) for k, n in comp if k == "n")]
        # (onnxruntime's side names the original model's nodes: those first)
        order = {n: j for j, n in reversed(list(enumerate(n for r in os_ + gs for n in r.nodes)))}
        nodes.sort(key=lambda n: order.get(n, len(order)))
        tg, to = sum(r.ms for r in gs), sum(r.ms for r in os_)
        rows.append({"nodes": nodes, "ops": list(dict.fromkeys(o for r in (gs or os_) for o in r.ops)),
                     "kernels": [r.kernel for r in gs], "onnxruntime_nodes": [r.kernel for r in os_],
                     "graphopt_ms": tg if gs else None, "onnxruntime_ms": to if os_ else None,
                     "ratio": tg / to if gs and os_ and to > 0 else None,
                     "_key": (gs[0].index if gs else 10**9, os_[0].index if os_ else 0)})
    rows.sort(key=lambda r: cast("tuple[int, int]", r.pop("_key")))
    tg, to = ours.total_ms, ref.total_ms
    return {"graphopt": ours.to_json(), "onnxruntime": ref.to_json(), "rows": rows,
            "totals": {"graphopt_ms": tg, "onnxruntime_ms": to, "ratio": tg / to if to else None,
                       "graphopt_latency_ms": ours.latency_ms, "onnxruntime_latency_ms": ref.latency_ms,
                       "latency_ratio": (ours.latency_ms / ref.latency_ms) if ours.latency_ms and ref.latency_ms else None}}


# --------------------------------------------------------------------------- text


def _names(nodes: Sequence[str], width: int) -> str:
    if not nodes:
        return "-"
    s = nodes[0] if len(nodes) == 1 else f"{nodes[0]} +{len(nodes) - 1}"
    return s if len(s) <= width else "…" + s[-(width - 1):]


def _fmt(x: float | None, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def _flops(f: int | None) -> str:
    if not f:
        return "-"
    return f"{f / 1e9:.2f}G" if f >= 1e8 else f"{f / 1e6:.1f}M"


def format_profile(p: Profile, *, sort: str = "order", top: int | None = None) -> str:
    rows = sorted(p.rows, key=lambda r: -r.ms) if sort == "time" else list(p.rows)
    shown = rows[:top] if top else rows
    lines = [f"# {p.runtime}: {p.source}, {p.threads} threads",
             f"# {len(p.rows)} kernels, sum {p.total_ms:.3f} ms; end-to-end {_fmt(p.latency_ms, '.3f')} ms (median); {p.timing}",
             f"# peak: {p.peak.how}" if p.peak else "# peak: unknown (give --peak-gflops)"]
    lines += [f"# note: {n}" for n in p.notes]
    hdr = f"{'#':>4} {'kernel':<22} {'ONNX nodes':<42} {'ops':<26} {'FLOPs':>7} {'ms':>8} {'%':>5} {'GFLOP/s':>8} {'%peak':>5}  schedule"
    lines.append(hdr)
    for r in shown:
        lines.append(f"{r.index:>4} {r.kernel[:22]:<22} {_names(r.nodes, 42):<42} {','.join(r.ops)[:26]:<26} "
                     f"{_flops(r.flops):>7} {r.ms:8.3f} {r.share:5.1f} {_fmt(r.gflops, '8.1f'):>8} "
                     f"{_fmt(r.peak_pct, '5.0f'):>5}  {r.schedule}")
    if top and len(rows) > top:
        rest = rows[top:]
        lines.append(f"     ({len(rest)} more: {sum(r.ms for r in rest):.3f} ms, {sum(r.share for r in rest):.1f} %)")
    return "\n".join(lines)


def format_compare(c: dict[str, Any], *, sort: str = "order", top: int | None = None) -> str:
    t = c["totals"]
    rows = list(c["rows"])
    if sort == "time":
        rows.sort(key=lambda r: -max(r["graphopt_ms"] or 0.0, r["onnxruntime_ms"] or 0.0))
    shown = rows[:top] if top else rows
    g, o = c["graphopt"], c["onnxruntime"]
    lines = [f"# graphopt {g['source']} vs onnxruntime {o['source']} ({g['threads']} / {o['threads']} threads), by ONNX node",
             f"# kernels: {t['graphopt_ms']:.3f} ms vs {t['onnxruntime_ms']:.3f} ms ({_fmt(t['ratio'], '.2f')}x); end-to-end "
             f"{_fmt(t['graphopt_latency_ms'], '.3f')} vs {_fmt(t['onnxruntime_latency_ms'], '.3f')} ms ({_fmt(t['latency_ratio'], '.2f')}x)",
             f"# graphopt: {g['timing']}; onnxruntime: {o['timing']}",
             f"{'ONNX nodes':<46} {'ops':<24} {'graphopt ms':>11} {'ORT ms':>8} {'ratio':>6}  kernels / ORT nodes"]
    for r in shown:
        lines.append(f"{_names(r['nodes'], 46):<46} {','.join(r['ops'])[:24]:<24} {_fmt(r['graphopt_ms'], '11.3f'):>11} "
                     f"{_fmt(r['onnxruntime_ms'], '8.3f'):>8} {_fmt(r['ratio'], '6.2f'):>6}  "
                     f"{','.join(r['kernels'])[:30] or '-'} / {len(r['onnxruntime_nodes'])}")
    if top and len(rows) > top:
        lines.append(f"({len(rows) - top} more rows)")
    return "\n".join(lines)

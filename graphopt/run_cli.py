"""graphopt-run: run a compiled artifact.

    graphopt-run ARTIFACT --inputs x.npz [-o outputs.npz] [--threads T]
    graphopt-run ARTIFACT [--inputs x.npz] --benchmark [--repeat N] [--warmup W] [--json]
    graphopt-run ARTIFACT --profile [--sort time] [--top N] [--cold] [--json]
    graphopt-run ARTIFACT --compare MODEL.onnx [--sort time] [--top N] [--json]
    graphopt-run MODEL.onnx [--benchmark | --profile]          (onnxruntime)
    graphopt-run ARTIFACT --profile [--compare MODEL.onnx] --report out.html   (the page, with its charts)

Without `--inputs`, random inputs are made from the manifest (symbolic dims: `--dim N=4`; default 1,
or the smallest size the artifact accepts where it records a multiple or a minimum).
Outputs go to `-o` (.npz, keyed by output name) or, without it, a summary per output to stdout.
`--benchmark` prints latency percentiles (ms). `--profile` prints one row per kernel (graphopt.profiler);
an .onnx file runs on onnxruntime instead (its profiler for --profile). Exit codes: 0 ok, 1 internal error, 2 bad input
or usage (a missing artifact, a library whose hash does not match its manifest, wrong inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np

from graphopt.errors import GraphoptError, UsageError

PROG = "graphopt-run"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False, description="Run a graphopt artifact (a folder made by graphopt-compile "
                "--target cpu), or an .onnx model on onnxruntime.")
    p.add_argument("artifact", help="the artifact folder, or an .onnx file")
    p.add_argument("--inputs", metavar="X.npz", help="input arrays keyed by input name (default: random)")
    p.add_argument("-o", "--output", metavar="Y.npz", help="write the outputs here")
    p.add_argument("--threads", type=int, help="worker threads (default: the artifact's, else every core; one for a "
                   "model with under 50 µs of work per call, unless --pool exclusive)")
    p.add_argument("--pool", choices=("balanced", "shared", "exclusive"), default=None,
                   help="thread pools: balanced (default: workers unpinned, spinning ~1 ms after a call: fast, and "
                        "fine beside onnxruntime runs in turn), shared (no spinning: runtimes running at the same time "
                        "on the same cores) or exclusive (pinned, spinning ~150 ms: one model alone)")
    p.add_argument("--benchmark", action="store_true", help="time repeated runs and print latency percentiles")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed runs for --benchmark (default 50); timings per kernel for --profile (default 5; "
                        "onnxruntime: profiled runs, default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE", help="size of a symbolic dim for random inputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    g = p.add_argument_group("profiling (graphopt.profiler)")
    g.add_argument("--profile", action="store_true", help="time every kernel: one row per kernel call with its ONNX "
                   "nodes, op types, FLOPs, median time, %% of the total, GFLOP/s, %% of peak and schedule")
    g.add_argument("--compare", metavar="MODEL.onnx", help="profile the artifact and MODEL.onnx on onnxruntime, "
                   "lined up by ONNX node (kernel time vs the onnxruntime nodes it covers)")
    g.add_argument("--sort", choices=("order", "time"), default="order", help="rows in call order (default) or slowest first")
    g.add_argument("--top", type=int, default=None, metavar="N", help="print only the first N rows (after --sort)")
    g.add_argument("--cold", action="store_true", help="time each kernel with its arguments but the first flushed "
                   "from the CPU caches (as a model's weights are when larger than the caches)")
    g.add_argument("--peak-gflops", type=float, default=None, metavar="X",
                   help="the fp32 peak for %%peak (default: threads x FMA units x lanes x 2 x clock)")
    p.add_argument("--report", metavar="R.html", help="also write the result to R.html: a self-contained HTML page (the "
                   "artifact's compile report with the kernel profile chart, by-node comparison, latency), or R.json")
    p.add_argument("--html", metavar="R.html", help="the same as --report, always HTML")
    p.add_argument("--debug", action="store_true", help="show the traceback of internal errors")
    return p


def _random_inputs(specs: list[dict[str, Any]], dims: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Random arrays for the inputs, symbolic dims from `dims` (default 1); their total size is
    checked against input_limit() before anything is allocated."""
    shapes = {s["name"]: [d if isinstance(d, int) else dims.get(str(d), 1) for d in (s.get("shape") or [])] for s in specs}
    total, limit = 0, input_limit()
    for s in specs:
        # (float inputs are drawn as float64 first)
        total += int(np.prod(shapes[s["name"]], dtype=object)) * max(np.dtype(s["dtype"]).itemsize, 8)
        if total > limit:
            given = " ".join(f"--dim {k}={v}" for k, v in dims.items()) or "the default dims"
            raise UsageError(f"{given}: input {s['name']!r} would be {shapes[s['name']]} ({_size(total)} of random "
                             f"inputs so far), over the limit of {_size(limit)} (a quarter of this machine's memory)")
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        shape = shapes[s["name"]]
        dt = np.dtype(s["dtype"])
        if dt.kind in "fc":
            out[s["name"]] = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            out[s["name"]] = rng.integers(0, 2, shape).astype(dt)
        else:
            out[s["name"]] = rng.integers(0, 8, shape).astype(dt)
    return out


def input_limit() -> int:
    """Bytes the inputs of one run may take: a quarter of the machine's memory (the outputs, the
    device copies and the model's own buffers need the rest)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # (no sysconf: assume 16 GiB)
        return 4 << 30


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of --inputs file `path`: headers checked first (a zip of .npy arrays, no objects,
    sizes as the headers say, within input_limit()), then read."""
    from graphopt.target import npz_arrays

    if not os.path.exists(path):
        raise UsageError(f"--inputs {path}: no such file")
    if not os.path.isfile(path):
        raise UsageError(f"--inputs {path}: not a file")
    try:
        arrays = npz_arrays(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--inputs {path}: not a readable .npz file: {e}") from None
    total = sum(int(np.prod(shape, dtype=object)) * dt.itemsize for dt, shape in arrays.values())
    if total > input_limit():
        raise UsageError(f"--inputs {path}: its arrays hold {_size(total)}, over the limit of {_size(input_limit())} "
                         "(a quarter of this machine's memory)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except Exception as e:  # noqa: BLE001 - headers were fine, the data is not (zip CRC, zlib, short read)
        raise UsageError(f"--inputs {path}: not a readable .npz file: {type(e).__name__}: {e}") from None


def _check_output(path: str) -> None:
    """Refuse an -o that cannot be written before the model runs."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"-o {path}: is a folder (give a file name, e.g. {os.path.join(path, 'outputs.npz')})")
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        probe = folder
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        if os.path.exists(probe) and not os.path.isdir(probe):
            what = f"cannot be made: {probe} is a file"
        raise UsageError(f"-o {path}: folder {folder} {what}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"-o {path}: folder {folder} is not writable")


def _default_dims(runner: Any) -> dict[str, int]:
    """For random inputs: each symbolic dim the artifact constrains (manifest dims.symbolic: a
    multiple, a minimum) at the smallest size it accepts; the others stay 1 (`_random_inputs`)."""
    sym = ((getattr(runner, "manifest", None) or {}).get("dims") or {}).get("symbolic") or {}
    out: dict[str, int] = {}
    for name, d in sym.items() if isinstance(sym, dict) else ():
        if not isinstance(d, dict):
            continue
        m, lo = max(int(d.get("multiple", 1) or 1), 1), max(int(d.get("min", 1) or 1), 1)
        out[str(name)] = -(-lo // m) * m
    return out


def _dims(given: list[str], specs: list[dict[str, Any]]) -> dict[str, int]:
    """--dim NAME=SIZE values, NAME a symbolic dim of the inputs."""
    names = {str(d) for s in specs for d in (s.get("shape") or []) if isinstance(d, str)}
    dims = {}
    for d in given:
        name, _, size = d.partition("=")
        if not name or re.fullmatch(r"[0-9]{1,30}", size) is None:
            raise UsageError(f"--dim {d}: expected NAME=SIZE, SIZE a whole number")
        if name not in names:
            raise UsageError(f"--dim {d}: the inputs have no symbolic dim {name!r} "
                             f"(they have: {', '.join(sorted(names)) or 'none'})")
        dims[name] = int(size)
    return dims


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        return _run(build_parser().parse_args(args))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except GraphoptError as e:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {' | '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: internal error: {type(e).__name__}: {' | '.join(str(e).splitlines())}", file=sys.stderr)
        return 1


def _run(ns: argparse.Namespace) -> int:
    from graphopt.runtime import MAX_THREADS, load, load_onnx

    if ns.threads is not None and not 1 <= ns.threads <= MAX_THREADS:
        raise UsageError(f"--threads {ns.threads}: expected a whole number from 1 to {MAX_THREADS}")
    if (ns.repeat is not None and ns.repeat < 1) or ns.warmup < 0:
        raise UsageError(f"--repeat {ns.repeat} --warmup {ns.warmup}: expected --repeat >= 1 and --warmup >= 0")
    if ns.top is not None and ns.top < 1:
        raise UsageError(f"--top {ns.top}: expected a whole number >= 1")
    if ns.peak_gflops is not None and not ns.peak_gflops > 0:
        raise UsageError(f"--peak-gflops {ns.peak_gflops}: expected a positive number")
    is_onnx = ns.artifact.endswith(".onnx") and not os.path.isdir(ns.artifact)
    if is_onnx and ns.compare:
        raise UsageError(f"--compare {ns.compare}: compares an artifact with an .onnx model; {ns.artifact} is an .onnx model")
    if ns.compare and not (ns.compare.endswith(".onnx") and os.path.isfile(ns.compare)):
        raise UsageError(f"--compare {ns.compare}: " + ("no such file" if not os.path.exists(ns.compare) else "expected an .onnx file"))
    if ns.cold and is_onnx:
        raise UsageError("--cold: onnxruntime's profiler times whole runs (a graphopt artifact's kernels only)")
    profiling = ns.profile or ns.compare
    for flag, given in (("--sort", ns.sort != "order"), ("--top", ns.top is not None), ("--cold", ns.cold),
                        ("--peak-gflops", ns.peak_gflops is not None)):
        if given and not profiling:
            raise UsageError(f"{flag} applies to --profile and --compare")
    if ns.report and ns.html:
        raise UsageError("--report and --html name the same page; give one")
    report_path = ns.html or ns.report
    if report_path and not (profiling or ns.benchmark):
        raise UsageError(f"--{'html' if ns.html else 'report'} {report_path}: the page shows a measurement; add --profile, "
                         "--compare or --benchmark")
    if ns.output:
        _check_output(ns.output)
    if report_path:
        _check_output(report_path)
    runner: Any = (load_onnx(ns.artifact, threads=ns.threads, pool=ns.pool or "balanced") if is_onnx
                   else load(ns.artifact, threads=ns.threads, pool=ns.pool))
    if ns.inputs:
        feeds = _load_npz(ns.inputs)
    else:
        feeds = _random_inputs(runner.inputs, {**_default_dims(runner), **_dims(ns.dim, runner.inputs)}, ns.seed)
    outputs = runner.run(feeds)
    result: dict[str, Any] = {"outputs": {n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in zip(runner.output_names, outputs)}}
    if getattr(runner, "last_dispatch", None):
        result["dispatch"] = runner.last_dispatch
    if ns.output:
        from graphopt.onnx_io import atomic_write

        try:
            with atomic_write(ns.output) as f:
                np.savez(f, **dict(zip(runner.output_names, outputs)))
        except OSError as e:  # (a full disk, a read-only file system: the old file stays as it was)
            raise UsageError(f"-o {ns.output}: cannot write it: {e.strerror or e}") from None
        result["written"] = ns.output
    if ns.benchmark:
        result["latency"] = runner.benchmark(feeds, warmup=ns.warmup, repeat=ns.repeat or 50)
    text: list[str] = []
    if profiling:
        from graphopt import profiler as P

        if is_onnx:
            prof = P.profile_onnx(ns.artifact, feeds, threads=runner.threads, repeat=ns.repeat or 20,
                                  peak_gflops=ns.peak_gflops)
        else:
            prof = P.profile_artifact(runner, feeds, repeat=ns.repeat or 5, cold=ns.cold, peak_gflops=ns.peak_gflops)
        if ns.compare:
            ref = P.profile_onnx(ns.compare, _onnx_feeds(ns.compare, feeds), threads=runner.threads,
                                 repeat=20, peak_gflops=ns.peak_gflops)
            cmp = P.compare(prof, ref)
            result["compare"] = cmp
            text.append(P.format_compare(cmp, sort=ns.sort, top=ns.top))
        if ns.profile or not ns.compare:
            result["profile"] = prof.to_json()
            text.insert(0, P.format_profile(prof, sort=ns.sort, top=ns.top))
    if report_path:
        _write_report(report_path, ns, result, html=bool(ns.html), is_onnx=is_onnx)
    if ns.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, info in result["outputs"].items():
        print(f"{name}: {info['dtype']}{info['shape']}")
    if ns.output:
        print(f"outputs written to {ns.output}")
    if ns.benchmark:
        lat = result["latency"]
        where = "onnxruntime, " if is_onnx else ""
        pool = f" ({lat['pool']} pool)" if "pool" in lat else ""
        print(f"latency over {lat['runs']} runs, {where}{lat['threads']} threads{pool}: p50 {lat['p50_ms']:.3f} ms, "
              f"p90 {lat['p90_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms (min {lat['min_ms']:.3f}, mean {lat['mean_ms']:.3f})")
    if getattr(runner, "last_dispatch", None):  # (shape buckets: which kernels ran)
        print(f"shape: {runner.last_dispatch}")
    for t in text:
        print(t)
    return 0


def _write_report(path: str, ns: argparse.Namespace, result: dict[str, Any], *, html: bool, is_onnx: bool) -> None:
    """--report/--html: the artifact's compile report (its report.json) with this run's profile,
    by-node comparison and latency, as the HTML page of graphopt-compile --report (or JSON)."""
    import graphopt
    from graphopt.html_report import charts_note, is_html, render_html
    from graphopt.onnx_io import atomic_write

    base: dict[str, Any] = {}
    compiled = os.path.join(ns.artifact, "report.json")
    if not is_onnx and os.path.isfile(compiled):
        try:
            with open(compiled, encoding="utf-8") as f:
                base = json.load(f)
        except (OSError, ValueError):  # (an artifact's report is a nicety: the page has the run's part anyway)
            base = {}
    r: dict[str, Any] = base if isinstance(base, dict) else {}
    r.setdefault("graphopt_version", graphopt.__version__)
    r.setdefault("status", "ok")
    r.setdefault("model", ns.artifact)
    r.setdefault("target", "onnx (onnxruntime)" if is_onnx else "artifact")
    r["output"] = "onnxruntime (graphopt-run)" if is_onnx else ns.artifact
    for key in ("profile", "latency"):
        if key in result:
            r[key] = result[key]
    if "compare" in result:
        r["profile_compare"] = result["compare"]
    if "latency" in result:  # (the summary's latency card)
        r.setdefault("log", []).append(f"graphopt-run --benchmark: p50 {result['latency']['p50_ms']:.3f} ms over "
                                       f"{result['latency']['runs']} runs, {result['latency']['threads']} threads")
    text = render_html(r) if html or is_html(path) else json.dumps(r, indent=2, default=str) + "\n"
    try:
        with atomic_write(path) as f:
            f.write(text.encode())
    except OSError as e:
        raise UsageError(f"--report {path}: cannot write it: {e.strerror or e}") from None
    note = charts_note() if html or is_html(path) else None
    print(f"{PROG}: report written to {path}" + (f" ({note})" if note else ""), file=sys.stderr)


def _onnx_feeds(path: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The artifact's inputs for --compare's model: the same names, else one line."""
    import onnx

    try:
        m = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - not an ONNX file: the user's input
        raise UsageError(f"--compare {path}: not a loadable ONNX model: {type(e).__name__}") from None
    inits = {i.name for i in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    if sorted(names) != sorted(feeds):
        raise UsageError(f"--compare {path}: its inputs ({', '.join(names)}) are not the artifact's "
                         f"({', '.join(feeds)}): compare an artifact with the model it was compiled from")
    return feeds


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

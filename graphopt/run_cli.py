"""graphopt-run: run a compiled artifact.

    graphopt-run ARTIFACT --inputs x.npz [-o outputs.npz] [--threads T]
    graphopt-run ARTIFACT [--inputs x.npz] --benchmark [--repeat N] [--warmup W] [--json]

Without `--inputs`, random inputs are made from the manifest (symbolic dims: `--dim N=4`, default 1).
Outputs go to `-o` (.npz, keyed by output name) or, without it, a summary per output to stdout.
`--benchmark` prints latency percentiles (ms). Exit codes: 0 ok, 1 internal error, 2 bad input
or usage (a missing artifact, a library whose hash does not match its manifest, wrong inputs).
"""

from __future__ import annotations

import argparse
import json
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
    p = _Parser(prog=PROG, allow_abbrev=False, description="Run a graphopt artifact (a folder made by graphopt-compile --target cpu).")
    p.add_argument("artifact", help="the artifact folder")
    p.add_argument("--inputs", metavar="X.npz", help="input arrays keyed by input name (default: random)")
    p.add_argument("-o", "--output", metavar="Y.npz", help="write the outputs here")
    p.add_argument("--threads", type=int, help="worker threads (default: the artifact's, else every core)")
    p.add_argument("--benchmark", action="store_true", help="time repeated runs and print latency percentiles")
    p.add_argument("--repeat", type=int, default=50, help="timed runs for --benchmark (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE", help="size of a symbolic dim for random inputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--debug", action="store_true", help="show the traceback of internal errors")
    return p


def _random_inputs(specs: list[dict[str, Any]], dims: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        shape = [d if isinstance(d, int) else dims.get(str(d), 1) for d in (s.get("shape") or [])]
        dt = np.dtype(s["dtype"])
        if dt.kind == "f":
            out[s["name"]] = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            out[s["name"]] = rng.integers(0, 2, shape).astype(dt)
        else:
            out[s["name"]] = rng.integers(0, 8, shape).astype(dt)
    return out


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except FileNotFoundError:
        raise UsageError(f"--inputs {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--inputs {path}: not a readable .npz file: {e}") from None


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
    from graphopt.runtime import load

    dims = {}
    for d in ns.dim:
        name, _, size = d.partition("=")
        if not size.isdigit():
            raise UsageError(f"--dim {d}: expected NAME=SIZE")
        dims[name] = int(size)
    runner = load(ns.artifact, threads=ns.threads)
    feeds = _load_npz(ns.inputs) if ns.inputs else _random_inputs(runner.inputs, dims, ns.seed)
    outputs = runner.run(feeds)
    result: dict[str, Any] = {"outputs": {n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in zip(runner.output_names, outputs)}}
    if ns.output:
        from graphopt.onnx_io import atomic_write

        with atomic_write(ns.output) as f:
            np.savez(f, **dict(zip(runner.output_names, outputs)))
        result["written"] = ns.output
    if ns.benchmark:
        result["latency"] = runner.benchmark(feeds, warmup=ns.warmup, repeat=ns.repeat)
    if ns.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, info in result["outputs"].items():
        print(f"{name}: {info['dtype']}{info['shape']}")
    if ns.output:
        print(f"outputs written to {ns.output}")
    if ns.benchmark:
        lat = result["latency"]
        print(f"latency over {lat['runs']} runs, {lat['threads']} threads: p50 {lat['p50_ms']:.3f} ms, "
              f"p90 {lat['p90_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms (min {lat['min_ms']:.3f}, mean {lat['mean_ms']:.3f})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""graphopt-compile: the command line.

    graphopt-compile MODEL.onnx -o OUT.onnx [--target onnx] [-O2 | --passes SPEC] [--disable NAME ...]
                     [--verify] [--verify-each] [--inputs X.npz] [--report R.json] [--config F.toml]
                     [--dump-ir DIR] [--quiet] [--debug]
    graphopt-compile [-O2 | --passes SPEC] --print-pipeline
    graphopt-compile --list-passes
    graphopt-compile --help-pass NAME
    graphopt-compile MODEL.onnx --explain RULE
    graphopt-compile MODEL.onnx --search --eval-data VAL.npz [--objective latency|size] [--accuracy-budget B]
                     [--trials N] [--search-dir DIR] [--search-storage URL]   (graphopt.pipeline_search)

Exit codes: 0 success; 1 internal error (a bug in graphopt or in a pass); 2 bad input or usage;
3 numeric verification failed (--verify or --verify-each: the compiled model's outputs left the
tolerance; no output file is written).

Every failure prints exactly one line, `graphopt-compile: error: <message>`, on stderr; the
traceback of an internal error only with --debug or GRAPHOPT_DEBUG=1. The summary table goes
to stderr (stdout carries only what --print-pipeline, --list-passes and --explain print), and
--quiet drops it. Lines that say a pass was skipped by --disable are printed even with --quiet.

The input is checked first by onnx's checker (full check, with shape inference): a model it
rejects is exit 2 with the checker's message (--no-check compiles it anyway, and says so), and
the output of a checked input must pass the checker too (exit 1 otherwise: a bug in graphopt).

Output is staged in a temporary folder beside the destination and moved into place only when
everything (including --verify) succeeded: a failure never leaves a partial or stale file, and
an existing output file stays untouched. A missing output folder is created (and removed again
if the compile fails). A SIGKILLed compile cannot remove its stage; the next compile into the
same folder does. A read-only or full disk is exit 2 naming the path.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from graphopt.errors import GraphoptError, UsageError

PROG = "graphopt-compile"
TARGETS = ("onnx", "cpu", "arm64", "cuda")  # a compiled target may carry options: arm64{mcpu=cortex-a76}

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_VERIFY = 3


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a UsageError (one line, exit 2) instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False, description="Compile an ONNX model with graphopt.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="exit codes:\n  0  ok\n  1  internal error\n  2  bad input or usage\n"
                       "  3  numeric verification failed (--verify, --verify-each); no output written")
    # every default is None so that a config file value is overridden only by flags actually given
    p.add_argument("model", nargs="?", help="the input .onnx model")
    p.add_argument("-o", "--output", help="where to write the compiled model")
    p.add_argument("--target", help=f"what to produce (default onnx; have: {', '.join(TARGETS)}); options in "
                   "braces, e.g. 'arm64{profile=neoverse-n1}' or 'cuda{arch=sm_90}'")
    p.add_argument("-O", dest="opt_level", metavar="LEVEL", help="optimisation level 0-3 (-O2 is the default)")
    p.add_argument("--passes", metavar="SPEC", help="the pipeline, e.g. '-O1,fold-constants' (instead of -O)")
    p.add_argument("--prune", metavar="RATIO", help="append prune{ratio=RATIO} (structured channel pruning) to the pipeline")
    p.add_argument("--disable", metavar="NAME", action="append", help="drop pass NAME from the pipeline (repeatable)")
    p.add_argument("--contrib-ops", action=argparse.BooleanOptionalAction, default=None,
                   help="let fusions use onnxruntime's com.microsoft ops (for deployments on onnxruntime only)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="run the original and compiled model on onnxruntime and compare (exit 3 if they differ)")
    p.add_argument("--verify-each", action=argparse.BooleanOptionalAction, default=None,
                   help="check IR invariants and outputs after every pass; name the first pass that breaks them")
    p.add_argument("--tune", type=int, metavar="TRIALS", help="cpu target: meta_schedule trial budget (needs --tuning-db)")
    p.add_argument("--tune-minutes", type=float, metavar="M", help="cpu target: stop tuning after M minutes")
    p.add_argument("--tuning-db", metavar="DIR", help="cpu target: tuning database folder, reused by later compiles")
    p.add_argument("--tune-shapes", metavar="NAME=DIMS;...", help="cpu target: tune the kernels with symbolic dims at "
                   "these input sizes (e.g. 'x=1x3x320x320;x=1x3x640x480'); the best schedule over them serves every "
                   "size (--tuning-db keeps the choices)")
    p.add_argument("--threads", type=int, metavar="T", help="cpu target: worker threads (default: every core)")
    p.add_argument("--quantize", metavar="SCHEME", help="append the quantize pass (SCHEME: int8) to the pipeline")
    p.add_argument("--calibration", metavar="DATA", help="--quantize/--prune: calibration .npz (one array per input, samples "
                   "stacked on the batch axis) or a folder of them (default: synthetic, labelled as such)")
    p.add_argument("--calibration-method", metavar="M", help="--quantize: minmax (default), percentile, entropy or mse")
    p.add_argument("--quantize-speed", choices=("measure", "rules", "off"),
                   help="--quantize: measure (default: keep float where int8 is not faster here), rules (depthwise "
                        "and tiny layers float; reproducible output) or off")
    p.add_argument("--accuracy-budget", metavar="B", help="--quantize/--prune: top1:P, cosine:C, sqnr:DB, rel:E or none; the "
                   "most sensitive layers stay float / groups back off until it holds (--prune's default: cosine:0.99)")
    p.add_argument("--bind", metavar="NAME=VALUE", action="append", help="fix input NAME to a constant (a number, "
                   "a comma list or a .npy file; repeatable): it leaves the interface and cleanup folds what it decides")
    p.add_argument("--calibration-batch-axis", metavar="NAME:AXIS", action="append", help="--calibration: the batch "
                   "axis of input NAME in the calibration data (default: from the model's symbolic dims, else 0)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="run onnx's checker (full check, with shape inference) on the input first and refuse a "
                        "model it rejects (default); --no-check compiles it anyway, and says so")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS", help="fix input NAME's shape before the "
                   "passes, e.g. x:1x3x224x224 (repeatable); its symbolic dims take these values everywhere")
    p.add_argument("--shape-buckets", metavar="DIM:SIZES;...", help="cpu target: kernels specialised for these sizes of "
                   "symbolic dims beside the symbolic ones, e.g. 'H:320,640;W:320' (the target option buckets=)")
    p.add_argument("--dim", action="append", metavar="SYMBOL=SIZE", help="fix the symbolic dim SYMBOL (e.g. batch=1) "
                   "in every input before the passes (repeatable)")
    p.add_argument("--inputs", metavar="X.npz", help="inputs for --verify/--verify-each (default: random)")
    p.add_argument("--rtol", type=float, help="relative tolerance for verification (default 1e-4)")
    p.add_argument("--atol", type=float, help="absolute tolerance for verification (default 1e-5)")
    p.add_argument("--seed", type=int, help="seed of the random verification inputs (default 0)")
    p.add_argument("--report", metavar="R.json", help="write a JSON report (R.html: a self-contained HTML report)")
    # before/after (graphopt.compare) and metric-based verification (graphopt.verification)
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the original and the result side by side: latency, size, peak memory, accuracy")
    p.add_argument("--eval-data", metavar="DATA.npz", help="--compare: samples (one array per input, stacked on the batch "
                   "axis; a `labels` array of class indices gives top-1 accuracy); default: random inputs")
    p.add_argument("--verify-metric", metavar="M:LIMIT", help="--verify with metrics instead of elementwise tolerances, "
                   "for lossy pipelines: cosine:0.99, top1-agreement:0.99, sqnr:30 (comma-separated)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="profile the result (graphopt.profiler: per kernel, or per node on onnxruntime) on random "
                        "inputs (symbolic dims 1) or --inputs; the slowest rows in the summary, all in --report")
    # graphopt.pipeline_search: --search picks the pipeline under --accuracy-budget (Optuna)
    p.add_argument("--search", action="store_true", help="search the compression pipeline (prune, low-rank, int8 per layer "
                   "group, cluster bits, precision) for the best --objective within --accuracy-budget on --eval-data "
                   "(needs optuna: pip install 'graphopt[search]')")
    p.add_argument("--objective", choices=("latency", "size"), help="--search: what to minimize (default latency)")
    p.add_argument("--trials", type=int, metavar="N", help="--search: trials in the study, those done before included (default 40)")
    p.add_argument("--search-dir", metavar="DIR", help="--search: study.db, trials/, pareto.json, best.toml (default graphopt-search)")
    p.add_argument("--search-storage", metavar="URL", help="--search: an Optuna RDB storage URL shared by several workers "
                   "(default sqlite:///DIR/study.db)")
    p.add_argument("--trial-timeout", type=float, metavar="S", help="--search: seconds a trial may take (default 900)")
    p.add_argument("--latency-batch", type=int, metavar="N", help="--search: samples per timed call where the batch dim is "
                   "symbolic (default 1: an online request)")
    p.add_argument("--config", metavar="FILE.toml", help="read options from a [graphopt] table; flags override it")
    p.add_argument("--dump-ir", metavar="DIR", help="write the textual IR after every pass into DIR")
    p.add_argument("--print-pipeline", action="store_true", help="print the pipeline in pipeline syntax and exit")
    p.add_argument("--list-passes", action="store_true", help="list the available passes and exit")
    p.add_argument("--help-pass", metavar="NAME", help="describe pass NAME and its options (pipeline syntax) and exit")
    p.add_argument("--explain", metavar="RULE", help="explain why pattern rule RULE does (not) match MODEL")
    p.add_argument("-q", "--quiet", action=argparse.BooleanOptionalAction, default=None, help="no summary table")
    p.add_argument("--debug", action="store_true", help="show the traceback of internal errors")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return p


def _version() -> str:
    from graphopt import __version__

    return __version__


@dataclass
class Options:
    """The command line merged over the config file."""

    model: str | None = None
    output: str | None = None
    target: str = "onnx"
    pipeline: str = "-O2"
    disable: list[str] = field(default_factory=list)
    contrib_ops: bool = False
    verify: bool = False
    verify_each: bool = False
    check: bool = True  # onnx's checker on the input (--no-check: proceed anyway, said in the log)
    inputs: str | None = None
    rtol: float = 1e-4
    atol: float = 1e-5
    seed: int = 0
    report: str | None = None
    dump_ir: str | None = None
    quiet: bool = False
    print_pipeline: bool = False
    list_passes: bool = False
    help_pass: str | None = None  # --help-pass NAME
    explain: str | None = None
    tune: int = 0
    tune_minutes: float | None = None
    tuning_db: str | None = None
    tune_shapes: str | None = None  # --tune-shapes NAME=DIMS;... (graphopt.input_shapes.parse_tune_shapes)
    threads: int | None = None
    calibration: str | None = None  # --quantize's data, handed to the pass through PassContext.data
    input_shapes: list[str] = field(default_factory=list)  # --input-shape NAME:DIMS (graphopt.input_shapes)
    dims: list[str] = field(default_factory=list)  # --dim SYMBOL=SIZE
    bind: list[str] = field(default_factory=list)  # --bind NAME=VALUE: inputs fixed to constants
    calibration_batch_axis: list[str] = field(default_factory=list)  # --calibration-batch-axis NAME:AXIS
    compare: bool = False  # --compare: before/after table (graphopt.compare)
    eval_data: str | None = None
    verify_metric: list[Any] = field(default_factory=list)  # graphopt.accuracy.Budget (implies verify)
    profile: bool = False  # --profile: graphopt.profiler on the result (report key `profile`)
    search: Any = None  # --search: graphopt.pipeline_search.Settings


def _join_spec_values(argv: Sequence[str]) -> list[str]:
    """`--passes -O1,cse`: argparse would take the spec for an option, so glue it on with '='."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--passes":
            value = next(it, None)
            out.append(arg if value is None else f"--passes={value}")
        else:
            out.append(arg)
    return out


def parse_options(argv: Sequence[str]) -> Options:
    ns = build_parser().parse_args(_join_spec_values(argv))
    cfg: dict[str, Any] = {}
    if ns.config:
        from graphopt.config import load_config

        cfg = load_config(ns.config)
    if ns.search or any(getattr(ns, a) is not None for a in ("objective", "trials", "search_dir", "search_storage", "trial_timeout",
                                                              "latency_batch")):
        from graphopt.pipeline_search.cli import search_options

        searched: Options = search_options(ns, cfg, Options)
        return searched

    def pick(flag: Any, key: str, default: Any) -> Any:
        # a flag given on the command line wins over the config file, which wins over the default
        if flag is not None:
            return flag
        return cfg.get(key, default)

    opts = Options(
        model=pick(ns.model, "model", None),
        output=pick(ns.output, "output", None),
        target=pick(ns.target, "target", "onnx"),
        pipeline=_pipeline_spec(ns, cfg),
        disable=list(pick(ns.disable, "disable", [])),
        contrib_ops=pick(ns.contrib_ops, "contrib-ops", False),
        verify=pick(ns.verify, "verify", False),
        verify_each=pick(ns.verify_each, "verify-each", False),
        check=pick(ns.check, "check", True),
        inputs=pick(ns.inputs, "inputs", None),
        rtol=float(pick(ns.rtol, "rtol", 1e-4)),
        atol=float(pick(ns.atol, "atol", 1e-5)),
        seed=pick(ns.seed, "seed", 0),
        report=pick(ns.report, "report", None),
        dump_ir=pick(ns.dump_ir, "dump-ir", None),
        quiet=pick(ns.quiet, "quiet", False),
        print_pipeline=ns.print_pipeline,
        list_passes=ns.list_passes,
        help_pass=ns.help_pass,
        explain=ns.explain,
        tune=pick(ns.tune, "tune", 0),
        tune_minutes=pick(ns.tune_minutes, "tune-minutes", None),
        tuning_db=pick(ns.tuning_db, "tuning-db", None),
        tune_shapes=pick(ns.tune_shapes, "tune-shapes", None),
        threads=pick(ns.threads, "threads", None),
        input_shapes=list(pick(ns.input_shape, "input-shape", [])),
        dims=list(pick(ns.dim, "dim", [])),
    )
    buckets = pick(ns.shape_buckets, "shape-buckets", None)
    if buckets:
        opts.target = _with_buckets(opts.target, str(buckets))
    opts.bind = list(pick(ns.bind, "bind", []))
    opts.calibration_batch_axis = list(pick(ns.calibration_batch_axis, "calibration-batch-axis", []))
    # the pipeline shortcuts: a flag wins over the config file
    for key, attr in (("prune", "prune"), ("quantize", "quantize"), ("calibration", "calibration"),
                      ("calibration-method", "calibration_method"), ("accuracy-budget", "accuracy_budget"),
                      ("quantize-speed", "quantize_speed")):
        if getattr(ns, attr) is None and key in cfg:
            setattr(ns, attr, str(cfg[key]))
    opts.compare, opts.eval_data = pick(ns.compare, "compare", False), pick(ns.eval_data, "eval-data", None)
    opts.profile = bool(pick(ns.profile, "profile", False))
    if opts.eval_data and not opts.compare:
        raise UsageError("--eval-data is used by --compare; add it")
    metric = pick(ns.verify_metric, "verify-metric", None)
    if metric:
        from graphopt.accuracy import parse_budgets

        opts.verify_metric, opts.verify = parse_budgets(str(metric)), True
    opts.pipeline = _prune_spec(ns, opts.pipeline)
    opts.pipeline, opts.calibration = _quantize_spec(ns, opts.pipeline)
    modes = [m for m, on in (("--print-pipeline", opts.print_pipeline), ("--list-passes", opts.list_passes),
                             ("--explain", opts.explain is not None), ("--help-pass", opts.help_pass is not None)) if on]
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} cannot be combined")
    return opts


def _with_buckets(target: str, buckets: str) -> str:
    """The target spec with `buckets=` (--shape-buckets) among its options: the cpu target's only."""
    from graphopt.target import parse_target_spec

    name, options = parse_target_spec(target)
    if name != "cpu":
        raise UsageError(f"--shape-buckets is a cpu target option; the target is {name!r} (add --target cpu)")
    if "buckets" in options:
        raise UsageError("--shape-buckets and the target's buckets= option both given: keep one")
    body = ",".join([f"{k}={v}" for k, v in options.items()] + [f"buckets={buckets}"])
    return f"cpu{{{body}}}"


#: passes besides quantize that read --calibration (ctx.data["calibration"]; prune also as --prune)
CALIBRATION_READERS = ("prune", "cluster-weights", "convert-precision", "low-rank")


def _quantize_spec(ns: argparse.Namespace, pipeline: str) -> tuple[str, str | None]:
    """--quantize int8 [--calibration-method M] [--accuracy-budget B] appends quantize{...}."""
    given = [f for f, v in (("--calibration", ns.calibration), ("--calibration-method", ns.calibration_method),
                            ("--accuracy-budget", ns.accuracy_budget), ("--quantize-speed", ns.quantize_speed)) if v is not None]
    if ns.quantize is None:
        # --calibration is read by --prune (refit, evaluation) and by passes in the pipeline that
        # calibrate; --accuracy-budget by --prune
        readers = ns.prune is not None or any(p in (pipeline or "") for p in CALIBRATION_READERS)
        bad = [f for f in given if not ((f == "--calibration" and readers) or (f == "--accuracy-budget" and ns.prune is not None))]
        if bad:
            also = {"--calibration": f" or --prune or a pass that reads it ({', '.join(CALIBRATION_READERS)})",
                    "--accuracy-budget": " or --prune"}.get(bad[0], "")
            raise UsageError(f"{bad[0]} needs --quantize int8{also}")
        return pipeline, ns.calibration if "--calibration" in given else None
    if ns.quantize != "int8":
        raise UsageError(f"--quantize {ns.quantize}: unknown scheme (have: int8)")
    opts = ["scheme=int8"] + ([f"calibration={ns.calibration_method}"] if ns.calibration_method else []) \
        + ([f"accuracy-budget={ns.accuracy_budget}"] if ns.accuracy_budget else []) \
        + ([f"speed={ns.quantize_speed}"] if ns.quantize_speed else [])
    for o in opts:
        if any(c in o for c in ",{}") or o.count("=") != 1:
            raise UsageError(f"--quantize: bad value in {o!r}")
    return ",".join(x for x in (pipeline, "quantize{" + ",".join(opts) + "}") if x), ns.calibration


def _prune_spec(ns: argparse.Namespace, pipeline: str) -> str:
    """--prune R appends prune{ratio=R} (other options: --passes 'prune{ratio=R,criterion=...}')."""
    if ns.prune is None:
        return pipeline
    try:
        ratio = float(ns.prune)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"--prune {ns.prune}: expected a ratio in [0, 1)")
    budget = ""
    if ns.accuracy_budget is not None:
        from graphopt.accuracy import parse_budget

        parse_budget(ns.accuracy_budget)  # a bad value is a one-line usage error here
        if any(c in ns.accuracy_budget for c in ",{}="):
            raise UsageError(f"--accuracy-budget: bad value {ns.accuracy_budget!r}")
        budget = f",accuracy-budget={ns.accuracy_budget}"
    return ",".join(x for x in (pipeline, f"prune{{ratio={ratio:g}{budget}}}") if x)


def _pipeline_spec(ns: argparse.Namespace, cfg: dict[str, Any]) -> str:
    if ns.passes is not None and ns.opt_level is not None:
        raise UsageError("give -O or --passes, not both (a spec may name a level: --passes '-O1,cse')")
    if ns.passes is not None:
        return str(ns.passes)
    if ns.opt_level is not None:
        return _level(str(ns.opt_level))
    if "passes" in cfg and "opt-level" in cfg:
        raise UsageError("config file: give 'passes' or 'opt-level', not both")
    if "passes" in cfg:
        return str(cfg["passes"])
    if "opt-level" in cfg:
        return _level(str(cfg["opt-level"]))
    return "-O2"


def _level(value: str) -> str:
    from graphopt.transform import OPT_LEVELS

    spec = "-O" + value
    if spec not in OPT_LEVELS:
        raise UsageError(f"unknown optimisation level -O{value} (have {', '.join(OPT_LEVELS)})")
    return spec


def _env_debug() -> bool:
    return os.environ.get("GRAPHOPT_DEBUG", "") not in ("", "0")


# --- entry point -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run graphopt-compile; returns the exit code (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    # known before parsing, so that even a crash while parsing can show its traceback
    debug = "--debug" in args or _env_debug()
    try:
        opts = parse_options(args)
        return _run(opts)
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else EXIT_OK
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except GraphoptError as e:
        from graphopt.check import NumericMismatchError
        from graphopt.transform import PassError

        cause = e.__cause__
        if isinstance(e, PassError) and cause is not None and not isinstance(cause, GraphoptError):
            # a pass crashed (a bug in the pass, not a problem with the input)
            return _internal(e, debug, str(e))
        if debug:
            traceback.print_exc()
        _error(str(e))
        return EXIT_VERIFY if isinstance(e, NumericMismatchError) else EXIT_USAGE
    except BrokenPipeError:  # `--explain ... | head`: the reader left; not an error of ours
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] in ("tvm", "tvm_ffi"):
            if debug:
                traceback.print_exc()
            _error("the compiled targets (cpu, arm64, cuda) need apache-tvm: pip install 'graphopt[tvm]'")
            return EXIT_USAGE
        return _internal(e, debug, f"internal error: {type(e).__name__}: {e}")
    except Exception as e:
        return _internal(e, debug, f"internal error: {type(e).__name__}: {e}")


def _internal(e: BaseException, debug: bool, message: str) -> int:
    if debug:
        traceback.print_exception(e)
    else:
        message += " (run with --debug or GRAPHOPT_DEBUG=1 for the traceback)"
    _error(message)
    return EXIT_INTERNAL


def _one_line(text: str) -> str:
    return " | ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _error(message: str) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _run(opts: Options) -> int:
    if opts.search is not None:
        from graphopt.pipeline_search.cli import run_search_cli

        return run_search_cli(opts.search)
    if opts.list_passes:
        return _list_passes()
    if opts.help_pass is not None:
        return _help_pass(opts.help_pass)
    if opts.print_pipeline:
        passes = _resolve(opts)
        if opts.calibration:  # replayable: the data goes into quantize's own `data` option
            import dataclasses

            passes = [dataclasses.replace(p, data=opts.calibration) if p.name == "quantize" and not getattr(p, "data", "x")
                      else p for p in passes]
        print(_format(passes))
        return EXIT_OK
    if opts.explain is not None:
        return _explain(opts)
    return _compile(opts)


def _resolve(opts: Options, log: list[str] | None = None) -> list[Any]:
    from graphopt.transform import parse_pipeline, with_contrib_ops

    log = [] if log is None else log
    first = len(log)
    passes = parse_pipeline(opts.pipeline, disable=opts.disable, log=log)
    if opts.contrib_ops:
        passes = with_contrib_ops(passes)
    for line in log[first:]:  # --disable is never silent, not even with --quiet
        _note(line)
    return passes


def _format(passes: Sequence[Any]) -> str:
    from graphopt.transform import format_pipeline

    return format_pipeline(passes)


def _list_passes() -> int:
    from graphopt.transform import list_passes
    from graphopt.transform.registry import pass_origin

    passes = list_passes()
    if not passes:
        print("(no passes registered)")
        return EXIT_OK
    import textwrap

    width = max(len(n) for n in passes)
    cols = _columns()
    for name, cls in passes.items():
        origin = pass_origin(name)
        tail = f"  [{origin}]" if origin.startswith("plugin ") else ""
        # the whole first paragraph of the docstring: wrapped under the name column on a
        # terminal, one line per pass into a pipe (grep)
        line = f"{name:<{width}}  {cls.description()}{tail}"
        print(textwrap.fill(line, width=cols, subsequent_indent=" " * (width + 2), break_on_hyphens=False) if cols else line)
    return EXIT_OK


def _columns() -> int:
    """The terminal's width for wrapped text; 0 when stdout is not a terminal."""
    if not (hasattr(sys.stdout, "isatty") and sys.stdout.isatty()):
        return 0
    return max(60, shutil.get_terminal_size((100, 24)).columns - 1)


def _help_pass(name: str) -> int:
    """--help-pass NAME: the pass's description and its options (fields) with defaults."""
    import textwrap

    from graphopt.transform import get_pass
    from graphopt.transform.registry import pass_origin

    cls = get_pass(name)  # an unknown name: UsageError with the closest match
    cols = _columns() or 100
    print(f"{cls.name}  ({pass_origin(cls.name)})")
    print(textwrap.fill(cls.description(), width=cols, initial_indent="  ", subsequent_indent="  "))
    opts = cls.options_help()
    if not opts:
        print(f"\noptions: none (in a pipeline: {cls.name})")
        return EXIT_OK
    print(f"\noptions (pipeline syntax: {cls.name}{{{opts[0]['name']}={opts[0]['default']},...}}; lists are ':'-separated):")
    w = max(len(o["name"]) for o in opts)
    tw = max(len(o["type"]) for o in opts)
    for o in opts:
        head = f"  {o['name']:<{w}}  {o['type']:<{tw}}  default {o['default']}"
        print(head)
        if o["doc"]:
            print(textwrap.fill(o["doc"], width=cols, initial_indent=" " * (w + 4), subsequent_indent=" " * (w + 4),
                                break_on_hyphens=False))
    return EXIT_OK


def _explain(opts: Options) -> int:
    import importlib

    import graphopt

    if not opts.model:
        raise UsageError("--explain needs a MODEL")
    try:
        pattern = importlib.import_module("graphopt.pattern")
    except ImportError as e:
        raise UsageError(f"--explain needs graphopt.pattern, which cannot be imported: {e}") from None
    get_rule = getattr(pattern, "get_rule", None)
    explain = getattr(pattern, "explain", None)
    if get_rule is None or explain is None:
        raise UsageError("--explain needs graphopt.pattern.get_rule and graphopt.pattern.explain")
    model = graphopt.load(opts.model)
    try:
        rule = get_rule(opts.explain)  # graphopt.pattern raises UsageError for an unknown rule
    except KeyError:
        names = ", ".join(_rule_names(pattern)) or "none"
        raise UsageError(f"unknown rule {opts.explain!r} (have: {names})") from None
    # at the rule's point in the pipeline: the passes before the first one that holds the rule
    # run first, so the answer is about the graph the rule really sees
    from graphopt.transform import optimize

    passes = _resolve(opts)
    rule_name = getattr(rule, "name", opts.explain)
    at = next((i for i, p in enumerate(passes) if any(getattr(r, "name", None) == rule_name
                                                      for r in (getattr(p, "get_rules", lambda: ())() or ()))), None)
    if at is None:
        where = f"on the input model (no pass of the pipeline {_format(passes) or '(empty)'} holds rule {rule_name!r})"
    else:
        model = optimize(model, passes[:at]) if at else model
        where = f"at its point in the pipeline: before pass {passes[at].spec()!r}, after {at} passes"
    # the rule's checks see the pass options as in a run (contrib-ops decides several targets)
    text = explain(model, rule, options={"contrib_ops": True}) if opts.contrib_ops else explain(model, rule)
    _note(f"--explain {rule_name}: checked {where}")  # (stderr: stdout is the explanation alone)
    print(str(text).rstrip("\n"))
    return EXIT_OK


def _rule_names(pattern: Any) -> list[str]:
    rules: Iterable[Any] = getattr(pattern, "list_rules", lambda: [])()
    return sorted(r if isinstance(r, str) else str(getattr(r, "name", r)) for r in rules)


# --- compiling ---------------------------------------------------------------------------------


def _compile(opts: Options) -> int:
    import graphopt
    from graphopt.check import NumericMismatchError, run_onnxruntime
    from graphopt.report import Report, op_counts, pass_details
    from graphopt.verification import reference_outputs, verify_outputs
    from graphopt.transform import NumericCheckInstrument, PassContext, TimingInstrument, optimize

    start = time.perf_counter()
    if opts.target != "onnx" and opts.target.partition("{")[0].strip() in TARGETS:  # compiled targets write an artifact folder
        from graphopt.artifact_cli import compile_artifact

        return compile_artifact(opts)
    if not opts.model:
        raise UsageError("no MODEL given (see graphopt-compile --help)")
    if not opts.output:
        raise UsageError("no output given: add -o OUT.onnx")
    if os.path.isdir(opts.output):
        raise UsageError(f"-o {opts.output} is a folder; give the path of the .onnx file to write")
    if opts.target not in TARGETS:
        raise UsageError(f"unknown target {opts.target!r} (have: {', '.join(TARGETS)})")
    if opts.inputs and not (opts.verify or opts.verify_each or opts.profile):
        raise UsageError("--inputs is only used by --verify, --verify-each or --profile; add one of them")
    tvm_only = [f for f, v in (("--tune", opts.tune), ("--tune-minutes", opts.tune_minutes), ("--tuning-db", opts.tuning_db),
                               ("--tune-shapes", opts.tune_shapes), ("--threads", opts.threads)) if v]
    if tvm_only:
        raise UsageError(f"{tvm_only[0]} is for the compiled targets (--target cpu, arm64, cuda); target onnx has no "
                         "kernels to tune (onnxruntime picks its own)")

    ctx = PassContext()
    model = load_input(opts, ctx.log)
    load_calibration_data(opts, model, ctx)
    passes = _resolve(opts, ctx.log)
    feeds = _feeds(opts, model) if (opts.verify or opts.verify_each) else None
    reference = reference_outputs(model, feeds) if opts.verify and feeds is not None else None

    report = Report(
        graphopt_version=graphopt.__version__,
        model=opts.model,
        output=opts.output,
        target=opts.target,
        pipeline=_format(passes),
        disabled=list(opts.disable),
        log=ctx.log,
        nodes_before=op_counts(model),
        size_before=_model_bytes(opts.model, model),
        notes=[line for line in ctx.log if line.startswith("input shapes:")],
    )
    timing = TimingInstrument()
    report.passes = timing.records
    instruments: list[Any] = [timing]  # ours, not optimize()'s: its records are lost when a pass fails
    if opts.verify_each:
        checker = NumericCheckInstrument(inputs=feeds, rtol=opts.rtol, atol=opts.atol)
        instruments.append(checker)
        report.verify_each = checker.checked

    with _output_folder(opts.output) as folder, _staging(folder, opts.output) as stage:
        try:
            optimized = optimize(model, passes, verify_each=opts.verify_each, dump_ir=opts.dump_ir,
                                 instruments=instruments, ctx=ctx)
        except NumericMismatchError:
            report.status = "verify-failed"
            _finish(opts, report, start)
            raise
        staged = os.path.join(stage, os.path.basename(opts.output))
        with writing(opts.output):
            graphopt.save(optimized, staged)
        if opts.check:
            _check_output(staged, opts.output)
        report.nodes_after = op_counts(optimized)
        report.details = pass_details(ctx.data)
        report.size_after = sum(os.path.getsize(os.path.join(stage, f)) for f in os.listdir(stage))
        report.warnings.extend(option_warnings(timing.records))
        if reference is not None and feeds is not None:
            # verify what was written, not the in-memory IR: this also covers export and save
            actual = run_onnxruntime(graphopt.load(staged), feeds)
            report.verify = verify_outputs(reference, actual, rtol=opts.rtol, atol=opts.atol, feeds=feeds,
                                           inputs=opts.inputs or f"random(seed={opts.seed})", thresholds=opts.verify_metric)
            if not report.verify.ok:
                report.status = "verify-failed"
                _finish(opts, report, start)
                raise NumericMismatchError(f"--verify: the compiled model's outputs differ from the original: "
                                           f"{report.verify.detail}; {opts.output} was not written")
        if opts.compare:
            from graphopt.compare import compare_models

            report.compare = compare_models(opts.model, staged, kind="onnx", model=model, eval_data=opts.eval_data,
                                            seed=opts.seed)
        if opts.profile:
            report.profile = profile_result(staged, "onnx", model, opts)
        with writing(opts.output):
            _publish(stage, folder, os.path.basename(opts.output))
    _finish(opts, report, start)
    return EXIT_OK


def _finish(opts: Options, report: Any, start: float) -> None:
    from graphopt.onnx_io import atomic_write

    report.seconds = time.perf_counter() - start
    if opts.report:
        from graphopt.html_report import charts_note, is_html, render_html

        text = render_html(report.to_dict()) if is_html(opts.report) else report.to_json()
        with writing(opts.report), _output_folder(opts.report), atomic_write(opts.report) as f:
            f.write(text.encode())
        if is_html(opts.report) and charts_note():
            _note(f"{opts.report}: {charts_note()}")
    if not opts.quiet:
        print(report.format_table(), file=sys.stderr)
    for w in report.warnings:  # (shown with --quiet too)
        print(f"{PROG}: warning: {_one_line(w)}", file=sys.stderr)


def profile_result(path: str, kind: str, model: Any, opts: Any) -> dict[str, Any]:
    """--profile: graphopt.profiler on the result at `path` (`kind` "onnx": the .onnx on
    onnxruntime's profiler, per node; else an artifact folder, per kernel) on --inputs or random
    inputs with every symbolic dim 1 (graphopt-run's default), as the report's JSON."""
    from graphopt import profiler as P
    from graphopt.check import random_inputs
    from graphopt.input_shapes import symbolic_input_dims

    if opts.inputs:
        feeds = _feeds(opts, model)
    else:
        feeds = random_inputs(model, seed=opts.seed, dim_values={d: 1 for ds in symbolic_input_dims(model).values() for d in ds})
    if kind == "onnx":
        prof = P.profile_onnx(path, feeds, threads=getattr(opts, "threads", None))
    else:
        from graphopt.runtime import load

        prof = P.profile_artifact(load(path, threads=opts.threads), feeds)
    prof.source = opts.output or path  # (the staged copy's path means nothing to the user)
    return prof.to_json()


#: passes that run only because the user asked for them: one that changes nothing is a warning
REQUESTED_PASSES = {"quantize": "--quantize", "prune": "--prune", "cluster-weights": "cluster-weights"}


def option_warnings(records: Sequence[Any]) -> list[str]:
    """A warning for each pass the user asked for (quantize, prune, cluster-weights) that
    changed nothing, with the pass's reason."""
    out = []
    for r in records:
        name = r.spec.partition("{")[0]
        if name in REQUESTED_PASSES and not r.changed:
            out.append(f"{REQUESTED_PASSES[name]} ({r.spec}) changed nothing: {r.note}")
    return out


def load_input(opts: Any, log: list[str]) -> Any:
    """The input model as every target sees it: read, verified, checked by onnx's checker
    (unless --no-check, which goes into `log`), with sparse initializers made dense."""
    import graphopt
    from graphopt.onnx_io.validate import ModelCheckError, densify_sparse_initializers

    check = getattr(opts, "check", True)
    try:
        model = graphopt.load(opts.model, check=check)
    except ModelCheckError as e:
        raise ModelCheckError(f"{e} (--no-check compiles it anyway)") from None
    if not check:
        note = f"--no-check: {opts.model} was not checked by onnx's checker"
        log.append(note)  # in the report
        if not getattr(opts, "quiet", False):
            _note(note)
    densify_sparse_initializers(model)
    for item in getattr(opts, "bind", None) or []:  # --bind NAME=VALUE: the input becomes a constant
        from graphopt.target import bind_inputs

        name, eq, value = str(item).partition("=")
        if not eq or not name.strip():
            raise UsageError(f"--bind {item}: expected NAME=VALUE")
        arr = bind_inputs(model, {name.strip(): value})[name.strip()]
        shown = arr.reshape(-1)[:4].tolist()
        log.append(f"--bind: input {name.strip()!r} fixed to {arr.dtype}{list(arr.shape)} "
                   f"{shown if arr.size > 1 else shown[0]}{' ...' if arr.size > 4 else ''}; it is no longer a model input")
        if not getattr(opts, "quiet", False):
            _note(log[-1])
    shapes, dims = getattr(opts, "input_shapes", []), getattr(opts, "dims", [])
    if shapes or dims:  # before any pass, so shape inference and the cleanup passes can fold them
        from graphopt.input_shapes import fix_input_shapes, parse_all

        log.extend(fix_input_shapes(model, *parse_all(shapes, dims)))
    return model


def load_calibration_data(opts: Any, model: Any, ctx: Any) -> None:
    """--calibration, read and checked (every file's names, ranks, dims, sample counts) before
    any pass runs, for the passes that calibrate (ctx.data["calibration"])."""
    axes_given = list(getattr(opts, "calibration_batch_axis", None) or [])
    if axes_given and not opts.calibration:
        raise UsageError("--calibration-batch-axis needs --calibration")
    if opts.calibration:
        from graphopt.calibration import load_calibration, parse_batch_axes

        axes = parse_batch_axes(axes_given)
        load_calibration(opts.calibration, model, batch_axis=axes)  # raises CalibrationError (exit 2) now
        ctx.data["calibration"] = opts.calibration  # the passes read it with their own batch-size/limit
        ctx.data["calibration-batch-axis"] = axes


def _check_output(staged: str, output: str) -> None:
    """The input passed onnx's checker, so the output must too: anything else is a bug in
    graphopt (exit 1), never a model handed to the user."""
    import onnx

    from graphopt.onnx_io.validate import ModelCheckError, check_onnx

    try:
        check_onnx(onnx.load(staged, load_external_data=False), staged)
    except ModelCheckError as e:
        message = str(e).replace(f"{staged}: ", "")
        raise RuntimeError(f"the optimized model fails onnx's checker, so {output} was not written: {message}") from None


#: errors of the file system that are the user's to fix (a read-only or full disk, no permission)
_USER_IO_ERRORS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG,
                             errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR})


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn the file system refusing a write (read-only, full, no permission) into a one-line
    error naming `path` (exit 2) instead of an internal error."""
    try:
        yield
    except OSError as e:
        if e.errno not in _USER_IO_ERRORS:
            raise
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def _feeds(opts: Options, model: Any) -> dict[str, np.ndarray]:
    from graphopt.check import random_inputs

    names = [v.name for v in model.graph.inputs if not v.is_initializer()]
    if not opts.inputs:
        return random_inputs(model, seed=opts.seed)
    try:
        with np.load(opts.inputs, allow_pickle=False) as data:
            feeds = {k: np.asarray(data[k]) for k in data.files}
    except FileNotFoundError:
        raise UsageError(f"--inputs {opts.inputs}: no such file") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--inputs {opts.inputs}: not a readable .npz file: {_one_line(str(e))}") from None
    if not isinstance(feeds, dict):  # pragma: no cover - np.load of a .npy gives an array
        raise UsageError(f"--inputs {opts.inputs}: expected a .npz archive")
    unknown = sorted(set(feeds) - set(names))
    if unknown:
        raise UsageError(f"--inputs {opts.inputs}: the model has no input {unknown[0]!r} (inputs: {', '.join(names)})")
    missing = [n for n in names if n not in feeds]
    if missing:
        raise UsageError(f"--inputs {opts.inputs}: no array for input {missing[0]!r}")
    for v in model.graph.inputs:  # one line, as graphopt-run says it, before onnxruntime's own message
        a = feeds.get(v.name)
        if a is None or v.shape is None:
            continue
        dims = v.shape.dims
        if len(dims) != a.ndim or any(isinstance(d, int) and d != s for d, s in zip(dims, a.shape)):
            want = "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"
            raise UsageError(f"--inputs {opts.inputs}: input {v.name!r}: shape {list(a.shape)} given, the model takes {want}")
        if v.dtype is not None and a.dtype != v.dtype.numpy():
            raise UsageError(f"--inputs {opts.inputs}: input {v.name!r}: dtype {a.dtype} given, the model takes {v.dtype.numpy()}")
    return feeds


def _model_bytes(path: str, model: Any) -> int:
    """The model file plus the external-data files it reads."""
    from graphopt.ir.tensor import ExternalTensor

    files = {os.path.abspath(path)}
    for g in model.graphs():
        for v in g.initializers.values():
            if isinstance(v.const_value, ExternalTensor):
                files.add(os.path.abspath(v.const_value.path))
    return sum(os.path.getsize(f) for f in files if os.path.exists(f))


@contextlib.contextmanager
def _output_folder(path: str) -> Iterator[str]:
    """The folder of `path`, created if missing; folders created here are removed again when
    the block fails, so a failed compile leaves nothing behind."""
    folder = os.path.dirname(os.path.abspath(path))
    created: list[str] = []
    probe = folder
    while not os.path.isdir(probe):
        if os.path.exists(probe):
            raise UsageError(f"cannot write {path}: {probe} is not a folder")
        created.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        for d in reversed(created):
            os.mkdir(d)
    except OSError as e:
        _rmdirs(created)
        raise UsageError(f"cannot create the output folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write {path}: folder {folder} is not writable")
    try:
        yield folder
    except BaseException:
        _rmdirs(created)
        raise


def _rmdirs(created: list[str]) -> None:
    for d in created:  # deepest first; only folders that are still empty
        with contextlib.suppress(OSError):
            os.rmdir(d)


STAGE_PREFIX = ".graphopt-compile-"


@contextlib.contextmanager
def _staging(folder: str, output: str) -> Iterator[str]:
    """A temporary folder beside the destination (same file system, so moves are renames).

    The compile holds an flock on it while it lives; the kernel drops the lock when the process
    dies, even by SIGKILL, so the next compile into this folder can tell a killed compile's
    stage (removed) from a running one's (left alone).
    """
    with writing(output):
        remove_stale_stages(folder)
        stage, fd = _locked_stage(folder)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        os.close(fd)


def _locked_stage(folder: str) -> tuple[str, int]:
    for _ in range(10):
        stage = tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=folder)
        fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):
            # another compile's cleanup may have taken it between mkdtemp and flock
            if os.stat(stage).st_ino == os.fstat(fd).st_ino:
                return stage, fd
        os.close(fd)
    raise RuntimeError(f"could not create a staging folder in {folder}")  # pragma: no cover


def remove_stale_stages(folder: str) -> list[str]:
    """Remove the staging folders of compiles that died (their lock is free); returns them."""
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(STAGE_PREFIX):
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a running compile's stage
            continue
        try:
            shutil.rmtree(path)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _publish(stage: str, folder: str, model_name: str) -> None:
    """Move the staged files into place: data files first, the model last, so the model never
    points at data that is not there yet."""
    names = sorted(os.listdir(stage), key=lambda n: (n == model_name, n))
    for name in names:
        os.replace(os.path.join(stage, name), os.path.join(folder, name))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

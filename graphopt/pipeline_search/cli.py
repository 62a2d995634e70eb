"""`graphopt-compile MODEL --search ...`: the command line of the pipeline search.

    graphopt-compile MODEL --search --eval-data val.npz [--objective latency|size]
                     [--accuracy-budget top1:1|cosine:0.99] [--trials 40] [--search-dir DIR]
                     [--search-storage URL] [--calibration cal.npz] [--target onnx] [-O2 | --passes BASE]
                     [--trial-timeout S] [--latency-batch N] [-o BEST.onnx]

-O / --passes is the base pipeline every trial starts from (default -O2); the search appends the
compression passes. The options that pick a pipeline by hand (--prune, --quantize, ...) and
those of a single compile (--verify, --compare, --profile, --report) are refused with --search.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from graphopt.errors import UsageError

PROG = "graphopt-compile"
#: flags only the search reads
SEARCH_ONLY = {"objective": "--objective", "trials": "--trials", "search_dir": "--search-dir",
               "search_storage": "--search-storage", "trial_timeout": "--trial-timeout", "latency_batch": "--latency-batch"}
#: flags of a single compile that a search does not take
REFUSED = {"prune": "--prune", "quantize": "--quantize", "calibration_method": "--calibration-method",
           "quantize_speed": "--quantize-speed", "verify": "--verify", "verify_each": "--verify-each",
           "compare": "--compare", "profile": "--profile", "report": "--report", "verify_metric": "--verify-metric",
           "tune": "--tune", "inputs": "--inputs", "disable": "--disable", "bind": "--bind", "input_shape": "--input-shape",
           "dim": "--dim", "dump_ir": "--dump-ir"}


def search_options(ns: argparse.Namespace, cfg: dict[str, Any], options_type: type) -> Any:
    """The parsed command line (and config file) as graphopt-compile's Options with `.search` set."""
    from graphopt.pipeline_search.study import Settings

    if not ns.search:
        given = next(flag for attr, flag in SEARCH_ONLY.items() if getattr(ns, attr) is not None)
        raise UsageError(f"{given} is used by --search; add it")
    for attr, flag in REFUSED.items():
        if getattr(ns, attr, None) not in (None, False, []):
            raise UsageError(f"{flag} cannot be combined with --search (the search picks the pipeline; compile "
                             f"DIR/best.toml with --config to add it)")
    model = ns.model or cfg.get("model")
    if not model:
        raise UsageError("--search needs a MODEL")
    eval_data = ns.eval_data or cfg.get("eval-data")
    if not eval_data:
        raise UsageError("--search needs --eval-data DATA.npz (samples of every input, stacked on the batch axis; a "
                         "`labels` array adds top-1 accuracy)")
    if ns.passes is not None and ns.opt_level is not None:
        raise UsageError("give -O or --passes, not both")
    base = ns.passes if ns.passes is not None else f"-O{ns.opt_level}" if ns.opt_level is not None else "-O2"
    budget = ns.accuracy_budget if ns.accuracy_budget is not None else cfg.get("accuracy-budget", "cosine:0.99")
    from graphopt.accuracy import parse_budget

    parse_budget(str(budget), labels=True)  # a bad budget: one line, exit 2, before anything runs
    if ns.trials is not None and ns.trials < 1:
        raise UsageError(f"--trials {ns.trials}: expected at least 1")
    if ns.latency_batch is not None and ns.latency_batch < 1:
        raise UsageError(f"--latency-batch {ns.latency_batch}: expected at least 1")
    if ns.trial_timeout is not None and ns.trial_timeout <= 0:
        raise UsageError(f"--trial-timeout {ns.trial_timeout:g}: expected a positive number of seconds")
    settings = Settings(
        model=str(model), eval_data=str(eval_data), directory=ns.search_dir or "graphopt-search",
        objective=ns.objective or "latency", budget=str(budget), trials=ns.trials or 40,
        target=ns.target or cfg.get("target", "onnx"), storage=ns.search_storage,
        calibration=ns.calibration or cfg.get("calibration"), base=base,
        trial_timeout=ns.trial_timeout or 900.0, latency_batch=ns.latency_batch or 1, threads=ns.threads, seed=ns.seed or 0,
        output=ns.output, quiet=bool(ns.quiet or cfg.get("quiet", False)))
    opts = options_type(model=str(model), output=ns.output, target=settings.target, quiet=settings.quiet)
    opts.search = settings
    return opts


def run_search_cli(settings: Any) -> int:
    """Run the search; 0 when it ends (a search that found nothing within the budget says so)."""
    from graphopt.pipeline_search.study import run_search

    res = run_search(settings)
    if res.best is None:
        print(f"{PROG}: warning: no trial of {len(res.trials)} held the accuracy budget ({res.budget}); "
              f"see {res.directory}/pareto.json", file=sys.stderr)
    return 0

"""Search for the best compression pipeline under an accuracy budget (`graphopt-compile --search`).

    import graphopt.search
    res = graphopt.pipeline_search.search("model.onnx", eval_data="val.npz", budget="top1:1", trials=40)
    res.best.pipeline, res.best.speedup, res.best_config      # DIR/best.toml replays it

A multi-objective Optuna study (TPE, the budget as a constraint) over prune ratio and scope,
low-rank energy, int8 per layer group and its calibration method, cluster-weights bits and
float precision; each trial compiled and measured in a child process (graphopt.pipeline_search.trial).
Needs optuna: pip install 'graphopt[search]'.

Modules: space (the choices and their pipelines), trial (one trial in a child process),
study (the Optuna study, resuming, the Pareto front), report (table, plot, pareto.json, best.toml).
"""

from __future__ import annotations

from typing import Any

from graphopt.pipeline_search.study import SearchResult, Settings, TrialRecord, reference_standing, run_search

__all__ = ["SearchResult", "Settings", "TrialRecord", "reference_standing", "run_search", "search"]


def search(model: str, eval_data: str, *, directory: str = "graphopt-search", objective: str = "latency",
           budget: str = "cosine:0.99", trials: int = 40, target: str = "onnx", **options: Any) -> SearchResult:
    """Run or resume a search (options: the fields of graphopt.pipeline_search.Settings: storage,
    calibration, base, groups, trial_timeout, latency_seconds, threads, seed, references, output,
    quiet, log)."""
    return run_search(Settings(model=model, eval_data=eval_data, directory=directory, objective=objective, budget=budget,
                               trials=trials, target=target, **options))

"""The search: a multi-objective Optuna study over the pipeline space, and its Pareto front.

    result = run_search(Settings(model="m.onnx", eval_data="val.npz", budget="top1:1", trials=40))

Objectives (both minimized): the chosen one (`latency`: the result's time over the original's,
measured paired; `size`: bytes over the original's) and the accuracy loss in the budget's metric
(1 - cosine, percent of top-1 predictions changed, -SQNR or relative error). The budget is a
constraint (Optuna's constraints_func: a violation > 0 is infeasible), so TPE learns where it
lies and the best pipeline is the fastest (or smallest) feasible one, never one over budget.

The study lives in an Optuna RDB storage (default sqlite:///DIR/study.db): a search run again
resumes it (trials already done count towards --trials; a trial whose worker died is marked
failed, its heartbeat stopped), and workers on several machines can share one storage URL.
Each trial runs in a child process (graphopt.pipeline_search.trial); a crash or a timeout is a failed
trial with its reason.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.accuracy import DEFAULT_BUDGET, Budget, parse_budget
from graphopt.errors import UsageError
from graphopt.pipeline_search.space import Space, contrib_stage, describe, layer_groups
from graphopt.pipeline_search.trial import Job, Outcome, run_trial

STUDY_NAME = "graphopt-search"
OBJECTIVES = ("latency", "size")
#: seconds between a worker's heartbeats; a running trial silent for GRACE is its worker's death
HEARTBEAT = 20
GRACE = 120
#: the fastest front trials re-measured at the end, with rounds this many times longer: one
#: trial's paired rounds on a loaded machine vary by +-30 %, and the fastest of 40 noisy figures
#: overstates its pipeline (the winner's curse)
CONFIRM = 3
#: proposals in a row that repeat measured pipelines before the search stops (a small space)
MAX_REPEATS = 30
OPTUNA_MISSING = "--search needs optuna: pip install 'graphopt[search]'"


@dataclass
class Settings:
    """A search, as the command line or graphopt.search() gives it."""

    model: str
    eval_data: str
    directory: str = "graphopt-search"
    objective: str = "latency"
    budget: str = DEFAULT_BUDGET
    trials: int = 40
    target: str = "onnx"
    storage: str | None = None  # an Optuna storage URL; default sqlite:///DIRECTORY/study.db
    calibration: str | None = None  # default: the evaluation data (said so)
    base: str = "-O2"
    groups: int = 3  # int8 layer groups
    trial_timeout: float = 900.0
    latency_seconds: float = 4.0
    latency_batch: int = 1  # samples per timed call (inputs with a symbolic batch dim)
    threads: int | None = None
    seed: int = 0
    references: bool = False  # also measure int8-alone and prune-alone (each pass with the budget itself)
    output: str | None = None  # where the best model goes (default DIRECTORY/best.onnx or best/)
    quiet: bool = False
    log: Callable[[str], None] | None = None


@dataclass
class TrialRecord:
    """One trial as pareto.json lists it."""

    number: int
    state: str  # ok | failed | crashed | timeout | died | running | duplicate (of a pipeline measured before)
    params: dict[str, Any]
    pipeline: str
    label: str
    reason: str = ""
    seconds: float | None = None
    speedup: float | None = None  # original time / result time (median of paired rounds)
    latency_ms: float | None = None
    original_ms: float | None = None
    size: int | None = None
    original_size: int | None = None
    accuracy: dict[str, float] = field(default_factory=dict)
    feasible: bool | None = None
    objectives: list[float] | None = None
    worker: str = ""
    warnings: list[str] = field(default_factory=list)  # graphopt-compile's, e.g. a pass that changed nothing
    confirmed_speedup: float | None = None  # the front's fastest and the references, re-measured with longer rounds at the end

    def to_json(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in self.__dict__.items()}


def _finite(v: Any) -> Any:
    """JSON has no inf/nan: they become strings (e.g. SQNR "inf" of an unchanged model)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


@dataclass
class SearchResult:
    trials: list[TrialRecord]
    front: list[TrialRecord]
    best: TrialRecord | None
    references: dict[str, TrialRecord]
    budget: Budget | None
    objective: str
    directory: str
    best_config: str | None = None
    best_output: str | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ objectives


def accuracy_loss(m: Mapping[str, float], budget: Budget | None) -> float:
    """The accuracy objective (minimized) in the budget's metric (cosine without a budget)."""
    metric = budget.metric if budget else "cosine"
    v = float(m[metric])
    return 1.0 - v if metric == "cosine" else -v if metric == "sqnr" else v


def violation(m: Mapping[str, float], budget: Budget | None) -> float:
    """How far `m` is over the budget (<= 0: within it), Optuna's constraint convention."""
    if budget is None:
        return 0.0
    v = float(m[budget.metric])
    if math.isnan(v):
        return math.inf
    return budget.limit - v if budget.metric in ("cosine", "sqnr") else v - budget.limit


def _channel_multiple(target: str) -> int:
    """The channel count a compiled target's convs block by (its machine model's fp32 lanes: 16
    on AVX-512, 8 on AVX2), at least 8; 8 where the target has no CPU machine model."""
    from graphopt.target import get_target

    machine = get_target(target).machine_model()
    return max(8, int(machine.lanes(32))) if machine is not None else 8


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def compared_objectives(t: TrialRecord, other: TrialRecord, objective: str = "latency") -> list[float] | None:
    """`t`'s objectives for comparing it with `other`: the latency objective from the re-measured
    speedups where both were re-measured (the same longer rounds at the end of the search: a
    reference measured at the start, under another load, is not comparable with a trial's first
    figure), else the first figures."""
    if t.objectives is None:
        return None
    if objective == "latency" and t.confirmed_speedup and other.confirmed_speedup:
        return [1.0 / t.confirmed_speedup, *t.objectives[1:]]
    return list(t.objectives)


def same_model(a: TrialRecord, b: TrialRecord) -> bool:
    """Two measured pipelines that gave the same model, as far as the search sees it: equal size
    and equal accuracy figures (e.g. the int8-alone reference and the trial quantizing every
    group with the same calibration). Their latencies differ by measurement noise only."""
    return (a.size is not None and a.size == b.size and bool(a.accuracy)
            and all(abs(a.accuracy.get(k, math.nan) - v) <= 1e-9 * max(1.0, abs(v)) for k, v in b.accuracy.items()
                    if not k.endswith(("-low", "-high")) and math.isfinite(v)))


def reference_standing(ref: TrialRecord, front: Sequence[TrialRecord], objective: str = "latency") -> dict[str, list[int]]:
    """Where a reference (int8-alone, prune-alone) stands against the front: the front trials that
    dominate it (both objectives at least as good, one better; latency re-measured in the same
    end-of-search rounds where both were) and those that are the same model (`same_model`):
    a tie, not a win, whatever the noise in their latencies says."""
    if ref.objectives is None:
        return {"dominated_by": [], "matched_by": []}
    matched = [t.number for t in front if same_model(t, ref)]
    dom = []
    for t in front:
        a, b = compared_objectives(t, ref, objective), compared_objectives(ref, t, objective)
        if a is not None and b is not None and t.number not in matched and dominates(a, b):
            dom.append(t.number)
    return {"dominated_by": dom, "matched_by": matched}


def pareto_front(trials: Sequence[TrialRecord]) -> list[TrialRecord]:
    """The feasible trials no other feasible trial dominates, by the first objective."""
    ok = [t for t in trials if t.state == "ok" and t.feasible and t.objectives is not None]
    front = [t for t in ok if not any(dominates(o.objectives, t.objectives) for o in ok if o is not t)]  # type: ignore[arg-type]
    return sorted(front, key=lambda t: (t.objectives[0], t.objectives[1]))  # type: ignore[index]


def pick_best(front: Sequence[TrialRecord]) -> TrialRecord | None:
    """The feasible trial best in the objective (the front is sorted so; ties: more accurate);
    for latency, the fastest of those re-measured at the end (CONFIRM) where they were."""
    confirmed = [t for t in front if t.confirmed_speedup is not None]
    if confirmed:
        return max(confirmed, key=lambda t: t.confirmed_speedup)  # type: ignore[arg-type, return-value]
    return front[0] if front else None


# ------------------------------------------------------------------------------------ the study


def _optuna() -> Any:
    try:
        import optuna
    except ModuleNotFoundError:
        raise UsageError(OPTUNA_MISSING) from None
    import warnings

    # our own line says what each trial did; Optuna's "experimental" notes (heartbeat, grouped
    # TPE) say nothing to a user
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def storage_url(settings: Settings) -> str:
    return settings.storage or f"sqlite:///{os.path.abspath(os.path.join(settings.directory, 'study.db'))}"


def _storage(optuna: Any, url: str) -> Any:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 120}}  # workers sharing one SQLite file wait for its lock
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT, grace_period=GRACE)
    except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, an unreachable server
        raise UsageError(f"--search-storage {url}: {str(e).splitlines()[0]}") from None


def _constraints(trial: Any) -> list[float]:
    return [float(trial.user_attrs.get("violation", 0.0))]


def _open_study(optuna: Any, settings: Settings, n_seen: int) -> Any:
    url = storage_url(settings)
    storage = _storage(optuna, url)
    # every worker seeds its own sampler differently: identical seeds would sample identical points
    seed = (settings.seed * 1_000_003 + os.getpid() * 7919 + n_seen) % (2 ** 31)
    new_api = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna >= 5: constraints set by the trial
    sampler = optuna.samplers.TPESampler(seed=seed, constraints_func=None if new_api else _constraints, multivariate=True,
                                         group=True, n_startup_trials=max(4, min(10, settings.trials // 4)))
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler,
                                    directions=["minimize", "minimize"], load_if_exists=True)
    return study


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _reap_dead(optuna: Any, study: Any) -> int:
    """Fail the running trials whose worker died: on this host by its pid, elsewhere by the
    heartbeat (Optuna's grace period). Returns how many."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    n = 0
    storage = study._storage  # (no public handle on a study's storage; Optuna's own fail_stale_trials uses it)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(t.user_attrs.get("worker", ""))
        h, _, pid = worker.rpartition(":")
        if h == host and pid.isdigit() and not _alive(int(pid)):
            tid = storage.get_trial_id_from_study_id_trial_number(study._study_id, t.number)
            storage.set_trial_user_attr(tid, "state", "died")
            storage.set_trial_user_attr(tid, "reason", f"its worker (pid {pid}) died")
            storage.set_trial_state_values(tid, TrialState.FAIL)
            n += 1
    n += len(optuna.storages.fail_stale_trials(study) or ()) if hasattr(optuna.storages, "fail_stale_trials") else 0
    return n


def _holder_alive(holder: Mapping[str, Any]) -> bool:
    """Whether the worker holding the "confirming" mark still runs (on this host: its pid; on
    another: for at most an hour after it took the mark)."""
    h, _, pid = str(holder.get("worker", "")).rpartition(":")
    if h == socket.gethostname() and pid.isdigit():
        return _alive(int(pid))
    return time.time() - float(holder.get("since", 0.0)) < 3600


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _measured(study: Any, pipeline: str, number: int) -> Any:
    """The earlier finished trial (measured, not itself a duplicate) of the same pipeline, if any."""
    for t in study.get_trials(deepcopy=False):
        if (t.number != number and t.state.is_finished() and t.user_attrs.get("pipeline") == pipeline
                and "duplicate_of" not in t.user_attrs and t.user_attrs.get("state") not in ("died", None)):
            return t
    return None


def counted(trials: Sequence[Any]) -> int:
    """Trials that count towards --trials: finished (ok or failed) or running; not enqueued ones,
    those whose worker died (the sampler may try their point again) nor duplicates (a pipeline
    measured before, answered from its figures)."""
    from optuna.trial import TrialState

    return sum(1 for t in trials if "duplicate_of" not in t.user_attrs and (
        t.state in (TrialState.COMPLETE, TrialState.RUNNING)
        or (t.state == TrialState.FAIL and t.user_attrs.get("state") not in ("died", None))))


# ------------------------------------------------------------------------------------ running


class TrialFailed(Exception):
    """A trial that compiled or measured nothing (its reason is in its user attributes)."""


class Search:
    """One worker of a search (several may share the study)."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.optuna = _optuna()
        s = settings
        if s.objective not in OBJECTIVES:
            raise UsageError(f"--objective {s.objective}: expected {' or '.join(OBJECTIVES)}")
        if s.trials < 1:
            raise UsageError(f"--trials {s.trials}: expected at least 1")
        if not os.path.isfile(s.model):
            raise UsageError(f"{s.model}: no such model file")
        if not os.path.exists(s.eval_data):
            raise UsageError(f"--eval-data {s.eval_data}: no such file or folder")
        self.budget = parse_budget(s.budget, labels=True)
        self.dir = os.path.abspath(s.directory)
        os.makedirs(os.path.join(self.dir, "trials"), exist_ok=True)
        self.notes: list[str] = []
        self.kind = "onnx" if s.target.partition("{")[0].strip() == "onnx" else "artifact"
        import graphopt
        from graphopt.compare import evaluation_batches, onnxruntime_runner

        self.model_path = os.path.abspath(s.model)
        model = graphopt.load(self.model_path)
        batches, labels, self.data_source = evaluation_batches(model, s.eval_data)
        if not batches:
            raise UsageError(f"--eval-data {s.eval_data}: holds no samples")
        self.reference = os.path.join(self.dir, "reference.npz")
        run, _ = onnxruntime_runner(self.model_path, threads=s.threads)
        outs = [list(run(b)) for b in batches]
        self.original_accuracy: float | None = None
        if labels is not None:
            from graphopt.accuracy import top1_accuracy

            self.original_accuracy = top1_accuracy(outs, labels)
        if self.budget is not None and self.budget.metric == "accuracy-drop" and labels is None:
            raise UsageError(f"--accuracy-budget {s.budget}: --eval-data {s.eval_data} has no `labels` array to "
                             "measure top-1 accuracy on (top1:P bounds the share of changed predictions instead)")
        arrays = {f"b{i}_o{j}": np.asarray(o) for i, bo in enumerate(outs) for j, o in enumerate(bo)}
        from graphopt.onnx_io import atomic_write

        with atomic_write(self.reference) as f:
            payload: dict[str, Any] = {"outputs": np.int64(len(outs[0])), **arrays}
            np.savez(f, **payload)
        if s.calibration:
            cal = os.path.abspath(s.calibration)
        else:
            cal = os.path.abspath(s.eval_data)
            self.notes.append(f"no --calibration: the passes calibrate on the evaluation data ({s.eval_data})")
        based = graphopt.optimize(model, s.base) if s.base else model  # (a copy) what the layer groups and the contrib stage read
        groups, notes = layer_groups(based, "", s.groups)
        self.notes.extend(notes)
        # onnxruntime's CPU provider has no bf16 kernels (convert-precision refuses it there); the
        # compiled targets have bf16 dot products where the host does
        precisions = ("fp32", "fp16") if self.kind == "onnx" else ("fp32", "bf16", "fp16")
        # onnxruntime's com.microsoft ops (QAttention...) only where onnxruntime runs the model
        contrib, contrib_groups = contrib_stage(based, s.base, len(groups)) if self.kind == "onnx" else ("", ())
        self.space = Space(base=s.base, groups=groups, calibration=cal, precisions=precisions,
                           round_to=_channel_multiple(s.target) if self.kind != "onnx" else 8,
                           contrib=contrib, contrib_groups=contrib_groups)

    def say(self, line: str) -> None:
        if self.s.log is not None:
            self.s.log(line)
        elif not self.s.quiet:
            print(f"graphopt-search: {line}", file=sys.stderr, flush=True)

    # -------------------------------------------------------------- one trial

    def config_text(self, pipeline: str, output: str, header: str = "") -> str:
        """A graphopt config that compiles `pipeline` (replayable: absolute model, fixed options)."""
        lines = [f"# {h}" for h in header.splitlines()] + ["[graphopt]",
                 f"model = {json.dumps(self.model_path)}",
                 f"output = {json.dumps(output)}",
                 f"target = {json.dumps(self.s.target)}",
                 f"passes = {json.dumps(pipeline)}"]
        return "\n".join(lines) + "\n"

    def measure(self, number: int, pipeline: str, folder: str) -> Outcome:
        os.makedirs(folder, exist_ok=True)
        out_name = "model.onnx" if self.kind == "onnx" else "model"
        config = os.path.join(folder, "config.toml")
        with open(config, "w") as f:
            f.write(self.config_text(pipeline, out_name))
        job = Job(number=number, config=config, output=os.path.join(folder, out_name), kind=self.kind,
                  original=self.model_path, eval_data=os.path.abspath(self.s.eval_data), reference=self.reference,
                  result=os.path.join(folder, "result.json"), seconds=self.s.latency_seconds, batch=self.s.latency_batch,
                  threads=self.s.threads)
        return run_trial(job, timeout=self.s.trial_timeout, log=os.path.join(folder, "log.txt"))

    def record(self, number: int, params: dict[str, Any], pipeline: str, label: str, o: Outcome) -> TrialRecord:
        r = TrialRecord(number, o.state, params, pipeline, label, o.reason, round(o.seconds, 2), worker=_worker_id(),
                        warnings=o.warnings)
        if o.state == "ok":
            m = o.metrics
            lat, size = m["latency"], m["size"]
            r.speedup, r.latency_ms, r.original_ms = lat["speedup"], lat["result_ms"], lat["original_ms"]
            r.size, r.original_size = size["result"], size["original"]
            r.accuracy = {k: float(v) for k, v in m["accuracy"].items()}
            if "accuracy" in r.accuracy and self.original_accuracy is not None:
                r.accuracy["accuracy-drop"] = 100.0 * (self.original_accuracy - r.accuracy["accuracy"])
            r.feasible = violation(r.accuracy, self.budget) <= 0
            primary = 1.0 / r.speedup if self.s.objective == "latency" else r.size / max(1, r.original_size)
            r.objectives = [primary, accuracy_loss(r.accuracy, self.budget)]
        return r

    def trial(self, study: Any) -> TrialRecord:
        """Run one trial through study.optimize (which keeps the trial's heartbeat going)."""
        done: list[TrialRecord] = []

        def objective(t: Any) -> list[float]:
            t.set_user_attr("worker", _worker_id())
            params = self.space.suggest(t)
            pipeline, label = self.space.pipeline(params), describe(params, self.space)
            t.set_user_attr("pipeline", pipeline)
            twin = _measured(study, pipeline, t.number)
            if twin is not None:  # TPE proposed a pipeline measured before: its figures, not another compile
                r = TrialRecord(t.number, "duplicate", params, pipeline, label, f"same pipeline as trial {twin.number}")
                done.append(r)
                for k in ("state", "reason"):
                    t.set_user_attr(k, getattr(r, k))
                t.set_user_attr("duplicate_of", twin.number)
                if twin.state.name != "COMPLETE":
                    raise TrialFailed(r.reason)
                if hasattr(t, "set_constraint"):
                    t.set_constraint("accuracy-budget", float(twin.user_attrs.get("violation", 0.0)))
                t.set_user_attr("violation", twin.user_attrs.get("violation", 0.0))
                return list(twin.values)
            o = self.measure(t.number, pipeline, os.path.join(self.dir, "trials", f"{t.number:04d}"))
            r = self.record(t.number, params, pipeline, label, o)
            done.append(r)
            for k, v in r.to_json().items():
                if k not in ("number", "params", "pipeline", "worker"):
                    t.set_user_attr(k, v)
            if r.state != "ok" or r.objectives is None:
                raise TrialFailed(r.reason)
            v = violation(r.accuracy, self.budget)
            t.set_user_attr("violation", v)
            if hasattr(t, "set_constraint"):  # Optuna >= 5; before it, the sampler's constraints_func reads the attr
                t.set_constraint("accuracy-budget", v)
            return r.objectives

        study.optimize(objective, n_trials=1, catch=(TrialFailed,))
        return done[0]

    # -------------------------------------------------------------- references

    def references(self, study: Any) -> dict[str, TrialRecord]:
        """int8-alone and prune-alone as a user runs them (each pass holding the budget itself),
        measured once per study like a trial, kept in the study's attributes."""
        have = study.user_attrs.get("references") or {}
        out = {k: _from_json(v) for k, v in have.items()}
        if not self.s.references:
            return out
        budget = self.s.budget if self.budget else "none"
        if self.budget is not None and self.budget.metric == "accuracy-drop":
            # a pass measures against the original, not the labels: changed predictions bound the drop
            budget = f"top1:{self.budget.limit:g}"
        cal = self.space.calibration
        wanted = {
            "int8-alone": f"{self.s.base},quantize{{scheme=int8,accuracy-budget={budget},data={cal}}}",
            "prune-alone": f"{self.s.base},prune{{ratio=0.5,accuracy-budget={budget},calibration={cal}}}",
        }
        for name, pipeline in wanted.items():
            if name in out:
                continue
            self.say(f"reference {name}: {pipeline}")
            o = self.measure(-1, pipeline, os.path.join(self.dir, "references", name))
            r = self.record(-1, {}, pipeline, name, o)
            out[name] = r
            self.say(f"reference {name}: {line_of(r, self.budget)}")
            have[name] = r.to_json()
            study.set_user_attr("references", have)
        return out

    # -------------------------------------------------------------- the loop

    def run(self) -> SearchResult:
        from optuna.trial import TrialState

        optuna = self.optuna
        study = _open_study(optuna, self.s, 0)
        attrs = study.user_attrs
        mine = {"objective": self.s.objective, "budget": str(self.s.budget).strip().lower(), "target": self.s.target,
                "model": os.path.basename(self.model_path), "groups": len(self.space.groups), "base": self.s.base}
        if "settings" in attrs:
            theirs = attrs["settings"]
            diff = [k for k in mine if theirs.get(k) != mine[k]]
            if diff:
                k = diff[0]
                raise UsageError(f"the study in {storage_url(self.s)} was made with {k} {theirs.get(k)!r}, not "
                                 f"{mine[k]!r}: give another --search-dir (or --search-storage) for a new search")
        else:
            study.set_user_attr("settings", mine)
            # (int8 with SmoothQuant, int8 after the contrib-op fusions: where the space offers them)
            extra = [q for q in (self.space.int8_smoothed(), self.space.int8_contrib()) if q]
            for p in (self.space.baseline(), self.space.int8_everywhere(), *extra):
                study.enqueue_trial(p, skip_if_exists=True)  # known points first: TPE starts from them
        died = _reap_dead(optuna, study)
        done = counted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)))
        for line in self.notes:
            self.say(line)
        self.say(f"study {storage_url(self.s)}: {done} of {self.s.trials} trials done"
                 + (f", {died} whose worker died marked failed" if died else "")
                 + f"; objectives: {self.s.objective} and accuracy ({self.budget or 'no budget'}) on {self.data_source}")
        refs = self.references(study)
        repeats = 0
        while counted(study.get_trials(deepcopy=False)) < self.s.trials:
            r = self.trial(study)
            repeats = repeats + 1 if r.state == "duplicate" else 0
            if repeats >= MAX_REPEATS:
                self.say(f"stopping: the last {repeats} proposals were pipelines measured before (the space is exhausted)")
                break
            if r.state == "duplicate":
                continue
            n = counted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)))
            self.say(f"trial {r.number} ({n}/{self.s.trials}): {r.label}: {line_of(r, self.budget)}")
        return self.finish(study, refs)

    def finish(self, study: Any, refs: dict[str, TrialRecord]) -> SearchResult:
        from graphopt.pipeline_search.report import write_outputs

        # re-measuring is timing: first wait for the other workers' trials and re-measures, then
        # read the study as they left it (their trials, their re-measured figures)
        turn = self.s.objective == "latency" and self.quiet_turn(study)
        trials = [_from_frozen(t, self.space) for t in study.get_trials(deepcopy=False)]
        confirmed = study.user_attrs.get("confirmed") or {}
        for t in trials:
            t.confirmed_speedup = confirmed.get(str(t.number))
        for name, r in (study.user_attrs.get("references") or {}).items():
            if name in refs and r.get("confirmed_speedup") is not None:
                refs[name].confirmed_speedup = r["confirmed_speedup"]
        front = pareto_front(trials)
        if turn:
            try:
                self.confirm(study, front[:CONFIRM])
                self.confirm_references(study, refs)
            finally:
                study.set_user_attr("confirming", {})
        best = pick_best(front)
        res = SearchResult(trials, front, best, refs, self.budget, self.s.objective, self.dir, notes=list(self.notes))
        write_outputs(self, res)
        self.prune_outputs(trials, front)
        return res

    def quiet_turn(self, study: Any) -> bool:
        """Wait until no other worker of the study runs a trial or re-measures, then hold the
        study's "confirming" mark: re-measuring is timing, and two workers re-measuring beside each
        other's compiles read each other's load (a MiniLM reference read 1.98x and 1.81x so).
        False (and one line) where the wait passed its limit: the first figures then stand."""
        from optuna.trial import TrialState

        me, said = _worker_id(), False
        limit = time.monotonic() + self.s.trial_timeout + 60
        while time.monotonic() < limit:
            _reap_dead(self.optuna, study)
            running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                       if t.user_attrs.get("worker") != me]
            holder = study.user_attrs.get("confirming") or {}
            other = holder.get("worker") not in (None, me) and _holder_alive(holder)
            if not running and not other:
                study.set_user_attr("confirming", {"worker": me, "since": time.time()})
                time.sleep(1.0)  # two workers marking at once: the last write holds it
                if (study.user_attrs.get("confirming") or {}).get("worker") == me:
                    return True
                continue
            if not said:
                who = f"trial {running[0].number} of worker {running[0].user_attrs.get('worker')}" if running else \
                    f"worker {holder.get('worker')} re-measuring"
                self.say(f"waiting for {who} before re-measuring the front (timing beside it reads its load)")
                said = True
            time.sleep(5.0)
        self.say("re-measuring skipped: other workers stayed busy past the trial timeout; the first figures stand")
        return False

    def confirm(self, study: Any, fastest: Sequence[TrialRecord]) -> None:
        """Re-measure the latency of `fastest` (their compiled outputs, not compiled again) with
        CONFIRM times longer rounds; kept in the study, so a resumed search does not redo it."""
        for t in fastest:
            if t.confirmed_speedup is not None:
                continue
            folder = os.path.join(self.dir, "trials", f"{t.number:04d}")
            speedup = self.remeasure(t.number, folder)
            if speedup is None:
                self.say(f"trial {t.number}: re-measuring failed; its first figure stands")
                continue
            t.confirmed_speedup = speedup
            # (a finished trial's attributes are frozen: the study keeps the re-measured figures)
            confirmed = dict(study.user_attrs.get("confirmed") or {})
            confirmed[str(t.number)] = t.confirmed_speedup
            study.set_user_attr("confirmed", confirmed)
            self.say(f"trial {t.number}: re-measured {t.confirmed_speedup:.2f}x speed (first {t.speedup:.2f}x): {t.label}")

    def confirm_references(self, study: Any, refs: Mapping[str, TrialRecord]) -> None:
        """Re-measure the references in the same longer rounds as the front (right after it), so
        that whether the front dominates them is judged on figures measured under the same
        conditions; kept in the study's "references" attribute."""
        have = dict(study.user_attrs.get("references") or {})
        for name, r in refs.items():
            if r.state != "ok" or r.confirmed_speedup is not None:
                continue
            speedup = self.remeasure(-1, os.path.join(self.dir, "references", name))
            if speedup is None:
                self.say(f"reference {name}: re-measuring failed; its first figure stands")
                continue
            r.confirmed_speedup = speedup
            if name in have:
                have[name] = {**have[name], "confirmed_speedup": speedup}
                study.set_user_attr("references", have)
            self.say(f"reference {name}: re-measured {speedup:.2f}x speed (first {r.speedup:.2f}x)")

    def remeasure(self, number: int, folder: str) -> float | None:
        """The speedup of the compiled output in `folder` (not compiled again), paired against the
        original in CONFIRM times longer rounds; None where it is gone or the run failed."""
        out = os.path.join(folder, "model.onnx" if self.kind == "onnx" else "model")
        if not os.path.exists(out):
            return None
        job = Job(number=number, config=os.path.join(folder, "config.toml"), output=out, kind=self.kind,
                  original=self.model_path, eval_data=os.path.abspath(self.s.eval_data), reference=self.reference,
                  result=os.path.join(folder, "confirm.json"), seconds=CONFIRM * self.s.latency_seconds,
                  batch=self.s.latency_batch, threads=self.s.threads, compile=False)
        o = run_trial(job, timeout=self.s.trial_timeout, log=os.path.join(folder, "confirm.log"))
        return float(o.metrics["latency"]["speedup"]) if o.state == "ok" else None

    def prune_outputs(self, trials: Sequence[TrialRecord], front: Sequence[TrialRecord]) -> None:
        """Delete the compiled models of trials off the front (a MiniLM trial is 90 MB): their
        configs and measurements stay, and any of them compiles again from its config.toml."""
        keep = {t.number for t in front}
        for t in trials:
            if t.number in keep or t.state == "running":
                continue
            for name in ("model.onnx", "model"):
                p = os.path.join(self.dir, "trials", f"{t.number:04d}", name)
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                elif os.path.exists(p):
                    os.remove(p)


def line_of(r: TrialRecord, budget: Budget | None) -> str:
    """One line of a trial's figures: `1.84x faster, 0.41 MB (0.38x), top1 0.3 % ok`."""
    if r.state != "ok":
        return f"{r.state}: {r.reason}"
    acc = r.accuracy
    metric = budget.metric if budget else "cosine"
    v = acc.get(metric, float("nan"))
    shown = f"{metric} {v:.5f}" if metric == "cosine" else f"{metric} {v:.2f}" + (" %" if metric == "top1" else "")
    verdict = "within budget" if r.feasible else f"over budget ({budget})"
    extra = f", top-1 accuracy {acc['accuracy'] * 100:.2f} %" if "accuracy" in acc else ""
    said = f"; {r.warnings[0]}" if r.warnings else ""
    again = f" (re-measured {r.confirmed_speedup:.2f}x)" if r.confirmed_speedup is not None else ""
    return (f"{r.speedup:.2f}x speed{again}, {(r.size or 0) / 1e6:.3f} MB ({(r.size or 0) / max(1, r.original_size or 1):.2f}x), "
            f"{shown}{extra}, {verdict} ({r.seconds:.0f} s){said}")


def _from_json(d: Mapping[str, Any]) -> TrialRecord:
    fields = TrialRecord.__dataclass_fields__
    return TrialRecord(**{k: v for k, v in d.items() if k in fields})


def _from_frozen(t: Any, space: Space) -> TrialRecord:
    from optuna.trial import TrialState

    ua = t.user_attrs
    # a failed trial without our state attribute: Optuna failed it when its heartbeat stopped
    state = ua.get("state") or {TrialState.RUNNING: "running", TrialState.FAIL: "died"}.get(t.state, t.state.name.lower())
    params = dict(t.params)
    r = TrialRecord(t.number, state, params, ua.get("pipeline", space.pipeline(params)), describe(params, space),
                    ua.get("reason", ""), ua.get("seconds"), ua.get("speedup"), ua.get("latency_ms"), ua.get("original_ms"),
                    ua.get("size"), ua.get("original_size"), dict(ua.get("accuracy") or {}), ua.get("feasible"),
                    list(t.values) if t.state == TrialState.COMPLETE and t.values else None, ua.get("worker", ""),
                    list(ua.get("warnings") or []))
    if t.state == TrialState.RUNNING:
        r.state = "running"
    r.accuracy = {k: float(v) for k, v in r.accuracy.items()}  # ("inf" strings back to floats)
    return r


def run_search(settings: Settings) -> SearchResult:
    """Run (or resume) a search; see the module docstring."""
    return Search(settings).run()

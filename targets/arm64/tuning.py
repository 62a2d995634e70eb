"""meta_schedule tuning of arm64 kernels, measured on the device through TVM RPC.

    summary = rpc_tune(mod, target, db_dir="db/", trials=64, tracker="10.0.0.5:9190", key="rk3588")
    # then the usual database application: tvm_tuning.apply_database(mod, target, "db/")

Candidates are built on this machine and linked with the aarch64 cross compiler (the builder's
export function), then uploaded to an RPC server that the tracker hands out under `key`, loaded
and timed there (meta_schedule's RPCRunner). The records go to the same JSON database format
as the cpu target's tuning (`graphopt.targets.tvm.tuning.tuner`), so `apply_database` and the
database's reuse work the same. Keep one database per device: records carry no device filter
when they are applied, so this refuses a folder tuned for another target triple.

Only conv/matmul kernels are tuned by default (`kernels="anchor"`), as for the cpu target.
The tuning runs in this process (unlike tvm.tuning.tuner's isolated child); the ARM tensor
intrinsics (dotprod) stay importable, the GPU ones are stubbed out (TVM-NOTES trap 4).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from graphopt.errors import GraphoptError

_TARGET_FILE = "graphopt_target.json"


def _export_aarch64(mod: Any) -> str:
    """The builder's export function (runs in a builder worker): link with the cross compiler."""
    import tempfile

    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="graphopt-arm64-cand-"), "cand.so")
    mod.export_library(path, fcompile=cc.cross_compiler(os.environ.get("GRAPHOPT_ARM64_CXX", "aarch64-linux-gnu-g++")))
    return path


def _worker_init() -> None:
    from graphopt.targets.tvm.build import cpu_only_intrinsics

    cpu_only_intrinsics()


def _check_db_target(db_dir: str, target: Any) -> None:
    path = os.path.join(db_dir, _TARGET_FILE)
    d = dict(target.export())
    mine = {"mtriple": str(d.get("mtriple")), "mcpu": str(d.get("mcpu")), "mattr": sorted(str(x) for x in d.get("mattr", ()))}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            theirs = json.load(f)
        if theirs.get("mtriple") != mine["mtriple"]:
            raise GraphoptError(f"tuning database {db_dir} holds records for {theirs.get('mtriple')}, not {mine['mtriple']}: "
                                "use one database per device")
        return
    os.makedirs(db_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(mine, f)


def parse_tracker(tracker: str) -> tuple[str, int]:
    host, sep, port = tracker.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise GraphoptError(f"rpc={tracker!r} is not HOST:PORT of a TVM RPC tracker")
    return host, int(port)


def rpc_tune(
    mod: Any,
    target: Any,
    *,
    db_dir: str,
    trials: int,
    tracker: str,
    key: str,
    cxx: str | None = None,
    minutes: float | None = None,
    kernels: str = "anchor",
    trials_per_iter: int = 16,
    session_timeout: float = 300.0,
    builder_timeout: float = 300.0,
    progress: bool = False,
    seed: int | None = None,
) -> dict[str, Any]:
    """Tune the PrimFuncs of `mod` (after FuseTIR) into `db_dir`, measuring on the RPC device."""
    from graphopt.targets.tvm.build import cpu_only_intrinsics

    cpu_only_intrinsics()
    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.tvm.schedules import is_tunable_kernel

    if trials <= 0:
        raise GraphoptError("rpc tuning needs a positive trial budget")
    host, port = parse_tracker(tracker)
    db_dir = os.path.abspath(db_dir)
    _check_db_target(db_dir, target)
    if cxx:
        os.environ["GRAPHOPT_ARM64_CXX"] = cxx  # the builder workers inherit it
    t0 = time.monotonic()
    tasks = ms.relax_integration.extract_tasks(mod, target)
    chosen = [t for t in tasks if kernels == "all" or is_tunable_kernel(t.dispatched[0]["main"])]
    summary: dict[str, Any] = {"status": "tuned", "via": f"rpc {host}:{port} key {key}", "db": db_dir,
                               "tasks_total": len(tasks), "tasks_selected": len(chosen), "trials": trials}
    if not chosen:
        summary["status"] = "nothing to tune"
        return summary
    contexts = [
        ms.TuneContext(mod=t.dispatched[0], target=target, space_generator="post-order-apply",
                       search_strategy=ms.search_strategy.EvolutionarySearch(population_size=64, init_min_unmeasured=8),
                       task_name=t.task_name, num_threads=1,
                       rand_state=int(seed) if seed is not None else -1, logger=None).clone()
        for t in chosen
    ]
    builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=builder_timeout, f_export=_export_aarch64,
                                      initializer=_worker_init)
    runner = ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                       session_timeout_sec=int(session_timeout)),
        evaluator_config=ms.runner.EvaluatorConfig(number=2, repeat=1, min_repeat_ms=0, enable_cpu_cache_flush=False),
        max_workers=1,
    )
    database = ms.database.JSONDatabase(work_dir=db_dir, module_equality="structural")
    before = len(database)
    per_task = max(1, -(-trials // len(chosen)))
    per_iter = max(1, min(trials_per_iter, per_task))
    errors: dict[str, str] = {}
    spent = 0
    for t, ctx in zip(chosen, contexts):
        if spent >= trials or (minutes is not None and time.monotonic() - t0 > 60.0 * minutes):
            break
        want = min(per_task, trials - spent)
        try:
            ms.tune.tune_tasks(
                tasks=[ctx], task_weights=[float(t.weight)], work_dir=db_dir, max_trials_global=want,
                max_trials_per_task=want, num_trials_per_iter=min(per_iter, want), builder=builder, runner=runner,
                database=database, cost_model=ms.cost_model.RandomModel() if trials < 64 else "xgb",
                task_scheduler="round-robin",
            )
        except Exception as e:  # one task's search-space failure must not stop the others
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            errors[t.task_name] = (lines[-1] if lines else type(e).__name__)[:200]
        spent += want
    if errors:
        summary["task_errors"] = errors
    new = list(database.get_all_tuning_records())[before:]
    records = len(new)
    failed = sum(1 for r in new if not r.run_secs or min(float(x) for x in r.run_secs) >= 1e9)  # 1e10: failed run
    best: dict[str, float] = {}
    for t in chosen:
        rec = database.query_tuning_record(t.dispatched[0], target, t.task_name)
        if rec is not None and rec.run_secs and min(float(x) for x in rec.run_secs) < 1e9:
            best[t.task_name] = 1e3 * float(sum(float(x) for x in rec.run_secs) / len(rec.run_secs))
    summary.update(new_records=records, failed_records=failed, best_ms=best, seconds=round(time.monotonic() - t0, 1),
                   note="timings of an emulated device (qemu) mean nothing" if host in ("127.0.0.1", "localhost") else "")
    if records == failed:
        summary["status"] = "no measurement succeeded"
    if progress:
        print(f"rpc tune: {records} measured records in {summary['seconds']} s ({len(chosen)} tasks)", flush=True)
    if minutes is not None:
        summary["minutes"] = minutes  # checked between tasks
    return summary

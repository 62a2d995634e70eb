"""Tuning (graphopt.targets.tvm.tuning.tuner): a persistent database that later calls reuse, survival
of crashing workers and of a killed tuning process (resume), applying the database."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
relax = pytest.importorskip("tvm.relax")
for _dep in ("xgboost", "psutil", "cloudpickle", "tornado"):
    pytest.importorskip(_dep)

from tvm_kernels import fuse, host_target as _target  # noqa: E402

from graphopt.targets.tvm.tuning import tuner as tvm_tuning  # noqa: E402
from graphopt.targets.tvm.tuning.tuner import apply_database, last_summary, repair_database, tune  # noqa: E402

TT = relax.TensorType


def _matmul_relu(m=32, k=32, n=32, name_suffix=""):
    bb = relax.BlockBuilder()
    x = relax.Var("x", TT((m, k), "float32"))
    w = relax.Var("w", TT((k, n), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.matmul(x, w)))
            z = bb.emit(relax.op.nn.softmax(y))  # a second kernel, not tuned by default
            out = bb.emit_output(z)
        bb.emit_func_output(out)
    return fuse(bb.get())


def _records(db_dir):
    path = os.path.join(db_dir, "database_tuning_record.json")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _apply_and_check(db):
    """The database applies (the matmul kernel comes from it unless its default schedule won,
    softmax never) and the tuned + default-scheduled module keeps its numbers."""
    from tvm.relax.backend.cpu_generic import pipeline as cp

    from graphopt.targets.tvm.schedules import apply_default_schedules

    (entry,) = json.load(open(os.path.join(db, "graphopt_ledger.json"))).values()
    tuned = apply_database(_matmul_relu(), _target(), db)
    sched = {gv.name_hint: bool(f.attrs and f.attrs.get("tirx.is_scheduled"))
             for gv, f in tuned.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert sorted(sched.values()) == ([False, False] if entry["kept"] == "default" else [False, True]), sched
    full = apply_default_schedules(tuned, _target())
    seq = tvm.transform.Sequential(cp.dataflow_lower_passes(_target()) + cp.finalize_passes(_target()))
    vm = relax.VirtualMachine(tvm.compile(full, target=_target(), relax_pipeline=seq), tvm.cpu())
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((32, 32)).astype(np.float32), rng.standard_normal((32, 32)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    r = np.maximum(x @ w, 0)
    e = np.exp(r - r.max(-1, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(-1, keepdims=True), rtol=1e-4, atol=1e-5)


def _check_kept_the_faster(db, summary):
    """Tuning never loses: the default schedule was measured beside the tuned candidates and
    committed as a record, the database's best is the faster of the two, and applying the
    database gives exactly the default schedule when it won (a tuned one when it did not)."""
    import tvm_ffi

    from graphopt.targets.tvm.schedules import apply_default_schedules
    from graphopt.targets.tvm.tuning.tuner import kept_schedules

    ledger = json.load(open(os.path.join(db, "graphopt_ledger.json")))
    (entry,) = ledger.values()
    assert entry["default_ms"] > 0 and entry["best_ms"] > 0 and entry["default_rule"] == "outer-product", entry
    # the finalists were run again back to back (paired) and that comparison decides
    paired = entry.get("paired")
    assert paired is not None and paired["ratio"] > 0 and entry["paired_for"] == [entry["default_ms"], entry["best_ms"]], entry
    first = "default" if entry["default_ms"] <= entry["best_ms"] else "tuned"
    want = paired["winner"]
    # (the runner-up swaps in only when faster by the margin: near-equal schedules keep their order)
    assert paired["swapped"] == (want != first) == (paired["ratio"] < tvm_tuning.PAIRED_MARGIN), entry
    assert entry["kept"] == want, entry
    assert summary["kept"] == {entry["name"]: {"kept": want, "default_ms": entry["default_ms"],
                                               "tuned_ms": entry["best_ms"]}}, summary
    assert kept_schedules(db) == {want: 1}
    # the database's best record is the faster one; the default one is marked as such
    recs = _records(db)
    best = min((float(np.mean(r[1][1])), tvm_tuning.DEFAULT_MARK in json.dumps(r)) for r in recs if r[1][1])
    if paired["swapped"]:  # the runner-up recommitted on the best one's scale: best time x paired ratio
        assert best[0] * 1e3 == pytest.approx(min(entry["default_ms"], entry["best_ms"]) * paired["ratio"], rel=1e-6)
    else:
        assert best[0] * 1e3 == pytest.approx(min(entry["default_ms"], entry["best_ms"]), rel=1e-6)
    assert best[1] == (want == "default")
    assert sum(tvm_tuning.DEFAULT_MARK in json.dumps(r) for r in recs) == 1 + (paired["swapped"] and want == "default")
    # applied: a tuned kernel when it won; when the default won, the kernel is left to today's
    # default schedules (not the recorded one), which then give exactly the default schedule
    mod = _matmul_relu()
    applied = apply_database(mod, _target(), db)
    name = entry["name"]
    assert tvm_ffi.structural_equal(applied[name], mod[name]) == (want == "default")
    final = apply_default_schedules(applied, _target())
    default = apply_default_schedules(mod, _target())
    assert tvm_ffi.structural_equal(final[name].body, default[name].body) == (want == "default")


def test_tune_writes_database_that_a_second_call_reuses(tmp_path):
    """4 trials on one small matmul: records committed, ledger counts them, progress events
    come; the same workload again (a fresh module, as another compile builds it) does no new
    trial; the database applies and the result keeps its numbers."""
    db = str(tmp_path / "db")
    events = []
    tune(_matmul_relu(), _target(), db_dir=db, trials=4, trials_per_iter=4, progress=events.append, threads=2)
    s = last_summary(db)
    assert s["new_trials"] == 4 and s["stopped"] == "done", s
    assert s["tasks_selected"] == 1 and s["tasks_total"] == 2, s  # softmax is not tuned
    assert len(_records(db)) >= 1
    assert any(ev["ev"] == "batch" and ev.get("best_ms") for ev in events)
    ledger = json.load(open(os.path.join(db, "graphopt_ledger.json")))
    assert [v["trials"] for v in ledger.values()] == [4]

    _check_kept_the_faster(db, s)

    n_before = len(_records(db))
    tune(_matmul_relu(), _target(), db_dir=db, trials=4, trials_per_iter=4, progress=False, threads=2)
    s2 = last_summary(db)
    assert s2["new_trials"] == 0 and s2["tasks_skipped_done"] == 1, s2
    assert len(_records(db)) == n_before
    _apply_and_check(db)


@pytest.mark.slow
def test_tune_survives_worker_crash_and_killed_process(tmp_path, monkeypatch):
    """A builder worker segfaults on its first build and the tuning process is killed after
    its first batch: the crash only fails that candidate, the killed process is restarted and
    resumes from the database, and the budget is met exactly."""
    db = str(tmp_path / "db")
    monkeypatch.setenv("GRAPHOPT_TUNE_TEST_CRASH_BUILDS", "1")
    monkeypatch.setenv("GRAPHOPT_TUNE_TEST_CRASH_FILE", str(tmp_path / "crashes"))
    monkeypatch.setenv("GRAPHOPT_TUNE_TEST_KILL_AFTER", "4")
    tune(_matmul_relu(), _target(), db_dir=db, trials=8, trials_per_iter=4, progress=False, threads=2)
    s = last_summary(db)
    assert (tmp_path / "crashes").read_text() == "x"  # the builder worker really crashed once
    assert os.path.exists(os.path.join(db, ".test-killed"))  # and the tuning process was killed
    assert s["restarts"] == 1, s
    assert s["new_trials"] == 8 and s["failed_trials"] >= 1, s
    ledger = json.load(open(os.path.join(db, "graphopt_ledger.json")))
    assert [v["trials"] for v in ledger.values()] == [8]
    _apply_and_check(db)


@pytest.mark.slow
def test_time_budget_stops_tuning(tmp_path):
    db = str(tmp_path / "db")
    tune(_matmul_relu(64, 64, 64), _target(), db_dir=db, trials=1000, minutes=0.3, trials_per_iter=4,
         progress=False, threads=2)
    s = last_summary(db)
    assert s["stopped"] == "time budget", s
    assert 0 < s["new_trials"] < 1000 and s["seconds"] < 0.3 * 60 + 60, s


def test_zero_trials_and_no_tunable_kernels_do_not_start_tuning(tmp_path):
    db = str(tmp_path / "db")
    tune(_matmul_relu(), _target(), db_dir=db, trials=0, progress=False)
    assert last_summary(db)["new_trials"] == 0
    assert os.path.exists(os.path.join(db, "graphopt_last_tune.json"))
    with pytest.raises(ValueError):
        tune(_matmul_relu(), _target(), db_dir=db, trials=-1)
    with pytest.raises(ValueError):
        tune(_matmul_relu(), _target(), db_dir=db, trials=4, kernels="some")


def test_apply_database_without_database_changes_nothing(tmp_path):
    mod = _matmul_relu()
    assert apply_database(mod, _target(), str(tmp_path / "missing")) is mod


def test_repair_drops_a_cut_last_line(tmp_path):
    db = tmp_path / "db"
    db.mkdir()
    rec = db / "database_tuning_record.json"
    rec.write_text('[0, [1]]\n[0, [2]]\n[0, [3')  # a process killed mid-write
    (db / "database_workload.json").write_text('["123", "{}"]\n')
    assert repair_database(str(db)) == 1
    assert rec.read_text() == "[0, [1]]\n[0, [2]]\n"
    assert repair_database(str(db)) == 0


def test_unused_intrinsics_for_x86_without_vnni():
    t = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
    assert tvm_tuning._unused_intrinsics(t) == ["arm_cpu", "x86"]
    t = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "icelake-server"})
    assert tvm_tuning._unused_intrinsics(t) == ["arm_cpu"]
    t = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
    assert tvm_tuning._unused_intrinsics(t) == ["x86"]


def test_symbolic_shape_kernels_are_not_tuned(tmp_path):
    """meta_schedule's design spaces fail on symbolic shapes (a dynamic batch): such kernels are
    counted and left to the default schedules instead of failing as tasks."""
    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", TT((n, 32), "float32"))
    w = relax.Var("w", TT((32, 32), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.relu(relax.op.matmul(x, w)))
        bb.emit_func_output(out)
    mod = bb.get()
    for p in (relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
              relax.transform.FuseOps(), relax.transform.FuseTIR()):
        mod = p(mod)
    db = str(tmp_path / "db")
    tune(mod, _target(), db_dir=db, trials=8, progress=False, threads=2)
    s = last_summary(db)
    assert s["tasks_dynamic"] == 1 and s["tasks_selected"] == 0 and s["new_trials"] == 0, s
    assert s["stopped"] == "done" and not s["error"], s


def _graphopt_conv_kernel():
    """Conv(+bias)+Relu lowered the way the cpu target does (graphopt's kernel groups): the bias
    arrives as an argument and is reshaped inside the kernel."""
    from onnx import TensorProto, helper, numpy_helper

    import graphopt
    from graphopt.passes.fusion.kernel_groups import PlanKernels
    from graphopt.targets.tvm.lower import lowerer as L
    from graphopt.transform import PassContext

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "B")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 10, 10])], initializer=[w, b])
    m = graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    m = graphopt.optimize(m, "-O2")
    PlanKernels().run(m, PassContext())
    _, mod = L.lower_and_fuse(m, _target())
    return mod


def test_normalize_for_tuning_makes_graphopt_conv_kernels_tunable():
    """meta_schedule's design space fails on a conv kernel whose bias is reshaped inside it;
    after normalize_for_tuning (the reshape inlined) it generates, and the numbers are kept."""
    tvm_tuning.cpu_only_intrinsics()  # (meta_schedule imports the GPU intrinsics otherwise: ~35 s)
    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.tvm.tuning.tuner import normalize_for_tuning

    mod = _graphopt_conv_kernel()
    norm = normalize_for_tuning(mod)
    convs = [gv.name_hint for gv, f in mod.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in f.script()]
    assert len(convs) == 1
    (name,) = convs
    assert "T_reshape" in mod[name].script() and "T_reshape" not in norm[name].script()

    def spaces(f):
        ctx = ms.TuneContext(mod=tvm.IRModule({"main": f}), target=_target(), space_generator="post-order-apply",
                             search_strategy="evolutionary", num_threads=2)
        return ctx.generate_design_space()

    with pytest.raises(Exception, match="producer"):
        spaces(mod[name])
    assert len(spaces(norm[name])) >= 1
    assert normalize_for_tuning(norm) is norm  # nothing left to do
    # the normalized kernel computes the same
    from tvm.relax.backend.cpu_generic import pipeline as cp

    seq = tvm.transform.Sequential(cp.dataflow_lower_passes(_target()) + cp.finalize_passes(_target()))
    rng = np.random.default_rng(1)
    args = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in v.ty.shape]).astype(np.float32))
            for v in mod["main"].params]
    outs = [relax.VirtualMachine(tvm.compile(m, target=_target(), relax_pipeline=seq), tvm.cpu())["main"](*args).numpy()
            for m in (mod, norm)]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_paired_check_reorders_records_measured_under_different_load(tmp_path):
    """The default schedule's record was measured at a busy moment (10x its time) and a naive
    (unscheduled) candidate's at a quiet one: the database ranks the naive one first. Run back
    to back, the default is faster: it is recommitted on the naive record's scale and becomes the
    best (marked default, so apply_database gives today's default schedule); a second check
    leaves the order alone."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.tvm.schedules import default_schedule

    tvm_tuning.cpu_only_intrinsics()
    mod = tvm_tuning.normalize_for_tuning(_matmul_relu(m=64, k=64, n=64))
    name = next(gv.name_hint for gv, f in mod.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint)
    task = tvm.IRModule({"main": mod[name].with_attr("global_symbol", "main")})
    target = _target()
    db = ms.database.JSONDatabase(work_dir=str(tmp_path), module_equality="structural")
    workload = db.commit_workload(task)
    info = ms.arg_info.ArgInfo.from_entry_func(task, remove_preproc=True)
    sch, rule, _ = default_schedule(task["main"], target)
    sch.annotate(sch.get_sblock(task["main"].body.block.name_hint), tvm_tuning.DEFAULT_MARK, str(rule))
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, run_secs=[1e-2], target=target, args_info=info))
    naive = s_tir.Schedule(task)  # (an empty trace is not ranked by get_top_k: annotate the root)
    naive.annotate(naive.get_sblock(task["main"].body.block.name_hint), "test.naive", 1)
    db.commit_tuning_record(ms.database.TuningRecord(naive.trace, workload, run_secs=[1e-3], target=target, args_info=info))
    assert tvm_tuning.DEFAULT_MARK not in str(db.get_top_k(workload, 1)[0].trace)

    builder = ms.builder.LocalBuilder(max_workers=1, initializer=tvm_tuning._worker_init)
    runner = ms.runner.LocalRunner(initializer=tvm_tuning._worker_init,
                                   evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=10))
    res = tvm_tuning._paired_check(task, target, db, builder, runner)
    assert res is not None and res["swapped"] and res["winner"] == "default" and res["ratio"] < 1.0, res
    top = db.get_top_k(workload, 1)[0]
    assert tvm_tuning.DEFAULT_MARK in str(top.trace)
    assert float(np.mean([float(x) for x in top.run_secs])) == pytest.approx(1e-3 * res["ratio"], rel=1e-6)
    again = tvm_tuning._paired_check(task, target, db, builder, runner)
    assert again is not None and not again["swapped"] and again["winner"] == "default", again


# --- faults: a killed tune call (issue 25) ------------------------------------------------------

_TUNE_SCRIPT = """
import json, sys
sys.path[:0] = [{here!r}, {tests!r}]
from test_tvm_tuning import _matmul_relu
from tvm_kernels import host_target
from graphopt.targets.tvm.tuning.tuner import tune
tune(_matmul_relu(), host_target(), db_dir={db!r}, trials=8, trials_per_iter=4, progress=False, threads=2)
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkilled_tune_call_leaves_no_tuner_and_no_folder_and_resume_skips_done_trials(tmp_path, monkeypatch):
    """The process that called `tune` (a compile) is SIGKILLed after the first batch of 4 of 8
    trials, while the tuning child is on the second batch. Its tuning child and workers die with
    it (they went on tuning alone before, racing the resumed run over the ledger, which then
    counted trials that were spent twice), the next call removes the killed call's work folder
    (one was left in the temporary directory per kill), and it makes only the 4 missing trials."""
    import subprocess
    import sys
    import tempfile
    import time

    import psutil

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    db = str(tmp_path / "db")
    env = dict(os.environ, TMPDIR=str(tmp))
    from paths import TESTS

    script = _TUNE_SCRIPT.format(here=os.path.dirname(__file__), tests=str(TESTS), db=db)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    ledger_path = os.path.join(db, "graphopt_ledger.json")
    deadline = time.monotonic() + 300
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = sum(v.get("trials", 0) for v in json.load(open(ledger_path)).values())
        except (OSError, ValueError):
            done = 0
        if done >= 4:
            break
        time.sleep(0.2)
    assert done == 4 and proc.poll() is None, (done, proc.returncode)
    tuners = psutil.Process(proc.pid).children(recursive=True)
    assert tuners, "no tuning child"
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(tuners, timeout=5)
    assert not alive, f"the tuning child or its workers outlived the killed call: {alive}"
    left = [p.name for p in tmp.iterdir() if p.name.startswith("graphopt-tune-")]
    assert len(left) == 1, left  # SIGKILL ran no cleanup: the next call removes it

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    tune(_matmul_relu(), _target(), db_dir=db, trials=8, trials_per_iter=4, progress=False, threads=2)
    s = last_summary(db)
    assert s["new_trials"] == 4 and s["stopped"] == "done", s
    assert [v["trials"] for v in json.load(open(ledger_path)).values()] == [8]
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("graphopt-tune-")]


def test_stale_work_dirs_are_removed_live_and_young_ones_kept(tmp_path):
    """A killed call's work folder (its owner's lock free) goes, as does a lockless one older
    than an hour (an older graphopt's); a live call's (lock held) and a lockless young one (being
    created) stay; other folders are not looked at."""
    import fcntl
    import time

    def work(name, lock=True, age=0.0):
        d = tmp_path / name
        d.mkdir()
        if lock:
            (d / "owner.lock").write_text("")
        if age:
            os.utime(d, (time.time() - age, time.time() - age))
        return d

    dead = work("graphopt-tune-dead")
    live = work("graphopt-tune-live")
    old = work("graphopt-tune-old", lock=False, age=7200)
    young = work("graphopt-tune-young", lock=False)
    other = work("other-dead")
    fd = os.open(live / "owner.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        removed = tvm_tuning.clean_stale_work_dirs(str(tmp_path))
    finally:
        os.close(fd)
    assert sorted(removed) == sorted([str(dead), str(old)])
    assert not dead.exists() and not old.exists()
    assert live.exists() and young.exists() and other.exists()
    assert tvm_tuning.clean_stale_work_dirs(str(tmp_path)) == [str(live)]  # its owner has ended


def test_a_second_tuner_waits_for_the_database_lock(tmp_path):
    """Two tuners on one database would tune the same tasks and overwrite each other's ledger
    counts: the second waits (told the holder's pid) until the first ends; leftovers of a killed
    atomic write are removed once it holds the lock."""
    import fcntl
    import threading
    import time

    db = tmp_path / "db"
    db.mkdir()
    stale = db / ".tmp-killed"
    stale.write_text("{")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    fresh = db / ".tmp-writing"
    fresh.write_text("{")
    holder = os.open(db / ".graphopt-tune.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    os.pwrite(holder, b"4242", 0)
    told, got = [], []
    t = threading.Thread(target=lambda: got.append(tvm_tuning._lock_database(str(db), told.append)))
    t.start()
    time.sleep(0.5)
    assert told == ["4242"] and not got
    os.close(holder)
    t.join(5)
    assert got, "the lock was not taken after its holder let go"
    os.close(got[0])
    assert (db / ".graphopt-tune.lock").read_text() == str(os.getpid())
    assert not stale.exists() and fresh.exists()

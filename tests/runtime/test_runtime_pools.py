"""Thread pools of the cpu runner and graphopt's onnxruntime sessions (issue 24 item 6: an
artifact and an onnxruntime session in one process slowed each other down, both pools spinning).
What is asserted is the configuration applied: affinities, worker counts per calling thread, the
spin settings and the onnxruntime session entries; the timings are tools/bench_mixed_runtimes.py's."""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h

import graphopt
import graphopt.runtime as R
from graphopt.errors import UsageError

pytest.importorskip("tvm")
tvm_ffi = pytest.importorskip("tvm_ffi")

TWO_CORES = hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2


def _model() -> onnx.ModelProto:
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", TP.FLOAT, [2, 8])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [2, 8])])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> str:
    return graphopt.compile(_model(), "cpu", "-O2", threads=2).save(str(tmp_path_factory.mktemp("art") / "relu"))


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    p = str(tmp_path_factory.mktemp("ort") / "relu.onnx")
    onnx.save(_model(), p)
    return p


X = {"x": np.arange(16, dtype=np.float32).reshape(2, 8) - 8}


def _affinities() -> dict[str, set[int]]:
    """CPU affinity of every thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[tid] = os.sched_getaffinity(int(tid))
        except OSError:  # (a thread that ended meanwhile)
            pass
    return out


def _num_threads() -> int:
    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def _in_thread(f):  # type: ignore[no-untyped-def]
    box = []
    t = threading.Thread(target=lambda: box.append(f()))
    t.start()
    t.join()
    return box[0]


@pytest.mark.skipif(not TWO_CORES, reason="needs two cores")
def test_default_pool_pins_nothing_and_uses_the_threads_asked(art: str) -> None:
    allowed = os.sched_getaffinity(0)
    with warnings.catch_warnings():  # the compile (in this process) left the default's spin count: nothing to say
        warnings.simplefilter("error", RuntimeWarning)
        r = R.load(art, threads=2)
    np.testing.assert_array_equal(r.run(X)[0], np.maximum(X["x"], 0))
    s = r.pool_settings
    assert (s.pool, s.threads, s.bind) == ("balanced", 2, False) and R.DEFAULT_POOL == "balanced"
    assert s.spin == int(os.environ["TVM_THREAD_POOL_SPIN_COUNT"])
    assert _num_threads() == 2 and R.applied_pool() is s
    assert all(a == allowed for a in _affinities().values())  # TVM's workers and the caller float


@pytest.mark.skipif(not TWO_CORES, reason="needs two cores")
def test_exclusive_pins_a_worker_per_core_and_shared_unpins_them(art: str) -> None:
    allowed = os.sched_getaffinity(0)
    with warnings.catch_warnings():  # (this process's spin count may be shared's: it says so)
        warnings.simplefilter("ignore", RuntimeWarning)
        ex = R.load(art, threads=2, pool="exclusive")
    ex.run(X)
    assert ex.pool_settings.bind and R.applied_pool() is ex.pool_settings
    pinned = [a for a in _affinities().values() if len(a) == 1]
    assert pinned, "exclusive: TVM's worker pinned to a core"
    assert os.sched_getaffinity(0) == allowed  # the caller itself floats
    with warnings.catch_warnings():  # (the process's spin count is the default's: it says so)
        warnings.simplefilter("ignore", RuntimeWarning)
        sh = R.load(art, threads=2, pool="shared")
    sh.run(X)  # the same calling thread's pool, back to unpinned
    assert all(a == allowed for a in _affinities().values())


def test_each_calling_thread_gets_the_runners_pool(art: str) -> None:
    one = R.load(art, threads=1)
    two = R.load(art, threads=2)

    def call(r: R.Runner) -> tuple[object, int]:
        r.run(X)
        return R.applied_pool(), _num_threads()

    # TVM keeps a pool per calling thread: a new thread's pool is configured on its first call
    assert _in_thread(lambda: call(one)) == (one.pool_settings, 1)
    assert _in_thread(lambda: call(two)) == (two.pool_settings, min(2, len(two.pool_settings.cpus)))
    # two runners in one thread: the pool follows whichever runs
    assert call(one) == (one.pool_settings, 1)
    assert call(two)[1] == min(2, len(two.pool_settings.cpus))
    assert call(one)[1] == 1


def test_a_spin_count_other_than_the_policys_is_said(art: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TVM_THREAD_POOL_SPIN_COUNT", "300000")  # what an earlier exclusive runner leaves
    monkeypatch.setattr(R, "_USER_SPIN", None)
    with pytest.warns(RuntimeWarning, match=r"pool='shared': TVM's workers keep spinning 300000 yields .*TVM_THREAD_POOL_SPIN_COUNT"):
        r = R.load(art, threads=1, pool="shared")
    assert r.pool_settings.spin == 300000
    monkeypatch.setattr(R, "_USER_SPIN", "300000")  # the user chose it: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        R.load(art, threads=1, pool="shared")


def test_spin_count_is_set_once_for_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TVM_THREAD_POOL_SPIN_COUNT", raising=False)
    assert R.tvm_spin_count("shared") == R.POOL_SPIN["shared"]
    assert R.tvm_spin_count("exclusive") == R.POOL_SPIN["shared"]  # (TVM reads it once)
    assert R.POOL_SPIN["exclusive"] == 300000  # TVM's kDefaultSpinCount
    assert 0 < R.POOL_SPIN["balanced"] < R.POOL_SPIN["exclusive"]  # awake between kernels, not after


def test_a_cpu_compile_fixes_the_spin_count_before_tvms_pool_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    # (its weight packing runs TVM kernels in this process: the pool's spin count is fixed then)
    monkeypatch.delenv("TVM_THREAD_POOL_SPIN_COUNT", raising=False)
    graphopt.compile(_model(), "cpu", "-O2", threads=1)
    assert os.environ["TVM_THREAD_POOL_SPIN_COUNT"] == str(R.POOL_SPIN[R.DEFAULT_POOL])


def test_ort_runner_stops_spinning_between_runs_when_shared(onnx_path: str) -> None:
    assert R.load_onnx(onnx_path, threads=2, pool="shared").session.get_session_options() \
        .get_session_config_entry("session.force_spinning_stop") == "1"
    shared = R.load_onnx(onnx_path, threads=2)  # (the default, balanced: the same)
    ex = R.load_onnx(onnx_path, threads=2, pool="exclusive")
    so_shared, so_ex = shared.session.get_session_options(), ex.session.get_session_options()
    assert so_shared.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError, match="does not have"):  # onnxruntime's default: spinning on
        so_ex.get_session_config_entry("session.force_spinning_stop")
    # an explicit thread count: onnxruntime pins its workers only where it picks the count
    assert so_shared.intra_op_num_threads == so_ex.intra_op_num_threads == 2
    np.testing.assert_array_equal(shared.run(X)[0], ex.run(X)[0])


def test_bad_pool_is_a_usage_error(art: str, onnx_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match=r"pool='fast': expected one of balanced, shared, exclusive"):
        R.load(art, pool="fast")
    with pytest.raises(UsageError, match="pool='fast'"):
        R.load_onnx(onnx_path, pool="fast")
    from graphopt.run_cli import main

    assert main([art, "--pool", "fast"]) == 2
    assert "--pool" in capsys.readouterr().err


def test_graphopt_run_takes_the_pool_and_says_which(art: str, capsys: pytest.CaptureFixture[str]) -> None:
    from graphopt.run_cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the process's spin count: shared's)
        assert main([art, "--pool", "exclusive", "--benchmark", "--repeat", "3"]) == 0
    assert "threads (exclusive pool): p50" in capsys.readouterr().out
    assert R.applied_pool() is not None and R.applied_pool().bind  # type: ignore[union-attr]
    R.load(art, threads=1).run(X)  # (this thread's pool back to the default for the tests after)
    assert main([art, "--benchmark", "--repeat", "3"]) == 0
    assert "(balanced pool): p50" in capsys.readouterr().out


def test_shared_runs_a_small_model_on_one_thread_unless_told(art: str) -> None:
    import json

    with open(os.path.join(art, "manifest.json")) as f:
        manifest = json.load(f)
    assert R.small_call(manifest)  # a Relu of 16 floats
    assert R.load(art).threads == 1 and _in_thread(lambda: (R.load(art).run(X), _num_threads())[1]) == 1
    assert R.load(art, threads=2).threads == 2  # asked: honoured
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert R.load(art, pool="exclusive").threads == manifest["target"]["threads"]  # the compile's count
    # a model with a call's worth of work keeps every core: ~1.9 GFLOP (GoogLeNet's)
    big = {**manifest, "kernel_map": [{**manifest["kernel_map"][0], "flops": 1.9e9}]}
    assert not R.small_call(big)
    # nothing to judge by (an artifact from before the machine model): no rule
    assert not R.small_call({k: v for k, v in manifest.items() if k != "kernel_map"})
    # a run-time If's branches: a call runs one, so the branch with the most work counts
    e = manifest["kernel_map"][0]
    branches = [{**e, "role": "branch", "group": "k1", "function": fn, "flops": f}
                for fn, f in (("if_0_b0", 1e9), ("if_0_b0", 0.5e9), ("if_0_b1", 1.2e9))]
    one = R.call_core_seconds({**manifest, "kernel_map": [{**e, "flops": 1.5e9}]})
    both = R.call_core_seconds({**manifest, "kernel_map": branches})
    assert one is not None and both == pytest.approx(one)
    # ... and a branch kernel whose FLOPs are in its branch function's own dims is left out (the
    # estimate cannot size it; the runner's probe measures such a call), not the whole estimate
    odd = {**e, "role": "branch", "group": "k1", "function": "if_0_b1", "flops": "((s2 * (s3 // 128)) * 139264)"}
    assert R.call_core_seconds({**manifest, "kernel_map": branches + [odd]}) == pytest.approx(one)


@pytest.mark.skipif(not TWO_CORES, reason="needs two cores")
def test_symbolic_work_is_judged_per_input_shape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """[N, 256] x [256, 256] with a symbolic N: its FLOPs are an expression of N, so the runner
    decides per input shape: one thread at N = 1 (~0.1 MFLOP), every core at N = 8192 (1 GFLOP),
    one again at N = 1; threads= given or the exclusive pool: never changed. Outputs equal."""
    from onnx import numpy_helper as nh

    w = (np.random.default_rng(0).standard_normal((256, 256)) / 16).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"])], "g", [h.make_tensor_value_info("x", TP.FLOAT, ["N", 256])],
                     [h.make_tensor_value_info("y", TP.FLOAT, ["N", 256])], [nh.from_array(w, "w")])
    path = graphopt.compile(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), "cpu", "-O2", threads=2).save(
        str(tmp_path / "mm"))
    r = R.load(path)
    assert r.threads == 2  # (no input seen yet)
    small, big = np.ones((1, 256), np.float32), np.ones((8192, 256), np.float32)
    for x, want in ((small, 1), (big, 2), (small, 1)):
        np.testing.assert_allclose(r.run({"x": x})[0], x @ w, rtol=1e-4, atol=1e-4)
        assert r.threads == want and _num_threads() == want
    assert R.load(path, threads=2).run({"x": small}) and R.load(path, threads=2).threads == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ex = R.load(path, pool="exclusive")
        ex.run({"x": small})
        assert ex.threads == 2
    R.load(path, threads=1).run({"x": small})  # (this thread's pool back to one for the tests after)
    with pytest.raises(ValueError):  # the FLOPs are read, never evaluated
        R._flops("__import__('os').getpid()", {"N": 1})
    assert R._flops("((N * (L // 128)) * 3)", {"N": 2, "L": 640}) == 30.0


def test_thread_probe_keeps_the_faster_count() -> None:
    """The probe alternates one thread and all (a warm-up call of each first), then keeps the
    thread count whose median was lower; a tie goes to one thread."""
    p = R.ThreadProbe(full=2)
    order, n = [], 0
    while not p.done:
        t = p.next_threads()
        order.append(t)
        n += 1
        p.record(t, 5e-6 if t == 2 else 9e-6)  # two threads faster here
    assert order[:4] == [1, 2, 1, 2] and n == 2 * (R.PROBE_CALLS + 1)
    assert p.choice == 2 and p.medians == {1: 9e-6, 2: 5e-6}
    tie = R.ThreadProbe(full=4)
    while not tie.done:
        tie.record(tie.next_threads(), 7e-6)
    assert tie.choice == 1


@pytest.mark.skipif(not TWO_CORES, reason="needs two cores")
def test_a_call_the_estimate_cannot_judge_is_measured(art: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call whose estimate falls between small and large (under PROBE_BELOW_FACTOR x the
    one-thread rule, over the rule: a model whose If branches' kernels the kernel map does not
    hold) is timed on one thread and on every core over its first calls, then keeps the faster;
    threads= given and the exclusive pool are never probed. Outputs equal at every call."""
    borderline = 2 * R.SHARED_ONE_THREAD_BELOW_S
    monkeypatch.setattr(R, "call_core_seconds", lambda manifest, sizes=None: borderline)
    r = R.load(art)
    assert r.threads == 2 and r.thread_probe is not None
    want = r.run(X)[0]
    for _ in range(2 * R.PROBE_CALLS + 1):
        np.testing.assert_array_equal(r.run(X)[0], want)
    assert r.thread_probe.done and r.threads == r.thread_probe.choice in (1, 2)
    assert set(r.thread_probe.medians) == {1, 2}
    fresh = R.load(art)
    stats = fresh.benchmark(X, repeat=3)  # (the probe first: what is timed is the count it keeps)
    assert fresh.thread_probe is not None and fresh.thread_probe.done and stats["threads"] == fresh.thread_probe.choice
    assert R.load(art, threads=2).thread_probe is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert R.load(art, pool="exclusive").thread_probe is None
    monkeypatch.setattr(R, "call_core_seconds", lambda manifest, sizes=None: 10 * borderline)
    assert R.load(art).thread_probe is None  # clearly large: every core, no probe

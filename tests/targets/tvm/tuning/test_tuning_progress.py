"""Tuning's progress bar (issue 19 item 7): it never passes its totals, names the ONNX nodes of the
kernel being tuned, and ends with how many kernels kept the default schedule vs a tuned one.

The events are the tuning child's, as a run without a time budget emits them (the default
schedule and variants of every task, then the search): before, the bar counted both phases
against one total ("tasks 5/4")."""

from __future__ import annotations

import io
import re

import pytest

from graphopt.report import tuning_line
from graphopt.targets.tvm.tuning.tuner import TuningProgress

LABELS = {"k0": "Conv -> 'conv', relu1", "k1": "Conv -> 'conv_59', relu2", "k4": "fc1, relu3", "k5": "fc2"}
TASKS = ["k1", "k0", "k4", "k5"]


def _events(kept: dict[str, str], *, overshoot: int = 0) -> list[dict]:
    ev: list[dict] = [{"ev": "start", "tasks_total": 9, "selected": 4, "skipped": 0, "dynamic": 0, "budget": 16, "per_task": 4},
                      {"ev": "round", "cap": 0, "tasks": 4}]
    for t in TASKS:
        ev += [{"ev": "task", "name": t, "want": 0, "done_before": 0},
               {"ev": "kept", "name": t, "kept": "default", "default_ms": 0.01, "tuned_ms": None},
               {"ev": "batch", "name": t, "new": 0, "failed": 0, "total_new": 0, "task_trials": 0, "best_ms": 0.01},
               {"ev": "variants_done", "name": t, "best_ms": 0.01, "variants": 2}]
    ev.append({"ev": "round", "cap": 4, "tasks": 4})
    total = 0
    for t in TASKS:
        total += 4 + (overshoot if t == TASKS[-1] else 0)
        ev += [{"ev": "task", "name": t, "want": 4, "done_before": 0},
               {"ev": "batch", "name": t, "new": 4, "failed": 0, "total_new": total, "task_trials": 4, "best_ms": 0.02},
               {"ev": "kept", "name": t, "kept": kept[t], "default_ms": 0.01, "tuned_ms": 0.005},
               {"ev": "task_done", "name": t, "best_ms": 0.02}]
    ev.append({"ev": "end", "stopped": "done", "tasks_total": 9, "selected": 4, "skipped": 0})
    return ev


def _run(events: list[dict], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    prog = TuningProgress(True, None, LABELS)
    prog.tty = False  # (not a tty: a line per event when _last_line is old)
    for e in events:
        prog._last_line = -1e9
        prog.event(e)
    return err.getvalue().splitlines()


def test_bar_stays_within_its_totals_and_names_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    kept = {"k1": "variant", "k0": "default", "k4": "default", "k5": "tuned"}
    lines = _run(_events(kept, overshoot=3), monkeypatch)
    bars = [ln for ln in lines if ln.startswith("tune [")]
    assert bars
    for ln in bars:
        done, total = map(int, re.search(r" (\d+)/(\d+) tasks", ln).groups())
        trials, budget = map(int, re.search(r"trials (\d+)/(\d+)", ln).groups())
        assert done <= total and trials <= budget, ln
        assert "#" * 21 not in ln
    # both phases reach their full total, and say which phase they are
    assert any("defaults 4/4 tasks" in ln for ln in bars) and any("search to 4 4/4 tasks" in ln for ln in bars)
    # the kernel being tuned is named with its ONNX nodes
    assert any("k1 (Conv -> 'conv_59', relu2)" in ln for ln in bars)
    assert any("k4 (fc1, relu3)" in ln for ln in bars)
    # the best so far is the best of every schedule measured (the default's 0.010, not the search's 0.020)
    assert bars[-1].split(" best ")[1].startswith("0.010 ms")
    assert lines[-1] == ("tune: 4 kernels: 2 kept the default schedule, 1 a tuned one, 1 a measured variant of the "
                         "default (tuned: k1 (Conv -> 'conv_59', relu2), k5 (fc2))")


def test_final_line_when_everything_was_in_the_database(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _run([{"ev": "start", "tasks_total": 9, "selected": 4, "skipped": 4, "dynamic": 0, "budget": 0, "per_task": 4},
                  {"ev": "end", "stopped": "done", "tasks_total": 9, "selected": 4, "skipped": 4}], monkeypatch)
    assert lines[-1] == "tune: done (done): all 4 already tuned in the database"
    assert "0/4 tasks" in lines[-2] or "4/4 tasks" in lines[-2]
    lines = _run([{"ev": "start", "tasks_total": 9, "selected": 0, "skipped": 0, "dynamic": 4, "budget": 0, "per_task": 0},
                  {"ev": "end", "stopped": "done", "tasks_total": 9, "selected": 0, "skipped": 0}], monkeypatch)
    assert lines[-1] == "tune: done (done): no kernel to tune (4 with symbolic shapes keep their default schedules)"


def test_hook_gets_the_events_and_nothing_is_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    seen: list[str] = []
    prog = TuningProgress(lambda e: seen.append(e["ev"]), None, LABELS)
    for e in _events(dict.fromkeys(TASKS, "default")):
        prog.event(e)
    assert seen[0] == "start" and seen[-1] == "end" and not err.getvalue()
    assert prog.kept_line().startswith("tune: 4 kernels: 4 kept the default schedule, 0 a tuned one")


def test_summarytuning_line() -> None:
    t = {"status": "tuned", "new_trials": 16, "stopped": "done", "db": "/db",
         "kept": {"k0": {"kept": "default"}, "k1": {"kept": "variant"}, "k4": {"kept": "default"}, "k5": {"kept": "tuned"}}}
    assert tuning_line(t) == ("tuning: tuned (16 new trials, stopped: done): 4 kernels: 2 kept the default schedule, "
                               "1 a tuned one, 1 a measured variant of the default; database /db")
    assert tuning_line({"status": "database applied", "db": "/db", "kept": {"default": 3, "tuned": 2}}) == \
        "tuning: database applied: 5 kernels: 3 kept the default schedule, 2 a tuned one; database /db"

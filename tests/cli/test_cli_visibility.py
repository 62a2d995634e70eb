"""No silent no-ops, one report schema (issue 19 items 1 and 6): every pass says in one line what
it did or why it did nothing; an option the user asked for that changed nothing is a warning in
the terminal (even with --quiet) and in the report; the compiled targets print and write the
onnx target's summary plus their kernels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from graphopt.artifact_cli import tune_warnings
from graphopt.cli import main

from paths import ROOT
EXAMPLE = ROOT / "examples" / "tiny_cnn.onnx"


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_every_pass_has_one_line_saying_what_it_did(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["warnings"] == []
    rows = [line for line in err.splitlines() if line.startswith("  ") and ("yes " in line or " no " in line)]
    assert len(rows) == len(r["passes"]) == 20
    for p, row in zip(r["passes"], rows):
        assert p["note"] and row.split()[0] == p["pass"] and row.rstrip().endswith(p["note"])
    notes = {p["pass"]: p["note"] for p in r["passes"]}
    assert notes["fuse-conv-bn"] == "conv-bn 2, initializers-removed 12"  # what it did, from the stats
    assert notes["fuse-attention"] == "no match: the model has no MatMul nodes to start from"
    assert notes["fuse-linear"].startswith("no match at 6 candidate nodes (first: ")  # the rules' near misses
    assert notes["fuse-conv-activation"].startswith("off: FusedConv is an onnxruntime contrib op")
    assert [p["note"] for p in r["passes"] if p["pass"] == "cse"][-1].startswith("nothing to do: no two nodes")


def test_quantize_that_changes_nothing_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tiny_cnn's layers are all under tiny-macs: speed=rules keeps them float. The pass says so, the
    terminal warns even with --quiet, the report carries the warning."""
    code, err = _run(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--quantize", "int8", "--quantize-speed", "rules",
                     "-q", "--report", tmp_path / "r.json")
    assert code == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt-compile: warning: --quantize (quantize{speed=rules}) changed "
                                                   "nothing: nothing quantized: every layer stayed float (mode static")
    assert "tiny layer" in lines[0] and "SYNTHETIC" in lines[0]
    r = json.loads((tmp_path / "r.json").read_text())
    assert len(r["warnings"]) == 1 and "changed nothing" in r["warnings"][0]


def test_prune_that_changes_nothing_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--prune", "0", "-q")
    assert code == 0
    assert "graphopt-compile: warning: --prune (prune{ratio=0.0}) changed nothing: nothing pruned: ratio 0 removes no" in err


def test_prune_that_prunes_does_not_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # (random weights: the default accuracy budget would keep every group whole, and say so)
    code, err = _run(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--prune", "0.5", "--accuracy-budget", "none", "-q")
    assert code == 0 and "warning" not in err


def test_cluster_weights_that_changes_nothing_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--passes", "-O1,cluster-weights{min-size=100000000}", "-q")
    assert code == 0
    assert "warning: cluster-weights (cluster-weights{min-size=100000000}) changed nothing: nothing clustered: " in err
    assert "below min-size=100000000" in err


def _opset9_cnn_softmax(path: Path) -> Path:
    """Conv-Relu-Conv-GAP-Flatten-Gemm-Softmax at opset 9 (as old SqueezeNet files are)."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), n)
             for n, s in (("w1", (16, 3, 3, 3)), ("w2", (32, 16, 3, 3)), ("wf", (10, 32)), ("bf", (10,)))]
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c2"], ["r2"]),
             h.make_node("GlobalAveragePool", ["r2"], ["g"]), h.make_node("Flatten", ["g"], ["f"]),
             h.make_node("Gemm", ["f", "wf", "bf"], ["l"], transB=1), h.make_node("Softmax", ["l"], ["y"], axis=1)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 32, 32])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [1, 10])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 9)])
    m.ir_version = 4
    onnx.save(m, path / "old.onnx")
    np.savez(path / "calib.npz", x=rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    return path / "old.onnx"


def test_opset9_conv_net_with_softmax_is_quantized(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's SqueezeNet case: opset 9 and a final Softmax. Upgraded to opset 13 (said in the
    log), mode=auto picks static by FLOPs, the convs are int8; no warning."""
    src = _opset9_cnn_softmax(tmp_path)
    out = tmp_path / "q.onnx"
    code, err = _run(capsys, src, "-o", out, "--quantize", "int8", "--calibration", tmp_path / "calib.npz",
                     "--quantize-speed", "off", "--report", tmp_path / "r.json", "--verify", "--rtol", "1", "--atol", "1")
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["warnings"] == []
    assert any("upgraded the model from opset 9 to 13" in line for line in r["log"])
    q = onnx.load(out)
    assert {o.domain: o.version for o in q.opset_import}[""] >= 13
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) >= 2
    row = next(line for line in err.splitlines() if line.lstrip().startswith("quantize"))
    assert "mode static: auto: conv-dominated" in row


def test_tune_warnings() -> None:
    assert tune_warnings(0, {"tasks_selected": 0}) == []
    assert tune_warnings(8, {"tasks_selected": 3, "kept": {"a": {"kept": "tuned"}, "b": {"kept": "default"}}}) == []
    [w] = tune_warnings(8, {"tasks_selected": 2, "kept": {"a": {"kept": "default"}, "b": {"kept": "default"}}})
    assert w.startswith("--tune 8 changed nothing: tuning did not beat the default schedule of any of the 2 kernels")
    [w] = tune_warnings(8, {"tasks_total": 4, "tasks_selected": 0, "tasks_skipped_done": 1, "tasks_dynamic": 3})
    assert "no kernel to tune" in w and "3 with symbolic shapes" in w


def test_cpu_target_prints_and_writes_the_same_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tvm")
    code, err_onnx = _run(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--report", tmp_path / "onnx.json")
    assert code == 0
    code, err = _run(capsys, EXAMPLE, "--target", "cpu", "--threads", "1", "-o", tmp_path / "art", "--verify",
                     "--report", tmp_path / "cpu.json", "--dump-ir", tmp_path / "ir")
    assert code == 0, err
    onnx_r = json.loads((tmp_path / "onnx.json").read_text())
    cpu_r = json.loads((tmp_path / "cpu.json").read_text())
    assert set(onnx_r) <= set(cpu_r)  # every key of the onnx target's report
    assert {"kernels", "schedules", "compile_seconds"} <= set(cpu_r)
    assert [p["pass"] for p in cpu_r["passes"]] == [p["pass"] for p in onnx_r["passes"]]
    assert cpu_r["nodes"]["total_after"] == onnx_r["nodes"]["total_after"] and cpu_r["verify"]["ok"]
    assert cpu_r["size"]["after"] > 0 and cpu_r["schema"] == onnx_r["schema"]
    assert json.loads((tmp_path / "art" / "report.json").read_text())["passes"] == cpu_r["passes"]
    for line in ("pass ", "what it did", "fuse-conv-bn", "size: ", "verify: ok", "kernels: "):
        assert line in err
    assert (tmp_path / "ir" / "00-input.txt").exists() and len(list((tmp_path / "ir").iterdir())) == len(cpu_r["passes"]) + 1


# --- issue 19 item 7: the small things a new user hit (one line, exit 2) ----------------------------


def _one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt-compile: error: "), lines
    return lines[0]


def test_compiled_target_without_tvm_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    for name in [m for m in sys.modules if m == "tvm" or m.startswith(("tvm.", "graphopt.targets."))]:
        parent, _, child = name.rpartition(".")
        if parent in sys.modules and hasattr(sys.modules[parent], child):
            # (a fresh import of the submodule rebinds the parent's attribute: put it back after,
            # or `from graphopt.targets import cpu` in a later test gets another class than
            # get_target's, and its monkeypatches miss)
            monkeypatch.setattr(sys.modules[parent], child, getattr(sys.modules[parent], child))
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tvm", None)  # import tvm -> ModuleNotFoundError
    code, err = _run(capsys, EXAMPLE, "--target", "cpu", "-o", tmp_path / "art")
    assert code == 2 and "pip install 'graphopt[tvm]'" in _one_error(err)


def test_tune_with_onnx_target_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--tune", "8")
    assert code == 2 and "--tune is for the compiled targets" in _one_error(err)
    assert not (tmp_path / "o.onnx").exists()


def test_calibration_checked_before_the_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "int.npz", input=np.zeros((4, 3, 16, 16), np.int64))
    code, err = _run(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--quantize", "int8", "--calibration", tmp_path / "int.npz")
    line = _one_error(err)
    assert code == 2 and "has dtype int64, the model expects float32" in line and "pass" not in line
    np.savez(tmp_path / "shape.npz", input=np.zeros((4, 3, 8, 8), np.float32))
    code, err = _run(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--quantize", "int8", "--calibration", tmp_path / "shape.npz")
    assert code == 2 and "the model expects ['?', 3, 16, 16]" in _one_error(err)


def test_float64_calibration_is_cast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "f64.npz", input=np.random.default_rng(0).standard_normal((4, 3, 16, 16)))
    code, err = _run(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--quantize", "int8", "--calibration", tmp_path / "f64.npz",
                     "--quantize-speed", "off", "-q")
    assert code == 0, err
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(tmp_path / "o.onnx").graph.node)


def test_verify_inputs_of_the_wrong_shape_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "x.npz", input=np.zeros((1, 3, 5, 5), np.float32))
    code, err = _run(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--verify", "--inputs", tmp_path / "x.npz")
    assert code == 2
    assert "input 'input': shape [1, 3, 5, 5] given, the model takes [N,3,16,16]" in _one_error(err)


def test_explain_into_a_closed_pipe_is_quiet() -> None:
    import subprocess
    import sys

    script = Path(sys.executable).parent / "graphopt-compile"
    p = subprocess.run(f"'{script}' '{EXAMPLE}' --explain pad-into-conv | head -c 1", shell=True, capture_output=True,
                       text=True, timeout=120)
    assert "BrokenPipeError" not in p.stderr and "Traceback" not in p.stderr


def test_explain_runs_at_the_rules_point(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, EXAMPLE, "--explain", "pad-into-conv")
    assert code == 0 and "checked at its point in the pipeline: before pass 'fuse-linear', after 9 passes" in err
    code, err = _run(capsys, EXAMPLE, "--explain", "pad-into-conv", "-O0")
    assert code == 0 and "checked on the input model" in err


def test_print_pipeline_keeps_calibration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quantize", "int8", "--calibration", "c.npz", "--print-pipeline", "-O0"]) == 0
    assert capsys.readouterr().out.strip() == "quantize{data=c.npz}"


def test_graphopt_run_repeat_0_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Already so before this change (checked before the artifact is read)."""
    from graphopt import run_cli

    assert run_cli.main([str(tmp_path), "--repeat", "0", "--benchmark"]) == 2
    assert "--repeat 0 --warmup 5: expected --repeat >= 1" in capsys.readouterr().err


def test_folder_target_with_onnx_name_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tvm")
    code, err = _run(capsys, EXAMPLE, "--target", "cpu", "--threads", "1", "-o", tmp_path / "m.onnx", "-q")
    assert code == 0 and (tmp_path / "m.onnx" / "manifest.json").exists()
    assert "warning: -o " in err and "writes an artifact folder" in err


def test_summary_says_when_the_file_grows() -> None:
    from graphopt.report import Report

    r = Report("0", "m.onnx", "o.onnx", "onnx", "", size_before=100, size_after=250)
    assert "size: 100 bytes -> 250 bytes  (grew 2.50x)" in r.format_table()
    r.size_after = 90
    assert "grew" not in r.format_table()

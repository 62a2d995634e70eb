"""Calibration data for any input layout: batch axis per input, one-sample files of different
sizes, -1 batch dims, iterables of feeds, stateful sequences; checked before any pass runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.calibration import (
    CalibrationError,
    batch_axes,
    calibration_from_feeds,
    calibration_sequences,
    load_calibration,
)
from graphopt.passes.quantize.pass_ import quantize
from graphopt.target import bind_inputs

from paths import ROOT
_spec = importlib.util.spec_from_file_location("control_flow_models_for_calibration", ROOT / "tools" / "control_flow_models.py")
cf = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(cf)  # type: ignore[union-attr]


def _vad() -> graphopt.Model:
    return graphopt.load(cf.vad_model().SerializeToString())


def _cnn(batch_dim: object = "N", width: object = "W") -> graphopt.Model:
    """Conv-Relu-GlobalAveragePool-Flatten-Gemm over x[batch_dim, 3, 8, width] (an OCR-like open width)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    fc = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3, 8, width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w, fc])
    return graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


def test_batch_axis_detected_from_the_batch_symbol() -> None:
    assert batch_axes(_vad()) == {"input": 0, "sr": None, "state": 1}
    assert batch_axes(_vad(), {"state": 0})["state"] == 0
    assert batch_axes(_cnn(-1)) == {"x": 0}  # an unnamed -1 at axis 0
    with pytest.raises(CalibrationError, match="no input of that name"):
        batch_axes(_vad(), {"h": 1})
    with pytest.raises(CalibrationError, match="rank 3"):
        batch_axes(_vad(), {"state": 3})


def test_state_stacked_on_axis_1(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, st = rng.standard_normal((36, 512)).astype(np.float32), rng.standard_normal((2, 36, 128)).astype(np.float32)
    np.savez(tmp_path / "c.npz", input=x, sr=np.array(16000), state=st)
    data = load_calibration(str(tmp_path / "c.npz"), _vad(), batch_size=4)
    assert data.source.endswith("36 samples in 9 batches of 4")
    batches = list(data)
    assert len(batches) == 9 and batches[0]["state"].shape == (2, 4, 128) and batches[0]["sr"].shape == ()
    np.testing.assert_array_equal(batches[1]["state"], st[:, 4:8])
    np.testing.assert_array_equal(batches[1]["input"], x[4:8])
    limited = load_calibration(str(tmp_path / "c.npz"), _vad(), limit=5)
    assert len(list(limited)) == 5 and "5 samples" in limited.source
    with pytest.raises(CalibrationError, match=r"different numbers of samples: input 36 \(axis 0\), state 2 \(axis 0\)"):
        load_calibration(str(tmp_path / "c.npz"), _vad(), batch_axis={"state": 0})


def test_folder_of_one_sample_files_of_different_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    widths = [16, 24, 40]
    for i, wd in enumerate(widths):  # written without the batch axis, each its own width
        np.savez(tmp_path / f"{i:02d}.npz", x=rng.standard_normal((3, 8, wd)).astype(np.float32))
    m = _cnn()
    data = load_calibration(str(tmp_path), m)
    assert [b["x"].shape for b in data] == [(1, 3, 8, w) for w in widths]
    assert data.source.endswith("3 samples in 3 batches of 1 from 3 files")
    q, rep = quantize(m, str(tmp_path), speed="off")
    assert rep["result"].startswith("quantized") and rep["calibration"]["source"] == data.source
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 9, 16), np.float32))
    with pytest.raises(CalibrationError, match=r"bad.npz: input 'x' has shape \[3, 9, 16\]"):
        load_calibration(str(tmp_path), m)


def test_minus_one_batch_dim(tmp_path: Path) -> None:
    m = _cnn(-1, 8)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(2).standard_normal((36, 3, 8, 8)).astype(np.float32))
    data = load_calibration(str(tmp_path / "c.npz"), m)
    assert data.source.endswith("36 samples in 36 batches of 1") and len(data) == 36
    _, rep = quantize(m, data, speed="off")
    assert rep["result"].startswith("quantized")
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 3, 8, 8), np.float32))
    with pytest.raises(CalibrationError, match="holds no samples"):
        load_calibration(str(tmp_path / "empty.npz"), m)


def test_iterables_of_feed_dicts() -> None:
    m = _cnn(-1, 8)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(4)]

    class Reader:  # onnxruntime's CalibrationDataReader protocol
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.it, None)

    for src in (feeds, (f for f in feeds), Reader()):
        data = calibration_from_feeds(m, src)
        assert len(data) == 4 and len(data) == 4  # one-shot sources replay what they read
        np.testing.assert_array_equal(list(data)[3]["x"], feeds[3]["x"])
    _, rep = quantize(m, (f for f in feeds), speed="off")
    assert rep["result"].startswith("quantized")
    with pytest.raises(CalibrationError, match="item 0 has no array for model input 'x'"):
        calibration_from_feeds(m, [{"y": feeds[0]["x"]}])


def test_stateful_sequences_feed_the_state_back() -> None:
    m = _vad()
    bind_inputs(m, {"sr": 16000})
    rng = np.random.default_rng(4)
    seqs = [[{"input": rng.standard_normal((1, 512)).astype(np.float32)} for _ in range(3)] for _ in range(2)]
    data = calibration_sequences(m, seqs, {"state": "stateN"})
    steps = list(data)
    assert len(steps) == 6 and "6 steps" in data.source
    assert not steps[0]["state"].any() and not steps[3]["state"].any()  # each sequence starts from zeros
    ref = cf._run(graphopt.to_onnx(m), steps[0])[1]  # step 1's state is step 0's stateN
    np.testing.assert_allclose(steps[1]["state"], ref, rtol=1e-6)
    _, rep = quantize(graphopt.optimize(m, "-O2"), data, speed="off")  # -O2 inlines the If sr decided
    assert rep["result"].startswith("quantized")
    with pytest.raises(CalibrationError, match="no output 'h_out'"):
        calibration_sequences(m, seqs, {"state": "h_out"})


def test_cli_checks_calibration_before_any_pass(tmp_path: Path) -> None:
    src = tmp_path / "vad.onnx"
    onnx.save(cf.vad_model(), src)
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "c.npz", input=rng.standard_normal((4, 512)).astype(np.float32), sr=np.array(16000),
             state=np.zeros((2, 4, 128), np.float32))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "graphopt.cli", str(src), *args, "-q"], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    out = tmp_path / "o.onnx"
    r = cli("-o", str(out), "--quantize", "int8", "--calibration", str(tmp_path / "c.npz"), "--calibration-batch-axis", "state:0",
            "--report", str(tmp_path / "r.json"))
    assert r.returncode == 2 and "inputs hold different numbers of samples" in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists() and not (tmp_path / "r.json").exists()  # no pass ran, nothing written
    r = cli("-o", str(out), "--bind", "sr=16000", "--quantize", "int8", "--calibration", str(tmp_path / "c.npz"),
            "--quantize-speed", "off", "--report", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(out).graph.node}

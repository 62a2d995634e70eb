"""graphopt-run --profile / --compare and .onnx models on onnxruntime (graphopt.profiler).

A tiny conv model compiled for the cpu target; the profile's rows are checked against the
manifest's kernel_map and the model's nodes, and the comparison against onnxruntime's profile."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.run_cli import main  # noqa: E402

CONV_FLOPS = 2 * 8 * 16 * 16 * 3 * 3 * 3  # per image: 8 output channels, 16x16, 3x3x3 window
FC_FLOPS = 2 * 10 * 8


def _model(batch: int | str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
             nh.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
             nh.from_array(rng.standard_normal((10, 8)).astype(np.float32), "w2"),
             nh.from_array(rng.standard_normal(10).astype(np.float32), "b2")]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("Relu", ["c"], ["r"], name="relu"),
             h.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             h.make_node("GlobalAveragePool", ["p"], ["gap"], name="gap"),
             h.make_node("Flatten", ["gap"], ["f"], name="flat"),
             h.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1, name="fc")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [batch, 3, 16, 16])],
                     [h.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prof")
    out = {}
    for key, batch in (("static", 1), ("symbolic", "N")):
        m = _model(batch)
        onnx.save(m, str(d / f"{key}.onnx"))
        graphopt.compile(m, "cpu", "-O2", threads=1).save(str(d / key))
        out[key] = (str(d / key), str(d / f"{key}.onnx"))
    return out


def _json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _row_with(rows: list[dict], node: str) -> dict:
    found = [r for r in rows if node in r["nodes"] and r["role"] != "layout"]
    assert len(found) == 1, rows
    return found[0]


def test_manifest_records_the_kernel_map(files):
    art, _ = files["static"]
    kmap = json.load(open(f"{art}/manifest.json"))["kernel_map"]
    covered = [n for e in kmap if e["role"] != "layout" for n in e["nodes"]]
    assert sorted(covered) == ["conv", "fc", "flat", "gap", "pool", "relu"]  # each node in one kernel
    conv = next(e for e in kmap if "conv" in e["nodes"])
    assert conv["ops"] == ["Conv", "Relu"] and conv["flops"] == CONV_FLOPS and not conv["int8"]
    assert conv["schedule"]  # how it was scheduled, in words
    assert next(e for e in kmap if "fc" in e["nodes"])["flops"] == FC_FLOPS


def test_profile_rows_nodes_and_shares(files, capsys):
    art, _ = files["static"]
    res = _json(capsys, [art, "--profile", "--threads", "1", "--repeat", "3"])
    p = res["profile"]
    kmap = json.load(open(f"{art}/manifest.json"))["kernel_map"]
    ran = iter(e["kernel"] for e in kmap)  # one row per call, in the map's (call) order
    assert all(any(k == r["kernel"] for k in ran) for r in p["rows"])
    assert [r["index"] for r in p["rows"]] == list(range(len(p["rows"])))
    idle = len(kmap) - len(p["rows"])  # (reshapes the build turned into views): said in a note
    assert idle == 0 or any("did not run" in n and f"{idle} kernel" in n for n in p["notes"])
    assert sum(r["share"] for r in p["rows"]) == pytest.approx(100.0, abs=1e-6)
    assert p["kernel_total_ms"] == pytest.approx(sum(r["ms"] for r in p["rows"]))
    conv = _row_with(p["rows"], "conv")
    assert conv["flops"] == CONV_FLOPS and conv["ms"] > 0
    assert conv["gflops"] == pytest.approx(CONV_FLOPS / conv["ms"] / 1e6)
    if p["peak"] is not None:  # (where the OS reports a clock)
        assert conv["peak_pct"] == pytest.approx(100 * conv["gflops"] / p["peak"]["gflops"])
        assert "FMA unit" in p["peak"]["how"]
    assert set(conv) >= {"kernel", "nodes", "ops", "flops", "ms", "share", "gflops", "peak_pct", "schedule", "role"}
    assert p["threads"] == 1 and p["latency_ms"] > 0


def test_profile_sorted_and_top_text(files, capsys):
    art, _ = files["static"]
    capsys.readouterr()
    assert main([art, "--profile", "--sort", "time", "--top", "2", "--threads", "1", "--repeat", "3"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln[:4].strip().isdigit()]
    assert len(lines) == 2
    assert "more:" in out and "peak" in out


def test_symbolic_dims_flops_follow_the_shapes(files, capsys):
    art, _ = files["symbolic"]
    p = _json(capsys, [art, "--profile", "--dim", "N=3", "--threads", "1", "--repeat", "3"])["profile"]
    assert _row_with(p["rows"], "conv")["flops"] == 3 * CONV_FLOPS


def test_onnx_profile_and_benchmark_on_onnxruntime(files, capsys):
    _, model = files["static"]
    res = _json(capsys, [model, "--profile", "--benchmark", "--repeat", "5", "--threads", "1"])
    assert res["latency"]["runs"] == 5
    p = res["profile"]
    assert p["runtime"].startswith("onnxruntime")
    assert sum(r["share"] for r in p["rows"]) == pytest.approx(100.0, abs=1e-6)
    conv = _row_with(p["rows"], "conv")  # onnxruntime fuses Conv+Relu: traced back to both nodes
    assert {"conv", "relu"} <= set(conv["nodes"]) and conv["flops"] == CONV_FLOPS
    covered = [n for r in p["rows"] for n in r["nodes"]]
    assert len(covered) == len(set(covered))  # every ONNX node charged once


def test_compare_lines_up_by_onnx_node(files, capsys):
    art, model = files["static"]
    c = _json(capsys, [art, "--compare", model, "--threads", "1", "--repeat", "3"])["compare"]
    row = next(r for r in c["rows"] if "conv" in r["nodes"])
    assert row["graphopt_ms"] > 0 and row["onnxruntime_ms"] > 0
    assert row["ratio"] == pytest.approx(row["graphopt_ms"] / row["onnxruntime_ms"])
    fc = next(r for r in c["rows"] if "fc" in r["nodes"])
    assert fc["kernels"] and fc["onnxruntime_nodes"]
    t = c["totals"]
    assert t["ratio"] == pytest.approx(t["graphopt_ms"] / t["onnxruntime_ms"])
    assert sum(r["graphopt_ms"] or 0 for r in c["rows"]) == pytest.approx(t["graphopt_ms"])


@pytest.mark.parametrize("extra, says", [
    (["--compare", "missing.onnx"], "no such file"),
    (["--profile", "--top", "0"], "--top 0"),
    (["--top", "3"], "applies to --profile"),
    (["--profile", "--peak-gflops", "-1"], "positive"),
])
def test_bad_input_is_one_line_exit_2(files, capsys, extra, says):
    art, _ = files["static"]
    capsys.readouterr()
    assert main([art, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


def test_onnx_model_refuses_compare_and_cold(files, capsys):
    _, model = files["static"]
    for extra in (["--compare", model], ["--profile", "--cold"]):
        capsys.readouterr()
        assert main([model, *extra]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_compare_with_another_models_inputs_is_refused(files, capsys, tmp_path):
    art, _ = files["static"]
    m = _model(1)
    m.graph.input[0].name = "other"
    m.graph.node[0].input[0] = "other"
    onnx.save(m, str(tmp_path / "other.onnx"))
    capsys.readouterr()
    assert main([art, "--compare", str(tmp_path / "other.onnx")]) == 2
    assert "inputs" in capsys.readouterr().err


def test_onnxruntime_refusing_the_inputs_is_one_line_exit_2(tmp_path, capfd):
    """A model onnxruntime cannot run on the inputs graphopt-run made (a reflect Pad over a
    symbolic dim of 1): exit 2, one stderr line naming the shapes, no onnxruntime log line
    (it was exit 1 with onnxruntime's two '[E:onnxruntime...]' lines before)."""
    m = h.make_model(h.make_graph([h.make_node("Pad", ["x", "p"], ["y"], mode="reflect")], "g",
                                  [h.make_tensor_value_info("x", TP.FLOAT, [1, "n"])],
                                  [h.make_tensor_value_info("y", TP.FLOAT, None)],
                                  [nh.from_array(np.array([0, 2, 0, 2], np.int64), "p")]),
                     opset_imports=[h.make_opsetid("", 18)])
    path = str(tmp_path / "pad.onnx")
    onnx.save(m, path)
    capfd.readouterr()
    assert main([path, "--benchmark"]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "onnxruntime cannot run it on these inputs (x[1x1])" in err and "--dim NAME=N" in err


def test_prepacked_kernels_are_charged_to_the_group_that_computes_them(tmp_path):
    """The weight prepacking re-emits a kernel's call under a fresh var name, which can be
    another group's (the CRNN's LSTM input projection came out charged to the first conv): a
    `_prepacked` kernel is charged to the group that created it, or to the group it feeds."""
    import importlib.util

    from paths import ROOT

    spec = importlib.util.spec_from_file_location("dynamic_models_for_profiler", ROOT / "tools" / "dynamic_models.py")
    dm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dm)  # type: ignore[union-attr]
    m = dm.MODELS["crnn_dyn"]()
    for d, v in zip(m.graph.input[0].type.tensor_type.shape.dim, (1, 3, 32, 64)):
        d.Clear()
        d.dim_value = v
    art = graphopt.compile(m, "cpu", "-O2", threads=1)
    kmap = art.manifest["kernel_map"]
    packed = [e for e in kmap if e["kernel"].endswith("_prepacked")]
    assert packed, [e["kernel"] for e in kmap]  # the LSTM's input projection (and on AVX-512 the classifier)
    for e in packed:
        assert e["ops"] in (["LSTM"], ["MatMul"]), e
    lstm = [e for e in packed if e["ops"] == ["LSTM"]]
    assert lstm and all(e["role"] == "inline" for e in lstm), lstm
    # each conv's nodes appear in its own kernel only (nothing else is charged to them)
    for e in kmap:
        if "Conv" in e["ops"]:
            assert e["role"] == "kernel" or not e["kernel"].endswith("_prepacked"), e


def test_run_time_if_branch_kernels_are_profiled(tmp_path, capsys):
    """A run-time If's branches are Relax functions of their own: their kernels are in the
    kernel_map (role "branch", charged to the If) and in the profile of the branch taken; the
    other branch's are one note, not "did not run"."""
    vi = h.make_tensor_value_info
    n = 64
    w = (np.random.default_rng(5).standard_normal((n, n)) / 8).astype(np.float32)
    then_g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["m1"]), h.make_node("Relu", ["m1"], ["y1"])], "then",
                          [], [vi("y1", TP.FLOAT, [1, n])])
    else_g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["m2"]), h.make_node("Sigmoid", ["m2"], ["y2"])], "else",
                          [], [vi("y2", TP.FLOAT, [1, n])])
    g = h.make_graph([h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="gate")], "g",
                     [vi("c", TP.BOOL, []), vi("x", TP.FLOAT, [1, n])], [vi("y", TP.FLOAT, [1, n])], [nh.from_array(w, "W")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    art = graphopt.compile(m, "cpu", "-O2", threads=1)
    art.save(str(tmp_path / "art"))
    kmap = art.manifest["kernel_map"]
    branch = [e for e in kmap if e["role"] == "branch"]
    assert len(branch) >= 2 and all(e["nodes"] == ["gate"] and e["ops"] == ["If"] for e in branch), kmap
    x = np.random.default_rng(6).standard_normal((1, n)).astype(np.float32)
    np.savez(tmp_path / "in.npz", c=np.array(True), x=x)
    prof = _json(capsys, [str(tmp_path / "art"), "--profile", "--inputs", str(tmp_path / "in.npz"), "--repeat", "2"])
    rows = prof["profile"]["rows"]
    assert any(r["role"] == "branch" and r["nodes"] == ["gate"] for r in rows), rows
    notes = " ".join(prof["profile"].get("notes") or [])
    assert "did not run" not in notes and "If branches not taken" in notes, notes

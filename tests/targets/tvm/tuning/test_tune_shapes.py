"""`--tune-shapes`: the kernels with symbolic dims take the schedule fastest over sizes the user
gives (targets/tvm/tuning/shapes.py), and stay symbolic.

The option parses and rejects bad sizes in one line (exit 2, nothing written) before any pass
runs; a small conv net with symbolic H and W tuned at two sizes records each kernel's choice and
timings, still equals onnxruntime at a third size, and a second compile with the same tuning
database reuses the choices without measuring. Skipped cleanly without apache-tvm.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.cli import main, parse_options  # noqa: E402
from graphopt.errors import UsageError  # noqa: E402
from graphopt.input_shapes import check_tune_shapes, parse_tune_shapes  # noqa: E402

from onnx_builders import ort_run  # noqa: E402


def _net() -> onnx.ModelProto:
    """x [N, 3, H, W] -> conv 3x3 3->16 + relu -> conv 3x3 16->16 + relu -> conv 1x1 16->32."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    inits = [nh.from_array(w(16, 3, 3, 3), "w1"), nh.from_array(w(16), "b1"), nh.from_array(w(16, 16, 3, 3), "w2"),
             nh.from_array(w(16), "b2"), nh.from_array(w(32, 16, 1, 1), "w3"), nh.from_array(w(32), "b3")]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c2"], ["r2"]),
             h.make_node("Conv", ["r2", "w3", "b3"], ["y"])]
    g = h.make_graph(nodes, "tune_shapes_net", [h.make_tensor_value_info("x", TP.FLOAT, ["N", 3, "H", "W"])],
                     [h.make_tensor_value_info("y", TP.FLOAT, ["N", 32, "H", "W"])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def net_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("ts") / "net.onnx"
    onnx.save(_net(), p)
    return p


def test_parse_tune_shapes() -> None:
    assert parse_tune_shapes("x=1x3x320x320;x=1x3x640x480") == [{"x": (1, 3, 320, 320)}, {"x": (1, 3, 640, 480)}]
    # an input's k-th item is the k-th size; one given once is in every size
    assert parse_tune_shapes("x=1x8;m=1x8;x=1x16;m=1x16") == [{"x": (1, 8), "m": (1, 8)}, {"x": (1, 16), "m": (1, 16)}]
    assert parse_tune_shapes(" x=1x8 ; k=4 ; x=1x16 ;") == [{"x": (1, 8), "k": (4,)}, {"x": (1, 16), "k": (4,)}]
    for bad, why in (("", "expected NAME=DIMS"), ("x", "expected NAME=DIMS"), ("x=1xAx3", "whole numbers"),
                     ("=1x3", "expected NAME=DIMS"), ("x=1x0", "at least 1"),
                     ("x=1;x=2;y=1;y=2;y=3", "has 2 sizes, others 3")):
        with pytest.raises(UsageError, match=why):
            parse_tune_shapes(bad)


def test_check_tune_shapes_against_the_model() -> None:
    m = graphopt.load(_net())
    assert check_tune_shapes(m, parse_tune_shapes("x=1x3x8x8;x=2x3x16x24")) == [{"x": (1, 3, 8, 8)}, {"x": (2, 3, 16, 24)}]
    with pytest.raises(UsageError, match="no input 'y'"):
        check_tune_shapes(m, [{"y": (1, 3, 8, 8)}])
    with pytest.raises(UsageError, match="has rank 4"):
        check_tune_shapes(m, [{"x": (1, 3, 8)}])
    with pytest.raises(UsageError, match="dim 1 of input 'x' is fixed to 3"):
        check_tune_shapes(m, [{"x": (1, 4, 8, 8)}])
    graphopt.input_shapes.fix_input_shapes(m, {"x": (1, 3, 8, 8)})
    with pytest.raises(UsageError, match="no symbolic input dims"):
        check_tune_shapes(m, [{"x": (1, 3, 8, 8)}])


@pytest.mark.parametrize("spec, why", [
    ("y=1x3x8x8", "the model has no input 'y'"),
    ("x=1x3x8", "input 'x' has rank 4"),
    ("x=1x3x8x8;x=1x4x8x8", "size 2: x=1x4x8x8: dim 1 of input 'x' is fixed to 3"),
    ("x=1x3xbigx8", "whole numbers"),
])
def test_bad_tune_shapes_are_one_line_exit_2(net_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             spec: str, why: str) -> None:
    out = tmp_path / "art"
    code = main([str(net_path), "--target", "cpu", "-o", str(out), "--tune-shapes", spec])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and why in err[0], err
    assert not out.exists()


def test_tune_shapes_option_spellings(net_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_options([str(net_path), "--tune-shapes", "x=1x3x8x8"]).tune_shapes == "x=1x3x8x8"
    cfg = tmp_path / "g.toml"
    cfg.write_text('[graphopt]\ntune-shapes = "x=1x3x8x8;x=1x3x16x16"\n')
    assert parse_options([str(net_path), "--config", str(cfg)]).tune_shapes == "x=1x3x8x8;x=1x3x16x16"
    # the onnx target has no kernels to tune
    code = main([str(net_path), "-o", str(tmp_path / "o.onnx"), "--tune-shapes", "x=1x3x8x8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--tune-shapes is for the compiled targets" in err[0]
    # the cpu target's option, and both spellings at once
    from graphopt.target import get_target

    assert get_target("cpu{tune-shapes=x=1x3x8x8;x=1x3x16x16}").tune_shapes == [{"x": (1, 3, 8, 8)}, {"x": (1, 3, 16, 16)}]
    with pytest.raises(UsageError, match="both given"):
        graphopt.compile(_net(), "cpu{tune-shapes=x=1x3x8x8}", tune_shapes="x=1x3x16x16")


def _conv16() -> onnx.ModelProto:
    """x [N, 16, H, W] -> conv 3x3 16->16 (pad 1) + relu: one blocked conv kernel to tune."""
    rng = np.random.default_rng(3)
    inits = [nh.from_array((rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32), "w"),
             nh.from_array(rng.standard_normal(16).astype(np.float32), "b")]
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c"], ["y"])]
    g = h.make_graph(nodes, "conv16", [h.make_tensor_value_info("x", TP.FLOAT, ["N", 16, "H", "W"])],
                     [h.make_tensor_value_info("y", TP.FLOAT, ["N", 16, "H", "W"])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def test_tuned_at_two_sizes_records_choices_matches_ort_at_a_third_and_reuses_the_db(tmp_path: Path) -> None:
    m = _conv16()
    db = tmp_path / "db"
    events: list[dict] = []
    sizes = "x=1x16x24x40;x=1x16x40x16"
    art = graphopt.compile(m, "cpu", tune_shapes=sizes, tuning_db=str(db), threads=2, progress=events.append)
    shapes = art.manifest["tuning"]["shapes"]
    assert art.report["tuning"]["shapes"] == shapes
    assert shapes["sizes"] == [{"x": [1, 16, 24, 40]}, {"x": [1, 16, 40, 16]}]
    [(name, c)] = shapes["kernels"].items()  # the conv (the layout copies have no choice to make)
    assert c["rule"] == "blocked-conv" and c["candidates"] >= 3, c
    built = [e["candidate"] for e in events if e.get("ev") == "built" and e.get("kernel") == name]
    assert built[0] == "default" and len(built) == c["candidates"]
    assert len(c["default_ms"]) == 2 and len(c["chosen_ms"]) == 2
    assert c["timings"]["default"] == c["default_ms"] and len(c["timings"]) == c["candidates"]
    # the kernel's arguments at each size: the blocked input map, 24x40 then 40x16 (blocks of the
    # machine model's lanes: 16 on AVX-512, 8 on AVX2)
    b = int(art.manifest["kernels"]["block"])
    assert [a[0] for a in c["args"]] == [[1, 16 // b, 24, 40, b], [1, 16 // b, 40, 16, b]]
    if c["choice"] == "default":  # kept: why, in the record and in one line
        assert c["why"].startswith("no candidate was faster") and c["ratio"] == 1.0
        assert any(e.get("ev") == "kept" and c["why"] in e["line"] for e in events)
    else:
        assert c["ratio"] < 0.97 and c["choice"] in c["timings"]
        assert any(e.get("ev") == "tuned" and e.get("choice") == c["choice"] for e in events)
    assert (db / "graphopt_tune_shapes.json").exists()
    # one artifact, every size: other sizes equal onnxruntime (the dims stay symbolic)
    assert art.manifest["dims"]["symbolic"].keys() >= {"H", "W"}
    for size in ((1, 16, 21, 27), (2, 16, 9, 50)):
        x = np.random.default_rng(1).standard_normal(size).astype(np.float32)
        np.testing.assert_allclose(art.run({"x": x})[0], ort_run(m, {"x": x})[0], rtol=1e-4, atol=1e-4)
    # a second compile with the same database measures nothing: the choice is reused
    events2: list[dict] = []
    art2 = graphopt.compile(m, "cpu", tune_shapes=sizes, tuning_db=str(db), threads=2, progress=events2.append)
    again = art2.manifest["tuning"]["shapes"]
    assert again["kernels"][name]["reused"] and again["kernels"][name]["choice"] == c["choice"]
    assert again["reused"] == 1 and not [e for e in events2 if e.get("ev") == "built"]
    x = np.random.default_rng(2).standard_normal((1, 16, 21, 27)).astype(np.float32)
    np.testing.assert_allclose(art2.run({"x": x})[0], ort_run(m, {"x": x})[0], rtol=1e-4, atol=1e-4)
    # other sizes are another key: measured again
    art3 = graphopt.compile(m, "cpu", tune_shapes="x=1x16x8x8;x=1x16x16x8", tuning_db=str(db), threads=2,
                            tune_minutes=0.01)
    assert not art3.manifest["tuning"]["shapes"]["kernels"][name].get("reused")


def test_cli_prints_one_line_for_a_kernel_that_kept_its_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "conv16.onnx"
    onnx.save(_conv16(), src)
    # (a budget that ends before the first kernel: it keeps its default, and says so)
    code = main([str(src), "--target", "cpu", "-o", str(tmp_path / "art"), "--tune-shapes", "x=1x16x8x8;x=1x16x16x16",
                 "--tune-minutes", "1e-9", "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("tune-shapes:")]
    assert len(lines) == 1 and "keeps its default schedule (blocked-conv)" in lines[0] and "time budget" in lines[0], err
    rep = json.loads((tmp_path / "r.json").read_text())
    shapes = rep["tuning"]["shapes"]
    assert shapes["stopped"] == "time budget" and shapes["kept_default"] == 1


def test_a_size_the_compiled_model_cannot_take_is_one_line() -> None:
    """The detector's H and W must be multiples of 8 (maps of strides 2, 4, 8 are concatenated):
    a tuning size of 100 is refused before anything is measured."""
    import importlib.util

    from paths import ROOT

    spec = importlib.util.spec_from_file_location("dynamic_models_for_tune_shapes", ROOT / "tools" / "dynamic_models.py")
    dm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dm)  # type: ignore[union-attr]
    with pytest.raises(UsageError) as e:
        graphopt.compile(dm.MODELS["detector_dyn"](), "cpu", tune_shapes="image=1x3x64x64;image=1x3x100x96")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--tune-shapes image=1x3x100x96: H = 100 is not a multiple of 8"), msg


@pytest.mark.parametrize("crash", ["first-variant", "default"])
def test_a_candidate_that_crashes_when_run_costs_its_kernel_not_the_compile(crash: str, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidates are timed in a child process: a variant that crashes it is named in one line and
    left out, the others are timed again and one is chosen; a crash of the default schedule's run
    keeps the default (with the reason). Either way the compile finishes and equals onnxruntime."""
    from graphopt.targets.tvm.tuning.shapes_worker import TEST_CRASH_ENV

    monkeypatch.setenv(TEST_CRASH_ENV, crash)
    m = _conv16()
    events: list[dict] = []
    art = graphopt.compile(m, "cpu", tune_shapes="x=1x16x24x40;x=1x16x40x16", tuning_db=str(tmp_path / "db"), threads=2,
                           progress=events.append)
    [(name, c)] = art.manifest["tuning"]["shapes"]["kernels"].items()
    built = [e["candidate"] for e in events if e.get("ev") == "built" and e.get("kernel") == name]
    if crash == "default":
        assert c["choice"] == "default" and c["why"] == "its timing worker crashed (SIGSEGV) running candidate default", c
        assert any(e.get("ev") == "kept" and c["why"] in e["line"] for e in events)
    else:
        [drop] = [e for e in events if e.get("ev") == "dropped"]
        assert drop["line"].startswith(f"tune-shapes: {name} (") and drop["line"].endswith(
            f"): candidate {built[1]}: the timing worker crashed (SIGSEGV) running it; left out"), drop
        assert built[1] not in c["timings"] and "default" in c["timings"] and c["candidates"] == len(built) - 1, c
    x = np.random.default_rng(3).standard_normal((1, 16, 21, 27)).astype(np.float32)
    np.testing.assert_allclose(art.run({"x": x})[0], ort_run(m, {"x": x})[0], rtol=1e-4, atol=1e-4)

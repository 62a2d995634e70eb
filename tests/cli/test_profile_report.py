"""The kernel profile in the reports (issue 19 item 5): `graphopt-compile --profile` puts
graphopt.profiler's rows into the compile report (JSON, terminal, HTML chart), and
`graphopt-run ARTIFACT --profile [--compare M.onnx] --report out.html` writes the HTML page with
the profile chart from the real profiler rows, the by-node comparison and the artifact's compile
report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from graphopt import html_report
from graphopt.cli import main as compile_main
from graphopt.run_cli import main as run_main

from paths import EXAMPLES

EXAMPLE = EXAMPLES / "tiny_cnn.onnx"


def _charts(page: str) -> list[str]:
    return re.findall(r'data-chart="([a-z-]+)"><svg', page)


def _section(page: str, anchor: str) -> str:
    m = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S)
    assert m, f"no section {anchor}"
    return m.group(1)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The example compiled for the cpu target with --profile --report r.html (and its JSON twin)."""
    pytest.importorskip("tvm")
    pytest.importorskip("matplotlib")
    d = tmp_path_factory.mktemp("profrep")
    art, page = d / "art", d / "r.html"
    import contextlib  # (module scope: no capsys; stderr through a StringIO)
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = compile_main([str(EXAMPLE), "--target", "cpu", "-o", str(art), "--profile", "--report", str(page),
                             "--threads", "1"])
    assert code == 0, err.getvalue()
    return {"dir": d, "art": art, "page": page.read_text(), "stderr": err.getvalue(),
            "report": json.loads((art / "report.json").read_text()),
            "kmap": json.loads((art / "manifest.json").read_text())["kernel_map"]}


def test_compile_profile_reaches_json_terminal_and_html(compiled: dict) -> None:
    r, kmap = compiled["report"], compiled["kmap"]
    prof = r["profile"]
    rows = prof["rows"]
    # the real profiler's rows: one per kernel call that ran, named as in the manifest's kernel_map
    assert rows and {x["kernel"] for x in rows} <= {e["kernel"] for e in kmap}
    assert abs(sum(x["share"] for x in rows) - 100) < 0.5 and all(x["ms"] > 0 for x in rows)
    conv = [x for x in rows if "Conv" in x["ops"]]
    assert conv and all(x["flops"] and x["gflops"] for x in conv)
    assert prof["source"] == str(compiled["art"])  # the output, not the staging folder
    assert "profile" in r["compile_seconds"]
    # terminal: the slowest kernels after the summary
    err = compiled["stderr"]
    assert "profile (slowest first; every kernel: graphopt-run OUT --profile):" in err
    slowest = max(rows, key=lambda x: x["ms"])["kernel"]
    table = err[err.index("profile (slowest first"):]
    first_row = next(ln for ln in table.splitlines()[1:] if not ln.lstrip().startswith("#"))
    assert first_row.split()[1] == slowest, table
    # HTML: the profile section with its chart, every kernel in the table, the time by schedule
    page = compiled["page"]
    assert "profile" in _charts(page)
    sec = _section(page, "profile")
    for x in rows:
        assert f"<td>{x['kernel']}</td>" in sec
    if len({x["schedule"] for x in rows}) > 1:
        assert "profile-schedules" in _charts(page)
    assert "GFLOP/s" in sec and "nchw" in sec  # the rate and schedule columns of the real rows


def test_run_report_html_has_profile_compare_and_the_compile_report(compiled: dict, capsys: pytest.CaptureFixture[str]) -> None:
    page_path = compiled["dir"] / "run.html"
    code = run_main([str(compiled["art"]), "--profile", "--compare", str(EXAMPLE), "--benchmark", "--repeat", "3",
                     "--report", str(page_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"graphopt-run: report written to {page_path}" in err
    page = page_path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    charts = _charts(page)
    assert "profile" in charts and "profile-compare" in charts
    assert "pipeline" in re.findall(r'<section id="([a-z-]+)">', page)  # the artifact's compile report
    assert "latency (benchmark)" in page and "profiled run" in page
    cmp_sec = _section(page, "profile-compare")
    for node in ("fc1", "fc2"):  # ONNX nodes of the example, lined up against onnxruntime
        assert node in cmp_sec
    assert not re.search(r"<script|<link|<img|src=", page)


def test_run_report_json_matches_the_printed_profile(compiled: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = compiled["dir"] / "run.json"
    code = run_main([str(compiled["art"]), "--profile", "--json", "--report", str(path)])
    out, _ = capsys.readouterr()
    assert code == 0
    printed, written = json.loads(out), json.loads(path.read_text())
    assert [x["kernel"] for x in written["profile"]["rows"]] == [x["kernel"] for x in printed["profile"]["rows"]]
    assert written["pipeline"] == compiled["report"]["pipeline"]  # (the compile report underneath)


@pytest.mark.parametrize("argv, message", [
    (["--report", "x.html"], "add --profile, --compare or --benchmark"),
    (["--profile", "--report", "x.html", "--html", "y.html"], "--report and --html name the same page"),
])
def test_run_report_usage_errors(compiled: dict, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code = run_main([str(compiled["art"]), *argv])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_onnx_target_profile_is_onnxruntimes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out, page = tmp_path / "o.onnx", tmp_path / "r.html"
    code = compile_main([str(EXAMPLE), "-o", str(out), "--profile", "--report", str(page)])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "profile (slowest first" in err and "onnxruntime" in err
    html = page.read_text()
    assert "profile" in _charts(html)
    assert "Conv" in _section(html, "profile")


def test_profile_inputs_are_accepted_and_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    np.savez(tmp_path / "x.npz", input=np.zeros((1, 3, 8, 8), np.float32))  # wrong H, W
    code = compile_main([str(EXAMPLE), "-o", str(tmp_path / "o.onnx"), "--profile", "--inputs", str(tmp_path / "x.npz")])
    _, err = capsys.readouterr()
    assert code == 2 and "shape [1, 3, 8, 8] given" in err
    assert not (tmp_path / "o.onnx").exists()


def test_profile_html_sections_from_profiler_json() -> None:
    """render_html with graphopt.profiler's JSON: the header line, bars labelled by ONNX nodes,
    the time by schedule, and the comparison section."""
    pytest.importorskip("matplotlib")
    rows = [{"index": 0, "kernel": "k0", "nodes": ["/conv1/Conv", "/relu/Relu"], "ops": ["Conv", "Relu"], "flops": 2_000_000,
             "ms": 0.8, "share": 80.0, "gflops": 2.5, "peak_pct": 1.5, "schedule": "nchw16c blocked-conv", "role": "kernel",
             "int8": False},
            {"index": 1, "kernel": "k1", "nodes": ["/sum/Sum"], "ops": ["Sum"], "flops": None, "ms": 0.2, "share": 20.0,
             "gflops": None, "peak_pct": None, "schedule": "injective (generic fallback)", "role": "kernel", "int8": False}]
    prof = {"source": "out/", "runtime": "graphopt cpu artifact", "threads": 2, "timing": "warm", "latency_ms": 1.1,
            "kernel_total_ms": 1.0, "peak": {"gflops": 166.0, "int8_gops": None, "how": "2 cores"}, "notes": ["a note"],
            "rows": rows}
    cmp = {"totals": {"graphopt_ms": 1.0, "onnxruntime_ms": 0.5, "ratio": 2.0, "graphopt_latency_ms": 1.1,
                      "onnxruntime_latency_ms": 0.6},
           "rows": [{"nodes": ["/conv1/Conv", "/relu/Relu"], "ops": ["Conv", "Relu"], "kernels": ["k0"],
                     "onnxruntime_nodes": ["fused"], "graphopt_ms": 0.8, "onnxruntime_ms": 0.4, "ratio": 2.0}]}
    page = html_report.render_html({"model": "m.onnx", "profile": prof, "profile_compare": cmp})
    assert {"profile", "profile-schedules", "profile-compare"} <= set(_charts(page))
    sec = _section(page, "profile")
    assert "graphopt cpu artifact: out/, 2 threads · 2 kernels" in sec and "note: a note" in sec
    assert "injective (generic fallback)" in sec and "2.0 M" in sec
    assert "/conv1/Conv" in _section(page, "profile-compare")
    # the profile comes first: what a "why is it slow" reader looks for
    order = re.findall(r'<section id="([a-z-]+)">', page)
    assert order.index("profile") < order.index("pipeline")


@pytest.mark.slow
def test_profile_chart_renders_in_chromium(compiled: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real profile alone on a page, screenshot in headless chromium: the kernel bars (blue)
    and the time-by-schedule bars (orange) are drawn; without matplotlib neither is (control)."""
    import shutil
    import subprocess
    import sys

    import numpy as np

    pytest.importorskip("PIL")
    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium (apt-get install -y chromium)")

    def pixels(page: str, name: str) -> tuple[int, int]:
        html, png = tmp_path / f"{name}.html", tmp_path / f"{name}.png"
        html.write_text(page)
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1280,2400", f"--screenshot={png}", html.as_uri()], check=True, capture_output=True,
                       timeout=120)
        img = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)

        def count(hex_colour: str) -> int:
            c = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
            return int((np.abs(img - c).max(axis=-1) <= 24).sum())

        return count(html_report.BLUE), count(html_report.ORANGE)

    r = {"model": "m.onnx", "profile": compiled["report"]["profile"]}
    blue, orange = pixels(html_report.render_html(r), "profile")
    assert blue > 2000 and orange > 500, (blue, orange)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    blue, orange = pixels(html_report.render_html(r), "plain")
    assert blue < 200 and orange < 50, (blue, orange)


def test_profile_from_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "g.toml"
    cfg.write_text('[graphopt]\nprofile = true\n')
    code = compile_main([str(EXAMPLE), "-o", str(tmp_path / "o.onnx"), "--config", str(cfg), "--report", str(tmp_path / "r.json")])
    _, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads((tmp_path / "r.json").read_text())["profile"]["rows"]
    assert rows and {"Conv", "Gemm"} <= {op for x in rows for op in x["ops"]}
    code = compile_main([str(EXAMPLE), "-o", str(tmp_path / "o2.onnx"), "--config", str(cfg), "--no-profile", "--report",
                         str(tmp_path / "r2.json")])
    capsys.readouterr()
    assert code == 0 and "profile" not in json.loads((tmp_path / "r2.json").read_text())


def test_profile_of_an_emulated_target_is_refused_before_compiling(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tvm")
    code = compile_main([str(EXAMPLE), "--target", "arm64", "-o", str(tmp_path / "a"), "--profile"])
    _, err = capsys.readouterr()
    assert code == 2 and "--profile times the kernels on this machine" in err and "graphopt-run OUT --profile" in err
    assert not (tmp_path / "a").exists()


def test_run_html_flag_writes_html_whatever_the_name(compiled: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = compiled["dir"] / "page.out"
    assert run_main([str(compiled["art"]), "--benchmark", "--repeat", "3", "--html", str(path)]) == 0
    capsys.readouterr()
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "latency (benchmark)" in page
    # (no --profile here: the profile shown is the one the compile report carries)
    assert '<section id="profile">' in page and "profile-compare" not in page

"""graphopt-compile: flags, exit codes, one-line errors, atomic output, determinism, config files,
the report, --print-pipeline and --verify-each naming a broken pass.

Most tests call `main([...])` in-process with small passes defined here; one runs the installed
console script in a subprocess.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass, make_dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.cli import main
from graphopt.errors import GraphoptError
from graphopt.ir import Model, NumpyTensor
from graphopt.report import op_counts
from graphopt.transform import OPT_LEVELS, Pass, PassContext, PassResult

from paths import ROOT
EXAMPLE = ROOT / "examples" / "tiny_cnn.onnx"
SCRIPT = Path(sys.executable).parent / "graphopt-compile"
PREFIX = "graphopt-compile: error: "


# --- test passes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DropIdentity(Pass):
    """Remove Identity nodes whose output is not a graph output."""

    name: ClassVar[str] = "t-drop-identity"
    limit: int = 0  # 0: all

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed = 0
        for node in model.graph.find_nodes("Identity"):
            if self.limit and removed >= self.limit:
                break
            src, out = node.inputs[0], node.outputs[0]
            if src is None or out.is_graph_output():
                continue
            out.replace_all_uses_with(src)
            model.graph.remove(node)
            removed += 1
        return PassResult(changed=removed > 0, stats={"removed": removed})


@dataclass(frozen=True)
class DoubleWeights(Pass):
    """Multiply the last float initializer by 2 (deliberately wrong)."""

    name: ClassVar[str] = "t-double-weights"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        value = [v for v in model.graph.initializers.values() if v.dtype is not None and v.dtype.is_floating][-1]
        value.const_value = NumpyTensor(value.const_value.numpy() * 2, value.name)  # type: ignore[union-attr]
        return PassResult(changed=True)


@dataclass(frozen=True)
class Boom(Pass):
    """Crash (a bug in a pass)."""

    name: ClassVar[str] = "t-boom"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise RuntimeError("kaboom")


@dataclass(frozen=True)
class Refuse(Pass):
    """Refuse the model (a GraphoptError: bad input)."""

    name: ClassVar[str] = "t-refuse"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise GraphoptError("this model has no frobnicator")


TEST_PASSES: list[type[Pass]] = [DropIdentity, DoubleWeights, Boom, Refuse]


def _level_pass_names() -> list[str]:
    names: list[str] = []
    for spec in OPT_LEVELS.values():
        names += [n for n in re.findall(r"[A-Za-z][A-Za-z0-9_.-]*", spec) if not n.startswith("O")]
    return sorted(set(names) - {""})


def _stub(name: str) -> type[Pass]:
    """A do-nothing stand-in for a built-in the -O levels name but which is not written yet."""
    cls = make_dataclass(f"Stub_{name.replace('-', '_')}", [], bases=(Pass,), frozen=True,
                         namespace={"name": name, "__doc__": f"stand-in for {name}",
                                    "run": lambda self, model, ctx: PassResult(changed=False)})
    cls.__annotations__["name"] = ClassVar[str]
    return cls


@pytest.fixture(autouse=True)
def registry(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A private copy of the pass registry with this file's passes (the real one is restored
    afterwards), plus stand-ins for -O level passes that do not exist yet."""
    reg = importlib.import_module("graphopt.transform.registry")
    reg.list_passes()  # load built-ins and installed plugins into the real registry first
    monkeypatch.setattr(reg, "_REGISTRY", dict(reg._REGISTRY))
    monkeypatch.setattr(reg, "_ORIGIN", dict(reg._ORIGIN))
    for cls in TEST_PASSES:
        reg.register_pass(cls)
    for name in _level_pass_names():
        if name not in reg._REGISTRY:
            reg.register_pass(_stub(name), origin="test stand-in")
    monkeypatch.delenv("GRAPHOPT_DEBUG", raising=False)
    return reg


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(PREFIX)]


# --- compiling ----------------------------------------------------------------------------------


def test_compile_writes_a_model_and_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(capsys, EXAMPLE, "-o", out, "--passes", "t-drop-identity", "--target", "onnx")
    assert code == 0, err
    assert stdout == ""  # the table goes to stderr; stdout stays clean for pipes
    assert "t-drop-identity" in err and "Identity" in err and "(-2)" in err
    compiled = graphopt.load(out)
    assert op_counts(compiled).get("Identity", 0) == 0
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]  # no staging leftovers


def test_quiet_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = run_cli(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "-O0", "--quiet")
    assert (code, stdout, err) == (0, "", "")


def test_report_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = run_cli(capsys, EXAMPLE, "-o", out, "--passes", "t-drop-identity{limit=1},t-drop-identity",
                           "--verify", "--report", rep, "-q")
    assert code == 0, err
    r = json.loads(rep.read_text())
    assert r["status"] == "ok" and r["target"] == "onnx" and r["output"] == str(out)
    assert r["pipeline"] == "t-drop-identity{limit=1},t-drop-identity"
    assert [(p["pass"], p["nodes_before"], p["nodes_after"], p["changed"]) for p in r["passes"]] == [
        ("t-drop-identity{limit=1}", 20, 19, True),
        ("t-drop-identity", 19, 18, True),
    ]
    assert r["passes"][0]["stats"] == {"removed": 1}
    assert all(p["seconds"] >= 0 for p in r["passes"])
    assert r["nodes"]["before"]["Identity"] == 2 and "Identity" not in r["nodes"]["after"]
    assert r["nodes"]["before"]["Conv"] == r["nodes"]["after"]["Conv"] == 2
    assert (r["nodes"]["total_before"], r["nodes"]["total_after"]) == (20, 18)
    assert r["size"] == {"before": EXAMPLE.stat().st_size, "after": out.stat().st_size}
    v = r["verify"]
    assert v["ok"] is True and v["max_abs"] < 1e-5 and v["inputs"] == "random(seed=0)"
    assert r["verify_each"] is None


@pytest.mark.parametrize("spec", ["t-drop-identity,t-double-weights", "-O2"])
def test_same_input_and_options_give_identical_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b" / "a.onnx"
    for out in (a, b):
        code, _, err = run_cli(capsys, EXAMPLE, "-o", out, "--passes", spec, "-q")
        assert code == 0, err
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != EXAMPLE.read_bytes()  # the passes did change something


def test_example_model_is_reproducible() -> None:
    spec = importlib.util.spec_from_file_location("make_example", ROOT / "tools" / "make_example.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build().SerializeToString(deterministic=True) == EXAMPLE.read_bytes()
    m = graphopt.load(EXAMPLE)
    assert isinstance(m.graph.inputs[0].shape[0], str)  # dynamic batch
    assert 40_000 < EXAMPLE.stat().st_size < 80_000


# --- --verify and --verify-each ---------------------------------------------------------------


def test_verify_failure_exits_3_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    out.write_bytes(b"previous build")
    code, _, err = run_cli(capsys, EXAMPLE, "-o", out, "--passes", "t-double-weights", "--verify", "--report", rep)
    assert code == 3
    [line] = error_lines(err)
    assert "differ" in line and "was not written" in line
    assert "verify: FAILED" in err
    assert out.read_bytes() == b"previous build"
    assert sorted(os.listdir(tmp_path)) == ["o.onnx", "r.json"]
    r = json.loads(rep.read_text())
    assert r["status"] == "verify-failed" and r["verify"]["ok"] is False and r["verify"]["max_abs"] > 1e-3


def test_verify_each_names_the_broken_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, EXAMPLE, "-o", out, "--passes", "t-drop-identity,t-double-weights,t-drop-identity",
                           "--verify-each", "-q")
    assert code == 3
    [line] = err.splitlines()
    assert line.startswith(PREFIX)
    assert "after pass 't-double-weights'" in line and "passes before it: t-drop-identity" in line
    assert not out.exists()


def test_verify_each_passes_and_reports_each_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rep = tmp_path / "r.json"
    code, _, err = run_cli(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--passes", "t-drop-identity",
                           "--verify-each", "--report", rep, "-q")
    assert code == 0, err
    assert [c["pass"] for c in json.loads(rep.read_text())["verify_each"]] == ["t-drop-identity"]


def test_inputs_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npz, rep = tmp_path / "x.npz", tmp_path / "r.json"
    np.savez(npz, input=np.random.default_rng(1).standard_normal((5, 3, 16, 16)).astype(np.float32))
    code, _, err = run_cli(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "-O0", "--verify", "--inputs", npz,
                           "--report", rep, "-q")
    assert code == 0, err
    assert json.loads(rep.read_text())["verify"]["inputs"] == str(npz)

    np.savez(tmp_path / "bad.npz", image=np.zeros((1, 3, 16, 16), np.float32))
    code, _, err = run_cli(capsys, EXAMPLE, "-o", tmp_path / "o2.onnx", "-O0", "--verify", "--inputs", tmp_path / "bad.npz")
    assert code == 2 and "no input 'image'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o2.onnx").exists()


# --- errors, exit codes, atomic output ---------------------------------------------------------


def _substitute(arg: str, subst: dict[str, str]) -> str:
    for token, value in subst.items():
        arg = arg.replace(token, value)
    return arg


def _truncated(tmp: Path) -> Path:
    p = tmp / "truncated.onnx"
    p.write_bytes(EXAMPLE.read_bytes()[:1000])
    return p


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["<tmp>/missing.onnx", "-o", "<out>"], "no such file"),
        (["<truncated>", "-o", "<out>"], "truncated"),
        (["<model>", "-o", "<out>", "--passes", "no-such-pass"], "unknown pass 'no-such-pass'"),
        (["<model>", "-o", "<out>", "--passes", "t-drop-identity{limit"], "bad pipeline spec"),
        (["<model>", "-o", "<out>", "--passes", "t-drop-identity{limit=many}"], "not a valid int"),
        (["<model>", "-o", "<out>", "--passes", "t-drop-identity", "--disable", "t-boom"], "no pass 't-boom'"),
        (["<model>", "-o", "<out>", "-O7"], "-O7"),
        (["<model>", "-o", "<out>", "-O1", "--passes", "t-drop-identity"], "not both"),
        (["<model>", "-o", "<out>", "--target", "fpga"], "unknown target 'fpga'"),
        (["<model>", "-o", "<out>", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["<model>"], "-o OUT.onnx"),
        (["<model>", "-o", "<out>", "--inputs", "x.npz"], "--inputs is only used by"),
        (["<model>", "-o", "<out>", "--passes", "t-refuse"], "no frobnicator"),
        (["<model>", "-o", "<tmp>/file.txt/out.onnx"], "is not a folder"),
        (["<model>", "-o", "<tmp>"], "is a folder"),
        (["--list-passes", "--print-pipeline"], "cannot be combined"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    (tmp_path / "file.txt").write_text("not a folder")
    out = tmp_path / "out.onnx"
    subst = {"<tmp>": str(tmp_path), "<out>": str(out), "<model>": str(EXAMPLE), "<truncated>": str(_truncated(tmp_path))}
    code, stdout, err = run_cli(capsys, *[_substitute(a, subst) for a in args])
    assert code == 2
    assert stdout == ""
    [line] = err.splitlines()
    assert line.startswith(PREFIX) and needle in line
    assert not out.exists()


def test_crashing_pass_is_internal_error_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, EXAMPLE, "-o", out, "--passes", "t-drop-identity,t-boom")
    assert code == 1
    [line] = err.splitlines()
    assert line.startswith(PREFIX) and "'t-boom'" in line and "kaboom" in line and "--debug" in line
    assert "passes before it: t-drop-identity" in line

    code, _, err = run_cli(capsys, EXAMPLE, "-o", out, "--passes", "t-boom", "--debug")
    assert code == 1 and "Traceback" in err and "RuntimeError: kaboom" in err
    monkeypatch.setenv("GRAPHOPT_DEBUG", "1")
    code, _, err = run_cli(capsys, EXAMPLE, "-o", out, "--passes", "t-boom")
    assert code == 1 and "Traceback" in err
    assert err.splitlines()[-1].startswith(PREFIX)


def test_internal_error_outside_passes_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(*a: object, **k: object) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(graphopt, "save", broken_save)
    code, _, err = run_cli(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "-O0")
    assert code == 1
    assert err.splitlines() == [
        f"{PREFIX}internal error: ZeroDivisionError: division by zero "
        "(run with --debug or GRAPHOPT_DEBUG=1 for the traceback)"
    ]


@pytest.mark.parametrize("failing", ["t-boom", "t-refuse"])
def test_failure_leaves_no_file_and_keeps_existing_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], failing: str
) -> None:
    new, existing = tmp_path / "new.onnx", tmp_path / "existing.onnx"
    existing.write_bytes(b"the last good build")
    for out in (new, existing):
        code, _, _ = run_cli(capsys, EXAMPLE, "-o", out, "--passes", f"t-drop-identity,{failing}")
        assert code in (1, 2)
    assert not new.exists()
    assert existing.read_bytes() == b"the last good build"
    assert sorted(os.listdir(tmp_path)) == ["existing.onnx"]


def test_missing_output_folder_is_created_and_removed_on_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run_cli(capsys, EXAMPLE, "-o", tmp_path / "a" / "b" / "o.onnx", "--passes", "t-boom")
    assert code == 1
    assert not (tmp_path / "a").exists()
    code, _, err = run_cli(capsys, EXAMPLE, "-o", tmp_path / "a" / "b" / "o.onnx", "-O0", "-q")
    assert code == 0, err
    assert os.listdir(tmp_path / "a" / "b") == ["o.onnx"]


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "--verify-each" in out and "3  numeric verification failed" in out
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"graphopt-compile {graphopt.__version__}"


# --- --print-pipeline, --list-passes, --disable, --dump-ir, --explain -----------------------------


def _expand(spec: str) -> list[str]:
    """-O levels expanded by hand (independently of the parser)."""
    items: list[str] = []
    for item in filter(None, spec.split(",")):
        items += _expand(OPT_LEVELS[item]) if item in OPT_LEVELS else [item]
    return items


@pytest.mark.parametrize("level", ["0", "1", "2", "3"])
def test_print_pipeline_for_each_level(capsys: pytest.CaptureFixture[str], level: str) -> None:
    code, out, err = run_cli(capsys, f"-O{level}", "--print-pipeline")
    assert code == 0, err
    assert out == ",".join(_expand(f"-O{level}")) + "\n"
    assert run_cli(capsys, "--passes", f"-O{level}", "--print-pipeline")[1] == out  # a level is a spec too
    if level != "0":
        assert "dce" in out.split(",")[-1]  # every cleanup level ends by removing dead code


def test_print_pipeline_with_passes_and_disable(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--passes", "t-drop-identity{limit=2},t-double-weights", "--disable",
                             "t-double-weights", "--print-pipeline", "--quiet")
    assert code == 0
    assert out == "t-drop-identity{limit=2}\n"
    assert "--disable: skipped pass t-double-weights" in err  # logged even with --quiet


def test_disable_is_logged_and_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rep = tmp_path / "r.json"
    code, _, err = run_cli(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--passes", "t-drop-identity,t-double-weights",
                           "--disable", "t-double-weights", "--verify", "--report", rep, "-q")
    assert code == 0  # the broken pass did not run, so --verify passes
    assert "skipped pass t-double-weights" in err
    r = json.loads(rep.read_text())
    assert r["disabled"] == ["t-double-weights"] and r["pipeline"] == "t-drop-identity"
    assert any("t-double-weights" in line for line in r["log"])


def test_list_passes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--list-passes")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "Remove Identity nodes whose output is not a graph output." in lines["t-drop-identity"]
    assert "Crash (a bug in a pass)." in lines["t-boom"]
    assert "[plugin" not in lines["t-boom"]  # origins are shown for plugins only


def test_dump_ir(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        importlib.import_module("graphopt.ir.printer")
    except ImportError:  # the printer is written concurrently; stand in for it until it lands
        fake = types.ModuleType("graphopt.ir.printer")
        fake.print_model = lambda model, **kw: f"{len(list(model.all_nodes()))} nodes\n"  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "graphopt.ir.printer", fake)
    dump = tmp_path / "ir"
    code, _, err = run_cli(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--passes", "t-drop-identity", "--dump-ir", dump, "-q")
    assert code == 0, err
    assert sorted(os.listdir(dump)) == ["00-input.txt", "01-t-drop-identity.txt"]
    assert (dump / "00-input.txt").read_text() != (dump / "01-t-drop-identity.txt").read_text()


def _fake_pattern(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Model, object]]:
    calls: list[tuple[Model, object]] = []
    rules = {"fuse-conv-bn": object()}

    def get_rule(name: str) -> object:
        return rules[name]

    def explain(model: Model, rule: object) -> str:
        calls.append((model, rule))
        return "best partial match: Conv -> BatchNormalization\nfailed: epsilon differs\n"

    fake = types.ModuleType("graphopt.pattern")
    fake.get_rule, fake.explain, fake.list_rules = get_rule, explain, lambda: list(rules)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "graphopt.pattern", fake)
    return calls


def test_explain(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_pattern(monkeypatch)
    code, out, err = run_cli(capsys, EXAMPLE, "--explain", "fuse-conv-bn")
    assert code == 0, err
    assert out == "best partial match: Conv -> BatchNormalization\nfailed: epsilon differs\n"
    assert len(calls) == 1 and op_counts(calls[0][0])["Conv"] == 2

    code, _, err = run_cli(capsys, EXAMPLE, "--explain", "fuse-everything")
    assert code == 2 and err.splitlines() == [f"{PREFIX}unknown rule 'fuse-everything' (have: fuse-conv-bn)"]
    code, _, err = run_cli(capsys, "--explain", "fuse-conv-bn")
    assert code == 2 and "needs a MODEL" in err


def test_explain_with_the_real_pattern_package(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from graphopt.pattern import P, Rule, list_rules, register_rule

    list_rules()  # load the built-in rules first, then register ours in a copy that is restored
    rules = importlib.import_module("graphopt.pattern.rule")
    monkeypatch.setattr(rules, "_RULES", dict(rules._RULES))
    register_rule(Rule("t-relu-of-sigmoid", P.op("Relu", P.op("Sigmoid", P.any())), rewrite=lambda m, b: None))
    code, out, err = run_cli(capsys, EXAMPLE, "--explain", "t-relu-of-sigmoid")
    assert code == 0, err
    assert "'t-relu-of-sigmoid' does not fire" in out and "Relu" in out
    code, _, err = run_cli(capsys, EXAMPLE, "--explain", "t-no-such-rule")
    assert code == 2 and len(err.splitlines()) == 1 and "unknown rule 't-no-such-rule'" in err


def test_explain_sees_contrib_ops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from onnx import helper

    shape = [1, 2, 3, 4]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape) for n in "qkv"],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)])
    path = tmp_path / "sdpa17.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    code, out, err = run_cli(capsys, str(path), "--explain", "sdpa-attention")
    assert code == 0, err
    assert "does not fire" in out and "contrib ops are off" in out
    code, out, err = run_cli(capsys, str(path), "--explain", "sdpa-attention", "--contrib-ops")
    assert code == 0, err
    assert "fires at 1 of 2 candidate roots" in out, out


# --- config file -----------------------------------------------------------------------------------


def test_config_file_and_precedence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    cfg = cfg_dir / "graphopt.toml"
    cfg.write_text(
        "[graphopt]\n"
        'passes = "t-drop-identity,t-double-weights"\n'
        'disable = ["t-double-weights"]\n'
        "verify = true\n"
        'report = "r.json"\n'  # relative to the config file
        "quiet = true\n"
    )
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, EXAMPLE, "-o", out, "--config", cfg)
    assert code == 0, err
    r = json.loads((cfg_dir / "r.json").read_text())
    assert r["pipeline"] == "t-drop-identity" and r["verify"]["ok"] is True and r["disabled"] == ["t-double-weights"]

    # flags win: another pipeline, --no-verify, another report, tables back on
    rep2 = tmp_path / "r2.json"
    code, _, err = run_cli(capsys, EXAMPLE, "-o", out, "--config", cfg, "--passes", "t-double-weights",
                           "--disable", "t-double-weights", "--no-verify", "--report", rep2, "--no-quiet")
    assert code == 0, err
    r2 = json.loads(rep2.read_text())
    assert r2["pipeline"] == "" and r2["verify"] is None
    assert "pipeline: (empty)" in err

    # the file's `disable` still applies when a flag changes the pipeline, and naming a pass the
    # pipeline lacks is an error (so typos are not silent)
    code, _, err = run_cli(capsys, "--config", cfg, "-O0", "--print-pipeline")
    assert code == 2 and "no pass 't-double-weights'" in err

    # -O on the command line overrides `passes` from the file
    cfg2 = cfg_dir / "passes-only.toml"
    cfg2.write_text('[graphopt]\npasses = "t-drop-identity"\n')
    code, out_text, _ = run_cli(capsys, "--config", cfg2, "--print-pipeline")
    assert code == 0 and out_text == "t-drop-identity\n"
    code, out_text, _ = run_cli(capsys, "--config", cfg2, "-O0", "--print-pipeline")
    assert code == 0 and out_text == "\n"


def test_config_file_pipeline_shortcuts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "graphopt.toml"
    cfg.write_text('[graphopt]\npasses = "-O0"\nprune = 0.25\nquantize = "int8"\ncalibration-method = "percentile"\n'
                   'quantize-speed = "rules"\ncontrib-ops = true\n')
    code, out_text, err = run_cli(capsys, "--config", cfg, "--print-pipeline")
    assert code == 0, err
    assert out_text == "prune{ratio=0.25},quantize{calibration=percentile,speed=rules}\n"
    # a flag wins over the file
    code, out_text, err = run_cli(capsys, "--config", cfg, "--prune", "0.5", "--quantize-speed", "off", "--print-pipeline")
    assert code == 0 and out_text == "prune{ratio=0.5},quantize{calibration=percentile,speed=off}\n", (out_text, err)
    cfg.write_text('[graphopt]\nquantize-speed = "rules"\n')
    code, _, err = run_cli(capsys, "--config", cfg, "--print-pipeline")
    assert code == 2 and "needs --quantize int8" in err


def test_config_opt_level_and_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[graphopt]\nopt-level = 0\nmodel = "{EXAMPLE}"\noutput = "build/o.onnx"\nquiet = true\n')
    code, _, err = run_cli(capsys, "--config", cfg)
    assert code == 0, err
    assert (tmp_path / "build" / "o.onnx").exists()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[graphopt]\npases = "-O2"\n', "unknown key 'pases'"),
        ('[graphopt]\nverify = "yes"\n', "'verify' must be true or false"),
        ('[graphopt]\ndisable = [1]\n', "'disable' must be a list of strings"),
        ('[graphopt]\nseed = true\n', "'seed' must be a number"),
        ('[tool]\nx = 1\n', "unknown key 'tool'"),
        ('[graphopt\n', "not valid TOML"),
        ('[graphopt]\npasses = "-O1"\nopt-level = 2\n', "not both"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    code, _, err = run_cli(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--config", cfg)
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith(PREFIX) and needle in line
    assert not (tmp_path / "o.onnx").exists()


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, EXAMPLE, "-o", tmp_path / "o.onnx", "--config", tmp_path / "nope.toml")
    assert code == 2 and "nope.toml: no such file" in err


# --- the installed console script --------------------------------------------------------------------


def test_console_script(tmp_path: Path) -> None:
    assert SCRIPT.exists(), "graphopt-compile is not installed in this environment"
    env = {k: v for k, v in os.environ.items() if k != "GRAPHOPT_DEBUG"}
    outputs = []
    # separate processes with different hash seeds: set/dict-order accidents would show up here
    for seed in ("1", "2"):
        out = tmp_path / f"o{seed}.onnx"
        ok = subprocess.run([str(SCRIPT), str(EXAMPLE), "-o", str(out), "-O2", "--verify"],
                            capture_output=True, text=True, env={**env, "PYTHONHASHSEED": seed}, timeout=120)
        assert ok.returncode == 0, ok.stderr
        assert "verify: ok" in ok.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    out = tmp_path / "o.onnx"
    bad = subprocess.run([str(SCRIPT), str(tmp_path / "missing.onnx"), "-o", str(out)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [f"{PREFIX}{tmp_path / 'missing.onnx'}: no such file"]

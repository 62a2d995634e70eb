"""Third-party passes plugged in through the entry-point group `graphopt.passes`.

The plugin is a separate package (the README's tutorial, verbatim) laid out in tmp_path the way
pip installs it: the module plus a `*.dist-info` folder whose entry_points.txt is derived from
the tutorial's pyproject.toml. importlib.metadata finds it once the folder is on sys.path.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from dataclasses import make_dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import pytest

import graphopt
from graphopt.cli import main
from graphopt.config import tomllib
from graphopt.report import op_counts
from graphopt.transform import ENTRY_POINT_GROUP, Pass, PassResult

from paths import ROOT
EXAMPLE = ROOT / "examples" / "tiny_cnn.onnx"
SCRIPT = Path(sys.executable).parent / "graphopt-compile"
PREFIX = "graphopt-compile: error: "

# --- the README tutorial: acme-graphopt/pyproject.toml and acme-graphopt/acme_graphopt/__init__.py ---

def _readme_block(title: str, lang: str) -> str:
    """The fenced block that follows the line naming `title` in the README's tutorial."""
    text = (ROOT / "README.md").read_text()
    at = text.index(f"`{title}`")
    fence = text.index(f"```{lang}\n", at) + len(lang) + 4
    return text[fence : text.index("```", fence)]


PYPROJECT = _readme_block("acme-graphopt/pyproject.toml", "toml")
PLUGIN = _readme_block("acme-graphopt/acme_graphopt/__init__.py", "python")

CLASH = '''
@dataclass(frozen=True)
class Clash(Pass):
    """Claims a built-in's name."""

    name: ClassVar[str] = "dce"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(changed=False)


NOT_A_PASS = 42
'''


def _entry_points_from_pyproject(text: str) -> dict[str, str]:
    return dict(tomllib.loads(text)["project"]["entry-points"][ENTRY_POINT_GROUP])


def install(site: Path, entry_points: dict[str, str], source: str = PLUGIN) -> Path:
    """Lay the package out as pip would install it into `site`."""
    pkg = site / "acme_graphopt"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(source)
    info = site / "acme_graphopt-0.1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-graphopt\nVersion: 0.1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")
    (info / "top_level.txt").write_text("acme_graphopt\n")
    return site


def _stub(name: str) -> type[Pass]:
    cls = make_dataclass(f"Stub_{name}", [], bases=(Pass,), frozen=True,
                         namespace={"name": name, "__doc__": f"stand-in for {name}",
                                    "run": lambda self, model, ctx: PassResult(changed=False)})
    cls.__annotations__["name"] = ClassVar[str]
    return cls


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A site folder on sys.path and a private registry that rescans the entry points."""
    reg = importlib.import_module("graphopt.transform.registry")
    reg.list_passes()  # built-ins and already-installed plugins, into the real registry
    monkeypatch.setattr(reg, "_REGISTRY", dict(reg._REGISTRY))
    monkeypatch.setattr(reg, "_ORIGIN", dict(reg._ORIGIN))
    if "dce" not in reg._REGISTRY:  # the cleanup passes are written concurrently
        reg.register_pass(_stub("dce"), origin="graphopt.passes stand-in for dce")
    monkeypatch.setattr(reg, "_loaded", False)  # the next lookup scans the entry points again
    rules = importlib.import_module("graphopt.pattern.rule")
    monkeypatch.setattr(rules, "_RULES", dict(rules._RULES))
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    importlib.invalidate_caches()
    yield path
    sys.modules.pop("acme_graphopt", None)


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_plugin_is_listed_with_its_origin(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    install(site, _entry_points_from_pyproject(PYPROJECT))
    code, out, _ = run_cli(capsys, "--list-passes")
    assert code == 0
    [line] = [ln for ln in out.splitlines() if ln.startswith("acme-drop-identity ")]
    assert "Remove Identity nodes (graph outputs excepted)." in line
    assert line.endswith("[plugin acme_graphopt:DropIdentity]")


def test_plugin_runs_in_a_pipeline(site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    install(site, _entry_points_from_pyproject(PYPROJECT))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = run_cli(capsys, EXAMPLE, "-o", out, "--passes", "acme-drop-identity{limit=1}", "--verify",
                           "--report", rep, "-q")
    assert code == 0, err
    assert op_counts(graphopt.load(out))["Identity"] == 1
    code, _, err = run_cli(capsys, EXAMPLE, "-o", out, "--passes", "acme-drop-identity", "--verify-each", "-q")
    assert code == 0, err
    assert "Identity" not in op_counts(graphopt.load(out))


def test_plugin_through_the_python_api(site: Path) -> None:
    install(site, _entry_points_from_pyproject(PYPROJECT))
    model = graphopt.load(EXAMPLE)
    optimized = graphopt.optimize(model, "acme-drop-identity")
    assert op_counts(model)["Identity"] == 2 and "Identity" not in op_counts(optimized)


def test_name_clash_with_a_built_in_names_both(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = importlib.import_module("graphopt.transform.registry")
    builtin_origin = reg._ORIGIN["dce"]
    install(site, {"acme-dce": "acme_graphopt:Clash"}, PLUGIN + CLASH)
    code, out, err = run_cli(capsys, "--list-passes")
    assert code == 2 and out == ""
    [line] = err.splitlines()
    assert line.startswith(PREFIX) and "'dce'" in line
    assert builtin_origin in line and "plugin acme_graphopt:Clash" in line


@pytest.mark.parametrize(
    ("target", "needle"),
    [("acme_graphopt:Missing", "failed to load"), ("acme_graphopt:NOT_A_PASS", "is not a Pass subclass")],
)
def test_broken_plugin_is_one_line_exit_2(site: Path, capsys: pytest.CaptureFixture[str], target: str, needle: str) -> None:
    install(site, {"acme-broken": target}, PLUGIN + CLASH)
    code, _, err = run_cli(capsys, "--print-pipeline", "--passes", "acme-drop-identity")
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith(PREFIX) and "'acme-broken'" in line and needle in line


def test_plugin_in_a_fresh_process(tmp_path: Path) -> None:
    """The installed console script finds a plugin on PYTHONPATH, as after `pip install`."""
    site = install(tmp_path / "site", _entry_points_from_pyproject(PYPROJECT))
    env = {k: v for k, v in os.environ.items() if k != "GRAPHOPT_DEBUG"}
    env["PYTHONPATH"] = str(site)
    listed = subprocess.run([str(SCRIPT), "--list-passes"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "[plugin acme_graphopt:DropIdentity]" in listed.stdout
    out = tmp_path / "o.onnx"
    ran = subprocess.run([str(SCRIPT), str(EXAMPLE), "-o", str(out), "--passes", "acme-drop-identity", "--verify"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert "acme-drop-identity" in ran.stderr and "verify: ok" in ran.stderr
    assert "Identity" not in op_counts(graphopt.load(out))


def test_tutorial_module_is_importable_on_its_own(site: Path) -> None:
    install(site, _entry_points_from_pyproject(PYPROJECT))
    mod: types.ModuleType = importlib.import_module("acme_graphopt")
    assert mod.DropIdentity.name == "acme-drop-identity"
    assert mod.DropIdentity(limit=2).spec() == "acme-drop-identity{limit=2}"


MUL_ONES = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[2,3] X) => (float[2,3] Y, float[2,3] Z)
<float s = {1.0}, float[3] v = {1.0, 1.0, 1.0}>
{
  Y = Mul(X, s)
  Z = Mul(v, X)
}
"""


def test_tutorial_rule_fires_and_explains_itself(site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx.parser

    from graphopt.check import check_same_outputs

    install(site, _entry_points_from_pyproject(PYPROJECT))
    model = graphopt.load(onnx.parser.parse_model(MUL_ONES))
    optimized = graphopt.optimize(model, "acme-simplify")
    # the scalar 1 goes; the [3]-shaped one stays (its check refuses: it may broadcast)
    assert op_counts(model)["Mul"] == 2 and op_counts(optimized)["Mul"] == 1
    assert check_same_outputs(model, optimized).ok
    path = tmp_path / "ones.onnx"
    graphopt.save(model, path)
    code, out, err = run_cli(capsys, path, "--explain", "acme-mul-by-one")
    assert code == 0, err
    assert "the 1 is not a scalar: it may broadcast x" in out

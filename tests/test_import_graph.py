"""The import graph of graphopt/, passes/ and targets/ (read with ast, nothing imported): no
import cycles at module level, and no private name (`_x`) or private module (`_util.py`) imported
across modules.

An import inside a function (lazy) or under `if TYPE_CHECKING:` does not count as an edge for
cycles. Debt that has to stay a while goes in the lists below with its reason (none now); the
test fails when an entry is no longer true too, so the lists only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

from paths import ROOT
#: installed package → source folder (pyproject's package-dir)
PACKAGES = {"graphopt": ROOT / "graphopt", "graphopt.passes": ROOT / "passes", "graphopt.targets": ROOT / "targets"}

#: module-level cycles still there: (sorted members of one strongly connected component)
KNOWN_CYCLES: set[tuple[str, ...]] = set()

#: (importing module, imported module, private name or "(module)") still imported across modules
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if pkg == "graphopt" and parts and parts[0] in ("passes", "targets"):
                continue
            mods[".".join([pkg, *parts])] = f
    return mods


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it counts for cycles (module level, not TYPE_CHECKING)."""
    out: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(stmts: list[ast.stmt], eager: bool) -> None:
        for s in stmts:
            if isinstance(s, (ast.Import, ast.ImportFrom)):
                out.append((s, eager))
            elif isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(s.body, False)
            elif isinstance(s, ast.If):
                visit(s.body, eager and "TYPE_CHECKING" not in ast.unparse(s.test))
                visit(s.orelse, eager)
            elif isinstance(s, ast.Try):
                for body in (s.body, s.orelse, s.finalbody, *(h.body for h in s.handlers)):
                    visit(body, eager)
            elif isinstance(s, (ast.ClassDef, ast.With, ast.For, ast.While)):
                visit(s.body, eager)

    visit(tree.body, True)
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _scan() -> tuple[nx.DiGraph, set[tuple[str, str, str]]]:
    mods = _modules()
    graph: nx.DiGraph = nx.DiGraph()
    private: set[tuple[str, str, str]] = set()
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for stmt, eager in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(stmt, ast.Import):
                found = [(a.name, None) for a in stmt.names]
            else:
                base_parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                if stmt.level:
                    base_parts = base_parts[:len(base_parts) - (stmt.level - 1)]
                    base = ".".join(base_parts + ([stmt.module] if stmt.module else []))
                else:
                    base = stmt.module or ""
                found = [(f"{base}.{a.name}", None) if f"{base}.{a.name}" in mods else (base, a.name) for a in stmt.names]
            for target, name in found:
                if target not in mods or target == mod:
                    continue
                if eager:
                    graph.add_edge(mod, target)
                if name and _private(name):
                    private.add((mod, target, name))
                parent, _, last = target.rpartition(".")
                if _private(last) and not mod.startswith(parent + "."):
                    private.add((mod, target, "(module)"))
    return graph, private


def test_no_import_cycles_beyond_the_known_ones():
    graph, _ = _scan()
    cycles = {tuple(sorted(c)) for c in nx.strongly_connected_components(graph) if len(c) > 1}
    new = cycles - KNOWN_CYCLES
    assert not new, f"module-level import cycles: {sorted(new)} (import lazily inside the function, or move the shared code down a layer)"
    gone = KNOWN_CYCLES - cycles
    assert not gone, f"cycles no longer there: remove them from KNOWN_CYCLES: {sorted(gone)}"


def test_no_private_names_imported_across_modules_beyond_the_known_ones():
    _, private = _scan()
    new = private - KNOWN_PRIVATE
    assert not new, f"private names imported across modules (make them public or move them): {sorted(new)}"
    gone = KNOWN_PRIVATE - private
    assert not gone, f"no longer imported: remove from KNOWN_PRIVATE: {sorted(gone)}"


def test_the_scan_sees_imports():
    """The scanner itself: it finds the package's own edges (a scan that saw nothing would pass)."""
    graph, _ = _scan()
    assert graph.has_edge("graphopt.targets.tvm.lower.legalize", "graphopt.targets.tvm.kernels.blocked")
    assert graph.number_of_edges() > 100

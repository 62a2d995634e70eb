"""The stable public API, recorded: names and signatures of every name the stable modules
export (`__all__`), as torch.fx's test_public_bindings / expect files do. A change to the
surface fails here until the expect file is updated on purpose:

    GRAPHOPT_ACCEPT=1 .venv/bin/python -m pytest -q tests/test_public_api.py

then review `git diff tests/expect/public_api.txt` (a removed or changed line breaks users).
The README's "Stable API" section and graphopt/__init__.py's docstring name the same modules.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re

import pytest

import graphopt

from paths import EXPECT as _EXPECT_DIR
from paths import ROOT

EXPECT = _EXPECT_DIR / "public_api.txt"

#: the stable modules: what their __all__ exports is the public API
STABLE = ["graphopt", "graphopt.errors", "graphopt.ir", "graphopt.pattern", "graphopt.transform", "graphopt.runtime",
          "graphopt.testing"]


def _sig(obj: object) -> str:
    try:
        s = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r" at 0x[0-9a-f]+", "", s)  # default objects' addresses change per run


def _members(cls: type) -> list[str]:
    """Public methods and properties defined by `cls` or a graphopt base (not object's)."""
    out: list[str] = []
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for name in sorted(vars(cls)):
        if name.startswith("_"):
            continue
        attr = inspect.getattr_static(cls, name)
        if isinstance(attr, property):
            out.append(f"    .{name} (property)")
        elif isinstance(attr, (staticmethod, classmethod)):
            out.append(f"    .{name}{_sig(getattr(cls, name))} ({type(attr).__name__})")
        elif inspect.isfunction(attr):
            out.append(f"    .{name}{_sig(attr)}")
        elif name not in fields and not inspect.isclass(attr):
            out.append(f"    .{name}: {type(attr).__name__}")
    return out


def surface() -> str:
    lines: list[str] = []
    for modname in STABLE:
        mod = importlib.import_module(modname)
        names = getattr(mod, "__all__", None)
        assert names is not None, f"{modname} has no __all__: a stable module lists its public names"
        assert len(set(names)) == len(names), f"{modname}.__all__ names something twice"
        lines.append(f"# {modname}")
        for name in sorted(names, key=str.lower):
            obj = getattr(mod, name)
            if inspect.isclass(obj):
                bases = ", ".join(b.__name__ for b in obj.__bases__ if b is not object)
                lines.append(f"class {name}({bases}){_sig(obj)}")
                lines += _members(obj)
            elif callable(obj):
                lines.append(f"def {name}{_sig(obj)}")
            else:
                lines.append(f"{name}: {type(obj).__name__}")
        lines.append("")
    return "\n".join(lines)


def test_public_surface_matches_the_expect_file() -> None:
    got = surface()
    if os.environ.get("GRAPHOPT_ACCEPT") == "1":
        EXPECT.parent.mkdir(exist_ok=True)
        EXPECT.write_text(got, encoding="utf-8")
    want = EXPECT.read_text(encoding="utf-8") if EXPECT.exists() else ""
    if got != want:
        import difflib

        diff = "\n".join(difflib.unified_diff(want.splitlines(), got.splitlines(), "expected", "now", lineterm="", n=1))
        pytest.fail("the public API changed; if on purpose, run GRAPHOPT_ACCEPT=1 .venv/bin/python -m pytest "
                    f"tests/test_public_api.py and commit tests/expect/public_api.txt\n{diff[:6000]}")


def _readme_stable_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- stable-api:begin -->(.*?)<!-- stable-api:end -->", text, re.S)
    assert m, "README.md has no stable-api section"
    return m.group(1)


def test_readme_and_package_docstring_list_the_same_stable_api() -> None:
    section = _readme_stable_section()
    listed = re.findall(r"^- `(graphopt[\w.]*)`", section, re.M)
    assert listed == STABLE, "README's Stable API modules differ from the recorded ones"
    top = re.search(r"^- `graphopt`: (.*)$", section, re.M)
    assert top is not None
    readme_names = set(re.findall(r"`([\w.]+)`", top.group(1)))
    assert readme_names == set(graphopt.__all__) - {"__version__"}, "README's top-level names differ from graphopt.__all__"
    doc = graphopt.__doc__ or ""
    doc_modules = re.findall(r"`(graphopt[\w.]*)`", doc.split("Stable API", 1)[-1])
    assert list(dict.fromkeys(doc_modules)) == STABLE, "graphopt/__init__.py's docstring names other stable modules"


def test_package_is_typed() -> None:
    assert (ROOT / "graphopt" / "py.typed").exists()

"""Load a tools/ script as a module for a test, under a private name (tools/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from paths import TOOLS


def load_tool(script: str, name: str) -> ModuleType:
    """tools/`script` executed as module `name` (registered while it runs: dataclasses look
    their module up while the class is created), not left in sys.modules."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(name, None)
    return mod

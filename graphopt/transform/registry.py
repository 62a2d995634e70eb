"""The pass registry: built-in passes plus third-party ones from the entry-point group
`graphopt.passes`. Two passes with one name is an error, never a silent override."""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from graphopt.errors import UsageError
from graphopt.transform.pass_base import Pass

ENTRY_POINT_GROUP = "graphopt.passes"

_REGISTRY: dict[str, type[Pass]] = {}
_ORIGIN: dict[str, str] = {}
_loaded = False


def register_pass(cls: type[Pass], *, origin: str | None = None) -> type[Pass]:
    """Class decorator (or call) that makes a pass available by its name."""
    name = getattr(cls, "name", "")
    if not name or name != name.lower() or " " in name or "_" in name:
        raise UsageError(f"pass class {cls.__qualname__} needs a kebab-case `name`, got {name!r}")
    where = origin or f"{cls.__module__}.{cls.__qualname__}"
    prev = _REGISTRY.get(name)
    if prev is not None and prev is not cls:
        raise UsageError(f"pass name clash: {name!r} is defined by {_ORIGIN[name]} and by {where}")
    _REGISTRY[name] = cls
    _ORIGIN[name] = where
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("graphopt.passes")  # built-ins register on import
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj: Any = ep.load()
        except Exception as e:
            raise UsageError(f"plugin entry point {ep.name!r} ({ep.value}) failed to load: {e}") from None
        classes = obj if isinstance(obj, (list, tuple)) else [obj]
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, Pass)):
                raise UsageError(f"plugin entry point {ep.name!r} ({ep.value}) is not a Pass subclass")
            register_pass(cls, origin=f"plugin {ep.value}")


def get_pass(name: str) -> type[Pass]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown pass {name!r}{hint}; see graphopt-compile --list-passes") from None


def list_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name, sorted."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def pass_origin(name: str) -> str:
    _load_all()
    return _ORIGIN[name]

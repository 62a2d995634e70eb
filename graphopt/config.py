"""The graphopt-compile config file: the command line's options in TOML, for build pipelines.

    [graphopt]
    passes = "-O2"            # pipeline syntax, like --passes (or opt-level = 2, like -O2)
    disable = ["cse"]
    verify = true
    report = "build/report.json"

Keys are the long option names (dashes or underscores). Relative paths are relative to the
config file's folder, so a pipeline gives the same result from whichever folder it runs in.
An unknown key, table or a value of the wrong type is a UsageError naming the key.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from graphopt.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TABLE = "graphopt"


@dataclass(frozen=True)
class _Key:
    kind: type | tuple[type, ...]
    is_path: bool = False
    is_list: bool = False


#: every key the [graphopt] table accepts, by its canonical (dashed) name
KEYS: dict[str, _Key] = {
    "model": _Key(str, is_path=True),
    "output": _Key(str, is_path=True),
    "target": _Key(str),
    "passes": _Key(str),
    "opt-level": _Key(int),
    "disable": _Key(str, is_list=True),
    "verify": _Key(bool),
    "verify-each": _Key(bool),
    "inputs": _Key(str, is_path=True),
    "rtol": _Key((int, float)),
    "atol": _Key((int, float)),
    "seed": _Key(int),
    "report": _Key(str, is_path=True),
    "dump-ir": _Key(str, is_path=True),
    "quiet": _Key(bool),
    "contrib-ops": _Key(bool),
    "tune": _Key(int),
    "tune-minutes": _Key((int, float)),
    "tuning-db": _Key(str, is_path=True),
    "tune-shapes": _Key(str),  # "x=1x3x320x320;x=1x3x640x480", like --tune-shapes
    "threads": _Key(int),
    "prune": _Key((int, float)),
    "quantize": _Key(str),
    "calibration": _Key(str, is_path=True),
    "calibration-method": _Key(str),
    "accuracy-budget": _Key(str),
    "quantize-speed": _Key(str),
    "input-shape": _Key(str, is_list=True),  # ["x:1x3x224x224"], like --input-shape
    "dim": _Key(str, is_list=True),  # ["batch=1"], like --dim
    "bind": _Key(str, is_list=True),  # ["NAME=VALUE", ...]; a relative .npy path is the config file's
    "calibration-batch-axis": _Key(str, is_list=True),  # ["NAME:AXIS", ...]
    "compare": _Key(bool),
    "profile": _Key(bool),
    "eval-data": _Key(str, is_path=True),
    "verify-metric": _Key(str),
}


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a config file; returns {canonical key: value} with paths made absolute."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path}: is a folder") from None
    except OSError as e:
        raise UsageError(f"config file {path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path}: not valid TOML: {e}") from None
    for key in doc:
        if key != TABLE:
            raise UsageError(f"config file {path}: unknown key {key!r} (options go in a [{TABLE}] table)")
    table = doc.get(TABLE, {})
    if not isinstance(table, dict):
        raise UsageError(f"config file {path}: {TABLE!r} must be a table")
    base = os.path.dirname(os.path.abspath(path))
    out: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("_", "-")
        spec = KEYS.get(key)
        if spec is None:
            raise UsageError(f"config file {path}: unknown key {raw_key!r} in [{TABLE}] (known: {', '.join(KEYS)})")
        if key in out:
            raise UsageError(f"config file {path}: key {key!r} given twice")
        out[key] = _check(path, raw_key, value, spec, base)
    return out


def _check(path: str, key: str, value: Any, spec: _Key, base: str) -> Any:
    def ok(v: Any) -> bool:
        # bool is an int in Python; a config that says `seed = true` is a mistake
        return isinstance(v, spec.kind) and not (isinstance(v, bool) and spec.kind is not bool)

    if spec.is_list:
        if isinstance(value, str):
            value = [value]
        if not (isinstance(value, list) and all(ok(v) for v in value)):
            raise UsageError(f"config file {path}: {key!r} must be a list of strings")
        if key == "bind":  # NAME=file.npy: relative to the config file, like every path in it
            value = [f"{n}={os.path.join(base, os.path.expanduser(v))}" if v.endswith(".npy") else f"{n}={v}"
                     for n, _, v in (x.partition("=") for x in value)]
        return list(value)
    if not ok(value):
        want = "a string" if spec.kind is str else "true or false" if spec.kind is bool else "a number"
        raise UsageError(f"config file {path}: {key!r} must be {want}, got {value!r}")
    if spec.is_path:
        return os.path.join(base, os.path.expanduser(value))
    return value

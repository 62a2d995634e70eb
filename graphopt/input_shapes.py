"""Fixed input shapes: `--input-shape NAME:1x3x224x224` and `--dim SYMBOL=VALUE` (onnxsim's
--overwrite-input-shape, tvmc's --input-shapes), applied to the model before any pass runs.

    fix_input_shapes(model, {"x": (1, 3, 224, 224)}, {"batch": 1})  -> log lines

A symbolic dim given a value (by --dim, or by an --input-shape naming the input it sits in) takes
that value everywhere in the main graph and its subgraphs, so shape inference and the cleanup
passes can fold what it decides; an unnamed (`?`) dim is fixed on its input only. Everything is
checked before the model changes: an unknown input or symbol, a wrong rank, a value that
contradicts a fixed dim of the model or one symbol given two values are each one UsageError line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from graphopt.errors import UsageError
from graphopt.ir import Model, Shape, TensorType
from graphopt.ir.types import Dim


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`x:1x3x224x224` (also `x:1,3,224,224`, `x:[1,3,224,224]`; `x:[]` for a scalar) -> (name, dims).
    The name may itself hold ':' (`input:0`): the last ':' separates it."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise UsageError(f"--input-shape {text}: expected NAME:DIMS, e.g. x:1x3x224x224")
    body = dims.strip().removeprefix("[").removesuffix("]").strip()
    parts = [p.strip() for p in re.split(r"[x,]", body)] if body else []
    if any(re.fullmatch(r"[0-9]{1,12}", p) is None for p in parts):
        raise UsageError(f"--input-shape {text}: dims must be whole numbers separated by 'x', e.g. {name}:1x3x224x224")
    return name, tuple(int(p) for p in parts)


def parse_dim(text: str) -> tuple[str, int]:
    """`batch=1` -> ("batch", 1)."""
    name, sep, value = (s.strip() for s in text.partition("="))
    if not sep or not name or re.fullmatch(r"[0-9]{1,12}", value) is None:
        raise UsageError(f"--dim {text}: expected SYMBOL=SIZE, SIZE a whole number, e.g. batch=1")
    return name, int(value)


def parse_all(input_shapes: Iterable[str], dims: Iterable[str]) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """The repeatable flags' texts as mappings; a name given twice is an error."""
    shapes: dict[str, tuple[int, ...]] = {}
    for t in input_shapes:
        name, d = parse_input_shape(t)
        if name in shapes and shapes[name] != d:
            raise UsageError(f"--input-shape {name} given twice with different shapes")
        shapes[name] = d
    out: dict[str, int] = {}
    for t in dims:
        name, v = parse_dim(t)
        if name in out and out[name] != v:
            raise UsageError(f"--dim {name} given twice with different values ({out[name]} and {v})")
        out[name] = v
    return shapes, out


def _fmt(dims: Sequence[Dim]) -> str:
    """1x3x224x224 for fixed dims, [batch,3,?,224] when some are symbolic or unknown."""
    if all(isinstance(d, int) for d in dims):
        return "x".join(str(d) for d in dims) or "[]"
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def fix_input_shapes(model: Model, input_shapes: Mapping[str, Sequence[int]] | None = None,
                     dims: Mapping[str, int] | None = None) -> list[str]:
    """Fix the shapes of `model`'s inputs in place; returns what changed, one line per input."""
    input_shapes = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    dims = {k: int(v) for k, v in (dims or {}).items()}
    if not input_shapes and not dims:
        return []
    g = model.graph
    inputs = {v.name: v for v in g.inputs if not v.is_initializer()}
    for name, given in list(input_shapes.items()) + list(dims.items()):
        for d in (given if isinstance(given, tuple) else (given,)):
            if d < 1:
                raise UsageError(f"{'--input-shape' if isinstance(given, tuple) else '--dim'} {name}: sizes must be at least 1")
    bind: dict[str, int] = {}  # symbol -> value, from --dim and from the symbols an --input-shape fixes
    for sym, val in dims.items():
        bind[sym] = val
    unnamed: dict[str, dict[int, int]] = {}  # input -> {axis: value} for `?` dims
    for name, shape in input_shapes.items():
        v = inputs.get(name)
        if v is None:
            raise UsageError(f"--input-shape {name}:{_fmt(shape)}: the model has no input {name!r} "
                             f"(inputs: {', '.join(inputs) or 'none'})")
        old = v.type.shape if isinstance(v.type, TensorType) else None
        if not isinstance(v.type, TensorType):
            raise UsageError(f"--input-shape {name}: input {name!r} is not a tensor ({v.type})")
        if old is not None and old.rank != len(shape):
            raise UsageError(f"--input-shape {name}:{_fmt(shape)}: input {name!r} has rank {old.rank} "
                             f"({_fmt(old.dims)}), not {len(shape)}")
        for axis, new in enumerate(shape):
            d = None if old is None else old.dims[axis]
            if isinstance(d, int) and d != new:
                raise UsageError(f"--input-shape {name}:{_fmt(shape)}: dim {axis} of input {name!r} is fixed to {d} "
                                 f"in the model ({_fmt(old.dims)})")  # type: ignore[union-attr]
            if isinstance(d, str):
                if d in bind and bind[d] != new:
                    how = "--dim" if d in dims else "another --input-shape"
                    raise UsageError(f"--input-shape {name}:{_fmt(shape)}: dim {axis} is the symbol {d!r}, "
                                     f"which {how} sets to {bind[d]}")
                bind[d] = new
            elif d is None:
                unnamed.setdefault(name, {})[axis] = new
    symbols = {d for v in inputs.values() if isinstance(v.type, TensorType) and v.type.shape is not None
               for d in v.type.shape.dims if isinstance(d, str)}
    for sym in dims:
        if sym not in symbols:
            raise UsageError(f"--dim {sym}={dims[sym]}: no input has a symbolic dim {sym!r} "
                             f"(symbolic dims: {', '.join(sorted(symbols)) or 'none'})")
    # every check passed: now change the model
    before = {n: v.type for n, v in inputs.items()}
    for name, axes in unnamed.items():
        v = inputs[name]
        tt = v.type
        assert isinstance(tt, TensorType)
        shape_dims: list[int | str | None] = list(tt.shape.dims) if tt.shape is not None else [None] * len(input_shapes[name])
        for axis, val in axes.items():
            shape_dims[axis] = val
        v.type = _with_dims(tt, tuple(shape_dims))
    if bind:
        for sub in _main_graphs(model):
            for val in sub.values():
                tt = val.type
                if isinstance(tt, TensorType) and tt.shape is not None and any(isinstance(d, str) and d in bind for d in tt.shape.dims):
                    val.type = _with_dims(tt, tuple(bind.get(d, d) if isinstance(d, str) else d for d in tt.shape.dims))
    log = []
    for name, v in inputs.items():
        if v.type != before[name]:
            old_t, new_t = before[name], v.type
            assert isinstance(old_t, TensorType) and isinstance(new_t, TensorType)
            log.append(f"input shapes: {name} {_fmt(old_t.shape.dims) if old_t.shape else '(unknown)'} -> "
                       f"{_fmt(new_t.shape.dims) if new_t.shape else '(unknown)'}")
    return log


def _with_dims(tt: TensorType, dims: tuple[Dim, ...]) -> TensorType:
    den = tt.shape.denotations if tt.shape is not None else None
    return TensorType(tt.dtype, Shape(dims, den), tt.denotation)


def _main_graphs(model: Model) -> list:  # type: ignore[type-arg]
    """The main graph and its subgraphs (function bodies have symbols of their own)."""
    out = [model.graph]
    for n in model.graph.all_nodes():
        out.extend(n.subgraphs())
    return out


def symbolic_input_dims(model: Model) -> dict[str, list[str]]:
    """{input name: its symbolic or unknown dims} for inputs that have any (unknown dims as `?` + axis)."""
    out: dict[str, list[str]] = {}
    for v in model.graph.inputs:
        if v.is_initializer() or not isinstance(v.type, TensorType) or v.type.shape is None:
            continue
        syms = [d if isinstance(d, str) else f"{v.name}[{i}]" for i, d in enumerate(v.type.shape.dims) if not isinstance(d, int)]
        if syms:
            out[v.name] = syms
    return out


def parse_tune_shapes(text: str) -> list[dict[str, tuple[int, ...]]]:
    """`x=1x3x320x320;x=1x3x640x480` -> [{"x": (1, 3, 320, 320)}, {"x": (1, 3, 640, 480)}]: the
    representative sizes of `--tune-shapes`. Items are `NAME=DIMS` separated by ';'; an input's
    k-th item belongs to the k-th size (`x=..;mask=..;x=..;mask=..` for two inputs), and an input
    given once is that size in every one. Syntax only: `check_tune_shapes` checks them against a
    model."""
    per_input: dict[str, list[tuple[int, ...]]] = {}
    items = [p.strip() for p in str(text).split(";") if p.strip()]
    if not items:
        raise UsageError(f"--tune-shapes {text!r}: expected NAME=DIMS;NAME=DIMS..., e.g. x=1x3x320x320;x=1x3x640x480")
    for item in items:
        name, sep, dims = (s.strip() for s in item.partition("="))
        body = dims.removeprefix("[").removesuffix("]").strip()
        parts = [p.strip() for p in re.split(r"[x,]", body)] if body else []
        if not sep or not name or any(re.fullmatch(r"[0-9]{1,12}", p) is None for p in parts):
            raise UsageError(f"--tune-shapes {item!r}: expected NAME=DIMS with whole numbers separated by 'x', "
                             "e.g. x=1x3x320x320")
        shape = tuple(int(p) for p in parts)
        if any(d < 1 for d in shape):
            raise UsageError(f"--tune-shapes {item!r}: sizes must be at least 1")
        per_input.setdefault(name, []).append(shape)
    n = max(len(v) for v in per_input.values())
    for name, shapes in per_input.items():
        if len(shapes) not in (1, n):
            raise UsageError(f"--tune-shapes: input {name!r} has {len(shapes)} sizes, others {n} (give each input "
                             "once, or once per size)")
    return [{name: shapes[k if len(shapes) > 1 else 0] for name, shapes in per_input.items()} for k in range(n)]


def check_tune_shapes(model: Model, sizes: Sequence[Mapping[str, Sequence[int]]]) -> list[dict[str, tuple[int, ...]]]:
    """Check `--tune-shapes` sizes against `model`'s inputs (after any --input-shape/--dim) and
    complete them: an unknown input, a wrong rank, a size that contradicts a fixed dim, one symbol
    given two values in a size, or an input with symbolic dims left without a size are each one
    UsageError line; so is a model without symbolic input dims (nothing to tune). Returns the
    sizes with every input that has symbolic dims."""
    inputs = {v.name: v for v in model.graph.inputs if not v.is_initializer()}
    symbolic = symbolic_input_dims(model)
    if not symbolic:
        raise UsageError("--tune-shapes: the model has no symbolic input dims (nothing to tune at other sizes)")
    out = []
    for k, size in enumerate(sizes):
        where = f"--tune-shapes size {k + 1}"
        bind: dict[str, int] = {}
        row: dict[str, tuple[int, ...]] = {}
        for name, shape in size.items():
            shape = tuple(int(d) for d in shape)
            v = inputs.get(name)
            if v is None:
                raise UsageError(f"{where}: {name}={_fmt(shape)}: the model has no input {name!r} "
                                 f"(inputs: {', '.join(inputs) or 'none'})")
            if not isinstance(v.type, TensorType) or v.type.shape is None:
                raise UsageError(f"{where}: input {name!r} has no known rank")
            old = v.type.shape
            if old.rank != len(shape):
                raise UsageError(f"{where}: {name}={_fmt(shape)}: input {name!r} has rank {old.rank} "
                                 f"({_fmt(old.dims)}), not {len(shape)}")
            for axis, (d, new) in enumerate(zip(old.dims, shape)):
                if isinstance(d, int) and d != new:
                    raise UsageError(f"{where}: {name}={_fmt(shape)}: dim {axis} of input {name!r} is fixed to {d} "
                                     f"({_fmt(old.dims)})")
                if isinstance(d, str):
                    if d in bind and bind[d] != new:
                        raise UsageError(f"{where}: {name}={_fmt(shape)}: dim {axis} is the symbol {d!r}, which this "
                                         f"size sets to {bind[d]} elsewhere")
                    bind[d] = new
            row[name] = shape
        missing = [n for n in symbolic if n not in row]
        if missing:
            raise UsageError(f"{where}: input {missing[0]!r} has symbolic dims ({', '.join(symbolic[missing[0]])}) "
                             "and no size")
        out.append(row)
    return out

"""Structural comparison of models: is `b` the same model as `a`, and if not, where first?

Topology is compared by position: each node input must refer to the same thing in both models
(the same graph input, initializer, output `j` of node `i`, or value of an enclosing graph), not
merely to a value of the same name. Names, types, attributes (subgraphs recursively), tensors
(dtype, shape and payload bytes, so NaNs compare equal to themselves), functions, opsets,
metadata and doc strings are compared too. Initializers are matched by name, opset imports and
metadata as mappings (their order carries no meaning). Function bodies' own graph name, doc
string and metadata are not compared: a FunctionProto has no place for them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from graphopt.ir.core import Attr, AttrType, Function, Graph, Model, Node, Value
from graphopt.ir.printer import string_elements
from graphopt.ir.tensor import SparseTensor, Tensor
from graphopt.ir.types import (
    DataType,
    MapType,
    OptionalType,
    SequenceType,
    Shape,
    SparseTensorType,
    TensorType,
    Type,
)


class _Diff(Exception):
    """Raised at the first difference; carries its one-line description."""


def structural_diff(a: Model, b: Model) -> str | None:
    """A one-line description of the first difference between `a` and `b` (with a path such
    as "graph.node[3] 'conv1' (Conv): attribute 'strides' [1, 1] != [2, 2]"), or None."""
    try:
        _Comparer().model(a, b)
    except _Diff as d:
        return str(d)
    return None


def graph_diff(a: Graph, b: Graph) -> str | None:
    """Like `structural_diff` for two graphs (values outside them must be the same objects)."""
    try:
        _Comparer().graph(a, b, "graph", {}, {})
    except _Diff as d:
        return str(d)
    return None


def assert_equal(a: Model, b: Model) -> None:
    """Raise AssertionError with the first difference when the models differ."""
    d = structural_diff(a, b)
    if d is not None:
        raise AssertionError(d)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(e) for e in x) + "]"
    if isinstance(x, Tensor):
        return f"{x.dtype.text}{list(x.shape)}"
    if isinstance(x, (str, bytes)):
        return repr(x)
    if isinstance(x, (TensorType, SparseTensorType)) and x.shape is not None and x.shape.denotations:
        return f"{x} (dim denotations {list(x.shape.denotations)})"
    return str(x)


def _same(path: str, what: str, x: Any, y: Any) -> None:
    if x != y:
        raise _Diff(f"{path}: {what} {_fmt(x)} != {_fmt(y)}")


def _as_bytes(s: str | bytes) -> bytes:
    return s.encode("utf-8", "surrogatepass") if isinstance(s, str) else bytes(s)


def _same_float(x: float, y: float) -> bool:
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return x == y and math.copysign(1.0, x) == math.copysign(1.0, y)


class _Comparer:
    # --- model ---------------------------------------------------------------------------------
    def model(self, a: Model, b: Model) -> None:
        for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
            _same("model", f, getattr(a, f), getattr(b, f))
        _same("model", "opset_import", dict(a.opset_imports), dict(b.opset_imports))
        _same("model", "metadata_props", dict(a.metadata_props), dict(b.metadata_props))
        _same("model", "explicit_defaults", sorted(getattr(a, "explicit_defaults", ())), sorted(getattr(b, "explicit_defaults", ())))
        _same("model", "training_info", [bytes(t) for t in a.training_info], [bytes(t) for t in b.training_info])
        self.graph(a.graph, b.graph, "graph", {}, {})
        _same("model", "functions", sorted(a.functions), sorted(b.functions))
        for key in sorted(a.functions):
            self.function(a.functions[key], b.functions[key])

    def function(self, a: Function, b: Function) -> None:
        path = f"function {a.domain}::{a.name}" + (f":{a.overload}" if a.overload else "")
        for f in ("domain", "name", "overload", "doc_string"):
            _same(path, f, getattr(a, f), getattr(b, f))
        _same(path, "opset_import", dict(a.opset_imports), dict(b.opset_imports))
        _same(path, "metadata_props", dict(a.metadata_props), dict(b.metadata_props))
        _same(path, "attribute parameters", list(a.attributes), list(b.attributes))
        for k, da in a.attributes.items():
            db = b.attributes[k]
            if (da is None) != (db is None):
                raise _Diff(f"{path}: attribute parameter {k!r} default {_fmt(da and da.value)} != {_fmt(db and db.value)}")
            if da is not None and db is not None:
                self.attr(da, db, f"{path}: default of attribute parameter {k!r}", {}, {})
        self.graph(a.graph, b.graph, path, {}, {}, body_only=True)

    # --- graphs --------------------------------------------------------------------------------
    def graph(
        self, a: Graph, b: Graph, path: str, env_a: dict[int, str], env_b: dict[int, str], *, body_only: bool = False
    ) -> None:
        """Compare two graphs; `env_*` map values of enclosing graphs (by id) to position keys."""
        env_a, env_b = dict(env_a), dict(env_b)
        if not body_only:
            _same(path, "name", a.name, b.name)
            _same(path, "doc_string", a.doc_string, b.doc_string)
            _same(path, "metadata_props", dict(a.metadata_props), dict(b.metadata_props))
            _same(path, "quantization_annotation", a.quantization_annotation, b.quantization_annotation)
        _same(path, "number of inputs", len(a.inputs), len(b.inputs))
        for i, (va, vb) in enumerate(zip(a.inputs, b.inputs)):
            where = f"{path}.input[{i}]"
            self.value(va, vb, where)
            _same(where, "is an initializer", va.is_initializer(), vb.is_initializer())
            env_a[id(va)] = env_b[id(vb)] = f"{path} input {i}"
        _same(path, "initializers", sorted(a.initializers), sorted(b.initializers))
        for name in sorted(a.initializers):
            va, vb = a.initializers[name], b.initializers[name]
            where = f"{path}.initializer {name!r}"
            self.value(va, vb, where)
            self.const(va.const_value, vb.const_value, where, check_name=False)
            if id(va) not in env_a:
                env_a[id(va)] = env_b[id(vb)] = f"{path} initializer {name!r}"
        na, nb = a.nodes, b.nodes
        for i, (x, y) in enumerate(zip(na, nb)):
            self.node(x, y, f"{path}.node[{i}] {_label(x)}", env_a, env_b)
            for j, (va, vb) in enumerate(zip(x.outputs, y.outputs)):
                env_a[id(va)] = env_b[id(vb)] = f"{path}.node[{i}] output {j}"
        if len(na) != len(nb):
            k = min(len(na), len(nb))
            extra = na[k] if len(na) > k else nb[k]
            side = "first" if len(na) > k else "second"
            raise _Diff(f"{path}: number of nodes {len(na)} != {len(nb)} (node[{k}] {_label(extra)} only in the {side})")
        _same(path, "number of outputs", len(a.outputs), len(b.outputs))
        for k, (va, vb) in enumerate(zip(a.outputs, b.outputs)):
            where = f"{path}.output[{k}]"
            self.ref(va, vb, where, env_a, env_b)
            self.value(va, vb, where)

    def ref(self, va: Value | None, vb: Value | None, where: str, env_a: dict[int, str], env_b: dict[int, str]) -> None:
        if va is None or vb is None:
            if va is not vb:
                raise _Diff(f"{where} {_ref(va, env_a)} != {_ref(vb, env_b)}")
            return
        ka, kb = env_a.get(id(va)), env_b.get(id(vb))
        if ka is None or kb is None:
            # values not defined in the compared graphs (a graph compared on its own): identity
            if ka is None and kb is None and va is vb:
                return
        if ka != kb or ka is None:
            raise _Diff(f"{where} {_ref(va, env_a)} != {_ref(vb, env_b)}")

    def value(self, a: Value, b: Value, where: str) -> None:
        _same(where, "name", a.name, b.name)
        _same(where, f"type of {a.name!r}", _norm_type(a.type), _norm_type(b.type))
        _same(where, f"doc_string of {a.name!r}", a.doc_string, b.doc_string)
        _same(where, f"metadata_props of {a.name!r}", dict(a.metadata_props), dict(b.metadata_props))

    def node(self, a: Node, b: Node, path: str, env_a: dict[int, str], env_b: dict[int, str]) -> None:
        for f in ("domain", "op_type", "overload", "name", "doc_string"):
            _same(path, f, getattr(a, f), getattr(b, f))
        _same(path, "metadata_props", dict(a.metadata_props), dict(b.metadata_props))
        _same(path, "number of inputs", len(a.inputs), len(b.inputs))
        for i, (va, vb) in enumerate(zip(a.inputs, b.inputs)):
            self.ref(va, vb, f"{path}: input {i}", env_a, env_b)
        _same(path, "number of outputs", len(a.outputs), len(b.outputs))
        for j, (va, vb) in enumerate(zip(a.outputs, b.outputs)):
            self.value(va, vb, f"{path}: output {j}")
        _same(path, "attributes", sorted(a.attributes), sorted(b.attributes))
        for name in sorted(a.attributes):
            self.attr(a.attributes[name], b.attributes[name], f"{path}: attribute {name!r}", env_a, env_b, path)

    def attr(self, a: Attr, b: Attr, where: str, env_a: dict[int, str], env_b: dict[int, str], node_path: str = "") -> None:
        _same(where, "kind", a.type.name.lower(), b.type.name.lower())
        _same(where, "doc_string", a.doc_string, b.doc_string)
        _same(where, "ref_attr_name", a.ref_attr_name, b.ref_attr_name)
        if a.ref_attr_name is not None:
            return
        t, x, y = a.type, a.value, b.value
        if t == AttrType.FLOAT:
            if not _same_float(x, y):
                raise _Diff(f"{where} {_fmt(x)} != {_fmt(y)}")
        elif t == AttrType.FLOATS:
            if len(x) != len(y) or not all(_same_float(p, q) for p, q in zip(x, y)):
                raise _Diff(f"{where} {_fmt(list(x))} != {_fmt(list(y))}")
        elif t == AttrType.STRING:
            if _as_bytes(x) != _as_bytes(y):
                raise _Diff(f"{where} {_fmt(x)} != {_fmt(y)}")
        elif t == AttrType.STRINGS:
            if [_as_bytes(s) for s in x] != [_as_bytes(s) for s in y]:
                raise _Diff(f"{where} {_fmt(list(x))} != {_fmt(list(y))}")
        elif t == AttrType.TYPE_PROTO:
            _same(where, "type", _norm_type(x), _norm_type(y))
        elif t == AttrType.TYPE_PROTOS:
            _same(where, "types", [_norm_type(e) for e in x], [_norm_type(e) for e in y])
        elif t in (AttrType.INT, AttrType.INTS):
            if (list(x) if isinstance(x, (list, tuple)) else x) != (list(y) if isinstance(y, (list, tuple)) else y):
                raise _Diff(f"{where} {_fmt(x)} != {_fmt(y)}")
        elif t in (AttrType.TENSOR, AttrType.SPARSE_TENSOR):
            self.const(x, y, where, check_name=True)
        elif t in (AttrType.TENSORS, AttrType.SPARSE_TENSORS):
            _same(where, "number of tensors", len(x), len(y))
            for i, (p, q) in enumerate(zip(x, y)):
                self.const(p, q, f"{where}[{i}]", check_name=True)
        elif t == AttrType.GRAPH:
            self.graph(x, y, f"{node_path}.{a.name}", env_a, env_b)
        elif t == AttrType.GRAPHS:
            _same(where, "number of graphs", len(x), len(y))
            for i, (p, q) in enumerate(zip(x, y)):
                self.graph(p, q, f"{node_path}.{a.name}[{i}]", env_a, env_b)
        else:
            if x != y:
                raise _Diff(f"{where} {_fmt(x)} != {_fmt(y)}")

    # --- tensors -------------------------------------------------------------------------------
    def const(self, a: Tensor | SparseTensor | None, b: Tensor | SparseTensor | None, where: str, *, check_name: bool) -> None:
        if a is None or b is None:
            if a is not b:
                raise _Diff(f"{where}: value {a!r} != {b!r}")
            return
        if isinstance(a, SparseTensor) or isinstance(b, SparseTensor):
            if not (isinstance(a, SparseTensor) and isinstance(b, SparseTensor)):
                raise _Diff(f"{where}: {type(a).__name__} != {type(b).__name__}")
            _same(where, "sparse dims", list(a.dims), list(b.dims))
            self.tensor(a.values, b.values, f"{where} (values)", check_name)
            self.tensor(a.indices, b.indices, f"{where} (indices)", True)
            return
        self.tensor(a, b, where, check_name)

    def tensor(self, a: Tensor, b: Tensor, where: str, check_name: bool) -> None:
        if check_name:
            _same(where, "tensor name", a.name, b.name)
        _same(where, "dtype", a.dtype.text, b.dtype.text)
        _same(where, "shape", list(a.shape), list(b.shape))
        _same(where, "tensor doc_string", a.doc_string, b.doc_string)
        _same(where, "tensor metadata_props", dict(a.metadata_props), dict(b.metadata_props))
        if a is b:
            return
        if a.dtype == DataType.STRING:
            xa = [_as_bytes(s) for s in string_elements(a)]
            xb = [_as_bytes(s) for s in string_elements(b)]
            if xa != xb:
                raise _Diff(f"{where}: string values {_preview(xa)} != {_preview(xb)}")
            return
        ba, bb = a.tobytes(), b.tobytes()
        if ba != bb:
            first = next(i for i in range(min(len(ba), len(bb)) + 1) if i >= min(len(ba), len(bb)) or ba[i] != bb[i])
            raise _Diff(
                f"{where}: values differ ({a.dtype.text}{list(a.shape)}: first at byte {first}; "
                f"{_preview_tensor(a)} != {_preview_tensor(b)})"
            )


def _norm_type(t: Type | None) -> Type | None:
    """All-empty dim denotations mean none (ONNX cannot tell them apart)."""
    if t is None:
        return None
    if isinstance(t, (TensorType, SparseTensorType)):
        if t.shape is not None and t.shape.denotations is not None and not any(t.shape.denotations):
            return dataclasses.replace(t, shape=Shape(t.shape.dims))
        return t
    if isinstance(t, (SequenceType, OptionalType)):
        return dataclasses.replace(t, elem=_norm_type(t.elem))
    if isinstance(t, MapType):
        return dataclasses.replace(t, value=_norm_type(t.value))
    return t


def _preview(xs: list[Any]) -> str:
    return repr(xs[:4])[:-1] + (", ...]" if len(xs) > 4 else "]")


def _preview_tensor(t: Tensor) -> str:
    try:
        flat = np.asarray(t.numpy()).ravel()
        return _preview([x.item() if hasattr(x, "item") else x for x in flat[:5]])
    except Exception:  # exotic dtypes may not decode everywhere; the byte offset still helps
        return "<undecodable>"


def _label(n: Node) -> str:
    return (f"{n.name!r} " if n.name else "") + f"({n.op_type})"


def _ref(v: Value | None, env: dict[int, str]) -> str:
    if v is None:
        return "<omitted>"
    key = env.get(id(v))
    return f"{key} ({v.name!r})" if key is not None else f"undefined value {v.name!r}"

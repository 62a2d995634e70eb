"""ONNX → graphopt IR, keeping everything the ModelProto holds.

Tensors stay lazy (the TensorProto is wrapped, not decoded); external data is memory-mapped,
and a location that leaves the model's folder is refused. Nodes may come in any order: names
are resolved after every output of a graph is known, then the graph is sorted topologically
(a cycle is an error naming a node on it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from graphopt.errors import ExternalDataError, GraphoptError, ModelLoadError, VerifyError
from graphopt.ir.core import Attr, AttrType, Function, Graph, Model, Node, Value
from graphopt.ir.tensor import ExternalTensor, ProtoTensor, SparseTensor, Tensor
from graphopt.ir.types import (
    DataType,
    MapType,
    OpaqueType,
    OptionalType,
    SequenceType,
    Shape,
    SparseTensorType,
    TensorType,
    Type,
)
from graphopt.onnx_io.validate import check_onnx

MIN_IR_VERSION = 3
_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def load(
    source: str | os.PathLike[str] | bytes | onnx.ModelProto,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    verify: bool = True,
    check: bool = False,
) -> Model:
    """Read a model from a path, serialized bytes, or a ModelProto.

    External data is resolved against the model file's folder (or `base_dir`); it is memory-
    mapped, never read into RAM. Raises ModelLoadError with a one-line message on bad input.
    check: also run onnx's checker with full_check (ModelCheckError when it rejects the model);
    it runs after graphopt's own import, which refuses unsafe external data first.
    """
    path: str | None = None
    if isinstance(source, onnx.ModelProto):
        proto = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        proto = _parse(bytes(source), "<bytes>")
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ModelLoadError(f"{path}: no such file")
        if os.path.isdir(path):
            raise ModelLoadError(f"{path}: is a folder, not a model file")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot read: {e.strerror}") from None
        proto = _parse(data, path)
        if base_dir is None:
            base_dir = os.path.dirname(os.path.abspath(path))
    else:
        raise ModelLoadError(f"cannot load a model from a {type(source).__name__}")
    try:
        model = import_model(proto, base_dir=None if base_dir is None else os.fspath(base_dir))
        if verify:
            model.verify()
    except GraphoptError:
        raise
    except RecursionError:
        raise ModelLoadError("model is nested too deeply to import") from None
    except Exception as e:  # the importer validates what it reads; this is the last fence
        raise ModelLoadError(f"cannot import model: {type(e).__name__}: {e}") from None
    if check:
        check_onnx(proto, path)
    return model


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{where}: empty file, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{where}: not a valid ONNX protobuf (truncated or corrupt): {e}") from None
    if not proto.HasField("graph"):
        raise ModelLoadError(f"{where}: not an ONNX model (no graph)")
    return proto


def import_model(proto: onnx.ModelProto, *, base_dir: str | None = None) -> Model:
    _check_text(proto)
    if proto.ir_version < MIN_IR_VERSION:
        raise ModelLoadError(f"IR version {proto.ir_version} is not supported (graphopt reads IR version 3 onward)")
    opsets: dict[str, int] = {}
    for op in proto.opset_import:
        opsets[op.domain] = int(op.version)
    if proto.ir_version >= 3 and not proto.opset_import:
        raise ModelLoadError("model imports no opset")
    imp = _Importer(base_dir)
    functions: dict[tuple[str, str, str], Function] = {}
    for fp in proto.functions:
        f = imp.function(fp)
        if f.id in functions:
            raise ModelLoadError(f"function {f.domain}::{f.name} is defined twice")
        functions[f.id] = f
    graph = imp.graph(proto.graph, [])
    return Model(
        graph,
        ir_version=int(proto.ir_version),
        opset_imports=opsets,
        producer_name=proto.producer_name,
        producer_version=proto.producer_version,
        domain=proto.domain,
        model_version=int(proto.model_version),
        doc_string=proto.doc_string,
        metadata_props=_props(proto.metadata_props),
        functions=functions,
        training_info=[t.SerializeToString() for t in proto.training_info],
        base_dir=base_dir,
        explicit_defaults=_explicit_defaults(proto),
    )


_MODEL_SCALARS = ("producer_name", "producer_version", "domain", "model_version", "doc_string")


def _explicit_defaults(proto: onnx.ModelProto) -> frozenset[str]:
    """Fields present in the proto but holding their default (see Model.explicit_defaults)."""
    found = {f for f in _MODEL_SCALARS if proto.HasField(f) and not getattr(proto, f)}
    if any(op.domain == "" and op.HasField("domain") for op in proto.opset_import):
        found.add("opset_import.domain")
    return frozenset(found)


def _check_text(msg: Any, parent: Any = None) -> None:
    """Refuse invalid UTF-8 in string fields. protobuf parses it anyway and hands it back as
    bytes, which would break every name lookup and then the export."""
    for f, value in msg.ListFields():
        t = f.type
        if t == _STRING:
            for s in value if f.is_repeated else (value,):
                if s.__class__ is bytes:
                    raise ModelLoadError(
                        f"field {msg.DESCRIPTOR.name}.{f.name}{_owner(msg, parent)} is not valid UTF-8: {s[:40]!r}"
                    )
        elif t == _MESSAGE:
            for sub in value if f.is_repeated else (value,):
                _check_text(sub, msg)


def _owner(msg: Any, parent: Any) -> str:
    """' of NodeProto 'conv1'' for the nearest of `msg`, `parent` with a readable name."""
    for m in (msg, parent):
        name = getattr(m, "name", None)
        if name and isinstance(name, str):
            return f" of {m.DESCRIPTOR.name} {name!r}"
    return ""


def _props(entries: Any) -> dict[str, str]:
    return {e.key: e.value for e in entries}


def import_type(tp: onnx.TypeProto) -> Type | None:
    kind = tp.WhichOneof("value")
    den = tp.denotation
    if kind == "tensor_type":
        t = tp.tensor_type
        if t.elem_type == 0:
            return None  # UNDEFINED: the type is unknown (a graph input of it is refused on import)
        return TensorType(_dtype(t.elem_type), _shape(t) if t.HasField("shape") else None, den)
    if kind == "sparse_tensor_type":
        t = tp.sparse_tensor_type
        return SparseTensorType(_dtype(t.elem_type), _shape(t) if t.HasField("shape") else None, den)
    if kind == "sequence_type":
        return SequenceType(_elem(tp.sequence_type), den)
    if kind == "optional_type":
        return OptionalType(_elem(tp.optional_type), den)
    if kind == "map_type":
        m = tp.map_type
        return MapType(_dtype(m.key_type), import_type(m.value_type) if m.HasField("value_type") else None, den)
    if kind == "opaque_type":
        return OpaqueType(tp.opaque_type.domain, tp.opaque_type.name, den)
    return None


def _elem(t: Any) -> Type | None:
    return import_type(t.elem_type) if t.HasField("elem_type") else None


def _dtype(code: int) -> DataType:
    try:
        return DataType(code)
    except ValueError:
        raise ModelLoadError(f"unknown element type {code}") from None


def _shape(t: Any) -> Shape:
    dims: list[int | str | None] = []
    dens: list[str] = []
    for d in t.shape.dim:
        which = d.WhichOneof("value")
        if which == "dim_value":
            # a negative size means nothing (onnx and onnxruntime read it as unknown); kept, it
            # would be folded into Reshape/ConstantOfShape constants that both then refuse
            dims.append(int(d.dim_value) if d.dim_value >= 0 else None)
        else:
            dims.append(d.dim_param if which == "dim_param" else None)
        dens.append(d.denotation)
    return Shape(tuple(dims), tuple(dens) if any(dens) else None)


def import_tensor(tp: onnx.TensorProto, base_dir: str | None = None) -> Tensor:
    """Wrap a TensorProto; external data becomes a memory-mapped ExternalTensor."""
    try:
        dtype = DataType(tp.data_type)
    except ValueError:
        raise ModelLoadError(f"tensor {tp.name!r}: unknown element type {tp.data_type}") from None
    if dtype == DataType.UNDEFINED:
        raise ModelLoadError(f"tensor {tp.name!r}: element type 0 (UNDEFINED) holds no data")
    if any(d < 0 for d in tp.dims):
        raise ModelLoadError(f"tensor {tp.name!r}: negative dim in {list(tp.dims)}")
    if tp.data_location != onnx.TensorProto.EXTERNAL:
        return ProtoTensor(tp)
    info = {e.key: e.value for e in tp.external_data}
    location = info.get("location")
    if not location:
        raise ExternalDataError(f"tensor {tp.name!r}: external data without a location")
    if base_dir is None:
        raise ExternalDataError(
            f"tensor {tp.name!r}: external data {location!r} needs the model's folder (load from a path or pass base_dir)"
        )
    path = resolve_external_path(base_dir, location, tp.name)
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ExternalDataError(f"tensor {tp.name!r}: bad offset or length in its external data") from None
    if offset < 0 or (length is not None and length < 0):
        raise ExternalDataError(f"tensor {tp.name!r}: negative offset or length in its external data")
    t = ExternalTensor(
        path,
        offset,
        length,
        dtype,
        tuple(int(d) for d in tp.dims),
        tp.name,
        location=location,
        doc_string=tp.doc_string,
        metadata_props=_props(tp.metadata_props),
    )
    size = os.path.getsize(path)
    if offset + t.length > size:
        raise ExternalDataError(
            f"tensor {tp.name!r}: needs bytes {offset}..{offset + t.length} of {location!r}, which has only {size}"
        )
    return t


def resolve_external_path(base_dir: str, location: str, tensor_name: str = "") -> str:
    """The file an external-data location names, refusing anything outside `base_dir`."""
    what = f"tensor {tensor_name!r}: " if tensor_name else ""
    if os.path.isabs(location) or location.startswith(("/", "\\")) or "\x00" in location:
        raise ExternalDataError(f"{what}external data location {location!r} is absolute; it must be inside the model's folder")
    base = os.path.realpath(base_dir)
    path = os.path.realpath(os.path.join(base, location))
    if os.path.commonpath([base, path]) != base:
        raise ExternalDataError(f"{what}external data location {location!r} points outside the model's folder")
    if not os.path.isfile(path):
        raise ExternalDataError(f"{what}external data file {location!r} not found next to the model")
    return path


class _Importer:
    def __init__(self, base_dir: str | None) -> None:
        self.base_dir = base_dir
        self.in_function = False  # ref_attr_name is only meaningful in function bodies

    def tensor(self, tp: onnx.TensorProto) -> Tensor:
        return import_tensor(tp, self.base_dir)

    def sparse(self, sp: onnx.SparseTensorProto) -> SparseTensor:
        if any(d < 0 for d in sp.dims):
            raise ModelLoadError(f"sparse tensor {sp.values.name!r}: negative dimension in {list(sp.dims)}")
        return SparseTensor(self.tensor(sp.values), self.tensor(sp.indices), tuple(sp.dims))

    def value_info(self, vi: onnx.ValueInfoProto) -> Value:
        return Value(
            vi.name,
            import_type(vi.type) if vi.HasField("type") else None,
            doc_string=vi.doc_string,
            metadata_props=_props(vi.metadata_props),
        )

    def graph(self, gp: onnx.GraphProto, outer: list[Mapping[str, Value]], *, function: bool = False) -> Graph:
        scope: dict[str, Value] = {}
        graph_name = gp.name or "<graph>"

        def define(v: Value, what: str) -> None:
            if v.name in scope and scope[v.name] is not v:
                raise ModelLoadError(f"duplicate value name {v.name!r} in graph {graph_name!r} ({what})")
            scope[v.name] = v

        inputs = [self.value_info(vi) for vi in gp.input]
        v: Value | None
        for v, vi in zip(inputs, gp.input):
            if not v.name:
                raise ModelLoadError(f"graph {graph_name!r} has an input without a name")
            if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.elem_type == 0:
                # nothing can be fed to it (onnxruntime refuses the model); every target would trip on it
                raise ModelLoadError(f"graph {graph_name!r}: input {v.name!r} has element type 0 (UNDEFINED)")
            define(v, "graph input defined twice")
        g = Graph(inputs, name=gp.name, doc_string=gp.doc_string, metadata_props=_props(gp.metadata_props))
        by_name = {v.name: v for v in inputs}
        for tp in gp.initializer:
            self._initializer(g, by_name, scope, tp.name, self.tensor(tp), graph_name)
        for sp in gp.sparse_initializer:
            self._initializer(g, by_name, scope, sp.values.name, self.sparse(sp), graph_name)

        # pass 1: every node with its outputs, so inputs can refer to later nodes
        nodes: list[tuple[Node, onnx.NodeProto]] = []
        for npb in gp.node:
            outs = [Value(name) for name in npb.output]
            n = Node(
                npb.domain,
                npb.op_type,
                (),
                outputs=outs,
                name=npb.name,
                overload=npb.overload,
                doc_string=npb.doc_string,
                metadata_props=_props(npb.metadata_props),
            )
            for out in outs:
                if out.name:
                    if out.name in scope:
                        raise ModelLoadError(
                            f"duplicate value name {out.name!r}: output of node {n.label()} is already defined in graph {graph_name!r}"
                        )
                    scope[out.name] = out
            nodes.append((n, npb))
        chain = [scope, *outer]
        # pass 2: wire inputs and read attributes (subgraphs see this graph's whole scope)
        for n, npb in nodes:
            ins: list[Value | None] = []
            for name in npb.input:
                if not name:
                    ins.append(None)
                    continue
                v = _lookup(chain, name)
                if v is None:
                    raise ModelLoadError(f"node {n.label()}: input {name!r} is not defined (dangling input)")
                ins.append(v)
            n.set_inputs(ins)
            for ap in npb.attribute:
                if ap.name in n.attributes:
                    raise ModelLoadError(f"node {n.label()}: attribute {ap.name!r} given twice")
                n.set_attr(self.attribute(ap, chain, f"node {n.label()}: "))
            g.append(n)
        for vi in gp.value_info:
            v = scope.get(vi.name)
            if v is not None and v.producer() is not None:
                # value_info of intermediate values: its type, docs and metadata
                if vi.HasField("type"):
                    v.type = import_type(vi.type)
                v.doc_string = vi.doc_string
                v.metadata_props = _props(vi.metadata_props)
        outputs = []
        for vi in gp.output:
            v = _lookup(chain, vi.name)
            if v is None:
                raise ModelLoadError(f"graph {graph_name!r}: output {vi.name!r} is not produced by any node or input")
            if vi.HasField("type"):
                v.type = import_type(vi.type)
            if vi.doc_string:
                v.doc_string = vi.doc_string
            if vi.metadata_props:
                v.metadata_props = _props(vi.metadata_props)
            outputs.append(v)
        g.outputs = outputs
        for ta in gp.quantization_annotation:
            g.quantization_annotation.append((ta.tensor_name, _props(ta.quant_parameter_tensor_names)))
        try:
            g.sort()
        except VerifyError as e:
            raise ModelLoadError(f"graph {graph_name!r}: {e}") from None
        return g

    def _initializer(
        self, g: Graph, inputs: dict[str, Value], scope: dict[str, Value], name: str, t: Tensor | SparseTensor, graph_name: str
    ) -> None:
        if not name:
            raise ModelLoadError(f"graph {graph_name!r} has an initializer without a name")
        if name in g.initializers:
            raise ModelLoadError(f"duplicate initializer {name!r} in graph {graph_name!r}")
        v = inputs.get(name)
        if v is None:
            # an initializer's type is its tensor's
            if isinstance(t, SparseTensor):
                v = Value(name, SparseTensorType(t.dtype, Shape(t.dims)))
            else:
                v = Value(name, TensorType(t.dtype, Shape(t.shape)))
            scope[name] = v
        v.const_value = t
        g.register_initializer(v)

    def attribute(self, ap: onnx.AttributeProto, chain: list[Mapping[str, Value]], where: str = "") -> Attr:
        """`where` prefixes error messages so they name the node (or function) at fault."""
        kind = ap.type if ap.type != 0 else _infer_attr_type(ap)
        try:
            at = AttrType(kind)
        except ValueError:
            raise ModelLoadError(f"{where}attribute {ap.name!r}: unknown kind {kind}") from None
        if ap.ref_attr_name:
            if not self.in_function:
                raise ModelLoadError(
                    f"{where}attribute {ap.name!r} refers to attribute {ap.ref_attr_name!r} of a caller, "
                    "but it is not in a function body"
                )
            return Attr(ap.name, at, None, ap.doc_string, ap.ref_attr_name)
        value: Any
        if at == AttrType.FLOAT:
            value = float(ap.f)
        elif at == AttrType.INT:
            value = int(ap.i)
        elif at == AttrType.STRING:
            value = _text(ap.s)
        elif at == AttrType.TENSOR:
            value = self.tensor(ap.t)
        elif at == AttrType.GRAPH:
            value = self.graph(ap.g, chain)
        elif at == AttrType.SPARSE_TENSOR:
            value = self.sparse(ap.sparse_tensor)
        elif at == AttrType.TYPE_PROTO:
            value = import_type(ap.tp)
        elif at == AttrType.FLOATS:
            value = [float(x) for x in ap.floats]
        elif at == AttrType.INTS:
            value = [int(x) for x in ap.ints]
        elif at == AttrType.STRINGS:
            value = [_text(s) for s in ap.strings]
        elif at == AttrType.TENSORS:
            value = [self.tensor(t) for t in ap.tensors]
        elif at == AttrType.GRAPHS:
            value = [self.graph(sg, chain) for sg in ap.graphs]
        elif at == AttrType.SPARSE_TENSORS:
            value = [self.sparse(s) for s in ap.sparse_tensors]
        elif at == AttrType.TYPE_PROTOS:
            value = [import_type(t) for t in ap.type_protos]
        else:
            raise ModelLoadError(f"{where}attribute {ap.name!r} has no value")
        return Attr(ap.name, at, value, ap.doc_string)

    def function(self, fp: onnx.FunctionProto) -> Function:
        fname = f"{fp.domain}::{fp.name}"
        inputs = [Value(name) for name in fp.input]
        scope = {v.name: v for v in inputs}
        if len(scope) != len(inputs):
            raise ModelLoadError(f"function {fname}: duplicate input names")
        gp = onnx.GraphProto(name=fp.name, node=fp.node, output=[onnx.ValueInfoProto(name=o) for o in fp.output])
        gp.input.extend(onnx.ValueInfoProto(name=i) for i in fp.input)
        gp.value_info.extend(fp.value_info)
        self.in_function = True
        try:
            g = self.graph(gp, [])
        except ModelLoadError as e:
            raise ModelLoadError(f"function {fname}: {e}") from None
        finally:
            self.in_function = False
        # value_info may type the inputs and outputs too
        types = {vi.name: vi for vi in fp.value_info}
        for v in list(g.inputs) + list(g.outputs):
            vi = types.get(v.name)
            if vi is not None and vi.HasField("type"):
                v.type = import_type(vi.type)
        for v in g.inputs:  # node outputs got their docs and metadata from graph() already
            vi = types.get(v.name)
            if vi is not None:
                v.doc_string = vi.doc_string
                v.metadata_props = _props(vi.metadata_props)
        attrs: dict[str, Attr | None] = {name: None for name in fp.attribute}
        for ap in fp.attribute_proto:
            attrs[ap.name] = self.attribute(ap, [], f"function {fname}: ")
        return Function(
            fp.domain,
            fp.name,
            g,
            overload=fp.overload,
            attributes=attrs,
            opset_imports={o.domain: int(o.version) for o in fp.opset_import},
            doc_string=fp.doc_string,
            metadata_props=_props(fp.metadata_props),
        )


def _lookup(chain: list[Mapping[str, Value]], name: str) -> Value | None:
    for scope in chain:
        v = scope.get(name)
        if v is not None:
            return v
    return None


def _text(b: bytes) -> str | bytes:
    """STRING attributes are bytes in ONNX; they are text almost always, so decode when valid."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b


def _infer_attr_type(ap: onnx.AttributeProto) -> int:
    """Very old models leave `type` unset; the filled field tells it."""
    for field_name, kind in (
        ("f", AttrType.FLOAT),
        ("i", AttrType.INT),
        ("s", AttrType.STRING),
        ("t", AttrType.TENSOR),
        ("g", AttrType.GRAPH),
        ("sparse_tensor", AttrType.SPARSE_TENSOR),
        ("tp", AttrType.TYPE_PROTO),
    ):
        if ap.HasField(field_name):
            return int(kind)
    for field_name, kind in (
        ("floats", AttrType.FLOATS),
        ("ints", AttrType.INTS),
        ("strings", AttrType.STRINGS),
        ("tensors", AttrType.TENSORS),
        ("graphs", AttrType.GRAPHS),
        ("sparse_tensors", AttrType.SPARSE_TENSORS),
        ("type_protos", AttrType.TYPE_PROTOS),
    ):
        if len(getattr(ap, field_name)):
            return int(kind)
    return 0

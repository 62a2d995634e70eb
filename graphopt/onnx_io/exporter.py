"""graphopt IR → ONNX ModelProto, the exact inverse of the importer for an unchanged model.

Tensors read from a model are written back from their original protobuf (no decode/encode).
External tensors are either embedded or, when a writer is given (see `save`), written to an
external data file and referenced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import onnx
from onnx import numpy_helper

from graphopt.ir.core import Attr, AttrType, Function, Graph, Model, Node, Value
from graphopt.ir.tensor import ExternalTensor, ProtoTensor, SparseTensor, Tensor
from graphopt.ir.types import DataType, MapType, OpaqueType, OptionalType, SequenceType, SparseTensorType, TensorType, Type

#: Called for each tensor that should go to external data; returns (location, offset, length)
#: or None to embed it.
ExternalWriter = Callable[[Tensor, str], "tuple[str, int, int] | None"]


def to_onnx(model: Model, *, external_writer: ExternalWriter | None = None) -> onnx.ModelProto:
    """Export a Model. Without `external_writer` every tensor is embedded."""
    ex = _Exporter(external_writer)
    mp = onnx.ModelProto(ir_version=model.ir_version)
    # a field holding its default is written only when the source model stated it
    explicit = model.explicit_defaults
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        value = getattr(model, name)
        if value or name in explicit:
            setattr(mp, name, value)
    for domain, version in model.opset_imports.items():
        op = mp.opset_import.add(version=version)
        if domain or "opset_import.domain" in explicit:
            op.domain = domain
    _set_props(mp.metadata_props, model.metadata_props)
    ex.graph(model.graph, mp.graph, initializers_are_inputs=model.ir_version < 4)
    for f in model.functions.values():
        ex.function(f, mp.functions.add())
    for raw in model.training_info:
        mp.training_info.add().ParseFromString(raw)
    return mp


def _set_props(field: object, props: dict[str, str]) -> None:
    for k, v in props.items():
        field.add(key=k, value=v)  # type: ignore[attr-defined]


def export_type(t: Type, tp: onnx.TypeProto) -> None:
    if t.denotation:
        tp.denotation = t.denotation
    if isinstance(t, (TensorType, SparseTensorType)):
        tt = tp.tensor_type if isinstance(t, TensorType) else tp.sparse_tensor_type
        tt.elem_type = int(t.dtype)
        if t.shape is not None:
            tt.shape.SetInParent()
            dens = t.shape.denotations
            for i, d in enumerate(t.shape.dims):
                dim = tt.shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                elif isinstance(d, str):
                    dim.dim_param = d
                if dens is not None and dens[i]:
                    dim.denotation = dens[i]
    elif isinstance(t, SequenceType):
        tp.sequence_type.SetInParent()
        if t.elem is not None:
            export_type(t.elem, tp.sequence_type.elem_type)
    elif isinstance(t, OptionalType):
        tp.optional_type.SetInParent()
        if t.elem is not None:
            export_type(t.elem, tp.optional_type.elem_type)
    elif isinstance(t, MapType):
        tp.map_type.key_type = int(t.key)
        if t.value is not None:
            export_type(t.value, tp.map_type.value_type)
        else:
            tp.map_type.SetInParent()
    elif isinstance(t, OpaqueType):
        tp.opaque_type.SetInParent()
        tp.opaque_type.domain = t.domain
        tp.opaque_type.name = t.name
    else:  # pragma: no cover
        raise TypeError(f"cannot export type {t!r}")


def _value_info(v: Value, vi: onnx.ValueInfoProto) -> None:
    vi.name = v.name
    if v.type is not None:
        export_type(v.type, vi.type)
    if v.doc_string:
        vi.doc_string = v.doc_string
    _set_props(vi.metadata_props, v.metadata_props)


class _Exporter:
    def __init__(self, writer: ExternalWriter | None) -> None:
        self.writer = writer

    def tensor(self, t: Tensor, tp: onnx.TensorProto, name: str, *, allow_external: bool) -> None:
        ref = self.writer(t, name) if (self.writer is not None and allow_external) else None
        if ref is None and isinstance(t, ProtoTensor):
            tp.CopyFrom(t.proto)
            if tp.name != name:
                tp.name = name
            return
        if ref is not None:
            location, offset, length = ref
            tp.name = name
            tp.data_type = int(t.dtype)
            tp.dims.extend(t.shape)
            tp.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
                tp.external_data.add(key=k, value=v)
        elif isinstance(t, ExternalTensor):
            tp.name = name
            tp.data_type = int(t.dtype)
            tp.dims.extend(t.shape)
            tp.raw_data = t.tobytes()
        elif t.dtype == DataType.STRING:
            # written element by element: numpy_helper goes through fixed-width bytes, which
            # drops trailing NUL bytes of an element
            tp.name = name
            tp.data_type = int(t.dtype)
            tp.dims.extend(t.shape)
            tp.string_data.extend(s.encode() if isinstance(s, str) else bytes(s) for s in t.numpy().ravel().tolist())
        else:
            tp.CopyFrom(numpy_helper.from_array(t.numpy(), name))
            if tp.data_type != int(t.dtype):
                tp.data_type = int(t.dtype)
        if t.doc_string:
            tp.doc_string = t.doc_string
        _set_props(tp.metadata_props, t.metadata_props)

    def sparse(self, s: SparseTensor, sp: onnx.SparseTensorProto, name: str | None = None) -> None:
        self.tensor(s.values, sp.values, s.values.name if name is None else name, allow_external=False)
        self.tensor(s.indices, sp.indices, s.indices.name, allow_external=False)
        sp.dims.extend(s.dims)

    def graph(self, g: Graph, gp: onnx.GraphProto, *, function: bool = False, initializers_are_inputs: bool = False) -> None:
        gp.name = g.name
        if g.doc_string:
            gp.doc_string = g.doc_string
        _set_props(gp.metadata_props, g.metadata_props)
        for v in g.inputs:
            _value_info(v, gp.input.add())
        if initializers_are_inputs:
            # IR version < 4: every initializer must also be a graph input; a pass may have
            # added initializers (folded constants) that the source model did not list
            listed = set(g._input_set)
            for v in g.initializers.values():
                if v not in listed and not isinstance(v.const_value, SparseTensor):
                    _value_info(v, gp.input.add())
        for v in g.initializers.values():
            if isinstance(v.const_value, SparseTensor):
                self.sparse(v.const_value, gp.sparse_initializer.add(), v.name)
            else:
                assert v.const_value is not None
                self.tensor(v.const_value, gp.initializer.add(), v.name, allow_external=True)
        boundary = {id(v) for v in g.outputs}
        for n in g:
            self.node(n, gp.node.add())
            for v in n.outputs:
                if v.name and id(v) not in boundary and (v.type is not None or v.doc_string or v.metadata_props):
                    _value_info(v, gp.value_info.add())
        for v in g.outputs:
            _value_info(v, gp.output.add())
        for name, params in g.quantization_annotation:
            ta = gp.quantization_annotation.add(tensor_name=name)
            _set_props(ta.quant_parameter_tensor_names, params)

    def node(self, n: Node, npb: onnx.NodeProto) -> None:
        npb.op_type = n.op_type
        if n.domain:
            npb.domain = n.domain
        if n.name:
            npb.name = n.name
        if n.overload:
            npb.overload = n.overload
        npb.input.extend("" if v is None else v.name for v in n.inputs)
        npb.output.extend(v.name for v in n.outputs)
        for a in n.attributes.values():
            self.attribute(a, npb.attribute.add())
        if n.doc_string:
            npb.doc_string = n.doc_string
        _set_props(npb.metadata_props, n.metadata_props)

    def attribute(self, a: Attr, ap: onnx.AttributeProto) -> None:
        ap.name = a.name
        ap.type = cast("onnx.AttributeProto.AttributeType", int(a.type))
        if a.doc_string:
            ap.doc_string = a.doc_string
        if a.ref_attr_name:
            ap.ref_attr_name = a.ref_attr_name
            return
        t, v = a.type, a.value
        if t == AttrType.FLOAT:
            ap.f = v
        elif t == AttrType.INT:
            ap.i = v
        elif t == AttrType.STRING:
            ap.s = v.encode() if isinstance(v, str) else v
        elif t == AttrType.TENSOR:
            self.tensor(v, ap.t, v.name, allow_external=False)
        elif t == AttrType.GRAPH:
            self.graph(v, ap.g)
        elif t == AttrType.SPARSE_TENSOR:
            self.sparse(v, ap.sparse_tensor)
        elif t == AttrType.TYPE_PROTO:
            ap.tp.SetInParent()  # an empty TypeProto (imported as None) is still present
            if v is not None:
                export_type(v, ap.tp)
        elif t == AttrType.FLOATS:
            ap.floats.extend(v)
        elif t == AttrType.INTS:
            ap.ints.extend(v)
        elif t == AttrType.STRINGS:
            ap.strings.extend(s.encode() if isinstance(s, str) else s for s in v)
        elif t == AttrType.TENSORS:
            for x in v:
                self.tensor(x, ap.tensors.add(), x.name, allow_external=False)
        elif t == AttrType.GRAPHS:
            for x in v:
                self.graph(x, ap.graphs.add())
        elif t == AttrType.SPARSE_TENSORS:
            for x in v:
                self.sparse(x, ap.sparse_tensors.add())
        elif t == AttrType.TYPE_PROTOS:
            for x in v:
                tp = ap.type_protos.add()
                if x is not None:
                    export_type(x, tp)

    def function(self, f: Function, fp: onnx.FunctionProto) -> None:
        fp.name = f.name
        fp.domain = f.domain
        if f.overload:
            fp.overload = f.overload
        fp.input.extend(v.name for v in f.graph.inputs)
        fp.output.extend(v.name for v in f.graph.outputs)
        for name, default in f.attributes.items():
            if default is None:
                fp.attribute.append(name)
            else:
                self.attribute(default, fp.attribute_proto.add())
        for n in f.graph:
            self.node(n, fp.node.add())
        # FunctionProto keeps types, docs and metadata of its values in value_info only
        def described(v: Value) -> bool:
            return bool(v.name) and (v.type is not None or bool(v.doc_string) or bool(v.metadata_props))

        typed = [v for v in f.graph.inputs if described(v)]
        typed += [v for n in f.graph for v in n.outputs if described(v)]
        for v in typed:
            _value_info(v, fp.value_info.add())
        for domain, version in f.opset_imports.items():
            fp.opset_import.add(domain=domain, version=version)
        if f.doc_string:
            fp.doc_string = f.doc_string
        _set_props(fp.metadata_props, f.metadata_props)

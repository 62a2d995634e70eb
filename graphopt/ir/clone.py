"""Deep copies of graphs and models. Tensors are immutable and shared, never copied."""

from __future__ import annotations

import copy
from typing import Any

from graphopt.ir.core import Attr, AttrType, Function, Graph, Model, Node, Value


def _clone_value(v: Value) -> Value:
    nv = Value(v.name, v.type, const_value=v.const_value, doc_string=v.doc_string, metadata_props=v.metadata_props)
    nv.meta = dict(v.meta)
    return nv


def clone_graph(graph: Graph, value_map: dict[Value, Value] | None = None) -> Graph:
    """Copy `graph`; values of enclosing graphs are looked up in `value_map` (else shared)."""
    vm: dict[Value, Value] = dict(value_map or {})
    inputs = []
    for v in graph.inputs:
        vm[v] = _clone_value(v)
        inputs.append(vm[v])
    inits = []
    for v in graph.initializers.values():
        if v not in vm:
            vm[v] = _clone_value(v)
        inits.append(vm[v])
    new = Graph(inputs, [], initializers=inits, name=graph.name, doc_string=graph.doc_string, metadata_props=graph.metadata_props)
    new.meta = dict(graph.meta)
    new.quantization_annotation = [(k, dict(d)) for k, d in graph.quantization_annotation]
    for n in graph:
        outs = [_clone_value(v) for v in n.outputs]
        for old, nv in zip(n.outputs, outs):
            vm[old] = nv
        attrs = [_clone_attr(a, vm) for a in n.attributes.values()]
        nn = Node(
            n.domain,
            n.op_type,
            [None if v is None else vm.get(v, v) for v in n.inputs],
            attrs,
            outputs=outs,
            name=n.name,
            overload=n.overload,
            doc_string=n.doc_string,
            metadata_props=n.metadata_props,
        )
        nn.meta = dict(n.meta)
        new.append(nn)
    new.outputs = [vm.get(v, v) for v in graph.outputs]
    return new


def _clone_attr(a: Attr, vm: dict[Value, Value]) -> Attr:
    value: Any
    if a.value is None:  # a reference (`ref_attr_name`) inside a function body
        value = None
    elif a.type == AttrType.GRAPH:
        value = clone_graph(a.value, vm)
    elif a.type == AttrType.GRAPHS:
        value = [clone_graph(g, vm) for g in a.value]
    elif isinstance(a.value, list):
        value = list(a.value)
    else:
        value = a.value
    return Attr(a.name, a.type, value, a.doc_string, a.ref_attr_name)


def clone_model(model: Model) -> Model:
    functions = {}
    for key, f in model.functions.items():
        functions[key] = Function(
            f.domain,
            f.name,
            clone_graph(f.graph),
            overload=f.overload,
            attributes={k: None if d is None else _clone_attr(d, {}) for k, d in f.attributes.items()},
            opset_imports=dict(f.opset_imports),
            doc_string=f.doc_string,
            metadata_props=dict(f.metadata_props),
        )
    return Model(
        clone_graph(model.graph),
        ir_version=model.ir_version,
        opset_imports=dict(model.opset_imports),
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
        doc_string=model.doc_string,
        metadata_props=dict(model.metadata_props),
        functions=functions,
        training_info=list(model.training_info),
        meta=copy.copy(model.meta),
        base_dir=model.base_dir,
        explicit_defaults=model.explicit_defaults,
    )

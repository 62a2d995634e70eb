"""Type and shape inference for the cleanup passes: onnx's shape inference (with data
propagation and symbolic dims) run on the exported model, its results put back on IR values."""

from __future__ import annotations

import logging

import onnx

from graphopt import to_onnx
from graphopt.ir import DataType, Graph, Model, Shape, Tensor, TensorType, Type

#: Initializers larger than this go to shape inference as typed inputs without their data:
#: inference only needs the values of small (shape-like) tensors, and copying weights is slow.
_KEEP_DATA_ELEMS = 4096


def _stub_large(t: Tensor, name: str) -> tuple[str, int, int] | None:
    """An external-data reference in place of a large tensor's bytes: shape inference needs only
    the type of a weight, and copying hundreds of MB of weights into a proto is most of its cost."""
    n = 1
    for d in t.shape:
        n *= d
    return ("graphopt-inference-stub", 0, 0) if n > _KEEP_DATA_ELEMS else None


_TYPE_CACHE: dict[tuple[object, ...], TensorType | None] = {}


def _tensor_type(tp: onnx.TypeProto) -> TensorType | None:
    """TypeProto -> TensorType, memoised: a model has few distinct types (types are immutable)."""
    if tp.WhichOneof("value") != "tensor_type":
        return None
    tt = tp.tensor_type
    key = (tt.elem_type, tt.HasField("shape"), tuple((d.WhichOneof("value"), d.dim_value, d.dim_param) for d in tt.shape.dim))
    hit = _TYPE_CACHE.get(key, False)
    if hit is not False:
        return hit  # type: ignore[return-value]
    t = _convert(tt)
    if len(_TYPE_CACHE) < 100_000:
        _TYPE_CACHE[key] = t
    return t


def _convert(tt: onnx.TypeProto.Tensor) -> TensorType | None:
    try:
        dtype = DataType(tt.elem_type)
    except ValueError:
        return None
    if dtype == DataType.UNDEFINED:
        return None
    if not tt.HasField("shape"):
        return TensorType(dtype)
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        kind = d.WhichOneof("value")
        dims.append(int(d.dim_value) if kind == "dim_value" else d.dim_param if kind == "dim_param" else None)
    return TensorType(dtype, Shape(tuple(dims)))


def _anonymous(d: object) -> bool:
    """A dim symbol an exporter or onnx's inference made up ("unk__3"): it names nothing."""
    return isinstance(d, str) and d.startswith("unk__")


def merge_type(old: Type | None, new: TensorType | None) -> Type | None:
    """The more precise of two types for one value; on any disagreement the old one wins, except
    that a made-up symbol ("unk__3") gives way to a symbol inferred from the inputs ("batch")."""
    if new is None:
        return old
    if old is None:
        return new
    if not isinstance(old, TensorType) or old.dtype != new.dtype:
        return old
    if old.shape is None:
        return TensorType(old.dtype, new.shape, old.denotation)
    if new.shape is None or new.shape.rank != old.shape.rank:
        return old
    dims: list[int | str | None] = []
    for a, b in zip(old.shape.dims, new.shape.dims):
        if isinstance(a, int):
            dims.append(a)
        elif isinstance(b, int):
            dims.append(b)
        elif _anonymous(a) and isinstance(b, str) and not _anonymous(b):
            dims.append(b)
        else:
            dims.append(a if a is not None else b)
    if tuple(dims) == old.shape.dims:
        return old
    return TensorType(old.dtype, Shape(tuple(dims), old.shape.denotations), old.denotation)


def _apply(g: Graph, gp: onnx.GraphProto) -> int:
    types = {vi.name: vi.type for vi in gp.value_info}
    types.update({vi.name: vi.type for vi in gp.output})
    nodes = g.nodes
    if len(nodes) != len(gp.node):  # not the graph we exported; leave it alone
        return 0
    updated = 0
    for n, npb in zip(nodes, gp.node):
        for v in n.outputs:
            tp = types.get(v.name)
            if tp is not None:
                t = merge_type(v.type, _tensor_type(tp))
                if t is not v.type:
                    v.type = t
                    updated += 1
        sub_protos = {a.name: ([a.g] if a.HasField("g") else list(a.graphs)) for a in npb.attribute}
        for name, a in n.attributes.items():
            gs, gps = a.graphs(), sub_protos.get(name, [])
            for sg, sgp in zip(gs, gps):
                updated += _apply(sg, sgp)
    return updated


def infer_types(model: Model) -> int:
    """Run onnx shape inference and record the inferred types on the IR values of the main
    graph and its subgraphs (function bodies are not covered). Returns how many values got a
    more precise type. Failures of inference are ignored: the passes then know less."""
    try:
        proto = to_onnx(model, external_writer=_stub_large)
        # exporters name every dim they could not derive "unk__N"; such a name would stick (onnx
        # keeps what value_info says), so forget it and let inference derive the dim from the inputs
        for vi in proto.graph.value_info:
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param.startswith("unk__"):
                    d.Clear()
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # noqa: BLE001 - inference is advice: the passes then know less
        logging.getLogger(__name__).info("onnx shape inference failed, types not refined: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 0
    _forget_anonymous(model)
    return _apply(model.graph, inferred.graph)


def _forget_anonymous(model: Model) -> None:
    """Drop the made-up dim symbols an earlier run left on inner values, before this run's types go on.

    Each inference run numbers its made-up symbols afresh, so "unk__5" of an earlier run and
    "unk__5" of this one are different dims; kept side by side (merge_type keeps the old symbol
    when the new one is made up too) they claim two different sizes are equal, and onnxruntime
    refuses the exported value_info at run time ("Shape mismatch attempting to re-use buffer").
    Inlining an If mixes them: the branch's values keep the types of a run that saw them inside
    the branch. The model's inputs and outputs keep theirs (the interface does not change)."""
    interface = {id(v) for v in (*model.graph.inputs, *model.graph.outputs)}
    for n in model.graph.all_nodes():
        values = list(n.outputs) + [v for sg in n.subgraphs() for v in sg.inputs]
        for v in values:
            t = v.type
            if id(v) in interface or not isinstance(t, TensorType) or t.shape is None:
                continue
            if any(_anonymous(d) for d in t.shape.dims):
                dims = tuple(None if _anonymous(d) else d for d in t.shape.dims)
                v.type = TensorType(t.dtype, Shape(dims, t.shape.denotations), t.denotation)

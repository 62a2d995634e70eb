"""ONNX import and export with full fidelity: `to_onnx(load(m))` must give `m` back.

Equality is protobuf equality: `SerializeToString(deterministic=True)` of the export equals the
input's. The only normalisations, used where the IR canonicalises on purpose and named at each
use, are:
- node order: the importer sorts nodes topologically (stable), so an input out of order comes
  back sorted;
- value_info order: the exporter writes value_info in node order;
- external data: `to_onnx` without a writer embeds external tensors as raw_data.
Besides, the export must pass onnx.checker whenever the input does, and where onnxruntime can
run the model its outputs before and after must be identical.
"""

from __future__ import annotations

import difflib
import glob
import os
from pathlib import Path
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import ExternalDataError, ModelLoadError
from graphopt.ir import ExternalTensor, Graph, Model
from graphopt.ir.types import MapType, OpaqueType, OptionalType, SequenceType, SparseTensorType, TensorType

OPSET = 21  # onnxruntime 1.2x runs every op used here at this opset
IR = 10
F = TensorProto.FLOAT


# --- helpers ---------------------------------------------------------------------------------


def _ser(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString(deterministic=True)


def _diff(a: onnx.ModelProto, b: onnx.ModelProto) -> str:
    lines = difflib.unified_diff(str(a).splitlines(), str(b).splitlines(), "input", "export", lineterm="", n=2)
    return "\n".join(list(lines)[:80])


def _checker_ok(m: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(m)
    except onnx.checker.ValidationError:
        return False
    return True


def _ort_run(m: onnx.ModelProto, feeds: dict[str, object]) -> list[object]:
    sess = ort.InferenceSession(_ser(m), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _assert_same_outputs(a: list[object], b: list[object]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape  # type: ignore[union-attr]
            np.testing.assert_array_equal(x, y)  # identical, not close: nothing was rewritten
        else:
            assert x == y


def roundtrip(m: onnx.ModelProto) -> onnx.ModelProto:
    return graphopt.to_onnx(graphopt.load(m))


def assert_fidelity(
    m: onnx.ModelProto,
    feeds: dict[str, object] | None = None,
    *,
    normalise: Callable[[onnx.ModelProto], None] | None = None,
    expect_checker: bool | None = True,
) -> onnx.ModelProto:
    """Round-trip `m`, assert protobuf equality (after `normalise` of both sides, when given),
    checker parity, and identical onnxruntime outputs when `feeds` are given."""
    original = onnx.ModelProto()
    original.CopyFrom(m)  # the importer must not mutate its input
    out = roundtrip(m)
    assert _ser(m) == _ser(original), "load() mutated the input ModelProto"
    a, b = onnx.ModelProto(), onnx.ModelProto()
    a.CopyFrom(m)
    b.CopyFrom(out)
    if normalise is not None:
        normalise(a)
        normalise(b)
    assert _ser(a) == _ser(b), _diff(a, b)
    checker_in = _checker_ok(m)
    if expect_checker is not None:
        assert checker_in is expect_checker, "test model does not have the checker status the test expects"
    if checker_in:
        onnx.checker.check_model(out)  # raises with the reason
    if feeds is not None:
        _assert_same_outputs(_ort_run(m, feeds), _ort_run(out, feeds))
    # a second round trip is a fixed point
    assert _ser(roundtrip(out)) == _ser(out)
    return out


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    *,
    initializer: list[onnx.TensorProto] | None = None,
    opsets: dict[str, int] | None = None,
    ir_version: int = IR,
    **kw: object,
) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializer)
    ops = [helper.make_opsetid(d, v) for d, v in (opsets or {"": OPSET}).items()]
    return helper.make_model(g, opset_imports=ops, ir_version=ir_version, **kw)


def _vi(name: str, elem: int = F, shape: list[object] | None = None) -> onnx.ValueInfoProto:
    # the checker wants a shape on graph inputs and outputs: default to a symbolic 1-D one
    return helper.make_tensor_value_info(name, elem, ["N"] if shape is None else shape)


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _sort_value_info(m: onnx.ModelProto) -> None:
    """Normalisation: value_info order is canonicalised by the exporter."""

    def fix(g: onnx.GraphProto) -> None:
        vis = sorted(g.value_info, key=lambda vi: vi.name)
        del g.value_info[:]
        g.value_info.extend(vis)
        for n in g.node:
            for a in n.attribute:
                if a.HasField("g"):
                    fix(a.g)
                for sg in a.graphs:
                    fix(sg)

    fix(m.graph)
    for f in m.functions:
        vis = sorted(f.value_info, key=lambda vi: vi.name)
        del f.value_info[:]
        f.value_info.extend(vis)


# --- attributes ------------------------------------------------------------------------------


def _sub_graph(name: str) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Identity", ["a"], [f"{name}_out"])], name, [_vi("a", F, [1])], [_vi(f"{name}_out", F, [1])]
    )


def _sparse(name: str) -> onnx.SparseTensorProto:
    values = helper.make_tensor(name, F, [2], [1.5, -2.0])
    indices = helper.make_tensor(f"{name}_idx", TensorProto.INT64, [2], [1, 4])
    return helper.make_sparse_tensor(values, indices, [2, 3])


def test_every_attribute_kind() -> None:
    # one custom-domain node carrying each of the 14 attribute kinds, plus attribute doc strings
    attrs = [
        helper.make_attribute("f", 0.1),  # not exactly representable: float32 bits must survive
        helper.make_attribute("i", -(2**40)),
        helper.make_attribute("s", "héllo"),
        helper.make_attribute("s_bin", b"\xff\xfe\x00bin"),  # not UTF-8: must stay bytes
        helper.make_attribute("t", numpy_helper.from_array(np.arange(6, dtype=np.int32).reshape(2, 3), "t")),
        helper.make_attribute("g", _sub_graph("body")),
        helper.make_attribute("fs", [0.5, float("inf"), -0.0, float("nan")]),
        helper.make_attribute("is", [1, -2, 2**62]),
        helper.make_attribute("ss", ["a", "", "ü"]),
        helper.make_attribute("ts", [helper.make_tensor("t0", F, [1], [1.0]), helper.make_tensor("t1", TensorProto.INT8, [2], [1, -1])]),
        helper.make_attribute("gs", [_sub_graph("b0"), _sub_graph("b1")]),
        helper.make_attribute("st", _sparse("sp")),
        helper.make_attribute("sts", [_sparse("sp0"), _sparse("sp1")]),
        helper.make_attribute("tp", helper.make_tensor_type_proto(TensorProto.FLOAT16, ["N", 3])),
        helper.make_attribute("tp_empty", onnx.TypeProto()),  # an empty TypeProto is still there
        helper.make_attribute(
            "tps",
            [helper.make_sequence_type_proto(helper.make_tensor_type_proto(F, None)), helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.INT64, []))],
        ),
        helper.make_attribute("empty_ints", [], attr_type=onnx.AttributeProto.INTS),
        helper.make_attribute("documented", 3, doc_string="why this attribute exists"),
    ]
    node = helper.make_node("Everything", ["x"], ["y"], domain="custom.attrs", name="n0")
    node.attribute.extend(attrs)
    m = _model([node], [_vi("x")], [_vi("y")], opsets={"": OPSET, "custom.attrs": 1})
    out = assert_fidelity(m)
    kinds = {a.name: a.type for a in out.graph.node[0].attribute}
    assert len(set(kinds.values())) == 14  # every AttributeType but UNDEFINED
    ir = graphopt.load(m).graph.nodes[0]
    assert ir.attr("s_bin") == b"\xff\xfe\x00bin" and ir.attr("s") == "héllo"


def test_attribute_without_type_field_is_inferred() -> None:
    # very old models leave AttributeProto.type unset; import infers it, export states it
    node = helper.make_node("Transpose", ["x"], ["y"])
    a = node.attribute.add()
    a.name, a.ints[:] = "perm", [1, 0]
    m = _model([node], [_vi("x", F, [2, 3])], [_vi("y", F, [3, 2])])
    out = roundtrip(m)
    assert out.graph.node[0].attribute[0].type == onnx.AttributeProto.INTS
    onnx.checker.check_model(out)
    x = _rand(2, 3)
    # onnxruntime refuses the input (type missing) but runs the export
    np.testing.assert_array_equal(_ort_run(out, {"x": x})[0], x.T)


# --- initializers and tensors ----------------------------------------------------------------


def _typed_and_raw_tensors() -> list[onnx.TensorProto]:
    """Tensors of the narrow types in both storages: raw_data and the typed fields."""
    out: list[onnx.TensorProto] = []
    vals = [0.5, -1.0, 2.0, 0.0]
    for dt in (TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ,
               TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ, TensorProto.FLOAT4E2M1, TensorProto.FLOAT8E8M0):
        name = helper.tensor_dtype_to_string(dt).split(".")[-1].lower()
        typed = helper.make_tensor(f"{name}_typed", dt, [2, 2], [abs(v) if dt == TensorProto.FLOAT8E8M0 else v for v in vals])
        assert not typed.HasField("raw_data")  # stored in int32_data
        raw = numpy_helper.from_array(numpy_helper.to_array(typed), f"{name}_raw")
        assert raw.HasField("raw_data")
        out += [typed, raw]
    for dt, ints in ((TensorProto.INT4, [-8, 7, 0, 1, -1]), (TensorProto.UINT4, [0, 15, 3, 4, 9]),
                     (TensorProto.INT2, [-2, 1, 0]), (TensorProto.UINT2, [3, 0, 1])):
        name = helper.tensor_dtype_to_string(dt).split(".")[-1].lower()
        typed = helper.make_tensor(f"{name}_typed", dt, [len(ints)], ints)
        out += [typed, numpy_helper.from_array(numpy_helper.to_array(typed), f"{name}_raw")]
    # the classic typed fields
    out.append(helper.make_tensor("f32_float_data", F, [3], [1.0, 0.1, -3.5]))
    out.append(helper.make_tensor("f64_double_data", TensorProto.DOUBLE, [2], [0.1, 1e300]))
    out.append(helper.make_tensor("i64_int64_data", TensorProto.INT64, [2], [-(2**63), 2**63 - 1]))
    out.append(helper.make_tensor("u64_uint64_data", TensorProto.UINT64, [1], [2**64 - 1]))
    out.append(helper.make_tensor("u32_uint64_data", TensorProto.UINT32, [1], [2**32 - 1]))
    out.append(helper.make_tensor("i8_int32_data", TensorProto.INT8, [2], [-128, 127]))
    out.append(helper.make_tensor("bool_int32_data", TensorProto.BOOL, [2], [True, False]))
    out.append(helper.make_tensor("c64_float_data", TensorProto.COMPLEX64, [1], [1 + 2j]))
    out.append(helper.make_tensor("str_string_data", TensorProto.STRING, [3], [b"a", b"\xff\x00", "ü".encode()]))
    out.append(helper.make_tensor("scalar", F, [], [7.0]))
    out.append(helper.make_tensor("empty", F, [0, 3], []))
    return out


def test_narrow_and_typed_field_tensors_survive_byte_for_byte() -> None:
    tensors = _typed_and_raw_tensors()
    # tensor doc strings and metadata_props too
    tensors[0].doc_string = "a half-precision tensor"
    helper.set_metadata_props(tensors[1], {"origin": "test", "k": "v"})
    node = helper.make_node("Identity", ["x"], ["y"])
    m = _model([node], [_vi("x")], [_vi("y")], initializer=tensors)
    assert_fidelity(m)
    # the values, decoded lazily by graphopt, agree with onnx's own decoding
    model = graphopt.load(m)
    for tp in tensors:
        if tp.name == "str_string_data":
            continue  # holds non-UTF-8 bytes, which numpy_helper.to_array cannot decode
        ours = model.graph.initializers[tp.name].const_value.numpy()
        theirs = numpy_helper.to_array(tp)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, tp.name
        if theirs.dtype != object:
            assert ours.tobytes() == theirs.tobytes(), tp.name
        else:
            assert list(ours.ravel()) == list(theirs.ravel())


def test_narrow_types_run_in_onnxruntime() -> None:
    # Cast each narrow initializer to float: same numbers before and after the round trip
    inits = [
        helper.make_tensor("h_typed", TensorProto.FLOAT16, [3], [0.5, -1.0, 65504.0]),
        numpy_helper.from_array(np.array([0.1, 3.0, -7.5], np.float16), "h_raw"),
        helper.make_tensor("bf_typed", TensorProto.BFLOAT16, [3], [0.5, -1.0, 3.0]),
        helper.make_tensor("f8_typed", TensorProto.FLOAT8E4M3FN, [3], [0.5, -1.0, 448.0]),
        helper.make_tensor("i4_typed", TensorProto.INT4, [3], [-8, 7, 1]),
        helper.make_tensor("u4_typed", TensorProto.UINT4, [3], [0, 15, 2]),
    ]
    nodes = [helper.make_node("Cast", [t.name], [f"{t.name}_f"], to=F) for t in inits]
    nodes.append(helper.make_node("Sum", [f"{t.name}_f" for t in inits] + ["x"], ["y"]))
    m = _model(nodes, [_vi("x", F, [3])], [_vi("y", F, [3])], initializer=inits)
    assert_fidelity(m, {"x": _rand(3)})


def test_string_tensors_run() -> None:
    init = helper.make_tensor("words", TensorProto.STRING, [2], [b"foo", "b\xc3\xa4r".encode()])
    nodes = [helper.make_node("Concat", ["s", "words"], ["y"], axis=0), helper.make_node("Identity", ["words"], ["w"])]
    m = _model(nodes, [_vi("s", TensorProto.STRING, [None])], [_vi("y", TensorProto.STRING, [None]), _vi("w", TensorProto.STRING, [2])], initializer=[init])
    assert_fidelity(m, {"s": np.array(["x", "ÿ"], dtype=object)})


def test_sparse_initializers() -> None:
    # linear indices and [NNZ, rank] coordinate indices; onnxruntime densifies them
    lin = helper.make_sparse_tensor(
        helper.make_tensor("sp_lin", F, [2], [1.0, 2.0]), helper.make_tensor("sp_lin_i", TensorProto.INT64, [2], [0, 5]), [2, 3]
    )
    coo = helper.make_sparse_tensor(
        helper.make_tensor("sp_coo", F, [2], [3.0, 4.0]), helper.make_tensor("sp_coo_i", TensorProto.INT64, [2, 2], [0, 1, 1, 2]), [2, 3]
    )
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "sp_lin"], ["t"]), helper.make_node("Add", ["t", "sp_coo"], ["y"])],
        "g", [_vi("x", F, [2, 3])], [_vi("y", F, [2, 3])], sparse_initializer=[lin, coo],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR)
    assert_fidelity(m, {"x": _rand(2, 3)})
    v = graphopt.load(m).graph.initializers["sp_coo"]
    assert isinstance(v.type, SparseTensorType)
    np.testing.assert_array_equal(v.const_value.numpy(), [[0, 3, 0], [0, 0, 4]])


def test_initializers_listed_as_inputs_ir3() -> None:
    # before IR 4 every initializer is also a graph input (an overridable default)
    w = numpy_helper.from_array(_rand(3, seed=1), "w")
    m = _model([helper.make_node("Add", ["x", "w"], ["y"])], [_vi("x", F, [3]), _vi("w", F, [3])], [_vi("y", F, [3])],
               initializer=[w], opsets={"": 8}, ir_version=3)
    assert_fidelity(m, {"x": _rand(3)})
    v = graphopt.load(m).graph.initializers["w"]
    assert v.is_graph_input() and v.is_initializer()


# --- value_info, metadata, doc strings -------------------------------------------------------


def _documented_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu", doc_string="node doc"),
        helper.make_node("Neg", ["a"], ["b"], name="neg"),
        helper.make_node("Abs", ["b"], ["y"], name="abs"),
    ]
    helper.set_metadata_props(nodes[1], {"source": "layer1.neg"})
    vi_a = helper.make_tensor_value_info("a", F, ["N", 4], doc_string="after relu")
    helper.set_metadata_props(vi_a, {"vk": "vv"})
    vi_b = helper.make_tensor_value_info("b", F, ["N", 4])
    x = helper.make_tensor_value_info("x", F, ["N", 4], doc_string="the input")
    y = helper.make_tensor_value_info("y", F, ["N", 4], doc_string="the output")
    g = helper.make_graph(nodes, "documented", [x], [y], doc_string="graph doc", value_info=[vi_a, vi_b])
    helper.set_metadata_props(g, {"graph_key": "graph_value"})
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR, producer_name="tests",
        producer_version="1.0", domain="org.example", model_version=7, doc_string="model doc",
    )
    helper.set_model_props(m, {"author": "me", "license": "MIT"})
    return m


def test_value_info_metadata_and_doc_strings() -> None:
    m = _documented_model()
    assert_fidelity(m, {"x": _rand(2, 4)})
    model = graphopt.load(m)
    assert model.metadata_props == {"author": "me", "license": "MIT"}
    a = model.graph.nodes[0].outputs[0]
    assert a.doc_string == "after relu" and a.metadata_props == {"vk": "vv"}


def test_value_info_order_is_canonicalised_to_node_order() -> None:
    m = _documented_model()
    vis = list(m.graph.value_info)[::-1]
    del m.graph.value_info[:]
    m.graph.value_info.extend(vis)
    out = assert_fidelity(m, normalise=_sort_value_info)
    assert [vi.name for vi in out.graph.value_info] == ["a", "b"]  # the canonical order


def test_redundant_value_info_is_canonicalised() -> None:
    # value_info entries that restate the type of a graph input, an initializer or a graph
    # output are dropped: the IR keeps one type per value, on the value itself
    w = numpy_helper.from_array(np.ones(3, np.float32), "w")
    nodes = [helper.make_node("Add", ["x", "w"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    redundant = [_vi("x", F, [3]), _vi("w", F, [3]), _vi("y", F, [3])]
    g = helper.make_graph(nodes, "g", [_vi("x", F, [3])], [_vi("y", F, [3])], initializer=[w],
                          value_info=[_vi("a", F, [3]), *redundant])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR)

    def drop_redundant(mp: onnx.ModelProto) -> None:
        keep = [vi for vi in mp.graph.value_info if vi.name == "a"]
        del mp.graph.value_info[:]
        mp.graph.value_info.extend(keep)

    out = assert_fidelity(m, {"x": _rand(3)}, normalise=drop_redundant)
    assert [vi.name for vi in out.graph.value_info] == ["a"]


def test_quantization_annotation() -> None:
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")])
    qa = m.graph.quantization_annotation.add(tensor_name="y")
    qa.quant_parameter_tensor_names.add(key="SCALE_TENSOR", value="y_scale")
    qa.quant_parameter_tensor_names.add(key="ZERO_POINT_TENSOR", value="y_zp")
    assert_fidelity(m)


def test_model_fields_absent_stay_absent_and_present_stay_present() -> None:
    # make_model leaves producer_name etc. unset: the export must not invent them ...
    bare = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")])
    assert not bare.HasField("producer_name")
    assert_fidelity(bare)
    # ... while a model that states them, even empty, keeps them
    stated = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")], producer_name="", model_version=0, doc_string="")
    assert stated.HasField("producer_name") and stated.HasField("model_version")
    assert_fidelity(stated)
    # the default opset import without a domain field, and with one
    implicit = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [_vi("x")], [_vi("y")]))
    assert not implicit.opset_import[0].HasField("domain")
    assert_fidelity(implicit)


def _clear_empty_node_domains(m: onnx.ModelProto) -> None:
    for n in m.graph.node:
        if n.HasField("domain") and not n.domain:
            n.ClearField("domain")


def test_node_domain_empty_but_stated_is_canonicalised() -> None:
    # make_node(domain="") states the default domain; the exporter (like onnx-ir's) writes a
    # node's domain only when it is not the default: a documented normalisation
    m = _model([helper.make_node("Relu", ["x"], ["y"], domain="")], [_vi("x")], [_vi("y")])
    assert m.graph.node[0].HasField("domain")
    out = assert_fidelity(m, {"x": _rand(3)}, normalise=_clear_empty_node_domains)
    assert not out.graph.node[0].HasField("domain")


# --- types -----------------------------------------------------------------------------------


def test_denotations_and_non_tensor_types_on_graph_inputs() -> None:
    img = helper.make_tensor_type_proto(F, ["N", 3, 224, None])
    img.denotation = "IMAGE"
    for d, den in zip(img.tensor_type.shape.dim, ["DATA_BATCH", "DATA_CHANNEL", "DATA_FEATURE", "DATA_FEATURE"]):
        d.denotation = den
    seq = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.INT64, [None]))
    mp = helper.make_map_type_proto(TensorProto.STRING, helper.make_tensor_type_proto(F, []))
    opt = helper.make_optional_type_proto(helper.make_sequence_type_proto(helper.make_tensor_type_proto(F, None)))
    opaque = onnx.TypeProto()
    opaque.opaque_type.domain, opaque.opaque_type.name = "custom.types", "Handle"
    sparse = helper.make_sparse_tensor_type_proto(F, [10, "K"])
    unknown_rank = helper.make_tensor_type_proto(F, None)
    scalar = helper.make_tensor_type_proto(TensorProto.INT32, [])
    inputs = [helper.make_value_info(n, t) for n, t in (("img", img), ("seq", seq), ("map", mp), ("opt", opt),
                                                         ("opaque", opaque), ("sparse", sparse), ("unk", unknown_rank), ("scalar", scalar))]
    outputs = [helper.make_value_info("img_out", img), helper.make_value_info("n", helper.make_tensor_type_proto(TensorProto.INT64, []))]
    nodes = [helper.make_node("Identity", ["img"], ["img_out"]), helper.make_node("SequenceLength", ["seq"], ["n"])]
    g = helper.make_graph(nodes, "types", inputs, outputs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR)
    assert_fidelity(m, expect_checker=False)  # the checker wants a shape on the unknown-rank input
    model = graphopt.load(m)
    t = {v.name: v.type for v in model.graph.inputs}
    assert isinstance(t["seq"], SequenceType) and isinstance(t["map"], MapType)
    assert isinstance(t["opt"], OptionalType) and isinstance(t["opaque"], OpaqueType)
    assert isinstance(t["sparse"], SparseTensorType) and t["sparse"].shape.dims == (10, "K")
    assert isinstance(t["img"], TensorType) and t["img"].denotation == "IMAGE"
    assert t["img"].shape.denotations == ("DATA_BATCH", "DATA_CHANNEL", "DATA_FEATURE", "DATA_FEATURE")
    assert t["unk"].shape is None and t["scalar"].shape.dims == ()


# --- opsets and IR versions ------------------------------------------------------------------


def test_opset_imports_of_every_domain() -> None:
    opsets = {"": OPSET, "ai.onnx.ml": 3, "com.microsoft": 1, "org.custom.ops": 4, "ai.onnx.preview.training": 1}
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")], opsets=opsets)
    out = assert_fidelity(m)
    assert [(o.domain, o.version) for o in out.opset_import] == list(opsets.items())


def _ir_versions() -> list[tuple[int, int]]:
    """(IR version, the newest ai.onnx opset that IR version goes with), from onnx's table."""
    best: dict[int, int] = {}
    for _release, ir, opset, *_ in helper.VERSION_TABLE:
        best[ir] = max(best.get(ir, 0), opset)
    assert max(best) == onnx.IR_VERSION
    return sorted((ir, op) for ir, op in best.items() if ir >= 3)


@pytest.mark.parametrize(("ir_version", "opset"), _ir_versions())
def test_ir_versions(ir_version: int, opset: int) -> None:
    w = numpy_helper.from_array(_rand(2, 3, seed=2), "w")
    nodes = [helper.make_node("Add", ["x", "w"], ["t"], name="add"), helper.make_node("Relu", ["t"], ["y"], name="relu")]
    inputs = [_vi("x", F, [2, 3])] + ([_vi("w", F, [2, 3])] if ir_version < 4 else [])  # IR 3: initializers are inputs
    m = _model(nodes, inputs, [_vi("y", F, [2, 3])], initializer=[w], opsets={"": opset}, ir_version=ir_version,
               producer_name="t")
    x = _rand(2, 3)
    try:
        runnable = _ort_run(m, {"x": x}) is not None
    except Exception:  # onnxruntime lags behind the newest IR version / opset
        runnable = False
    assert_fidelity(m, {"x": x} if runnable else None)
    assert graphopt.load(m).ir_version == ir_version


def test_ir_version_below_3_is_refused() -> None:
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")], ir_version=2)
    with pytest.raises(ModelLoadError, match="IR version 2"):
        graphopt.load(m)


# --- functions -------------------------------------------------------------------------------


def _functions_model() -> onnx.ModelProto:
    # ScaledAct(x; alpha (no default), beta = 2.0 default): alpha*x via ref_attr_name, then LeakyRelu(beta)
    alpha_const = helper.make_node("Constant", [], ["alpha"])
    alpha_const.attribute.append(helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT))
    alpha_const.attribute[0].doc_string = "from the caller"
    beta_ref = helper.make_attribute_ref("alpha", onnx.AttributeProto.FLOAT)
    beta_ref.ref_attr_name = "beta"
    leaky = helper.make_node("LeakyRelu", ["t"], ["y"])
    leaky.attribute.append(beta_ref)
    alpha_const.attribute[0].ref_attr_name = "alpha"
    f = helper.make_function(
        "local.fns", "ScaledAct", ["x"], ["y"],
        [alpha_const, helper.make_node("Mul", ["x", "alpha"], ["t"]), leaky],
        [helper.make_opsetid("", OPSET)],
        attributes=["alpha"], attribute_protos=[helper.make_attribute("beta", 2.0)],
        doc_string="function doc",
        # in the exporter's canonical order: inputs, then node outputs in node order
        value_info=[helper.make_tensor_value_info("x", F, None), helper.make_tensor_value_info("t", F, None)],
    )
    helper.set_metadata_props(f, {"fk": "fv"})
    # a plain function calling another function
    g = helper.make_function(
        "local.fns", "Twice", ["x"], ["y"],
        [helper.make_node("ScaledAct", ["x"], ["m"], domain="local.fns", alpha=1.5),
         helper.make_node("ScaledAct", ["m"], ["y"], domain="local.fns", alpha=0.5, beta=0.25)],
        [helper.make_opsetid("local.fns", 1)],
    )
    nodes = [helper.make_node("Twice", ["x"], ["y"], domain="local.fns", name="call")]
    return _model(nodes, [_vi("x", F, [4])], [_vi("y", F, [4])], opsets={"": OPSET, "local.fns": 1}, functions=[f, g])


def test_functions_with_attribute_params_defaults_and_refs() -> None:
    m = _functions_model()
    assert_fidelity(m, {"x": np.array([-2, -1, 1, 2], np.float32)})
    model = graphopt.load(m)
    f = model.functions[("local.fns", "ScaledAct", "")]
    assert list(f.attributes) == ["alpha", "beta"]
    assert f.attributes["alpha"] is None and f.attributes["beta"].value == 2.0
    const = f.graph.nodes[0]
    assert const.attributes["value_float"].ref_attr_name == "alpha" and const.attributes["value_float"].value is None
    assert f.graph.nodes[1].outputs[0].type is not None  # function value_info typed 't'
    assert f.graph.inputs[0].type is not None  # ... and the input 'x'


def test_function_overloads() -> None:
    # two functions with the same name told apart by overload (IR 10), called by overload
    def fn(overload: str, op: str) -> onnx.FunctionProto:
        return helper.make_function("local", "Act", ["x"], ["y"], [helper.make_node(op, ["x"], ["y"])],
                                    [helper.make_opsetid("", OPSET)], overload=overload)

    nodes = [helper.make_node("Act", ["x"], ["a"], domain="local", overload="relu"),
             helper.make_node("Act", ["a"], ["y"], domain="local", overload="neg")]
    m = _model(nodes, [_vi("x", F, [3])], [_vi("y", F, [3])], opsets={"": OPSET, "local": 1},
               functions=[fn("relu", "Relu"), fn("neg", "Neg")])
    assert_fidelity(m)
    model = graphopt.load(m)
    assert set(model.functions) == {("local", "Act", "relu"), ("local", "Act", "neg")}
    assert [n.overload for n in model.graph] == ["relu", "neg"]


def test_function_with_control_flow_reading_function_inputs() -> None:
    then_g = helper.make_graph([helper.make_node("Neg", ["x"], ["ty"])], "then", [], [_vi("ty", F, [3])])
    else_g = helper.make_graph([helper.make_node("Abs", ["x"], ["ey"])], "else", [], [_vi("ey", F, [3])])
    f = helper.make_function("loc", "F", ["c", "x"], ["y"],
                             [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                             [helper.make_opsetid("", OPSET)])
    m = _model([helper.make_node("F", ["c", "x"], ["y"], domain="loc")], [_vi("c", TensorProto.BOOL, []), _vi("x", F, [3])],
               [_vi("y", F, [3])], opsets={"": OPSET, "loc": 1}, functions=[f])
    for c in (True, False):
        assert_fidelity(m, {"c": np.array(c), "x": _rand(3)})
    fx = graphopt.load(m).functions[("loc", "F", "")].graph.inputs[1]
    assert sorted(n.op_type for n, _ in fx.uses()) == ["Abs", "Neg"]  # uses from the branches


def test_duplicate_function_is_refused() -> None:
    f = helper.make_function("local", "F", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])], [helper.make_opsetid("", OPSET)])
    m = _model([helper.make_node("F", ["x"], ["y"], domain="local")], [_vi("x")], [_vi("y")],
               opsets={"": OPSET, "local": 1}, functions=[f, f])
    with pytest.raises(ModelLoadError, match="defined twice"):
        graphopt.load(m)


# --- control flow ----------------------------------------------------------------------------


def _control_flow_model() -> onnx.ModelProto:
    # If: branches read outer 'x' and 'w' (an initializer) directly
    then_g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["then_y"])], "then", [], [_vi("then_y", F, [3])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "w"], ["else_y"])], "else", [], [_vi("else_y", F, [3])])
    if_node = helper.make_node("If", ["cond"], ["if_y"], then_branch=then_g, else_branch=else_g, name="if")
    # Loop: body reads outer 'if_y' and accumulates; a nested If inside the body reads the outer 'w'
    inner_then = helper.make_graph([helper.make_node("Mul", ["acc_in", "w"], ["in_t"])], "inner_then", [], [_vi("in_t", F, [3])])
    inner_else = helper.make_graph([helper.make_node("Identity", ["acc_in"], ["in_e"])], "inner_else", [], [_vi("in_e", F, [3])])
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "if_y"], ["acc_sum"]),
            helper.make_node("If", ["cond_in"], ["acc_if"], then_branch=inner_then, else_branch=inner_else),
            helper.make_node("Add", ["acc_sum", "acc_if"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["acc_out"], ["scan_out"]),
        ],
        "body",
        [_vi("iter", TensorProto.INT64, []), _vi("cond_in", TensorProto.BOOL, []), _vi("acc_in", F, [3])],
        [_vi("cond_out", TensorProto.BOOL, []), _vi("acc_out", F, [3]), _vi("scan_out", F, [3])],
    )
    loop = helper.make_node("Loop", ["trip", "", "x"], ["loop_y", "loop_scan"], body=body, name="loop")
    # Scan: running sum over rows, scaled by outer 'w'
    scan_body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "row"], ["s_sum"]), helper.make_node("Mul", ["s_sum", "w"], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["s_emit"])],
        "scan_body", [_vi("s_in", F, [3]), _vi("row", F, [3])], [_vi("s_out", F, [3]), _vi("s_emit", F, [3])],
    )
    scan = helper.make_node("Scan", ["x", "rows"], ["scan_final", "scan_all"], body=scan_body, num_scan_inputs=1, name="scan")
    w = numpy_helper.from_array(np.array([0.5, 1.0, 2.0], np.float32), "w")
    trip = numpy_helper.from_array(np.array(3, np.int64), "trip")
    return _model(
        [if_node, loop, scan],
        [_vi("cond", TensorProto.BOOL, []), _vi("x", F, [3]), _vi("rows", F, [4, 3])],
        [_vi("if_y", F, [3]), _vi("loop_y", F, [3]), _vi("loop_scan", F, [3, 3]), _vi("scan_final", F, [3]), _vi("scan_all", F, [4, 3])],
        initializer=[w, trip],
    )


@pytest.mark.parametrize("cond", [True, False])
def test_if_loop_scan_subgraphs_reading_outer_scope(cond: bool) -> None:
    m = _control_flow_model()
    assert_fidelity(m, {"cond": np.array(cond), "x": _rand(3), "rows": _rand(4, 3, seed=3)})
    model = graphopt.load(m)
    x = next(v for v in model.graph.inputs if v.name == "x")
    w = model.graph.initializers["w"]
    # the outer values know their readers inside the subgraphs
    assert {n.op_type for n, _ in x.uses()} == {"Add", "Sub", "Loop", "Scan"}
    assert {n.graph.name for n, _ in w.uses()} == {"then", "else", "inner_then", "scan_body"}


def test_subgraph_output_reading_outer_value_directly() -> None:
    # a branch whose output *is* an outer value (no node in the branch)
    then_g = helper.make_graph([], "then", [], [_vi("x", F, [3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["nx"])], "else", [], [_vi("nx", F, [3])])
    m = _model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
               [_vi("c", TensorProto.BOOL, []), _vi("x", F, [3])], [_vi("y", F, [3])])
    # onnx's checker and onnxruntime both reject this, but the IR must still carry it faithfully
    assert_fidelity(m, expect_checker=False)
    then = graphopt.load(m).graph.nodes[0].attributes["then_branch"].value
    assert then.outputs[0].is_graph_input() and then.outputs[0].graph is not then


# --- node order, optional inputs and outputs -------------------------------------------------


def test_nodes_out_of_topological_order_are_sorted() -> None:
    nodes = [
        helper.make_node("Relu", ["b"], ["y"], name="last"),
        helper.make_node("Neg", ["x"], ["a"], name="first"),
        helper.make_node("Abs", ["x"], ["z"], name="independent"),  # already placeable: keeps its slot
        helper.make_node("Exp", ["a"], ["b"], name="middle"),
    ]
    m = _model(nodes, [_vi("x", F, [3])], [_vi("y", F, [3]), _vi("z", F, [3])])
    assert not _checker_ok(m)  # onnx requires topological order
    out = roundtrip(m)
    onnx.checker.check_model(out)
    assert [n.name for n in out.graph.node] == ["first", "independent", "middle", "last"]
    x = _rand(3)
    _assert_same_outputs(_ort_run(m, {"x": x}), _ort_run(out, {"x": x}))

    # normalisation: the same model, sorted, round-trips exactly
    def by_name(mp: onnx.ModelProto) -> None:
        order = {"first": 0, "independent": 1, "middle": 2, "last": 3}
        ns = sorted(mp.graph.node, key=lambda n: order[n.name])
        del mp.graph.node[:]
        mp.graph.node.extend(ns)

    assert_fidelity(m, normalise=by_name, expect_checker=False)


def test_cycle_is_refused_naming_a_node() -> None:
    nodes = [helper.make_node("Relu", ["b"], ["a"], name="r"), helper.make_node("Neg", ["a"], ["b"], name="n")]
    m = _model(nodes, [_vi("x")], [_vi("a")])
    with pytest.raises(ModelLoadError, match="cycle.*'(r|n)'"):
        graphopt.load(m)


def test_optional_inputs_and_outputs_omitted_with_empty_names() -> None:
    hidden = 2
    w = numpy_helper.from_array(_rand(1, 4 * hidden, 3, seed=4), "W")
    r = numpy_helper.from_array(_rand(1, 4 * hidden, hidden, seed=5), "R")
    h0 = numpy_helper.from_array(np.zeros((1, 1, hidden), np.float32), "h0")
    mx = numpy_helper.from_array(np.array(0.5, np.float32), "max")
    nodes = [
        # B and sequence_lens omitted in the middle; Y omitted as the first output
        helper.make_node("LSTM", ["x", "W", "R", "", "", "h0"], ["", "Y_h"], hidden_size=hidden),
        helper.make_node("Clip", ["Y_h", "", "max"], ["y"]),  # min omitted
    ]
    m = _model(nodes, [_vi("x", F, [5, 1, 3])], [_vi("y", F, [1, 1, hidden])], initializer=[w, r, h0, mx])
    assert_fidelity(m, {"x": _rand(5, 1, 3)})
    lstm = graphopt.load(m).graph.nodes[0]
    assert lstm.inputs[3] is None and lstm.inputs[4] is None
    assert lstm.outputs[0].name == "" and len(lstm.outputs) == 2


# --- training info, external data, real models -----------------------------------------------


def test_training_info_preserved() -> None:
    m = _model([helper.make_node("Add", ["x", "w"], ["y"])], [_vi("x", F, [2])], [_vi("y", F, [2])],
               initializer=[numpy_helper.from_array(np.ones(2, np.float32), "w")],
               opsets={"": OPSET, "ai.onnx.preview.training": 1})
    algo = helper.make_graph([helper.make_node("Add", ["w", "w"], ["w_new"])], "algorithm", [], [_vi("w_new", F, [2])])
    init = helper.make_graph([helper.make_node("Constant", [], ["w_init"], value_floats=[0.0, 0.0])], "init", [], [_vi("w_init", F, [2])])
    m.training_info.append(helper.make_training_info(algo, [("w", "w_new")], init, [("w", "w_init")]))
    out = assert_fidelity(m, expect_checker=None)
    assert len(out.training_info) == 1 and out.training_info[0].algorithm.name == "algorithm"


def _external_model(tmp_path: Path) -> tuple[str, onnx.ModelProto]:
    w = numpy_helper.from_array(_rand(64, 64, seed=6), "w")
    b = numpy_helper.from_array(_rand(64, seed=7), "b")
    small = numpy_helper.from_array(np.arange(4, dtype=np.int64), "small")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"]),
             helper.make_node("Identity", ["small"], ["s"])]
    m = _model(nodes, [_vi("x", F, [2, 64])], [_vi("y", F, [2, 64]), _vi("s", TensorProto.INT64, [4])], initializer=[w, b, small])
    path = os.path.join(tmp_path, "model.onnx")
    inline = onnx.ModelProto()
    inline.CopyFrom(m)  # save_model moves the tensors of `m` out in place
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=128)
    return path, inline


def _clear_default_location(m: onnx.ModelProto) -> None:
    """Normalisation: onnx.load_external_data states data_location=DEFAULT after inlining."""
    for t in m.graph.initializer:
        if t.data_location == TensorProto.DEFAULT:
            t.ClearField("data_location")


def test_external_data_is_memory_mapped_and_embedded_on_export(tmp_path: Path) -> None:
    path, inline = _external_model(str(tmp_path))
    model = graphopt.load(path)
    w = model.graph.initializers["w"].const_value
    assert isinstance(w, ExternalTensor) and w.location == "weights.bin"
    assert isinstance(w.numpy(), np.memmap) or isinstance(w.numpy().base, np.memmap)  # not copied into RAM
    out = graphopt.to_onnx(model)  # no writer: every tensor embedded
    expected = onnx.load(path)  # onnx inlines external data on load
    _clear_default_location(expected)
    _clear_default_location(out)
    assert _ser(out) == _ser(expected), _diff(expected, out)
    x = _rand(2, 64)
    _assert_same_outputs(_ort_run(inline, {"x": x}), _ort_run(out, {"x": x}))


def test_external_data_save_reload(tmp_path: Path) -> None:
    path, inline = _external_model(str(tmp_path))
    model = graphopt.load(path)
    dst = os.path.join(tmp_path, "out")
    os.mkdir(dst)
    # the source had external data: so does the copy
    graphopt.save(model, os.path.join(dst, "copy.onnx"), size_threshold=128)
    saved = onnx.load(os.path.join(dst, "copy.onnx"), load_external_data=False)
    assert {t.name for t in saved.graph.initializer if t.data_location == TensorProto.EXTERNAL} == {"w", "b"}
    again = onnx.load(os.path.join(dst, "copy.onnx"))
    for a, b in zip(onnx.load(path).graph.initializer, again.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    x = _rand(2, 64)
    sess = ort.InferenceSession(os.path.join(dst, "copy.onnx"), providers=["CPUExecutionProvider"])
    _assert_same_outputs(_ort_run(inline, {"x": x}), sess.run(None, {"x": x}))
    # and the graph is unchanged apart from where the bytes live
    reloaded = graphopt.to_onnx(graphopt.load(os.path.join(dst, "copy.onnx")))
    expected = onnx.load(path)
    _clear_default_location(expected)
    _clear_default_location(reloaded)
    assert _ser(reloaded) == _ser(expected)


def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    path, _ = _external_model(str(tmp_path))
    m = onnx.load(path, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../weights.bin"
    with pytest.raises(ExternalDataError, match="outside"):
        graphopt.load(m, base_dir=str(tmp_path))


_LIGHT = sorted(glob.glob(os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "*.onnx")))


@pytest.mark.parametrize("path", _LIGHT, ids=[os.path.basename(p) for p in _LIGHT])
def test_real_models_from_onnx_package_are_byte_identical(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    out = graphopt.to_onnx(graphopt.load(path))
    # byte-identical to the file itself, not just to a re-serialisation of it
    assert _ser(out) == data
    onnx.checker.check_model(out)


def test_light_models_exist() -> None:
    assert len(_LIGHT) >= 5  # the parametrised test above must not silently run zero times


# --- ai.onnx.ml and com.microsoft ops ---------------------------------------------------------


def test_ai_onnx_ml_ops_run() -> None:
    enc = helper.make_node("LabelEncoder", ["label"], ["code"], domain="ai.onnx.ml",
                           keys_strings=["cat", "dog", "bird"], values_int64s=[0, 1, 2], default_int64=-1)
    tree = helper.make_node(
        "TreeEnsembleClassifier", ["feat"], ["cls", "prob"], domain="ai.onnx.ml",
        classlabels_int64s=[10, 20, 30],  # three classes: no binary special case
        nodes_treeids=[0, 0, 0], nodes_nodeids=[0, 1, 2], nodes_featureids=[0, 0, 0],
        nodes_modes=["BRANCH_LEQ", "LEAF", "LEAF"], nodes_values=[0.5, 0.0, 0.0],
        nodes_truenodeids=[1, 0, 0], nodes_falsenodeids=[2, 0, 0],
        nodes_missing_value_tracks_true=[0, 0, 0], nodes_hitrates=[1.0, 1.0, 1.0],
        class_treeids=[0, 0], class_nodeids=[1, 2], class_ids=[0, 2], class_weights=[1.0, 1.0],
        post_transform="NONE",
    )
    m = _model([enc, tree],
               [_vi("label", TensorProto.STRING, [None]), _vi("feat", F, [None, 1])],
               [_vi("code", TensorProto.INT64, [None]), _vi("cls", TensorProto.INT64, [None]), _vi("prob", F, [None, 3])],
               opsets={"": OPSET, "ai.onnx.ml": 3})
    outs = _ort_run(m, {"label": np.array(["dog", "fish"], dtype=object), "feat": np.array([[0.1], [0.9]], np.float32)})
    np.testing.assert_array_equal(outs[0], [1, -1])  # the model really computes something
    np.testing.assert_array_equal(outs[1], [10, 30])
    assert_fidelity(m, {"label": np.array(["dog", "fish", "bird"], dtype=object), "feat": np.array([[0.1], [0.9], [0.5]], np.float32)})


def test_com_microsoft_ops_run() -> None:
    w = numpy_helper.from_array(_rand(4, 3, seed=8), "w")
    nodes = [
        helper.make_node("FusedMatMul", ["x", "w"], ["mm"], domain="com.microsoft", alpha=0.5, transA=0, transB=0),
        helper.make_node("Gelu", ["mm"], ["y"], domain="com.microsoft"),
    ]
    m = _model(nodes, [_vi("x", F, [2, 4])], [_vi("y", F, [2, 3])], initializer=[w], opsets={"": OPSET, "com.microsoft": 1})
    assert_fidelity(m, {"x": _rand(2, 4)}, expect_checker=True)


# --- everything at once ----------------------------------------------------------------------


def test_kitchen_sink() -> None:
    base = _control_flow_model()
    fm = _functions_model()
    doc = _documented_model()
    g = base.graph
    # function call, ml op, ms op, sparse initializer, value_info, metadata, docs, typed narrow tensors
    g.node.extend(doc.graph.node)
    for n in g.node[-3:]:
        n.input[:] = [{"x": "loop_y"}.get(i, i) for i in n.input]
    g.value_info.extend(doc.graph.value_info)
    g.node.append(helper.make_node("Twice", ["scan_final"], ["fn_y"], domain="local.fns", name="fn_call"))
    g.node.append(helper.make_node("Gelu", ["fn_y"], ["ms_y"], domain="com.microsoft"))
    g.node.append(helper.make_node("LabelEncoder", ["label"], ["code"], domain="ai.onnx.ml", keys_strings=["a"], values_int64s=[7], default_int64=0))
    g.node.append(helper.make_node("Add", ["ms_y", "sp"], ["sp_y"]))
    g.input.append(_vi("label", TensorProto.STRING, [None]))
    g.output.extend([_vi("y", F, [3]), _vi("ms_y", F, [3]), _vi("code", TensorProto.INT64, [None]), _vi("sp_y", F, [3])])
    g.sparse_initializer.append(helper.make_sparse_tensor(helper.make_tensor("sp", F, [1], [9.0]), helper.make_tensor("sp_i", TensorProto.INT64, [1], [2]), [3]))
    g.initializer.extend(helper.make_tensor(f"narrow{i}", dt, [2], [1, 0]) for i, dt in enumerate((TensorProto.FLOAT16, TensorProto.INT4, TensorProto.BFLOAT16)))
    g.doc_string = "kitchen sink"
    helper.set_metadata_props(g, {"k": "v"})
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in {"": OPSET, "local.fns": 1, "com.microsoft": 1, "ai.onnx.ml": 3}.items()],
                          ir_version=IR, functions=list(fm.functions), producer_name="kitchen", doc_string="sink")
    helper.set_model_props(m, {"a": "1"})
    algo = helper.make_graph([helper.make_node("Neg", ["w"], ["w2"])], "algo", [], [_vi("w2", F, [3])])
    m.training_info.append(helper.make_training_info(algo, [("w", "w2")], None, None))
    feeds = {"cond": np.array(True), "x": _rand(3), "rows": _rand(4, 3, seed=9), "label": np.array(["a", "b"], dtype=object)}
    assert_fidelity(m, feeds, expect_checker=None)
    model = graphopt.load(m)
    model.verify()
    assert len(list(model.graph.all_nodes())) > len(model.graph)  # subgraph nodes were imported


def test_export_of_a_cloned_model_equals_export_of_the_original() -> None:
    m = _control_flow_model()
    model = graphopt.load(m)
    clone = model.clone()
    assert _ser(graphopt.to_onnx(clone)) == _ser(m)
    assert isinstance(clone, Model) and isinstance(clone.graph, Graph)

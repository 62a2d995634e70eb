"""Bad input gives a graphopt error with a one-line message naming the problem, never a traceback.

Each case builds a broken model (raw protos where onnx.helper would not let us break it), loads
it, and checks: the exception class, that the message is one line, and that it names the node,
value or tensor at fault.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.errors import ExternalDataError, GraphoptError, ModelLoadError, VerifyError

OPSET = [helper.make_opsetid("", 18)]


def _vi(name: str, shape: list[int] | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape or [2])


def _model(nodes: list[onnx.NodeProto], inputs: list[str], outputs: list[str], **kw: object) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [_vi(i) for i in inputs], [_vi(o) for o in outputs], **kw)  # type: ignore[arg-type]
    return helper.make_model(graph, opset_imports=OPSET)


def _good() -> onnx.ModelProto:
    return _model(
        [helper.make_node("Relu", ["x"], ["h"], name="relu0"), helper.make_node("Neg", ["h"], ["y"], name="neg0")],
        ["x"],
        ["y"],
    )


def _expect(exc: type[GraphoptError], fn: Callable[[], object], *needles: str) -> GraphoptError:
    """Run `fn`, require `exc`, a one-line message and every needle in it."""
    with pytest.raises(GraphoptError) as info:
        fn()
    e = info.value
    assert isinstance(e, exc), f"expected {exc.__name__}, got {type(e).__name__}: {e}"
    msg = str(e)
    assert msg and len(msg.splitlines()) == 1, f"message is not one line: {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    # no chained low-level exception that would print as a second traceback
    assert e.__cause__ is None
    return e


# --- files that are not models ------------------------------------------------------------------


def test_good_model_loads() -> None:
    # the baseline the broken variants below are made from really is fine
    m = graphopt.load(_good().SerializeToString())
    assert [n.op_type for n in m.graph] == ["Relu", "Neg"]


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.onnx"
    _expect(ModelLoadError, lambda: graphopt.load(p), "nope.onnx", "no such file")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    _expect(ModelLoadError, lambda: graphopt.load(tmp_path), "folder")


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    _expect(ModelLoadError, lambda: graphopt.load(p), "empty")


@pytest.mark.parametrize(
    "data",
    [b"hello, this is plainly not protobuf\n", b"\xff" * 64, b"\x08", bytes(range(256)), b"PK\x03\x04zipzipzip"],
    ids=["text", "ff", "lone-tag", "ramp", "zip"],
)
def test_non_protobuf(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "junk.onnx"
    p.write_bytes(data)
    _expect(ModelLoadError, lambda: graphopt.load(p), "junk.onnx")
    _expect(ModelLoadError, lambda: graphopt.load(data))


def test_truncated_file(tmp_path: Path) -> None:
    data = _good().SerializeToString()
    # every proper prefix: either a protobuf decode error or a model missing its graph/opsets
    for cut in range(1, len(data)):
        p = tmp_path / "cut.onnx"
        p.write_bytes(data[:cut])
        _expect(ModelLoadError, lambda: graphopt.load(p))


def test_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    p = tmp_path / "locked.onnx"
    p.write_bytes(_good().SerializeToString())
    p.chmod(0)
    _expect(ModelLoadError, lambda: graphopt.load(p), "locked.onnx", "cannot read")


def test_wrong_source_type() -> None:
    _expect(ModelLoadError, lambda: graphopt.load(12345), "int")  # type: ignore[arg-type]


@pytest.mark.parametrize("ir", [0, 1, 2])
def test_ir_version_too_old(ir: int) -> None:
    m = _good()
    m.ir_version = ir
    _expect(ModelLoadError, lambda: graphopt.load(m.SerializeToString()), f"IR version {ir}")


def test_no_opset_import() -> None:
    m = _good()
    del m.opset_import[:]
    _expect(ModelLoadError, lambda: graphopt.load(m), "opset")


def test_unknown_element_type() -> None:
    m = _good()
    m.graph.input[0].type.tensor_type.elem_type = 999
    _expect(ModelLoadError, lambda: graphopt.load(m), "999")


def test_unknown_initializer_type() -> None:
    m = _good()
    t = m.graph.initializer.add(name="w", data_type=777, dims=[1])
    t.raw_data = b"\0"
    _expect(ModelLoadError, lambda: graphopt.load(m), "'w'", "777")


def test_negative_dim_initializer() -> None:
    m = _good()
    m.graph.initializer.add(name="w", data_type=TensorProto.FLOAT, dims=[-3])
    _expect(ModelLoadError, lambda: graphopt.load(m), "'w'", "negative")


# --- broken graphs ------------------------------------------------------------------------------


def test_cycle() -> None:
    m = _model(
        [
            helper.make_node("Add", ["x", "b"], ["a"], name="add_a"),
            helper.make_node("Relu", ["a"], ["b"], name="relu_b"),
            helper.make_node("Neg", ["a"], ["y"], name="neg_y"),
        ],
        ["x"],
        ["y"],
    )
    e = _expect(ModelLoadError, lambda: graphopt.load(m), "cycle")
    assert "add_a" in str(e) or "relu_b" in str(e)


def test_self_loop() -> None:
    m = _model([helper.make_node("Add", ["x", "y"], ["y"], name="selfish")], ["x"], ["y"])
    _expect(ModelLoadError, lambda: graphopt.load(m), "cycle", "selfish", "'y'")


def test_cycle_inside_subgraph() -> None:
    then_g = helper.make_graph(
        [helper.make_node("Add", ["x", "q"], ["p"], name="inner_p"), helper.make_node("Relu", ["p"], ["q"], name="inner_q")],
        "then",
        [],
        [_vi("p")],
    )
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="inner_e")], "else", [], [_vi("e")])
    m = _model(
        [helper.make_node("If", ["c"], ["y"], name="the_if", then_branch=then_g, else_branch=else_g)],
        ["x", "c"],
        ["y"],
    )
    e = _expect(ModelLoadError, lambda: graphopt.load(m), "cycle", "'then'")
    assert "inner_p" in str(e) or "inner_q" in str(e)


def test_dangling_input() -> None:
    m = _model([helper.make_node("Add", ["x", "ghost"], ["y"], name="add0")], ["x"], ["y"])
    _expect(ModelLoadError, lambda: graphopt.load(m), "add0", "'ghost'", "dangling")


def test_dangling_input_inside_subgraph() -> None:
    body = helper.make_graph([helper.make_node("Neg", ["phantom"], ["z"], name="inner_neg")], "then", [], [_vi("z")])
    m = _model(
        [helper.make_node("If", ["c"], ["y"], name="the_if", then_branch=body, else_branch=body)], ["c"], ["y"]
    )
    _expect(ModelLoadError, lambda: graphopt.load(m), "inner_neg", "'phantom'")


def test_subgraph_value_not_visible_outside() -> None:
    # a node of the main graph reading a name defined only inside a subgraph is dangling
    body = helper.make_graph([helper.make_node("Identity", ["x"], ["secret"], name="inner")], "b", [], [_vi("secret")])
    m = _model(
        [
            helper.make_node("If", ["c"], ["r"], name="the_if", then_branch=body, else_branch=body),
            helper.make_node("Add", ["r", "secret"], ["y"], name="peek"),
        ],
        ["x", "c"],
        ["y"],
    )
    _expect(ModelLoadError, lambda: graphopt.load(m), "peek", "'secret'")


def test_undefined_graph_output() -> None:
    m = _good()
    m.graph.output.add().CopyFrom(_vi("nowhere"))
    _expect(ModelLoadError, lambda: graphopt.load(m), "'nowhere'")


def test_duplicate_output_two_nodes() -> None:
    m = _model(
        [helper.make_node("Relu", ["x"], ["y"], name="first"), helper.make_node("Neg", ["x"], ["y"], name="second")],
        ["x"],
        ["y"],
    )
    _expect(ModelLoadError, lambda: graphopt.load(m), "duplicate", "'y'", "second")


def test_duplicate_output_same_node() -> None:
    m = _model([helper.make_node("Split", ["x"], ["y", "y"], name="splitter", axis=0)], ["x"], ["y"])
    _expect(ModelLoadError, lambda: graphopt.load(m), "duplicate", "'y'", "splitter")


def test_node_output_shadows_graph_input() -> None:
    m = _model([helper.make_node("Relu", ["x"], ["x"], name="overwriter")], ["x"], ["x"])
    _expect(ModelLoadError, lambda: graphopt.load(m), "'x'", "overwriter")


def test_node_output_shadows_initializer() -> None:
    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    m = _model([helper.make_node("Relu", ["x"], ["w"], name="clobber"), helper.make_node("Add", ["w", "x"], ["y"])], ["x"], ["y"], initializer=[w])
    _expect(ModelLoadError, lambda: graphopt.load(m), "'w'", "clobber")


def test_duplicate_graph_input() -> None:
    m = _good()
    m.graph.input.add().CopyFrom(_vi("x"))
    _expect(ModelLoadError, lambda: graphopt.load(m), "duplicate", "'x'")


def test_duplicate_initializer() -> None:
    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    m = _model([helper.make_node("Add", ["x", "w"], ["y"])], ["x"], ["y"], initializer=[w, w])
    _expect(ModelLoadError, lambda: graphopt.load(m), "duplicate", "'w'")


def test_nameless_graph_input() -> None:
    m = _good()
    m.graph.input.add().CopyFrom(_vi(""))
    _expect(ModelLoadError, lambda: graphopt.load(m), "without a name")


def test_duplicate_attribute() -> None:
    m = _good()
    m.graph.node[0].attribute.extend([helper.make_attribute("alpha", 1.0), helper.make_attribute("alpha", 2.0)])
    _expect(ModelLoadError, lambda: graphopt.load(m), "relu0", "'alpha'")


def test_attribute_of_unknown_kind() -> None:
    # type=99 cannot be set through the API; in bytes it parses as an attribute with no value
    raw = onnx.AttributeProto(name="weird").SerializeToString() + b"\xa0\x01\x63"  # field 20 (type) = 99
    m = _good()
    m.graph.node[0].attribute.add().ParseFromString(raw)
    _expect(ModelLoadError, lambda: graphopt.load(m.SerializeToString()), "relu0", "'weird'")


def test_attribute_without_value() -> None:
    m = _good()
    m.graph.node[1].attribute.add(name="empty")
    _expect(ModelLoadError, lambda: graphopt.load(m), "neg0", "'empty'", "no value")


def test_function_attribute_default_without_value() -> None:
    f = helper.make_function("my.fns", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], OPSET)
    f.attribute_proto.add(name="dflt")
    m = _model([helper.make_node("F", ["x"], ["y"], domain="my.fns")], ["x"], ["y"])
    m.functions.append(f)
    _expect(ModelLoadError, lambda: graphopt.load(m), "my.fns::F", "'dflt'")


def test_unknown_opset_domain() -> None:
    m = _model([helper.make_node("Frob", ["x"], ["y"], name="frobber", domain="com.nowhere")], ["x"], ["y"])
    # the importer reads it; verification (on by default) refuses the unimported domain
    e = _expect(VerifyError, lambda: graphopt.load(m), "frobber", "'com.nowhere'")
    assert isinstance(e, VerifyError) and e.node is not None and e.node.name == "frobber"
    # declaring the domain makes the same model fine
    m.opset_import.add(domain="com.nowhere", version=1)
    assert graphopt.load(m).graph.nodes[0].domain == "com.nowhere"


def test_control_characters_in_names_stay_one_line() -> None:
    # names come from the file; a newline in one must not split the message
    m = _model([helper.make_node("Op\nType", ["x", "gh\u2028ost"], ["y"], name="evil\r\nnode")], ["x"], ["y"])
    _expect(ModelLoadError, lambda: graphopt.load(m), "evil\\r\\nnode", "gh\\u2028ost")


def test_invalid_utf8_name() -> None:
    data = _good().SerializeToString().replace(b"relu0", b"rel\xff0")
    _expect(ModelLoadError, lambda: graphopt.load(data), "NodeProto.name", "UTF-8")


def test_ref_attr_outside_function() -> None:
    m = _good()
    m.graph.node[0].attribute.add(name="alpha", type=onnx.AttributeProto.FLOAT, ref_attr_name="caller_alpha")
    _expect(ModelLoadError, lambda: graphopt.load(m), "relu0", "'caller_alpha'", "function")


def test_ref_attr_inside_function_is_fine() -> None:
    body = helper.make_node("LeakyRelu", ["a"], ["b"])
    body.attribute.add(name="alpha", type=onnx.AttributeProto.FLOAT, ref_attr_name="slope")
    f = helper.make_function("my.fns", "F", ["a"], ["b"], [body], OPSET, attributes=["slope"])
    m = _model([helper.make_node("F", ["x"], ["y"], domain="my.fns", slope=0.2)], ["x"], ["y"])
    m.opset_import.add(domain="my.fns", version=1)
    m.functions.append(f)
    fn = graphopt.load(m).functions[("my.fns", "F", "")]
    assert fn.graph.nodes[0].attributes["alpha"].ref_attr_name == "slope"


def test_duplicate_function() -> None:
    f = helper.make_function("my.fns", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], OPSET)
    m = _model([helper.make_node("F", ["x"], ["y"], domain="my.fns")], ["x"], ["y"])
    m.functions.extend([f, f])
    _expect(ModelLoadError, lambda: graphopt.load(m), "my.fns::F", "twice")


def test_dangling_input_inside_function() -> None:
    f = helper.make_function("my.fns", "F", ["a"], ["b"], [helper.make_node("Add", ["a", "nothing"], ["b"], name="fadd")], OPSET)
    m = _model([helper.make_node("F", ["x"], ["y"], domain="my.fns")], ["x"], ["y"])
    m.functions.append(f)
    _expect(ModelLoadError, lambda: graphopt.load(m), "my.fns::F", "fadd", "'nothing'")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _nested_if_model(depth: int) -> bytes:
    """If-in-If `depth` deep, built as bytes: the protobuf API itself refuses deep nesting."""
    g = helper.make_graph([helper.make_node("Identity", ["c"], ["o0"])], "g0", [], [_vi("o0")]).SerializeToString()
    else_attr = helper.make_attribute("else_branch", helper.make_graph([helper.make_node("Identity", ["c"], ["e"])], "e", [], [_vi("e")]))
    for d in range(1, depth + 1):
        attr = onnx.AttributeProto(name="then_branch", type=onnx.AttributeProto.GRAPH).SerializeToString() + _field(6, g)
        node = helper.make_node("If", ["c"], [f"o{d}"], name=f"if{d}")
        node.attribute.append(else_attr)
        node_bytes = node.SerializeToString() + _field(5, attr)
        # the outermost graph declares the input "c" every level reads
        inputs = [_vi("c")] if d == depth else []
        g = onnx.GraphProto(name=f"g{d}", input=inputs, output=[_vi(f"o{d}")]).SerializeToString() + _field(1, node_bytes)
    return helper.make_model(onnx.GraphProto(), opset_imports=OPSET).SerializeToString() + _field(7, g)


def test_nested_subgraphs_load() -> None:
    m = graphopt.load(_nested_if_model(20))
    depth, g = 0, m.graph
    while g.nodes and g.nodes[0].op_type == "If":
        g, depth = g.nodes[0].attr("then_branch"), depth + 1
    assert depth == 20


@pytest.mark.parametrize("depth", [200, 1000])
def test_too_deeply_nested_subgraphs(depth: int) -> None:
    # protobuf's nesting limit (or Python's recursion limit) must end as a graphopt error
    _expect(ModelLoadError, lambda: graphopt.load(_nested_if_model(depth)))


# --- external data ------------------------------------------------------------------------------


def _external_model(folder: Path, location: str, *, offset: int = 0, length: int | None = 32) -> Path:
    """A model whose initializer 'w' (8 float32) lives in `location`; returns the model path."""
    folder.mkdir(parents=True, exist_ok=True)
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[8], data_location=TensorProto.EXTERNAL)
    w.external_data.add(key="location", value=location)
    w.external_data.add(key="offset", value=str(offset))
    if length is not None:
        w.external_data.add(key="length", value=str(length))
    m = _model([helper.make_node("Add", ["x", "w"], ["y"], name="adder")], ["x"], ["y"], initializer=[w])
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 8
    p = folder / "model.onnx"
    p.write_bytes(m.SerializeToString())
    return p


DATA = np.arange(8, dtype=np.float32).tobytes()


def test_external_ok(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(DATA)
    p = _external_model(tmp_path / "m", "w.bin")
    m = graphopt.load(p)
    np.testing.assert_array_equal(m.graph.initializers["w"].const_value.numpy(), np.arange(8, dtype=np.float32))


def test_external_subfolder_with_dotdot_that_stays_inside(tmp_path: Path) -> None:
    # "sub/../w.bin" normalises to a file inside the folder: allowed
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "w.bin").write_bytes(DATA)
    p = _external_model(tmp_path / "m", "sub/../w.bin")
    assert graphopt.load(p).graph.initializers["w"].const_value.numpy()[3] == 3.0


def test_external_dotdot_escape(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(DATA)  # exists, but outside the model's folder
    p = _external_model(tmp_path / "m", "../w.bin")
    _expect(ExternalDataError, lambda: graphopt.load(p), "'w'", "'../w.bin'", "outside")


def test_external_deep_dotdot_escape(tmp_path: Path) -> None:
    p = _external_model(tmp_path / "m", "a/../../../../../../etc/passwd")
    _expect(ExternalDataError, lambda: graphopt.load(p), "'w'", "outside")


@pytest.mark.parametrize("location", ["/etc/passwd", "//etc/passwd", "\\etc\\passwd"])
def test_external_absolute(tmp_path: Path, location: str) -> None:
    p = _external_model(tmp_path / "m", location)
    _expect(ExternalDataError, lambda: graphopt.load(p), "'w'", "absolute")


def test_external_nul_in_location(tmp_path: Path) -> None:
    p = _external_model(tmp_path / "m", "w.bin\x00../../etc/passwd")
    _expect(ExternalDataError, lambda: graphopt.load(p), "'w'")


def test_external_symlink_escape(tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(DATA)
    (tmp_path / "m").mkdir()
    os.symlink(tmp_path / "secret.bin", tmp_path / "m" / "w.bin")
    p = _external_model(tmp_path / "m", "w.bin")
    _expect(ExternalDataError, lambda: graphopt.load(p), "'w'", "outside")


def test_external_symlinked_folder_escape(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "w.bin").write_bytes(DATA)
    (tmp_path / "m").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "m" / "sub")
    p = _external_model(tmp_path / "m", "sub/w.bin")
    _expect(ExternalDataError, lambda: graphopt.load(p), "'w'", "outside")


def test_external_missing_file(tmp_path: Path) -> None:
    p = _external_model(tmp_path / "m", "gone.bin")
    _expect(ExternalDataError, lambda: graphopt.load(p), "'w'", "'gone.bin'", "not found")


def test_external_location_is_folder(tmp_path: Path) -> None:
    (tmp_path / "m" / "adir").mkdir(parents=True)
    p = _external_model(tmp_path / "m", "adir")
    _expect(ExternalDataError, lambda: graphopt.load(p), "'w'", "'adir'")


def test_external_too_short(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(DATA[:20])
    p = _external_model(tmp_path / "m", "w.bin")
    _expect(ExternalDataError, lambda: graphopt.load(p), "'w'", "'w.bin'", "20")


def test_external_too_short_without_length(tmp_path: Path) -> None:
    # no length key: the tensor's shape says 32 bytes are needed
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(DATA[:12])
    p = _external_model(tmp_path / "m", "w.bin", length=None)
    _expect(ExternalDataError, lambda: graphopt.load(p), "'w'", "12")


def test_external_offset_past_end(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(DATA)
    p = _external_model(tmp_path / "m", "w.bin", offset=16)
    _expect(ExternalDataError, lambda: graphopt.load(p), "'w'", "'w.bin'")


def test_external_length_disagrees_with_shape(tmp_path: Path) -> None:
    # the file is long enough but `length` is not what 8 float32 need: caught when read
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(DATA * 2)
    p = _external_model(tmp_path / "m", "w.bin", length=36)
    try:
        t = graphopt.load(p).graph.initializers["w"].const_value
    except ExternalDataError as e:  # refusing at load is fine too
        assert "'w'" in str(e) and "\n" not in str(e)
        return
    _expect(ExternalDataError, t.numpy, "'w'", "36")


@pytest.mark.parametrize("key,value", [("offset", "abc"), ("length", "1e3"), ("offset", "-4")])
def test_external_bad_offset_or_length(tmp_path: Path, key: str, value: str) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(DATA)
    p = _external_model(tmp_path / "m", "w.bin")
    m = onnx.load(p, load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == key:
            e.value = value
    p.write_bytes(m.SerializeToString())
    _expect(ExternalDataError, lambda: graphopt.load(p), "'w'")


def test_external_without_location(tmp_path: Path) -> None:
    p = _external_model(tmp_path / "m", "")
    _expect(ExternalDataError, lambda: graphopt.load(p), "'w'", "location")


def test_external_from_bytes_needs_base_dir(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(DATA)
    data = _external_model(tmp_path / "m", "w.bin").read_bytes()
    _expect(ExternalDataError, lambda: graphopt.load(data), "'w'", "base_dir")
    # with the folder given, the same bytes load
    m = graphopt.load(data, base_dir=tmp_path / "m")
    assert m.graph.initializers["w"].const_value.numpy()[7] == 7.0


def test_external_escape_is_refused_even_without_verify(tmp_path: Path) -> None:
    # path checks are part of import, not of the optional verification
    (tmp_path / "w.bin").write_bytes(DATA)
    p = _external_model(tmp_path / "m", "../w.bin")
    _expect(ExternalDataError, lambda: graphopt.load(p, verify=False), "outside")


# --- errors raised after a successful load ------------------------------------------------------


def test_corrupt_raw_data_is_reported_on_use() -> None:
    m = _good()
    t = m.graph.initializer.add(name="w", data_type=TensorProto.FLOAT, dims=[4])
    t.raw_data = b"\0" * 10  # 4 floats need 16 bytes
    loaded = graphopt.load(m)
    _expect(ModelLoadError, loaded.graph.initializers["w"].const_value.numpy, "'w'")


def test_save_into_missing_folder(tmp_path: Path) -> None:
    m = graphopt.load(_good())
    _expect(GraphoptError, lambda: graphopt.save(m, tmp_path / "no" / "such" / "m.onnx"), "does not exist")


@pytest.mark.parametrize("location", ["../out.data", "/tmp/out.data"])
def test_save_refuses_escaping_location(tmp_path: Path, location: str) -> None:
    m = graphopt.load(_good())
    _expect(GraphoptError, lambda: graphopt.save(m, tmp_path / "m.onnx", external_data=True, location=location), "location")
    assert not list(tmp_path.iterdir())


def test_sparse_initializer_with_a_negative_dimension() -> None:
    """Found by the structure fuzzer: it loaded, and reading the dense array raised numpy's
    ValueError."""
    sp = helper.make_sparse_tensor(helper.make_tensor("sp", TensorProto.FLOAT, [2], [1.0, 2.0]),
                                   helper.make_tensor("sp_i", TensorProto.INT64, [2], [0, 3]), [4, -1])
    m = _model([helper.make_node("Add", ["x", "sp"], ["y"], name="add0")], ["x"], ["y"], sparse_initializer=[sp])
    with pytest.raises(ModelLoadError) as e:
        graphopt.load(m)
    assert "negative dimension" in str(e.value) and "'sp'" in str(e.value) and len(str(e.value).splitlines()) == 1

"""The textual IR: hand-written text → graph, printed text, every attribute kind, subgraphs,
functions, special floats and exotic dtypes, parse errors with line/col, structural diffs."""

from __future__ import annotations

import math
import struct

import numpy as np
import onnx
import pytest
from onnx import helper as oh

import graphopt
from graphopt.errors import ParseError
from graphopt.ir import AttrType, DataType, MapType, NumpyTensor, OpaqueType, OptionalType, SequenceType, Shape
from graphopt.ir import SparseTensorType, TensorType, Value
from graphopt.ir.compare import assert_equal, structural_diff
from graphopt.ir.parser import parse_graph, parse_model
from graphopt.ir.printer import print_graph, print_model


def roundtrip(m: graphopt.Model) -> graphopt.Model:
    """print → parse must be structurally equal, and print → parse → print a fixed point."""
    text = print_model(m)
    back = parse_model(text)
    assert_equal(m, back)
    assert print_model(back) == text
    return back


# --- text → graph ------------------------------------------------------------------------------
def test_small_graph_parses_into_a_verified_model() -> None:
    m = parse_graph(
        """
        main (float[N,3] X) => (float[N,3] Y) <float[3] b = {1, 2, 3}> {
          [relu1] T = Relu(X)
          Y = Add(T, b)
        }
        """
    )
    m.verify()
    assert m.opset_imports == {"": 21}
    relu, add = m.graph.nodes
    assert (relu.name, relu.op_type, add.op_type) == ("relu1", "Relu", "Add")
    assert add.inputs[0] is relu.outputs[0]
    assert add.inputs[1] is m.graph.initializers["b"]
    assert m.graph.inputs[0].type == TensorType(DataType.FLOAT, Shape(("N", 3)))
    assert m.graph.outputs[0] is add.outputs[0]
    np.testing.assert_array_equal(m.graph.initializers["b"].const_value.numpy(), np.array([1, 2, 3], np.float32))


def test_header_opsets_and_auto_imported_domains() -> None:
    m = parse_graph("g (float X) => (Y) { Y = com.acme.Foo(X) }", opset=18)
    assert m.opset_imports == {"": 18, "com.acme": 1}
    m2 = parse_model('<ir_version: 9, opset_import: ["" : 17, "com.acme" : 3], producer_name: "me"> g (float X) => (Y) { Y = com.acme.Foo(X) }')
    assert (m2.ir_version, m2.opset_imports, m2.producer_name) == (9, {"": 17, "com.acme": 3}, "me")


def test_comments_and_attributes_before_inputs_are_accepted() -> None:
    m = parse_graph(
        """
        # ONNX's own order (attributes before inputs) parses too
        g (float[2,3] X) => (Y) {
          Y = Transpose <perm = [1, 0]> (X)   # trailing comment
        }
        """
    )
    assert m.graph.nodes[0].attr("perm") == [1, 0]


def test_printed_text_is_readable_onnx_like() -> None:
    x = oh.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])
    y = oh.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)
    w = oh.make_tensor("W", onnx.TensorProto.FLOAT, [4, 3, 1, 1], np.ones(12, np.float32))
    node = oh.make_node("Conv", ["X", "W"], ["Y"], name="conv1", strides=[2, 2])
    proto = oh.make_model(oh.make_graph([node], "net", [x], [y], [w]), opset_imports=[oh.make_opsetid("", 21)])
    text = print_model(graphopt.load(proto))
    assert "net (float[N,3,8,8] X) => (float Y)" in text
    assert "[conv1] Y = Conv(X, W) <strides = [2, 2]>" in text
    assert 'opset_import: ["" : 21]' in text
    assert "float[4,3,1,1] W = {1.0, 1.0" in text
    elided = print_model(graphopt.load(proto), elide_tensors_over=4)
    assert "float[4,3,1,1] W = <elided 12 values>" in elided
    with pytest.raises(ParseError, match="elided"):
        parse_model(elided)


def test_print_graph_prints_one_graph_without_header() -> None:
    m = parse_graph("g (float X) => (Y) { Y = Neg(X) }")
    text = print_graph(m.graph)
    assert text.startswith("g (float X) => (Y)")
    assert "ir_version" not in text
    assert_equal(m, parse_graph(text))


# --- everything the IR holds -------------------------------------------------------------------
ALL_KINDS = """
<ir_version: 10, opset_import: ["" : 21, "x" : 1]>
g (float[N] X) => (Y) {
  Y = x.Op(X) <
    f = 1.5, fneg = -0.0, fnan = nan, finf = -inf, i = -7, s = "text \\"q\\"\\n", b = b"\\xff\\x00",
    t = float[2] tname {1.0, 2.5},
    g = body (float[] Z) => (W) { W = Add(Z, X) },
    fs = [1.0, 2], is = [1, 2, 3], ss = ["a", b"\\xfe"],
    ts = [int64[] {3}, bool[2] {1, 0}],
    gs = [a () => (X) {}, "" () => (X) {}],
    sp = sparse(float[2] {1, 2}, int64[2] {0, 3}, [2, 2]),
    sps: sparse_tensors = [],
    tp = type(seq(map(int64, optional(float[N,?])))),
    tps = [type(opaque("dom", "nm")), type(sparse(int8[3])), type(?)],
    empty: ints = [] @doc("attr doc")
  >
}
"""


def test_every_attribute_kind_parses_with_its_value() -> None:
    m = parse_model(ALL_KINDS)
    n = m.graph.nodes[0]
    kinds = {k: a.type for k, a in n.attributes.items()}
    assert kinds == {
        "f": AttrType.FLOAT, "fneg": AttrType.FLOAT, "fnan": AttrType.FLOAT, "finf": AttrType.FLOAT,
        "i": AttrType.INT, "s": AttrType.STRING, "b": AttrType.STRING, "t": AttrType.TENSOR,
        "g": AttrType.GRAPH, "fs": AttrType.FLOATS, "is": AttrType.INTS, "ss": AttrType.STRINGS,
        "ts": AttrType.TENSORS, "gs": AttrType.GRAPHS, "sp": AttrType.SPARSE_TENSOR,
        "sps": AttrType.SPARSE_TENSORS, "tp": AttrType.TYPE_PROTO, "tps": AttrType.TYPE_PROTOS,
        "empty": AttrType.INTS,
    }  # fmt: skip
    assert math.copysign(1.0, n.attr("fneg")) == -1.0 and math.isnan(n.attr("fnan")) and n.attr("finf") == -math.inf
    assert n.attr("s") == 'text "q"\n' and n.attr("b") == b"\xff\x00"
    assert n.attr("fs") == [1.0, 2.0] and all(isinstance(v, float) for v in n.attr("fs"))
    assert n.attr("ss") == ["a", b"\xfe"]
    assert n.attr("t").name == "tname" and n.attr("t").numpy().tolist() == [1.0, 2.5]
    assert n.attr("tp") == SequenceType(MapType(DataType.INT64, OptionalType(TensorType(DataType.FLOAT, Shape(("N", None))))))
    assert n.attr("tps") == [OpaqueType("dom", "nm"), SparseTensorType(DataType.INT8, Shape((3,))), None]
    np.testing.assert_array_equal(n.attr("sp").numpy(), np.array([[1, 0], [0, 2]], np.float32))
    assert n.attributes["empty"].doc_string == "attr doc"
    body = n.attr("g")
    assert body.parent is n and body.nodes[0].inputs[1] is m.graph.inputs[0]  # an outer value
    assert [g.name for g in n.attr("gs")] == ["a", ""]
    roundtrip(m)
    # and the ONNX export carries it all too
    assert_equal(m, graphopt.load(graphopt.to_onnx(m)))


def test_docs_metadata_types_and_names_everywhere_round_trip() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 21], producer_name: "p", producer_version: "1", domain: "d",
     model_version: 7, doc_string: "model doc", metadata_props: {"mk": "mv"}>
    "my graph" @doc("graph doc") @meta("gk": "gv") @quant("X": {"SCALE_TENSOR": "s"})
      (float[N @den("DATA_BATCH"),3] @den("IMAGE") X @doc("in doc") @meta("ik": "iv"), int64[2] "shape in")
      => (float[?,"a+b"] "out/0" @doc("out doc"))
      <seq(float) "mid value" @doc("mid doc") @meta("vk": "vv"), float[2] w = @doc("tensor doc") {0.5, 0.25}>
    {
      ["conv 1"] "mid value" = Foo:v2(X, "", w) <a = 1> @doc("node doc") @meta("nk": "nv")
      "out/0", "" = Bar("mid value", "shape in")
    }
    """
    m = parse_graph(text)
    g = m.graph
    assert (m.doc_string, m.metadata_props, m.model_version) == ("model doc", {"mk": "mv"}, 7)
    assert (g.name, g.doc_string, g.metadata_props) == ("my graph", "graph doc", {"gk": "gv"})
    assert g.quantization_annotation == [("X", {"SCALE_TENSOR": "s"})]
    x = g.inputs[0]
    assert x.type.shape.denotations == ("DATA_BATCH", "") and x.type.denotation == "IMAGE"
    assert (x.doc_string, x.metadata_props) == ("in doc", {"ik": "iv"})
    foo, bar = g.nodes
    assert (foo.name, foo.overload, foo.doc_string, foo.metadata_props) == ("conv 1", "v2", "node doc", {"nk": "nv"})
    assert foo.inputs[1] is None  # omitted optional input
    mid = foo.outputs[0]
    assert (mid.name, mid.type, mid.doc_string) == ("mid value", SequenceType(TensorType(DataType.FLOAT)), "mid doc")
    assert len(bar.outputs) == 2 and bar.outputs[1].name == ""  # omitted optional output
    assert g.initializers["w"].const_value.doc_string == "tensor doc"
    assert g.outputs[0].type == TensorType(DataType.FLOAT, Shape((None, "a+b")))
    back = roundtrip(m)
    assert_equal(back, graphopt.load(graphopt.to_onnx(m)))


def test_unnamed_values_print_as_temporaries() -> None:
    m = parse_graph("g (float X) => (Y) { Y = Relu(X) }")
    relu = m.graph.nodes[0]
    hidden = Value("")  # a value a pass has not named yet
    from graphopt.ir import Node

    neg = Node("", "Neg", [X := m.graph.inputs[0]], outputs=[hidden])
    m.graph.insert_before(relu, neg)
    relu.replace_input_with(0, hidden)
    assert X is m.graph.inputs[0]
    text = print_model(m)
    assert "$0 = Neg(X)" in text and "Y = Relu($0)" in text
    back = roundtrip(m)
    assert back.graph.nodes[0].outputs[0].name == ""


def test_subgraphs_read_outer_values_and_nest() -> None:
    m = parse_graph(
        """
        main (bool c, float[N] X) => (float[N] Y) {
          S = Sigmoid(X)
          Y = If(c) <
            then_branch = then_g () => (float[N] A) {
              A = If(c) <then_branch = inner () => (B) { B = Mul(S, X) }, else_branch = inner2 () => (S) {}>
            },
            else_branch = else_g () => (X) {}
          >
        }
        """
    )
    s = m.graph.nodes[0].outputs[0]
    then_g = m.graph.nodes[1].attr("then_branch")
    inner = then_g.nodes[0].attr("then_branch")
    assert inner.nodes[0].inputs == (s, m.graph.inputs[1])
    assert then_g.nodes[0].attr("else_branch").outputs == [s]
    assert m.graph.nodes[1].attr("else_branch").outputs == [m.graph.inputs[1]]
    roundtrip(m)


def test_function_with_attribute_params_defaults_and_references() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 21, "local" : 1]>
    main (float[N] X) => (Y) {
      Y = local.act(X) <alpha = 0.5>
    }
    <domain: "local", opset_import: ["" : 21], doc_string: "fn doc">
    act <alpha, beta = 2.0 @doc("default doc"), gamma: ints = []> (float[N] A) => (B) <float[N] T> {
      T = LeakyRelu(A) <alpha: float = @alpha>
      B = Mul(T, A)
    }
    """
    m = parse_model(text)
    f = m.functions[("local", "act", "")]
    assert list(f.attributes) == ["alpha", "beta", "gamma"]
    assert f.attributes["alpha"] is None
    assert (f.attributes["beta"].type, f.attributes["beta"].value, f.attributes["beta"].doc_string) == (AttrType.FLOAT, 2.0, "default doc")
    assert f.attributes["gamma"].type == AttrType.INTS and f.attributes["gamma"].value == []
    ref = f.graph.nodes[0].attributes["alpha"]
    assert (ref.ref_attr_name, ref.type, ref.value) == ("alpha", AttrType.FLOAT, None)
    assert f.graph.nodes[0].outputs[0].type == TensorType(DataType.FLOAT, Shape(("N",)))
    assert f.doc_string == "fn doc"
    roundtrip(m)
    imported = graphopt.load(graphopt.to_onnx(m))
    assert_equal(m, imported)
    from graphopt.testing import assert_same_outputs

    out = assert_same_outputs(m, imported, {"X": np.array([-2.0, 3.0], np.float32)})
    np.testing.assert_allclose(out[0], [2.0, 9.0])  # leaky(-2)*-2 = (-1)*-2, 3*3


# --- tensors: special floats and every dtype --------------------------------------------------
def test_special_floats_round_trip_bit_exactly() -> None:
    vals = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, 3.4028235e38, 0.1], np.float32)
    nan_payload = struct.unpack("<f", b"\x01\x00\xc0\x7f")[0]  # a NaN with a payload
    weird = np.frombuffer(struct.pack("<f", nan_payload), np.float32)
    m = parse_graph("g (float X) => (X) {}")
    with np.errstate(over="ignore"):  # 3.4e38 becomes inf in float16, on purpose
        half = vals.astype(np.float16)
    for i, arr in enumerate([vals, weird, vals.astype(np.float64), half]):
        v = Value(f"c{i}", TensorType(DataType.from_numpy(arr.dtype), Shape(arr.shape)), const_value=NumpyTensor(arr))
        m.graph.register_initializer(v)
    text = print_model(m)
    assert "{nan, inf, -inf, -0.0, 0.0, 1e-45, 3.4028235e+38, 0.1}" in text
    back = roundtrip(m)
    for i in range(4):
        assert back.graph.initializers[f"c{i}"].const_value.tobytes() == m.graph.initializers[f"c{i}"].const_value.tobytes()
    assert "0x0100c07f" in text  # the payload NaN falls back to raw bytes


@pytest.mark.parametrize(
    "dtype",
    [DataType.BFLOAT16, DataType.FLOAT8E4M3FN, DataType.FLOAT8E5M2FNUZ, DataType.INT4, DataType.UINT4,
     DataType.FLOAT4E2M1, DataType.COMPLEX64, DataType.UINT64, DataType.BOOL, DataType.STRING],
)  # fmt: skip
def test_every_dtype_round_trips(dtype: DataType) -> None:
    if dtype == DataType.STRING:
        arr = np.array(["a", b"\xff", "", "x\x00"], dtype=object)
    elif dtype in (DataType.INT4, DataType.UINT4, DataType.FLOAT4E2M1):
        arr = np.array([1, 2, 3], dtype=dtype.numpy())  # an odd count: a half-filled last byte
    elif dtype == DataType.BOOL:
        arr = np.array([True, False, True])
    elif dtype == DataType.UINT64:
        arr = np.array([0, 2**64 - 1], np.uint64)
    else:
        arr = np.frombuffer(bytes(range(8 * dtype.numpy().itemsize)), dtype=dtype.numpy())
    m = parse_graph("g () => () {}")
    v = Value("t", TensorType(dtype, Shape(arr.shape)), const_value=NumpyTensor(arr, dtype=dtype))
    m.graph.register_initializer(v)
    m.graph.outputs = [v]
    back = roundtrip(m)
    bt = back.graph.initializers["t"].const_value
    assert bt.dtype == dtype and bt.shape == arr.shape
    assert_equal(m, graphopt.load(graphopt.to_onnx(m)))


def test_hex_payload_of_the_wrong_size_is_an_error() -> None:
    with pytest.raises(ParseError, match=r"line 1, col \d+: hex payload has 1 bytes; bfloat16\[2\] needs 4"):
        parse_graph("g () => (t) <bfloat16[2] t = 0x00> {}")


def test_sparse_initializer_and_input_with_default_round_trip() -> None:
    m = parse_graph(
        """
        g (float[3] D) => (S, D)
          <sparse(float[2,3]) S = sparse(float[2] {1, 2}, int64[2,2] idx {0, 1, 1, 2}, [2, 3]), D = float[3] {7, 8, 9}>
        {}
        """
    )
    s = m.graph.initializers["S"]
    np.testing.assert_array_equal(s.const_value.numpy(), np.array([[0, 1, 0], [0, 0, 2]], np.float32))
    d = m.graph.inputs[0]
    assert d.is_initializer() and d.const_value.numpy().tolist() == [7, 8, 9]
    roundtrip(m)
    assert_equal(m, graphopt.load(graphopt.to_onnx(m)))


# --- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("g (float X) => (Y) {\n  Y = Relu(Z)\n}", "line 2, col 12", "input 'Z' is not defined"),
        ("g (flot X) => (Y) {}", "line 1, col 9", "expected ')' closing the graph inputs, found 'X'"),
        ("g (float X) => (Y) {}", "line 1, col 17", "graph output 'Y' is not defined"),
        ("g (float[N X) => (Y) {}", "line 1, col 12", "expected ']'"),
        ('g (float X) => (Y) {\n  Y = Foo(X) <s = "abc>\n}', "line 2, col 19", "unterminated string"),
        ("g (float X) => (Y) {\n Y = Relu(X)\n Y = Neg(X)\n}", "line 3, col 2", "value 'Y' is defined twice"),
        ("g (float X) => (Y) {\n  Y = Foo(X) <a = []>\n}", "line 2, col 19", "empty list is ambiguous"),
        ("g (float X) => (Y) {\n  Y = Foo(X) <a: ints = [1.5]>\n}", "line 2, col 26", "1.5 is not an integer"),
        ("g (float X) => (Y) {\n  Y = Relu(X)", "line 2, col 14", "end of input"),
        ("g (float X) => (Y) { Y = Foo(X) <a = @b> }", "line 1, col 40", "needs its kind"),
        ("g () => (t) <float[2] t = {1}> {}", "line 1, col 27", "1 values for shape [2]"),
        ("g (float X) => (Y) { Y = Relu(X) } junk", "line 1, col 36", "expected a function"),
        ("g (float X) => (X) { ~ }", "line 1, col 22", "unexpected character '~'"),
        ('<ir_version: 10, bogus: 1> g () => () {}', "line 1, col 18", "unknown model header key 'bogus'"),
    ],
)
def test_parse_errors_say_line_and_column(text: str, where: str, message: str) -> None:
    with pytest.raises(ParseError) as e:
        parse_graph(text)
    assert str(e.value).startswith(where), str(e.value)
    assert message in str(e.value)


def test_verify_failure_is_reported_at_the_node() -> None:
    # a node reading a value produced further down: text order is kept, so verify rejects it
    with pytest.raises(ParseError, match=r"line 3, col 3: .*reads 'B' before node"):
        parse_graph("g (float X) => (C) {\n  C = Neg(X)\n  A = Relu(B)\n  B = Abs(X)\n}")


# --- structural comparison ---------------------------------------------------------------------
BASE = """
g (float[N,3,8,8] X, float[4,3,3,3] W) => (Y) {
  [conv1] C = Conv(X, W) <strides = [1, 1]>
  Y = Relu(C)
}
"""


def test_structural_diff_equal_models() -> None:
    assert structural_diff(parse_graph(BASE), parse_graph(BASE)) is None
    assert_equal(parse_graph(BASE), parse_graph(BASE))


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        (BASE.replace("[1, 1]", "[2, 2]"), "graph.node[0] 'conv1' (Conv): attribute 'strides' [1, 1] != [2, 2]"),
        (BASE.replace("Relu(C)", "Relu(X)"), "graph.node[1] (Relu): input 0 graph.node[0] output 0 ('C') != graph input 0 ('X')"),
        (BASE.replace("[conv1] ", ""), "graph.node[0] 'conv1' (Conv): name 'conv1' != ''"),
        (BASE.replace("float[N,3,8,8]", "float[M,3,8,8]"), "graph.input[0]: type of 'X' float[N,3,8,8] != float[M,3,8,8]"),
        (BASE.replace("  Y = Relu(C)\n", "  Y = Relu(C)\n  Z = Neg(Y)\n"), "graph: number of nodes 2 != 3 (node[2] (Neg) only in the second)"),
    ],
)
def test_structural_diff_names_the_first_difference(changed: str, expected: str) -> None:
    assert structural_diff(parse_graph(BASE), parse_graph(changed)) == expected
    with pytest.raises(AssertionError, match="graph"):
        assert_equal(parse_graph(BASE), parse_graph(changed))


def test_structural_diff_tensor_bytes_and_nan() -> None:
    a = parse_graph("g () => (t) <float[2] t = {nan, 1}> {}")
    assert structural_diff(a, parse_graph("g () => (t) <float[2] t = {nan, 1}> {}")) is None
    d = structural_diff(a, parse_graph("g () => (t) <float[2] t = {nan, 2}> {}"))
    assert d is not None and d.startswith("graph.initializer 't': values differ (float[2]: first at byte 6")
    d = structural_diff(a, parse_graph("g () => (t) <float[2] t = {-0.0, 1}> {}"))
    assert d is not None and "values differ" in d


def test_structural_diff_functions_and_subgraphs() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 21, "l" : 1]>
    g (bool c, float X) => (Y) { Y = If(c) <then_branch = t () => (A) { A = l.f(X) }, else_branch = e () => (X) {}> }
    <domain: "l", opset_import: ["" : 21]>
    f (P) => (Q) { Q = Neg(P) }
    """
    a = parse_model(text)
    assert structural_diff(a, parse_model(text.replace("Q = Neg(P)", "Q = Abs(P)"))) == "function l::f.node[0] (Neg): op_type 'Neg' != 'Abs'"
    assert structural_diff(a, parse_model(text.replace("A = l.f(X)", "A = l.f(c)"))) == (
        "graph.node[0] (If).then_branch.node[0] (f): input 0 graph input 1 ('X') != graph input 0 ('c')"
    )

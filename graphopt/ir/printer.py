"""The textual IR: print a Model or Graph in an extension of ONNX's textual syntax.

The text carries everything the IR holds, so `parse_model(print_model(m))` is structurally equal
to `m` (see `graphopt.ir.compare`). The syntax is ONNX's (`onnx.printer.to_text`), extended:

    <ir_version: 10, opset_import: ["" : 21], doc_string: "...", metadata_props: {"k": "v"}>
    main @doc("graph doc") (float[N,3] X @doc("input doc")) => (float[N,3] Y)
      <float[2] w = {1, 2}, float[N,3] T>          # initializers, then types of other values
    {
      [relu1] T = Relu(X) @doc("node doc") @meta("k": "v")
      Y = com.acme.Foo:overload(T, "", w) <alpha = 1.0, ks: ints = []>
    }
    <domain: "local", opset_import: ["" : 21]>
    f <alpha, beta = 2.0> (A) => (B) { B = Mul(A, A) <x: float = @alpha> }

- `float` is a tensor of unknown rank, `float[]` a scalar, `?` an unknown dim, `N` or `"a+b"`
  a symbolic one; `seq(..)`, `optional(..)`, `map(int64, ..)`, `sparse(float[2])`,
  `opaque("dom", "name")` the other types; `@den("..")` after a type or dim is its denotation.
- Names that are not plain identifiers (or are keywords) are quoted; an unnamed value prints as
  `$k`; an omitted optional input as `""`.
- Attribute kinds are inferred from the literal (`1` int, `1.0` float, `"s"` string, `b"\\xff"`
  non-utf8 bytes, `[..]` lists, `float[2] {..}` tensor, `name (..) => (..) {..}` graph,
  `sparse(values, indices, [dims])`, `type(float[N])`); `name: kind = value` when they cannot be.
- Tensor payloads print as decimal lists when that round-trips byte-exactly (nan, inf, -0.0
  included); otherwise (bfloat16, float8, int4, nan payloads, complex...) as the hex of the
  packed little-endian bytes, e.g. `bfloat16[2] {0x3f80 ...}` is written `0x803f0040`.
"""

from __future__ import annotations

import math
import re
import numpy as np

from graphopt.ir.core import Attr, AttrType, Function, Graph, Model, Node, Value
from graphopt.ir.tensor import ProtoTensor, SparseTensor, Tensor
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

_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: Words that start a type or a special literal; names spelled like them are quoted.
TYPE_WORDS = frozenset(dt.text for dt in DataType) | {"seq", "optional", "map", "sparse", "opaque"}
KEYWORDS = TYPE_WORDS | {"type", "nan", "inf"}
#: dtypes whose payload prints as decimal numbers (others print as raw hex).
_DECIMAL = frozenset(
    {
        DataType.FLOAT, DataType.DOUBLE, DataType.FLOAT16, DataType.INT8, DataType.INT16, DataType.INT32,
        DataType.INT64, DataType.UINT8, DataType.UINT16, DataType.UINT32, DataType.UINT64, DataType.BOOL,
    }
)
_DEFAULT_HEADER = {"ir_version": 10}


def print_model(model: Model, *, elide_tensors_over: int | None = None) -> str:
    """The model as text. Tensors with more than `elide_tensors_over` elements print as
    `<elided N values>` (readable, but such text no longer parses)."""
    p = _Printer(elide_tensors_over)
    return p.model(model)


def print_graph(graph: Graph, *, elide_tensors_over: int | None = None) -> str:
    """One graph (no model header); values of enclosing graphs print as plain references."""
    p = _Printer(elide_tensors_over)
    p.graph(graph, 0)
    return "\n".join(p.lines) + "\n"


# --- literals ----------------------------------------------------------------------------------
def quote(s: str | bytes) -> str:
    """A string literal: `"..."` for text, `b"..."` for bytes (non-utf8 payloads)."""
    if isinstance(s, bytes):
        out = []
        for b in s:
            c = chr(b)
            if c == '"' or c == "\\":
                out.append("\\" + c)
            elif 0x20 <= b < 0x7F:
                out.append(c)
            else:
                out.append(f"\\x{b:02x}")
        return 'b"' + "".join(out) + '"'
    out = []
    for c in s:
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c == "\r":
            out.append("\\r")
        elif c.isprintable() and not (0xD800 <= ord(c) <= 0xDFFF):
            out.append(c)
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


def name(s: str) -> str:
    """A name as an identifier when it is one (and no keyword), else quoted."""
    return s if _ID.match(s) and s not in KEYWORDS else quote(s)


def format_float(x: float) -> str:
    """A Python float that parses back to exactly the same double."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(float(x))


def format_type(t: Type | None) -> str:
    if t is None:
        return "?"
    den = f" @den({quote(t.denotation)})" if t.denotation else ""
    if isinstance(t, TensorType):
        return t.dtype.text + _shape(t.shape) + den
    if isinstance(t, SparseTensorType):
        return f"sparse({t.dtype.text}{_shape(t.shape)}){den}"
    if isinstance(t, SequenceType):
        return f"seq({format_type(t.elem)}){den}"
    if isinstance(t, OptionalType):
        return f"optional({format_type(t.elem)}){den}"
    if isinstance(t, MapType):
        return f"map({t.key.text}, {format_type(t.value)}){den}"
    if isinstance(t, OpaqueType):
        return f"opaque({quote(t.domain)}, {quote(t.name)}){den}"
    raise TypeError(f"cannot print type {t!r}")


def _shape(s: Shape | None) -> str:
    if s is None:
        return ""
    parts = []
    for i, d in enumerate(s.dims):
        txt = "?" if d is None else str(d) if isinstance(d, int) else name(d)
        if s.denotations is not None and s.denotations[i]:
            txt += f" @den({quote(s.denotations[i])})"
        parts.append(txt)
    return "[" + ",".join(parts) + "]"


def _annotations(doc: str, meta: dict[str, str]) -> str:
    out = ""
    if doc:
        out += f" @doc({quote(doc)})"
    if meta:
        out += " @meta(" + ", ".join(f"{quote(k)}: {quote(v)}" for k, v in meta.items()) + ")"
    return out


def tensor_body(t: Tensor) -> str:
    """`{1, 2, nan}` when decimal text round-trips byte-exactly, else `0x<packed bytes>`."""
    if t.dtype == DataType.STRING:
        return "{" + ", ".join(quote(s) for s in string_elements(t)) + "}"
    arr = t.numpy()
    if arr.size == 0:
        return "{}"
    if t.dtype in _DECIMAL:
        flat = arr.ravel()
        if t.dtype == DataType.BOOL:
            items = ["1" if x else "0" for x in flat.tolist()]
        elif t.dtype.is_floating:
            items = [_float_item(x) for x in flat]
        else:
            items = [str(x) for x in flat.tolist()]
        # the parser builds the array with np.array(values, dtype); check it gives the same bytes
        from graphopt.ir.parser import decimal_array

        try:
            back = decimal_array(items, t.dtype, arr.shape)
            if back.tobytes() == np.ascontiguousarray(arr).astype(back.dtype, copy=False).tobytes():
                return "{" + ", ".join(items) + "}"
        except (ValueError, OverflowError):
            pass
    return "0x" + t.tobytes().hex()


def string_elements(t: Tensor) -> list[str | bytes]:
    """The elements of a string tensor, flat. Read from the protobuf when there is one:
    numpy's fixed-width bytes (used by onnx's `to_array`) drop trailing NUL bytes."""
    if isinstance(t, ProtoTensor) and t.proto.data_location == 0:
        return list(t.proto.string_data)
    return list(t.numpy().ravel().tolist())


def _float_item(x: np.floating) -> str:
    if np.isnan(x):
        return "nan"
    if np.isinf(x):
        return "inf" if x > 0 else "-inf"
    return str(x)  # numpy prints the shortest text that round-trips in the element's own precision


class _Printer:
    def __init__(self, elide: int | None) -> None:
        self.elide = elide
        self.lines: list[str] = []
        self.temps: dict[int, str] = {}

    # --- names ---------------------------------------------------------------------------------
    def ref(self, v: Value) -> str:
        if v.name:
            return name(v.name)
        t = self.temps.get(id(v))
        if t is None:
            t = self.temps[id(v)] = f"${len(self.temps)}"
        return t

    def out_ref(self, v: Value) -> str:
        """An unnamed output nothing refers to prints as `""` (ONNX's omitted output)."""
        if not v.name and not v.uses() and not v.is_graph_output() and v.type is None and not v.doc_string and not v.metadata_props:
            return '""'
        return self.ref(v)

    # --- model ---------------------------------------------------------------------------------
    def model(self, m: Model) -> str:
        hdr = [f"ir_version: {m.ir_version}", "opset_import: " + _opsets(m.opset_imports)]
        if m.producer_name:
            hdr.append(f"producer_name: {quote(m.producer_name)}")
        if m.producer_version:
            hdr.append(f"producer_version: {quote(m.producer_version)}")
        if m.domain:
            hdr.append(f"domain: {quote(m.domain)}")
        if m.model_version:
            hdr.append(f"model_version: {m.model_version}")
        if m.doc_string:
            hdr.append(f"doc_string: {quote(m.doc_string)}")
        if m.metadata_props:
            hdr.append("metadata_props: " + _dict(m.metadata_props))
        explicit = getattr(m, "explicit_defaults", None)
        if explicit:
            hdr.append("explicit_defaults: [" + ", ".join(quote(f) for f in sorted(explicit)) + "]")
        if m.training_info:
            hdr.append("training_info: [" + ", ".join(quote(bytes(b)) for b in m.training_info) + "]")
        self.lines.append("<")
        self.lines.extend(f"  {h}," if i < len(hdr) - 1 else f"  {h}" for i, h in enumerate(hdr))
        self.lines.append(">")
        self.graph(m.graph, 0)
        for f in m.functions.values():
            self.lines.append("")
            self.function(f)
        return "\n".join(self.lines) + "\n"

    def function(self, f: Function) -> None:
        hdr = [f"domain: {quote(f.domain)}"]
        if f.overload:
            hdr.append(f"overload: {quote(f.overload)}")
        hdr.append("opset_import: " + _opsets(f.opset_imports))
        if f.doc_string:
            hdr.append(f"doc_string: {quote(f.doc_string)}")
        if f.metadata_props:
            hdr.append("metadata_props: " + _dict(f.metadata_props))
        self.lines.append("<" + ", ".join(hdr) + ">")
        params = []
        for pname, default in f.attributes.items():
            if default is None:
                params.append(name(pname))
            else:
                params.append(self.attr(default, 0) if default.name == pname else name(pname) + " " + self.attr(default, 0))
        head = name(f.name) + (" <" + ", ".join(params) + ">" if params else "")
        self.graph(f.graph, 0, head=head)

    # --- graphs --------------------------------------------------------------------------------
    def signature(self, g: Graph) -> str:
        ins = ", ".join(self.decl(v) for v in g.inputs)
        outs = ", ".join(self.decl(v) for v in g.outputs)
        return f"({ins}) => ({outs})"

    def decl(self, v: Value) -> str:
        t = "" if v.type is None else format_type(v.type) + " "
        return t + self.ref(v) + _annotations(v.doc_string, v.metadata_props)

    def graph(self, g: Graph, depth: int, *, head: str | None = None) -> None:
        """Append a top-level graph's lines (subgraphs render inline through `graph_text`)."""
        self.lines.extend(self.graph_text(g, depth, head=head).split("\n"))

    def graph_text(self, g: Graph, depth: int, *, head: str | None = None) -> str:
        ind = "  " * depth
        if head is None:
            head = name(g.name) + _annotations(g.doc_string, g.metadata_props)
            if g.quantization_annotation:
                head += " @quant(" + ", ".join(f"{quote(t)}: {_dict(d)}" for t, d in g.quantization_annotation) + ")"
        # declare signature names first so temps number in reading order
        sig = self.signature(g)
        entries = []
        for v in g.initializers.values():
            entries.append(self.initializer(v))
        outputs = {id(v) for v in g.outputs}
        for n in g:
            for v in n.outputs:
                if id(v) not in outputs and (v.type is not None or v.doc_string or v.metadata_props):
                    entries.append(self.decl(v))
        lines = [head + " " + sig]
        if depth == 0:  # ONNX's layout for top-level graphs
            if entries:
                lines.append(ind + "  <" + ", ".join(entries) + ">")
            lines.append(ind + "{")
        else:  # subgraphs open their body on the signature's line
            if entries:
                lines[0] += " <" + ", ".join(entries) + ">"
            lines[0] += " {"
        if depth > 0 and len(g) == 0:
            lines[0] += "}"  # an empty body (a branch returning outer values) stays on one line
        else:
            for n in g:
                lines.append(ind + "  " + self.node(n, depth + 1))
            lines.append(ind + "}")
        return "\n".join(lines)

    def initializer(self, v: Value) -> str:
        t = v.const_value
        ann = _annotations(v.doc_string, v.metadata_props)
        if isinstance(t, SparseTensor):
            lit = self.sparse(t, with_name=False)
            derived: Type = SparseTensorType(t.dtype, Shape(t.dims))
        else:
            assert t is not None
            lit = self.tensor(t, with_name=False)
            derived = TensorType(t.dtype, Shape(t.shape))
        if v.type == derived and not v.is_graph_input() and not isinstance(t, SparseTensor):
            # ONNX's short form: the declared type is the tensor's
            tann = _annotations(t.doc_string, t.metadata_props).lstrip()
            return f"{format_type(v.type)} {self.ref(v)}{ann} = {tann + ' ' if tann else ''}{self.body(t)}"
        decl = "" if (v.type is None or v.is_graph_input()) else format_type(v.type) + " "
        return f"{decl}{self.ref(v)}{ann} = {lit}"

    # --- nodes ---------------------------------------------------------------------------------
    def node(self, n: Node, depth: int) -> str:
        prefix = f"[{name(n.name)}] " if n.name else ""
        outs = ", ".join(self.out_ref(v) for v in n.outputs)
        op = name(n.op_type)
        if n.domain:
            dom = n.domain if all(_ID.match(p) and p not in KEYWORDS for p in n.domain.split(".")) else quote(n.domain)
            op = f"{dom}.{op}"
        if n.overload:
            op += ":" + name(n.overload)
        ins = ", ".join('""' if v is None else self.ref(v) for v in n.inputs)
        text = f"{prefix}{outs} = {op}({ins})"
        if n.attributes:
            text += " <" + ", ".join(self.attr(a, depth) for a in n.attributes.values()) + ">"
        return text + _annotations(n.doc_string, n.metadata_props)

    def attr(self, a: Attr, depth: int) -> str:
        value, explicit = self.attr_value(a, depth)
        kind = f": {a.type.name.lower()}" if explicit else ""
        doc = f" @doc({quote(a.doc_string)})" if a.doc_string else ""
        return f"{name(a.name)}{kind} = {value}{doc}"

    def attr_value(self, a: Attr, depth: int) -> tuple[str, bool]:
        """The literal, and whether the kind must be spelled out (it cannot be inferred)."""
        t, v = a.type, a.value
        if a.ref_attr_name is not None:
            return "@" + name(a.ref_attr_name), True
        if t == AttrType.FLOAT:
            return format_float(v), False
        if t == AttrType.INT:
            return str(int(v)), False
        if t == AttrType.STRING:
            return quote(v), False
        if t == AttrType.TENSOR:
            return self.tensor(v, with_name=True), False
        if t == AttrType.SPARSE_TENSOR:
            return self.sparse(v, with_name=True), False
        if t == AttrType.GRAPH:
            return self.graph_text(v, depth), False
        if t == AttrType.TYPE_PROTO:
            return f"type({format_type(v)})", False
        if t == AttrType.FLOATS:
            return "[" + ", ".join(format_float(x) for x in v) + "]", not v
        if t == AttrType.INTS:
            return "[" + ", ".join(str(int(x)) for x in v) + "]", not v
        if t == AttrType.STRINGS:
            return "[" + ", ".join(quote(x) for x in v) + "]", not v
        if t == AttrType.TENSORS:
            return "[" + ", ".join(self.tensor(x, with_name=True) for x in v) + "]", not v
        if t == AttrType.SPARSE_TENSORS:
            return "[" + ", ".join(self.sparse(x, with_name=True) for x in v) + "]", not v
        if t == AttrType.GRAPHS:
            return "[" + ", ".join(self.graph_text(g, depth) for g in v) + "]", not v
        if t == AttrType.TYPE_PROTOS:
            return "[" + ", ".join(f"type({format_type(x)})" for x in v) + "]", not v
        raise TypeError(f"attribute {a.name!r}: cannot print kind {t!r}")

    # --- tensors -------------------------------------------------------------------------------
    def body(self, t: Tensor) -> str:
        if self.elide is not None and t.size > self.elide:
            return f"<elided {t.size} values>"
        return tensor_body(t)

    def tensor(self, t: Tensor, *, with_name: bool) -> str:
        """`dtype[dims] name @doc(..) @meta(..) {body}` (the name when `with_name` and set)."""
        head = t.dtype.text + "[" + ",".join(str(d) for d in t.shape) + "]"
        if with_name and t.name:
            head += " " + name(t.name)
        return f"{head}{_annotations(t.doc_string, t.metadata_props)} {self.body(t)}"

    def sparse(self, s: SparseTensor, *, with_name: bool) -> str:
        dims = "[" + ", ".join(str(d) for d in s.dims) + "]"
        return f"sparse({self.tensor(s.values, with_name=with_name)}, {self.tensor(s.indices, with_name=True)}, {dims})"


def _opsets(opsets: dict[str, int]) -> str:
    return "[" + ", ".join(f"{quote(d)} : {v}" for d, v in opsets.items()) + "]"


def _dict(d: dict[str, str]) -> str:
    return "{" + ", ".join(f"{quote(k)}: {quote(v)}" for k, v in d.items()) + "}"

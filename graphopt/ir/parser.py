"""Parse the textual IR (see `graphopt.ir.printer` for the syntax) back into a Model.

A hand-written tokenizer and recursive-descent parser: `onnx.parser` cannot carry doc strings,
metadata, node overloads or unnamed values, and its errors do not say where. Every error is a
`ParseError` whose message starts with "line L, col C:". Value references are resolved once a
whole top-level graph is read, so a subgraph may read any value of its enclosing graphs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.errors import ParseError, VerifyError
from graphopt.ir.core import Attr, AttrType, Function, Graph, Model, Node, Value
from graphopt.ir.tensor import NumpyTensor, ProtoTensor, SparseTensor, Tensor
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

_DTYPES = {dt.text: dt for dt in DataType}
_TYPE_WORDS = frozenset(_DTYPES) | {"seq", "optional", "map", "sparse", "opaque"}
_KINDS = {k.name.lower(): k for k in AttrType if k != AttrType.UNDEFINED}
_LIST_KIND = {
    AttrType.FLOATS: AttrType.FLOAT,
    AttrType.INTS: AttrType.INT,
    AttrType.STRINGS: AttrType.STRING,
    AttrType.TENSORS: AttrType.TENSOR,
    AttrType.GRAPHS: AttrType.GRAPH,
    AttrType.SPARSE_TENSORS: AttrType.SPARSE_TENSOR,
    AttrType.TYPE_PROTOS: AttrType.TYPE_PROTO,
}
_SCALAR_TO_LIST = {v: k for k, v in _LIST_KIND.items()}


def parse_model(text: str, *, verify: bool = True) -> Model:
    """Parse a model. The `<...>` header may be omitted: the model then imports the default
    opset 21 and, at version 1, every other domain its nodes use."""
    return _Parser(text).model(default_opset=21, verify=verify)


def parse_graph(text: str, opset: int = 21, *, verify: bool = True) -> Model:
    """Parse a graph written without a model header into a Model importing opset `opset` (and
    version 1 of every other domain the nodes use)."""
    return _Parser(text).model(default_opset=opset, verify=verify)


def decimal_array(items: list[str], dtype: DataType, shape: tuple[int, ...]) -> np.ndarray:
    """The array a decimal tensor body denotes (shared with the printer, which checks that the
    text it writes comes back byte-exactly)."""
    np_dtype = dtype.numpy()
    if dtype == DataType.BOOL:
        arr = np.array([s not in ("0", "0.0", "-0.0") for s in items], dtype=np.bool_)
    elif dtype.is_floating:
        arr = np.array([float(s) for s in items], dtype=np.float64).astype(np_dtype)
    else:
        info = np.iinfo(np_dtype)
        vals = [int(s) for s in items]
        for v in vals:
            if not info.min <= v <= info.max:
                raise ValueError(f"{v} is out of range for {dtype.text}")
        arr = np.array(vals, dtype=np_dtype)
    n = _numel(shape)
    if arr.size != n:
        raise ValueError(f"{arr.size} values for shape {list(shape)} ({n} needed)")
    return arr.reshape(shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- tokens ------------------------------------------------------------------------------------
@dataclass
class Tok:
    kind: str  # ID STR BYTES INT FLOAT HEX TEMP EOF, or the punctuation itself
    value: Any
    line: int
    col: int


_NUM = re.compile(r"-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
_IDRE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PUNCT = set("()[]{}<>,=:.@?-")
_ESC = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "0": "\0"}


def tokenize(text: str) -> list[Tok]:
    toks: list[Tok] = []
    i, line, line_start = 0, 1, 0
    n = len(text)
    while i < n:
        c = text[i]
        col = i - line_start + 1
        if c == "\n":
            i += 1
            line += 1
            line_start = i
            continue
        if c in " \t\r":
            i += 1
            continue
        if c == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c == '"' or (c == "b" and i + 1 < n and text[i + 1] == '"'):
            is_bytes = c == "b"
            i, s = _string(text, i + 1 if is_bytes else i, line, col, is_bytes)
            toks.append(Tok("BYTES" if is_bytes else "STR", s, line, col))
            continue
        if c == "0" and i + 1 < n and text[i + 1] in "xX":
            j = i + 2
            while j < n and text[j] in "0123456789abcdefABCDEF":
                j += 1
            toks.append(Tok("HEX", text[i + 2 : j], line, col))
            i = j
            continue
        m = _NUM.match(text, i)
        if m and (c != "-" or m.end() > i + 1):
            s = m.group()
            toks.append(Tok("FLOAT" if any(ch in s for ch in ".eE") else "INT", s, line, col))
            i = m.end()
            continue
        m = _IDRE.match(text, i)
        if m:
            toks.append(Tok("ID", m.group(), line, col))
            i = m.end()
            continue
        if c == "$":
            j = i + 1
            while j < n and text[j].isdigit():
                j += 1
            if j == i + 1:
                raise ParseError(f"line {line}, col {col}: '$' must be followed by digits (an unnamed value)")
            toks.append(Tok("TEMP", text[i:j], line, col))
            i = j
            continue
        if c == "=" and i + 1 < n and text[i + 1] == ">":
            toks.append(Tok("=>", "=>", line, col))
            i += 2
            continue
        if c in _PUNCT:
            toks.append(Tok(c, c, line, col))
            i += 1
            continue
        raise ParseError(f"line {line}, col {col}: unexpected character {c!r}")
    toks.append(Tok("EOF", None, line, i - line_start + 1))
    return toks


def _string(text: str, i: int, line: int, col: int, is_bytes: bool) -> tuple[int, str | bytes]:
    """Read a literal starting at the quote `text[i]`; returns (index after it, value)."""
    i += 1
    out: list[str] = []
    raw = bytearray()
    n = len(text)
    while True:
        if i >= n or text[i] == "\n":
            raise ParseError(f"line {line}, col {col}: unterminated string")
        c = text[i]
        if c == '"':
            i += 1
            break
        if c == "\\":
            if i + 1 >= n:
                raise ParseError(f"line {line}, col {col}: unterminated string")
            e = text[i + 1]
            if e in _ESC:
                ch, i = _ESC[e], i + 2
            elif e in "xuU":
                width = {"x": 2, "u": 4, "U": 8}[e]
                digits = text[i + 2 : i + 2 + width]
                if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                    raise ParseError(f"line {line}, col {col}: bad \\{e} escape in string")
                code = int(digits, 16)
                i += 2 + width
                if is_bytes:
                    if code > 0xFF:
                        raise ParseError(f"line {line}, col {col}: \\{e} escape above 0xff in a bytes literal")
                    raw.append(code)
                    continue
                if code > 0x10FFFF:
                    raise ParseError(f"line {line}, col {col}: \\{e} escape beyond unicode")
                ch = chr(code)
            else:
                raise ParseError(f"line {line}, col {col}: unknown escape \\{e} in string")
        else:
            ch, i = c, i + 1
        if is_bytes:
            raw.extend(ch.encode("utf-8"))
        else:
            out.append(ch)
    return i, bytes(raw) if is_bytes else "".join(out)


# --- parser ------------------------------------------------------------------------------------
class _Scope:
    """Names visible in one graph; `parent` is the enclosing graph's scope."""

    def __init__(self, parent: _Scope | None) -> None:
        self.parent = parent
        self.names: dict[str, Value] = {}

    def lookup(self, key: str) -> Value | None:
        s: _Scope | None = self
        while s is not None:
            v = s.names.get(key)
            if v is not None:
                return v
            s = s.parent
        return None


@dataclass
class _Decl:
    """A declared value (signature entry or value-info entry): applied once names resolve."""

    key: str
    type: Type | None
    has_type: bool
    doc: str
    meta: dict[str, str]
    tok: Tok


@dataclass
class _PendingGraph:
    graph: Graph
    scope: _Scope
    outputs: list[_Decl]
    infos: list[_Decl]
    inputs: list[tuple[Node, int, str, Tok]] = field(default_factory=list)


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = tokenize(text)
        self.pos = 0
        self.pending: list[_PendingGraph] = []
        self.node_pos: dict[int, Tok] = {}
        self._seen_header: set[str] = set()
        self.no_opsets: set[int] = set()

    # --- token helpers -------------------------------------------------------------------------
    @property
    def tok(self) -> Tok:
        return self.toks[self.pos]

    def peek(self, k: int = 1) -> Tok:
        return self.toks[min(self.pos + k, len(self.toks) - 1)]

    def next(self) -> Tok:
        t = self.toks[self.pos]
        if t.kind != "EOF":
            self.pos += 1
        return t

    def error(self, msg: str, tok: Tok | None = None) -> ParseError:
        t = tok or self.tok
        return ParseError(f"line {t.line}, col {t.col}: {msg}")

    def at(self, kind: str, value: Any = None) -> bool:
        t = self.tok
        return t.kind == kind and (value is None or t.value == value)

    def accept(self, kind: str, value: Any = None) -> Tok | None:
        if self.at(kind, value):
            return self.next()
        return None

    def expect(self, kind: str, what: str | None = None) -> Tok:
        if self.tok.kind != kind:
            raise self.error(f"expected {what or repr(kind)}, found {self.describe(self.tok)}")
        return self.next()

    @staticmethod
    def describe(t: Tok) -> str:
        if t.kind == "EOF":
            return "end of input"
        if t.kind in ("STR", "BYTES"):
            return f"string {t.value!r}"
        return repr(t.value if t.kind != "TEMP" else t.value)

    def expect_id(self, word: str) -> Tok:
        if not self.at("ID", word):
            raise self.error(f"expected {word!r}, found {self.describe(self.tok)}")
        return self.next()

    def name(self, what: str = "a name") -> str:
        t = self.tok
        if t.kind in ("ID", "STR"):
            self.next()
            return str(t.value)
        raise self.error(f"expected {what}, found {self.describe(t)}")

    def value_key(self, what: str = "a value name") -> tuple[str, str, Tok]:
        """(scope key, value name, token): `$k` values are unnamed, keyed by their token."""
        t = self.tok
        if t.kind == "TEMP":
            self.next()
            return t.value, "", t
        if t.kind in ("ID", "STR"):
            self.next()
            return t.value, t.value, t
        raise self.error(f"expected {what}, found {self.describe(t)}")

    def string(self, what: str = "a string") -> str:
        return str(self.expect("STR", what).value)

    def integer(self) -> int:
        t = self.expect("INT", "an integer")
        return int(t.value)

    # --- model ---------------------------------------------------------------------------------
    def model(self, *, default_opset: int, verify: bool) -> Model:
        m = Model(Graph(), opset_imports={})
        header = self.at("<")
        if header:
            self.model_header(m)
        g = self.graph(None)
        self.resolve()
        m.graph = g
        functions: list[Function] = []
        while not self.at("EOF"):
            if not self.at("<"):
                raise self.error(f"expected a function ('<domain: ...>') or end of input, found {self.describe(self.tok)}")
            f = self.function(m)
            self.resolve()
            if f.id in m.functions:
                raise self.error(f"function {f.domain}::{f.name} is defined twice")
            m.functions[f.id] = f
            functions.append(f)
        if not header or "opset_import" not in self._seen_header:
            m.opset_imports = {"": default_opset}
            local = {f.domain for f in functions}
            for n in g.all_nodes():
                if n.domain not in m.opset_imports and n.domain not in local and n.domain != "ai.onnx":
                    m.opset_imports[n.domain] = 1
        for f in functions:
            if id(f) in self.no_opsets:
                f.opset_imports = dict(m.opset_imports)
        if verify:
            try:
                m.verify()
            except VerifyError as e:
                tok = self.node_pos.get(id(e.node)) if e.node is not None else None
                where = f"line {tok.line}, col {tok.col}: " if tok else "line 1, col 1: "
                raise ParseError(f"{where}{e}") from None
        return m

    def model_header(self, m: Model) -> None:
        seen = self._seen_header
        self.expect("<")
        while not self.at(">"):
            kt = self.expect("ID", "a header key")
            key = kt.value
            if key in seen:
                raise self.error(f"header key {key!r} given twice", kt)
            seen.add(key)
            self.expect(":")
            if key == "ir_version":
                m.ir_version = self.integer()
            elif key == "opset_import":
                m.opset_imports = self.opsets()
            elif key in ("producer_name", "producer_version", "domain", "doc_string"):
                setattr(m, key, self.string())
            elif key == "model_version":
                m.model_version = self.integer()
            elif key == "metadata_props":
                m.metadata_props = self.str_dict()
            elif key == "explicit_defaults":
                self.expect("[")
                fields: list[str] = []
                while not self.at("]"):
                    fields.append(self.string("a field name"))
                    if not self.accept(","):
                        break
                self.expect("]")
                m.explicit_defaults = frozenset(fields)
            elif key == "training_info":
                self.expect("[")
                items: list[bytes] = []
                while not self.at("]"):
                    t = self.next()
                    if t.kind == "BYTES":
                        items.append(t.value)
                    elif t.kind == "STR":
                        items.append(t.value.encode())
                    else:
                        raise self.error("expected a bytes literal", t)
                    if not self.accept(","):
                        break
                self.expect("]")
                m.training_info = items
            else:
                raise self.error(f"unknown model header key {key!r}", kt)
            if not self.accept(","):
                break
        self.expect(">", "'>' closing the model header")

    def opsets(self) -> dict[str, int]:
        self.expect("[")
        out: dict[str, int] = {}
        while not self.at("]"):
            d = self.string("a domain string")
            self.expect(":")
            out[d] = self.integer()
            if not self.accept(","):
                break
        self.expect("]", "']' closing the opset list")
        return out

    def str_pairs(self, close: str) -> dict[str, str]:
        """`"k": "v", ...` up to (not including) the token `close`."""
        out: dict[str, str] = {}
        while not self.at(close):
            k = self.string("a key string")
            self.expect(":")
            out[k] = self.string("a value string")
            if not self.accept(","):
                break
        return out

    def str_dict(self) -> dict[str, str]:
        self.expect("{")
        out = self.str_pairs("}")
        self.expect("}", "'}' closing the dictionary")
        return out

    def function(self, m: Model) -> Function:
        self.expect("<")
        fields: dict[str, Any] = {}
        while not self.at(">"):
            kt = self.expect("ID", "a function header key")
            self.expect(":")
            if kt.value in ("domain", "overload", "doc_string"):
                fields[kt.value] = self.string()
            elif kt.value == "opset_import":
                fields["opset_imports"] = self.opsets()
            elif kt.value == "metadata_props":
                fields["metadata_props"] = self.str_dict()
            else:
                raise self.error(f"unknown function header key {kt.value!r}", kt)
            if not self.accept(","):
                break
        self.expect(">", "'>' closing the function header")
        fname = self.name("a function name")
        params: dict[str, Attr | None] = {}
        if self.accept("<"):
            while not self.at(">"):
                pt = self.tok
                a = self.attribute(allow_missing_value=True)
                if a.name in params:
                    raise self.error(f"attribute parameter {a.name!r} declared twice", pt)
                params[a.name] = None if a.type == AttrType.UNDEFINED else a
                if not self.accept(","):
                    break
            self.expect(">", "'>' closing the attribute parameters")
        g = self.graph(None, name=fname)
        f = Function(
            fields.get("domain", ""),
            fname,
            g,
            overload=fields.get("overload", ""),
            attributes=params,
            opset_imports=fields.get("opset_imports", {}),
            doc_string=fields.get("doc_string", ""),
            metadata_props=fields.get("metadata_props", {}),
        )
        if "opset_imports" not in fields:
            self.no_opsets.add(id(f))  # filled from the model's once it is known
        return f

    # --- graphs --------------------------------------------------------------------------------
    def graph(self, parent: _Scope | None, *, name: str | None = None) -> Graph:
        """A graph: `name @annotations (inputs) => (outputs) <entries> { nodes }`. With `name`
        given (functions), the name was already read and there are no annotations."""
        gdoc, gmeta, quant = "", {}, []
        if name is None:
            name = "" if self.at("(") else self.name("a graph name")
            ann = self.annotations({"doc", "meta", "quant"})
            gdoc, gmeta, quant = ann.get("doc", ""), ann.get("meta", {}), ann.get("quant", [])
        scope = _Scope(parent)
        self.expect("(", "'(' opening the graph inputs")
        inputs: list[Value] = []
        while not self.at(")"):
            d = self.decl()
            v = Value("" if d.tok.kind == "TEMP" else d.key, d.type, doc_string=d.doc, metadata_props=d.meta)
            if d.key in scope.names:
                raise self.error(f"graph input {d.key!r} declared twice", d.tok)
            scope.names[d.key] = v
            inputs.append(v)
            if not self.accept(","):
                break
        self.expect(")", "')' closing the graph inputs")
        self.expect("=>", "'=>'")
        self.expect("(", "'(' opening the graph outputs")
        outputs: list[_Decl] = []
        while not self.at(")"):
            outputs.append(self.decl())
            if not self.accept(","):
                break
        self.expect(")", "')' closing the graph outputs")
        g = Graph(inputs, name=name, doc_string=gdoc, metadata_props=gmeta)
        g.quantization_annotation = quant
        pg = _PendingGraph(g, scope, outputs, [])
        self.pending.append(pg)
        if self.accept("<"):
            while not self.at(">"):
                self.entry(pg)
                if not self.accept(","):
                    break
            self.expect(">", "'>' closing the initializer list")
        self.expect("{", "'{' opening the graph body")
        while not self.at("}"):
            if self.at("EOF"):
                raise self.error("expected '}' closing the graph body, found end of input")
            self.node(pg)
        self.next()
        return g

    def decl(self) -> _Decl:
        """`[type] name @doc(..) @meta(..)`."""
        t: Type | None = None
        has_type = self.at("ID") and self.tok.value in _TYPE_WORDS
        if has_type:
            t = self.type()
        key, _, tok = self.value_key()
        ann = self.annotations({"doc", "meta"})
        return _Decl(key, t, has_type, ann.get("doc", ""), ann.get("meta", {}), tok)

    def entry(self, pg: _PendingGraph) -> None:
        """An initializer (`type name = body`, `name = literal`) or a value's declared type."""
        d = self.decl()
        if not self.accept("="):
            pg.infos.append(d)
            return
        g, scope = pg.graph, pg.scope
        v = scope.names.get(d.key)
        if v is not None and not v.is_graph_input():
            raise self.error(f"initializer {d.key!r} is defined twice", d.tok)
        const: Tensor | SparseTensor
        if self.at("ID") and self.tok.value in _DTYPES:
            const = self.tensor_literal()
        elif self.at("ID", "sparse"):
            const = self.sparse_literal()
        else:
            if not isinstance(d.type, TensorType) or d.type.shape is None or not d.type.shape.is_static():
                raise self.error(f"initializer {d.key!r} needs a static tensor type before its value, or a full tensor literal", d.tok)
            const = self.tensor_body(d.type.dtype, tuple(d.type.shape.dims), d.key)  # type: ignore[arg-type]
        if isinstance(const, SparseTensor):
            const.values.name = d.key
        else:
            const.name = d.key
        if v is None:
            v = Value(d.key, d.type, doc_string=d.doc, metadata_props=d.meta)
            scope.names[d.key] = v
        elif d.has_type:
            v.type = d.type
        if v.is_graph_input() and (d.doc or d.meta):
            v.doc_string, v.metadata_props = d.doc, d.meta
        v.const_value = const
        try:
            g.register_initializer(v)
        except ValueError as e:
            raise self.error(str(e), d.tok) from None

    def node(self, pg: _PendingGraph) -> None:
        start = self.tok
        nname = ""
        if self.accept("["):
            nname = self.name("a node name")
            self.expect("]", "']' closing the node name")
        outs: list[Value] = []
        out_keys: list[tuple[str, Tok] | None] = []  # None: an omitted output (`""`)
        if not self.at("="):
            while True:
                t = self.tok
                if t.kind == "STR" and t.value == "":
                    self.next()
                    outs.append(Value())
                    out_keys.append(None)
                else:
                    key, vname, tok = self.value_key("an output name or '='")
                    outs.append(Value(vname))
                    out_keys.append((key, tok))
                if not self.accept(","):
                    break
        self.expect("=", "'=' after the node outputs")
        domain, op, overload = self.opref()
        attrs: list[Attr] = []
        if self.at("<"):
            attrs = self.attributes(pg.scope)
        self.expect("(", f"'(' opening the inputs of {op}")
        ins: list[tuple[str, Tok] | None] = []
        while not self.at(")"):
            t = self.tok
            if t.kind == "STR" and t.value == "":
                self.next()
                ins.append(None)
            else:
                key, _, tok = self.value_key("an input name")
                ins.append((key, tok))
            if not self.accept(","):
                break
        self.expect(")", "')' closing the node inputs")
        if self.at("<"):
            if attrs:
                raise self.error("attributes given twice")
            attrs = self.attributes(pg.scope)
        ann = self.annotations({"doc", "meta"})
        node = Node(domain, op, (), attrs, outputs=outs, name=nname, overload=overload, doc_string=ann.get("doc", ""), metadata_props=ann.get("meta", {}))
        self.node_pos[id(node)] = start
        for v, ref in zip(outs, out_keys):
            if ref is None:
                continue
            key, tok = ref
            if key in pg.scope.names:
                raise self.error(f"value {key!r} is defined twice", tok)
            pg.scope.names[key] = v
        node.set_inputs([None] * len(ins))
        for i, r in enumerate(ins):
            if r is not None:
                pg.inputs.append((node, i, r[0], r[1]))
        pg.graph.append(node)

    def opref(self) -> tuple[str, str, str]:
        parts = [self.name("an operator")]
        while self.accept("."):
            parts.append(self.name("an operator"))
        overload = ""
        if self.accept(":"):
            overload = self.name("an overload name")
        return ".".join(parts[:-1]), parts[-1], overload

    def resolve(self) -> None:
        """Wire every pending reference of the top-level graph just read (and its subgraphs)."""
        for pg in self.pending:
            for node, i, key, tok in pg.inputs:
                v = pg.scope.lookup(key)
                if v is None:
                    raise self.error(f"node {node.label()}: input {key!r} is not defined", tok)
                node.replace_input_with(i, v)
        for pg in self.pending:
            outs = []
            for d in pg.outputs:
                v = pg.scope.lookup(d.key)
                if v is None:
                    raise self.error(f"graph output {d.key!r} is not defined", d.tok)
                self.apply(v, d)
                outs.append(v)
            pg.graph.outputs = outs
            for d in pg.infos:
                v = pg.scope.names.get(d.key)
                if v is None:
                    raise self.error(f"value {d.key!r} is declared but not defined in this graph", d.tok)
                self.apply(v, d)
        self.pending = []

    @staticmethod
    def apply(v: Value, d: _Decl) -> None:
        if d.has_type:
            v.type = d.type
        if d.doc:
            v.doc_string = d.doc
        if d.meta:
            v.metadata_props = d.meta

    # --- annotations ---------------------------------------------------------------------------
    def annotations(self, allowed: set[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while self.at("@") and self.peek().kind == "ID" and self.peek().value in allowed and self.peek(2).kind == "(":
            self.next()
            kind = self.next().value
            self.expect("(")
            if kind in out:
                raise self.error(f"@{kind} given twice")
            if kind in ("doc", "den"):
                out[kind] = self.string()
            elif kind == "meta":
                out[kind] = self.str_pairs(")")
            elif kind == "quant":
                q: list[tuple[str, dict[str, str]]] = []
                while not self.at(")"):
                    k = self.string("a tensor name")
                    self.expect(":")
                    q.append((k, self.str_dict()))
                    if not self.accept(","):
                        break
                out[kind] = q
            self.expect(")", f"')' closing @{kind}")
        if self.at("@") and self.peek().kind == "ID" and self.peek(2).kind == "(":
            raise self.error(f"unexpected annotation @{self.peek().value} here")
        return out

    # --- types ---------------------------------------------------------------------------------
    def type(self) -> Type:
        t = self.expect("ID", "a type")
        word = t.value
        result: Type
        if word in _DTYPES:
            result = TensorType(_DTYPES[word], self.shape() if self.at("[") else None)
        elif word == "sparse":
            self.expect("(")
            dt = self.dtype()
            shape = self.shape() if self.at("[") else None
            self.expect(")")
            result = SparseTensorType(dt, shape)
        elif word in ("seq", "optional"):
            self.expect("(")
            elem = self.opt_type()
            self.expect(")")
            result = SequenceType(elem) if word == "seq" else OptionalType(elem)
        elif word == "map":
            self.expect("(")
            key = self.dtype()
            self.expect(",")
            val = self.opt_type()
            self.expect(")")
            result = MapType(key, val)
        elif word == "opaque":
            self.expect("(")
            dom = self.string()
            self.expect(",")
            nm = self.string()
            self.expect(")")
            result = OpaqueType(dom, nm)
        else:
            raise self.error(f"unknown type {word!r}", t)
        ann = self.annotations({"den"})
        if "den" in ann:
            import dataclasses

            result = dataclasses.replace(result, denotation=ann["den"])
        return result

    def opt_type(self) -> Type | None:
        if self.accept("?"):
            return None
        return self.type()

    def dtype(self) -> DataType:
        t = self.expect("ID", "an element type")
        if t.value not in _DTYPES:
            raise self.error(f"unknown element type {t.value!r}", t)
        return _DTYPES[t.value]

    def shape(self) -> Shape:
        self.expect("[")
        dims: list[int | str | None] = []
        dens: list[str] = []
        while not self.at("]"):
            t = self.next()
            if t.kind == "INT":
                d: int | str | None = int(t.value)
                if d < 0:  # type: ignore[operator]
                    raise self.error("a dim cannot be negative", t)
            elif t.kind in ("ID", "STR"):
                d = t.value
            elif t.kind == "?":
                d = None
            else:
                raise self.error(f"expected a dim (integer, symbol or '?'), found {self.describe(t)}", t)
            dims.append(d)
            dens.append(self.annotations({"den"}).get("den", ""))
            if not self.accept(","):
                break
        self.expect("]", "']' closing the shape")
        return Shape(tuple(dims), tuple(dens) if any(dens) else None)

    # --- tensors -------------------------------------------------------------------------------
    def tensor_literal(self) -> Tensor:
        """`dtype[dims] [name] @doc(..) @meta(..) body`."""
        dt = self.dtype()
        self.expect("[", f"'[' after {dt.text} (a tensor literal needs its dims)")
        dims: list[int] = []
        while not self.at("]"):
            dims.append(self.integer())
            if not self.accept(","):
                break
        self.expect("]")
        tname = ""
        if self.at("ID") or self.at("STR"):
            tname = self.next().value
        return self.tensor_body(dt, tuple(dims), tname)

    def tensor_body(self, dt: DataType, dims: tuple[int, ...], tname: str) -> Tensor:
        """`@doc(..) @meta(..) {values}` or `... 0x<hex>`: the tensor's own annotations come
        before its values, so an attribute's `@doc` after the literal stays unambiguous."""
        ann = self.annotations({"doc", "meta"})
        t = self.tok
        tensor: Tensor
        if t.kind == "HEX":
            self.next()
            if len(t.value) % 2:
                raise self.error("hex payload has an odd number of digits", t)
            import onnx

            if dt == DataType.STRING:
                raise self.error("string tensors cannot have a hex payload", t)
            raw = bytes.fromhex(t.value)
            proto = onnx.TensorProto(name=tname, data_type=int(dt), dims=dims, raw_data=raw)
            tensor = ProtoTensor(proto)
            expect = tensor.nbytes
            if len(raw) != expect:
                raise self.error(f"hex payload has {len(raw)} bytes; {dt.text}{list(dims)} needs {expect}", t)
        elif t.kind == "{":
            self.next()
            items: list[Any] = []
            while not self.at("}"):
                items.append(self.tensor_item(dt))
                if not self.accept(","):
                    break
            self.expect("}", "'}' closing the tensor values")
            try:
                if dt == DataType.STRING:
                    arr = np.empty(len(items), dtype=object)
                    arr[:] = items
                    n = _numel(dims)
                    if len(items) != n:
                        raise ValueError(f"{len(items)} values for shape {list(dims)} ({n} needed)")
                    arr = arr.reshape(dims)
                elif not items:
                    if _numel(dims) != 0:
                        raise ValueError(f"no values for shape {list(dims)}")
                    if dt.bitwidth < 8 or dt not in _NUMPY_OK:
                        import onnx

                        return self.annotate(ProtoTensor(onnx.TensorProto(name=tname, data_type=int(dt), dims=dims, raw_data=b"")), ann)
                    arr = np.zeros(dims, dtype=dt.numpy())
                else:
                    arr = decimal_array(items, dt, dims)
            except (ValueError, OverflowError, TypeError) as e:
                raise self.error(f"bad tensor values: {e}", t) from None
            tensor = NumpyTensor(arr, tname, dtype=dt)
        elif t.kind == "<" and self.peek().kind == "ID" and self.peek().value == "elided":
            raise self.error("elided tensor values cannot be parsed (print without elide_tensors_over)", t)
        else:
            raise self.error(f"expected tensor values ('{{...}}' or 0x...), found {self.describe(t)}", t)
        return self.annotate(tensor, ann)

    @staticmethod
    def annotate(tensor: Tensor, ann: dict[str, Any]) -> Tensor:
        if "doc" in ann or "meta" in ann:
            if isinstance(tensor, ProtoTensor):
                if "doc" in ann:
                    tensor.proto.doc_string = ann["doc"]
                for k, v in ann.get("meta", {}).items():
                    tensor.proto.metadata_props.add(key=k, value=v)
            tensor.doc_string = ann.get("doc", "")
            tensor.metadata_props = dict(ann.get("meta", {}))
        return tensor

    def tensor_item(self, dt: DataType) -> Any:
        t = self.next()
        if dt == DataType.STRING:
            if t.kind in ("STR", "BYTES"):
                return t.value
            raise self.error(f"expected a string element, found {self.describe(t)}", t)
        if t.kind in ("INT", "FLOAT"):
            return t.value
        if t.kind == "ID" and t.value in ("nan", "inf"):
            return t.value
        if t.kind == "-" and self.at("ID") and self.tok.value in ("nan", "inf"):
            return "-" + self.next().value
        raise self.error(f"expected a number, found {self.describe(t)}", t)

    def sparse_literal(self) -> SparseTensor:
        self.expect_id("sparse")
        self.expect("(")
        values = self.tensor_literal()
        self.expect(",")
        indices = self.tensor_literal()
        self.expect(",")
        self.expect("[")
        dims: list[int] = []
        while not self.at("]"):
            dims.append(self.integer())
            if not self.accept(","):
                break
        self.expect("]")
        self.expect(")", "')' closing the sparse tensor")
        return SparseTensor(values, indices, tuple(dims))

    # --- attributes ----------------------------------------------------------------------------
    def attributes(self, scope: _Scope) -> list[Attr]:
        self.expect("<")
        out: list[Attr] = []
        seen: set[str] = set()
        while not self.at(">"):
            t = self.tok
            a = self.attribute(scope=scope)
            if a.name in seen:
                raise self.error(f"attribute {a.name!r} given twice", t)
            seen.add(a.name)
            out.append(a)
            if not self.accept(","):
                break
        self.expect(">", "'>' closing the attributes")
        return out

    def attribute(self, *, scope: _Scope | None = None, allow_missing_value: bool = False) -> Attr:
        """`name [: kind] = value [@doc(..)]`."""
        aname = self.name("an attribute name")
        kind: AttrType | None = None
        if self.accept(":"):
            kt = self.expect("ID", "an attribute kind")
            if kt.value not in _KINDS:
                raise self.error(f"unknown attribute kind {kt.value!r}", kt)
            kind = _KINDS[kt.value]
        if allow_missing_value and not self.at("="):
            return Attr(aname, AttrType.UNDEFINED, None)  # a parameter without default
        self.expect("=", f"'=' after attribute {aname!r}")
        if self.at("@"):
            self.next()
            ref = self.name("the referenced attribute's name")
            if kind is None:
                raise self.error(f"attribute {aname!r}: a reference @{ref} needs its kind ('{aname}: float = @{ref}')")
            doc = self.annotations({"doc"}).get("doc", "")
            return Attr(aname, kind, None, doc, ref)
        start = self.tok
        kind, value = self.attr_value(kind, scope)
        try:
            value = _coerce(kind, value)
        except (TypeError, ValueError) as e:
            raise self.error(f"attribute {aname!r}: {e}", start) from None
        doc = self.annotations({"doc"}).get("doc", "")
        return Attr(aname, kind, value, doc)

    def attr_value(self, kind: AttrType | None, scope: _Scope | None) -> tuple[AttrType, Any]:
        t = self.tok
        if kind in _LIST_KIND or (kind is None and t.kind == "["):
            if not self.at("["):
                raise self.error(f"expected '[' for a {kind.name.lower()} list")  # type: ignore[union-attr]
            self.next()
            elem_kind = _LIST_KIND.get(kind) if kind is not None else None
            items: list[Any] = []
            kinds: list[AttrType] = []
            while not self.at("]"):
                k, v = self.attr_value(elem_kind, scope)
                if k in _LIST_KIND:
                    raise self.error("lists of lists are not attributes")
                items.append(v)
                kinds.append(k)
                if not self.accept(","):
                    break
            self.expect("]", "']' closing the list")
            if kind is None:
                if not items:
                    raise self.error("the kind of an empty list is ambiguous; write 'name: ints = []'", t)
                ks = set(kinds)
                if ks <= {AttrType.INT, AttrType.FLOAT}:
                    kind = AttrType.FLOATS if AttrType.FLOAT in ks else AttrType.INTS
                elif len(ks) == 1:
                    kind = _SCALAR_TO_LIST[kinds[0]]
                else:
                    raise self.error("list elements of different kinds", t)
            return kind, items
        if kind is None:
            kind = self.infer_kind()
        if kind in (AttrType.INT, AttrType.FLOAT):
            return kind, self.number(kind)
        if kind == AttrType.STRING:
            v = self.next()
            if v.kind not in ("STR", "BYTES"):
                raise self.error(f"expected a string, found {self.describe(v)}", v)
            return kind, v.value
        if kind == AttrType.TENSOR:
            return kind, self.tensor_literal()
        if kind == AttrType.SPARSE_TENSOR:
            return kind, self.sparse_literal()
        if kind == AttrType.TYPE_PROTO:
            self.expect_id("type")
            self.expect("(")
            tp = self.opt_type()
            self.expect(")", "')' closing type(...)")
            return kind, tp
        if kind == AttrType.GRAPH:
            return kind, self.graph(scope)
        raise self.error(f"cannot read a value of kind {kind.name.lower()}")

    def infer_kind(self) -> AttrType:
        t = self.tok
        if t.kind == "INT":
            return AttrType.INT
        if t.kind == "FLOAT" or (t.kind == "ID" and t.value in ("nan", "inf")) or t.kind == "-":
            return AttrType.FLOAT
        if t.kind == "BYTES":
            return AttrType.STRING
        if t.kind == "ID" and t.value in _DTYPES:
            return AttrType.TENSOR
        if t.kind == "ID" and t.value == "sparse":
            return AttrType.SPARSE_TENSOR
        if t.kind == "ID" and t.value == "type":
            return AttrType.TYPE_PROTO
        if t.kind == "STR":
            return AttrType.GRAPH if self.graph_follows() else AttrType.STRING
        if t.kind == "ID" or t.kind == "(":
            return AttrType.GRAPH
        raise self.error(f"expected an attribute value, found {self.describe(t)}")

    def graph_follows(self) -> bool:
        """Whether the string at the cursor names a graph: `"name" @ann(..)* (`."""
        i = self.pos + 1
        while self.toks[i].kind == "@" and self.toks[i + 1].kind == "ID" and self.toks[i + 2].kind == "(":
            depth, i = 0, i + 2
            while True:
                k = self.toks[i].kind
                if k == "(":
                    depth += 1
                elif k == ")":
                    depth -= 1
                    if depth == 0:
                        break
                elif k == "EOF":
                    return False
                i += 1
            i += 1
        return self.toks[i].kind == "("

    def number(self, kind: AttrType) -> int | float:
        t = self.next()
        neg = False
        if t.kind == "-":
            neg, t = True, self.next()
        if t.kind == "ID" and t.value in ("nan", "inf"):
            if kind == AttrType.INT:
                raise self.error(f"{t.value} is not an integer", t)
            return -float(t.value) if neg else float(t.value)
        if t.kind == "INT" and not neg:
            return int(t.value) if kind == AttrType.INT else float(t.value)
        if t.kind == "FLOAT" and not neg:
            if kind == AttrType.INT:
                raise self.error(f"{t.value} is not an integer", t)
            return float(t.value)
        raise self.error(f"expected a number, found {self.describe(t)}", t)


_NUMPY_OK = frozenset(
    {
        DataType.FLOAT, DataType.DOUBLE, DataType.FLOAT16, DataType.INT8, DataType.INT16, DataType.INT32,
        DataType.INT64, DataType.UINT8, DataType.UINT16, DataType.UINT32, DataType.UINT64, DataType.BOOL,
        DataType.COMPLEX64, DataType.COMPLEX128,
    }
)


def _coerce(kind: AttrType, value: Any) -> Any:
    """Numbers in a float list are floats even when written as integers."""
    if kind == AttrType.FLOATS:
        return [float(x) for x in value]
    if kind == AttrType.FLOAT:
        return float(value)
    if kind == AttrType.INTS:
        if any(isinstance(x, float) for x in value):
            raise ValueError("an ints list holds a non-integer")
        return [int(x) for x in value]
    return value

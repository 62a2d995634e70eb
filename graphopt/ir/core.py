"""The graph IR: Value, Attr, Node, Graph, Function, Model.

Invariants the classes maintain (and `verify()` checks):
- a Value knows its producer (node and output index, or none for graph inputs/initializers)
  and its uses `(node, input_index)`, in every nested subgraph too;
- a Node's inputs change only through `replace_input_with` / `set_inputs`, which keep the use
  lists right;
- a Graph is an ordered node list that may be mutated while it is being iterated; `remove`
  refuses to drop a node whose outputs are still used unless told otherwise.
Names are kept on values because ONNX needs them, but identity is the object, not the name.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from graphopt.errors import VerifyError
from graphopt.ir.tensor import SparseTensor, Tensor
from graphopt.ir.types import DataType, Shape, TensorType, Type


class Value:
    """An SSA value: a graph input, an initializer, or one output of a node."""

    __slots__ = ("name", "type", "doc_string", "metadata_props", "const_value", "meta", "_producer", "_index", "_uses", "_graph")

    def __init__(
        self,
        name: str = "",
        type: Type | None = None,
        *,
        const_value: Tensor | SparseTensor | None = None,
        doc_string: str = "",
        metadata_props: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.type = type
        self.const_value = const_value
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] = dict(metadata_props or {})
        self.meta: dict[str, Any] = {}
        self._producer: Node | None = None
        self._index: int | None = None
        # dict as an ordered set of (node, input index)
        self._uses: dict[tuple[Node, int], None] = {}
        self._graph: Graph | None = None  # set for graph inputs and initializers

    # --- structure ---------------------------------------------------------------------------
    def producer(self) -> Node | None:
        return self._producer

    def index(self) -> int | None:
        """Output index in the producer, or None."""
        return self._index

    def uses(self) -> list[tuple[Node, int]]:
        return list(self._uses)

    def consumers(self) -> list[Node]:
        """Distinct nodes that read this value, in first-use order."""
        return list(dict.fromkeys(n for n, _ in self._uses))

    @property
    def graph(self) -> Graph | None:
        """The graph that defines this value."""
        if self._producer is not None:
            return self._producer.graph
        return self._graph

    def is_graph_input(self) -> bool:
        return self._graph is not None and self in self._graph._input_set

    def is_graph_output(self) -> bool:
        g = self.graph
        return g is not None and any(o is self for o in g.outputs)

    def is_initializer(self) -> bool:
        return self._graph is not None and self._graph.initializers.get(self.name) is self

    def replace_all_uses_with(self, replacement: Value, *, replace_graph_outputs: bool = False) -> None:
        """Point every reader of this value at `replacement`.

        Graph outputs are part of the model's interface, so they are only replaced when asked;
        the caller then decides which name the output keeps.
        """
        if replacement is self:
            return
        for node, i in list(self._uses):
            node.replace_input_with(i, replacement)
        if replace_graph_outputs:
            g = self.graph
            if g is not None:
                g.outputs[:] = [replacement if o is self else o for o in g.outputs]

    # --- conveniences ------------------------------------------------------------------------
    @property
    def dtype(self) -> DataType | None:
        t = self.type
        return t.dtype if isinstance(t, TensorType) else None

    @property
    def shape(self) -> Shape | None:
        t = self.type
        return t.shape if isinstance(t, TensorType) else None

    def __repr__(self) -> str:
        return f"Value({self.name!r}{'' if self.type is None else ', ' + str(self.type)})"


class AttrType(enum.IntEnum):
    """Attribute kinds; the numbers are ONNX's `AttributeProto.AttributeType`."""

    UNDEFINED = 0
    FLOAT = 1
    INT = 2
    STRING = 3
    TENSOR = 4
    GRAPH = 5
    FLOATS = 6
    INTS = 7
    STRINGS = 8
    TENSORS = 9
    GRAPHS = 10
    SPARSE_TENSOR = 11
    SPARSE_TENSORS = 12
    TYPE_PROTO = 13
    TYPE_PROTOS = 14


@dataclass
class Attr:
    """A node attribute. `ref_attr_name` is set (and `value` None) inside function bodies when
    the attribute takes the value of the calling node's attribute of that name."""

    name: str
    type: AttrType
    value: Any
    doc_string: str = ""
    ref_attr_name: str | None = None

    @staticmethod
    def infer(name: str, value: Any) -> Attr:
        """Build an attribute from a Python value, choosing its kind the obvious way."""
        import numpy as np

        from graphopt.ir.tensor import NumpyTensor

        if isinstance(value, Attr):
            return value
        if isinstance(value, (bool, np.bool_)):
            return Attr(name, AttrType.INT, int(value))
        if isinstance(value, (int, np.integer)):
            return Attr(name, AttrType.INT, int(value))
        if isinstance(value, (float, np.floating)):
            return Attr(name, AttrType.FLOAT, float(value))
        if isinstance(value, (str, bytes)):
            return Attr(name, AttrType.STRING, value)
        if isinstance(value, Graph):
            return Attr(name, AttrType.GRAPH, value)
        if isinstance(value, SparseTensor):
            return Attr(name, AttrType.SPARSE_TENSOR, value)
        if isinstance(value, Tensor):
            return Attr(name, AttrType.TENSOR, value)
        if isinstance(value, np.ndarray):
            return Attr(name, AttrType.TENSOR, NumpyTensor(value))
        if isinstance(value, (list, tuple)):
            items = list(value)
            if not items:
                raise TypeError(f"attribute {name!r}: the kind of an empty list is ambiguous; pass an Attr")
            # bools are ints (as for a single bool): [True, False] -> INTS [1, 0]
            if all(isinstance(v, (int, np.integer, np.bool_)) for v in items):
                return Attr(name, AttrType.INTS, [int(v) for v in items])
            if all(isinstance(v, (int, float, np.integer, np.floating)) for v in items):
                return Attr(name, AttrType.FLOATS, [float(v) for v in items])
            if all(isinstance(v, (str, bytes)) for v in items):
                return Attr(name, AttrType.STRINGS, items)
            if all(isinstance(v, Graph) for v in items):
                return Attr(name, AttrType.GRAPHS, items)
            if all(isinstance(v, SparseTensor) for v in items):
                return Attr(name, AttrType.SPARSE_TENSORS, items)
            if all(isinstance(v, Tensor) for v in items):
                return Attr(name, AttrType.TENSORS, items)
        raise TypeError(f"attribute {name!r}: cannot infer the kind of {type(value).__name__}")

    def graphs(self) -> list[Graph]:
        if self.value is None:  # a reference (`ref_attr_name`) holds no graph of its own
            return []
        if self.type == AttrType.GRAPH:
            return [self.value]
        if self.type == AttrType.GRAPHS:
            return list(self.value)
        return []


class Node:
    """One operator application. Inputs are `Value | None` (None: an omitted optional input)."""

    def __init__(
        self,
        domain: str,
        op_type: str,
        inputs: Sequence[Value | None] = (),
        attributes: Iterable[Attr] | dict[str, Any] = (),
        *,
        outputs: Sequence[Value] | None = None,
        num_outputs: int | None = None,
        name: str = "",
        overload: str = "",
        doc_string: str = "",
        metadata_props: dict[str, str] | None = None,
    ) -> None:
        self.domain = domain
        self.op_type = op_type
        self.overload = overload
        self.name = name
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] = dict(metadata_props or {})
        self.meta: dict[str, Any] = {}
        self.graph: Graph | None = None
        self.attributes: dict[str, Attr] = {}
        if isinstance(attributes, dict):
            attributes = [Attr.infer(k, v) for k, v in attributes.items()]
        for a in attributes:
            self.set_attr(a)
        self._inputs: tuple[Value | None, ...] = ()
        if outputs is None:
            outputs = [Value() for _ in range(1 if num_outputs is None else num_outputs)]
        elif num_outputs is not None and num_outputs != len(outputs):
            raise ValueError("num_outputs disagrees with outputs")
        for v in outputs:
            if v._producer is not None or v._graph is not None:
                raise ValueError(f"value {v.name!r} is already defined elsewhere")
        # only now touch the inputs' use lists: a refused node must leave no ghost uses
        self.set_inputs(inputs)
        for i, v in enumerate(outputs):
            v._producer, v._index = self, i
        self._outputs: tuple[Value, ...] = tuple(outputs)
        # linked-list hooks owned by Graph
        self._prev: Node | None = None
        self._next: Node | None = None
        self._erased = False

    # --- inputs / outputs ----------------------------------------------------------------------
    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[Value, ...]:
        return self._outputs

    def replace_input_with(self, index: int, value: Value | None) -> None:
        """The one way to change a single input; keeps use lists right."""
        old = self._inputs[index]
        if old is value:
            return
        if old is not None:
            old._uses.pop((self, index), None)
        if value is not None:
            value._uses[(self, index)] = None
        self._inputs = self._inputs[:index] + (value,) + self._inputs[index + 1 :]

    def set_inputs(self, inputs: Sequence[Value | None]) -> None:
        """Replace the whole input list (its length may change)."""
        inputs = tuple(inputs)
        for i, v in enumerate(inputs):  # check first: a refused call changes nothing
            if v is not None and not isinstance(v, Value):
                raise TypeError(f"node {self.label()}: input {i} is a {type(v).__name__}, not a Value")
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses.pop((self, i), None)
        self._inputs = inputs
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses[(self, i)] = None

    def detach(self) -> None:
        """Drop this node's uses of its inputs (and recursively of its subgraphs' nodes)."""
        self.set_inputs([])
        for g in self.subgraphs():
            for n in g.all_nodes():
                n.set_inputs([])

    # --- attributes ----------------------------------------------------------------------------
    def set_attr(self, attr: Attr) -> None:
        for g in attr.graphs():
            g.parent = self
        self.attributes[attr.name] = attr

    def attr(self, name: str, default: Any = None) -> Any:
        """The attribute's value, or `default` when absent."""
        a = self.attributes.get(name)
        return default if a is None else a.value

    def subgraphs(self) -> list[Graph]:
        # hot: every recursive walk asks every node; plain int compares keep it cheap
        out: list[Graph] = []
        for a in self.attributes.values():
            t = a.type
            if (t == 5 or t == 10) and a.value is not None:  # GRAPH, GRAPHS
                if t == 5:
                    out.append(a.value)
                else:
                    out.extend(a.value)
        return out

    # --- misc ----------------------------------------------------------------------------------
    @property
    def op_id(self) -> tuple[str, str, str]:
        return (self.domain, self.op_type, self.overload)

    def label(self) -> str:
        """How errors name this node: its name if it has one, else its op and first output."""
        if self.name:
            return f"{self.name!r} ({self.op_type})"
        first = self._outputs[0].name if self._outputs else ""
        return f"{self.op_type} -> {first!r}" if first else self.op_type

    def __repr__(self) -> str:
        return f"Node({self.label()})"


class Graph:
    """An ordered list of nodes with named inputs, outputs and initializers.

    Iterating over a graph while inserting or removing nodes is safe: removed nodes are skipped
    and nodes inserted after the cursor are visited.
    """

    def __init__(
        self,
        inputs: Sequence[Value] = (),
        outputs: Sequence[Value] = (),
        nodes: Iterable[Node] = (),
        *,
        initializers: Iterable[Value] = (),
        name: str = "",
        doc_string: str = "",
        metadata_props: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] = dict(metadata_props or {})
        self.meta: dict[str, Any] = {}
        self.parent: Node | Function | None = None
        self.inputs: list[Value] = []
        self.outputs: list[Value] = list(outputs)
        self.initializers: dict[str, Value] = {}
        # tensor-name -> {key: value}; ONNX's quantization_annotation, kept verbatim
        self.quantization_annotation: list[tuple[str, dict[str, str]]] = []
        self._input_set: set[Value] = set()
        self._head: Node | None = None
        self._tail: Node | None = None
        self._count = 0
        self._cursor: tuple[Node | None, bool] | None = None  # insertion point (anchor, before?)
        self.set_inputs(inputs)
        for v in initializers:
            self.register_initializer(v)
        for n in nodes:
            self.append(n)

    def is_attached(self) -> bool:
        """False for a subgraph whose owning node, or an owner further up, has been removed from
        its graph (a pass walking `Model.graphs()` while it removes nodes skips such bodies)."""
        parent = self.parent
        while isinstance(parent, Node):
            if parent.graph is None:
                return False
            parent = parent.graph.parent
        return True

    # --- inputs / initializers -----------------------------------------------------------------
    def set_inputs(self, inputs: Sequence[Value]) -> None:
        for v in self.inputs:
            if self.initializers.get(v.name) is not v:
                v._graph = None
        self.inputs = list(inputs)
        self._input_set = set(self.inputs)
        for v in self.inputs:
            if v._producer is not None:
                raise ValueError(f"graph input {v.name!r} is produced by a node")
            v._graph = self

    def register_initializer(self, value: Value) -> None:
        """Make `value` (which must carry `const_value`) an initializer of this graph."""
        if value.const_value is None:
            raise ValueError(f"initializer {value.name!r} has no const_value")
        if not value.name:
            raise ValueError("an initializer needs a name")
        if value._producer is not None:
            raise ValueError(f"initializer {value.name!r} is produced by a node")
        old = self.initializers.get(value.name)
        if old is not None and old is not value:
            raise ValueError(f"graph already has an initializer named {value.name!r}")
        value._graph = self
        self.initializers[value.name] = value

    def remove_initializer(self, name: str) -> Value:
        v = self.initializers.pop(name)
        if v not in self._input_set:
            v._graph = None
        return v

    # --- nodes ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        n = self._head
        while n is not None:
            if not n._erased:
                yield n
            # an erased node keeps its _next so iteration can continue past it
            n = n._next

    def __len__(self) -> int:
        return self._count

    def __contains__(self, node: object) -> bool:
        return isinstance(node, Node) and node.graph is self and not node._erased

    @property
    def nodes(self) -> list[Node]:
        return list(self)

    def all_nodes(self) -> Iterator[Node]:
        """Every node, recursing into subgraphs (pre-order)."""
        for n in self:
            yield n
            for g in n.subgraphs():
                yield from g.all_nodes()

    def find_nodes(self, op_type: str, domain: str = "") -> list[Node]:
        return [n for n in self if n.op_type == op_type and n.domain == domain]

    def _link(self, node: Node, after: Node | None) -> None:
        if node.graph is not None:
            raise ValueError(f"node {node.label()} already belongs to a graph")
        node.graph = self
        node._erased = False
        node._prev = after
        node._next = self._head if after is None else after._next
        if node._next is not None:
            node._next._prev = node
        else:
            self._tail = node
        if after is None:
            self._head = node
        else:
            after._next = node
        self._count += 1

    def append(self, node: Node) -> Node:
        self._link(node, self._tail)
        return node

    def insert_after(self, anchor: Node, nodes: Node | Sequence[Node]) -> None:
        self._check_member(anchor)
        for n in [nodes] if isinstance(nodes, Node) else nodes:
            self._link(n, anchor)
            anchor = n

    def insert_before(self, anchor: Node, nodes: Node | Sequence[Node]) -> None:
        self._check_member(anchor)
        for n in [nodes] if isinstance(nodes, Node) else nodes:
            self._link(n, anchor._prev)

    def insert(self, node: Node) -> Node:
        """Insert at the current insertion point (end of graph by default)."""
        if self._cursor is None:
            return self.append(node)
        anchor, before = self._cursor
        if anchor is None:
            return self.append(node)
        if before:
            self.insert_before(anchor, node)
        else:
            self.insert_after(anchor, node)
            self._cursor = (node, False)
        return node

    @contextlib.contextmanager
    def inserting_before(self, anchor: Node) -> Iterator[None]:
        """New nodes made by a Builder on this graph go right before `anchor`."""
        saved, self._cursor = self._cursor, (anchor, True)
        try:
            yield
        finally:
            self._cursor = saved

    @contextlib.contextmanager
    def inserting_after(self, anchor: Node) -> Iterator[None]:
        saved, self._cursor = self._cursor, (anchor, False)
        try:
            yield
        finally:
            self._cursor = saved

    def _check_member(self, node: Node) -> None:
        if node.graph is not self or node._erased:
            raise ValueError(f"node {node.label()} is not in graph {self.name!r}")

    def remove(self, nodes: Node | Iterable[Node], *, safe: bool = True) -> None:
        """Remove nodes. With `safe`, refuse (VerifyError) when an output of a removed node is
        still used by a node that stays, or is a graph output; nothing is changed then."""
        # a node listed twice is removed once (unlinking it twice would corrupt the count)
        batch = list(dict.fromkeys([nodes] if isinstance(nodes, Node) else nodes))
        for n in batch:
            self._check_member(n)
        if safe:
            doomed = set(batch)
            for n in batch:
                for v in n.outputs:
                    for user, _ in v._uses:
                        if user not in doomed and _enclosing_node_in(user, self) not in doomed:
                            raise VerifyError(
                                f"cannot remove node {n.label()}: its output {v.name!r} is still used by {user.label()}",
                                n,
                            )
                    if v.is_graph_output():
                        raise VerifyError(f"cannot remove node {n.label()}: {v.name!r} is a graph output", n)
        for n in batch:
            n.detach()
            if n._prev is not None:
                n._prev._next = n._next
            else:
                self._head = n._next
            if n._next is not None:
                n._next._prev = n._prev
            else:
                self._tail = n._prev
            n._erased = True
            n.graph = None
            self._count -= 1
            if self._cursor is not None and self._cursor[0] is n:
                self._cursor = (n._next, True) if n._next is not None else None

    def sort(self) -> None:
        """Stable topological sort (Kahn's algorithm, ties broken by current order).

        Uses made by nodes inside subgraphs count as uses by the enclosing node here. Raises
        VerifyError naming a node on a cycle.
        """
        order = list(self)
        pos = {n: i for i, n in enumerate(order)}
        preds: dict[Node, set[Node]] = {n: set() for n in order}
        for n in order:
            for v in _node_reads(n):
                p = v._producer
                if p is not None and p in pos and p is not n:
                    preds[n].add(p)
                elif p is n:
                    raise VerifyError(f"cycle: node {n.label()} reads its own output {v.name!r}", n)
        succs: dict[Node, list[Node]] = {n: [] for n in order}
        indeg = {n: len(ps) for n, ps in preds.items()}
        for n, ps in preds.items():
            for p in ps:
                succs[p].append(n)
        import heapq

        ready = [pos[n] for n in order if indeg[n] == 0]
        heapq.heapify(ready)
        result: list[Node] = []
        while ready:
            n = order[heapq.heappop(ready)]
            result.append(n)
            for s in succs[n]:
                indeg[s] -= 1
                if indeg[s] == 0:
                    heapq.heappush(ready, pos[s])
        if len(result) != len(order):
            # every stuck node has a stuck predecessor; walking back must revisit a node, and
            # the first node revisited is on a cycle (the first stuck one may only be downstream)
            stuck = next(n for n in order if indeg[n] > 0)
            walked: set[Node] = set()
            while stuck not in walked:
                walked.add(stuck)
                stuck = min((p for p in preds[stuck] if indeg[p] > 0), key=pos.__getitem__)
            raise VerifyError(f"cycle: node {stuck.label()} depends on its own output", stuck)
        prev: Node | None = None
        for n in result:
            n._prev = prev
            if prev is None:
                self._head = n
            else:
                prev._next = n
            prev = n
        if prev is not None:
            prev._next = None
        self._tail = prev

    # --- names ---------------------------------------------------------------------------------
    def root(self) -> Graph:
        g = self
        while isinstance(g.parent, Node) and g.parent.graph is not None:
            g = g.parent.graph
        return g

    def values(self) -> Iterator[Value]:
        """Values defined in this graph (not in subgraphs): inputs, initializers, node outputs."""
        seen: set[int] = set()
        for v in itertools.chain(self.inputs, self.initializers.values()):
            if id(v) not in seen:
                seen.add(id(v))
                yield v
        for n in self:
            yield from n.outputs

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self)} nodes)"


def _node_reads(node: Node) -> Iterator[Value]:
    """Values read by a node, including reads from inside its subgraphs of outer values."""
    for v in node.inputs:
        if v is not None:
            yield v
    for g in node.subgraphs():
        for inner in g.all_nodes():
            for v in inner.inputs:
                if v is not None:
                    yield v


def _enclosing_node_in(node: Node, graph: Graph) -> Node | None:
    """The node of `graph` that is `node` or encloses it (through subgraphs); None if none."""
    n: Node | None = node
    while n is not None and n.graph is not graph:
        parent = n.graph.parent if n.graph is not None else None
        n = parent if isinstance(parent, Node) else None
    return n


@dataclass
class Function:
    """A model-local function (ONNX FunctionProto): a graph body plus attribute parameters."""

    domain: str
    name: str
    graph: Graph
    overload: str = ""
    # attribute parameters in declaration order; a default value is an Attr, None means none
    attributes: dict[str, Attr | None] = field(default_factory=dict)
    opset_imports: dict[str, int] = field(default_factory=dict)
    doc_string: str = ""
    metadata_props: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.graph.parent = self

    @property
    def id(self) -> tuple[str, str, str]:
        return (self.domain, self.name, self.overload)


@dataclass
class Model:
    """A graph plus what ONNX keeps around it."""

    graph: Graph
    ir_version: int = 10
    opset_imports: dict[str, int] = field(default_factory=lambda: {"": 21})
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: dict[str, str] = field(default_factory=dict)
    functions: dict[tuple[str, str, str], Function] = field(default_factory=dict)
    # TrainingInfoProto messages, serialized: graphopt does not rewrite training graphs
    training_info: list[bytes] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    # folder that external-data locations are relative to (set by load)
    base_dir: str | None = None
    # ModelProto fields the source stated although they hold the default ("" / 0), e.g.
    # {"producer_name", "opset_import.domain"}: the export states exactly these too, so a round
    # trip is byte-identical both for files that write every field and for ones that omit them
    explicit_defaults: frozenset[str] = frozenset()

    def graphs(self) -> Iterator[Graph]:
        """The main graph, every function body, and every subgraph of either."""
        roots = [self.graph] + [f.graph for f in self.functions.values()]
        for g in roots:
            yield g
            for n in g.all_nodes():
                yield from n.subgraphs()

    def all_nodes(self) -> Iterator[Node]:
        yield from self.graph.all_nodes()
        for f in self.functions.values():
            yield from f.graph.all_nodes()

    def verify(self) -> None:
        from graphopt.ir.verify import verify

        verify(self)

    def clone(self) -> Model:
        from graphopt.ir.clone import clone_model

        return clone_model(self)

    def __str__(self) -> str:
        from graphopt.ir.printer import print_model

        return print_model(self, elide_tensors_over=16)

    def __repr__(self) -> str:
        return f"Model(ir_version={self.ir_version}, opsets={self.opset_imports}, {len(self.graph)} nodes)"


AttrValue = Union[int, float, str, bytes, Tensor, Graph, list[Any]]

"""The matcher: find matches of a pattern rooted at a node, and say why there is none.

Matching is a backtracking search (alternatives, commutative operands and optional inputs give
choices). Every failure is recorded with how deep the partial match had got; the deepest one
(most nodes matched, first seen on ties) is the explanation `explain` and `Rule.why_not` give.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.ir.core import Function, Graph, Model, Node, Value
from graphopt.ir.query import const_array, enclosing_function, opset_version
from graphopt.pattern.pattern import (
    AnyPattern,
    ConstPattern,
    OpPattern,
    OptionalPattern,
    OrPattern,
    OutputPattern,
    Pattern,
    normalize_domain,
)

Bindings = dict[Any, Any]  # Pattern -> Node | Value | None, plus ("alt", OrPattern) -> int


class Fail:
    """A negative answer with a reason; falsy. `check` and `rewrite` may return one."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"Fail({self.reason!r})"

    def __str__(self) -> str:
        return self.reason


class Match:
    """A complete match: `m[pattern]` gives what that pattern object matched.

    Op patterns give the Node, every other pattern the Value (None for an absent optional
    input). `m.value(p)`, `m.node(p)` and `m.const(p)` ask for a specific kind.

    What a check needs beyond the matched nodes comes with the match: `m.model` (the model being
    rewritten or explained; None for a bare graph), `m.options` (the applying pass's options, or
    those `explain` was given), `m.opset()` (the opset governing the root's graph) and
    `m.function` (the function whose body the match is in).
    """

    def __init__(self, root: Node, bindings: Bindings, model: Model | None = None,
                 options: Mapping[str, object] | None = None) -> None:
        self.root = root
        self._b = bindings
        self._nodes: list[Node] | None = None
        self.model = model
        self.options: Mapping[str, object] = MappingProxyType(dict(options or {}))

    def __getitem__(self, p: Pattern) -> Any:
        try:
            return self._b[p]
        except KeyError:
            raise KeyError(f"pattern {p.describe()} is not part of this match (an alternative not taken?)") from None

    def __contains__(self, p: Pattern) -> bool:
        return p in self._b

    def get(self, p: Pattern, default: Any = None) -> Any:
        return self._b.get(p, default)

    def value(self, p: Pattern) -> Value | None:
        """The Value matched by `p` (an op pattern's node: its first output)."""
        v = self[p]
        return v.outputs[0] if isinstance(v, Node) else v

    def node(self, p: Pattern) -> Node:
        """The Node matched by an op pattern, or the producer of the value matched by `p`."""
        v = self[p]
        if isinstance(v, Node):
            return v
        n = v.producer() if isinstance(v, Value) else None
        if n is None:
            raise KeyError(f"pattern {p.describe()} matched {v!r}, which no node produces")
        return n

    def const(self, p: Pattern) -> np.ndarray:
        """The array of the constant matched by `p`."""
        arr = const_array(self.value(p))
        if arr is None:
            raise KeyError(f"pattern {p.describe()} did not match a constant")
        return arr

    def which(self, p: OrPattern) -> int:
        """Index of the alternative of `p` that matched."""
        return int(self._b[("alt", p)])

    @property
    def graph(self) -> Graph:
        assert self.root.graph is not None
        return self.root.graph

    @property
    def function(self) -> Function | None:
        """The model-local function whose body the match is in, else None."""
        return enclosing_function(self.graph)

    def opset(self, domain: str = "") -> int | None:
        """The opset of `domain` governing the match's graph (graphopt.ir.opset_version); None
        when unknown (no model given: callers assume a modern opset)."""
        return opset_version(self.model, self.graph, domain)

    @property
    def nodes(self) -> list[Node]:
        """The matched nodes (Constant producers of matched constants excluded), topologically."""
        if self._nodes is None:
            self._nodes = topo_order(bound_nodes(self._b))
        return list(self._nodes)

    def __repr__(self) -> str:
        return f"Match(root={self.root.label()}, nodes=[{', '.join(n.label() for n in self.nodes)}])"


@dataclass
class MatchResult:
    """The outcome of trying a rule at one node: a Match, or the best failure and its reason."""

    node: Node
    match: Match | None = None
    reason: str = ""
    # the deepest partial match seen (nodes matched so far, topologically)
    partial: list[Node] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.match is not None

    @property
    def depth(self) -> int:
        return len(self.match.nodes) if self.match is not None else len(self.partial)


def bound_nodes(b: Bindings) -> list[Node]:
    out: dict[Node, None] = {}
    for k, v in b.items():
        if isinstance(k, OpPattern) and isinstance(v, Node):
            out[v] = None
    return list(out)


def topo_order(nodes: list[Node]) -> list[Node]:
    """`nodes` ordered producers-first (DFS over inputs restricted to the set)."""
    members = set(nodes)
    done: set[Node] = set()
    order: list[Node] = []
    for start in nodes:
        stack: list[tuple[Node, bool]] = [(start, False)]
        while stack:
            n, expanded = stack.pop()
            if expanded:
                order.append(n)
                continue
            if n in done:
                continue
            done.add(n)
            stack.append((n, True))
            for v in reversed(n.inputs):
                p = v.producer() if v is not None else None
                if p is not None and p in members and p not in done:
                    stack.append((p, False))
    return order


def enclosing_in(node: Node, graph: Graph) -> Node | None:
    """`node` itself if it is in `graph`, else the node of `graph` whose subgraph holds it."""
    n: Node | None = node
    while n is not None and n.graph is not graph:
        g = n.graph
        n = g.parent if g is not None and isinstance(g.parent, Node) else None
    return n


@functools.lru_cache(maxsize=None)
def attr_default(domain: str, op_type: str, name: str) -> Any:
    """ONNX's default for an attribute the node leaves out (None when there is none)."""
    import onnx
    import onnx.defs

    try:
        schema = onnx.defs.get_schema(op_type, domain)
    except onnx.defs.SchemaError:  # an op onnx does not know: no defaults to offer
        return None
    a = schema.attributes.get(name)
    if a is None or a.default_value is None or a.default_value.type == 0:
        return None
    value = onnx.helper.get_attribute_value(a.default_value)
    return value.decode() if isinstance(value, bytes) else value


def _attr_equal(actual: Any, expected: Any) -> bool:
    if isinstance(actual, bytes):
        actual = actual.decode(errors="replace")
    if isinstance(expected, bytes):
        expected = expected.decode(errors="replace")
    if isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(actual) == len(expected) and all(_attr_equal(a, e) for a, e in zip(actual, expected))
    if isinstance(actual, float) or isinstance(expected, float):
        if isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
            return math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-12)  # attrs are float32
        return False
    if hasattr(actual, "numpy") and not isinstance(actual, (str, int)):
        return bool(np.array_equal(actual.numpy(), np.asarray(expected)))
    return bool(actual == expected)


def _show(v: Any) -> str:
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    if hasattr(v, "numpy") and hasattr(v, "shape") and not isinstance(v, np.ndarray):
        return f"tensor{list(v.shape)}"
    return repr(v)


class Matcher:
    """Matches one pattern at candidate root nodes; keeps the deepest failure for explanations.

    `allow_shared`: when False (the safe default), a match whose intermediate (non-root) node
    has an output used outside the match is rejected, because the rewrite could not remove it.
    """

    def __init__(self, pattern: Pattern, *, allow_shared: bool = False) -> None:
        self.pattern = pattern
        self.allow_shared = allow_shared
        self._best: tuple[int, int, str, Bindings] | None = None
        self._graph: Graph | None = None  # the root's graph: matches never leave it

    # --- public -------------------------------------------------------------------------------
    def matches(self, node: Node, model: Model | None = None, options: Mapping[str, object] | None = None) -> Iterator[Match]:
        """Every complete match rooted at `node`, in search order (each carrying `model` and
        `options`, see Match)."""
        self._best = None
        self._graph = node.graph
        for b in self._root(self.pattern, node, {}):
            reason = self._shared_violation(node, b)
            if reason:
                self._fail(b, reason)
                continue
            yield Match(node, b, model, options)

    def failure(self) -> tuple[str, list[Node]]:
        """The deepest failure of the last search: reason and the partial match's nodes."""
        if self._best is None:
            return "no match", []
        _, _, reason, b = self._best
        return reason, topo_order(bound_nodes(b))

    def record(self, b: Bindings, reason: str) -> None:
        """Record a failure found outside the matcher (a failed `check`) at full depth."""
        self._fail(b, reason, bonus=1)

    # --- failures -----------------------------------------------------------------------------
    def _fail(self, b: Bindings, reason: str, *, bonus: int = 0) -> None:
        key = (_depth(b) + bonus, len(b) + bonus)
        if self._best is None or key > self._best[:2]:
            self._best = (key[0], key[1], reason, dict(b))

    # --- search -------------------------------------------------------------------------------
    def _root(self, p: Pattern, node: Node, b: Bindings) -> Iterator[Bindings]:
        if isinstance(p, OpPattern):
            for b2 in self._node(p, node, b):
                yield from self._preds(p, node, node.outputs[0] if node.outputs else None, b2, f"node {node.label()}")
        elif isinstance(p, OutputPattern):
            if p.index >= len(node.outputs):
                self._fail(b, f"node {node.label()} has no output {p.index}")
                return
            v = node.outputs[p.index]
            for b2 in self._node(p.op, node, b):
                b3 = {**b2, p: v}
                yield from self._preds(p, v, v, b3, f"node {node.label()}: output {p.index} {v.name!r}")
        elif isinstance(p, OrPattern):
            saved, got = self._best, False
            for i, alt in enumerate(p.alternatives):
                for b2 in self._root(alt, node, b):
                    got = True
                    b3 = {**b2, ("alt", p): i, p: b2[alt]}
                    yield from self._preds(p, b2[alt], _first_value(b2[alt]), b3, f"node {node.label()}")
            if not got and self._best is not None and self._best[0] <= _depth(b):
                self._best = saved
                self._fail(b, f"node {node.label()} matches no alternative of {p.describe()}")
        else:  # pragma: no cover - rejected when the rule is built
            raise TypeError(f"cannot root a match at {p!r}")

    def _node(self, p: OpPattern, node: Node, b: Bindings) -> Iterator[Bindings]:
        """Match op pattern `p` against `node` (without its value predicates)."""
        here = f"node {node.label()}"
        if p in b:
            if b[p] is node:
                yield b
            else:
                self._fail(b, f"{here} must be the same node as {b[p].label()}")
            return
        if node.graph is not self._graph:
            # fusing across a subgraph boundary would move outer work into a loop/branch body
            self._fail(b, f"{here} is in an enclosing graph, outside the root's subgraph")
            return
        if node.op_type not in p.op_types or normalize_domain(node.domain) != p.domain:
            self._fail(b, f"{here} is not a {p.op_desc()}")
            return
        if p.num_outputs is not None and len(node.outputs) != p.num_outputs:
            self._fail(b, f"{here} has {len(node.outputs)} outputs, expected {p.num_outputs}")
            return
        for name, expected in p.attrs.items():
            a = node.attributes.get(name)
            actual = attr_default(node.domain, node.op_type, name) if a is None else a.value
            if callable(expected):
                ok = bool(expected(actual))
                want = f"to satisfy {getattr(expected, '__name__', 'a predicate')}"
            else:
                ok = _attr_equal(actual, expected)
                want = f"expected {_show(expected)}"
            if not ok:
                shown = "absent" if a is None and actual is None else _show(actual)
                self._fail(b, f"{here}: attribute {name}={shown}, {want}")
                return
        inputs = list(node.inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        if len(inputs) > len(p.inputs) and not p.variadic:
            self._fail(b, f"{here} has {len(inputs)} inputs, the pattern expects at most {len(p.inputs)}")
            return
        b1 = {**b, p: node}
        orders = [tuple(range(len(p.inputs)))]
        if p.commutative and len(p.inputs) >= 2:
            orders.append((1, 0) + tuple(range(2, len(p.inputs))))
        for order in orders:
            yield from self._inputs(p, node, inputs, order, 0, b1)

    def _inputs(
        self, p: OpPattern, node: Node, inputs: list[Value | None], order: tuple[int, ...], j: int, b: Bindings
    ) -> Iterator[Bindings]:
        if j == len(order):
            yield b
            return
        sub = p.inputs[order[j]]
        v = inputs[j] if j < len(inputs) else None
        name = f" {v.name!r}" if v is not None and v.name else ""
        site = f"node {node.label()}: input {j}{name}"
        for b2 in self._value(sub, v, b, site):
            yield from self._inputs(p, node, inputs, order, j + 1, b2)

    def _value(self, p: Pattern, v: Value | None, b: Bindings, site: str) -> Iterator[Bindings]:
        """Match value pattern `p` against `v` (None: an absent input); `site` names the spot."""
        if isinstance(p, OptionalPattern):
            if v is None:
                yield {**b, p: None}
                return
            for b2 in self._value(p.inner, v, b, site):
                yield from self._preds(p, v, v, {**b2, p: v}, site)
            return
        if v is None:
            self._fail(b, f"{site} is absent")
            return
        if p in b:
            bound = b[p]
            same = bound is v or (isinstance(bound, Node) and bound.outputs and bound.outputs[0] is v)
            if same:
                yield b
            else:
                other = bound.outputs[0].name if isinstance(bound, Node) else getattr(bound, "name", "?")
                self._fail(b, f"{site} must be the same value as {other!r}")
            return
        if isinstance(p, AnyPattern):
            yield from self._preds(p, v, v, {**b, p: v}, site)
        elif isinstance(p, ConstPattern):
            arr = const_array(v)
            if arr is None:
                self._fail(b, f"{site} is not a constant{_origin(v)}")
                return
            if not p.value_matches(arr):
                self._fail(b, f"{site} is a constant but not {_short(p.value)}")
                return
            if p.predicate is not None and not p.predicate(arr):
                why = getattr(p.predicate, "__name__", "predicate")
                self._fail(b, f"{site}: constant fails {why}")
                return
            yield from self._preds(p, v, v, {**b, p: v}, site)
        elif isinstance(p, OpPattern):
            node = v.producer()
            if node is None or v.index() != 0:
                what = _origin(v) if node is None else f" (output {v.index()} of {node.label()})"
                self._fail(b, f"{site} is not the output of a {p.op_desc()}{what}")
                return
            for b2 in self._node(p, node, b):
                yield from self._preds(p, node, v, b2, site)
        elif isinstance(p, OutputPattern):
            node = v.producer()
            if node is None or v.index() != p.index:
                what = _origin(v) if node is None else f" (output {v.index()} of {node.label()})"
                self._fail(b, f"{site} is not output {p.index} of a {p.op.op_desc()}{what}")
                return
            for b2 in self._node(p.op, node, b):
                yield from self._preds(p, v, v, {**b2, p: v}, site)
        elif isinstance(p, OrPattern):
            saved, got = self._best, False
            for i, alt in enumerate(p.alternatives):
                for b2 in self._value(alt, v, b, site):
                    got = True
                    yield from self._preds(p, v, v, {**b2, p: v, ("alt", p): i}, site)
            if not got and self._best is not None and self._best[0] <= _depth(b):
                # no alternative got past its first node: one message naming them all reads better
                self._best = saved
                self._fail(b, f"{site} matches no alternative of {p.describe()}{_origin(v)}")
        else:  # pragma: no cover
            raise TypeError(f"unknown pattern {p!r}")

    def _preds(self, p: Pattern, captured: Any, v: Value | None, b: Bindings, site: str) -> Iterator[Bindings]:
        if p.require_single_use and v is not None:
            n_uses = len(v.uses())
            if n_uses != 1 or v.is_graph_output():
                extra = " and is a graph output" if v.is_graph_output() else ""
                self._fail(b, f"{site}: {v.name!r} has {n_uses} uses{extra}, the pattern needs exactly one")
                return
        for pred, why in p.preds:
            if not pred(captured):
                self._fail(b, f"{site}: {why}")
                return
        yield b

    def _shared_violation(self, root: Node, b: Bindings) -> str:
        """Why the match is unsafe to rewrite: an intermediate output used outside it."""
        members = set(bound_nodes(b))
        g = root.graph
        shared_ok = {v for k, v in b.items() if isinstance(k, OpPattern) and k.shared_ok}
        for n in topo_order(list(members)):
            if n is root or self.allow_shared or n in shared_ok:
                continue
            for out in n.outputs:
                if out.is_graph_output():
                    return f"node {n.label()}: output {out.name!r} is a graph output, so the node cannot be replaced"
                for user, _ in out.uses():
                    outer = enclosing_in(user, g) if g is not None else user
                    if outer not in members:
                        return f"node {n.label()}: output {out.name!r} is also used by {user.label()}, outside the match"
        return ""


def _depth(b: Bindings) -> int:
    """How far a partial match got: the number of nodes bound."""
    return sum(1 for k in b if isinstance(k, OpPattern))


def _first_value(x: Any) -> Value | None:
    if isinstance(x, Node):
        return x.outputs[0] if x.outputs else None
    return x if isinstance(x, Value) else None


def _origin(v: Value) -> str:
    if v.is_graph_input():
        return " (a graph input)"
    if v.is_initializer():
        return " (an initializer)"
    n = v.producer()
    if n is not None:
        return f" (produced by {n.label()})"
    return " (defined in an enclosing graph)" if v.graph is None else ""


def _short(a: np.ndarray | None) -> str:
    if a is None:
        return "?"
    return str(a.tolist()) if a.size <= 8 else f"the given {a.dtype}{list(a.shape)} array"

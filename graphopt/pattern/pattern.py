"""Pattern objects: what a rule looks for.

    x = P.any("x")
    w = P.const(name="w")
    conv = P.op("Conv", x, w, P.optional(P.const()), attrs={"group": 1})
    root = P.op("Relu", conv)

A pattern matches a `Value` (an op pattern matches the value its node produces at output 0;
`p[i]` matches output i). The same pattern object used twice must match the same value (or node),
so DAG-shaped patterns work. Captures are keyed by the pattern objects themselves:
`match[conv]` is the Conv node, `match[x]` the Value bound to x.

Predicates chain and return the same object (so identity, and thus the capture key, is kept):
`P.any().has_dtype("float").has_rank(2).single_use().where(fn, "why")`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from graphopt.ir.types import DataType
from graphopt.ir.query import const_array as const_array  # re-exported: graphopt.pattern.const_array

#: A predicate with the reason reported when it is false.
Predicate = tuple[Callable[[Any], bool], str]

_ids = itertools.count()


def _as_dtype(d: DataType | str | Any) -> DataType:
    if isinstance(d, DataType):
        return d
    if isinstance(d, str):
        try:
            return DataType.from_text(d.lower())
        except ValueError:
            pass
    return DataType.from_numpy(np.dtype(d))


class Pattern:
    """Base of all patterns. Subclasses say what a single value must look like."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.preds: list[Predicate] = []
        self.require_single_use = False
        self._id = next(_ids)  # creation order: deterministic tie-breaks and reprs

    # Identity semantics: patterns are capture keys, so never compare by structure.
    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other

    # --- combinators / predicates ---------------------------------------------------------------
    def __or__(self, other: Pattern) -> OrPattern:
        """`a | b`: either alternative (tried in order)."""
        left = self.alternatives if isinstance(self, OrPattern) and not self.name and not self.preds else (self,)
        return OrPattern(*left, other)

    def where(self, pred: Callable[[Any], bool], why: str | None = None) -> Pattern:
        """Add a predicate on what `match[self]` gives (a Node for op patterns, else a Value)."""
        self.preds.append((pred, why or f"predicate {getattr(pred, '__name__', 'where')} is false"))
        return self

    def has_dtype(self, *dtypes: DataType | str | Any) -> Pattern:
        """The matched value's element type is one of `dtypes` (DataType, "float", np.float32...)."""
        allowed = {_as_dtype(d) for d in dtypes}
        names = ", ".join(sorted(d.text for d in allowed))

        def ok(v: Any) -> bool:
            return value_dtype(_as_value(v)) in allowed

        self.preds.append((ok, f"element type is not {names}"))
        return self

    def has_shape(self, dims: Sequence[int | str | None]) -> Pattern:
        """The matched value has this shape; a None dim in `dims` matches any dim."""
        want = tuple(dims)

        def ok(v: Any) -> bool:
            shape = _as_value(v).shape
            if shape is None or len(shape) != len(want):
                return False
            return all(w is None or w == d for w, d in zip(want, shape.dims))

        text = "[" + ",".join("?" if d is None else str(d) for d in want) + "]"
        self.preds.append((ok, f"shape is not {text}"))
        return self

    def has_rank(self, rank: int) -> Pattern:
        """The matched value has a known rank equal to `rank`."""

        def ok(v: Any) -> bool:
            shape = _as_value(v).shape
            return shape is not None and len(shape) == rank

        self.preds.append((ok, f"rank is not {rank}"))
        return self

    def single_use(self) -> Pattern:
        """The matched value has exactly one use and is not a graph output."""
        self.require_single_use = True
        return self

    # --- description ----------------------------------------------------------------------------
    def describe(self) -> str:
        """A one-line, expression-like rendering (names are shown where given)."""
        return self.name or self._describe()

    def _describe(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class AnyPattern(Pattern):
    """Matches any value (graph input, initializer, node output)."""

    def _describe(self) -> str:
        return "any"


class ConstPattern(Pattern):
    """Matches a constant: an initializer that is not a graph input (in IR >= 4 models), or a `Constant` node's output.

    `value`: a scalar (every element must equal it) or an array (shape and elements equal);
    `predicate(array) -> bool` for anything else. Float comparison is exact unless `rtol`/`atol`.
    """

    def __init__(
        self,
        value: Any = None,
        predicate: Callable[[np.ndarray], bool] | None = None,
        *,
        name: str = "",
        rtol: float = 0.0,
        atol: float = 0.0,
    ) -> None:
        super().__init__(name)
        self.value = None if value is None else np.asarray(value)
        self.predicate = predicate
        self.rtol, self.atol = rtol, atol

    def value_matches(self, array: np.ndarray) -> bool:
        if self.value is None:
            return True
        if array.size == 0:
            return False
        if self.value.ndim > 0 and array.shape != self.value.shape:
            return False
        if array.size == 1 and self.value.size == 1:  # the common case, without numpy overhead
            a, e = array.reshape(-1)[0].item(), self.value.reshape(-1)[0].item()
            if self.rtol or self.atol:
                return bool(abs(a - e) <= self.atol + self.rtol * abs(e))
            return bool(a == e)
        if self.rtol or self.atol:
            return bool(np.all(np.isclose(array, self.value, rtol=self.rtol, atol=self.atol)))
        return bool(np.all(array == self.value))

    def _describe(self) -> str:
        return "const" if self.value is None else f"const({self.value.tolist()})"


class OpPattern(Pattern):
    """Matches a node by op type (a name or a tuple of names), domain, attributes and inputs.

    Inputs are positional patterns; `P.optional(p)` accepts an absent input. A node with more
    (non-empty) inputs than the pattern lists does not match unless `variadic`. `commutative`
    also tries the first two inputs swapped. `outputs`: the exact number of outputs required
    (None: any). `attrs` values are compared with the attribute (ONNX's default when absent),
    or called with it when callable. `allow_shared()` lets this intermediate node's outputs be
    used outside the match (the node then survives the rewrite).
    """

    def __init__(
        self,
        op_type: str | Sequence[str],
        inputs: Sequence[Pattern],
        *,
        domain: str = "",
        attrs: Mapping[str, Any] | None = None,
        outputs: int | None = None,
        commutative: bool = False,
        variadic: bool = False,
        name: str = "",
    ) -> None:
        super().__init__(name)
        self.op_types: tuple[str, ...] = (op_type,) if isinstance(op_type, str) else tuple(op_type)
        if not self.op_types:
            raise ValueError("an op pattern needs at least one op type")
        for p in inputs:
            if not isinstance(p, Pattern):
                raise TypeError(f"op pattern {self.op_types[0]}: input {p!r} is not a Pattern")
        self.inputs: tuple[Pattern, ...] = tuple(inputs)
        self.domain = normalize_domain(domain)
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.num_outputs = outputs
        self.commutative = commutative
        self.variadic = variadic
        self.shared_ok = False
        self._outputs: dict[int, OutputPattern] = {}

    def __getitem__(self, index: int) -> OutputPattern:
        """The pattern of output `index` of this node (the same object each time)."""
        if self.num_outputs is not None and not 0 <= index < self.num_outputs:
            raise IndexError(f"{self.op_desc()} pattern has {self.num_outputs} outputs")
        out = self._outputs.get(index)
        if out is None:
            out = self._outputs[index] = OutputPattern(self, index)
        return out

    def allow_shared(self) -> OpPattern:
        self.shared_ok = True
        return self

    def op_desc(self) -> str:
        ops = "|".join(self.op_types)
        return f"{self.domain}::{ops}" if self.domain else ops

    def _describe(self) -> str:
        args = ", ".join(p.describe() for p in self.inputs)
        if self.variadic:
            args += ", ..." if args else "..."
        return f"{self.op_desc()}({args})"


class OutputPattern(Pattern):
    """Output `index` of the node matched by `op` (made by `op[index]`)."""

    def __init__(self, op: OpPattern, index: int) -> None:
        super().__init__("")
        self.op = op
        self.index = index

    def _describe(self) -> str:
        return f"{self.op.describe()}[{self.index}]"


class OrPattern(Pattern):
    """The first alternative that matches (then the next ones, on backtracking)."""

    def __init__(self, *alternatives: Pattern, name: str = "") -> None:
        super().__init__(name)
        if len(alternatives) < 2:
            raise ValueError("alternatives need at least two patterns")
        self.alternatives: tuple[Pattern, ...] = tuple(alternatives)

    def _describe(self) -> str:
        return "(" + " | ".join(p.describe() for p in self.alternatives) + ")"


class OptionalPattern(Pattern):
    """An input that may be absent (`match[p]` is then None) or present and matching `inner`."""

    def __init__(self, inner: Pattern, *, name: str = "") -> None:
        super().__init__(name)
        self.inner = inner

    def _describe(self) -> str:
        return f"{self.inner.describe()}?"


class P:
    """Pattern constructors: `P.op`, `P.any`, `P.const`, `P.optional`, `P.alt`."""

    @staticmethod
    def op(
        op_type: str | Sequence[str],
        *inputs: Pattern,
        domain: str = "",
        attrs: Mapping[str, Any] | None = None,
        outputs: int | None = None,
        commutative: bool = False,
        variadic: bool = False,
        name: str = "",
    ) -> OpPattern:
        """A node of `op_type` whose inputs match `inputs` (see OpPattern)."""
        return OpPattern(
            op_type, inputs, domain=domain, attrs=attrs, outputs=outputs, commutative=commutative, variadic=variadic, name=name
        )

    @staticmethod
    def any(name: str = "") -> AnyPattern:
        """Any value."""
        return AnyPattern(name)

    @staticmethod
    def const(
        value: Any = None,
        predicate: Callable[[np.ndarray], bool] | None = None,
        *,
        name: str = "",
        rtol: float = 0.0,
        atol: float = 0.0,
    ) -> ConstPattern:
        """A constant value, optionally equal to `value` or satisfying `predicate(array)`."""
        return ConstPattern(value, predicate, name=name, rtol=rtol, atol=atol)

    @staticmethod
    def optional(inner: Pattern | None = None, *, name: str = "") -> OptionalPattern:
        """An input that may be omitted; when present it must match `inner` (default: any)."""
        return OptionalPattern(inner if inner is not None else AnyPattern(), name=name)

    @staticmethod
    def alt(*alternatives: Pattern, name: str = "") -> OrPattern:
        """Alternatives, tried in order (same as `a | b | c`)."""
        return OrPattern(*alternatives, name=name)


# --- helpers shared by the matcher and rules ----------------------------------------------------
def normalize_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def root_op_keys(pattern: Pattern) -> list[tuple[str, str]]:
    """(domain, op_type) of every node a match of `pattern` can be rooted at."""
    if isinstance(pattern, OpPattern):
        return [(pattern.domain, t) for t in pattern.op_types]
    if isinstance(pattern, OutputPattern):
        return root_op_keys(pattern.op)
    if isinstance(pattern, OrPattern):
        keys: list[tuple[str, str]] = []
        for alt in pattern.alternatives:
            keys += [k for k in root_op_keys(alt) if k not in keys]
        return keys
    raise TypeError(
        f"a rule's pattern must be rooted at an op pattern (or an output of one, or alternatives of those), not {pattern!r}"
    )


def walk(pattern: Pattern) -> Iterable[Pattern]:
    """Every sub-pattern once, root first."""
    seen: set[Pattern] = set()
    stack = [pattern]
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        yield p
        if isinstance(p, OpPattern):
            stack.extend(reversed(p.inputs))
        elif isinstance(p, OutputPattern):
            stack.append(p.op)
        elif isinstance(p, OrPattern):
            stack.extend(reversed(p.alternatives))
        elif isinstance(p, OptionalPattern):
            stack.append(p.inner)


def _as_value(obj: Any) -> Any:
    """Predicates like has_dtype on an op pattern look at the node's first output."""
    from graphopt.ir.core import Node

    return obj.outputs[0] if isinstance(obj, Node) else obj


def value_dtype(v: Any) -> DataType | None:
    dt: DataType | None = v.dtype
    if dt is not None:
        return dt
    arr = const_array(v)
    if arr is None:
        return None
    try:
        return DataType.from_numpy(arr.dtype)
    except (ValueError, KeyError, TypeError):  # a numpy dtype with no ONNX element type
        return None

"""Rules: a pattern, a `check` that says ok or why not, and a `rewrite` that builds the
replacement; plus the rule registry (`--explain RULE` finds rules by name).

Subclass form (patterns as class attributes, so captures are typo-proof attribute lookups):

    class MulByOne(Rule):
        '''Mul(x, 1) -> x.

        Must not fire when the broadcast of the constant changes x's shape or type.'''
        name = "mul-by-one"
        x = P.any()
        one = P.const(1.0)
        pattern = P.op("Mul", x, one, commutative=True)

        def check(self, m):
            return m[self.x].type == m.root.outputs[0].type or Fail("Mul broadcasts x")

        def rewrite(self, m, b):
            return m[self.x]

Functional form: `Rule("mul-by-one", pattern, rewrite=lambda m, b: m[x], check=..., benefit=2)`.
"""

from __future__ import annotations


import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np

from graphopt.errors import UsageError
from graphopt.ir.builder import Builder
from graphopt.ir.core import Attr, Function, Graph, Model, Node, Value
from graphopt.ir.tensor import NumpyTensor, Tensor
from graphopt.ir.types import Shape, TensorType
from graphopt.pattern.context import current_model, current_options
from graphopt.pattern.matcher import Fail, Match, Matcher, MatchResult
from graphopt.pattern.pattern import Pattern, root_op_keys

#: What `check` may return: True/None (ok), False (fails, no reason), or Fail(reason).
CheckResult = Union[bool, Fail, None]
#: What `rewrite` returns: the replacement of the root's output(s), or Fail to back out.
RewriteResult = Union[Value, Sequence[Union[Value, None]], Fail]





class RewriteBuilder(Builder):
    """The Builder a rewrite gets: new nodes go right before the match's root.

    `b.op.Gemm(a, w, c, transB=1)`, `b.initializer(array, "name")`, `b.constant(array)`.
    Everything it creates is tracked so a rewrite that returns `Fail` is backed out cleanly.
    """

    def __init__(self, graph: Graph, match: Match) -> None:
        super().__init__(graph)
        self.match = match
        self.created_initializers: list[Value] = []

    def initializer(self, value: np.ndarray | Tensor, name: str = "const") -> Value:
        """A constant: an initializer of the root graph, or a Constant node in a function body
        (ONNX functions have no initializers)."""
        if isinstance(self.graph.root().parent, Function):
            tensor = value if isinstance(value, Tensor) else NumpyTensor(np.asarray(value))
            node = self.node("Constant", [], [Attr.infer("value", tensor)], output_names=[name])
            node.outputs[0].type = TensorType(tensor.dtype, Shape(tensor.shape))
            return node.outputs[0]
        v = super().initializer(value, name)
        self.created_initializers.append(v)
        return v

    def constant(self, value: Any, name: str = "const", dtype: Any = None) -> Value:
        """An initializer holding `value` (a scalar or array; `dtype` forces the element type)."""
        return self.initializer(np.asarray(value, dtype=dtype), name)


class Rule:
    """A local rewrite. Set `name`, `pattern`, `benefit`; override `check` and `rewrite`.

    - `check(match)` returns True (or None) when the rewrite is valid, else `Fail("why")`.
    - `rewrite(match, b)` builds new nodes with `b` and returns the replacement for each output
      of the root node (a Value for a single-output root; None for an unused output). Matched
      nodes left without uses are removed by the driver, never by the rule.
    - `benefit`: rules are tried in descending benefit at each node.
    - `allow_shared`: let intermediate matched nodes have uses outside the match (they are kept
      then). Off by default so that a fusion never duplicates work or drops a live node.
    """

    name: str = ""
    pattern: Pattern | None = None
    benefit: int = 1
    allow_shared: bool = False

    def __init__(
        self,
        name: str | None = None,
        pattern: Pattern | None = None,
        rewrite: Callable[[Match, RewriteBuilder], RewriteResult] | None = None,
        check: Callable[[Match], CheckResult] | None = None,
        *,
        benefit: int | None = None,
        allow_shared: bool | None = None,
        doc: str | None = None,
    ) -> None:
        if name is not None:
            self.name = name
        if pattern is not None:
            self.pattern = pattern
        if benefit is not None:
            self.benefit = benefit
        if allow_shared is not None:
            self.allow_shared = allow_shared
        self._rewrite_fn = rewrite
        self._check_fn = check
        if doc is not None:
            self.__doc__ = doc
        elif type(self) is Rule:
            self.__doc__ = ""  # not the base class's docstring
        if not self.name or self.name != self.name.lower() or " " in self.name:
            raise UsageError(f"rule {type(self).__qualname__} needs a kebab-case name, got {self.name!r}")
        if self.pattern is None:
            raise UsageError(f"rule {self.name!r} has no pattern")
        if rewrite is None and type(self).rewrite is Rule.rewrite:
            raise UsageError(f"rule {self.name!r} has no rewrite")
        self.root_ops: list[tuple[str, str]] = root_op_keys(self.pattern)

    # --- what subclasses override -------------------------------------------------------------
    def check(self, match: Match) -> CheckResult:
        """Whether the rewrite is valid for this match (True, or Fail with the reason)."""
        return True if self._check_fn is None else self._check_fn(match)

    def rewrite(self, match: Match, b: RewriteBuilder) -> RewriteResult:
        """Build the replacement; return one Value per root output (or Fail to back out)."""
        assert self._rewrite_fn is not None
        return self._rewrite_fn(match, b)

    # --- matching -----------------------------------------------------------------------------
    def matcher(self) -> Matcher:
        assert self.pattern is not None
        return Matcher(self.pattern, allow_shared=bool(self.allow_shared))

    def try_match(self, node: Node, matcher: Matcher | None = None, *, model: Model | None = None,
                  options: Mapping[str, object] | None = None) -> MatchResult:
        """The first match at `node` that passes `check`, or the deepest failure and its reason.
        The match carries `model` and `options` (default: those of an enclosing
        `model_context`, else none) for the check and the rewrite."""
        m = matcher or self.matcher()
        if model is None:
            model = current_model()
            options = current_options() if options is None else options
        for match in m.matches(node, model, options):
            verdict = self.check(match)
            if verdict is None or verdict is True:
                return MatchResult(node, match)
            reason = verdict.reason if isinstance(verdict, Fail) else "returned False"
            m.record(match._b, f"check failed: {reason}")
        reason, partial = m.failure()
        return MatchResult(node, None, reason, partial)

    def match(self, node: Node) -> Match | None:
        """The first valid match rooted at `node`, or None."""
        return self.try_match(node).match

    def why_not(self, node: Node) -> str | None:
        """None when the rule applies at `node`, else the reason it does not."""
        r = self.try_match(node)
        return None if r else r.reason

    def candidates(self, graph: Graph) -> Iterator[Node]:
        """Nodes of `graph` whose op could root a match."""
        keys = set(self.root_ops)
        for n in graph:
            if (_dom(n.domain), n.op_type) in keys:
                yield n

    def summary(self) -> str:
        doc = (self.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __repr__(self) -> str:
        return f"<Rule {self.name} benefit={self.benefit}>"


class PlanRule(Rule):
    """A rule whose check works out what the rewrite needs: override `plan(match)`, returning that
    plan or `Fail("why")`, and `build(match, b, plan)`, building the replacement from it.
    `check` and `rewrite` each call `plan` (the graph may change between them)."""

    def plan(self, match: Match) -> Any:
        raise NotImplementedError

    def build(self, match: Match, b: RewriteBuilder, plan: Any) -> RewriteResult:
        raise NotImplementedError

    def check(self, match: Match) -> CheckResult:
        plan = self.plan(match)
        return plan if isinstance(plan, Fail) else True

    def rewrite(self, match: Match, b: RewriteBuilder) -> RewriteResult:
        plan = self.plan(match)
        return plan if isinstance(plan, Fail) else self.build(match, b, plan)


def _dom(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


# --- registry -----------------------------------------------------------------------------------
_RULES: dict[str, Rule] = {}
_loaded = False


def register_rule(rule: Rule | type[Rule]) -> Any:
    """Make a rule findable by name (`get_rule`, `--explain RULE`). Works as a class decorator
    (the class is instantiated with no arguments and returned unchanged). Two different rules
    with one name is an error."""
    inst = rule() if isinstance(rule, type) else rule
    prev = _RULES.get(inst.name)
    same_class = type(prev) is not Rule and (type(prev).__module__, type(prev).__qualname__) == (
        type(inst).__module__,
        type(inst).__qualname__,
    )  # a module imported twice re-registers its own rules
    if prev is not None and prev is not inst and not same_class:
        raise UsageError(f"rule name clash: {inst.name!r} is registered twice ({type(prev).__qualname__}, {type(inst).__qualname__})")
    _RULES[inst.name] = inst
    return rule


def _load_builtins() -> None:
    # built-in rules register when their pass modules import; plugins load with the passes
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        from graphopt.transform.registry import list_passes

        list_passes()
    except ImportError:  # pragma: no cover - a partial install
        importlib.import_module("graphopt.passes")


def get_rule(name: str) -> Rule:
    """The registered rule called `name`; UsageError (with a suggestion) when unknown."""
    _load_builtins()
    try:
        return _RULES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_RULES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown rule {name!r}{hint}; known rules: {', '.join(sorted(_RULES)) or 'none'}") from None


def list_rules() -> dict[str, Rule]:
    """Every registered rule by name, sorted."""
    _load_builtins()
    return dict(sorted(_RULES.items()))


def unregister_rule(name: str) -> None:
    """Forget a rule (tests)."""
    _RULES.pop(name, None)

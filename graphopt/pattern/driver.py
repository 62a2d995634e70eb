"""The greedy worklist driver and the rewriter (the one place where rules mutate the graph).

`apply_rules(model, rules, ctx)` visits every graph of the model (main graph, function bodies,
If/Loop/Scan bodies). Per graph it runs up to `max_iterations` sweeps, like MLIR's greedy
driver: a sweep seeds a FIFO worklist with every node in order; at each node the rules whose
root op is the node's op are tried in descending benefit; after a rewrite the nodes it touched
(new nodes, readers of the replacements, producers of the removed nodes' inputs and their other
readers) are pushed again. A sweep that changed something is followed by another one, so the
result is a fixed point unless the bound stops it first. Candidate rules are found through an
index by (domain, op_type), so a sweep costs O(nodes) plus the match attempts.

`ctx.rewrite_limit = k` stops after k rewrites in total (NumericCheckInstrument bisects with
it); each applied rewrite is recorded as `Rewrite(rule, [matched node names])`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from graphopt.errors import GraphoptError, VerifyError
from graphopt.ir.builder import unique_name
from graphopt.ir.core import Graph, Model, Node, Value
from graphopt.pattern.matcher import Fail, Match, Matcher
from graphopt.pattern.pattern import ConstPattern, walk
from graphopt.pattern.context import model_context
from graphopt.pattern.rule import RewriteBuilder, Rule
from graphopt.transform.pass_base import Pass, PassContext, PassResult, Rewrite


class RewriteError(RuntimeError):
    """A rule's rewrite returned something the rewriter cannot apply (a bug in the rule)."""


def node_ref(n: Node) -> str:
    """How a Rewrite record names a node: its name, else its label."""
    return n.name or n.label()


class Rewriter:
    """Applies one rule's rewrite to one match and keeps the graph valid.

    New nodes go right before the root; uses of the root's outputs are redirected to the
    replacements (a graph output keeps its name: a freshly built replacement takes the name
    over when it is an inner node output, anything else gets an Identity carrying it); matched nodes left without uses are
    removed, and so are unused Constant nodes feeding matched constants.
    """

    def __init__(self, model: Model, ctx: PassContext) -> None:
        self.model = model
        self.ctx = ctx

    def apply(self, rule: Rule, match: Match) -> list[Node] | None:
        """Rewrite `match`; the nodes worth revisiting, or None when the rule backed out."""
        root = match.root
        g = match.graph
        b = RewriteBuilder(g, match)
        try:
            with g.inserting_before(root):
                result = rule.rewrite(match, b)
        except Exception as e:
            e.add_note(f"in rule {rule.name!r} rewriting {root.label()}")
            raise
        if isinstance(result, Fail):
            self._back_out(g, b)
            return None
        replacements = self._normalize(rule, root, result)
        created = set(b.created)
        touched: dict[Node, None] = dict.fromkeys(b.created)
        used_as_output: set[Value] = set()
        for old, new in zip(root.outputs, replacements):
            if new is None:
                continue
            if new.type is None:
                new.type = old.type
            for user, i in old.uses():
                if user not in created:  # a replacement may read the old value (wrap rewrites)
                    user.replace_input_with(i, new)
                    touched[user] = None
            if old.is_graph_output():
                carrier = self._output_carrier(g, root, old, new, created, used_as_output)
                g.outputs[:] = [carrier if o is old else o for o in g.outputs]
                used_as_output.add(carrier)
        self._remove_dead(g, rule, match, b, touched)
        if self.ctx.debug:
            try:
                self.model.verify()
            except GraphoptError as e:
                nodes = ", ".join(node_ref(n) for n in match.nodes)
                raise VerifyError(f"rule {rule.name!r} on [{nodes}] left an invalid model: {e}") from None
        return [n for n in touched if n.graph is g]

    def _normalize(self, rule: Rule, root: Node, result: object) -> list[Value | None]:
        outs = [result] if isinstance(result, Value) else list(result) if isinstance(result, (list, tuple)) else None
        if outs is None or not all(v is None or isinstance(v, Value) for v in outs):
            raise RewriteError(f"rule {rule.name!r}: rewrite returned {result!r}, expected Value(s) or Fail")
        if len(outs) > len(root.outputs):
            raise RewriteError(f"rule {rule.name!r}: {len(outs)} replacements for {len(root.outputs)} outputs of {root.label()}")
        outs += [None] * (len(root.outputs) - len(outs))
        for old, new in zip(root.outputs, outs):
            if new is old:
                raise RewriteError(f"rule {rule.name!r}: replaced output {old.name!r} of {root.label()} by itself")
            if new is None and (old.uses() or old.is_graph_output()):
                raise RewriteError(f"rule {rule.name!r}: output {old.name!r} of {root.label()} is used but has no replacement")
        return outs

    def _output_carrier(
        self, g: Graph, root: Node, old: Value, new: Value, created: set[Node], taken: set[Value]
    ) -> Value:
        """The value that becomes graph output `old.name`. A node output of this graph may take
        the name over; a graph input, an initializer, an outer-scope value, another graph output
        or a name quantization annotations refer to keeps its name, and an Identity carries the
        output name instead."""
        name = old.name
        producer = new.producer()
        annotated = any(t == new.name for t, _ in g.quantization_annotation)
        renamable = (
            producer is not None and producer.graph is g and not new.is_graph_output() and new not in taken and not annotated
        )
        if not renamable:
            ident = Node("", "Identity", [new], outputs=[Value(unique_name(g, name + "_id"), new.type)])
            g.insert_before(root, ident)
            created.add(ident)
            new = ident.outputs[0]
        old.name = unique_name(g, name + "_replaced")
        new.name = name
        if not new.doc_string:
            new.doc_string = old.doc_string
        for k, val in old.metadata_props.items():
            new.metadata_props.setdefault(k, val)
        return new

    def _remove_dead(self, g: Graph, rule: Rule, match: Match, b: RewriteBuilder, touched: dict[Node, None]) -> None:
        # consumers first, so a chain dies in one pass
        candidates = list(reversed(match.nodes))
        assert rule.pattern is not None
        consts = [match.get(p) for p in walk(rule.pattern) if isinstance(p, ConstPattern)]
        candidates += [v.producer() for v in consts if isinstance(v, Value) and v.producer() is not None]  # type: ignore[misc]
        candidates += list(reversed(b.created))
        for n in dict.fromkeys(candidates):
            if n.graph is not g or not _is_dead(n):
                continue
            for v in n.inputs:
                p = v.producer() if v is not None else None
                if p is not None and p.graph is g:
                    touched[p] = None
            g.remove(n, safe=True)
            touched.pop(n, None)
        for p in list(touched):
            if p.graph is g:
                for out in p.outputs:
                    for user in out.consumers():
                        touched.setdefault(user, None)

    def _back_out(self, g: Graph, b: RewriteBuilder) -> None:
        for n in reversed(b.created):
            if n.graph is g:
                g.remove(n, safe=False)
        root = g.root()
        for v in b.created_initializers:
            if not v.uses() and root.initializers.get(v.name) is v:
                root.remove_initializer(v.name)


def drop_unused_initializers(values: Iterable[Value]) -> int:
    """Remove those of `values` that are initializers nothing reads any more (never graph
    inputs or outputs, nor tensors named by a quantization annotation); returns how many.

    Rule-based passes that rewrite weights call it at the end with the constants their
    rewrites read, so a model never carries both the old and the new version of a weight.
    """
    removed = 0
    for v in values:
        g = v.graph
        if g is None or g.initializers.get(v.name) is not v or v.uses() or v.is_graph_input() or v.is_graph_output():
            continue
        if any(q == v.name for q, _ in g.quantization_annotation):
            continue
        g.remove_initializer(v.name)
        removed += 1
    return removed


def _is_dead(n: Node) -> bool:
    return all(not o.uses() and not o.is_graph_output() for o in n.outputs)


def _graph_alive(g: Graph, roots: set[int]) -> bool:
    """A subgraph whose owner node was removed by an earlier rewrite is not visited."""
    while id(g) not in roots:
        parent = g.parent
        if not isinstance(parent, Node) or parent.graph is None or parent._erased:
            return False
        g = parent.graph
    return True


@dataclass
class _State:
    count: int = 0
    limit: int | None = None
    candidates: int = 0  # nodes a rule was tried at
    miss: str = ""  # the first reason a rule did not match (for the pass's note)

    def exhausted(self) -> bool:
        return self.limit is not None and self.count >= self.limit


def apply_rules(
    model: Model,
    rules: Iterable[Rule],
    ctx: PassContext | None = None,
    *,
    max_iterations: int = 10,
    max_rewrites: int | None = None,
    options: Mapping[str, object] | None = None,
    drop_orphaned_initializers: bool = False,
) -> PassResult:
    """Apply `rules` greedily to every graph of `model` until nothing matches (or the bounds
    stop it: `max_iterations` sweeps per graph, `max_rewrites` and `ctx.rewrite_limit` rewrites
    in total). Stats: rewrites per rule name. Rewrites: each one applied, in order. Each Match
    carries `model` and `options` (`m.model`, `m.options`, `m.opset()`) for the rules' checks
    and rewrites.

    `drop_orphaned_initializers`: initializers that were read before and that no node reads
    after the rewrites (a folded weight's old version) are removed at the end (stat
    `initializers-removed`), so the model never carries both versions. RewritePass sets it."""
    ctx = ctx if ctx is not None else PassContext()
    ordered = sorted(rules, key=lambda r: -r.benefit)  # stable: ties keep the given order
    index: dict[tuple[str, str], list[tuple[Rule, Matcher]]] = {}
    for r in ordered:
        m = r.matcher()
        for key in r.root_ops:
            index.setdefault(key, []).append((r, m))
    rewriter = Rewriter(model, ctx)
    result = PassResult(changed=False)
    limits = [k for k in (ctx.rewrite_limit, max_rewrites) if k is not None]
    state = _State(limit=min(limits) if limits else None)
    roots = {id(model.graph)} | {id(f.graph) for f in model.functions.values()}
    live = [v for g in model.graphs() for v in g.initializers.values() if v.uses()] if drop_orphaned_initializers else []
    with model_context(model, options):
        for g in list(model.graphs()):
            if state.exhausted():
                break
            if not _graph_alive(g, roots):
                continue
            _run_graph(g, index, rewriter, result, state, max_iterations, ctx, model, options)
    result.changed = state.count > 0
    if result.changed and live:
        removed = drop_unused_initializers(live)
        if removed:
            result.stats["initializers-removed"] = removed
    if not result.changed and not result.note:
        if not state.candidates:
            root_ops = sorted({op for r in ordered for _, op in r.root_ops})
            result.note = f"no match: the model has no {'/'.join(root_ops[:6]) or 'root'} nodes to start from"
        else:
            result.note = f"no match at {state.candidates} candidate nodes" + (f" (first: {state.miss})" if state.miss else "")
    return result


def _run_graph(
    g: Graph,
    index: dict[tuple[str, str], list[tuple[Rule, Matcher]]],
    rewriter: Rewriter,
    result: PassResult,
    state: _State,
    max_iterations: int,
    ctx: PassContext,
    model: Model,
    options: Mapping[str, object] | None,
) -> None:
    for _ in range(max_iterations):
        changed = False
        work: deque[Node] = deque(g)
        queued: set[Node] = set(work)
        # a rule pair undoing each other would loop forever inside one sweep; bound the visits
        budget = 10 * len(queued) + 100
        while work:
            if state.exhausted():
                return
            budget -= 1
            if budget < 0:
                ctx.info(f"rewrite driver: sweep over graph {g.name!r} stopped after too many visits (rules that undo each other?)")
                break
            n = work.popleft()
            queued.discard(n)
            if n.graph is not g:
                continue
            for rule, matcher in index.get((_dom(n.domain), n.op_type), ()):
                mr = rule.try_match(n, matcher, model=model, options=options)
                state.candidates += 1
                if mr.match is None:
                    if not state.miss and mr.reason:
                        state.miss = f"{rule.name}: {mr.reason}"[:140]
                    continue
                names = [node_ref(x) for x in mr.match.nodes]
                touched = rewriter.apply(rule, mr.match)
                if touched is None:
                    continue
                state.count += 1
                changed = True
                result.rewrites.append(Rewrite(rule.name, names))
                result.stats[rule.name] = result.stats.get(rule.name, 0) + 1
                for t in touched:
                    if t not in queued:
                        queued.add(t)
                        work.append(t)
                break
        if not changed:
            return
    ctx.info(f"rewrite driver: graph {g.name!r} still changing after {max_iterations} iterations")


def _dom(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


@dataclass(frozen=True)
class RewritePass(Pass):
    """Base of rule-based passes: set `name` and `rules` (class attributes), or override
    `get_rules` when the rules depend on the pass's options. `max_iterations` bounds the
    sweeps per graph. The rules see the pass's options as `m.options`; initializers the
    rewrites left unread are dropped (stat `initializers-removed`)."""

    name: ClassVar[str] = ""
    rules: ClassVar[Sequence[Rule]] = ()
    max_iterations: int = 10  # sweeps over each graph at most (the log says when it was still changing)
    max_rewrites: int | None = None  # stop after this many rewrites (None: no limit; bisects a bad rewrite)

    def get_rules(self) -> Sequence[Rule]:
        return self.rules

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        options = {f.name: getattr(self, f.name) for f in self.option_fields()}
        return apply_rules(model, self.get_rules(), ctx, max_iterations=self.max_iterations, max_rewrites=self.max_rewrites,
                           options=options, drop_orphaned_initializers=True)
